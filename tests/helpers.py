"""Plain helpers shared by the test files (``from helpers import ...``; fixtures live in ``conftest.py``):
the repository paths, composing the Hydra configs, the tiny final-run overrides, the paper's pruning method,
a tiny metanetwork checkpoint, and running a stage's library function with the per-run boilerplate."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from data_loaders.store import ShardWriter
from generate_dataset.models import build_model, model_spec
from nn.apply import build_metanetwork, save_metanetwork
from nn.graph import GraphCodec
from stages.common import run_recorded
from training.config import TrainConfig
from training.loop import train

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

# The paper's structured criterion (configs/method/group_l2_norm_max_normalizer.yaml) as a plain dict.
METHOD = {"name": "group_l2_norm_max_normalizer", "kind": "structured", "importance": "group_magnitude", "p": 2,
          "group_reduction": "mean", "normalizer": "max", "global_pruning": True}

FINETUNE_STAGES = ("after_init_pruning", "after_metanetwork", "after_pruning")
# Final runs on resnet8 / digits: 1 epoch of 2 batches per recipe, 40 pruning steps of 2.5 % instead of 200 of
# 0.5 % (the same code paths, a few steps per pruning).
TINY = (["task=resnet20_on_digits", "task.model=resnet8", "device=cpu", "task.train.epochs=1",
         "+task.train.max_batches_per_epoch=2", "task.pruning.iterative_steps=40"]
        + [f"task.finetune.{s}.epochs=1" for s in FINETUNE_STAGES]
        + [f"+task.finetune.{s}.max_batches_per_epoch=2" for s in FINETUNE_STAGES])
TINY_METANETWORK = {"num_layer": 2, "hiddim": 8, "node_res_ratio": 0.5, "edge_res_ratio": 0.5}


def compose_cfg(overrides: Sequence[str] = (), primary: str = "main", tiny: bool = False,
                hydra_cfg: bool = False) -> DictConfig:
    """Compose ``configs/<primary>.yaml`` with ``overrides`` (after :data:`TINY` when ``tiny``)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(primary, overrides=(list(TINY) if tiny else []) + list(overrides),
                       return_hydra_config=hydra_cfg)


def tiny_cfg(overrides: Sequence[str] = (), hydra_cfg: bool = False) -> DictConfig:
    """``configs/main.yaml`` with :data:`TINY`, then ``overrides``."""
    return compose_cfg(overrides, tiny=True, hydra_cfg=hydra_cfg)


def save_tiny_metanetwork(path: str | Path, architecture: str = "resnet8", task: str = "resnet20_on_digits") -> Path:
    """A randomly initialised metanetwork (residual ratio 0.5: it visibly moves the weights) for ``architecture``
    on 1x8x8 inputs, saved as a metanetwork checkpoint of epoch 3."""
    torch.manual_seed(0)
    codec = GraphCodec(build_model(architecture, 10, in_channels=1), input_shape=(1, 8, 8))
    net = build_metanetwork(codec, TINY_METANETWORK)
    return save_metanetwork(path, net, codec, TINY_METANETWORK, task=task, epoch=3)


def recorded(library_fn: Callable[[DictConfig, Path], tuple], cfg: DictConfig, run_dir: str | Path) -> tuple[Any, ...]:
    """Run a stage's library function ``fn(cfg, run_dir) -> (summary, ...)`` with the per-run boilerplate of
    ``stages.execute`` (config.yaml, results.json from the summary); returns everything the function returned."""
    kept: dict[str, tuple] = {}

    def run(cfg: DictConfig, run_dir: Path) -> dict:
        kept["out"] = library_fn(cfg, run_dir)
        return kept["out"][0]

    run_recorded(run, cfg, run_dir)
    return kept["out"]


def run_torchrun(args: Sequence[str], cwd: str | Path, nproc: int = 2, timeout: int = 600,
                 script: str | Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc <script> args`` on CPU (gloo), one thread per rank;
    ``script`` defaults to ``main_imagenet/main_imagenet.py``. Returns the finished process (text output)."""
    script = script or REPO / "main_imagenet" / "main_imagenet.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def write_imagefolder(root: str | Path, classes: int = 3, per_class: int = 8, size: int = 20, seed: int = 0) -> Path:
    """A tiny ImageNet layout ``root/{train,val}/<class>/*.JPEG`` of random RGB images (``per_class`` per class
    in train, half as many in val); returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", per_class), ("val", max(1, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] = 200  # a learnable colour cue per class
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG")
    return root


def write_selection_store(store: str | Path, task: str, method: str, loaders: Any, recipe: TrainConfig,
                          speed_up: float, num_classes: int, in_channels: int) -> torch.nn.Module:
    """A 2-model resnet8 store for selection tests: data model 0 (untrained, seed 0) meta-trains, data model 1
    (seed 1, trained with ``recipe`` on ``loaders``, recorded at ``speed_up``) validates. Returns model 1 (eval)."""
    info = {"task": task, "architecture": "resnet8", "num_classes": num_classes, "method": method}
    with ShardWriter(store, 0, info) as writer:
        torch.manual_seed(0)
        meta_model = build_model("resnet8", num_classes, in_channels=in_channels).eval()
        writer.append(0, meta_model.state_dict(), model_spec("resnet8", meta_model, num_classes), {}, 1.0, 0, {})
        torch.manual_seed(1)
        model = build_model("resnet8", num_classes, in_channels=in_channels)
        train(model, loaders, recipe, "cpu")
        model.eval()
        writer.append(1, model.state_dict(), model_spec("resnet8", model, num_classes), {}, speed_up, 1, {})
    return model


def load_script(path: str | Path, name: str):
    """A script that is not a package module (``benchmarks/*.py``) imported from ``path`` as module ``name``;
    registered in ``sys.modules`` first, so that its dataclasses resolve their module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]
