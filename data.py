"""Token shards -> batches. One loader for every --data_path: a folder prepared by prepare.py, llm.c-style .bin
shards named by a glob, or a plain UTF-8 text file (Tiny Shakespeare is downloaded if it is the missing default),
which prepare.py's code turns into a folder in data/cache/ on first use, split 90/10 by characters as nanoGPT does.
Train and val tokens are memory-mapped (ShardTokens): resident memory does not grow with the corpus. Training
batches visit the windows of each epoch in a seeded order computed batch by batch; validation batches are fixed so
runs can be compared.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import math
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import Config, UserError
from prepare import prepare_text
from shards import read_shard
from tokenizer import Tokenizer, build_tokenizer, check_tokenizer_dict, tokenizer_from_dict
from utils import atomic_write, check_regular_file, check_writable

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_PATH = "data/tiny_shakespeare.txt"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_DIR = ROOT / "data" / "cache"


def resolve_data_path(data_path: str) -> Path:
    """Relative paths are tried from the working directory, then from the repo (so the default works anywhere)."""
    path = Path(data_path)
    if path.is_absolute() or path.exists():
        return path
    return ROOT / path if (ROOT / path).exists() or data_path == DEFAULT_DATA_PATH else path


def download_tiny_shakespeare(path: Path) -> None:
    print(f"downloading Tiny Shakespeare to {path} ...", flush=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except OSError as error:
        raise UserError(
            f"Tiny Shakespeare is not at {path} and could not be downloaded ({error}); "
            f"put the char-rnn input.txt there or pass --data_path"
        ) from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != TINY_SHAKESPEARE_SHA256:
        raise UserError(
            f"downloaded Tiny Shakespeare has sha256 {digest}, expected {TINY_SHAKESPEARE_SHA256}; try again"
        )
    atomic_write(path, payload)


def text_file(data_path: str) -> Path:
    """The text file --data_path names, checked before it is opened; Tiny Shakespeare is fetched if it is the
    missing default."""
    path = resolve_data_path(data_path)
    if not path.exists():
        if data_path != DEFAULT_DATA_PATH:
            raise UserError(
                f"data file {data_path} does not exist; put a UTF-8 text file there, fix --data_path, or leave "
                f"--data_path out to download Tiny Shakespeare to {DEFAULT_DATA_PATH}"
            )
        download_tiny_shakespeare(path)
    # a FIFO or a device (/dev/zero) is refused before it is opened: reading one could never end
    check_regular_file(path, "--data_path", "a UTF-8 text file, a folder prepared by prepare.py or a .bin glob")
    try:
        open(path, "rb").close()
    except OSError as error:
        raise UserError(f"cannot read --data_path {data_path}: {error.strerror or error}") from None
    return path


@dataclass
class Dataset:
    """What training reads: the tokenizer, train and val tokens (memory-mapped), and the val text's UTF-8 bytes for
    bits per byte (None where unknown: .bin shards, or a manifest from before prepare.py counted them)."""

    tokenizer: Tokenizer
    train: ShardTokens | torch.Tensor
    val: ShardTokens | torch.Tensor
    val_bytes: int | None
    fingerprint: dict[str, int | str] | None = None  # what a resume compares (token_fingerprint of the shards)


IN_MEMORY_TOKENS = 1 << 23  # a split this small (64 MB as int64) is read into memory: measurably faster steps


def load_dataset(cfg: Config) -> Dataset:
    """--data_path's tokens: a prepared folder, a .bin glob, or a text file prepared into data/cache/ on first use."""
    path = resolve_data_path(cfg.data_path)
    if path.is_dir():
        dataset = load_prepared(cfg, path)
    elif path.suffix == ".bin" or glob.has_magic(cfg.data_path):
        dataset = load_bin_glob(cfg)
    else:
        dataset = load_text(cfg, text_file(cfg.data_path))
    check_split_lengths(cfg, dataset.train, dataset.val)
    dataset.fingerprint = token_fingerprint(dataset.train, dataset.val)
    # Gathering a batch from a memory map costs the step ~10% at nanogpt-cpu's size (measured, not understood: the
    # gather itself is 0.4 ms); small splits (Tiny Shakespeare: 1M tokens) are read into memory, as they always were
    dataset.train, dataset.val = (s.read() if len(s) <= IN_MEMORY_TOKENS else s for s in (dataset.train, dataset.val))
    return dataset


