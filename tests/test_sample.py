"""sample.py: streaming samples from a checkpoint, flags, errors, --cases; generation with and without the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, call_with_deadline, randomize, tiny_config

import data
import sample
from checkpoint import save_checkpoint
from config import UserError
from inference import CASES_PATH
from memorization import CopyIndex
from model import GPT, generate, sample_next
from optimizer import EMA
from tokenizer import CharTokenizer, build_tokenizer

SEPARATOR = "\n" + "-" * 40 + "\n"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def tokenizer(shakespeare_path) -> CharTokenizer:
    return CharTokenizer.from_text(shakespeare_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    """A run folder holding one checkpoint of a tiny random char model (65 ids, padded to 128), context 32."""
    model = randomize(GPT(tiny_config(context_len=32), tokenizer.vocab_size), seed=2)
    run = tmp_path_factory.mktemp("models") / "tiny"
    save_checkpoint(run, 3, model, tokenizer.to_dict())
    return run


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def samples_of(out: str) -> list[str]:
    assert out.endswith(SEPARATOR)
    return out[: -len(SEPARATOR)].split(SEPARATOR)


# ----------------------------------------------------------------------------------------------------------------
# Sampling from the command line


def test_streams_each_sample_after_its_prompt(capsys, run_dir, tokenizer):
    code, out, err = run_cli(
        capsys, "--checkpoint", run_dir, "--prompt", "ROMEO:", "--max_new_tokens", 50, "--num_samples", 3, "--seed", 1
    )
    assert code == 0
    samples = samples_of(out)
    assert len(samples) == 3 and len(set(samples)) == 3  # one generator for all samples: they differ
    for text in samples:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 50  # a char per token
        assert set(text) <= set(tokenizer.chars)  # padded ids (65..127) would not even decode
    assert err.count("[sample ") == 3 and "tok/s" in err


def test_tokens_are_written_as_they_are_generated(monkeypatch, run_dir):
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert sample.main(["--checkpoint", str(run_dir), "--max_new_tokens", "30"]) == 0
    assert sum(1 for w in writes if w) >= 30


def test_same_seed_same_output_and_another_seed_another(capsys, run_dir):
    def run(*flags):
        return run_cli(capsys, "--checkpoint", run_dir, "--prompt", "A", "--max_new_tokens", 40, *flags)[1]

    first = run("--seed", 7)
    assert run("--seed=7") == first
    assert run("--seed", 8) != first
    assert run("--seed", 7, "--kv_cache", "False") == first  # same draws whether the cache is on or off


@pytest.mark.parametrize(
    "flags",
    [
        ["--kv_cache", "False"],
        ["--kv_cache=false"],
        ["--kv_cache", "0"],
        ["--kv_cache=true"],
        ["--top_k", "1", "--temperature", "1.0"],  # top-k 1 is greedy
        ["--top_p=1e-9", "--top_k", "None", "--temperature", "1.0"],  # so is a nucleus of only the likeliest id
    ],
)
def test_greedy_is_the_same_through_every_path(capsys, run_dir, flags):
    def run(*more):
        code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--prompt", "KING:", "--max_new_tokens", 70, *more)
        assert code == 0
        return out

    greedy = run("--temperature", "0")  # 70 tokens from a 5-token prompt: past context 32, re-encoded twice
    assert run(*flags, *(["--temperature=0"] if "--temperature" not in flags else [])) == greedy


def test_step_folder_and_run_folder_give_the_same_samples(capsys, run_dir):
    step = run_dir / "step_000003"
    outs = [run_cli(capsys, "--checkpoint", path, "--max_new_tokens", 30)[1] for path in (run_dir, step)]
    assert outs[0] == outs[1]


def test_empty_prompt_starts_from_the_start_token(capsys, run_dir, tokenizer):
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--prompt", "", "--max_new_tokens", 60, "--temperature", 3)
    assert code == 0
    (text,) = samples_of(out)
    assert len(text) == 60 and set(text) <= set(tokenizer.chars)


def test_prompt_file_and_a_prompt_longer_than_the_context(capsys, run_dir, tmp_path):
    prompt = "BAPTISTA:\nGood morrow, neighbour Gremio.\nGod save you, gentlemen!\n"  # 63 characters > context 32
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--prompt_file", path, "--max_new_tokens", 20)
    assert code == 0
    (text,) = samples_of(out)
    assert text.startswith(prompt) and len(text) == len(prompt) + 20
    assert "more than context_len 32" in err


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "ROMEO: meet me @ 9 {here}"], "never saw '9@{}'"),
        (["--prompt", "Roméo"], "never saw 'é'"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "hot"], "--temperature: expected a number"),
        (["--top_k", "0"], "--top_k"),
        (["--top_p", "1.5"], "--top_p"),
        (["--max_new_tokens", "0"], "--max_new_tokens"),
        (["--num_samples", "0"], "--num_samples"),
        (["--kv_cache", "maybe"], "--kv_cache: expected True/False"),
        (["--copy_check_chars", "many"], "--copy_check_chars"),
        (["--device", "tpu"], "--device: invalid choice"),
        (["--temprature", "0"], "unrecognized arguments"),
        (["--prompt", "A", "--prompt_file", "p.txt"], "not both"),
        (["--prompt_file", "/nonexistent/prompt.txt"], "cannot read --prompt_file"),
    ],
)
def test_bad_input_is_one_error_line_and_status_2(capsys, run_dir, flags, message):
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, *flags)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_missing_and_damaged_checkpoints_are_refused(capsys, run_dir, tmp_path):
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path)  # exists, but holds no checkpoint
    assert code == 2 and "is not a checkpoint" in err
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in (run_dir / "step_000003").iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    for name, garbage in (("model.safetensors", b"not a safetensors file"), ("state.json", b"{not json")):
        (damaged / name).write_bytes(garbage)
        code, _, err = run_cli(capsys, "--checkpoint", damaged)
        assert code == 2 and "damaged or incomplete" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys)
    assert code == 2 and "--checkpoint" in err


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(tmp_path / "missing"), "--prompt", "ROMEO:"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: --checkpoint") and result.stderr.count("\n") == 1


# The numeric flags: every extreme value is an error line or well-defined (rules in inference.Settings)

BAD_VALUES = {
    "--temperature": ["nan", "inf", "-inf", "-1", "-1e-308", "1e308", "1e31"],
    "--top_p": ["nan", "-0.1", "0", "-0", "1.5", "inf", "-inf"],
    "--top_k": ["0", "-5"],
    "--max_new_tokens": ["0", "-1"],
    "--num_samples": ["0", "-1"],
    "--seed": ["-1", str(2**64), str(10**30)],
    "--copy_check_chars": ["-1"],
}


@pytest.mark.parametrize("flag, value", [(flag, value) for flag, values in BAD_VALUES.items() for value in values])
def test_an_out_of_range_number_is_one_error_line_naming_its_flag(capsys, run_dir, flag, value):
    code, out, err = run_cli(capsys, "--checkpoint", run_dir, "--max_new_tokens", 5, f"{flag}={value}")
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {flag} must be ") and err.count("\n") == 1 and ", got " in err


def greedy_output(capsys, run_dir, *flags):
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--prompt", "KING:", "--max_new_tokens", 40, *flags)
    assert code == 0
    return out


@pytest.mark.parametrize("temperature", ["1e-7", "1e-30", "1e-308", "5e-324"])
def test_a_tiny_temperature_is_greedy_not_nan(capsys, run_dir, temperature):
    """Its limit: dividing float32 logits by 1e-308 (0 in float32) would give inf, and softmax of inf NaN."""
    assert greedy_output(capsys, run_dir, "--temperature", temperature) == greedy_output(
        capsys, run_dir, "--temperature", "0"
    )


@pytest.mark.parametrize(
    "flags, same_as",
    [
        (["--top_p", "5e-324", "--temperature", "1"], ["--temperature", "0"]),  # only the likeliest id (0 in float32)
        (["--top_p", "1e-7", "--temperature", "1"], ["--temperature", "0"]),
        (["--top_k", str(10**30), "--seed", "3"], ["--top_k", "None", "--seed", "3"]),  # more than the vocabulary
        (["--top_p", "1", "--seed", "3"], ["--top_p", "None", "--seed", "3"]),  # the whole mass
    ],
)
def test_extreme_but_valid_settings_equal_their_plain_meaning(capsys, run_dir, flags, same_as):
    assert greedy_output(capsys, run_dir, *flags) == greedy_output(capsys, run_dir, *same_as)


@pytest.mark.parametrize("temperature", ["1e30", "1e6"])
def test_a_huge_temperature_samples_every_real_id(capsys, run_dir, tokenizer, temperature):
    code, out, _ = run_cli(
        capsys, "--checkpoint", run_dir, "--max_new_tokens", 400, "--temperature", temperature, "--top_k", "None"
    )
    assert code == 0
    (text,) = samples_of(out)
    assert len(text) == 400 and set(text) <= set(tokenizer.chars)  # no padded id, no NaN
    assert len(set(text)) > 40  # near uniform over the 65 characters


def test_a_huge_max_new_tokens_streams_until_ctrl_c(monkeypatch, run_dir):
    """No upper limit: generation is lazy, so 10^30 tokens start at once and Ctrl-C ends them with status 130."""
    written = []

    class Interrupting:
        def write(self, text):
            written.append(text)
            if len(written) > 100:
                raise KeyboardInterrupt

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Interrupting())
    argv = ["--checkpoint", str(run_dir), "--max_new_tokens", str(10**30), "--num_samples", str(10**30)]
    assert sample.main(argv) == 130 and len(written) > 100


# ----------------------------------------------------------------------------------------------------------------
# Inputs that are not regular files: refused in one line, never opened


@pytest.mark.parametrize("flags", [["--prompt_file"], ["--cases", "--cases_file"]])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_prompt_or_cases_file_that_is_not_a_regular_file_is_refused(capsys, run_dir, tmp_path, flags, kind):
    fifo, path = tmp_path / "fifo", tmp_path / kind
    os.mkfifo(fifo)
    if kind == "folder":
        path.mkdir()
    code = call_with_deadline(lambda: sample.main(["--checkpoint", str(run_dir), *flags, str(path)]), fifo)
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    what = "a FIFO (named pipe), not a regular file" if kind == "fifo" else "a folder"
    assert err.startswith(f"error: cannot read {flags[-1]} {path}: it is {what}; give ") and err.count("\n") == 1


# A child whose heap may grow by at most 1 GiB after its imports: a regression that reads /dev/zero fails with a
# MemoryError in a moment instead of filling the machine's memory. (Linux: /proc/self/status.)
LIMIT_HEAP = (
    "import re, resource; "
    "heap = int(re.search(r'VmData:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024 + 2**30; "
    "resource.setrlimit(resource.RLIMIT_DATA, (heap, heap)); "
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the heap limit reads /proc")
@pytest.mark.parametrize("flags", [["--prompt_file"], ["--cases", "--cases_file"]])
def test_dev_zero_as_prompt_or_cases_file_is_refused_unread(run_dir, flags):
    argv = ["--checkpoint", str(run_dir), *flags, "/dev/zero"]
    code = f"import sys, sample; {LIMIT_HEAP}sys.exit(sample.main({argv!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
    expected = "a UTF-8 text file" if flags == ["--prompt_file"] else "a cases JSON file"
    assert result.stderr == (
        f"error: cannot read {flags[-1]} /dev/zero: it is a character device, not a regular file; give {expected}\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and prompts that do not fit


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A tiny random model over the gpt2 vocabulary (50257 ids), context 16."""
    model = randomize(GPT(tiny_config(tokenizer="gpt2"), 50257), seed=3)
    run = tmp_path_factory.mktemp("models") / "gpt2"
    save_checkpoint(run, 1, model, build_tokenizer("gpt2").to_dict())
    return run


