"""DepGraph's sparse learning: training with torch-pruning's group-norm regulariser (a baseline).

DepGraph ("DepGraph: Towards Any Structural Pruning", Fang et al.) trains the network with a group-level
sparsity regulariser before pruning: after every backward, ``GroupNormPruner.regularize(model, alpha,
bias)`` adds ``reg * gamma_c * w`` to the gradient of every member slice of every channel group (``gamma_c``
in [1, alpha], larger for less important channels; see ``pruning.regularizer`` for the exact formula, which
is the same pull the metanetwork's meta-training uses). Their CIFAR recipe: reg 5e-4, 100 epochs, lr 0.01,
milestones 60/80.

Here the regulariser is computed on a torch-pruning pruner built with the run's pruning method (group-L2,
max-normalised, global; the classifier ignored), so the baseline and the final pruning share groups and
importance. The gradient is ``pruning.regularizer.GroupL2Regularizer``'s: equal to ``regularize`` on every
group (tests/test_sparse_learning.py), except that a degenerate group (one channel, or all channels equally
important, common after pruning) gets ``gamma = 1`` where torch-pruning writes NaN into the gradients. ``pruning_final`` with ``final.pre_pruning=sparse_learning`` trains with it for
the ``after_metanetwork`` recipe (the metanetwork path's budget), then prunes and fine-tunes as usual.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn as tnn

from pruning.depgraph import build_pruner
from pruning.regularizer import GroupL2Regularizer


class SparseLearning:
    """``after_backward`` hook of :func:`training.loop.train`: adds ``pruner.regularize``'s gradient.

    Built once on the (unpruned-by-this-stage) model: the groups depend on the architecture and widths,
    which sparse learning does not change. ``reg`` and ``alpha`` are DepGraph's knobs
    (``final.sparse_learning.reg`` / ``.alpha``).
    """

    def __init__(self, model: tnn.Module, example_inputs: torch.Tensor, method: Mapping[str, Any], reg: float,
                 alpha: float = 16.0, bias: bool = False, iterative_steps: int = 200):
        if not reg > 0:
            raise ValueError(f"sparse learning needs reg > 0 (final.sparse_learning.reg), got {reg}")
        if not alpha >= 1:
            raise ValueError(f"sparse learning needs alpha >= 1 (final.sparse_learning.alpha), got {alpha}")
        was_training = model.training
        model.eval()
        self.pruner = build_pruner(model, example_inputs, method, reg=float(reg), iterative_steps=iterative_steps)
        self.regularizer = GroupL2Regularizer(self.pruner, model)
        model.train(was_training)
        self.model = model
        self.reg, self.alpha, self.bias = float(reg), float(alpha), bool(bias)

    def __call__(self, model: tnn.Module) -> None:
        if model is not self.model:
            raise ValueError("SparseLearning was built on another model than the one being trained")
        params = dict(model.named_parameters())
        for key, grad in self.regularizer.gradient({}, alpha=self.alpha, bias=self.bias).items():
            param = params[key]
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)

    def describe(self) -> dict:
        return {"reg": self.reg, "alpha": self.alpha, "bias": self.bias}
