"""run=meta_train's per-epoch record besides its checkpoints: ``meta_train_metrics.csv`` (one row per epoch, rewritten
whole after every epoch) and ``meta_train_diagnostics.png`` (the diagnostics against the epoch, rewritten too).

Columns (:data:`CSV_COLUMNS`): epoch, lr, mean CE, mean regulariser value R, the diagnostics of
``training.meta_gradient`` (means over the epoch's steps), mean metanetwork gradient norm, seconds, images/s
(images forwarded through the generated networks per second, all ranks) and peak GPU memory (CUDA only); the
``iterations_per_step`` mode adds ``steps`` (optimiser steps in the epoch). Rows of an older checkpoint's history
without some columns leave those cells blank. See [docs/stages.md](../docs/stages.md), "Meta-training".
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from training.meta_gradient import DIAGNOSTIC_COLUMNS, SMALL_FRACTION
from utils.io import atomic_path, atomic_write

log = logging.getLogger(__name__)

METRICS_CSV = "meta_train_metrics.csv"
DIAGNOSTICS_PNG = "meta_train_diagnostics.png"
# images/s: images forwarded through the generated networks per second (all ranks); peak_mem_gb: CUDA only
CSV_COLUMNS = ("epoch", "lr", "ce", "reg", *DIAGNOSTIC_COLUMNS, "grad_norm", "seconds", "images_per_s", "peak_mem_gb")


def write_metrics(path: Path, history: list[dict]) -> None:
    """``history`` (one row per epoch) as the CSV at ``path``, written atomically."""
    buffer = io.StringIO()
    # iterations_per_step mode also records the optimiser steps of each epoch
    at = CSV_COLUMNS.index("seconds")
    columns = ((*CSV_COLUMNS[:at], "steps", *CSV_COLUMNS[at:]) if any("steps" in r for r in history)
               else CSV_COLUMNS)
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write(path, buffer.getvalue())


def plot_diagnostics(history: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Seven panels vs epoch: mean CE, R, the gradient's CE and regulariser parts, small_group_share (its input
    value dashed), weight_change, the per-channel norm ratio's quantiles (selective vs uniform shrinking) and
    the regulariser/CE gradient ratio.

    Rows lacking a column (an older checkpoint's history) are plotted as gaps. Saved as a PNG at ``path``
    (written to a temporary file, then renamed, so a reader never sees a half-written image).
    """
    # lazily: matplotlib costs about a second at import and only the plot needs it
    import matplotlib

    matplotlib.use("Agg")  # headless; a no-op if already selected
    import matplotlib.pyplot as plt

    def column(key: str) -> list[float]:
        values = []
        for row in history:
            value = row.get(key)
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                values.append(math.nan)
        return values

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [int(row["epoch"]) for row in history]
    panels = [("ce", "mean cross-entropy"), ("reg", "regulariser R"),
              ("grad_ce_norm", "metanetwork gradient norm, by part"),
              ("small_group_share", f"share of channel groups <= {SMALL_FRACTION:.0%} of the network's largest"),
              ("weight_change", "weight change ||θ'-θ|| / ||θ||"),
              ("norm_ratio", "channel group norm, generated / input"),
              ("balance", "regulariser part / CE part of the gradient")]
    ce_part, reg_part = column("grad_ce_norm"), column("grad_reg_norm")
    fig, axes = plt.subplots(2, 4, figsize=(18, 7), sharex=True)
    try:
        axes.flat[-1].axis("off")
        for ax, (key, title) in zip(axes.flat, panels):
            if key == "norm_ratio":
                # p10 far below p90: channels singled out; p10 close to p90: every channel shrinks alike
                for q, style in (("p90", ":"), ("p50", "-"), ("p10", "--")):
                    ax.plot(epochs, column(f"norm_ratio_{q}"), linestyle=style, marker="o", markersize=3,
                            linewidth=1.2, label=q)
                ax.legend(loc="best", fontsize="small")
            elif key == "balance":
                ax.plot(epochs, [r / c if c > 0 else math.nan for r, c in zip(reg_part, ce_part)], marker="o",
                        markersize=3, linewidth=1.2)
                ax.set_yscale("log")
            elif key == "grad_ce_norm":
                ax.plot(epochs, ce_part, marker="o", markersize=3, linewidth=1.2, label="cross-entropy")
                ax.plot(epochs, reg_part, marker="s", markersize=3, linewidth=1.2, label="regulariser")
                ax.set_yscale("log")
                ax.legend(loc="best", fontsize="small")
            else:
                ax.plot(epochs, column(key), marker="o", markersize=3, linewidth=1.2, label="generated")
            if key == "small_group_share":
                ax.plot(epochs, column("small_group_share_input"), linestyle="--", linewidth=1.2,
                        label="data model (input)")
                ax.legend(loc="best", fontsize="small")
            ax.set_title(title, fontsize="medium")
            ax.grid(True, alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        fig.suptitle("meta-training diagnostics (mean over the epoch's training data models)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_quietly(history: list[Mapping[str, Any]], path: Path) -> None:
    """:func:`plot_diagnostics`, a failure only logged (the figure must never stop a meta-training run)."""
    try:
        plot_diagnostics(history, path)
    except Exception as err:  # noqa: BLE001 - diagnostics only
        log.warning("could not write %s: %s: %s", path, type(err).__name__, err)
