"""Serving under load: `uv run bench/bench_serve.py --clients 8 [--seconds 30] [--checkpoint models/<run>]`.

Starts serve.py as its own process on a free port of 127.0.0.1 (a model of the `cpu` preset's shape with random
weights unless --checkpoint names one), then N clients stream completions back to back for a fixed time, each
request `--max_tokens` tokens at temperature 0.8 with a seed of its own. Prints requests/s, tokens/s, the p50/p99
time to first token and time between tokens, the errors (any is a failure: exit status 1) and the server's resident
memory at the start and the end; the JSON (bench/results/serve_<N>clients.json by default) keeps it all. Requests
still running at the deadline are finished and counted; the rates divide by the time until the last one ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import the repo

import torch  # noqa: E402

from checkpoint import save_checkpoint  # noqa: E402
from config import PRESETS, Config  # noqa: E402
from model import GPT  # noqa: E402
from serve import Limits  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65 characters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long clients start requests (default: 30)")
    parser.add_argument("--max_tokens", type=int, default=64, help="tokens per request (default: 64)")
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: the cpu preset's shape, random weights)")
    default = Limits()  # serve.py's own defaults
    parser.add_argument(
        "--workers", type=int, default=default.workers, help="serve.py --workers (default: %(default)s)"
    )
    parser.add_argument(
        "--threads", type=int, default=default.threads, help="serve.py --threads (default: %(default)s)"
    )
    parser.add_argument("--out", help="JSON path (default: bench/results/serve_<N>clients.json)")
    return parser.parse_args(argv)


def random_checkpoint(folder: Path) -> Path:
    """A char model of the cpu preset's shape (4 blocks x 4 heads x 128 dim, context 128), randomly initialised."""
    cfg = Config(**{**PRESETS["cpu"], "torch_compile": False, "device": "cpu"})
    torch.manual_seed(0)
    model = GPT(cfg, len(CHARS))
    save_checkpoint(folder / "bench", 0, model, CharTokenizer(CHARS).to_dict())
    return folder / "bench"


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(checkpoint: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(checkpoint), "--port", "0"]
    command += ["--workers", str(args.workers), "--threads", str(args.threads)]
    command += ["--max_tokens_cap", str(max(args.max_tokens, 1))]
    command += ["--queue", str(max(64, args.clients))]  # every client admitted: waiting is what is measured
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    for line in server.stdout:
        if found := re.search(r"playground: (http://\S+?)/ ", line):
            return server, found.group(1)
    raise SystemExit(f"serve.py exited before it listened (status {server.wait()})")


async def client(url: str, model: str, index: int, deadline: float, args: argparse.Namespace, log: dict) -> None:
    """Stream completions back to back until the deadline; record each request's timings or its error."""
    async with httpx.AsyncClient(timeout=120) as http:
        request = 0
        while time.perf_counter() < deadline:
            body = {"model": model, "prompt": PROMPT, "max_tokens": args.max_tokens, "temperature": 0.8}
            body |= {"seed": index * 1_000_000 + request, "stream": True, "stream_options": {"include_usage": True}}
            request += 1
            started, stamps, tokens = time.perf_counter(), [], 0
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                            stamps.append(time.perf_counter())  # one token per chunk (no stop sequences)
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except Exception as error:  # counted, and the client goes on
                log["errors"].append(f"{type(error).__name__}: {error}")
                continue
            log["ttft"].append(stamps[0] - started if stamps else float("nan"))
            log["gaps"].extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
            log["tokens"] += tokens
            log["requests"] += 1
            log["ended"] = time.perf_counter()


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def load(url: str, model: str, args: argparse.Namespace) -> dict:
    log: dict = {"ttft": [], "gaps": [], "errors": [], "tokens": 0, "requests": 0, "ended": 0.0}
    started = time.perf_counter()
    deadline = started + args.seconds
    await asyncio.gather(*(client(url, model, i, deadline, args, log) for i in range(args.clients)))
    log["seconds"] = max(log["ended"], deadline) - started
    return log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_tokens < 1:
        print(
            "error: --clients and --max_tokens must be positive integers, --seconds a positive number", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(folder))
        server, url = start_server(checkpoint, args)
        try:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
            rss_start = rss_mb(server.pid)
            log = asyncio.run(load(url, model, args))
            rss_end = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(30)
    ms = 1000.0
    row = {
        "clients": args.clients,
        "seconds": round(log["seconds"], 2),
        "max_tokens": args.max_tokens,
        "requests": log["requests"],
        "requests_per_s": log["requests"] / log["seconds"],
        "tokens_per_s": log["tokens"] / log["seconds"],
        "ttft_p50_ms": percentile(log["ttft"], 50) * ms,
        "ttft_p99_ms": percentile(log["ttft"], 99) * ms,
        "token_gap_p50_ms": percentile(log["gaps"], 50) * ms,
        "token_gap_p99_ms": percentile(log["gaps"], 99) * ms,
        "token_gap_mean_ms": statistics.fmean(log["gaps"]) * ms if log["gaps"] else float("nan"),
        "errors": len(log["errors"]),
        "first_errors": log["errors"][:5],
        "server_rss_mb_start": round(rss_start, 1),
        "server_rss_mb_end": round(rss_end, 1),
    }
    print(
        f"{args.clients} clients, {row['seconds']:.1f} s: {row['requests']} requests ({row['requests_per_s']:.2f}/s), "
        f"{row['tokens_per_s']:.0f} tokens/s\n"
        f"time to first token p50 {row['ttft_p50_ms']:.1f} ms, p99 {row['ttft_p99_ms']:.1f} ms; "
        f"between tokens p50 {row['token_gap_p50_ms']:.2f} ms, p99 {row['token_gap_p99_ms']:.2f} ms\n"
        f"errors: {row['errors']}; server RSS {row['server_rss_mb_start']:.0f} MB at the start, "
        f"{row['server_rss_mb_end']:.0f} MB at the end"
    )
    for error in row["first_errors"]:
        print(f"  error: {error}")
    result = {
        "benchmark": "serve",
        "checkpoint": args.checkpoint or "random weights, cpu preset shape (4 x 4 x 128, context 128, char)",
        "server": {"workers": args.workers, "threads": args.threads},
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "row": row,
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"serve_{args.clients}clients.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
