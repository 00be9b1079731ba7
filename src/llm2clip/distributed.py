"""Process groups for stage 2 under torchrun: gloo on CPUs, NCCL on GPUs; one process is a world of one.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the process trains alone and nothing here talks to
any other process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llm2clip import devices


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes the outputs (model, manifest, checkpoints)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over all ranks (for logging)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.size


def init(device: str) -> tuple[World, torch.device]:
    """Join the torchrun process group (when there is one) and pick this rank's device: cuda:LOCAL_RANK on GPUs.
    `device` as `llm2clip.devices` understands it ("auto", "cpu", "cuda")."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    resolved = devices.resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(resolved)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return world, resolved


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
