"""Refuse, before allocating any of it, a run that cannot fit in the device's memory.

A model or batch far beyond the machine (a typo such as --n-layer 10000) would otherwise allocate
until the system swaps to a standstill or kills the process without a word. The estimate counts only
what a training step must hold for certain, so it never refuses a run that could fit:

- per parameter, its fp32 weight and gradient and AdamW's two fp32 moments: 16 bytes (Muon keeps
  less for its matrices, one momentum: 12 bytes); split over the processes under FSDP;
- per micro-batch of B x T tokens, the residual stream that each block keeps for the backward
  (n_layer x B x T x n_embd values in fp32) and the logits (B x T x vocab_size, at least 2 bytes).

The parameters are counted on models built on the meta device, which allocates nothing.
"""

import dataclasses
import os

import torch

from fastgpt.errors import FastGPTError

GIB = 1 << 30


def total_memory(device):
    """The bytes of memory of `device` (a CPU's: the machine's RAM), or None where it is not known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def parameter_count(model_config):
    """The model's parameters, counted on models of one and two blocks built on the meta device (every
    block has as many), so that counting a deep model takes no longer than a shallow one."""
    from fastgpt.model import GPT

    def count(n_layer):
        with torch.device("meta"):
            return sum(p.numel() for p in GPT(dataclasses.replace(model_config, n_layer=n_layer)).parameters())
    one, two = count(1), count(2)
    return one + (model_config.n_layer - 1) * (two - one)


def least_bytes_needed(model_config, batch_size, optimizer, shards=1):
    """A lower bound on the memory a training step of this model and micro-batch holds."""
    parameters = parameter_count(model_config)
    per_parameter = 12 if optimizer == "muon" else 16
    tokens = batch_size * model_config.block_size
    activations = tokens * (model_config.n_layer * model_config.n_embd * 4 + model_config.vocab_size * 2)
    return parameters * per_parameter // shards + activations


def check_memory_room(model_config, batch_size, optimizer, device, shards=1):
    """Refuse a run whose training step would need more memory than `device` has at all."""
    available = total_memory(device)
    if available is None:
        return
    needed = least_bytes_needed(model_config, batch_size, optimizer, shards)
    if needed > available:
        holder = "this machine has" if device.type == "cpu" else f"the GPU ({device}) has"
        raise FastGPTError(f"this model and batch need at least {needed / GIB:.1f} GiB of memory to train, but "
                           f"{holder} {available / GIB:.1f} GiB; make the model (n_layer, n_embd), the batch "
                           "(batch_size) or the context (block_size) smaller")
