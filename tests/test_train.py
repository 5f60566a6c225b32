"""train.py end to end: records, checkpoints, time budget, run names, real Tiny Shakespeare, torch.compile."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import argv_of, read_records, run_config, synthetic_text, write_text

import train
import trainer
from checkpoint import LATEST, load_checkpoint
from data import TrainBatches, full_val_batches, load_dataset
from model import generate
from optimizer import lr_multiplier
from tokenizer import tokenizer_from_dict

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "step_ms", "tok_per_s", "elapsed_s"}


# a tiny model that learns the synthetic text within a few dozen steps
TRAINING = dict(embedding_dim=48, context_len=32, batch_size=8, lr=3e-3, muon_lr=0.03, warmup_steps=5, log_every=10)


def cfg_runs(cfg) -> Path:
    return Path(cfg.runs_dir)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """One short run shared by several tests: 60 steps, 2-way accumulation, evals, two checkpoints, samples."""
    tmp_path = tmp_path_factory.mktemp("synthetic")
    data_path = write_text(tmp_path / "text.txt", synthetic_text(30_000))
    cfg = run_config(
        tmp_path,
        data_path,
        TRAINING,
        run="synthetic",
        max_steps=60,
        accumulation_steps=2,
        eval_every=20,
        eval_steps=4,
        save_model=True,
        save_every=30,
        num_samples=2,
        sample_tokens=30,
    )
    summary = train.train(cfg)
    return cfg, summary


def test_run_writes_config_and_metrics(synthetic_run):
    cfg, summary = synthetic_run
    run_dir = cfg_runs(cfg) / "synthetic"
    assert summary["run"] == "synthetic" and summary["run_dir"] == str(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert {k: saved[k] for k in cfg.to_dict()} == cfg.to_dict()
    assert saved["vocab_size"] == len(set(synthetic_text(30_000)))
    assert saved["params"]["total"] > 0 and saved["device"] == "cpu" and saved["train_tokens"] > 0

    records = read_records(run_dir)
    steps, final = records[:-1], records[-1]
    assert [r["step"] for r in steps] == [10, 20, 30, 40, 50, 60]
    # the logged loss is the mean over the interval's micro-batches: it starts near log(vocab), not 2x that
    assert 0.5 * math.log(saved["vocab_size"]) < steps[0]["loss"] < math.log(saved["vocab_size"]) + 0.05
    for record in steps:
        assert set(record) >= STEP_KEYS, record
        assert all(math.isfinite(record[k]) for k in STEP_KEYS)
        assert record["step_ms"] > 0 and record["tok_per_s"] > 0 and record["grad_norm"] > 0
        assert ("val_loss" in record) == (record["step"] in (20, 40)), record  # eval steps, not the last one
    assert [r["elapsed_s"] for r in steps] == sorted(r["elapsed_s"] for r in steps)
    for record in steps:  # the lr of the record's own optimizer step (the schedule counts steps from 0)
        assert record["lr"] == pytest.approx(cfg.lr * lr_multiplier(record["step"] - 1, 60, cfg))
        assert record["muon_lr"] == pytest.approx(cfg.muon_lr * lr_multiplier(record["step"] - 1, 60, cfg))
    assert steps[-1]["lr"] < steps[0]["lr"]
    assert final["final"] is True and final["step"] == 60
    assert final["val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-5)
    assert summary["steps"] == 60 and summary["stopped_early"] is False
    # bits per byte by hand: char on ASCII text is one byte per token, so it is the loss in nats / ln 2
    val_ids = load_dataset(cfg).val
    text = Path(cfg.data_path).read_text(encoding="utf-8")
    val_text = text[int(len(text) * (1 - cfg.val_frac)) :]
    assert len(val_text.encode("utf-8")) == len(val_text) == len(val_ids)
    assert final["val_targets"] == len(val_ids) - 1  # the whole split: every target once
    assert summary["final_val_bpb"] == pytest.approx(summary["final_val_loss"] / math.log(2), rel=1e-12)
    assert final["val_bpb"] == round(summary["final_val_bpb"], 5)


def test_loss_decreases(synthetic_run):
    cfg, summary = synthetic_run
    records = read_records(cfg_runs(cfg) / "synthetic")
    losses = [r["loss"] for r in records if "loss" in r]
    vocab = json.loads((cfg_runs(cfg) / "synthetic" / "config.json").read_text())["vocab_size"]
    assert losses[-1] < 0.6 * losses[0]
    assert summary["final_val_loss"] < 0.6 * math.log(vocab)
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0]
    assert summary["best_val_loss"] == pytest.approx(min(*vals, summary["final_val_loss"]), abs=1e-5)


def test_checkpoint_reloads_to_the_trained_model(synthetic_run):
    cfg, summary = synthetic_run
    save_dir = cfg_runs(cfg).parent / "models" / "synthetic"
    assert summary["checkpoint"] == str(save_dir / "step_000060")
    assert (save_dir / LATEST).read_text().strip() == "step_000060"
    assert (save_dir / "step_000030" / "model.safetensors").exists()

    model, tokenizer_dict, state = load_checkpoint(save_dir)
    assert state["step"] == 60 and state["run"] == "synthetic"
    assert model.cfg == cfg
    # the final evaluation, redone with the reloaded weights, gives the same number
    val_ids = load_dataset(cfg).val
    val = trainer.evaluate(
        model, full_val_batches(val_ids, cfg.batch_size, cfg.context_len), contextlib.nullcontext, torch.device("cpu")
    )
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-6)
    # and the end-of-training samples come out again, token for token
    tokenizer = tokenizer_from_dict(tokenizer_dict)
    generator = torch.Generator().manual_seed(cfg.seed)
    for sample in summary["samples"]:
        ids = list(generate(model, [tokenizer.start_id], cfg.sample_tokens, 0.8, 200, None, True, generator))
        assert tokenizer.decode(ids) == sample
    # two reloads give identical logits; the mid-run checkpoint is a different model
    idx = torch.randint(model.vocab_size, (2, cfg.context_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), load_checkpoint(save_dir / "step_000060")[0](idx))
        assert not torch.equal(model(idx), load_checkpoint(save_dir / "step_000030")[0](idx))


def test_state_json_is_the_loop_state_and_loads_back(synthetic_run):
    """state.json is LoopState.state_dict() (plus the model's vocab_size), and load_state_dict reads it back whole."""
    cfg, _ = synthetic_run
    folder = cfg_runs(cfg).parent / "models" / "synthetic" / "step_000030"
    saved = json.loads((folder / "state.json").read_text())
    train_ids = load_dataset(cfg).train
    batches = TrainBatches(train_ids, cfg.batch_size, cfg.context_len, cfg.seed, torch.device("cpu"))
    state = trainer.LoopState(batches=batches)
    assert set(saved) == set(state.state_dict()) | {"vocab_size"}
    state.load_state_dict(saved, folder)
    assert state.step == 30 and state.resumed_from == folder
    assert state.state_dict() == {k: v for k, v in saved.items() if k != "vocab_size"} | {"data": {}, "world_size": 1}
    del saved["loss_sum"]
    with pytest.raises(trainer.UserError, match="lacks the training state to resume \\(loss_sum in state.json\\)"):
        trainer.LoopState(batches=batches).load_state_dict(saved, folder)


def test_time_budget_stops_early(tmp_path):
    data_path = write_text(tmp_path / "text.txt", synthetic_text(20_000))
    cfg = run_config(tmp_path, data_path, TRAINING, run="budget", max_steps=100_000, time_budget_s=1.0, log_every=1000)
    summary = train.train(cfg)
    assert summary["stopped_early"] is True
    assert 1 <= summary["steps"] < 100_000
    assert 1.0 <= summary["train_seconds"] < 10.0
    final = read_records(tmp_path / "runs" / "budget")[-1]
    assert final["final"] is True and final["step"] == summary["steps"]


def test_run_names_are_sanitized_and_unique(tmp_path):
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    cfg = run_config(tmp_path, data_path, TRAINING, run="a cool ablation", max_steps=2, save_model=True)
    first = train.train(cfg)
    second = train.train(cfg)
    assert first["run"] == "a-cool-ablation" and second["run"] == "a-cool-ablation-2"
    assert (tmp_path / "runs" / "a-cool-ablation" / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "a-cool-ablation-2" / "metrics.jsonl").exists()
    assert (tmp_path / "models" / "a-cool-ablation-2" / LATEST).exists()
    saved = json.loads((tmp_path / "runs" / "a-cool-ablation-2" / "config.json").read_text())
    assert saved["run"] == "a-cool-ablation-2"


def test_epochs_mode_runs_whole_epochs(tmp_path):
    data_path = write_text(tmp_path / "text.txt", synthetic_text(2_500))
    common = dict(num_blocks=1, embedding_dim=32, context_len=16, batch_size=4, accumulation_steps=2, log_every=1000)
    cfg = run_config(tmp_path, data_path, TRAINING, run="epochs", max_steps=None, epochs=2, **common)
    train_ids = load_dataset(cfg).train
    batches_per_epoch = TrainBatches(train_ids, 4, 16, cfg.seed, torch.device("cpu")).batches_per_epoch
    summary = train.train(cfg)
    assert summary["steps"] == 2 * (batches_per_epoch // 2)
    assert read_records(tmp_path / "runs" / "epochs")[-1]["step"] == summary["steps"]


def test_wandb_disabled_mode_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)  # wandb may write next to the working directory
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    cfg = run_config(tmp_path, data_path, TRAINING, run="wandb", max_steps=2, log_every=1, wandb_enabled=True)
    summary = train.train(cfg)
    assert summary["steps"] == 2
    assert [r["step"] for r in read_records(tmp_path / "runs" / "wandb")] == [1, 2, 2]


def test_main_runs_from_the_command_line(tmp_path, capsys):
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    argv = argv_of(run_config(tmp_path, data_path, run="cli", num_blocks=1, num_heads=2, max_steps=3))
    assert train.main(argv) == 0
    assert "final val loss" in capsys.readouterr().out
    assert read_records(tmp_path / "runs" / "cli")[-1]["final"] is True


def test_gpt2_bits_per_byte_of_a_non_ascii_text_under_a_val_tokens_budget(tmp_path, capsys):
    """The final evaluation covers the first --val_tokens targets, the same every run; bits per byte scales the
    split's bytes per token: loss x split tokens / split bytes / ln 2, from the val text's own UTF-8 bytes."""
    text = "".join(f"Ünïcödé {i} — naïve café, 東京 {i * 7}.\n" for i in range(400))
    data_path = write_text(tmp_path / "text.txt", text)
    tiny = dict(num_blocks=1, num_heads=2, embedding_dim=32, context_len=16, batch_size=4, max_steps=2)
    cfg = run_config(tmp_path, data_path, TRAINING, tiny, tokenizer="gpt2", val_tokens=70, run="bpe", save_model=True)
    summary = train.train(cfg)
    out = capsys.readouterr().out
    val_ids = load_dataset(cfg).val
    val_bytes = len(text[int(len(text) * 0.9) :].encode("utf-8"))
    assert val_bytes > len(text[int(len(text) * 0.9) :]) and len(val_ids) - 1 > 70  # non-ASCII; a real budget
    final = read_records(tmp_path / "runs" / "bpe")[-1]
    assert final["final"] is True and final["val_targets"] == 70
    expected = summary["final_val_loss"] * len(val_ids) / val_bytes / math.log(2)
    assert summary["final_val_bpb"] == pytest.approx(expected, rel=1e-12)
    assert final["val_bpb"] == round(expected, 5)
    assert "final evaluation on the first 70 val targets" in out
    assert f"final val loss {summary['final_val_loss']:.4f} (first 70 val targets), {expected:.3f} bits/byte" in out
    # the same windows every time: the loss redone on the first 70 targets is the run's
    batches = full_val_batches(val_ids, 4, 16, 70)
    assert sum(int((y != -1).sum()) for _, y in batches) == 70
    model = load_checkpoint(tmp_path / "models" / "bpe")[0]
    val = trainer.evaluate(model, batches, contextlib.nullcontext, torch.device("cpu"))
    assert val == pytest.approx(summary["final_val_loss"], rel=1e-6)


def test_tiny_shakespeare_char_learns(tmp_path, shakespeare_path):
    larger = dict(embedding_dim=64, context_len=32, batch_size=16, lr=2e-3, warmup_steps=10, max_steps=100)
    evals = dict(eval_every=50, eval_steps=4, log_every=25, run_cases=True)
    cfg = run_config(tmp_path, shakespeare_path, TRAINING, larger, evals, run="shakespeare")
    summary = train.train(cfg)
    assert summary["final_val_loss"] < 2.7 < math.log(65)
    assert len(summary["cases"]) == 20  # --run_cases ran the whole suite at the end
    assert all(not [name for name, ok in case["checks"].items() if ok is False] for case in summary["cases"])
    records = read_records(tmp_path / "runs" / "shakespeare")
    assert records[0]["loss"] > records[-2]["loss"]


@pytest.mark.compile
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_torch_compile_trains_like_eager(tmp_path, capsys, dropout):
    """With dropout too (compiled on a CPU, inductor draws its masks with eager's random numbers)."""
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    common = dict(num_blocks=1, embedding_dim=32, context_len=16, batch_size=4, max_steps=3, log_every=1)
    common["dropout"] = dropout
    common["dtype"] = "float32"  # like for like: auto may pick bf16 for compiled CPU runs
    compiled = train.train(run_config(tmp_path, data_path, TRAINING, run="compiled", torch_compile=True, **common))
    out = capsys.readouterr().out
    assert "compiled in" in out and "torch.compile failed" not in out, out
    eager = train.train(run_config(tmp_path, data_path, TRAINING, run="eager", torch_compile=False, **common))
    compiled_losses = [r.get("loss") for r in read_records(tmp_path / "runs" / "compiled")]
    eager_losses = [r.get("loss") for r in read_records(tmp_path / "runs" / "eager")]
    assert len(compiled_losses) == 4
    assert compiled_losses[:-1] == pytest.approx(eager_losses[:-1], rel=1e-3)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-3)


