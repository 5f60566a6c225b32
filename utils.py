"""The small rest: device and dtype choice, seeding, stop signals, atomic writes, console formatting, FLOPs and MFU."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

# ----------------------------------------------------------------------------------------------------------------
# Device, dtype, seeds


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "--device mps was asked for but this machine has no Apple GPU; use --device auto or --device cpu"
        )
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls at about twice the fp32 rate (elsewhere bf16 is emulated and slower)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(name: str, device: torch.device, compiled: bool = False) -> torch.dtype:
    """The autocast dtype. auto: bf16 on CUDA; on a CPU, bf16 when compiled on a CPU with native bf16 matmuls
    (measured 36 vs 49 ms/step at --preset nanogpt-cpu, same loss), else fp32 (eager CPU attention is slow in bf16)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and compiled and cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast_for(dtype: torch.dtype, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh autocast context for each use (none in fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def check_writable(folder: str | Path, flag: str) -> None:
    """Refuse an unwritable output folder at the start, not at the first save hours later; creates nothing."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder, or where it would be created
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(
            f"{flag} {folder} is not writable ({error.strerror or error}); pick another folder or fix its permissions"
        ) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------------------------------------------
# Stopping on signals, and writing files that survive a crash


class StopNow(KeyboardInterrupt):
    """A second stop signal: leave at once (exit status 128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop at the next safe point (after the current step, between
    evaluation batches, between samples); a second one stops at once by raising StopNow."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum  # nothing printed here: the handler may have interrupted a print

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class FolderLock:
    """One writer per folder: an advisory lock (fcntl.flock) on a `.<name>.lock` file beside the folder, so the
    folder's own contents stay as they are. The OS drops the lock when its process dies (kill -9 leaves no stale
    lock); the file names the holder for the one-line error a second writer gets. No locking where fcntl is missing
    (Windows)."""

    def __init__(self, folder: Path):
        self.folder, self.path, self.handle = Path(folder), Path(folder).parent / f".{Path(folder).name}.lock", None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; False (and nothing held) when another process holds it, or with `wait`, once it is free."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it."""
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "another process"
        return "another process"

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock; the file stays (removing it would race a new holder)
            self.handle = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX: the folder's entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, payload: bytes | str | list) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the whole new one.
    `payload` may be a list of bytes-like pieces, written one after another without joining them (large shards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file made with open(), not mkstemp's private 0600
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in payload if isinstance(payload, list) else [payload]:
                f.write(piece.encode() if isinstance(piece, str) else piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def out_of_space(folder: Path, what: str, needed: int | None = None):
    """A full disk (or quota) while writing `what` into `folder` becomes one line saying so. Libraries report it in
    their own ways (safetensors, torch.save), so with `needed` bytes any failure with less than that free counts."""
    try:
        yield
    except Exception as error:
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        with contextlib.suppress(OSError):
            full = full or (needed is not None and shutil.disk_usage(folder).free < needed)
        if not full:
            raise
        size = f" (it needs about {needed / 2**20:.1f} MiB)" if needed else ""
        raise UserError(f"no space left in {folder} for {what}{size}; free some space or write elsewhere") from None


# ----------------------------------------------------------------------------------------------------------------
# Console formatting


def human(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def banner(lines: dict[str, str | None]) -> None:
    """The start-of-run summary, one aligned `key : value` line each (None values are left out)."""
    lines = {k: v for k, v in lines.items() if v is not None}
    width = max(len(k) for k in lines)
    print("=" * 78)
    for key, value in lines.items():
        print(f"{key:>{width}} : {value}")
    print("=" * 78, flush=True)


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """One logged step for the console: step, loss, lr, grad norm, ms/step, tok/s, MFU and val loss if any."""
    width = len(str(total_steps))
    line = (
        f"step {record['step']:>{width}}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
        f"grad {record['grad_norm']:6.3f} | {record['step_ms']:7.1f} ms/step | {human(record['tok_per_s']):>6} tok/s | "
        + (f"MFU {100 * record['mfu']:4.1f}%" if record["mfu"] is not None else "MFU  n/a")
    )
    if "val_loss" in record:
        line += f" | val {record['val_loss']:.4f}"
    return line


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and MFU

CPU_PEAK_CACHE = Path(__file__).resolve().parent / "data" / "cache" / "cpu_peak_flops.json"  # the probe's results

# Dense (not 2:4-sparse) bf16/fp16 tensor-core peaks in FLOP/s, matched against the device name, most specific first.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def flops_per_token(non_embedding_params: int, num_blocks: int, num_heads: int, head_dim: int, context_len: int) -> int:
    """Training FLOPs per token, PaLM appendix B: 6N for the matmuls (N = non-embedding parameters, which here
    include the LM head) plus 12 L H Q T for attention scores and their weighted sum (forward and backward)."""
    return 6 * non_embedding_params + 12 * num_blocks * num_heads * head_dim * context_len


def gpu_peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in GPU_PEAK_FLOPS if key.lower() in device_name.lower()), None)


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """The achievable matmul FLOP/s of this CPU with the current thread count: a short probe."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def cpu_peak_flops(dtype: torch.dtype, cache_file: Path = CPU_PEAK_CACHE) -> float:
    """measure_cpu_peak_flops, cached per CPU model, thread count and dtype (the probe takes about a second)."""
    cpu = platform.processor() or platform.machine()
    key = f"{cpu}|{torch.get_num_threads()} threads|{dtype}"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure again
        known = {}
    known = known if isinstance(known, dict) else {}
    if not isinstance(known.get(key), (int, float)):
        known[key] = measure_cpu_peak_flops(dtype)
        with contextlib.suppress(OSError):  # a read-only checkout just probes every time
            atomic_write(cache_file, json.dumps(known, indent=2) + "\n")
    return float(known[key])


def peak_flops(
    device: torch.device, dtype: torch.dtype, override: float | None, world_size: int = 1, cache: Path = CPU_PEAK_CACHE
) -> tuple[float | None, str]:
    """(peak FLOP/s of the devices in use, how it was found): --peak_flops, the GPU table or a CPU probe for one
    device, times the ranks of a torchrun job (MFU counts every rank's work); None = 'n/a'."""
    peak, source = _device_peak_flops(device, dtype, override, cache)
    if peak and world_size > 1:
        return peak * world_size, f"{world_size} x {source}"
    return peak, source


def _device_peak_flops(device: torch.device, dtype: torch.dtype, override: float | None, cache: Path):
    if override:
        return override, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        return peak, f"{name} dense bf16 table" if peak else f"{name} not in the table (use --peak_flops)"
    if device.type == "cpu":
        return cpu_peak_flops(dtype, cache), "measured CPU matmul peak"
    return None, f"{device.type} peak unknown (use --peak_flops)"


# ----------------------------------------------------------------------------------------------------------------
# Input files


def check_regular_file(path: str | Path, flag: str, expected: str = "a regular file") -> Path:
    """Refuse an input that is not a regular file in one line, before anything opens it: a folder cannot be read,
    and a FIFO, a socket or a device (/dev/zero, a terminal) could block or never end. Symlinks are followed."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise UserError(f"cannot read {flag} {path}: no such file; give {expected}") from None
    except OSError as error:
        raise UserError(f"cannot read {flag} {path}: {error.strerror or error}; give {expected}") from None
    if stat.S_ISREG(mode):
        return Path(path)
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe), not a regular file"),
        (stat.S_ISCHR, "a character device, not a regular file"),
        (stat.S_ISBLK, "a block device, not a regular file"),
        (stat.S_ISSOCK, "a socket, not a regular file"),
    )
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise UserError(f"cannot read {flag} {path}: it is {kind}; give {expected}")
