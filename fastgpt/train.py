"""Train a GPT: `python -m fastgpt.train [--name value ...] [--config file.toml]`.

With no arguments it trains a small character-level model on the bundled Tiny Shakespeare and ends
with a sample. Everything it makes goes to out_dir: ckpt.pt (resumable with --resume), best.pt,
metrics.jsonl, loss.png, config.json and the token cache.

`torchrun --nproc_per_node=N -m fastgpt.train ...` trains data-parallel (see fastgpt.distributed):
batch_size is per process, so a step sees batch_size x N x grad_accum_steps sequences.

A resumed run continues as if it had never stopped: the checkpoint holds the data order (the batch
generator), dropout's random numbers, the optimizer and the step, which fixes the learning rate.
SIGINT or SIGTERM ends the run after the current step, with a checkpoint.
"""

import contextlib
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm import tqdm

from fastgpt import distributed, hf
from fastgpt.checkpoint import CheckpointFiles, atomic_write_text, load_checkpoint, model_config_of, model_entries
from fastgpt.cli import run_cli
from fastgpt.config import PRESETS, TrainConfig, parse_config
from fastgpt.bits_per_byte import bits_per_byte, token_byte_lengths
from fastgpt.data import TokenBlocks, corpus_files, encode_corpus, fit_tokenizer, text_digest
from fastgpt.device import pick_device, use_backend
from fastgpt.errors import FastGPTError
from fastgpt.hardware import choose_precision, startup_line
from fastgpt.lr_schedules import learning_rate_at
from fastgpt.memory_check import check_memory_room
from fastgpt.model import GPT, GPTConfig, without_unused_rope_base
from fastgpt.optim import build_optimizer
from fastgpt.pretrained import load_pretrained
from fastgpt.run_lock import RunLock
from fastgpt.sample import shown_on
from fastgpt.sinks import LossPlot, MetricsFile, ProgressBar
from fastgpt.stopping import StopRequests
from fastgpt.tensorboard_sink import TensorBoardSink
from fastgpt.tokenizers import tokenizer_from_state
from fastgpt.weight_average import WeightAverage


def requested_model_config(config, vocab_size):
    """The GPTConfig the settings ask for: their model settings with the tokenizer's vocabulary size,
    or with --init-from the pretrained model's (the settings choose only its dropout)."""
    if config.init_from:
        return dataclasses.replace(GPTConfig(**hf.read_config(config.init_from)), dropout=config.model.dropout)
    return dataclasses.replace(config.model, vocab_size=vocab_size)


def fixed_setting_differences(saved_settings, config, same_text=None):
    """The settings besides the model's that differ from a checkpoint's and that a run cannot change
    when it resumes: the corpus and its validation split (another would hold text already trained on,
    and the checkpoint's data order is over this one), the pretrained model it started from, the
    tokenizer's kind, what bpe is trained to, and the optimizer (its state). A checkpoint older than a
    setting had the setting's default.

    `same_text`: whether the corpus's text is the checkpoint's (text_digest), which then stands in for
    its path (a corpus may move); None for a checkpoint without a digest, whose path decides."""
    names = ["val_fraction", "init_from", "tokenizer", "optimizer"] + (
        ["vocab_size"] if config.tokenizer == "bpe" else [])
    names = ["data", *names] if same_text is None else names
    requested, defaults = config.to_dict(), TrainConfig().to_dict()
    saved = {name: saved_settings.get(name, defaults[name]) for name in names}
    for path in {"data", "init_from"} & set(names):  # an older checkpoint's may be relative to here, as may a flag's
        saved[path], requested[path] = absolute_path(saved[path]), absolute_path(requested[path])
    empty = {"data": "the bundled corpus", "init_from": "none"}  # what "" means

    def shown(name, value):
        return empty[name] if value == "" and name in empty else value
    return [f"{name} {shown(name, saved[name])} vs {shown(name, requested[name])}" for name in names
            if saved[name] != requested[name]]


