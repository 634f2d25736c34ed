"""`auto` on a GPU chooses between the Triton kernels and torch's built-ins by measuring (fastgpt/ops/choice.py).

The choosing is exercised here with fake timers, on CPU tensors (Triton through its interpreter when
there is no GPU), and the timer the choice and the benchmarks share (fastgpt/timing.py) with a fake clock.
"""

import pytest
import torch

from fastgpt import ops, timing
from fastgpt.ops import choice, dispatch
from fastgpt.ops import triton as triton_backend
from fastgpt.ops.definitions.causal_attention import CAUSAL_ATTENTION
from fastgpt.ops.definitions.layer_norm import LAYER_NORM

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FakeTimer:
    """Runs every step once (they must work) and reports the given seconds per backend."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.measured = []

    def __call__(self, steps):
        for step in steps.values():
            step()
        self.measured.append(sorted(steps))
        return {name: self.seconds[name] for name in steps}


def attention_inputs(t, requires_grad=False, d=16):
    return [torch.randn(1, 2, t, d, device=DEVICE, requires_grad=requires_grad) for _ in range(3)]


def candidates(op):
    """Each candidate backend's implementation of `op`, as the dispatcher gives them to the chooser."""
    return {name: dispatch.implementation(op, name) for name in choice.CANDIDATES}


def chosen_attention(chooser, implementations=None):
    run = chooser.implementation(CAUSAL_ATTENTION, implementations or candidates(CAUSAL_ATTENTION))
    return lambda q, k, v: run(q, k, v, 0.25)


@pytest.mark.parametrize("winner", ["triton", "torch"])
def test_the_faster_backend_runs_the_op(winner, monkeypatch):
    timer = FakeTimer({"triton": 1.0 if winner == "torch" else 0.5, "torch": 0.7})
    chooser = choice.Chooser(timer)
    ran = []
    counted = {name: (lambda *args, original=original, name=name: ran.append(name) or original(*args))
               for name, original in candidates(CAUSAL_ATTENTION).items()}
    q, k, v = attention_inputs(20)
    out = chosen_attention(chooser, counted)(q, k, v)
    assert timer.measured == [["torch", "triton"]]
    assert list(chooser.choices.values()) == [winner]
    assert ran[-1] == winner  # both ran while measured; the winner ran the call itself
    torch.testing.assert_close(out, ops.causal_attention(q, k, v, scale=0.25, backend="reference"),
                               rtol=1e-4, atol=1e-4)


def test_a_shape_class_is_measured_once():
    timer = FakeTimer({"triton": 1.0, "torch": 2.0})
    attention = chosen_attention(choice.Chooser(timer))
    attention(*attention_inputs(20))
    attention(*attention_inputs(30))  # T rounds up to 32 as 20 does: the same class
    assert len(timer.measured) == 1
    attention(*attention_inputs(40))  # 64: a new class
    attention(*attention_inputs(20, d=32))  # another head dim
    assert len(timer.measured) == 3


def test_forward_and_backward_are_measured_when_a_gradient_is_needed():
    calls = []

    def timer(steps):
        for step in steps.values():
            step()
        calls.append(steps)
        return {"triton": 2.0, "torch": 1.0}

    attention = chosen_attention(choice.Chooser(timer))
    q, k, v = attention_inputs(20, requires_grad=True)
    with torch.no_grad():
        attention(q, k, v)  # no gradient needed: a class of its own
    out = attention(q, k, v)
    assert len(calls) == 2
    assert out.requires_grad and q.grad is None  # measuring worked on copies, not the caller's tensors
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_layer_norm_choice_keeps_the_output_dtype_under_autocast():
    x = torch.randn(6, 40, device=DEVICE)
    weight, bias = torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    outputs = {}
    for winner in choice.CANDIDATES:
        chooser = choice.Chooser(FakeTimer({"triton": 1.0 if winner == "torch" else 0.1, "torch": 0.5}))
        layer_norm = chooser.implementation(LAYER_NORM, candidates(LAYER_NORM))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            outputs[winner] = layer_norm(x, weight, bias, 1e-5, torch.bfloat16)
        assert list(chooser.choices.values()) == [winner]
    assert outputs["triton"].dtype == outputs["torch"].dtype == torch.bfloat16
    torch.testing.assert_close(outputs["triton"].float(), outputs["torch"].float(), rtol=1e-2, atol=1e-2)


