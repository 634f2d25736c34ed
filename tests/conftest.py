"""Test set-up shared by every test module.

Without a GPU, the Triton kernels are tested through Triton's interpreter on CPU tensors. The
interpreter is chosen when Triton is first imported, so the variable is set here, before any test
module can import Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
