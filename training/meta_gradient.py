"""The method's core: the meta-training gradient of one data model, and the diagnostics of a step.

One step on one data model (``stages.meta_train`` chooses the data models, batches and optimiser steps)::

    θ'      = codec.decode(metanetwork(codec.encode(data model)))     # generated weights, graph to the GNN
    leaves  = θ'.detach().requires_grad_()
    for each batch b: CE_b = cross_entropy(functional_call(model, leaves + BN buffers, x_b), y_b); CE_b.backward()
    grad    = (reference_batches / n) * sum_b dCE_b/dθ'  +  dR/dθ'    # R: pruning.regularizer, strength pruner_reg
    torch.autograd.backward(θ', grad)                                 # ONE backward through decoder + GNN

Why one backward: the authors call ``CE_b.backward(retain_graph=True)`` for every batch, so the GNN graph is
traversed n times per step. θ' does not depend on the batch, so by linearity backward(θ', sum_b dCE_b/dθ') gives
the same metanetwork gradient with one traversal (``tests/test_meta_train.py`` checks it in float64).

The balance: ``reference_batches`` (the authors' batches per step, 100 on CIFAR) makes this exactly the paper's
gradient ``sum_{b=1..100} dCE_b + dR`` when a step sees that many batches, and keeps ``pruner_reg /
reference_batches`` regulariser per unit of mean CE for any number of batches; ``reference_batches=None`` is the
authors' literal sum. :func:`accumulated_step` is the ImageNet step: the same gradient per rank, averaged over
the ranks.

Diagnostics (:class:`StepResult`, from the step's generated weights, no extra metanetwork forward):
``small_group_share`` (and ``_input`` on the data model's own weights), ``weight_change``, ``norm_ratio_p10`` /
``_p50`` / ``_p90`` and the two gradient parts ``grad_ce_norm`` / ``grad_reg_norm`` (one extra backward). They
never change the step's gradient. Definitions: [docs/stages.md](../docs/stages.md), "Meta-training".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as tnn

from nn.graph import GraphCodec
from pruning.regularizer import (REG_PROJECTIONS, build_regularizer, relative_change, small_share,
                                 without_scale_component)
from utils.distributed import all_reduce_mean, average_gradients, run_on_every_rank

DIAGNOSTIC_COLUMNS = ("small_group_share", "small_group_share_input", "weight_change", "norm_ratio_p10",
                      "norm_ratio_p50", "norm_ratio_p90", "grad_ce_norm", "grad_reg_norm")
NORM_RATIO_QUANTILES = (0.1, 0.5, 0.9)
SMALL_FRACTION = 0.01  # a channel group is "small" at <= 1 % of the network's largest group norm
# BatchNorm in the CE forward: "eval" (the reference: the data model's running statistics) or "batch"
BN_MODES = ("eval", "batch")


@dataclass
class DataModelEntry:
    """Everything a step needs for one data model (cached per store index for the whole run)."""

    index: int
    name: str  # "shard_0000.h5#3", for messages
    model: tnn.Module  # on the device, eval mode, the data model's own weights (never modified)
    codec: GraphCodec
    regularizer: Any  # pruning.regularizer.GroupL2Regularizer | SignRegularizer
    buffers: dict[str, Tensor]
    cache: dict = field(default_factory=dict)  # values of the (never modified) own weights, e.g. the input share


@dataclass
class StepResult:
    """Scalars of one step: mean batch CE, regulariser value R, number of batches, and the diagnostics
    (module docstring; NaN when not computed)."""

    ce: float
    reg: float
    batches: int
    small_group_share: float = math.nan
    small_group_share_input: float = math.nan
    weight_change: float = math.nan
    norm_ratio_p10: float = math.nan
    norm_ratio_p50: float = math.nan
    norm_ratio_p90: float = math.nan
    grad_ce_norm: float = math.nan
    grad_reg_norm: float = math.nan


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def build_entry(index: int, model: tnn.Module, example: Tensor, method: Mapping[str, Any], settings: Any,
                input_shape: tuple[int, ...] | None = None, iterative_steps: int = 200, name: str = "",
                **codec_options: Any) -> DataModelEntry:
    """Codec + regulariser (torch-pruning dependency graph) for ``model`` (already on the device).

    ``settings``: the regulariser's strength as ``settings.pruner_reg`` (``stages.meta_train.MetaTrainSettings``).
    ``codec_options``: further ``GraphCodec`` keywords (``identity_edges``, ``edge_layout``,
    ``legacy_fc_permutation``; config section ``codec``).

    ``model`` is put in eval mode and its parameters stop requiring gradients (after the pruner's tracing,
    which needs them): meta-training never updates a data model.
    """
    model.eval()
    codec = GraphCodec(model, input_shape=input_shape, **codec_options)
    regularizer = build_regularizer(model, example, method, reg=settings.pruner_reg, iterative_steps=iterative_steps)
    model.requires_grad_(False)
    return DataModelEntry(index=index, name=name or str(index), model=model, codec=codec, regularizer=regularizer,
                          buffers=dict(model.named_buffers()))


def meta_gradient(metanetwork: tnn.Module, entry: DataModelEntry, batches: Iterable[tuple[Tensor, Tensor]],
                  reference_batches: int | None, alpha: float, bias: bool = False,
                  device: torch.device | str | None = None, diagnostics: bool = True,
                  bn_mode: str = "eval", reg_projection: str = "none") -> StepResult:
    """Accumulate the meta-training gradient of one data model into the metanetwork's ``.grad``.

    ``batches``: (images [B, C, H, W], labels [B]) pairs, moved to ``device`` (default: the model's).
    The metanetwork gradient equals the one of the authors' per-batch ``backward(retain_graph=True)``
    followed by the regulariser backward, scaled as ``reference_batches * mean_b + regulariser`` (module
    docstring; ``reference_batches=None``: the plain sum over batches). One backward through the GNN.
    Does not zero existing gradients and does not step the optimiser. ``diagnostics``: also fill the
    result's ``small_group_share``, ``small_group_share_input`` and ``weight_change`` (:func:`step_diagnostics`).
    ``bn_mode="batch"``: BatchNorm normalises with each batch's statistics (train-mode forward on copies of
    the running buffers, so the data model's statistics never change); ``"eval"`` (the reference) uses them.
    ``reg_projection``: ``"scale_free"`` / ``"shrink_only"`` push the regulariser gradient without each tensor's
    own-direction component (``pruning.regularizer.without_scale_component``); R is the same either way.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"meta_gradient: bn_mode={bn_mode!r}; valid: {', '.join(BN_MODES)}")
    if reg_projection not in REG_PROJECTIONS:
        raise ValueError(f"meta_gradient: reg_projection={reg_projection!r}; valid: {', '.join(REG_PROJECTIONS)}")
    model = entry.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
        graph = entry.codec.encode(model)
    generated = entry.codec.decode(metanetwork(graph))
    leaves = {k: v.detach().requires_grad_(True) for k, v in generated.items()}

    ce_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if images.is_floating_point():
            images = images.to(next(iter(leaves.values())).dtype)
        if bn_mode == "batch":
            model.train()  # BatchNorm only (no dropout in these models); updates go to throw-away copies
            try:
                buffers = {k: v.clone() for k, v in entry.buffers.items()}
                logits = torch.func.functional_call(model, (buffers, leaves), (images,))
            finally:
                model.eval()
        else:
            logits = torch.func.functional_call(model, (entry.buffers, leaves), (images,))
        loss = _cross_entropy(logits, labels)
        loss.backward()  # accumulates dCE_b/dθ' into the leaves; the GNN graph is not touched
        ce_sum += loss.detach().to(torch.float64)
        n += 1
    if n == 0:
        raise ValueError("meta_gradient: no training batch (is the training loader empty?)")
    scale = 1.0 if reference_batches is None else float(reference_batches) / n

    reg_grads = entry.regularizer.gradient(leaves, alpha=alpha, bias=bias)
    reg_value = entry.regularizer.value(leaves, reg_grads)
    if reg_projection != "none":
        own = dict(model.named_parameters())  # a tensor the metanetwork does not generate keeps its own weight
        reg_grads = without_scale_component(reg_grads, {k: leaves.get(k, own.get(k)) for k in reg_grads},
                                            shrink_only=reg_projection == "shrink_only")
    outputs, grads = [], []
    with torch.no_grad():
        for key, out in generated.items():
            leaf = leaves[key]
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            if scale != 1.0:
                g = g * scale
            if key in reg_grads:
                g = g + reg_grads[key]
            outputs.append(out)
            grads.append(g)
    if diagnostics:
        ce_part = _ce_part(metanetwork, outputs, generated, leaves, scale)
        before = {p: p.grad.clone() for p in metanetwork.parameters() if p.grad is not None}
    torch.autograd.backward(outputs, grads)  # the step's gradient: the diagnostics never change it
    result = StepResult(ce=float(ce_sum.item()) / n, reg=float(reg_value.item()), batches=n)
    if diagnostics:
        (result.small_group_share, result.small_group_share_input, result.weight_change,
         (result.norm_ratio_p10, result.norm_ratio_p50, result.norm_ratio_p90)) = step_diagnostics(entry, leaves)
        result.grad_ce_norm, result.grad_reg_norm = _part_norms(metanetwork, before, ce_part)
    return result


