"""Training in several processes with torch.distributed, as launched by torchrun.

torchrun starts one process per device and tells each its place through environment variables
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without them the run is one process and
every helper here does nothing, so the trainer has a single code path for both.

Two ways to share the model, chosen by the `parallel` setting:

- ddp: every process holds the whole model; gradients are averaged by DistributedDataParallel.
- fsdp: parameters, gradients and optimizer state are sharded across the processes by
  `torch.distributed.fsdp.fully_shard`, one shard group per transformer block, for models that
  do not fit one device. When training in bf16 (or fp16) on CUDA, the parameters are gathered in
  that dtype, which halves the bytes of every all-gather and spares autocast a cast per use, while
  gradients are reduced, and the sharded parameters and optimizer state kept, in fp32.

Before training, one process prepares what all need (fits the tokenizer, encodes the corpus) while
the others wait. That can take hours on a large corpus, far beyond the timeout of a collective
(NCCL's is 10 minutes), so the waiting is done in a gloo group of its own, whose timeout no
preparation reaches; if the preparing process fails instead, torchrun ends the others.

torch.distributed.fsdp and torch.distributed.checkpoint take most of a second to import (they bring
DTensor), so the functions that use them import them: `python -m fastgpt.train --help`, or a
mistaken flag, answers without waiting for them.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastgpt.errors import FastGPTError

# How long a process waits for another's preparation: long enough for any corpus.
PREPARATION_TIMEOUT = timedelta(days=30)


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of one run."""

    rank: int = 0
    local_rank: int = 0  # rank among the processes on this machine: picks the GPU
    size: int = 1
    waiting_group: object = field(default=None, compare=False)  # where processes wait for preparation

    @property
    def is_main(self):
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self):
        return self.size > 1


def join(device):
    """This process's World and device, joining torchrun's process group when launched by torchrun.

    Each process on a machine takes the GPU numbered by its local rank; the collective backend is
    NCCL on CUDA and gloo on CPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise FastGPTError(f"local rank {local_rank} has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        waiting_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    except (ValueError, RuntimeError) as error:
        raise FastGPTError(f"cannot join the torchrun process group ({error}); launch with "
                           "`torchrun --nproc_per_node=N -m fastgpt.train ...`") from None
    return World(rank, local_rank, size, waiting_group), device


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model, world, mode, compile=False, compute_dtype=torch.float32):
    """The module that training and evaluation run the model through.

    That is the model itself (under fsdp sharded in place), compiled with torch.compile when asked,
    and under ddp wrapped in DistributedDataParallel, around the compiled model: what trains is
    what was compiled. Its weights stay the model's own, as do its state dicts. `compute_dtype` is
    the dtype the training computes in (autocast's, or fp32): under FSDP it sets the dtype parameters
    are gathered in (see `fsdp_precision`).
    """
    if world.is_distributed and mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_precision(compute_dtype, next(model.parameters()).device)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    runner = torch.compile(model) if compile else model
    if world.is_distributed and mode == "ddp":
        runner = DistributedDataParallel(runner)
    return runner


def fsdp_precision(compute_dtype, device):
    """FSDP's mixed-precision policy: gather parameters in the compute dtype when it is a 16-bit one on
    CUDA, reduce gradients in fp32; otherwise FSDP's default (everything in the parameters' fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if torch.device(device).type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):
        return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fully_sharded(module):
    """Whether `fully_shard` has sharded this module: its parameters are then whole only while it is
    being called. (Without torch.distributed.fsdp imported, nothing can have been.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


@contextmanager
def gradient_sync(runner, model, enabled):
    """Skip the gradient all-reduce on accumulation micro-steps: only the last one's sum matters.
    `runner` is what `parallelize` returned for `model` (DDP wraps the runner; FSDP shards the model)."""
    if enabled:
        yield
    elif isinstance(runner, DistributedDataParallel):
        with runner.no_sync():
            yield
    elif fully_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def whole_tensors(on_cpu):
    """torch.distributed.checkpoint's state-dict functions, and options for whole tensors (gathered from
    every process's shards): on the CPU for what a checkpoint holds; for what is loaded from one,
    where the model is, sharded again where it is sharded."""
    from torch.distributed.checkpoint import state_dict

    return state_dict, state_dict.StateDictOptions(full_state_dict=True, cpu_offload=on_cpu)


def full_state(model, optimizers):
    """The model's and optimizers' whole state, on the CPU, keyed by parameter name.

    Under FSDP every process must call this (it gathers the shards); the result is the same as a
    single process's, so any checkpoint loads into any number of processes and either mode.
    """
    api, options = whole_tensors(on_cpu=True)
    return full_model_state(model), api.get_optimizer_state_dict(model, optimizers, options=options)


def full_model_state(model):
    """The model's part of `full_state` alone."""
    api, options = whole_tensors(on_cpu=True)
    return api.get_model_state_dict(model, options=options)


def load_full_state(model, optimizers, model_state, optimizer_state):
    """Load what `full_state` returned into a model and optimizers, sharding it where they are sharded."""
    load_full_model_state(model, model_state)
    api, options = whole_tensors(on_cpu=False)
    api.set_optimizer_state_dict(model, optimizers, optimizer_state, options=options)


def load_full_model_state(model, model_state):
    """Load what `full_model_state` returned into a model, sharding it where the model is sharded."""
    api, options = whole_tensors(on_cpu=False)
    api.set_model_state_dict(model, model_state, options=options)


def sum_across(tensor, world):
    """The element-wise sum of `tensor` over all processes (the tensor itself in a single process)."""
    if world.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(value, world):
    """Rank 0's `value` (any picklable object), on every process: the others wait as long as rank 0
    takes to make it."""
    if not world.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=world.waiting_group)
    return box[0]


def barrier(world):
    """Wait until every process is here, however long the slowest takes to prepare."""
    if world.is_distributed:
        dist.barrier(group=world.waiting_group)
