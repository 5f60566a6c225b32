"""Save, load and resume checkpoints, atomically, in files that never execute code when read.

<save_model_dir>/<run>/
    step_000500/  model.safetensors  config.json  tokenizer.json  state.json  optimizer.pt  rng.pt
                  ema.safetensors (with --ema_decay: the weights' average, its update count in the metadata)
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from config import FIELDS, KINDS, MATCH, MATCH_ADDED_LATER, NOTICE, Config, UserError, is_kind
from model import GPT
from tokenizer import check_tokenizer_dict
from utils import atomic_write, fsync_dir, out_of_space

LATEST = "latest"
EMA_FILE = "ema.safetensors"  # optimizer.EMA's weights: the same tensors as model.safetensors, averaged
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
    protect: Path | None = None,
    ema: dict[str, Any] | None = None,
) -> Path:
    """Write step_<step>/ atomically, point `latest` at it, keep the newest `keep` (None: all) and `protect` (the
    checkpoint the run resumed from); returns the folder. ema: optimizer.EMA.state_dict(), written as ema.safetensors
    in the same folder. A full disk is one line; the previous checkpoint stays."""
    model = unwrap(model)
    needed = tensor_bytes([model.state_dict(), *(o.state for o in optimizers or []), (ema or {}).get("weights")])
    with out_of_space(run_dir, f"the checkpoint of step {step}", needed):
        final = _write_checkpoint(run_dir, step, model, tokenizer_dict, optimizers, state, rng, ema)
        atomic_write(run_dir / LATEST, final.name + "\n")  # only now does `latest` move to the complete folder
    prune_checkpoints(run_dir, keep, final, protect)
    return final


def _write_checkpoint(run_dir: Path, step: int, model: GPT, tokenizer_dict, optimizers, state, rng, ema) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}.", suffix=".tmp"))
    aside = run_dir / f".{final.name}.replaced.tmp"
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        if ema is not None:  # (metadata is text: the count as digits)
            averaged = {k: v.detach().contiguous().cpu() for k, v in ema["weights"].items()}
            save_file(averaged, tmp / EMA_FILE, metadata={"updates": str(ema["updates"])})
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
    return final


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state dict."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def prune_checkpoints(run_dir: Path, keep: int | None, current: Path, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` step_* folders (never `current` or `protect`) and the temp folders of
    crashed saves."""
    doomed = [p for p in run_dir.glob(".step_*.tmp") if p.is_dir()]
    if keep is not None:
        for old in step_folders(run_dir)[:-keep]:
            if old not in (current, protect):
                gone = run_dir / f".{old.name}.deleting.tmp"
                os.replace(old, gone)  # vanish in one rename, so no half-deleted checkpoint is ever visible
                doomed.append(gone)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Reading: every file is checked against what its writer writes before anything uses it. A file that is missing,
# unreadable or of another shape is one line: "checkpoint X is damaged or incomplete (file: why); use an earlier
# step_* folder". Given a run folder, a damaged newest checkpoint is passed over for the newest usable one.


class Damaged(UserError):
    """A checkpoint whose files are missing, unreadable or not what save_checkpoint writes; `reason` is "file: why"."""

    def __init__(self, folder: Path, reason: str, advice: str = "use an earlier step_* folder"):
        self.folder, self.reason = folder, reason
        super().__init__(f"checkpoint {folder} is damaged or incomplete ({reason}); {advice}")


def _damaged(folder: Path, error: BaseException, file: str = "") -> Damaged:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return Damaged(folder, f"{file}: {first_line[:200]}" if file else first_line[:200])


