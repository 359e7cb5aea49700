"""Seeding helpers: one seed for python/numpy/torch, stable derived seeds, DataLoader workers."""
from __future__ import annotations

import hashlib
import logging
import os
import random

import numpy as np
import torch

_SEED_MASK = (1 << 31) - 1  # 31-bit: valid for numpy, torch, python and DataLoader seeds


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed python's ``random``, numpy and torch (CPU and all CUDA devices); return ``seed``.

    ``deterministic=True`` also asks cuDNN/cuBLAS for reproducible kernels (slower). It uses
    ``warn_only=True`` because some scatter kernels used by PyG have no deterministic version.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # Must be set before the first cuBLAS call to take effect; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from ints/strings, e.g. ``derive_seed(seed, index, "prune")``.

    Uses SHA-256 of a canonical text form, so it does not depend on ``PYTHONHASHSEED``, the
    platform or the python version. Different part tuples give (with overwhelming probability)
    different seeds; ``(1, 23)`` and ``(12, 3)`` differ because parts are typed and delimited.
    """
    if not parts:
        raise ValueError("derive_seed needs at least one int or str part")
    tokens = []
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str, np.integer)):
            raise TypeError(f"derive_seed parts must be int or str, got {type(part).__name__}: {part!r}")
        tokens.append(f"i:{int(part)}" if not isinstance(part, str) else f"s:{len(part)}:{part}")
    digest = hashlib.sha256("|".join(tokens).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def make_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (for DataLoader shuffling, random splits)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed numpy/random from torch's per-worker seed.

    torch already gives each worker ``base_seed + worker_id``; numpy and ``random`` would otherwise
    share the parent's state in every worker (identical augmentations across workers).
    """
    worker_seed = torch.initial_seed() & _SEED_MASK
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every random state a resumed run needs, as plain containers a weights-only checkpoint can hold: torch (CPU),
    CUDA (every device, when present), python ``random``, numpy, and ``generator`` (a loader's, or None)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
        "python": [version, list(internal), gauss],
        "numpy": [str(np_state[0]), [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "loader": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Put back what :func:`rng_state` saved (``generator`` gets the saved loader state when both exist). CUDA states
    saved on a machine with another device count are skipped with a warning: the CPU states still make the data
    order and augmentations exact."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        else:
            logging.getLogger(__name__).warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                len(state["cuda"]), torch.cuda.device_count())
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if generator is not None and state.get("loader") is not None:
        generator.set_state(state["loader"].cpu())
