"""export.py: GPT-2 weights in (--init_from) and transformers folders out, checked against transformers itself.

All offline: a small random GPT2LMHeadModel saved by transformers stands in for GPT-2, checkpoints are tiny GPTs
saved through checkpoint.py, and the tokenizer files come from the shared tiktoken copies (conftest)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import argv_of, randomize, run_values, synthetic_text, write_text

import export
import train
from checkpoint import load_checkpoint, save_checkpoint
from config import GPT2_ARCHITECTURE, Config, UserError, parse_args
from model import GPT, generate
from tokenizer import CharTokenizer, build_tokenizer

CHARS = "\n !',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
TINY_GPT2 = dict(n_layer=2, n_head=4, n_embd=32, n_positions=64)
SHAPE = dict(num_blocks=2, num_heads=4, embedding_dim=32, context_len=64)


@pytest.fixture(scope="module")
def transformers(tmp_path_factory):
    """transformers, offline, with its copies of custom model code in a temporary folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """(tiny models run faster on one thread)"""


@torch.no_grad()
def random_gpt2(transformers, seed: int = 0, **config):
    """A GPT2LMHeadModel with random weights large enough that its logits are of order one."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2, **config)).eval()
    for name, p in model.named_parameters():
        p.copy_(
            1.0 + 0.1 * torch.randn_like(p)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            else 0.3 * torch.randn_like(p)
        )
    return model


@pytest.fixture(scope="module")
def gpt2_folder(transformers, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    random_gpt2(transformers).save_pretrained(folder)
    return folder


def our_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)[..., : model.vocab_size]


# ----------------------------------------------------------------------------------------------------------------
# In: --init_from


@pytest.mark.parametrize("tied", [True, False])
def test_init_from_a_folder_gives_transformers_logits(transformers, tmp_path, tied):
    hf = random_gpt2(transformers, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path)
    cfg = parse_args(["--init_from", str(tmp_path)])
    assert (cfg.num_blocks, cfg.num_heads, cfg.embedding_dim, cfg.context_len) == (2, 4, 32, 64)
    assert {name: getattr(cfg, name) for name in GPT2_ARCHITECTURE} == {**GPT2_ARCHITECTURE, "tie_embeddings": tied}
    model = GPT(cfg, 50257)
    export.load_pretrained(model, cfg.init_from)
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
    assert expected.abs().max() > 1  # (the comparison means something)
    torch.testing.assert_close(our_logits(model, ids), expected, atol=1e-5, rtol=0)


def test_init_from_with_a_shorter_context_uses_the_first_positions(transformers, gpt2_folder):
    cfg = parse_args(["--init_from", str(gpt2_folder), "--context_len", "16"])
    model = GPT(cfg, 50257)
    export.load_pretrained(model, cfg.init_from)
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(our_logits(model, ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_named_gpt2_comes_from_the_hugging_face_cache(monkeypatch, tmp_path, transformers):
    """Offline, a cached snapshot is used as it is (the layout huggingface_hub writes: refs/main -> snapshots/<sha>)."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--gpt2" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    write_text(snapshot / "config.json", "{}")
    (tmp_path / "models--gpt2" / "refs").mkdir()
    write_text(tmp_path / "models--gpt2" / "refs" / "main", "0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert export.pretrained_folder("gpt2") == snapshot


def _error(call, *args) -> str:
    with pytest.raises(UserError) as info:
        call(*args)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_bad_init_from_is_one_line(monkeypatch, tmp_path, gpt2_folder, transformers, capsys):
    import huggingface_hub.constants

    assert "neither a GPT-2 name" in _error(parse_args, ["--init_from", "gpt3"])
    assert train.main(["--init_from", "gpt3"]) == 2  # (train.py: the same line, exit status 2)
    assert capsys.readouterr().err.startswith("error: --init_from 'gpt3' is neither")
    assert "no config.json" in _error(parse_args, ["--init_from", str(tmp_path)])
    write_text(tmp_path / "config.json", json.dumps({"model_type": "llama", "hidden_size": 32}))
    assert "not a GPT-2 folder" in _error(parse_args, ["--init_from", str(tmp_path)])
    hf_config = json.loads((gpt2_folder / "config.json").read_text())
    write_text(tmp_path / "config.json", json.dumps({**hf_config, "vocab_size": 1000}))
    assert "vocab_size 1000" in _error(parse_args, ["--init_from", str(tmp_path)])
    write_text(tmp_path / "config.json", json.dumps(hf_config))
    assert "holds no weights" in _error(
        export.load_pretrained, GPT(parse_args(["--init_from", str(tmp_path)]), 50257), str(tmp_path)
    )
    # flags that contradict the checkpoint: given explicitly, or a config made without parse_args
    folder = str(gpt2_folder)
    assert "leave out --num_blocks 3" in _error(parse_args, ["--init_from", folder, "--num_blocks", "3"])
    assert "leave out --norm rmsnorm" in _error(parse_args, ["--init_from", folder, "--norm", "rmsnorm"])
    assert "64 positions" in _error(parse_args, ["--init_from", folder, "--context_len", "128"])
    unset = GPT(Config(init_from=folder, **SHAPE), 50257)  # (our default architecture)
    assert "--norm layernorm (this run: rmsnorm)" in _error(export.load_pretrained, unset, folder)
    # weights that do not fit the config.json beside them
    write_text(tmp_path / "config.json", json.dumps({**hf_config, "n_layer": 3}))
    (tmp_path / "model.safetensors").symlink_to(gpt2_folder / "model.safetensors")
    assert "lacks h.2" in _error(
        export.load_pretrained, GPT(parse_args(["--init_from", str(tmp_path)]), 50257), str(tmp_path)
    )
    # a GPT-2 name: offline with nothing cached, and without huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "offline?" in _error(export.pretrained_folder, "gpt2")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert "uv sync --extra hf" in _error(export.pretrained_folder, "gpt2")


def test_a_short_run_from_a_gpt2_folder(transformers, tmp_path, gpt2_folder):
    """train.py --init_from DIR trains from those weights (a tiny learning rate keeps them), saves, and resumes
    without the folder (a resumed run has its weights)."""
    data = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    values = run_values(tmp_path, data, init_from=str(gpt2_folder), max_steps=2, use_muon=False, lr=1e-9)
    values |= dict(save_model=True, context_len=32, tokenizer="gpt2")
    assert train.main(argv_of(values)) == 0
    model, tokenizer, _ = load_checkpoint(tmp_path / "models" / "r")
    assert model.cfg.init_from == str(gpt2_folder) and tokenizer == {"name": "gpt2"}
    ids = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(2))
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(our_logits(model, ids), hf(ids).logits, atol=1e-4, rtol=0)
    moved = gpt2_folder.rename(tmp_path / "moved")
    try:
        assert train.main(["--resume", str(tmp_path / "models" / "r"), "--max_steps", "3"]) == 0
    finally:
        moved.rename(gpt2_folder)


