"""The model itself: its config, shapes, causality, learning, saving without loss, and torch.compile."""

import json

import pytest
import torch

from fastgpt.checkpoint import load_checkpoint, load_trained_model, model_entries, save_checkpoint
from fastgpt.config import TrainConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT
from fastgpt.optim import build_optimizer
from fastgpt.tokenizers import train_tokenizer


@pytest.fixture(autouse=True)
def reference_kernels(backend):
    backend("reference")


def test_logits_shape_and_loss_at_initialisation(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 32, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 32)
    # A freshly initialised model is close to uniform over the vocabulary: loss near ln(32).
    assert abs(loss.item() - torch.log(torch.tensor(32.0)).item()) < 0.3


def test_changing_a_future_token_changes_no_earlier_logit(tiny_model):
    model = tiny_model()
    idx = torch.randint(0, 32, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 32
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_weights_are_tied_and_residual_projections_scaled(tiny_config):
    model = GPT(tiny_config(n_layer=8))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert 0.02 / 4 * 0.8 < std < 0.02 / 4 * 1.2  # 0.02 / sqrt(2 * 8)


def test_a_tiny_model_overfits_one_batch(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", learning_rate=3e-3, weight_decay=0.0))
    idx = torch.randint(0, 32, (4, 17))
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"could not memorise one batch: loss {loss.item():.3f}"


def test_saved_and_loaded_model_gives_identical_logits(tmp_path, tiny_model):
    model = tiny_model(vocab_size=5)
    tokenizer = train_tokenizer("char", "abcde")
    save_checkpoint(tmp_path / "ckpt.pt", model_entries(model.config, model.state_dict(), tokenizer))
    loaded, loaded_tokenizer = load_trained_model(tmp_path, torch.device("cpu"))
    assert loaded.config == model.config
    idx = torch.randint(0, 5, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert loaded_tokenizer.encode("cab") == tokenizer.encode("cab")


def saved_model_config(tmp_path, model, **entries):
    """Save model's checkpoint with its model config changed as given (None: left out); load it back."""
    tokenizer = train_tokenizer("char", "abcde")
    payload = model_entries(model.config, model.state_dict(), tokenizer)
    payload["model_config"].update(entries)
    payload["model_config"] = {name: value for name, value in payload["model_config"].items() if value is not None}
    save_checkpoint(tmp_path / "ckpt.pt", payload)
    return load_trained_model(tmp_path, torch.device("cpu"))[0]


def test_a_checkpoint_that_named_its_backend_still_loads(tmp_path, tiny_model):
    """Checkpoints once held the backend in the model's config; it is now a run-time choice."""
    model = tiny_model(vocab_size=5)
    loaded = saved_model_config(tmp_path, model, backend="cpp")
    assert loaded.config == model.config
    idx = torch.randint(0, 5, (2, 16))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_a_checkpoint_from_before_a_setting_existed_loads_with_its_default(tmp_path, tiny_model):
    model = tiny_model(vocab_size=5)
    assert saved_model_config(tmp_path, model, bias=None).config == model.config  # bias: GPT-2's True


def test_a_checkpoint_with_settings_this_version_does_not_know_is_refused(tmp_path, tiny_model):
    with pytest.raises(FastGPTError, match="does not know.*attention_sinks"):
        saved_model_config(tmp_path, tiny_model(vocab_size=5), attention_sinks=4)
    assert "attention_sinks" in load_checkpoint(tmp_path / "ckpt.pt")["model_config"]


def test_architecture_differences_name_every_size_and_switch_but_not_dropout(tiny_config, config_with_switch):
    assert tiny_config().architecture_differences(tiny_config(n_embd=64, bias=False, dropout=0.5)) == [
        "n_embd 32 vs 64", "bias True vs False"]
    # A size left at 0 is what it stands for: n_kv_head 0 is n_head, mlp_hidden 0 is 4 n_embd.
    four_heads = tiny_config(n_head=4, n_kv_head=0, mlp_hidden=0)
    assert four_heads.architecture_differences(tiny_config(n_head=4, n_kv_head=4, mlp_hidden=128)) == []
    assert four_heads.architecture_differences(tiny_config(n_head=4, n_kv_head=2, mlp_hidden=64)) == [
        "n_kv_head 4 vs 2", "mlp_hidden 128 vs 64"]
    switched = config_with_switch("norm", "layernorm", "layernorm")
    assert switched.architecture_differences(config_with_switch("norm", "layernorm", "rmsnorm")) == [
        "norm layernorm vs rmsnorm"]


def test_the_block_description_is_gpt2s_block_with_the_configs_switches(tiny_config, config_with_switch):
    description = dict(tiny_config().block_description())
    assert description["norm"] == "layernorm" and description["mlp"] == "gelu" and description["position"] == "learned"
    assert tiny_config(n_embd=64, bias=False, dropout=0.5).block_description() == tiny_config().block_description()
    assert dict(config_with_switch("norm", "layernorm", "rmsnorm").block_description()) == {**description,
                                                                                            "norm": "rmsnorm"}
    assert dict(config_with_switch("attention_sinks", 0, 0).block_description()) == {**description,
                                                                                     "attention_sinks": 0}


@pytest.mark.parametrize("change, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"), (dict(n_layer=0), "n_layer must be at least 1"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_impossible_model_settings_are_refused(tiny_config, change, message):
    with pytest.raises(FastGPTError, match=message):
        tiny_config(**change).validate()


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed(tiny_model):
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])

    def run(temperature, seed):
        generator = torch.Generator().manual_seed(seed)
        return torch.cat(list(model.generate(prompt, 20, temperature=temperature, top_k=5, generator=generator)), 1)

    assert torch.equal(run(0, 1), run(0, 2))
    assert torch.equal(run(1.0, 7), run(1.0, 7))
    assert not torch.equal(run(1.0, 7), run(1.0, 8))


def test_generation_continues_past_the_block_size(tiny_model):
    model = tiny_model()
    out = list(model.generate(torch.zeros(1, 1, dtype=torch.long), 40, temperature=0))
    assert len(out) == 40


# In a fresh process: how many graphs torch.compile traces the forward into, and how many breaks; then
# the compiled model's logits, loss and gradients against the eager model's.
COMPILE_CHECK = """
import json, sys
import torch, torch._dynamo
from fastgpt.model import GPT, GPTConfig
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=4, n_embd=32, **json.loads(sys.argv[1])))
idx = torch.randint(0, 20, (2, 16))
explained = torch._dynamo.explain(model)(idx, idx)
print(explained.graph_count, explained.graph_break_count)

def logits_loss_and_gradients(forward):
    model.zero_grad()
    logits, loss = forward(idx, idx)
    loss.backward()
    return [logits, loss] + [p.grad for p in model.parameters()]

for got, expected in zip(logits_loss_and_gradients(torch.compile(model)), logits_loss_and_gradients(model)):
    torch.testing.assert_close(got, expected)
"""
# GPT-2, and the modern switches all at once with either of the other MLPs.
MODERN = dict(norm="rmsnorm", position="rope", qk_norm=True, n_kv_head=2, tie_embeddings=False, bias=False)
COMPILED_CONFIGS = {"gpt2": {}, "modern-swiglu": dict(MODERN, mlp="swiglu"), "modern-relu2": dict(MODERN, mlp="relu2")}


@pytest.mark.parametrize("switches", list(COMPILED_CONFIGS.values()), ids=list(COMPILED_CONFIGS))
def test_torch_compile_traces_the_whole_forward_and_gives_the_eager_result(python, switches):
    """The first forward of a process is also the first to ask which backend runs the ops, which
    imports and loads modules: torch.compile must still trace the forward as one graph, and the
    compiled model (its fused ops on the backend chosen automatically) must give the eager model's
    logits, loss and gradients."""
    result = python("-c", COMPILE_CHECK, json.dumps(switches))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "0"]


def test_load_trained_model_names_the_checkpoints_it_reads(tmp_path):
    with pytest.raises(FastGPTError, match=r"checkpoint must be one of latest, best \(got 'bogus'\)"):
        load_trained_model(tmp_path, torch.device("cpu"), "bogus")
