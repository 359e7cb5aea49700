"""Run-time device selection: the device comes from the config (`device=auto|cpu|cuda|cuda:N`), never from the code."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Turn a config value into a ``torch.device``.

    ``"auto"`` (or ``None``) picks CUDA when present, else the CPU. ``"cpu"``, ``"cuda"`` and
    ``"cuda:1"`` are taken literally; asking for CUDA on a machine without it raises a
    ``RuntimeError`` that says how to fix the config instead of failing later inside a kernel.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec.strip() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={spec!r} is not a valid device; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={spec!r} was requested but CUDA is not available on this machine; "
                "set device=auto or device=cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(
                f"device={spec!r} was requested but only {count} CUDA device(s) exist; "
                f"use an index below {count} or device=auto"
            )
    return device


def configure_cuda(deterministic: bool = False) -> None:
    """The GPU settings of a run, before any CUDA work.

    ``CUBLAS_WORKSPACE_CONFIG`` is set (unless the environment sets it) because cuBLAS reads it once, at its first
    call, and deterministic kernels need it. Without ``deterministic``: cuDNN picks the fastest convolution algorithm
    for each input shape (``cudnn.benchmark``) and float32 matmuls and convolutions may use TF32 (about 10 bits of
    mantissa in the products, the default of most training code). Neither touches CPU results.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if deterministic or not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")  # TF32 matmuls


def cpu_name() -> str:
    """The processor's model name (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows), for reports that
    must say which machine measured them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
