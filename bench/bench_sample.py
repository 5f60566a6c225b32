"""Sampling speed with and without the KV cache: `uv run bench/bench_sample.py [--vocab gpt2|char] [--repeats 3]`.

A randomly initialised model of the default shape (6 blocks x 8 heads x 512 dim, context 1024, rotary positions,
attention sink) generates 500 new tokens greedily after a 64-token prompt, with the cache and without it. The runs
alternate (cache, no cache, cache, ...) so a machine whose speed drifts, or that other processes share, slows both
alike; the table shows every run and the medians, and the JSON (bench/results/ by default) keeps it all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere: import the repo

from config import Config  # noqa: E402
from model import GPT, generate  # noqa: E402
from utils import resolve_device  # noqa: E402

VOCAB_SIZES = {"gpt2": 50257, "char": 65}  # gpt2 BPE; the characters of Tiny Shakespeare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", choices=tuple(VOCAB_SIZES), default="gpt2", help="vocabulary (default: gpt2)")
    parser.add_argument("--num_blocks", type=int, default=6)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--context_len", type=int, default=1024)
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, interleaved (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument(
        "--out", default=None, help="JSON path (default: bench/results/sample_<device>[_<n>threads]_<vocab>.json)"
    )
    return parser.parse_args(argv)


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timed_generation(model: GPT, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    started = time.perf_counter()
    ids = list(generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache))  # int() syncs each step
    return time.perf_counter() - started, ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    vocab_size = VOCAB_SIZES[args.vocab]
    cfg = Config(
        num_blocks=args.num_blocks,
        num_heads=args.num_heads,
        embedding_dim=args.embedding_dim,
        context_len=args.context_len,
        tokenizer=args.vocab,
    )
    torch.manual_seed(0)
    model = GPT(cfg, vocab_size).to(device).eval()
    with torch.no_grad():  # the real init zeroes the head and output projections (all logits 0): vary the tokens
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(std=0.02)
    prompt = torch.randint(vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    shape = (
        f"{cfg.num_blocks} blocks x {cfg.num_heads} heads x {cfg.embedding_dim} dim, context {cfg.context_len}, "
        f"{args.vocab} vocab ({vocab_size} ids), {model.num_params()['total'] / 1e6:.1f}M params"
    )
    work = f"{args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, greedy"
    print(f"sampling speed: {shape}\n{work}; {machine(device)['cpu']}, {torch.get_num_threads()} threads", flush=True)

    for use_cache in (True, False):  # warm-up: first-call allocations and kernel choices stay out of the timings
        timed_generation(model, prompt, 8, use_cache)
    load_before = load_average()
    runs, tokens = [], {}
    print(f"{'run':>3}  {'kv cache':<8}  {'seconds':>8}  {'tok/s':>8}", flush=True)
    for repeat in range(1, args.repeats + 1):
        for use_cache in (True, False):
            seconds, ids = timed_generation(model, prompt, args.new_tokens, use_cache)
            tokens.setdefault(use_cache, ids)
            runs.append(
                {
                    "repeat": repeat,
                    "kv_cache": use_cache,
                    "seconds": round(seconds, 3),
                    "tok_per_s": round(args.new_tokens / seconds, 2),
                }
            )
            print(
                f"{repeat:>3}  {'on' if use_cache else 'off':<8}  {seconds:8.2f}  {runs[-1]['tok_per_s']:8.1f}",
                flush=True,
            )

    median = {
        mode: statistics.median(r["tok_per_s"] for r in runs if r["kv_cache"] is flag)
        for mode, flag in (("cache", True), ("no_cache", False))
    }
    speedup = median["cache"] / median["no_cache"]
    same = tokens[True] == tokens[False]
    print(
        f"median tok/s: cache on {median['cache']:.1f}, off {median['no_cache']:.1f} -> speedup {speedup:.1f}x "
        f"(target >= 5x)\nsame tokens with and without the cache: {'yes' if same else 'NO'}"
    )
    result = {
        "benchmark": "sample",
        "model": {**{k: getattr(cfg, k) for k in ("num_blocks", "num_heads", "embedding_dim", "context_len")}},
        "vocab": args.vocab,
        "vocab_size": vocab_size,
        "params": model.num_params()["total"],
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "decoding": "greedy",
        "machine": machine(device),
        "load_average": {"before": load_before, "after": load_average()},
        "runs": runs,
        "median_tok_per_s": median,
        "speedup": round(speedup, 2),
        "same_tokens": same,
    }
    threads = f"_{torch.get_num_threads()}threads" if device.type == "cpu" else ""
    out = Path(args.out or Path(__file__).parent / "results" / f"sample_{device.type}{threads}_{args.vocab}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
