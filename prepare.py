"""Corpus -> token shards: `uv run prepare.py INPUT... --out DIR --tokenizer gpt2|o200k_base|char`.

INPUT is files or folders (recursive, sorted): .txt (one document per file), .jsonl / .jsonl.gz (one document per
line, its --text_field) and .parquet (the --text_field column, a row group at a time). This process only cuts the
files into raw documents, in order; they are decoded, parsed and tokenized on every core in chunks whose results
come back in order, so the shards are the same for any --workers. Each document is preceded by the separator (tiktoken's <|endoftext|>, or U+0003 for
char) and goes whole to train or val by a hash of its text. With --val_split end, one .txt file is split instead at a
character (its last --val_frac is val, no separators: nanoGPT's split, and what a plain text --data_path gets in
data/cache/). Shards are llm.c's .bin files (shards.write_shard), each written whole; manifest.json is written last,
so a folder without one is an unfinished run that a rerun redoes. See docs/data.md, "Preparing a corpus".
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from config import OneLineParser, UserError
from shards import SHARD_DTYPES, SHARD_HEADER_BYTES, shard_version, write_shard
from tokenizer import CharTokenizer, TiktokenTokenizer, Tokenizer
from utils import FolderLock, atomic_write, check_writable, human

FORMAT_VERSION = 1  # of manifest.json and the folder's layout
KINDS = (".jsonl.gz", ".jsonl", ".txt", ".parquet")  # longest suffix first: a.jsonl.gz is jsonl.gz, not gz
CHAR_SEPARATOR = "\x03"  # U+0003 END OF TEXT: the char tokenizer's document separator, one extra id
VAL_RULE = "blake2b (8-byte digest) of the document's UTF-8 text, read as a little-endian integer, < val_frac * 2**64"
END_RULE = "the text's last val_frac of characters: val starts at character int(characters * (1 - val_frac))"
CHUNK_DOCS, CHUNK_BYTES = 1024, 4 << 20  # one task for a worker: big enough to amortize pickling, small to balance
OUR_FILES = re.compile(
    r"^(manifest\.json|(train|val)_\d{6}\.bin)$|^\.(manifest\.json|(train|val)_\d{6}\.bin)\..*\.tmp$"
)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: which files, and their documents


def kind_of(path: Path) -> str | None:
    return next((kind for kind in KINDS if path.name.endswith(kind)), None)


def find_sources(inputs: list[str], out: Path) -> tuple[list[Path], int]:
    """(the files to read, in order; how many files in the folders were skipped as unsupported). An --out inside an
    input folder, and its lock file, are not part of the corpus."""
    out = out.resolve()
    ours = (out, out.parent / f".{out.name}.lock")
    if not inputs:
        raise UserError("give at least one input: a .txt, .jsonl, .jsonl.gz or .parquet file, or a folder of them")
    sources, skipped = [], 0
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _within(p.resolve(), ours))
            found = [p for p in files if kind_of(p)]
            if not found:
                raise UserError(f"folder {name} holds no {', '.join(sorted(KINDS))} files; give a folder of documents")
            sources += found
            skipped += len(files) - len(found)
        elif not path.exists():
            raise UserError(f"input {name} does not exist; give files or folders of documents")
        elif not path.is_file():
            raise UserError(f"input {name} is not a regular file or a folder")
        elif kind_of(path) is None:
            raise UserError(f"input {name} is not a {', '.join(KINDS)} file; convert it or leave it out")
        else:
            sources.append(path)
    unique = list(dict.fromkeys(p.resolve() for p in sources))  # a file named twice is read once
    return unique, skipped


def _within(path: Path, folders: tuple[Path, ...]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def _decode(payload: bytes, where: str, offset: int = 0) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{where} is not UTF-8: byte 0x{payload[error.start]:02x} at byte offset {offset + error.start}; "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


# The readers run in the main process and only cut each file into raw documents: ("txt", path, bytes), ("json",
# where, offset, line bytes) or ("parquet", path, row group, first row); decoding, JSON and row groups are parsed
# in the workers (`parse`), so the main process's share of the work stays small on every core count.
Raw = tuple


def read_txt(path: Path) -> Iterator[tuple[Raw | None, int]]:
    payload = path.read_bytes()  # one document: a file is held while it is read, never the corpus
    yield ("txt", str(path), payload), len(payload)


def read_jsonl(path: Path) -> Iterator[tuple[Raw | None, int]]:
    """Each non-blank line; progress in bytes of the file on disk (compressed for .gz)."""
    gz = path.name.endswith(".gz")
    with open(path, "rb") as raw:
        lines = gzip.open(raw) if gz else raw  # noqa: SIM115 (closed with raw)
        offset, done = 0, 0  # byte offset in the (decompressed) text; bytes of the file reported so far
        try:
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    position = raw.tell()
                    yield (
                        ("json", f"{path}:{lineno}" + (" (decompressed)" if gz else ""), offset, line),
                        position - done,
                    )
                    done = position
                offset += len(line)
        except (OSError, EOFError, zlib.error) as error:  # a damaged or truncated .gz
            raise UserError(f"cannot read {path}: {error}; download it again") from None
    yield None, path.stat().st_size - done


def require_pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: run `uv sync --extra data` (or pip install pyarrow)") from None
    return pq


def open_parquet(path: Path, text_field: str) -> Any:
    pq = require_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's errors for a damaged file vary
        raise UserError(f"cannot read {path} as parquet ({type(error).__name__}: {error}); download it again") from None
    if text_field not in pf.schema_arrow.names:
        columns = ", ".join(pf.schema_arrow.names[:10])
        raise UserError(f"{path} has no column {text_field!r} (it has: {columns}); set --text_field to the text column")
    return pf


def read_parquet(path: Path, text_field: str) -> Iterator[tuple[Raw | None, int]]:
    """One raw document per row group (a row group is the unit parquet compresses); the worker reads its rows."""
    pf, done, row = open_parquet(path, text_field), 0, 0
    for group in range(pf.num_row_groups):
        meta = pf.metadata.row_group(group)
        size = sum(meta.column(i).total_compressed_size for i in range(meta.num_columns))
        yield ("parquet", str(path), group, row), size
        row, done = row + meta.num_rows, done + size
    yield None, max(0, path.stat().st_size - done)


def documents(sources: list[Path], text_field: str) -> Iterator[tuple[Raw | None, int]]:
    """(raw document, bytes of input consumed) for every file in order; None marks progress only."""
    for path in sources:
        kind = kind_of(path)
        try:
            if kind == ".parquet":
                yield from read_parquet(path, text_field)
            else:
                yield from (read_jsonl if kind.startswith(".jsonl") else read_txt)(path)
        except PermissionError as error:
            raise UserError(f"cannot read {path}: {error.strerror}") from None


def parse(raw: Raw, text_field: str) -> list[str]:
    """The texts of one raw document (in a worker): a file, a JSON line's field, or a parquet row group's column."""
    kind = raw[0]
    if kind == "txt":
        return [_decode(raw[2], raw[1])]
    if kind == "json":
        _, where, offset, line = raw
        text = _decode(line, where, offset)
        if not text.strip():
            return []
        try:
            record = json.loads(text)
        except ValueError as error:
            raise UserError(f"{where} is not JSON ({error.msg}); one JSON object per line") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            got = "has no" if not isinstance(record, dict) or text_field not in record else "has a non-string"
            raise UserError(f"{where} {got} {text_field!r} field; set --text_field to the text's field")
        return [value]
    _, path, group, first_row = raw
    texts = open_parquet(Path(path), text_field).read_row_group(group, columns=[text_field]).column(0).to_pylist()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(f"{path} row {first_row + i}: {text_field!r} is {type(text).__name__}, not text")
    return texts


def chunks(docs: Iterable[tuple[Raw | None, int]]) -> Iterator[tuple[int, list[Raw]]]:
    """(input bytes, raw documents) in groups of up to CHUNK_DOCS documents or about CHUNK_BYTES bytes."""
    raws, size, progress = [], 0, 0
    for raw, consumed in docs:
        progress += consumed
        if raw is not None:
            raws.append(raw)
            size += len(raw[-1]) if raw[0] != "parquet" else CHUNK_BYTES  # (a row group is a task of its own)
        if len(raws) >= CHUNK_DOCS or size >= CHUNK_BYTES:
            yield progress, raws
            raws, size, progress = [], 0, 0
    if raws or progress:
        yield progress, raws


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# One text split at a character (--val_split end): read in blocks, never whole, and cut into pieces the workers
# can encode apart

TEXT_BLOCK = 4 << 20  # bytes read at a time


def text_blocks(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """(text, bytes read) of a UTF-8 file, block by block (a character split across blocks is kept whole); a byte
    that is not UTF-8 is a one-line error with its offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines = 0, 0  # bytes and newlines before this block
    with open(path, "rb") as f:
        while True:
            block = f.read(TEXT_BLOCK)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:  # error.object: the bytes held from the last block, then this one
                held = len(error.object) - len(block)
                line = newlines + error.object[: error.start].count(b"\n") + 1
                raise UserError(
                    f"{name} is not UTF-8: byte 0x{error.object[error.start]:02x} at offset "
                    f"{offset - held + error.start} (line {line}); convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset, newlines = offset + len(block), newlines + block.count(b"\n")
            yield text, len(block)
            if not block:
                return


def text_facts(path: Path, name: str) -> tuple[int, set[str]]:
    """The first pass over a text: (characters, the set of them). An empty or blank text is refused."""
    count, seen = 0, set()
    for text, _ in text_blocks(path, name):
        count += len(text)
        seen.update(text)
    if not seen - set(" \t\n\r\x0b\x0c"):
        raise UserError(f"{name} is empty; give a text file with something to learn")
    return count, seen


def safe_cut(text: str, near: int, end: int) -> int | None:
    """A position in text[:end] near `near` where the text may be cut and each side encoded apart with the same ids
    as the whole: before a space between two letters. In both gpt2's and o200k_base's split patterns a run of letters
    ends there and " " + letters begins a new pre-token, and BPE never merges across pre-tokens. None if none."""

    def between_letters(at: int) -> bool:
        return text[at - 1].isalpha() and at + 1 < end and text[at + 1].isalpha()

    at = max(0, near - 1)
    while (at := text.find(" ", at + 1, end)) > 0:  # the first after `near`, else the last before it
        if between_letters(at):
            return at
    at = min(near, end)
    while (at := text.rfind(" ", 1, at)) > 0:
        if between_letters(at):
            return at
    return None


def text_pieces(path: Path, name: str, split: int, piece_chars: int) -> Iterator[tuple[tuple[int, str, int], str]]:
    """((bytes read, split, the piece's UTF-8 bytes), text) in order: the text cut at character `split` (train
    before, val after) and within each side at safe_cut points about every piece_chars characters, so the pieces
    encode to the ids of text[:split] and text[split:]."""
    pending, position, consumed = "", 0, 0  # position: characters before `pending`
    for block, size in text_blocks(path, name):
        pending, consumed = pending + block, consumed + size
        while True:
            part = "train" if position < split else "val"
            end = min(len(pending), split - position) if part == "train" else len(pending)  # this side's, in hand
            cut = safe_cut(pending, piece_chars, end) if end >= piece_chars else None
            if cut is None and part == "train" and end == split - position:
                cut = end  # the split point is in hand and no earlier cut is due: cut there
            if not cut:
                break  # read on (a text without safe points is encoded in fewer, longer pieces)
            yield (consumed, part, len(pending[:cut].encode("utf-8"))), pending[:cut]
            pending, position, consumed = pending[cut:], position + cut, 0
    yield (consumed, "train" if position < split else "val", len(pending.encode("utf-8"))), pending


# ----------------------------------------------------------------------------------------------------------------
# Workers: in each process, the tokenizer and the split rule; results come back in the order tasks went out

_WORKER: dict[str, Any] = {}


def _init_worker(
    tokenizer: dict[str, Any] | None, val_frac: float, text_field: str = "text", in_main: bool = False
) -> None:
    if not in_main:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    _WORKER.clear()
    _WORKER["val_below"], _WORKER["text_field"] = int(val_frac * 2**64), text_field
    if tokenizer is None:
        return
    if tokenizer["name"] == "char":
        chars = tokenizer["chars"]
        table = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint32)  # code point -> id, one lookup per text
        table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint32)
        _WORKER["encode"] = lambda texts: [table[np.frombuffer(t.encode("utf-32-le"), np.uint32)] for t in texts]
        _WORKER["separator"] = (
            chars.index(CHAR_SEPARATOR) if CHAR_SEPARATOR in chars else None
        )  # (none: --val_split end)
        _WORKER["dtype"] = SHARD_DTYPES[shard_version(len(chars))]
    else:
        import tiktoken

        enc = tiktoken.get_encoding(tokenizer["name"])
        _WORKER["encode"] = lambda texts: enc.encode_ordinary_batch(texts, num_threads=1)  # the cores are ours
        _WORKER["separator"], _WORKER["dtype"] = enc.eot_token, SHARD_DTYPES[shard_version(enc.n_vocab)]


