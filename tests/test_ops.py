"""Every backend of the fused ops against the reference path and a float64 computation.

The same test bodies run on each backend that can run here: the C++ extension on CPU tensors, the
Triton kernels on a GPU or (without one) through Triton's interpreter on CPU tensors. Inputs are
drawn fresh on every run.
"""

import pytest
import torch

from fastgpt import ops
from fastgpt.ops import reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type == "cpu"  # Triton runs through its (slow) interpreter: keep shapes small

# Error allowed against the float64 result, per dtype: a few times what the reference itself shows.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def runnable_backends():
    return [name for name in ops.BACKENDS
            if name != "reference" and ops._module(name).unavailable_reason(DEVICE) is None]


BACKENDS = runnable_backends()
needs_backend = pytest.mark.skipif(not BACKENDS, reason="no fused backend can run on this machine")


def dtypes_for(backend):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if backend == "triton" else [])


# Every (backend, dtype) pair that backend takes: the C++ path has no fp16 kernels.
BACKEND_DTYPES = [pytest.param(b, d, id=f"{b}-{str(d).split('.')[-1]}") for b in BACKENDS for d in dtypes_for(b)]


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_close_to_float64(actual, reference_same_dtype, exact, dtype, what):
    """The fused result must be about as close to the float64 truth as the reference is.

    Errors are relative to the largest magnitude in the float64 result (at least 1), so that
    gradients summed over many rows (dweight, dbias) are judged on the same footing as outputs.
    """
    if exact.numel() == 0:
        assert actual.numel() == 0, f"{what}: {actual.numel()} values where none were expected"
        return
    magnitude = max(1.0, exact.abs().max().item())
    fused_error = max_error(actual, exact) / magnitude
    reference_error = max_error(reference_same_dtype, exact) / magnitude
    allowed = max(TOLERANCE[dtype], 3 * reference_error)
    assert fused_error <= allowed, (
        f"{what}: error {fused_error:.3g} vs float64 exceeds {allowed:.3g} "
        f"(the reference path in the same dtype is off by {reference_error:.3g})")


# (B, H, Tq, Tk, D): T=1, T not a multiple of any block, head dims that are not powers of two,
# B*H = 1, key/value longer than the queries (decoding with a cache), and keys spanning several
# blocks, so that the online softmax rescales its running sums.
ATTENTION_SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 100, 100, 48),
    (1, 2, 37, 37, 80),
    (1, 1, 64, 64, 64),
    (2, 2, 17, 17, 96),
    (1, 2, 5, 70, 32),
    (1, 1, 300, 560, 16),  # several key blocks of every kernel's width, with Tk > Tq
]


def attention_inputs(shape, dtype, layout):
    b, h, t_q, t_k, d = shape
    if layout == "contiguous":
        q = torch.randn(b, h, t_q, d, device=DEVICE, dtype=dtype)
        k = torch.randn(b, h, t_k, d, device=DEVICE, dtype=dtype)
        v = torch.randn(b, h, t_k, d, device=DEVICE, dtype=dtype)
        return q, k, v
    # Transposed views of one (B, T, 3, H, D) projection, as a model's fused qkv produces them.
    assert t_q == t_k
    qkv = torch.randn(b, t_q, 3, h, d, device=DEVICE, dtype=dtype)
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


def leaf(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in tensors]


