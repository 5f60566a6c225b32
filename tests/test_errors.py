"""Bad input, case by case: each ends in exit status 2 and exactly one stderr line, `error: ...`, that says what to
do; never a traceback. Cases run through train.main(argv) like the command line; two run the real command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, argv_of, read_records, run_values, synthetic_text, write_text

import train

TEXT = synthetic_text(3_000)


# the model the checkpoint's errors name: 1 block, 2 heads, 16 dim (context 16), 2 steps
SMALL = dict(num_blocks=1, num_heads=2, embedding_dim=16, max_steps=2, warmup_steps=1)


def tiny(tmp: Path, **flags) -> list[str]:
    """A valid tiny command line reading tmp/text.txt and writing under tmp; flags add to or replace its values."""
    return argv_of(run_values(tmp, tmp / "text.txt", SMALL, **flags))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run folder with one complete checkpoint of the tiny config, trained on TEXT."""
    tmp = tmp_path_factory.mktemp("errors")
    write_text(tmp / "text.txt", TEXT)
    assert train.main(tiny(tmp, save_model=True)) == 0
    return tmp / "models" / "r"


def damaged_copy(tmp: Path, checkpoint: Path, damage: Callable[[Path], None]) -> Path:
    folder = tmp / "copy" / "step_000002"
    shutil.copytree(checkpoint / "step_000002", folder)
    damage(folder)
    return folder


