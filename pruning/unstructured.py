"""Unstructured pruning (reference §12): global L1 magnitude, N:M sparsity, masked fine-tuning, sparse MACs.

What is pruned: the ``weight`` of every ``Conv2d`` and ``Linear`` module, the classifier included, as the
reference's unstructured ``Pruner`` does. Biases, BatchNorm and LayerNorm parameters are never pruned.

* :func:`global_l1_prune` zeroes the ``round(amount * total)`` weights of smallest ``|w|`` over all those
  tensors together (``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``), then makes the
  zeros permanent (``prune.remove``), so the model is a plain module again.
* :func:`nm_prune` keeps the ``n`` largest ``|w|`` in every group of ``m`` consecutive weights of a
  filter (a conv weight ``[out, in, kh, kw]`` is flattened per filter to ``[out, in*kh*kw]``, a linear
  weight is ``[out, in]``). Layers whose flattened filter length is not divisible by ``m`` are skipped
  (reported), as in the reference.
* :class:`MaskedGradients` keeps the pruned weights at exactly zero during fine-tuning by masking their
  gradients (SGD/AdamW then never move them: weight decay of a zero weight is zero and the momentum /
  Adam moments stay zero); :func:`check_masks` asserts it afterwards.
* :func:`sparsity` and :func:`count_sparse_macs` measure the result.

Masks are ``{module name: bool tensor shaped like module.weight}``; True = kept.
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import prune

log = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


class MaskViolationError(RuntimeError):
    """A weight that pruning set to zero is nonzero after fine-tuning."""


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Conv2d / Linear of ``model``, in registration order."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    return layers


def global_l1_prune(model: nn.Module, amount: float) -> dict[str, torch.Tensor]:
    """Zero the ``round(amount * N)`` smallest-|w| weights over all N Conv/Linear weights; returns the masks.

    ``amount`` is the pruned fraction in [0, 1). Pruning is global: layers lose different fractions.
    The model is modified in place and stays a plain module (no ``weight_orig``/``weight_mask``).
    """
    amount = float(amount)
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"unstructured amount must be in [0, 1) (the fraction of weights set to zero), got {amount}")
    layers = prunable_layers(model)
    parameters = [(module, "weight") for _, module in layers]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=amount)
    masks = {name: module.weight_mask.detach().bool().clone() for name, module in layers}
    for module, param in parameters:
        prune.remove(module, param)  # weight = weight_orig * mask, now permanent
    return masks


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the ``n`` largest |w| of every ``m`` consecutive weights of each filter.

    ``weight`` is ``[out, ...]``; the filter ``weight[o]`` is flattened and cut into groups of ``m``.
    Ties are broken by position (the earlier weight is kept), deterministically.
    """
    flat = weight.detach().reshape(weight.shape[0], -1)  # [out, L]
    if flat.shape[1] % m:
        raise ValueError(f"filter length {flat.shape[1]} is not divisible by m={m}")
    groups = flat.abs().reshape(flat.shape[0], -1, m)  # [out, L/m, m]
    # stable sort on -|w|: the earliest of equal magnitudes comes first
    order = torch.sort(-groups, dim=-1, stable=True).indices[..., :n]  # [out, L/m, n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order, True)
    return mask.reshape(weight.shape)


def nm_prune(model: nn.Module, n: int, m: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M-sparsify every Conv/Linear weight whose filter length is divisible by ``m`` (in place).

    Returns ``(masks, skipped)``: masks of the pruned layers and the names of the skipped layers
    (their filter length is not a multiple of ``m``, e.g. a first conv with 1 input channel and 3x3
    kernels); skipped layers keep all their weights and get no mask.
    """
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m} (method.n / method.m)")
    masks: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, module in prunable_layers(model):
        if module.weight[0].numel() % m:
            skipped.append(name)
            continue
        mask = nm_mask(module.weight, n, m)
        prune.custom_from_mask(module, "weight", mask)
        prune.remove(module, "weight")
        masks[name] = mask
    if skipped:
        log.warning("N:M %d:%d: filter length not divisible by %d, left dense: %s", n, m, m, ", ".join(skipped))
    if not masks:
        raise ValueError(f"N:M {n}:{m}: no Conv/Linear layer has a filter length divisible by {m}; nothing pruned")
    return masks, skipped


def _modules_by_name(model: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise KeyError(f"mask for {name!r} but the model has no such module")
        yield name, modules[name], mask


class MaskedGradients:
    """Context manager: while active, the gradients of pruned weights are multiplied by their masks.

    Use around a fine-tune (``training.loop.train`` builds its own optimiser, so masking the gradient
    is the hook point). With masked gradients SGD (momentum, weight decay) and AdamW leave an exact
    zero at exactly zero; :func:`check_masks` verifies it afterwards.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.model, self.masks = model, masks
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "MaskedGradients":
        for _name, module, mask in _modules_by_name(self.model, self.masks):
            keep = mask.to(device=module.weight.device, dtype=module.weight.dtype)
            self._handles.append(module.weight.register_hook(lambda grad, keep=keep: grad * keep))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Raise :class:`MaskViolationError` if any weight outside its mask is nonzero."""
    for name, module, mask in _modules_by_name(model, masks):
        moved = (module.weight.detach() != 0) & ~mask.to(module.weight.device)
        if moved.any():
            raise MaskViolationError(
                f"{int(moved.sum())} pruned weights of layer {name!r} are nonzero after fine-tuning; "
                "the zero mask was not respected"
            )


@torch.no_grad()
def sparsity(model: nn.Module) -> dict[str, float | int]:
    """Zero fraction of all Conv/Linear weights: ``{"sparsity", "zeros", "weights"}``."""
    zeros = total = 0
    for _name, module in prunable_layers(model):
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return {"sparsity": zeros / total, "zeros": zeros, "weights": total}


@torch.no_grad()
def count_sparse_macs(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, float]:
    """Dense and sparse multiply-accumulates of the Conv/Linear layers in one forward of ``example_inputs``.

    A Conv2d computes ``H_out * W_out`` dot products per image, each over one filter, so its dense MACs
    are ``B * H_out * W_out * weight.numel()`` and its sparse MACs ``B * H_out * W_out * nnz(weight)``
    (zeros skipped). A Linear on ``[..., in]`` computes ``prod(leading dims) * weight.numel()``, sparse
    ``prod(leading dims) * nnz(weight)``. Biases, normalisation, activations, pooling and additions are
    not counted (the reference scales only Conv/Linear FLOPs, §12). Returns ``{"dense_macs",
    "sparse_macs", "macs_reduction_percent"}``.
    """
    totals = {"dense": 0.0, "sparse": 0.0}

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        # output [B, C_out, H, W] or [..., out]: one dot product over one filter/row per output element,
        # so (output elements / out channels) positions use the whole weight once
        positions = output.numel() / module.weight.shape[0]
        totals["dense"] += positions * module.weight.numel()
        totals["sparse"] += positions * int((module.weight != 0).sum())

    handles = [module.register_forward_hook(hook) for _n, module in prunable_layers(model)]
    was_training = model.training
    model.eval()
    try:
        model(example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    dense, sparse = totals["dense"], totals["sparse"]
    return {"dense_macs": dense, "sparse_macs": sparse,
            "macs_reduction_percent": 100.0 * (1.0 - sparse / dense) if dense else 0.0}
