"""The local record of a run: runs/<run>/config.json and metrics.jsonl (one JSON object per logged step), plus
Weights & Biases when enabled. A resumed run continues its own record instead of starting a new one. Under
torchrun only rank 0 keeps the record; the other ranks hold a disabled recorder that writes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from config import Config
from utils import atomic_write


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
        # a new run never overwrites another (name-2, name-3, ...); a resumed run writes into its own folder
        self.dir = unique_dir(Path(cfg.runs_dir), run_name) if resume_step is None else Path(cfg.runs_dir) / run_name
        self.name = self.dir.name
        self.dir.mkdir(parents=True, exist_ok=resume_step is not None)
        (self.dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "run": self.name, **info}, indent=2) + "\n")
        if resume_step is not None:
            keep_records_up_to(self.dir / "metrics.jsonl", resume_step)
        self.metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the whole run)
        self.wandb = start_wandb(cfg, self.name, info, wandb_id) if cfg.wandb_enabled else None

    @property
    def wandb_id(self) -> str | None:
        return getattr(self.wandb, "id", None)

    def log(self, record: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=record["step"])
            except Exception as error:
                print(f"warning: wandb.log failed ({error}); continuing with the local record", flush=True)
                self.wandb = None

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records a resumed run will write again: those after its checkpoint's step, the final evaluation,
    and a line cut short by a crash. Rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line + "\n")
    atomic_write(path, "".join(kept))


def unique_dir(parent: Path, name: str) -> Path:
    path, n = parent / name, 2
    while path.exists():
        path, n = parent / f"{name}-{n}", n + 1
    return path


def run_name(asked: str | None) -> str:
    """--run made safe as a folder name ("a cool ablation" -> "a-cool-ablation"), or a timestamp."""
    return re.sub(r"[^\w.-]+", "-", asked or "").strip("-") or time.strftime("run-%Y%m%d-%H%M%S")


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
