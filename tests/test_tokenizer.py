"""tokenizer.py: gpt2 / o200k_base through tiktoken (offline, through the shared cache) and char; to and from dicts."""

from __future__ import annotations

import pytest

from tokenizer import CharTokenizer, build_tokenizer, tokenizer_from_dict

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