def resolve_checkpoint(path: str | Path, usable_for: str | None = None, notice: bool = True) -> Path:
    """A checkpoint folder as given, or a run folder's newest checkpoint: the one `latest` names, else (no `latest`,
    or one naming no step_* folder) the newest step_* folder. With usable_for ("sample" or "resume"), a run folder's
    newest checkpoint that unusable() finds fault with is passed over for the next older one that passes, said in
    one `notice:` line (unless notice=False); when none passes, the newest one's fault is the error. Folders newer
    than the one `latest` names (a save or a --overwrite_newer cut short) are never taken. A checkpoint folder given
    as such is returned as it is, to be refused when read."""
    path = Path(path)
    run_folder = (path / LATEST).is_file() or (path.is_dir() and not (path / "model.safetensors").exists())
    folders = step_folders(path) if run_folder else []
    if not folders:
        if not (path / "model.safetensors").exists():
            raise UserError(
                f"{path} is not a checkpoint (no model.safetensors); pass a step_* folder or a run folder with 'latest'"
            )
        return path  # a checkpoint folder
    named = (path / LATEST).read_text(errors="replace").strip() if (path / LATEST).is_file() else ""
    if named in (names := [f.name for f in folders]):
        folders = folders[: names.index(named) + 1]
    newest_first = folders[::-1]
    if usable_for is None:
        return newest_first[0]
    faults = []
    for folder in newest_first:
        if (fault := unusable(folder, usable_for)) is None:
            if faults and notice:
                more = f" (and {len(faults) - 1} more)" if len(faults) > 1 else ""
                print(
                    f"notice: checkpoint {newest_first[0]} is damaged or incomplete ({faults[0]}){more}; using "
                    f"{folder.name}, the newest usable checkpoint of {path}",
                    flush=True,
                )
            return folder
        faults.append(fault)
    if len(faults) > 1:
        raise Damaged(newest_first[0], faults[0], f"no earlier step_* folder of {path} is usable either")
    raise Damaged(newest_first[0], faults[0], f"{path} holds no other checkpoint")


