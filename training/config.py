"""Hyper-parameters of one training / fine-tuning stage (a task recipe, ``task.train`` / ``task.finetune.*``).

:class:`TrainConfig` validates every value up front (an unknown key, a bad choice or a non-finite number is
one clear ``ValueError`` naming the key), so a recipe typo fails before any training.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")
SELECTIONS = ("val", "test", "last")
AMP_DTYPES = ("auto", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of one training / fine-tuning stage.

    ``milestones`` are epochs (a list, or the reference's comma string ``"60,90"``). With a warm-up
    they count from the end of the warm-up, as torch's ``SequentialLR`` (and the reference) do.
    ``select`` picks the kept weights: ``"val"`` best validation accuracy, ``"test"`` best TEST
    accuracy (the paper's protocol), ``"last"`` the last epoch. ``amp`` (in ``amp_dtype``) and
    ``channels_last`` only act on CUDA. ``max_batches_per_epoch`` caps training and evaluation batches (smoke tests).
    """

    epochs: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    scheduler: str = "multistep"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.01
    lr_min: float = 0.0
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    clip_grad_norm: float | None = None
    amp: bool = False
    # autocast dtype with amp=true: auto = bfloat16 where the GPU supports it (no loss scaling needed), else float16
    # (GradScaler; a step whose loss or gradients are not finite is skipped, not fatal)
    amp_dtype: str = "auto"
    channels_last: bool = False
    select: str = "val"
    max_batches_per_epoch: int | None = None
    # on CUDA / under torchrun: check the loss for NaN/inf (and agree on a stop request) every this many batches and
    # at the end of each epoch, not after every batch (each check waits for the GPU; a single CPU process checks
    # every batch, which costs nothing there)
    sync_every: int = 50
    # false: the test split is evaluated once, on the kept weights, instead of after every epoch (saves a
    # test pass per epoch in CPU benchmarks; select=test always evaluates it every epoch)
    test_every_epoch: bool = True

    def __post_init__(self) -> None:
        self.epochs = _as_int(self.epochs, "epochs", minimum=0)
        self.lr = _as_float(self.lr, "lr")
        if self.lr <= 0:
            raise ValueError(f"train config: lr must be > 0, got {self.lr}")
        self.optimizer = _as_choice(self.optimizer, "optimizer", OPTIMIZERS)
        self.scheduler = _as_choice(self.scheduler, "scheduler", SCHEDULERS)
        self.select = _as_choice(self.select, "select", SELECTIONS)
        self.amp_dtype = _as_choice(self.amp_dtype, "amp_dtype", AMP_DTYPES)
        self.sync_every = _as_int(self.sync_every, "sync_every", minimum=1)
        self.milestones = _parse_milestones(self.milestones)
        for name in ("momentum", "weight_decay", "gamma", "lr_min", "label_smoothing", "warmup_start_factor",
                     "mixup_alpha", "cutmix_alpha"):
            setattr(self, name, _as_float(getattr(self, name), name))
        self.warmup_epochs = _as_int(self.warmup_epochs, "warmup_epochs", minimum=0)
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("train config: mixup_alpha and cutmix_alpha must be >= 0 (0 = off)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train config: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.warmup_start_factor <= 1.0:
            raise ValueError(
                f"train config: warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("train config: nesterov=True needs optimizer='sgd' and momentum > 0")
        if self.clip_grad_norm is not None:
            self.clip_grad_norm = _as_float(self.clip_grad_norm, "clip_grad_norm")
            if self.clip_grad_norm <= 0:  # the reference uses 0 for "off"
                self.clip_grad_norm = None
        if self.max_batches_per_epoch is not None:
            self.max_batches_per_epoch = _as_int(self.max_batches_per_epoch, "max_batches_per_epoch", minimum=1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | Any) -> "TrainConfig":
        """Build from a dict or an OmegaConf ``DictConfig``; unknown or missing keys raise ``ValueError``."""
        if isinstance(values, (DictConfig, ListConfig)):
            values = OmegaConf.to_container(values, resolve=True)
        if not isinstance(values, Mapping):
            raise TypeError(f"train config must be a mapping, got {type(values).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"train config: unknown key(s) {unknown}; valid keys are {known}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise ValueError(f"train config: missing required key(s) {missing}")
        return cls(**dict(values))


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or str(value).strip() == "":
        raise ValueError(f"train config: {name} must be an integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"train config: {name} must be an integer, got {value!r}") from None
    if not number.is_integer() or number < minimum:
        raise ValueError(f"train config: {name} must be an integer >= {minimum}, got {value!r}")
    return int(number)


def _as_float(value: Any, name: str) -> float:
    try:
        number = float(value)  # also accepts YAML strings such as "1e-3"
    except (TypeError, ValueError):
        raise ValueError(f"train config: {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"train config: {name} must be a finite number, got {value!r}")
    return number


def _as_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError(f"train config: {name}={value!r} is not one of {list(choices)}")
    return text


def _parse_milestones(value: Any) -> list[int]:
    """``[60, 90]``, ``(60, 90)``, ``"60,90"``, ``60`` or ``None`` -> sorted list of positive ints."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = [part for part in value.replace(" ", "").split(",") if part]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [value]
    else:
        parts = list(value)
    milestones = [_as_int(part, "milestones", minimum=1) for part in parts]
    if milestones != sorted(set(milestones)):
        raise ValueError(f"train config: milestones must be strictly increasing, got {value!r}")
    return milestones


def as_config(cfg: TrainConfig | Mapping[str, Any] | Any) -> TrainConfig:
    return cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
