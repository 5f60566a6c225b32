"""Resume and crash safety: a stopped and resumed run equals an uninterrupted one bit for bit (on the CPU), signals
stop cleanly, kill -9 mid-save loses nothing, non-finite steps never reach a checkpoint, old checkpoints are pruned.

Equality is exact (torch.equal, ==): resuming replays the same CPU ops on the same inputs in the same order, and
every saved number round-trips exactly (fp32 tensors, python floats through JSON repr). It would not be exact across
thread counts or CPUs (reduction order), on CUDA (atomic adds in some backward kernels) or with --time_budget_s
(the schedule then follows the clock).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    argv_of,
    assert_same_state,
    assert_same_tensors,
    read_records,
    run_config,
    step_losses,
    synthetic_text,
    tiny_config,
    write_text,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
import trainer
from checkpoint import (
    EMA_FILE,
    LATEST,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    saved_config,
    set_rng_state,
)
from config import Config, parse_args
from model import GPT

N = 12  # steps of the reference run; the stop / resume happens at N // 2


# Every piece of state matters here: dropout (torch RNG), accumulation, evals, Muon + AdamW, cosine decay.
RESUME = dict(
    embedding_dim=32,
    accumulation_steps=2,
    dropout=0.1,
    lr=3e-3,
    muon_lr=0.03,
    max_steps=N,
    eval_every=4,
    log_every=4,  # the stop at N/2 falls inside a log interval, whose partial loss sum must survive too
    save_model=True,
    save_every=N // 2,
    keep_checkpoints=None,
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted reference run: N steps, checkpoints at N/2 and N."""
    tmp = tmp_path_factory.mktemp("resume") / "straight"
    write_text(tmp.parent / "text.txt", synthetic_text(3_000))
    summary = train.train(run_config(tmp, tmp.parent / "text.txt", RESUME))
    return tmp, summary