@pytest.mark.compile
def test_compiled_cpu_runs_of_one_seed_repeat_bit_for_bit(tmp_path):
    """Same seed, same weights: without deterministic algorithms, inductor's C++ embedding backward adds its rows with
    atomics across threads in whatever order the threads arrive (two runs then differ from step ~5 on)."""
    data_path = write_text(tmp_path / "text.txt", synthetic_text(30_000))
    runs = [
        train.train(
            run_config(tmp_path / str(i), data_path, TRAINING, torch_compile=True, max_steps=10, dtype="float32")
        )
        for i in range(2)
    ]
    assert runs[0]["final_val_loss"] == runs[1]["final_val_loss"]


@pytest.mark.compile
def test_warm_up_compiles_what_the_first_step_runs(tmp_path, monkeypatch):
    """The warm-up compiles the loss (under the loop's autocast) and Muon's update: the timed steps never compile."""
    from torch._dynamo.utils import counters

    graphs = {}
    original = train.Muon.warm_up

    def counting_warm_up(self):  # the last thing before the loop
        original(self)
        graphs["after_warm_up"] = counters["stats"]["unique_graphs"]

    monkeypatch.setattr(train.Muon, "warm_up", counting_warm_up)
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    torch._dynamo.reset()
    counters.clear()
    common = dict(num_blocks=1, embedding_dim=32, context_len=16, batch_size=4, max_steps=3, log_every=1)
    train.train(run_config(tmp_path, data_path, TRAINING, run="bf16", torch_compile=True, dtype="bfloat16", **common))
    assert graphs["after_warm_up"] == 1 + 4  # the loss, and Muon's update for each of the 4 matrix shapes
    assert counters["stats"]["unique_graphs"] == graphs["after_warm_up"]