def test_a_prompt_of_bytes_that_are_not_utf8_is_one_error_line(gpt2_run, tmp_path):
    """Such bytes reach argv as lone surrogates: the BPE encodes them, but printing the prompt would fail."""
    result = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(gpt2_run), "--prompt", os.fsdecode(b"ROMEO \xff")]
        + ["--max_new_tokens", "3"],
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == b"error: --prompt holds bytes that are not UTF-8; pass UTF-8 text\n"
    ok = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(gpt2_run), "--prompt", "Roméo 夜"]
        + ["--max_new_tokens", "3"],
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("Roméo 夜".encode()), ok.stderr[-2000:]


def test_a_checkpoint_whose_tokenizer_does_not_fit_its_model_is_refused(capsys, run_dir, tmp_path):
    """Ids the tokenizer cannot decode would be an IndexError mid-stream (checkpoint.py checks tokenizer.json)."""
    model = randomize(GPT(tiny_config(context_len=32), 65), seed=2)
    save_checkpoint(tmp_path / "mixed", 3, model, CharTokenizer("abc \n").to_dict())  # 5 ids for a 65-id model
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path / "mixed", "--prompt", "a", "--max_new_tokens", 50)
    assert (code, out) == (2, "")
    assert err.startswith("error: checkpoint ") and "tokenizer.json" in err and err.count("\n") == 1


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_a_model_whose_logits_overflow_is_refused(capsys, tmp_path, temperature):
    """Finite weights (checkpoint.py accepts them) whose logits overflow to NaN: greedy would print garbage ids and
    sampling would end in a RuntimeError from torch.multinomial."""
    model = randomize(GPT(tiny_config(), 10), seed=1, scale=1e15)
    with torch.no_grad():
        assert torch.isnan(model(torch.tensor([[0, 1]]))[0, -1, :10]).any()
    save_checkpoint(tmp_path / "diverged", 1, model, CharTokenizer("abcdefgh \n").to_dict())
    code, out, err = run_cli(
        capsys, "--checkpoint", tmp_path / "diverged", "--prompt", "ab", "--temperature", temperature
    )
    assert (code, out) == (2, "")
    assert "gives NaN or infinite logits for this prompt" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# --cases


