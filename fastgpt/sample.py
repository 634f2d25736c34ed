"""Continue a prompt with a trained model: `python -m fastgpt.sample --prompt "ROMEO:"`.

The text is printed as it is generated; the same --seed gives the same text. --init-from DIR samples
from a GPT-2 or Llama checkpoint in the Hugging Face layout instead of a fastgpt run; --interactive
reads one prompt per line from standard input.

In Python, `generate_text` streams the same text and `complete` returns it whole:

    model, tokenizer = load_trained_model("out", torch.device("cpu"))
    texts = complete(model, tokenizer, "ROMEO:", max_new_tokens=100, temperature=0.8, top_p=0.9, seed=1)
"""

import argparse
import sys
from dataclasses import dataclass

import torch

from fastgpt.checkpoint import load_trained_model
from fastgpt.cli import run_cli
from fastgpt.config import parse_config
from fastgpt.device import backend_setting, device_setting, pick_device, use_backend
from fastgpt.errors import FastGPTError
from fastgpt.model import Sampler
from fastgpt.pretrained import load_pretrained
from fastgpt.run_files import checkpoint_setting
from fastgpt.settings import setting


def check_stop_strings(stop):
    """The stop strings as a list (a single string is one), refused if one is empty (it would end every
    sample at once)."""
    stop = [stop] if isinstance(stop, str) else list(stop)
    if "" in stop:
        raise FastGPTError("an empty stop string would end every sample before it starts; give the text to stop at")
    return stop


class TextStream:
    """One sample's text as its tokens arrive: what is final and not yet shown, cut at a stop string.

    Two kinds of tail are held back until the next tokens settle them: a byte-level BPE token can end
    in the middle of a multi-byte character, and the text can end with the start of a stop string.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = check_stop_strings(stop)
        self.ids, self.shown, self.done = [], 0, False

    def add(self, token):
        """Take the next token id; return the newly final text (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        stops = [text.find(s) for s in self.stop if s in text]
        if stops:
            self.done = True
            return self._show(text, min(stops))
        if text.endswith("\ufffd"):
            return ""
        pending = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._show(text, len(text) - pending)

    def finish(self):
        """The text still held back once generation has ended without a stop string."""
        return "" if self.done else self._show(self.tokenizer.decode(self.ids), None)

    def _show(self, text, end):
        piece = text[self.shown:end]
        self.shown += len(piece)
        return piece


def generate_text(model, tokenizer, prompt, max_new_tokens=200, num_samples=1, stop=(), seed=None, **sampling):
    """Yield (i, text) pieces of the continuations of `prompt`, sample i of num_samples, as they are made.

    Each sample ends at the first of its stop strings (left out of the text) or after max_new_tokens
    tokens. `seed` makes the samples reproducible. `sampling` goes to GPT.generate: temperature,
    top_k, top_p, repetition_penalty, use_cache. The prompt is checked here, before the first piece.
    """
    if max_new_tokens < 0 or num_samples < 1:
        raise FastGPTError(f"max_new_tokens must not be negative and num_samples must be at least 1 "
                           f"(got {max_new_tokens} and {num_samples})")
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise FastGPTError("the prompt is empty; give some text to continue (for example --prompt 'ROMEO:')")
    device = model.lm_head.weight.device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    columns = model.generate(idx, max_new_tokens, generator=generator, **sampling)
    return _pieces(columns, [TextStream(tokenizer, stop) for _ in range(num_samples)])


def _pieces(columns, streams):
    for column in columns:
        for i, stream in enumerate(streams):
            piece = "" if stream.done else stream.add(int(column[i]))
            if piece:
                yield i, piece
        if all(stream.done for stream in streams):
            return
    for i, stream in enumerate(streams):
        piece = stream.finish()
        if piece:
            yield i, piece


def complete(model, tokenizer, prompt, **options):
    """The continuations of `prompt`, one string per sample; `options` as for generate_text."""
    texts = [""] * options.get("num_samples", 1)
    for i, piece in generate_text(model, tokenizer, prompt, **options):
        texts[i] += piece
    return texts


def _unescape(text):
    """`\\n`, `\\t` and other backslash escapes in a flag's value, so that stop strings can span lines."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} has a broken escape ({error.reason})") from None


@dataclass
class SampleConfig:
    out_dir: str = setting("out", "directory holding ckpt.pt from fastgpt.train")
    checkpoint: str = checkpoint_setting()
    init_from: str = setting("", "sample from the GPT-2 or Llama checkpoint in this directory (Hugging Face "
                                 "layout: config.json, model.safetensors, and vocab.json with merges.txt or "
                                 "tokenizer.json) instead of out_dir")
    prompt: str = setting("", "text to continue (empty: a new line, or the first token of a tokenizer without one)")
    interactive: bool = setting(False, "read prompts from standard input, one per line")
    max_new_tokens: int = setting(500, "tokens to generate", minimum=0)
    num_samples: int = setting(1, "samples to generate at once, for each prompt", minimum=1)
    temperature: float = setting(0.8, "0 picks the likeliest token; higher is more random")
    top_k: int = setting(200, "sample only among the k likeliest tokens (0: all)", minimum=0)
    top_p: float = setting(1.0, "sample only among the likeliest tokens whose probabilities add up to p, in (0, 1]")
    repetition_penalty: float = setting(1.0, "above 1 makes tokens already in the text less likely")
    stop: tuple[str, ...] = setting((), "end a sample where this text appears (repeatable; in a flag, backslash "
                                        "escapes like \\n work)", from_flag=_unescape)
    seed: int = setting(1337, "random seed; the same seed gives the same text")
    device: str = device_setting()
    backend: str = backend_setting()

    def sampling(self):
        """The settings of how each token is chosen, as GPT.generate and Sampler take them."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    repetition_penalty=self.repetition_penalty)

    def validate(self):
        Sampler(**self.sampling())
        check_stop_strings(self.stop)
        defaults = SampleConfig()
        if self.init_from and (self.out_dir, self.checkpoint) != (defaults.out_dir, defaults.checkpoint):
            raise FastGPTError("--init-from samples from a Hugging Face checkpoint, --out-dir and --checkpoint from "
                               "a training run's: give one or the other")


def parse_sample_config(argv):
    return parse_config(argv, SampleConfig, prog="python -m fastgpt.sample", description=__doc__.splitlines()[0])


# Control characters other than line breaks and tabs, as escapes: a model that has not yet learnt its
# text can emit any byte, and an escape sequence printed raw would change the terminal's state.
TERMINAL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127] if chr(code) not in "\n\r\t"}


