"""Muon and the optimizers built for a GPT: the orthogonalisation, agreement with torch.optim.Muon,
parameter groups, saving and exact resume."""

import io

import pytest
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from fastgpt.config import TrainConfig
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, GPTConfig
from fastgpt.optim import NS_COEFFICIENTS, NS_STEPS, Muon, build_optimizer, orthogonalize

SHAPES = [(48, 48), (24, 72), (72, 24), (96, 32)]  # square, wide, tall, fused-qkv-like


def quintic_iterates(s):
    """What NS_STEPS steps of the iteration do to singular values s (already divided by the Frobenius norm)."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def with_singular_values(shape, values, seed):
    """A float64 matrix U diag(values) V^T with random orthonormal U and V."""
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return u @ torch.diag(values) @ v.T, u, v


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_maps_each_singular_value_through_the_quintic(shape):
    k = min(shape)
    values = torch.logspace(-3, 1, k, dtype=torch.float64)  # four decades, with a nonzero overall scale
    matrix, u, v = with_singular_values(shape, values, seed=sum(shape))
    expected = u @ torch.diag(quintic_iterates(values / values.norm())) @ v.T
    result = orthogonalize(matrix.float())
    assert result.dtype == torch.float32 and result.shape == shape
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalised_gaussian_matrices_have_singular_values_in_the_quintics_band(shape):
    # Singular values at least 2e-3 of the Frobenius norm end up in [0.68, 1.21] after five steps.
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(shape, generator=generator)
    if shape[0] == shape[1]:
        matrix += 4 * torch.eye(shape[0])  # a square Gaussian matrix can be near-singular by chance
    before = torch.linalg.svdvals(matrix.double())
    before = before / before.norm()
    # The premise of the band, and every value starting outside it (so landing there is the iteration's doing).
    assert before.min() > 2e-3 and before.max() < 0.68
    after = torch.linalg.svdvals(orthogonalize(matrix).double())
    assert after.min() > 0.68 and after.max() < 1.21


def test_a_batch_is_orthogonalised_as_its_matrices_one_by_one():
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(3, 24, 72, generator=generator)
    together = orthogonalize(batch)
    for matrix, result in zip(batch, together):
        torch.testing.assert_close(result, orthogonalize(matrix), rtol=0, atol=1e-6)


def test_zero_gradient_gives_a_zero_update():
    assert orthogonalize(torch.zeros(16, 32)).abs().max() == 0


def run_optimizer(optimizer_class, shapes, steps, **settings):
    """Parameters after `steps` steps on fixed random gradients, and their starting values."""
    generator = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    start = [p.detach().clone() for p in params]
    optimizer = optimizer_class(params, **settings)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return params, start


@pytest.mark.parametrize("ns_dtype, tolerance", [(torch.bfloat16, 0.0), (torch.float32, 2e-2)])
def test_muon_steps_as_torch_optim_muon_does(ns_dtype, tolerance):
    """The same momentum, Nesterov look-ahead, orthogonalisation, shape scaling and weight decay.

    Orthogonalising in bfloat16, as torch does, the steps are bit-identical (a batch of matrices
    included); in float32 they differ by torch's bfloat16 rounding (measured: 7-9e-3 of the step)."""
    shapes = SHAPES + [(24, 72)]  # two matrices of one shape, orthogonalised as a batch here
    settings = dict(lr=0.02, momentum=0.9, weight_decay=0.1)
    ours, start = run_optimizer(Muon, shapes, 3, ns_dtype=ns_dtype, **settings)
    theirs, _ = run_optimizer(torch.optim.Muon, shapes, 3, nesterov=True, **settings)
    for p, q, p0 in zip(ours, theirs, start):
        step_ours, step_theirs = (p - p0).detach(), (q - p0).detach()
        error = (step_ours - step_theirs).norm() / step_theirs.norm()
        assert error <= tolerance, f"{tuple(p.shape)}: relative difference {error:.2e}"


def test_muon_refuses_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(8))])


def small_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_muon_trains_the_block_matrices_and_adamw_everything_else_once():
    model = small_gpt()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"))
    muon = {id(p) for group in optimizer.optimizers["muon"].param_groups for p in group["params"]}
    adamw = [id(p) for group in optimizer.optimizers["adamw"].param_groups for p in group["params"]]
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[i] for i in muon} == {name for name, p in model.named_parameters()
                                        if name.startswith("transformer.h.") and p.dim() == 2}
    assert len(adamw) == len(set(adamw)) and not muon & set(adamw)
    assert muon | set(adamw) == {id(p) for p in model.parameters()}
    # The tied head is the token embedding: one parameter, trained by AdamW.
    assert id(model.lm_head.weight) == id(model.transformer.wte.weight) and id(model.lm_head.weight) in adamw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_orthogonalises_in_the_dtype_the_run_computes_in(dtype):
    optimizer = build_optimizer(small_gpt(), TrainConfig(optimizer="muon"), ns_dtype=dtype)
    assert optimizer.optimizers["muon"].ns_dtype == dtype


