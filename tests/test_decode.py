"""The fused decoding step (csrc/decode.cpp): one block of the model for one new token, as one op.

It must be Block.forward with a key/value cache, to within rounding: checked against the block run
op by op on the reference backend, in float64 and in float32, on awkward shapes; a model must use it
exactly when it may (GPT-2's block, one new token per sequence, no autograd, no dropout, a float32
or float64 CPU tensor); and it must keep the torch.library contract.
"""

import pytest
import torch

from fastgpt import ops
from fastgpt.model import GPT, Block, GPTConfig, KVCache
from fastgpt.ops import cpp

pytestmark = pytest.mark.skipif(cpp.unavailable_reason("cpu") is not None,
                                reason=f"C++ extension unavailable: {cpp.unavailable_reason('cpu')}")


@pytest.fixture(autouse=True)
def reference_kernels(backend):
    """Blocks run op by op on the reference path, which the fused step is checked against."""
    backend("reference")

# (batch, n_embd, n_head, position of the new token, cache capacity, biases)
SHAPES = [
    (1, 32, 2, 0, 16, True),      # the first token: nothing cached yet
    (3, 96, 2, 20, 21, True),     # head dim 48; the new token takes the cache's last row
    (2, 160, 2, 37, 64, False),   # head dim 80; no biases anywhere
    (1, 40, 5, 130, 200, True),   # head dim 8, narrower than a vector; a width that is no multiple of one
    (2, 128, 4, 63, 128, True),   # the default model's width, half its context cached
    (2, 42, 3, 9, 16, True),      # products whose rows do not come in whole groups of four (3C = 126)
]


def random_block(n_embd, n_head, capacity, bias, dtype):
    """A block whose LayerNorm gains and all biases are random too (not ones and zeros)."""
    block = Block(GPTConfig(n_embd=n_embd, n_head=n_head, block_size=capacity, bias=bias))
    with torch.no_grad():
        for parameter in block.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(-1, 1)
    return block.to(dtype).eval()


UNWRITTEN = 7.0  # what the cache's rows hold until a token's keys and values are written there


def filled_cache(block, batch, position, capacity, dtype):
    """A cache holding the keys and values of `position` random tokens, and UNWRITTEN after them."""
    n_embd, n_head = block.ln_1.weight.numel(), block.attn.n_head
    cache = KVCache(capacity)
    for rows in cache.reserve(0, batch, n_head, n_embd // n_head, torch.empty((), dtype=dtype)):
        rows.fill_(UNWRITTEN)
    if position:
        block(torch.randn(batch, position, n_embd, dtype=dtype), cache)
    return cache


def copy_of(cache, dtype=torch.float64):
    copy = KVCache(cache.block_size)
    copy.length = cache.length
    if cache.k is not None:
        copy.k, copy.v = cache.k.to(dtype, copy=True), cache.v.to(dtype, copy=True)
    return copy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@torch.no_grad()
def test_the_fused_step_is_the_block_forward(shape):
    batch, n_embd, n_head, position, capacity, bias = shape
    torch.manual_seed(position)
    block = random_block(n_embd, n_head, capacity, bias, torch.float64)
    cache = filled_cache(block, batch, position, capacity, torch.float64)
    before = copy_of(cache)
    fused_cache = copy_of(cache)
    x = torch.randn(batch, 1, n_embd, dtype=torch.float64)

    expected = block(x, cache)
    got = block.decode(x, fused_cache, cpp.decode_block)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # The new token's keys and values were written, and nothing else moved.
    assert len(fused_cache) == len(cache) == position + 1
    for fused_rows, rows in ((fused_cache.k, cache.k), (fused_cache.v, cache.v)):
        torch.testing.assert_close(fused_rows[:, :, :position + 1], rows[:, :, :position + 1], rtol=0, atol=1e-12)
        assert torch.all(fused_rows[:, :, position + 1:] == UNWRITTEN)

    # float32: about as far from the float64 result as the block run op by op in float32 is.
    block.float()
    got32 = block.decode(x.float(), copy_of(before, torch.float32), cpp.decode_block).double()
    reference32 = block(x.float(), copy_of(before, torch.float32)).double()
    reference_error = (reference32 - expected).abs().max().item()
    assert (got32 - expected).abs().max().item() <= max(4 * reference_error, 1e-5)


@pytest.mark.parametrize("batch, n_embd, n_head, bias", [(3, 80, 2, True), (1, 48, 1, False)])
@torch.no_grad()
def test_decoding_token_by_token_gives_the_forward_of_the_whole_sequence(batch, n_embd, n_head, bias):
    torch.manual_seed(1)
    block = random_block(n_embd, n_head, 24, bias, torch.float64)
    tokens = torch.randn(batch, 24, n_embd, dtype=torch.float64)
    cache = KVCache(24)
    decoded = torch.cat([block.decode(tokens[:, t:t + 1], cache, cpp.decode_block) for t in range(24)], dim=1)
    torch.testing.assert_close(decoded, block(tokens), rtol=0, atol=1e-12)


def test_the_model_decodes_with_the_fused_step_to_the_logits_of_the_full_forward(fused_calls, backend,
                                                                                  decode_step_by_step):
    backend("cpp")
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=50, block_size=20, n_layer=3, n_head=3, n_embd=48))
    model.double().eval()
    idx = torch.randint(0, 50, (2, 20))
    with torch.inference_mode():
        full, _ = model(idx)
    torch.testing.assert_close(decode_step_by_step(model, idx, 3), full, rtol=0, atol=1e-10)
    assert len(fused_calls) == 17 * 3  # every one-token step, every block


