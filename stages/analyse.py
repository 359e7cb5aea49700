"""Run mode ``analyse``: per-layer weight and BatchNorm statistics of one or more models, as a CSV and plots
(reference §8).

``python main/main.py run=analyse final.model=<checkpoint .pt> [final.compare_model=...] [final.metanetwork=...]``
analyses ``final.model`` (and ``final.compare_model``, and ``final.model`` after ``final.metanetwork``):
``layer_statistics.csv``, ``layer_statistics.png``, and per model its parameters, MACs and (with
``final.analyse_evaluate``) validation/test accuracy in ``results.json``.

Used to see *what* a metanetwork changes (reviewers asked which parameter statistics move): for every
Conv2d / Linear the weight L1/L2 norms, the spread of its per-output-channel L2 norms (what group-L2
pruning ranks; a wide spread = easy to prune) and optionally the effective rank; for every BatchNorm
the γ / β statistics (small |γ| channels are the ones a magnitude criterion removes cheaply).

Rows are plain dicts (one per layer), so several models can be written to one CSV and compared.

Under torchrun every rank loads the models and evaluates its shard of the data (sums all-reduced); rank 0 alone
computes the statistics and writes the files, and a failure there ends every rank with its message. Every rank
applies the metanetwork and then takes rank 0's result (``stages.ddp.same_weights_everywhere``, as run=select
does): on a GPU the metanetwork's scatter sums (``index_add_``, atomics) end in a different order on each rank,
so each rank's own result would differ in the last bits and the all-reduced accuracy would mix several models.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn as tnn

from generate_dataset.models import load_model
from nn.apply import apply_saved_metanetwork
from pruning.depgraph import count_macs
from stages import ddp
from stages.artifacts import metanetwork_setting
from stages.common import FinalRunConfigError, codec_options, example_input, num_params, setup, task_data
from training.loop import evaluate_splits
from utils import distributed
from utils.io import atomic_path, atomic_write

log = logging.getLogger(__name__)

WEIGHT_COLUMNS = ("weight_l1", "weight_l1_mean", "weight_l2", "weight_rms", "zero_fraction",
                  "channel_l2_mean", "channel_l2_std", "channel_l2_min", "channel_l2_max",
                  "channel_l2_min_over_max", "effective_rank")
BN_COLUMNS = ("gamma_abs_mean", "gamma_std", "gamma_min_abs", "gamma_small_fraction", "beta_mean", "beta_std",
              "beta_abs_mean")
CSV_COLUMNS = ("model", "index", "layer", "kind", "out_channels", "in_features", "numel") + WEIGHT_COLUMNS + BN_COLUMNS
# |γ| below this counts as a "small" channel (near-prunable): relative to the layer's largest |γ|
SMALL_GAMMA = 1e-2


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = σ / Σσ`` of the singular values of ``matrix [r, c]``.

    Between 1 (rank one) and ``min(r, c)`` (all singular values equal); 0 for an all-zero matrix.
    """
    singular = torch.linalg.svdvals(matrix.detach().double().cpu())
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def layer_statistics(model: tnn.Module, label: str = "model", rank: bool = True) -> list[dict]:
    """One row per Conv2d / Linear (``kind`` conv|linear) and per BatchNorm (``kind`` bn), in module order.

    Weight rows: ``weight_l1 = Σ|w|``, ``weight_l1_mean = mean |w|``, ``weight_l2 = ||w||_2``, ``weight_rms``,
    ``zero_fraction``, statistics of the per-output-channel L2 norms ``||w[o]||_2`` and, with ``rank``,
    the effective rank of ``w`` reshaped to ``[out, in * kh * kw]``. BN rows: γ/β means and spreads and
    the fraction of channels with ``|γ| < 1e-2 * max|γ|``. Columns that do not apply are empty.
    """
    rows: list[dict] = []
    for name, module in model.named_modules():
        row: dict = {"model": label, "index": len(rows), "layer": name}
        if isinstance(module, (tnn.Conv2d, tnn.Linear)):
            weight = module.weight.detach().double().cpu()
            flat = weight.reshape(weight.shape[0], -1)  # [out, in * kh * kw]
            channel = flat.norm(dim=1)  # [out]
            row.update(kind="conv" if isinstance(module, tnn.Conv2d) else "linear",
                       out_channels=flat.shape[0], in_features=flat.shape[1], numel=weight.numel(),
                       weight_l1=float(weight.abs().sum()), weight_l1_mean=float(weight.abs().mean()),
                       weight_l2=float(weight.norm()), weight_rms=float(weight.pow(2).mean().sqrt()),
                       zero_fraction=float((weight == 0).double().mean()),
                       channel_l2_mean=float(channel.mean()),
                       channel_l2_std=float(channel.std()) if channel.numel() > 1 else 0.0,
                       channel_l2_min=float(channel.min()), channel_l2_max=float(channel.max()),
                       channel_l2_min_over_max=float(channel.min() / channel.max()) if channel.max() > 0 else 0.0,
                       effective_rank=effective_rank(flat) if rank else None)
        elif isinstance(module, tnn.modules.batchnorm._BatchNorm) and module.weight is not None:
            gamma = module.weight.detach().double().cpu()
            beta = module.bias.detach().double().cpu()
            largest = float(gamma.abs().max())
            row.update(kind="bn", out_channels=gamma.numel(), numel=gamma.numel() + beta.numel(),
                       gamma_abs_mean=float(gamma.abs().mean()),
                       gamma_std=float(gamma.std()) if gamma.numel() > 1 else 0.0,
                       gamma_min_abs=float(gamma.abs().min()),
                       gamma_small_fraction=float((gamma.abs() < SMALL_GAMMA * largest).double().mean()),
                       beta_mean=float(beta.mean()), beta_std=float(beta.std()) if beta.numel() > 1 else 0.0,
                       beta_abs_mean=float(beta.abs().mean()))
        else:
            continue
        rows.append(row)
    return rows


