"""Every training setting in one place: the defaults, their meaning, and how to change them.

A setting comes from, in increasing priority: its default here, a `--config file.toml`, and a
`--name value` flag. `python -m fastgpt.train --help` lists them all.
"""

import argparse
import difflib
import tomllib
from dataclasses import asdict, dataclass, field, fields

from fastgpt.cli import ArgumentParser
from fastgpt.errors import FastGPTError


def setting(default, meaning, choices=None):
    return field(default=default, metadata={"help": meaning, "choices": choices})


@dataclass
class TrainConfig:
    # data and tokenizer
    data: str = setting("", "text file or directory of .txt files to train on (empty: the bundled Tiny Shakespeare)")
    tokenizer: str = setting("char", "how text becomes tokens", ["char", "bpe", "gpt2"])
    vocab_size: int = setting(1024, "vocabulary size the bpe tokenizer is trained to (char and gpt2 ignore it)")
    init_from: str = setting("", "fine-tune the GPT-2 checkpoint (Hugging Face layout) in this directory: its "
                                 "weights, shape and tokenizer replace n_layer, n_head, n_embd and tokenizer")
    val_fraction: float = setting(0.1, "share of the corpus, taken from its end, held out for validation")
    # model
    n_layer: int = setting(4, "number of transformer blocks")
    n_head: int = setting(4, "attention heads per block")
    n_embd: int = setting(128, "width of the residual stream")
    block_size: int = setting(128, "context length in tokens")
    dropout: float = setting(0.0, "dropout probability on embeddings and residual branches")
    bias: bool = setting(True, "biases in Linear layers and LayerNorms (GPT-2 has them)")
    # optimisation
    batch_size: int = setting(32, "sequences per micro-batch")
    grad_accum_steps: int = setting(1, "micro-batches accumulated into one optimizer step")
    max_iters: int = setting(1150, "optimizer steps to train for")
    learning_rate: float = setting(2e-3, "peak learning rate")
    min_lr: float = setting(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = setting(100, "steps of linear learning-rate warmup")
    weight_decay: float = setting(0.1, "AdamW weight decay, applied to 2-D weights only")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.99, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)")
    skip_nonfinite: bool = setting(False, "skip an optimizer step whose loss is NaN or infinite instead of "
                                          "stopping the run")
    # evaluation, logging, output
    eval_interval: int = setting(230, "steps between train/val loss evaluations")
    eval_iters: int = setting(10, "batches per loss evaluation (fixed batches, the same every time)")
    log_interval: int = setting(10, "steps between lines in metrics.jsonl")
    out_dir: str = setting("out", "directory for the checkpoint, metrics, loss plot and token cache")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt instead of starting afresh")
    sample_tokens: int = setting(200, "tokens sampled at the end of training (0: none)")
    keep_last: int = setting(2, "newest checkpoints also kept as ckpt-<step>.pt (0: none); ckpt.pt is always "
                                "the newest and best.pt the one with the lowest val loss")
    # system
    seed: int = setting(1337, "seed for initialisation, batches and dropout")
    device: str = setting("auto", "where to train: auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ["auto", "float32", "bfloat16"])
    compile: bool = setting(False, "compile the model with torch.compile")
    backend: str = setting("auto", "kernels for attention and LayerNorm", ["auto", "reference", "cpp", "triton", "torch"])
    parallel: str = setting("ddp", "under torchrun, how the processes share the model: ddp (each holds all of it) "
                                   "or fsdp (parameters, gradients and optimizer state sharded)", ["ddp", "fsdp"])

    def validate(self):
        """Refuse values that cannot work, with a message saying which and why."""
        positive = ["vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                    "grad_accum_steps", "max_iters", "eval_interval", "eval_iters", "log_interval"]
        for name in positive:
            if getattr(self, name) < 1:
                raise FastGPTError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise FastGPTError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                               "each head gets n_embd / n_head channels")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "sample_tokens",
                     "keep_last"):
            if getattr(self, name) < 0:
                raise FastGPTError(f"{name} must not be negative (got {getattr(self, name)})")
        if self.min_lr > self.learning_rate:
            raise FastGPTError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if not 0 <= self.dropout < 1:
            raise FastGPTError(f"dropout must be in [0, 1) (got {self.dropout})")
        if not 0 < self.val_fraction < 1:
            raise FastGPTError(f"val_fraction must be between 0 and 1 (got {self.val_fraction})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise FastGPTError(f"beta1 and beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise FastGPTError(f"a bpe vocabulary starts from the 256 bytes: vocab_size must be at least 257 "
                               f"(got {self.vocab_size})")
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise FastGPTError(f"{f.name} must be one of {', '.join(choices)} (got {getattr(self, f.name)!r})")
        return self

    def to_dict(self):
        return asdict(self)


def _parse_bool(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f):
    return {"bool": _parse_bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]


def build_parser(config_class, prog, description, extra_arguments=()):
    """One --name flag per config field, with its default and meaning, plus --config."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    for args, kwargs in extra_arguments:
        parser.add_argument(*args, **kwargs)
    for f in fields(config_class):
        name = "--" + f.name.replace("_", "-")
        aliases = [name] if "-" not in name[2:] else [name, "--" + f.name]
        kind = _field_type(f)
        # A bare boolean flag (`--resume`) means true; `--resume false` is accepted too.
        switch = dict(nargs="?", const=True, metavar="BOOL") if kind is _parse_bool else {}
        parser.add_argument(*aliases, dest=f.name, type=kind, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (default: {f.default!r})", **switch)
    return parser


def _suggest(name, valid):
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _read_toml(path, config_class):
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise FastGPTError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise FastGPTError(f"cannot read config file {path}: {error}") from None
    valid = [f.name for f in fields(config_class)]
    types = {f.name: _field_type(f) for f in fields(config_class)}
    settings = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types:
            raise FastGPTError(f"unknown setting {key!r} in {path}{_suggest(name, valid)}")
        try:
            settings[name] = types[name](value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise FastGPTError(f"setting {key!r} in {path} has a bad value {value!r}") from None
    return settings


def parse_config(argv, config_class=TrainConfig, prog="python -m fastgpt.train",
                 description="Train a GPT on a text corpus.", extra_arguments=()):
    """The config from defaults, an optional TOML file and flags; also the parsed extra arguments."""
    parser = build_parser(config_class, prog, description, extra_arguments)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        name = flag.lstrip("-").split("=")[0].replace("-", "_")
        close = difflib.get_close_matches(name, [f.name for f in fields(config_class)], n=1, cutoff=0.5)
        hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else " (see --help for every setting)"
        raise FastGPTError(f"unknown setting {flag!r}{hint}")
    values = vars(namespace)
    settings = _read_toml(values.pop("config"), config_class) if values.get("config") else {}
    values.pop("config", None)
    extras = {dest: values.pop(dest) for dest in list(values) if dest not in {f.name for f in fields(config_class)}}
    settings.update(values)
    return config_class(**settings).validate(), extras
