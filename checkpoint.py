"""Save, load and resume checkpoints, atomically, in files that never execute code when read.

<save_model_dir>/<run>/
    step_000500/  model.safetensors  config.json  tokenizer.json  state.json  optimizer.pt  rng.pt
    latest        the name of the newest complete checkpoint folder

A checkpoint folder is written under a temporary name, fsynced and renamed into place, and only then does
`latest` move to it: a crash mid-write leaves the previous checkpoint and pointer intact. A checkpoint alone
is enough to sample (weights, config, tokenizer) or resume (plus optimizer state, RNG states and the loop's
state in state.json). Checkpoints are written only between optimizer steps, so there is never a partial
gradient-accumulation to save: a resumed run starts its next step at micro-batch 0, as the original did.
Under torchrun rank 0 alone writes (rng.pt then also holds the other ranks' generators under "ranks") and every
rank loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from config import FIELDS, MATCH, NOTICE, Config, UserError
from model import GPT
from utils import atomic_write, fsync_dir

LATEST = "latest"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP prefix every state_dict key


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT behind torch.compile's (and DDP's) wrappers, so saved keys never carry their prefixes."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def step_folders(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest step first (temp folders start with a dot)."""
    folders = [p for p in run_dir.glob("step_*") if p.name[5:].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer_dict: dict[str, Any],
    optimizers: list[torch.optim.Optimizer] | None = None,
    state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write step_<step>/ atomically, point `latest` at it, keep the newest `keep` (None: all); returns the folder."""
    model = unwrap(model)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    aside = run_dir / f".{final.name}.replaced.tmp"
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        _write_json(tmp / "config.json", model.cfg.to_dict())
        _write_json(tmp / "tokenizer.json", tokenizer_dict)
        _write_json(tmp / "state.json", {"step": step, "vocab_size": model.vocab_size, **(state or {})})
        if optimizers is not None:
            torch.save([o.state_dict() for o in optimizers], tmp / "optimizer.pt")
        if rng is not None:
            torch.save(rng, tmp / "rng.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # the same step again: move the old one aside rather than delete what `latest` names
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(run_dir / LATEST, final.name + "\n")  # only now does `latest` move to the complete folder
    prune_checkpoints(run_dir, keep, final)
    return final


def prune_checkpoints(run_dir: Path, keep: int | None, current: Path) -> None:
    """Delete all but the newest `keep` step_* folders (never `current`) and the temp folders of crashed saves."""
    doomed = [p for p in run_dir.glob(".step_*.tmp") if p.is_dir()]
    if keep is not None:
        for old in step_folders(run_dir)[:-keep]:
            if old != current:
                gone = run_dir / f".{old.name}.deleting.tmp"
                os.replace(old, gone)  # vanish in one rename, so no half-deleted checkpoint is ever visible
                doomed.append(gone)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose `latest` names one (else its newest step_* folder)."""
    path = Path(path)
    named = (path / LATEST).read_text().strip() if (path / LATEST).is_file() else ""
    if named and (path / named).is_dir():
        path = path / named
    elif path.is_dir() and not (path / "model.safetensors").exists():
        # `latest` missing or naming a vanished folder (a crash between two renames): the newest complete one
        path = (step_folders(path) or [path])[-1]
    if not (path / "model.safetensors").exists():
        raise UserError(
            f"{path} is not a checkpoint (no model.safetensors); pass a step_* folder or a run folder with 'latest'"
        )
    return path


def _damaged(folder: Path, error: BaseException, file: str = "") -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"{file}: " if file else ""
    return UserError(
        f"checkpoint {folder} is damaged or incomplete ({where}{first_line[:200]}); use an earlier step_* folder"
    )


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config dict, tokenizer dict, state dict): the JSON files of a checkpoint folder."""
    try:
        config, tokenizer, state = (
            json.loads((folder / n).read_text()) for n in ("config.json", "tokenizer.json", "state.json")
        )
        missing = {"step", "vocab_size"} - set(state)
        if missing:
            raise ValueError(f"state.json lacks {', '.join(sorted(missing))}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _damaged(folder, error) from None
    return config, tokenizer, state


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model`; keys saved with a torch.compile / DDP prefix load too."""
    try:
        weights = load_file(folder / "model.safetensors")
        for prefix in WRAPPER_PREFIXES:
            weights = {k.removeprefix(prefix): v for k, v in weights.items()}
        unwrap(model).load_state_dict(weights)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise _damaged(folder, error, "model.safetensors") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """(model, tokenizer dict, state dict) from a checkpoint or run folder; refuses damaged files in one line."""
    folder = resolve_checkpoint(path)
    config, tokenizer_dict, state = read_checkpoint(folder)
    try:
        model = GPT(Config.from_dict(config), state["vocab_size"])
    except (ValueError, TypeError) as error:
        raise _damaged(folder, error) from None
    load_weights(folder, model)
    return model.to(device), tokenizer_dict, state


