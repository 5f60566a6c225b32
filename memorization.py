"""The memorization check: how much of a text was copied verbatim from the training split.

A character of a text counts as copied when it lies inside a span of at least N characters (N = `chars`, default
32) that occurs verbatim in the training text; equivalently, when some window of exactly N characters covering it
occurs there (a longer copied span is made of such windows, and each window is itself a copied span of N). The
copied share of a text is (copied characters) / len(text): 0 for an empty text, or one shorter than N. Characters
are Python's (Unicode code points), so the share means the same for every tokenizer. With a prompt, the windows are
looked for in prompt + text but only the text's characters are counted: a model that goes on reciting a training
passage its prompt began is copying, and the prompt itself is not the model's.

`CopyIndex` is built once from the training text: a 64-bit polynomial hash of every N-character window, sorted,
with the window's position beside it. A text's windows are hashed alike and looked up with np.searchsorted; every
hash match is confirmed by comparing the characters themselves, so a collision can never count as a copy (hashes
modulo 2**64 do collide on crafted text: Thue-Morse strings of 2048 characters, see tests/test_memorization.py).
Tiny Shakespeare's 1M training characters take a fraction of a second and ~12 MB (8 bytes of hash and 4 of position
per character, plus the text).
"""

from __future__ import annotations

import glob
from typing import Any, TextIO

import numpy as np
import torch

from config import Config, UserError
from data import ShardTokens, load_dataset, resolve_data_path, token_fingerprint
from tokenizer import Tokenizer

COPY_CHARS = 32  # the shortest copied span that counts: a line of verse is ~40 characters, a common phrase fewer
# at most this many training tokens are decoded and indexed: building holds ~30 bytes per character for a moment,
# so 10M GPT-2 tokens (~45M characters) peak near 1.4 GB and take seconds; Tiny Shakespeare is 1M (char) or 0.3M
MAX_TRAIN_TOKENS = 10_000_000
BASE = np.uint64(0x9E3779B97F4A7C15)  # an odd multiplier: invertible modulo 2**64, so no window's start is forgotten


class CheckSkipped(Exception):
    """Why the check cannot run (one line): the training data is gone, changed, or too large."""