def is_val(text: str, val_below: int) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_below


def chunk_chars(raws: list[Raw]) -> str:
    return "".join(set().union(*(text for raw in raws for text in parse(raw, _WORKER["text_field"]))))


def encode_chunk(raws: list[Raw]) -> tuple[np.ndarray, np.ndarray, int, int, int, int]:
    """(train tokens, val tokens, train documents, val documents, train bytes, val bytes) of one chunk, each
    document after a separator; the bytes are the documents' UTF-8 bytes (for bits per byte; separators add none)."""
    texts = [text for raw in raws for text in parse(raw, _WORKER["text_field"])]
    dtype, separator = _WORKER["dtype"], np.array([_WORKER["separator"]], dtype=_WORKER["dtype"])
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    size = {False: 0, True: 0}
    for text, ids in zip(texts, _WORKER["encode"](texts), strict=True):
        split = is_val(text, _WORKER["val_below"])
        parts[split] += [separator, np.asarray(ids, dtype=dtype)]
        size[split] += len(text.encode("utf-8"))
    train, val = (np.concatenate(parts[v]) if parts[v] else np.empty(0, dtype) for v in (False, True))
    return train, val, len(parts[False]) // 2, len(parts[True]) // 2, size[False], size[True]


def encode_piece(text: str) -> np.ndarray:
    """The ids of one piece of a text split at a character (--val_split end): no separators."""
    return np.asarray(_WORKER["encode"]([text])[0], dtype=_WORKER["dtype"])


