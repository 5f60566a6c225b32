"""data.py: windows, training epochs, validation batches, and loading text through the token cache (real and broken)."""

from __future__ import annotations

import json
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
import prepare
from config import UserError
from data import TrainBatches, fixed_val_batches, full_val_batches, gather_windows, load_dataset

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
    assert load_dataset(cfg).val_bytes == len(text[int(len(text) * 0.75) :].encode("utf-8")) > len(text) // 4
    assert data.bits_per_byte(2.0, 100, 400) == pytest.approx(2.0 * 100 / 400 / np.log(2))
    assert data.bits_per_byte(2.0, 100, None) is None


# ----------------------------------------------------------------------------------------------------------------
# Loading text


def test_tiny_shakespeare_gpt2_token_counts(shakespeare_path):
    """The counts a run has always had: the text's prepared folder holds exactly the ids of encoding each part."""
    cfg = tiny_config(data_path=str(shakespeare_path), tokenizer="gpt2", val_frac=0.1)
    dataset = load_dataset(cfg)
    tokenizer, train, val = dataset.tokenizer, dataset.train.read(), dataset.val.read()
    assert tokenizer.vocab_size == 50257
    assert (len(train), len(val)) == (301_966, 36_059)
    assert train.dtype == val.dtype == torch.int64
    text = shakespeare_path.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    assert train.tolist() == tokenizer.encode(text[:split]) and val.tolist() == tokenizer.encode(text[split:])


def test_tiny_shakespeare_char_split(shakespeare_path):
    cfg = tiny_config(data_path=str(shakespeare_path), tokenizer="char", val_frac=0.1)
    dataset = load_dataset(cfg)
    text = shakespeare_path.read_text(encoding="utf-8")
    assert dataset.tokenizer.vocab_size == 65  # the text's characters, no separator: one text has one document
    split = int(len(text) * 0.9)
    assert (len(dataset.train), len(dataset.val)) == (split, len(text) - split)
    assert dataset.tokenizer.decode(dataset.train.read().tolist()) == text[:split]
    assert dataset.tokenizer.decode(dataset.val.read().tolist()) == text[split:]
    assert dataset.val_bytes == len(text[split:].encode("utf-8"))


def test_a_text_keeps_the_fingerprint_its_runs_had_before_shards(shakespeare_path):
    """Checkpoints from before the token cache held shards resume: the fingerprint is still the hash of the ids."""
    text = shakespeare_path.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    for name in ("char", "gpt2"):
        dataset = load_dataset(tiny_config(data_path=str(shakespeare_path), tokenizer=name, val_frac=0.1))
        train, val = (np.array(dataset.tokenizer.encode(t), dtype=np.int64) for t in (text[:split], text[split:]))
        before = data.token_fingerprint(torch.from_numpy(train), torch.from_numpy(val))
        assert data.token_fingerprint(dataset.train, dataset.val) == before


def test_load_dataset_reads_a_small_file(tmp_path):
    text = "abcdefghij" * 20
    path = write_text(tmp_path / "t.txt", text)
    dataset = load_dataset(tiny_config(data_path=str(path), val_frac=0.25, context_len=8))
    assert dataset.tokenizer.vocab_size == 10
    assert len(dataset.train) == 150 and len(dataset.val) == 50
    assert dataset.tokenizer.decode(dataset.train.read().tolist() + dataset.val.read().tolist()) == text


@pytest.mark.parametrize("block", [1, 7, 4 << 20])
def test_not_utf8_names_the_offset(tmp_path, monkeypatch, block):
    """The text is read in blocks: the offset and line are the file's wherever a block ends."""
    monkeypatch.setattr(prepare, "TEXT_BLOCK", block)
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two é\n".encode() + b"line three caf\xe9 and more\n" * 10)
    with pytest.raises(UserError) as info:
        load_dataset(tiny_config(data_path=str(path)))
    message = str(info.value)
    assert "offset 35" in message and "0xe9" in message and "line 3" in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"   \n\n\t  \n"])
def test_empty_file_raises(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="empty"):
        load_dataset(tiny_config(data_path=str(path)))


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


def test_folder_without_a_manifest_as_data_path_raises(tmp_path):
    with pytest.raises(UserError, match="it is a folder; give a UTF-8 text file, or a folder prepared by prepare.py"):
        load_dataset(tiny_config(data_path=str(tmp_path)))


def test_token_cache_is_reused(tmp_path, cache_dir, capsys):
    path = write_text(tmp_path / "c.txt", "hello there, general kenobi\n" * 20)
    cfg = tiny_config(data_path=str(path), val_frac=0.2, context_len=8)
    first = load_dataset(cfg)
    assert capsys.readouterr().out.startswith(f"prepared {path} into {cache_dir}")
    (folder,) = cache_dir.glob("*-char-0.2")
    second = load_dataset(cfg)
    assert capsys.readouterr().out == ""  # nothing to do, nothing said
    assert torch.equal(first.train.read(), second.train.read()) and torch.equal(first.val.read(), second.val.read())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["val_split"]["unit"] == "character" and manifest["separator"] is None


