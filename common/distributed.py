"""torch.distributed helpers for runs launched by torchrun (gloo on CPU, nccl on CUDA).

    torchrun --standalone --nproc_per_node 2 -m fdsl.test ...

A process is part of a distributed run when torchrun's WORLD_SIZE is above 1; otherwise every helper is a no-op
that answers as the only process (rank 0 of 1), so single-process code paths stay as they were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from common.utils import UserError

T = TypeVar("T")


def launched() -> bool:
    """True when torchrun (or the same environment) started this process as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise UserError(f"environment variable {name}={text!r} must be an integer") from exc


def init(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; returns the device this rank should use.

    gloo for CPU devices, nccl for CUDA (each rank then takes cuda:LOCAL_RANK). Without torchrun nothing happens
    and `device` is returned unchanged.
    """
    if not launched():
        return device
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"WORLD_SIZE is set but {name} is not: launch several processes with torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; torchrun's RANK before `init` / after `cleanup`, 0 when not launched by torchrun."""
    if is_distributed():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched() else 0


def world_size() -> int:
    if is_distributed():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """Rank 0: the process that writes checkpoints, config.json and results.json."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj: T) -> list[T]:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: item i goes to rank i % world_size."""
    return list(items[rank() :: world_size()])


def cleanup() -> None:
    """Leave the process group (after a final barrier, so no rank exits while another still writes)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
