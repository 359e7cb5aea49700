"""Structured pruning to a MACs speed-up with torch-pruning (DepGraph), as the paper does (reference §7).

The criterion is a ``method`` config (``configs/method/*.yaml``): for the paper, group-L2 magnitude
importance with the max normaliser, ranked globally. Pruning advances in ``iterative_steps`` equal
steps of the global channel ratio (200 steps of 0.5 %) and stops at the first step whose MACs speed-up
reaches the target; there is no fine-tuning between steps. The classifier is excluded by module
identity (the last Linear/Conv that runs), never by its output width.

:func:`pruning_steps` is the one progressive pruning loop: :func:`prune_to_speed_up` stops it at a MACs
target, ``pruning.curves.accuracy_speed_up_curve`` measures accuracy after each of its steps.

Vision Transformers (torchvision ``VisionTransformer``, reference §2.4). The embedding width is one dependency
group (patch conv, ``class_token`` and ``encoder.pos_embedding`` along their last dim, every LayerNorm, residual
and attention in/out projection); torch-pruning's ``nn.MultiheadAttention`` pruner removes the same indices from
the q, k and v projections, keeps ``num_heads`` and shrinks ``head_dim``. The attention splits q/k/v into heads as
contiguous chunks, so the head is the unit the removal must respect:

* ``heads="per_head"`` (default): the embedding group is pruned with ``num_heads`` channel groups (torch-pruning
  ``out_channel_groups``): importance is averaged over the heads and the SAME within-head dims leave every
  head, so every kept q/k/v dim stays in its own head, the width stays a multiple of ``num_heads``, and the
  number of heads (fixed by the architecture's name, ``generate_dataset.models.vit``) is kept.
* ``heads="round_to"``: the reference's (and torch-pruning's torchvision example's) ``round_to = num_heads``.
  It only rounds the COUNT of removed channels; which ones go is global, so one head can lose more dims than
  another and the contiguous re-chunking then moves dims of one head into the next (tests/test_final_ddp.py
  shows it). It also rounds every MLP width to a multiple of ``num_heads``. Kept for reproduction only.

The mode is the ``heads`` argument or, when a caller gives none, the method config's ``vit_heads`` key.

torch-pruning's ``num_heads``/``prune_num_heads`` options address separate q/k/v ``nn.Linear`` layers (timm,
Hugging Face); on torchvision's packed ``nn.MultiheadAttention`` they leave the embedding unpruned, and whole
heads cannot be removed from it at all, so neither is used.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# The reference's "no per-layer cap": torch-pruning keeps at least one channel per layer anyway.
NO_LAYER_CAP = 300.0


def layer_cap(method: Mapping[str, Any]) -> float:
    """torch-pruning's ``max_pruning_ratio`` from the method's ``max_pruning_ratio`` key: the largest share of a
    layer's channels (counted when the pruner is built) that may go; null = the reference's no cap, under which
    global ranking can cut a whole residual stage to one channel (reference defect 19). The cap is soft:
    torch-pruning checks it before each step, and one global step can take several channels of a layer at once,
    past the floor (down to one channel)."""
    value = method.get("max_pruning_ratio")
    if value is None:
        return NO_LAYER_CAP
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"method.max_pruning_ratio={value!r}: a share of each layer's channels in (0, 1), "
                         "or null for no per-layer cap (the reference)")
    return float(value)


def hard_cap(method: Mapping[str, Any]) -> bool:
    """The method's ``hard_cap`` key: true makes ``max_pruning_ratio`` a floor that no step passes
    (:func:`hard_capped_step`); false (the default) leaves torch-pruning's soft check."""
    value = method.get("hard_cap", False)
    if not isinstance(value, bool):
        raise ValueError(f"method.hard_cap={value!r}: true (no pruning step takes a layer past "
                         "max_pruning_ratio) or false (torch-pruning's soft cap)")
    return value


def check_method(method: Mapping[str, Any]) -> None:
    """Refuse, before any training, a method config that pruning would only reject when it first prunes: the
    per-layer cap (:func:`layer_cap`, :func:`hard_cap`) and, for a structured method, its importance."""
    layer_cap(method)
    hard_cap(method)
    if method.get("kind", "structured") == "structured":
        make_importance(method)


