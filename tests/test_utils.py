"""utils.py: tokenizers (offline tiktoken through the shared cache), device choice, small helpers."""

from __future__ import annotations

import pytest
import torch

import utils
from config import UserError
from utils import (
    CharTokenizer,
    build_tokenizer,
    format_duration,
    human,
    resolve_device,
    resolve_dtype,
    tokenizer_from_dict,
)

MIXED = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "Ünïcödé: café, naïve, 日本語のテキスト, Привет, emoji 🙂👍🏽, math ∑∫√, tabs\tand  double  spaces\r\n"
    "<|endoftext|> is just text here. 12345 + 0.5e-3\n"
)


@pytest.mark.parametrize("name", ["gpt2", "o200k_base"])
def test_tiktoken_round_trip(name):
    tokenizer = build_tokenizer(name)
    ids = tokenizer.encode(MIXED)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer_from_dict(tokenizer.to_dict()).encode(MIXED) == ids


def test_known_ids():
    assert build_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    assert build_tokenizer("o200k_base").encode("hello world") == [24912, 2375]


def test_tiktoken_vocab_and_start_id():
    gpt2 = build_tokenizer("gpt2")
    assert gpt2.vocab_size == 50257 and gpt2.start_id == 50256
    assert "<|endoftext|>" not in [gpt2.decode([i]) for i in gpt2.encode("<|endoftext|>")]  # ordinary text
    o200k = build_tokenizer("o200k_base")
    assert o200k.vocab_size > 200_000 and 0 <= o200k.start_id < o200k.vocab_size


def test_char_round_trip():
    tokenizer = build_tokenizer("char", MIXED)
    assert tokenizer.vocab_size == len(set(MIXED))
    assert tokenizer.chars == "".join(sorted(set(MIXED)))
    ids = tokenizer.encode(MIXED)
    assert len(ids) == len(MIXED) and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer.start_id == tokenizer.chars.index("\n")
    restored = tokenizer_from_dict(tokenizer.to_dict())
    assert isinstance(restored, CharTokenizer) and restored.encode(MIXED) == ids


def test_char_ids_follow_sorted_characters():
    tokenizer = CharTokenizer.from_text("hello world\n")
    assert tokenizer.chars == "\n dehlorw"
    assert tokenizer.encode("hold") == [4, 6, 5, 2]


def test_char_tokenizer_rejects_unseen_characters():
    tokenizer = CharTokenizer.from_text("abc abc\n")
    with pytest.raises(ValueError) as info:
        tokenizer.encode("a bad cab!")
    message = str(info.value)
    assert "'!d'" in message and "never saw" in message


def test_char_tokenizer_needs_text():
    with pytest.raises(ValueError):
        build_tokenizer("char")


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA"):
        resolve_device("cuda")


def test_resolve_device_mps_without_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="mps"):
        resolve_device("mps")


def test_resolve_device_auto_and_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, compiled=False) == torch.float32  # eager CPU attention is slow in bf16
    native = torch.bfloat16 if utils.cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu, compiled=True) == native
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32


def test_seed_everything_is_reproducible():
    utils.seed_everything(3)
    a = torch.rand(4)
    utils.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_formatting_helpers():
    assert human(12_345_678) == "12.3M"
    assert human(999) == "999"
    assert human(1500) == "1.5k"
    assert human(2.5e9) == "2.5B"
    assert format_duration(59) == "0m59s"
    assert format_duration(3725) == "1h02m05s"
