"""Accuracy-vs-speed-up curves: progressive pruning without fine-tuning, their scores and plots (reference §8).

A *curve* is a list of points ``(speed_up, acc)`` with ``speed_up`` non-decreasing. The first point is
the model as given (speed-up ``base_speed_up``, i.e. what the data model already has relative to the
unpruned architecture, e.g. 1.32 after init pruning); every further point is one global pruning step of
torch-pruning's ``GroupNormPruner`` (``iterative_steps`` equal steps of the channel ratio), evaluated
as is, WITHOUT fine-tuning, exactly as the authors' ``get_acc_speed_up_list`` does.

Reading a curve (used by both scores):
    the accuracy at speed-up ``t`` is that of the LEAST pruned point reaching ``t``, i.e. of the first
    point with ``speed_up >= t`` (what ``pruning.depgraph.prune_to_speed_up`` would hand back for target
    ``t``). For ``t`` below the first point it is the first point's accuracy (no pruning needed).
    Beyond the last point (the curve stopped before ``t``, e.g. its pruning steps ran out) it is the
    LAST point's accuracy: the curve is extended flat at its last value.

Scores:
    :func:`accuracy_at` reads one value that way. :func:`area_under_curve` is the mean accuracy over
    ``[x_first, max_speed_up]`` (the integral divided by the interval's length, so a curve that
    keeps accuracy 0.9 everywhere scores 0.9), either with the step function above (``kind="step"``,
    the default: exact for "what accuracy do I get when pruning to t") or with straight lines between
    points (``kind="trapezoid"``), both extended flat beyond the last point. :func:`score_points` is run=select's
    curve score (``auc``: the step area up to ``max_speed_up``; ``acc_at``); :func:`accuracy_floor` and
    :func:`eligible` rank candidates that lost too much unpruned accuracy after those that did not.

Under torchrun (DDP) every rank runs :func:`accuracy_speed_up_curve` on the same weights with its shard of a
``DistributedSampler`` loader: the accuracy is all-reduced by ``training.loop.evaluate``, the pruning (group-L2
importance of identical weights) is deterministic, and the pruned layer shapes are compared across ranks after
every step (``utils.distributed.check_same_on_all_ranks``: an error on every rank if they ever differ). Only
rank 0 shows the bar and logs.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from pruning.depgraph import count_macs, pruning_steps
from training.loop import evaluate
from utils.distributed import check_same_on_all_ranks, is_distributed, is_main_process
from utils.io import atomic_path

log = logging.getLogger(__name__)
log.addFilter(lambda _record: is_main_process())  # under torchrun only rank 0 logs

Point = tuple[float, float]
AUC_KINDS = ("step", "trapezoid")
CURVE_SCORES = ("auc", "acc_at")  # score_points


def accuracy_speed_up_curve(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str,
    method: Mapping[str, Any],
    example_inputs: torch.Tensor,
    max_speed_up: float,
    base_speed_up: float = 1.0,
    iterative_steps: int = 200,
    max_batches: int | None = None,
    progress: bool = True,
    desc: str = "pruning curve",
) -> list[Point]:
    """Prune a COPY of ``model`` step by step (no fine-tuning) and record ``(speed_up, acc)`` after each step.

    ``loader`` yields ``(images [B, C, H, W], labels [B])``; callers pass the VALIDATION split.
    ``example_inputs`` ``[1, C, H, W]`` traces the dependency graph and counts MACs. ``speed_up`` is
    ``base_speed_up * MACs(model) / MACs(pruned copy)``; pruning stops at the first step whose speed-up
    reaches ``max_speed_up`` or after ``iterative_steps`` steps. ``max_batches`` caps the evaluation
    batches per point. ``model`` itself is left untouched. Returns the points, first one unpruned.
    ``progress``: a bar on a terminal only (tqdm's ``disable=None``); when output goes to a file there is no
    bar (callers log one line per curve; a DEBUG line summarises it here).
    Under torchrun every rank calls it with the same ``model`` and its shard of a distributed ``loader``: the
    points are the all-reduced accuracies (equal on every rank), the pruned structure is checked to be the same
    on every rank after each step, and only rank 0 shows the bar.
    """
    if base_speed_up <= 0 or max_speed_up <= 0:
        raise ValueError(f"speed-ups must be > 0, got base_speed_up={base_speed_up}, max_speed_up={max_speed_up}")
    device = torch.device(device)
    pruned = copy.deepcopy(model).to(device).eval()  # eval: tracing must not touch BatchNorm running stats
    example_inputs = example_inputs.to(device)
    base_macs = count_macs(pruned, example_inputs)

    def measure(macs: float) -> Point:
        speed_up = base_speed_up * base_macs / macs
        acc = evaluate(pruned, loader, device, max_batches=max_batches)["acc"]
        return float(speed_up), float(acc)

    points = [measure(base_macs)]
    if points[0][0] >= max_speed_up:
        return points
    # disable=None: tqdm shows the bar only when its stream is a terminal (not in SLURM/nohup/CI logs)
    bar = tqdm(total=iterative_steps, desc=desc, disable=None if progress and is_main_process() else True,
               leave=False)
    shown = not bar.disable
    try:
        for step, macs in enumerate(pruning_steps(pruned, example_inputs, method, iterative_steps=iterative_steps),
                                    start=1):
            if is_distributed():  # deterministic pruning of identical weights: the same widths on every rank
                check_same_on_all_ranks(layer_shapes(pruned), f"{desc}: the pruned structure after step {step}")
            points.append(measure(macs))
            bar.update(1)
            bar.set_postfix(speed_up=f"{points[-1][0]:.3f}", acc=f"{points[-1][1]:.4f}")
            if points[-1][0] >= max_speed_up:
                break
    finally:
        bar.close()
    if progress and not shown:
        log.debug("%s: %d pruning step(s), speed-up %.3fx, accuracy %.4f -> %.4f", desc, len(points) - 1,
                  points[-1][0], points[0][1], points[-1][1])
    if points[-1][0] < max_speed_up:
        log.warning("%s: stopped at speed-up %.4fx after %d pruning steps (max_speed_up %.4fx not reached)",
                    desc, points[-1][0], len(points) - 1, max_speed_up)
    return points


def layer_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter: the widths a structured pruning left (compared across ranks)."""
    return [(name, tuple(param.shape)) for name, param in model.named_parameters()]


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------
def _checked(points: Sequence[Sequence[float]]) -> list[Point]:
    if len(points) == 0:
        raise ValueError("empty accuracy/speed-up curve")
    curve = [(float(x), float(a)) for x, a in points]
    for (x0, _), (x1, _) in zip(curve, curve[1:]):
        if x1 < x0:
            raise ValueError(f"curve speed-ups must be non-decreasing, got {x0} then {x1}")
    return curve


def accuracy_at(points: Sequence[Sequence[float]], target: float) -> float:
    """Accuracy of the first point with ``speed_up >= target`` (the last point's if none reaches it)."""
    curve = _checked(points)
    for x, acc in curve:
        if x >= target:
            return acc
    return curve[-1][1]


def area_under_curve(points: Sequence[Sequence[float]], max_speed_up: float, kind: str = "step") -> float:
    """Mean accuracy over speed-ups ``[x_first, max_speed_up]`` (area / interval length, in [0, 1]).

    ``kind="step"``: on ``(x_{i-1}, x_i]`` the accuracy is ``acc_i`` (see the module docstring);
    ``kind="trapezoid"``: linear between points. Both extend the curve flat at its last accuracy up
    to ``max_speed_up``; points beyond ``max_speed_up`` are cut off there. If ``max_speed_up`` is not
    above the first point's speed-up the interval is empty and the first point's accuracy is returned.
    """
    if kind not in AUC_KINDS:
        raise ValueError(f"unknown area kind {kind!r}; valid: {', '.join(AUC_KINDS)}")
    curve = _checked(points)
    lo = curve[0][0]
    if max_speed_up <= lo:
        return curve[0][1]
    area = 0.0
    for (x0, a0), (x1, a1) in zip(curve, curve[1:]):
        if x0 >= max_speed_up:
            break
        right = min(x1, max_speed_up)
        if right <= x0:
            continue  # zero-width segment (two points at the same speed-up)
        if kind == "step":
            area += (right - x0) * a1
        else:  # value of the straight line at the cut
            a_right = a0 + (a1 - a0) * (right - x0) / (x1 - x0)
            area += (right - x0) * (a0 + a_right) / 2.0
    x_last, a_last = curve[-1]
    if x_last < max_speed_up:
        area += (max_speed_up - x_last) * a_last
    return area / (max_speed_up - lo)


def mean_curve(curves: Sequence[Sequence[Sequence[float]]], max_speed_up: float | None = None) -> list[Point]:
    """Pointwise mean of several curves on the union of their speed-ups (read with :func:`accuracy_at`).

    With one curve this returns its points unchanged (up to duplicates of the same speed-up, of which the
    first is kept); ``max_speed_up`` drops grid points past the first one reaching it.
    """
    checked = [_checked(c) for c in curves]
    if not checked:
        raise ValueError("mean_curve needs at least one curve")
    grid = sorted({x for c in checked for x, _ in c})
    if max_speed_up is not None:
        reached = [x for x in grid if x >= max_speed_up]
        grid = [x for x in grid if x < max_speed_up] + reached[:1]
    return [(x, sum(accuracy_at(c, x) for c in checked) / len(checked)) for x in grid]


def score_points(points: Sequence[Sequence[float]], kind: str, max_speed_up: float, target_speed_up: float) -> float:
    """``auc``: step-wise mean accuracy up to ``max_speed_up``; ``acc_at``: accuracy at ``target_speed_up``."""
    if kind == "auc":
        return area_under_curve(points, max_speed_up, kind="step")
    if kind == "acc_at":
        return accuracy_at(points, target_speed_up)
    raise ValueError(f"curve score {kind!r} is unknown; valid: {', '.join(CURVE_SCORES)}")


def accuracy_floor(max_accuracy_drop: float | None, control: Mapping[str, Any] | None) -> float | None:
    """The lowest unpruned validation accuracy a candidate may keep: the control's (``unpruned_acc``) minus
    ``max_accuracy_drop`` (None: no floor, the reference's pure curve score)."""
    if max_accuracy_drop is None:
        return None
    if control is None:
        raise ValueError("an accuracy floor compares with the control's unpruned accuracy; it needs the control")
    return control["unpruned_acc"] - max_accuracy_drop


def eligible(item: Mapping[str, Any], floor: float | None) -> bool:
    """Whether a candidate keeps its unpruned validation accuracy at or above ``floor``."""
    return floor is None or item["unpruned_acc"] >= floor - 1e-12


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------
# Reference lines, recognised by their label: the untouched data model and the fine-tuned-without-metanetwork
# control. Every other curve gets its own colour sampled from CURVE_COLORMAP, in the order given.
REFERENCE_STYLES = {
    "origin": {"color": "0.5", "linestyle": "--", "linewidth": 1.6, "marker": None},
    "control": {"color": "black", "linestyle": "-", "linewidth": 2.6, "marker": None},
}
CURVE_COLORMAP = "turbo"
_COLORMAP_RANGE = (0.08, 0.95)  # turbo's darkest end is near black (the control's colour)


def curve_styles(labels: Sequence[str], colormap: str = CURVE_COLORMAP) -> dict[str, dict]:
    """Matplotlib line keywords per label: ``origin`` grey dashed, ``control`` black and thicker, the others
    (in the given order, e.g. by epoch) evenly spaced colours of ``colormap``, so no two curves share a colour
    (unlike matplotlib's default cycle, which repeats after 10)."""
    # lazily: matplotlib costs about a second at import and only plotting needs it
    import matplotlib
    from matplotlib.colors import to_hex

    sparse = [label for label in labels if label.startswith("sparse_reg_")]
    others = [label for label in labels if label not in REFERENCE_STYLES and label not in sparse]
    # sparse-learning references: dotted, shades of red (strongest regulariser darkest)
    reds = matplotlib.colormaps["Reds"]
    sparse_styles = {label: {"color": to_hex(reds(0.45 + 0.5 * i / max(1, len(sparse) - 1))), "linestyle": ":",
                             "linewidth": 2.0} for i, label in enumerate(sparse)}
    cmap = matplotlib.colormaps[colormap]
    low, high = _COLORMAP_RANGE
    if len(others) == 1:
        positions = [low]
    else:
        positions = [low + (high - low) * i / (len(others) - 1) for i in range(len(others))]
    colors = {label: to_hex(cmap(pos)) for label, pos in zip(others, positions)}
    return {label: dict(REFERENCE_STYLES[label]) if label in REFERENCE_STYLES else
            sparse_styles.get(label) or {"color": colors[label]} for label in labels}


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: str | Path, max_speed_up: float,
                ylim: Sequence[float] | None = None, title: str = "",
                styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """One line with markers per label (accuracy over MACs speed-up), saved as a PNG at ``path``.

    Axes follow the reference: x from 1 to ``max_speed_up``, y in ``ylim`` (automatic when None).
    ``styles``: matplotlib line keywords per label (e.g. ``color``, ``linestyle``, ``linewidth``, ``marker``)
    overriding the defaults of :func:`curve_styles`, which are used for labels ``styles`` does not name (labels
    ``origin`` / ``control`` get the reference styles; every other curve a distinct colour).
    """
    # lazily: matplotlib costs about a second at import and only plotting needs it
    import matplotlib

    matplotlib.use("Agg")  # headless; a no-op if already selected
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_curves: no curve to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [str(label) for label in curves]
    styles = {str(k): dict(v) for k, v in (styles or {}).items()}
    defaults = curve_styles([label for label in labels if label not in styles])
    fig, ax = plt.subplots(figsize=(8, 6))
    try:
        for label, points in zip(labels, curves.values()):
            curve = _checked(points)
            style = {"marker": "o", "markersize": 3, "linewidth": 1.2} | defaults.get(label, {}) | \
                styles.get(label, {})
            ax.plot([x for x, _ in curve], [a for _, a in curve], label=label, **style)
        ax.set_xlim(1.0, max(max_speed_up, 1.0) * 1.02)
        if ylim is not None:
            low, high = (float(v) for v in ylim)
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"plot_curves: ylim must be [low, high] with low < high, got {list(ylim)}")
            ax.set_ylim(low, high)
        ax.set_xlabel("speed-up (MACs of the unpruned architecture / MACs)")
        ax.set_ylabel("accuracy (no fine-tuning after pruning)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small", ncol=2 if len(labels) > 12 else 1)
        fig.tight_layout()
        with atomic_path(path) as tmp:  # a failed write leaves the earlier plot whole
            fig.savefig(tmp, dpi=150, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