def absolute_path(path):
    """--data or --init-from as an absolute path ("": the bundled corpus, no pretrained model), which is
    how checkpoints and config.json record them: --resume, eval and compare then find them from any
    working directory."""
    return os.path.abspath(path) if path else path


def resumed_run_settings(given):
    """With --resume among the settings `given`, those the run it continues was trained with (its newest
    checkpoint's), to lie over a preset's and under a config file's and the flags': `--resume` alone
    continues the run as it started, and a setting given changes it where a resumed run may
    (--max-iters, say) and is refused where it may not (the corpus, the model). The run stays in the
    out_dir it was found in, wherever it began."""
    if not given.get("resume"):
        return {}
    latest = CheckpointFiles(given.get("out_dir", TrainConfig().out_dir), keep_last=0).latest
    if not latest.is_file():
        return {}  # the trainer says that there is nothing to resume
    # The settings alone (the tensors stay on disk); a setting newer than the checkpoint has its default,
    # as the checks of what a resumed run may change assume, not a preset's.
    settings = without_unused_rope_base({**TrainConfig().to_dict(), **load_checkpoint(latest, mmap=True)["config"]})
    return {name: value for name, value in settings.items() if name != "out_dir"}


def resume_command(config, world):
    """The command that continues this run: its out_dir and --resume (the checkpoint holds the rest)."""
    out_dir = [] if config.out_dir == TrainConfig().out_dir else [f"--out-dir {shlex.quote(config.out_dir)}"]
    launcher = "torchrun <the same torchrun options> -m fastgpt.train" if world.is_distributed else "python -m fastgpt.train"
    return " ".join([launcher, *out_dir, "--resume"])


def say(message, file=sys.stdout):
    """Print a line without breaking the progress bar."""
    tqdm.write(message, file=file)


class Speed:
    """The seconds of training so far (`seconds_before` of them in earlier stretches of a resumed run),
    the tokens trained on (by all processes), and the tokens per second since the last `restart`."""

    def __init__(self, tokens_per_step, step, seconds_before=0.0):
        self.tokens_per_step = tokens_per_step
        self.since = time.perf_counter()
        self.start = self.since - seconds_before
        self.first_step = step

    def seconds(self):
        return time.perf_counter() - self.start

    def measure(self, step):
        now = time.perf_counter()
        return {"elapsed_s": now - self.start, "tokens": step * self.tokens_per_step,
                "tokens_per_sec": (step - self.first_step) * self.tokens_per_step / (now - self.since)}

    def restart(self, step):
        self.since, self.first_step = time.perf_counter(), step


