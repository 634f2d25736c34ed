"""The fused operations of the model, each on whichever backend `fastgpt.ops.dispatch` chooses.

    from fastgpt import ops
    y = ops.causal_attention(q, k, v)              # q, k, v: (B, H, T, D)
    z = ops.layer_norm(x, weight, bias, eps=1e-5)  # over the last dimension
    h = ops.gelu(x)                                # GELU, tanh approximation (GPT-2's)
    z = ops.rms_norm(x, weight, eps=1e-6)          # RMSNorm over the last dimension
    q = ops.rotary(q, offset=0, base=10000.0)      # rotary positions (Llama's convention)
    h = ops.relu_squared(x); h = ops.swiglu(x)     # MLP activations (SwiGLU of x = [gate, up])
    l = ops.cross_entropy(logits, targets)         # each row's loss: logits (N, V), targets (N,)

Each op is one module in `fastgpt/ops/definitions/` holding its public function, its contract (`fastgpt.ops.contract.FusedOp`:
kernel schemas, fake versions, the autograd formula, sample inputs), its plain-PyTorch reference and
PyTorch's built-in. Its kernels live beside each other by name: `csrc/<op>.cpp` for CPUs and
`kernels/<op>.py` for NVIDIA GPUs. Importing the op modules below registers them with the
dispatcher; `OPS` lists them.

How to add an op (say `softcap`), on every backend, in six files:

1. `fastgpt/ops/definitions/softcap.py`: the public function, reference, built-in, fake versions, autograd
   formula and sample inputs, registered as a `FusedOp` (copy the shape of `rms_norm.py`);
2. `fastgpt/ops/__init__.py` (this file): import it below;
3. `csrc/softcap.cpp`: the CPU kernels, ending with their `TORCH_LIBRARY_IMPL` registrations
   (`cpp_softcap_forward`, `cpp_softcap_backward`); the build compiles every `csrc/*.cpp`;
4. `kernels/softcap.py`: the Triton launchers `forward` and `backward`;
5. `tests/test_kernels_softcap.py`: what the op needs beyond the contract tests, which already hold every
   backend to the reference and to float64 on the sample inputs (`tests/test_op_contract.py`);
6. `benchmarks/test_softcap_speed.py`: the op against the reference and PyTorch's built-in.

An op with no kernel on some backend leaves that backend out of `FusedOp.kernels`, and that backend
runs PyTorch's built-in for it.
"""

from fastgpt.ops.dispatch import (BACKENDS, OPS, BackendUnavailable, available_backends, backend_module,
                                  resolve_backend, use_backend)
from fastgpt.ops.definitions.causal_attention import causal_attention
from fastgpt.ops.definitions.cross_entropy import cross_entropy
from fastgpt.ops.definitions.gelu import gelu
from fastgpt.ops.definitions.layer_norm import layer_norm
from fastgpt.ops.definitions.relu_squared import relu_squared
from fastgpt.ops.definitions.rms_norm import rms_norm
from fastgpt.ops.definitions.rotary import rotary
from fastgpt.ops.definitions.swiglu import swiglu

__all__ = ["BACKENDS", "OPS", "BackendUnavailable", "available_backends", "resolve_backend", "use_backend",
           "causal_attention", "layer_norm", "gelu", "rms_norm", "rotary", "relu_squared", "swiglu", "cross_entropy",
           "block_decoder"]


def block_decoder(x, block, backend=None):
    """The backend's fused op for one whole block of the model and one new token per sequence, or None.

    Decoding with a key/value cache does little arithmetic per token, and run as about twenty
    PyTorch operations per block, each one's fixed cost outweighs its work. So a backend may offer
    a block as one op, for inference only (no autograd, no dropout). Such an op computes one kind of
    block, which it declares (``DECODE_BLOCK``), and is offered only for that kind: `block` is the
    model's description of its block (GPTConfig.block_description(): sorted (name, value) pairs,
    apart from sizes, which the op reads off its tensors). The C++ backend has one, for GPT-2's
    block in float32 and float64 on CPU (csrc/decode.cpp). It is called as

        op(x, parameters, k_cache, v_cache, position, eps) -> the block's output, (B, C)

    with x the new tokens' residual stream (B, C); parameters the block's tensors in the order
    ln_1 (weight, bias), attention projection (weight, bias), its output projection, ln_2, MLP
    expansion, MLP output projection, each bias possibly None; k_cache and v_cache the
    (B, H, capacity, D) buffers, whose row `position` the op fills with the tokens' keys and values
    before attending over rows 0 .. position. None means the caller runs the block op by op.
    """
    if resolve_backend(backend, x.device) != "cpp":
        return None
    cpp = backend_module("cpp")
    if block != cpp.DECODE_BLOCK or x.dtype not in cpp.DECODE_BLOCK_DTYPES:
        return None
    return cpp.decode_block
