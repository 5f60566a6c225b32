"""Text -> token ids -> batches.

Tiny Shakespeare is downloaded (and verified) when missing; any UTF-8 file works with --data_path. The text is
split 90/10 by characters (as nanoGPT does), each part tokenized once and cached on disk. Training batches are
built by index arithmetic over one token tensor; validation batches are fixed so runs can be compared. A folder
prepared by prepare.py is read from its shards instead: train tokens memory-mapped (ShardTokens), val loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import Config, UserError
from tokenizer import CharTokenizer, Tokenizer, build_tokenizer, tokenizer_from_dict
from utils import atomic_write, check_regular_file

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


def read_text(data_path: str) -> tuple[str, str]:
    """The text of --data_path and its sha256; Tiny Shakespeare is fetched if it is the missing default."""
    path = resolve_data_path(data_path)
    if not path.exists():
        if data_path != DEFAULT_DATA_PATH:
            raise UserError(
                f"data file {data_path} does not exist; put a UTF-8 text file there, fix --data_path, or leave "
                f"--data_path out to download Tiny Shakespeare to {DEFAULT_DATA_PATH}"
            )
        download_tiny_shakespeare(path)
    # a folder, a FIFO or a device (/dev/zero) is refused before it is opened: reading one could never end
    check_regular_file(path, "--data_path", "a UTF-8 text file")
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read --data_path {data_path}: {error.strerror or error}") from None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        line = payload[: error.start].count(b"\n") + 1
        raise UserError(
            f"{data_path} is not UTF-8: byte 0x{payload[error.start]:02x} at offset {error.start} (line {line}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UserError(f"{data_path} is empty; give a text file with something to learn")
    return text, hashlib.sha256(payload).hexdigest()


def _tokenize_cached(tokenizer: Tokenizer, text: str, key: str) -> np.ndarray:
    """The ids of `text`, from data/cache/<key>.npy when that holds them; a damaged cache is rebuilt, with a note."""
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    cache = CACHE_DIR / f"{key}.npy"
    if cache.exists() or cache.is_symlink():
        ids, problem = _read_cache(cache, tokenizer, text, dtype)
        if problem is None:
            return ids
        print(f"note: the token cache {cache} {problem}; tokenizing again", flush=True)
    ids = np.array(tokenizer.encode(text), dtype=dtype)
    buffer = io.BytesIO()
    np.save(buffer, ids)
    with contextlib.suppress(OSError):  # a read-only checkout just tokenizes every time
        atomic_write(cache, buffer.getvalue())
    return ids


CACHE_CHECK_TOKENS = 256  # ids at each end of a cached array that are decoded and compared with the text


def _read_cache(cache: Path, tokenizer: Tokenizer, text: str, dtype: np.dtype) -> tuple[Any, str | None]:
    """(ids, None), or (None, what is wrong): not a regular file; not a .npy file of one-dimensional `dtype` ids
    exactly as long as its header says (a truncated file is shorter); ids outside the vocabulary; a length the text
    cannot have (one id per character for char, at most one per UTF-8 byte for BPE); ends that do not decode to the
    text's ends. The header is checked before the data is read, so a damaged one cannot ask for a huge array."""
    if not cache.is_file():  # a folder, a FIFO, a device or a dangling link: never opened
        return None, "is not a regular file"
    try:
        with open(cache, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                return None, f"has .npy format version {version}, not the 1.0 or 2.0 it is written with"
            shape, _, found = read_header[version](f)
            if found != dtype or len(shape) != 1:
                return None, f"holds {found} ids of shape {shape}, not one-dimensional {dtype} ones"
            start, size = f.tell(), cache.stat().st_size
            if size != start + shape[0] * dtype.itemsize:
                return None, f"holds {size - start} bytes of ids where its header says {shape[0] * dtype.itemsize}"
            ids = np.fromfile(f, dtype=dtype, count=shape[0])
    except Exception as error:  # a damaged file fails in many ways (magic, version, header); all mean the same
        return None, f"is not a readable .npy file ({type(error).__name__})"
    if len(ids) != shape[0]:
        return None, "is shorter than its header says"
    if len(ids) and int(ids.max()) >= tokenizer.vocab_size:
        return None, f"holds id {int(ids.max())}, outside the vocabulary of {tokenizer.vocab_size}"
    if isinstance(tokenizer, CharTokenizer):
        if len(ids) != len(text):
            return None, f"holds {len(ids)} ids for {len(text)} characters"
    elif len(ids) > len(text.encode("utf-8")) or (text and not len(ids)):
        return None, f"holds {len(ids)} ids for {len(text.encode('utf-8'))} bytes of text"
    # a run of ids decodes to exactly the text it covers; with BPE a character cut at either end shows as U+FFFD
    n = CACHE_CHECK_TOKENS
    head = tokenizer.decode(ids[:n].tolist()).rstrip("\ufffd")
    tail = tokenizer.decode(ids[-n:].tolist()).lstrip("\ufffd") if len(ids) else ""
    if not (text.startswith(head) and text.endswith(tail)):
        return None, "does not decode to the text it was made from"
    return ids, None


def load_dataset(cfg: Config) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """(tokenizer, train ids, val ids): the first 1 - val_frac of the characters train, the rest validate. A folder
    from prepare.py reads its shards instead (load_prepared)."""
    folder = resolve_data_path(cfg.data_path)
    if folder.is_dir():  # (a text file keeps the path below; one loader for both is a later step of issue 13)
        tokenizer, train, val = load_prepared(cfg, folder)
        check_split_lengths(cfg, train, val)
        return tokenizer, train, val
    text, digest = read_text(cfg.data_path)
    tokenizer = build_tokenizer(cfg.tokenizer, text)
    split = int(len(text) * (1 - cfg.val_frac))
    with contextlib.suppress(OSError):  # unwritable: the ids are computed each time instead of cached
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = f"{digest[:16]}-{cfg.tokenizer}-{cfg.val_frac}"
    train = torch.from_numpy(_tokenize_cached(tokenizer, text[:split], f"{key}-train").astype(np.int64))
    val = torch.from_numpy(_tokenize_cached(tokenizer, text[split:], f"{key}-val").astype(np.int64))
    check_split_lengths(cfg, train, val)
    return tokenizer, train, val


def val_bytes(cfg: Config) -> int | None:
    """UTF-8 bytes of the validation split's text, for bits per byte: of text[split:] for a text file (read again:
    load_dataset keeps only the ids), the manifest's count for a prepared folder (documents' bytes; separators count
    0). None when they are unknown: a manifest from before prepare.py counted bytes, or a text file gone since."""
    path = resolve_data_path(cfg.data_path)
    if path.is_dir():
        try:
            count = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["splits"]["val"].get("bytes")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None
    if not path.is_file():  # (read_text would download a missing default: not at the end of a run)
        return None
    try:
        text, _ = read_text(cfg.data_path)
    except UserError:  # changed since the run began: no bits per byte rather than no final record
        return None
    return len(text[int(len(text) * (1 - cfg.val_frac)) :].encode("utf-8"))


def bits_per_byte(loss: float, split_tokens: int, split_bytes: int | None) -> float | None:
    """Bits per UTF-8 byte of a mean loss in nats per target token: nats x targets / bytes covered / ln 2, with the
    bytes the targets cover taken as targets x the split's bytes per token, so the targets cancel. Exact for char
    on ASCII text; on the whole split with BPE, up to one token's share; over a --val_tokens prefix, an average."""
    if split_bytes is None or not split_tokens or not math.isfinite(loss):
        return None
    return loss * split_tokens / split_bytes / math.log(2)


def check_split_lengths(cfg: Config, train: torch.Tensor | ShardTokens, val: torch.Tensor) -> None:
    for name, ids in (("training", train), ("validation", val)):
        if len(ids) < cfg.context_len + 1:
            raise UserError(
                f"the {name} split of {cfg.data_path} has {len(ids)} tokens, fewer than context_len + 1 = "
                f"{cfg.context_len + 1}; use a longer text or a smaller --context_len"
            )


def token_fingerprint(train: torch.Tensor | ShardTokens, val: torch.Tensor) -> dict[str, int | str]:
    """What a resumed run checks it trains on the same tokens: counts and a short hash of the ids. For shards, a
    hash of the manifest's shard list and sources instead: hashing 10B tokens would take minutes."""
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
    visits the windows in a random order, so an epoch is one pass over (almost) every token. The order depends
    only on (seed, epoch), so (epoch, position) is the whole state of the iterator. Over a prepared corpus
    (ShardTokens) the order is `permuted`, computed batch by batch, so memory does not grow with the corpus; over a
    text's tensor it is a randperm table, as it always was (Tiny Shakespeare's runs stay comparable).

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
        self._starts = self._epoch_starts()

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch, counting one per rank-wide global batch."""
        return self.windows_per_epoch // self.global_batch

    def _epoch_starts(self) -> torch.Tensor | None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._offset = int(torch.randint(self.context_len, (1,), generator=generator))
        if isinstance(self.tokens, ShardTokens):  # the order is computed per batch (see permuted)
            self._key = int(torch.randint(2**31, (1,), generator=generator))
            return None
        order = torch.randperm(self.windows_per_epoch, generator=generator)
        return self._offset + order * self.context_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.windows_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._starts = self._epoch_starts()
        first = self.position + self.rank * self.batch_size  # this rank's rows of the global batch
        if self._starts is None:
            positions = torch.arange(first, first + self.batch_size)
            starts = self._offset + permuted(positions, self.windows_per_epoch, self._key) * self.context_len
        else:
            starts = self._starts[first : first + self.batch_size]
        self.position += self.global_batch
        x, y = gather_windows(self.tokens, starts, self.context_len)
        return to_device(x, self.device), to_device(y, self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._starts = self._epoch_starts()


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
# Token shards: llm.c's / modded-nanogpt's .bin format, so their pre-tokenized shards (FineWeb 10B) read as they are
# and ours read in their code. A header of 256 little-endian int32 (magic, version, token count, the rest 0), then
# the tokens: version 1 = uint16 (llm.c's), version 2 = uint32 (our extension, for vocabularies over 65,536 ids).

SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


def shard_version(vocab_size: int) -> int:
    """1 (uint16, llm.c's) when every id fits 16 bits, else 2 (uint32)."""
    return 1 if vocab_size <= 2**16 else 2


def shard_header(num_tokens: int, version: int) -> bytes:
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, version, num_tokens
    return header.tobytes()


def write_shard(path: Path, tokens: np.ndarray, version: int) -> None:
    """Write one shard whole: a temp file in the same folder, fsynced, renamed, so a reader (or a rerun) never sees
    a half-written shard under a shard's name."""
    path = Path(path)
    ids = np.ascontiguousarray(tokens, dtype=SHARD_DTYPES[version])
    atomic_write(path, [shard_header(len(ids), version), memoryview(ids).cast("B")])  # (the tokens: no copy)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a .bin shard as a read-only memmap (nothing is read until used), after checking its header:
    the magic, a known version, and a token count that matches the file's size exactly (a truncated copy fails)."""
    path = check_regular_file(path, "shard", "a .bin token shard")
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise UserError(
            f"shard {path} has {size} bytes, fewer than the {SHARD_HEADER_BYTES}-byte header; prepare it again"
        )
    magic, version, num_tokens = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise UserError(
            f"shard {path} has magic {magic}, not {SHARD_MAGIC}: it is not an llm.c-format .bin token shard"
        )
    if version not in SHARD_DTYPES:
        raise UserError(f"shard {path} has version {version}; known: 1 (uint16 tokens) and 2 (uint32 tokens)")
    dtype = SHARD_DTYPES[version]
    expected = SHARD_HEADER_BYTES + num_tokens * dtype.itemsize
    if num_tokens < 0 or size != expected:
        raise UserError(
            f"shard {path} has {size} bytes, but its header's {num_tokens} tokens need {expected}: it is truncated "
            "or damaged; prepare it again"
        )
    if num_tokens == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=SHARD_HEADER_BYTES, shape=(num_tokens,))


