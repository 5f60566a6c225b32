"""ablate.py: arms and their checks, the interleaved schedule, resuming, Ctrl-C, the statistics against scipy.stats,
results.json and its table, and one tiny ablation that really runs train.py (2 arms x 2 seeds)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import scipy.stats
from conftest import REPO, default_sigint, synthetic_text, write_text

import ablate
import config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class FakeTrain:
    """Stands in for train.py (ablate.main's runner): writes the record of a finished run, config.json and a
    metrics.jsonl ending in the final evaluation, with the val loss `losses` gives its run name (else 2 + seed/100),
    and notes the runs in the order they were started. `interrupt_at` (a call number) writes a record without the
    final evaluation and raises KeyboardInterrupt, like a Ctrl-C during that run; `status` is what it returns."""

    def __init__(self, losses: dict[str, float] | None = None, interrupt_at: int | None = None, status: int = 0):
        self.losses, self.interrupt_at, self.status, self.calls = losses or {}, interrupt_at, status, []

    def __call__(self, command: list[str], log: Path) -> int:
        assert command[:2] == [sys.executable, str(ablate.TRAIN)]
        cfg = config.parse_args(command[2:])
        folder = Path(cfg.runs_dir) / cfg.run
        assert not folder.exists(), "an unfinished run's folder is cleared before it starts again"
        self.calls.append(cfg.run)
        folder.mkdir(parents=True)
        info = {"params": {"total": 1000}, "device": "cpu"}  # (train.py records the device --device auto chose)
        (folder / "config.json").write_text(json.dumps({**cfg.to_dict(), **info}))
        loss = self.losses.get(cfg.run, 2.0 + cfg.seed / 100)
        records = [
            {"step": 2, "loss": 3.0, "tok_per_s": 1000.0 + cfg.seed, "elapsed_s": 1.0, "val_loss": loss + 0.5},
            {"step": 4, "loss": 2.5, "tok_per_s": 1100.0, "elapsed_s": 2.0, "val_loss": loss + 0.1},
        ]
        interrupted = len(self.calls) == self.interrupt_at
        if not interrupted:
            final = {"step": 4, "final": True, "val_loss": loss, "val_bpb": loss * 1.4, "elapsed_s": 2.0}
            if cfg.ema_decay:  # (train.py's final record with a weight average: its numbers too)
                final |= {"val_loss_ema": loss - 0.25, "val_bpb_ema": (loss - 0.25) * 1.4}
            records.append(final)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("training...\nerror: the fake run failed\n" if self.status else "training...\n")
        if interrupted:
            raise KeyboardInterrupt
        return self.status


def arms_argv(out: Path, seeds: int = 2, *arms: str) -> list[str]:
    arms = arms or ("base=--max_steps 4", "nosink=--max_steps 4 --attn_sink False")
    return ["--seeds", str(seeds), "--out", str(out), *(part for arm in arms for part in ("--arm", arm))]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------------------------
# Arms, their checks, the schedule


def test_an_arm_is_a_name_and_train_flags_split_like_a_shell():
    arm = ablate.parse_arm("nosink=--preset speedrun-cpu --attn_sink False")
    assert (arm.name, arm.argv) == ("nosink", ["--preset", "speedrun-cpu", "--attn_sink", "False"])
    assert ablate.parse_arm("""wide=--data_path "my text.txt" --lr=0.01""").argv == [
        "--data_path",
        "my text.txt",
        "--lr=0.01",
    ]
    assert ablate.parse_arm("base=").argv == []  # train.py's defaults
    assert ablate.parse_arm("a=b=--lr 1").argv == ["b=--lr", "1"]  # the name ends at the first "=" (then refused)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--out", "o"], "the following arguments are required: --arm"),
        (["--arm", "base"], "is not NAME=FLAGS"),
        (["--arm", "=--lr 0.1"], "the name must be letters, digits"),
        (["--arm", "a b=--lr 0.1"], "the name must be letters, digits"),
        (["--arm", "../up=--lr 0.1"], "the name must be letters, digits"),
        (["--arm", "a=", "--arm", "b=", "--arm", "a=--lr 0.1"], "a is given more than once"),
        (["--arm", "a=--seed 3"], "--arm a sets --seed; ablate.py sets"),
        (["--arm", "a=--seed=3"], "--arm a sets --seed; ablate.py sets"),
        (["--arm", "a=--run mine"], "--arm a sets --run"),
        (["--arm", "a=--runs_dir elsewhere"], "--arm a sets --runs_dir"),
        (["--arm", "a=--save_model_dir elsewhere"], "--arm a sets --save_model_dir"),
        (["--arm", "a=--resume models/x"], "--arm a sets --resume; every run of an ablation starts from scratch"),
        (
            ["--arm", "a=", "--arm", "b=--atn_sink False"],
            "--arm b: unknown flag '--atn_sink'; did you mean --attn_sink?",
        ),
        (["--arm", "a=--lr nan"], "--arm a: --lr must be a positive number"),
        (["--arm", "a=--preset cpu --help"], "--arm a asks for --help; train.py's flags: uv run train.py --help"),
        (["--arm", "a=--attn_sink maybe"], "--arm a: --attn_sink: expected True/False"),
        (["--arm", "a=--num_heads 7"], "--arm a: --num_heads 7 does not divide --embedding_dim 512"),
        (["--arm", "a=--data_path 'unclosed"], "--arm a: cannot split its flags (No closing quotation)"),
        (["--arm", "a=", "--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--arm", "a=", "--seeds", "two"], "argument --seeds: invalid int value: 'two'"),
        (["--arm", "a=", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_command_lines_are_one_error_line_before_anything_runs(tmp_path, capsys, argv, needle):
    fake, out = FakeTrain(), tmp_path / "out"
    argv = argv if "--out" in argv else [*argv, "--out", str(out)]
    assert ablate.main(argv, runner=fake) == 2
    assert needle in one_error_line(capsys)
    assert fake.calls == [] and not out.exists()


def test_a_run_name_too_long_for_a_folder_is_refused_at_once(tmp_path, capsys):
    assert ablate.main(["--arm", "a=", "--out", str(tmp_path / ("x" * 100))], runner=FakeTrain()) == 2
    assert "is not a usable folder name (it is 105 characters long" in one_error_line(capsys)


def test_the_real_command_gives_one_error_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "ablate.py"), "--out", str(tmp_path / "o"), "--arm", "a=--atn_sink False"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: --arm a: unknown flag '--atn_sink'; did you mean --attn_sink?\n"


def test_runs_are_interleaved_seed_major():
    arms = [ablate.parse_arm(f"{name}=") for name in "abc"]
    order = [(arm.name, seed) for arm, seed in ablate.schedule(arms, 3)]
    assert order == [(name, seed) for seed in (1, 2, 3) for name in "abc"]


def test_each_run_is_an_ordinary_train_py_run_under_out(tmp_path):
    out = tmp_path / "ablations" / "sink"
    arm = ablate.parse_arm("nosink=--preset speedrun-cpu --attn_sink False")
    argv = ablate.train_argv(arm, 2, out)
    assert argv == [
        *("--preset", "speedrun-cpu", "--attn_sink", "False", "--seed", "2", "--run", "sink-nosink-s2"),
        *("--runs_dir", str(out / "runs"), "--save_model_dir", str(out / "models")),
    ]
    cfg = config.parse_args(argv)  # what train.py will run
    assert (cfg.seed, cfg.run, cfg.attn_sink, cfg.time_budget_s) == (2, "sink-nosink-s2", False, 90.0)


def test_the_runs_go_in_schedule_order_and_the_results_are_written(tmp_path, capsys):
    fake, out = FakeTrain(), tmp_path / "abl"
    assert ablate.main(arms_argv(out, 3, "a=", "b=--lr 0.001", "c=--dropout 0.1"), runner=fake) == 0
    assert fake.calls == [f"abl-{arm}-s{seed}" for seed in (1, 2, 3) for arm in "abc"]
    printed = capsys.readouterr().out
    assert "[1/9] abl-a-s1: training (output in" in printed and "[9/9] abl-c-s3: final val loss 2.0300" in printed
    assert (out / "results.json").is_file() and (out / "val_loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert list(json.loads((out / "results.json").read_text())["arms"]) == ["a", "b", "c"]


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, capsys):
    fake, out = FakeTrain(), tmp_path / "abl"
    assert ablate.main([*arms_argv(out), "--dry_run"], runner=fake) == 0
    lines = capsys.readouterr().out.splitlines()
    assert fake.calls == [] and not out.exists()
    assert len(lines) == 4 and lines[1].startswith(f"[2/4] abl-nosink-s1: {shlex.quote(sys.executable)} ")
    assert lines[1].endswith(
        f"--max_steps 4 --attn_sink False --seed 1 --run abl-nosink-s1 --runs_dir {out / 'runs'} "
        f"--save_model_dir {out / 'models'}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Resuming, Ctrl-C, failures


def test_a_rerun_skips_finished_runs_and_starts_an_unfinished_one_over(tmp_path, capsys):
    out = tmp_path / "abl"
    first = FakeTrain()
    assert ablate.main(arms_argv(out), runner=first) == 0
    results = (out / "results.json").read_text()

    again = FakeTrain()
    assert ablate.main(arms_argv(out), runner=again) == 0
    assert again.calls == [] and (out / "results.json").read_text() == results
    assert capsys.readouterr().out.count("finished earlier (final val loss") == 4

    # a run whose record lacks the final evaluation (a crash) and that left a checkpoint: both go, the run reruns
    metrics = out / "runs" / "abl-base-s2" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    (out / "models" / "abl-base-s2" / "step_000002").mkdir(parents=True)
    rerun = FakeTrain()  # (asserts that the run's folder is gone when it starts)
    assert ablate.main(arms_argv(out), runner=rerun) == 0
    assert rerun.calls == ["abl-base-s2"] and not (out / "models" / "abl-base-s2").exists()
    assert not (out / "runs" / "abl-base-s2-2").exists()


def test_ctrl_c_stops_with_130_and_the_rerun_continues_where_it_stopped(tmp_path, capsys):
    out = tmp_path / "abl"
    interrupted = FakeTrain(interrupt_at=3)
    assert ablate.main(arms_argv(out), runner=interrupted) == 130
    assert interrupted.calls == ["abl-base-s1", "abl-nosink-s1", "abl-base-s2"]
    assert (
        capsys.readouterr().err == "\ninterrupted: run the same command again to continue (finished runs are skipped)\n"
    )
    assert not (out / "results.json").exists()
    rest = FakeTrain()
    assert ablate.main(arms_argv(out), runner=rest) == 0
    assert rest.calls == ["abl-base-s2", "abl-nosink-s2"]


@pytest.mark.parametrize("status", [130, 143, -2])
def test_a_run_stopped_by_a_signal_stops_the_ablation(tmp_path, capsys, status):
    fake = FakeTrain(status=status)
    assert ablate.main(arms_argv(tmp_path / "abl"), runner=fake) == 130
    assert len(fake.calls) == 1 and "interrupted" in capsys.readouterr().err


def test_a_failed_run_is_one_error_line_naming_its_log(tmp_path, capsys):
    out = tmp_path / "abl"
    assert ablate.main(arms_argv(out), runner=FakeTrain(status=2)) == 2
    err = one_error_line(capsys)
    log = out / "logs" / "abl-base-s1.log"
    assert err == f"error: abl-base-s1 failed (exit status 2): error: the fake run failed; its output is in {log}\n"


def test_a_run_that_ends_without_its_final_evaluation_is_an_error(tmp_path, capsys):
    out = tmp_path / "abl"

    def no_final(command: list[str], log: Path) -> int:
        cfg = config.parse_args(command[2:])
        (Path(cfg.runs_dir) / cfg.run).mkdir(parents=True)
        (Path(cfg.runs_dir) / cfg.run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        return 0

    assert ablate.main(arms_argv(out), runner=no_final) == 2
    assert "abl-base-s1 ended without its final evaluation" in one_error_line(capsys)


def test_a_finished_run_made_with_other_flags_is_not_reused(tmp_path, capsys):
    out = tmp_path / "abl"
    assert ablate.main(arms_argv(out, 1, "base=--lr 0.001"), runner=FakeTrain()) == 0
    capsys.readouterr()
    fake = FakeTrain()
    assert ablate.main(arms_argv(out, 1, "base=--lr 0.002"), runner=fake) == 2
    err = one_error_line(capsys)
    assert f"{out / 'runs' / 'abl-base-s1'} was trained with other flags: --lr 0.001 (now 0.002)" in err
    assert fake.calls == []


def test_the_same_out_spelled_another_way_reuses_its_runs(tmp_path, monkeypatch, capsys):
    assert ablate.main(arms_argv(tmp_path / "abl", 1), runner=FakeTrain()) == 0
    monkeypatch.chdir(tmp_path)
    again = FakeTrain()
    assert ablate.main(arms_argv(Path("abl"), 1), runner=again) == 0  # relative now, absolute before
    assert again.calls == [] and capsys.readouterr().out.count("finished earlier") == 2


def test_a_second_ablate_in_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "abl"
    with ablate.only_writer(out):
        assert ablate.main(arms_argv(out), runner=FakeTrain()) == 2
    assert f"another ablate.py is running in {out}" in one_error_line(capsys)


# The child: waits for SIGINT, notes it in the marker file and exits 130 like train.py. The parent: ablate.main with
# a runner that starts that child through the real run_process.
CHILD = """import pathlib, signal, sys, time
marker = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGINT, lambda *_: (marker.write_text("stopped"), sys.exit(130)))
marker.with_suffix(".ready").write_text("")
time.sleep(60)
"""
PARENT = """import sys, ablate
child = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
runner = lambda command, log: ablate.run_process(child, log, grace_s=0.5)
sys.exit(ablate.main(sys.argv[3:], runner=runner))
"""


@pytest.mark.parametrize("whom", ["the terminal's process group", "ablate.py alone"])
def test_ctrl_c_reaches_the_running_train_py(tmp_path, whom):
    marker, out = tmp_path / "marker", tmp_path / "abl"
    process = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(marker), *arms_argv(out)],
        cwd=REPO,
        start_new_session=True,  # its own process group, as a terminal gives a command (and pytest stays out of it)
        preexec_fn=default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.with_suffix(".ready").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert marker.with_suffix(".ready").exists(), process.communicate(timeout=10)
        if whom == "ablate.py alone":  # (kill -INT <pid>): ablate.py passes it on
            os.kill(process.pid, signal.SIGINT)
        else:
            os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert marker.read_text() == "stopped"
    assert stderr.endswith("interrupted: run the same command again to continue (finished runs are skipped)\n")
    assert "[1/4] abl-base-s1: training" in stdout and (out / "logs" / "abl-base-s1.log").exists()


# ----------------------------------------------------------------------------------------------------------------
# Statistics, against scipy.stats


@pytest.mark.parametrize(
    "a, b", [(0.5, 0.5), (1.0, 1.0), (2.0, 3.0), (0.7, 12.0), (10.0, 0.5), (50.0, 0.5), (1.8, 0.5)]
)
def test_incomplete_beta_matches_scipy(a, b):
    for x in (1e-6, 0.01, 0.2, 0.5, 0.77, 0.99, 1 - 1e-9):
        assert ablate.betainc(a, b, x) == pytest.approx(scipy.special.betainc(a, b, x), rel=1e-10, abs=1e-300)
    assert (ablate.betainc(a, b, 0.0), ablate.betainc(a, b, 1.0)) == (0.0, 1.0)


@pytest.mark.parametrize("df", [1, 1.5, 2, 3, 3.7, 4, 9, 30, 100, 1e4])
def test_t_quantiles_and_tails_match_scipy(df):
    for q in (0.025, 0.5, 0.9, 0.975, 0.995):
        assert ablate.t_quantile(q, df) == pytest.approx(scipy.stats.t.ppf(q, df), rel=1e-9, abs=1e-12)
    for t in (0.0, 0.3, 1.0, 2.5, 12.7, 80.0):
        assert ablate.t_two_sided_p(t, df) == pytest.approx(2 * scipy.stats.t.sf(t, df), rel=1e-9, abs=1e-300)
    assert ablate.t_two_sided_p(math.inf, df) == 0.0


SAMPLES = [
    ([1.5412, 1.5433, 1.5398, 1.5441, 1.5420], [1.5490, 1.5471, 1.5523, 1.5502, 1.5488]),  # 5 seeds, clearly apart
    ([1.5412, 1.5433, 1.5398], [1.5420, 1.5401, 1.5445]),  # 3 seeds, noise
    ([2.0, 2.0, 2.0], [2.1, 2.3, 2.2, 2.6]),  # no spread in one arm, unequal n
    ([1.0, 2.0], [1.5, 1.5000001, 30.0, -4.0, 0.0, 7.0]),  # wildly unequal variances
]


@pytest.mark.parametrize("a, b", SAMPLES)
def test_statistics_match_scipy(a, b):
    for values in (a, b):
        described = ablate.describe(values)
        mean, std = np.mean(values), np.std(values, ddof=1)
        half = scipy.stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
        assert described["mean"] == pytest.approx(mean, rel=1e-12)
        assert described["std"] == pytest.approx(std, rel=1e-9, abs=1e-15)
        assert described["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    compared, scipy_test = ablate.compare(b, a), scipy.stats.ttest_ind(b, a, equal_var=False)
    assert compared["diff"] == pytest.approx(np.mean(b) - np.mean(a), rel=1e-12)
    assert compared["t"] == pytest.approx(scipy_test.statistic, rel=1e-9)
    assert compared["df"] == pytest.approx(scipy_test.df, rel=1e-9)
    assert compared["p_value"] == pytest.approx(scipy_test.pvalue, rel=1e-8)
    interval = scipy_test.confidence_interval(0.95)  # the Welch interval of the difference of means
    assert compared["diff_ci95"] == pytest.approx([interval.low, interval.high], rel=1e-8)


def test_one_seed_has_no_interval_and_no_test():
    assert ablate.describe([1.5]) == {"values": [1.5], "n": 1, "mean": 1.5, "std": None, "ci95": None}
    assert ablate.compare([1.5], [1.4, 1.6]) == pytest.approx(
        {"diff": 0.0, "diff_ci95": None, "p_value": None, "note": "needs at least 2 seeds per arm"}
    )


def test_identical_values_have_no_spread():
    assert ablate.describe([1.5, 1.5, 1.5]) == {
        "values": [1.5, 1.5, 1.5],
        "n": 3,
        "mean": 1.5,
        "std": 0.0,
        "ci95": [1.5, 1.5],
    }
    note = {"diff_ci95": None, "p_value": None, "note": "no spread in either arm: no test"}
    assert ablate.compare([1.5, 1.5], [1.5, 1.5]) == {"diff": 0.0, **note}  # scipy: nan
    assert ablate.compare([2.0, 2.0], [1.5, 1.5]) == {"diff": 0.5, **note}  # scipy: t = inf, df undefined


def test_results_json_holds_every_seed_and_the_statistics(tmp_path, capsys):
    out = tmp_path / "abl"
    base, nosink = [1.5412, 1.5433, 1.5398], [1.5490, 1.5471, 1.5523]
    losses = {
        f"abl-{arm}-s{seed}": values[seed - 1]
        for arm, values in (("base", base), ("nosink", nosink))
        for seed in (1, 2, 3)
    }
    argv = arms_argv(out, 3, "base=--max_steps 4", "nosink=--max_steps 4 --attn_sink False")
    assert ablate.main(argv, runner=FakeTrain(losses)) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["command"] == shlex.join(["ablate.py", *argv])
    assert (summary["base"], summary["seeds"], list(summary["arms"])) == ("base", [1, 2, 3], ["base", "nosink"])
    arm = summary["arms"]["nosink"]
    assert (arm["flags"], arm["seeds"]) == ("--max_steps 4 --attn_sink False", [1, 2, 3])
    assert arm["runs"] == ["abl-nosink-s1", "abl-nosink-s2", "abl-nosink-s3"]
    loss = arm["val_loss"]
    assert loss["values"] == nosink and loss["n"] == 3
    assert loss["mean"] == pytest.approx(np.mean(nosink)) and loss["std"] == pytest.approx(np.std(nosink, ddof=1))
    half = scipy.stats.t.ppf(0.975, 2) * np.std(nosink, ddof=1) / math.sqrt(3)
    assert loss["ci95"] == pytest.approx([np.mean(nosink) - half, np.mean(nosink) + half])
    assert loss["diff"] == pytest.approx(np.mean(nosink) - np.mean(base))
    assert loss["p_value"] == pytest.approx(scipy.stats.ttest_ind(nosink, base, equal_var=False).pvalue)
    assert arm["val_bpb"]["values"] == pytest.approx([v * 1.4 for v in nosink])
    assert arm["tok_per_s"]["values"] == [(1000 + s + 1100) / 2 for s in (1, 2, 3)]  # each run's median
    assert arm["train_s"]["mean"] == 2.0
    base_loss = summary["arms"]["base"]["val_loss"]
    assert (base_loss["diff"], base_loss["p_value"]) == (None, None) and base_loss["values"] == base

    table = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("arm "))
    assert table[start].split("  ")[0] == "arm" and "p (Welch)" in table[start]
    row = table[start + 3].split()
    assert row[:5] == ["nosink", "3", f"{np.mean(nosink):.4f}", "±", f"{np.std(nosink, ddof=1):.4f}"]
    assert row[7:9] == [f"{loss['diff']:+.4f}", f"{loss['p_value']:.2g}"]
    assert table[start + 4].startswith("base: base; p: Welch's two-sided t-test")

    markdown = (out / "results.md").read_text().splitlines()  # the same numbers, with flags and every seed
    assert markdown[0].startswith("| arm | flags | final val losses |") and markdown[1].startswith("| --- |")
    cells = [cell.strip() for cell in markdown[3].strip("|").split("|")]
    assert cells[:3] == ["nosink", "`--max_steps 4 --attn_sink False`", ", ".join(f"{v:.4f}" for v in nosink)]
    assert cells[5:7] == [f"{loss['diff']:+.4f}", f"{loss['p_value']:.2g}"]
    assert len(markdown) == 6 and markdown[5].startswith(f"`{summary['command']}`; base: base")


def test_one_seed_and_a_missing_bits_per_byte_are_null_with_a_note(tmp_path, capsys):
    out = tmp_path / "abl"

    def no_bpb(command: list[str], log: Path) -> int:
        status = FakeTrain()(command, log)
        cfg = config.parse_args(command[2:])
        metrics = Path(cfg.runs_dir) / cfg.run / "metrics.jsonl"
        metrics.write_text(metrics.read_text().replace('"val_bpb": ', '"val_bpb": null, "x": '))
        return status

    assert ablate.main(arms_argv(out, 1), runner=no_bpb) == 0
    arm = json.loads((out / "results.json").read_text())["arms"]["nosink"]
    assert arm["val_bpb"] is None
    loss = arm["val_loss"]
    assert (loss["std"], loss["ci95"], loss["p_value"]) == (None, None, None)
    assert loss["note"] == "needs at least 2 seeds per arm"
    assert "note: needs at least 2 seeds per arm" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# One tiny ablation of real train.py runs


def test_a_tiny_ablation_end_to_end(tmp_path):
    data = write_text(tmp_path / "text.txt", synthetic_text(4_000))
    tiny = (
        "--tokenizer char --num_blocks 1 --num_heads 2 --embedding_dim 16 --context_len 16 --batch_size 4 "
        "--accumulation_steps 1 --max_steps 4 --warmup_steps 1 --lr 0.01 --eval_every 2 --eval_steps 2 --log_every 1 "
        f"--torch_compile False --num_samples 0 --device cpu --peak_flops 1e12 --data_path {shlex.quote(str(data))}"
    )
    out = tmp_path / "sink"
    command = [
        sys.executable,
        str(REPO / "ablate.py"),
        *arms_argv(out, 2, f"base={tiny}", f"nosink={tiny} --attn_sink False"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models run fastest on one thread
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    started = [line.split(":")[0] for line in result.stdout.splitlines() if ": training (output in" in line]
    assert started == ["[1/4] sink-base-s1", "[2/4] sink-nosink-s1", "[3/4] sink-base-s2", "[4/4] sink-nosink-s2"]
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["arms"]) == ["base", "nosink"]
    for name, arm in summary["arms"].items():
        finals = []
        for seed, run in zip((1, 2), arm["runs"], strict=True):
            assert run == f"sink-{name}-s{seed}"
            saved = json.loads((out / "runs" / run / "config.json").read_text())
            assert (saved["seed"], saved["attn_sink"], saved["max_steps"]) == (seed, name == "base", 4)
            records = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
            assert records[-1]["final"] is True and records[-1]["step"] == 4
            finals.append(records[-1])
            assert "final val loss" in (out / "logs" / f"{run}.log").read_text()
        loss = arm["val_loss"]
        assert loss["values"] == [record["val_loss"] for record in finals]
        assert loss["std"] > 0 and loss["ci95"][0] < loss["mean"] < loss["ci95"][1]
        assert arm["val_bpb"]["values"] == [record["val_bpb"] for record in finals]
        assert arm["tok_per_s"]["mean"] > 0 and arm["train_s"]["mean"] > 0
    nosink = summary["arms"]["nosink"]["val_loss"]
    assert 0 <= nosink["p_value"] <= 1 and nosink["diff"] == pytest.approx(
        nosink["mean"] - summary["arms"]["base"]["val_loss"]["mean"]
    )
    assert (out / "val_loss.png").read_bytes().startswith(PNG_SIGNATURE)
    rows = [line.split()[:2] for line in result.stdout.splitlines() if line.startswith(("base ", "nosink "))]
    assert rows == [["base", "2"], ["nosink", "2"]]
    assert result.stdout.endswith(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'val_loss.png'}\n")

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 4
    assert json.loads((out / "results.json").read_text()) == summary


def test_an_ema_arm_is_compared_by_its_weight_average(tmp_path, capsys):
    """With --ema_decay a run samples from its weight average: that is its val loss; the raw one is kept beside."""
    out = tmp_path / "abl"
    argv = arms_argv(out, 2, "base=--max_steps 4", "ema=--max_steps 4 --ema_decay 0.9")
    assert ablate.main(argv, runner=FakeTrain()) == 0
    arms = json.loads((out / "results.json").read_text())["arms"]
    raw = [2.0 + seed / 100 for seed in (1, 2)]
    assert arms["ema"]["val_loss"]["values"] == pytest.approx([v - 0.25 for v in raw])
    assert arms["ema"]["val_loss_raw"]["values"] == pytest.approx(raw)
    assert arms["ema"]["val_bpb"]["values"] == pytest.approx([(v - 0.25) * 1.4 for v in raw])
    assert arms["base"]["val_loss"]["values"] == arms["base"]["val_loss_raw"]["values"] == pytest.approx(raw)
    assert arms["ema"]["val_loss"]["diff"] == pytest.approx(-0.25)