def _ce_part(metanetwork: tnn.Module, outputs: list[Tensor], generated: Mapping[str, Tensor],
             leaves: Mapping[str, Tensor], scale: float) -> dict:
    """The cross-entropy part of the metanetwork gradient, ``{parameter: gradient}``: one extra backward
    through the GNN that accumulates nothing into ``.grad``."""
    params = [p for p in metanetwork.parameters() if p.requires_grad]
    ce_grads = [leaves[k].grad * scale if leaves[k].grad is not None else torch.zeros_like(leaves[k])
                for k in generated]
    parts = torch.autograd.grad(outputs, params, ce_grads, retain_graph=True, allow_unused=True)
    return {p: g for p, g in zip(params, parts) if g is not None}


@torch.no_grad()
def _part_norms(metanetwork: tnn.Module, before: Mapping[Tensor, Tensor], ce_part: Mapping[Tensor, Tensor]
                ) -> tuple[float, float]:
    """(``||g_CE||``, ``||g_R||``) over all metanetwork parameters. The step's gradient is linear in its two
    parts, so ``g_R`` = (``.grad`` after the step's backward - ``.grad`` before) - ``g_CE``."""
    ce_sq = reg_sq = 0.0
    for p in metanetwork.parameters():
        if p.grad is None:
            continue
        step = p.grad - before[p] if p in before else p.grad
        ce = ce_part.get(p)
        reg = step if ce is None else step - ce
        reg_sq += float(reg.double().pow(2).sum())
        if ce is not None:
            ce_sq += float(ce.double().pow(2).sum())
    return math.sqrt(ce_sq), math.sqrt(reg_sq)


