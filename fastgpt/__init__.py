"""fastgpt: a GPT you can read in an afternoon, trained with fused kernels."""

__version__ = "0.1.0"
