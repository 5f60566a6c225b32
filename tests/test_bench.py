"""The learning-speed benchmark: its curve arithmetic and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO, synthetic_text, write_text


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seconds_to_reach_interpolates_between_evaluations():
    bench = load_bench("bench_learning")
    curve = [(10.0, 2.4), (20.0, 2.0), (30.0, 1.8)]
    assert bench.seconds_to_reach(curve, 2.2) == pytest.approx(15.0)
    assert bench.seconds_to_reach(curve, 1.8) == pytest.approx(30.0)
    assert bench.seconds_to_reach(curve, 2.5) == 10.0  # already there at the first evaluation
    assert bench.seconds_to_reach(curve, 1.7) is None


def test_learning_benchmark_runs_and_writes_json(tmp_path, capsys):
    bench = load_bench("bench_learning")
    data_path = write_text(tmp_path / "text.txt", synthetic_text(5_000))
    flags = ["--data_path", str(data_path), "--num_blocks", "1", "--embedding_dim", "32", "--context_len", "16"]
    flags += ["--max_steps", "4", "--eval_every", "2", "--eval_steps", "2", "--torch_compile", "False"]
    out = tmp_path / "learning.json"
    argv = ["--presets", "nanogpt-cpu,speedrun-cpu", "--repeats", "1", "--runs_dir", str(tmp_path / "runs")]
    assert bench.main([*argv, "--out", str(out), *flags]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["preset"] for r in rows] == ["nanogpt-cpu", "speedrun-cpu"]
    for row in rows:
        assert row["steps"] == 4 and row["final_val"] > 0
        assert [point[0] for point in row["curves"][0]] == sorted(point[0] for point in row["curves"][0])
    assert "s to 1.6" in capsys.readouterr().out


def test_learning_benchmark_refuses_bad_flags_in_one_line(tmp_path, capsys):
    bench = load_bench("bench_learning")
    assert bench.main(["--presets", "no-such-preset", "--runs_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --preset: invalid choice")


def test_train_benchmark_times_the_real_step_and_writes_json(tmp_path, capsys):
    bench = load_bench("bench_train")
    out = tmp_path / "train.json"
    flags = ["--num_blocks", "1", "--embedding_dim", "32", "--context_len", "16", "--batch_size", "2"]
    flags += ["--accumulation_steps", "2", "--peak_flops", "1e12", "--device", "cpu"]
    argv = ["--steps", "2", "--repeats", "2", "--variants", "eager-fp32,eager-bf16", "--out", str(out)]
    assert bench.main([*argv, *flags]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager-fp32", "eager-bf16"]
    for row in rows:
        assert row["ms_per_step"] > 0 and len(row["rounds_ms"]) == 2 and row["mfu"] > 0
        assert row["tok_per_s"] == pytest.approx(2 * 16 * 2 / row["ms_per_step"] * 1000, rel=0.01)


def test_data_benchmark_prepares_trains_and_writes_json(tmp_path, capsys):
    bench = load_bench("bench_data")
    out = tmp_path / "data.json"
    argv = ["--size_mb", "0.2", "--workers", "2", "--val_frac", "0.05", "--train_steps", "1", "--out", str(out)]
    argv += ["--loader_batches", "20", "--step_repeats", "2", "--keep", str(tmp_path / "work")]
    argv += ["--baseline", str(write_text(tmp_path / "baseline.txt", synthetic_text(5_000)))]  # not Shakespeare: fast
    flags = ["--num_blocks", "1", "--embedding_dim", "32", "--context_len", "16", "--torch_compile", "False"]
    flags += ["--peak_flops", "1e12", "--val_tokens", "256"]  # no CPU peak measurement, a short final evaluation
    assert bench.main([*argv, *flags]) == 0
    result = json.loads(out.read_text())
    assert {"date", "machine", "corpus", "tokens", "prepare", "prepare_speedup", "train", "step_ms"} <= result.keys()
    assert result["machine"]["cores"] > 0 and result["machine"]["torch"]
    assert result["corpus"]["bytes"] >= 0.2 * 2**20 and result["corpus"]["txt_files"] > 0
    assert {p.suffix for p in (tmp_path / "work" / "corpus").rglob("*.*")} == {".jsonl", ".txt"}
    assert [run["workers"] for run in result["prepare"]] == [1, 2]
    for run in result["prepare"]:
        assert run["mb_per_s"] > 0 and run["seconds"] > 0 and run["peak_rss_mb"] > 0
    assert set(result["train"]) == {"corpus", "baseline"}
    for run in result["train"].values():
        assert run["seconds"] > 0 and run["peak_rss_mb"] > 0
    assert result["prepare_speedup"] > 0 and result["loader_ms"] > 0 and result["loader_pct_of_step"] > 0
    assert "speed-up" in capsys.readouterr().out
