"""Data-parallel training under torchrun, on the CPU with gloo and 2 processes.

- 2 ranks with micro-batch B train exactly like 1 rank with accumulation 2 and micro-batch B: every rank walks the
  same window order and takes its own rows of each global batch, DDP averages what accumulation would have summed
  and halved, and the losses, val losses and weights agree step by step.
- A 2-rank run saves (rank 0 alone) and a 2-rank resume from its mid-run checkpoint equals the uninterrupted run.
- Muon shares the Newton-Schulz work: each rank orthogonalises its slice of every same-shape stack, and after the
  all-gather every rank holds the single-process update.

The runs go through `torchrun --standalone`, which picks a free port for its rendezvous itself, with one thread per
rank (OMP_NUM_THREADS=1) and a timeout; this file is also the Muon worker torchrun starts (see the bottom).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pytest
import torch
from conftest import REPO, argv_of, assert_same_state, read_records, run_config, step_losses, synthetic_text, write_text

from checkpoint import load_checkpoint, resolve_checkpoint

N = 8  # optimizer steps of the runs; checkpoints at N/2 and N
TIMEOUT_S = 240  # per torchrun launch: a few seconds of work, the rest is start-up on a loaded machine


TRAIN_PY = str(REPO / "train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--"]
# (`--` keeps torchrun's own parser off train.py's flags: it would take --run for its --run-path)


@pytest.fixture(scope="module")
def env(request) -> dict[str, str]:
    """The ranks' environment: one thread each, the project importable."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if sys.dont_write_bytecode:  # no .pyc files here: cache them in pytest's cache, or each rank compiles torch anew
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(request.config.cache.mkdir("torchrun-pycache"))
    return env


@pytest.fixture(scope="module")
def launch(env):
    """launch(args, cwd): run `torchrun ... -- args` on 2 processes; its output, or a failure showing it."""

    def torchrun(args: list[str], cwd: Path) -> str:
        result = subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result.stdout

    return torchrun


# Muon + AdamW, evaluations on an odd number of batches (the ranks split them unevenly), checkpoints at N/2
DISTRIBUTED = dict(
    lr=3e-3,
    muon_lr=0.03,
    max_steps=N,
    eval_every=N // 2,
    eval_steps=3,
    save_model=True,
    save_every=N // 2,
    keep_checkpoints=None,
    peak_flops=1e12,  # no CPU probe
)


def checkpoint(tmp: Path, step: int) -> Path:
    return tmp / "models" / "r" / f"step_{step:06d}"


