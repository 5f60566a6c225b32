"""prepare.py and the shard format (shards.py): tiny generated corpora in tmp folders, offline tokenizers."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import REPO, default_sigint

import prepare
import shards
from config import UserError

DOCS = {  # file -> its documents, in the order prepare reads them (sorted paths)
    "a.txt": ["The first document.\nIt has two lines."],
    "c.jsonl": ["jsonl one", "jsonl two, with ünïcode ✓"],
    "sub/b.jsonl.gz": ["gz one", "", "gz three 🙂"],
    "z.parquet": ["parquet zero", "parquet one", "parquet two", "parquet three", "parquet four"],
}


def make_corpus(root: Path) -> Path:
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(DOCS["a.txt"][0], encoding="utf-8")
    (corpus / "c.jsonl").write_text("".join(json.dumps({"text": t, "id": 1}) + "\n" for t in DOCS["c.jsonl"]) + "\n")
    with gzip.open(corpus / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS["sub/b.jsonl.gz"])
    pq.write_table(pa.table({"id": range(5), "text": DOCS["z.parquet"]}), corpus / "z.parquet", row_group_size=2)
    (corpus / "README.md").write_text("not a document")  # skipped, counted
    return corpus


def all_docs() -> list[str]:
    return [doc for docs in DOCS.values() for doc in docs]


def run(*argv: object) -> int:
    return prepare.main([str(a) for a in argv])


def split_tokens(out: Path, split: str) -> np.ndarray:
    files = sorted(out.glob(f"{split}_*.bin"))
    return np.concatenate([shards.read_shard(p) for p in files]) if files else np.empty(0, np.int64)


def expected_tokens(docs: list[str], name: str) -> np.ndarray:
    if name == "char":
        chars = sorted(set("".join(docs)) | {"\x03"})
        ids = {c: i for i, c in enumerate(chars)}
        return np.array([i for d in docs for i in [ids["\x03"]] + [ids[c] for c in d]])
    enc = tiktoken.get_encoding(name)
    return np.array([i for d in docs for i in [enc.eot_token] + enc.encode_ordinary(d)])


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_mixed_folder_gives_the_tokens_of_each_document(tmp_path, name):
    corpus, out = make_corpus(tmp_path), tmp_path / "out"
    assert run(corpus, "--out", out, "--tokenizer", name, "--val_frac", 0, "--workers", 2) == 0
    assert np.array_equal(split_tokens(out, "train"), expected_tokens(all_docs(), name))
    assert not list(out.glob("val_*.bin"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == len(all_docs())
    assert manifest["skipped_files"] == 1 and manifest["dtype"] == "uint16"
    assert [Path(s["path"]).name for s in manifest["settings"]["sources"]] == [
        "a.txt",
        "c.jsonl",
        "b.jsonl.gz",
        "z.parquet",
    ]
    if name == "char":
        assert manifest["tokenizer"]["chars"][0] == "\x03" and manifest["separator"]["id"] == 0


def test_workers_and_shard_boundaries_do_not_change_the_output(tmp_path):
    corpus = make_corpus(tmp_path)
    outs = [tmp_path / f"out{w}" for w in (1, 2)]
    for workers, out in zip((1, 2), outs, strict=True):
        assert run(corpus, "--out", out, "--val_frac", 0.4, "--shard_tokens", 7, "--workers", workers) == 0
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and "val_000000.bin" in files
    for name in files:
        if name.endswith(".bin"):
            assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    manifest = json.loads((outs[0] / "manifest.json").read_text())
    for split in ("train", "val"):  # every shard full but the last
        sizes = [s["tokens"] for s in manifest["splits"][split]["shards"]]
        assert all(s == 7 for s in sizes[:-1]) and 0 < sizes[-1] <= 7
    # the split is by document and by the documented rule; together the splits lose no token
    val_below = int(0.4 * 2**64)
    train_docs = [d for d in all_docs() if not prepare.is_val(d, val_below)]
    val_docs = [d for d in all_docs() if prepare.is_val(d, val_below)]
    assert train_docs and val_docs
    assert np.array_equal(split_tokens(outs[0], "train"), expected_tokens(train_docs, "gpt2"))
    assert np.array_equal(split_tokens(outs[0], "val"), expected_tokens(val_docs, "gpt2"))
    # each split records its documents' UTF-8 bytes (for bits per byte; separators count none), with 2 workers too
    for split, docs in (("train", train_docs), ("val", val_docs)):
        assert manifest["splits"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert json.loads((outs[1] / "manifest.json").read_text())["splits"] == manifest["splits"]


def test_o200k_shards_are_uint32(tmp_path):
    corpus, out = make_corpus(tmp_path), tmp_path / "out"
    assert run(corpus, "--out", out, "--tokenizer", "o200k_base", "--val_frac", 0, "--workers", 1) == 0
    tokens = shards.read_shard(out / "train_000000.bin")
    assert tokens.dtype == np.uint32 and np.array_equal(tokens, expected_tokens(all_docs(), "o200k_base"))
    assert json.loads((out / "manifest.json").read_text())["shard_version"] == 2


def reference_shard(path: Path, tokens: np.ndarray, magic=20240520, version=1, count=None) -> Path:
    """llm.c's writer (dev/data/data_common.py write_datafile), in numpy."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16 if version == 1 else np.uint32).tobytes())
    return path