class Trainer:
    """One training run: the data, the model, the optimizer and the loop that ties them together.

    `raw_model` is the GPT itself (its weights, checkpoints, sampling); `model` is what the forward
    passes of training and evaluation go through: the same GPT, compiled and wrapped for several
    processes where the settings ask for it (distributed.parallelize).
    """

    def __init__(self, config, lock):
        # --init-from's folder is read by a fresh run only: a resumed one keeps the path as its checkpoint
        # recorded it (an older checkpoint's may be relative to a directory this one is not run from).
        self.config = config = dataclasses.replace(
            config, data=absolute_path(config.data),
            init_from=config.init_from if config.resume else absolute_path(config.init_from))
        self.world, self.device = distributed.join(pick_device(config.device))
        self.backend = use_backend(config.backend, self.device)
        self.precision = choose_precision(config.dtype, self.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoints = CheckpointFiles(self.out_dir, config.keep_last)
        if self.world.is_main:
            lock.acquire()  # one run per directory: refused here, before anything in it changes
            self.checkpoints.prepare(config.resume)

        files = corpus_files(config.data)
        # Read whole once a run, and saved with its checkpoints: a resumed run trains on the same text.
        self.text_digest = text_digest(files)
        resumed = self._load_resumable() if config.resume else None
        pretrained = None
        if resumed:
            self.tokenizer = tokenizer_from_state(resumed["tokenizer"])
        elif config.init_from:
            pretrained, self.tokenizer = load_pretrained(config.init_from)
        else:
            # Rank 0 fits the tokenizer; the others wait for it, however long that takes.
            state = (fit_tokenizer(config.tokenizer, files, config.model.vocab_size, config.val_fraction).state_dict()
                     if self.world.is_main else None)
            self.tokenizer = tokenizer_from_state(distributed.from_main(state, self.world))
        torch.manual_seed(config.seed)
        # A resumed run's model is its checkpoint's (which _load_resumable has held to the settings), so
        # that a fine-tuning run resumes without the pretrained folder it started from.
        self.model_config = (dataclasses.replace(model_config_of(resumed), dropout=config.model.dropout) if resumed
                             else requested_model_config(config, self.tokenizer.vocab_size))
        check_memory_room(self.model_config, config.batch_size, config.optimizer, self.device,
                          shards=self.world.size if config.parallel == "fsdp" else 1)
        self.raw_model = GPT(self.model_config)
        if pretrained is not None:
            self.raw_model.load_state_dict(pretrained.state_dict())
        self.raw_model.to(self.device)
        # A pretrained model may have more positions (GPT-2: 1024) than the blocks it is fine-tuned on.
        block_size = min(config.model.block_size, self.model_config.block_size)
        self.blocks = TokenBlocks(self._token_cache(files), block_size, config.val_fraction)
        if self.world.is_main:
            self.checkpoints.check_room(self.raw_model)
        self.model = distributed.parallelize(self.raw_model, self.world, config.parallel, config.compile,
                                             getattr(torch, self.precision.dtype))
        self.optimizer = build_optimizer(self.raw_model, config, device_type=self.device.type,
                                         ns_dtype=self.precision.matmul_dtype)
        self.step = 0
        self.seconds_trained_before = 0.0
        self.best_val_loss = float("inf")
        # Losses of the steps since the last metrics record; saved, so a resumed run logs the same averages.
        self.unlogged_losses = []
        # Batches come from their own generator, so that the data order is reproducible and
        # resumable independently of dropout's random numbers.
        self.batch_generator = torch.Generator().manual_seed(config.seed)
        self.eval_starts = self._fixed_eval_starts()
        if resumed:
            self._restore(resumed)
        self.weight_average = self._start_weight_average(resumed)
        self.autocast = self.precision.autocast(self.device)
        # Bits per byte: losses compare across tokenizers once divided by the bytes the tokens spell.
        self.token_bytes = token_byte_lengths(self.tokenizer).to(self.device)
        self.stop = StopRequests()

    # -- before training ---------------------------------------------------------------------

    def _load_resumable(self):
        """The checkpoint to resume from, refused before any work if it was made for another model."""
        checkpoint = load_checkpoint(self.checkpoints.latest)
        saved_digest = checkpoint.get("text_digest")  # older checkpoints: the corpus's path decides
        same_text = None if saved_digest is None else saved_digest == self.text_digest
        if same_text is False:
            corpus = self.config.data or "the bundled corpus"
            raise FastGPTError(f"the text of {corpus} is not the text the checkpoint in {self.out_dir} trained on (it "
                               "has changed, or --data names another); a resumed run's batches and validation split "
                               "are over that text: give it back, or start a new run in another --out-dir")
        differences = fixed_setting_differences(checkpoint["config"], self.config, same_text)
        if not self.config.init_from:  # a fine-tuning run's model is the pretrained one, not the settings'
            requested = requested_model_config(self.config, tokenizer_from_state(checkpoint["tokenizer"]).vocab_size)
            differences += model_config_of(checkpoint).architecture_differences(requested)
        if differences:
            raise FastGPTError(f"the checkpoint in {self.out_dir} was made with another corpus, validation split, "
                               "vocabulary, model or optimizer "
                               f"(checkpoint vs requested: {', '.join(differences)}); "
                               "resume without them (the checkpoint holds the run's own) or use another --out-dir")
        if checkpoint["step"] >= self.config.max_iters:
            raise FastGPTError(f"the checkpoint in {self.out_dir} is at step {checkpoint['step']}, so --max-iters "
                               f"{self.config.max_iters} leaves nothing to train; raise --max-iters to train on")
        return checkpoint

    def _token_cache(self, files):
        """The corpus's tokens; one process per machine encodes them, the others then read its cache."""
        cache = self.out_dir / "cache"
        if self.world.local_rank == 0:
            tokens = encode_corpus(files, self.tokenizer, cache)
        distributed.barrier(self.world)
        return tokens if self.world.local_rank == 0 else encode_corpus(files, self.tokenizer, cache, progress=False)

    @property
    def _global_batch(self):
        """Sequences in one batch of all processes together."""
        return self.config.batch_size * self.world.size

    def _own_share(self, global_starts):
        """This process's slice of the starts of one global batch."""
        size, rank = self.config.batch_size, self.world.rank
        return global_starts[rank * size:(rank + 1) * size]

    def _starts(self, split, generator):
        """This process's share of one global batch of block starts.

        Every process draws the whole global batch (batch_size x processes) from the same generator
        and keeps its own slice, so N processes see exactly the blocks one process with an N times
        larger batch would see, and the generator's state is the same everywhere (and in the checkpoint).
        """
        return self._own_share(self.blocks.starts(split, self._global_batch, generator))

    def _fixed_eval_starts(self):
        """The evaluation blocks: eval_iters global batches spread evenly over each split, the same at
        every evaluation and for every seed, so that losses compare across steps and runs."""
        batches = self.config.eval_iters
        return {split: [self._own_share(batch)
                        for batch in self.blocks.spread_starts(split, batches * self._global_batch).view(batches, -1)]
                for split in ("train", "val")}

    def _restore(self, checkpoint):
        # With a weight average, "model" is the average and "trained_model" the weights being trained.
        trained = checkpoint.get("trained_model", checkpoint["model"])
        distributed.load_full_state(self.raw_model, self.optimizer.parts, trained, checkpoint["optimizer"])
        self.step = checkpoint["step"]
        self.seconds_trained_before = checkpoint.get("elapsed_s", 0.0)  # older checkpoints: the clock restarts
        self.best_val_loss = checkpoint["best_val_loss"]
        self.unlogged_losses = list(checkpoint["unlogged_losses"])
        self.batch_generator.set_state(checkpoint["rng"]["batches"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)

    def _start_weight_average(self, resumed):
        """The average of the weights when the settings keep one: the checkpoint's when it has one,
        else starting from the weights as they are."""
        if not self.config.weight_average:
            return None
        average = WeightAverage(self.raw_model, self.config.weight_average)
        if resumed and "trained_model" in resumed:
            with average.swapped_in():
                distributed.load_full_model_state(self.raw_model, resumed["model"])
        return average

    def model_as_saved(self):
        """Within this block the model holds the weights a checkpoint saves as the model, which are
        evaluated and sampled: the average where one is kept, else the weights being trained."""
        return self.weight_average.swapped_in() if self.weight_average else contextlib.nullcontext()

    # -- the three things a step may do: train, evaluate, save -------------------------------

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches.

        Its phases are labelled "forward", "backward" and "optimizer" for torch.profiler
        (benchmarks/profile_step.py reads them).

        Returns the loss (mean over micro-batches and processes), the learning rate, and whether
        any process has been asked to stop by now: the processes agree on that here, in the same
        all-reduce as the loss, so that all of them stop after the same step.
        """
        config = self.config
        lr = learning_rate_at(self.step, config)
        # The schedule scales every part's rate alike (AdamW's and Muon's).
        self.optimizer.set_lr_multiplier(lr / config.learning_rate if config.learning_rate > 0 else 0.0)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro_step in range(config.grad_accum_steps):
            x, y = self.blocks.batch("train", self._starts("train", self.batch_generator), self.device)
            with distributed.gradient_sync(self.model, self.raw_model, micro_step == config.grad_accum_steps - 1):
                with record_function("forward"), self.autocast:
                    _, loss = self.model(x, y)
                with record_function("backward"):
                    (loss / config.grad_accum_steps).backward()
            total += loss.detach().double()
        stop_requested = torch.tensor(float(self.stop.signal is not None), dtype=torch.float64, device=self.device)
        shared = distributed.sum_across(torch.stack([total, stop_requested]), self.world)
        loss = shared[0].item() / (self.world.size * config.grad_accum_steps)
        if math.isfinite(loss):
            with record_function("optimizer"):
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), config.grad_clip)
                self.optimizer.step()
                if self.weight_average:
                    self.weight_average.update()
        elif not config.skip_nonfinite:
            last = (f"the last checkpoint, {self.checkpoints.latest}, is untouched" if self.checkpoints.latest.exists()
                    else "no checkpoint was written yet")
            raise FastGPTError(f"the loss became {loss} at step {self.step + 1} ({last}); lower --learning-rate or "
                               "--grad-clip, or pass --skip-nonfinite to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, lr, shared[1].item() > 0

    @torch.no_grad()
    def evaluate(self):
        """{split: (mean loss, bits per byte)} over the fixed evaluation blocks of each split (each
        process takes its slice)."""
        self.model.eval()
        splits = list(self.eval_starts)
        nats = torch.zeros(len(splits), dtype=torch.float64, device=self.device)
        text_bytes = torch.zeros(len(splits), dtype=torch.float64, device=self.device)
        tokens = torch.zeros(len(splits), dtype=torch.float64, device=self.device)
        for index, split in enumerate(splits):
            for starts in self.eval_starts[split]:
                x, y = self.blocks.batch(split, starts, self.device)
                with self.autocast:
                    _, loss = self.model(x, y)
                nats[index] += loss.double() * y.numel()
                tokens[index] += y.numel()
                text_bytes[index] += self.token_bytes[y].sum()
        self.model.train()
        nats, text_bytes, tokens = distributed.sum_across(torch.stack([nats, text_bytes, tokens]), self.world).tolist()
        return {split: (nats[i] / tokens[i], bits_per_byte(nats[i], text_bytes[i])) for i, split in enumerate(splits)}

    def save(self, is_best=False):
        """Write a checkpoint (rank 0; under FSDP every process must call this, to gather the shards)."""
        trained_state, optimizer_state = distributed.full_state(self.raw_model, self.optimizer.parts)
        model_state = trained_state
        if self.weight_average:
            with self.weight_average.swapped_in():
                # Copies: in one process the state's tensors are the parameters themselves.
                model_state = {name: t.clone() for name, t in distributed.full_model_state(self.raw_model).items()}
        if not self.world.is_main:
            return
        self.checkpoints.save({
            **model_entries(self.model_config, model_state, self.tokenizer),
            **({"trained_model": trained_state} if self.weight_average else {}),
            "optimizer": optimizer_state,
            "config": self.config.to_dict(),
            "step": self.step,
            "text_digest": self.text_digest,
            "elapsed_s": self.speed.seconds(),
            "best_val_loss": self.best_val_loss,
            "unlogged_losses": self.unlogged_losses,
            # Every process shares these streams, so rank 0's state stands for all of them.
            "rng": {
                "batches": self.batch_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }, self.step, is_best)

    # -- the loop ----------------------------------------------------------------------------

    def sinks(self):
        """Where metrics records go (rank 0 only): metrics.jsonl, the progress bar, loss.png, and those
        that --log adds."""
        if not self.world.is_main:
            return []
        resumed_step = self.step if self.config.resume else None
        metrics = MetricsFile(self.out_dir / "metrics.jsonl", resumed_step)
        extra = [TensorBoardSink(self.out_dir, resumed_step)] if "tensorboard" in self.config.log else []
        return [metrics, ProgressBar(self.config.max_iters, self.step),
                LossPlot(self.out_dir / "loss.png", metrics.history), *extra]

    def run(self):
        """Train to max_iters, or until a signal asks to stop; returns the outcome (see `train`)."""
        config = self.config
        self._announce()
        sinks = self.sinks()
        # A resumed run's clock goes on from its checkpoint's: elapsed_s is the training time so far.
        self.speed = speed = Speed(self._global_batch * self.blocks.block_size * config.grad_accum_steps, self.step,
                                   seconds_before=self.seconds_trained_before)
        stopped_by = None
        try:
            with self.stop.installed():
                while self.step < config.max_iters and stopped_by is None:
                    loss, lr, stop_now = self.train_step()
                    if stop_now:
                        stopped_by = self.stop.signal or signal.SIGTERM  # another process got the signal
                    if math.isfinite(loss):
                        self.unlogged_losses.append(loss)
                    elif self.world.is_main:
                        say(f"fastgpt: warning: skipped step {self.step}: the loss was {loss}", file=sys.stderr)
                    evaluate_now = self.step % config.eval_interval == 0 or self.step == config.max_iters
                    if self.step % config.log_interval == 0 or evaluate_now:
                        record = {"step": self.step, "lr": lr, **speed.measure(self.step),
                                  "train_loss": self._mean_unlogged_loss()}
                        is_best = evaluate_now and self._add_evaluation(record)
                        for sink in sinks:
                            sink.log(record)
                        if evaluate_now:  # after the record: a checkpoint never runs ahead of metrics.jsonl
                            self.save(is_best)
                        speed.restart(self.step)
                    if stopped_by is not None and not evaluate_now:
                        self.save()
        finally:
            for sink in sinks:
                sink.close()
        elapsed = speed.measure(self.step)["elapsed_s"]
        self._farewell(stopped_by, elapsed)
        if stopped_by is None and config.sample_tokens:
            with self.model_as_saved():
                self.print_sample(config.sample_tokens)
        return {"best_val_loss": self.best_val_loss, "elapsed_s": elapsed, "step": self.step, "stopped_by": stopped_by}

    def settings_used(self):
        """The settings as the run follows them (config.json): those given, except where the run
        trains something else. The model is --init-from's when there is one, its vocabulary is the
        tokenizer's (a char tokenizer's, or a bpe one that ran out of merges), its blocks are no
        longer than its positions, and its tokenizer is the checkpoint's with --init-from."""
        return {**self.config.to_dict(), **dataclasses.asdict(self.model_config),
                "block_size": self.blocks.block_size, "tokenizer": self.tokenizer.kind}

    def _announce(self):
        """config.json, and a line on what is about to be trained (rank 0)."""
        if not self.world.is_main:
            return
        config, used = self.config, self.settings_used()
        # Whole or not at all: compare and eval may read it while this run starts.
        atomic_write_text(self.out_dir / "config.json", json.dumps(used, indent=2) + "\n")
        say(f"fastgpt: {self.raw_model.num_parameters() / 1e6:.2f}M parameters, {self.tokenizer.kind} tokenizer "
            f"({self.tokenizer.vocab_size} tokens), {self.blocks.size('train'):,} training tokens, "
            f"device {self.device}, kernels: {self.backend}"
            + (f", {self.world.size} processes ({config.parallel})" if self.world.is_distributed else ""),
            file=sys.stderr)
        say(startup_line(self.device, self.precision, self.backend), file=sys.stderr)
        if config.warmup_iters >= config.max_iters:
            say(f"fastgpt: --warmup-iters {config.warmup_iters} is not less than --max-iters {config.max_iters}, so "
                "the learning rate never reaches its peak and never decays", file=sys.stderr)
        if config.tokenizer == "bpe" and not config.init_from and self.tokenizer.vocab_size < config.model.vocab_size:
            say(f"fastgpt: the corpus has no more pairs to merge after {self.tokenizer.vocab_size} bpe tokens, so the "
                f"vocabulary is that, not --vocab-size {config.model.vocab_size}", file=sys.stderr)
        if config.init_from and not config.resume:  # a resumed run does not read --init-from's folder
            self._say_what_init_from_overrides(used)
        if self.blocks.block_size < config.model.block_size:
            say(f"fastgpt: the model has {self.model_config.block_size} positions, so it trains on blocks of that many "
                f"tokens, not --block-size {config.model.block_size}", file=sys.stderr)
        if self.precision.warning:
            say(self.precision.warning, file=sys.stderr)

    def _say_what_init_from_overrides(self, used):
        """Name the model and tokenizer settings, other than the defaults, that --init-from's model
        replaces (`used`: the settings as the run follows them). They may have come from flags, a config
        file or a preset, so they are named as settings."""
        given, defaults = self.config.to_dict(), TrainConfig().to_dict()
        names = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("block_size", "dropout")]
        replaced = [f"{name} {given[name]}" for name in [*names, "tokenizer"]
                    if given[name] != defaults[name] and given[name] != used[name]]
        if replaced:
            say(f"fastgpt: --init-from {self.config.init_from} brings its own model and tokenizer, so these "
                f"settings do not apply: {', '.join(replaced)}", file=sys.stderr)

    def _farewell(self, stopped_by, elapsed):
        """How the run ended, and for a stopped one, how to continue it (rank 0)."""
        if not self.world.is_main:
            return
        if stopped_by is not None:
            say(f"fastgpt: stopped by {stopped_by.name} after step {self.step}; checkpoint {self.checkpoints.latest}; "
                f"continue with:\n  {resume_command(self.config, self.world)}", file=sys.stderr)
        else:
            say(f"fastgpt: done in {elapsed:.0f} s; best val loss {self.best_val_loss:.4f}; "
                f"checkpoint {self.checkpoints.latest}", file=sys.stderr)

    def _mean_unlogged_loss(self):
        """The mean train loss of the steps since the last record (NaN, valid in Python's JSON, when
        every one of them was skipped); they count as logged from now on."""
        losses, self.unlogged_losses = self.unlogged_losses, []
        return sum(losses) / len(losses) if losses else float("nan")

    def _add_evaluation(self, record):
        """Evaluate, add the validation loss to the record, and say whether it is the best so far."""
        with self.model_as_saved():
            losses = self.evaluate()
        (train_loss, train_bpb), (val_loss, val_bpb) = (losses[split] for split in ("train", "val"))
        record.update(val_loss=val_loss, val_bpb=val_bpb, train_bpb=train_bpb)
        if self.world.is_main:
            say(f"step {self.step}: train loss {train_loss:.4f} ({train_bpb:.3f} bits/byte), "
                f"val loss {val_loss:.4f} ({val_bpb:.3f} bits/byte)")
        is_best = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        return is_best

    def print_sample(self, n_tokens):
        # Every process generates (under FSDP each forward gathers the shards); rank 0 prints.
        self.raw_model.eval()
        prompt = torch.tensor([self.tokenizer.encode(self.tokenizer.start_text())[:1]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        pieces = [self.tokenizer.decode(token[0].tolist())
                  for token in self.raw_model.generate(prompt, n_tokens, temperature=0.8, top_k=200, generator=generator)]
        if self.world.is_main:
            print("-" * 40 + " sample " + "-" * 40)
            print(shown_on(sys.stdout)("".join(pieces)))


def train(config):
    """Train with a TrainConfig; returns the best validation loss, the time taken, the last step and
    the signal that stopped the run early (None if it ran to max_iters)."""
    lock = RunLock(config.out_dir)
    try:
        return Trainer(config, lock).run()
    finally:
        lock.release()
        distributed.leave()


def main(argv=None):
    """The command line; exits 0 when done, 128 + the signal's number when stopped by SIGINT/SIGTERM."""
    outcome = {}

    def command():
        outcome.update(train(parse_config(sys.argv[1:] if argv is None else argv, presets=PRESETS,
                                          resumed_settings=resumed_run_settings)))
    status = run_cli(command)
    if status == 0 and outcome.get("stopped_by"):
        return 128 + outcome["stopped_by"]
    return status


if __name__ == "__main__":
    sys.exit(main())
