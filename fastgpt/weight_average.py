"""An exponential moving average of a model's weights, evaluated and saved in place of the last weights.

After each optimizer step, for every parameter w and its average a:

    a <- a + (1 - decay) (w - a)

so the average weighs the step k steps ago by (1 - decay) decay^k: with decay 0.99, about the last
100 steps. Late in training the weights jitter around a valley floor with the learning rate's step
size; their average sits nearer its bottom (on the bundled corpus, the char recipe's average scored
0.007 lower than its last weights, for two seeds; README).

The average lives beside the model (one tensor per parameter, sharded alike under FSDP), and
`swapped_in` copies it into the model's own parameters for a while: evaluation, sampling, and the
gathering and loading of checkpoints then run through the model unchanged, whatever wraps it (DDP,
FSDP, torch.compile). torch.optim.swa_utils.AveragedModel keeps a deep copy of the module instead, which
would need wrapping and gathering of its own.
"""

from contextlib import contextmanager

import torch


class WeightAverage:
    """The running average of `model`'s parameters (see above), starting from their current values."""

    def __init__(self, model, decay):
        self.model = model
        self.decay = decay
        with torch.no_grad():
            self.average = [p.detach().clone() for p in model.parameters()]

    def _parameters(self):
        return [p.detach() for p in self.model.parameters()]

    def update(self):
        """Move the average toward the model's weights; called after each optimizer step."""
        with torch.no_grad():
            torch._foreach_lerp_(self.average, self._parameters(), 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        """The model holds the average inside the block, and its own weights again after it; what the
        model holds when the block ends becomes the average (so loading a state inside sets it)."""
        parameters = self._parameters()
        with torch.no_grad():
            weights = [p.clone() for p in parameters]
            copy_each(parameters, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                copy_each(self.average, parameters)
                copy_each(parameters, weights)


def copy_each(targets, sources):
    """targets[i] <- sources[i], one tensor at a time: FSDP's sharded tensors have no _foreach_copy_."""
    for target, source in zip(targets, sources):
        target.copy_(source)