def test_adamw_trains_everything_and_decays_matrices_only():
    model = small_gpt()
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1))
    assert list(optimizer.optimizers) == ["adamw"]
    embedding, decayed, plain = optimizer.param_groups
    assert embedding["params"] == [model.transformer.wte.weight] and embedding["weight_decay"] == 0.1
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert 1 + len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("embedding_lr, expected", [(0.0, 1e-3), (0.03, 0.03)])
def test_the_token_embedding_learns_at_its_own_rate_when_given(embedding_lr, expected):
    model = small_gpt()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, embedding_lr=embedding_lr))
    optimizer.set_lr_multiplier(0.5)
    rates = {id(p): group["lr"] for group in optimizer.optimizers["adamw"].param_groups for p in group["params"]}
    assert rates.pop(id(model.transformer.wte.weight)) == pytest.approx(0.5 * expected)
    assert rates and all(rate == pytest.approx(5e-4) for rate in rates.values())


def test_an_unknown_optimizer_is_refused():
    with pytest.raises(FastGPTError, match="adamw or muon"):
        build_optimizer(small_gpt(), TrainConfig(optimizer="sgd"))


def test_the_lr_multiplier_scales_each_groups_own_rate():
    optimizer = build_optimizer(small_gpt(), TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02))
    optimizer.set_lr_multiplier(0.5)
    assert [g["lr"] for g in optimizer.optimizers["adamw"].param_groups] == [5e-4, 5e-4, 5e-4]
    assert [g["lr"] for g in optimizer.optimizers["muon"].param_groups] == [0.01]


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, 32, (4, 17), generator=generator)
        optimizer.set_lr_multiplier(1.0 - step / 100)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def saved_and_loaded(state):
    """`state` after a trip through torch.save and the checkpoint loader's torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resumed_through_state_dicts(model, optimizer):
    return saved_and_loaded(model.state_dict()), saved_and_loaded(optimizer.state_dict())


def resumed_through_distributed_helpers(model, optimizer):
    """The trainer's path (fastgpt.distributed.full_state): one state keyed by parameter name for all parts."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return saved_and_loaded(model.state_dict()), saved_and_loaded(
        get_optimizer_state_dict(model, list(optimizer.optimizers.values()), options=options))


def load_state(model, optimizer, model_state, optimizer_state, through_helpers):
    model.load_state_dict(model_state)
    if through_helpers:
        set_optimizer_state_dict(model, list(optimizer.optimizers.values()), optimizer_state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optimizer_state)


@pytest.mark.parametrize("kind", ["muon", "adamw"])
@pytest.mark.parametrize("through_helpers", [False, True], ids=["state_dict", "distributed_helpers"])
def test_resuming_gives_bit_identical_parameters(kind, through_helpers):
    settings = TrainConfig(optimizer=kind, learning_rate=3e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.05)
    straight = small_gpt()
    straight_optimizer = build_optimizer(straight, settings)
    train_steps(straight, straight_optimizer, 6, seed=3)

    first = small_gpt()
    first_optimizer = build_optimizer(first, settings)
    train_steps(first, first_optimizer, 3, seed=3)
    save = resumed_through_distributed_helpers if through_helpers else resumed_through_state_dicts
    model_state, optimizer_state = save(first, first_optimizer)

    resumed = small_gpt(seed=99)  # other initial weights: everything must come from the checkpoint
    resumed_optimizer = build_optimizer(resumed, settings)
    load_state(resumed, resumed_optimizer, model_state, optimizer_state, through_helpers)
    # The remaining steps see the batches the straight run saw after its third step.
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        torch.randint(0, 32, (4, 17), generator=generator)
    for step in range(3, 6):
        idx = torch.randint(0, 32, (4, 17), generator=generator)
        resumed_optimizer.set_lr_multiplier(1.0 - step / 100)
        _, loss = resumed(idx[:, :-1], idx[:, 1:])
        loss.backward()
        resumed_optimizer.step()
        resumed_optimizer.zero_grad(set_to_none=True)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_the_state_dict_round_trip_keeps_momenta_and_base_rates():
    model = small_gpt()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.03))
    train_steps(model, optimizer, 2, seed=5)
    state = saved_and_loaded(optimizer.state_dict())
    fresh = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=5e-3, muon_lr=0.05))
    fresh.load_state_dict(state)
    assert [g["base_lr"] for g in fresh.param_groups] == [1e-3, 1e-3, 1e-3, 0.03]
    for name in ("adamw", "muon"):
        theirs = optimizer.optimizers[name].state
        ours = fresh.optimizers[name].state
        assert len(ours) == len(theirs) > 0
        for p in theirs:
            for key, value in theirs[p].items():
                assert torch.equal(ours[p][key], value)


def test_loading_another_optimizers_state_is_refused():
    model = small_gpt()
    state = build_optimizer(model, TrainConfig(optimizer="adamw")).state_dict()
    with pytest.raises(FastGPTError, match="--optimizer"):
        build_optimizer(model, TrainConfig(optimizer="muon")).load_state_dict(state)
