"""Is this change real? Arms x seeds of ordinary train.py runs, with statistics and one plot:

    uv run ablate.py --seeds 5 --out ablations/sink --arm "base=--preset speedrun-cpu" \\
        --arm "nosink=--preset speedrun-cpu --attn_sink False"

Each --arm NAME=FLAGS is a set of train.py flags; the first arm is the base the others are compared with. Seed s of
an arm is one train.py process with `--seed s --run <out>-<arm>-s<s> --runs_dir <out>/runs --save_model_dir
<out>/models`, its console output in <out>/logs/<run>.log. The runs are interleaved seed by seed (a, b, c, a, b, c,
...) so that a machine getting slower or faster over the hours hits every arm alike. Run the same command again after
Ctrl-C or a crash and it continues: finished runs are skipped, an unfinished one starts over.

At the end: <out>/results.json (per arm: every seed's final val loss and bits per byte, mean, standard deviation,
95% interval, the difference to the base with its interval and Welch t-test p-value, tok/s, training time), a table
(printed, and as Markdown in <out>/results.md) and <out>/val_loss.png. The statistics are plain Python here (no
scipy at run time). See docs/ablations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config
import plot
from config import OneLineParser, UserError, folder_name, parse_args
from utils import FolderLock, atomic_write

TRAIN = Path(__file__).resolve().parent / "train.py"
OWNED = ("seed", "run", "runs_dir", "save_model_dir")  # ablate.py sets these for every run
Runner = Callable[[list[str], Path], int]  # (train.py command, log file) -> exit status


@dataclass(frozen=True)
class Arm:
    name: str
    flags: str  # as given on the command line
    argv: list[str]  # the flags split like a shell would


# ----------------------------------------------------------------------------------------------------------------
# Arms and runs


def parse_arm(text: str) -> Arm:
    """`NAME=FLAGS` -> Arm; the name becomes part of run folder names, the flags are split like a shell would."""
    name, equals, flags = text.partition("=")
    if not equals:
        raise UserError(f'--arm {text!r} is not NAME=FLAGS, e.g. --arm "nosink=--attn_sink False"')
    if not re.fullmatch(r"\w[\w.-]*", name.strip()):
        raise UserError(f"--arm {text!r}: the name must be letters, digits, _, . or - (it names the arm's runs)")
    try:
        argv = shlex.split(flags)
    except ValueError as error:  # an unclosed quote
        raise UserError(f"--arm {name.strip()}: cannot split its flags ({error})") from None
    return Arm(name.strip(), flags.strip(), argv)


def run_name(out: Path, arm: Arm, seed: int) -> str:
    """The run's folder name: <out's name>-<arm>-s<seed>, the same every time, so a rerun finds it."""
    return f"{folder_name(out.resolve().name) or 'ablation'}-{arm.name}-s{seed}"


def train_argv(arm: Arm, seed: int, out: Path) -> list[str]:
    """The train.py flags of one run: the arm's, then the ones ablate.py owns."""
    where = ["--runs_dir", str(out / "runs"), "--save_model_dir", str(out / "models")]
    return [*arm.argv, "--seed", str(seed), "--run", run_name(out, arm, seed), *where]


def check_arms(arms: list[Arm], seeds: int, out: Path) -> None:
    """Everything that can be checked before the first run: a typo fails now, not after an hour of training."""
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    names = [arm.name for arm in arms]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise UserError(f"--arm names must differ; {', '.join(duplicates)} is given more than once")
    for arm in arms:
        if {"-h", "--help"} & set(arm.argv):
            raise UserError(f"--arm {arm.name} asks for --help; train.py's flags: uv run train.py --help")
        try:
            parse_args(train_argv(arm, seeds, out))  # the same parser and checks as train.py's own
        except UserError as error:
            raise UserError(f"--arm {arm.name}: {error}") from None
        # the flags the arm itself gives: train.py's parser leaves the others out of its namespace (SUPPRESS)
        given = vars(config.build_parser().parse_known_args(arm.argv)[0])
        if owned := [name for name in OWNED if name in given]:
            raise UserError(
                f"--arm {arm.name} sets --{owned[0]}; ablate.py sets --seed, --run, --runs_dir and --save_model_dir "
                "for each run (seeds 1..N, everything under --out)"
            )
        if "resume" in given:
            raise UserError(f"--arm {arm.name} sets --resume; every run of an ablation starts from scratch")