def write_csv(rows: Iterable[Mapping], path: str | Path) -> Path:
    """Write statistic rows (any mix of models and kinds) to ``path`` with :data:`CSV_COLUMNS`."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    atomic_write(path, buffer.getvalue())
    return path


# Panels of the overview figure: (row kind, column, title)
_PANELS = (
    ("weight", "weight_l1_mean", "mean |w| per Conv/Linear layer"),
    ("weight", "weight_l2", "||w||_2 per Conv/Linear layer"),
    ("weight", "channel_l2_min_over_max", "min / max output-channel L2 norm"),
    ("weight", "effective_rank", "effective rank of w [out, in*k*k]"),
    ("bn", "gamma_abs_mean", "BN mean |γ|"),
    ("bn", "gamma_small_fraction", "BN fraction of channels with |γ| < 1% of max"),
    ("bn", "beta_mean", "BN mean β"),
    ("bn", "beta_std", "BN std β"),
)


def plot_statistics(rows_by_model: Mapping[str, Sequence[Mapping]], path: str | Path,
                    channel_norms: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Overview PNG: one panel per statistic (x = layer position, one line per model), plus a histogram
    of max-normalised output-channel L2 norms per model when ``channel_norms`` is given."""
    # lazily: matplotlib costs about a second at import and only the plot needs it
    import matplotlib

    matplotlib.use("Agg")  # headless; figures are only saved
    import matplotlib.pyplot as plt

    panels = [p for p in _PANELS
              if any(r.get(p[1]) is not None for rows in rows_by_model.values() for r in rows if _kind(r) == p[0])]
    count = len(panels) + (1 if channel_norms else 0)
    cols = 2
    fig, axes = plt.subplots(math.ceil(count / cols), cols, figsize=(14, 3.6 * math.ceil(count / cols)),
                             squeeze=False)
    flat_axes = list(axes.flat)
    for ax, (kind, column, title) in zip(flat_axes, panels):
        for label, rows in rows_by_model.items():
            picked = [r for r in rows if _kind(r) == kind and r.get(column) is not None]
            ax.plot(range(len(picked)), [r[column] for r in picked], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("layer (forward order)" if kind == "weight" else "BatchNorm (forward order)")
        ax.grid(alpha=0.3)
    if channel_norms:
        ax = flat_axes[len(panels)]
        for label, values in channel_norms.items():
            ax.hist(values.cpu().numpy(), bins=50, range=(0.0, 1.0), alpha=0.5, label=label)
        ax.set_title("output-channel L2 norm / layer max (all layers)")
        ax.set_xlabel("normalised channel L2 norm")
        ax.legend()
    for ax in flat_axes[count:]:
        ax.set_visible(False)
    if flat_axes:
        flat_axes[0].legend()
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


@torch.no_grad()
def normalised_channel_norms(model: tnn.Module) -> torch.Tensor:
    """Per-output-channel L2 norms of every Conv/Linear weight divided by their layer's max, concatenated [C]."""
    parts = []
    for module in model.modules():
        if isinstance(module, (tnn.Conv2d, tnn.Linear)):
            norms = module.weight.detach().double().cpu().reshape(module.weight.shape[0], -1).norm(dim=1)
            if norms.max() > 0:
                parts.append(norms / norms.max())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _kind(row: Mapping) -> str:
    return "bn" if row.get("kind") == "bn" else "weight"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``analyse``: ``layer_statistics.csv`` and ``.png`` of ``final.model`` (+ ``final.compare_model``,
    + ``final.model`` after ``final.metanetwork``); returns ``results.json`` (per model: params, MACs, accuracy)."""
    device = setup(cfg)
    run_dir = Path(run_dir)
    final = cfg.final
    if not final.get("model"):
        raise FinalRunConfigError("run=analyse needs final.model=<checkpoint .pt> (e.g. a pretrain_final model.pt "
                                  "or a pruning_final pruned_model.pt)")
    models: dict[str, tuple[tnn.Module, str]] = {}
    model, _ = load_model(final.model, map_location=device)
    models["model"] = (model, str(final.model))
    if final.get("compare_model"):
        models["compare_model"] = (load_model(final.compare_model, map_location=device)[0], str(final.compare_model))
    mn_path = metanetwork_setting(cfg)
    if mn_path is not None:
        changed = copy.deepcopy(model)
        apply_saved_metanetwork(changed, mn_path, map_location=device, **codec_options(cfg))
        # every rank applied it to the same weights; rank 0's result everywhere, whatever each rank's summation
        # order (module doc), so the statistics and the all-reduced accuracy are of one model
        ddp.same_weights_everywhere(changed)
        models["model + metanetwork"] = (changed, f"{final.model} + {mn_path}")

    # rank 0 computes the statistics and writes the files; its failure ends every rank (torchrun)
    csv_path, plot_path = distributed.run_on_main(_write_statistics, models, run_dir,
                                                  bool(final.get("effective_rank", True)))
    summary_models: dict[str, dict] = {}
    loaders = None
    if final.get("analyse_evaluate", True):  # every rank evaluates its shard; the sums are all-reduced
        _splits, loaders = task_data(cfg.task, cfg.seed, distributed=distributed.is_distributed())
    example = example_input(cfg.task, device)
    for label, (m, src) in models.items():
        info: dict[str, Any] = {"source": src, "params": num_params(m), "macs": count_macs(m, example)}
        if loaders is not None:
            info.update(evaluate_splits(m, loaders, device))
        summary_models[label] = info
        log.info("%s: %s", label, {k: v for k, v in info.items() if k != "source"})
    if not distributed.is_main_process():
        return {}
    summary = {"run": "analyse", "task": cfg.task.name, "models": summary_models, "csv": Path(csv_path).name,
               "plot": Path(plot_path).name}
    print(f"[{cfg.task.name}] analyse: {csv_path} and {plot_path}")
    return summary


def _write_statistics(models: dict[str, tuple[tnn.Module, str]], run_dir: Path, rank: bool) -> tuple[str, str]:
    """``layer_statistics.csv`` and ``.png`` of ``models`` in ``run_dir``; returns their paths."""
    rows_by_model = {label: layer_statistics(m, label, rank=rank) for label, (m, _src) in models.items()}
    csv_path = write_csv([row for rows in rows_by_model.values() for row in rows], run_dir / "layer_statistics.csv")
    plot_path = plot_statistics(rows_by_model, run_dir / "layer_statistics.png",
                                channel_norms={label: normalised_channel_norms(m) for label, (m, _s) in models.items()})
    return str(csv_path), str(plot_path)
