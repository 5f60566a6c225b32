"""Training throughput: ms/step, tok/s, MFU and peak memory for eager vs compiled and fp32 vs bf16.

    uv run bench/bench_train.py --preset nanogpt-cpu            # any train.py flags pick the config
    uv run bench/bench_train.py --preset nanogpt-cpu --repeats 3 --steps 30 --out bench/results/train.json

Variants are interleaved (A, B, A, B, ...) and medians reported, since machine speed drifts between runs.
One "step" is the training loop's own `Trainer.step` (trainer.py): accumulation_steps batches gathered and forward/backward passes,
gradient clipping, the non-finite check and the optimizer update(s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import UserError, parse_args  # noqa: E402
from data import TrainBatches  # noqa: E402
from model import GPT  # noqa: E402
from optimizer import Muon, build_optimizers  # noqa: E402
from trainer import LoopState, Trainer, compile_loss  # noqa: E402
from utils import autocast_for, peak_flops, resolve_device  # noqa: E402


def make_variant(cfg, vocab_size: int, device: torch.device, compiled: bool, dtype: torch.dtype):
    """The training loop's own Trainer over random tokens; returns (trainer, a function taking one step, seconds
    compiling)."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg, vocab_size).to(device)
    optimizers = build_optimizers(model, cfg, compile=compiled)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab_size, ((4 * cfg.batch_size + 1) * cfg.context_len + 1,), generator=generator)
    batches = TrainBatches(tokens, cfg.batch_size, cfg.context_len, cfg.seed, device)
    autocast = autocast_for(dtype, device)
    started = time.perf_counter()
    loss = compile_loss(model, compiled, *batches.next_batch(), autocast)  # as train.py: compiled before step 1
    for optimizer in optimizers:
        if isinstance(optimizer, Muon):
            optimizer.warm_up()
    trainer = Trainer(cfg, model, loss, optimizers, batches, total_steps=10**9, autocast=autocast)
    state = LoopState(batches=batches).to(device)
    trainer.step(state)
    sync(device)
    return trainer, lambda: trainer.step(state), time.perf_counter() - started


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps: int, device: torch.device) -> float:
    """Median ms per step over `steps` single-step timings."""
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--vocab_size", type=int, default=65, help="65 = Tiny Shakespeare characters")
    parser.add_argument("--variants", default="eager-fp32,compiled-fp32,eager-bf16,compiled-bf16")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = parse_args(rest)
        device = resolve_device(cfg.device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_float32_matmul_precision("high")
    tokens_per_step = cfg.batch_size * cfg.context_len * cfg.accumulation_steps
    variants = {}
    for name in args.variants.split(","):
        mode, precision = name.split("-")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        if device.type == "mps" and mode == "compiled":
            continue
        trainer, step, compile_s = make_variant(cfg, args.vocab_size, device, mode == "compiled", dtype)
        flops = trainer.step_flops
        peak, source = peak_flops(device, dtype, cfg.peak_flops)
        variants[name] = dict(step=step, compile_s=compile_s, flops=flops, peak=peak, peak_source=source, ms=[])
        print(f"prepared {name} ({compile_s:.1f}s first step)", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for round_ in range(args.repeats):  # interleaved: every variant once per round
        for v in variants.values():
            v["step"]()  # one untimed step: caches warm after the other variants ran
            v["ms"].append(time_steps(v["step"], args.steps, device))
        print(
            f"round {round_ + 1}/{args.repeats}: " + ", ".join(f"{n} {v['ms'][-1]:.1f} ms" for n, v in variants.items())
        )

    rows = []
    for name, v in variants.items():
        ms = statistics.median(v["ms"])
        rows.append(
            {
                "variant": name,
                "ms_per_step": round(ms, 2),
                "tok_per_s": round(tokens_per_step / ms * 1000, 1),
                "mfu": round(v["flops"] / (ms / 1000) / v["peak"], 4) if v["peak"] else None,
                "mfu_peak": v["peak_source"],
                "first_step_s": round(v["compile_s"], 1),
                "rounds_ms": [round(m, 2) for m in v["ms"]],
            }
        )
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(
        f"\n{cfg.num_blocks}x{cfg.num_heads}x{cfg.embedding_dim} ctx {cfg.context_len}, {tokens_per_step} tokens/step, "
        f"{'Muon+AdamW' if cfg.use_muon else 'AdamW'}, {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
    print(f"{'variant':<15}{'ms/step':>10}{'tok/s':>10}{'MFU':>8}{'first step':>12}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['variant']:<15}{r['ms_per_step']:>10.1f}{r['tok_per_s']:>10.0f}{mfu:>8}{r['first_step_s']:>11.1f}s")
    print(f"peak memory: {peak_mem:.0f} MiB" if peak_mem is not None else "peak memory: n/a on this device (CUDA only)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "config": cfg.to_dict(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "rows": rows,
            "peak_memory_mib": peak_mem,
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
