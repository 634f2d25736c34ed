"""The learning rate at each step: a linear warmup, then the decay the `lr_schedule` setting names.

Each schedule is a function of the progress p through the steps after warmup (0 to 1) giving the
share of the way from min_lr up to learning_rate (1 at the start, and for cosine, linear and wsd 0
at the end). A new schedule is one function and one entry in SCHEDULES.
"""

import math


def cosine(p, config):
    """Half a cosine wave from 1 down to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * p))


def linear(p, config):
    return 1.0 - p


def constant(p, config):
    """learning_rate throughout (min_lr unused)."""
    return 1.0


def wsd(p, config):
    """Warmup-stable-decay: 1 until the last decay_fraction of the steps, then a straight line to 0."""
    start = 1.0 - config.decay_fraction
    return 1.0 if p <= start else (1.0 - p) / config.decay_fraction


SCHEDULES = {"cosine": cosine, "linear": linear, "constant": constant, "wsd": wsd}


def learning_rate_at(step, config):
    """Linear warmup to learning_rate over warmup_iters, then config.lr_schedule down to min_lr at max_iters."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    share = SCHEDULES[config.lr_schedule](min(1.0, progress), config)
    return config.min_lr + share * (config.learning_rate - config.min_lr)
