"""See and compare runs: `uv run plot.py runs/<a> runs/<b> [-o plot.png]`, or `uv run plot.py --table runs/*`.

Reads only the run files that train.py writes, runs/<run>/config.json and runs/<run>/metrics.jsonl, and imports
nothing of the project. The picture has four panels, one line per run named after its folder: train (solid) and
val (dashed) loss against steps and against training time, the learning rate, and throughput. The table gives
each run's final and best val loss, tok/s, MFU, training time and parameter count; it is printed with every plot.
plot_arms draws an ablation's runs grouped by arm (ablate.py's val_loss.png).
Bad input is one `error: ...` line on stderr and exit status 2: a path that is not a run folder, or whose
metrics.jsonl or config.json is not a regular file (a FIFO or a device could be read forever). Damaged contents,
which a crash can leave, are skipped with one `warning: ...` line per file instead: lines that are not step records,
fields of the wrong type, a config.json that is not a JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import stat
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


class PlotError(ValueError):
    """Bad input (a folder that is not a run, an unwritable output): one `error:` line, exit status 2."""


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]  # the per-step records, in file order
    final: dict[str, Any] | None = None  # the final evaluation on the whole validation split, once the run is done
    summary: dict[str, Any] = field(default_factory=dict)


# The numeric fields of a step record; one of another type (a string, a list, a bool) is dropped from its record.
NUMBER_FIELDS = ("loss", "val_loss", "lr", "muon_lr", "grad_norm", "step_ms", "tok_per_s", "mfu", "elapsed_s")


def _is_number(value: Any) -> bool:
    """An int or float that converts to a float (json's true is an int to Python; 1e400 written as digits is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _check_file(path: Path, what: str) -> None:
    """A run file must be a regular file: a FIFO or a device (/dev/zero) could block or never end, a folder fails."""
    try:
        mode = path.stat().st_mode  # (symlinks followed)
    except OSError as error:
        raise PlotError(f"cannot read {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device or special file"
        raise PlotError(f"{path} is {'a folder' if stat.S_ISDIR(mode) else kind + ', not a regular file'}; {what}")


def _read(path: Path) -> str:
    """A run file's text; bytes that are not UTF-8 become U+FFFD (a damaged line is then skipped, not fatal)."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as error:
        raise PlotError(f"cannot read {path}: {error.strerror or error}") from None


def _warn(path: Path, message: str) -> None:
    print(f"warning: {path}: {message}", file=sys.stderr, flush=True)


def load_run(folder: str | Path) -> Run:
    """A run folder's config and records. The rule: a path of the wrong kind (no folder, no metrics.jsonl, a file
    that is a folder, a FIFO or a device) is a PlotError; damaged contents, which a crash can leave, are skipped
    with one warning line per file: lines that are not JSON objects with an integer step, numeric fields holding
    something else, a config.json that is not a JSON object or has no number in params.total. A line cut short at
    the end (a run still writing) is skipped silently."""
    path = Path(folder)
    if not path.is_dir():
        reason = "is not a folder" if path.exists() else "does not exist"
        raise PlotError(f"{path} {reason}; pass run folders written by train.py, e.g. runs/<run>")
    metrics, config_path = path / "metrics.jsonl", path / "config.json"
    if not metrics.exists():
        raise PlotError(f"{path} has no metrics.jsonl; pass run folders written by train.py, e.g. runs/<run>")
    _check_file(metrics, "pass run folders written by train.py, e.g. runs/<run>")
    config: dict[str, Any] = {}
    if config_path.exists():
        _check_file(config_path, "remove it, or pass run folders written by train.py")
        try:
            config = json.loads(_read(config_path))
        except (ValueError, RecursionError):
            config = None
        if not isinstance(config, dict):
            _warn(config_path, "is not a JSON object; the run's parameter count is left out")
            config = {}
        params = config.get("params")
        if params is not None and not (isinstance(params, dict) and _is_number(params.get("total"))):
            _warn(config_path, "has no number in params.total; the run's parameter count is left out")
    lines = _read(metrics).split("\n")  # (not splitlines: JSON strings may hold other line breaks)
    records, final, bad_lines, bad_fields = [], None, [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number < len(lines):  # the last line without a newline: still being written, or cut by a crash
                bad_lines.append(number)
            continue
        bad_fields += _drop_bad_fields(record)
        if record.get("final") is True:
            final = record
        else:
            records.append(record)
    if bad_lines:
        shown = ", ".join(map(str, bad_lines[:5])) + (", ..." if len(bad_lines) > 5 else "")
        _warn(metrics, f"skipped {len(bad_lines)} line(s) that are not step records (line {shown})")
    if bad_fields:
        names = ", ".join(sorted(set(bad_fields)))
        _warn(metrics, f"ignored {len(bad_fields)} value(s) that are not numbers (fields {names})")
    run = Run(name=path.resolve().name, path=path, config=config, records=records, final=final)
    run.summary = summarize(run)
    return run


def _parse(line: str) -> dict[str, Any] | None:
    """A step record: a JSON object whose step is a non-negative integer; None for anything else."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: a line of brackets thousands deep
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    return record if isinstance(step, int) and _is_number(step) and step >= 0 else None


def _drop_bad_fields(record: dict[str, Any]) -> list[str]:
    """Drop the numeric fields that hold something else (null stays: mfu is null without a peak); their names."""
    bad = [key for key in NUMBER_FIELDS if record.get(key) is not None and not _is_number(record[key])]
    for key in bad:
        del record[key]
    return bad


def load_runs(folders: list[str | Path]) -> list[Run]:
    runs = [load_run(folder) for folder in folders]
    names = [run.name for run in runs]
    for run in runs:  # two folders of the same name (from two runs_dirs) are told apart by their paths
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if _finite(r.get(key))]


