"""memorization.py: the copied share of crafted texts whose answer is known, against a naive reference, through
hash collisions, and from training tokens or a checkpoint's config (data gone, changed, too large)."""

from __future__ import annotations

import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_text

import data
import memorization
from data import load_dataset, token_fingerprint
from memorization import CopyIndex, checkpoint_index, code_points, training_index, training_text, window_hashes
from tokenizer import CharTokenizer

LETTERS = string.ascii_lowercase
NOVEL = string.digits + "#$%&*+=?@^~"  # characters no crafted training text holds: they can never be copied


def random_text(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.fixture(scope="module")
def train() -> str:
    """2,000 random lowercase letters: no 32-character window repeats by chance (26**32 possibilities)."""
    return random_text(random.Random(0), LETTERS, 2000)


@pytest.fixture(scope="module")
def index(train) -> CopyIndex:
    return CopyIndex(train, 32)


def naive_mask(train: str, text: str, chars: int) -> list[bool]:
    """The definition, O(len(text) * len(train)): a character is copied when a window of `chars` covering it is a
    substring of the training text."""
    covered = [False] * len(text)
    for start in range(len(text) - chars + 1):
        if text[start : start + chars] in train:
            covered[start : start + chars] = [True] * chars
    return covered


# ----------------------------------------------------------------------------------------------------------------
# Crafted texts with a known answer


def test_a_copied_span_of_40_in_novel_text_is_exactly_40_over_the_length(index, train):
    sample = "0123456789" + train[500:540] + "#$%&*+=?@^~#$%&*+=?@"
    assert len(sample) == 70
    assert index.copied_share(sample) == 40 / 70
    assert index.copied_spans(sample) == [(10, 50)]
    assert index.copied_share(train[500:540]) == 1.0  # a sample that is all copy


def test_a_span_one_shorter_than_n_does_not_count(train):
    sample = "0123456789" + train[700:731] + "0123456789"  # 31 copied characters
    assert CopyIndex(train, 32).copied_share(sample) == 0.0
    assert CopyIndex(train, 32).copied_spans(sample) == []
    assert CopyIndex(train, 31).copied_share(sample) == 31 / 51  # ... and at N = 31 it does


def test_overlapping_copied_spans_count_each_character_once(index, train):
    # the training text holds passage[0:40] and, elsewhere, passage[20:60]: the sample's 60 characters are the union
    # of two copied spans that overlap by 20, though passage[0:60] as a whole is nowhere in the training text
    passage = random_text(random.Random(1), LETTERS, 60)
    crafted = CopyIndex(train[:800] + passage[:40] + "." + train[800:1600] + passage[20:60], 32)
    sample = "00" + passage + "00"
    assert crafted.copied_share(sample) == 60 / 64
    assert crafted.copied_spans(sample) == [(2, 62)]
    assert crafted.copied_spans(passage[:40] + "0" + passage[20:60]) == [(0, 40), (41, 81)]  # a gap: two spans
    assert index.copied_spans(train[0:40] + train[100:140]) == [(0, 80)]  # touching spans: one span


def test_unicode_characters_are_code_points(train):
    # accents, CJK, astral emoji, a ligature, a combining mark
    chunk = "Ünïcödé — 日本語のテキスト 🙂🎭 naïve ﬁ é\u0301 " * 3
    crafted = CopyIndex("ascii " * 50 + chunk + " tail" * 20, 32)
    copied = chunk[5:45]
    sample = "😀😀😀" + copied + "0123456789"
    assert len(copied) == 40 and len(sample) == 53  # an emoji is one character, as Python counts
    assert crafted.copied_share(sample) == 40 / 53
    assert crafted.copied_spans(sample) == [(3, 43)]
    assert code_points("a🙂b").tolist() == [97, 0x1F642, 98]


def test_a_text_shorter_than_n_or_an_empty_one_shares_nothing(index, train):
    assert index.copied_share(train[:31]) == 0.0  # all of it is in the training text, but shorter than a span
    assert index.copied_share("") == 0.0 and index.copied_spans("") == []
    tiny = CopyIndex("abc", 32)  # a training text shorter than N holds no window at all
    assert len(tiny.hashes) == 0 and tiny.copied_share("abc" * 20) == 0.0


def test_a_prompt_counts_for_spans_but_not_for_the_share(index, train):
    prompt, sample = train[300:320], train[320:340] + "0123456789" * 2  # 20 + 20 copied from one passage
    assert index.copied_share(sample) == 0.0  # alone, its 20 copied characters are no span of 32
    assert index.copied_share(sample, prompt) == 20 / 40  # the model went on reciting what the prompt began
    assert index.copied_share("0" * 10, train[:100]) == 0.0  # a copied prompt is not the model's copying


def test_every_occurrence_of_a_repeated_window_is_found():
    crafted = CopyIndex("ab" * 100, 8)  # every window repeats: the hashes hold equal runs
    assert crafted.copied_share("xx" + "ab" * 10 + "xx") == 20 / 24
    assert crafted.copied_share("aa" * 10) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Collisions and the naive reference


def thue_morse(length: int) -> str:
    return "".join("ab"[bin(i).count("1") % 2] for i in range(length))


def test_a_real_hash_collision_is_never_counted_as_a_copy():
    # a Thue-Morse string of 2**11 characters and its complement have equal polynomial hashes modulo 2**64 for any
    # odd base (their difference is a product of eleven factors B**(2**i) - 1, each divisible by 2**(i + 1) or more)
    train, other = thue_morse(2048), thue_morse(2048).translate(str.maketrans("ab", "ba"))
    codes = [code_points(text) for text in (train, other)]
    assert window_hashes(codes[0], 2048)[0] == window_hashes(codes[1], 2048)[0] and train != other
    crafted = CopyIndex(train, 2048)
    assert crafted.copied_share(other) == 0.0 and crafted.copied_share(train) == 1.0


def test_the_answer_does_not_depend_on_the_hash(monkeypatch):
    # every window hashing alike: each lookup proposes every training window, and the characters alone decide
    def one_hash(codes, chars):
        return np.zeros(max(len(codes) - chars + 1, 0), dtype=np.uint64)

    monkeypatch.setattr(memorization, "window_hashes", one_hash)
    rng = random.Random(2)
    for _ in range(100):
        train, text, chars = random_text(rng, "ab", 60), random_text(rng, "ab", 30), rng.randint(1, 6)
        assert CopyIndex(train, chars).copied_mask(text).tolist() == naive_mask(train, text, chars)


def test_the_share_equals_a_naive_reference_on_random_small_alphabets():
    rng = random.Random(3)
    for _ in range(400):
        alphabet = "abcd"[: rng.randint(1, 4)] + rng.choice(("", "é", "🙂"))
        train = random_text(rng, alphabet, rng.randint(0, 200))
        prompt, text = random_text(rng, alphabet, rng.randint(0, 10)), random_text(rng, alphabet, rng.randint(0, 60))
        chars = rng.randint(1, 10)
        crafted = CopyIndex(train, chars)
        mask = naive_mask(train, prompt + text, chars)
        assert crafted.copied_mask(prompt + text).tolist() == mask, (train, prompt, text, chars)
        assert crafted.copied_share(text, prompt) == (sum(mask[len(prompt) :]) / len(text) if text else 0.0)
        runs = [(s, e) for s, e in crafted.copied_spans(prompt + text)]
        assert all(e - s >= chars for s, e in runs)
        assert [i for s, e in runs for i in range(s, e)] == [i for i, c in enumerate(mask) if c]


def test_n_must_be_a_positive_integer():
    for chars in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chars must be a positive integer"):
            CopyIndex("abc", chars)


# ----------------------------------------------------------------------------------------------------------------
# From training tokens, and from a checkpoint's config


def test_the_index_of_training_tokens_decodes_them(capsys, train):
    tokenizer = CharTokenizer.from_text(train)
    tokens = torch.tensor(tokenizer.encode(train))
    assert training_text(tokenizer, tokens) == train
    built = training_index(tokenizer, tokens, 32)
    assert built.text == train and built.copied_share(train[10:50] + "0" * 40) == 0.5
    assert capsys.readouterr().out == ""


def test_a_training_split_too_large_is_skipped_with_one_line(monkeypatch, capsys, train):
    monkeypatch.setattr(memorization, "MAX_TRAIN_TOKENS", 1000)
    tokenizer = CharTokenizer.from_text(train)
    assert training_index(tokenizer, torch.tensor(tokenizer.encode(train))) is None
    out = capsys.readouterr().out
    assert out.startswith("note: memorization check skipped: training split too large (2,000 tokens")
    assert out.count("\n") == 1


@pytest.fixture
def text_config(tmp_path, monkeypatch, train):
    """A char config whose data_path is a crafted text (train, then 500 more letters), prepared into a temporary
    cache (prepare.py says so on stdout: the notes are the last line)."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    path = write_text(tmp_path / "crafted.txt", train + random_text(random.Random(4), LETTERS, 500))
    return tiny_config(data_path=str(path))


def test_a_checkpoint_config_indexes_its_training_split(capsys, text_config, train):
    built = checkpoint_index(text_config, None)
    full = Path(text_config.data_path).read_text(encoding="utf-8")
    assert built.text == full[: len(built.text)] and abs(len(built.text) - 2250) <= 1  # the first 90%, decoded
    assert built.copied_share("0123456789" + train[1000:1040]) == 40 / 50
    dataset = load_dataset(text_config)
    assert checkpoint_index(text_config, token_fingerprint(dataset.train, dataset.val)).text == built.text
    assert "memorization check skipped" not in capsys.readouterr().out


def test_data_that_changed_since_training_is_skipped(capsys, text_config):
    fingerprint = {"train_tokens": 2250, "val_tokens": 250, "sha256": "0" * 16}  # other tokens than the file's now
    assert checkpoint_index(text_config, fingerprint) is None
    reason = f"{text_config.data_path} now holds other tokens than the checkpoint was trained on"
    assert capsys.readouterr().out.splitlines()[-1] == f"note: memorization check skipped: {reason}"


def test_data_that_is_gone_is_skipped_and_never_downloaded(monkeypatch, capsys, tmp_path):
    cfg = tiny_config(data_path=str(tmp_path / "gone.txt"))
    assert checkpoint_index(cfg, None) is None
    out = capsys.readouterr().out
    assert out == f"note: memorization check skipped: the training data {tmp_path / 'gone.txt'} is not there any more\n"

    def download(path):
        raise AssertionError("the memorization check downloaded Tiny Shakespeare")

    monkeypatch.setattr(data, "download_tiny_shakespeare", download)
    monkeypatch.setattr(memorization, "resolve_data_path", lambda data_path: tmp_path / "absent" / "tiny.txt")
    assert checkpoint_index(tiny_config(), None) is None  # the default data_path, missing: a note, no download
    assert "data/tiny_shakespeare.txt is not there any more" in capsys.readouterr().out


def test_any_failure_of_the_check_is_a_note_not_a_crash(monkeypatch, capsys, text_config):
    def broken(*args):
        raise MemoryError("no room")

    monkeypatch.setattr(memorization, "CopyIndex", broken)
    assert checkpoint_index(text_config, None) is None
    assert capsys.readouterr().out.splitlines()[-1] == "note: memorization check skipped: MemoryError: no room"