def test_two_ranks_equal_one_rank_with_accumulation_then_resume(launch, tmp_path):
    import train

    write_text(tmp_path / "text.txt", synthetic_text(4_000))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        single = train.train(run_config(tmp_path / "one", tmp_path / "text.txt", DISTRIBUTED, accumulation_steps=2))
    finally:
        torch.set_num_threads(threads)
    cfg = run_config(tmp_path / "two", tmp_path / "text.txt", DISTRIBUTED, accumulation_steps=1)
    out = launch([TRAIN_PY, *argv_of(cfg)], tmp_path)
    assert "ranks : 2 processes (gloo), batch 4 each" in out
    assert f"{N} x 128 tokens (4 x 16 x 1 accumulation x 2 ranks)" in out
    assert out.count(f"step {N}/{N}") == 1  # rank 0 alone prints

    one, two = read_records(tmp_path / "one" / "runs" / "r"), read_records(tmp_path / "two" / "runs" / "r")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [*range(1, N + 1), N]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "lr"):
            assert (key in a) == (key in b)
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a, b)  # bitwise equal here
    assert two[-1]["val_loss"] == round(single["final_val_loss"], 5)
    for step in (N // 2, N):
        assert_same_state(checkpoint(tmp_path / "one", step), checkpoint(tmp_path / "two", step), atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two" / "models" / "r").iterdir()) == [
        "latest",
        "step_000004",
        "step_000008",
    ]
    rng = torch.load(tmp_path / "two" / "models" / "r" / "step_000004" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 1 and not torch.equal(rng["torch"], rng["ranks"][0]["torch"])  # each rank its own

    # 2 ranks resume the 2-rank run's mid-run checkpoint (a copy: a resumed run saves beside it), everyone loading it
    start = tmp_path / "resumed" / "models" / "r" / "step_000004"
    shutil.copytree(tmp_path / "two" / "models" / "r" / "step_000004", start)
    cfg = run_config(tmp_path / "resumed", tmp_path / "text.txt", DISTRIBUTED, accumulation_steps=1)
    out = launch([TRAIN_PY, *argv_of(cfg), f"--resume={start}"], tmp_path)
    assert f"resume : {start} at step {N // 2}" in out and "notice" not in out
    keys = ("loss", "grad_norm", "val_loss")
    resumed = step_losses(tmp_path / "resumed" / "runs" / "r", keys)
    assert resumed == [r for r in step_losses(tmp_path / "two" / "runs" / "r", keys) if r[0] > N // 2]
    assert_same_state(checkpoint(tmp_path / "resumed", N), checkpoint(tmp_path / "two", N))


def test_sigterm_stops_every_rank_after_the_same_step_and_rank_0_saves(env, tmp_path):
    """torchrun forwards SIGTERM to every rank; the ranks agree on the step to stop after, rank 0 saves, none hangs."""
    text = write_text(tmp_path / "text.txt", synthetic_text(4_000))
    cfg = run_config(tmp_path / "run", text, DISTRIBUTED, max_steps=100_000, eval_every=0, save_every=None, log_every=1)
    process = subprocess.Popen(
        [*TORCHRUN, TRAIN_PY, *argv_of(cfg)], cwd=tmp_path, env=env, stdout=PIPE, stderr=PIPE, text=True
    )
    try:
        metrics = tmp_path / "run" / "runs" / "r" / "metrics.jsonl"
        deadline = time.monotonic() + TIMEOUT_S
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    models = tmp_path / "run" / "models" / "r"
    folder = resolve_checkpoint(models)
    step = json.loads((folder / "state.json").read_text())["step"]
    assert f"stopped by SIGTERM after step {step}: saved {folder}" in out, out + err
    assert out.count("stopped by SIGTERM") == 1  # rank 0 alone prints
    assert read_records(tmp_path / "run" / "runs" / "r")[-1]["step"] == step  # the step every rank stopped after
    assert [p.name for p in models.glob("step_*")] == [folder.name]
    model, _, _ = load_checkpoint(models)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_two_ranks_on_shards_equal_one_rank_with_accumulation(launch, tmp_path):
    """The same guarantee when the data is a prepare.py folder: memory-mapped shards, windows across their ends."""
    import prepare
    import train

    lines = synthetic_text(6_000).splitlines()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(lines[i : i + 3])}) + "\n" for i in range(0, len(lines), 3)))
    folder = tmp_path / "prepared"
    argv = [str(corpus), "--out", str(folder), "--tokenizer", "char", "--val_frac", "0.2", "--shard_tokens", "700"]
    assert prepare.main([*argv, "--workers", "1"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        train.train(run_config(tmp_path / "one", folder, DISTRIBUTED, accumulation_steps=2, save_model=False))
    finally:
        torch.set_num_threads(threads)
    cfg = run_config(tmp_path / "two", folder, DISTRIBUTED, accumulation_steps=1, save_model=False)
    launch([TRAIN_PY, *argv_of(cfg)], tmp_path)
    one, two = read_records(tmp_path / "one" / "runs" / "r"), read_records(tmp_path / "two" / "runs" / "r")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [*range(1, N + 1), N]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "val_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a, b)


# ----------------------------------------------------------------------------------------------------------------
# Muon: the Newton-Schulz work shared between ranks


def muon_problem(seed: int = 0) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    """Matrices in three same-shape stacks (3 wide, 2 tall, 1 square: 2 ranks pad two of them) and 3 steps of
    gradients, the same on every rank as DDP leaves them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(8, 16)] * 3 + [(24, 8)] * 2 + [(4, 4)]
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    return params, grads


def run_muon(
    params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]], rank: int = 0, world_size: int = 1
) -> list[int]:
    """Three Muon steps; returns the size of every stack this process orthogonalised."""
    import optimizer

    real, sizes = optimizer.newton_schulz, []

    def counted(update: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        sizes.append(len(update))
        return real(update, *args, **kwargs)

    optimizer.newton_schulz = counted
    try:
        muon = optimizer.Muon(params, lr=0.05, weight_decay=0.1, rank=rank, world_size=world_size)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            muon.step()
    finally:
        optimizer.newton_schulz = real
    return sizes


def test_muon_shares_newton_schulz_and_matches_one_process(launch, tmp_path):
    launch([__file__, "muon", str(tmp_path)], tmp_path)
    params, grads = muon_problem()
    sizes = run_muon(params, grads)
    assert sizes == [3, 2, 1] * 3
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["sizes"] == [2, 1, 1] * 3  # its own share of each stack, never the whole
        for mine, reference in zip(result["params"], params, strict=True):
            assert torch.equal(mine, reference.detach())


def muon_worker(out: Path) -> None:
    """Under torchrun: the same problem on every rank, Muon with a process group, each rank's result to a file."""
    from distributed import init_distributed

    # the project's own setup (gloo on the CPU), which also keeps the group from outliving its destroy at exit
    ddp, _ = init_distributed(torch.device("cpu"))
    params, grads = muon_problem()
    sizes = run_muon(params, grads, ddp.rank, ddp.world_size)
    torch.save({"params": [p.detach() for p in params], "sizes": sizes}, out / f"rank{ddp.rank}.pt")
    ddp.close()


if __name__ == "__main__" and sys.argv[1:2] == ["muon"]:
    muon_worker(Path(sys.argv[2]))
