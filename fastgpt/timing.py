"""Median times of several implementations of one step, measured in turns.

The one timer of fastgpt: `auto` uses it to choose between the Triton kernels and torch's built-ins
on a GPU (fastgpt/ops/choice.py), and the benchmarks use it for every table (benchmarks/harness.py).

Each round gives every implementation a turn, starting from a different one each round, so that
whatever else the machine does meanwhile (other processes, clock changes, a warm or cold cache)
falls on all of them alike, and the ratio of two medians is a fair comparison.
"""

import statistics
import time

import torch


class HostClock:
    """Seconds of a call on the host's clock: right for CPU work, which is done when the call returns."""

    def time(self, fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


class CudaClock:
    """Seconds of a call on the GPU, from CUDA events recorded before and after it.

    The host waits only for the end event, so the time is the GPU's, not the launch overhead's
    (unless the GPU idles waiting for launches, which then is part of the step's cost).
    """

    def time(self, fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device):
    """The clock that times work on `device`."""
    return CudaClock() if torch.device(device).type == "cuda" else HostClock()


class Turns:
    """Times the steps (name -> function) round after round; `medians()` gives each one's median.

    With `settle`, each turn is two calls of which only the second is timed: the first lets the
    memory allocator settle on this step's sizes after another step has freed tensors of other
    sizes (on CPU, fresh pages faulted in from the operating system can cost a memory-bound op
    more than its own work).
    """

    def __init__(self, steps, clock, settle=False):
        self.steps, self.clock, self.settle = steps, clock, settle
        self.names = list(steps)
        self.times = {name: [] for name in self.names}

    def round(self):
        first = len(self.times[self.names[0]]) % len(self.names)
        for name in self.names[first:] + self.names[:first]:
            if self.settle:
                self.steps[name]()
            self.times[name].append(self.clock.time(self.steps[name]))

    def medians(self):
        return {name: statistics.median(times) for name, times in self.times.items()}


def alternating_medians(steps, rounds, clock, warmup=1, settle=False):
    """Each step's median seconds over `rounds` rounds of turns, after `warmup` untimed calls of each.

    The warm-up calls compile kernels, fill caches and let autotuning run before anything is timed.
    """
    for name in steps:
        for _ in range(warmup):
            steps[name]()
    turns = Turns(steps, clock, settle)
    for _ in range(rounds):
        turns.round()
    return turns.medians()
