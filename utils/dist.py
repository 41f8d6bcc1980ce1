"""Distributed helpers: processes launched together by torchrun (or srun).

This module owns how a process learns its place in a run: `torchrun` (or any launcher that
sets the env:// variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, on one
node or many) makes a distributed run; without them the run is a single process. Training
(`init_distributed`) uses NCCL on CUDA and gloo on the CPU; only rank 0 logs to files and
saves checkpoints. Sharded tools (main_restore, the test scripts: `join_shards`) also accept
SLURM's srun variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and talk over gloo, for
the few small messages they exchange (who failed, the summary), whatever device computes.
"""
import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from utils.errors import UserError

__all__ = ["DistInfo", "init_distributed", "cleanup", "barrier", "broadcast_int",
           "all_reduce_mean", "all_gather_floats", "Shard", "join_shards", "leave_shards",
           "all_gather_objects"]


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


def broadcast_int(value, info):
    """Rank 0's integer (or None, sent as -1) on every process."""
    if not info.distributed:
        return value
    t = torch.tensor([-1 if value is None else value], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return None if int(t) < 0 else int(t)


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


class Shard(NamedTuple):
    """This process's share of a sharded tool's work: items `rank`, `rank + world_size`, ...;
    `local_world_size` processes share this machine (and its CPU threads)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    distributed = DistInfo.distributed  # the same two questions as a training process asks
    is_main = DistInfo.is_main

    def take(self, items):
        """This process's items of a list every process built alike."""
        return list(items)[self.rank::self.world_size]


def _slurm_local_world(default):
    text = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
    head = text.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else default


def join_shards():
    """The Shard of this process, joining a gloo process group when there are several.

    torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE come first; else srun's
    SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (srun does not set MASTER_ADDR and
    MASTER_PORT: export them, the first node's name and a free port); else one process.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        world, rank = int(env["SLURM_NTASKS"]), int(env.get("SLURM_PROCID", "0"))
        local = int(env.get("SLURM_LOCALID", "0"))
        local_world = _slurm_local_world(world)
    else:
        return Shard(0, 1, 0, 1)
    if world > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise UserError(f"{world} processes, but {' and '.join(missing)} not set: export "
                            "the first node's address and a free port (torchrun sets them)")
        dist.init_process_group(backend="gloo", init_method="env://", rank=rank,
                                world_size=world)
    return Shard(rank, world, local, local_world)


def leave_shards():
    """Leave the gloo group `join_shards` joined, if any: a process that exits with the group
    alive can abort in its destructor ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj):
    """Every process's picklable `obj`, indexed by rank ([obj] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