def ordered_map(fn: Callable, items: Iterable[tuple[Any, Any]], workers: int, initargs: tuple) -> Iterator:
    """(meta, fn(payload)) for each (meta, payload), in order, on `workers` processes with at most 2 tasks each in
    flight (Pool.imap would read the whole input ahead into its queue, i.e. the corpus into memory). Item i goes to
    worker i % workers over pipes of its own: no lock is shared with a worker, so killing them on Ctrl-C cannot hang
    us (multiprocessing.Pool.terminate can, when a worker is blocked sending a result)."""
    if workers == 1:
        _init_worker(*initargs, in_main=True)
        for meta, payload in items:
            yield meta, fn(payload)
        return
    task_readers, task_writers = zip(*(multiprocessing.Pipe(duplex=False) for _ in range(workers)), strict=True)
    result_readers, result_writers = zip(*(multiprocessing.Pipe(duplex=False) for _ in range(workers)), strict=True)
    processes = [
        multiprocessing.Process(target=_work, args=(task_readers[w], result_writers[w], fn, initargs), daemon=True)
        for w in range(workers)
    ]
    for process, task_reader, result_writer in zip(processes, task_readers, result_writers, strict=True):
        process.start()
        task_reader.close()  # the worker's ends: a worker that dies is then an EOFError here
        result_writer.close()
    pending: deque = deque()  # (meta, worker) of the tasks in flight, oldest first

    def oldest() -> tuple[Any, Any]:
        meta, worker = pending.popleft()
        try:
            ok, result = result_readers[worker].recv()
        except EOFError:
            raise RuntimeError(f"a prepare worker died (exit code {processes[worker].exitcode})") from None
        if not ok:
            raise result
        return meta, result

    try:
        for i, (meta, payload) in enumerate(items):
            if len(pending) == 2 * workers:  # the oldest task in flight is this worker's
                yield oldest()
            task_writers[i % workers].send(payload)
            pending.append((meta, i % workers))
        while pending:
            yield oldest()
        for task_writer in task_writers:
            task_writer.send(None)
        for process in processes:
            process.join()
    finally:
        for process in processes:  # on an error or Ctrl-C (a no-op after the clean end above)
            process.kill()
            process.join()


