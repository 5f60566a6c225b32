"""Shared test setup: the read-only assets in ../shared, an offline tiktoken cache, and the helpers the test modules
share: tiny configs and runs, their command lines, metrics.jsonl readers, same-weights-and-optimizer assertions.

The shared folder is $PAIR_SHARED_DIR when set, else <repo>/../shared (see its README.md). Tokenizer files are
copied into a temporary TIKTOKEN_CACHE_DIR under the names tiktoken gives its downloads (sha1 of the URL), so
`tiktoken.get_encoding` never needs the network. wandb is disabled unless the environment says otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PAIR_SHARED_DIR") or REPO.parent / "shared").resolve()

# sha1(url) of each file tiktoken downloads -> the file's name in shared/tokenizers
TIKTOKEN_FILES = {
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "vocab.bpe",  # gpt2
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "encoder.json",  # gpt2
    "fb374d419588a4632f3f557e76b4b70aebbca790": "o200k_base.tiktoken",
}


def _offline_tiktoken_cache() -> None:
    """Point TIKTOKEN_CACHE_DIR at a temporary copy of the shared tokenizer files (unless it is already set)."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    source = SHARED / "tokenizers"
    if not all((source / name).is_file() for name in TIKTOKEN_FILES.values()):
        return  # no shared copies: tiktoken downloads them (needs the network)
    cache = Path(tempfile.mkdtemp(prefix="pair-tiktoken-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    for digest, name in TIKTOKEN_FILES.items():
        shutil.copyfile(source / name, cache / digest)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


# At import, before any test module builds a tokenizer or a run.
_offline_tiktoken_cache()
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compile: exercises torch.compile (slow on the CPU: tens of seconds); runs by default"
    )


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare: <repo>/data/tiny_shakespeare.txt if present, else the shared copy."""
    for path in (REPO / "data" / "tiny_shakespeare.txt", SHARED / "data" / "tiny_shakespeare.txt"):
        if path.is_file():
            return path
    pytest.fail(
        f"Tiny Shakespeare not found in {REPO / 'data'} or {SHARED / 'data'}; set PAIR_SHARED_DIR to the shared folder"
    )


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train.train() sets the float32 matmul precision, seeds and (compiled on a CPU) deterministic algorithms; keep
    one test's globals out of the next."""
    precision = torch.get_float32_matmul_precision()
    rng = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.set_rng_state(rng)
    torch.use_deterministic_algorithms(deterministic)


# ----------------------------------------------------------------------------------------------------------------
# Helpers for tiny models and runs (imported by the test modules as `from conftest import ...`)

# A model small enough that a forward pass is a millisecond: 2 blocks, 4 heads, 32 dim, context 16.
TINY = dict(
    num_blocks=2,
    num_heads=4,
    embedding_dim=32,
    context_len=16,
    batch_size=4,
    accumulation_steps=1,
    max_steps=10,
    warmup_steps=2,
    eval_every=0,
    eval_steps=2,
    log_every=1,
    tokenizer="char",
    torch_compile=False,
    num_samples=0,
    device="cpu",
)


def tiny_config(*bases: dict, **overrides):
    """Config(**TINY), then each dict of bases and the overrides on top, in that order."""
    from config import Config

    return Config(**_merged(TINY, *bases, overrides))


def run_values(folder: Path, data_path: Path | str, /, *bases: dict, **overrides) -> dict:
    """The values of a tiny training run "r" that reads data_path and writes its records under folder/runs and its
    checkpoints under folder/models; bases and overrides on top. A plain dict: it may hold bad values on purpose."""
    where = dict(
        data_path=str(data_path), runs_dir=str(folder / "runs"), save_model_dir=str(folder / "models"), run="r"
    )
    return _merged(TINY, where, *bases, overrides)


def run_config(folder: Path, data_path: Path | str, /, *bases: dict, **overrides):
    """run_values as a Config."""
    from config import Config

    return Config(**run_values(folder, data_path, *bases, **overrides))


def _merged(*dicts: dict) -> dict:
    return {key: value for values in dicts for key, value in values.items()}


def argv_of(values) -> list[str]:
    """The command line that parses back to values (a Config, or a dict of flags): `--name=value` each, leaving out
    None where None is the default."""
    from config import FIELDS

    items = values.items() if isinstance(values, dict) else values.to_dict().items()
    return [f"--{name}={value}" for name, value in items if not (value is None and FIELDS[name].default is None)]


def read_records(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path, keys: tuple[str, ...] = ("loss", "val_loss")) -> list[tuple]:
    """(step, record[key] or None for each key) for every record of a run."""
    return [(r["step"], *(r.get(key) for key in keys)) for r in read_records(run_dir)]


def _same(a, b, atol: float) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if atol == 0:
        return torch.equal(a, b)
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=atol)


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    """Two state dicts hold the same names and the same tensors: bit for bit, or each number within atol."""
    assert a.keys() == b.keys()
    differ = [name for name in a if not _same(a[name], b[name], atol)]
    assert not differ, differ


