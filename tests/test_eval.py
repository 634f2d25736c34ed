"""python -m fastgpt.eval against a direct, token-by-token computation with the same model."""

import json
import math

import pytest
import torch

from fastgpt import eval as fastgpt_eval
from fastgpt import train
from fastgpt.checkpoint import load_trained_model

BLOCK = 16
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", str(BLOCK), "--batch-size", "4",
        "--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--sample-tokens", "0",
        "--warmup-iters", "2"]
# Multi-byte characters throughout, so that bytes and tokens differ.
CORPUS = "".join(f"héllo wörld ✓ {i} çà et là, {i * 7 % 13} fois.\n" for i in range(120))


@pytest.fixture(scope="module", params=["char", "bpe"])
def run(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    assert train.main(["--data", str(directory / "corpus.txt"), "--out-dir", str(directory / "run"),
                       "--tokenizer", request.param, "--vocab-size", "300", *TINY]) == 0
    return directory


def evaluate(capsys, *args):
    # In fp32, as the direct computation is (auto would take bf16 on a CPU with native bf16).
    assert fastgpt_eval.main([*args, "--dtype", "float32", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def direct_evaluation(model, tokenizer, ids):
    """Windows of BLOCK tokens one at a time, each token's log-probability in float64, bytes by decoding."""
    nats, targets = 0.0, []
    for start in range(0, len(ids) - 1, BLOCK):
        window = ids[start:start + BLOCK + 1]
        with torch.no_grad():
            logits, _ = model(torch.tensor([window[:-1]]))
        log_probs = torch.log_softmax(logits[0].double(), dim=-1)
        for position, target in enumerate(window[1:]):
            nats -= log_probs[position, target].item()
            targets.append(target)
    if tokenizer.kind == "char":
        spelled = len(tokenizer.decode(targets).encode("utf-8"))
    else:  # a bpe token can hold part of a character: count its bytes, not a decoded string's
        spelled = sum(len(tokenizer.tokens[t]) for t in targets)
    return len(targets), spelled, nats


def test_eval_of_the_validation_split_equals_a_direct_computation(run, capsys):
    result = evaluate(capsys, "--out-dir", str(run / "run"))
    model, tokenizer = load_trained_model(run / "run", torch.device("cpu"))
    ids = tokenizer.encode(CORPUS)
    validation = ids[int(len(ids) * 0.9):]  # the trainer's split: the last val_fraction of the tokens
    tokens, spelled, nats = direct_evaluation(model, tokenizer, validation)
    assert (result["tokens"], result["bytes"]) == (tokens, spelled)
    assert tokens % BLOCK, "the split should end in a partial window, to test it"
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nats / spelled / math.log(2), rel=1e-5)
    assert result["bytes"] > result["tokens"] or tokenizer.kind == "bpe"


def test_eval_never_rewrites_a_runs_token_cache(run, capsys):
    """A run may be training on its cache while eval runs: when the cache does not fit the corpus
    (here its record is made stale), eval encodes the text privately and leaves the cache alone."""
    expected = evaluate(capsys, "--out-dir", str(run / "run"))
    cache = run / "run" / "cache"
    record = json.loads((cache / "tokens.json").read_text())
    stale = json.dumps({**record, "tokens": record["tokens"] + 1})
    (cache / "tokens.json").write_text(stale)
    before = (cache / "tokens.bin").stat()
    assert evaluate(capsys, "--out-dir", str(run / "run")) == expected
    after = (cache / "tokens.bin").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (cache / "tokens.json").read_text() == stale


def test_eval_of_another_text_and_of_the_best_checkpoint(run, capsys):
    text = "là ✓ héllo wörld 12 fois.\n" * 5
    (run / "other.txt").write_text(text, encoding="utf-8")
    result = evaluate(capsys, "--out-dir", str(run / "run"), "--data", str(run / "other.txt"), "--checkpoint", "best")
    model, tokenizer = load_trained_model(run / "run", torch.device("cpu"), checkpoint="best")
    tokens, spelled, nats = direct_evaluation(model, tokenizer, tokenizer.encode(text))
    assert result["checkpoint"].endswith("best.pt")
    assert (result["tokens"], result["bytes"]) == (tokens, spelled)
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)


def test_eval_prints_loss_perplexity_and_bits_per_byte(run, capsys):
    assert fastgpt_eval.main(["--out-dir", str(run / "run"), "--batch-size", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith(f"{run / 'run' / 'ckpt.pt'} on the validation split of ")
    assert out[1].startswith("loss ") and "nats/token, perplexity " in out[1] and out[1].endswith(" bits/byte")


def test_text_the_tokenizer_cannot_encode_is_one_error_line(run, capsys):
    (run / "greek.txt").write_text("αβγ δέλτα\n", encoding="utf-8")
    status = fastgpt_eval.main(["--out-dir", str(run / "run"), "--data", str(run / "greek.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    if "char" in run.name:
        assert status == 2 and err[-1].startswith("fastgpt: error: the text contains characters the char "
                                                  "tokenizer never saw")
        assert "Traceback" not in "\n".join(err)
    else:
        assert status == 0  # byte-level BPE encodes any text


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "first"], "checkpoint must be one of latest, best"),
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--jsn"], "did you mean --json"),
])
def test_bad_flags_are_one_error_line(run, capsys, args, message):
    assert fastgpt_eval.main(["--out-dir", str(run / "run"), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_a_run_is_one_error_line(tmp_path, capsys):
    assert fastgpt_eval.main(["--out-dir", str(tmp_path)]) == 2
    assert "fastgpt: error: no config.json in" in capsys.readouterr().err