def code_points(text: str) -> np.ndarray:
    """The text's characters as uint32 code points, one per Python character (lone surrogates included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def window_hashes(codes: np.ndarray, chars: int) -> np.ndarray:
    """uint64 hash of every window of `chars` code points: sum of codes[i + k] * BASE**(chars - 1 - k) modulo 2**64
    (numpy's uint64 arithmetic wraps). `chars` passes of two vector operations: simpler than prefix sums with
    modular inverses, and about a tenth of a second for 1M characters at 32."""
    count = len(codes) - chars + 1
    hashes = np.zeros(max(count, 0), dtype=np.uint64)
    for k in range(chars if count > 0 else 0):
        hashes *= BASE
        hashes += codes[k : k + count]  # (uint32 added into uint64 in place: no temporary of the whole array)
    return hashes


class CopyIndex:
    """Every `chars`-character window of a training text, for `copied_share` and `copied_spans` (module docstring)."""

    def __init__(self, train_text: str, chars: int = COPY_CHARS):
        if isinstance(chars, bool) or not isinstance(chars, int) or chars <= 0:  # (True is an int to Python)
            raise ValueError(f"chars must be a positive integer, got {chars!r}")
        self.text, self.chars = train_text, chars
        hashes = window_hashes(code_points(train_text), chars)
        order = np.argsort(hashes)
        self.hashes = hashes[order]  # sorted: np.searchsorted finds a window's matches in O(log n)
        # uint32 positions while they fit (they do under MAX_TRAIN_TOKENS): a third less memory than argsort's int64
        self.positions = order.astype(np.uint32 if len(order) < 2**32 else np.int64)

    def copied_starts(self, text: str) -> np.ndarray:
        """Where the windows of `text` that occur in the training text start (sorted int64 positions in `text`)."""
        hashes = window_hashes(code_points(text), self.chars)
        first = np.searchsorted(self.hashes, hashes, side="left")
        last = np.searchsorted(self.hashes, hashes, side="right")
        starts = []
        for i in np.flatnonzero(last > first).tolist():
            window = text[i : i + self.chars]
            # a hash match only proposes: the characters decide (the first candidate is nearly always the one)
            if any(self.text[p : p + self.chars] == window for p in self.positions[first[i] : last[i]].tolist()):
                starts.append(i)
        return np.asarray(starts, dtype=np.int64)

    def copied_mask(self, text: str) -> np.ndarray:
        """One bool per character of `text`: True where it lies inside a copied window."""
        starts = self.copied_starts(text)
        edges = np.zeros(len(text) + 1, dtype=np.int64)
        np.add.at(edges, starts, 1)  # +1 where a copied window starts, -1 where it ends: a running sum > 0 is inside
        np.add.at(edges, starts + self.chars, -1)
        return np.cumsum(edges[:-1]) > 0

    def copied_spans(self, text: str) -> list[tuple[int, int]]:
        """The maximal copied spans of `text` as [start, end) character positions, in order; overlapping or touching
        copied windows make one span, so every span is at least `chars` long."""
        edges = np.flatnonzero(np.diff(np.concatenate(([0], self.copied_mask(text).view(np.int8), [0]))))
        return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2], strict=True)]

    def copied_share(self, text: str, prompt: str = "") -> float:
        """The share of `text`'s characters inside copied spans of prompt + text (module docstring); 0.0 for ''."""
        if not text:
            return 0.0
        return float(self.copied_mask(prompt + text)[len(prompt) :].sum()) / len(text)


def describe(share: float, chars: int) -> str:
    """The share as the console shows it: '12.5% copied (spans of 32+ chars of the training split)'."""
    return f"{share:.1%} copied (spans of {chars}+ chars of the training split)"


def training_text(tokenizer: Tokenizer, tokens: ShardTokens | torch.Tensor) -> str:
    """The training split as text (its tokens decoded); CheckSkipped past MAX_TRAIN_TOKENS."""
    if len(tokens) > MAX_TRAIN_TOKENS:
        raise CheckSkipped(
            f"training split too large ({len(tokens):,} tokens; the check indexes at most {MAX_TRAIN_TOKENS:,})"
        )
    ids = tokens.read() if isinstance(tokens, ShardTokens) else tokens
    return tokenizer.decode(ids.tolist())


def _skipped(error: Exception, file: TextIO | None) -> None:
    reason = str(error) if isinstance(error, (CheckSkipped, UserError)) else f"{type(error).__name__}: {error}"
    print(f"note: memorization check skipped: {reason}", file=file, flush=True)


def training_index(
    tokenizer: Tokenizer, tokens: ShardTokens | torch.Tensor, chars: int = COPY_CHARS, file: TextIO | None = None
) -> CopyIndex | None:
    """The index of training tokens already loaded (train.py's end of run), or None after a one-line note on `file`
    (None: stdout) when it cannot be built: a check never stops what it checks."""
    try:
        return CopyIndex(training_text(tokenizer, tokens), chars)
    except Exception as error:  # (MemoryError included: a check is never worth a crash)
        _skipped(error, file)
        return None


def checkpoint_index(
    cfg: Config, fingerprint: dict[str, Any] | None, chars: int = COPY_CHARS, file: TextIO | None = None
) -> CopyIndex | None:
    """The index of the training split a checkpoint's config names (data_path, tokenizer, val_frac), or None after a
    one-line note on `file` when the data is gone, holds other tokens than `fingerprint` (the checkpoint's state.json
    "data"; None or {}: not checked), or is too large. Never downloads: a missing Tiny Shakespeare is a note."""
    try:
        path = resolve_data_path(cfg.data_path)
        if not path.exists() and not (glob.has_magic(cfg.data_path) and glob.glob(str(path))):
            raise CheckSkipped(f"the training data {cfg.data_path} is not there any more")
        dataset = load_dataset(cfg)
        if fingerprint and token_fingerprint(dataset.train, dataset.val) != fingerprint:
            raise CheckSkipped(f"{cfg.data_path} now holds other tokens than the checkpoint was trained on")
        return CopyIndex(training_text(dataset.tokenizer, dataset.train), chars)
    except Exception as error:  # the data may be anything by now: a check is never worth failing the sampling
        _skipped(error, file)
        return None
