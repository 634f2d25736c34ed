"""FSDP gathers parameters in the training's 16-bit compute dtype on CUDA, and reduces gradients in fp32."""

import torch
import torch.distributed.fsdp

from fastgpt import distributed
from fastgpt.model import GPT, GPTConfig


def test_bf16_on_cuda_gathers_bf16_and_reduces_fp32():
    policy = distributed.fsdp_precision(torch.bfloat16, "cuda")
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_fp32_or_cpu_keeps_fsdp_default():
    default = torch.distributed.fsdp.MixedPrecisionPolicy()
    assert distributed.fsdp_precision(torch.float32, "cuda") == default
    assert distributed.fsdp_precision(torch.bfloat16, "cpu") == default


def test_parallelize_gives_every_shard_group_the_policy(monkeypatch):
    sharded = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard",
                        lambda module, mp_policy: sharded.append((module, mp_policy)))
    monkeypatch.setattr(distributed, "fsdp_precision",
                        lambda dtype, device: ("policy", dtype, torch.device(device).type))
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8))
    world = distributed.World(rank=0, local_rank=0, size=2)
    assert distributed.parallelize(model, world, "fsdp", compute_dtype=torch.bfloat16) is model
    assert [module for module, _ in sharded] == [*model.transformer.h, model]
    assert {policy for _, policy in sharded} == {("policy", torch.bfloat16, "cpu")}