def test_reference_shards_read_back_exactly(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    assert np.array_equal(shards.read_shard(reference_shard(tmp_path / "a.bin", tokens)), tokens)
    assert np.array_equal(shards.read_shard(reference_shard(tmp_path / "b.bin", tokens, version=2)), tokens)
    shards.write_shard(tmp_path / "c.bin", tokens, 1)  # ours is byte for byte llm.c's
    assert (tmp_path / "c.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    assert len(shards.read_shard(reference_shard(tmp_path / "e.bin", tokens[:0]))) == 0


@pytest.mark.parametrize(
    "damage, words",
    [
        (dict(magic=20240521), "magic 20240521"),
        (dict(version=3), "version 3"),
        (dict(count=999), "truncated"),
        (dict(count=1001), "truncated"),
    ],
)
def test_a_damaged_header_is_one_line_naming_the_file(tmp_path, damage, words):
    path = reference_shard(tmp_path / "bad.bin", np.arange(1000), **damage)
    with pytest.raises(UserError) as error:
        shards.read_shard(path)
    assert words in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "short.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="fewer than the 1024-byte header"):
        shards.read_shard(tmp_path / "short.bin")


def test_an_interrupted_prepare_reruns_to_the_same_output(tmp_path, monkeypatch, capsys):
    corpus = make_corpus(tmp_path)
    args = ("--val_frac", 0.4, "--shard_tokens", 5, "--workers", 1)
    assert run(corpus, "--out", tmp_path / "clean", *args) == 0
    calls, write = [], shards.write_shard

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        write(*a)

    monkeypatch.setattr(prepare, "write_shard", interrupted)
    out = tmp_path / "out"
    assert run(corpus, "--out", out, *args) == 130
    assert sorted(p.name for p in out.iterdir()) == ["train_000000.bin", "train_000001.bin"]  # no manifest, no temp
    monkeypatch.setattr(prepare, "write_shard", write)
    assert run(corpus, "--out", out, *args) == 0
    for path in (tmp_path / "clean").glob("*.bin"):
        assert (out / path.name).read_bytes() == path.read_bytes()
    capsys.readouterr()
    assert run(corpus, "--out", out, *args) == 0  # complete and the same: nothing to do
    assert "nothing to do" in capsys.readouterr().out
    assert run(corpus, "--out", out, "--val_frac", 0.3) == 2  # another setting: refused, kept


def bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments before --out, words the error must hold)."""
    (tmp / "empty").mkdir()
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.md").write_text("x")
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin1"))
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    (tmp / "notes.md").write_text("x")
    return {
        "no inputs": ([], "at least one input"),
        "missing": ([tmp / "nope.txt"], "does not exist"),
        "empty folder": ([tmp / "empty"], "holds no"),
        "no readable files": ([tmp / "other"], "holds no"),
        "not utf-8": ([tmp / "latin1.txt"], "byte offset 3"),
        "not json": ([tmp / "bad.jsonl"], "bad.jsonl:2 is not JSON"),
        "no field": ([tmp / "nofield.jsonl"], "nofield.jsonl:2 has no 'text' field"),
        "no column": ([tmp / "nocol.parquet"], "has no column 'text'"),
        "unsupported file": ([tmp / "notes.md"], "not a .jsonl.gz"),
    }


def test_each_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    for name, (inputs, words) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name}"
        assert run(*inputs, "--out", out, "--tokenizer", "char") == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (name, err)
        assert not (out / "manifest.json").exists() and not list(out.glob("*.bin")), name


def test_bad_out_folders(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "thesis.tex").write_text("x")
    for out, words in ((tmp_path / "afile" / "out", "not writable"), (tmp_path / "theirs", "prepare.py did not write")):
        assert run(corpus, "--out", out, "--tokenizer", "char") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert (tmp_path / "theirs" / "thesis.tex").exists()


def test_the_command_line_says_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_ctrl_c_mid_shard_in_a_real_process_reruns_to_the_same_output(tmp_path):
    """The command line, interrupted with SIGINT while it writes shards on 2 workers: exit 130, no manifest, only
    whole shards left; the same command then finishes with exactly the shards of an uninterrupted run."""
    rng = np.random.default_rng(0)
    words = np.array(["the", "king", "shall", "not", "die", "to", "night", "my", "lord", "and", "fair", "Rosalind"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # ~12 MB: seconds of work, so the signal lands mid-run
        lines = (" ".join(words[rng.integers(0, len(words), 60)]) for _ in range(20_000))
        (corpus / f"part{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    argv = [sys.executable, str(REPO / "prepare.py"), str(corpus), "--tokenizer", "char", "--workers", "2"]
    argv += ["--shard_tokens", "300000", "--val_frac", "0.01"]
    for attempt in range(3):  # a hang after SIGINT (multiprocessing.Pool's terminate) showed in ~1 of 6 runs
        out = tmp_path / f"out{attempt}"
        child = subprocess.Popen(
            [*argv, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        deadline = time.monotonic() + 120
        while not (out / "train_000000.bin").exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 130 and "interrupted" in err, err
        left = sorted(p.name for p in out.iterdir())
        assert left and "manifest.json" not in left and all(name.endswith(".bin") for name in left)  # no temp files
        for name in left:
            shards.read_shard(out / name)  # each one whole
    assert subprocess.run([*argv, "--out", str(out)], capture_output=True).returncode == 0
    assert subprocess.run([*argv, "--out", str(tmp_path / "clean")], capture_output=True).returncode == 0
    clean = sorted((tmp_path / "clean").glob("*.bin"))
    assert len(clean) > 2 and [p.name for p in clean] == sorted(p.name for p in out.glob("*.bin"))
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in clean)