def write_bytes(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


# (case id, how to set up files under tmp and return argv, what the one line must contain)
CASES: list[tuple[str, Callable[[Path, Path], list[str]], tuple[str, ...]]] = [
    ("heads_not_dividing", lambda t, c: tiny(t, num_heads=3), ("--num_heads 3 does not divide --embedding_dim 16",)),
    ("zero_blocks", lambda t, c: tiny(t, num_blocks=0), ("--num_blocks must be a positive integer, got 0",)),
    ("negative_dim", lambda t, c: tiny(t, embedding_dim=-16), ("--embedding_dim must be a positive integer",)),
    ("zero_context", lambda t, c: tiny(t, context_len=0), ("--context_len must be a positive integer",)),
    ("zero_batch", lambda t, c: tiny(t, batch_size=0), ("--batch_size must be a positive integer",)),
    ("zero_lr", lambda t, c: tiny(t, lr=0), ("--lr must be a positive number no larger than 1e30, got 0.0",)),
    ("negative_muon_lr", lambda t, c: tiny(t, muon_lr=-0.02), ("--muon_lr must be a positive number",)),
    ("nan_lr", lambda t, c: tiny(t, lr="nan"), ("--lr must be a positive number no larger than 1e30, got nan",)),
    ("huge_lr", lambda t, c: tiny(t, lr=1e39), ("--lr must be a positive number no larger than 1e30, got 1e+39",)),
    ("zero_ns_steps", lambda t, c: tiny(t, muon_ns_steps=0), ("--muon_ns_steps must be a positive integer, got 0",)),
    ("zero_steps", lambda t, c: tiny(t, max_steps=0), ("--max_steps must be a positive integer or None",)),
    ("negative_steps", lambda t, c: tiny(t, max_steps=-5), ("--max_steps must be a positive integer or None",)),
    ("zero_epochs", lambda t, c: tiny(t, max_steps="None", epochs=0), ("--epochs must be a positive integer",)),
    ("negative_warmup", lambda t, c: tiny(t, warmup_steps=-1), ("--warmup_steps must be zero or more",)),
    ("zero_accumulation", lambda t, c: tiny(t, accumulation_steps=0), ("--accumulation_steps must be a positive",)),
    ("zero_keep", lambda t, c: tiny(t, keep_checkpoints=0), ("--keep_checkpoints must be a positive integer or None",)),
    # every flag's range, by class (issue 12): NaN and infinity, int bounds, sizes that fit no machine, run names
    ("nan_dropout", lambda t, c: tiny(t, dropout="nan"), ("--dropout must be between 0.0 and 0.99, got nan",)),
    ("nan_grad_clip", lambda t, c: tiny(t, grad_clip="nan"), ("--grad_clip must be 0 (no clipping) or a", "got nan")),
    (
        "infinite_time_budget",
        lambda t, c: tiny(t, time_budget_s="inf"),
        ("--time_budget_s must be a positive number of seconds", "(None = no time budget), got inf"),
    ),
    ("negative_seed", lambda t, c: tiny(t, seed=-1), ("--seed must be zero or more, got -1",)),
    (
        "width_fits_no_machine",
        lambda t, c: tiny(t, embedding_dim=1_000_000),
        ("--embedding_dim 1000000", "over the 1 TB limit", "with the rest as given, --embedding_dim "),
    ),
    (
        "evaluation_fits_no_machine",
        lambda t, c: tiny(t, eval_steps=10**8),
        ("--eval_steps 100000000 x --batch_size 4 x --context_len 16", "use --eval_steps 15625000 or fewer"),
    ),
    ("run_parent_folder", lambda t, c: tiny(t, run=".."), ("--run '..' is not a usable folder name", "--run my-run")),
    ("run_with_a_separator", lambda t, c: tiny(t, run="../x"), ("--run '../x'", "path separator", "--run x")),
    ("run_too_long", lambda t, c: tiny(t, run="r" * 101), ("is 101 characters long, more than 100",)),
    ("unknown_flag", lambda t, c: [*tiny(t), "--lrr=0.1"], ("unknown flag '--lrr'; did you mean --lr?",)),
    ("not_a_number", lambda t, c: tiny(t, num_blocks="two"), ("--num_blocks: expected an integer, got 'two'",)),
    (
        "bad_boolean",
        lambda t, c: tiny(t, save_model="yes please"),
        ("expected True/False/true/false/1/0", "yes please"),
    ),
    (
        "unknown_tokenizer",
        lambda t, c: tiny(t, tokenizer="bpe"),
        ("--tokenizer: invalid choice: 'bpe'", "'gpt2', 'o200k_base', 'char'"),
    ),
    ("missing_data", lambda t, c: tiny(t, data_path=t / "nope.txt"), ("does not exist", "download Tiny Shakespeare")),
    ("data_is_a_folder", lambda t, c: tiny(t, data_path=t), ("is a folder; give a UTF-8 text file",)),
    ("empty_data", lambda t, c: tiny(t, data_path=write_text(t / "e.txt", " \n")), ("is empty",)),
    (
        "short_training_split",
        lambda t, c: tiny(t, data_path=write_text(t / "s.txt", "to be or not")),
        ("the training split", "fewer than context_len + 1 = 17", "smaller --context_len"),
    ),
    (
        "short_validation_split",
        lambda t, c: tiny(t, data_path=write_text(t / "s.txt", TEXT[:150])),
        ("the validation split", "has 15 tokens, fewer than context_len + 1 = 17"),
    ),
    (
        "non_utf8",
        lambda t, c: tiny(t, data_path=write_bytes(t / "l.txt", TEXT[:500].encode() + b"caf\xe9\n" + TEXT.encode())),
        ("is not UTF-8: byte 0xe9 at offset 503 (line", "iconv"),
    ),
    (
        "unwritable_save_model_dir",
        lambda t, c: tiny(t, save_model=True, save_model_dir=write_text(t / "f", "") / "models"),
        ("--save_model_dir", "is not writable", "is a file"),
    ),
    (
        "unwritable_runs_dir",
        lambda t, c: tiny(t, runs_dir=write_text(t / "f", "") / "runs"),
        ("--runs_dir", "is not writable"),
    ),
    ("resume_nothing", lambda t, c: tiny(t, resume=t / "nothing"), ("is not a checkpoint",)),
    (
        "resume_truncated_weights",
        lambda t, c: tiny(t, resume=damaged_copy(t, c, lambda f: truncate(f / "model.safetensors"))),
        ("is damaged or incomplete (model.safetensors: ", "use an earlier step_* folder"),
    ),
    (
        "resume_corrupt_optimizer",
        lambda t, c: tiny(t, resume=damaged_copy(t, c, lambda f: truncate(f / "optimizer.pt", 0.3))),
        ("is damaged or incomplete (optimizer.pt: ",),
    ),
    (
        "resume_corrupt_rng",
        lambda t, c: tiny(t, resume=damaged_copy(t, c, lambda f: (f / "rng.pt").write_bytes(b"\x80\x04junk"))),
        ("is damaged or incomplete (rng.pt: ",),
    ),
    (
        "resume_broken_state",
        lambda t, c: tiny(t, resume=damaged_copy(t, c, lambda f: (f / "state.json").write_text("{"))),
        ("is damaged or incomplete",),
    ),
    (
        "resume_without_training_state",
        lambda t, c: tiny(t, resume=damaged_copy(t, c, lambda f: (f / "rng.pt").unlink())),
        ("has no rng.pt: it can be sampled from, not resumed",),
    ),
    (
        "resume_another_width",
        lambda t, c: [*tiny(t, resume=c), "--embedding_dim=32"],
        ("cannot resume", "checkpoint has --embedding_dim 16, this run asks for 32", "leave those flags out"),
    ),
    (
        "resume_another_tokenizer",
        lambda t, c: [*tiny(t, resume=c), "--tokenizer=gpt2"],
        ("checkpoint has --tokenizer char, this run asks for gpt2",),
    ),
    (
        "resume_another_alphabet",
        lambda t, c: tiny(t, resume=c, data_path=write_text(t / "o.txt", TEXT.upper())),
        (
            "its tokenizer differs",
            "characters only in the checkpoint: 'a",
            "only in this text: 'A",
            "--data_path",
        ),
    ),
    (
        "resume_another_text",
        lambda t, c: tiny(t, resume=c, data_path=write_text(t / "o.txt", TEXT[::-1])),
        ("cannot resume", "it was trained on other tokens", "--data_path"),
    ),
]


@pytest.mark.parametrize("make_argv, needles", [(m, n) for _, m, n in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, capsys, make_argv, needles):
    write_text(tmp_path / "text.txt", TEXT)
    status = train.main([str(a) for a in make_argv(tmp_path, checkpoint)])
    captured = capsys.readouterr()
    assert status == 2, captured.out + captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path, capsys):
    write_text(tmp_path / "text.txt", TEXT)
    assert train.main(tiny(tmp_path, device="cuda")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda was asked for but no CUDA GPU is visible") and err.count("\n") == 1


def test_a_parent_folder_run_name_writes_nothing(tmp_path):
    """--run .. would name runs/.. (the runs folder's parent): refused before anything is written."""
    work = tmp_path / "work"
    argv = argv_of(run_values(work, write_text(tmp_path / "text.txt", TEXT), SMALL, run="..", save_model=True))
    assert train.main(argv) == 2
    assert not work.exists()


def test_no_run_folder_is_left_by_a_refused_run(tmp_path):
    assert train.main(tiny(tmp_path, data_path=tmp_path / "nope.txt")) == 2
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()


def test_wandb_without_a_key_warns_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr("dotenv.load_dotenv", lambda *args, **kwargs: False)  # no .env from the developer's machine
    write_text(tmp_path / "text.txt", TEXT)
    assert train.main(tiny(tmp_path, wandb_enabled=True)) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --wandb_enabled True but no WANDB_API_KEY (in .env or the environment); logging locally only"
    ]
    assert read_records(tmp_path / "runs" / "r")[-1]["final"] is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--num_heads", "7"], "error: --num_heads 7 does not divide --embedding_dim 512"),
        (["--data_path", "no/such/file.txt"], "error: data file no/such/file.txt does not exist"),
        (["--lr", "nan"], "error: --lr must be a positive number no larger than 1e30, got nan"),
    ],
)
def test_the_real_command(tmp_path, argv, needle):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv, "--runs_dir", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(needle) and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
