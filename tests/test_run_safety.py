"""Never lose a run: one writer per run folder, pruning around a resume, a full disk, stop signals in every phase."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, argv_of, read_records, run_config, synthetic_text, write_text

import records
import train
import trainer
from checkpoint import LATEST, load_checkpoint
from utils import FolderLock

SMALL = dict(max_steps=8, log_every=2, save_model=True, save_every=2, keep_checkpoints=None)


def small_run(tmp_path: Path, **overrides):
    data = tmp_path / "text.txt"
    if not data.exists():
        write_text(data, synthetic_text(3_000))
    return run_config(tmp_path, data, SMALL, **overrides)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# One writer per run


HOLD = "import sys, time; from utils import FolderLock; lock = FolderLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)"


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the lock on `folder`, until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_gone(tmp_path):
    folder = tmp_path / "runs" / "r"
    holder = hold_lock(folder)
    try:
        assert not FolderLock(folder).acquire()
        assert f"pid {holder.pid} on " in FolderLock(folder).holder()
    finally:
        holder.kill()  # kill -9: no clean-up runs, the OS drops the lock
        holder.wait()
    with FolderLock(folder) as lock:
        assert lock.acquire()
    assert not folder.exists()  # the lock file sits beside the folder, which stays as it is


def test_resuming_a_run_that_another_process_writes_is_refused(tmp_path, capsys):
    cfg = small_run(tmp_path)
    assert train.main(argv_of(cfg)) == 0
    before = read_records(tmp_path / "runs" / "r")
    holder = hold_lock(tmp_path / "models" / "r")  # as a training process writing the run would
    try:
        assert train.main(["--resume", str(tmp_path / "models" / "r"), "--max_steps", "12"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'models' / 'r'} is being written by another run (pid {holder.pid} ")
    assert err.count("\n") == 1
    assert read_records(tmp_path / "runs" / "r") == before  # its record untouched


def test_a_new_run_takes_a_name_free_in_both_the_runs_and_the_checkpoint_folders(tmp_path):
    """An earlier run with the same --run but another --runs_dir left models/r: the new run becomes r-2 there too."""
    first = small_run(tmp_path, runs_dir=str(tmp_path / "elsewhere"), max_steps=2)
    assert train.train(first)["run"] == "r"
    earlier = names(tmp_path / "models" / "r")
    summary = train.train(small_run(tmp_path, max_steps=4))
    assert summary["run"] == "r-2" and Path(summary["checkpoint"]).parent == tmp_path / "models" / "r-2"
    assert names(tmp_path / "models" / "r") == earlier and not (tmp_path / "runs" / "r").exists()


def test_claim_run_skips_names_another_process_is_claiming(tmp_path):
    parents = [tmp_path / "runs", tmp_path / "models"]
    holder = hold_lock(tmp_path / "models" / "x")  # claimed, folder not made yet
    try:
        name, locks = records.claim_run("x", parents)
    finally:
        holder.kill()
        holder.wait()
    assert name == "x-2" and len(locks) == 2
    for lock in locks:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# Resuming an older step: refused while newer steps exist, or --overwrite_newer; pruning keeps the source


def test_resuming_an_older_step_refuses_while_newer_ones_exist(tmp_path, capsys):
    cfg = small_run(tmp_path, max_steps=12)
    assert train.main(argv_of(cfg)) == 0
    models = tmp_path / "models" / "r"
    before = names(models)
    argv = ["--resume", str(models / "step_000006"), "--max_steps", "9", "--save_every", "1", "--keep_checkpoints", "3"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "newer checkpoints (step_000008, step_000010, step_000012)" in err and "--overwrite_newer True" in err
    assert err.count("\n") == 1 and names(models) == before

    assert train.main([*argv, "--overwrite_newer", "True"]) == 0
    out = capsys.readouterr().out
    assert "deleted the newer checkpoints step_000008, step_000010, step_000012" in out
    # the newest 3 and the one it resumed from; the stale newer ones are gone; latest is the run's last step
    assert sorted(p.name for p in models.glob("step_*")) == ["step_000006", "step_000007", "step_000008", "step_000009"]
    assert (models / LATEST).read_text().strip() == "step_000009"
    assert [r["step"] for r in read_records(tmp_path / "runs" / "r") if "loss" in r] == [2, 4, 6, 8, 9]


# ----------------------------------------------------------------------------------------------------------------
# A full disk: one line, the previous checkpoint and `latest` intact, metrics.jsonl whole lines


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only, as CI runs), and a way to fill it up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")

    def fill() -> None:
        fd = os.open(mount / f"filler-{len(list(mount.glob('filler-*')))}", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 65536)
        finally:
            os.close(fd)

    yield mount, fill
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, small_disk, monkeypatch, capsys):
    mount, fill = small_disk
    real, saves = trainer.save_checkpoint, []

    def save_then_fill(*args, **kwargs):
        folder = real(*args, **kwargs)
        saves.append(folder)
        fill()  # the next checkpoint will not fit
        return folder

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_fill)
    cfg = small_run(tmp_path, save_model_dir=str(mount / "models"))
    assert train.main(argv_of(cfg)) == 2
    err = capsys.readouterr().err
    models = mount / "models" / "r"
    assert err.startswith(f"error: no space left in {models} for the checkpoint of step 4 (it needs about ")
    assert err.count("\n") == 1
    assert (models / LATEST).read_text().strip() == "step_000002" and names(models) == [LATEST, "step_000002"]
    model, _, state = load_checkpoint(models)
    assert state["step"] == 2


def test_a_full_disk_never_cuts_a_metrics_line(tmp_path, small_disk, monkeypatch, capsys):
    mount, fill = small_disk
    real, logged = records.RunRecorder.log, []

    def log_then_fill(self, record):
        real(self, record)
        logged.append(record)
        if len(logged) == 2:
            fill()  # what is left: the rest of metrics.jsonl's last page, a few lines

    monkeypatch.setattr(records.RunRecorder, "log", log_then_fill)
    cfg = small_run(tmp_path, runs_dir=str(mount / "runs"), save_model=False, max_steps=200, log_every=1)
    assert train.main(argv_of(cfg)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left in {mount / 'runs' / 'r'} for metrics.jsonl") and err.count("\n") == 1
    text = (mount / "runs" / "r" / "metrics.jsonl").read_text()
    steps = [r["step"] for r in read_records(mount / "runs" / "r")]  # every line whole: each one parses
    assert text.endswith("\n") and len(steps) >= 2 and steps == list(range(1, len(steps) + 1))


# ----------------------------------------------------------------------------------------------------------------
# Stop signals in every phase: exit 128 + signal, no traceback, checkpoints intact


def signal_when_called(monkeypatch, module, name: str, signum: int, times: int = 1) -> None:
    """module.name sends this process `signum` (`times` times) when first called, then does its work."""
    real, sent = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if not sent:
            sent.append(1)
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_a_signal_during_start_up_stops_before_training(tmp_path, monkeypatch, capsys):
    signal_when_called(monkeypatch, train, "load_dataset", signal.SIGTERM)
    assert train.main(argv_of(small_run(tmp_path))) == 143
    captured = capsys.readouterr()
    assert "stopped by SIGTERM after step 0: nothing saved" in captured.out and captured.err == ""
    assert not (tmp_path / "models" / "r").exists()


def test_a_signal_during_the_final_evaluation_cuts_it_short_and_saves(tmp_path, monkeypatch, capsys):
    signal_when_called(monkeypatch, trainer, "full_val_batches", signal.SIGTERM)
    assert train.main(argv_of(small_run(tmp_path, save_every=None))) == 143
    captured = capsys.readouterr()
    models = tmp_path / "models" / "r"
    assert f"stopped by SIGTERM after step 8: saved {models / 'step_000008'}" in captured.out
    assert captured.err == "" and not any(r.get("final") for r in read_records(tmp_path / "runs" / "r"))
    assert load_checkpoint(models)[2]["step"] == 8


def test_a_signal_during_the_samples_skips_the_rest(tmp_path, monkeypatch, capsys):
    signal_when_called(monkeypatch, trainer, "generate", signal.SIGINT)
    summary = train.train(small_run(tmp_path, num_samples=3, sample_tokens=5))
    assert summary["stopped_by"] == "SIGINT" and len(summary["samples"]) == 1
    assert summary["final_val_loss"] is not None and summary["checkpoint"].endswith("step_000008")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_at_once_with_its_status_and_the_checkpoint_intact(tmp_path, monkeypatch, capsys, signum):
    signal_when_called(monkeypatch, trainer, "lr_multiplier", signum)  # the first step: a stop is on its way ...
    real_save = trainer.Trainer.save

    def save_then_signal_again(self, state):  # ... and the second signal comes right after the stop's save
        folder = real_save(self, state)
        os.kill(os.getpid(), signum)
        return folder

    monkeypatch.setattr(trainer.Trainer, "save", save_then_signal_again)
    assert train.main(argv_of(small_run(tmp_path))) == 128 + signum
    err = capsys.readouterr().err
    assert err == "error: interrupted\n"
    models = tmp_path / "models" / "r"
    assert (models / LATEST).read_text().strip() == "step_000001" and load_checkpoint(models)[2]["step"] == 1
    assert all(torch.isfinite(p).all() for p in load_checkpoint(models)[0].parameters())


def test_ctrl_c_while_train_py_starts_is_quiet(tmp_path):
    """SIGINT at any moment of start-up (imports included): exit 130, no traceback."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *argv_of(small_run(tmp_path))],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # torch is still being imported, or the data being read
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)  # twice: stop at once, wherever it is
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err
