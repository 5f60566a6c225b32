"""Token shards on disk: llm.c's / modded-nanogpt's .bin format, so their pre-tokenized shards (FineWeb 10B) read as
they are and ours read in their code. A header of 256 little-endian int32 (magic, version, token count, the rest 0),
then the tokens: version 1 = uint16 (llm.c's), version 2 = uint32 (our extension, for vocabularies over 65,536 ids).
Written by prepare.py, read (memory-mapped) by data.py; numpy only, so prepare.py needs no torch for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from config import UserError
from utils import atomic_write, check_regular_file

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
