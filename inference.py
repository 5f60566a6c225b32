"""Inference shared by sample.py, serve.py and train.py: a checkpoint loaded for sampling, prompts to ids, ids to
streamed text, and the 20 inference cases.

The cases live in inference_cases.json: a prompt, decoding settings and the automatic checks each must pass. The
Shakespeare ones start a passage of the validation split and carry its true continuation, so the model's loss on
that continuation scores a checkpoint case by case. `run_cases` runs them, `format_table` shows the results; given
the memorization check's `copied` (memorization.CopyIndex.copied_share), each generated text's copied share too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoint import EMA_FILE, load_checkpoint, resolve_checkpoint
from config import UserError
from model import GPT, generate
from tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict
from utils import check_regular_file, resolve_device

CASES_PATH = Path(__file__).resolve().parent / "inference_cases.json"
CASES_VERSION = 1
CHECKS = ("decodes", "length", "deterministic", "cache_equal", "greedy_equal", "refuses_unseen")
CHECK_TOKENS = 32  # greedy tokens compared with and without the cache: the uncached path re-runs the whole window


# ----------------------------------------------------------------------------------------------------------------
# Prompts, decoding settings, streaming


MAX_TEMPERATURE = 1e30  # float32 logits divided by more than 3.4e38 (float32's largest) give NaN probabilities
GREEDY_BELOW = 1e-6  # a temperature or top_p under this samples greedily (its limit): see Settings
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest seed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a flag


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # (math.isfinite would overflow on a huge int)


@dataclass
class Settings:
    """How to sample: the flags of sample.py, and the per-case settings of the cases file.

    Rules: max_new_tokens a positive integer (no upper bound: generation streams until it is done or stopped);
    temperature 0 (greedy) or positive up to MAX_TEMPERATURE, where one under GREEDY_BELOW samples greedily (the
    limit as it goes to 0; dividing float32 logits by it could overflow them to inf and the probabilities to NaN);
    top_k a positive integer or None (one above the vocabulary keeps every id); top_p in (0, 1] or None, where one
    under GREEDY_BELOW is greedy too (the nucleus is the likeliest id alone while top_p < 1 / vocabulary size, and
    below 1e-45 top_p is 0 in float32, which would drop every id); seed an integer from 0 to 2**64 - 1; kv_cache a
    bool. Anything else is a UserError naming the flag."""

    max_new_tokens: int = 300
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    seed: int = 1337
    kv_cache: bool = True

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise UserError(f"--max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not (_is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise UserError(
                f"--temperature must be zero (greedy) or a positive number no larger than 1e30, got {self.temperature}"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k <= 0):
            raise UserError(f"--top_k must be a positive integer or None, got {self.top_k}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise UserError(f"--top_p must be above 0 and at most 1, or None, got {self.top_p}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be an integer from 0 to 2**64 - 1, got {self.seed}")
        if not isinstance(self.kv_cache, bool):
            raise UserError(f"--kv_cache must be true or false, got {self.kv_cache!r}")

    @property
    def sampling_temperature(self) -> float:
        """The temperature generate() gets: 0 (greedy) under GREEDY_BELOW, or with a top_p under it."""
        if self.temperature < GREEDY_BELOW or (self.top_p is not None and self.top_p < GREEDY_BELOW):
            return 0.0
        return float(self.temperature)

    def sample(self, model: GPT, prompt_ids: list[int], generator: torch.Generator | None = None) -> Iterator[int]:
        """generate() with these settings; a fresh generator seeded with `seed` unless one is passed in."""
        if generator is None:
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(self.seed)
        return generate(
            model,
            prompt_ids,
            self.max_new_tokens,
            self.sampling_temperature,
            self.top_k,
            self.top_p,
            self.kv_cache,
            generator,
        )


def load_model(checkpoint: str, device_name: str, weights: str | None = None) -> tuple[GPT, Tokenizer, str]:
    """(model, tokenizer, which weights: "ema" or "raw"); weights None: the EMA when the checkpoint has one."""
    device = resolve_device(device_name)
    if not Path(checkpoint).exists():
        raise UserError(
            f"--checkpoint {checkpoint} does not exist; pass a step_* folder or a run folder (models/<run>)"
        )
    folder = resolve_checkpoint(checkpoint, usable_for="sample")  # (here, to know which weights it holds)
    model, tokenizer_dict, _ = load_checkpoint(folder, device, weights)
    which = "ema" if weights != "raw" and (folder / EMA_FILE).is_file() else "raw"
    try:
        tokenizer = tokenizer_from_dict(tokenizer_dict)
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {checkpoint} has a damaged tokenizer.json; use an earlier step_* folder") from None
    return model.eval(), tokenizer, which


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; an empty prompt becomes the tokenizer's start id, since generate needs one token."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as error:  # the char tokenizer refuses characters it never saw
        raise UserError(f"cannot encode the prompt: {error}") from None
    return ids or [tokenizer.start_id]


class StreamDecoder:
    """Token ids in, printable text out, one id at a time.

    A BPE token may hold only part of a multi-byte character, which decodes to U+FFFD until the next token
    completes it; such a tail is held back. Once the pending ids decode to whole characters they are emitted and
    dropped, so each id is decoded a bounded number of times."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def feed(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back (a character the model never completed)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


