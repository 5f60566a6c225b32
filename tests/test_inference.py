"""inference.py and inference_cases.json: the cases file, streaming decode, held-out loss, the case runner."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config

import inference
from config import Config, UserError
from inference import (
    CASES_PATH,
    CHECKS,
    StreamDecoder,
    continuation_loss,
    encode_prompt,
    format_table,
    load_cases,
    run_case,
    run_cases,
)
from memorization import CopyIndex
from model import GPT
from tokenizer import CharTokenizer, build_tokenizer

FAST_TOKENS = 40  # new tokens per case in these tests: past the tiny context of 16 twice, yet quick

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def text(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(text) -> CharTokenizer:
    return CharTokenizer.from_text(text)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return randomize(GPT(tiny_config(), tokenizer.vocab_size), seed=5).eval()


def fast(case):
    return dataclasses.replace(case, settings=dataclasses.replace(case.settings, max_new_tokens=FAST_TOKENS))


def case_named(name):
    return next(c for c in load_cases() if c.name == name)


# ----------------------------------------------------------------------------------------------------------------
# The cases file


def test_cases_file_holds_20_versioned_cases_of_each_kind():
    payload = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    assert payload["version"] == inference.CASES_VERSION == 1
    cases = load_cases()
    names = [c.name for c in cases]
    assert len(cases) == 20 and len(set(names)) == 20
    assert {"romeo", "first_citizen", "stage_direction", "famous_full_fathom", "famous_katharina"} <= set(names)
    assert {"empty", "single_char", "long_prompt", "unseen_chars", "non_ascii", "whitespace_only"} <= set(names)
    assert {c.kind for c in cases} == {"shakespeare", "edge", "decoding"}
    for case in cases:
        assert case.checks and set(case.checks) <= set(CHECKS), case.name
        assert {"decodes", "length", "deterministic"} <= set(case.checks), case.name
    by_name = {c.name: c for c in cases}
    assert by_name["romeo"].prompt == "ROMEO:" and by_name["first_citizen"].prompt == "First Citizen:"
    assert by_name["empty"].prompt == "" and len(by_name["single_char"].prompt) == 1
    assert by_name["whitespace_only"].prompt.strip() == "" and by_name["whitespace_only"].prompt
    assert any(ord(c) > 127 for c in by_name["non_ascii"].prompt)
    assert by_name["greedy"].settings.temperature == 0 and "cache_equal" in by_name["greedy"].checks
    assert by_name["high_temperature"].settings.temperature >= 1.5
    assert by_name["top_k_1"].settings.top_k == 1 and "greedy_equal" in by_name["top_k_1"].checks
    assert by_name["top_p_0.5"].settings.top_p == 0.5
    assert "refuses_unseen" in by_name["unseen_chars"].checks and "refuses_unseen" in by_name["non_ascii"].checks


def test_held_out_passages_come_from_the_validation_split(text):
    payload = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    assert payload["source"]["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    split = int(len(text) * 0.9)  # data.load_dataset's split with the default val_frac 0.1
    held_out = [c for c in load_cases() if c.continuation is not None]
    assert len(held_out) >= 10
    for case in held_out:
        assert case.offset >= split, f"{case.name} starts in the training split"
        passage = case.prompt + case.continuation
        assert text[case.offset : case.offset + len(passage)] == passage, case.name
        assert len(case.continuation) == 200, case.name
    # the cues of the README speak only in the training split: that is why those cases carry no held-out score
    for case in load_cases():
        if case.name in ("romeo", "first_citizen"):
            assert case.continuation is None and case.prompt not in text[split:]


def test_long_prompt_is_longer_than_the_default_context_in_chars_and_gpt2_tokens():
    prompt = case_named("long_prompt").prompt
    context_len = Config().context_len
    assert len(prompt) > context_len
    assert len(build_tokenizer("gpt2").encode(prompt)) > context_len


def test_only_the_refusal_cases_hold_characters_tiny_shakespeare_lacks(text):
    seen = set(text)
    for case in load_cases():
        unseen = set(case.prompt) - seen
        assert bool(unseen) == ("refuses_unseen" in case.checks), case.name


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(version=99), "version 99"),
        (lambda p: p["cases"][0].update(checks=["decodes", "sparkles"]), "unknown checks"),
        (lambda p: p["cases"][0].update(settings={"top_p": 2}), "--top_p"),
        (lambda p: p["cases"][0].update(colour="red"), "malformed"),
        (lambda p: p.update(cases=[]), "no cases"),
        # settings of the wrong type or out of range (the rules of sample.py's flags)
        *[
            (lambda p, k=key, v=value: p["cases"][0].update(settings={k: v}), f"--{key}")
            for key, values in {
                "max_new_tokens": [True, 2.0, "5", 0],
                "temperature": [True, "hot", None, -1, 1e31, 10**400],
                "top_k": [2.0, True, 0],
                "top_p": ["0.5", True, 0, 1.5],
                "seed": [-1, 2**64, 1.5, "x", None],
                "kv_cache": ["yes", 1, None],
            }.items()
            for value in values
        ],
        # case fields of the wrong type, and a file of the wrong shape
        *[
            (lambda p, k=key, v=value: p["cases"][0].update({k: v}), "malformed")
            for key, value in [
                ("checks", 5),
                ("checks", "decodes"),
                ("checks", [1]),
                ("prompt", 5),
                ("name", None),
                ("kind", ["edge"]),
                ("continuation", 7),
                ("offset", -1),
                ("offset", "12"),
                ("note", {}),
            ]
        ],
        (lambda p: p["cases"].insert(0, 5), "malformed"),
        (lambda p: p.update(cases=5), "'cases' must be a list"),
        (lambda p: p.update(cases={"a": {}}), "'cases' must be a list"),
        (lambda p: p.update(defaults=[1]), "'defaults' an object"),
    ],
)
def test_load_cases_refuses_a_bad_file_in_one_line(tmp_path, edit, message):
    payload = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    edit(payload)
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(UserError, match=message) as error:
        load_cases(path)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="cannot read"):
        load_cases(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[" * 100_000, "cannot read the inference cases"),  # deeper than the parser recurses
        (b"\xff\xfe not utf-8", "cannot read the inference cases"),
        (b'{"version": 1, "cases": [', "cannot read the inference cases"),
        (b"[1, 2]", "cases version None"),
    ],
)
def test_load_cases_refuses_a_file_that_is_not_json_in_one_line(tmp_path, content, message):
    path = tmp_path / "cases.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_cases(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("temperature, top_p", [(1e-7, None), (5e-324, None), (1.0, 1e-7), (1.0, 5e-324)])
def test_a_tiny_temperature_or_top_p_samples_greedily(model, temperature, top_p):
    """Their limit; as they are, float32 would make the probabilities NaN (1e-308 is 0 in float32)."""
    settings = inference.Settings(max_new_tokens=30, temperature=temperature, top_k=None, top_p=top_p)
    greedy = dataclasses.replace(settings, temperature=0.0, top_p=None)
    assert settings.sampling_temperature == 0.0
    assert list(settings.sample(model, [1, 2, 3])) == list(greedy.sample(model, [1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------------
# Prompts, streaming, held-out loss


def test_encode_prompt_starts_an_empty_prompt_and_refuses_unseen_characters(tokenizer):
    assert encode_prompt(tokenizer, "") == [tokenizer.start_id]
    assert tokenizer.decode(encode_prompt(tokenizer, "ROMEO:")) == "ROMEO:"
    with pytest.raises(UserError, match="never saw") as error:
        encode_prompt(tokenizer, "ROMEO @ {9}")
    assert all(c in str(error.value) for c in "@{}9")


def test_stream_decoder_holds_back_partial_bpe_characters():
    gpt2 = build_tokenizer("gpt2")
    text = "JULIETTE:\nRoméo, où es-tu? Ô nuit — 夜よ!\n"
    ids = gpt2.encode(text)
    assert any(gpt2.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))  # the hold-back matters here
    stream = StreamDecoder(gpt2)
    pieces = [stream.feed(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    partial = next(i for i in ids if gpt2.decode([i]) == "\ufffd")  # a token holding part of a character
    assert stream.feed(partial) == "" and stream.flush() == "\ufffd"  # never completed: flushed as it is


def test_continuation_loss_equals_the_full_forward_loss_when_it_fits(model):
    prompt, continuation = [3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5]
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = model(ids[:, :-1])[0, len(prompt) - 1 :]
    expected = F.cross_entropy(logits, ids[0, len(prompt) :]).item()
    assert continuation_loss(model, prompt, continuation) == pytest.approx(expected, rel=1e-5)


def test_continuation_loss_scores_every_target_of_a_text_longer_than_the_context():
    cfg = tiny_config()
    uniform = GPT(cfg, 65).eval()  # the real init zeroes the head: every target costs exactly log(65)
    prompt = list(range(30))
    for n in (1, 7, 8, 9, 50):
        assert continuation_loss(uniform, prompt, list(range(n))) == pytest.approx(math.log(65), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Running the cases


def test_every_case_passes_on_a_tiny_model(model, tokenizer):
    model.train()  # run_cases must switch to eval (no dropout) and give the mode back
    cases = [fast(c) for c in load_cases()]
    results = run_cases(model, tokenizer, cases)
    assert model.training
    assert [r.name for r in results] == [c.name for c in cases]
    for case, r in zip(cases, results, strict=True):
        assert not r.failed and r.total > 0, (r.name, r.checks, r.error)
        if case.continuation is not None:
            assert r.loss is not None and math.isfinite(r.loss) and r.loss > 0
    assert not any(r.error for r in results)
    refused = {r.name: r for r in results if r.sample.startswith("refused: ")}
    assert set(refused) == {"unseen_chars", "non_ascii"}  # the char tokenizer refuses; every other case samples
    for r in refused.values():
        assert r.checks["refuses_unseen"] is True and r.total == 1 and "never saw" in r.sample
    for case, r in zip(cases, results, strict=True):
        if case.name not in refused:
            assert len(r.sample) == FAST_TOKENS, case.name  # one character per token
    table = format_table(results)
    assert all(case.name in table for case in cases) and "FAILED" not in table
    total = sum(r.total for r in results)
    assert f"20 cases: {total}/{total} checks passed; mean held-out loss" in table
    model.eval()


def fake_generate(transform):
    """A generate that draws ids from the torch RNG (seeded by the case's generator) and then bends them."""

    def generate(model, prompt, max_new_tokens, temperature, top_k, top_p, use_cache, generator):
        for step in range(max_new_tokens):
            token_id = int(torch.randint(model.vocab_size, (1,), generator=generator))
            if temperature == 0:
                token_id = step % model.vocab_size
            token_id = transform(token_id, step, use_cache, temperature, generator)
            if token_id is None:
                return
            yield token_id

    return generate


@pytest.mark.parametrize(
    "case_name, transform, failing",
    [
        ("single_char", lambda i, step, *_: None if step == 5 else i, {"length"}),  # stops early
        # samples from the global RNG instead of the seeded generator
        ("single_char", lambda i, step, cache, t, g: int(torch.randint(65, (1,))) if t else i, {"deterministic"}),
        ("single_char", lambda i, step, cache, t, g: (i + cache) % 65, {"cache_equal"}),  # the cache changes ids
        ("top_k_1", lambda i, step, cache, t, g: i, {"greedy_equal"}),  # top-k 1 not greedy
    ],
)
def test_checks_fail_when_generation_misbehaves(monkeypatch, model, tokenizer, case_name, transform, failing):
    monkeypatch.setattr(inference, "generate", fake_generate(transform))
    result = run_case(model, tokenizer, fast(case_named(case_name)))
    assert set(result.failed) == failing


def test_decodes_fails_on_broken_characters(model, tokenizer):
    class Garbling(CharTokenizer):
        def decode(self, ids):
            return "\ufffd" + super().decode(ids)[1:]  # the first character always broken

    result = run_case(model, Garbling(tokenizer.chars), fast(case_named("romeo")))
    assert result.failed == ["decodes"]


@pytest.mark.parametrize("where, decodes", [("end", True), ("middle", False)])
def test_only_a_character_cut_off_at_the_end_may_stay_broken(monkeypatch, model, where, decodes):
    gpt2 = build_tokenizer("gpt2")
    ids = gpt2.encode(" nuit — 夜")
    cut = next(i for i in range(1, len(ids)) if gpt2.decode(ids[:i]).endswith("\ufffd"))  # mid-character
    filler = gpt2.encode(" a") * (FAST_TOKENS - cut)
    sample = filler + ids[:cut] if where == "end" else ids[:cut] + filler
    monkeypatch.setattr(inference, "generate", lambda *args: iter(sample))
    result = run_case(model, gpt2, fast(case_named("single_char")))
    assert result.checks["decodes"] is decodes and result.sample == gpt2.decode(sample)
    assert set(result.failed) == (set() if decodes else {"decodes"})


@pytest.mark.parametrize("behaviour", ["vague", "silent"])
def test_refusal_check_fails_without_a_clear_refusal(model, tokenizer, behaviour):
    class Unclear(CharTokenizer):
        def encode(self, text):
            if behaviour == "vague":
                raise ValueError("bad input")
            return super().encode("".join(c for c in text if c in self.chars))  # drops what it never saw

    result = run_case(model, Unclear(tokenizer.chars), fast(case_named("unseen_chars")))
    assert result.failed == ["refuses_unseen"]


def test_a_crash_fails_the_case_without_ending_the_run(monkeypatch, model, tokenizer):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(inference, "generate", broken)
    result = run_case(model, tokenizer, fast(case_named("romeo")))
    assert result.error == "RuntimeError: boom"
    assert set(result.failed) == set(result.checks) and result.total == len(result.checks)
    assert "FAILED romeo" in format_table([result])


def test_an_unexpected_refusal_fails_every_check(model):
    other = CharTokenizer("abcdefghijklmnopqrstuvwxyz \n")  # a char model trained on other text
    result = run_case(model, other, fast(case_named("romeo")))
    assert result.error and result.total == len(result.checks) and result.passed == 0


# ----------------------------------------------------------------------------------------------------------------
# The memorization check in the cases


def test_each_sampled_case_gets_its_copied_share_and_the_table_shows_it(model, tokenizer):
    cases = [fast(case_named(name)) for name in ("romeo", "unseen_chars", "greedy")]
    calls = []

    def copied(sample, prompt):
        calls.append((sample, prompt))
        return 0.25

    results = run_cases(model, tokenizer, cases, copied=copied)
    assert calls == [(r.sample, c.prompt) for c, r in zip(cases, results, strict=True) if c.name != "unseen_chars"]
    assert [r.copied for r in results] == [0.25, None, 0.25]  # a refused prompt generated nothing to check
    table = format_table(results).splitlines()
    assert table[0].endswith("  checks    loss  copied  sample")
    assert " 25.0%  " in table[2] and "     -  refused: " in table[3]
    assert table[-1].endswith("over 1 cases; mean copied share 25.0%")
    unchecked = format_table(run_cases(model, tokenizer, cases[:1]))
    assert "mean copied share" not in unchecked and unchecked.splitlines()[2].split()[3] == "-"


def test_a_case_whose_sample_is_in_the_training_text_is_all_copied(model, tokenizer):
    case = fast(case_named("romeo"))
    sample = run_case(model, tokenizer, case).sample  # (seeded: the same sample every run)
    index = CopyIndex("a training text holding " + case.prompt + sample + " and more", 32)
    assert run_case(model, tokenizer, case, index.copied_share).copied == 1.0
    assert run_case(model, tokenizer, case, CopyIndex(sample[:31], 32).copied_share).copied == 0.0
