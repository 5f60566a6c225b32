"""Weight averaging (--ema_decay, optimizer.EMA): the warmed-up decay, the average after k training steps against a
hand computation from the recorded weights, EMA off changing nothing, what a run with it records and saves, the
end-of-run samples, resuming with the average switched on or off, and 2 ranks under torchrun equal to 1.

Bit-exact resume with the average is in tests/test_resume.py, its damaged files in tests/test_damaged.py, sampling
from it in tests/test_sample.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, argv_of, read_records, run_config, step_losses, synthetic_text, tiny_config, write_text
from safetensors import safe_open
from safetensors.torch import load_file

import train
from checkpoint import EMA_FILE, load_checkpoint
from data import TrainBatches
from model import GPT, generate
from optimizer import EMA, build_optimizers
from tokenizer import tokenizer_from_dict
from trainer import LoopState, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

DECAY = 0.5  # reached at update 8, (1 + 8) / (10 + 8): 12 steps see the warm-up and the decay itself
N = 12
# dropout draws from the torch generator, evaluations and checkpoints come between steps: none of it may differ
EMA_RUN = dict(dropout=0.1, max_steps=N, eval_every=4, log_every=4, save_model=True, save_every=N // 2, lr=3e-3)
EMA_RUN |= dict(keep_checkpoints=None, peak_flops=1e12)


def hand_average(weights: list[dict[str, torch.Tensor]], start: dict[str, torch.Tensor], decay: float) -> dict:
    """The average after each set of recorded weights in turn, in float64: a = d_k a + (1 - d_k) w_k with
    d_k = min(decay, (1 + k) / (10 + k)) for the k-th update."""
    average = {name: value.double() for name, value in start.items()}
    for k, step_weights in enumerate(weights):
        d = min(decay, (1 + k) / (10 + k))
        average = {name: d * average[name] + (1 - d) * step_weights[name].double() for name in average}
    return average


def assert_close(average: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert average.keys() == expected.keys()
    for name, value in average.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# The class


def test_the_decay_warms_up_then_holds():
    ema = EMA(torch.nn.Linear(2, 2), 0.5)
    decays = []
    for _ in range(11):
        decays.append(ema.current_decay())
        ema.update()
    assert decays[:3] == [1 / 10, 2 / 11, 3 / 12] and decays[8:] == [0.5, 0.5, 0.5]  # 9 / 18 = 0.5 first at k = 8
    assert ema.updates == 11
    assert EMA(torch.nn.Linear(2, 2), 0.999).current_decay() == 0.1  # a long decay warms up the same way


def test_an_update_moves_the_average_and_leaves_the_model_alone():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.0), model.bias.fill_(4.0)
    ema = EMA(model, 0.9)
    assert ema.model is not model and all(not p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(2.0)
    ema.update()  # decay 0.1: 0.1 * old + 0.9 * new
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), 0.9))
    torch.testing.assert_close(ema.model.bias, torch.full((2,), 0.1 * 4.0 + 0.9 * 2.0))
    ema.update()  # decay 2 / 11, the weights unchanged
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), 2 / 11 * 0.9 + 9 / 11 * 1.0))
    assert torch.equal(model.weight, torch.ones(2, 3)) and torch.equal(model.bias, torch.full((2,), 2.0))


def test_the_average_is_fp32_whatever_the_model_holds():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, 0.99)
    assert all(p.dtype == torch.float32 for p in ema.model.parameters())
    ema.update()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_state_dict_round_trips():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
    other = EMA(torch.nn.Linear(3, 3), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and other.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), ema.model.parameters(), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# In training


def test_the_average_after_k_steps_is_the_hand_computation_from_the_recorded_weights():
    cfg = tiny_config(dropout=0.1, ema_decay=DECAY, max_steps=N, warmup_steps=2, lr=3e-3)
    torch.manual_seed(0)
    model = GPT(cfg, 20)
    tokens = torch.randint(20, (2_000,), generator=torch.Generator().manual_seed(0))
    batches = TrainBatches(tokens, cfg.batch_size, cfg.context_len, cfg.seed, torch.device("cpu"))
    trainer = Trainer(cfg, model, model, build_optimizers(model, cfg), batches, N)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    state, recorded = LoopState(batches=batches), []
    for _ in range(N):
        trainer.step(state)
        recorded.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert trainer.ema.updates == N
    assert_close(dict(trainer.ema.model.named_parameters()), hand_average(recorded, start, DECAY))
    moved = hand_average(recorded, start, DECAY)
    assert any(not torch.allclose(moved[name].float(), recorded[-1][name]) for name in moved)  # (not the weights)


def test_without_ema_the_trainer_holds_none():
    cfg = tiny_config()
    model = GPT(cfg, 20)
    batches = TrainBatches(torch.arange(2_000) % 20, cfg.batch_size, cfg.context_len, cfg.seed, torch.device("cpu"))
    assert Trainer(cfg, model, model, build_optimizers(model, cfg), batches, N).ema is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run without and with --ema_decay: {"off": (folder, summary), "on": (folder, summary)}."""
    tmp = tmp_path_factory.mktemp("ema")
    text = write_text(tmp / "text.txt", synthetic_text(3_000))
    return {
        name: (tmp / name, train.train(run_config(tmp / name, text, EMA_RUN, ema_decay=decay, num_samples=1)))
        for name, decay in (("off", 0.0), ("on", DECAY))
    }


