"""The pruning regulariser of meta-training as an explicit gradient (reference §6, §12).

Meta-training pushes ``dR/dθ'`` of a sparsity regulariser ``R`` through the graph decoder and the GNN.
The authors obtain it from torch-pruning: ``GroupNormPruner.regularize(model, alpha, bias)`` writes it
into ``param.grad``. Here it is returned as a dict ``{state-dict key: gradient}`` computed from any set of
(generated, detached) weights, with torch-pruning's own dependency groups and importance.

Structured methods (:class:`GroupL2Regularizer`, torch-pruning 1.6.1 ``GroupNormPruner.regularize``)
----------------------------------------------------------------------------------------------------
For every dependency group ``g`` of the pruner (coupled conv/linear out-rows, conv/linear in-columns and
BatchNorm weights; the classifier is not a root), with ``imp = sqrt(importance(g))`` (the method's
``GroupMagnitudeImportance``: group L2, mean over members, max-normalised for the paper's method)::

    gamma_c = alpha ** ((max imp - imp_c) / (max imp - min imp))     in [1, alpha]
    grad[member slice of channel c] += reg * gamma_c * w[member slice of channel c]

for conv/linear out-rows (and their bias with ``bias=True``), conv/linear in-columns and BatchNorm
weights (and biases with ``bias=True``). ``gamma`` is a constant (no gradient flows through it). The
regulariser value whose gradient this is: ``R = (reg / 2) * sum_g sum_c gamma_c * ||θ_{g,c}||^2``
(a slice shared by two groups counts in both), i.e. ``R = 0.5 * sum(grad * w)`` (:meth:`value`).

Degenerate groups (documented deviation). torch-pruning computes ``0 / 0 = NaN`` for a group whose
channels all have the same importance (always for a group of one channel, e.g. a layer pruned to one
channel) and writes NaN into every member slice; the authors then drop the regulariser gradient of
every *whole tensor* containing a NaN. Here such a group gets ``gamma = 1`` for all its channels (the
plain DepGraph pull ``reg * w``; no channel is singled out when none is less important), so nothing is
NaN and no tensor is dropped. A group whose importance itself is NaN (all its weights are zero, so the
max-normaliser divides 0 by 0) is skipped by torch-pruning; here it also gets ``gamma = 1``, which gives
the same zero gradient on its (zero) weights and differs only for nonzero biases with ``bias=True``.
Everything else is computed exactly as torch-pruning does (same groups, same importance, same
index arithmetic and operation order), which ``tests/test_meta_train.py`` checks against
``GroupNormPruner.regularize`` itself. One torch-pruning quirk is kept for parity: after a grouped conv's
in-channel member, the truncated ``gamma`` is used for the group's later members.

Per call, no host synchronisation (sparse learning runs it every batch). The channel and root-channel index
tensors of every group member are built once with the regulariser, on the model's device (again after the model
moved), and the group-L2 importance (``GroupMagnitudeImportance``, mean/sum reduction) is recomputed here with
torch-pruning's operations in its order but on those tensors, so the bits on the CPU are torch-pruning's; the
degenerate-group choice is a ``torch.where`` on the device. ``tests/test_sparse_learning.py`` counts uploads and
synchronising calls (none) and compares with the earlier list-indexed computation bit for bit.

Projected variants (not the paper's; ``task.meta_train.reg_projection``, :func:`without_scale_component`)
-----------------------------------------------------------------------------------------------------
``scale_free`` removes from each parameter tensor's regulariser gradient its component along that tensor::

    grad_k <- grad_k - m_k * w_k,    m_k = <grad_k, w_k> / <w_k, w_k>

so that the regulariser can no longer be lowered by shrinking a whole layer alike. Under batch-statistics
BatchNorm such a shrink costs no cross-entropy (the BN after a conv undoes its scale) and leaves the
network exactly as prunable; with the plain gradient it is what a metanetwork learns first. Since the
plain gradient is ``reg * gamma_e * w_e`` element-wise (``gamma_e >= 1`` summed over the element's
members), ``m_k`` is the tensor's norm-weighted mean strength and what is left is ``reg * (gamma_e - m_k /
reg) * w_e``: elements pulled harder than the mean shrink, the others are pushed to grow.
``shrink_only`` keeps only the first part (``(gamma_e - m_k / reg)^+``): the channels pulled harder than
their tensor's mean are pulled by the excess, the rest are left alone. ``R`` (the logged value) is the
plain one either way.

Unstructured methods (:class:`SignRegularizer`, reference §12)
-------------------------------------------------------------
``grad += reg * sign(w)`` on every Conv/Linear weight (the classifier included); ``alpha`` and ``bias``
are ignored. Value: ``R = reg * sum |w|``.

Diagnostics (``meta_train_metrics.csv``; they never change the gradient)
------------------------------------------------------------------------
``channel_norms(params)`` gives the un-normalised norm of every prunable unit of the given weights:

* structured (:meth:`GroupL2Regularizer.channel_norms`): for every dependency group ``g`` of the pruner
  and every channel ``c`` of it, ``norm_{g,c} = sqrt(sum over the group's members of ||slice_c||^2)``,
  the members being the ones torch-pruning's group-L2 importance measures (conv/linear out-rows,
  conv/linear in-columns, BatchNorm/LayerNorm affine weights; biases excluded, as with ``bias=False``).
  This is ``importance(g)`` before the mean over members and the max-normaliser, so
  ``norm_{g,.}^2 / max_c norm_{g,c}^2 == estimate_importance(g)`` for the paper's method.
* unstructured (:meth:`SignRegularizer.channel_norms`): ``|w|`` of every Conv/Linear weight entry.

:func:`small_share` of those norms is the share of units whose norm is at most ``fraction`` (1 %) of the
largest norm *of the whole network* (the global ranking the pruner uses), and :func:`relative_change`
is ``||θ' - θ||_2 / ||θ||_2`` over all given tensors together.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch_pruning.pruner import algorithms as tp_pruner
from torch_pruning.pruner import function as tp_function
from torch_pruning.pruner import importance as tp_importance

from pruning.depgraph import build_pruner

__all__ = [
    "GroupL2Regularizer",
    "SignRegularizer",
    "build_regularizer",
    "group_gamma",
    "relative_change",
    "small_share",
    "swapped_parameters",
    "without_scale_component",
    "REG_PROJECTIONS",
]


def group_gamma(imp: Tensor, alpha: float) -> Tensor:
    """Per-channel strength ``alpha ** ((max - imp) / (max - min))`` in [1, alpha] of one group.

    ``imp`` [C]: the group's (square-rooted) channel importance. A degenerate group (all equal, one
    channel, or NaN importance) gets ``gamma = 1`` for every channel instead of torch-pruning's NaN.
    Returns [C], same dtype/device as ``imp``. No host synchronisation: the degenerate case is chosen on the
    device (a NaN importance makes ``max`` NaN, so ``max - min > 0`` is false for it too).
    """
    if imp.numel() == 0:
        return imp
    hi, lo = imp.max(), imp.min()
    span = hi - lo
    gamma = alpha ** ((hi - imp) / span)
    return torch.where(span > 0, gamma, torch.ones_like(gamma))


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, params: Mapping[str, Tensor]) -> Iterator[None]:
    """Temporarily make ``model``'s parameters named in ``params`` hold those tensors (``param.data``).

    torch-pruning reads weights from the modules of its dependency graph; this lets it read generated
    weights without copying them and without touching the model's own tensors, which come back on exit.
    Tensors must have the parameters' shapes, dtypes and devices.
    """
    named = dict(model.named_parameters())
    unknown = [k for k in params if k not in named]
    if unknown:
        raise KeyError(f"parameters {unknown} are not parameters of the {type(model).__name__}")
    saved = {}
    try:
        for key, tensor in params.items():
            param = named[key]
            if tensor.shape != param.shape or tensor.dtype != param.dtype or tensor.device != param.device:
                raise ValueError(
                    f"parameter {key!r}: got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, the model has "
                    f"{tuple(param.shape)} {param.dtype} on {param.device}"
                )
            saved[key] = param.data
            param.data = tensor.detach()
        yield
    finally:
        for key, data in saved.items():
            named[key].data = data


@dataclass
class _Term:
    """One entry of torch-pruning's ``GroupMagnitudeImportance`` of a group (its ``group_imp`` list).

    ``op``: ``out`` (rows of a conv/linear weight; ``out_t`` for a transposed conv), ``in`` (columns;
    ``in_t`` for a transposed conv) or ``vec`` (a BatchNorm/LayerNorm affine vector or a bias). ``repeat``:
    grouped-conv in-channel importance repeated ``repeat`` times (as torch-pruning does).
    """

    module: nn.Module
    attr: str
    op: str
    repeat: int
    idx: list[int]
    root: list[int]
    idx_t: Tensor | None = None  # int64 on the regulariser's device
    root_t: Tensor | None = None  # int64; None: root is 0..len-1 (an add into the first entries)


@dataclass
class _Update:
    """One member slice the regulariser pulls: ``grad[key][slice] += reg * gamma[root] * w[slice]``.

    ``kind``: ``out`` (conv/linear rows), ``in`` (conv/linear columns) or ``bn`` (BatchNorm affine vectors).
    ``gamma_len``: the group's gamma truncated to its first ``gamma_len`` entries (torch-pruning's grouped-conv
    handling; ``None``: whole). ``idx`` None: every slice in order (no gather, no scatter needed).
    """

    module: nn.Module
    kind: str
    key: str | None
    bias_key: str | None
    idx: list[int] | None
    unique: bool
    root: list[int] | None  # None: gamma itself (the root channels are all of the (truncated) gamma's, in order)
    gamma_len: int | None
    error: str | None = None  # why torch-pruning's regularize would fail on this member (raised when reached)
    idx_t: Tensor | None = None
    root_t: Tensor | None = None


@dataclass
class _GroupPlan:
    """Everything :meth:`GroupL2Regularizer.gradient` needs of one dependency group, built once."""

    group: Any
    size: int  # entries of the reduced importance (the first term's length)
    terms: list[_Term] | None  # None: ask the pruner's importance (not the group-L2 fast path)
    updates: list[_Update] = field(default_factory=list)


class GroupL2Regularizer:
    """``GroupNormPruner.regularize`` as a gradient of given weights, degenerate groups fixed (module doc).

    Args:
        pruner: a torch-pruning ``GroupNormPruner`` built on ``model`` (``pruning.depgraph.build_pruner``);
            its dependency groups, importance and ``reg`` are used. Built once per data model: the
            groups depend on the architecture and widths only, not on the weight values.
        model: the module the pruner was built on (its parameters are swapped, never modified).

    The index tensors of every group (member channels, their root channels) are built once, on the device of
    the model's parameters, when the regulariser is built; they are rebuilt when the model has moved to another
    device or the pruner's groups were rebuilt (``update_regularizer``). :meth:`gradient` then makes no host
    synchronisation and uploads nothing (sparse learning calls it every batch; on a GPU every upload or
    ``.item()`` would stall the stream). For torch-pruning's ``GroupMagnitudeImportance`` with mean/sum
    reduction (every ``configs/method`` group-L2 criterion) the importance is computed here with the same
    operations in the same order as torch-pruning, so the results are bit for bit torch-pruning's (and the
    previous list-indexed implementation's) on the CPU; any other importance is asked of the pruner itself.
    """

    kind = "structured"

    def __init__(self, pruner: Any, model: nn.Module):
        self.pruner = pruner
        self.model = model
        self.reg = float(pruner.reg)
        self._fn = tp_function
        self._names = {id(module): name for name, module in model.named_modules()}
        self._params = dict(model.named_parameters())
        self._plans: list[_GroupPlan] = []
        self._planned_groups: Any = None
        self._device: torch.device | None = None
        self._prepare()

    def _key(self, module: nn.Module, attr: str) -> str | None:
        prefix = self._names.get(id(module))
        if prefix is None:
            return None
        key = f"{prefix}.{attr}" if prefix else attr
        return key if key in self._params else None

    # --------------------------------------------------------------------------------------------------
    # The plan: built once from the groups (host lists), index tensors per device
    # --------------------------------------------------------------------------------------------------
    def _model_device(self) -> torch.device:
        first = next(self.model.parameters(), None)  # the module's own (a move may replace Parameter objects)
        return torch.device("cpu") if first is None else first.device

    def _prepare(self) -> None:
        """(Re)build the plan if the pruner's groups changed, and its index tensors if the model moved."""
        if self._planned_groups is not self.pruner._groups:
            self._plans = [self._plan_group(group) for group in self.pruner._groups]
            self._planned_groups = self.pruner._groups
            self._device = None
        device = self._model_device()
        if self._device != device:
            # a move to another device may give the module new Parameter objects (e.g. to or from "meta")
            self._params = dict(self.model.named_parameters())
            self._to_device(device)

    def _fast_importance(self) -> bool:
        """True when the pruner's importance is torch-pruning's group-magnitude one with a summing reduction, which
        :meth:`_importance` reproduces operation by operation (anything else is asked of the pruner)."""
        imp = getattr(self.pruner, "importance", None)
        gmi = tp_importance.GroupMagnitudeImportance
        base = tp_pruner.BasePruner
        return (isinstance(imp, gmi) and type(imp).__call__ is gmi.__call__ and type(imp)._reduce is gmi._reduce
                and getattr(imp, "group_reduction", None) in ("mean", "sum")
                and type(self.pruner).estimate_importance is base.estimate_importance)

    def _plan_group(self, group: Any) -> _GroupPlan:
        fn = self._fn
        terms: list[_Term] | None = None
        size = 0
        if self._fast_importance():
            imp = self.pruner.importance
            types = tuple(imp.target_types)
            terms, first = [], None
            for i, (dep, idxs) in enumerate(group):
                layer, prune_fn, root = dep.layer, dep.pruning_fn, group[i].root_idxs
                if not isinstance(layer, types):
                    continue
                found: list[tuple[str, str, int]] = []
                transposed = bool(getattr(layer, "transposed", False))
                if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                    found.append(("weight", "out_t" if transposed else "out", 1))
                    if imp.bias and layer.bias is not None:
                        found.append(("bias", "vec", 1))
                elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                    repeat = 1
                    if (prune_fn == fn.prune_conv_in_channels and layer.groups != layer.in_channels
                            and layer.groups != 1):
                        repeat = layer.groups
                    found.append(("weight", "in_t" if transposed else "in", repeat))
                elif prune_fn == fn.prune_batchnorm_out_channels:
                    if layer.affine:
                        found.append(("weight", "vec", 1))
                        if imp.bias and layer.bias is not None:
                            found.append(("bias", "vec", 1))
                elif prune_fn == fn.prune_layernorm_out_channels:
                    if layer.elementwise_affine:
                        found.append(("weight", "vec", 1))
                        if imp.bias and layer.bias is not None:
                            found.append(("bias", "vec", 1))
                for attr, op, repeat in found:
                    if first is None:
                        first = len(idxs)  # torch-pruning: zeros_like(group_imp[0])
                    if any(r is None for r in root):  # torch-pruning's reduction skips these entries
                        continue
                    terms.append(_Term(layer, attr, op, repeat, list(idxs), list(root)))
            if first is None:
                terms = None  # no measured member: torch-pruning returns None (and regularize fails)
            else:
                size = first
        plan = _GroupPlan(group, size, terms)

        ch_groups = self.pruner._get_channel_groups(group)
        gamma_len: int | None = None
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.target.module, dep.handler
            root = group[i].root_idxs
            if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                kind = "out"
            elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                kind = "in"
                if prune_fn == fn.prune_conv_in_channels and layer.groups > 1:
                    # torch-pruning's grouped-conv handling, including its reuse of the truncated gamma for the
                    # group's later members
                    cut = len(idxs) // ch_groups
                    gamma_len = cut if gamma_len is None else min(gamma_len, cut)
                    idxs = idxs[:cut]
            elif prune_fn == fn.prune_batchnorm_out_channels and layer.affine:
                kind = "bn"
            else:
                continue
            idxs = list(idxs)
            bias_key = self._key(layer, "bias") if kind != "in" and layer.bias is not None else None
            error = None
            if any(r is None for r in root):
                error = (f"torch-pruning maps some channels of {type(layer).__name__} "
                         f"{self._names.get(id(layer), '?')!r} to no root channel of their group; its regularize "
                         "cannot pull them either")
            full = idxs == list(range(len(idxs)))
            if kind == "in":
                full = full and len(idxs) == layer.weight.shape[1]
            else:
                full = full and len(idxs) == layer.weight.shape[0]
            # gamma itself where the root channels are all of gamma's, in order (its length is known on the
            # group-L2 path only)
            n_gamma = size if gamma_len is None else min(size, gamma_len)
            whole = terms is not None and len(root) == n_gamma and list(root) == list(range(n_gamma))
            plan.updates.append(_Update(
                layer, kind, self._key(layer, "weight"), bias_key, None if full else idxs,
                len(set(idxs)) == len(idxs), None if whole else list(root), gamma_len, error))
        return plan

    def _to_device(self, device: torch.device) -> None:
        """The plan's index tensors on ``device`` (once per device change; every later call reuses them)."""
        def index(values: list[int] | None) -> Tensor | None:
            return None if values is None else torch.tensor(values, dtype=torch.long, device=device)

        for plan in self._plans:
            for term in plan.terms or ():
                term.idx_t = index(term.idx)
                identity = term.root == list(range(len(term.root))) and len(term.root) <= plan.size
                term.root_t = None if identity else index(term.root)
            for update in plan.updates:
                if update.error is not None:
                    continue
                update.idx_t = index(update.idx)
                update.root_t = index(update.root)
        self._device = device

    # --------------------------------------------------------------------------------------------------
    def _importance(self, plan: _GroupPlan) -> Tensor:
        """The group's channel importance, as ``pruner.estimate_importance(group)`` computes it (same ops, same
        order) but on the prepared index tensors. Reads the (swapped) module tensors."""
        if plan.terms is None:
            imp = self.pruner.estimate_importance(plan.group)
            return imp if imp is None else imp.to(self._device)
        importance = self.pruner.importance
        p = importance.p
        reduced: Tensor | None = None
        for term in plan.terms:
            w = getattr(term.module, term.attr).data
            if term.op == "out":
                local = w.index_select(0, term.idx_t).flatten(1).abs().pow(p).sum(1)
            elif term.op == "out_t":
                local = w.transpose(1, 0).index_select(0, term.idx_t).flatten(1).abs().pow(p).sum(1)
            elif term.op in ("in", "in_t"):
                flat = w.flatten(1) if term.op == "in_t" else w.transpose(0, 1).flatten(1)
                local = flat.abs().pow(p).sum(1)
                if term.repeat > 1:
                    local = local.repeat(term.repeat)
                local = local.index_select(0, term.idx_t)
            else:  # vec
                local = w.index_select(0, term.idx_t).abs().pow(p)
            if reduced is None:
                reduced = local.new_zeros(plan.size, dtype=torch.float32)
            local = local.to(reduced.device, dtype=reduced.dtype)
            if term.root_t is None:
                reduced[:local.shape[0]].add_(local)
            else:
                reduced.scatter_add_(0, term.root_t, local)
        if reduced is None:  # every member had unmapped channels: torch-pruning's zeros / 0
            reduced = torch.zeros(plan.size, dtype=torch.float32, device=self._device)
        if importance.group_reduction == "mean":
            reduced /= len(plan.terms)
        return importance._normalize(reduced, importance.normalizer)

    @torch.no_grad()
    def gradient(self, params: Mapping[str, Tensor], alpha: float, bias: bool = False) -> dict[str, Tensor]:
        """``{key: reg * gamma * w}`` for the parameters the regulariser touches.

        ``params``: {state-dict key: tensor} of (some of) the model's parameters, e.g. the decoded output
        of the metanetwork (detached or not; no graph is recorded). Parameters not in ``params`` are read
        from the model. Returned gradients have the parameters' shapes, dtypes and devices.
        No host synchronisation and no host-to-device copy (the index tensors are prepared, class doc).
        """
        self._prepare()
        reg = self.reg
        grads: dict[str, Tensor] = {}

        def add(key: str | None, dim: int, update: _Update, value: Tensor) -> None:
            if key is None:
                return
            if key not in grads:
                grads[key] = torch.zeros_like(self._params[key])
            target = grads[key]
            if update.idx_t is None:
                target += reg * value
            elif update.unique:  # one add per element, as the indexed += below
                target.index_add_(dim, update.idx_t, reg * value)
            elif dim == 0:
                target[update.idx_t] += reg * value
            else:
                target[:, update.idx_t] += reg * value

        with swapped_parameters(self.model, params):
            for plan in self._plans:
                gamma = group_gamma(self._importance(plan).sqrt(), alpha)
                for update in plan.updates:
                    if update.error is not None:
                        raise ValueError(update.error)
                    layer = update.module
                    g = gamma if update.gamma_len is None else gamma[:update.gamma_len]
                    g_c = g if update.root_t is None else torch.index_select(g, 0, update.root_t)
                    weight = layer.weight.data
                    if update.kind == "in":
                        w = weight if update.idx_t is None else weight.index_select(1, update.idx_t)
                        add(update.key, 1, update, w * g_c.view(1, -1, *([1] * (w.dim() - 2))))
                        continue
                    w = weight if update.idx_t is None else weight.index_select(0, update.idx_t)
                    if update.kind == "out":
                        add(update.key, 0, update, w * g_c.view(-1, *([1] * (w.dim() - 1))))
                    else:
                        add(update.key, 0, update, w * g_c)
                    if bias and update.bias_key is not None:
                        b = layer.bias.data
                        b = b if update.idx_t is None else b.index_select(0, update.idx_t)
                        add(update.bias_key, 0, update, b * g_c)
        return grads

    @torch.no_grad()
    def channel_norms(self, params: Mapping[str, Tensor] | None = None, per_group: bool = False) -> Tensor | list[Tensor]:
        """Un-normalised group-L2 norm of every channel of every dependency group (module doc, Diagnostics).

        ``params`` as in :meth:`gradient` (missing ones, or all with ``None``/``{}``, are read from the model,
        i.e. the data model's own weights). Returns the norms of all groups concatenated (float64, one entry
        per channel of every group, in the pruner's group order), or with ``per_group=True`` a list of one
        tensor per group (a group without a measured member gives an empty tensor).
        """
        fn = self._fn
        norms: list[Tensor] = []
        with swapped_parameters(self.model, params or {}):
            for group in self.pruner._groups:
                sq: Tensor | None = None
                for i, (dep, idxs) in enumerate(group):
                    layer = dep.target.module
                    prune_fn = dep.handler
                    root_idxs = group[i].root_idxs
                    if any(r is None for r in root_idxs):  # torch-pruning's importance skips these members too
                        continue
                    if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                        w = layer.weight.data
                        w = w.transpose(1, 0) if getattr(layer, "transposed", False) else w
                        local = w[idxs].flatten(1).to(torch.float64).pow(2).sum(1)
                    elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                        w = layer.weight.data
                        w = w.flatten(1) if getattr(layer, "transposed", False) else w.transpose(0, 1).flatten(1)
                        local = w.to(torch.float64).pow(2).sum(1)
                        if (prune_fn == fn.prune_conv_in_channels and layer.groups != 1
                                and layer.groups != layer.in_channels):
                            local = local.repeat(layer.groups)  # as torch-pruning's importance
                        local = local[idxs]
                    elif prune_fn == fn.prune_batchnorm_out_channels and layer.affine:
                        local = layer.weight.data[idxs].to(torch.float64).pow(2)
                    elif (prune_fn == getattr(fn, "prune_layernorm_out_channels", None)
                          and getattr(layer, "elementwise_affine", False)):
                        local = layer.weight.data[idxs].to(torch.float64).pow(2)
                    else:
                        continue
                    if sq is None:
                        sq = torch.zeros(len(group[0].root_idxs), dtype=torch.float64, device=local.device)
                    sq.scatter_add_(0, torch.tensor(root_idxs, device=local.device), local)
                norms.append(sq.sqrt() if sq is not None else torch.zeros(0, dtype=torch.float64))
        if per_group:
            return norms
        return _concat(norms)

    @torch.no_grad()
    def value(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> Tensor:
        """``R = (reg/2) sum gamma ||w||^2 = 0.5 * sum(grad * w)`` (0-dim tensor) for ``grads`` of ``params``."""
        return 0.5 * _dot(params, grads, self._params)


class SignRegularizer:
    """L1 regulariser of the unstructured methods: ``reg * sign(w)`` on every Conv/Linear weight."""

    kind = "unstructured"

    def __init__(self, model: nn.Module, reg: float):
        self.model = model
        self.reg = float(reg)
        self._params = dict(model.named_parameters())
        self._keys = [f"{name}.weight" if name else "weight" for name, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))]

    @torch.no_grad()
    def gradient(self, params: Mapping[str, Tensor], alpha: float = 0.0, bias: bool = False) -> dict[str, Tensor]:
        """``{key: reg * sign(w)}``; ``alpha`` and ``bias`` are ignored (reference §12)."""
        return {k: self.reg * torch.sign(params[k] if k in params else self._params[k]) for k in self._keys}

    @torch.no_grad()
    def value(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> Tensor:
        """``R = reg * sum |w| = sum(grad * w)`` (0-dim tensor)."""
        return _dot(params, grads, self._params)

    @torch.no_grad()
    def channel_norms(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``|w|`` of every Conv/Linear weight entry (the unstructured methods' prunable units), flat, float64.

        ``params`` as in :meth:`gradient`; missing ones (all with ``None``/``{}``) are read from the model.
        """
        params = params or {}
        return _concat([(params[k] if k in params else self._params[k]).detach().abs().flatten().to(torch.float64)
                        for k in self._keys])


REG_PROJECTIONS = ("none", "scale_free", "shrink_only")


@torch.no_grad()
def without_scale_component(grads: Mapping[str, Tensor], params: Mapping[str, Tensor],
                            shrink_only: bool = False) -> dict[str, Tensor]:
    """``grads`` with each tensor's component along its own parameter removed (module doc, projected variants).

    ``params[key]`` is the weight the gradient ``grads[key]`` belongs to (same shape); an all-zero weight
    keeps its gradient. The result is orthogonal to every weight tensor: ``<out[k], params[k]> = 0``.
    ``shrink_only``: then keep it only on the elements it still pulls towards zero (``out * w > 0``), zero
    elsewhere (no element is pushed to grow).
    """
    out = {}
    for key, grad in grads.items():
        w = params[key].detach()
        if w.shape != grad.shape:
            raise ValueError(f"without_scale_component: {key!r} has gradient {tuple(grad.shape)} but weight "
                             f"{tuple(w.shape)}")
        w64, g64 = w.to(torch.float64), grad.to(torch.float64)
        norm_sq = w64.pow(2).sum()
        if not bool(norm_sq > 0):
            out[key] = grad
            continue
        rest = g64 - (g64 * w64).sum() / norm_sq * w64
        if shrink_only:
            rest = torch.where(rest * w64 > 0, rest, torch.zeros_like(rest))
        out[key] = rest.to(grad.dtype)
    return out


def _dot(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], fallback: Mapping[str, Tensor]) -> Tensor:
    total = None
    for key, grad in grads.items():
        w = params[key] if key in params else fallback[key]
        term = (grad.detach() * w.detach()).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def _concat(tensors: list[Tensor]) -> Tensor:
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    return torch.cat([t.to(device) for t in tensors])


@torch.no_grad()
def small_share(norms: Tensor, fraction: float = 0.01) -> float:
    """Share of ``norms`` that are ``<= fraction * max(norms)`` (the max over all of them: a global ranking).

    ``<=`` so that exactly-zero units count as small even when every norm is zero (share 1). No norm: 0.0.
    NaN norms never count as small (a NaN maximum gives 0.0).
    """
    norms = norms.detach().flatten()
    if norms.numel() == 0:
        return 0.0
    top = norms.max()
    return float((norms <= fraction * top).to(torch.float64).mean().item())


@torch.no_grad()
def relative_change(new: Mapping[str, Tensor], old: Mapping[str, Tensor]) -> float:
    """``||new - old||_2 / ||old||_2`` over all tensors of ``new`` together (one global norm, float64).

    Every key of ``new`` must be in ``old`` with the same shape. ``old`` all zero: 0.0 if ``new`` is too,
    else ``inf``.
    """
    diff = base = None
    for key, tensor in new.items():
        ref = old[key].detach().to(device=tensor.device, dtype=torch.float64)
        d = (tensor.detach().to(torch.float64) - ref).pow(2).sum()
        b = ref.pow(2).sum()
        diff, base = (d, b) if diff is None else (diff + d.to(diff.device), base + b.to(base.device))
    if diff is None:
        return 0.0
    if not bool(base > 0):
        return 0.0 if not bool(diff > 0) else math.inf
    return float((diff / base).sqrt().item())


def build_regularizer(model: nn.Module, example_inputs: Tensor, method: Mapping[str, Any], reg: float,
                      iterative_steps: int = 200) -> GroupL2Regularizer | SignRegularizer:
    """The regulariser of a ``configs/method`` entry on ``model`` (structured: traces the dependency graph)."""
    kind = method.get("kind", "structured")
    if kind == "unstructured":
        return SignRegularizer(model, reg)
    if kind != "structured":
        raise ValueError(f"method {method.get('name')!r} has kind={kind!r}; expected structured or unstructured "
                         "(configs/method/*.yaml)")
    pruner = build_pruner(model, example_inputs, method, reg=reg, iterative_steps=iterative_steps)
    return GroupL2Regularizer(pruner, model)