def _work(tasks: Any, results: Any, fn: Callable, initargs: tuple) -> None:
    """One worker: its tasks are read by a thread, so the main process's send never waits for this worker to be
    done with a task while it waits to send that task's result (a deadlock with pipes of finite size)."""
    _init_worker(*initargs)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            while (payload := tasks.recv()) is not None:
                inbox.put(payload)
        except EOFError:  # the main process is gone
            pass
        inbox.put(None)

    threading.Thread(target=receive, daemon=True).start()
    while (payload := inbox.get()) is not None:
        try:
            results.send((True, fn(payload)))
        except Exception as error:  # sent back, raised in the main process (e.g. a UserError naming a bad line)
            results.send((False, error))


# ----------------------------------------------------------------------------------------------------------------
# Output: shards of exactly shard_tokens tokens (the last one shorter), then the manifest


class ShardWriter:
    """Fills one preallocated shard buffer per split and writes it whole when full; documents span shards."""

    def __init__(self, out: Path, split: str, shard_tokens: int, version: int):
        self.out, self.split, self.shard_tokens, self.version = out, split, shard_tokens, version
        self.buffer: np.ndarray | None = None  # allocated at the first token (a split may get none)
        self.filled, self.shards, self.tokens, self.documents, self.bytes = 0, [], 0, 0, 0

    def add(self, ids: np.ndarray, documents: int, size: int) -> None:
        """`size`: the UTF-8 bytes of the documents `ids` encode (separators excluded)."""
        self.tokens, self.documents, self.bytes = self.tokens + len(ids), self.documents + documents, self.bytes + size
        while len(ids):
            if self.buffer is None:
                self.buffer = np.empty(self.shard_tokens, dtype=SHARD_DTYPES[self.version])
            take = min(len(ids), self.shard_tokens - self.filled)
            self.buffer[self.filled : self.filled + take] = ids[:take]
            self.filled, ids = self.filled + take, ids[take:]
            if self.filled == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            name = f"{self.split}_{len(self.shards):06d}.bin"
            write_shard(self.out / name, self.buffer[: self.filled], self.version)
            self.shards.append({"file": name, "tokens": self.filled})
            self.filled = 0

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": self.documents, "bytes": self.bytes, "shards": self.shards}