def load_text(cfg: Config, path: Path) -> Dataset:
    """A text file through its prepared folder in data/cache/ (a temporary folder when that is not writable); a
    damaged one is prepared again, with a note."""
    cache = CACHE_DIR
    try:
        cache.mkdir(parents=True, exist_ok=True)
        check_writable(cache, "the token cache")
    except (OSError, UserError):  # a read-only checkout: prepared for this process alone
        cache = Path(tempfile.mkdtemp(prefix="pair-transformer-tokens-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    if cfg.tokenizer != "char":
        build_tokenizer(cfg.tokenizer)  # offline without its files: fail here, not as a "damaged" cache
    folder = prepare_text(path, cfg.data_path, cache, cfg.tokenizer, cfg.val_frac)
    try:
        return load_prepared(cfg, folder)
    except UserError as error:
        print(f"note: the token cache {folder} is damaged ({error}); preparing it again", flush=True)
    return load_prepared(cfg, prepare_text(path, cfg.data_path, cache, cfg.tokenizer, cfg.val_frac, fresh=True))


def bits_per_byte(loss: float, split_tokens: int, split_bytes: int | None) -> float | None:
    """Bits per UTF-8 byte of a mean loss in nats per target token: nats x targets / bytes covered / ln 2, with the
    bytes the targets cover taken as targets x the split's bytes per token, so the targets cancel. Exact for char
    on ASCII text; on the whole split with BPE, up to one token's share; over a --val_tokens prefix, an average."""
    if split_bytes is None or not split_tokens or not math.isfinite(loss):
        return None
    return loss * split_tokens / split_bytes / math.log(2)


def check_split_lengths(cfg: Config, train: torch.Tensor | ShardTokens, val: torch.Tensor | ShardTokens) -> None:
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) < cfg.context_len + 1:
            raise UserError(
                f"the {name} split of {cfg.data_path} has {len(ids)} tokens, fewer than context_len + 1 = "
                f"{cfg.context_len + 1}; use a longer text or a smaller --context_len"
            )


def token_fingerprint(train: torch.Tensor | ShardTokens, val: torch.Tensor | ShardTokens) -> dict[str, int | str]:
    """What a resumed run checks it trains on the same tokens: counts and a short hash. For shards, the hash their
    manifest gives (hashing 10B tokens would take minutes); for tensors, a hash of the ids."""
    if isinstance(train, ShardTokens):
        digest = train.digest
    else:
        digest = hashlib.sha256(train.numpy().tobytes() + val.numpy().tobytes()).hexdigest()[:16]
    return {"train_tokens": len(train), "val_tokens": len(val), "sha256": digest}


# ----------------------------------------------------------------------------------------------------------------
# Batches


def gather_windows(
    tokens: torch.Tensor | ShardTokens, starts: torch.Tensor, context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (len(starts), context_len) in one indexing op: targets are inputs shifted by one."""
    if isinstance(tokens, ShardTokens):
        window = tokens.windows(starts, context_len + 1)
    else:
        window = tokens[starts[:, None] + torch.arange(context_len + 1)]
    return window[:, :-1], window[:, 1:]


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def permuted(index: torch.Tensor, n: int, key: int) -> torch.Tensor:
    """A seeded bijection of range(n), computed for the given indices alone: a 4-round Feistel network over the
    smallest even number of bits covering n, applied again to values that land past n (cycle-walking, which keeps
    it a bijection of range(n)). No table of n entries: a corpus's window order costs no memory per window."""
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = (1 << half) - 1
    keys = [(key * 0x9E3779B97F4A7C15 + r * 0xBF58476D1CE4E5B9) & 0xFFFFFFFF for r in range(4)]
    x = index.to(torch.int64).clone()
    walking = torch.ones_like(x, dtype=torch.bool)
    while walking.any():
        left, right = x[walking] >> half, x[walking] & mask
        for k in keys:
            mixed = ((right * 0x85EBCA6B + k) & 0xFFFFFFFF) ^ (right >> 7)  # (products stay below 2**63)
            left, right = right, left ^ (((mixed * 0xC2B2AE35) & 0xFFFFFFFF) >> 3 & mask)
        x[walking] = (left << half) | right
        walking = x >= n
    return x


class TrainBatches:
    """Epochs over the training tokens: each epoch cuts them into non-overlapping windows at a random offset and
    visits the windows in a random order (`permuted`, computed batch by batch: no table, so memory does not grow with
    the corpus), so an epoch is one pass over (almost) every token. The order depends only on (seed, epoch), so
    (epoch, position) is the whole state of the iterator.

    With several ranks (torchrun) every rank walks the same order in global batches of batch_size x world_size
    windows and takes rows [rank * batch_size, (rank + 1) * batch_size) of each: W ranks see exactly the windows
    that one rank sees with W times the accumulation, and the position means the same on any number of ranks."""

    def __init__(
        self,
        tokens: torch.Tensor | ShardTokens,
        batch_size: int,
        context_len: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.batch_size, self.context_len = tokens, batch_size, context_len
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.position = 0, 0
        self.windows_per_epoch = (len(tokens) - 1 - (context_len - 1)) // context_len
        if self.windows_per_epoch < self.global_batch:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise UserError(
                f"the training split holds {self.windows_per_epoch} windows of {context_len} tokens, fewer than "
                f"--batch_size {batch_size}{ranks}; use a smaller --batch_size or --context_len"
            )
        self._start_epoch()

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch, counting one per rank-wide global batch."""
        return self.windows_per_epoch // self.global_batch

    ORDER_BLOCK = 1 << 16  # window positions whose order is computed at once: a few torch calls per 65,536

    def _start_epoch(self) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._offset = int(torch.randint(self.context_len, (1,), generator=generator))
        self._key = int(torch.randint(2**31, (1,), generator=generator))
        self._order, self._order_start = torch.empty(0, dtype=torch.long), 0  # permuted windows of a block

    def _windows_at(self, first: int) -> torch.Tensor:
        """The window indices at positions [first, first + batch_size) of this epoch's order."""
        if not self._order_start <= first <= first + self.batch_size <= self._order_start + len(self._order):
            stop = min(first + self.ORDER_BLOCK, self.windows_per_epoch)
            self._order, self._order_start = (
                permuted(torch.arange(first, stop), self.windows_per_epoch, self._key),
                first,
            )
        return self._order[first - self._order_start : first - self._order_start + self.batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.windows_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
        first = self.position + self.rank * self.batch_size  # this rank's rows of the global batch
        windows = self._windows_at(first)
        self.position += self.global_batch
        x, y = gather_windows(self.tokens, self._offset + windows * self.context_len, self.context_len)
        return to_device(x, self.device), to_device(y, self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._start_epoch()


def fixed_val_batches(
    tokens: torch.Tensor, batch_size: int, context_len: int, num_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same evenly spaced validation windows every time, so periodic val losses are comparable."""
    starts = torch.linspace(0, len(tokens) - context_len - 1, batch_size * num_batches).long()
    return [gather_windows(tokens, chunk, context_len) for chunk in starts.split(batch_size)]


def full_val_batches(
    tokens: torch.Tensor, batch_size: int, context_len: int, max_targets: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Windows covering every validation target exactly once (targets already covered are masked with -1); with
    `max_targets` (--val_tokens, at least context_len), only the first that many: a prefix, the same every run."""
    n_targets = len(tokens) - 1 if max_targets is None else min(len(tokens) - 1, max_targets)
    starts = list(range(0, n_targets - context_len + 1, context_len))
    covered = starts[-1] + context_len
    x, y = gather_windows(tokens, torch.tensor(starts), context_len)
    if covered < n_targets:  # one last window flush with the end; only its new targets count
        tail_x, tail_y = gather_windows(tokens, torch.tensor([n_targets - context_len]), context_len)
        tail_y = tail_y.clone()  # a view sharing memory with tail_x
        tail_y[:, : context_len - (n_targets - covered)] = -1
        x, y = torch.cat((x, tail_x)), torch.cat((y, tail_y))
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# Training from a folder prepared by prepare.py: its manifest.json and shards


class ShardTokens:
    """Shards as one virtual token sequence, memory-mapped: nothing is read until a window is gathered, so resident
    memory does not grow with the corpus. `digest` is the fingerprint's hash (token_fingerprint)."""

    def __init__(self, shards: list[np.ndarray], digest: str = ""):
        self.shards = [s for s in shards if len(s)]  # an empty shard holds no window and would only cost a lookup
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds [offsets[i], offsets[i + 1])
        self.digest = digest

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(len(starts), length) int64: row r is tokens [starts[r], starts[r] + length), across shard ends. Rows
        inside one shard are gathered together, one fancy index per shard; a row across a shard's end piece by
        piece."""
        starts_np = starts.numpy().astype(np.int64)
        result = torch.empty((len(starts_np), length), dtype=torch.long)  # (torch's allocator: aligned for kernels)
        out = result.numpy()
        if len(starts_np) and (starts_np.min() < 0 or starts_np.max() + length > len(self)):
            start = int(starts_np[(starts_np < 0) | (starts_np + length > len(self))][0])
            raise IndexError(f"window [{start}, {start + length}) outside the {len(self)} tokens")
        shard_of = np.searchsorted(self.offsets, starts_np, side="right") - 1
        local = starts_np - self.offsets[shard_of]
        inside = local + length <= self.offsets[shard_of + 1] - self.offsets[shard_of]
        for shard in np.unique(shard_of[inside]):
            rows = np.flatnonzero(inside & (shard_of == shard))
            out[rows] = self.shards[shard][local[rows, None] + np.arange(length)]
        for row in np.flatnonzero(~inside).tolist():
            position, filled = int(starts_np[row]), 0
            while filled < length:  # one contiguous copy per shard the window touches (one, or two at an end)
                shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
                at = position - int(self.offsets[shard])
                take = min(length - filled, len(self.shards[shard]) - at)
                out[row, filled : filled + take] = self.shards[shard][at : at + take]
                position, filled = position + take, filled + take
        return result

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tokens [start, stop) as one int64 tensor (all of them by default: for small splits and tests)."""
        stop = len(self) if stop is None else stop
        return (
            self.windows(torch.tensor([start]), stop - start)[0] if stop > start else torch.empty(0, dtype=torch.long)
        )

    def max(self) -> int:
        return max((int(s.max()) for s in self.shards), default=-1)


def load_prepared(cfg: Config, folder: Path) -> Dataset:
    """A folder prepare.py wrote: its manifest's tokenizer, shards (each checked against the manifest) and counts."""
    path = folder / "manifest.json"
    if not path.exists():
        raise UserError(
            f"cannot read --data_path {cfg.data_path}: it is a folder; give a UTF-8 text file, or a folder prepared "
            f"by prepare.py (this one has no manifest.json: run `uv run prepare.py INPUT... --out {cfg.data_path} "
            f"--tokenizer {cfg.tokenizer}`, or rerun an unfinished one)"
        )
    try:
        manifest = json.loads(check_regular_file(path, "manifest", "a JSON file").read_text(encoding="utf-8"))
        tokenizer_dict, splits = manifest["tokenizer"], manifest["splits"]
        listed = {split: [(s["file"], int(s["tokens"])) for s in splits[split]["shards"]] for split in ("train", "val")}
        sources = [s["sha256"] for s in manifest["settings"]["sources"]]
        name = tokenizer_dict["name"]
        val_bytes = splits["val"].get("bytes")
        tokens_sha256 = manifest.get("tokens_sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(
            f"{path} is not a manifest prepare.py wrote ({type(error).__name__}: {error}); prepare it again"
        ) from None
    if name != cfg.tokenizer:
        raise UserError(
            f"{cfg.data_path} was prepared with --tokenizer {name}, not {cfg.tokenizer}; pass --tokenizer {name} "
            "(or prepare the corpus again with another)"
        )
    try:
        check_tokenizer_dict(tokenizer_dict)
    except UserError as error:
        raise UserError(f"{path}: the tokenizer is damaged: {error}") from None
    tokenizer = tokenizer_from_dict(tokenizer_dict)  # (offline without tiktoken's files: that one-line error)
    shards = {}
    for split, entries in listed.items():
        shards[split] = []
        for file, count in entries:
            if Path(file).name != file:  # a manifest names files in its own folder, nothing elsewhere
                raise UserError(f"{path} lists shard {file!r}, not a file name in its folder; prepare it again")
            ids = read_shard(folder / file)  # checks magic, version and that the size matches the header
            if len(ids) != count:
                raise UserError(
                    f"shard {folder / file} holds {len(ids)} tokens, its manifest says {count}; prepare it again"
                )
            shards[split].append(ids)
    # the fingerprint a resume compares: what the manifest says the tokens are, not the tokens themselves (a text
    # file's manifest carries the hash of its ids, the fingerprint its runs had before it was prepared into shards)
    listing = json.dumps({"shards": listed, "sources": sources}, sort_keys=True).encode("utf-8")
    digest = tokens_sha256[:16] if isinstance(tokens_sha256, str) else hashlib.sha256(listing).hexdigest()[:16]
    train, val = ShardTokens(shards["train"], digest), ShardTokens(shards["val"])
    check_vocabulary(val, tokenizer, f"{folder}'s val shards")
    if not (isinstance(val_bytes, int) and not isinstance(val_bytes, bool) and val_bytes > 0):
        val_bytes = None  # (a manifest from before prepare.py counted bytes)
    return Dataset(tokenizer, train, val, val_bytes)


def check_vocabulary(tokens: ShardTokens, tokenizer: Tokenizer, what: str) -> None:
    """Ids past the vocabulary would index past the embedding; the val split is checked whole (it is small, and
    a damaged shard shows there as well), the train split as it is read."""
    if tokens.max() >= tokenizer.vocab_size:
        raise UserError(f"{what} hold id {tokens.max()}, outside the vocabulary of {tokenizer.vocab_size}")


def load_bin_glob(cfg: Config) -> Dataset:
    """llm.c / modded-nanogpt shards as they are: --data_path names the train shards (a glob such as
    fineweb10B/fineweb_train_*.bin, or one file); the val shards are the same name with "val" for "train" and any
    digits after it as wildcards (fineweb_val_*.bin). They carry no vocabulary, so --tokenizer says what they hold;
    and no text, so no bits per byte."""
    pattern = str(resolve_data_path(cfg.data_path))
    head, tail = pattern.rsplit("/", 1) if "/" in pattern else ("", pattern)
    if "train" not in tail:
        raise UserError(
            f"--data_path {cfg.data_path}: name the train shards (e.g. data/fineweb10B/fineweb_train_*.bin); the val "
            "shards are found by putting val for train"
        )
    before, after = tail.rsplit("train", 1)  # fineweb_train_000001.bin or fineweb_train_*.bin -> fineweb_val_*.bin
    val_pattern = (head + "/" if head else "") + before + "val" + re.sub(r"\d+", "*", after)
    if cfg.tokenizer == "char":
        raise UserError(
            f"--data_path {cfg.data_path}: .bin shards hold ids without their vocabulary; pass the --tokenizer they were "
            "made with (llm.c's and modded-nanogpt's FineWeb shards: gpt2)"
        )
    tokenizer = build_tokenizer(cfg.tokenizer)
    found = {}
    for split, where in (("train", pattern), ("val", val_pattern)):
        files = sorted(glob.glob(where))
        if not files:
            raise UserError(f"--data_path {cfg.data_path}: no {split} shards match {where}")
        found[split] = [(Path(file), read_shard(file)) for file in files]
    listing = {split: [(p.name, len(ids)) for p, ids in files] for split, files in found.items()}
    digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    train = ShardTokens([ids for _, ids in found["train"]], digest)
    val = ShardTokens([ids for _, ids in found["val"]])
    check_vocabulary(val, tokenizer, f"the val shards {val_pattern}")
    return Dataset(tokenizer, train, val, None)
