"""Metanetwork construction, checkpoints and application to a network (shared by every run mode).

A metanetwork checkpoint is a weights-only file (``utils.checkpoint``) whose ``spec`` records what is
needed to rebuild it and to refuse it for the wrong task: the constructor knobs, the codec layout it
was trained on (node/edge feature sizes and meanings, edge layout and identity-edge options), the task
name and the epoch.

:func:`apply_saved_metanetwork` is THE "load a checkpoint, build the model's codec, apply" path of every
stage (final runs, selection curves, ``analyse``), and :func:`fitting_checkpoints` THE refusal of a checkpoint of
another layout before any training (final runs, selection).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn as tnn

from nn.graph import GraphCodec, GraphCodecError
from nn.metanetwork import MetaNetwork
from utils.checkpoint import load_checkpoint, save_checkpoint

# GraphCodec options recorded in a layout (``GraphCodec.layout``) that ``check_layout`` does not compare (they
# change no feature size) but that must match for a metanetwork to see the graphs it was trained on.
CODEC_OPTIONS = ("edge_layout", "identity_edges", "legacy_fc_permutation")


class LayoutMismatchError(ValueError):
    """A metanetwork checkpoint trained on another graph layout than the current task's."""


def build_metanetwork(codec: GraphCodec, options: Mapping[str, Any]) -> MetaNetwork:
    """``MetaNetwork`` sized for ``codec``'s graphs with the constructor knobs of ``configs/metanetwork``."""
    return MetaNetwork(node_dim=codec.node_dim, edge_dims=dict(codec.edge_dims), **dict(options))


def save_metanetwork(path: str | Path, metanetwork: MetaNetwork, codec: GraphCodec, options: Mapping[str, Any],
                     task: str, epoch: int, **extra: Any) -> Path:
    """Save weights + (options, layout, task, epoch) atomically; ``extra`` e.g. optimizer state, losses."""
    spec = {"kind": "metanetwork", "options": dict(options), "layout": codec.layout, "task": task, "epoch": int(epoch)}
    return save_checkpoint(path, metanetwork.state_dict(), spec, **extra)


def _check_fits(path: str | Path, spec: Mapping[str, Any], codec: GraphCodec) -> None:
    layout = spec["layout"]
    try:
        codec.check_layout(layout)
        mine = codec.layout
        for key in CODEC_OPTIONS:
            if key in layout and layout[key] != mine[key]:
                raise GraphCodecError(f"graph layout mismatch in '{key}': checkpoint has {layout[key]!r}, this "
                                      f"codec has {mine[key]!r} (the codec options, config section `codec`)")
    except GraphCodecError as err:
        raise LayoutMismatchError(
            f"metanetwork checkpoint {path} (trained on task {spec.get('task')!r}, layout node_dim="
            f"{layout['node_dim']}, edge_dims={layout['edge_dims']}) does not fit this model's graphs "
            f"(node_dim={codec.node_dim}, edge_dims={dict(codec.edge_dims)}): {err}"
        ) from None


def load_metanetwork(path: str | Path, codec: GraphCodec | None = None,
                     map_location: str | torch.device = "cpu") -> tuple[MetaNetwork, dict]:
    """Rebuild a saved metanetwork; with ``codec`` its layout must match the checkpoint's (clear error)."""
    checkpoint = load_checkpoint(path, map_location=map_location)
    spec = checkpoint["spec"]
    if spec.get("kind") != "metanetwork":
        raise ValueError(f"{path} is not a metanetwork checkpoint (spec kind {spec.get('kind')!r})")
    layout = spec["layout"]
    if codec is not None:
        _check_fits(path, spec, codec)
    metanetwork = MetaNetwork(node_dim=layout["node_dim"], edge_dims=dict(layout["edge_dims"]), **spec["options"])
    metanetwork.load_state_dict(checkpoint["state_dict"])
    return metanetwork.to(map_location).eval(), checkpoint


def fitting_checkpoints(model: tnn.Module, paths: Iterable[str | Path], **codec_options: Any) -> Iterator[dict]:
    """The metanetwork checkpoints ``paths``, read one at a time, each refused (:class:`LayoutMismatchError` naming
    both layouts) unless its graph layout fits ``model``'s graphs: the check every stage runs before any training.

    ``codec_options``: ``GraphCodec`` keywords (``stages.common.codec_options``); the codec is built once.
    """
    codec = GraphCodec(model, **codec_options)
    for path in paths:
        yield load_metanetwork(path, codec)[1]


@torch.no_grad()
def apply_metanetwork(model: tnn.Module, metanetwork: MetaNetwork, codec: GraphCodec | None = None) -> tnn.Module:
    """One metanetwork pass over ``model`` (in place): encode -> GNN -> decode -> load the new weights.

    BatchNorm running statistics are kept (the codec never decodes them), as in the reference.
    """
    codec = codec or GraphCodec(model)
    device = next(model.parameters()).device
    metanetwork = metanetwork.to(device).eval()
    new_params = codec.decode(metanetwork(codec.encode(model)))
    missing = set(new_params) - set(model.state_dict())
    if missing:
        raise KeyError(f"decoded parameters {sorted(missing)} are not in the model")
    model.load_state_dict(new_params, strict=False)
    return model


def apply_saved_metanetwork(model: tnn.Module, path: str | Path, map_location: str | torch.device = "cpu",
                            **codec_options: Any) -> dict:
    """Load the metanetwork checkpoint ``path`` and apply it to ``model`` in place; returns the checkpoint.

    The codec is built for ``model`` with ``codec_options`` (``GraphCodec`` keywords: ``input_shape``,
    ``identity_edges``, ``edge_layout``, ``legacy_fc_permutation``); a checkpoint of another layout raises
    :class:`LayoutMismatchError` naming both layouts.
    """
    codec = GraphCodec(model, **codec_options)
    metanetwork, checkpoint = load_metanetwork(path, codec, map_location=map_location)
    apply_metanetwork(model, metanetwork, codec)
    return checkpoint
