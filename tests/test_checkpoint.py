"""checkpoint.py: atomic save, load to identical logits, the `latest` pointer, wrappers, damaged files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_optimizer_state, assert_same_tensors, randomize, tiny_config
from safetensors.torch import load_file

from checkpoint import LATEST, load_checkpoint, load_optimizer_state, resolve_checkpoint, save_checkpoint, unwrap
from config import UserError
from model import GPT
from optimizer import build_optimizers
from tokenizer import CharTokenizer

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
