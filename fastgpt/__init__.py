"""fastgpt: a GPT you can read in an afternoon, trained with fused kernels."""

import sys

__version__ = "0.1.0"

# `python -m fastgpt.<command>` imports this package first, with sys.argv[0] "-m" until the
# command's module is found (Python's documented behaviour for -m): the command is starting.
if sys.argv[:1] == ["-m"]:
    from fastgpt.startup import quiet_interrupts_while_starting

    quiet_interrupts_while_starting()


def __getattr__(name):
    # `from fastgpt import GPT` works, while `import fastgpt` stays cheap (no torch until needed).
    if name in ("GPT", "GPTConfig"):
        from fastgpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
