"""Save and load checkpoints, atomically, in files that never execute code when read.

<save_model_dir>/<run>/
    step_000500/  model.safetensors  config.json  tokenizer.json  state.json  optimizer.pt
    latest        the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name, fsynced and renamed into place, and only then does
`latest` move to it: a crash mid-write leaves the previous checkpoint and pointer intact. A checkpoint alone
is enough to sample (weights, config, tokenizer) or resume (plus optimizer and loop state).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import Config, UserError
from model import GPT

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT behind torch.compile's (and DDP's) wrappers, so saved keys never carry their prefixes."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer_dict: dict[str, Any],
    optimizers: list[torch.optim.Optimizer] | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write step_<step>/ atomically and point `latest` at it; returns the checkpoint folder."""
    model = unwrap(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        _write_json(tmp / "config.json", model.cfg.to_dict())
        _write_json(tmp / "tokenizer.json", tokenizer_dict)
        _write_json(tmp / "state.json", {"step": step, "vocab_size": model.vocab_size, **(state or {})})
        if optimizers is not None:
            torch.save([o.state_dict() for o in optimizers], tmp / "optimizer.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = run_dir / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, run_dir / LATEST)
    _fsync_dir(run_dir)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` names one."""
    path = Path(path)
    if (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "model.safetensors").exists():
        raise UserError(
            f"{path} is not a checkpoint (no model.safetensors); pass a step_* folder or a run folder with 'latest'"
        )
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """(model, tokenizer dict, state dict) from a checkpoint or run folder; refuses damaged files in one line."""
    folder = resolve_checkpoint(path)
    try:
        cfg = Config.from_dict(json.loads((folder / "config.json").read_text()))
        tokenizer_dict = json.loads((folder / "tokenizer.json").read_text())
        state = json.loads((folder / "state.json").read_text())
        model = GPT(cfg, state["vocab_size"])
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"checkpoint {folder} is damaged or incomplete ({first_line}); use an earlier step_* folder"
        ) from None
    return model.to(device), tokenizer_dict, state


def load_optimizer_state(folder: Path, optimizers: list[torch.optim.Optimizer]) -> None:
    states = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    for optimizer, optimizer_state in zip(optimizers, states, strict=True):
        optimizer.load_state_dict(optimizer_state)
