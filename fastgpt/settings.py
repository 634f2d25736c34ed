"""How a setting is declared: a dataclass field with a default, a meaning, and possibly the values it may
take (a list of choices, or a minimum).

Every program's settings are such dataclasses (the model's GPTConfig, training's TrainConfig, the
sampler's and the exporter's), and fastgpt.config turns any of them into --flags, TOML keys and
--help text. A dataclass may hold another one as a group (TrainConfig holds the model's GPTConfig):
its settings are read as if they were the outer one's own, so each name must be unique.
"""

import math
from dataclasses import field, fields

from fastgpt.errors import FastGPTError

# The largest integer a setting may hold: torch's integers (a seed, a count) are 64-bit.
LARGEST_INTEGER = 2**63 - 1


def setting(default, meaning, choices=None, minimum=None, **metadata):
    """A field with its default and meaning (shown by --help), the values it may take (`choices`, or
    numbers from `minimum` up), and any other metadata its dataclass reads (GPTConfig's `kind`, or
    `from_flag`: a function that turns a flag's text into the value, where the field's type alone
    would not)."""
    return field(default=default, metadata={"help": meaning, "choices": choices, "minimum": minimum, **metadata})


def group(config_class, meaning):
    """A field holding a whole settings dataclass, whose settings are read as the outer class's own."""
    return field(default_factory=config_class, metadata={"help": meaning, "group": config_class})


def leaves(config_class):
    """The settings of a dataclass in order, groups replaced by their own settings."""
    for f in fields(config_class):
        if "group" in f.metadata:
            yield from leaves(f.metadata["group"])
        else:
            yield f


def flat_values(config):
    """{name: value} of every setting of a settings dataclass instance, groups flattened."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        values.update(flat_values(value) if "group" in f.metadata else {f.name: value})
    return values


def from_flat_values(config_class, values):
    """An instance of config_class from {name: value}; settings not named keep their defaults."""
    arguments = {}
    for f in fields(config_class):
        if "group" in f.metadata:
            arguments[f.name] = from_flat_values(f.metadata["group"], values)
        elif f.name in values:
            arguments[f.name] = values[f.name]
    return config_class(**arguments)


def check_values(config):
    """Refuse a setting outside its choices or below its minimum, a number that is not finite or is too
    large for torch, naming it and what it may be."""
    values = flat_values(config)
    for f in leaves(type(config)):
        given = values[f.name] if isinstance(values[f.name], tuple) else (values[f.name],)
        choices, minimum = f.metadata["choices"], f.metadata["minimum"]
        for value in given:
            if isinstance(value, float) and not math.isfinite(value):
                raise FastGPTError(f"{f.name} must be a finite number (got {value})")
            if isinstance(value, int) and abs(value) > LARGEST_INTEGER:
                raise FastGPTError(f"{f.name} must be at most {LARGEST_INTEGER} (got {value})")
            if choices and value not in choices:
                raise FastGPTError(f"{f.name} must be one of {', '.join(choices)} (got {value!r})")
            if minimum is not None and value < minimum:
                least = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
                raise FastGPTError(f"{f.name} {least} (got {value})")
