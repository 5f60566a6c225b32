"""Damaged checkpoints, generated: every file of a real checkpoint, damaged every way below, is refused in one line or
passed over for an earlier checkpoint; never a traceback, never a silently different run.

A tiny run is trained once (module fixture) and saves step_000002 and step_000004. Each case copies it, damages one
file of step_000004 and then
- resumes from that step folder with train.main: exit status 2 and exactly one stderr line, `error: ...`, naming the
  checkpoint; or, for the few damages that are no damage by design (ACCEPTED: a checkpoint written before a key
  existed), a normal resume;
- loads that step folder with checkpoint.load_checkpoint (what sample.py does): a one-line UserError when sampling
  reads the damaged part (sampled()), else the model;
- loads the run folder: for a damage that sampling reads, a `notice:` and step_000002 (the fallback), else step 4.
The cases are generated from the files' own writers: config.json's keys from Config, state.json's from
trainer.LoopState, optimizer.pt's from build_optimizers, rng.pt's from rng_state, model.safetensors' from GPT,
ema.safetensors' (the run averages its weights: --ema_decay) from optimizer.EMA; so a field added to any of them is
damaged here too. The module fixture checks that the samples match the saved files. Sampling loads the raw weights
(load_checkpoint's weights="raw"), except for the cases of ema.safetensors, which load what sample.py loads by
default: the average when the checkpoint has one.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import argv_of, run_values, synthetic_text, write_text
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
import trainer
from checkpoint import EMA_FILE, LATEST, load_checkpoint, rng_state, step_folders
from config import FIELDS, FREE, MATCH, MATCH_ADDED_LATER, NOTICE, Config, UserError
from data import TrainBatches, token_fingerprint
from model import GPT
from optimizer import EMA, build_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

TEXT = synthetic_text(3_000)
VOCAB = len(set(TEXT))
# 1 block x 2 heads x 16 dim, 4 steps saved at 2 and 4; --peak_flops skips the CPU probe
RUN = dict(num_blocks=1, num_heads=2, embedding_dim=16, max_steps=4, warmup_steps=1, save_model=True, save_every=2)
RUN |= dict(peak_flops=1e12, ema_decay=0.5)
NEWEST, EARLIER = "step_000004", "step_000002"


# ----------------------------------------------------------------------------------------------------------------
# What each file holds, from its writer (the fixture checks these against the saved files)


def _samples() -> dict[str, Any]:
    cfg = Config(**run_values(Path("t"), "text.txt", RUN))
    tokens = torch.arange(200) % VOCAB
    loop = trainer.LoopState(
        run="r",
        data=token_fingerprint(tokens, tokens),
        batches=TrainBatches(tokens, 2, 8, 0, torch.device("cpu")),
        best_val_loss=1.0,  # (after the final evaluation)
    )
    with torch.device("meta"):
        model = GPT(cfg, VOCAB)
    ema = EMA(model, cfg.ema_decay).state_dict()
    return {
        "config.json": cfg.to_dict(),
        "state.json": {"step": 4, "vocab_size": VOCAB, **loop.state_dict()},
        "tokenizer.json": {"name": "char", "chars": "abc"},
        "weights": {name: tuple(t.shape) for name, t in model.state_dict().items()},
        "ema_weights": {name: tuple(t.shape) for name, t in ema["weights"].items()},
        "ema_metadata": sorted(key for key in ema if key != "weights"),  # (ema.safetensors' metadata: the rest)
        "optimizers": len(build_optimizers(GPT(cfg, VOCAB), cfg)),
        "rng": sorted(rng_state(torch.device("cpu"))),
    }


SAMPLES = _samples()


def json_shape(value: Any, path: tuple = ()) -> dict[tuple, str]:
    """{key path: JSON type} of every key of a JSON object, nested objects included."""
    shape = {}
    for key, item in value.items():
        shape[(*path, key)] = type(item).__name__
        if isinstance(item, dict):
            shape |= json_shape(item, (*path, key))
    return shape


# ----------------------------------------------------------------------------------------------------------------
# Damages: (file, case id, damage(folder)), generated


def rewrite_json(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def at_key(path: tuple, change: Callable[[dict, str], None]) -> Callable[[Any], Any]:
    def edit(payload: dict) -> dict:
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        change(parent, path[-1])
        return payload

    return edit


def other_type(value: Any) -> Any:
    """A value of another JSON type that no key accepts in place of `value`: a number for a string, the text of
    anything else (a number, a boolean, an object), a list for null."""
    if value is None:
        return []
    return 5 if isinstance(value, str) else json.dumps(value)


KEY_DAMAGES: dict[str, Callable[[Any], Any]] = {  # kind -> the damaged value, from the saved one
    "other_type": other_type,
    "bool_swap": lambda v: 1 if isinstance(v, bool) else True,  # true where a number goes, 1 where a bool goes
    "list": lambda v: [],
}
RANGE_DAMAGES: dict[str, tuple[type, Any]] = {"negative": (int, -1), "nan": (float, math.nan)}


def truncate(name: str, keep: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        payload = (folder / name).read_bytes()
        (folder / name).write_bytes(payload[: int(len(payload) * keep)])

    return damage


def json_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    cases = []
    for name in ("config.json", "state.json", "tokenizer.json"):
        cases += [(name, "truncated_to_0", truncate(name, 0)), (name, "truncated_to_half", truncate(name, 0.5))]
        for whole_id, whole in (("null", None), ("list", []), ("object", {})):
            cases.append((name, f"whole_file_{whole_id}", rewrite_json(name, lambda _, w=whole: w)))
        for path, kind in json_shape(SAMPLES[name]).items():
            where = ".".join(path)
            cases.append((name, f"{where}-missing", rewrite_json(name, at_key(path, lambda d, k: d.pop(k)))))
            for damage_id, make in KEY_DAMAGES.items():
                change = at_key(path, lambda d, k, make=make: d.update({k: make(d[k])}))
                cases.append((name, f"{where}-{damage_id}", rewrite_json(name, change)))
            for damage_id, (kind_of, value) in RANGE_DAMAGES.items():
                if kind == kind_of.__name__:
                    change = at_key(path, lambda d, k, value=value: d.update({k: value}))
                    cases.append((name, f"{where}-{damage_id}", rewrite_json(name, change)))
    cases += [
        ("tokenizer.json", "unknown_name", rewrite_json("tokenizer.json", lambda t: {"name": "nope"})),
        ("tokenizer.json", "a_char_fewer", rewrite_json("tokenizer.json", lambda t: {**t, "chars": t["chars"][1:]})),
        (
            "tokenizer.json",
            "a_char_twice",
            rewrite_json("tokenizer.json", lambda t: {**t, "chars": t["chars"][1] + t["chars"][1:]}),
        ),
        ("tokenizer.json", "gpt2_name", rewrite_json("tokenizer.json", lambda t: {"name": "gpt2"})),
        ("state.json", "step_of_another_folder", rewrite_json("state.json", lambda s: {**s, "step": 2})),
        ("config.json", "another_width", rewrite_json("config.json", lambda c: {**c, "embedding_dim": 32})),
    ]
    return cases


def rewrite_weights(change: Callable[[dict], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    """change(tensors) of a safetensors file of the checkpoint, in place; its metadata is kept."""

    def damage(folder: Path) -> None:
        with safe_open(folder / name, "pt") as file:
            weights, metadata = {k: file.get_tensor(k) for k in file.keys()}, file.metadata()  # noqa: SIM118
        change(weights)
        save_file(weights, folder / name, metadata=metadata)

    return damage


def rewrite_metadata(change: Callable[[dict], None], name: str = EMA_FILE) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        with safe_open(folder / name, "pt") as file:
            metadata = file.metadata() or {}
        change(metadata)
        save_file(load_file(folder / name), folder / name, metadata=metadata)

    return damage


def weight_cases(name: str = "model.safetensors", keys: str = "weights") -> list[tuple[str, str, Callable]]:
    cases = [(name, "truncated_to_0", truncate(name, 0)), (name, "truncated_to_half", truncate(name, 0.5))]
    cases.append((name, "header_garbage", lambda f: (f / name).write_bytes(b"\xff" * 8 + (f / name).read_bytes()[8:])))
    cases.append((name, "extra_tensor", rewrite_weights(lambda w: w.update({"extra.weight": torch.zeros(3)}), name)))
    for key in SAMPLES[keys]:
        cases.append((name, f"{key}-missing", rewrite_weights(lambda w, k=key: w.pop(k), name)))
        reshaped = rewrite_weights(lambda w, k=key: w.update({k: w[k].flatten()[:-1]}), name)
        cases.append((name, f"{key}-reshaped", reshaped))
        cases.append((name, f"{key}-nan", rewrite_weights(lambda w, k=key: w[k].view(-1)[:1].fill_(math.nan), name)))
    return cases


METADATA_DAMAGES: dict[str, Callable[[str], str]] = {  # kind -> the damaged value of a metadata entry (digits)
    "negative": lambda v: f"-{v}",
    "other_type": lambda v: "x",
    "fraction": lambda v: f"{v}.5",
    "above_step": lambda v: str(int(v) + 1),  # (an update per optimizer step at most)
}


def ema_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    """ema.safetensors: damaged as model.safetensors is, its metadata entries too, or deleted (a checkpoint of a run
    with --ema_decay needs it to resume; sampling takes the raw weights then)."""
    cases = weight_cases(EMA_FILE, "ema_weights") + [(EMA_FILE, "deleted", lambda f: (f / EMA_FILE).unlink())]
    for key in SAMPLES["ema_metadata"]:
        cases.append((EMA_FILE, f"{key}-missing", rewrite_metadata(lambda m, k=key: m.pop(k))))
        for kind, make in METADATA_DAMAGES.items():
            change = rewrite_metadata(lambda m, k=key, make=make: m.update({k: make(m[k])}))
            cases.append((EMA_FILE, f"{key}-{kind}", change))
    return cases


def rewrite_tensors(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        payload = torch.load(folder / name, weights_only=True)
        torch.save(change(payload), folder / name)

    return damage


def first_entry(optimizer: dict, change: Callable[[dict, str], Any]) -> None:
    """`change(entries, name)` on the first parameter's state, for the name of its first tensor (not "step")."""
    entries = next(iter(optimizer["state"].values()))
    change(entries, next(n for n in entries if n != "step"))


