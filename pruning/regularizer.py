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
Everything else is computed exactly as torch-pruning does (same groups, same importance call, same
index arithmetic and operation order), which ``tests/test_meta_train.py`` checks against
``GroupNormPruner.regularize`` itself. One torch-pruning quirk is kept for parity: after a grouped conv's
in-channel member, the truncated ``gamma`` is used for the group's later members.

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
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch_pruning.pruner import function as tp_function

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
    Returns [C], same dtype/device as ``imp``.
    """
    if imp.numel() == 0:
        return imp
    if bool(torch.isnan(imp).any()):
        return torch.ones_like(imp)
    hi, lo = imp.max(), imp.min()
    span = hi - lo
    if not bool(span > 0):
        return torch.ones_like(imp)
    return alpha ** ((hi - imp) / span)


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


class GroupL2Regularizer:
    """``GroupNormPruner.regularize`` as a gradient of given weights, degenerate groups fixed (module doc).

    Args:
        pruner: a torch-pruning ``GroupNormPruner`` built on ``model`` (``pruning.depgraph.build_pruner``);
            its dependency groups, importance and ``reg`` are used. Built once per data model: the
            groups depend on the architecture and widths only, not on the weight values.
        model: the module the pruner was built on (its parameters are swapped, never modified).
    """

    kind = "structured"

    def __init__(self, pruner: Any, model: nn.Module):
        self.pruner = pruner
        self.model = model
        self.reg = float(pruner.reg)
        self._fn = tp_function
        self._names = {id(module): name for name, module in model.named_modules()}
        self._params = dict(model.named_parameters())

    def _key(self, module: nn.Module, attr: str) -> str | None:
        prefix = self._names.get(id(module))
        if prefix is None:
            return None
        key = f"{prefix}.{attr}" if prefix else attr
        return key if key in self._params else None

    @torch.no_grad()
    def gradient(self, params: Mapping[str, Tensor], alpha: float, bias: bool = False) -> dict[str, Tensor]:
        """``{key: reg * gamma * w}`` for the parameters the regulariser touches.

        ``params``: {state-dict key: tensor} of (some of) the model's parameters, e.g. the decoded output
        of the metanetwork (detached or not; no graph is recorded). Parameters not in ``params`` are read
        from the model. Returned gradients have the parameters' shapes, dtypes and devices.
        """
        fn = self._fn
        with swapped_parameters(self.model, params):
            grads: dict[str, Tensor] = {}

            def add(key: str | None, index: tuple, update: Tensor) -> None:
                if key is None:
                    return
                if key not in grads:
                    grads[key] = torch.zeros_like(self._params[key])
                grads[key][index] += self.reg * update

            for group in self.pruner._groups:
                ch_groups = self.pruner._get_channel_groups(group)
                gamma = group_gamma(self.pruner.estimate_importance(group).sqrt(), alpha)
                for i, (dep, idxs) in enumerate(group):
                    layer = dep.target.module
                    prune_fn = dep.handler
                    if prune_fn in (fn.prune_conv_out_channels, fn.prune_linear_out_channels):
                        g_c = torch.index_select(gamma, 0, torch.tensor(group[i].root_idxs, device=gamma.device))
                        w = layer.weight.data[idxs]
                        add(self._key(layer, "weight"), (idxs,), w * g_c.view(-1, *([1] * (w.dim() - 1))))
                        if bias and layer.bias is not None:
                            add(self._key(layer, "bias"), (idxs,), layer.bias.data[idxs] * g_c)
                    elif prune_fn in (fn.prune_conv_in_channels, fn.prune_linear_in_channels):
                        if prune_fn == fn.prune_conv_in_channels and layer.groups > 1:
                            # torch-pruning's grouped-conv handling, including its reuse of the truncated
                            # gamma for the group's later members
                            gamma = gamma[:len(idxs) // ch_groups]
                            idxs = idxs[:len(idxs) // ch_groups]
                        g_c = torch.index_select(gamma, 0, torch.tensor(group[i].root_idxs, device=gamma.device))
                        w = layer.weight.data[:, idxs]
                        add(self._key(layer, "weight"), (slice(None), idxs),
                            w * g_c.view(1, -1, *([1] * (w.dim() - 2))))
                    elif prune_fn == fn.prune_batchnorm_out_channels and layer.affine:
                        g_c = torch.index_select(gamma, 0, torch.tensor(group[i].root_idxs, device=gamma.device))
                        add(self._key(layer, "weight"), (idxs,), layer.weight.data[idxs] * g_c)
                        if bias and layer.bias is not None:
                            add(self._key(layer, "bias"), (idxs,), layer.bias.data[idxs] * g_c)
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
