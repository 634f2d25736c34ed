"""Keep the memory a CPU training step frees inside the process, for the next step to reuse.

A step allocates its activations and gradients and frees them again, the same sizes every step.
glibc's malloc serves blocks from 128 KiB up (a threshold it raises, as it sees such blocks freed, to
at most 32 MiB) with fresh pages from the operating system and hands them back when they are freed,
so every step pays for the kernel to fault in and zero those pages again: 5,800 page faults a step of
the default model (4 layers x 128, batch 32 x 128), whose step then takes 5-7% longer (2 threads on a
2-core AMD EPYC, Zen 3, AVX2). Fixing the mmap threshold at its ceiling and never trimming the heap below 1 GiB of
free space keeps those blocks in the heap: once the heap holds what a step needs, as few as one page
fault a step (the counts vary with the history of the process).

The speed benchmarks do the same, so that they compare kernels rather than page faults. The cost is
that the process keeps its peak memory until it exits, which suits a training, sampling or evaluation
run. Only glibc has these knobs (`mallopt`); with another C library nothing changes.
"""

import ctypes
import ctypes.util

# mallopt's parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_CEILING = 32 << 20   # glibc refuses more (half its largest heap on 64-bit systems)
TRIM_THRESHOLD = 1 << 30


def reuse_freed_memory():
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB for reuse; True where it agreed."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