def assert_same_optimizer_state(a: list[dict], b: list[dict], atol: float = 0.0) -> None:
    """Two lists of optimizer state dicts (one per optimizer) hold the same per-parameter state."""
    for state_a, state_b in zip(a, b, strict=True):
        assert state_a["state"].keys() == state_b["state"].keys()
        for key, values in state_a["state"].items():
            for name, value in values.items():
                assert _same(value, state_b["state"][key][name], atol), (key, name)


def assert_same_state(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two checkpoint folders hold the same training state: weights and optimizer state."""
    from safetensors.torch import load_file

    assert_same_tensors(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"), atol)
    optimizers = [torch.load(folder / "optimizer.pt", weights_only=True) for folder in (a, b)]
    assert_same_optimizer_state(*optimizers, atol)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> torch.nn.Module:
    """Give every parameter random values: the real init zeroes the head and output projections, which would make
    logits constant and many tests vacuous."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        if p.dim() == 2:
            noise = noise * p.size(1) ** -0.5
        p.copy_((scale * noise).to(p.dtype))
    return model


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def synthetic_text(num_chars: int = 20_000, seed: int = 0) -> str:
    """A learnable text: short words from a small alphabet in a repeating-ish pattern, with newlines."""
    import random

    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "was", "red", "sun"]
    out, size = [], 0
    while size < num_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:num_chars]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread, and far faster on a CPU other processes share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def default_sigint() -> None:
    """preexec_fn for a subprocess a test interrupts with SIGINT: a background shell starts its commands with SIGINT
    ignored, Python then installs no KeyboardInterrupt handler, and the interrupt would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def call_with_deadline(fn, fifo: Path, seconds: float = 10.0):
    """fn() in a thread; if it is still blocked after `seconds` (opening a FIFO waits for a writer), a writer is
    opened and closed so the thread ends, and the test fails instead of hanging."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees end of file
        thread.join(5)
        pytest.fail(f"still blocked on the FIFO {fifo} after {seconds}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(autouse=True)
def memory_mapped_splits(monkeypatch):
    """Every split stays memory-mapped in tests (data.IN_MEMORY_TOKENS reads small ones into memory): the tests see
    the path a large corpus takes; tests/test_data.py checks the in-memory one gives the same batches."""
    import data

    monkeypatch.setattr(data, "IN_MEMORY_TOKENS", 0)


def fed_through_cache(model, idx, prefill: int):
    """(logits of one full forward of idx, logits of feeding idx through a KVCache: `prefill` tokens at once, then
    one at a time, concatenated, and that cache), for tests that the cache changes nothing."""
    import torch

    from model import KVCache

    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, len(idx), torch.device("cpu"), torch.float32)
        pieces = [model(idx[:, :prefill], cache=cache)] if prefill else []
        for t in range(prefill, idx.size(1)):
            pieces.append(model(idx[:, t : t + 1], cache=cache))
    return full, torch.cat(pieces, dim=1), cache


def train_losses(model, optimizers, x, y, steps: int) -> list[float]:
    """The loss of each of `steps` optimizer steps on the one batch (x, y)."""
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