def test_cases_flag_prints_the_table_and_writes_json(capsys, run_dir, tmp_path):
    payload = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    payload["defaults"]["max_new_tokens"] = 20
    payload["cases"] = [c for c in payload["cases"] if c["name"] in ("romeo", "famous_katharina", "unseen_chars")]
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(payload), encoding="utf-8")
    out_file = tmp_path / "results" / "cases.json"
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--cases", "--cases_file", cases_file, "--out", out_file)
    assert code == 0
    assert "3 cases: 8/8 checks passed; mean held-out loss" in out
    assert "refused: cannot encode the prompt" in out
    assert "  copied  sample" in out and "copied: the share of each sample inside spans of 32+ characters" in out
    written = json.loads(out_file.read_text(encoding="utf-8"))
    results = written["results"]
    assert [r["name"] for r in results] == ["romeo", "famous_katharina", "unseen_chars"]
    assert results[1]["loss"] > 0 and results[0]["loss"] is None
    # the memorization check against Tiny Shakespeare's training split: a share for each sample, none for a refusal
    assert written["copy_check_chars"] == 32 and [type(r["copied"]) for r in results] == [float, float, type(None)]

    # a prompt the char tokenizer must refuse, in a case that does not expect it, fails: exit status 1
    payload["cases"] = [{**payload["cases"][2], "checks": ["decodes"]}]
    cases_file.write_text(json.dumps(payload), encoding="utf-8")
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--cases=True", "--cases_file", cases_file)
    assert code == 1 and "FAILED unseen_chars: decodes" in out


