"""One module per fused op, named after it: its public function, its contract (a `FusedOp`), its
plain-PyTorch reference and PyTorch's built-in. `fastgpt/ops/__init__.py` imports each of them."""
