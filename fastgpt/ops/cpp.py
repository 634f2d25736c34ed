"""The C++ CPU backend (placeholder until the extension in csrc/ lands)."""


def unavailable_reason(device=None):
    return "the C++ extension is not part of this version yet"
