"""Training from a folder prepared by prepare.py: the shards read as one token sequence, memory-mapped, and train,
resume and refuse bad folders like a text file does. Tiny generated corpora, tiny --shard_tokens (several shards)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_state, run_config, step_losses, synthetic_text, tiny_config

import data
import prepare
import shards
import train
from config import UserError


def prepare_corpus(root: Path, tokenizer: str, shard_tokens: int) -> Path:
    """A jsonl corpus of short documents, prepared into root/<tokenizer> in shards of shard_tokens tokens."""
    lines = synthetic_text(6_000).splitlines()
    docs = [" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = root / tokenizer
    argv = [str(corpus), "--out", str(out), "--tokenizer", tokenizer, "--val_frac", "0.2", "--workers", "1"]
    assert prepare.main([*argv, "--shard_tokens", str(shard_tokens)]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {"char": prepare_corpus(root, "char", 700), "gpt2": prepare_corpus(root, "gpt2", 300)}


def concatenated(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([shards.read_shard(p) for p in sorted(folder.glob(f"{split}_*.bin"))]).astype(np.int64)


@pytest.mark.parametrize("name", ["char", "gpt2"])
def test_load_dataset_gives_the_tokens_of_the_shards(prepared, name):
    folder = prepared[name]
    assert len(list(folder.glob("train_*.bin"))) >= 3  # the boundaries below are real
    dataset = data.load_dataset(tiny_config(data_path=str(folder), tokenizer=name))
    tokenizer, train_ids, val_ids = dataset.tokenizer, dataset.train, dataset.val
    manifest = json.loads((folder / "manifest.json").read_text())
    assert tokenizer.to_dict() == manifest["tokenizer"]
    assert isinstance(train_ids, data.ShardTokens) and all(isinstance(s, np.memmap) for s in train_ids.shards)
    everything = concatenated(folder, "train")
    assert len(train_ids) == len(everything) == manifest["splits"]["train"]["tokens"]
    assert torch.equal(train_ids.windows(torch.tensor([0]), len(everything))[0], torch.from_numpy(everything))
    assert torch.equal(val_ids.read(), torch.from_numpy(concatenated(folder, "val")))
    fingerprint = data.token_fingerprint(train_ids, val_ids)
    assert fingerprint["train_tokens"] == len(everything) and fingerprint["val_tokens"] == len(val_ids)


@pytest.mark.parametrize("name", ["char", "gpt2"])
def test_windows_across_shard_boundaries_equal_the_concatenated_tokens(prepared, name):
    train_ids = data.load_dataset(tiny_config(data_path=str(prepared[name]), tokenizer=name)).train
    everything = torch.from_numpy(concatenated(prepared[name], "train"))
    boundary = int(train_ids.offsets[1])
    length = int(train_ids.offsets[2] - train_ids.offsets[1]) + 10  # a window over a whole shard and both its ends
    starts = torch.tensor([0, boundary - 5, boundary - 1, boundary, boundary - 5, len(everything) - 17])
    for context_len in (16, length - 1):
        x, y = data.gather_windows(train_ids, starts[starts + context_len + 1 <= len(everything)], context_len)
        x_ref, y_ref = data.gather_windows(everything, starts[starts + context_len + 1 <= len(everything)], context_len)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(IndexError):
        train_ids.windows(torch.tensor([len(everything) - 3]), 4)


def test_train_batches_over_shards_visit_every_window_once_per_epoch_on_any_rank_count(prepared):
    """Over shards the order is computed per batch (no table); it is still one pass over every window an epoch,
    and 2 ranks see exactly the windows of 1 rank with twice the rows."""
    train_ids = data.load_dataset(tiny_config(data_path=str(prepared["char"]))).train
    everything = torch.from_numpy(concatenated(prepared["char"], "train"))
    one = data.TrainBatches(train_ids, 8, 16, 7, torch.device("cpu"))
    ranks = [data.TrainBatches(train_ids, 4, 16, 7, torch.device("cpu"), rank, 2) for rank in (0, 1)]
    for _epoch in range(2):
        starts_seen = []
        for b in range(one.batches_per_epoch):
            x, _ = one.next_batch()
            assert torch.equal(x, torch.cat([batches.next_batch()[0] for batches in ranks]))
            positions = torch.arange(b * 8, (b + 1) * 8)  # (read after next_batch: a new epoch draws its key first)
            starts = (one._offset + data.permuted(positions, one.windows_per_epoch, one._key) * 16).tolist()
            assert torch.equal(x, torch.stack([everything[start : start + 16] for start in starts]))
            starts_seen += starts
        assert len(set(starts_seen)) == len(starts_seen) == one.batches_per_epoch * 8  # no window twice an epoch
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permuted_is_a_bijection_that_depends_on_its_key(n):
    index = torch.arange(n)
    perm = data.permuted(index, n, key=5)
    assert sorted(perm.tolist()) == list(range(n))
    if n >= 64:
        assert not torch.equal(perm, data.permuted(index, n, key=6)) and not torch.equal(perm, index)
    assert torch.equal(data.permuted(index[n // 2 :], n, key=5), perm[n // 2 :])  # any indices alone, same values


RESUME = dict(max_steps=8, eval_every=4, log_every=2, save_model=True, save_every=4, keep_checkpoints=None, dropout=0.1)


def test_train_from_a_folder_and_resume_it_exactly(prepared, tmp_path):
    folder = prepared["char"]
    straight = train.train(run_config(tmp_path / "a", folder, RESUME))
    assert math.isfinite(straight["final_val_loss"])
    checkpoint = tmp_path / "b" / "models" / "r" / "step_000004"  # a copy: resuming a's step 4 in place meets step 8
    shutil.copytree(tmp_path / "a" / "models" / "r" / "step_000004", checkpoint)
    resumed = train.train(run_config(tmp_path / "b", folder, RESUME, resume=str(checkpoint)))
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert step_losses(tmp_path / "b" / "runs" / "r") == [
        r for r in step_losses(tmp_path / "a" / "runs" / "r") if r[0] > 4
    ]
    assert_same_state(tmp_path / "b" / "models" / "r" / "step_000008", tmp_path / "a" / "models" / "r" / "step_000008")


@pytest.mark.parametrize("name", ["char", "gpt2"])
def test_a_prepared_folder_gives_bits_per_byte_from_its_manifest_bytes(prepared, tmp_path, name):
    """The manifest's val bytes are the val documents' UTF-8 bytes; a run's final bpb is loss x val tokens / those
    bytes / ln 2. A manifest from before prepare.py counted bytes still trains, with bpb None."""
    folder = prepared[name]
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = synthetic_text(6_000).splitlines()
    docs = [" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    val_docs = [d for d in docs if prepare.is_val(d, int(0.2 * 2**64))]
    assert manifest["splits"]["val"]["bytes"] == sum(len(d.encode("utf-8")) for d in val_docs) > 0
    cfg = tiny_config(data_path=str(folder), tokenizer=name)
    assert data.load_dataset(cfg).val_bytes == manifest["splits"]["val"]["bytes"]
    run = dict(max_steps=2, num_blocks=1, tokenizer=name)
    summary = train.train(run_config(tmp_path / "new", folder, run))
    val_tokens = manifest["splits"]["val"]["tokens"]
    expected = summary["final_val_loss"] * val_tokens / manifest["splits"]["val"]["bytes"] / math.log(2)
    assert summary["final_val_bpb"] == pytest.approx(expected, rel=1e-12)
    old = tmp_path / "old"  # the same folder with the bytes taken out of its manifest
    shutil.copytree(folder, old)
    for split in manifest["splits"].values():
        del split["bytes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert data.load_dataset(tiny_config(data_path=str(old), tokenizer=name)).val_bytes is None
    summary = train.train(run_config(tmp_path / "old_run", old, run))
    assert summary["final_val_bpb"] is None and math.isfinite(summary["final_val_loss"])
    final = json.loads((tmp_path / "old_run" / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] is True and final["val_bpb"] is None


def test_a_manifest_of_another_tokenizer_is_one_line(prepared):
    with pytest.raises(UserError, match=r"prepared with --tokenizer gpt2, not char; pass --tokenizer gpt2") as error:
        data.load_dataset(tiny_config(data_path=str(prepared["gpt2"]), tokenizer="char"))
    assert "\n" not in str(error.value)


def test_a_folder_without_a_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "train_000000.bin").write_bytes(b"")
    argv = ["--data_path", str(tmp_path / "unfinished"), "--tokenizer", "char", "--device", "cpu"]
    assert train.main([*argv, "--runs_dir", str(tmp_path / "runs"), "--save_model", "False"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "no manifest.json" in err and "uv run prepare.py" in err


def test_a_damaged_shard_is_one_line(prepared, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(prepared["char"], folder)
    shard = folder / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # one token short of what its header says
    with pytest.raises(UserError, match="truncated or damaged") as error:
        data.load_dataset(tiny_config(data_path=str(folder)))
    assert "\n" not in str(error.value)


def test_resuming_on_another_prepared_folder_is_refused(prepared, tmp_path):
    """The fingerprint of a folder is its manifest's shard list and sources: other shards, another fingerprint."""
    train.train(run_config(tmp_path / "a", prepared["char"], RESUME, max_steps=2, save_every=None))
    other = prepare_corpus(tmp_path, "char", 500)
    cfg = run_config(tmp_path / "b", other, RESUME, max_steps=4, resume=str(tmp_path / "a" / "models" / "r"))
    with pytest.raises(UserError, match="it was trained on other tokens"):
        train.train(cfg)