def test_a_moved_text_reuses_its_cache(tmp_path, cache_dir, capsys):
    """The cache is named by the text's hash, and a manifest's sources are compared by content, not path."""
    text = synthetic_text(3_000)
    first = load_dataset(tiny_config(data_path=str(write_text(tmp_path / "a.txt", text)), val_frac=0.2))
    capsys.readouterr()
    second = load_dataset(tiny_config(data_path=str(write_text(tmp_path / "b.txt", text)), val_frac=0.2))
    assert capsys.readouterr().out == "" and torch.equal(first.train.read(), second.train.read())


def test_pieces_encode_like_the_whole_text(shakespeare_path, tmp_path, monkeypatch):
    """A large text is tokenized in pieces on every core, cut before a space between two letters: the ids equal
    encoding each side whole, for both BPE tokenizers, with pieces small enough to make thousands of cuts."""
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000] + " ".join(
        ["naïve Ωmega's  x\r\ny 1st ü\u0301ber  'tis", "東京 and ДОМ  dom", "Hello\n\n World  a\tb c"] * 300
    )
    path = write_text(tmp_path / "t.txt", text)
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 500)
    split = int(len(text) * 0.9)
    pieces = list(prepare.text_pieces(path, "t.txt", split, 500))
    assert len(pieces) > 300 and "".join(piece for _, piece in pieces) == text
    assert "".join(piece for (_, part, _), piece in pieces if part == "train") == text[:split]
    for name in ("gpt2", "o200k_base"):
        dataset = load_dataset(tiny_config(data_path=str(path), tokenizer=name, val_frac=0.1))
        assert dataset.train.read().tolist() == dataset.tokenizer.encode(text[:split])
        assert dataset.val.read().tolist() == dataset.tokenizer.encode(text[split:])


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


@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "socket"])
def test_a_data_path_that_is_not_a_regular_file_is_refused_unopened(special_files, kind):
    if kind not in special_files:
        pytest.skip("no socket here")
    path = special_files[kind]
    with pytest.raises(UserError) as info:
        call_with_deadline(lambda: load_dataset(tiny_config(data_path=str(path))), special_files["fifo"])
    expected = "a socket, not a regular file" if kind == "socket" else "a FIFO (named pipe), not a regular file"
    assert str(info.value) == (
        f"cannot read --data_path {path}: it is {expected}; give a UTF-8 text file, a folder prepared by prepare.py "
        "or a .bin glob"
    )


