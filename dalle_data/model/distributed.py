"""Where a training process runs: torchrun rank and device, and CPU thread limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from dalle_data.errors import TrainError


@dataclass
class Dist:
    """Where this process sits in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def limit_cpu_threads() -> None:
    """Intra-op CPU threads: ``DALLE_DATA_CPU_THREADS`` (default 1; 0 = torch's own choice).

    Small models gain little from intra-op threads, and when other processes share the
    cores (loader workers, DDP ranks, other jobs) OpenMP's spinning threads collapse
    throughput: measured here, 0.28 steps/s with 2 threads vs 3.95 with 1 on a busy
    2-core machine, same losses. OMP_NUM_THREADS is not used for this: Snakemake sets it
    to a rule's ``threads:``, which count cores reserved, not a tuning choice.
    """
    if torch.cuda.is_available():
        return
    raw = os.environ.get("DALLE_DATA_CPU_THREADS", "1")
    try:
        threads = int(raw)
    except ValueError:
        raise TrainError(f"DALLE_DATA_CPU_THREADS={raw!r} is not a number of threads") from None
    if threads > 0:
        torch.set_num_threads(threads)


def setup_distributed() -> Dist:
    """Join the torchrun process group (gloo on CPU, NCCL on GPUs) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(torch.distributed.get_rank(), world, device)