# ----------------------------------------------------------------------------------------------------------------
# Out: export.py


def saved_checkpoint(folder: Path, tokenizer: str, **flags) -> tuple[GPT, Path]:
    """A tiny random GPT saved through checkpoint.py's own save path; returns it and its run folder."""
    tok = CharTokenizer(CHARS) if tokenizer == "char" else build_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = randomize(GPT(Config(**SHAPE, tokenizer=tokenizer, **flags), tok.vocab_size)).eval()
    save_checkpoint(folder / "models" / "r", 5, model, tok.to_dict())
    return model, folder / "models" / "r"


GPT2_STYLE = {k: v for k, v in GPT2_ARCHITECTURE.items() if k != "tokenizer"}
OTHERS = dict(pos_emb="learned", norm="layernorm", bias=True, tie_embeddings=True, activation="gelu", logit_softcap=5.0)


@pytest.mark.parametrize(
    "tokenizer, flags, custom",
    [
        ("gpt2", GPT2_STYLE, False),
        ("char", GPT2_STYLE, False),
        ("char", {**GPT2_STYLE, "tie_embeddings": False}, False),
        ("gpt2", {}, True),  # our default architecture: rotary, RMSNorm, QK-norm, ReLU², sink
        ("char", {}, True),
        ("char", {**OTHERS, "qk_norm": False, "attn_sink": False}, True),
        ("o200k_base", {"attn_sink": False}, True),
        ("char", {**GPT2_STYLE, "mtp_weight": 0.5}, False),  # the training-only second head is left out
        ("char", {"mtp_weight": 0.5}, True),
    ],
    ids=["gpt2-gpt2", "gpt2-char", "gpt2-untied-char", "pair-gpt2", "pair-char", "pair-others-char", "pair-o200k"]
    + ["gpt2-mtp-char", "pair-mtp-char"],
)
def test_export_loads_in_transformers_with_the_same_logits_generation_and_tokens(
    transformers, tmp_path, capsys, tokenizer, flags, custom
):
    model, run = saved_checkpoint(tmp_path, tokenizer, **flags)
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert ("trust_remote_code=True" in capsys.readouterr().out) is custom
    assert (out / "modeling_pair.py").is_file() is custom
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=custom).eval()
    assert type(hf).__name__ == ("PairForCausalLM" if custom else "GPT2LMHeadModel")

    ids = torch.randint(0, model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert theirs.shape == (2, 64, model.vocab_size)
    torch.testing.assert_close(theirs, our_logits(model, ids), atol=1e-5, rtol=0)
    with torch.no_grad():  # (transformers' labels are the inputs: it shifts them)
        torch.testing.assert_close(hf(ids, labels=ids).loss, model(ids[:, :-1], ids[:, 1:]), atol=1e-5, rtol=0)

    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=custom)
    ours = CharTokenizer(CHARS) if tokenizer == "char" else build_tokenizer(tokenizer)
    prompt = ours.encode(TEXT[:10])  # (and 50 new tokens fit in the context of 64)
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
    assert tok.decode(ours.encode(TEXT)) == TEXT
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False)[0, len(prompt) :]
    assert generated.tolist() == list(generate(model, prompt, 50, temperature=0))
    assert hf.generation_config.temperature == 0.8 and hf.generation_config.top_k == 200