class SpeedUpNotReachedError(RuntimeError):
    """Raised when pruning cannot reach the requested speed-up; ``achieved`` is the best reached."""

    def __init__(self, target: float, achieved: float, steps: int):
        self.target, self.achieved, self.steps = target, achieved, steps
        super().__init__(
            f"speed-up {target:.4f}x is unreachable with this criterion: the best reached is {achieved:.4f}x "
            f"after {steps} pruning steps (the model is left at that point). Lower the target or raise "
            f"iterative_steps."
        )


def classifier_module(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The last Linear/Conv2d executed in a forward pass: the module that produces the logits."""
    executed: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _inp, _out: executed.append(mod))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    if not executed:
        raise ValueError("the model runs no Linear or Conv2d layer; nothing to prune")
    return executed[-1]


def make_importance(method: Mapping[str, Any]) -> tp.importance.Importance:
    """torch-pruning importance for a structured ``method`` config."""
    kind = method.get("importance")
    if kind == "group_magnitude":
        return tp.importance.GroupMagnitudeImportance(
            p=method.get("p", 2),
            group_reduction=method.get("group_reduction", "mean"),
            normalizer=method.get("normalizer", "max"),
        )
    if kind == "random":
        return tp.importance.RandomImportance()
    raise ValueError(
        f"method {method.get('name', kind)!r} has no structured importance (importance={kind!r}); "
        "structured pruning supports importance=group_magnitude|random"
    )


def _is_vit(model: nn.Module) -> bool:
    """A torchvision-style VisionTransformer: its embedding width is tied to two bare parameters."""
    params = dict(model.named_parameters())
    return "class_token" in params and "encoder.pos_embedding" in params and hasattr(model, "hidden_dim")


VIT_HEAD_MODES = ("per_head", "round_to")


def architecture_options(model: nn.Module, heads: str = "per_head") -> dict[str, Any]:
    """torch-pruning options an architecture needs (reference §2.4; see the module doc for ``heads``); ``{}`` for
    anything but a ViT. For a ViT: ``unwrapped_parameters`` (``class_token``/``encoder.pos_embedding``, pruned
    along their last dim), ``round_to = num_heads`` (the reference's setting, the multiple every embedding width
    is) and, with ``heads="per_head"``, ``head_groups`` ({attention module: num_heads}), which
    :func:`build_pruner` then uses INSTEAD of ``round_to``."""
    if heads not in VIT_HEAD_MODES:
        raise ValueError(f"heads={heads!r}: expected one of {', '.join(VIT_HEAD_MODES)}")
    if not _is_vit(model):
        return {}
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    options: dict[str, Any] = {"round_to": attention[0].num_heads,
                               "unwrapped_parameters": ["class_token", "encoder.pos_embedding"]}
    if heads == "per_head":
        options["head_groups"] = {m: m.num_heads for m in attention}
    return options


def sync_after_pruning(model: nn.Module) -> None:
    """Update attributes that mirror pruned shapes (a ViT's ``hidden_dim`` reshapes its patch embedding)."""
    if _is_vit(model):
        model.hidden_dim = model.conv_proj.out_channels


def pruner_step(pruner: tp.pruner.BasePruner, model: nn.Module) -> None:
    """One pruning step that leaves the model runnable."""
    pruner.step()
    sync_after_pruning(model)


def _layer_floor(initial: int | None, cap: float) -> int:
    """The fewest channels a layer that started with ``initial`` may keep under the cap (at least one)."""
    # torch-pruning's own test is `channels < initial * (1 - cap)`; the epsilon keeps float noise
    # (10 * (1 - 0.7) = 3.0000000000000004) from raising the floor by one
    return 1 if initial is None else max(1, math.ceil(initial * (1.0 - cap) - 1e-9))


def _room_left(pruner: tp.pruner.BasePruner, group: Any) -> int | None:
    """How many channels ``group`` can still lose before one of its layers drops below its floor (None: no
    layer of the group has a channel count to watch)."""
    room = None
    for dep, _idxs in group:
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:
            continue
        module = dep.target.module
        if pruner.DG.is_out_channel_pruning_fn(dep.handler):
            now, initial = pruner.DG.get_out_channels(module), pruner.layer_init_out_ch.get(module)
        elif pruner.DG.is_in_channel_pruning_fn(dep.handler):
            now, initial = pruner.DG.get_in_channels(module), pruner.layer_init_in_ch.get(module)
        else:
            continue
        if now is None:
            continue
        left = now - _layer_floor(initial, pruner.max_pruning_ratio)
        room = left if room is None else min(room, left)
    return room


def hard_capped_step(pruner: tp.pruner.BasePruner, model: nn.Module) -> None:
    """One pruning step in which no layer loses channels past the pruner's ``max_pruning_ratio``.

    torch-pruning ranks globally and picks each group's channels below the threshold; where that would take
    a layer of the group below its floor, only the group's least important channels down to the floor go
    (ranked by the scores the step ranked with, computed before any group of the step is pruned; a random
    importance draws them apart, leaving the step's own draws as they are without the cap). The step
    then removes fewer channels than the global ratio asks; later steps make up for it elsewhere.
    """
    if pruner.round_to:
        raise ValueError("method.hard_cap does not combine with round_to (a ViT's round_to head mode): clipping a "
                         "group to its floor would break the rounding")
    scores = {}
    # on a forked RNG, so that a random importance draws in the step exactly what it would without the cap
    with torch.random.fork_rng(devices=[]):
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            if pruner._get_channel_groups(group) > 1:  # the same dims leave every channel group (heads, groups)
                raise ValueError("method.hard_cap does not support layers pruned in channel groups (a ViT's "
                                 "per-head attention, grouped convolutions)")
            # keyed by the root layer alone: each root layer roots one group (its output channels)
            scores[group[0].dep.target.module] = pruner.estimate_importance(group)
    for group in pruner.step(interactive=True):
        chosen = list(group[0].root_idxs)
        room = _room_left(pruner, group)
        if room is None or len(chosen) <= room:
            group.prune()
            continue
        if room <= 0:
            continue
        order = torch.argsort(scores[group[0].dep.target.module][chosen], stable=True)
        group.prune(idxs=[chosen[i] for i in order[:room].tolist()])
    sync_after_pruning(model)


def build_pruner(
    model: nn.Module,
    example_inputs: torch.Tensor,
    method: Mapping[str, Any],
    reg: float = 0.0,
    iterative_steps: int = 200,
    round_to: int | None = None,
    unwrapped_parameters: Iterable[str] | None = None,
    ignored_layers: Iterable[nn.Module] | None = None,
    heads: str | None = None,
) -> tp.pruner.GroupNormPruner:
    """A global ``GroupNormPruner`` stepping the channel ratio linearly from 0 to 1 in ``iterative_steps``.

    ``reg`` only matters for :meth:`regularize` (meta-training); stepping ignores it.
    ``unwrapped_parameters`` names parameters (e.g. ``class_token``) pruned along their last dim; it defaults to
    what the architecture needs (:func:`architecture_options`). ``heads`` (ViT only, module doc): ``per_head``
    prunes the embedding with one channel group per attention head (no ``round_to``); ``round_to`` is the
    reference's ``round_to = num_heads``; ``None`` takes the method's ``vit_heads`` (config key, default
    ``per_head``). An explicit ``round_to`` rounds every group and turns the head groups
    off (the two do not combine: torch-pruning would round the per-head count as if it were whole channels).
    Step it with :func:`pruner_step` so attributes that mirror shapes stay in sync.
    """
    defaults = architecture_options(model, heads or method.get("vit_heads", "per_head"))
    head_groups = defaults.get("head_groups", {}) if round_to is None else {}
    if round_to is None and not head_groups:
        round_to = defaults.get("round_to")
    if unwrapped_parameters is None:
        unwrapped_parameters = defaults.get("unwrapped_parameters", ())
    if method.get("kind", "structured") != "structured":
        raise ValueError(f"method {method.get('name')!r} is not a structured pruning method")
    ignored = list(ignored_layers) if ignored_layers is not None else [classifier_module(model, example_inputs)]
    params = dict(model.named_parameters())
    unwrapped = []
    for name in unwrapped_parameters:
        if name not in params:
            raise KeyError(f"unwrapped parameter {name!r} is not a parameter of the model")
        unwrapped.append((params[name], params[name].dim() - 1))
    # always a fresh dict: torch-pruning's default is one shared dict that ``num_heads=`` callers mutate
    pruner_kwargs: dict[str, Any] = {"out_channel_groups": dict(head_groups)}
    if round_to is not None:
        pruner_kwargs["round_to"] = round_to
    if unwrapped:
        pruner_kwargs["unwrapped_parameters"] = unwrapped
    return tp.pruner.GroupNormPruner(
        model,
        example_inputs,
        importance=make_importance(method),
        reg=reg,
        global_pruning=method.get("global_pruning", True),
        pruning_ratio=1.0,
        max_pruning_ratio=layer_cap(method),
        iterative_steps=iterative_steps,
        ignored_layers=ignored,
        **pruner_kwargs,
    )


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> float:
    """MACs of one forward pass, by torch-pruning's counter (the paper's speed-up denominator)."""
    macs, _params = tp.utils.count_ops_and_params(model, example_inputs)
    return float(macs)


def pruning_steps(model: nn.Module, example_inputs: torch.Tensor, method: Mapping[str, Any],
                  iterative_steps: int = 200, **pruner_options: Any) -> Iterator[float]:
    """Prune ``model`` in place one global step at a time; yields its MACs after every step.

    The pruner (:func:`build_pruner`, built when iteration starts) steps the channel ratio linearly from 0
    to 1 in ``iterative_steps`` steps, so at most ``iterative_steps`` values are yielded. The caller decides
    when to stop (a speed-up target, an accuracy curve's range) by leaving the loop.
    """
    pruner = build_pruner(model, example_inputs, method, iterative_steps=iterative_steps, **pruner_options)
    step = hard_capped_step if hard_cap(method) else pruner_step
    for _step in range(iterative_steps):
        step(pruner, model)
        yield count_macs(model, example_inputs)


def prune_to_speed_up(
    model: nn.Module,
    target: float,
    method: Mapping[str, Any],
    example_inputs: torch.Tensor,
    iterative_steps: int = 200,
    base_macs: float | None = None,
    strict: bool = True,
    progress: bool = False,
    **pruner_options: Any,
) -> float:
    """Prune ``model`` in place until base MACs / pruned MACs >= ``target``; return the achieved speed-up.

    ``base_macs`` is the reference the speed-up is measured against (default: the model as given), so a
    model that was already init-pruned can be taken to a *total* speed-up by passing the unpruned MACs.
    Stops at the first pruning step that reaches the target. If all steps cannot reach it, raises
    :class:`SpeedUpNotReachedError` (``strict``) or logs a warning; the model is then as pruned as it gets.
    """
    if target < 1.0:
        raise ValueError(f"target speed-up must be >= 1, got {target}")
    was_training = model.training
    model.eval()
    base = count_macs(model, example_inputs) if base_macs is None else float(base_macs)
    achieved = base / count_macs(model, example_inputs)
    steps = 0
    if achieved < target:
        # a bar on a terminal only (disable=None); the caller logs one line per pruning
        bar = tqdm(total=iterative_steps, desc="pruning", disable=None if progress else True, leave=False)
        for macs in pruning_steps(model, example_inputs, method, iterative_steps=iterative_steps, **pruner_options):
            steps += 1
            achieved = base / macs
            bar.update(1)
            bar.set_postfix(speed_up=f"{achieved:.3f}")
            if achieved >= target:
                break
        bar.close()
    model.train(was_training)
    log.info("pruned in %d steps: speed-up %.4fx (target %.4fx)", steps, achieved, target)
    if achieved < target:
        error = SpeedUpNotReachedError(target, achieved, steps)
        if strict:
            raise error
        log.warning(str(error))
    return achieved