# ----------------------------------------------------------------------------------------------------------------
# --weights: the weight average of a run trained with --ema_decay, or the raw weights


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory, tokenizer):
    """Run folders of the same step: "raw" holds model A only; "both" holds model A and, as its average, model B;
    "b" holds model B only."""
    cfg = tiny_config(context_len=32)
    a, b = (randomize(GPT(cfg, tokenizer.vocab_size), seed=seed) for seed in (2, 5))
    average = EMA(a, 0.9)
    average.model.load_state_dict(b.state_dict())
    runs = tmp_path_factory.mktemp("averaged")
    save_checkpoint(runs / "raw", 3, a, tokenizer.to_dict())
    save_checkpoint(runs / "both", 3, a, tokenizer.to_dict(), ema=average.state_dict())
    save_checkpoint(runs / "b", 3, b, tokenizer.to_dict())
    return runs


def test_the_average_is_sampled_by_default_and_the_raw_weights_on_request(capsys, averaged_run):
    def greedy(run, *flags):
        code, out, err = run_cli(
            capsys, "--checkpoint", averaged_run / run, "--max_new_tokens", 40, "--temperature", 0, *flags
        )
        assert code == 0, err
        return out, err.strip().splitlines()[-1]

    out, note = greedy("both")
    assert (out, note.endswith(", ema weights]")) == (greedy("b")[0], True)  # the average: model B
    assert greedy("both", "--weights", "ema")[0] == out
    out, note = greedy("both", "--weights", "raw")
    assert (out, note.endswith(", raw weights]")) == (greedy("raw")[0], True)  # the raw weights: model A
    assert out != greedy("b")[0]
    assert greedy("raw")[1].endswith(", raw weights]")  # no average: the raw weights, as ever