@needs_proc
def test_dev_zero_as_data_path_is_refused_unread(tmp_path):
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    code = LIMIT_HEAP + (
        "import data\n"
        f"for path in ('/dev/zero', {str(link)!r}):\n"
        "    try:\n"
        "        data.text_file(path)\n"
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
# The token cache (a text's prepared folder): damage is prepared again, never a traceback or silently wrong ids


def rewrite_header(index: int, value: int):
    def damage(path: Path) -> None:
        raw = bytearray(path.read_bytes())
        raw[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
        path.write_bytes(bytes(raw))

    return damage


def past_vocabulary(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-2:] = np.array([60_000], dtype="<u2").tobytes()
    path.write_bytes(bytes(raw))


def replace_with(kind: str):
    def damage(path: Path) -> None:
        path.unlink()
        if kind == "folder":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(path.parent / "nowhere" if kind == "dangling link" else "/dev/zero")

    return damage


CACHE_DAMAGES = {  # (file, damage)
    "manifest empty": ("manifest.json", lambda p: p.write_bytes(b"")),
    "manifest truncated": ("manifest.json", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "manifest not an object": ("manifest.json", lambda p: p.write_text("[1, 2]")),
    "manifest gone": ("manifest.json", lambda p: p.unlink()),
    "shard gone": ("train_000000.bin", lambda p: p.unlink()),
    "shard truncated": ("train_000000.bin", lambda p: p.write_bytes(p.read_bytes()[:-2])),
    "shard one byte long": ("val_000000.bin", lambda p: p.write_bytes(p.read_bytes() + b"\0")),
    "shard magic": ("train_000000.bin", rewrite_header(0, 12345)),
    "shard version": ("train_000000.bin", rewrite_header(1, 7)),
    "shard token count": ("val_000000.bin", rewrite_header(2, 3)),
    "val id past the vocabulary": ("val_000000.bin", past_vocabulary),
    "shard a folder": ("train_000000.bin", replace_with("folder")),
    "shard a fifo": ("train_000000.bin", replace_with("fifo")),
    "shard a dangling link": ("val_000000.bin", replace_with("dangling link")),
    "shard a link to /dev/zero": ("train_000000.bin", replace_with("/dev/zero")),
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(data, "CACHE_DIR", folder)
    return folder


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
@pytest.mark.parametrize("damage", list(CACHE_DAMAGES))
def test_a_damaged_token_cache_is_prepared_again(tmp_path, cache_dir, capsys, tokenizer, damage):
    text = "Roméo, où es-tu? Ô nuit — 夜よ!\n" + synthetic_text(3_000)
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", text)), tokenizer=tokenizer, val_frac=0.2)
    expected = load_dataset(cfg)
    expected_train, expected_val = expected.train.read(), expected.val.read()  # (the damage rewrites mapped files)
    (folder,) = cache_dir.glob("*-0.2")
    file, spoil = CACHE_DAMAGES[damage]
    spoil(folder / file)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    capsys.readouterr()
    again = call_with_deadline(lambda: load_dataset(cfg), folder / file if "fifo" in damage else fifo)
    assert torch.equal(again.train.read(), expected_train) and torch.equal(again.val.read(), expected_val)
    said = capsys.readouterr().out.splitlines()
    # what prepare.py sees (no manifest, a shard of the wrong size) is prepared again as an unfinished folder; what
    # only reading shows (a header, an id) gets a note first
    assert said[-1].startswith(f"prepared {cfg.data_path} into {folder}") and len(said) <= 2
    assert len(said) == 1 or said[0].startswith(f"note: the token cache {folder} is damaged (")
    load_dataset(cfg)
    assert capsys.readouterr().out == ""  # and then reused without a word


def test_an_unwritable_cache_folder_prepares_into_a_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(data, "CACHE_DIR", blocker / "cache")
    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", synthetic_text(3_000))), val_frac=0.2)
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(first.train.read(), second.train.read()) and blocker.is_file()


def test_ranks_asking_at_once_prepare_once(tmp_path, cache_dir):
    """torchrun's ranks load the same text together: one prepares under the folder's lock, the others wait."""
    path = write_text(tmp_path / "t.txt", synthetic_text(200_000))
    code = (
        "import sys, data\n"
        "from pathlib import Path\n"
        "from conftest import tiny_config\n"
        f"data.CACHE_DIR = Path({str(cache_dir)!r})\n"
        f"d = data.load_dataset(tiny_config(data_path={str(path)!r}, val_frac=0.1))\n"
        "print(len(d.train), d.fingerprint)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    children = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [child.communicate(timeout=120)[0].splitlines() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert sum(line.startswith("prepared ") for out in outputs for line in out) == 1
    assert len({out[-1] for out in outputs}) == 1


def test_an_offline_tokenizer_leaves_the_cache_alone(tmp_path, cache_dir, monkeypatch):
    """tiktoken's files missing is a one-line error, not a "damaged" cache to delete and prepare again."""
    import tokenizer

    cfg = tiny_config(data_path=str(write_text(tmp_path / "t.txt", synthetic_text(3_000))), tokenizer="gpt2")
    load_dataset(cfg)
    (folder,) = (p for p in cache_dir.glob("*-gpt2-*") if p.is_dir())  # (beside it: its lock file)
    shards_before = sorted(p.name for p in folder.iterdir())

    def offline(self, name):
        raise UserError(f"could not load the {name} tokenizer (ConnectionError); offline?")

    monkeypatch.setattr(tokenizer.TiktokenTokenizer, "__init__", offline)
    with pytest.raises(UserError, match="could not load the gpt2 tokenizer"):
        load_dataset(cfg)
    assert sorted(p.name for p in folder.iterdir()) == shards_before


def test_small_splits_read_into_memory_give_the_same_batches_and_fingerprint(shakespeare_path, monkeypatch):
    """Under data.IN_MEMORY_TOKENS a split is an int64 tensor instead of a memory map: same tokens, batches and
    fingerprint (tests otherwise keep every split mapped: conftest)."""
    cfg = tiny_config(data_path=str(shakespeare_path), val_frac=0.1)
    mapped = load_dataset(cfg)
    monkeypatch.setattr(data, "IN_MEMORY_TOKENS", 1 << 23)
    loaded = load_dataset(cfg)
    assert isinstance(mapped.train, data.ShardTokens) and isinstance(loaded.train, torch.Tensor)
    assert torch.equal(loaded.train, mapped.train.read()) and torch.equal(loaded.val, mapped.val.read())
    assert loaded.fingerprint == mapped.fingerprint == data.token_fingerprint(mapped.train, mapped.val)
    a, b = (TrainBatches(d.train, 4, 16, seed=3, device=CPU) for d in (mapped, loaded))
    for _ in range(50):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