def _points(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of the records that have both as finite numbers (NaN from a diverged step is left out)."""
    pairs = [(r[x], r[y]) for r in records if _finite(r.get(x)) and _finite(r.get(y))]
    return [a for a, _ in pairs], [b for _, b in pairs]


def summarize(run: Run) -> dict[str, Any]:
    """The table's numbers; None where the run does not have them (not finished, no MFU peak, no config)."""
    everything = run.records + ([run.final] if run.final else [])
    val_losses = _values(everything, "val_loss")
    tok_per_s, mfu = _values(run.records, "tok_per_s"), _values(run.records, "mfu")
    elapsed = _values(everything, "elapsed_s")
    params = run.config.get("params")
    return {
        "steps": everything[-1]["step"] if everything else None,
        "final_val_loss": run.final.get("val_loss") if run.final else None,
        "best_val_loss": min(val_losses) if val_losses else None,
        # medians: one slow interval (a busy machine, a checkpoint save) should not move the number
        "tok_per_s": statistics.median(tok_per_s) if tok_per_s else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "train_seconds": elapsed[-1] if elapsed else None,
        "params": params.get("total") if isinstance(params, dict) and _finite(params.get("total")) else None,
    }


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def format_table(runs: list[Run]) -> str:
    """One row per run, aligned: steps, final and best val loss, tok/s, MFU, training time, parameters."""
    header = ["run", "steps", "final val", "best val", "tok/s", "MFU", "time", "params"]
    rows = []
    for run in runs:
        s = run.summary
        cells = [
            run.name,
            s["steps"],
            s["final_val_loss"] if s["final_val_loss"] is None else f"{s['final_val_loss']:.4f}",
            s["best_val_loss"] if s["best_val_loss"] is None else f"{s['best_val_loss']:.4f}",
            s["tok_per_s"] if s["tok_per_s"] is None else _human(s["tok_per_s"]),
            s["mfu"] if s["mfu"] is None else f"{100 * s['mfu']:.1f}%",
            s["train_seconds"] if s["train_seconds"] is None else _duration(s["train_seconds"]),
            s["params"] if s["params"] is None else _human(s["params"]),
        ]
        rows.append(["-" if cell is None else str(cell) for cell in cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the run name left-aligned, the numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    if any(run.final is None for run in runs):
        out.append("final val '-': the run has not finished (or was stopped before its final evaluation)")
    return "\n".join(out)


def plot_runs(runs: list[Run], out: str | Path) -> Path:
    """Draw the runs into one image (PNG unless `out` names another format) with the Agg backend; returns its path."""
    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no display needed
    axes = fig.subplots(2, 2)
    loss_steps, loss_time, lr_ax, speed_ax = axes.flat
    for i, run in enumerate(runs):
        color = f"C{i % 10}"  # matplotlib's default cycle, the same colour in every panel
        train = [r for r in run.records if _is_number(r.get("loss"))]  # (a NaN loss: a gap, not a point)
        for ax, x in ((loss_steps, "step"), (loss_time, "elapsed_s")):
            ax.plot(*_points(train, x, "loss"), color=color, lw=1.5)
            ax.plot(*_points(run.records, x, "val_loss"), color=color, ls="--", marker="o", ms=3)
            if run.final:  # the whole split: a different estimate, its own marker
                ax.plot(*_points([run.final], x, "val_loss"), color=color, marker="*", ms=12, ls="none")
        for key, style in (("lr", "-"), ("muon_lr", ":")):
            steps, lrs = _points([r for r in train if _finite(r.get(key)) and r[key] > 0], "step", key)
            lr_ax.plot(steps, lrs, color=color, ls=style, label=run.name if key == "lr" else None)
        speed_ax.plot(*_points(train, "step", "tok_per_s"), color=color)

    loss_steps.set(title="loss against steps", xlabel="step", ylabel="loss")
    loss_time.set(title="loss against training time", xlabel="training time (s, evaluation excluded)", ylabel="loss")
    lr_ax.set(title="learning rate: AdamW (solid), Muon (dotted)", xlabel="step", ylabel="lr", yscale="log")
    speed_ax.set(title="throughput", xlabel="step", ylabel="tokens / s")
    speed_ax.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="0.3", lw=1.5, label="train (log interval mean)"),
        Line2D([], [], color="0.3", ls="--", marker="o", ms=3, label="val (fixed batches)"),
        Line2D([], [], color="0.3", marker="*", ms=12, ls="none", label="final val (whole split)"),
    ]
    loss_steps.legend(handles=styles, loc="upper right", fontsize="small")
    fig.legend(loc="outside upper center", ncols=min(len(runs), 4), title="runs", fontsize="small")
    finite = [v for run in runs for key in ("loss", "val_loss") for v in _values(run.records, key)]
    for ax in (loss_steps, loss_time):
        _clip_losses(ax, finite)
    return _save(fig, out)


def _clip_losses(ax: Any, values: list[float]) -> None:
    """The first steps sit at log(vocab), far above the rest: clip them so the differences show."""
    finite = sorted(values)
    if finite:
        top = finite[min(len(finite) - 1, int(0.95 * len(finite)))]
        bottom = finite[0]
        pad = 0.05 * max(top - bottom, 1e-3)
        ax.set_ylim(bottom - pad, top + pad * 4)


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=80)
    except (OSError, ValueError) as error:
        raise PlotError(f"cannot write the plot to {out}: {error}") from None
    return out


