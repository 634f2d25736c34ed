"""The C++ CPU extension beyond what tests/test_op_contract.py checks for every backend.

Gradients against finite differences in fp64, torch.compile across ops, thread counts, the builds
for other CPUs, a build compiled on first use, the fallback when the extension cannot load, and a few
training steps that must follow the reference path's loss curve.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastgpt import ops
from fastgpt.ops import cpp

pytestmark = pytest.mark.skipif(cpp.unavailable_reason("cpu") is not None,
                                reason=f"C++ extension unavailable: {cpp.unavailable_reason('cpu')}")

# (B, H, Tq, Tk, D), small enough for finite differences: T = 1, Tk > Tq, odd head dims, and
# sequences longer than one 64-wide block so the online softmax crosses blocks.
GRADCHECK_ATTENTION_SHAPES = [(1, 1, 1, 1, 3), (1, 2, 5, 9, 7), (2, 1, 13, 13, 10), (1, 1, 70, 70, 5)]


def fp64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("shape", GRADCHECK_ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_gradcheck(shape):
    b, h, t_q, t_k, d = shape
    q, k, v = fp64(b, h, t_q, d), fp64(b, h, t_k, d), fp64(b, h, t_k, d)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.causal_attention(q, k, v, backend="cpp"), (q, k, v))


def test_attention_gradcheck_on_qkv_views():
    qkv = fp64(2, 11, 3, 2, 6)
    def attention(qkv):
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        return ops.causal_attention(q, k, v, scale=0.7, backend="cpp")
    assert torch.autograd.gradcheck(attention, (qkv,))


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
# Rows shorter than a vector, and rows that end more than one vector past a multiple of two (the
# kernels sum two vectors at a time): 29 and 37 fp64 values, 8 to a vector with AVX-512.
@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (2, 29), (3, 2, 37)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_gradcheck(shape, affine):
    x = fp64(*shape)
    weight = fp64(shape[-1]) if affine != "none" else None
    bias = fp64(shape[-1]) if affine == "weight+bias" else None
    inputs = tuple(t for t in (x, weight, bias) if t is not None)
    def layer_norm(*tensors):
        x, w, b = (list(tensors) + [None, None])[:3]
        return ops.layer_norm(x, w, b if affine == "weight+bias" else None, backend="cpp")
    assert torch.autograd.gradcheck(layer_norm, inputs)


@pytest.mark.parametrize("shape", [(1,), (5, 37), (2, 3, 17)], ids=lambda s: "x".join(map(str, s)))
def test_gelu_gradcheck(shape):
    x = (fp64(*shape) * 3).detach().requires_grad_()  # over the bend and into both tails
    assert torch.autograd.gradcheck(lambda x: ops.gelu(x, backend="cpp"), (x,))


def test_attention_across_many_key_blocks_matches_the_reference_in_float64():
    """Long enough for several of the forward's and the backward's key blocks: in fp64 the blockwise
    online softmax and the reference's one softmax agree to rounding."""
    q, k, v = fp64(1, 2, 600, 24), fp64(1, 2, 700, 24), fp64(1, 2, 700, 24)
    grad_out = torch.randn(1, 2, 600, 24, dtype=torch.float64)
    fused = ops.causal_attention(q, k, v, backend="cpp")
    expected = ops.causal_attention(q, k, v, backend="reference")
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    for got, want in zip(torch.autograd.grad(fused, (q, k, v), grad_out),
                         torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_torch_compile_gives_the_eager_result():
    def block(x, weight, bias):
        h = ops.gelu(ops.layer_norm(x, weight, bias, backend="cpp"), backend="cpp")
        q, k, v = h.view(2, 19, 3, 2, 8).unbind(2)
        y = ops.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="cpp")
        return (y.transpose(1, 2).reshape(2, 19, 16) ** 2).sum()

    x = torch.randn(2, 19, 48, requires_grad=True)
    weight, bias = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    eager = block(x, weight, bias)
    eager_grads = torch.autograd.grad(eager, (x, weight, bias))
    compiled = torch.compile(block, backend="inductor")(x, weight, bias)
    compiled_grads = torch.autograd.grad(compiled, (x, weight, bias))
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)


@pytest.fixture
def thread_count():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count(thread_count):
    """One thread and several split the work differently (B * H = 1 deals a head's blocks out);
    the answer must be the same up to summation order."""
    q, k, v = (torch.randn(1, 1, 300, 40, requires_grad=True) for _ in range(3))
    x = torch.randn(100, 96, requires_grad=True)
    results = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        out = ops.causal_attention(q, k, v, backend="cpp")
        y = ops.layer_norm(x, None, None, backend="cpp")
        grads = torch.autograd.grad((out ** 2).sum() + (y ** 3).sum(), (q, k, v, x))
        results.append((out, y) + grads)
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_cpp_on_cpu():
    assert ops.available_backends()["cpp"] is None
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert cpp.unavailable_reason(torch.device("meta")) == "the C++ extension only runs on CPU tensors"


