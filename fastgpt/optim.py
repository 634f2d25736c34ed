"""The optimizers that train a GPT: AdamW alone, or Muon for the blocks' weight matrices and AdamW for the rest.

Muon (MomentUm Orthogonalized by Newton-Schulz) keeps a Nesterov momentum of each weight matrix's
gradient and steps along that momentum made orthogonal: M = U S V^T becomes (about) U V^T, every
singular value pushed to 1, so that directions the gradient barely touches are learnt as fast as the
dominant ones. Computing U V^T by an SVD is slow; a few steps of an odd matrix polynomial do it:

    X_0 = M / ||M||_F                   (every singular value now at most 1)
    A = X X^T,  X <- a X + (b A + c A^2) X          five times, (a, b, c) = (3.4445, -4.7750, 2.0315)

Each step maps every singular value s of X through p(s) = a s + b s^3 + c s^5 and leaves the singular
vectors alone. These quintic coefficients (those of Muon's reference implementation) make p steep at 0,
so that small singular values grow fast, at the price of not converging exactly: after five steps every
singular value that started at least 2e-3 of ||M||_F lies between 0.68 and 1.21, which trains as well as
exact orthogonalisation. The iteration runs on the wide orientation (rows <= columns), so that A is the
smaller Gram matrix.

The orthogonalised update of an m x n weight (m outputs, n inputs) is scaled by sqrt(max(1, m / n)),
as in Muon's reference implementation and `torch.optim.Muon`'s default: an update with unit singular
values then has a spectral norm of sqrt(fan_out / fan_in) for tall matrices, the size at which a
layer's output changes as much as its input does, and learning rates tuned for one transfer to the
other. (The alternative, 0.2 sqrt(max(m, n)), matches AdamW's update size instead, so that AdamW's
learning rate can be reused; fastgpt keeps Muon's own learning rate, 0.02 by default, as a setting.)

Why not `torch.optim.Muon`: it orthogonalises in bfloat16, fixed. On CPUs without native bf16 matrix
products (AVX2 machines; AMD Zen 3 measured) torch emulates them, and its step took 1.12 s against
24 ms for the same algorithm in float32 (GPT of 4 layers x 128, vocabulary 65, one thread on an AMD
EPYC Zen 3, AVX2; AdamW's step on all parameters: 2.3 ms; a training step forward and backward about
0.45 s). This Muon orthogonalises in float32 by default (`ns_dtype`), and in bfloat16 on request;
a trainer asks for bfloat16 when the run computes in bf16 autocast on a processor with native bf16
(hardware.Precision.matmul_dtype). On a 2-core Intel Xeon with AMX the modern preset's Muon step
took 6.5 ms in bfloat16 against 11.3 ms in float32, beside a training step of about 90 ms. Matrices
of the same shape go through the iteration together, as one batch of matrix products. Its update is
torch.optim.Muon's otherwise (the same momentum, coefficients, scaling and decoupled weight decay);
tests/test_optim.py holds the two side by side.

`build_optimizer` gives a trainer one object for either choice (`CombinedOptimizer`): it steps, zeroes,
saves and restores all the parts at once, and sets every group's learning rate from a schedule's
multiplier of that group's base rate.
"""

import math
from collections import defaultdict

import torch

from fastgpt.errors import FastGPTError

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The token embedding's name among a GPT's parameters (a head tied to it has no name of its own).
TOKEN_EMBEDDING = "transformer.wte.weight"
NS_STEPS = 5


def orthogonalize(matrices, steps=NS_STEPS, dtype=torch.float32, eps=1e-7):
    """About U V^T for each matrix (..., m, n) = U S V^T, by the quintic Newton-Schulz iteration (see above),
    computed in `dtype` and returned in it."""
    a, b, c = NS_COEFFICIENTS
    x = matrices.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    multiply_add = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        polynomial = multiply_add(gram, gram, gram, beta=b, alpha=c)
        x = multiply_add(x, polynomial, x, beta=a)
    return x.mT if tall else x


