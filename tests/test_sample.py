"""sample.py: streaming samples from a checkpoint, flags, errors, --cases; generation with and without the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, randomize, tiny_config

import sample
from checkpoint import save_checkpoint
from inference import CASES_PATH
from model import GPT, generate, sample_next
from tokenizer import CharTokenizer

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
    results = json.loads(out_file.read_text(encoding="utf-8"))["results"]
    assert [r["name"] for r in results] == ["romeo", "famous_katharina", "unseen_chars"]
    assert results[1]["loss"] > 0 and results[0]["loss"] is None

    # a prompt the char tokenizer must refuse, in a case that does not expect it, fails: exit status 1
    payload["cases"] = [{**payload["cases"][2], "checks": ["decodes"]}]
    cases_file.write_text(json.dumps(payload), encoding="utf-8")
    code, out, _ = run_cli(capsys, "--checkpoint", run_dir, "--cases=True", "--cases_file", cases_file)
    assert code == 1 and "FAILED unseen_chars: decodes" in out


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
