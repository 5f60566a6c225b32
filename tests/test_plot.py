"""plot.py: the picture and the comparison table from real tiny runs, bad input, and its independence from the rest."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pytest
from conftest import REPO, call_with_deadline, read_records, run_config, synthetic_text, write_text

import plot
import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """An ablation in miniature: the same tiny model with Muon and with AdamW only, 12 steps each."""
    tmp_path = tmp_path_factory.mktemp("plot")
    data_path = write_text(tmp_path / "text.txt", synthetic_text(20_000))
    common = dict(max_steps=12, eval_every=4, log_every=2)
    muon = train.train(run_config(tmp_path, data_path, common, run="muon"))
    adamw = train.train(run_config(tmp_path, data_path, common, run="adamw", use_muon=False))
    return tmp_path, muon["run_dir"], adamw["run_dir"]


def test_plot_writes_one_png_with_both_runs(two_runs, capsys):
    tmp_path, muon, adamw = two_runs
    out = tmp_path / "pictures" / "ablation.png"  # a folder that does not exist yet
    assert plot.main([muon, adamw, "-o", str(out)]) == 0
    payload = out.read_bytes()
    assert payload.startswith(PNG_SIGNATURE)
    assert len(payload) > 20_000  # four panels with lines and labels, not an empty canvas
    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (13 * 80, round(8.5 * 80))  # figsize x dpi
    printed = capsys.readouterr().out
    assert "muon" in printed and "adamw" in printed and f"wrote {out}" in printed


def test_table_compares_runs(two_runs, capsys, monkeypatch):
    tmp_path, muon, adamw = two_runs
    monkeypatch.chdir(tmp_path)
    assert plot.main(["--table", muon, adamw]) == 0
    assert not (tmp_path / "plot.png").exists()  # --table draws nothing
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "steps", "final", "val", "best", "val", "tok/s", "MFU", "time", "params"]
    for folder, line in zip((muon, adamw), lines[2:4], strict=True):
        records = read_records(folder)
        final = records[-1]
        assert final["final"] is True
        cells = line.split()
        assert cells[0] == Path(folder).name and cells[1] == "12"
        assert cells[2] == f"{final['val_loss']:.4f}"
        assert cells[3] == f"{min(r['val_loss'] for r in records if 'val_loss' in r):.4f}"
        params = json.loads(Path(folder, "config.json").read_text())["params"]["total"]
        assert cells[7] == plot._human(params)


def test_summary_of_an_unfinished_run(tmp_path):
    """A run still writing: no final record, a half-written last line, no MFU; medians for throughput."""
    run = tmp_path / "running"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"params": {"total": 1234, "embedding": 34, "non_embedding": 1200}}))
    records = [
        {"step": 10, "loss": 3.0, "lr": 1e-3, "tok_per_s": 100.0, "mfu": None, "elapsed_s": 1.0},
        {"step": 20, "loss": 2.5, "lr": 1e-3, "tok_per_s": 900.0, "mfu": None, "elapsed_s": 2.0, "val_loss": 2.7},
        {"step": 30, "loss": 2.2, "lr": 1e-3, "tok_per_s": 110.0, "mfu": None, "elapsed_s": 3.0, "val_loss": 2.4},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "lo')
    summary = plot.load_run(run).summary
    assert summary == {
        "steps": 30,
        "final_val_loss": None,
        "best_val_loss": 2.4,
        "tok_per_s": 110.0,
        "mfu": None,
        "train_seconds": 3.0,
        "params": 1234,
    }
    table = plot.format_table([plot.load_run(run)])
    assert table.splitlines()[2].split() == ["running", "30", "-", "2.4000", "110", "-", "0m03s", "1.23k"]
    assert "has not finished" in table
    assert plot.plot_runs([plot.load_run(run)], tmp_path / "running.png").stat().st_size > 10_000


def test_a_folder_without_metrics_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "plot.py"), str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "metrics.jsonl" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_flags_are_one_error_line(capsys):
    assert plot.main([]) == 2
    assert plot.main(["--bogus", "runs/x"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)


def test_plot_imports_nothing_of_the_project():
    """DESIGN: plot.py reads only the run files, so it works on runs made by any version of the code."""
    project = {path.stem for path in REPO.glob("*.py")} - {"plot"}
    tree = ast.parse((REPO / "plot.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & project


# ----------------------------------------------------------------------------------------------------------------
# Damaged run files. The rule: a path of the wrong kind is one error line; damaged contents (which a crash can
# leave) are skipped with one warning line per file, and the plot and table are drawn from what is left.

GOOD = [
    {"step": 10, "loss": 3.0, "lr": 1e-3, "tok_per_s": 100.0, "mfu": None, "elapsed_s": 1.0},
    {"step": 20, "loss": 2.5, "lr": 1e-3, "tok_per_s": 300.0, "mfu": 0.25, "elapsed_s": 2.0, "val_loss": 2.7},
    {"step": 30, "loss": 2.2, "lr": 5e-4, "tok_per_s": 200.0, "mfu": 0.5, "elapsed_s": 3.0, "val_loss": 2.4},
]
FINAL = {"step": 30, "final": True, "val_loss": 2.35, "elapsed_s": 3.0}
CONFIG = {"params": {"total": 1234, "embedding": 34, "non_embedding": 1200}}

# lines that are not step records: each is skipped, and counted in one warning
BAD_LINES = [
    b"not json at all",
    b"[1, 2, 3]",
    b'"a string"',
    b"null",
    b"17",
    b'{"loss": 2.0}',  # no step
    b'{"step": null, "loss": 1.0}',
    b'{"step": "7", "loss": 1.0}',
    b'{"step": true, "loss": 1.0}',
    b'{"step": -1, "loss": 1.0}',
    b'{"step": 2.5, "loss": 1.0}',
    b'{"step": 1e400, "loss": 1.0}',  # json reads it as inf
    b'{"step": 1' + b"0" * 400 + b', "loss": 1.0}',  # an integer no float holds
    b"[" * 100_000,  # nested deeper than the parser recurses
    b'{"step": 5, "lo',  # cut short in the middle of the file
    b"\xff\xfe\x00 binary garbage",
]
# step records with fields of the wrong type: the fields are dropped, the rest of the record kept
BAD_FIELDS = [
    {"step": 11, "loss": "x", "elapsed_s": 1.1},
    {"step": 12, "loss": True, "elapsed_s": 1.2},
    {"step": 13, "loss": 2.9, "val_loss": [1.0], "elapsed_s": {}},
    {"step": 14, "loss": 2.8, "lr": "fast", "tok_per_s": "many", "mfu": "high"},
    {"step": 15, "loss": 2.7, "elapsed_s": "1.5", "tok_per_s": int("9" * 400)},
]
NOT_FINITE = [{"step": 16, "loss": float("nan"), "elapsed_s": 1.6}, {"step": 17, "loss": float("inf"), "lr": 1e-3}]


def write_run(folder: Path, lines: list[bytes], config: bytes | None = json.dumps(CONFIG).encode()) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    if config is not None:
        (folder / "config.json").write_bytes(config)
    return folder


def encoded(*records: dict) -> list[bytes]:
    return [json.dumps(r).encode() for r in records]


def test_damaged_lines_and_fields_are_skipped_with_one_warning_each(tmp_path, capsys):
    lines = encoded(GOOD[0]) + BAD_LINES + encoded(*BAD_FIELDS, GOOD[1], *NOT_FINITE, GOOD[2])
    lines += encoded({**FINAL, "val_loss": 2.35, "tok_per_s": "x"})
    run = write_run(tmp_path / "damaged", lines)
    assert plot.main([str(run), "-o", str(tmp_path / "damaged.png")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"warning: {run / 'metrics.jsonl'}: skipped {len(BAD_LINES)} line(s) that are not step records "
        "(line 2, 3, 4, 5, 6, ...)",
        f"warning: {run / 'metrics.jsonl'}: ignored 10 value(s) that are not numbers (fields elapsed_s, loss, lr, mfu, "
        "tok_per_s, val_loss)",
    ]
    row = out.splitlines()[2].split()
    # steps of the last record, final and best val loss, the median tok/s of 100, 300, 200, MFU, time, params
    assert row == ["damaged", "30", "2.3500", "2.3500", "200", "37.5%", "0m03s", "1.23k"]
    assert (tmp_path / "damaged.png").read_bytes().startswith(PNG_SIGNATURE)
    loaded = plot.load_run(run)
    assert [r["step"] for r in loaded.records] == [10, 11, 12, 13, 14, 15, 20, 16, 17, 30]
    assert "loss" not in loaded.records[1] and "loss" not in loaded.records[2]  # "x" and true are not losses


def test_a_line_cut_short_at_the_end_is_skipped_without_a_warning(tmp_path, capsys):
    run = write_run(tmp_path / "writing", encoded(*GOOD))
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 40, "lo')
    assert [r["step"] for r in plot.load_run(run).records] == [10, 20, 30]
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'ss": 2.0}')  # the same line, finished without its newline yet: kept
    assert [r["step"] for r in plot.load_run(run).records] == [10, 20, 30, 40]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "config, warning",
    [
        (b"[1, 2]", "is not a JSON object"),
        (b'"a string"', "is not a JSON object"),
        (b'{"params": {"total": 12', "is not a JSON object"),  # cut short
        (b"\xff\xfe", "is not a JSON object"),
        (b'{"params": [1234]}', "has no number in params.total"),
        (b'{"params": {"total": "1234"}}', "has no number in params.total"),
        (b'{"params": {"total": true}}', "has no number in params.total"),
    ],
)
def test_a_damaged_config_is_left_out_with_a_warning(tmp_path, capsys, config, warning):
    run = write_run(tmp_path / "run", encoded(*GOOD, FINAL), config)
    assert plot.main(["--table", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: {run / 'config.json'}: {warning}; the run's parameter count is left out\n"
    assert out.splitlines()[2].split()[-1] == "-"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda run: shutil.rmtree(run), "does not exist"),
        (lambda run: (shutil.rmtree(run), run.write_text("{}")), "is not a folder"),
        (lambda run: (run / "metrics.jsonl").unlink(), "has no metrics.jsonl"),
        (
            lambda run: ((run / "metrics.jsonl").unlink(), os.mkfifo(run / "metrics.jsonl")),
            "is a FIFO (named pipe), not a regular",
        ),
        (lambda run: ((run / "metrics.jsonl").unlink(), (run / "metrics.jsonl").mkdir()), "is a folder; "),
        (
            lambda run: ((run / "config.json").unlink(), os.mkfifo(run / "config.json")),
            "is a FIFO (named pipe), not a regular",
        ),
        (lambda run: ((run / "config.json").unlink(), (run / "config.json").mkdir()), "is a folder; "),
    ],
)
def test_a_path_of_the_wrong_kind_is_one_error_line(tmp_path, capsys, setup, message):
    run = write_run(tmp_path / "run", encoded(*GOOD))
    setup(run)
    fifos = [path for path in (run / "metrics.jsonl", run / "config.json") if path.is_fifo()]
    code = call_with_deadline(lambda: plot.main(["--table", str(run)]), fifos[0] if fifos else tmp_path)
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {run}") and message in err and err.count("\n") == 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the heap limit reads /proc")
@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_dev_zero_as_a_run_file_is_refused_unread(tmp_path, name):
    """In a child whose heap may grow by at most 1 GiB: a regression that reads /dev/zero fails in a moment."""
    run = write_run(tmp_path / "run", encoded(*GOOD))
    (run / name).unlink()
    (run / name).symlink_to("/dev/zero")
    code = (
        "import re, resource, sys, plot; "
        "heap = int(re.search(r'VmData:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024 + 2**30; "
        "resource.setrlimit(resource.RLIMIT_DATA, (heap, heap)); "
        f"sys.exit(plot.main(['--table', {str(run)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
    assert result.stderr == f"error: {run / name} is a device or special file, not a regular file; " + (
        "pass run folders written by train.py, e.g. runs/<run>\n"
        if name == "metrics.jsonl"
        else "remove it, or pass run folders written by train.py\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# plot_arms: ablate.py's picture


def test_plot_arms_draws_one_colour_per_arm(tmp_path):
    """Val loss against steps: every seed of an arm in the arm's colour, seeds that stop at different steps (a time
    budget), and an arm with only the final evaluations (--eval_every 0)."""
    arms = {}
    for name, offset in (("base", 0.0), ("nosink", 0.08)):
        runs = []
        for seed in (1, 2, 3):
            last = 900 + 50 * seed  # the clock stopped each seed at its own step
            val = [
                {"step": s, "loss": 3.0, "val_loss": 1.5 + offset + 1 / s**0.5 + 0.01 * seed}
                for s in range(100, last, 100)
            ]
            final = {"step": last, "final": True, "val_loss": 1.5 + offset + 0.03 + 0.01 * seed}
            runs.append(plot.load_run(write_run(tmp_path / f"{name}-s{seed}", encoded(*val, final))))
        arms[name] = runs
    only_finals = write_run(tmp_path / "finals", encoded({"step": 900, "final": True, "val_loss": 1.6}))
    arms["finals only"] = [plot.load_run(only_finals)]
    out = plot.plot_arms(arms, tmp_path / "pictures" / "val_loss.png", "sink: val loss")
    assert out == tmp_path / "pictures" / "val_loss.png" and out.read_bytes().startswith(PNG_SIGNATURE)
    pixels = matplotlib.image.imread(out)[..., :3]
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # C0, C1, C2: the arms' colours, each drawn
        rgb = matplotlib.colors.to_rgb(colour)
        assert (abs(pixels - rgb).max(axis=-1) < 0.02).sum() > 20, colour


def test_plot_arms_names_an_unwritable_output(tmp_path):
    (tmp_path / "file").write_text("")
    run = plot.load_run(write_run(tmp_path / "run", encoded(*GOOD, FINAL)))
    with pytest.raises(plot.PlotError, match="cannot write the plot to"):
        plot.plot_arms({"a": [run]}, tmp_path / "file" / "val_loss.png")
