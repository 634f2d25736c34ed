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

import dataclasses
import json
import math
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from fastgpt import distributed, ops
from fastgpt.checkpoint import (CheckpointFiles, atomic_write, load_checkpoint, remove_stale_temporaries)
from fastgpt.cli import run_cli
from fastgpt.config import TrainConfig, parse_config
from fastgpt.data import TokenBlocks, corpus_files, encode_corpus, fit_tokenizer
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, GPTConfig
from fastgpt.plots import plot_losses
from fastgpt.pretrained import load_pretrained, read_config
from fastgpt.tokenizers import tokenizer_from_state


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FastGPTError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastGPTError(f"--device {name} was asked for but this machine has no usable CUDA GPU; "
                           "use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise FastGPTError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise FastGPTError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast_context(config, device):
    """bf16 autocast on CUDA by default (fp32 weights and optimizer state); fp32 on CPU."""
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def learning_rate_at(step, config):
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    if step < config.warmup_iters:
        return config.learning_rate * (step + 1) / (config.warmup_iters + 1)
    progress = (step - config.warmup_iters) / max(1, config.max_iters - config.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr + cosine * (config.learning_rate - config.min_lr)


def model_config_for(config, vocab_size):
    return GPTConfig(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                     n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout,
                     bias=config.bias, backend=config.backend)


def shape_differences(saved, requested):
    """The settings that fix the vocabulary or the model's shape and differ: ["n_embd 16 vs 32", ...]."""
    names = ["tokenizer", "n_layer", "n_head", "n_embd", "block_size", "bias"]
    if requested.tokenizer == "bpe":
        names.append("vocab_size")
    return [f"{name} {saved[name]} vs {getattr(requested, name)}" for name in names
            if saved[name] != getattr(requested, name)]


def resume_command(config, world):
    """The command that continues this run: the settings that differ from their defaults, plus --resume."""
    defaults = TrainConfig()
    flags = [f"--{name.replace('_', '-')} {shlex.quote(str(value))}" for name, value in config.to_dict().items()
             if name != "resume" and value != getattr(defaults, name)]
    launcher = "torchrun <the same torchrun options> -m fastgpt.train" if world.is_distributed else "python -m fastgpt.train"
    return " ".join([launcher, *flags, "--resume"])


class StopRequests:
    """Turns SIGINT and SIGTERM into a request to stop after the current step.

    The first signal only sets `signal`; the loop then saves a checkpoint and ends. The handlers are
    put back at once, so a second Ctrl-C interrupts immediately (the previous checkpoint stays whole).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self._previous = {}

    def _request(self, signum, frame):
        self.signal = signal.Signals(signum)
        self._restore()

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextmanager
    def installed(self):
        """The handlers, for the duration of a with block."""
        # Python lets only the main thread set handlers; elsewhere (a notebook's worker thread) the
        # run simply keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in self.SIGNALS}
        try:
            yield self
        finally:
            self._restore()


class Trainer:
    """One training run: the data, the model, the optimizer and the loop that ties them together."""

    def __init__(self, config):
        self.config = config
        self.world, self.device = distributed.join(pick_device(config.device))
        self.out_dir = Path(config.out_dir)
        self.checkpoints = CheckpointFiles(self.out_dir, config.keep_last)
        if self.world.is_main:
            self._prepare_out_dir()
        self.backend = ops.resolve_backend(config.backend, self.device)

        resumed = self._load_resumable() if config.resume else None
        files = corpus_files(config.data)
        self.pretrained = None
        if resumed:
            self.tokenizer = tokenizer_from_state(resumed["tokenizer"])
        elif config.init_from:
            self.pretrained, self.tokenizer = load_pretrained(config.init_from, config.backend)
        else:
            state = fit_tokenizer(config.tokenizer, files, config.vocab_size).state_dict() if self.world.is_main else None
            self.tokenizer = tokenizer_from_state(distributed.from_main(state, self.world))
        torch.manual_seed(config.seed)
        self.model_config, self.model = self._build_model()
        # A pretrained model may have more positions (GPT-2: 1024) than the blocks it is fine-tuned on.
        block_size = min(config.block_size, self.model_config.block_size)
        self.blocks = TokenBlocks(self._token_cache(files), block_size, config.val_fraction)
        if self.world.is_main:
            self._check_room_for_checkpoint()
        self.parallel_model = distributed.parallelize(self.model, self.world, config.parallel)
        self.optimizer = self.model.configure_optimizer(
            config.learning_rate, config.weight_decay, (config.beta1, config.beta2), self.device.type)
        self.step = 0
        self.best_val_loss = float("inf")
        # Losses of the steps since the last metrics line; saved, so a resumed run logs the same averages.
        self.unlogged_losses = []
        # Batches come from their own generator, so that the data order is reproducible and
        # resumable independently of dropout's random numbers.
        self.batch_generator = torch.Generator().manual_seed(config.seed)
        self.eval_starts = self._fixed_eval_starts()
        if resumed:
            self._restore(resumed)
        # Evaluation calls the model directly: no DDP hooks, and under FSDP the model is sharded in place.
        self.eval_model = torch.compile(self.model) if config.compile else self.model
        self.train_model = self.eval_model if self.parallel_model is self.model else self.parallel_model
        self.autocast = autocast_context(config, self.device)
        self.stop = StopRequests()

    def _build_model(self):
        """The model config and the model on the device: freshly initialised, or GPT-2's weights."""
        if self.config.init_from:
            # Fine-tuning: the shape comes from the pretrained checkpoint, not from n_layer/n_embd/...
            model_config = dataclasses.replace(read_config(self.config.init_from), dropout=self.config.dropout,
                                               backend=self.config.backend)
        else:
            model_config = model_config_for(self.config, self.tokenizer.vocab_size)
        model = GPT(model_config)
        if self.pretrained is not None:
            model.load_state_dict(self.pretrained.state_dict())
            self.pretrained = None  # the weights now live in the model
        return model_config, model.to(self.device)

    def _prepare_out_dir(self):
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise FastGPTError(f"cannot write to the output directory {self.out_dir} ({error.strerror}); "
                               "choose another --out-dir") from None
        if self.checkpoints.latest.exists() and not self.config.resume:
            raise FastGPTError(f"{self.checkpoints.latest} holds an earlier run; continue it with --resume, "
                               "or start afresh in another --out-dir (or delete it)")
        remove_stale_temporaries(self.out_dir)

    def _load_resumable(self):
        """The checkpoint to resume from, refused before any work if it was made for another model."""
        checkpoint = load_checkpoint(self.checkpoints.latest)
        differences = shape_differences(checkpoint["config"], self.config)
        if differences:
            raise FastGPTError(f"the checkpoint in {self.out_dir} was made with another vocabulary or model shape "
                               f"(checkpoint vs requested: {', '.join(differences)}); "
                               "resume with the same settings or use another --out-dir")
        return checkpoint

    def _token_cache(self, files):
        """The corpus's tokens; one process per machine encodes them, the others then read its cache."""
        cache = self.out_dir / "cache"
        if self.world.local_rank == 0:
            tokens = encode_corpus(files, self.tokenizer, cache)
        distributed.barrier(self.world)
        return tokens if self.world.local_rank == 0 else encode_corpus(files, self.tokenizer, cache)

    def _check_room_for_checkpoint(self):
        # The weights and AdamW's two moments, all fp32, plus room for the rest of the payload.
        needed = 3 * sum(p.numel() * 4 for p in self.model.parameters()) + (1 << 20)
        free = shutil.disk_usage(self.out_dir).free
        if free < needed:
            raise FastGPTError(f"the output directory {self.out_dir} has {free / 1e6:.1f} MB free but a checkpoint "
                               f"needs about {needed / 1e6:.1f} MB; free some space or choose another --out-dir")

    def _starts(self, split, generator):
        """This process's share of one global batch of block starts.

        Every process draws the whole global batch (batch_size x processes) from the same generator
        and keeps its own slice, so N processes see exactly the blocks one process with an N times
        larger batch would see, and the generator's state is the same everywhere (and in the checkpoint).
        """
        size, rank = self.config.batch_size, self.world.rank
        return self.blocks.starts(split, size * self.world.size, generator)[rank * size:(rank + 1) * size]

    def _fixed_eval_starts(self):
        """The same evaluation blocks at every evaluation, so losses are comparable across steps."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        return {split: [self._starts(split, generator) for _ in range(self.config.eval_iters)]
                for split in ("train", "val")}

    def _restore(self, checkpoint):
        distributed.load_full_state(self.model, self.optimizer, checkpoint["model"], checkpoint["optimizer"])
        self.step = checkpoint["step"]
        self.best_val_loss = checkpoint["best_val_loss"]
        self.unlogged_losses = list(checkpoint["unlogged_losses"])
        self.batch_generator.set_state(checkpoint["rng"]["batches"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)

    def save(self, is_best=False):
        """Write a checkpoint (rank 0; under FSDP every process must call this, to gather the shards)."""
        model_state, optimizer_state = distributed.full_state(self.model, self.optimizer)
        if not self.world.is_main:
            return
        self.checkpoints.save({
            "model": model_state,
            "optimizer": optimizer_state,
            "model_config": self.model_config.to_dict(),
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "unlogged_losses": self.unlogged_losses,
            # Every process shares these streams, so rank 0's state stands for all of them.
            "rng": {
                "batches": self.batch_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        }, self.step, is_best)

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the fixed evaluation blocks of each split (each process takes its slice)."""
        self.model.eval()
        splits = list(self.eval_starts)
        totals = torch.zeros(len(splits), dtype=torch.float64, device=self.device)
        for index, split in enumerate(splits):
            for starts in self.eval_starts[split]:
                x, y = self.blocks.batch(split, starts, self.device)
                with self.autocast:
                    _, loss = self.eval_model(x, y)
                totals[index] += loss.double()
        self.model.train()
        means = distributed.sum_across(totals, self.world) / (self.world.size * self.config.eval_iters)
        return dict(zip(splits, means.tolist()))

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches.

        Returns the loss (mean over micro-batches and processes), the learning rate, and whether
        any process has been asked to stop by now: the processes agree on that here, in the same
        all-reduce as the loss, so that all of them stop after the same step.
        """
        config = self.config
        lr = learning_rate_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro_step in range(config.grad_accum_steps):
            x, y = self.blocks.batch("train", self._starts("train", self.batch_generator), self.device)
            with distributed.gradient_sync(self.parallel_model, micro_step == config.grad_accum_steps - 1):
                with self.autocast:
                    _, loss = self.train_model(x, y)
                (loss / config.grad_accum_steps).backward()
            total += loss.detach().double()
        stop_requested = torch.tensor(float(self.stop.signal is not None), dtype=torch.float64, device=self.device)
        shared = distributed.sum_across(torch.stack([total, stop_requested]), self.world)
        loss = shared[0].item() / (self.world.size * config.grad_accum_steps)
        if math.isfinite(loss):
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
        elif not config.skip_nonfinite:
            last = (f"the last checkpoint, {self.checkpoints.latest}, is untouched" if self.checkpoints.latest.exists()
                    else "no checkpoint was written yet")
            raise FastGPTError(f"the loss became {loss} at step {self.step + 1} ({last}); lower --learning-rate or "
                               "--grad-clip, or pass --skip-nonfinite to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, lr, shared[1].item() > 0

    def run(self):
        config = self.config
        main = self.world.is_main
        history = []
        if main:
            (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            history = self._metrics_up_to_step(self.out_dir / "metrics.jsonl")
        tokens_per_step = config.batch_size * config.block_size * config.grad_accum_steps * self.world.size
        if main:
            print(f"fastgpt: {self.model.num_parameters() / 1e6:.2f}M parameters, {self.tokenizer.kind} tokenizer "
                  f"({self.tokenizer.vocab_size} tokens), {self.blocks.size('train'):,} training tokens, "
                  f"device {self.device}, kernels: {self.backend}"
                  + (f", {self.world.size} processes ({config.parallel})" if self.world.is_distributed else ""),
                  file=sys.stderr)
        start_time = time.perf_counter()
        interval_start, interval_first_step = start_time, self.step
        stopped_by = None
        with self.stop.installed(), tqdm(total=config.max_iters, initial=self.step, desc="training", unit="step",
                                         dynamic_ncols=True, disable=not main) as bar:
            while self.step < config.max_iters and stopped_by is None:
                loss, lr, stop_now = self.train_step()
                if stop_now:
                    stopped_by = self.stop.signal or signal.SIGTERM  # another process got the signal
                if math.isfinite(loss):
                    self.unlogged_losses.append(loss)
                else:
                    bar.write(f"fastgpt: warning: skipped step {self.step}: the loss was {loss}", file=sys.stderr)
                bar.update(1)
                evaluate_now = self.step % config.eval_interval == 0 or self.step == config.max_iters
                if self.step % config.log_interval == 0 or evaluate_now:
                    now = time.perf_counter()
                    record = {"step": self.step, "lr": lr, "elapsed_s": now - start_time,
                              "tokens_per_sec": (self.step - interval_first_step) * tokens_per_step
                              / (now - interval_start)}
                    self._log(record, evaluate_now, history, bar)
                    interval_start, interval_first_step = time.perf_counter(), self.step
                if stopped_by is not None and not evaluate_now:
                    self.save()
        elapsed = time.perf_counter() - start_time
        if stopped_by is not None:
            if main:
                print(f"fastgpt: stopped by {stopped_by.name} after step {self.step}; checkpoint "
                      f"{self.checkpoints.latest}; continue with:\n  {resume_command(config, self.world)}",
                      file=sys.stderr)
            return {"best_val_loss": self.best_val_loss, "elapsed_s": elapsed, "step": self.step,
                    "stopped_by": stopped_by}
        if main:
            print(f"fastgpt: done in {elapsed:.0f} s; best val loss {self.best_val_loss:.4f}; "
                  f"checkpoint {self.checkpoints.latest}", file=sys.stderr)
        if config.sample_tokens:
            self.print_sample(config.sample_tokens)
        return {"best_val_loss": self.best_val_loss, "elapsed_s": elapsed, "step": self.step, "stopped_by": None}

    def _log(self, record, evaluate, history, bar):
        """Complete a metrics line (the mean train loss since the last one; the losses when evaluating),
        append it, and at evaluations save a checkpoint and redraw the plot."""
        losses = self.unlogged_losses
        # NaN (valid in Python's JSON) when every step since the last line was skipped.
        record["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
        self.unlogged_losses = []
        is_best = False
        if evaluate:
            evaluated = self.evaluate()
            record["val_loss"] = evaluated["val"]
            is_best = evaluated["val"] < self.best_val_loss
            self.best_val_loss = min(self.best_val_loss, evaluated["val"])
            bar.write(f"step {self.step}: train loss {evaluated['train']:.4f}, val loss {evaluated['val']:.4f}")
        if self.world.is_main:
            history.append(record)
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.1e}",
                            tok_s=f"{record['tokens_per_sec']:,.0f}")
        if evaluate:
            self.save(is_best)
            if self.world.is_main:
                plot_losses(history, self.out_dir / "loss.png")

    def _metrics_up_to_step(self, path):
        """The metrics lines of steps up to the current one; later lines, from after the checkpoint
        being resumed, are dropped from the file, since this run is about to log those steps again."""
        if not self.config.resume or not path.exists():
            path.write_text("")
            return []
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        history = [record for record in history if record["step"] <= self.step]
        atomic_write(path, lambda handle: handle.write("".join(json.dumps(r) + "\n" for r in history).encode()))
        return history

    def print_sample(self, n_tokens):
        # Every process generates (under FSDP each forward gathers the shards); rank 0 prints.
        self.model.eval()
        prompt = torch.tensor([[self.tokenizer.encode("\n")[0]]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        pieces = [self.tokenizer.decode(token[0].tolist())
                  for token in self.model.generate(prompt, n_tokens, temperature=0.8, top_k=200, generator=generator)]
        if self.world.is_main:
            print("-" * 40 + " sample " + "-" * 40)
            print("".join(pieces))


def train(config):
    """Train with a TrainConfig; returns the best validation loss, the time taken, the last step and
    the signal that stopped the run early (None if it ran to max_iters)."""
    try:
        return Trainer(config).run()
    finally:
        distributed.leave()


def main(argv=None):
    """The command line; exits 0 when done, 128 + the signal's number when stopped by SIGINT/SIGTERM."""
    outcome = {}

    def command():
        config, _ = parse_config(sys.argv[1:] if argv is None else argv)
        outcome.update(train(config))
    status = run_cli(command)
    if status == 0 and outcome.get("stopped_by"):
        return 128 + outcome["stopped_by"]
    return status


if __name__ == "__main__":
    sys.exit(main())