def test_asking_for_an_average_a_checkpoint_lacks_is_one_line(capsys, averaged_run):
    code, out, err = run_cli(capsys, "--checkpoint", averaged_run / "raw", "--weights", "ema")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: checkpoint ") and "has no averaged weights" in err and "--weights raw" in err
    code, _, err = run_cli(capsys, "--checkpoint", averaged_run / "raw", "--weights", "best")
    assert code == 2 and err.startswith("error: --weights: invalid choice: 'best'") and err.count("\n") == 1


def test_cases_run_on_the_chosen_weights(capsys, averaged_run, tmp_path):
    payload = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    payload["defaults"]["max_new_tokens"] = 10
    payload["cases"] = [c for c in payload["cases"] if c["name"] == "famous_katharina"]
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(payload), encoding="utf-8")

    def losses(run, *flags):
        out_file = tmp_path / f"{run}{''.join(flags)}.json"
        argv = ("--checkpoint", averaged_run / run, "--cases", "--cases_file", cases_file, "--out", out_file, *flags)
        code, out, _ = run_cli(capsys, *argv)
        result = json.loads(out_file.read_text(encoding="utf-8"))
        return result["weights"], [r["loss"] for r in result["results"]], out

    weights, loss, out = losses("both")
    assert (weights, loss) == ("ema", losses("b")[1]) and "weights: ema (ema.safetensors)" in out
    assert losses("both", "--weights", "raw")[:2] == ("raw", losses("raw")[1])
    assert loss != losses("raw")[1]


# ----------------------------------------------------------------------------------------------------------------
# Generation: the cache, and the sampling rules


@pytest.mark.parametrize("attn_sink, pos_emb", [(True, "rope"), (True, "learned"), (False, "rope")])
def test_logits_with_the_cache_equal_a_full_forward_at_every_step(attn_sink, pos_emb):
    """Every step of a cached generate sees the logits a full forward pass over its window gives: through the
    prompt's prefill, each one-token step, and every re-encode once the text outgrows the context (16 here)."""
    model = randomize(GPT(tiny_config(attn_sink=attn_sink, pos_emb=pos_emb), 65), seed=6).eval()
    assert attn_sink is (model.blocks[0].attn.sink is not None)

    def logits_per_step(use_cache):
        seen = []
        forward = model.forward

        def recording_forward(idx, cache=None):
            logits = forward(idx, cache=cache)
            seen.append(logits[0, -1, :65].clone())
            return logits

        model.forward = recording_forward
        try:
            generator = torch.Generator().manual_seed(0)
            ids = list(generate(model, [5, 9, 2, 7], 60, 1.0, None, None, use_cache, generator))
        finally:
            del model.forward
        return ids, seen

    cached_ids, cached = logits_per_step(True)
    full_ids, full = logits_per_step(False)
    assert cached_ids == full_ids and len(cached) == len(full) == 60
    for step, (a, b) in enumerate(zip(cached, full, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_from_the_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])  # the last: a padded id
    n = 40_000
    generator = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(n, -1), temperature, None, None, generator).flatten()
    freq = torch.bincount(ids, minlength=6).float() / n
    expected = torch.softmax(logits / temperature, dim=-1)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    assert freq[-1] == 0


def test_top_k_and_top_p_keep_only_the_likeliest_ids():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -2.0, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    top_k = sample_next(logits.expand(5000, -1), 1.0, 2, None, generator)
    assert set(top_k.flatten().tolist()) == {1, 3}
    probs = torch.softmax(logits, dim=-1)  # ids 1, 3 hold 0.53 + 0.32 of the mass: p=0.6 needs both, 0.5 one
    assert probs[1] > 0.5 and probs[1] + probs[3] > 0.6
    assert set(sample_next(logits.expand(5000, -1), 1.0, None, 0.6, generator).flatten().tolist()) == {1, 3}
    assert set(sample_next(logits.expand(5000, -1), 1.0, None, 0.5, generator).flatten().tolist()) == {1}


@pytest.mark.parametrize("context_len", [1, 2, 3])
def test_generation_outgrows_even_the_smallest_context(context_len):
    model = randomize(GPT(tiny_config(context_len=context_len), 65), seed=7).eval()
    cached = list(generate(model, [1, 2, 3, 4], 12, temperature=0.0, use_cache=True))
    assert len(cached) == 12 and cached == list(generate(model, [1, 2, 3, 4], 12, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, 1e30, 1e300])
