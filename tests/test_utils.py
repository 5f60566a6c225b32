"""utils.py: device and dtype choice, seeding, atomic writes, the CPU peak probe's cache, formatting."""

from __future__ import annotations

import pytest
import torch

import utils
from config import UserError
from utils import atomic_write, cpu_peak_flops, format_duration, human, resolve_device, resolve_dtype


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA"):
        resolve_device("cuda")


def test_resolve_device_mps_without_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match="mps"):
        resolve_device("mps")


def test_resolve_device_auto_and_cpu(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, compiled=False) == torch.float32  # eager CPU attention is slow in bf16
    native = torch.bfloat16 if utils.cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", cpu, compiled=True) == native
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("float32", cpu) == torch.float32


def test_seed_everything_is_reproducible():
    utils.seed_everything(3)
    a = torch.rand(4)
    utils.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_formatting_helpers():
    assert human(12_345_678) == "12.3M"
    assert human(999) == "999"
    assert human(1500) == "1.5k"
    assert human(2.5e9) == "2.5B"
    assert format_duration(59) == "0m59s"
    assert format_duration(3725) == "1h02m05s"


def test_atomic_write_replaces_whole_files_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "new" / "file.txt"
    atomic_write(path, "one\n")
    atomic_write(path, b"two\n")
    assert path.read_text() == "two\n"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(utils.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "three\n")
    assert path.read_text() == "two\n" and [p.name for p in path.parent.iterdir()] == ["file.txt"]


def test_cpu_peak_probe_is_cached_in_its_file_and_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(utils, "measure_cpu_peak_flops", lambda dtype: probes.append(dtype) or 1e9)
    cache = tmp_path / "cpu_peak_flops.json"
    assert cpu_peak_flops(torch.float32, cache) == 1e9 and cpu_peak_flops(torch.float32, cache) == 1e9
    assert len(probes) == 1 and cache.exists()
    cache.write_text("{not json")
    assert cpu_peak_flops(torch.float32, cache) == 1e9 and len(probes) == 2
