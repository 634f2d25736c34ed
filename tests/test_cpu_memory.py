"""Picking the CPU keeps freed memory in the process (fastgpt/cpu_memory.py).

How many pages glibc faults in a step, with or without its thresholds fixed, varies with the history
of the process (measured from 1 to 8,000 a step of the default model between identical runs), so no
test holds it to a count; the gain is measured as step time instead (fastgpt/cpu_memory.py).
"""

import fastgpt.device


def test_picking_the_cpu_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(fastgpt.device, "reuse_freed_memory", lambda: calls.append(True))
    assert fastgpt.device.pick_device("cpu").type == "cpu" and calls == [True]