def schedule(arms: list[Arm], seeds: int) -> list[tuple[Arm, int]]:
    """Seed-major round robin: seed 1 of every arm, then seed 2 of every arm, ..."""
    return [(arm, seed) for seed in range(1, seeds + 1) for arm in arms]


def finished_run(folder: Path) -> plot.Run | None:
    """The run's record if it holds the final evaluation (train.py writes it last, after the last step), else None."""
    if not (folder / "metrics.jsonl").is_file():
        return None
    run = plot.load_run(folder)
    return run if run.final is not None and finite(run.final.get("val_loss")) else None


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_same_flags(run: plot.Run, argv: list[str]) -> None:
    """A finished run is reused only if it was trained with the arm's flags as they are now (where its files went
    aside: the same --out spelled another way names the same runs)."""
    # (config.json's "device" is the one the run resolved --device auto to: the machine's, not the experiment's)
    expected = {key: value for key, value in parse_args(argv).to_dict().items() if key not in (*OWNED, "device")}
    if differ := [key for key, value in expected.items() if key in run.config and run.config[key] != value]:
        shown = ", ".join(f"--{key} {run.config[key]!r} (now {expected[key]!r})" for key in differ[:3])
        raise UserError(f"{run.path} was trained with other flags: {shown}; use another --out, or delete that run")


def run_process(command: list[str], log: Path, grace_s: float = 5.0) -> int:
    """Run one train.py to its end, its console output into `log`; its exit status. On Ctrl-C the child (which the
    terminal signals too) stops at its next safe point, then the KeyboardInterrupt goes on up."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log fills as the run goes: `tail -f` works
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            try:
                child.wait(timeout=grace_s)  # a Ctrl-C at the terminal reached the child too: it stops on its own
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)  # only ablate.py was signalled (kill -INT): pass it on
                child.wait()
            raise


def last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "(no output)"
    return "(no output)"


def run_all(arms: list[Arm], seeds: int, out: Path, runner: Runner, dry_run: bool = False) -> None:
    """Every run of the ablation not finished yet, in schedule order; finished ones are skipped."""
    plan = schedule(arms, seeds)
    for number, (arm, seed) in enumerate(plan, 1):
        name, argv = run_name(out, arm, seed), train_argv(arm, seed, out)
        folder, log, head = out / "runs" / name, out / "logs" / f"{name}.log", f"[{number}/{len(plan)}] {name}"
        if done := finished_run(folder):
            check_same_flags(done, argv)
            print(f"{head}: finished earlier (final val loss {done.final['val_loss']:.4f}), skipped", flush=True)
            continue
        command = [sys.executable, str(TRAIN), *argv]
        if dry_run:
            print(f"{head}: {shlex.join(command)}", flush=True)
            continue
        # An unfinished run (Ctrl-C, a crash) starts over from scratch: its records and checkpoints are removed,
        # else train.py would take the next free name (records.claim_run: <name>-2) and this run would never be
        # found under its own name. Both folders are ablate.py's own, under --out.
        for leftover in (folder, out / "models" / name):
            try:
                if leftover.exists():
                    shutil.rmtree(leftover)
            except OSError as error:
                raise UserError(f"cannot remove the unfinished run's {leftover}: {error.strerror or error}") from None
        print(f"{head}: training (output in {log}) ...", flush=True)
        status = runner(command, log)
        if status < 0 or status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise KeyboardInterrupt  # the run was stopped by a signal: stop as after Ctrl-C
        if status != 0:
            raise UserError(f"{name} failed (exit status {status}): {last_line(log)}; its output is in {log}")
        if (run := finished_run(folder)) is None:
            raise UserError(f"{name} ended without its final evaluation; its output is in {log}")
        seconds = run.summary["train_seconds"] or 0.0
        print(f"{head}: final val loss {run.final['val_loss']:.4f} after {seconds:.1f}s of training", flush=True)


@contextlib.contextmanager
def only_writer(out: Path) -> Iterator[None]:
    """One ablate.py per --out: a second one would start over the runs the first is training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write into --out {out}: {error.strerror or error}") from None
    with FolderLock(out) as lock:
        if not lock.acquire():
            raise UserError(
                f"another ablate.py is running in {out} ({lock.holder()}); wait for it, or use another --out"
            )
        yield


