"""checkpoint.py: atomic save, load to identical logits, the `latest` pointer, wrappers, damaged files; every file
read is checked against what its writer writes, and a run folder passes over a damaged newest checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_tensors, randomize, tiny_config
from safetensors.torch import load_file, save_file

from checkpoint import (
    EMA_FILE,
    LATEST,
    check_rng_state,
    load_checkpoint,
    load_optimizer_state,
    load_rng_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    unusable,
    unwrap,
)
from config import FIELDS, UserError
from model import GPT
from optimizer import EMA, build_optimizers
from tokenizer import TIKTOKEN_VOCAB_SIZES, CharTokenizer, build_tokenizer, check_tokenizer_dict, tokenizer_from_dict

VOCAB = 65
TOKENIZER = CharTokenizer.from_text("".join(chr(33 + i) for i in range(VOCAB))).to_dict()


def _model(**overrides):
    return randomize(GPT(tiny_config(**overrides), VOCAB), seed=4).eval()


def _logits(model, seed=0):
    idx = torch.randint(VOCAB, (2, model.cfg.context_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(idx)


def _trained_optimizers(model):
    optimizers = build_optimizers(model, model.cfg)
    model.train()
    idx = torch.randint(VOCAB, (2, model.cfg.context_len), generator=torch.Generator().manual_seed(1))
    model(idx)[..., :VOCAB].logsumexp(-1).mean().backward()
    for optimizer in optimizers:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return optimizers


@pytest.mark.parametrize("overrides", [{}, {"pos_emb": "learned", "attn_sink": False, "activation": "gelu"}])
def test_save_then_load_gives_identical_logits(tmp_path, overrides):
    model = _model(**overrides)
    folder = save_checkpoint(tmp_path / "run", 7, model, TOKENIZER, state={"run": "run"})
    assert folder == tmp_path / "run" / "step_000007"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json", "state.json"}
    loaded, tokenizer_dict, state = load_checkpoint(folder)
    assert loaded.cfg == model.cfg and loaded.vocab_size == VOCAB
    assert tokenizer_dict == TOKENIZER
    assert state == {"step": 7, "vocab_size": VOCAB, "run": "run"}
    assert torch.equal(_logits(loaded), _logits(model))
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_latest_points_to_the_newest(tmp_path):
    run = tmp_path / "run"
    model = _model()
    save_checkpoint(run, 10, model, TOKENIZER)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    newest = save_checkpoint(run, 20, model, TOKENIZER)
    assert (run / LATEST).read_text().strip() == "step_000020"
    assert resolve_checkpoint(run) == newest
    assert torch.equal(_logits(load_checkpoint(run)[0]), _logits(model))
    assert not torch.equal(_logits(load_checkpoint(run / "step_000010")[0]), _logits(model))
    assert sorted(p.name for p in run.iterdir()) == [LATEST, "step_000010", "step_000020"]  # no temp files left


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 5, model, TOKENIZER)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    save_checkpoint(tmp_path, 5, model, TOKENIZER)
    assert torch.equal(_logits(load_checkpoint(tmp_path)[0]), _logits(model))


def test_resolve_checkpoint_accepts_run_or_step_folder(tmp_path):
    folder = save_checkpoint(tmp_path / "run", 3, _model(), TOKENIZER)
    assert resolve_checkpoint(tmp_path / "run") == folder
    assert resolve_checkpoint(folder) == folder
    assert resolve_checkpoint(str(folder)) == folder
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path / "missing")


class _Wrapper(torch.nn.Module):
    """What torch.compile returns: the real model under `_orig_mod`, so state_dict keys gain a prefix."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


