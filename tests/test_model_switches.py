"""The model's switches (GPTConfig: norm, position, mlp, n_kv_head, qk_norm, tie_embeddings) and the
optimizer setting: what each builds, that cached decoding equals the full forward for every
combination drawn, the sliding window of rotary models, and what checkpoints and resumes make of them."""

import itertools
import random

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT

SWITCHES = dict(norm=["layernorm", "rmsnorm"], position=["learned", "rope"], mlp=["gelu", "swiglu", "relu2"],
                n_kv_head=[0, 2, 1], qk_norm=[False, True], tie_embeddings=[True, False], bias=[True, False])
ALL_COMBINATIONS = [dict(zip(SWITCHES, values)) for values in itertools.product(*SWITCHES.values())]
# Each switch alone, Llama's combination, and a seeded draw of the rest.
DRAWN = ([{name: values[1]} for name, values in SWITCHES.items()] + [{name: values[-1]} for name, values in
         SWITCHES.items() if len(values) > 2]
         + [dict(norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, tie_embeddings=False, bias=False)]
         + random.Random(0).sample(ALL_COMBINATIONS, 12))


def describe(switches):
    return ",".join(f"{name}={value}" for name, value in switches.items()) or "gpt2"


@pytest.mark.parametrize("switches", DRAWN, ids=describe)
def test_cached_decoding_equals_the_full_forward(tiny_config, decode_step_by_step, switches):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_head=4, **switches)).double().eval()
    idx = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        full, _ = model(idx)
    torch.testing.assert_close(decode_step_by_step(model, idx, 5), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("switches", DRAWN[:8], ids=describe)
def test_every_switch_trains(tiny_config, switches):
    """Forward and backward run and give every parameter a gradient."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_head=4, **switches))
    idx = torch.randint(0, 32, (2, 9))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_each_switch_builds_what_it_says(tiny_config):
    gpt2 = GPT(tiny_config(n_head=4))
    assert "wpe" in gpt2.transformer and gpt2.lm_head.weight is gpt2.transformer.wte.weight
    rope = GPT(tiny_config(n_head=4, position="rope"))
    assert "wpe" not in rope.transformer
    assert gpt2.num_parameters(exclude_positions=False) - rope.num_parameters(exclude_positions=False) == 16 * 32
    untied = GPT(tiny_config(n_head=4, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() - gpt2.num_parameters() == 32 * 32
    # Grouped-query attention: the projection makes 4 query heads and 1 key and 1 value head of 8 channels.
    assert GPT(tiny_config(n_head=4, n_kv_head=1)).transformer.h[0].attn.c_attn.weight.shape == (6 * 8, 32)
    # SwiGLU's input projection makes gate and up, 8/3 x 32 = 85.3 wide, rounded up to 128.
    swiglu = GPT(tiny_config(mlp="swiglu")).transformer.h[0].mlp
    assert swiglu.c_fc.weight.shape == (2 * 128, 32) and swiglu.c_proj.weight.shape == (32, 128)
    assert GPT(tiny_config(mlp="relu2", mlp_hidden=48)).transformer.h[0].mlp.c_fc.weight.shape == (48, 32)
    rms = GPT(tiny_config(norm="rmsnorm", norm_eps=1e-6)).transformer.h[0].ln_1
    assert type(rms).__name__ == "RMSNorm" and rms.eps == 1e-6


@pytest.mark.parametrize("change, message", [
    (dict(n_head=4, n_kv_head=3), "n_kv_head .3. must divide n_head .4."),
    (dict(n_embd=36, n_head=4, position="rope"), "head size n_embd / n_head must be even"),
    (dict(norm_eps=0.0), r"^norm_eps must be positive \(got 0.0\)$"),
    (dict(position="rope", rope_base=-1.0), r"^rope_base must be positive \(got -1.0\)$"),
    (dict(rope_base=500.0), "rope_base 500.0 is the base of rotary positions, and position is learned: add "
                            "--position rope"),
    (dict(mlp="tanh"), "mlp must be one of gelu, swiglu, relu2"),
    (dict(position="alibi"), "position must be one of learned, rope"),
])
def test_impossible_switch_settings_are_refused(tiny_config, change, message):
    with pytest.raises(FastGPTError, match=message):
        tiny_config(**change).validate()
    with pytest.raises(FastGPTError, match=message):  # from Python too, not only from the settings
        GPT(tiny_config(**change))


def test_a_rotary_model_slides_its_window_one_token_at_a_time(tiny_config):
    """Past the context, the cache drops its oldest row and no step restarts it. In one layer the
    cached keys depend only on their tokens and (relative) positions, so each step's logits equal a
    full pass over the last block_size tokens."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=1, n_head=4, n_kv_head=2, position="rope", qk_norm=True)).double().eval()
    block = model.config.block_size
    idx = torch.randint(0, 32, (2, block + 9))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx[:, :block], cache=cache)
        for t in range(block, idx.size(1)):
            cached, _ = model(idx[:, t:t + 1], cache=cache)
            window, _ = model(idx[:, t + 1 - block:t + 1])
            torch.testing.assert_close(cached[:, -1], window[:, -1], rtol=0, atol=1e-10)
        assert len(cache[0]) == block and cache[0].position == idx.size(1)
    with torch.no_grad(), pytest.raises(ValueError, match="longer than the block size"):
        model(idx[:, :block + 1])
    learned = GPT(tiny_config()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="longer than the block size"):
        learned_cache = learned.new_cache()
        learned(idx[:, :block], cache=learned_cache)
        learned(idx[:, block:block + 1], cache=learned_cache)


