"""The local record of a run: runs/<run>/config.json and metrics.jsonl (one JSON object per logged step), plus
Weights & Biases when enabled. A resumed run continues its own record instead of starting a new one. Under
torchrun only rank 0 keeps the record; the other ranks hold a disabled recorder that writes nothing.
Each run's folders have one writer: claim_run / lock_run take advisory locks that a second writer runs into."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from config import Config, UserError, folder_name
from utils import FolderLock, atomic_write, check_regular_file, out_of_space


class RunRecorder:
    """runs/<run>/config.json and metrics.jsonl, plus wandb when enabled; use it in a `with` block."""

    def __init__(
        self,
        cfg: Config,
        run_name: str,
        info: dict[str, Any],
        resume_step: int | None = None,
        wandb_id: str | None = None,
        enabled: bool = True,
    ):
        self.metrics, self.wandb = None, None
        if not enabled:  # another rank of a torchrun job: rank 0 keeps the record and talks to wandb
            self.dir, self.name = Path(cfg.runs_dir) / run_name, run_name
            return
        # the name is claimed (claim_run): a new run's folder is new, a resumed run writes into its own
        self.dir, self.name = Path(cfg.runs_dir) / run_name, run_name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = json.dumps({**cfg.to_dict(), "run": self.name, **info}, indent=2) + "\n"
        with out_of_space(self.dir, "the run's config.json"):
            atomic_write(self.dir / "config.json", config)
            if resume_step is not None:
                keep_records_up_to(self.dir / "metrics.jsonl", resume_step)
        # whole lines or nothing: a line that does not fit is cut back off (see log)
        self.metrics = os.open(self.dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.wandb = start_wandb(cfg, self.name, info, wandb_id) if cfg.wandb_enabled else None

    @property
    def wandb_id(self) -> str | None:
        return getattr(self.wandb, "id", None)

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        line, end = (json.dumps(record) + "\n").encode(), os.lseek(self.metrics, 0, os.SEEK_END)
        with out_of_space(self.dir, "metrics.jsonl"):
            try:
                if os.write(self.metrics, line) < len(line):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError:
                os.ftruncate(self.metrics, end)  # never a line cut in the middle
                raise
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record["step"])
            except Exception as error:
                print(f"warning: wandb.log failed ({error}); continuing with the local record", flush=True)
                self.wandb = None

    def close(self) -> None:
        if self.metrics is not None:
            os.close(self.metrics)
            self.metrics = None
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records a resumed run will write again: those after its checkpoint's step, the final evaluation,
    and anything that is not a whole record (a line cut short by a crash, damage). Rewritten atomically."""
    if not path.exists():
        return
    check_regular_file(path, "the run's record", "metrics.jsonl")
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            whole = isinstance(record, dict) and type(record.get("step")) is int
            if whole and record["step"] <= step and not record.get("final"):
                kept.append(line + "\n")
    atomic_write(path, "".join(kept))


def claim_run(name: str, parents: list[Path]) -> tuple[str, list[FolderLock]]:
    """A new run's name and its locks: the first of name, name-2, name-3, ... that no parent folder (runs, and
    checkpoints when saving) holds yet and no other process is claiming, so a new run never writes into an earlier
    run's folders."""
    for n in itertools.count(1):
        candidate = name if n == 1 else f"{name}-{n}"
        if any((parent / candidate).exists() for parent in parents):
            continue
        locks = [FolderLock(parent / candidate) for parent in parents]
        taken = [lock.acquire() for lock in locks]
        if all(taken) and not any((parent / candidate).exists() for parent in parents):  # (not made meanwhile)
            return candidate, locks
        for lock in locks:
            lock.release()
    raise AssertionError("unreachable")


def lock_run(folders: list[Path]) -> list[FolderLock]:
    """Locks on a resumed run's folders; one line naming the other process when one is writing them."""
    locks = []
    for folder in folders:
        lock = FolderLock(folder)
        if not lock.acquire():
            for held in locks:
                held.release()
            raise UserError(
                f"{folder} is being written by another run ({lock.holder()}); wait for it to finish or stop it, "
                "then resume"
            )
        locks.append(lock)
    return locks


def run_name(asked: str | None) -> str:
    """--run made safe as a folder name ("a cool ablation" -> "a-cool-ablation"), or a timestamp."""
    return folder_name(asked or "") or time.strftime("run-%Y%m%d-%H%M%S")


def start_wandb(cfg: Config, run_name: str, info: dict[str, Any], run_id: str | None = None):
    """A wandb run (the same one again when resuming with its id), or None with one warning line: wandb trouble
    never stops training."""
    try:
        from dotenv import load_dotenv

        load_dotenv()
        if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
            print(
                "warning: --wandb_enabled True but no WANDB_API_KEY (in .env or the environment); logging locally only",
                flush=True,
            )
            return None
        import wandb

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pair-transformer"),
            entity=os.environ.get("WANDB_ENTITY") or None,
            name=run_name,
            config={**cfg.to_dict(), **info},
            id=run_id,
            resume="allow" if run_id else None,
        )
    except Exception as error:
        print(f"warning: wandb failed to start ({type(error).__name__}: {error}); logging locally only", flush=True)
        return None