@needs_backend
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_matches_reference_and_float64(backend, shape, dtype):
    inputs = attention_inputs(shape, dtype, "contiguous")
    grad_out = torch.randn(shape[0], shape[1], shape[2], shape[4], device=DEVICE, dtype=dtype)
    _compare_attention(backend, inputs, grad_out, dtype)


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_on_non_contiguous_views(backend):
    inputs = attention_inputs((2, 3, 33, 33, 48), torch.float32, "qkv-views")
    assert not inputs[0].is_contiguous()
    grad_out = torch.randn(2, 3, 33, 48, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    _compare_attention(backend, inputs, grad_out, torch.float32)


def _compare_attention(backend, inputs, grad_out, dtype):
    scale = inputs[0].shape[-1] ** -0.5
    _compare(f"{backend} attention", lambda q, k, v: ops.causal_attention(q, k, v, backend=backend),
             lambda q, k, v: reference.causal_attention(q, k, v, scale), inputs, grad_out,
             ("output", "dq", "dk", "dv"), dtype)


def _compare(op, fused, ref, tensors, grad_out, names, dtype=None):
    """Run `fused` and `ref` on leaf copies of `tensors`, and `ref` again in float64, each followed by
    a backward of grad_out; check the fused output and gradients (named by `names`) against both.

    dtype: the dtype every fused result must have (None: each keeps its own, as LayerNorm's
    parameter gradients come back in the parameters' dtype, which may differ from x's).
    """
    results = {}
    for name, run, cast in (("fused", fused, None), ("reference", ref, None), ("float64", ref, torch.float64)):
        leaves = leaf(tensors, cast)
        out = run(*leaves)
        out.backward(grad_out.to(out.dtype))
        results[name] = [out] + [t.grad for t in leaves]
    for i, what in enumerate(names):
        result, ref_result, exact = (results[n][i] for n in ("fused", "reference", "float64"))
        assert result.shape == exact.shape and (dtype is None or result.dtype == dtype), f"{what} is malformed"
        assert torch.isfinite(result).all(), f"{what} has non-finite values"
        assert_close_to_float64(result, ref_result, exact, dtype or result.dtype, f"{op} {what}")


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_is_causal(backend):
    """Changing the keys and values of future positions changes no earlier output."""
    q, k, v = attention_inputs((1, 2, 40, 40, 32), torch.float32, "contiguous")
    before = ops.causal_attention(q, k, v, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 5.0
    v2[:, :, 25:] -= 5.0
    after = ops.causal_attention(q, k2, v2, backend=backend)
    torch.testing.assert_close(after[:, :, :25], before[:, :, :25], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 25:], before[:, :, 25:])


# Rows shorter than a vector, some vectors and a part, and 57: more than a vector past two (the C++
# kernels sum two 16-wide vectors at a time).
LAYER_NORM_SHAPES = [(1, 1), (3, 5), (7, 48), (3, 57), (4, 6, 80), (33, 768), (2, 1000)]


@needs_backend
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", LAYER_NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_matches_reference_and_float64(backend, shape, dtype, affine):
    n = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3 + 1
    weight = torch.randn(n, device=DEVICE, dtype=dtype) if affine != "none" else None
    bias = torch.randn(n, device=DEVICE, dtype=dtype) if affine == "weight+bias" else None
    _compare_layer_norm(backend, x, weight, bias, torch.randn_like(x), dtype)


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_on_non_contiguous_input(backend):
    x = torch.randn(96, 40, device=DEVICE).t()  # (40, 96), rows strided
    assert not x.is_contiguous()
    weight, bias = torch.randn(96, device=DEVICE), torch.randn(96, device=DEVICE)
    _compare_layer_norm(backend, x, weight, bias, torch.randn(40, 96, device=DEVICE), torch.float32)


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_low_precision_input_with_float32_parameters(backend):
    """Under autocast a bf16 activation meets the model's fp32 weight and bias."""
    x = torch.randn(9, 64, device=DEVICE, dtype=torch.bfloat16)
    weight, bias = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    _compare_layer_norm(backend, x, weight, bias, torch.randn_like(x), torch.bfloat16)


def _compare_layer_norm(backend, x, weight, bias, grad_out, dtype):
    def with_parameters(layer_norm):  # the leaves are x and whichever of weight and bias are given
        def call(x, *parameters):
            given = iter(parameters)
            w = next(given) if weight is not None else None
            b = next(given) if bias is not None else None
            return layer_norm(x, w, b)
        return call

    present = [t for t in (x, weight, bias) if t is not None]
    names = ["output", "dx"] + (["dweight"] if weight is not None else []) + (["dbias"] if bias is not None else [])
    _compare(f"{backend} layer_norm", with_parameters(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, backend=backend)),
             with_parameters(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)), present, grad_out, names)


# Lengths below, around and not a multiple of the vector width, and an empty tensor.
GELU_SHAPES = [(1,), (0, 5), (3, 17), (2, 5, 100), (64, 512)]


@needs_backend
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gelu_matches_reference_and_float64(backend, shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 4
    _compare_gelu(backend, x, torch.randn_like(x), dtype)


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_on_non_contiguous_input(backend):
    x = torch.randn(40, 96, device=DEVICE).t() * 3  # (96, 40), columns strided
    assert not x.is_contiguous()
    _compare_gelu(backend, x, torch.randn(96, 40, device=DEVICE).t().contiguous().t(), torch.float32)


@needs_backend
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_saturates_like_float64_far_into_both_tails(backend):
    x = torch.tensor([-1e4, -60.0, -20.0, -6.0, -1e-7, 0.0, 1e-7, 6.0, 20.0, 1e4], device=DEVICE, requires_grad=True)
    out = ops.gelu(x, backend=backend)
    out.backward(torch.ones_like(out))
    x64 = x.detach().double().requires_grad_(True)
    exact = reference.gelu(x64)
    exact.backward(torch.ones_like(exact))
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


def _compare_gelu(backend, x, grad_out, dtype):
    _compare(f"{backend} gelu", lambda x: ops.gelu(x, backend=backend), reference.gelu, [x], grad_out,
             ("output", "dx"), dtype)


def test_reference_gelu_is_the_tanh_formula():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    formula = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(reference.gelu(x), formula)


def test_reference_attention_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 3, 20, 16, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference.causal_attention(q, k, v, 16 ** -0.5), expected)


def test_reference_layer_norm_matches_torch():
    x, w, b = torch.randn(5, 30, dtype=torch.float64), torch.randn(30, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    expected = torch.nn.functional.layer_norm(x, (30,), w, b, 1e-5)
    torch.testing.assert_close(reference.layer_norm(x, w, b, 1e-5), expected)


def test_reference_attention_with_longer_keys_matches_the_full_sequence():
    """Queries that are the tail of the sequence see exactly what they would in the full computation."""
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    full = reference.causal_attention(q, k, v, 0.3)
    tail = reference.causal_attention(q[:, :, 9:], k, v, 0.3)
    torch.testing.assert_close(tail, full[:, :, 9:])


def test_dispatch_rules(monkeypatch):
    assert ops.available_backends()["reference"] is None
    x = torch.randn(2, 4)
    assert ops.resolve_backend("reference", x.device) == "reference"
    with pytest.raises(ops.BackendUnavailable, match="unknown backend"):
        ops.resolve_backend("cuda-magic", x.device)
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert ops.resolve_backend(None, x.device) == "reference"
    for name, reason in ops.available_backends().items():
        if reason is not None:
            with pytest.raises(ops.BackendUnavailable, match=name):
                ops.resolve_backend(name, x.device)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="4-D"):
        ops.causal_attention(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="at least as many positions"):
        q = torch.randn(1, 1, 5, 4)
        ops.causal_attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(torch.randn(2, 8), torch.randn(7), None)
