"""Generation: the key/value cache changes nothing but speed; every sampling control does what it says."""

import io

import pytest
import torch

from fastgpt import GPT, ops, sample
from fastgpt.errors import FastGPTError
from fastgpt.model import Sampler
from fastgpt.sample import TextStream, complete, generate_text

CPU_BACKENDS = [name for name in ("reference", "cpp") if ops.available_backends()[name] is None]


@pytest.fixture(autouse=True)
def reference_kernels(backend):
    """The reference path unless a test says otherwise: float64 models compare exactly."""
    backend("reference")


def generated(model, prompt, n, **options):
    return torch.cat(list(model.generate(prompt, n, **options)), dim=1)


def test_cached_forward_gives_the_logits_of_the_full_forward(tiny_model):
    model = tiny_model().double()
    idx = torch.randint(0, 32, (2, 12))
    full, _ = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)
    assert len(cache[0]) == 12


@pytest.mark.parametrize("kernels", CPU_BACKENDS)
@pytest.mark.parametrize("prompt_length", [1, 7, 16, 23])
def test_greedy_output_is_identical_with_and_without_the_cache(tiny_model, backend, kernels, prompt_length):
    # 40 new tokens from a block of 16: the window is refilled several times, with prompts shorter
    # than, as long as and longer than the block.
    backend(kernels)
    model = tiny_model()
    if kernels == "reference":
        model.double()  # no near-ties between logits: any difference would be a real one
    prompt = torch.randint(0, 32, (3, prompt_length))
    with_cache = generated(model, prompt, 40, temperature=0)
    without = generated(model, prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)