@torch.no_grad()
def test_the_fused_step_does_not_depend_on_the_thread_count():
    """Enough sequences, heads and cached keys that the products and the heads are split over threads."""
    torch.manual_seed(3)
    block = random_block(512, 8, 300, True, torch.float32)
    cache = filled_cache(block, 4, 255, 300, torch.float32)
    x = torch.randn(4, 1, 512)
    threads_before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            step_cache = copy_of(cache, torch.float32)
            results.append((block.decode(x, step_cache, cpp.decode_block), step_cache.k, step_cache.v))
    finally:
        torch.set_num_threads(threads_before)
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the C++ backend's fused step."""
    calls = []
    original = cpp.decode_block

    def counted(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cpp, "decode_block", counted)
    return calls


def one_token_step(model, cache, grad=False, autocast=False):
    """A prompt of four tokens (op by op: more than one token), then one new token."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if cache is not None:
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with torch.enable_grad() if grad else torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


SMALL = dict(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize("kernels, dropout, training, dtype, grad, autocast, cached, expected_calls", [
    pytest.param("cpp", 0.0, False, torch.float32, False, False, True, 2, id="inference"),
    pytest.param("cpp", 0.0, True, torch.float32, False, False, True, 2, id="training mode without dropout"),
    pytest.param("cpp", 0.0, False, torch.float64, False, False, True, 2, id="float64"),
    pytest.param("cpp", 0.1, True, torch.float32, False, False, True, 0, id="training mode with dropout"),
    pytest.param("cpp", 0.0, False, torch.float32, True, False, True, 0, id="autograd on"),
    pytest.param("cpp", 0.0, False, torch.bfloat16, False, False, True, 0, id="bfloat16"),
    pytest.param("cpp", 0.0, False, torch.float32, False, True, True, 0, id="autocast"),
    pytest.param("cpp", 0.0, False, torch.float32, False, False, False, 0, id="no cache"),
    pytest.param("reference", 0.0, False, torch.float32, False, False, True, 0, id="reference kernels"),
])
def test_the_model_takes_the_fused_step_exactly_when_it_may(fused_calls, backend, kernels, dropout, training, dtype,
                                                           grad, autocast, cached, expected_calls):
    backend(kernels)
    model = GPT(GPTConfig(**SMALL, dropout=dropout)).train(training).to(dtype)
    one_token_step(model, model.new_cache() if cached else None, grad, autocast)
    assert len(fused_calls) == expected_calls


@pytest.mark.parametrize("name, default, value, fused_calls_expected", [
    pytest.param("norm", "layernorm", "layernorm", 2, id="a switch at GPT-2's choice"),
    pytest.param("norm", "layernorm", "rmsnorm", 0, id="a switch set to another block"),
    pytest.param("attention_sinks", 0, 0, 0, id="a switch the fused step was not written for"),
])
def test_only_a_block_the_fused_step_was_written_for_takes_it(fused_calls, backend, config_with_switch, name,
                                                              default, value, fused_calls_expected):
    """The fused step computes GPT-2's block: a model whose block differs in any switch, or has one
    the step does not declare, must run its blocks op by op."""
    backend("cpp")
    model = GPT(config_with_switch(name, default, value, **SMALL)).eval()
    one_token_step(model, model.new_cache())
    assert len(fused_calls) == fused_calls_expected


def test_block_decoder_offers_the_fused_step_for_gpt2s_block_in_float32_and_float64_cpu_tensors_only(tiny_config):
    gpt2 = tiny_config().block_description()
    assert ops.block_decoder(torch.zeros(1, 8), gpt2, "cpp") is cpp.decode_block
    assert ops.block_decoder(torch.zeros(1, 8, dtype=torch.float64), gpt2, "cpp") is cpp.decode_block
    assert ops.block_decoder(torch.zeros(1, 8, dtype=torch.bfloat16), gpt2, "cpp") is None
    assert ops.block_decoder(torch.zeros(1, 8), gpt2, "reference") is None
    assert ops.block_decoder(torch.zeros(1, 8), gpt2, "torch") is None
    for name, value in gpt2:  # a block that differs from GPT-2's in any one entry
        other = tuple((n, "something else" if n == name else v) for n, v in gpt2)
        assert ops.block_decoder(torch.zeros(1, 8), other, "cpp") is None, name
    assert ops.block_decoder(torch.zeros(1, 8), gpt2[1:], "cpp") is None
    assert ops.block_decoder(torch.zeros(1, 8), gpt2 + (("qk_norm_eps", 1e-6),), "cpp") is None


def decode_block_arguments(dtype, bias, batch=2, n_embd=24, n_head=3, capacity=6, position=3):
    block = random_block(n_embd, n_head, capacity, bias, dtype).requires_grad_(False)  # the op has no backward
    caches = [torch.randn(batch, n_head, capacity, n_embd // n_head, dtype=dtype) for _ in range(2)]
    return (torch.randn(batch, n_embd, dtype=dtype), *block.decode_parameters(), *caches, position, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_opcheck_decode_block(dtype, bias):
    torch.library.opcheck(torch.ops.fastgpt.cpp_decode_block.default, decode_block_arguments(dtype, bias))


@pytest.mark.parametrize("change, message", [
    (lambda a: a[:13] + (a[13][:, :, :, :4], a[14]) + a[15:], "k_cache and v_cache must both be"),
    (lambda a: a[:15] + (6,) + a[16:], "position 6 is outside the cache's 6 rows"),
    (lambda a: (a[0].bfloat16(),) + a[1:], "supports float32 and float64"),
    (lambda a: a[:3] + (a[3].t(),) + a[4:], "attn_weight has shape"),
    (lambda a: (a[0],) + (a[1].double(),) + a[2:], "ln_1_weight must have x's dtype"),
])
@torch.no_grad()
def test_decode_block_refuses_tensors_that_do_not_fit(change, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastgpt.cpp_decode_block(*change(decode_block_arguments(torch.float32, True)))
