"""Learning speed: validation loss against seconds of training, for whole train.py runs of the given presets.

    uv run bench/bench_learning.py                                   # nanogpt-cpu and speedrun-cpu, 2 rounds
    uv run bench/bench_learning.py --presets speedrun-cpu --repeats 1 --out bench/results/learning.json
    uv run bench/bench_learning.py --presets nanogpt-cpu --dtype float32     # any train.py flag applies to all

Runs are interleaved (A, B, A, B, ...) and medians reported, since machine speed drifts between runs. Time is
train.py's own clock: seconds of training, evaluation excluded. The curve is the periodic val loss on the fixed
validation batches; "final" is the whole validation split, as train.py reports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from config import UserError, parse_args  # noqa: E402
from plot import load_run  # noqa: E402

LOSS_MARKS = (2.0, 1.8, 1.7, 1.6)  # "seconds to reach" columns


def seconds_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time the val curve is at or below target, interpolated linearly between evaluations."""
    previous = (0.0, float("inf"))
    for seconds, loss in curve:
        if loss <= target:
            if previous[1] == float("inf"):
                return seconds
            fraction = (previous[1] - target) / (previous[1] - loss)
            return previous[0] + fraction * (seconds - previous[0])
        previous = (seconds, loss)
    return None


def one_run(preset: str, extra: list[str], runs_dir: Path, name: str) -> dict:
    cfg = parse_args(["--preset", preset, "--runs_dir", str(runs_dir), "--run", name, "--num_samples", "0", *extra])
    started = time.perf_counter()
    summary = train.train(cfg)
    wall = time.perf_counter() - started
    records = load_run(summary["run_dir"]).records  # the periodic records; the final one is apart
    curve = [(r["elapsed_s"], r["val_loss"]) for r in records if "val_loss" in r]
    return {
        "steps": summary["steps"],
        "train_s": summary["train_seconds"],
        "wall_s": wall,
        "tok_per_s": summary["tok_per_s"],
        "final_val": summary["final_val_loss"],
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="nanogpt-cpu,speedrun-cpu", help="comma-separated train.py presets")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds over all presets")
    parser.add_argument("--runs_dir", default="runs/bench_learning", help="where the runs' records go")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args, extra = parser.parse_known_args(argv)
    presets = args.presets.split(",")
    try:
        for preset in presets:  # every command line is valid before the first long run starts
            parse_args(["--preset", preset, *extra])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {preset: [] for preset in presets}
    for round_ in range(args.repeats):
        for preset in presets:
            run = one_run(preset, extra, Path(args.runs_dir), f"{preset}-{round_ + 1}")
            results[preset].append(run)
            print(
                f"round {round_ + 1}/{args.repeats} {preset}: {run['steps']} steps in {run['train_s']:.1f}s, "
                f"final val {run['final_val']:.4f}",
                flush=True,
            )

    rows = []
    for preset, runs in results.items():
        row = {
            "preset": preset,
            "steps": statistics.median(r["steps"] for r in runs),
            "train_s": round(statistics.median(r["train_s"] for r in runs), 1),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 1),  # the whole train.train call
            "tok_per_s": round(statistics.median(r["tok_per_s"] for r in runs)),
            "final_val": round(statistics.median(r["final_val"] for r in runs), 4),
            "final_vals": [round(r["final_val"], 4) for r in runs],
        }
        for mark in LOSS_MARKS:
            times = [seconds_to_reach(r["curve"], mark) for r in runs]
            reached = [t for t in times if t is not None]
            # the median over runs, counting a run that never got there as the slowest
            row[f"s_to_{mark}"] = round(statistics.median(reached), 1) if len(reached) * 2 > len(runs) else None
        row["curves"] = [[[round(s, 2), v] for s, v in r["curve"]] for r in runs]
        rows.append(row)

    marks = "".join(f"{'s to ' + str(m):>10}" for m in LOSS_MARKS)
    print(f"\n{'preset':<16}{'steps':>7}{'train s':>9}{'tok/s':>9}{'final val':>11}{marks}")
    for r in rows:
        times = "".join(f"{r[f's_to_{m}']:>10.1f}" if r[f"s_to_{m}"] is not None else f"{'-':>10}" for m in LOSS_MARKS)
        print(
            f"{r['preset']:<16}{r['steps']:>7.0f}{r['train_s']:>9.1f}{r['tok_per_s']:>9}{r['final_val']:>11.4f}{times}"
        )
    print("(s to X: seconds of training until the periodic val loss, on the fixed val batches, first reached X)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {"extra_flags": extra, "repeats": args.repeats, "rows": rows, "date": time.strftime("%Y-%m-%d")}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
