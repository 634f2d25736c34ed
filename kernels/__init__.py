"""Triton kernels of fastgpt, installed as the subpackage `fastgpt.kernels`."""