# ----------------------------------------------------------------------------------------------------------------
# llm.c / modded-nanogpt .bin shards as they are: --data_path names the train shards, val is "train" -> "val"


def llmc_shard(path: Path, tokens: np.ndarray) -> Path:
    """llm.c's writer (dev/data/data_common.py write_datafile): 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 1, len(tokens)
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())
    return path


@pytest.fixture
def fineweb(tmp_path) -> tuple[Path, list[np.ndarray], np.ndarray]:
    """A folder laid out like modded-nanogpt's fineweb10B: fineweb_train_00000{1,2}.bin and fineweb_val_000000.bin."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    train_parts = [rng.integers(0, 50257, n) for n in (3000, 2000)]
    for i, part in enumerate(train_parts, 1):
        llmc_shard(folder / f"fineweb_train_{i:06d}.bin", part)
    val = rng.integers(0, 50257, 1500)
    llmc_shard(folder / "fineweb_val_000000.bin", val)
    return folder, train_parts, val


def test_a_bin_glob_reads_llmc_shards_as_they_are(fineweb):
    folder, train_parts, val = fineweb
    dataset = data.load_dataset(tiny_config(data_path=str(folder / "fineweb_train_*.bin"), tokenizer="gpt2"))
    assert dataset.tokenizer.vocab_size == 50257 and dataset.val_bytes is None
    assert torch.equal(dataset.train.read(), torch.from_numpy(np.concatenate(train_parts)))
    assert torch.equal(dataset.val.read(), torch.from_numpy(val))
    one = data.load_dataset(tiny_config(data_path=str(folder / "fineweb_train_000001.bin"), tokenizer="gpt2"))
    assert torch.equal(one.train.read(), torch.from_numpy(train_parts[0]))  # one file names itself
    assert one.train.digest != dataset.train.digest  # other shards, another fingerprint