def send_signal_at_step(monkeypatch, stop_step: int, signum: int) -> None:
    """Deliver a real signal to this process while step `stop_step` runs (the loop asks the schedule first)."""
    real = trainer.lr_multiplier

    def schedule(step, *args, **kwargs):
        if step + 1 == stop_step:
            os.kill(os.getpid(), signum)
        return real(step, *args, **kwargs)

    monkeypatch.setattr(trainer, "lr_multiplier", schedule)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stop_then_resume_equals_the_straight_run(straight, tmp_path, monkeypatch, capsys, signum, status):
    reference, reference_summary = straight
    tmp = tmp_path / "run"
    cfg = run_config(tmp, reference.parent / "text.txt", RESUME)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    send_signal_at_step(monkeypatch, N // 2, signum)
    assert train.main(argv_of(cfg)) == status
    out = capsys.readouterr().out
    models = tmp / "models" / "r"
    assert f"stopped by {signal.Signals(signum).name} after step {N // 2}: saved {models / 'step_000006'}" in out
    assert f"--resume {models}" in out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    monkeypatch.undo()

    # a user's resume: just the run folder; every other flag comes from the checkpoint
    assert train.main(["--resume", str(models)]) == 0
    assert step_losses(tmp / "runs" / "r") == step_losses(reference / "runs" / "r")  # the same records, once each
    assert not (tmp / "runs" / "r-2").exists()
    assert_same_state(models / "step_000012", reference / "models" / "r" / "step_000012")
    assert (
        json.loads((models / "step_000012" / "state.json").read_text())["best_val_loss"]
        == (reference_summary["best_val_loss"])
    )


EMA_RUN = dict(ema_decay=0.5, embedding_lr=0.05)


@pytest.fixture(scope="module")
def straight_ema(straight) -> tuple[Path, dict]:
    """The reference run again with --ema_decay 0.5: its warm-up, min(0.5, (1 + k) / (10 + k)), reaches 0.5 at update
    8, so the resume at N/2 falls inside the warm-up and the run ends past it. With --embedding_lr too: the input
    tables' own AdamW group must resume exactly as well."""
    tmp = straight[0].parent / "straight_ema"
    summary = train.train(run_config(tmp, straight[0].parent / "text.txt", RESUME, **EMA_RUN))
    return tmp, summary


def assert_same_average(a: Path, b: Path) -> None:
    """Two checkpoint folders hold the same weight average: tensors bit for bit, the same update count."""
    assert_same_tensors(load_file(a / EMA_FILE), load_file(b / EMA_FILE))
    with safe_open(a / EMA_FILE, "pt") as first, safe_open(b / EMA_FILE, "pt") as second:
        assert first.metadata() == second.metadata()


def test_signal_stop_then_resume_with_ema_equals_the_straight_run(straight_ema, tmp_path, monkeypatch):
    """The average is saved and restored exactly: weights, optimizer, average and every loss, raw and averaged."""
    reference, reference_summary = straight_ema
    tmp = tmp_path / "run"
    send_signal_at_step(monkeypatch, N // 2, signal.SIGTERM)
    assert train.main(argv_of(run_config(tmp, reference.parent / "text.txt", RESUME, **EMA_RUN))) == 143
    monkeypatch.undo()
    models, expected = tmp / "models" / "r", reference / "models" / "r"
    assert_same_average(models / "step_000006", expected / "step_000006")

    summary = train.train(parse_args(["--resume", str(models)], base=saved_config(models)))  # (as train.main does)
    assert summary["final_val_loss_ema"] == reference_summary["final_val_loss_ema"]  # --ema_decay: the checkpoint's
    assert summary["final_val_loss"] == reference_summary["final_val_loss"]
    keys = ("loss", "val_loss", "val_loss_ema", "val_bpb", "val_bpb_ema")
    assert step_losses(tmp / "runs" / "r", keys) == step_losses(reference / "runs" / "r", keys)
    assert sum(record[3] is not None for record in step_losses(tmp / "runs" / "r", keys)) == 3  # steps 4, 8, final
    assert_same_state(models / "step_000012", expected / "step_000012")
    assert_same_average(models / "step_000012", expected / "step_000012")
    with safe_open(models / "step_000012" / EMA_FILE, "pt") as file:
        assert file.metadata() == {"updates": str(N)}


def test_resume_from_weights_saved_with_the_compile_prefix(straight, tmp_path):
    """A state dict whose keys carry torch.compile's `_orig_mod.` prefix resumes like a plain one."""
    reference, reference_summary = straight
    folder = tmp_path / "r" / "step_000006"
    shutil.copytree(reference / "models" / "r" / "step_000006", folder)
    weights = load_file(folder / "model.safetensors")
    save_file({f"_orig_mod.{k}": v for k, v in weights.items()}, folder / "model.safetensors")
    cfg = run_config(tmp_path, reference.parent / "text.txt", RESUME, resume=str(folder))
    summary = train.train(cfg)
    assert summary["final_val_loss"] == reference_summary["final_val_loss"]
    assert step_losses(tmp_path / "runs" / "r") == [r for r in step_losses(reference / "runs" / "r") if r[0] > N // 2]
    assert_same_state(tmp_path / "r" / "step_000012", reference / "models" / "r" / "step_000012")


@pytest.mark.compile
def test_compiled_run_resumes_exactly(tmp_path):
    """torch.compile on both sides: the compiled kernels are as deterministic as eager ones on the CPU."""
    write_text(tmp_path / "text.txt", synthetic_text(3_000))
    common = dict(torch_compile=True, max_steps=4, save_every=2, eval_every=0, num_blocks=1)
    first = train.train(run_config(tmp_path / "a", tmp_path / "text.txt", RESUME, **common))
    folder = tmp_path / "b" / "models" / "r" / "step_000002"  # a copy: resuming a's step 2 in place meets its step 4
    shutil.copytree(tmp_path / "a" / "models" / "r" / "step_000002", folder)
    second = train.train(run_config(tmp_path / "b", tmp_path / "text.txt", RESUME, **common, resume=str(folder)))
    assert second["final_val_loss"] == first["final_val_loss"]
    assert step_losses(tmp_path / "b" / "runs" / "r") == [
        r for r in step_losses(tmp_path / "a" / "runs" / "r") if r[0] > 2
    ]


def test_flags_left_out_come_from_the_checkpoint_and_some_may_change(straight, tmp_path, capsys):
    reference, _ = straight
    shutil.copytree(reference / "models" / "r", tmp_path / "r")
    argv = ["--resume", str(tmp_path / "r"), "--runs_dir", str(tmp_path / "runs"), "--max_steps", "14"]
    assert train.main([*argv, "--lr", "0.001", "--log_every", "2"]) == 0
    out = capsys.readouterr().out
    assert "notice: resuming with --lr 0.001 (was 0.003)" in out
    assert [r["step"] for r in read_records(tmp_path / "runs" / "r")] == [14, 14]  # a new runs_dir: a new record
    assert json.loads((tmp_path / "r" / "step_000014" / "config.json").read_text())["embedding_dim"] == 32
    assert parse_args(["--resume", "x", "--lr", "0.001"]).embedding_dim == 512  # (without the checkpoint: defaults)


def test_wandb_run_id_survives_a_resume(straight, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # a real wandb run id, no network
    monkeypatch.chdir(tmp_path)
    text = str(straight[0].parent / "text.txt")
    train.train(run_config(tmp_path, text, RESUME, wandb_enabled=True, max_steps=4, save_every=None))
    first = json.loads((tmp_path / "models" / "r" / "step_000004" / "state.json").read_text())["wandb_id"]
    assert isinstance(first, str) and first
    train.train(
        run_config(tmp_path, text, RESUME, wandb_enabled=True, max_steps=6, resume=str(tmp_path / "models" / "r"))
    )
    assert json.loads((tmp_path / "models" / "r" / "step_000006" / "state.json").read_text())["wandb_id"] == first


def test_ctrl_c_on_a_real_process(straight, tmp_path):
    """The command line as a user runs it: SIGINT mid-run exits 130 with a checkpoint that resumes."""
    reference, _ = straight
    text = str(reference.parent / "text.txt")
    cfg = run_config(tmp_path, text, RESUME, max_steps=100_000, save_every=None, log_every=1, eval_every=0)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv_of(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert "stopped by SIGINT" in out and "Traceback" not in err
    state = json.loads((resolve_checkpoint(tmp_path / "models" / "r") / "state.json").read_text())
    stopped_at = state["step"]
    resumed = dict(resume=str(tmp_path / "models" / "r"), max_steps=stopped_at + 3, log_every=1, eval_every=0)
    summary = train.train(run_config(tmp_path, text, RESUME, **resumed))
    assert summary["steps"] == stopped_at + 3
    steps = [r["step"] for r in read_records(tmp_path / "runs" / "r") if "loss" in r]
    assert steps == list(range(1, stopped_at + 4))


def test_kill_9_while_saving_keeps_the_previous_checkpoint(straight, tmp_path):
    """A process killed in the middle of writing step N leaves step N/2 and `latest` intact, and resuming from it
    reproduces the uninterrupted run. The child slows its second save down so the kill lands inside it."""
    reference, _ = straight
    cfg = run_config(tmp_path, reference.parent / "text.txt", RESUME, keep_checkpoints=1)
    slow_second_save = (
        "import sys, time, checkpoint, train\n"
        "real, calls = checkpoint.save_file, []\n"
        "def slow(*args, **kwargs):\n"
        "    real(*args, **kwargs)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        time.sleep(120)\n"
        "checkpoint.save_file = slow\n"
        "sys.exit(train.main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", slow_second_save, *argv_of(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    models = tmp_path / "models" / "r"
    deadline = time.monotonic() + 120
    while not list(models.glob(".step_000012.*.tmp/model.safetensors")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    assert (models / LATEST).read_text().strip() == "step_000006"
    assert len(list(models.glob(".step_000012.*.tmp"))) == 1  # the half-written one, never renamed into place
    model, _, state = load_checkpoint(models)
    assert state["step"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())

    summary = train.train(run_config(tmp_path, cfg.data_path, RESUME, resume=str(models), keep_checkpoints=1))
    assert summary["steps"] == N
    # pruned to the newest 1 and the one it resumed from (never pruned by the run that resumed it), debris cleared
    assert sorted(p.name for p in models.iterdir()) == [LATEST, "step_000006", "step_000012"]
    assert_same_state(models / "step_000012", reference / "models" / "r" / "step_000012")


# ----------------------------------------------------------------------------------------------------------------
# Non-finite steps


def nan_loss_at(monkeypatch, bad_steps: set[int]) -> None:
    """The training loss of the given steps becomes NaN (one micro-batch per step in these tests)."""
    real, calls = GPT.forward, []

    def forward(model, idx, targets=None, **kwargs):
        loss = real(model, idx, targets, **kwargs)
        if targets is not None and model.training:
            calls.append(1)
            if len(calls) in bad_steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(GPT, "forward", forward)


def nan_config(tmp_path: Path, **overrides) -> Config:
    write_text(tmp_path / "text.txt", synthetic_text(3_000))
    values = dict(
        accumulation_steps=1, dropout=0.0, max_steps=8, eval_every=0, log_every=4, save_every=2, keep_checkpoints=2
    )
    return run_config(tmp_path / "run", tmp_path / "text.txt", RESUME, values, **overrides)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {5})
    assert train.main(argv_of(nan_config(tmp_path))) == 2
    err = capsys.readouterr().err
    models = tmp_path / "run" / "models" / "r"
    assert err.startswith("error: the loss or gradient became non-finite at step 5;") and err.count("\n") == 1
    assert f"the last good checkpoint is {models / 'step_000004'}" in err and "--skip_nonfinite True" in err
    assert (models / LATEST).read_text().strip() == "step_000004"
    assert sorted(p.name for p in models.glob("step_*")) == ["step_000002", "step_000004"]
    model, _, _ = load_checkpoint(models)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_skips_the_step_and_carries_on(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {3, 5})
    summary = train.train(nan_config(tmp_path, skip_nonfinite=True))
    out = capsys.readouterr().out
    assert "warning: step 3: non-finite loss or gradient; skipped" in out and "step 5:" in out
    assert summary["steps"] == 8 and np.isfinite(summary["final_val_loss"])
    model, _, _ = load_checkpoint(tmp_path / "run" / "models" / "r")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_gives_up_on_a_diverged_run(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, set(range(3, 100)))
    assert train.main(argv_of(nan_config(tmp_path, skip_nonfinite=True, max_steps=50))) == 2
    err = capsys.readouterr().err
    assert "10 steps in a row were non-finite (the last: step 12)" in err and err.count("\n") == 1


def test_an_absurd_learning_rate_never_reaches_a_checkpoint(tmp_path, capsys):
    """No test hook: updates of size 1e30 overflow the model within a few steps."""
    cfg = nan_config(tmp_path, lr=1e30, muon_lr=1e30, save_every=1, log_every=1, warmup_steps=0)
    assert train.main(argv_of(cfg)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the ") and "non-finite" in err and err.count("\n") == 1
    models = tmp_path / "run" / "models" / "r"
    if (models / LATEST).exists():
        model, _, _ = load_checkpoint(models)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """A step with finite gradients whose update overflows the weights: the check before saving catches it."""
    real = train.build_optimizers

    def build_optimizers(model, cfg, compile=False, rank=0, world_size=1):
        optimizers, calls = real(model, cfg, compile), []

        def overflow(optimizer, args, kwargs):
            calls.append(1)
            if len(calls) == 3:
                model.lm_head.weight.data[0, 0] = float("inf")

        optimizers[-1].register_step_post_hook(overflow)
        return optimizers

    monkeypatch.setattr(train, "build_optimizers", build_optimizers)
    assert train.main(argv_of(nan_config(tmp_path, save_every=1))) == 2
    err = capsys.readouterr().err
    models = tmp_path / "run" / "models" / "r"
    assert err.startswith("error: the weights became non-finite by step 3") and err.count("\n") == 1
    assert f"the last good checkpoint is {models / 'step_000002'}" in err
    assert (models / LATEST).read_text().strip() == "step_000002"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folder mechanics


def _tiny_model() -> GPT:
    return GPT(tiny_config(), 65)


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    model = _tiny_model()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, {"name": "char", "chars": "ab"}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_000004", "step_000005"]
    (tmp_path / ".step_000009.abc.tmp").mkdir()  # debris of a killed save
    save_checkpoint(tmp_path, 6, model, {"name": "char", "chars": "ab"}, keep=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_000004", "step_000005", "step_000006"]


def test_resolve_checkpoint_survives_a_dangling_latest(tmp_path):
    model = _tiny_model()
    save_checkpoint(tmp_path, 1, model, {"name": "char", "chars": "ab"})
    save_checkpoint(tmp_path, 2, model, {"name": "char", "chars": "ab"})
    shutil.rmtree(tmp_path / "step_000002")  # as if a crash came between moving the old step 2 aside and the new in
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_000001"
    (tmp_path / LATEST).unlink()
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_000001"


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
