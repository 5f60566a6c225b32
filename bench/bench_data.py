"""Data pipeline: prepare.py MB/s (1 process vs all cores) and peak memory, training memory from shards, loader ms/batch.

    uv run bench/bench_data.py                                   # a 1 GB synthetic corpus, gpt2, every core
    uv run bench/bench_data.py --size_mb 256 --workers 2 --out bench/results/data.json
    uv run bench/bench_data.py --size_mb 64 --keep /tmp/corpus --num_blocks 2   # any train.py flag applies to training

The corpus is synthetic and deterministic: words drawn with Zipf frequencies from a fixed made-up vocabulary into
documents of log-normal length, streamed into a few .jsonl files plus some .txt files (one document each).
prepare.py and train.py run as subprocesses so each one's peak RSS is its own (see run_measured). Training from the
prepared folder is compared with training on Tiny Shakespeare (--baseline), same tokenizer and model, so the
difference in private memory is the data's (RSS also counts the shards' page cache: see run_measured). The loader is TrainBatches.next_batch over the memory-mapped ShardTokens, against the time
of Trainer.step. Run it on a quiet machine: the timings are wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402

from config import UserError, parse_args  # noqa: E402
from data import TrainBatches, load_dataset  # noqa: E402
from utils import resolve_device, resolve_dtype  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = "data/tiny_shakespeare.txt"
JSONL_FILES = 4  # the corpus's bulk, split evenly
TXT_EVERY = 200  # every 200th document (from the first) goes to its own .txt file instead
SAMPLE_S = 0.1  # how often the process tree's memory is sampled: more often costs the measured run CPU


# ----------------------------------------------------------------------------------------------------------------
# The corpus


def make_vocabulary(seed: int, size: int = 20_000) -> tuple[list[str], np.ndarray]:
    """(words, cumulative probabilities): made-up words of 1-4 syllables, Zipf (1/rank) frequencies; each word also
    comes with a comma or a full stop, and a paragraph break is one of the words."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    base: list[str] = []
    seen: set[str] = set()
    while len(base) < size:
        word = "".join(syllables[i] for i in rng.integers(len(syllables), size=1 + min(3, int(rng.exponential(1.0)))))
        if word not in seen:
            seen.add(word)
            base.append(word)
    zipf = 1.0 / np.arange(1, size + 1)
    words = base + [w + "," for w in base] + [w + "." for w in base] + ["\n\n"]
    weights = np.concatenate([0.88 * zipf, 0.06 * zipf, 0.06 * zipf, [0.01 * zipf.sum()]])
    return words, np.cumsum(weights / weights.sum())


