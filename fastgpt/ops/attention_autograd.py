"""The autograd formula of fused attention, shared by the C++ and the Triton backends.

Each of those backends runs attention as two torch ops: a forward (q, k, v, scale) -> (out, lse)
and a backward (grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv). The forward keeps the
log-sum-exp of each query's scores (lse) so that the backward can recompute the attention
probabilities instead of storing them; the link between the two ops is the same for both backends.
"""

import torch


def register_attention_autograd(forward_op, backward_op):
    """Make `forward_op` differentiable in q, k and v through `backward_op`."""

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):  # lse is internal: nothing downstream differentiates it
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
