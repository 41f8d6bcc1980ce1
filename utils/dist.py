"""Distributed training helpers: one process per GPU, launched by torchrun.

This module owns how a training process learns its place in a run: `torchrun` (or any launcher
that sets the env:// variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, on one
node or many) makes a distributed run; without them the run is a single process. The backend is
NCCL on CUDA and gloo on the CPU. Only rank 0 logs to files and saves checkpoints.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "barrier", "all_reduce_mean",
           "all_gather_floats"]


class DistInfo(NamedTuple):
    """This process's rank, the number of processes and its device."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(gpu_ids=(0,)):
    """Join the process group if launched by torchrun; pick this process's device.

    Single-process runs use `cuda:gpu_ids[0]` when CUDA is available and `gpu_ids` is not
    empty, else the CPU. Distributed runs use `cuda:LOCAL_RANK` (or the CPU with gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and len(gpu_ids) > 0
    if world_size > 1:
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    else:
        device = torch.device("cuda", gpu_ids[0]) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    return DistInfo(rank, world_size, local_rank, device)


def cleanup():
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Wait for every process (a no-op in single-process runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values, device):
    """The mean over processes of a list of floats (the list itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_gather_floats(values, device):
    """Every process's list of floats, indexed by rank ([values] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [list(values)]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