# ----------------------------------------------------------------------------------------------------------------
# Training from a folder prepared by prepare.py: its manifest.json and shards


class ShardTokens:
    """The train shards as one virtual token sequence, memory-mapped: nothing is read until a window is gathered,
    so resident memory does not grow with the corpus. `digest` is the fingerprint's hash (token_fingerprint)."""

    def __init__(self, shards: list[np.ndarray], digest: str = ""):
        self.shards = [s for s in shards if len(s)]  # an empty shard holds no window and would only cost a lookup
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds [offsets[i], offsets[i + 1])
        self.digest = digest

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(len(starts), length) int64: row r is tokens [starts[r], starts[r] + length), across shard ends."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts.tolist()):
            if start < 0 or start + length > len(self):
                raise IndexError(f"window [{start}, {start + length}) outside the {len(self)} training tokens")
            position, filled = start, 0
            while filled < length:  # one contiguous copy per shard the window touches (one, or two at an end)
                shard = int(np.searchsorted(self.offsets, position, side="right")) - 1
                local = position - int(self.offsets[shard])
                take = min(length - filled, len(self.shards[shard]) - local)
                out[row, filled : filled + take] = self.shards[shard][local : local + take]
                position, filled = position + take, filled + take
        return torch.from_numpy(out)