def unusable(folder: Path, purpose: str = "sample") -> str | None:
    """What keeps `folder` from serving to sample from ("sample") or to resume ("resume"), as "file: why"; None when
    nothing does. Cheap: the JSON files, the weights' header (names and shapes, against the model the config
    makes; ema.safetensors' too, when there, and its update count) and, to resume, rng.pt and the structure of
    optimizer.pt (memory-mapped: its tensors are not read)."""
    try:
        config, _, state = read_checkpoint(folder)
        with torch.device("meta"):  # the model's shapes without its memory
            expected = GPT(Config.from_dict(config), state["vocab_size"]).state_dict()
        averaged = (folder / EMA_FILE).is_file()
        for name in ("model.safetensors", *([EMA_FILE] if averaged else [])):
            try:
                with safe_open(folder / name, "pt") as weights:
                    shapes = {_plain_name(k): tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
                    metadata = weights.metadata()
                check_weight_shapes(shapes, expected)
                if name == EMA_FILE:
                    ema_updates(metadata, state["step"])
            except (OSError, ValueError, RuntimeError, SafetensorError) as error:
                raise _damaged(folder, error, name) from None
        if purpose == "resume":
            for name in ("optimizer.pt", "rng.pt", *([EMA_FILE] if config.get("ema_decay") else [])):
                if not (folder / name).is_file():
                    return f"no {name}: it can be sampled from, not resumed"
            load_rng_state(folder, state.get("world_size", 1))
            try:
                check_optimizer_states(_load_tensors(folder / "optimizer.pt", mmap=True))
            except Exception as error:  # as in load_optimizer_state
                raise _damaged(folder, error, "optimizer.pt") from None
    except Damaged as error:
        return error.reason
    return None


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(config dict, tokenizer dict, state dict): the JSON files of a checkpoint folder, each checked against what
    save_checkpoint writes (check_config, check_state, tokenizer.check_tokenizer_dict) and against each other."""
    files = {}
    for name in ("config.json", "tokenizer.json", "state.json"):
        try:
            files[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as error:  # (UnicodeDecodeError and JSON errors: ValueError)
            raise _damaged(folder, error, name) from None
    config, tokenizer, state = files.values()
    checks = (
        ("config.json", lambda: check_config(config)),
        ("state.json", lambda: check_state(state, folder)),
        ("tokenizer.json", lambda: check_tokenizer_dict(tokenizer, state["vocab_size"])),
    )
    for name, check in checks:
        try:
            check()
        except (ValueError, TypeError) as error:
            raise _damaged(folder, error, name) from None
    if config["tokenizer"] != tokenizer["name"]:
        raise Damaged(
            folder, f"tokenizer.json: a {tokenizer['name']} tokenizer, but config.json has {config['tokenizer']}"
        )
    return config, tokenizer, state


def check_config(config: Any) -> Config:
    """The Config a config.json holds, or ValueError (UserError) naming what is wrong. Every flag whose resume rule is
    MATCH (the model's shape, the tokens, the optimizer layout, the data order) must be there: its default would be
    another model or run than the one saved. Every flag there must be of its type (a bool where a bool goes, an
    integer where an integer goes and never a bool, a number where a float goes, None only where None is allowed)
    and valid (Config.validate). A missing NOTICE or FREE flag takes its default, as for a checkpoint written before
    the flag existed (read_resume names the NOTICE ones in its notice), and so does a MATCH flag added after the first
    checkpoints (config.MATCH_ADDED_LATER); keys this version does not know are ignored."""
    if not isinstance(config, dict):
        raise ValueError(f"expected an object of flags, got {_json_type(config)}")
    # (a MATCH flag added later is missing from older checkpoints, whose model its default describes)
    needed = [name for name, f in FIELDS.items() if f.metadata["on_resume"] == MATCH and name not in MATCH_ADDED_LATER]
    if missing := [name for name in needed if name not in config]:
        raise ValueError(f"lacks {', '.join(missing[:4])}{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")
    for name, (kind, optional) in KINDS.items():
        value = config.get(name)
        if name in config and not ((value is None and optional) or is_kind(value, kind)):
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            raise ValueError(f"{name} must be {what}{' or null' if optional else ''}, got {_json_repr(value)}")
    return Config.from_dict(config)


def check_state(state: Any, folder: Path) -> None:
    """ValueError unless state.json has the checkpoint's own keys: step (an integer >= 0, the step_* folder's number)
    and vocab_size (an integer > 0). The loop's keys are train.LoopState's to check."""
    if not isinstance(state, dict):
        raise ValueError(f"expected an object, got {_json_type(state)}")
    for key, low in (("step", 0), ("vocab_size", 1)):
        if key not in state:
            raise ValueError(f"lacks {key}")
        if not is_kind(state[key], int) or state[key] < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {_json_repr(state[key])}")
    number = folder.name.removeprefix("step_")
    if folder.name.startswith("step_") and number.isdigit() and int(number) != state["step"]:
        raise ValueError(f"step {state['step']} in the folder of step {int(number)}")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _json_repr(value: Any) -> str:
    return json.dumps(value)[:40] if isinstance(value, (dict, list, str)) or value is None else repr(value)[:40]


def _plain_name(key: str) -> str:
    """A saved tensor's name without the torch.compile / DDP prefixes, in any order and number."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def check_weight_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor]) -> None:
    """ValueError unless the saved tensors are the ones of the model that config.json and vocab_size make, name for
    name and shape for shape."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        what = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unknown (e.g. {extra[0]})" if extra else "",
        ]
        raise ValueError(f"tensors {' and '.join(w for w in what if w)} for the model config.json describes")
    for name, tensor in expected.items():
        if tuple(found[name]) != tuple(tensor.shape):
            raise ValueError(
                f"{name} is {list(found[name])}, the model config.json and vocab_size describe has {list(tensor.shape)}"
            )


def read_weights(
    folder: Path, name: str, expected: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the checkpoint's weights file `name`, the tensors checked against `expected` (names and
    shapes) and for finiteness; keys saved with a torch.compile / DDP prefix come back plain."""
    try:
        with safe_open(folder / name, "pt") as file:
            weights = {_plain_name(k): file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
            metadata = file.metadata() or {}
        check_weight_shapes({k: tuple(v.shape) for k, v in weights.items()}, expected)
        if bad := [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]:
            raise ValueError(f"{bad[0]} holds NaN or infinite values")
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise _damaged(folder, error, name) from None
    return weights, metadata


def load_weights(folder: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model` (names, shapes and finiteness checked first); keys saved with a
    torch.compile / DDP prefix load too."""
    weights, _ = read_weights(folder, "model.safetensors", unwrap(model).state_dict())
    unwrap(model).load_state_dict(weights)


def ema_updates(metadata: dict[str, str] | None, step: int) -> int:
    """The update count of ema.safetensors' metadata: an integer from 0 to the checkpoint's step (one update per
    optimizer step at most), or ValueError."""
    updates = (metadata or {}).get("updates")
    if not (isinstance(updates, str) and updates.isascii() and updates.isdigit() and int(updates) <= step):
        raise ValueError(f"its metadata must hold an update count from 0 to the step ({step}), got {updates!r}"[:200])
    return int(updates)


def read_ema(folder: Path, expected: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """ema.safetensors as optimizer.EMA.load_state_dict takes it, {"weights", "updates"}: the tensors checked as
    model.safetensors' are (read_weights), the count by ema_updates."""
    weights, metadata = read_weights(folder, EMA_FILE, expected)
    try:
        return {"weights": weights, "updates": ema_updates(metadata, step)}
    except ValueError as error:
        raise _damaged(folder, error, EMA_FILE) from None


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", weights: str | None = None
) -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """(model, tokenizer dict, state dict) from a checkpoint or run folder (a damaged newest checkpoint of a run
    folder is passed over, with a notice); refuses damaged files in one line. weights: "raw" (model.safetensors),
    "ema" (ema.safetensors; refused when the checkpoint has none) or None (the EMA when there, else the raw ones)."""
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"weights must be 'ema', 'raw' or None, got {weights!r}")
    folder = resolve_checkpoint(path, usable_for="sample")
    config, tokenizer_dict, state = read_checkpoint(folder)
    model = GPT(Config.from_dict(config), state["vocab_size"])
    averaged = weights != "raw" and (folder / EMA_FILE).is_file()
    if weights == "ema" and not averaged:
        raise UserError(
            f"checkpoint {folder} has no averaged weights (no {EMA_FILE}: it was trained without --ema_decay); "
            "use the raw ones (--weights raw)"
        )
    if averaged:
        model.load_state_dict(read_ema(folder, model.state_dict(), state["step"])["weights"])
    else:
        load_weights(folder, model)
    return model.to(device), tokenizer_dict, state


def _load_tensors(path: Path, mmap: bool = False) -> Any:
    """torch.load that executes no code; a damaged file's pickle-protocol warnings stay out of the one-line error.
    mmap: map the tensors' bytes rather than read them (to look at the structure alone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
        except FileNotFoundError:
            raise
        except Exception as error:  # truncated, not a zip, a pickle of other things: the details say little
            detail = ": ".join([type(error).__name__, *str(error).strip().splitlines()[:1]])[:160]
            raise ValueError(f"not a file of tensors torch.save wrote ({detail})") from None


def load_optimizer_state(folder: Path, optimizers: list[torch.optim.Optimizer]) -> None:
    """Restore each optimizer's state (momenta, Adam moments, step counts), checked against the optimizers first;
    its hyperparameters stay as built, so a resumed run may change --lr and friends."""
    try:
        states = _load_tensors(folder / "optimizer.pt")
        check_optimizer_states(states, optimizers)
        for optimizer, optimizer_state in zip(optimizers, states, strict=True):
            hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(optimizer_state)
            for group, values in zip(optimizer.param_groups, hyper, strict=True):
                group.update(values)
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no optimizer.pt: it can be sampled from, not resumed") from None
    except Exception as error:  # a damaged file fails in many ways (zip, pickle, shapes); all mean the same
        raise _damaged(folder, error, "optimizer.pt") from None


def check_optimizer_states(states: Any, optimizers: list[torch.optim.Optimizer] | None = None) -> None:
    """ValueError unless `states` is what save_checkpoint writes to optimizer.pt: a list of optimizer state dicts,
    {"state": {parameter id: {name: tensor}}, "param_groups": [{"params": [parameter ids], ...}]}, every parameter
    holding the same names, "step" one number and the rest tensors. Given this run's optimizers, also: one state each,
    the same groups of the same sizes, every tensor but "step" its parameter's shape, all of them finite."""
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise ValueError("expected a list of optimizer states")
    if optimizers is not None and len(states) != len(optimizers):
        raise ValueError(f"{len(states)} optimizer states for this run's {len(optimizers)} optimizers")
    for i, saved in enumerate(states):
        what = type(optimizers[i]).__name__ if optimizers is not None else f"optimizer {i}"
        groups, per_parameter = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or not isinstance(per_parameter, dict):
            raise ValueError(f"{what}: no state and param_groups")
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
            raise ValueError(f"{what}: a parameter group without its parameters")
        ids = [p for g in groups for p in g["params"]]
        if not all(is_kind(p, int) for p in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{what}: parameter ids that are not distinct integers")
        params = {}
        if optimizers is not None:
            built = optimizers[i].param_groups
            sizes, ours = [len(g["params"]) for g in groups], [len(g["params"]) for g in built]
            if sizes != ours:
                raise ValueError(f"{what}: parameter groups of {sizes} parameters, this run's have {ours}")
            params = dict(zip(ids, (p for g in built for p in g["params"]), strict=True))
        known = set(ids)
        for key, values in per_parameter.items():
            if key not in known:
                raise ValueError(f"{what}: state for {key!r}, which is none of its parameters")
            if not isinstance(values, dict) or not all(isinstance(name, str) for name in values):
                raise ValueError(f"{what}: the state of parameter {key} is not a dict of named tensors")
            for name, value in values.items():
                tensor = value if isinstance(value, torch.Tensor) else None
                if name == "step":  # (torch's one per-parameter number)
                    fits = tensor.numel() == 1 if tensor is not None else is_kind(value, float)
                else:
                    fits = tensor is not None and (key not in params or tensor.shape == params[key].shape)
                if not fits:
                    got = list(tensor.shape) if tensor is not None else type(value).__name__
                    shape = "one number" if name == "step" else list(params[key].shape) if key in params else "a tensor"
                    raise ValueError(f"{what}: {name} of parameter {key} is {got}, not {shape}")
                if optimizers is None:  # (a look at the structure alone: the mapped tensors stay unread)
                    continue
                if not (torch.isfinite(tensor).all() if tensor is not None else np.isfinite(value)):
                    raise ValueError(f"{what}: {name} of parameter {key} holds NaN or infinite values")
        if len({frozenset(values) for values in per_parameter.values()}) > 1:
            raise ValueError(f"{what}: its parameters hold different state entries")


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


def load_rng_state(folder: Path, world_size: Any = None) -> dict[str, Any]:
    """rng.pt: the generators of every rank of the job that saved (check_rng_state; world_size: state.json's)."""
    try:
        state = _load_tensors(folder / "rng.pt")
        check_rng_state(state, world_size)
        return state
    except FileNotFoundError:
        raise UserError(f"checkpoint {folder} has no rng.pt: it can be sampled from, not resumed") from None
    except Exception as error:  # as in load_optimizer_state
        raise _damaged(folder, error, "rng.pt") from None


def check_rng_state(state: Any, world_size: Any = None) -> None:
    """ValueError unless `state` is what rng_state() writes: python, numpy and torch states that a throwaway generator
    of each kind takes, cuda ones a list of byte tensors, mps one byte tensor; with "ranks", a list of such states,
    one for each other rank of the job that saved (world_size - 1 of them, when world_size is a count)."""
    _check_generators(state, "")
    ranks = state.get("ranks", [])
    if not isinstance(ranks, list):
        raise ValueError(f'"ranks" is {type(ranks).__name__}, not a list of generator states')
    for rank, other in enumerate(ranks, 1):
        _check_generators(other, f"rank {rank}: ")
    if is_kind(world_size, int) and world_size >= 1 and len(ranks) != world_size - 1:
        raise ValueError(f"the generators of {len(ranks) + 1} ranks, but state.json says world_size {world_size}")


def _check_generators(state: Any, rank: str) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{rank}expected a dict of generator states, got {type(state).__name__}")
    if missing := [key for key in ("python", "numpy", "torch") if key not in state]:
        raise ValueError(f"{rank}no {', '.join(missing)} generator state")
    try:
        version, internal, gauss = state["python"]
        if not (gauss is None or isinstance(gauss, float)) or not isinstance(internal, (list, tuple)):
            raise TypeError
        random.Random().setstate((version, tuple(internal), gauss))  # its own checks, on a throwaway generator
    except Exception:  # (whatever the library's own check raises)
        raise ValueError(f"{rank}the python generator state is invalid") from None
    try:
        kind, keys, position, has_gauss, cached = state["numpy"]
        numbers = [is_kind(position, int), is_kind(has_gauss, int), is_kind(cached, float), isinstance(keys, list)]
        if not all(numbers) or not all(is_kind(k, int) for k in keys):
            raise TypeError
        np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    except Exception:
        raise ValueError(f"{rank}the numpy generator state is invalid") from None
    try:
        torch.Generator().set_state(state["torch"])
    except Exception:
        raise ValueError(f"{rank}the torch generator state is invalid") from None
    byte_tensors = {"cuda": state.get("cuda", []), "mps": [state["mps"]] if "mps" in state else []}
    for device, tensors in byte_tensors.items():
        if not isinstance(tensors, list) or not all(_is_bytes(t) for t in tensors):
            raise ValueError(f"{rank}the {device} generator state is invalid (not byte tensors)")


def _is_bytes(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


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
    ema: dict[str, Any] | None = None  # ema.safetensors (read_ema) when this run averages and the checkpoint has it

    def restore(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], tokenizer: dict, data: dict):
        """Refuse other data (tokenizer or tokens) than the checkpoint's; then load the weights and optimizer state."""
        compare_data(self.folder, self.tokenizer, self.state, tokenizer, data)
        load_weights(self.folder, model)
        load_optimizer_state(self.folder, optimizers)

    def newer(self) -> list[Path]:
        """The run folder's usable checkpoints after the one resumed from (a damaged one is passed over, and the
        resumed run writes over it when it gets there)."""
        step = int(self.folder.name[5:]) if self.folder.name[5:].isdigit() else self.state["step"]
        later = [p for p in step_folders(self.folder.parent) if int(p.name[5:]) > step]
        return [p for p in later if unusable(p, "resume") is None]

    def drop_newer(self, overwrite: bool) -> None:
        """Resuming an older step while newer ones exist would interleave two histories in one folder: refuse,
        or with --overwrite_newer delete the newer ones (and point `latest` back here) before anything is written."""
        newer = self.newer()
        if not newer:
            return
        names = ", ".join(p.name for p in newer)
        if not overwrite:
            raise UserError(
                f"cannot resume {self.folder}: its run folder has newer checkpoints ({names}); resume from the newest "
                f"(--resume {self.folder.parent}), or pass --overwrite_newer True to delete them and go on from here"
            )
        atomic_write(self.folder.parent / LATEST, self.folder.name + "\n")
        for folder in newer:
            gone = folder.parent / f".{folder.name}.deleting.tmp"
            os.replace(folder, gone)
            shutil.rmtree(gone, ignore_errors=True)
        print(f"notice: deleted the newer checkpoints {names} (--overwrite_newer)", flush=True)

    def restore_ema(self, ema: Any) -> None:
        """The checkpoint's weight average into `ema`, this run's optimizer.EMA (None: --ema_decay 0, nothing to do).
        A checkpoint without one (saved before --ema_decay was on) leaves the average at its weights, with a notice."""
        if ema is None:
            return
        if self.ema is None:
            print(f"notice: {self.folder} has no {EMA_FILE}; the weight average starts from its weights", flush=True)
            return
        ema.load_state_dict(self.ema)
        self.ema = None  # (its copy of the weights is no longer needed)

    def restore_rng(self, rank: int) -> None:
        """This rank's generators as saved (a rank the saving job lacked keeps its fresh seed)."""
        others = self.rng.get("ranks", [])
        if rank == 0 or rank <= len(others):
            set_rng_state(self.rng if rank == 0 else others[rank - 1])


def saved_config(path: str | Path) -> dict[str, Any]:
    """The config of the checkpoint that --resume `path` continues (a run folder's newest usable one, quietly:
    read_resume says the notice), checked (read_checkpoint)."""
    return read_checkpoint(resolve_checkpoint(path, usable_for="resume", notice=False))[0]


def read_resume(path: str | Path, cfg: Config, world_size: int = 1) -> Resume:
    """The checkpoint at `path` (a run folder's newest usable one), checked against this run's config: one line for
    a flag that must match (the weights' shape, the tokens, the data order depend on it), a notice for those that
    change training and for those its config.json lacks (written before they existed). Every file is checked before
    use (the loop's keys of state.json by train.LoopState); ema.safetensors, which a checkpoint saved with
    --ema_decay needs to resume, is read when this run averages too."""
    folder = resolve_checkpoint(path, usable_for="resume")
    saved, tokenizer, state = read_checkpoint(folder)
    changes = compare_configs(folder, saved, cfg)
    unsaved = [name for name, f in FIELDS.items() if name not in saved and f.metadata["on_resume"] == NOTICE]
    changes += [f"--{name} {getattr(cfg, name)} (not in its config.json)" for name in unsaved]
    if state.get("world_size", 1) != world_size:
        changes.append(f"{world_size} ranks (was {state.get('world_size', 1)})")
    averaged = (folder / EMA_FILE).is_file()
    if saved.get("ema_decay") and not averaged:
        raise UserError(f"checkpoint {folder} has no {EMA_FILE}: it can be sampled from, not resumed")
    ema = None
    if cfg.ema_decay and averaged:
        with torch.device("meta"):  # the model's shapes without its memory
            expected = GPT(Config.from_dict(saved), state["vocab_size"]).state_dict()
        ema = read_ema(folder, expected, state["step"])
    return Resume(folder, tokenizer, state, load_rng_state(folder, state.get("world_size", 1)), changes, ema)


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
    """Refuse a checkpoint whose tokenizer or training tokens differ from this run's (another text, say); a
    state.json "data" that is not a token fingerprint like this run's is damaged (one without it, from before
    fingerprints, or with LoopState's empty default, is not checked)."""
    if {key: tokenizer_dict.get(key) for key in tokenizer} != tokenizer:  # (keys this version does not know: ignored)
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
    if saved is None or saved == {}:
        return
    if not isinstance(saved, dict) or {k: type(v) for k, v in saved.items()} != {k: type(v) for k, v in data.items()}:
        raise Damaged(folder, f"state.json: data is not a token fingerprint ({', '.join(data)}): {_json_repr(saved)}")
    if saved != data:
        raise UserError(
            f"cannot resume {folder}: it was trained on other tokens ({saved['train_tokens']} train, sha256 "
            f"{saved['sha256']}) than this run's ({data['train_tokens']}, {data['sha256']}); "
            "resume with the text it was trained on (--data_path)"
        )