ISA_CHECK = textwrap.dedent("""
    import sys
    import torch
    from op_checks import compare_with_reference  # run from the tests folder
    from fastgpt import ops
    from fastgpt.ops import cpp, dispatch
    # Every op in every dtype the build takes (bf16 too, which each build loads and stores with its
    # own instructions), on the op contract's awkward samples, as close to float64 as the reference.
    cpu = torch.device("cpu")
    for op in dispatch.OPS:
        fused = dispatch.implementation(op, dispatch.resolve_backend("cpp", cpu))
        for dtype in cpp.DTYPES:
            for index, sample in enumerate(op.samples(cpu, dtype)):
                compare_with_reference(fused, op.reference, sample, f"{op.name} in {dtype}, sample {index}")
    # The fused decoding step: a block decoded token by token is the block run over the whole sequence.
    from fastgpt.model import Block, GPTConfig, KVCache
    config = GPTConfig(n_embd=80, n_head=2, block_size=7)
    block = Block(config).double().eval()
    tokens, cache = torch.randn(3, 7, 80, dtype=torch.float64), KVCache(7)
    ops.use_backend("reference")
    decoder = ops.block_decoder(tokens, config.block_description(), "cpp")
    with torch.no_grad():
        decoded = [block.decode(tokens[:, t:t + 1], cache, decoder) for t in range(7)]
        torch.testing.assert_close(torch.cat(decoded, dim=1), block(tokens))
    print(torch.backends.cpu.get_cpu_capability(), *sorted(m for m in sys.modules if m.startswith("fastgpt._C")))
""")


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_the_builds_for_other_cpus_compute_the_same(isa):
    """This CPU loads the AVX-512 build; ATEN_CPU_CAPABILITY makes torch (and so fastgpt) act as on an
    older CPU, which loads the AVX2 or the baseline build: each must pass the op contract's comparisons
    in every dtype, and decode as the block runs."""
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2")
    result = subprocess.run([sys.executable, "-c", ISA_CHECK], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": isa}, cwd=os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [isa.upper(), f"fastgpt._C_{isa}"]


def test_a_build_the_install_did_not_compile_is_compiled_on_first_use(tmp_path):
    """As in a checkout that was never compiled: there is no module to import, so the first use compiles
    the build this CPU needs with torch.utils.cpp_extension, and that build passes the same checks."""
    not_compiled = textwrap.dedent("""
        import functools
        from fastgpt.ops import cpp
        cpp.import_or_build = functools.partial(cpp.import_or_build, package="fastgpt_never_compiled")
    """)
    result = subprocess.run([sys.executable, "-c", not_compiled + ISA_CHECK], capture_output=True, text=True,
                            timeout=600, cwd=os.path.dirname(__file__),
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "default", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiling the C++ extension (default) on first use" in result.stderr
    assert result.stdout.split() == ["DEFAULT"]  # no installed build was imported


def test_missing_sources_give_a_reason(tmp_path):
    reason = cpp.import_or_build("avx512", package="fastgpt_no_such_package", csrc=str(tmp_path))
    assert reason.startswith("could not build the C++ extension:") and "are not here" in reason


def test_failed_just_in_time_build_gives_a_reason(tmp_path, capsys):
    """No compiled module and sources that do not compile: one line says it is compiling, then a reason."""
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    (tmp_path / "build_config.py").write_text(textwrap.dedent("""
        import glob, os
        source_paths = lambda csrc: glob.glob(os.path.join(csrc, "*.cpp"))
        ISA_FLAGS = {"default": []}
        COMPILE_FLAGS = ["-O0"]
        LINK_FLAGS = []
    """))
    reason = cpp.import_or_build("default", package="fastgpt_no_such_package", csrc=str(tmp_path))
    assert reason.startswith("could not build the C++ extension:")
    assert "compiling the C++ extension" in capsys.readouterr().err


def test_training_loss_follows_the_reference_path():
    """A few optimizer steps of a small GPT: the cpp backend's loss curve is the reference's, to fp32 noise."""
    from fastgpt.model import GPT, GPTConfig

    data = torch.randint(0, 65, (4, 33), generator=torch.Generator().manual_seed(0))
    curves = {}
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        ops.use_backend(backend)
        model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=48, dropout=0.0, bias=True))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for _ in range(8):
            _, loss = model(data[:, :-1], data[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        curves[backend] = torch.tensor(curve)
    assert curves["cpp"][-1] < curves["cpp"][0]  # it learns
    torch.testing.assert_close(curves["cpp"], curves["reference"], rtol=1e-4, atol=1e-4)