def test_ema_off_changes_nothing_and_on_leaves_training_alone(runs):
    (off, off_summary), (on, on_summary) = runs["off"], runs["on"]
    keys = ("loss", "val_loss", "grad_norm", "val_bpb")
    assert step_losses(on / "runs" / "r", keys) == step_losses(off / "runs" / "r", keys)  # the raw weights train alike
    assert on_summary["final_val_loss"] == off_summary["final_val_loss"]
    for step in ("step_000006", "step_000012"):
        raw = [load_file(folder / "models" / "r" / step / "model.safetensors") for folder in (off, on)]
        assert all(torch.equal(raw[0][name], raw[1][name]) for name in raw[0])
        assert not (off / "models" / "r" / step / EMA_FILE).exists()  # off: no file, no record, no summary value
        assert (on / "models" / "r" / step / EMA_FILE).is_file()
    assert not any("val_loss_ema" in record or "val_bpb_ema" in record for record in read_records(off / "runs" / "r"))
    assert off_summary["final_val_loss_ema"] is None and off_summary["final_val_bpb_ema"] is None


def test_evaluations_report_both_losses(runs, capsys):
    on, summary = runs["on"]
    records = read_records(on / "runs" / "r")
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [4, 8, N] and all("val_loss_ema" in r for r in evaluated)
    assert not any("val_loss_ema" in r for r in records if "val_loss" not in r)
    final = records[-1]
    assert final["final"] and final["val_loss_ema"] == round(summary["final_val_loss_ema"], 5)
    assert final["val_bpb_ema"] == round(summary["final_val_bpb_ema"], 5)
    assert final["val_loss_ema"] != final["val_loss"]


def test_the_checkpoint_holds_the_average_and_the_samples_come_from_it(runs):
    on, summary = runs["on"]
    folder = on / "models" / "r" / "step_000012"
    with safe_open(folder / EMA_FILE, "pt") as file:
        assert file.metadata() == {"updates": str(N)}
        assert set(file.keys()) == set(load_file(folder / "model.safetensors"))  # the same tensors, averaged
    model, tokenizer_dict, _ = load_checkpoint(folder)  # the default: the average
    raw, _, _ = load_checkpoint(folder, weights="raw")
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), raw.parameters(), strict=True))
    cfg, tokenizer = tiny_config(EMA_RUN), tokenizer_from_dict(tokenizer_dict)
    sampled = {}
    for name, weights in (("ema", model), ("raw", raw)):
        generator = torch.Generator().manual_seed(cfg.seed)  # as Trainer.finish draws its samples
        ids = generate(weights, [tokenizer.start_id], cfg.sample_tokens, 0.8, 200, None, True, generator)
        sampled[name] = tokenizer.decode(list(ids))
    assert summary["samples"] == [sampled["ema"]] and sampled["ema"] != sampled["raw"]


def test_console_shows_the_average(tmp_path, capsys):
    text = write_text(tmp_path / "text.txt", synthetic_text(3_000))
    cfg = run_config(tmp_path, text, EMA_RUN, ema_decay=DECAY, max_steps=5, save_model=False, num_samples=1)
    assert train.main(argv_of(cfg)) == 0
    out = capsys.readouterr().out
    step_4 = next(line for line in out.splitlines() if line.startswith("step 4/5"))
    assert "| val " in step_4 and step_4.split(" | ")[-1].startswith("ema ")
    assert "final EMA val loss " in out and f"(decay {DECAY})" in out and "samples (EMA weights)" in out


