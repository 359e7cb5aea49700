"""What will a paper row cost? Images, MACs and GPU-hours of every stage of the full pipeline, before launching.

Usage (Hydra-style overrides, composed with ``configs/main.yaml``, or ``configs/imagenet.yaml`` with
``--primary imagenet``)::

    python benchmarks/cost.py experiment=resnet56_cifar10_2.3x select.checkpoints=1:40:3
    python benchmarks/cost.py --primary imagenet task=vit_b_16_on_ImageNet
    python benchmarks/cost.py experiment=resnet56_cifar10_2.9x --stages final     # upstream stages shared
    python benchmarks/cost.py experiment=resnet56_cifar10_2.3x --json              # machine-readable

Nothing is trained and no data is read: the counts come from the composed config alone.

Stages, as the code runs them (one function each below):

* ``generate``: per data model ``task.train`` at the unpruned MACs, then ``task.finetune.after_init_pruning`` at
  the MACs after init pruning (``task.initial_speed_up``). Data models: ``--data-models``, else
  ``pipeline.num_data_models`` when the row or an override sets it to other than the shared default, else the
  paper's count (:data:`PAPER_DATA_MODELS`, from the authors' README and scripts).
* ``meta_train`` (``stages/meta_train.py``): ``iterations_per_step: null`` (CIFAR): each epoch one optimiser step
  per training data model, each step ``batches_per_step`` batches of ``task.meta_train.batch_size`` (null: one pass
  over the training split). ``iterations_per_step: N`` (ImageNet, torchrun on ``--gpus`` ranks, default 8): per rank a
  ``DistributedSampler`` shard of ``ceil(images / ranks)`` images, ``floor(batches / N)`` steps of N batches per
  epoch, trailing batches skipped. Every image is a forward and a backward of the (init-pruned) data model.
* ``select`` (``stages/select.py``): per scored checkpoint, the control, each sparse-learning strength (and origin,
  which is not fine-tuned) on each validation data model: the ``after_metanetwork`` fine-tune (or
  ``select.finetune_epochs``; validation evaluated each epoch, never test), then the accuracy-vs-speed-up curve:
  one validation pass per pruning step up to ``select.max_speed_up``; ``select.score=finetuned`` adds an
  ``after_pruning`` fine-tune per target and curve.
* ``pretrain_final``: ``task.train`` once, the model every seed and method starts from (README, experiment
  files); ``--pretrain-per-seed`` counts it per seed (``final.model=null``).
* ``final``: per seed (the experiment's ``hydra.sweeper.params.seed``, else the paper's 3) and method
  (``--methods``; default the metanetwork and the baseline without it, as the pipeline and README run them):
  init pruning + ``after_init_pruning``, ``after_metanetwork`` (metanetwork, control ``finetune``, and
  ``sparse_learning``; not ``none``) at the init-pruned MACs, ``after_pruning`` at each target's MACs.
  ``run=unstructured_pruning_final`` rows have no init pruning and keep the dense MACs (zeros still compute).

Training epochs also evaluate validation and, unless ``test_every_epoch: false``, test (``training/loop.py``).

MACs per image: ``pruning.depgraph.count_macs`` (torch-pruning's counter, the paper's speed-up denominator) of
``generate_dataset.models.build_model(task.model)`` at ``task.input_size``, divided by the stage's speed-up.
A pruning curve's points are approximated as uniform channel removal: after step j of N every layer keeps
``1 - j/N`` of its channels, so MACs fall as ``(1 - j/N)**2``.

GPU-hours: measured where ``benchmarks/results/gpu_check/gpu_check.json`` (``--gpu-check``; written by
``benchmarks/gpu_check.py`` on CUDA at paper sizes) has a training images/s of the row's architecture at its
input size (section f, the variant the recipe uses: fp32, amp, amp+channels_last), scaled by MACs to pruned
models, evaluation images at 3 per training image. Otherwise an ESTIMATE: training 6 FLOPs per MAC per image
(forward 2, backward 4), evaluation 2, at ``--tflops`` effective (default :data:`DEFAULT_TFLOPS`). Every figure is
labelled with its source. Not counted: the metanetwork's own passes (once per meta-training step, once per
application), pruning steps (dependency graph and MAC counting, no images), one-off evaluations outside the
epochs, data loading stalls.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

# raised when torch-pruning is imported (pytest.ini filters it too)
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from generate_dataset.models import build_model  # noqa: E402
from pruning.depgraph import count_macs  # noqa: E402
from stages.select import parse_checkpoints  # noqa: E402

CONFIG_DIR = ROOT / "configs"
GPU_CHECK = ROOT / "benchmarks" / "results" / "gpu_check" / "gpu_check.json"
STAGES = ("generate", "meta_train", "select", "pretrain_final", "final")
METHODS = ("metanetwork", "finetune", "sparse_learning", "none")
METHOD_NAMES = {"metanetwork": "metanetwork", "finetune": "control (equal-budget fine-tune)",
                "sparse_learning": "DepGraph + sparse learning",
                "none": "baseline (no metanetwork, straight to pruning)"}

# The assumed effective training throughput of the estimate: an H100 with AMP on large convnets/transformers.
# Small CIFAR networks at batch 128 reach far less (kernel launches and data loading dominate).
DEFAULT_TFLOPS = 100.0
TRAIN_FLOPS_PER_MAC = 6.0  # forward 2 + backward 4 FLOPs per multiply-accumulate
EVAL_FLOPS_PER_MAC = 2.0
EVAL_PER_TRAIN_IMAGE = TRAIN_FLOPS_PER_MAC / EVAL_FLOPS_PER_MAC  # evaluation images per training image's time

# (training images, test images, classes) of the full datasets; the validation split is carved from training.
DATASETS = {
    "CIFAR10": (50_000, 10_000, 10),
    "CIFAR100": (50_000, 10_000, 100),
    "SVHN": (73_257, 26_032, 10),
    "ImageNet": (1_281_167, 50_000, 1000),
    "FashionMNIST": (60_000, 10_000, 10),
    "digits": (1_437, 360, 10),
}
SVHN_EXTRA = 531_131  # task.dataset.options.use_extra=true
# Data models the authors made (reference §3.4: "not fixed in code"): their README's ResNet56 example 4+3+3 = 10,
# ResNet110's generate.sh 5 x 3 = 15, ImageNet 3 ResNet50s (2 meta-train) and 2 identical ViT-B/16s (1 meta-trains).
PAPER_DATA_MODELS = {"resnet50": 3, "vit_b_16": 2, "resnet110": 15}
PAPER_CIFAR_DATA_MODELS = 10
PAPER_SEEDS = (7, 8, 9)  # reference §2.1 step 7, the experiment files' sweeper
PAPER_WORLD_SIZE = 8  # torchrun --nproc_per_node=8 (reference §2.3)


# ----------------------------------------------------------------------------------------------
# Inputs: the composed row, its data sizes, its MACs
# ----------------------------------------------------------------------------------------------
@dataclass
class Sizes:
    train: int  # training images per epoch (after the validation split and task.dataset.train_size)
    val: int
    test: int
    classes: int
    note: str


@dataclass
class Row:
    cfg: DictConfig
    name: str  # what was asked for, e.g. "experiment=resnet56_cifar10_2.3x"
    primary: str
    sizes: Sizes
    macs: float  # per image, unpruned architecture
    data_models: int
    data_models_note: str
    seeds: list
    seeds_note: str
    methods: list[str]
    world_size: int
    pretrain_per_seed: bool
    unstructured: bool


def compose_row(overrides: Sequence[str], primary: str = "main") -> DictConfig:
    """``configs/<primary>.yaml`` with the overrides, hydra section included (for the sweeper's seeds)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(primary, overrides=list(overrides), return_hydra_config=True)


def dataset_sizes(task: DictConfig) -> Sizes:
    ds = task.dataset
    name = str(ds.name)
    if name == "synthetic":
        options = ds.get("synthetic") or {}
        total, test, classes = int(options.get("train_size", 512)), int(options.get("test_size", 256)), int(
            options.get("num_classes", 10))
    elif name in DATASETS:
        total, test, classes = DATASETS[name]
    else:
        raise ValueError(f"task.dataset.name={name}: no known size; add it to DATASETS in benchmarks/cost.py")
    note = f"{total:,} {name} training images"
    if name == "SVHN" and (ds.get("options") or {}).get("use_extra", False):
        total += SVHN_EXTRA
        note += f" + {SVHN_EXTRA:,} extra"
    val_size = ds.get("val_size", 0.1)
    val = int(round(val_size * total)) if isinstance(val_size, float) else int(val_size)
    train = total - val
    note += f" - {val:,} validation"
    if ds.get("train_size") is not None:
        train = min(train, int(ds.train_size))
        note += f", subset of {train:,} (task.dataset.train_size)"
    return Sizes(train=train, val=val, test=test, classes=classes, note=note)


def unpruned_macs(task: DictConfig, classes: int) -> float:
    """MACs of one image through the unpruned architecture (torch-pruning's counter, as the speed-ups)."""
    shape = [int(v) for v in task.input_size]
    model = build_model(str(task.model), classes, in_channels=shape[0]).eval()
    with torch.no_grad():
        return count_macs(model, torch.ones(1, *shape))


def number_of_data_models(cfg: DictConfig, asked: int | None) -> tuple[int, str]:
    if asked is not None:
        return int(asked), "--data-models"
    default = int(OmegaConf.load(CONFIG_DIR / "shared" / "default.yaml").pipeline.num_data_models)
    setting = int(cfg.pipeline.num_data_models)
    if setting != default:
        return setting, "pipeline.num_data_models of this row / override"
    model, dataset = str(cfg.task.model), str(cfg.task.dataset.name)
    if model in PAPER_DATA_MODELS:
        return PAPER_DATA_MODELS[model], "paper default: the authors' scripts, reference §3.4"
    if dataset in ("CIFAR10", "CIFAR100", "SVHN"):
        return PAPER_CIFAR_DATA_MODELS, "paper default: the authors' README example, 4+3+3, reference §3.4"
    return setting, "pipeline.num_data_models (not a paper task)"


def seeds_of(cfg: DictConfig, asked: int | None) -> tuple[list, str]:
    if asked is not None:
        return list(range(int(asked))), "--seeds"
    sweep = OmegaConf.select(cfg, "hydra.sweeper.params.seed")
    if sweep is not None:
        text = str(sweep).replace(" ", "")
        if text.startswith("range(") and text.endswith(")"):  # Hydra's range(start,stop[,step])
            return list(range(*(int(v) for v in text[6:-1].split(",")))), "the experiment's hydra.sweeper.params.seed"
        seeds = [s for s in text.split(",") if s]
        return [int(s) if s.lstrip("-").isdigit() else s for s in seeds], "the experiment's hydra.sweeper.params.seed"
    return list(PAPER_SEEDS), "paper default, reference §2.1 step 7"


def make_row(overrides: Sequence[str], primary: str = "main", data_models: int | None = None,
             seeds: int | None = None, methods: Sequence[str] = ("metanetwork", "none"),
             world_size: int | None = None, pretrain_per_seed: bool = False) -> Row:
    cfg = compose_row(overrides, primary)
    sizes = dataset_sizes(cfg.task)
    count, count_note = number_of_data_models(cfg, data_models)
    seed_list, seed_note = seeds_of(cfg, seeds)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    sharded = cfg.task.meta_train.get("iterations_per_step") is not None
    world = int(world_size) if world_size is not None else (PAPER_WORLD_SIZE if sharded else 1)
    return Row(cfg=cfg, name=" ".join(overrides) or "(defaults)", primary=primary, sizes=sizes,
               macs=unpruned_macs(cfg.task, sizes.classes), data_models=count, data_models_note=count_note,
               seeds=seed_list, seeds_note=seed_note, methods=list(methods), world_size=world,
               pretrain_per_seed=pretrain_per_seed,
               unstructured=str(cfg.get("run")) == "unstructured_pruning_final")


# ----------------------------------------------------------------------------------------------
# One part of a stage: some trainings (or curves) of the same kind
# ----------------------------------------------------------------------------------------------
@dataclass
class Part:
    stage: str
    what: str
    runs: int  # trainings or curves (what `what` counts); 1 for the meta-training run
    epochs: str  # per run, as text ("200", "100 (8 steps each)", "-")
    train_images: int  # total training passes (forward + backward) over all runs
    eval_images: int  # total evaluation passes (forward only)
    macs: float  # per training image
    eval_macs: float  # per evaluation image (a curve's mean)
    speed_up: float  # of the model trained, vs the unpruned architecture
    variant: str = "fp32"  # gpu_check section f variant the recipe corresponds to
    flop: float = 0.0
    gpu_hours: float = 0.0
    source: str = ""
    notes: list = field(default_factory=list)

    def flops(self) -> float:
        return (TRAIN_FLOPS_PER_MAC * self.macs * self.train_images
                + EVAL_FLOPS_PER_MAC * self.eval_macs * self.eval_images)


def variant_of(section: DictConfig | None) -> str:
    amp = bool(section is not None and section.get("amp", False))
    channels_last = bool(section is not None and section.get("channels_last", False))
    return "amp+channels_last" if amp and channels_last else "amp" if amp else "fp32"


def _cap(images: int, max_batches: Any, batch_size: int) -> int:
    return images if max_batches is None else min(images, int(max_batches) * int(batch_size))


def training_part(row: Row, stage: str, what: str, section: DictConfig, runs: int, speed_up: float,
                  with_test: bool = True, epochs: int | None = None, max_batches: Any = None) -> Part:
    """``runs`` trainings with the recipe ``section`` (``epochs`` overrides its epochs) at ``macs / speed_up``:
    each epoch a training pass and the per-epoch evaluation (validation, and test unless the recipe says not)."""
    task, sizes = row.cfg.task, row.sizes
    epochs = int(section.epochs) if epochs is None else int(epochs)
    cap = section.get("max_batches_per_epoch") if max_batches is None else max_batches
    test_each = with_test and (section.get("test_every_epoch", True) or section.get("select") == "test")
    per_epoch_train = _cap(sizes.train, cap, task.batch_size)
    per_epoch_eval = _cap(sizes.val, cap, task.eval_batch_size) + (
        _cap(sizes.test, cap, task.eval_batch_size) if test_each else 0)
    macs = row.macs / speed_up
    return Part(stage, what, runs, str(epochs), runs * epochs * per_epoch_train, runs * epochs * per_epoch_eval,
                macs, macs, speed_up, variant_of(section))


def curve_fractions(base_speed_up: float, max_speed_up: float, steps: int) -> list[float]:
    """MACs of each point of a pruning curve relative to the model pruned (uniform channel removal, see module
    docstring): the unpruned point, then one per step until the total speed-up reaches ``max_speed_up``."""
    fractions = [1.0]
    if base_speed_up >= max_speed_up:
        return fractions
    for j in range(1, steps + 1):
        keep = 1.0 - j / steps
        fractions.append(keep * keep)
        if keep == 0.0 or base_speed_up / (keep * keep) >= max_speed_up:
            break
    return fractions


def targets_of(cfg: DictConfig) -> list[float]:
    value = cfg.final.target_speed_up
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    return [float(v) for v in values]


def init_speed_up(row: Row) -> float:
    return 1.0 if row.unstructured else float(row.cfg.task.initial_speed_up)


# ----------------------------------------------------------------------------------------------
# The stages, one function each
# ----------------------------------------------------------------------------------------------
def generation_stage(row: Row) -> list[Part]:
    task, n = row.cfg.task, row.data_models
    parts = []
    if int(task.train.epochs) > 0:
        parts.append(training_part(row, "generate", f"task.train x {n} data models", task.train, n, 1.0))
    if not row.unstructured and float(task.initial_speed_up) > 1.0:
        parts.append(training_part(row, "generate", f"after_init_pruning fine-tune x {n} (init-pruned to "
                                   f"{float(task.initial_speed_up):g}x)", task.finetune.after_init_pruning, n,
                                   float(task.initial_speed_up)))
    if not parts:
        parts.append(Part("generate", f"{n} data models: no training (train.epochs 0, no init pruning)", n, "0",
                          0, 0, row.macs, row.macs, 1.0))
    return parts


def meta_train_split(count: int, train_split: float) -> int:
    """Training data models of a store of ``count`` (``data_loaders.store.DataModelStore.split``)."""
    n_train = count - math.ceil(round((1.0 - train_split) * count, 9))
    if count >= 2:
        return min(max(n_train, 1), count - 1) if train_split < 1.0 else count
    return count


def meta_train_stage(row: Row) -> list[Part]:
    mt, sizes = row.cfg.task.meta_train, row.sizes
    epochs = int(mt.epochs)
    n_train = meta_train_split(row.data_models, float(mt.train_split))
    batch = int(mt.batch_size) if mt.get("batch_size") is not None else int(row.cfg.task.batch_size)
    speed_up = init_speed_up(row)
    if mt.get("iterations_per_step") is not None:  # the authors' ImageNet step, one data model per rank
        step = int(mt.iterations_per_step)
        shard = math.ceil(sizes.train / row.world_size)
        steps = math.ceil(shard / batch) // step
        per_epoch = row.world_size * steps * step * batch
        what = (f"{epochs} epochs x {row.world_size} rank(s) x {steps} steps of {step} x {batch} images "
                f"({min(row.world_size, n_train)} of {n_train} training data models)")
        shown = f"{epochs} ({steps} steps each)"
    else:  # one optimiser step per training data model per epoch
        bps = mt.get("batches_per_step")
        per_step = sizes.train if bps is None else int(bps) * batch
        per_epoch = n_train * per_step
        what = (f"{epochs} epochs x {n_train} training data models x {per_step:,} images per step"
                + (" (one pass)" if bps is None else f" ({int(bps)} batches of {batch})"))
        shown = f"{epochs} ({n_train} steps each)"
    macs = row.macs / speed_up
    part = Part("meta_train", what, 1, shown, epochs * per_epoch, 0, macs, macs, speed_up, "fp32")
    part.notes.append("forward + backward of the data model per image; the GNN's own pass per step not counted")
    return [part]


def selection_stage(row: Row) -> list[Part]:
    cfg, sel, task = row.cfg, row.cfg.select, row.cfg.task
    if row.unstructured:
        return [Part("select", "not run: run=select scores structured curves only (choose the checkpoint by "
                     "hand, README)", 0, "-", 0, 0, row.macs, row.macs, 1.0)]
    epochs = int(task.meta_train.epochs)
    available = {e: Path(f"epoch_{e:04d}.pt") for e in range(1, epochs + 1)}
    checkpoints = len(parse_checkpoints(sel.get("checkpoints", "all"), available))
    n_val = row.data_models - meta_train_split(row.data_models, float(task.meta_train.train_split))
    models = max(1, min(int(sel.get("num_val_models", 1)), n_val))
    regs = len(sel.get("sparse_learning_regs") or [])
    control = 1 if sel.get("control", True) else 0
    origin = 1 if sel.get("origin", True) else 0
    tuned = (checkpoints + control + regs) * models
    curves = tuned + origin * models
    base = float(task.initial_speed_up)
    max_batches = sel.get("max_batches")
    parts = []
    what = (f"after_metanetwork fine-tune: ({checkpoints} checkpoint(s) + {control} control + {regs} sparse-learning) "
            f"x {models} validation data model(s)")
    ft_epochs = sel.get("finetune_epochs")
    parts.append(training_part(row, "select", what, task.finetune.after_metanetwork, tuned, base, with_test=False,
                               epochs=ft_epochs, max_batches=max_batches))
    fractions = curve_fractions(base, float(sel.max_speed_up), int(sel.iterative_steps))
    per_point = _cap(row.sizes.val, max_batches, task.eval_batch_size)
    mean = sum(fractions) / len(fractions)
    macs = row.macs / base
    parts.append(Part("select", f"pruning curves: {curves} x {len(fractions)} validation passes (to "
                      f"{float(sel.max_speed_up):g}x, {int(sel.iterative_steps)} steps)", curves, "-", 0,
                      curves * len(fractions) * per_point, macs, macs * mean, base))
    parts[-1].notes.append("curve points approximated by uniform channel removal; eval MACs = the curve's mean")
    if str(sel.score) == "finetuned":
        targets = sel.get("finetuned_targets")
        targets = [float(sel.target_speed_up)] if targets is None else [float(t) for t in (
            targets if isinstance(targets, (list, ListConfig)) else [targets])]
        for target in targets:
            parts.append(training_part(row, "select", f"score=finetuned: after_pruning fine-tune at {target:g}x x "
                                       f"{curves} curves", task.finetune.after_pruning, curves, target,
                                       with_test=False, max_batches=max_batches))
    return parts


def pretrain_stage(row: Row) -> list[Part]:
    task = row.cfg.task
    runs = len(row.seeds) if row.pretrain_per_seed else 1
    who = f"per seed, x {runs}" if row.pretrain_per_seed else "once, shared by every seed and method"
    if int(task.train.epochs) == 0:
        return [Part("pretrain_final", f"task.train: 0 epochs (the pretrained weights), {who}", runs, "0", 0, 0,
                     row.macs, row.macs, 1.0)]
    return [training_part(row, "pretrain_final", f"task.train, {who}", task.train, runs, 1.0)]


def final_stage(row: Row) -> list[Part]:
    task, seeds = row.cfg.task, len(row.seeds)
    ft = task.finetune
    methods = row.methods
    with_finetune = [m for m in methods if m != "none"]
    parts = []
    names = ", ".join(methods)
    base = init_speed_up(row)
    if not row.unstructured and base > 1.0:
        parts.append(training_part(row, "final", f"after_init_pruning fine-tune: {seeds} seeds x {len(methods)} "
                                   f"methods ({names})", ft.after_init_pruning, seeds * len(methods), base))
    if with_finetune:
        parts.append(training_part(row, "final", f"after_metanetwork fine-tune: {seeds} seeds x "
                                   f"{len(with_finetune)} ({', '.join(with_finetune)})", ft.after_metanetwork,
                                   seeds * len(with_finetune), base))
    if row.unstructured:
        parts.append(training_part(row, "final", f"after_pruning fine-tune ({float(row.cfg.final.amount):g} of the "
                                   f"weights zero, dense MACs): {seeds} seeds x {len(methods)} methods",
                                   ft.after_pruning, seeds * len(methods), 1.0))
        return parts
    for target in targets_of(row.cfg):
        parts.append(training_part(row, "final", f"after_pruning fine-tune at {target:g}x: {seeds} seeds x "
                                   f"{len(methods)} methods", ft.after_pruning, seeds * len(methods), target))
    return parts


STAGE_FUNCTIONS = {"generate": generation_stage, "meta_train": meta_train_stage, "select": selection_stage,
                   "pretrain_final": pretrain_stage, "final": final_stage}


# ----------------------------------------------------------------------------------------------
# Throughput: measured (gpu_check.json) or estimated from MACs
# ----------------------------------------------------------------------------------------------
@dataclass
class Measured:
    rates: dict  # variant -> training images/s of the unpruned architecture
    macs: float  # MACs per image of that architecture (the row's unpruned MACs)
    label: str


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_gpu_check(path: Path | None, row: Row) -> tuple[Measured | None, str]:
    """The training images/s of ``gpu_check.json`` section f when it measured this row's architecture at its
    input size on CUDA at paper sizes; otherwise None and why."""
    if path is not None:
        path, name = Path(path), _shown(path)
    if path is None or not path.is_file():
        return None, f"no {name}" if path is not None else "no gpu_check.json given"
    try:
        report = json.loads(path.read_text())
        env, sizes = report["environment"], report["sizes"]
        section = next(s for s in report["sections"] if s.get("key") == "f")
        rates = {name: float(value["images_per_s"]) for name, value in section["numbers"].items()
                 if isinstance(value, dict) and "images_per_s" in value}
        architecture, image, tiny = sizes["resnet"], int(sizes["image"]), bool(sizes["tiny"])
        device = env["device"]
        date = str(env["date"])[:10]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as error:
        return None, f"{name} unparseable ({type(error).__name__}: {error})"
    shape = [int(v) for v in row.cfg.task.input_size]
    if tiny or device.get("type") != "cuda":
        return None, f"{name} is not a CUDA run at paper sizes"
    if architecture != str(row.cfg.task.model) or shape[1:] != [image, image] or not rates:
        return None, (f"{name} measured {architecture} at {image}x{image}, not {row.cfg.task.model} at "
                      f"{shape[1]}x{shape[2]}")
    bad = [k for k, v in rates.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        return None, f"{name}: no usable images/s for {bad}"
    return Measured(rates, row.macs, f"measured (gpu_check, {date}, {device.get('name', 'GPU')})"), "measured"


def price(part: Part, tflops: float, measured: Measured | None) -> None:
    """Fill the part's FLOPs, GPU-hours and source label."""
    part.flop = part.flops()
    if part.train_images == 0 and part.eval_images == 0:
        part.source = "-"
        return
    rate = measured.rates.get(part.variant) if measured is not None else None
    if rate is not None:
        equivalent = (part.train_images * part.macs + part.eval_images * part.eval_macs / EVAL_PER_TRAIN_IMAGE)
        part.gpu_hours = equivalent / measured.macs / rate / 3600.0
        part.source = measured.label
    else:
        part.gpu_hours = part.flop / (tflops * 1e12) / 3600.0
        part.source = "estimate"


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def cost(row: Row, stages: Sequence[str] = STAGES, tflops: float = DEFAULT_TFLOPS,
         gpu_check: Path | None = GPU_CHECK) -> dict:
    """Every part of the chosen stages, priced; plus the assumptions, as a plain dict (the ``--json`` output)."""
    if tflops <= 0:
        raise ValueError(f"--tflops must be > 0, got {tflops}")
    measured, why = load_gpu_check(gpu_check, row)
    parts = []
    for stage in stages:
        for part in STAGE_FUNCTIONS[stage](row):
            price(part, tflops, measured)
            parts.append(part)
    totals = {stage: sum(p.gpu_hours for p in parts if p.stage == stage) for stage in stages}
    task = row.cfg.task
    return {
        "row": row.name,
        "primary": f"configs/{row.primary}.yaml",
        "task": str(task.name),
        "architecture": str(task.model),
        "input_size": [int(v) for v in task.input_size],
        "dataset": {"name": str(task.dataset.name), "train_images": row.sizes.train, "val_images": row.sizes.val,
                    "test_images": row.sizes.test, "note": row.sizes.note},
        "macs_unpruned": row.macs,
        "initial_speed_up": init_speed_up(row),
        "targets": [] if row.unstructured else targets_of(row.cfg),
        "data_models": row.data_models,
        "data_models_source": row.data_models_note,
        "meta_train_data_models": meta_train_split(row.data_models, float(task.meta_train.train_split)),
        "seeds": row.seeds,
        "seeds_source": row.seeds_note,
        "methods": row.methods,
        "meta_train_world_size": row.world_size,
        "throughput": {"source": measured.label if measured else "estimate", "why": why,
                       "tflops_assumed": tflops, "measured_images_per_s": measured.rates if measured else None},
        "parts": [asdict(p) for p in parts],
        "gpu_hours": totals,
        "total_gpu_hours": sum(totals.values()),
    }


def _count(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    if value >= 1e6:
        return f"{value / 1e6:.1f} M"
    return f"{value:,.0f}"


def _hours(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def markdown(result: dict) -> str:
    ds = result["dataset"]
    through = result["throughput"]
    lines = [
        f"# Cost of `{result['row']}` ({result['primary']})",
        "",
        f"- task `{result['task']}`: {result['architecture']} at {'x'.join(map(str, result['input_size']))}, "
        f"{result['macs_unpruned'] / 1e6:,.1f} M MACs per image unpruned (torch-pruning's counter); "
        f"{ds['train_images']:,} training images per epoch ({ds['note']}), {ds['val_images']:,} validation, "
        f"{ds['test_images']:,} test",
        f"- speed-ups: init pruning {result['initial_speed_up']:g}x, targets "
        f"{', '.join(f'{t:g}x' for t in result['targets']) or '- (unstructured)'}",
        f"- data models: {result['data_models']} ({result['data_models_source']}), "
        f"{result['meta_train_data_models']} meta-train; meta-training ranks: {result['meta_train_world_size']}",
        f"- seeds: {len(result['seeds'])} ({', '.join(map(str, result['seeds']))}; {result['seeds_source']}); "
        f"methods: {', '.join(METHOD_NAMES[m] for m in result['methods'])}",
    ]
    if through["source"] == "estimate":
        lines.append(f"- GPU-hours: **estimate** from MACs (6 FLOPs per MAC per training image, 2 per evaluation "
                     f"image) at an assumed {through['tflops_assumed']:g} TFLOP/s effective (`--tflops`; about an "
                     f"H100 with AMP on large networks; small CIFAR networks reach far less, so their hours are "
                     f"lower bounds); no measurement used: {through['why']}")
    else:
        lines.append(f"- GPU-hours: {through['source']}: training images/s of the unpruned network per recipe "
                     f"variant {through['measured_images_per_s']}, scaled by MACs for pruned networks, an "
                     f"evaluation image counted as 1/3 of a training image")
    lines += ["", "| stage | part | runs | epochs | train images | eval images | MACs/image | PFLOP | GPU-h | "
                  "source |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in result["parts"]:
        macs = f"{p['macs'] / 1e6:,.1f} M ({p['speed_up']:g}x)"
        if p["eval_macs"] != p["macs"]:
            macs = f"{p['eval_macs'] / 1e6:,.1f} M (curve mean)"
        lines.append(f"| {p['stage']} | {p['what']} | {p['runs']:,} | {p['epochs']} | {_count(p['train_images'])} | "
                     f"{_count(p['eval_images'])} | {macs} | {p['flop'] / 1e15:,.1f} | {_hours(p['gpu_hours'])} | "
                     f"{p['source']} |")
    for stage, hours in result["gpu_hours"].items():
        lines.append(f"| **{stage}** | | | | | | | | **{_hours(hours)}** | |")
    train = sum(p["train_images"] for p in result["parts"])
    evaluated = sum(p["eval_images"] for p in result["parts"])
    flop = sum(p["flop"] for p in result["parts"])
    lines.append(f"| **total** | | | | **{_count(train)}** | **{_count(evaluated)}** | | **{flop / 1e15:,.1f}** | "
                 f"**{_hours(result['total_gpu_hours'])}** | |")
    notes = sorted({n for p in result["parts"] for n in p["notes"]})
    lines += ["", "Not counted: the metanetwork's own passes, pruning steps (no images), one-off evaluations outside "
                  "the epochs, data-loading stalls." + "".join(f" {n[0].upper()}{n[1:]}." for n in notes)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=resnet56_cifar10_2.3x")
    parser.add_argument("--primary", choices=("main", "imagenet"), default="main",
                        help="primary config: configs/main.yaml (default) or configs/imagenet.yaml")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"assumed effective TFLOP/s of the estimate (default {DEFAULT_TFLOPS:g})")
    parser.add_argument("--gpu-check", type=Path, default=GPU_CHECK,
                        help="gpu_check.json with measured images/s (default benchmarks/results/gpu_check/gpu_check.json)")
    parser.add_argument("--data-models", type=int, default=None, help="data models generated (default: see doc)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the final runs (default: the row's)")
    parser.add_argument("--methods", default="metanetwork,none",
                        help=f"final-run methods, comma-separated, of {', '.join(METHODS)} (default metanetwork,none)")
    parser.add_argument("--gpus", type=int, default=None,
                        help=f"torchrun ranks of meta-training with iterations_per_step (default {PAPER_WORLD_SIZE})")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"stages to count, comma-separated (default all: {','.join(STAGES)})")
    parser.add_argument("--pretrain-per-seed", action="store_true",
                        help="count pretrain_final once per seed (final.model=null) instead of once")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    row = make_row(args.overrides, args.primary, args.data_models, args.seeds,
                   [m.strip() for m in args.methods.split(",") if m.strip()], args.gpus, args.pretrain_per_seed)
    result = cost(row, stages, args.tflops, args.gpu_check)
    print(json.dumps(result, indent=2) if args.json else markdown(result).rstrip("\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