def test_a_deeper_rotary_model_generates_past_the_context_through_its_sliding_cache(tiny_config):
    """Within the context, cached and uncached generation agree; past it, the sliding cache's keys in
    the second layer still carry what left the window (as in sliding-window attention), while an
    uncached step sees only the window, so they may part."""
    torch.manual_seed(0)
    model = GPT(tiny_config(position="rope", mlp="swiglu")).double().eval()
    prompt = torch.randint(0, 32, (1, 5))
    cached = torch.cat(list(model.generate(prompt, 30, temperature=0)), dim=1)
    uncached = torch.cat(list(model.generate(prompt, 30, temperature=0, use_cache=False)), dim=1)
    within = model.config.block_size - prompt.size(1) + 1
    assert cached.shape == (1, 30) and torch.equal(cached[:, :within], uncached[:, :within])


def test_only_gpt2s_block_takes_the_fused_decoding_step(tiny_config):
    gpt2 = tiny_config(n_head=4).block_description()
    for name, values in SWITCHES.items():
        for value in values[1:]:
            description = tiny_config(n_head=4, **{name: value}).block_description()
            if name in ("tie_embeddings", "bias"):  # not the block's business, or read off its tensors
                assert description == gpt2, name
            else:
                assert description != gpt2, (name, value)


# -- checkpoints and resuming -----------------------------------------------------------------

MODERN = dict(norm="rmsnorm", position="rope", mlp="relu2", n_kv_head=1, qk_norm=True, tie_embeddings=False)


def test_a_checkpoint_records_every_switch_and_a_resume_with_another_is_refused(corpus, train_args, tmp_path,
                                                                               error_line):
    assert train.main(train_args(corpus, tmp_path, max_iters=2, n_head=4, **MODERN)) == 0
    saved = load_checkpoint(tmp_path / "ckpt.pt")["model_config"]
    assert {name: saved[name] for name in MODERN} == MODERN
    assert train.main([*train_args(corpus, tmp_path, max_iters=4, n_head=4, **{**MODERN, "mlp": "swiglu"}),
                       "--resume"]) != 0
    assert "mlp relu2 vs swiglu" in error_line()
    assert train.main([*train_args(corpus, tmp_path, max_iters=4, n_head=4, **MODERN), "--resume"]) == 0


def test_muon_trains_resumes_exactly_and_refuses_a_resume_with_adamw(corpus, train_args, tmp_path_factory,
                                                                    error_line):
    straight, stopped = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("stopped")
    settings = dict(optimizer="muon", muon_lr=0.03, muon_weight_decay=0.1, n_head=4, **MODERN)
    assert train.main(train_args(corpus, straight, max_iters=6, **settings)) == 0
    groups = load_checkpoint(straight / "ckpt.pt")["optimizer"]["param_groups"]
    [muon_group] = [group for group in groups if "transformer.h.0.mlp.c_fc.weight" in group["params"]]
    assert (muon_group["base_lr"], muon_group["weight_decay"]) == (0.03, 0.1)
    assert train.main(train_args(corpus, stopped, max_iters=3, **settings)) == 0
    assert train.main(train_args(corpus, stopped, max_iters=6, **{**settings, "optimizer": "adamw"}) + ["--resume"]) != 0
    assert "optimizer muon vs adamw" in error_line()
    assert train.main(train_args(corpus, stopped, max_iters=6, **settings) + ["--resume"]) == 0
    for name, tensor in load_checkpoint(straight / "ckpt.pt")["model"].items():
        assert torch.equal(load_checkpoint(stopped / "ckpt.pt")["model"][name], tensor), name