def plot_arms(arms: dict[str, list[Run]], out: str | Path, title: str = "") -> Path:
    """An ablation's picture (ablate.py): val loss against steps, one colour per arm; each run (a seed) a thin
    line with its final val loss (whole split) as a star, the arm's mean over its seeds a thick line at the steps
    every seed evaluated. Returns the image's path."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (name, runs) in enumerate(arms.items()):
        color = f"C{i % 10}"
        curves = [dict(zip(*_points(run.records, "step", "val_loss"), strict=True)) for run in runs]
        for run, curve in zip(runs, curves, strict=True):
            ax.plot(list(curve), list(curve.values()), color=color, lw=0.8, marker="o", ms=2.5, alpha=0.45)
            if run.final:
                ax.plot(*_points([run.final], "step", "val_loss"), color=color, marker="*", ms=9, ls="none")
        steps = sorted(set.intersection(*map(set, curves))) if curves else []
        mean = [statistics.fmean(curve[step] for curve in curves) for step in steps]
        ax.plot(steps, mean, color=color, lw=2.5, label=f"{name} ({len(runs)} seed{'s' * (len(runs) != 1)})")
    ax.set(title=title or "val loss per arm", xlabel="step", ylabel="val loss")
    ax.grid(alpha=0.3)
    styles = [
        Line2D([], [], color="0.3", lw=0.8, marker="o", ms=2.5, label="one seed (fixed val batches)"),
        Line2D([], [], color="0.3", lw=2.5, label="mean over seeds"),
        Line2D([], [], color="0.3", marker="*", ms=9, ls="none", label="final val (whole split)"),
    ]
    ax.legend(handles=styles, loc="upper right", fontsize="small")
    fig.legend(loc="outside right upper", fontsize="small", title="arms")
    every_run = [run for group in arms.values() for run in group]
    _clip_losses(ax, [v for run in every_run for v in _values([*run.records, *filter(None, [run.final])], "val_loss")])
    return _save(fig, out)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block; one line says enough
        raise PlotError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="plot.py",
        description="Plot runs (train/val loss against steps and time, lr, tok/s) and print a comparison table.",
    )
    parser.add_argument("runs", nargs="+", help="run folders, e.g. runs/muon runs/adamw (or runs/*)")
    parser.add_argument("-o", "--out", default="plot.png", help="the image to write (default: %(default)s)")
    parser.add_argument("--table", action="store_true", help="only print the comparison table, draw nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        runs = load_runs(args.runs)
        print(format_table(runs))
        if not args.table:
            print(f"wrote {plot_runs(runs, args.out)}")
    except PlotError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
