"""Several processes, one job: torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK.
`Distributed` is what a rank needs to know (its place, and the few collective calls the loop makes); without
torchrun it is rank 0 of 1 and makes no torch.distributed calls."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from config import UserError


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


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun job this process belongs to (NCCL and one GPU per local rank on CUDA, gloo on the CPU) and
    return its place and device; without torchrun's variables, a single process on `device`."""
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
