"""The Triton backend (placeholder until the kernels in kernels/ land)."""


def unavailable_reason(device=None):
    return "the Triton kernels are not part of this version yet"
