"""torchrun / DDP helpers: one process per GPU, environment set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK)."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Iterator

import torch
import torch.distributed as dist

from utils.device import resolve_device

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str = "auto", device: str = "auto", timeout_minutes: float | None = None) -> torch.device:
    """Join the process group that torchrun describes and return this rank's device.

    Without torchrun it returns the single-process device (``utils.device.resolve_device``: ``cuda:N`` is
    honoured, CUDA asked for on a machine without it raises) and initialises nothing, so the same script
    runs on a laptop. Under torchrun the device is :func:`local_device`'s. ``backend=auto`` is NCCL when CUDA
    is used, else gloo. ``timeout_minutes``: how long a collective waits for the slowest rank (null = torch's
    default, 10 min for NCCL); the other ranks wait in one while rank 0 alone prunes or writes, so large
    models may need more.
    """
    if not launched_by_torchrun():
        return resolve_device(device)
    local = local_device(device)  # before joining: a bad device setting fails on every rank alike
    if local.type == "cuda":
        torch.cuda.set_device(local)
    chosen = ("nccl" if local.type == "cuda" else "gloo") if backend == "auto" else backend
    if not dist.is_initialized():
        timeout = None if timeout_minutes is None else datetime.timedelta(minutes=float(timeout_minutes))
        dist.init_process_group(backend=chosen, timeout=timeout)
    log.info("rank %d/%d on %s (%s)", rank(), world_size(), local, chosen)
    return local


def _is_auto(device: str | torch.device | None) -> bool:
    return device is None or (isinstance(device, str) and device.strip().lower() == "auto")


def local_device(device: str | torch.device | None = "auto") -> torch.device:
    """This rank's device under torchrun (``RANK``/``WORLD_SIZE`` set; otherwise ``resolve_device(device)``).

    ``auto``: this rank's GPU when CUDA is available, else the CPU (gloo). ``cuda``: this rank's GPU, and an error
    when CUDA is not available (as in a single process: never a silent fall-back to the CPU). This rank's GPU is
    ``LOCAL_RANK`` modulo the number of visible GPUs (torchrun starts one process per GPU; more processes than
    GPUs share them, which gloo allows and NCCL refuses). ``cuda:N`` is refused: torchrun gives each process its
    GPU, and one index for all ranks would put them all on one GPU. Other values (``cpu``) as
    ``resolve_device``.
    """
    if not launched_by_torchrun():
        return resolve_device(device)
    if _is_auto(device):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return _rank_gpu()
    try:
        chosen = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a valid device; use 'auto', 'cpu' or 'cuda'") from err
    if chosen.type != "cuda":
        return resolve_device(chosen)
    if chosen.index is not None:
        raise ValueError(f"device={device!r} under torchrun: torchrun gives each process its GPU (LOCAL_RANK), so a "
                         "GPU index would put every rank on the same one; use device=cuda or device=auto (choose the "
                         "GPUs with CUDA_VISIBLE_DEVICES)")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} was requested but CUDA is not available on this machine; "
                           "set device=auto or device=cpu")
    return _rank_gpu()


def _rank_gpu() -> torch.device:
    """``cuda:<LOCAL_RANK mod visible GPUs>`` (CUDA available)."""
    count = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= count:
        log.warning("LOCAL_RANK %d but only %d GPU(s) are visible: rank shares cuda:%d (NCCL refuses two ranks on "
                    "one GPU; start at most one process per GPU, or use backend=gloo)", local, count, local % count)
    return torch.device("cuda", local % count)


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


def broadcast_object(obj: object = None, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (any picklable object); the object itself without torchrun."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` without torchrun)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``tensor`` over the ranks (unchanged without torchrun). Returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def average_gradients(params) -> None:
    """Replace every ``.grad`` of ``params`` by its mean over the ranks (one flat all-reduce; ranks must hold
    the same parameters in the same order; a missing ``.grad`` counts as zeros)."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


class RankFailedError(RuntimeError):
    """Raised on every other rank when the rank running a main-process-only section failed."""


def run_on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and return its result on every rank (broadcast). If it raises on rank 0, the
    other ranks raise :class:`RankFailedError` with rank 0's message, so the whole job ends with it instead of
    hanging at the next collective. Without torchrun it is a plain call."""
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome: tuple = (None, None)
    if is_main_process():
        try:
            outcome = (fn(*args, **kwargs), None)
        except BaseException as err:  # noqa: BLE001 - re-raised below after the others are told
            outcome = (None, f"{type(err).__name__}: {err}")
            broadcast_object(outcome)
            raise
    outcome = broadcast_object(outcome)
    if outcome[1] is not None:
        raise RankFailedError(f"rank 0 failed: {outcome[1]}")
    return outcome[0]


def run_on_every_rank(fn, what: str):
    """``fn()`` on every rank; if it raises on any rank, every rank raises (that rank its own error, the others
    :class:`RankFailedError` naming ``what``, the rank and its message), so no rank waits forever in the next
    collective. A plain call without torchrun. The counterpart of :func:`run_on_main` for work all ranks do."""
    if not is_distributed():
        return fn()
    value, error = None, None
    try:
        value = fn()
    except BaseException as err:  # noqa: BLE001 - re-raised below once the other ranks know
        error = err
    failures = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(failures) if message is not None]
    if failed:
        raise RankFailedError(f"{what}: rank {failed[0][0]} failed: {failed[0][1]}")
    return value


def check_same_on_all_ranks(value: object, what: str) -> None:
    """Raise (on every rank) unless ``value`` is equal on all ranks, e.g. a pruned model's layer widths."""
    values = all_gather_objects(value)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise RuntimeError(f"{what} differs between ranks: rank 0 has {values[0]!r}, rank {differing[0]} has "
                           f"{values[differing[0]]!r}")


@contextlib.contextmanager
def torchrun_session(settings, device: str = "auto") -> Iterator[torch.device]:
    """What an entry script does around a run: join torchrun's process group (``settings``: the config's
    ``distributed`` section: backend, timeout_minutes), keep the log of ranks other than 0 to warnings (one log
    of progress), and leave the group at the end. Yields this rank's device. A plain process without torchrun
    initialises nothing."""
    settings = settings or {}
    device_used = init_distributed(settings.get("backend", "auto"), device, settings.get("timeout_minutes"))
    try:
        if not is_main_process():
            logging.getLogger().setLevel(logging.WARNING)
        yield device_used
    finally:
        cleanup()