OPTIMIZER_DAMAGES: dict[str, Callable[[dict], Any]] = {  # kind -> an in-place damage of one optimizer's state dict
    "state_missing": lambda o: o.pop("state"),
    "state_list": lambda o: o.update(state=[]),
    "groups_missing": lambda o: o.pop("param_groups"),
    "group_dropped": lambda o: o["param_groups"].pop(),
    "params_short": lambda o: o["param_groups"][0]["params"].pop(),
    "params_strings": lambda o: o["param_groups"][0].update(params=["a"]),
    "entry_reshaped": lambda o: first_entry(o, lambda e, n: e.update({n: e[n].flatten()[:-1]})),
    "entry_nan": lambda o: first_entry(o, lambda e, n: e[n].view(-1)[:1].fill_(math.nan)),
    "entry_dropped": lambda o: first_entry(o, lambda e, n: e.pop(n)),
    "entry_not_a_tensor": lambda o: first_entry(o, lambda e, n: e.update({n: "x"})),
    "state_of_no_parameter": lambda o: o["state"].update({10_000: {}}),
}


def damage_optimizer(i: int, change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def edit(states: list) -> list:
        change(states[i])
        return states

    return rewrite_tensors("optimizer.pt", edit)


def optimizer_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    name = "optimizer.pt"
    cases = [(name, "truncated_to_0", truncate(name, 0)), (name, "truncated_to_half", truncate(name, 0.5))]
    for whole_id, whole in (("none", None), ("empty_dict", {}), ("empty_list", []), ("tensor", torch.zeros(3))):
        cases.append((name, f"whole_file_{whole_id}", rewrite_tensors(name, lambda _, w=whole: w)))
    cases.append((name, "one_fewer", rewrite_tensors(name, lambda s: s[:-1])))
    cases.append((name, "one_more", rewrite_tensors(name, lambda s: [*s, s[-1]])))
    cases.append((name, "swapped", rewrite_tensors(name, lambda s: s[::-1])))
    for i in range(SAMPLES["optimizers"]):
        cases += [(name, f"{i}-{kind}", damage_optimizer(i, change)) for kind, change in OPTIMIZER_DAMAGES.items()]
    return cases


def halved(value: Any) -> Any:
    """The generator state cut short: python's and numpy's word lists, or torch's bytes."""
    if isinstance(value, torch.Tensor):
        return value[: len(value) // 2]
    return [value[0], value[1][: len(value[1]) // 2], *value[2:]]


def bad_values(value: Any) -> Any:
    """The generator state with words out of range (python, numpy), or torch's bytes as floats."""
    if isinstance(value, torch.Tensor):
        return value.float()
    return [value[0], [-1] * len(value[1]), *value[2:]]


RNG_DAMAGES: dict[str, Callable[[Any], Any]] = {  # kind -> the damaged generator state, from the saved one
    "other_type": lambda v: "x",
    "list": lambda v: [],
    "halved": halved,
    "bad_values": bad_values,
}


def rng_cases() -> list[tuple[str, str, Callable[[Path], None]]]:
    name = "rng.pt"
    cases = [(name, "truncated_to_0", truncate(name, 0)), (name, "truncated_to_half", truncate(name, 0.5))]
    for whole_id, whole in (("none", None), ("empty_dict", {}), ("empty_list", []), ("tensor", torch.zeros(3))):
        cases.append((name, f"whole_file_{whole_id}", rewrite_tensors(name, lambda _, w=whole: w)))
    for key in SAMPLES["rng"]:
        cases.append(
            (name, f"{key}-missing", rewrite_tensors(name, lambda r, k=key: {x: v for x, v in r.items() if x != k}))
        )
        for kind, make in RNG_DAMAGES.items():
            cases.append(
                (name, f"{key}-{kind}", rewrite_tensors(name, lambda r, k=key, make=make: {**r, k: make(r[k])}))
            )
    cases.append((name, "ranks_not_a_list", rewrite_tensors(name, lambda r: {**r, "ranks": "x"})))
    cases.append((name, "ranks_of_nothing", rewrite_tensors(name, lambda r: {**r, "ranks": [{}]})))
    cases.append((name, "a_rank_the_job_lacked", rewrite_tensors(name, lambda r: {**r, "ranks": [dict(r)]})))
    cases.append((name, "cuda_not_a_list", rewrite_tensors(name, lambda r: {**r, "cuda": "x"})))
    cases.append((name, "cuda_of_floats", rewrite_tensors(name, lambda r: {**r, "cuda": [torch.zeros(16)]})))
    return cases


CASES = json_cases() + weight_cases() + ema_cases() + optimizer_cases() + rng_cases()

# Damages that are no damage, by design, as for a checkpoint written before these keys were: (file, case) -> what
# the resumed run's output must say. A config.json without a flag whose resume rule is NOTICE or FREE takes the
# default (a NOTICE one in the resume notice); a state.json without data, world_size or wandb_id skips the data
# check, assumes one rank, starts a new wandb run (trainer.LoopState).
ACCEPTED = {("state.json", f"{key}-missing"): "" for key in ("data", "world_size", "wandb_id")}
ACCEPTED |= {("config.json", f"{name}-missing"): "" for name in MATCH_ADDED_LATER}  # (their default: the old model)
ACCEPTED |= {
    ("config.json", f"{name}-missing"): f"--{name} {f.default} (not in its config.json)" if rule == NOTICE else ""
    for name, f in FIELDS.items()
    if (rule := f.metadata["on_resume"]) != MATCH
}


def sampled(file: str, case: str) -> bool:
    """Whether load_checkpoint (sampling) reads the damaged part: the weights (the raw ones, or the average for the
    cases of ema.safetensors), config and tokenizer, and state.json's step and vocab_size (or all of it); never
    optimizer.pt, rng.pt or the loop's keys; nor a deleted ema.safetensors (then the raw weights). (ACCEPTED: none.)"""
    if (file, case) in ACCEPTED:
        return False
    if file == EMA_FILE:
        return case != "deleted"
    if file in ("config.json", "tokenizer.json", "model.safetensors"):
        return True
    return file == "state.json" and (case.split("-")[0] in ("step", "vocab_size") or "-" not in case)


# ----------------------------------------------------------------------------------------------------------------
# The trained run and the assertions


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder holding text.txt, runs/r and models/r with step_000002 and step_000004."""
    tmp = tmp_path_factory.mktemp("damaged")
    write_text(tmp / "text.txt", TEXT)
    assert train.main(argv_of(run_values(tmp, tmp / "text.txt", RUN))) == 0
    run = tmp / "models" / "r"
    assert [p.name for p in step_folders(run)] == [EARLIER, NEWEST]
    for name in ("config.json", "state.json", "tokenizer.json"):  # the generated keys are the saved ones
        saved = json.loads((run / NEWEST / name).read_text())
        assert json_shape(saved) == json_shape(SAMPLES[name]), name
    assert {k: tuple(v.shape) for k, v in load_file(run / NEWEST / "model.safetensors").items()} == SAMPLES["weights"]
    assert {k: tuple(v.shape) for k, v in load_file(run / NEWEST / EMA_FILE).items()} == SAMPLES["ema_weights"]
    with safe_open(run / NEWEST / EMA_FILE, "pt") as file:
        assert sorted(file.metadata()) == SAMPLES["ema_metadata"]
    assert len(torch.load(run / NEWEST / "optimizer.pt", weights_only=True)) == SAMPLES["optimizers"]
    assert sorted(torch.load(run / NEWEST / "rng.pt", weights_only=True)) == SAMPLES["rng"]
    return tmp


def copy_run(trained: Path, tmp: Path) -> Path:
    """A copy of the trained run's folders under tmp; returns the run's checkpoint folder, tmp/models/r."""
    for name in ("runs", "models"):
        shutil.copytree(trained / name, tmp / name)
    return tmp / "models" / "r"


def resume(trained: Path, tmp: Path, path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    """train.main(--resume path) with the run's FREE flags given, as they may be (so that a config.json without one
    resumes the same run), and its records under tmp; (status, stdout, stderr), never a traceback."""
    values = run_values(tmp, trained / "text.txt", RUN)
    free = {name: value for name, value in values.items() if FIELDS[name].metadata["on_resume"] == FREE}
    status = train.main(["--resume", str(path), *argv_of(free), *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, out + err
    return status, out, err


def assert_one_error_line(status: int, out: str, err: str, names: Path) -> None:
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (status, out[-2000:], err)
    assert str(names) in lines[0], lines[0]


def assert_one_line(error: UserError) -> None:
    assert "\n" not in str(error) and "damaged or incomplete" in str(error), str(error)


@pytest.mark.parametrize("file, case, damage", CASES, ids=[f"{f}:{c}" for f, c, _ in CASES])
def test_damaged_file_is_refused_in_one_line(trained, tmp_path, capsys, file, case, damage):
    run = copy_run(trained, tmp_path)
    folder = run / NEWEST
    damage(folder)
    capsys.readouterr()
    weights = None if file == EMA_FILE else "raw"  # (see the module docstring)

    # sampling: the step folder itself, then the run folder (which passes over a damaged newest checkpoint)
    if sampled(file, case):
        with pytest.raises(UserError) as info:
            load_checkpoint(folder, weights=weights)
        assert_one_line(info.value)
        assert str(folder) in str(info.value)
    else:
        assert load_checkpoint(folder, weights=weights)[2]["step"] == 4
    looked_at = not (file in ("model.safetensors", EMA_FILE) and case.endswith("-nan"))  # (NaN: found when loaded)
    if sampled(file, case) and looked_at:
        assert load_checkpoint(run, weights=weights)[2]["step"] == 2
        notice = capsys.readouterr().out.splitlines()
        named = "model.safetensors" if case == "another_width" else file  # (the weights don't fit that config)
        assert len(notice) == 1 and notice[0].startswith(
            f"notice: checkpoint {folder} is damaged or incomplete ({named}: "
        )
        assert notice[0].endswith(f"; using {EARLIER}, the newest usable checkpoint of {run}"), notice[0]
    elif sampled(file, case):
        with pytest.raises(UserError) as info:
            load_checkpoint(run, weights=weights)
        assert_one_line(info.value)
    else:
        assert load_checkpoint(run, weights=weights)[2]["step"] == 4
        assert capsys.readouterr().out == ""

    # resuming from the damaged step folder: one line, or (ACCEPTED) a normal resume
    status, out, err = resume(trained, tmp_path, folder, capsys)
    if (file, case) in ACCEPTED:
        assert status == 0 and err == "", err
        notices = [line for line in out.splitlines() if line.startswith("notice: resuming with")]
        assert ACCEPTED[file, case] in (notices or [""])[0], out[-2000:]
    else:
        assert_one_error_line(status, out, err, folder)


# ----------------------------------------------------------------------------------------------------------------
# Resuming a run folder whose newest checkpoint is damaged: a notice, then on from the newest usable one


FALLBACK_CASES = [
    (file, case, damage)
    for file, case, damage in CASES
    if case in ("truncated_to_0", "truncated_to_half", "whole_file_null", "whole_file_empty_dict")
    or case in ("num_blocks-missing", "step-negative", "vocab_size-other_type", "chars-missing", "a_char_fewer")
    or case in ("token_emb.weight-missing", "lm_head.weight-reshaped", "python-halved", "0-state_list")
    or case in ("updates-missing", "updates-above_step")
]


@pytest.mark.parametrize("file, case, damage", FALLBACK_CASES, ids=[f"{f}:{c}" for f, c, _ in FALLBACK_CASES])
def test_resuming_a_run_folder_passes_over_a_damaged_newest_checkpoint(trained, tmp_path, capsys, file, case, damage):
    run = copy_run(trained, tmp_path)
    damage(run / NEWEST)
    status, out, err = resume(trained, tmp_path, run, capsys)
    assert status == 0 and err == "", (out[-3000:], err)
    notices = [line for line in out.splitlines() if line.startswith("notice: checkpoint")]
    assert len(notices) == 1, out  # once, though main reads the config and setup the rest
    assert notices[0].startswith(f"notice: checkpoint {run / NEWEST} is damaged or incomplete ({file}: ")
    assert f"{run / EARLIER} at step 2" in out  # the banner's resume line
    assert json.loads((run / NEWEST / "state.json").read_text())["step"] == 4  # written again, whole
    assert load_checkpoint(run)[2]["step"] == 4 and capsys.readouterr().out == ""


def test_a_run_folder_with_no_usable_checkpoint_is_one_line(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    for step in (EARLIER, NEWEST):
        (run / step / "state.json").write_text("[]")
    status, out, err = resume(trained, tmp_path, run, capsys)
    assert_one_error_line(status, out, err, run / NEWEST)
    assert f"no earlier step_* folder of {run} is usable either" in err
    with pytest.raises(UserError, match="no earlier step_\\* folder"):
        load_checkpoint(run)


def test_the_fallback_looks_no_further_than_latest(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run / EARLIER / "config.json").write_text("{}")
    (run / LATEST).write_text(EARLIER + "\n")  # as if a save of step 4 had been cut short before `latest` moved
    with pytest.raises(UserError, match=f"checkpoint {run / EARLIER} is damaged .* {run} holds no other checkpoint"):
        load_checkpoint(run)
    (run / LATEST).write_text("step_000009\n")  # a vanished folder: the newest of those there
    (run / NEWEST / "config.json").write_text("{}")
    (run / EARLIER / "config.json").write_text((trained / "models" / "r" / EARLIER / "config.json").read_text())
    assert load_checkpoint(run)[2]["step"] == 2
    assert "(config.json: lacks num_blocks, num_heads, embedding_dim, context_len and " in capsys.readouterr().out


@pytest.mark.parametrize("name", ["rng.pt", EMA_FILE])
def test_a_checkpoint_without_training_state_is_passed_over_only_to_resume(trained, tmp_path, capsys, name):
    run = copy_run(trained, tmp_path)
    (run / NEWEST / name).unlink()
    assert load_checkpoint(run)[2]["step"] == 4  # sampling needs no rng.pt, and takes the raw weights without an EMA
    assert capsys.readouterr().out == ""
    status, out, err = resume(trained, tmp_path, run, capsys)
    assert status == 0 and f"(no {name}: it can be sampled from, not resumed)" in out, (out[-2000:], err)


def test_keys_this_version_does_not_know_are_ignored(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    for name in ("config.json", "state.json", "tokenizer.json"):
        rewrite_json(name, lambda payload: {**payload, "added_by_a_newer_version": [1, {"x": None}]})(run / NEWEST)
    assert load_checkpoint(run / NEWEST)[2]["step"] == 4
    status, out, err = resume(trained, tmp_path, run / NEWEST, capsys)
    assert status == 0 and err == "" and "notice: checkpoint" not in out, (out[-2000:], err)
