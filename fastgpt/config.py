"""Every training setting in one place, and how any program's settings are read.

A setting comes from, in increasing priority: its default, a bundled `--preset NAME` (training:
fastgpt/presets/NAME.toml), (with --resume) the checkpoint of the run it continues, a `--config
file.toml`, and a `--name value` flag.
`python -m fastgpt.train --help` lists them all. The model's own settings are
GPTConfig's (fastgpt.model); TrainConfig holds them as its `model` group, and they are given like any
other setting (`--n-layer 6`, or `n_layer = 6` in the TOML file).
"""

import argparse
import difflib
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from fastgpt.cli import ArgumentParser
from fastgpt.device import backend_setting, device_setting, dtype_setting
from fastgpt.errors import FastGPTError
from fastgpt.model import GPTConfig
from fastgpt.settings import check_values, flat_values, from_flat_values, group, leaves, setting
from fastgpt.tokenizers import KINDS, SMALLEST_BPE_VOCAB


@dataclass
class TrainConfig:
    # data and tokenizer
    data: str = setting("", "text file or directory of .txt files to train on (empty: the bundled Tiny Shakespeare)")
    tokenizer: str = setting("char", "how text becomes tokens", list(KINDS))
    init_from: str = setting("", "fine-tune the GPT-2 or Llama checkpoint (Hugging Face layout) in this directory: its "
                                 "weights, architecture and tokenizer replace the model settings and tokenizer")
    val_fraction: float = setting(0.1, "share of the corpus, taken from its end, held out for validation")
    model: GPTConfig = group(GPTConfig, "the model's settings (fastgpt.model.GPTConfig)")
    # optimisation
    batch_size: int = setting(32, "sequences per micro-batch", minimum=1)
    grad_accum_steps: int = setting(1, "micro-batches accumulated into one optimizer step", minimum=1)
    max_iters: int = setting(820, "optimizer steps to train for", minimum=1)
    optimizer: str = setting("adamw", "adamw on every parameter, or muon on the blocks' weight matrices with adamw on "
                                      "the rest (embeddings, head, gains and biases)", ["adamw", "muon"])
    learning_rate: float = setting(6e-3, "peak learning rate (of AdamW)", minimum=0)
    embedding_lr: float = setting(0.0, "peak learning rate of AdamW for the token embedding, which the schedule "
                                       "scales like learning_rate (0: learning_rate)", minimum=0)
    muon_lr: float = setting(0.02, "muon: peak learning rate of Muon, which the schedule scales like learning_rate",
                             minimum=0)
    muon_momentum: float = setting(0.95, "muon: Muon's (Nesterov) momentum")
    muon_weight_decay: float = setting(0.0, "muon: Muon's decoupled weight decay (each step shrinks the matrices by "
                                            "lr x this)", minimum=0)
    lr_schedule: str = setting("cosine", "learning rate after the warmup: cosine decay to min_lr at max_iters, "
                                         "linear decay, constant, or wsd (stable, then linear decay over the last "
                                         "decay_fraction of the steps)", ["cosine", "linear", "constant", "wsd"])
    min_lr: float = setting(2e-4, "learning rate at the end of the decay", minimum=0)
    warmup_iters: int = setting(50, "steps of linear learning-rate warmup", minimum=0)
    decay_fraction: float = setting(0.2, "wsd: share of the steps after warmup spent decaying to min_lr")
    weight_decay: float = setting(0.1, "AdamW weight decay, applied to 2-D weights only", minimum=0)
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.99, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: no clipping)", minimum=0)
    weight_average: float = setting(0.0, "keep an exponential average of the weights, each step average += "
                                         "(1 - this) x (weights - average), and evaluate, sample and save it as the "
                                         "model (0: off; 0.99 averages about the last 100 steps)", minimum=0)
    skip_nonfinite: bool = setting(False, "skip an optimizer step whose loss is NaN or infinite instead of "
                                          "stopping the run")
    # evaluation, logging, output
    eval_interval: int = setting(180, "steps between train/val loss evaluations", minimum=1)
    eval_iters: int = setting(10, "batches per loss evaluation (blocks spread evenly over each split, the same "
                                  "every time)", minimum=1)
    log_interval: int = setting(10, "steps between lines in metrics.jsonl", minimum=1)
    log: tuple[str, ...] = setting((), "also send metrics to: tensorboard (event files in out_dir/tensorboard; "
                                       "needs the tensorboard package); repeatable", ["tensorboard"])
    out_dir: str = setting("out", "directory for the checkpoint, metrics, loss plot and token cache")
    resume: bool = setting(False, "continue from out_dir/ckpt.pt instead of starting afresh, with the settings "
                                  "the run was trained with; a setting given changes them where a run may")
    sample_tokens: int = setting(200, "tokens sampled at the end of training (0: none)", minimum=0)
    keep_last: int = setting(2, "newest checkpoints also kept as ckpt-<step>.pt (0: none); ckpt.pt is always "
                                "the newest and best.pt the one with the lowest val loss", minimum=0)
    # system
    seed: int = setting(1337, "seed for initialisation, batches and dropout")
    device: str = device_setting("where to train: auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: str = dtype_setting()
    compile: bool = setting(False, "compile the model with torch.compile")
    backend: str = backend_setting()
    parallel: str = setting("ddp", "under torchrun, how the processes share the model: ddp (each holds all of it) "
                                   "or fsdp (parameters, gradients and optimizer state sharded)", ["ddp", "fsdp"])

    def validate(self):
        """Refuse combinations of values that cannot work, with a message saying which and why (each
        setting's own choices and minimum are checked by fastgpt.settings.check_values)."""
        self.model.validate()
        if self.min_lr > self.learning_rate:
            raise FastGPTError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if not 0 <= self.decay_fraction <= 1:
            raise FastGPTError(f"decay_fraction must be in [0, 1] (got {self.decay_fraction})")
        if not 0 < self.val_fraction < 1:
            raise FastGPTError(f"val_fraction must be between 0 and 1 (got {self.val_fraction})")
        if not 0 <= self.weight_average < 1:
            raise FastGPTError(f"weight_average must be at least 0 and below 1 (got {self.weight_average})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.muon_momentum < 1):
            raise FastGPTError(f"beta1, beta2 and muon_momentum must be in [0, 1) (got {self.beta1}, {self.beta2}, "
                               f"{self.muon_momentum})")
        if self.tokenizer == "bpe" and self.model.vocab_size < SMALLEST_BPE_VOCAB:
            raise FastGPTError(f"a bpe vocabulary starts from the {SMALLEST_BPE_VOCAB} single bytes: vocab_size must "
                               f"be at least {SMALLEST_BPE_VOCAB} (got {self.model.vocab_size})")

    def to_dict(self):
        """Every setting by name, the model's among them: what config.json and checkpoints hold."""
        return flat_values(self)


# The bundled sets of training settings, one TOML file each, named by --preset.
PRESETS = {path.stem: path for path in sorted((Path(__file__).parent / "presets").glob("*.toml"))}


# ---------------------------------------------------------------------------------------------
# reading settings: flags, a TOML file, a preset, defaults


def _parse_bool(text):
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_SCALARS = {bool: _parse_bool, int: int, float: float, str: str}


def _is_list(f):
    """A setting that takes several values (a tuple[str, ...] field): its flag may be repeated."""
    return typing.get_origin(f.type) is tuple


def _reader(f):
    """The function that turns a flag's text into the setting's value."""
    return f.metadata.get("from_flag") or _SCALARS[typing.get_args(f.type)[0] if _is_list(f) else f.type]


# The TOML values each type of setting takes. TOML's values are typed, so a value of another type is a
# mistake (`max_iters = 2.9`, `n_layer = true`), not something to convert; an int serves as a float.
_TOML_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def _toml_scalar(kind, value):
    # bool is an int to Python, but not to TOML: it serves only a bool setting.
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, _TOML_TYPES[kind]):
        raise TypeError(f"expected {'a string' if kind is str else kind.__name__}")
    return kind(value)


def _from_toml(f, value):
    if _is_list(f):
        kind = typing.get_args(f.type)[0]
        if not isinstance(value, list):
            raise TypeError(f"expected a list of {'strings' if kind is str else kind.__name__}")
        return tuple(_toml_scalar(kind, item) for item in value)
    return _toml_scalar(f.type, value)


def build_parser(config_class, prog, description, presets):
    """One --name flag per setting of config_class (groups flattened), with its default and meaning, plus
    --config and, where there are presets, --preset."""
    # No abbreviations: they break when a setting is added, and --batch would match both of
    # --batch-size's spellings.
    parser = ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    if presets:
        parser.add_argument("--preset", choices=list(presets), metavar="NAME",
                            help=f"start from a bundled set of settings: {', '.join(presets)} (fastgpt/presets/); "
                                 "--config and flags override it, and so do a resumed run's own settings")
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    sections = {config_class: parser}
    for f in fields(config_class):
        if "group" in f.metadata:
            sections[f.metadata["group"]] = parser.add_argument_group(f.metadata["help"])
    for section_class, section in sections.items():
        for f in fields(section_class):
            if "group" not in f.metadata:
                _add_flag(section, f)
    return parser


def _add_flag(parser, f):
    if f.metadata.get("positional"):  # a list of values given without a flag: `compare RUN_A RUN_B`
        parser.add_argument(f.name, nargs="+", type=_reader(f), metavar=f.name.upper().rstrip("S"),
                            help=f.metadata["help"])
        return
    name = "--" + f.name.replace("_", "-")
    aliases = [name] if "-" not in name[2:] else [name, "--" + f.name]
    reader = _reader(f)
    if _is_list(f):
        how = dict(action="append")
    elif reader is _parse_bool:
        # A bare boolean flag (`--resume`) means true; `--resume false` is accepted too.
        how = dict(nargs="?", const=True, metavar="BOOL")
    else:
        how = {}
    choices = f"one of {', '.join(f.metadata['choices'])}; " if f.metadata["choices"] else ""
    parser.add_argument(*aliases, dest=f.name, type=reader, default=argparse.SUPPRESS,
                        help=f"{f.metadata['help']} ({choices}default: {f.default!r})", **how)


# What nanoGPT, Hugging Face and litgpt call some settings, for "did you mean": spelling alone
# would lead from these to the wrong setting (lr to min_lr, seq_len to seed) or to none.
NAMES_ELSEWHERE = {
    "lr": "learning_rate", "min_learning_rate": "min_lr", "wd": "weight_decay", "max_grad_norm": "grad_clip",
    "steps": "max_iters", "max_steps": "max_iters", "epochs": "max_iters",
    "gradient_accumulation_steps": "grad_accum_steps", "eval_every": "eval_interval", "log_every": "log_interval",
    "context": "block_size", "ctx": "block_size", "context_length": "block_size", "seq_len": "block_size",
    "max_seq_len": "block_size", "n_positions": "block_size", "max_position_embeddings": "block_size",
    "hidden_size": "n_embd", "d_model": "n_embd", "dim": "n_embd", "intermediate_size": "mlp_hidden",
    "num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "num_key_value_heads": "n_kv_head",
    "rope_theta": "rope_base", "theta": "rope_base", "rms_norm_eps": "norm_eps", "layer_norm_epsilon": "norm_eps",
    "tie_word_embeddings": "tie_embeddings", "val_split": "val_fraction",
    "precision": "dtype", "amp": "dtype", "mixed_precision": "dtype", "fp16": "dtype", "bf16": "dtype",
    "max_tokens": "max_new_tokens", "temp": "temperature",
}


def closest_setting(name, valid):
    """The setting in `valid` that `name` most likely meant, or None: its name elsewhere, then the one
    setting it begins (batch: batch_size), then the closest spelling."""
    if NAMES_ELSEWHERE.get(name) in valid:
        return NAMES_ELSEWHERE[name]
    begun = [setting for setting in valid if setting.startswith(name + "_")]
    if len(begun) == 1:
        return begun[0]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _read_toml(path, config_class):
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise FastGPTError(f"config file {path} does not exist") from None
    except (OSError, ValueError) as error:  # ValueError: not TOML (TOMLDecodeError), or not UTF-8
        raise FastGPTError(f"cannot read config file {path}: {error}") from None
    known = {f.name: f for f in leaves(config_class)}
    settings = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if isinstance(value, dict) and name not in known:
            raise FastGPTError(f"{path} has a table [{key}]; settings are not grouped in tables: write each of its "
                               "keys at the top of the file, before any [table]")
        if name in ("preset", "config"):
            given = "with --config" if name == "config" else "by the trainer's --preset flag"
            raise FastGPTError(f"{path} sets {key!r}, which is not a setting but chooses a file of them: that is "
                               f"given {given}, on the command line")
        if name not in known:
            close = closest_setting(name, list(known))
            raise FastGPTError(f"unknown setting {key!r} in {path}" + (f"; did you mean {close!r}?" if close else ""))
        try:
            settings[name] = _from_toml(known[name], value)
        except TypeError as error:
            raise FastGPTError(f"setting {key!r} in {path} has a bad value {value!r} ({error})") from None
    return settings


def _as_settings(values):
    """{name: value} with lists (argparse's repeated flags, a checkpoint's saved settings) as the
    tuples that list settings hold."""
    return {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}


def parse_config(argv, config_class=TrainConfig, prog="python -m fastgpt.train",
                 description="Train a GPT on a text corpus.", presets=None, resumed_settings=None):
    """The settings from defaults, an optional preset (one of `presets`, {name: TOML file}), an optional
    TOML file and flags, checked by the class's validate(). `resumed_settings`, a function of those
    settings ({name: value}), returns those of the run that --resume continues, which lie over the
    preset's and under the file's and the flags' (a preset starts a run; a resumed run has started)."""
    parser = build_parser(config_class, prog, description, presets)
    namespace, unknown = parser.parse_known_args(argv)
    names = [f.name for f in leaves(config_class)]
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0]).split("=")[0]
        name = flag.lstrip("-").replace("-", "_")
        close = closest_setting(name, names)
        hint = f"; did you mean --{close.replace('_', '-')}?" if close else " (see --help for every setting)"
        raise FastGPTError(f"unknown setting {flag!r}{hint}")
    values = vars(namespace)
    preset, toml_file = values.pop("preset", None), values.pop("config", None)
    bundled = _read_toml(presets[preset], config_class) if preset else {}
    given = _read_toml(toml_file, config_class) if toml_file else {}
    given.update(_as_settings(values))
    recorded = _as_settings(resumed_settings({**bundled, **given})) if resumed_settings else {}
    config = from_flat_values(config_class, {**bundled, **recorded, **given})
    check_values(config)
    config.validate()
    return config
