"""The cross-entropy kernels (csrc/cross_entropy.cpp, kernels/cross_entropy.py) beyond the op contract.

The contract tests (tests/test_op_contract.py) already hold both backends to the reference and to
float64 on the op's sample inputs. Here: many rows (split over threads), rows wider than a Triton
block, rows that are slices of a wider tensor, extreme logits (far apart, -inf, a whole block of
-inf), targets outside the classes (refused by C++, NaN rows from Triton), the public op's argument
checks, and the model's loss against F.cross_entropy.

Run as a script, `python tests/test_kernels_cross_entropy.py --compile-for-hopper SHARD SHARDS`
compiles the Triton kernels' variants for sm_90 and reports their register spills.
"""

import pytest
import torch
import torch.nn.functional as F

from fastgpt import ops
from fastgpt.ops.definitions.cross_entropy import reference
from kernel_checks import (TRITON_DTYPES, assert_compiles_for_hopper_without_spills, backend_cases,
                           check_against_references, compile_for_hopper_main, dtype_id, needs_cpp, needs_triton,
                           on_triton_device)


def cpp_cross_entropy(logits, targets, grad_loss):
    """(loss, dlogits) from the C++ kernels."""
    loss, lse = torch.ops.fastgpt.cpp_cross_entropy_forward(logits, targets)
    return loss, torch.ops.fastgpt.cpp_cross_entropy_backward(grad_loss, logits, targets, lse)


def triton_cross_entropy(logits, targets, grad_loss):
    """(loss, dlogits) from the Triton kernels, run on TRITON_DEVICE and brought back to the CPU."""
    from fastgpt.kernels import cross_entropy

    logits, targets, grad_loss = (on_triton_device(t) for t in (logits, targets, grad_loss))
    loss, lse = cross_entropy.forward(logits, targets)
    return loss.cpu(), cross_entropy.backward(grad_loss, logits, targets, lse).cpu()


def check(kernel, logits, targets):
    grad_loss = torch.randn(logits.shape[0])
    loss, dlogits = kernel(logits, targets, grad_loss)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert dlogits.dtype == logits.dtype and dlogits.is_contiguous()
    check_against_references(f"{kernel.__name__} {dtype_id(logits.dtype)} {tuple(logits.shape)}", [loss, dlogits],
                             lambda x: reference(x, targets), [logits], grad_loss, ["loss", "dlogits"])


BOTH_BACKENDS = backend_cases(cpp_cross_entropy, triton_cross_entropy)


@pytest.mark.parametrize("kernel, dtype", BOTH_BACKENDS)
@pytest.mark.parametrize("rows, classes", [(300, 65), (70, 512), (5, 9000)], ids=["char", "bpe-512", "past-two-blocks"])
def test_matches_reference_and_float64(kernel, dtype, rows, classes):
    logits = (3 * torch.randn(rows, classes)).to(dtype)
    check(kernel, logits, torch.randint(classes, (rows,)))


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_cross_entropy, triton_cross_entropy, every_dtype=False))
def test_rows_sliced_from_a_wider_tensor(kernel, dtype):
    logits = torch.randn(33, 130, dtype=dtype)[:, 1:101]  # rows 130 apart, classes adjacent
    check(kernel, logits, torch.randint(100, (33,)))


@pytest.mark.parametrize("kernel, dtype", BOTH_BACKENDS)
def test_extreme_logits(kernel, dtype):
    """Logits hundreds apart (exp overflows fp32 unless the max is taken out first) and classes at -inf
    (ruled out, as a mask would): finite losses and gradients, the masked classes' gradients exactly 0.
    In fp32 the gradients' error grows with |lse| (it is kept in fp32): here up to about 3e-5; fp64
    computes in fp64 throughout."""
    logits = torch.tensor([[300.0, -300.0, 0.0, 3.0], [-200.0, -198.0, -250.0, float("-inf")],
                           [float("-inf"), 80.0, float("-inf"), -80.0]], dtype=dtype)
    targets = torch.tensor([0, 1, 3])
    loss, dlogits = kernel(logits, targets, torch.ones(3))
    loss_tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    grad_tolerance = {torch.float64: 1e-12, torch.float32: 1e-4}.get(dtype, 1e-2)
    expected = F.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(loss.double(), expected, rtol=loss_tolerance / 10, atol=loss_tolerance)
    leaf = logits.double().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(F.cross_entropy(leaf, targets, reduction="sum"), leaf)
    torch.testing.assert_close(dlogits.double(), expected_grad, rtol=0, atol=grad_tolerance)
    assert dlogits[1, 3] == 0 and dlogits[2, 0] == 0 and dlogits[2, 2] == 0