@torch.no_grad()
def continuation_loss(model: GPT, prompt_ids: list[int], continuation_ids: list[int]) -> float:
    """Mean per-token cross-entropy of continuation_ids following prompt_ids (which must not be empty).

    Targets are scored in chunks of context_len // 2 through windows of up to context_len tokens, so any length fits
    and every target sees at least context_len // 2 tokens before it (where there are), as generation does."""
    device = next(model.parameters()).device
    context_len = model.cfg.context_len
    chunk = max(1, context_len // 2)
    ids = torch.tensor(prompt_ids + continuation_ids, device=device)
    total = 0.0
    for start in range(len(prompt_ids), len(ids), chunk):
        end = min(len(ids), start + chunk)  # score the targets ids[start:end]
        first = max(0, end - 1 - context_len)  # their inputs ids[first:end - 1] fill at most the window
        targets = ids[first + 1 : end].clone()
        targets[: start - 1 - first] = -1  # the window's leading targets are context, not scored
        total += model(ids[first : end - 1][None], targets[None], reduction="sum").item()
    return total / len(continuation_ids)


# ----------------------------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    name: str
    kind: str  # shakespeare, edge or decoding
    prompt: str
    settings: Settings
    checks: list[str]
    continuation: str | None = None  # the true next characters of the passage (held-out cases only)
    offset: int | None = None  # where the prompt starts in data/tiny_shakespeare.txt (held-out cases only)
    note: str = ""

    def __post_init__(self) -> None:  # a field of the wrong type would fail later, as a traceback mid-run
        for name, kind in (("name", str), ("kind", str), ("prompt", str), ("note", str)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.checks, list) or not all(isinstance(c, str) for c in self.checks):
            raise TypeError(f"checks must be a list of check names, got {self.checks!r}")
        if self.continuation is not None and not isinstance(self.continuation, str):
            raise TypeError(f"continuation must be a string, got {self.continuation!r}")
        if self.offset is not None and not (_is_int(self.offset) and self.offset >= 0):
            raise TypeError(f"offset must be a non-negative integer, got {self.offset!r}")


@dataclass
class CaseResult:
    name: str
    checks: dict[str, bool | None]  # None: not applicable (the generation checks of a prompt rightly refused)
    loss: float | None = None  # mean per-token loss of the held-out continuation
    sample: str = ""  # the generated text, or the refusal
    error: str | None = None  # what went wrong: a crash, a refusal the case did not expect, an unencodable continuation
    prompt_tokens: int = 0
    seconds: float = 0.0
    copied: float | None = None  # the sample's share inside verbatim training spans (memorization.py); None: unchecked

    @property
    def passed(self) -> int:
        return sum(ok is True for ok in self.checks.values())

    @property
    def total(self) -> int:
        return sum(ok is not None for ok in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if ok is False]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_cases(path: str | Path = CASES_PATH) -> list[Case]:
    """The cases of a cases file, each with the file's default settings under its own; refuses a bad file in one line."""
    check_regular_file(path, "--cases_file", "a cases JSON file")  # a FIFO or /dev/zero would be read forever
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: JSON nested thousands deep
        raise UserError(f"cannot read the inference cases {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("version") != CASES_VERSION:
        found = payload.get("version") if isinstance(payload, dict) else None
        raise UserError(f"{path} has cases version {found!r}; this sample.py reads version {CASES_VERSION}")
    entries, defaults = payload.get("cases", []), payload.get("defaults", {})
    if not isinstance(entries, list) or not isinstance(defaults, dict):
        raise UserError(f"{path}: 'cases' must be a list and 'defaults' an object")
    cases = []
    for i, entry in enumerate(entries):
        try:
            settings = Settings(**{**defaults, **entry.get("settings", {})})
            case = Case(settings=settings, **{k: v for k, v in entry.items() if k != "settings"})
        except (TypeError, AttributeError, UserError) as error:
            raise UserError(f"{path}: case {i} is malformed ({error})") from None
        unknown = [c for c in case.checks if c not in CHECKS]
        if unknown:
            raise UserError(f"{path}: case {case.name!r} asks for unknown checks {unknown}; known: {', '.join(CHECKS)}")
        cases.append(case)
    if not cases:
        raise UserError(f"{path} holds no cases")
    return cases


def run_case(
    model: GPT, tokenizer: Tokenizer, case: Case, copied: Callable[[str, str], float] | None = None
) -> CaseResult:
    """Sample one case and run its checks; a crash fails the case instead of ending the run. `copied(sample, prompt)`,
    when given, is the memorization check: the generated text's copied share (not of a refused prompt)."""
    started = time.perf_counter()
    result = CaseResult(case.name, {name: None for name in case.checks})
    # what the char tokenizer must refuse: the oracle for the refusal check, independent of the tokenizer's code
    unseen = sorted(set(case.prompt) - set(tokenizer.chars)) if isinstance(tokenizer, CharTokenizer) else []
    try:
        prompt_ids = encode_prompt(tokenizer, case.prompt)
    except UserError as error:
        message = str(error)
        expected = bool(unseen) and "refuses_unseen" in case.checks  # then sampling checks do not apply
        for name in case.checks:
            if name == "refuses_unseen":  # a clear refusal names every character it cannot encode
                result.checks[name] = bool(unseen) and all(c in message for c in unseen)
            else:
                result.checks[name] = None if expected else False
        result.sample = f"refused: {message}"
        result.error = None if expected else message
        result.seconds = time.perf_counter() - started
        return result
    result.prompt_tokens = len(prompt_ids)
    try:
        settings = case.settings
        stream = StreamDecoder(tokenizer)
        ids, pieces = [], []
        for token_id in settings.sample(model, prompt_ids):
            ids.append(token_id)
            pieces.append(stream.feed(token_id))
        streamed = "".join(pieces)
        result.sample = streamed + stream.flush()
        if copied is not None:
            result.copied = copied(result.sample, case.prompt)

        def greedy(n: int, kv_cache: bool) -> list[int]:
            greedy_settings = dataclasses.replace(settings, max_new_tokens=n, temperature=0.0, kv_cache=kv_cache)
            return list(greedy_settings.sample(model, prompt_ids))

        for name in case.checks:
            if name == "refuses_unseen":  # the prompt was accepted: right unless it holds characters never seen
                ok = not unseen
            elif name == "decodes":  # the stream adds up to the whole decode, with no broken characters (only the
                # last one may be cut off by the length limit: it stays held back until the flush)
                ok = result.sample == tokenizer.decode(ids) and "\ufffd" not in streamed
            elif name == "length":
                ok = len(ids) == settings.max_new_tokens
            elif name == "deterministic":
                ok = list(settings.sample(model, prompt_ids)) == ids
            elif name == "cache_equal":
                n = min(CHECK_TOKENS, settings.max_new_tokens)
                ok = greedy(n, kv_cache=True) == greedy(n, kv_cache=False)
            else:  # greedy_equal: this case's settings (e.g. top-k 1) must pick what greedy picks
                ok = ids == greedy(settings.max_new_tokens, settings.kv_cache)
            result.checks[name] = ok
        if case.continuation:
            result.loss = continuation_loss(model, prompt_ids, tokenizer.encode(case.continuation))
    except Exception as error:  # any failure is this case's, reported in its row
        result.error = f"{type(error).__name__}: {error}"
        result.checks = {name: ok if ok is not None else False for name, ok in result.checks.items()}
    result.seconds = time.perf_counter() - started
    return result


def run_cases(
    model: GPT,
    tokenizer: Tokenizer,
    cases: list[Case] | None = None,
    progress: bool = False,
    copied: Callable[[str, str], float] | None = None,
) -> list[CaseResult]:
    """Run the cases (default: inference_cases.json) on the model's device; the model's train/eval mode is kept.
    copied: the memorization check's share of a sample given its prompt (see run_case), or None."""
    cases = load_cases() if cases is None else cases
    was_training = model.training
    model.eval()  # no dropout in the samples or the held-out loss
    results = []
    for i, case in enumerate(cases, 1):
        results.append(run_case(model, tokenizer, case, copied))
        if progress:
            r = results[-1]
            print(f"case {i:>2}/{len(cases)} {case.name}: {r.passed}/{r.total} checks, {r.seconds:.1f}s", flush=True)
    model.train(was_training)
    return results


def format_table(results: list[CaseResult], sample_width: int = 60) -> str:
    """One row per case (name, checks passed, held-out loss, copied share, the sample's start), then a summary and
    the failures. A share not measured (no check, a refused prompt) shows as '-'."""
    width = max(len("case"), *(len(r.name) for r in results))
    rule = "-" * (width + 32 + sample_width)
    lines = [f"{'case':<{width}}  {'checks':<6}  {'loss':>6}  {'copied':>6}  sample", rule]
    for r in results:
        checks = f"{r.passed}/{r.total}"
        loss = f"{r.loss:6.3f}" if r.loss is not None else f"{'-':>6}"
        copied = f"{r.copied:6.1%}" if r.copied is not None else f"{'-':>6}"
        sample = json.dumps(r.sample, ensure_ascii=False)[1:-1]  # newlines as \n, so each case keeps one line
        if len(sample) > sample_width:
            sample = sample[: sample_width - 3] + "..."
        lines.append(f"{r.name:<{width}}  {checks:<6}  {loss}  {copied}  {sample}")
    passed, total = sum(r.passed for r in results), sum(r.total for r in results)
    losses = [r.loss for r in results if r.loss is not None]
    shares = [r.copied for r in results if r.copied is not None]
    summary = f"{len(results)} cases: {passed}/{total} checks passed"
    if losses:
        summary += f"; mean held-out loss {sum(losses) / len(losses):.3f} over {len(losses)} cases"
    if shares:
        summary += f"; mean copied share {sum(shares) / len(shares):.1%}"
    lines += [rule, summary]
    for r in results:
        if r.failed:
            lines.append(f"FAILED {r.name}: {', '.join(r.failed)}" + (f" ({r.error})" if r.error else ""))
        elif r.error:
            lines.append(f"error in {r.name}: {r.error}")
    return "\n".join(lines)
