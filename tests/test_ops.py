"""What the ops promise beyond their contracts (tests/test_op_contract.py holds every backend to the
reference and to float64): causality, the references against PyTorch's own, and the dispatch rules."""

import pytest
import torch

from fastgpt import ops
from fastgpt.ops import dispatch
from fastgpt.ops.definitions import causal_attention, gelu, layer_norm
from op_checks import DEVICE, runnable_kernel_backends

BACKENDS = runnable_kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_is_causal(backend):
    """Changing the keys and values of future positions changes no earlier output."""
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE) for _ in range(3))
    before = ops.causal_attention(q, k, v, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 5.0
    v2[:, :, 25:] -= 5.0
    after = ops.causal_attention(q, k2, v2, backend=backend)
    torch.testing.assert_close(after[:, :, :25], before[:, :, :25], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, 25:], before[:, :, 25:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_longer_keys_is_the_tail_of_the_full_sequence(backend):
    """Queries that are the tail of the sequence (decoding with a cache) see exactly what they would
    in the full computation, on every backend."""
    q, k, v = (torch.randn(1, 2, 70, 16, device=DEVICE) for _ in range(3))
    full = ops.causal_attention(q, k, v, backend=backend)
    tail = ops.causal_attention(q[:, :, 61:], k, v, backend=backend)
    torch.testing.assert_close(tail, full[:, :, 61:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_output_and_gradients_are_laid_out_as_the_projection_is(backend, kv_heads):
    """The kernels return the output and dq, dk, dv in (B, T, H, D) memory, as the contract says: the
    model's (B, T, H * D) view of the output is then no copy, nor are its projection's views of the
    gradients."""
    b, h, t, d = 2, 4, 9, 16
    qkv = torch.randn(b, t, (h + 2 * kv_heads) * d, device=DEVICE, requires_grad=True)
    q, k, v = (x.view(b, t, -1, d).transpose(1, 2) for x in qkv.split([h * d, kv_heads * d, kv_heads * d], dim=-1))
    grads = {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        x.register_hook(lambda grad, name=name: grads.setdefault(name, grad))
    out = ops.causal_attention(q, k, v, backend=backend)
    assert out.transpose(1, 2).is_contiguous()
    out.sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert grads[name].shape == x.shape and grads[name].transpose(1, 2).is_contiguous(), name


def test_reference_gelu_is_the_tanh_formula():
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    formula = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(gelu.reference(x), formula)


def test_reference_attention_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 3, 20, 16, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal_attention.reference(q, k, v, 16 ** -0.5), expected)
    tail = causal_attention.reference(q[:, :, 9:], k, v, 16 ** -0.5)
    torch.testing.assert_close(causal_attention.builtin(q[:, :, 9:], k, v, 16 ** -0.5), tail)


def test_reference_layer_norm_matches_torch():
    x, w, b = (torch.randn(*shape, dtype=torch.float64) for shape in ((5, 30), (30,), (30,)))
    expected = torch.nn.functional.layer_norm(x, (30,), w, b, 1e-5)
    torch.testing.assert_close(layer_norm.reference(x, w, b, 1e-5), expected)


def test_dispatch_rules(monkeypatch):
    assert ops.available_backends()["reference"] is None
    x = torch.randn(2, 4)
    assert ops.resolve_backend("reference", x.device) == "reference"
    with pytest.raises(ops.BackendUnavailable, match="unknown backend"):
        ops.resolve_backend("cuda-magic", x.device)
    with pytest.raises(ops.BackendUnavailable, match="unknown backend 'cuda-magic'"):  # where the mistake is
        ops.use_backend("cuda-magic")
    with pytest.raises(ops.BackendUnavailable, match="a backend is named by a string"):
        ops.gelu(x, backend=3)
    monkeypatch.setenv("FASTGPT_BACKEND", "reference")
    assert ops.resolve_backend(None, x.device) == "reference"
    # A backend that cannot run on the tensors' device is refused, naming it and why.
    with pytest.raises(ops.BackendUnavailable, match="'cpp' cannot run on meta tensors: "):
        ops.resolve_backend("cpp", torch.device("meta"))


def test_use_backend_sets_the_default_of_calls_that_name_none(monkeypatch):
    monkeypatch.setenv("FASTGPT_BACKEND", "auto")
    cpu = torch.device("cpu")
    automatic = ops.resolve_backend(None, cpu)
    try:
        ops.use_backend("torch")
        assert ops.resolve_backend(None, cpu) == ops.resolve_backend("auto", cpu) == "torch"
        assert ops.resolve_backend("reference", cpu) == "reference"  # a named backend still wins
    finally:
        ops.use_backend("auto")
    assert ops.resolve_backend(None, cpu) == automatic


def test_an_op_without_a_kernel_on_the_backend_runs_pytorchs_builtin():
    """GELU has no Triton kernel: a Triton run takes PyTorch's GELU, the same function the torch backend runs."""
    from fastgpt.ops import dispatch
    assert "triton" not in gelu.GELU.kernels
    assert dispatch.implementation(gelu.GELU, "triton") is gelu.GELU.builtin


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="4-D"):
        ops.causal_attention(torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="at least as many positions"):
        q = torch.randn(1, 1, 5, 4)
        ops.causal_attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match=r"layer_norm: weight has shape \(7,\), expected \(8,\)"):
        ops.layer_norm(torch.randn(2, 8), torch.randn(7), None)
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(7,\), expected \(8,\)"):
        ops.rms_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError, match="at least one key/value head"):
        ops.causal_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 0, 3, 4), torch.randn(1, 0, 3, 4))
    with pytest.raises(ValueError, match=r"swiglu expects an even last dimension"):
        ops.swiglu(torch.tensor(1.0))
    with pytest.raises(ValueError, match="rotary: base must be positive, got 0"):
        ops.rotary(torch.randn(1, 1, 2, 4), base=0)


@pytest.mark.parametrize("backend", ["reference", "torch", *[b for b in ("cpp",) if dispatch.unavailable_reason(b) is None]])
def test_every_backend_refuses_what_none_computes(backend):
    """Integer tensors (some backends would return truncated numbers) and a target of -100 (which
    F.cross_entropy would skip as ignored) are refused whichever backend runs."""
    integers = torch.arange(16).view(1, 1, 4, 4)
    for call in (lambda: ops.causal_attention(integers, integers, integers, backend=backend),
                 lambda: ops.rotary(integers, backend=backend), lambda: ops.gelu(integers, backend=backend),
                 lambda: ops.layer_norm(integers, None, None, backend=backend),
                 lambda: ops.cross_entropy(integers[0, 0], torch.zeros(4, dtype=torch.long), backend=backend)):
        with pytest.raises(ValueError, match="must be a floating-point tensor"):
            call()
    with pytest.raises((RuntimeError, IndexError)):
        ops.cross_entropy(torch.randn(3, 5), torch.tensor([0, -100, 2]), backend=backend)
