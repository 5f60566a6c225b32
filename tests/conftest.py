"""Shared test setup: the read-only assets in ../shared, an offline tiktoken cache, and a few tiny-model helpers.

The shared folder is $PAIR_SHARED_DIR when set, else <repo>/../shared (see its README.md). Tokenizer files are
copied into a temporary TIKTOKEN_CACHE_DIR under the names tiktoken gives its downloads (sha1 of the URL), so
`tiktoken.get_encoding` never needs the network. wandb is disabled unless the environment says otherwise.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
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
    """train.train() sets the float32 matmul precision and seeds; keep one test's globals out of the next."""
    precision = torch.get_float32_matmul_precision()
    rng = torch.get_rng_state()
    yield
    torch.set_float32_matmul_precision(precision)
    torch.set_rng_state(rng)


# ----------------------------------------------------------------------------------------------------------------
# Helpers for tiny models (imported by the test modules as `from conftest import ...`)


def tiny_config(**overrides):
    """A model small enough that a forward pass is a millisecond: 2 blocks, 4 heads, 32 dim, context 16."""
    from config import Config

    values = dict(
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
    values.update(overrides)
    return Config(**values)


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