def test_sample_next_is_defined_for_any_finite_positive_temperature(temperature):
    logits = torch.tensor([[3.0, 1.0, -2.0, float("-inf")]]) * 1e4  # large logits, a padded id at -inf
    generator = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature, None, None, generator)) for _ in range(50)}
    if temperature < 1:
        assert picks == {0}  # tends to greedy
    else:
        assert picks <= {0, 1, 2} and len(picks) > 1  # tends to uniform over the real ids, never the padded one


def test_a_top_p_that_rounds_to_zero_keeps_the_likeliest_id():
    logits = torch.tensor([[0.5, 2.0, 1.0]])
    assert int(sample_next(logits, 1.0, None, 1e-50, torch.Generator().manual_seed(0))) == 1


def test_generate_stops_with_one_line_on_nan_logits():
    model = GPT(tiny_config(), 65)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="logits became NaN after 1 tokens"):
        list(generate(model, [1], 5))


# ----------------------------------------------------------------------------------------------------------------
# The memorization check: each sample's share inside spans copied from the training split


def test_each_sample_reports_its_copied_share_unless_the_check_is_off(capsys, run_dir):
    argv = ("--checkpoint", run_dir, "--prompt", "ROMEO:", "--max_new_tokens", 40, "--num_samples", 2)
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err.count("copied (spans of 32+ chars of the training split), raw weights]") == 2
    code, quiet_out, err = run_cli(capsys, *argv, "--copy_check_chars", 0)
    assert (code, quiet_out) == (0, out) and "copied" not in err and "memorization" not in err  # the same samples
    code, _, err = run_cli(capsys, *argv, "--copy_check_chars", 8)
    assert code == 0 and err.count("copied (spans of 8+ chars of the training split)") == 2


@pytest.fixture
def own_text_run(tmp_path, monkeypatch, tokenizer):
    """run_dir's model, saved with a data_path of its own (not written yet), prepared into a temporary cache."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    cfg = tiny_config(context_len=32, data_path=str(tmp_path / "train.txt"))
    save_checkpoint(tmp_path / "run", 3, randomize(GPT(cfg, tokenizer.vocab_size), seed=2), tokenizer.to_dict())
    return tmp_path / "run", tmp_path / "train.txt"


def copied_percent(err: str) -> str:
    return err.split("kv cache on, ")[1].split(" copied")[0]


def test_a_sample_recited_from_the_training_text_is_all_copied(capsys, own_text_run, tokenizer):
    run, train_path = own_text_run
    argv = ("--checkpoint", run, "--prompt", "ROMEO:", "--max_new_tokens", 60, "--temperature", 0)
    code, out, err = run_cli(capsys, *argv, "--copy_check_chars", 0)
    generated = samples_of(out)[0].removeprefix("ROMEO:")
    assert code == 0 and len(generated) == 60
    filler = "".join(tokenizer.chars[i % 20] for i in range(500))  # periodic: adds no copies (`expected` would count)

    train_path.write_text("\n" + "ROMEO:" + generated + "\n" + filler, encoding="utf-8")  # (val: the last 10%)
    code, again, err = run_cli(capsys, *argv)
    assert (code, again, copied_percent(err)) == (0, out, "100.0%")

    half = generated[:40]  # the first 40 generated characters only, away from the prompt
    train_path.write_text(half + "\n" + filler, encoding="utf-8")
    index = CopyIndex((half + "\n" + filler)[: int(0.9 * (len(half) + 1 + len(filler)))], 32)
    expected = index.copied_share(generated, "ROMEO:")  # at least 40 / 60: more only where the filler matches
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and expected >= 40 / 60 and copied_percent(err) == f"{expected:.1%}"


def test_training_data_that_is_gone_is_a_note_and_sampling_goes_on(capsys, own_text_run):
    run, train_path = own_text_run  # (never written)
    code, out, err = run_cli(capsys, "--checkpoint", run, "--prompt", "ROMEO:", "--max_new_tokens", 20)
    assert code == 0 and len(samples_of(out)[0]) == len("ROMEO:") + 20
    lines = err.splitlines()
    assert lines[0] == f"note: memorization check skipped: the training data {train_path} is not there any more"
    assert len(lines) == 2 and lines[1].startswith("[sample 1/1: ") and "copied" not in lines[1]