def test_nothing_is_measured_under_torch_compile(monkeypatch):
    chooser = choice.Chooser(FakeTimer({"triton": 1.0, "torch": 0.1}))
    attention = chosen_attention(chooser)
    attention(*attention_inputs(20))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    chooser.timer = None  # any measurement would fail
    attention(*attention_inputs(20))  # measured before: its choice
    assert list(chooser.choices.values()) == ["torch"]
    attention(*attention_inputs(100))  # never measured: the kernel, not remembered
    assert len(chooser.choices) == 1


def test_compiled_code_runs_the_remembered_choice_in_one_graph(monkeypatch):
    chooser = choice.Chooser(FakeTimer({"triton": 1.0, "torch": 0.1}))

    def not_chosen(*args):
        raise AssertionError("the kernel that lost the measurement ran")
    implementations = candidates(CAUSAL_ATTENTION)
    attention = chosen_attention(chooser, implementations)
    q, k, v = attention_inputs(20)
    eager = attention(q, k, v)  # measured: torch's
    chooser.timer = None  # nothing may be measured from here on
    implementations["triton"] = not_chosen
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
    assert list(chooser.choices.values()) == ["torch"]


def test_auto_on_cuda_tensors_is_the_measured_choice_and_a_named_backend_is_forced(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device=None: None)
    assert dispatch._resolve("auto", torch.device("cuda")) == "fastest"  # uncached, unlike resolve_backend
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device=None: "triton is not installed")
    assert dispatch._resolve("auto", torch.device("cuda")) == "torch"  # PyTorch's own, not the slow reference
    monkeypatch.undo()
    assert dispatch.unavailable_reason("fastest", torch.device("meta")) is not None
    monkeypatch.setattr(choice.CHOOSER, "timer", None)  # the chooser must not be consulted
    q, k, v = attention_inputs(20)
    ops.causal_attention(q, k, v, backend="triton")


def test_chosen_reports_what_was_measured():
    chooser = choice.Chooser(FakeTimer({"triton": 0.002, "torch": 0.001}))
    chosen_attention(chooser)(*attention_inputs(20))
    (row,) = chooser.chosen()
    assert row["backend"] == "torch" and row["torch_ms"] == pytest.approx(1.0) and "causal_attention" in row["shape_class"]


# ---------------------------------------------------------------------------------------------
# The shared timer
# ---------------------------------------------------------------------------------------------

class FakeClock:
    """Each call of a step takes the next of its scripted durations; records the order of calls."""

    def __init__(self):
        self.order = []

    def time(self, fn):
        return fn()


def test_turns_rotate_and_medians_ignore_outliers():
    clock = FakeClock()
    durations = {"a": iter([1.0, 1.0, 50.0]), "b": iter([2.0, 9.0, 2.0])}
    steps = {name: (lambda name=name: clock.order.append(name) or next(durations[name])) for name in durations}
    medians = timing.alternating_medians(steps, rounds=3, clock=clock, warmup=0)
    assert medians == {"a": 1.0, "b": 2.0}
    assert clock.order == ["a", "b", "b", "a", "a", "b"]  # each round starts from the next step


def test_settled_turns_time_only_the_second_call():
    clock, calls = FakeClock(), []
    steps = {"a": lambda: calls.append("a") or len(calls)}
    turns = timing.Turns(steps, clock, settle=True)
    turns.round()
    assert calls == ["a", "a"] and turns.medians() == {"a": 2}


def test_clock_for_the_device():
    assert isinstance(timing.clock_for("cpu"), timing.HostClock)
    assert isinstance(timing.clock_for(torch.device("cuda")), timing.CudaClock)