def shown_on(out):
    """A function that makes text safe to print on `out`: on a terminal, control characters become
    escapes; a file or pipe gets the text itself."""
    if getattr(out, "isatty", lambda: False)():
        return lambda text: text.translate(TERMINAL_ESCAPES)
    return lambda text: text


def write_samples(pieces, prompt, num_samples, out):
    """Print sample 0 as it is generated, then the others, each after the prompt and a rule."""
    show = shown_on(out)
    held = [""] * num_samples
    out.write(show(prompt))
    for i, piece in pieces:
        if i == 0:
            out.write(show(piece))
            out.flush()
        else:
            held[i] += piece
    for text in held[1:]:
        out.write("\n" + "-" * 40 + "\n" + show(prompt + text))
    out.write("\n")
    out.flush()


def sample(config, out=None, prompts=None):
    """Run the sampler with a SampleConfig, printing to `out` and, with interactive, reading `prompts`."""
    out = out or sys.stdout
    device = pick_device(config.device)
    use_backend(config.backend, device)
    if config.init_from:
        model, tokenizer = load_pretrained(config.init_from)
        model.to(device)
    else:
        model, tokenizer = load_trained_model(config.out_dir, device, config.checkpoint)

    def run(prompt):
        pieces = generate_text(model, tokenizer, prompt, config.max_new_tokens, config.num_samples, config.stop,
                               config.seed, **config.sampling())
        write_samples(pieces, prompt, config.num_samples, out)

    if not config.interactive:
        run(config.prompt or tokenizer.start_text())
        return
    for line in prompts or sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            run(prompt)
        except FastGPTError as error:  # one bad prompt does not end the session
            out.flush()
            print(f"fastgpt: error: {error}", file=sys.stderr)


def main(argv=None):
    return run_cli(lambda: sample(parse_sample_config(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