def write_corpus(folder: Path, size_bytes: int, seed: int = 0) -> tuple[int, int, int]:
    """Write about size_bytes of documents into folder, one document at a time (never the corpus in memory);
    returns (bytes written, documents, .txt files)."""
    words, cumulative = make_vocabulary(seed)
    rng = np.random.default_rng(seed + 1)
    (folder / "txt").mkdir(parents=True, exist_ok=True)
    per_file = max(1, size_bytes // JSONL_FILES)
    written, docs, txts, file_index, in_file = 0, 0, 0, 0, 0
    out = open(folder / f"part_{file_index:02d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (rotated below)
    try:
        while written < size_bytes:
            length = max(5, int(rng.lognormal(5.5, 0.8)))  # words: median ~250, a long tail of long documents
            ids = np.searchsorted(cumulative, rng.random(length)).tolist()
            text = " ".join(words[i] for i in ids).replace(" \n\n ", "\n\n").strip()
            text = text[:1].upper() + text[1:]
            if docs % TXT_EVERY == 0:
                size = (folder / "txt" / f"doc_{txts:06d}.txt").write_text(text, encoding="utf-8")
                txts += 1
            else:
                if in_file >= per_file and file_index < JSONL_FILES - 1:
                    out.close()
                    file_index, in_file = file_index + 1, 0
                    out = open(folder / f"part_{file_index:02d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
                size = out.write(json.dumps({"text": text}) + "\n")  # ASCII: characters are bytes
                in_file += size
            written, docs = written + size, docs + 1
    finally:
        out.close()
    return written, docs, txts


# ----------------------------------------------------------------------------------------------------------------
# Subprocesses, timed and measured


def tree_memory_mb(root: int) -> tuple[float, float, float, float]:
    """(PSS, RSS) of `root` and its descendants now, summed, the largest one's peak RSS so far (VmHWM) and the
    largest one's private memory now (RssAnon: what it allocated, no file pages), in MB, from /proc (zeros without
    one). PSS splits each shared page among the processes mapping it (forked workers are
    not counted twice, but neither are the torch libraries other processes on the machine also map); the RSS sum
    counts shared pages once per process: the truth is between."""
    pss, rss, hwm, anon, todo = 0, 0, 0, 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):  # a child belongs to the thread that started it
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
            with open(f"/proc/{pid}/status") as f:
                status = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
            pss, rss = pss + fields["Pss"], rss + fields["Rss"]  # kB
            hwm, anon = max(hwm, status["VmHWM"]), max(anon, status["RssAnon"])
        except (OSError, KeyError, ValueError):
            continue  # gone meanwhile, or no /proc
    return pss / 1024, rss / 1024, hwm / 1024, anon / 1024


# run_measured's memory columns, in the order the tables print them
MEMORY_KEYS = ("peak_rss_mb", "peak_private_mb", "peak_tree_pss_mb", "peak_tree_rss_mb")


def run_measured(command: list[str]) -> dict[str, float]:
    """Run command to the end; its wall seconds and its peaks, in MB:
    - peak_rss_mb: the largest single process's peak RSS: the kernel's high-water mark (VmHWM), as last read
      before the process ended (what it gains in the last SAMPLE_S seconds can be missed). Not ru_maxrss from
      wait4: a child's maxrss includes its forked copy of this benchmark before exec (measured: `python -c pass`
      gave 536 MB, and 1036 MB with 500 MB more here), which once showed as +229 MB of "training RSS". Without
      /proc (macOS) ru_maxrss is all there is, with that caveat.
    - peak_private_mb: the largest single process's private memory (RssAnon), sampled: what it allocated. The RSS
      also counts the file pages it maps, and the shards' pages right after prepare.py wrote them count far more
      (measured: a 20-step run on the 1 GB corpus right after prepare 1812 MB RSS, 679 MB of it file pages; the
      same run later 1501 MB, 412 of file pages; its private memory 1133 MB both times): page cache the kernel
      can drop, not memory training needs. Training's own memory is this column.
    - peak_tree_pss_mb, peak_tree_rss_mb: the whole tree's memory (prepare.py and its workers; see tree_memory_mb),
      sampled every SAMPLE_S seconds, so a spike shorter than that can be missed; 0 without /proc (not Linux)."""
    started = time.perf_counter()
    # a file, not a pipe: a pipe nobody reads while we wait would fill and block the child
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    peak_pss, peak_rss, peak_hwm, peak_anon = 0.0, 0.0, 0.0, 0.0
    while True:  # wait4 reaps the child itself: Popen.poll would reap it first and its rusage would be lost
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        pss, rss, hwm, anon = tree_memory_mb(process.pid)
        peak_pss, peak_rss, peak_hwm = max(peak_pss, pss), max(peak_rss, rss), max(peak_hwm, hwm)
        peak_anon = max(peak_anon, anon)
        time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    log.seek(0)
    output = log.read().decode("utf-8", "replace")
    log.close()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output[-3000:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, kB on Linux
    peak = peak_hwm or usage.ru_maxrss * scale / 2**20
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "peak_private_mb": peak_anon,
        "peak_tree_pss_mb": peak_pss,
        "peak_tree_rss_mb": peak_rss,
    }


def prepare_run(corpus: Path, out: Path, tokenizer: str, workers: int, val_frac: float) -> dict[str, Any]:
    command = [sys.executable, str(REPO / "prepare.py"), str(corpus), "--out", str(out), "--tokenizer", tokenizer]
    result = run_measured([*command, "--workers", str(workers), "--val_frac", str(val_frac)])
    manifest = json.loads((out / "manifest.json").read_text())
    result["tokens"] = sum(split["tokens"] for split in manifest["splits"].values())
    return result | {"workers": workers, "splits": manifest["splits"]}


def train_run(data_path: str, tokenizer: str, steps: int, runs_dir: Path, name: str, extra: list[str]) -> dict:
    command = [sys.executable, str(REPO / "train.py"), "--preset", "nanogpt-cpu", "--data_path", data_path]
    command += ["--tokenizer", tokenizer, "--max_steps", str(steps), "--num_samples", "0", "--eval_every", "0"]
    command += ["--runs_dir", str(runs_dir), "--run", name, "--save_model", "False", *extra]
    return run_measured(command)


# ----------------------------------------------------------------------------------------------------------------
# The loader against the step


def loader_ms(cfg, batches: int) -> float:
    """Median ms of TrainBatches.next_batch over cfg.data_path's training tokens at cfg's batch shape."""
    train = load_dataset(cfg).train
    loader = TrainBatches(train, cfg.batch_size, cfg.context_len, cfg.seed, resolve_device(cfg.device))
    for _ in range(10):  # the first windows touch cold pages of the memory map
        loader.next_batch()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        loader.next_batch()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_ms(cfg, vocab_size: int, steps: int) -> float:
    """Median ms of Trainer.step as train.py runs it (compile and dtype as cfg says), via bench_train's harness;
    its own batches come from an in-memory tensor, and include the loader's cost for that."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, cfg.torch_compile)
    _, step, _ = bench_train.make_variant(cfg, vocab_size, device, cfg.torch_compile, dtype)
    step()
    return bench_train.time_steps(step, steps, device)


def memory_columns(run: dict[str, float]) -> str:
    return f"{run['seconds']:>9.1f}" + "".join(f"{run[key]:>7.0f} MB" for key in MEMORY_KEYS)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, default=1024, help="synthetic corpus size, MB (2**20 bytes)")
    parser.add_argument("--tokenizer", default="gpt2", choices=("gpt2", "o200k_base", "char"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the parallel prepare's processes")
    parser.add_argument("--val_frac", type=float, default=0.001, help="prepare.py's --val_frac")
    parser.add_argument("--train_steps", type=int, default=20, help="steps of each training run")
    parser.add_argument("--loader_batches", type=int, default=2000, help="next_batch calls timed")
    parser.add_argument("--step_repeats", type=int, default=20, help="Trainer.step calls timed")
    parser.add_argument("--baseline", default=SHAKESPEARE, help="the text file training RSS is compared against")
    parser.add_argument("--keep", default=None, help="put the corpus and prepared folders here and keep them")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args, extra = parser.parse_known_args(argv)  # the rest are train.py flags, for both training runs
    try:
        cfg = parse_args(["--preset", "nanogpt-cpu", "--tokenizer", args.tokenizer, *extra])
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        return measure(args, extra, cfg, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, extra: list[str], cfg, work: Path) -> int:
    corpus, prepared, runs = work / "corpus", work / "prepared", work / "runs"
    started = time.perf_counter()
    done = work / "corpus.json"  # beside the corpus: prepare.py would count a file inside as skipped
    if done.exists() and json.loads(done.read_text())[0] == args.size_mb:  # a kept corpus of this size is reused
        _, size, docs, txts = json.loads(done.read_text())
    else:
        shutil.rmtree(corpus, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        size, docs, txts = write_corpus(corpus, int(args.size_mb * 2**20))
        done.write_text(json.dumps([args.size_mb, size, docs, txts]))
    print(f"corpus: {size / 2**20:.1f} MB, {docs} documents ({txts} .txt) in {time.perf_counter() - started:.0f}s")

    prepares = []
    for workers in dict.fromkeys((1, args.workers)):  # 1 process, then all cores (once if they are the same)
        out = prepared / f"workers{workers}"
        shutil.rmtree(out, ignore_errors=True)  # prepare.py would find a finished run and do nothing
        run = prepare_run(corpus, out, args.tokenizer, workers, args.val_frac)
        run["mb_per_s"] = size / 2**20 / run["seconds"]
        prepares.append(run)
        print(f"prepare, {workers} workers: {run['seconds']:.1f}s, {run['mb_per_s']:.1f} MB/s", flush=True)
    if prepares[0]["splits"] != prepares[-1]["splits"]:
        raise RuntimeError("prepare.py wrote different shards for 1 and for several workers")
    data_dir = prepared / f"workers{args.workers}"

    # one run first, not measured: the first run after a code change compiles from scratch, and inductor's compile
    # raises that run's peak RSS by a few hundred MB; the measured runs then both find its cache warm
    train_run(args.baseline, args.tokenizer, args.train_steps, runs, "warm-up", extra)
    trains = {}
    for name, data_path in (("corpus", str(data_dir)), ("baseline", args.baseline)):
        trains[name] = train_run(data_path, args.tokenizer, args.train_steps, runs, name, extra)
        print(f"train on {name}: peak private memory {trains[name]['peak_private_mb']:.0f} MB", flush=True)

    flags = ["--preset", "nanogpt-cpu", "--tokenizer", args.tokenizer]
    corpus_cfg = parse_args([*flags, "--data_path", str(data_dir), *extra])
    baseline_cfg = parse_args([*flags, "--data_path", args.baseline, *extra])
    loader_shards = loader_ms(corpus_cfg, args.loader_batches)
    loader_baseline = loader_ms(baseline_cfg, args.loader_batches)  # Tiny Shakespeare's (1M tokens), for comparison
    vocab_size = json.loads((data_dir / "manifest.json").read_text())["vocab_size"]
    step = step_ms(corpus_cfg, vocab_size, args.step_repeats)

    one, many = prepares[0], prepares[-1]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "tokenizer": args.tokenizer,
        "corpus": {"mb": round(size / 2**20, 2), "bytes": size, "documents": docs, "txt_files": txts},
        "tokens": one["tokens"],
        "prepare": [
            {key: round(run[key], 3) for key in ("seconds", "mb_per_s", *MEMORY_KEYS)} | {"workers": run["workers"]}
            for run in prepares
        ],
        "prepare_speedup": round(many["mb_per_s"] / one["mb_per_s"], 3),
        "baseline": args.baseline,
        "train_steps": args.train_steps,
        "train_config": {
            k: getattr(corpus_cfg, k) for k in ("num_blocks", "embedding_dim", "batch_size", "context_len")
        },
        "train": {name: {k: round(v, 3) for k, v in run.items()} for name, run in trains.items()},
        "train_rss_difference_mb": round(trains["corpus"]["peak_rss_mb"] - trains["baseline"]["peak_rss_mb"], 1),
        "train_private_difference_mb": round(
            trains["corpus"]["peak_private_mb"] - trains["baseline"]["peak_private_mb"], 1
        ),
        "loader_ms": round(loader_shards, 4),
        "loader_baseline_ms": round(loader_baseline, 4),
        "step_ms": round(step, 3),
        "loader_pct_of_step": round(100 * loader_shards / step, 3),
        "extra_flags": extra,
    }

    print(f"\n{size / 2**20:.0f} MB corpus, {one['tokens']:,} {args.tokenizer} tokens, {os.cpu_count()} cores")
    print(f"{'':<22}{'MB/s':>8}{'seconds':>9}{'max RSS':>10}{'private':>10}{'tree PSS':>10}{'tree RSS':>10}")
    for run in prepares:
        label = f"prepare, {run['workers']} worker{'s' if run['workers'] > 1 else ''}"
        print(f"{label:<22}{run['mb_per_s']:>8.1f}" + memory_columns(run))
    for name, run in trains.items():
        print(f"{f'train {args.train_steps} steps, {name}':<22}{'':>8}" + memory_columns(run))
    print(
        f"prepare speed-up {result['prepare_speedup']:.2f}x (target with 2 workers >= 1.8x); RSS target < 1 GB per GB"
    )
    print(
        f"training memory, corpus - baseline: private {result['train_private_difference_mb']:+.0f} MB (target: "
        f"within ~100 MB), RSS {result['train_rss_difference_mb']:+.0f} MB (with the shards' page cache)"
    )
    print(
        f"loader {loader_shards:.3f} ms/batch from the corpus ({loader_baseline:.3f} from Tiny Shakespeare), step "
        f"{step:.1f} ms: "
        f"{result['loader_pct_of_step']:.2f}% (target < 2%)"
    )
    print(
        "(max RSS: the largest single process's high-water mark; private: its own memory, no file pages; tree: the "
        "process and its workers, summed; all but max RSS sampled)"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
