"""fastgpt: a GPT you can read in an afternoon, trained with fused kernels."""

__version__ = "0.1.0"


def __getattr__(name):
    # `from fastgpt import GPT` works, while `import fastgpt` stays cheap (no torch until needed).
    if name in ("GPT", "GPTConfig"):
        from fastgpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'fastgpt' has no attribute {name!r}")
