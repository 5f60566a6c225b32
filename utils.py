"""Small shared helpers: tokenizers, device and dtype choice, torchrun processes, seeding, console formatting."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import platform
import random
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from config import UserError

# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


class CharTokenizer:
    """One id per distinct character of the text (sorted), as in nanoGPT's shakespeare_char."""

    name = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._ids = {c: i for i, c in enumerate(chars)}
        self.start_id = self._ids.get("\n", 0)  # what an empty prompt starts from

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self._ids})
            raise ValueError(
                f"the char tokenizer never saw {''.join(unknown)!r} in its training text; remove those characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


class TiktokenTokenizer:
    """gpt2 or o200k_base BPE through tiktoken (downloaded once into its cache; TIKTOKEN_CACHE_DIR for offline use)."""

    def __init__(self, name: str):
        import tiktoken

        try:
            self._enc = tiktoken.get_encoding(name)
        except Exception as error:
            raise UserError(
                f"could not load the {name} tokenizer ({type(error).__name__}); offline? put its files in a folder "
                "named as tiktoken caches them and set TIKTOKEN_CACHE_DIR to it (see README), or use --tokenizer char"
            ) from None
        self.name = name
        self.vocab_size = self._enc.n_vocab
        self.start_id = self._enc.eot_token  # <|endoftext|>: what an empty prompt starts from

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


Tokenizer = CharTokenizer | TiktokenTokenizer


def build_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    if name == "char":
        if text is None:
            raise ValueError("the char tokenizer is built from the training text")
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)


def tokenizer_from_dict(values: dict[str, Any]) -> Tokenizer:
    return CharTokenizer(values["chars"]) if values["name"] == "char" else TiktokenTokenizer(values["name"])


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


# ----------------------------------------------------------------------------------------------------------------
# Processes: stopping on signals, and several processes (torchrun starts one per device and sets RANK,
# WORLD_SIZE and LOCAL_RANK)


class StopSignals:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum  # nothing printed here: the handler may have interrupted a print

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1, making no torch.distributed calls, without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None  # "nccl" or "gloo" once a process group is up
    control: Any = None  # a gloo group for small CPU-side agreements, so they never wait on the GPU (None: default)
    owned: bool = False  # this process started the process group, so it ends it

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks, in place on the tensor's device (queued, not waited for, on NCCL)."""
        if self.active:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def all_reduce(self, *values: float, op: str = "sum") -> list[float]:
        """The sum (or "max") of each number over all ranks; the numbers as they are in one process."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.control)
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a picklable object)."""
        if not self.active:
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src=0, group=self.control)
        return objects[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` in rank order on rank 0; None on the others."""
        if not self.active:
            return [obj]
        objects = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, objects, dst=0, group=self.control)
        return objects

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.control)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job this process belongs to (NCCL and one GPU per local rank on CUDA, gloo on the CPU);
    without torchrun's variables, a single process on resolve_device's choice."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Distributed(), device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun needs CUDA (NCCL) or the CPU (gloo), not {device.type}; use --device cpu")
    # torch._dynamo keeps references to a process group that exists when it is first imported (AdamW imports it):
    # the group would then outlive destroy_process_group, and its threads can abort the interpreter's exit
    importlib.import_module("torch._dynamo")
    owned = not dist.is_initialized()
    if owned:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    backend = dist.get_backend()
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size(), backend, control, owned), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


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


def cpu_peak_flops(dtype: torch.dtype, cache_dir: Path) -> float:
    """measure_cpu_peak_flops, cached per CPU model, thread count and dtype (the probe takes about a second)."""
    cpu = platform.processor() or platform.machine()
    key = f"{cpu}|{torch.get_num_threads()} threads|{dtype}"
    path = cache_dir / "cpu_peak_flops.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        known[key] = measure_cpu_peak_flops(dtype)
        with contextlib.suppress(OSError):
            cache_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(known, indent=2) + "\n")
    return known[key]


def peak_flops(
    device: torch.device, dtype: torch.dtype, override: float | None, cache_dir: Path
) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, how it was found): --peak_flops, the GPU table, a CPU probe, or None = 'n/a'."""
    if override:
        return override, "--peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        return peak, f"{name} dense bf16 table" if peak else f"{name} not in the table (use --peak_flops)"
    if device.type == "cpu":
        return cpu_peak_flops(dtype, cache_dir), "measured CPU matmul peak"
    return None, f"{device.type} peak unknown (use --peak_flops)"