class _DataParallelLike(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.module = model


def test_unwrap():
    model = _model()
    assert unwrap(model) is model
    assert unwrap(_Wrapper(model)) is model
    assert unwrap(_DataParallelLike(_Wrapper(model))) is model
    assert unwrap(torch.compile(model)) is model  # not called, so nothing is compiled


def test_wrapped_model_saves_plain_keys(tmp_path):
    model = _model()
    wrapped = _Wrapper(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    folder = save_checkpoint(tmp_path, 1, wrapped, TOKENIZER)
    keys = set(load_file(folder / "model.safetensors"))
    assert keys == set(model.state_dict())
    assert not any("_orig_mod" in k for k in keys)
    assert torch.equal(_logits(load_checkpoint(folder)[0]), _logits(model))


def test_compiled_wrapper_saves_plain_keys(tmp_path):
    model = _model()
    folder = save_checkpoint(tmp_path, 1, torch.compile(model), TOKENIZER)
    assert set(load_file(folder / "model.safetensors")) == set(model.state_dict())


@pytest.mark.parametrize("keep", [0.5, 0.1, 8 / 10**9])
def test_truncated_weights_raise_user_error(tmp_path, keep):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    weights = folder / "model.safetensors"
    payload = weights.read_bytes()
    weights.write_bytes(payload[: max(4, int(len(payload) * keep))])
    with pytest.raises(UserError) as info:
        load_checkpoint(folder)
    assert "damaged" in str(info.value) and "\n" not in str(info.value)


def test_missing_or_broken_json_raises_user_error(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    (folder / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(folder)
    (folder / "state.json").write_text(json.dumps({"step": 1}))  # no vocab_size
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(folder)


def test_weights_of_another_shape_raise_user_error(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embedding_dim": 64}))
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(folder)


def test_optimizer_state_loads_with_weights_only(tmp_path):
    model = _model()
    optimizers = _trained_optimizers(model)
    folder = save_checkpoint(tmp_path, 1, model, TOKENIZER, optimizers)
    states = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(states) == 2
    muon_state, adamw_state = states
    assert all("momentum_buffer" in s for s in muon_state["state"].values())
    assert all("exp_avg" in s and "exp_avg_sq" in s for s in adamw_state["state"].values())

    fresh = build_optimizers(model, model.cfg)
    load_optimizer_state(folder, fresh)
    original, restored = [o.state_dict() for o in optimizers], [o.state_dict() for o in fresh]
    assert [s["param_groups"] for s in original] == [s["param_groups"] for s in restored]
    assert_same_optimizer_state(original, restored)


# ----------------------------------------------------------------------------------------------------------------
# Everything read is checked first (tests/test_damaged.py damages a trained run's checkpoint every generated way)


def _edit_json(folder, name, change):
    path = folder / name
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    "name, change, needle",
    [
        ("config.json", lambda c: {}, "config.json: lacks num_blocks, num_heads, embedding_dim, context_len and "),
        ("config.json", lambda c: None, "config.json: expected an object of flags, got null"),
        ("config.json", lambda c: [], "config.json: expected an object of flags, got a list"),
        ("config.json", lambda c: {k: v for k, v in c.items() if k != "seed"}, "config.json: lacks seed"),
        ("config.json", lambda c: {**c, "num_blocks": True}, "config.json: num_blocks must be an integer, got True"),
        ("config.json", lambda c: {**c, "qk_norm": 1}, "config.json: qk_norm must be true or false, got 1"),
        ("config.json", lambda c: {**c, "lr": "0.1"}, 'config.json: lr must be a number, got "0.1"'),
        ("config.json", lambda c: {**c, "max_steps": []}, "config.json: max_steps must be an integer or null, got []"),
        ("config.json", lambda c: {**c, "num_heads": 0}, "config.json: --num_heads must be a positive integer, got 0"),
        ("config.json", lambda c: {**c, "tokenizer": "gpt2"}, "a char tokenizer, but config.json has gpt2"),
        ("state.json", lambda s: {**s, "step": "x"}, 'state.json: step must be an integer >= 0, got "x"'),
        ("state.json", lambda s: {**s, "step": -1}, "state.json: step must be an integer >= 0, got -1"),
        ("state.json", lambda s: {**s, "step": 2}, "state.json: step 2 in the folder of step 1"),
        ("state.json", lambda s: {**s, "vocab_size": 0}, "state.json: vocab_size must be an integer >= 1, got 0"),
        ("state.json", lambda s: {"vocab_size": VOCAB}, "state.json: lacks step"),
        ("tokenizer.json", lambda t: {"name": "char", "chars": 5}, "chars must be a non-empty string, got 5"),
        ("tokenizer.json", lambda t: {"name": "nope"}, "tokenizer.json: name 'nope' is not one of: char, gpt2, o200k"),
        ("tokenizer.json", lambda t: {**t, "chars": t["chars"][1:]}, "has 64 ids, but the model was saved with vocab"),
        ("tokenizer.json", lambda t: {**t, "chars": t["chars"][1] + t["chars"][1:]}, "chars repeat a character"),
    ],
)
def test_json_files_of_another_shape_are_one_line(tmp_path, name, change, needle):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    _edit_json(folder, name, change)
    with pytest.raises(UserError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert message.startswith(f"checkpoint {folder} is damaged or incomplete (") and "use an earlier" in message


def test_flags_that_do_not_shape_the_model_may_be_missing(tmp_path):
    """A config.json from before a NOTICE or FREE flag existed: the flag takes its default (resuming says so)."""
    model = _model(dropout=0.1)
    folder = save_checkpoint(tmp_path, 1, model, TOKENIZER)
    _edit_json(folder, "config.json", lambda c: {k: v for k, v in c.items() if k not in ("dropout", "max_steps")})
    loaded, _, _ = load_checkpoint(folder)
    assert loaded.cfg.dropout == 0.0 and loaded.cfg.max_steps == 1000 and torch.equal(_logits(loaded), _logits(model))


def test_keys_this_version_does_not_know_are_ignored(tmp_path):
    model = _model()
    folder = save_checkpoint(tmp_path, 1, model, TOKENIZER)
    for name in ("config.json", "state.json", "tokenizer.json"):
        _edit_json(folder, name, lambda payload: {**payload, "from_a_newer_version": {"x": [1]}})
    loaded, _, _ = load_checkpoint(folder)
    assert loaded.cfg == model.cfg and torch.equal(_logits(loaded), _logits(model))


def test_tokenizer_dicts_are_checked_and_the_tiktoken_sizes_are_the_real_ones():
    with pytest.raises(UserError, match="name 'nope' is not one of"):
        tokenizer_from_dict({"name": "nope"})
    with pytest.raises(UserError, match="expected an object"):
        tokenizer_from_dict(None)
    assert set(TIKTOKEN_VOCAB_SIZES) | {"char"} == set(FIELDS["tokenizer"].metadata["choices"])
    for name, size in TIKTOKEN_VOCAB_SIZES.items():
        assert build_tokenizer(name).vocab_size == size
        check_tokenizer_dict({"name": name}, size)


def test_weights_holding_nan_are_refused(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(UserError, match=r"\(model.safetensors: lm_head.weight holds NaN or infinite values\)"):
        load_checkpoint(folder)


def test_rng_state_is_checked():
    state = rng_state(torch.device("cpu"))
    check_rng_state(state)
    check_rng_state({**state, "ranks": [state]}, world_size=2)
    with pytest.raises(ValueError, match="the generators of 2 ranks, but state.json says world_size 3"):
        check_rng_state({**state, "ranks": [state]}, world_size=3)
    with pytest.raises(ValueError, match="no python, numpy, torch generator state"):
        check_rng_state({})
    with pytest.raises(ValueError, match="rank 1: the numpy generator state is invalid"):
        check_rng_state({**state, "ranks": [{**state, "numpy": state["numpy"][:2]}]})
    with pytest.raises(ValueError, match="the torch generator state is invalid"):
        check_rng_state({**state, "torch": state["torch"].float()})


def test_an_empty_rng_file_is_refused(tmp_path):
    folder = tmp_path / "step_000001"
    folder.mkdir()
    torch.save({}, folder / "rng.pt")  # once accepted: the resumed run silently drew other numbers
    with pytest.raises(UserError) as info:
        load_rng_state(folder)
    assert "(rng.pt: no python, numpy, torch generator state)" in str(info.value)


def test_optimizer_state_of_other_optimizers_is_one_line(tmp_path):
    model = _model()
    folder = save_checkpoint(tmp_path, 1, model, TOKENIZER, _trained_optimizers(model))
    adamw_only = _model(use_muon=False)
    with pytest.raises(UserError, match=r"\(optimizer.pt: 2 optimizer states for this run's 1 optimizers\)"):
        load_optimizer_state(folder, build_optimizers(adamw_only, adamw_only.cfg))
    wider = _model(embedding_dim=64)
    with pytest.raises(UserError, match=r"\(optimizer.pt: Muon: momentum_buffer of parameter 0 is \[96, 32\], not"):
        load_optimizer_state(folder, build_optimizers(wider, wider.cfg))
    states = torch.load(folder / "optimizer.pt", weights_only=True)
    states[1]["param_groups"][0]["params"].pop()
    torch.save(states, folder / "optimizer.pt")
    with pytest.raises(UserError, match=r"\(optimizer.pt: AdamW: parameter groups of \[\d+, \d+\] parameters, this"):
        load_optimizer_state(folder, build_optimizers(model, model.cfg))


def test_a_run_folder_passes_over_a_damaged_newest_checkpoint(tmp_path, capsys):
    model = _model()
    run = tmp_path / "run"
    older = save_checkpoint(run, 1, model, TOKENIZER)
    newest = save_checkpoint(run, 2, model, TOKENIZER)
    (newest / "state.json").write_text('{"step": "x"}')
    assert resolve_checkpoint(run) == newest  # asked for no check: the newest, as `latest` says
    assert resolve_checkpoint(run, "sample", notice=False) == older and capsys.readouterr().out == ""
    assert load_checkpoint(run)[2]["step"] == 1
    assert capsys.readouterr().out == (
        f"notice: checkpoint {newest} is damaged or incomplete (state.json: step must be an integer >= 0, got "
        f'"x"); using {older.name}, the newest usable checkpoint of {run}\n'
    )
    with pytest.raises(UserError, match="is damaged or incomplete"):
        load_checkpoint(newest)  # a step folder given as such is never swapped for another
    assert unusable(older, "resume") == "no optimizer.pt: it can be sampled from, not resumed"
    with pytest.raises(UserError, match=f"no earlier step_\\* folder of {run} is usable either"):
        resolve_checkpoint(run, "resume")


# ----------------------------------------------------------------------------------------------------------------
# The weight average (--ema_decay): ema.safetensors beside model.safetensors


def _averaged(model: GPT, updates: int = 3) -> EMA:
    """An optimizer.EMA of `model` whose weights differ from it (another random draw), after `updates` updates."""
    ema = EMA(model, 0.9)
    randomize(ema.model, seed=9)
    ema.updates = updates
    return ema


def test_the_average_is_saved_beside_the_weights_and_sampled_by_default(tmp_path):
    model = _model()
    ema = _averaged(model)
    folder = save_checkpoint(tmp_path / "run", 7, model, TOKENIZER, ema=ema.state_dict())
    assert {p.name for p in folder.iterdir()} == {
        "model.safetensors",
        EMA_FILE,
        "config.json",
        "tokenizer.json",
        "state.json",
    }
    assert_same_tensors(load_file(folder / EMA_FILE), ema.model.state_dict())
    for weights, expected in ((None, ema.model), ("ema", ema.model), ("raw", model)):
        assert torch.equal(_logits(load_checkpoint(folder, weights=weights)[0]), _logits(expected)), weights
    assert torch.equal(_logits(load_checkpoint(tmp_path / "run")[0]), _logits(ema.model))  # a run folder too
    assert unusable(folder, "sample") is None


def test_asking_for_an_average_the_checkpoint_lacks_is_one_line(tmp_path):
    folder = save_checkpoint(tmp_path, 1, _model(), TOKENIZER)
    with pytest.raises(
        UserError, match=r"has no averaged weights \(no ema.safetensors: it was trained without"
    ) as info:
        load_checkpoint(folder, weights="ema")
    assert "\n" not in str(info.value) and "--weights raw" in str(info.value)
    with pytest.raises(ValueError, match="weights must be 'ema', 'raw' or None"):
        load_checkpoint(folder, weights="best")


@pytest.mark.parametrize(
    "metadata, needle",
    [
        (None, "got None"),
        ({"updates": "-1"}, "got '-1'"),
        ({"updates": "٣"}, "got '٣'"),  # a digit to str.isdigit, not to a count
        ({"updates": "8"}, "from 0 to the step (7), got '8'"),
    ],
)
def test_the_update_count_is_checked(tmp_path, metadata, needle):
    model = _model()
    folder = save_checkpoint(tmp_path / "run", 7, model, TOKENIZER, ema=_averaged(model).state_dict())
    save_file(load_file(folder / EMA_FILE), folder / EMA_FILE, metadata=metadata)
    fault = unusable(folder, "sample")  # (what makes a run folder pass over it)
    assert fault.startswith("ema.safetensors: its metadata must hold an update count") and needle in fault, fault
    with pytest.raises(UserError, match="damaged or incomplete \\(ema.safetensors: its metadata must hold an update"):
        load_checkpoint(folder)
    assert torch.equal(_logits(load_checkpoint(folder, weights="raw")[0]), _logits(model))  # the step folder: raw


def test_a_checkpoint_saved_with_ema_needs_it_to_resume(tmp_path):
    model = _model(ema_decay=0.9)
    folder = save_checkpoint(
        tmp_path / "run", 1, model, TOKENIZER, _trained_optimizers(model), rng=rng_state(torch.device("cpu"))
    )
    assert unusable(folder, "resume") == "no ema.safetensors: it can be sampled from, not resumed"
    assert unusable(folder, "sample") is None
