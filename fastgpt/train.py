"""Train a GPT: `python -m fastgpt.train [--name value ...] [--config file.toml]`.

With no arguments it trains a small character-level model on the bundled Tiny Shakespeare and ends
with a sample. Everything it makes goes to out_dir: ckpt.pt (resumable with --resume), metrics.jsonl,
loss.png, config.json and the token cache.
"""

import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from fastgpt import ops
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import run_cli
from fastgpt.config import TrainConfig, parse_config
from fastgpt.data import TokenBlocks, corpus_files, encode_corpus, fit_tokenizer
from fastgpt.errors import FastGPTError
from fastgpt.model import GPT, GPTConfig
from fastgpt.plots import plot_losses
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


class Trainer:
    """One training run: the data, the model, the optimizer and the loop that ties them together."""

    def __init__(self, config):
        self.config = config
        self.device = pick_device(config.device)
        self.out_dir = Path(config.out_dir)
        self.checkpoint_path = self.out_dir / "ckpt.pt"
        self._prepare_out_dir()
        self.backend = ops.resolve_backend(config.backend, self.device)

        resumed = load_checkpoint(self.checkpoint_path) if config.resume else None
        files = corpus_files(config.data)
        if resumed:
            self.tokenizer = tokenizer_from_state(resumed["tokenizer"])
        else:
            self.tokenizer = fit_tokenizer(config.tokenizer, files, config.vocab_size)
        tokens = encode_corpus(files, self.tokenizer, self.out_dir / "cache")
        self.blocks = TokenBlocks(tokens, config.block_size, config.val_fraction)

        torch.manual_seed(config.seed)
        self.model_config = model_config_for(config, self.tokenizer.vocab_size)
        self.model = GPT(self.model_config).to(self.device)
        self.optimizer = self.model.configure_optimizer(
            config.learning_rate, config.weight_decay, (config.beta1, config.beta2), self.device.type)
        self.step = 0
        self.best_val_loss = float("inf")
        # Batches come from their own generator, so that the data order is reproducible and
        # resumable independently of dropout's random numbers.
        self.batch_generator = torch.Generator().manual_seed(config.seed)
        self.eval_starts = self._fixed_eval_starts()
        if resumed:
            self._restore(resumed)
        self.forward_model = torch.compile(self.model) if config.compile else self.model
        self.autocast = autocast_context(config, self.device)

    def _prepare_out_dir(self):
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise FastGPTError(f"cannot write to the output directory {self.out_dir} ({error.strerror}); "
                               "choose another --out-dir") from None
        if self.checkpoint_path.exists() and not self.config.resume:
            raise FastGPTError(f"{self.checkpoint_path} holds an earlier run; continue it with --resume, "
                               "or start afresh in another --out-dir (or delete it)")

    def _fixed_eval_starts(self):
        """The same evaluation blocks at every evaluation, so losses are comparable across steps."""
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        return {split: [self.blocks.starts(split, self.config.batch_size, generator)
                        for _ in range(self.config.eval_iters)] for split in ("train", "val")}

    def _restore(self, checkpoint):
        saved = GPTConfig(**checkpoint["model_config"])
        differences = [f"{name} {getattr(saved, name)} vs {getattr(self.model_config, name)}"
                       for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
                       if getattr(saved, name) != getattr(self.model_config, name)]
        if differences:
            raise FastGPTError(f"the checkpoint in {self.out_dir} was made with another model shape "
                               f"(checkpoint vs requested: {', '.join(differences)}); "
                               "resume with the same settings or use another --out-dir")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step = checkpoint["step"]
        self.best_val_loss = checkpoint["best_val_loss"]
        self.batch_generator.set_state(checkpoint["rng"]["batches"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], self.device)

    def save(self):
        save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "model_config": self.model_config.to_dict(),
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "rng": {
                "batches": self.batch_generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            },
        })

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the fixed evaluation blocks of each split."""
        self.model.eval()
        losses = {}
        for split, all_starts in self.eval_starts.items():
            total = 0.0
            for starts in all_starts:
                x, y = self.blocks.batch(split, starts, self.device)
                with self.autocast:
                    _, loss = self.forward_model(x, y)
                total += loss.item()
            losses[split] = total / len(all_starts)
        self.model.train()
        return losses

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches; returns the mean micro-batch loss."""
        config = self.config
        lr = learning_rate_at(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(config.grad_accum_steps):
            x, y = self.blocks.batch("train", self.blocks.starts("train", config.batch_size, self.batch_generator),
                                     self.device)
            with self.autocast:
                _, loss = self.forward_model(x, y)
            (loss / config.grad_accum_steps).backward()
            total += loss.item()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / config.grad_accum_steps, lr

    def run(self):
        config = self.config
        (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        metrics_path = self.out_dir / "metrics.jsonl"
        history = _read_metrics(metrics_path) if config.resume else []
        if not config.resume:
            metrics_path.write_text("")
        tokens_per_step = config.batch_size * config.block_size * config.grad_accum_steps
        print(f"fastgpt: {self.model.num_parameters() / 1e6:.2f}M parameters, {self.tokenizer.kind} tokenizer "
              f"({self.tokenizer.vocab_size} tokens), {len(self.blocks.splits['train']):,} training tokens, "
              f"device {self.device}, kernels: {self.backend}",
              file=sys.stderr)
        start_time = time.perf_counter()
        interval_start, interval_losses = start_time, []
        bar = tqdm(total=config.max_iters, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        while self.step < config.max_iters:
            loss, lr = self.train_step()
            if not math.isfinite(loss):
                raise FastGPTError(f"the loss became {loss} at step {self.step}; lower --learning-rate or "
                                   f"--grad-clip (the last good checkpoint is {self.checkpoint_path})")
            interval_losses.append(loss)
            bar.update(1)
            evaluate_now = self.step % config.eval_interval == 0 or self.step == config.max_iters
            if self.step % config.log_interval == 0 or evaluate_now:
                now = time.perf_counter()
                record = {"step": self.step, "train_loss": sum(interval_losses) / len(interval_losses), "lr": lr,
                          "tokens_per_sec": len(interval_losses) * tokens_per_step / (now - interval_start),
                          "elapsed_s": now - start_time}
                if evaluate_now:
                    losses = self.evaluate()
                    record["val_loss"] = losses["val"]
                    self.best_val_loss = min(self.best_val_loss, losses["val"])
                    bar.write(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                history.append(record)
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.1e}",
                                tok_s=f"{record['tokens_per_sec']:,.0f}")
                if evaluate_now:
                    self.save()
                    plot_losses(history, self.out_dir / "loss.png")
                interval_start, interval_losses = time.perf_counter(), []
        bar.close()
        elapsed = time.perf_counter() - start_time
        print(f"fastgpt: done in {elapsed:.0f} s; best val loss {self.best_val_loss:.4f}; "
              f"checkpoint {self.checkpoint_path}", file=sys.stderr)
        if config.sample_tokens:
            self.print_sample(config.sample_tokens)
        return {"best_val_loss": self.best_val_loss, "elapsed_s": elapsed, "step": self.step}

    def print_sample(self, n_tokens):
        self.model.eval()
        prompt = torch.tensor([[self.tokenizer.encode("\n")[0]]], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        pieces = [self.tokenizer.decode(token[0].tolist())
                  for token in self.model.generate(prompt, n_tokens, temperature=0.8, top_k=200, generator=generator)]
        print("-" * 40 + " sample " + "-" * 40)
        print("".join(pieces))


def _read_metrics(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(config):
    """Train with a TrainConfig; returns the best validation loss, the time taken and the last step."""
    return Trainer(config).run()


def main(argv=None):
    def command():
        config, _ = parse_config(sys.argv[1:] if argv is None else argv)
        train(config)
    return run_cli(command)


if __name__ == "__main__":
    sys.exit(main())