# ----------------------------------------------------------------------------------------------------------------
# Statistics: Student's t distribution through the regularized incomplete beta function, Welch's t-test.


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (Lentz's method)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges quickly only below this point: use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front / a * (f - 1.0)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return betainc(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


def t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q (0 < q < 1), by bisection on the distribution function."""
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    tail = 2 * (1.0 - q)  # the two-sided p of the t we look for
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        low, high = high, high * 2
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if t_two_sided_p(middle, df) > tail else (low, middle)
    return (low + high) / 2


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(t, degrees of freedom, standard error) of mean(a) - mean(b) by Welch's t-test (unequal variances); needs
    at least 2 values in each. With no spread in either (standard error 0) t and df are NaN."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return math.nan, math.nan, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return (statistics.fmean(a) - statistics.fmean(b)) / se, df, se


def describe(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the 95% interval of the mean (Student t); None where one value has none."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return {"values": values, "n": n, "mean": mean, "std": None, "ci95": None}
    std = statistics.stdev(values)
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"values": values, "n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def compare(values: list[float], base: list[float]) -> dict[str, Any]:
    """The difference of means to the base, its 95% interval and Welch's two-sided p-value; None (with a note)
    where the test is undefined."""
    diff = statistics.fmean(values) - statistics.fmean(base)
    if min(len(values), len(base)) < 2:
        return {"diff": diff, "diff_ci95": None, "p_value": None, "note": "needs at least 2 seeds per arm"}
    t, df, se = welch(values, base)
    if se == 0:
        return {"diff": diff, "diff_ci95": None, "p_value": None, "note": "no spread in either arm: no test"}
    half = t_quantile(0.975, df) * se
    return {"diff": diff, "diff_ci95": [diff - half, diff + half], "p_value": t_two_sided_p(t, df), "t": t, "df": df}


# ----------------------------------------------------------------------------------------------------------------
# Results: results.json, the table, the plot

# what each run contributes: the final evaluation's numbers, and the summary plot.py makes of its records. A run's
# val loss is that of the weights it samples from: its weight average's with --ema_decay (the raw weights' too).
METRICS: dict[str, Callable[[plot.Run], Any]] = {
    "val_loss": lambda run: run.final.get("val_loss_ema", run.final.get("val_loss")),
    "val_loss_raw": lambda run: run.final.get("val_loss"),
    "val_bpb": lambda run: run.final.get("val_bpb_ema", run.final.get("val_bpb")),  # None: no byte counts
    "tok_per_s": lambda run: run.summary["tok_per_s"],  # the median over the run's log intervals
    "train_s": lambda run: run.summary["train_seconds"],  # training time, evaluation excluded
}


def results(arms: list[Arm], runs: dict[str, list[plot.Run]], seeds: int, command: list[str]) -> dict[str, Any]:
    """results.json: per arm its flags, runs and, for every metric all seeds have, its statistics and its
    comparison with the base arm (the first)."""
    base = arms[0].name
    values = {
        arm.name: {metric: [get(run) for run in runs[arm.name]] for metric, get in METRICS.items()} for arm in arms
    }
    summary = {"command": shlex.join(command), "base": base, "seeds": list(range(1, seeds + 1)), "arms": {}}
    for arm in arms:
        entry: dict[str, Any] = {
            "flags": arm.flags,
            "seeds": summary["seeds"],
            "runs": [r.name for r in runs[arm.name]],
        }
        for metric in METRICS:
            mine, theirs = values[arm.name][metric], values[base][metric]
            if not all(finite(v) for v in mine):
                entry[metric] = None
                continue
            entry[metric] = {**describe(mine), "diff": None, "diff_ci95": None, "p_value": None}
            if arm.name != base and all(finite(v) for v in theirs):
                entry[metric] |= compare(mine, theirs)
        summary["arms"][arm.name] = entry
    return summary


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def arm_cells(arm: dict[str, Any]) -> dict[str, str]:
    """An arm of results.json as text, one entry per column of the console table and results.md."""
    loss, bpb = arm["val_loss"], arm["val_bpb"]
    interval = loss["ci95"]
    return {
        "seeds": str(loss["n"]),
        "final val losses": ", ".join(f"{value:.4f}" for value in loss["values"]),
        "val loss mean ± std": f"{loss['mean']:.4f} ± {_number(loss['std'], '.4f')}",
        "95% interval": "-" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]",
        "diff to base": _number(loss.get("diff"), "+.4f"),
        "p (Welch)": _number(loss.get("p_value"), ".2g"),
        "val bpb": "-" if bpb is None else f"{bpb['mean']:.4f}",
        "tok/s": "-" if arm["tok_per_s"] is None else f"{arm['tok_per_s']['mean']:,.0f}",
        "train time": "-" if arm["train_s"] is None else f"{arm['train_s']['mean']:.2f}s",
    }


def _footer(summary: dict[str, Any]) -> list[str]:
    notes = sorted({arm["val_loss"].get("note") for arm in summary["arms"].values()} - {None})
    lines = [f"base: {summary['base']}; p: Welch's two-sided t-test against the base's final val losses"]
    return lines + [f"note: {note}" for note in notes]


def format_table(summary: dict[str, Any]) -> str:
    """One row per arm: final val loss mean ± std, its 95% interval, difference to the base and p-value, bits per
    byte, tok/s and training time (means over seeds)."""
    header = ["arm", "seeds", "val loss mean ± std", "95% interval", "diff to base", "p (Welch)", "val bpb"]
    header += ["tok/s", "train time"]
    rows = [[name, *(arm_cells(arm)[column] for column in header[1:])] for name, arm in summary["arms"].items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:  # the arm's name left-aligned, the numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows), *_footer(summary)])


def format_markdown(summary: dict[str, Any]) -> str:
    """results.md: the table as Markdown, with each arm's flags and every seed's final val loss, to paste into notes."""
    header = ["arm", "flags", "final val losses", "val loss mean ± std", "95% interval", "diff to base", "p (Welch)"]
    header += ["tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, arm in summary["arms"].items():
        cells = arm_cells(arm) | {"arm": name, "flags": f"`{arm['flags']}`" if arm["flags"] else "-"}
        lines.append("| " + " | ".join(cells[column].replace("|", "\\|") for column in header) + " |")
    command = f"`{summary['command']}`".replace("|", "\\|")
    return "\n".join([*lines, "", f"{command}; " + "; ".join(_footer(summary)), ""])


# ----------------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ablate.py", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=FLAGS",
        help='an arm: its name and its train.py flags, e.g. "nosink=--preset speedrun-cpu --attn_sink False"; '
        "repeat for each arm, the first is the base",
    )
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 1..N of every arm (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the ablation's folder: runs/, logs/, results.json, the plot")
    parser.add_argument("--dry_run", action="store_true", help="print the train.py commands still to run, run none")
    return parser


def main(argv: list[str] | None = None, runner: Runner = run_process) -> int:
    """0 when every run is done and the results are written; 2 with one `error:` line; 130 after Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        arms, out = [parse_arm(text) for text in args.arm], Path(args.out)
        check_arms(arms, args.seeds, out)
        if args.dry_run:
            run_all(arms, args.seeds, out, runner, dry_run=True)
            return 0
        with only_writer(out):
            run_all(arms, args.seeds, out, runner)
            runs = {
                arm.name: [finished_run(out / "runs" / run_name(out, arm, s)) for s in range(1, args.seeds + 1)]
                for arm in arms
            }
            summary = results(arms, runs, args.seeds, ["ablate.py", *argv])
            atomic_write(out / "results.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
            atomic_write(out / "results.md", format_markdown(summary))
            picture = plot.plot_arms(
                runs, out / "val_loss.png", f"{out.resolve().name}: val loss, {args.seeds} seeds per arm"
            )
        print(format_table(summary))
        print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {picture}")
    except (UserError, plot.PlotError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue (finished runs are skipped)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
