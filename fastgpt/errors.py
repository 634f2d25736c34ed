"""The one exception type for mistakes a user can fix (bad config, missing file, ...).

Command-line entry points catch it and print a single line, `fastgpt: error: <what is wrong and what
to do>`, with a non-zero exit instead of a traceback. Library callers get an ordinary exception.
"""


class FastGPTError(Exception):
    """A user-facing error whose message says what is wrong and what to do about it."""
