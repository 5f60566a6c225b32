"""data.py: windows, training epochs, validation batches, and loading text (real and broken)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call_with_deadline, synthetic_text, tiny_config, write_text

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


@pytest.mark.parametrize("n_tokens, context_len, budget", [(101, 10, 10), (101, 10, 35), (1000, 7, 500), (50, 16, 49)])
def test_full_val_batches_under_a_budget_cover_the_first_targets_once(n_tokens, context_len, budget):
    tokens = torch.arange(n_tokens)  # a target's value is its position
    batches = full_val_batches(tokens, 4, context_len, budget)
    targets = [t for _, y in batches for t in y[y != -1].tolist()]
    assert targets == list(range(1, budget + 1))  # the first `budget` targets, each once, in order
    again = full_val_batches(tokens, 4, context_len, budget)  # deterministic: the same windows every time
    assert all(torch.equal(a, b) for pair in zip(batches, again, strict=True) for a, b in zip(*pair, strict=True))


def test_a_budget_over_the_split_is_the_whole_split():
    tokens = torch.arange(101)
    whole, over = full_val_batches(tokens, 3, 10), full_val_batches(tokens, 3, 10, 10**9)
    assert all(torch.equal(a, b) for pair in zip(whole, over, strict=True) for a, b in zip(*pair, strict=True))


def test_val_tokens_below_context_len_is_one_line():
    with pytest.raises(UserError, match=r"--val_tokens 8 is fewer than --context_len 16") as error:
        tiny_config(val_tokens=8)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"--val_tokens must be a positive integer or None, got 0"):
        tiny_config(val_tokens=0)


def test_val_bytes_of_a_text_file_are_those_of_its_val_text(tmp_path):
    text = "naïve café 東京 🙂 " * 50  # 1 to 4 UTF-8 bytes a character
    path = write_text(tmp_path / "t.txt", text)
    cfg = tiny_config(data_path=str(path), val_frac=0.25)
    assert data.val_bytes(cfg) == len(text[int(len(text) * 0.75) :].encode("utf-8")) > len(text) // 4
    assert data.bits_per_byte(2.0, 100, 400) == pytest.approx(2.0 * 100 / 400 / np.log(2))
    assert data.bits_per_byte(2.0, 100, None) is None
    path.unlink()  # gone by the end of the run: no bits per byte, and no error
    assert data.val_bytes(cfg) is None


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


# ----------------------------------------------------------------------------------------------------------------
# Inputs that are not regular files: refused in one line, never opened (a FIFO waits for a writer, /dev/zero never
# ends). A FIFO test runs the call in a thread with a deadline, so a regression fails instead of hanging.


# Run in a child whose heap may grow by at most 1 GiB after its imports: a regression that reads /dev/zero fails
# with a MemoryError in a moment instead of filling the machine's memory. (Linux: /proc/self/status.)
LIMIT_HEAP = (
    "import re, resource; "
    "heap = int(re.search(r'VmData:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024 + 2**30; "
    "resource.setrlimit(resource.RLIMIT_DATA, (heap, heap)); "
)
needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the heap limit reads /proc")


@pytest.fixture
def special_files(tmp_path):
    """name -> a path that exists but is not a regular file."""
    paths = {"folder": tmp_path / "folder", "fifo": tmp_path / "fifo", "link to a fifo": tmp_path / "link"}
    paths["folder"].mkdir()
    os.mkfifo(paths["fifo"])
    paths["link to a fifo"].symlink_to(paths["fifo"])
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "sock"))
        paths["socket"] = tmp_path / "sock"
    except OSError:  # a path too long for a socket address
        pass
    yield paths
    server.close()


@pytest.mark.parametrize("kind", ["folder", "fifo", "link to a fifo", "socket"])
def test_a_data_path_that_is_not_a_regular_file_is_refused_unopened(special_files, kind):
    if kind not in special_files:
        pytest.skip("no socket here")
    path = special_files[kind]
    with pytest.raises(UserError) as info:
        call_with_deadline(lambda: read_text(str(path)), special_files["fifo"])
    expected = {"folder": "a folder", "socket": "a socket, not a regular file"}.get(
        kind, "a FIFO (named pipe), not a regular file"
    )
    assert str(info.value) == f"cannot read --data_path {path}: it is {expected}; give a UTF-8 text file"


@needs_proc
def test_dev_zero_as_data_path_is_refused_unread(tmp_path):
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    code = LIMIT_HEAP + (
        "import data\n"
        f"for path in ('/dev/zero', {str(link)!r}):\n"
        "    try:\n"
        "        data.read_text(path)\n"
        "    except data.UserError as error:\n"
        "        print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(
        "it is a character device, not a regular file; give a UTF-8 text file" in line for line in lines
    )


# ----------------------------------------------------------------------------------------------------------------
# The token cache: a damaged file is rebuilt with a one-line note, never a traceback or silently wrong ids


def npy(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def huge_shape(ids: np.ndarray, raw: bytes) -> bytes:
    """The same file with a header that claims 10^14 ids (the header keeps its length: .npy pads it with spaces)."""
    end = raw.index(b"\n")
    header = raw[:end].replace(f"({len(ids)},)".encode(), b"(100000000000000,)").rstrip(b" ")
    return header.ljust(end, b" ") + raw[end:]


def npz(ids: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, ids=ids)
    return buffer.getvalue()


DAMAGES = {
    "empty": lambda ids, raw: b"",
    "truncated": lambda ids, raw: raw[: len(raw) // 2],
    "one byte short": lambda ids, raw: raw[:-1],
    "one byte long": lambda ids, raw: raw + b"\0",
    "garbage": lambda ids, raw: b"\x93NUMPY garbage \xff\xfe" * 8,
    "int64 ids": lambda ids, raw: npy(ids.astype(np.int64)),
    "float ids": lambda ids, raw: npy(ids.astype(np.float32)),
    "2-D ids": lambda ids, raw: npy(ids.reshape(1, -1)),
    "pickled objects": lambda ids, raw: npy(ids.astype(object), allow_pickle=True),
    "an npz archive": lambda ids, raw: npz(ids),
    "a huge shape in the header": huge_shape,
    "an id past the vocabulary": lambda ids, raw: npy(
        np.where(np.arange(len(ids)) == 7, 60_000, ids).astype(ids.dtype)
    ),
    "one id short": lambda ids, raw: npy(ids[:-1]),
    "other ids": lambda ids, raw: npy(np.roll(ids, 1)),
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(data, "CACHE_DIR", folder)
    return folder


def test_huge_shape_damage_keeps_a_readable_header():
    ids = np.arange(150, dtype=np.uint16)
    damaged = huge_shape(ids, npy(ids))
    assert len(damaged) == len(npy(ids)) and b"(100000000000000,)" in damaged


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_token_cache_is_rebuilt_with_a_note(tmp_path, cache_dir, capsys, tokenizer, damage):
    text = "Roméo, où es-tu? Ô nuit — 夜よ!\n" + synthetic_text(3_000)
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", text)), tokenizer=tokenizer, val_frac=0.2)
    expected = load_dataset(cfg)[1]
    (cache,) = cache_dir.glob("*-train.npy")
    raw = cache.read_bytes()
    ids = np.load(cache)
    cache.write_bytes(DAMAGES[damage](ids, raw))
    capsys.readouterr()
    train = load_dataset(cfg)[1]
    assert torch.equal(train, expected)
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"note: the token cache {cache} ")
    assert notes[0].endswith("; tokenizing again")
    assert np.array_equal(np.load(cache), ids)  # rewritten whole
    load_dataset(cfg)
    assert capsys.readouterr().out == ""  # and then reused without a note


@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling link", "link to /dev/zero"])
def test_a_token_cache_that_is_not_a_regular_file_is_never_opened(tmp_path, cache_dir, capsys, kind):
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", synthetic_text(3_000))), val_frac=0.2)
    expected = load_dataset(cfg)[1]
    (cache,) = cache_dir.glob("*-train.npy")
    cache.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if kind == "folder":
        cache.mkdir()
    elif kind == "fifo":
        os.mkfifo(cache)
    else:
        cache.symlink_to(tmp_path / "nowhere" if kind == "dangling link" else "/dev/zero")
    capsys.readouterr()
    train = call_with_deadline(lambda: load_dataset(cfg)[1], cache if kind == "fifo" else fifo)
    assert torch.equal(train, expected)
    assert "is not a regular file; tokenizing again" in capsys.readouterr().out
    assert cache.is_dir() if kind == "folder" else cache.is_file()  # a folder stays (and is tokenized around)


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_an_intact_token_cache_is_reused_without_a_note(tmp_path, cache_dir, capsys, tokenizer):
    """No false alarm from the end checks: with BPE the first and last 256 ids cut characters in two here."""
    text = ("Roméo, où es-tu? Ô nuit — 夜よ、月よ! " * 150)[:-5]
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", text)), tokenizer=tokenizer, val_frac=0.3)
    first = load_dataset(cfg)
    if tokenizer == "gpt2":
        gpt2, n = first[0], data.CACHE_CHECK_TOKENS
        assert gpt2.decode(first[1][:n].tolist()).endswith("\ufffd")
        assert gpt2.decode(first[2][-n:].tolist()).startswith("\ufffd")
    capsys.readouterr()
    second = load_dataset(cfg)
    assert capsys.readouterr().out == ""
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])


def test_an_unwritable_cache_folder_tokenizes_every_time(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(data, "CACHE_DIR", blocker / "cache")
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", synthetic_text(3_000))), val_frac=0.2)
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(first[1], second[1]) and capsys.readouterr().out == ""