# ----------------------------------------------------------------------------------------------------------------
# Resuming with the average switched on or off (the exact resume: tests/test_resume.py)


def test_resuming_with_ema_switched_on_starts_the_average_from_the_weights(runs, tmp_path, capsys):
    off, _ = runs["off"]
    shutil.copytree(off / "models" / "r" / "step_000006", tmp_path / "r" / "step_000006")
    argv = ["--resume", str(tmp_path / "r" / "step_000006"), "--runs_dir", str(tmp_path / "runs")]
    assert train.main([*argv, "--ema_decay", str(DECAY), "--num_samples", "0"]) == 0
    out = capsys.readouterr().out
    assert f"notice: resuming with --ema_decay {DECAY} (was 0.0)" in out
    assert f"{tmp_path / 'r' / 'step_000006'} has no {EMA_FILE}; the weight average starts from its weights" in out
    with safe_open(tmp_path / "r" / "step_000012" / EMA_FILE, "pt") as file:
        assert file.metadata() == {"updates": str(N // 2)}  # one update per step since the resume


def test_resuming_with_ema_switched_off_drops_the_average(runs, tmp_path, capsys):
    on, _ = runs["on"]
    shutil.copytree(on / "models" / "r" / "step_000006", tmp_path / "r" / "step_000006")
    argv = ["--resume", str(tmp_path / "r" / "step_000006"), "--runs_dir", str(tmp_path / "runs")]
    assert train.main([*argv, "--ema_decay", "0", "--num_samples", "0"]) == 0
    assert f"notice: resuming with --ema_decay 0.0 (was {DECAY})" in capsys.readouterr().out
    assert not (tmp_path / "r" / "step_000012" / EMA_FILE).exists()
    assert not any("val_loss_ema" in r for r in read_records(tmp_path / "runs" / "r"))
    assert step_losses(tmp_path / "runs" / "r") == step_losses(on / "runs" / "r")[-3:]  # the raw run goes on alike


@pytest.mark.parametrize("value", ["1", "1.0", "-0.1", "nan", "inf", "2"])
def test_the_decay_must_be_below_1(value):
    from config import UserError, parse_args

    with pytest.raises(UserError, match=r"^--ema_decay must be 0 \(off\) or a decay below 1, e\.g\. 0\.999, got "):
        parse_args([f"--ema_decay={value}"])
    assert parse_args(["--ema_decay", "0.9999"]).ema_decay == 0.9999


# ----------------------------------------------------------------------------------------------------------------
# torchrun: every rank averages the same weights


def test_two_ranks_average_like_one_rank_with_accumulation(tmp_path):
    """Only rank 0 saves the average; the val_loss_ema of the evaluations, which every rank computes on its share of
    the batches with its own average, equals one process's, so every rank's average is the same."""
    text = write_text(tmp_path / "text.txt", synthetic_text(4_000))
    common = dict(EMA_RUN, dropout=0.0, max_steps=8, eval_every=4, eval_steps=3, save_every=None, ema_decay=DECAY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        train.train(run_config(tmp_path / "one", text, common, accumulation_steps=2))
    finally:
        torch.set_num_threads(threads)
    cfg = run_config(tmp_path / "two", text, common, accumulation_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--"]
    result = subprocess.run(
        [*torchrun, str(REPO / "train.py"), *argv_of(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = read_records(tmp_path / "one" / "runs" / "r"), read_records(tmp_path / "two" / "runs" / "r")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    assert (
        ["val_loss_ema" in r for r in two]
        == ["val_loss_ema" in r for r in one]
        == [True, False, True]  # steps 4 (evaluated), 8 (the last: the final evaluation follows), final
    )
    for a, b in zip(one, two, strict=True):
        if "val_loss_ema" in a:
            assert abs(a["val_loss_ema"] - b["val_loss_ema"]) <= 1e-5, (a, b)
    saved = [load_file(tmp_path / run / "models" / "r" / "step_000008" / EMA_FILE) for run in ("one", "two")]
    assert all(torch.allclose(saved[0][name], saved[1][name], rtol=0, atol=1e-6) for name in saved[0])
    assert json.loads((tmp_path / "two" / "runs" / "r" / "config.json").read_text())["ema_decay"] == DECAY