def test_custom_model_generates_with_left_padding_as_without(transformers, tmp_path):
    """Batched prompts of different lengths: the padding is masked and does not shift positions."""
    model, run = saved_checkpoint(tmp_path, "char", attn_sink=True)
    export.export(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    ids = torch.tensor([[0, 0, 0, *short], long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    both = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 6:]
    assert both[0].tolist() == list(generate(model, short, 20, temperature=0))
    assert both[1].tolist() == list(generate(model, long, 20, temperature=0))


def test_bad_export_is_one_line_and_exit_2(tmp_path, capsys):
    _, run = saved_checkpoint(tmp_path, "char")
    taken = tmp_path / "taken"
    taken.mkdir()
    write_text(taken / "x", "")
    misfit = tmp_path / "models" / "misfit"  # weights that do not fit the shape its config.json gives
    shutil.copytree(run / "step_000005", misfit)
    write_text(
        misfit / "config.json", json.dumps({**json.loads((misfit / "config.json").read_text()), "num_blocks": 3})
    )
    for argv, needle in [
        (["--checkpoint", str(run), "--out", str(taken)], "exists and is not empty"),
        (["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "new")], "is not a checkpoint"),
        (["--checkpoint", str(misfit), "--out", str(tmp_path / "new")], "missing (e.g. blocks.2."),
        (["--checkpoint", str(run)], "--out"),
    ]:
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "taken"]  # nothing half-written
    (tmp_path / "empty").mkdir()
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "empty")]) == 0  # an empty folder is fine


@pytest.mark.parametrize("flag", ["smear", "bigram_embedding", "value_embeddings"])
def test_an_added_technique_is_refused_not_exported_wrong(tmp_path, capsys, flag):
    """hf/ has no smear, bigram or value tables yet: exporting without them would silently be another model."""
    _, run = saved_checkpoint(tmp_path, "char", **{flag: True})
    assert export.main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"--{flag}" in err and "cannot write yet" in err
    assert not (tmp_path / "hf").exists()