def _load_tensors(path: Path) -> Any:
    """torch.load that executes no code; a damaged file's pickle-protocol warnings stay out of the one-line error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, weights_only=True, map_location="cpu")


def load_optimizer_state(folder: Path, optimizers: list[torch.optim.Optimizer]) -> None:
    """Restore each optimizer's state (momenta, Adam moments, step counts); its hyperparameters stay as built, so a
    resumed run may change --lr and friends."""
    try:
        states = _load_tensors(folder / "optimizer.pt")
        for optimizer, optimizer_state in zip(optimizers, states, strict=True):
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(optimizer_state)
            for group, values in zip(optimizer.param_groups, hyper, strict=True):
                group.update(values)
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no optimizer.pt: it can be sampled from, not resumed") from None
    except Exception as error:  # a damaged file fails in many ways (zip, pickle, shapes); all mean the same
        raise _damaged(folder, error, "optimizer.pt") from None


# ----------------------------------------------------------------------------------------------------------------
# Random generators: plain tensors, lists and numbers, so torch.load(weights_only=True) reads them back


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator training draws from: python, numpy, torch CPU and the training device's."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def load_rng_state(folder: Path) -> dict[str, Any]:
    """rng.pt: the generators of every rank of the job that saved."""
    try:
        return _load_tensors(folder / "rng.pt")
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no rng.pt: it can be sampled from, not resumed") from None
    except Exception as error:  # as in load_optimizer_state
        raise _damaged(folder, error, "rng.pt") from None


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what rng_state saved; device generators only when this run uses that device."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ----------------------------------------------------------------------------------------------------------------
# Resuming: read and check everything before the run builds anything, restore it once the model exists


@dataclass
class Resume:
    """A checkpoint that this run continues: read_resume() reads and checks it; restore() loads it into the model
    and optimizers; restore_rng() sets the random generators last, after start-up has drawn from them."""

    folder: Path
    tokenizer: dict[str, Any]  # tokenizer.json
    state: dict[str, Any]  # state.json: the loop's state (train.py's LoopState reads it)
    rng: dict[str, Any]  # rng.pt: every random generator, the other ranks' under "ranks"
    changes: list[str]  # what differs from the checkpoint's run and changes training: said in one notice

    def restore(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], tokenizer: dict, data: dict):
        """Refuse other data (tokenizer or tokens) than the checkpoint's; then load the weights and optimizer state."""
        compare_data(self.folder, self.tokenizer, self.state, tokenizer, data)
        load_weights(self.folder, model)
        load_optimizer_state(self.folder, optimizers)

    def restore_rng(self, rank: int) -> None:
        """This rank's generators as saved (a rank the saving job lacked keeps its fresh seed)."""
        others = self.rng.get("ranks", [])
        if rank == 0 or rank <= len(others):
            set_rng_state(self.rng if rank == 0 else others[rank - 1])


def saved_config(path: str | Path) -> dict[str, Any]:
    """The config a checkpoint (or a run folder's latest) was trained with."""
    return read_checkpoint(resolve_checkpoint(path))[0]


def read_resume(path: str | Path, cfg: Config, world_size: int = 1) -> Resume:
    """The checkpoint at `path`, checked against this run's config: one line for a flag that must match (the
    weights' shape, the tokens, the data order depend on it), a notice for those that change training."""
    folder = resolve_checkpoint(path)
    saved, tokenizer, state = read_checkpoint(folder)
    changes = compare_configs(folder, saved, cfg)
    if state.get("world_size", 1) != world_size:
        changes.append(f"{world_size} ranks (was {state.get('world_size', 1)})")
    return Resume(folder, tokenizer, state, load_rng_state(folder), changes)


def compare_configs(folder: Path, saved: dict[str, Any], cfg: Config) -> list[str]:
    """Raise on a difference in a flag whose resume rule is MATCH (one line naming each); return the NOTICE ones."""
    ours = cfg.to_dict()
    differ = [name for name in FIELDS if name in saved and saved[name] != ours[name]]
    refused = [n for n in differ if FIELDS[n].metadata["on_resume"] == MATCH]
    if refused:
        what = "; ".join(f"checkpoint has --{n} {saved[n]}, this run asks for {ours[n]}" for n in refused)
        raise UserError(f"cannot resume {folder}: {what}; leave those flags out to use the checkpoint's values")
    return [f"--{n} {ours[n]} (was {saved[n]})" for n in differ if FIELDS[n].metadata["on_resume"] == NOTICE]


def compare_data(
    folder: Path, tokenizer_dict: dict[str, Any], state: dict[str, Any], tokenizer: dict[str, Any], data: dict
) -> None:
    """Refuse a checkpoint whose tokenizer or training tokens differ from this run's (another text, say)."""
    if tokenizer_dict != tokenizer:
        if tokenizer_dict.get("name") == tokenizer.get("name") == "char":
            old, new = set(tokenizer_dict.get("chars", "")), set(tokenizer.get("chars", ""))
            detail = f"characters only in the checkpoint: {''.join(sorted(old - new))[:20]!r}, only in this text: "
            detail += repr("".join(sorted(new - old))[:20])
        else:
            detail = f"{tokenizer_dict.get('name')} vs {tokenizer.get('name')}"
        raise UserError(
            f"cannot resume {folder}: its tokenizer differs from this run's ({detail}); "
            "resume with the text it was trained on (--data_path)"
        )
    saved = state.get("data")
    if saved and saved != data:
        raise UserError(
            f"cannot resume {folder}: it was trained on other tokens ({saved['train_tokens']} train, sha256 "
            f"{saved['sha256']}) than this run's ({data['train_tokens']}, {data['sha256']}); "
            "resume with the text it was trained on (--data_path)"
        )