def settings_of(args: argparse.Namespace, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """What decides the output: a complete manifest with the same settings means there is nothing to do."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_name": args.tokenizer,
        "text_field": args.text_field,
        "val_frac": args.val_frac,
        "val_split": args.val_split,
        "shard_tokens": args.shard_tokens,
        "sources": sources,
    }


def shards_intact(out: Path, manifest: dict[str, Any]) -> bool:
    """Every shard the manifest lists is there with the size its token count gives."""
    try:
        itemsize = SHARD_DTYPES[manifest["shard_version"]].itemsize
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                path = out / shard["file"]
                if not path.is_file() or path.stat().st_size != SHARD_HEADER_BYTES + shard["tokens"] * itemsize:
                    return False
    except (KeyError, TypeError, AttributeError):
        return False
    return True


def without_paths(settings: Any) -> Any:
    """Settings as compared: the sources by content (bytes, sha256), so a moved or renamed input is the same corpus."""
    try:
        return {**settings, "sources": [{k: v for k, v in s.items() if k != "path"} for s in settings["sources"]]}
    except (TypeError, KeyError, AttributeError):
        return settings  # (damaged: it will differ)


def prepare_out(out: Path, settings: dict[str, Any]) -> bool:
    """Make `out` ready for a fresh run (True), or see that it already holds this exact run (False)."""
    if not out.exists():
        out.mkdir(parents=True)
        return True
    foreign = sorted(p.name for p in out.iterdir() if not OUR_FILES.match(p.name))
    if foreign:
        raise UserError(
            f"--out {out} holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, which "
            "prepare.py did not write; give a new or empty folder"
        )
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        settings_found = manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        manifest = settings_found = None  # none (an unfinished run), or one that describes nothing usable
    if manifest is not None and without_paths(settings_found) != without_paths(settings):
        raise UserError(
            f"--out {out} holds a corpus prepared from other inputs or settings (see its manifest.json); give "
            "another --out, or delete that folder to prepare it again"
        )
    if manifest is not None and shards_intact(out, manifest):
        return False
    for path in out.iterdir():  # our own files from an unfinished (or damaged) run: start cleanly
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        return prepare(build_parser().parse_args(argv))
    except UserError as error:
        print(f"error: {str(error).removeprefix('argument ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no manifest was written; run the same command again to start over", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="prepare.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help=".txt/.jsonl/.jsonl.gz/.parquet files or folders")
    parser.add_argument("--out", required=True, help="the folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "o200k_base", "char"))
    parser.add_argument("--text_field", default="text", help="the jsonl field / parquet column holding the text")
    parser.add_argument(
        "--val_frac", type=float, default=0.001, help="fraction of documents held out for validation, by text hash"
    )
    parser.add_argument(
        "--val_split",
        default="document",
        choices=("document", "end"),
        help="document: whole documents by hash; end: the last --val_frac of one .txt file's characters",
    )
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (llm.c: 100M)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    return parser


def prepare(args: argparse.Namespace) -> int:
    if not 0 <= args.val_frac < 1:
        raise UserError(f"--val_frac must be in [0, 1), got {args.val_frac}")
    if args.shard_tokens < 1 or args.workers < 1:
        raise UserError("--shard_tokens and --workers must be at least 1")
    out = Path(args.out)
    paths, skipped = find_sources(args.inputs, out)
    if args.val_split == "end" and (len(paths) != 1 or kind_of(paths[0]) != ".txt"):
        raise UserError("--val_split end splits one text at a character: give exactly one .txt file")
    check_writable(out, "--out")
    if any(kind_of(p) == ".parquet" for p in paths):
        require_pyarrow()  # before any work, not at the first parquet file
    if args.tokenizer != "char":
        TiktokenTokenizer(args.tokenizer)  # fails early when offline
    sizes = [p.stat().st_size for p in paths]
    hashing = ordered_map(file_sha256, ((None, p) for p in paths), min(args.workers, len(paths)), (None, 0))
    with contextlib.closing(hashing):
        hashes = [digest for _, digest in hashing]
    sources = [{"path": str(p), "bytes": s, "sha256": h} for p, s, h in zip(paths, sizes, hashes, strict=True)]
    manifest = prepare_locked(args, paths, sources, skipped=skipped)
    if manifest is None:
        print(f"{out} already holds this corpus prepared with these settings (manifest.json); nothing to do")
        return 0
    print(describe(out, manifest, len(paths)))
    if not manifest["splits"]["val"]["documents"]:
        print("note: no document went to validation; raise --val_frac for a corpus this small")
    return 0


def prepare_locked(
    args: argparse.Namespace,
    paths: list[Path],
    sources: list[dict[str, Any]],
    name: str | None = None,
    skipped: int = 0,
    wait: bool = False,
    fresh: bool = False,
) -> dict[str, Any] | None:
    """Write args.out's shards and manifest with its lock held (or wait for it); None when it already holds them.
    `fresh`: remove the folder first."""
    out, settings = Path(args.out), settings_of(args, sources)
    with FolderLock(out) as lock:
        if not lock.acquire(wait=wait):
            raise UserError(f"--out {out} is being written by {lock.holder()}; wait for it or pick another --out")
        if fresh and out.exists():
            shutil.rmtree(out)
        if not prepare_out(out, settings):
            return None
        total = sum(source["bytes"] for source in sources)
        if args.val_split == "end":
            manifest = write_text_shards(paths[0], name or str(paths[0]), args, out, total)
        else:
            tokenizer = TiktokenTokenizer(args.tokenizer) if args.tokenizer != "char" else None
            manifest = write_shards(paths, args, tokenizer or char_vocabulary(paths, args, total), out, total)
        manifest.update(settings=settings, skipped_files=skipped)
        atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=True) + "\n")
    return manifest


def prepare_text(path: Path, name: str, cache: Path, tokenizer: str, val_frac: float, fresh: bool = False) -> Path:
    """A plain text file as a prepared folder under `cache` (made on first use, by this module's code): split at a
    character like nanoGPT (--val_split end), in a folder named by the text's hash and the settings. Several
    processes (torchrun's ranks) may ask at once: one prepares, the others wait for its lock and then read. `fresh`:
    delete what the folder holds first (it was found damaged)."""
    digest = file_sha256(path)
    out = cache / f"{digest[:16]}-{tokenizer}-{val_frac}"
    size = path.stat().st_size
    args = argparse.Namespace(
        out=str(out),
        tokenizer=tokenizer,
        text_field="text",
        val_frac=val_frac,
        val_split="end",
        shard_tokens=100_000_000,
        workers=max(1, min(os.cpu_count() or 1, size // CHUNK_BYTES)),  # (Tiny Shakespeare: one process)
    )
    source = {"path": str(path), "bytes": size, "sha256": digest}
    manifest = prepare_locked(args, [path], [source], name, wait=True, fresh=fresh)
    if manifest is not None:
        train, val = (manifest["splits"][split]["tokens"] for split in ("train", "val"))
        print(f"prepared {name} into {out}: {human(train)} train / {human(val)} val tokens", flush=True)
    return out


def describe(out: Path, manifest: dict[str, Any], files: int) -> str:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    skipped = manifest.get("skipped_files")
    return (
        f"{out}: train {human(train['tokens'])} tokens ({train['documents']} documents, {len(train['shards'])} "
        f"shards), val {human(val['tokens'])} tokens ({val['documents']} documents) from {files} files"
        + (f"; skipped {skipped} other files" if skipped else "")
    )


def progress_bar(total: int, desc: str) -> Any:
    """tqdm over input bytes (MB/s and ETA), on a terminal only; without tqdm, no bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, smoothing=0.05)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def char_vocabulary(paths: list[Path], args: argparse.Namespace, total: int) -> CharTokenizer:
    """The first pass for char: every distinct character of the corpus, sorted, plus the separator U+0003."""
    seen: set[str] = set()
    bar = progress_bar(total, "vocabulary")
    results = ordered_map(
        chunk_chars, chunks(documents(paths, args.text_field)), args.workers, (None, 0, args.text_field)
    )
    with contextlib.closing(results), contextlib.closing(bar):  # (the workers end here, on Ctrl-C too)
        for consumed, chars in results:
            seen.update(chars)
            bar.update(consumed)
    if CHAR_SEPARATOR in seen:
        raise UserError(
            "the corpus holds U+0003, which --tokenizer char uses to separate documents; remove it or use gpt2"
        )
    return CharTokenizer("".join(sorted(seen | {CHAR_SEPARATOR})))


def write_shards(
    paths: list[Path], args: argparse.Namespace, tokenizer: Tokenizer, out: Path, total: int
) -> dict[str, Any]:
    """Tokenize every document and write the shards; the manifest's contents (settings aside)."""
    version = shard_version(tokenizer.vocab_size)
    writers = {split: ShardWriter(out, split, args.shard_tokens, version) for split in ("train", "val")}
    initargs = (tokenizer.to_dict(), args.val_frac, args.text_field)
    bar = progress_bar(total, "tokenizing")
    results = ordered_map(encode_chunk, chunks(documents(paths, args.text_field)), args.workers, initargs)
    with contextlib.closing(results), contextlib.closing(bar):
        for consumed, (train, val, n_train, n_val, b_train, b_val) in results:
            writers["train"].add(train, n_train, b_train)
            writers["val"].add(val, n_val, b_val)
            bar.update(consumed)
            bar.set_postfix_str(f"{human(writers['train'].tokens + writers['val'].tokens)} tokens")
        for writer in writers.values():
            writer.flush()
    if isinstance(tokenizer, CharTokenizer):
        separator = {"id": tokenizer.chars.index(CHAR_SEPARATOR), "text": CHAR_SEPARATOR}
    else:
        separator = {"id": tokenizer.start_id, "text": "<|endoftext|>"}
    val_split = {"rule": VAL_RULE, "val_frac": args.val_frac, "unit": "document"}
    return manifest_of(tokenizer, writers, {**separator, "placement": "before every document"}, val_split)


def write_text_shards(path: Path, name: str, args: argparse.Namespace, out: Path, total: int) -> dict[str, Any]:
    """One text split at a character (--val_split end): a first pass counts its characters (and for char collects
    them: the vocabulary, with no separator), the second tokenizes it in pieces on every core."""
    count, seen = text_facts(path, name)
    tokenizer = CharTokenizer("".join(sorted(seen))) if args.tokenizer == "char" else TiktokenTokenizer(args.tokenizer)
    split = int(count * (1 - args.val_frac))
    version = shard_version(tokenizer.vocab_size)
    writers = {part: ShardWriter(out, part, args.shard_tokens, version) for part in ("train", "val")}
    tokens_sha256 = hashlib.sha256()  # of the ids as int64, train then val: the fingerprint runs had before shards
    bar = progress_bar(total, "tokenizing")
    pieces = text_pieces(path, name, split, CHUNK_BYTES)
    results = ordered_map(encode_piece, pieces, args.workers, (tokenizer.to_dict(), 0))
    with contextlib.closing(results), contextlib.closing(bar):
        for (consumed, part, size), ids in results:
            writers[part].add(ids, 0, size)
            tokens_sha256.update(ids.astype(np.int64).tobytes())
            bar.update(consumed)
        for writer in writers.values():
            writer.documents = int(writer.tokens > 0)  # the text's two parts
            writer.flush()
    val_split = {"rule": END_RULE, "val_frac": args.val_frac, "unit": "character", "val_starts_at": split}
    manifest = manifest_of(tokenizer, writers, None, val_split)
    return {**manifest, "tokens_sha256": tokens_sha256.hexdigest()}


def manifest_of(
    tokenizer: Tokenizer, writers: dict[str, ShardWriter], separator: dict[str, Any] | None, val_split: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's contents, settings aside."""
    version = writers["train"].version
    return {
        "format": "pair-transformer token shards",
        "format_version": FORMAT_VERSION,
        "shard_format": "llm.c .bin: 256 int32 header (magic 20240520, version, token count), then the tokens",
        "shard_version": version,
        "dtype": SHARD_DTYPES[version].name,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "separator": separator,
        "val_split": val_split,
        "splits": {split: writer.summary() for split, writer in writers.items()},
    }


if __name__ == "__main__":
    sys.exit(main())