@torch.no_grad()
def step_diagnostics(entry: DataModelEntry, generated: Mapping[str, Tensor]
                     ) -> tuple[float, float, float, tuple[float, ...]]:
    """(small_group_share, small_group_share_input, weight_change, (norm_ratio_p10, _p50, _p90)) of
    ``generated`` weights (module doc).

    ``generated``: {state-dict key: tensor} as decoded by ``entry.codec``; the input's channel norms are
    computed once per entry (the data model's own weights never change) and cached in ``entry.cache``.
    """
    regularizer = entry.regularizer
    norms = regularizer.channel_norms(generated)
    if "input_norms" not in entry.cache:
        entry.cache["input_norms"] = regularizer.channel_norms({})
        entry.cache["small_group_share_input"] = small_share(entry.cache["input_norms"], SMALL_FRACTION)
    own_norms = entry.cache["input_norms"]
    change = relative_change(generated, dict(entry.model.named_parameters()))
    return (small_share(norms, SMALL_FRACTION), entry.cache["small_group_share_input"], change,
            norm_ratio_quantiles(norms, own_norms))


def norm_ratio_quantiles(norms: Tensor, own_norms: Tensor,
                         quantiles: Sequence[float] = NORM_RATIO_QUANTILES) -> tuple[float, ...]:
    """Quantiles of ``norms / own_norms`` (per channel; channels with a zero own norm are left out).

    Both are :meth:`GroupL2Regularizer.channel_norms`-style vectors of the same channels. Unstructured
    regularisers give per-weight magnitudes, so the quantiles are then over weights. No channel: NaNs.
    """
    norms, own_norms = norms.detach().flatten(), own_norms.detach().flatten().to(norms.device)
    if norms.shape != own_norms.shape:
        raise ValueError(f"norm_ratio_quantiles: {norms.numel()} generated norms vs {own_norms.numel()} own norms")
    keep = own_norms > 0
    if not bool(keep.any()):
        return tuple(math.nan for _ in quantiles)
    ratios = (norms[keep] / own_norms[keep]).to(torch.float64)
    return tuple(float(q) for q in torch.quantile(ratios, torch.tensor(list(quantiles), dtype=torch.float64,
                                                                        device=ratios.device)).tolist())


def grad_norm(module: tnn.Module) -> float:
    """Global L2 norm of the parameters' gradients (NaN/inf propagate)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in module.parameters()
             if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)).item())


def accumulated_step(metanetwork: tnn.Module, entry: DataModelEntry, batches: Iterable[tuple[Tensor, Tensor]],
                     reference_batches: int | None, alpha: float, bias: bool = False,
                     device: torch.device | str | None = None, diagnostics: bool = True,
                     bn_mode: str = "eval", reg_projection: str = "none") -> tuple[StepResult, float]:
    """The gradient of one ``iterations_per_step`` optimiser step, left in the metanetwork's ``.grad``.

    Zeroes the gradients, accumulates this rank's :func:`meta_gradient` over ``batches`` (one backward through
    the GNN; ``reference_batches / len(batches)`` times the CE sum plus the regulariser), then averages it over
    the ranks, so every rank holds the same gradient. Returns the step's scalars as means over the ranks (CE, R,
    diagnostics) and the norm of the averaged gradient. Without torchrun: this process's gradient. Does not
    step the optimiser.
    """
    metanetwork.zero_grad(set_to_none=True)
    result = run_on_every_rank(lambda: meta_gradient(metanetwork, entry, batches, reference_batches, alpha, bias,
                                                  device, diagnostics=diagnostics, bn_mode=bn_mode,
                                                  reg_projection=reg_projection),
                            f"meta_train step on data model {entry.name}")
    average_gradients(metanetwork.parameters())
    keys = ("ce", "reg", *DIAGNOSTIC_COLUMNS)
    device = torch.device(device) if device is not None else next(metanetwork.parameters()).device
    values = all_reduce_mean(torch.tensor([getattr(result, k) for k in keys], dtype=torch.float64, device=device))
    mean = StepResult(batches=result.batches, **dict(zip(keys, values.tolist())))
    return mean, grad_norm(metanetwork)