def test_sampled_output_with_a_seed_is_identical_with_and_without_the_cache(tiny_model):
    model = tiny_model().double()
    prompt = torch.randint(0, 32, (2, 5))
    runs = [generated(model, prompt, 30, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.2,
                      generator=torch.Generator().manual_seed(4), use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_a_full_window_continues_from_its_newest_half_at_positions_from_zero(tiny_model):
    model = tiny_model().double()
    prompt = torch.randint(0, 32, (1, 16))
    first, second = generated(model, prompt, 2, temperature=0)[0]
    sequence = torch.cat((prompt[0], first.view(1)))
    assert first == model(prompt)[0][0, -1].argmax()
    assert second == model(sequence[-8:].view(1, -1))[0][0, -1].argmax()


def test_generated_tokens_are_ordinary_tensors_a_model_can_train_on(tiny_model, backend):
    """Decoding runs in inference mode, but what it hands out must not be inference tensors."""
    backend(CPU_BACKENDS[-1])  # the C++ kernels where they are built
    model = tiny_model()
    steps = list(model.generate(torch.zeros(2, 1, dtype=torch.long), 3))
    assert not any(step.is_inference() for step in steps)
    model.train()
    _, loss = model(steps[0], steps[1])  # the embedding keeps its input for the backward
    loss.backward()
    assert model.transformer.wte.weight.grad is not None


def test_top_k_of_one_and_a_tiny_top_p_are_greedy(tiny_model):
    model = tiny_model()
    prompt = torch.randint(0, 32, (2, 4))
    greedy = generated(model, prompt, 15, temperature=0)
    for options in (dict(top_k=1), dict(top_p=1e-6)):
        assert torch.equal(generated(model, prompt, 15, temperature=1.5, generator=torch.Generator().manual_seed(0),
                                     **options), greedy)


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    seen = torch.zeros(1, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for top_p, nucleus in ((0.5, {1}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        sampler = Sampler(top_p=top_p)
        drawn = {int(sampler(logits, seen, generator)) for _ in range(300)}
        assert drawn == nucleus, top_p


def test_repetition_penalty_keeps_greedy_decoding_off_seen_tokens(tiny_model):
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    tokens = generated(model, prompt, 20, temperature=0, repetition_penalty=1e6)[0].tolist()
    assert len(set(tokens + [1, 2, 3])) == 23, tokens  # 23 different tokens out of 32
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalised = Sampler(temperature=0, repetition_penalty=4.0)
    assert int(penalised(logits, torch.tensor([[0]]))) == 2  # 2/4 < 1
    assert int(penalised(torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[0]]))) == 1  # -1*4 < -2


def test_a_tiny_temperature_samples_the_likeliest_token():
    logits = torch.tensor([[3.0, 80.0, -50.0, 79.9]])
    for top_k, top_p in ((None, 1.0), (0, 1.0), (2, 0.5)):  # top_k None or 0: all tokens, as --top-k 0
        assert int(Sampler(temperature=1e-45, top_k=top_k, top_p=top_p)(logits, torch.zeros(1, 1, dtype=torch.long))) == 1


@pytest.mark.parametrize("setting", [dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1), dict(temperature=-1.0),
                                     dict(temperature=float("inf")), dict(top_k=-1), dict(repetition_penalty=0.0)])
def test_impossible_sampling_settings_are_refused(setting):
    with pytest.raises(FastGPTError, match=next(iter(setting))):
        Sampler(**setting)


class Letters:
    """A stand-in tokenizer: token i is the i-th letter, so tests can choose the text exactly."""

    vocab_size = 26

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_text_stream_cuts_at_a_stop_string_and_never_shows_part_of_one():
    stream = TextStream(Letters(), stop=["cde", "xyz"])
    shown = [stream.add(i) for i in Letters().encode("abcdcde")]
    assert shown == ["a", "b", "", "", "cd", "", ""]  # "cd" held while it might begin "cde", then cut
    assert stream.done and "".join(shown) == "abcd"
    unfinished = TextStream(Letters(), stop=["xyz"])
    assert [unfinished.add(i) for i in Letters().encode("axy")] == ["a", "", ""]
    assert unfinished.finish() == "xy"
    one = TextStream(Letters(), stop="cde")  # a single string is one stop string, not its characters
    assert "".join(one.add(i) for i in Letters().encode("abcdcde")) == "abcd"


def test_samples_print_control_characters_as_escapes_on_a_terminal_only():
    """An undertrained byte-level model can emit ESC, which a terminal would take as a command."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    pieces = [(0, "a\x1b[2Jb\n\tc\r\x00"), (1, "\x7fd")]
    terminal, pipe = Terminal(), io.StringIO()
    for out in (terminal, pipe):
        sample.write_samples(iter(pieces), ">", 2, out)
    assert terminal.getvalue() == ">a\\x1b[2Jb\n\tc\r\\x00\n" + "-" * 40 + "\n>\\x7fd\n"
    assert pipe.getvalue() == ">a\x1b[2Jb\n\tc\r\x00\n" + "-" * 40 + "\n>\x7fd\n"


def test_generate_text_gives_several_reproducible_samples_each_cut_at_its_stop(tiny_model):
    model = tiny_model(vocab_size=26)
    options = dict(max_new_tokens=30, num_samples=4, temperature=1.0, seed=5)
    texts = complete(model, Letters(), "abc", **options)
    assert len(texts) == 4 and len(set(texts)) > 1 and all(len(t) == 30 for t in texts)
    assert complete(model, Letters(), "abc", **options) == texts
    stop = texts[0][10:12]
    cut = complete(model, Letters(), "abc", stop=[stop], **options)
    assert cut[0] == texts[0][:texts[0].index(stop)]
    assert all(text == full[:len(text)] and stop not in text for text, full in zip(cut, texts))


def test_generate_text_checks_the_prompt_before_generating(tiny_model):
    with pytest.raises(FastGPTError, match="empty"):
        generate_text(tiny_model(vocab_size=26), Letters(), "")


# ---------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def run_dir(saved_run, char_tokenizer):
    return saved_run(char_tokenizer)


def run_sample(run_dir, *args, stdin=""):
    out = io.StringIO()
    config = sample.parse_sample_config(["--out-dir", str(run_dir), "--backend", "reference", *args])
    sample.sample(config, out=out, prompts=io.StringIO(stdin))
    return out.getvalue()


def test_cli_prints_several_samples_and_stops_at_stop_strings(run_dir):
    text = run_sample(run_dir, "--prompt", "hello", "--max-new-tokens", "40", "--num-samples", "3",
                      "--temperature", "1.5", "--top-p", "0.95", "--repetition-penalty", "1.1")
    samples = text.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 3 and all(s.startswith("hello") for s in samples)
    assert run_sample(run_dir, "--prompt", "hello", "--max-new-tokens", "40", "--num-samples", "3",
                      "--temperature", "1.5", "--top-p", "0.95", "--repetition-penalty", "1.1") == text
    stop = samples[0][len("hello") + 5:len("hello") + 7]
    stopped = run_sample(run_dir, "--prompt", "hello", "--max-new-tokens", "40", "--num-samples", "3",
                         "--temperature", "1.5", "--top-p", "0.95", "--repetition-penalty", "1.1", "--stop", stop)
    assert stopped.split("\n" + "-" * 40 + "\n")[0] == samples[0][:samples[0].index(stop, len("hello"))]


def test_stop_strings_understand_backslash_escapes_in_flags_but_not_in_config_files(tmp_path):
    assert sample.parse_sample_config(["--stop", r"\n\n", "--stop", "é"]).stop == ("\n\n", "é")
    (tmp_path / "sample.toml").write_text('stop = ["\\\\n", "é"]\n')  # TOML's own escapes: a backslash, then n
    assert sample.parse_sample_config(["--config", str(tmp_path / "sample.toml")]).stop == ("\\n", "é")


def test_interactive_mode_answers_each_line_and_survives_a_bad_one(run_dir, capsys):
    text = run_sample(run_dir, "--interactive", "--max-new-tokens", "5", "--temperature", "0",
                      stdin="hello\n\nZebra\nworld\n")  # 'Z' is not in the corpus
    answers = text.splitlines()
    assert len(answers) == 2 and answers[0].startswith("hello") and answers[1].startswith("world")
    assert all(len(a) == 10 for a in answers)
    assert "fastgpt: error:" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "1.01"], "top_p must be in (0, 1]"),
    (["--num-samples", "0"], "num_samples must be at least 1"),
    (["--top-k", "-1"], "top_k must not be negative"),
    (["--repetition-penalty", "-1"], "repetition_penalty"),
    (["--init-from", "{tmp}/not-there"], "not a directory"),
    (["--backend", "fastest"], "backend must be one of auto, reference"),
    (["--temprature", "0.5"], "did you mean --temperature"),
])
def test_bad_sampling_settings_are_one_clear_line(run_dir, capsys, args, expected):
    args = [a.format(tmp=run_dir) for a in args]
    run = [] if "--init-from" in args else ["--out-dir", str(run_dir)]  # one model to sample from
    assert sample.main([*run, *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastgpt: error: ") and expected in err[0], err


def test_a_prompt_generate_cannot_continue_is_one_clear_error(tiny_model):
    model = tiny_model(vocab_size=16)
    for prompt, message in ((torch.tensor([1, 2]), "a .batch, tokens. tensor"), (torch.zeros(1, 0, dtype=torch.long),
                            "at least one token"), (torch.tensor([[1, 16]]), r"outside the vocabulary \[0, 16\)")):
        with pytest.raises(ValueError, match=message):
            next(model.generate(prompt, 3))


def test_generation_api_is_importable_from_the_top_level():
    from fastgpt import model
    assert GPT is model.GPT