def test_train_py_trains_from_a_bin_glob(fineweb, tmp_path):
    folder, _, _ = fineweb
    cfg = run_config(tmp_path, folder / "fineweb_train_*.bin", RESUME, tokenizer="gpt2", max_steps=2, save_every=None)
    summary = train.train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_val_loss"]) and summary["final_val_bpb"] is None


@pytest.mark.parametrize(
    "pattern, tokenizer, message",
    [
        ("fineweb_train_*.bin", "char", "pass the --tokenizer they were made with"),
        ("fineweb_*.bin", "gpt2", "name the train shards"),
        ("other_train_*.bin", "gpt2", "no train shards match"),
        ("fineweb_train_000001.bin", "gpt2", None),  # (its val: below)
    ],
)
def test_a_bad_bin_glob_is_one_line(fineweb, pattern, tokenizer, message):
    folder, _, _ = fineweb
    if message is None:
        (folder / "fineweb_val_000000.bin").rename(folder / "elsewhere.bin")
        message = "no val shards match"
    with pytest.raises(UserError, match=message) as error:
        data.load_dataset(tiny_config(data_path=str(folder / pattern), tokenizer=tokenizer))
    assert "\n" not in str(error.value)


def test_a_bin_shard_with_ids_past_the_vocabulary_is_one_line(fineweb):
    folder, _, _ = fineweb
    llmc_shard(folder / "fineweb_val_000000.bin", np.array([1, 2, 60_000] * 100))
    with pytest.raises(UserError, match="outside the vocabulary of 50257"):
        data.load_dataset(tiny_config(data_path=str(folder / "fineweb_train_*.bin"), tokenizer="gpt2"))