def load_prepared(cfg: Config, folder: Path) -> tuple[Tokenizer, ShardTokens, torch.Tensor]:
    """(tokenizer, train tokens memory-mapped, val tokens loaded as int64) of a folder prepare.py wrote."""
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
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a manifest prepare.py wrote ({type(error).__name__}: {error}); prepare it again"
        ) from None
    if name != cfg.tokenizer:
        raise UserError(
            f"{cfg.data_path} was prepared with --tokenizer {name}, not {cfg.tokenizer}; pass --tokenizer {name} "
            "(or prepare the corpus again with another)"
        )
    try:
        tokenizer = tokenizer_from_dict(tokenizer_dict)
    except UserError as error:
        raise UserError(f"{path}: the tokenizer is damaged: {error}") from None
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
    # the fingerprint a resume compares: what the manifest says the tokens are, not the tokens themselves
    listing = json.dumps({"shards": listed, "sources": sources}, sort_keys=True).encode("utf-8")
    train = ShardTokens(shards["train"], hashlib.sha256(listing).hexdigest()[:16])
    val_ids = np.concatenate(shards["val"]) if shards["val"] else np.empty(0, np.int64)
    val = torch.from_numpy(val_ids.astype(np.int64))  # the val split is small by design (0.1%)
    if len(val) and int(val.max()) >= tokenizer.vocab_size:
        raise UserError(
            f"{folder}'s val shards hold id {int(val.max())}, outside the vocabulary of {tokenizer.vocab_size}"
        )
    return tokenizer, train, val
