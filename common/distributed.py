"""DistributedDataParallel plumbing: how a user outgrows one device.

`torchrun --nproc_per_node=N script.py` starts N copies of a script and sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in each one's
environment. Without torchrun those variables are absent and everything here
is a no-op, so the same script runs on one device unchanged.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:  # only rank 0 prints, plots and saves
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Average a float over all ranks (identity on one process)."""
    if info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / info.world_size