def update_scale(shape):
    """The factor on an orthogonalised update of a (fan_out, fan_in) matrix: sqrt(max(1, fan_out / fan_in))."""
    fan_out, fan_in = shape
    return math.sqrt(max(1.0, fan_out / fan_in))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters: W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) orthogonalize(nesterov momentum).

    The momentum is an exponential average, B <- mu B + (1 - mu) G, and the Nesterov step looks ahead
    to (1 - mu) G + mu B; the orthogonalisation divides out its scale, so this is the same direction as
    the textbook sum B <- mu B + G.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=NS_STEPS,
                 ns_dtype=torch.float32):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon needs lr >= 0, weight_decay >= 0 and 0 <= momentum < 1 "
                             f"(got {lr}, {weight_decay}, {momentum})")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        # Follows the run's precision and machine; not saved with the state, so a run may resume elsewhere.
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D weight matrices only, not a parameter of shape {tuple(p.shape)}")

    def _momentum_buffer(self, p):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # Each arithmetic step goes over all matrices in one call (torch._foreach_*): on a GPU a step
            # of a small model is bound by how many kernels it launches, not by their work.
            grads = [p.grad for p in params]
            buffers = [self._momentum_buffer(p) for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            if group["nesterov"]:
                # The look-ahead overwrites the gradients, as Muon's reference implementation does (they
                # are not read again before they are zeroed); in-place foreach ops also serve FSDP's
                # sharded tensors, as they do torch's own optimizers.
                torch._foreach_lerp_(grads, buffers, momentum)
            updates = grads if group["nesterov"] else buffers
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            # Matrices of one shape are orthogonalised together: one batched product instead of several.
            by_shape = defaultdict(list)
            for p, update in zip(params, updates):
                by_shape[p.shape].append((p, update))
            for shape, pairs in by_shape.items():
                same_shape = [p for p, _ in pairs]
                orthogonal = orthogonalize(torch.stack([update for _, update in pairs]), group["ns_steps"],
                                           self.ns_dtype)
                # In the weights' dtype where that is wider (an exact cast, which lets the add run as one
                # kernel on a GPU), never narrower (which would round the update twice).
                wider = torch.promote_types(orthogonal.dtype, same_shape[0].dtype)
                torch._foreach_add_(same_shape, orthogonal.to(wider).unbind(), alpha=-lr * update_scale(shape))
        return loss


class CombinedOptimizer:
    """Several torch optimizers over disjoint parameters, used as one.

    Every param group keeps its configured learning rate as "base_lr"; `set_lr_multiplier(m)` sets each
    group's "lr" to m x base_lr, so one schedule drives groups whose rates differ. `optimizers` gives
    the parts by name, for code that needs real torch optimizers (the distributed checkpoint helpers
    take a list of them).
    """

    def __init__(self, **optimizers):
        self.optimizers = optimizers
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

    @property
    def parts(self):
        """The torch optimizers, for code that takes a list of them (the distributed checkpoint helpers)."""
        return list(self.optimizers.values())

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def set_lr_multiplier(self, multiplier):
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    def step(self):
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise FastGPTError(f"the saved optimizer state holds {', '.join(sorted(state))} but this run uses "
                               f"{', '.join(sorted(self.optimizers))}; resume with the same --optimizer")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def muon_parameters(model):
    """The names of the parameters Muon trains: the 2-D weight matrices inside the transformer blocks.

    Embeddings and the language-model head are matrices too, but a lookup table (and the head tied to
    it) is not a linear map between hidden layers, and Muon's orthogonal step does not suit them.
    """
    return {name for name, p in model.named_parameters() if name.startswith("transformer.h.") and p.dim() == 2}


def build_optimizer(model, settings, device_type="cpu", ns_dtype=torch.float32):
    """The optimizer for a fastgpt GPT, as the training settings (fastgpt.config.TrainConfig) ask.

    settings.optimizer "adamw": AdamW on everything at learning_rate (the token embedding, and the head
    tied to it, at embedding_lr when that is set), with beta1 and beta2; weight decay on the 2-D weights
    only (matrices and embeddings, never biases or gains). "muon": Muon on the blocks'
    weight matrices at muon_lr (with muon_momentum and muon_weight_decay), AdamW as above on the rest.
    Muon orthogonalises in ns_dtype (a trainer passes hardware.Precision.matmul_dtype; see above).
    Returns a CombinedOptimizer whose parts are named "adamw" and, with muon, "muon".
    """
    optimizer = settings.optimizer
    if optimizer not in ("adamw", "muon"):
        raise FastGPTError(f"optimizer must be adamw or muon (got {optimizer!r})")
    # named_parameters lists a tied parameter once, under its first name (the token embedding).
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    matrices = muon_parameters(model) if optimizer == "muon" else set()
    embedding = [p for name, p in parameters.items() if name == TOKEN_EMBEDDING]
    rest = [p for name, p in parameters.items() if name not in matrices | {TOKEN_EMBEDDING}]
    adamw_groups = [{"params": embedding, "weight_decay": settings.weight_decay,
                     "lr": settings.embedding_lr or settings.learning_rate},
                    {"params": [p for p in rest if p.dim() >= 2], "weight_decay": settings.weight_decay},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    # torch's fused AdamW step is one kernel over all parameters: on a 2-core CPU (AVX2) it took 1.4 ms
    # against 4.1 ms for the default (foreach) step, for the 0.8M parameters of the default model.
    fused = {"fused": True} if device_type in ("cuda", "cpu") else {}
    parts = {"adamw": torch.optim.AdamW([group for group in adamw_groups if group["params"]],
                                        lr=settings.learning_rate, betas=(settings.beta1, settings.beta2), **fused)}
    if matrices:
        parts["muon"] = Muon([p for name, p in parameters.items() if name in matrices], lr=settings.muon_lr,
                             momentum=settings.muon_momentum, weight_decay=settings.muon_weight_decay,
                             ns_dtype=ns_dtype)
    return CombinedOptimizer(**parts)