@pytest.mark.parametrize("kernel, dtype", backend_cases(cpp_cross_entropy, triton_cross_entropy, every_dtype=False))
def test_a_row_whose_first_block_is_all_masked(kernel, dtype):
    """Rows past one Triton block (4096 logits) whose first block is all -inf: the running max is -inf
    until the second block, and the loss and gradients must still be those of the visible classes."""
    logits = (3 * torch.randn(3, 4096 + 150)).to(dtype)
    logits[:2, :4096] = float("-inf")
    logits[2, :100] = float("-inf")
    targets = torch.tensor([4096, 4245, 4000])
    check(kernel, logits, targets)
    _, dlogits = kernel(logits, targets, torch.ones(3))
    assert torch.all(dlogits[:2, :4096] == 0) and torch.all(dlogits[2, :100] == 0)


@needs_cpp
def test_targets_outside_the_classes_are_refused_in_one_line():
    with pytest.raises(RuntimeError, match=r"targets must be class indices in \[0, 5\), got values from 0 to 5"):
        torch.ops.fastgpt.cpp_cross_entropy_forward(torch.randn(3, 5), torch.tensor([0, 5, 2]))
    with pytest.raises(RuntimeError, match=r"from -1 to 2"):
        torch.ops.fastgpt.cpp_cross_entropy_forward(torch.randn(3, 5), torch.tensor([0, -1, 2]))
    logits, targets = torch.randn(3, 5), torch.tensor([0, 1, 2])
    _, lse = torch.ops.fastgpt.cpp_cross_entropy_forward(logits, targets)
    # The backward checks too: a direct call's bad target would write past its row.
    with pytest.raises(RuntimeError, match=r"class indices in \[0, 5\), got values from 0 to 7"):
        torch.ops.fastgpt.cpp_cross_entropy_backward(torch.ones(3), logits, torch.tensor([0, 7, 2]), lse)


@needs_triton
def test_triton_makes_the_rows_of_targets_outside_the_classes_nan():
    logits, targets = torch.randn(4, 5), torch.tensor([0, 5, 2, -1])
    loss, dlogits = triton_cross_entropy(logits, targets, torch.ones(4))
    assert loss[[1, 3]].isnan().all() and dlogits[[1, 3]].isnan().all()
    valid = [0, 2]
    check_against_references("triton, the rows with targets in range", [loss[valid], dlogits[valid]],
                             lambda x: reference(x, targets[valid]), [logits[valid]], torch.ones(2),
                             ["loss", "dlogits"])


@pytest.mark.parametrize("logits, targets, message", [
    (torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.int64), r"logits \(N, V\) and targets \(N,\)"),
    (torch.randn(4, 5), torch.zeros(3, dtype=torch.int64), r"logits \(N, V\) and targets \(N,\)"),
    (torch.randn(4, 5), torch.zeros(4, dtype=torch.int32), "int64"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.int64), "no classes"),
])
def test_the_public_op_checks_its_arguments(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        ops.cross_entropy(logits, targets)


def test_the_models_loss_is_f_cross_entropy(backend):
    """The model's loss, the mean of the op's rows, against F.cross_entropy's mean in float64, on
    every backend that runs here; in bf16 autocast as a bf16 model trains."""
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=70, block_size=16, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(70, (3, 16)), torch.randint(70, (3, 16))
    for name in ops.available_backends():
        backend(name)
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits, loss = model(x, y)
            expected = F.cross_entropy(logits.double().flatten(0, 1), y.flatten())
            assert loss.dtype == torch.float32
            torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---- Triton: compiled for Hopper ------------------------------------------------------------------

def hopper_variants():
    """Both kernels in every dtype the Triton kernels take, at the model's vocabulary of 512 and at the
    largest block (4096 logits, 8 warps)."""
    import triton

    from fastgpt.kernels import cross_entropy

    for name, kernel in (("forward", cross_entropy._cross_entropy_forward_kernel),
                         ("backward", cross_entropy._cross_entropy_backward_kernel)):
        for block in (512, cross_entropy.MAX_BLOCK_V):
            config = triton.Config({}, num_warps=cross_entropy.num_warps(block))
            for dtype in TRITON_DTYPES:
                # The targets are int64, the losses and their gradients fp32 (lse is among STATISTICS).
                pointers = (dtype, {"TARGETS": torch.int64, "LOSS": torch.float32, "GRAD_LOSS": torch.float32})
                yield (f"cross_entropy {name} BLOCK_V={block} {dtype_id(dtype)}", kernel, pointers,
                       dict(BLOCK_V=block), config)


@needs_triton
def test_triton_compiles_for_hopper_without_spills():
    assert_compiles_for_hopper_without_spills(__file__, hopper_variants())


if __name__ == "__main__":
    compile_for_hopper_main(hopper_variants())
