"""torchrun / DDP helpers: one process per GPU, environment set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str = "auto", device: str = "auto") -> torch.device:
    """Join the process group that torchrun describes and return this rank's device.

    Without torchrun it returns the single-process device and initialises nothing, so the same script
    runs on a laptop. ``backend=auto`` is NCCL when CUDA is used, else gloo.
    """
    if not launched_by_torchrun():
        return torch.device("cuda" if _uses_cuda(device) else "cpu")
    local = local_device(device)
    if local.type == "cuda":
        torch.cuda.set_device(local)
    chosen = ("nccl" if local.type == "cuda" else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen)
    log.info("rank %d/%d on %s (%s)", rank(), world_size(), local, chosen)
    return local


def _uses_cuda(device: str) -> bool:
    return torch.cuda.is_available() and device in ("auto", "cuda")


def local_device(device: str = "auto") -> torch.device:
    """This rank's device under torchrun: its GPU (``LOCAL_RANK``), or the CPU under gloo."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if _uses_cuda(device) else torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap_for_training(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (``sync_bn``: BatchNorm -> SyncBatchNorm first), the model itself
    otherwise."""
    if not is_distributed():
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
