"""data.py: windows, training epochs, validation batches, and loading text (real and broken)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, write_text

import data
from config import UserError
from data import TrainBatches, fixed_val_batches, full_val_batches, gather_windows, load_dataset, read_text

CPU = torch.device("cpu")


def test_gather_windows_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(100) * 3  # distinct values that are not their positions
    starts = torch.tensor([0, 7, 50, 100 - 9])
    x, y = gather_windows(tokens, starts, 8)
    assert x.shape == y.shape == (4, 8)
    for row, start in enumerate(starts.tolist()):
        assert torch.equal(x[row], tokens[start : start + 8])
        assert torch.equal(y[row], tokens[start + 1 : start + 9])
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_gather_windows_out_of_bounds_raises():
    with pytest.raises(IndexError):
        gather_windows(torch.arange(10), torch.tensor([2]), 8)  # needs tokens[2 .. 10]


@pytest.mark.parametrize("n_tokens, context_len, batch_size", [(1000, 16, 4), (1001, 7, 5), (64, 8, 7), (73, 8, 2)])
def test_an_epoch_visits_non_overlapping_windows(n_tokens, context_len, batch_size):
    tokens = torch.arange(n_tokens)  # a token's value is its position
    batches = TrainBatches(tokens, batch_size, context_len, seed=3, device=CPU)
    wpe = batches.windows_per_epoch
    assert wpe == (n_tokens - context_len) // context_len  # the most windows that fit after any offset
    for epoch in range(3):
        starts = []
        for _ in range(batches.batches_per_epoch):
            x, y = batches.next_batch()
            assert batches.epoch == epoch
            assert x.shape == y.shape == (batch_size, context_len)
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(y, x + 1) and int(y.max()) < n_tokens and int(x.min()) >= 0
            starts += x[:, 0].tolist()
        assert len(starts) == len(set(starts)) == batches.batches_per_epoch * batch_size
        ordered = sorted(starts)
        assert all(b - a >= context_len for a, b in zip(ordered, ordered[1:], strict=False))  # no overlap
        assert all((s - ordered[0]) % context_len == 0 for s in ordered)  # one grid per epoch
        assert ordered[0] < context_len * (wpe - batches.batches_per_epoch * batch_size + 1)
    assert batches.next_batch()[0].shape == (batch_size, context_len) and batches.epoch == 3


def test_epochs_differ_in_order_and_offset():
    batches = TrainBatches(torch.arange(5000), 8, 16, seed=0, device=CPU)
    first = [batches.next_batch()[0][:, 0] for _ in range(batches.batches_per_epoch)]
    second = [batches.next_batch()[0][:, 0] for _ in range(batches.batches_per_epoch)]
    assert not torch.equal(torch.cat(first), torch.cat(second))


def test_batches_cover_almost_every_token_each_epoch():
    n, context_len, batch_size = 10_000, 16, 4
    batches = TrainBatches(torch.arange(n), batch_size, context_len, seed=1, device=CPU)
    seen = torch.zeros(n, dtype=torch.bool)
    for _ in range(batches.batches_per_epoch):
        x, _ = batches.next_batch()
        seen[x.flatten()] = True
    assert seen.sum() >= n - (batch_size + 2) * context_len


def test_batch_values_are_real_token_ids():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(65, (3000,), generator=g)
    batches = TrainBatches(tokens, 6, 20, seed=5, device=CPU)
    for _ in range(30):
        x, y = batches.next_batch()
        assert int(x.max()) < 65 and int(y.max()) < 65 and int(x.min()) >= 0


def test_state_dict_reproduces_the_following_batches():
    tokens = torch.arange(2000)
    batches = TrainBatches(tokens, 4, 16, seed=7, device=CPU)
    for _ in range(batches.batches_per_epoch + 5):  # into the second epoch
        batches.next_batch()
    state = batches.state_dict()
    assert state == {"epoch": 1, "position": 5 * 4}
    expected = [batches.next_batch() for _ in range(3 * batches.batches_per_epoch)]

    resumed = TrainBatches(tokens, 4, 16, seed=7, device=CPU)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)


def test_same_seed_same_batches_other_seed_other_batches():
    tokens = torch.arange(2000)
    a, b, c = (TrainBatches(tokens, 4, 16, seed=s, device=CPU) for s in (1, 1, 2))
    xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_too_few_windows_for_a_batch_raises():
    with pytest.raises(UserError, match="batch_size"):
        TrainBatches(torch.arange(100), 8, 16, seed=0, device=CPU)


def test_fixed_val_batches_are_fixed():
    tokens = torch.arange(500)
    first = fixed_val_batches(tokens, 4, 16, 3)
    second = fixed_val_batches(tokens, 4, 16, 3)
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert x1.shape == (4, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1, x1 + 1)
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert int(starts[0]) == 0 and int(starts[-1]) == 500 - 17  # spread over the whole split
    assert len(set(starts.tolist())) == 12


@pytest.mark.parametrize("n_tokens, context_len, batch_size", [(101, 10, 3), (100, 10, 4), (17, 16, 2), (1000, 7, 8)])
def test_full_val_batches_cover_every_target_once(n_tokens, context_len, batch_size):
    tokens = torch.arange(n_tokens)  # a target's value is its position
    batches = full_val_batches(tokens, batch_size, context_len)
    targets = []
    for x, y in batches:
        assert x.shape == y.shape and x.shape[1] == context_len and len(x) <= batch_size
        kept = y != -1
        assert torch.equal(y[kept], (x + 1)[kept])
        targets += y[kept].tolist()
    assert len(targets) == n_tokens - 1
    assert sorted(targets) == list(range(1, n_tokens))


# ----------------------------------------------------------------------------------------------------------------
# Loading text


def test_tiny_shakespeare_gpt2_token_counts(shakespeare_path):
    cfg = tiny_config(data_path=str(shakespeare_path), tokenizer="gpt2", val_frac=0.1)
    tokenizer, train, val = load_dataset(cfg)
    assert tokenizer.vocab_size == 50257
    assert (len(train), len(val)) == (301_966, 36_059)
    assert train.dtype == val.dtype == torch.int64
    text = shakespeare_path.read_text(encoding="utf-8")
    assert text.startswith(tokenizer.decode(train[:200].tolist()))
    assert text.endswith(tokenizer.decode(val[-200:].tolist()))
    assert int(train.min()) >= 0 and int(train.max()) < 50257


def test_tiny_shakespeare_char_split(shakespeare_path):
    cfg = tiny_config(data_path=str(shakespeare_path), tokenizer="char", val_frac=0.1)
    tokenizer, train, val = load_dataset(cfg)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert tokenizer.vocab_size == 65
    split = int(len(text) * 0.9)
    assert (len(train), len(val)) == (split, len(text) - split)
    assert tokenizer.decode(train[:100].tolist()) == text[:100]
    assert tokenizer.decode(val[-100:].tolist()) == text[-100:]


def test_load_dataset_reads_a_small_file(tmp_path):
    text = "abcdefghij" * 20
    path = write_text(tmp_path / "t.txt", text)
    tokenizer, train, val = load_dataset(tiny_config(data_path=str(path), val_frac=0.25, context_len=8))
    assert tokenizer.vocab_size == 10
    assert len(train) == 150 and len(val) == 50
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == text


def test_not_utf8_names_the_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"line one\nline two caf\xe9 and more\n" * 10)
    with pytest.raises(UserError) as info:
        load_dataset(tiny_config(data_path=str(path)))
    message = str(info.value)
    assert "offset 21" in message and "0xe9" in message and "line 2" in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"   \n\n\t  \n"])
def test_empty_file_raises(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="empty"):
        read_text(str(path))


@pytest.mark.parametrize("val_frac, split", [(0.1, "validation"), (0.5, "training")])
def test_split_shorter_than_context_raises(tmp_path, val_frac, split):
    text = "abcdefgh" * 25  # 200 characters
    if split == "training":
        context_len = 120  # both halves have 100 tokens
    else:
        context_len = 32  # 20 validation tokens
    path = write_text(tmp_path / "short.txt", text)
    with pytest.raises(UserError) as info:
        load_dataset(tiny_config(data_path=str(path), context_len=context_len, val_frac=val_frac))
    assert split in str(info.value) and "context_len" in str(info.value)


def test_missing_data_path_raises(tmp_path):
    missing = tmp_path / "nope" / "input.txt"
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tiny_config(data_path=str(missing)))
    with pytest.raises(UserError, match="does not exist"):
        read_text("surely/not/here.txt")


def test_folder_as_data_path_raises(tmp_path):
    with pytest.raises(UserError, match="folder"):
        read_text(str(tmp_path))


def test_token_cache_is_reused(tmp_path):
    path = write_text(tmp_path / "c.txt", "hello there, general kenobi\n" * 20)
    cfg = tiny_config(data_path=str(path), val_frac=0.2, context_len=8)
    first = load_dataset(cfg)
    second = load_dataset(cfg)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert any(data.CACHE_DIR.glob("*-char-0.2-train.npy"))
