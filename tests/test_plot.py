"""plot.py: the picture and the comparison table from real tiny runs, bad input, and its independence from the rest."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from conftest import REPO, read_records, run_config, synthetic_text, write_text

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
