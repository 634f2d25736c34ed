"""The weight average (--weight-average): its arithmetic, its swap into the model, and what training
saves, evaluates and resumes with it."""

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint
from fastgpt.weight_average import WeightAverage


def test_each_update_moves_the_average_by_one_minus_decay_toward_the_weights():
    model = torch.nn.Linear(3, 2).double()
    start = [p.detach().clone() for p in model.parameters()]
    average = WeightAverage(model, decay=0.9)
    expected = start
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        expected = [0.9 * a + 0.1 * p.detach() for a, p in zip(expected, model.parameters())]
    for got, want in zip(average.average, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_swapping_in_shows_the_average_and_gives_the_weights_back():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(2.0)
    average.update()
    weights = model.weight.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(model.weight, average.average[0])
        assert not torch.equal(model.weight, weights)
    assert torch.equal(model.weight, weights)


def test_what_the_model_holds_when_the_swap_ends_becomes_the_average():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    weights = model.weight.detach().clone()
    with average.swapped_in():
        with torch.no_grad():
            model.weight.fill_(7.0)
    assert torch.equal(average.average[0], torch.full((2, 3), 7.0)) and torch.equal(model.weight, weights)


def checkpoint_at(directory):
    return load_checkpoint(directory / "ckpt.pt")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def averaged_run(corpus, train_args):
    """run(out_dir, weight_average, max_iters, resume=False): a tiny muon run; returns its checkpoint."""
    def run(out_dir, weight_average, max_iters, resume=False):
        args = train_args(corpus, out_dir, max_iters=max_iters, optimizer="muon", weight_average=weight_average)
        assert train.main(args + (["--resume"] if resume else [])) == 0
        return checkpoint_at(out_dir)
    return run


def test_the_average_is_saved_as_the_model_and_leaves_training_alone(averaged_run, tmp_path_factory):
    plain = averaged_run(tmp_path_factory.mktemp("plain"), 0.0, 6)
    averaged = averaged_run(tmp_path_factory.mktemp("averaged"), 0.8, 6)
    assert "trained_model" not in plain
    assert_same_weights(averaged["trained_model"], plain["model"])
    assert any(not torch.equal(averaged["model"][name], plain["model"][name]) for name in plain["model"])
    nearly_off = averaged_run(tmp_path_factory.mktemp("nearly_off"), 1e-6, 6)
    for name, tensor in nearly_off["model"].items():
        torch.testing.assert_close(tensor, plain["model"][name], rtol=1e-5, atol=1e-5)


def test_the_evaluations_score_the_average(averaged_run, tmp_path_factory):
    plain = averaged_run(tmp_path_factory.mktemp("plain"), 0.0, 6)
    averaged = averaged_run(tmp_path_factory.mktemp("averaged"), 0.8, 6)
    assert averaged["best_val_loss"] != plain["best_val_loss"]


def test_a_resumed_run_keeps_the_average_exactly(averaged_run, tmp_path_factory):
    straight = averaged_run(tmp_path_factory.mktemp("straight"), 0.8, 6)
    stopped = tmp_path_factory.mktemp("stopped")
    averaged_run(stopped, 0.8, 3)
    resumed = averaged_run(stopped, 0.8, 6, resume=True)
    assert_same_weights(resumed["model"], straight["model"])
    assert_same_weights(resumed["trained_model"], straight["trained_model"])


def test_resuming_without_the_average_trains_on_from_the_trained_weights(averaged_run, tmp_path_factory):
    plain = averaged_run(tmp_path_factory.mktemp("plain"), 0.0, 6)
    switched = tmp_path_factory.mktemp("switched")
    averaged_run(switched, 0.8, 3)
    assert_same_weights(averaged_run(switched, 0.0, 6, resume=True)["model"], plain["model"])
