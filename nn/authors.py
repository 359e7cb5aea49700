"""The authors' metanetworks (``MyGNN`` of Yewei-Liu/MetaPruning, reference §5.2-5.3) as a :class:`MetaNetwork`.

The authors save their metanetworks as whole pickled modules. ``main/convert_release.py`` (the one place that
unpickles) turns such a file into a plain state dict plus the module's scalar attributes; this module maps those
onto ``nn.metanetwork.MetaNetwork``, which computes the same function (``benchmarks/authors_exactness.py``
measures it against the authors' code). Nothing here reads a file.

Key names, the authors' -> ours (``<t>``: our edge type of the same feature size, e.g. ``kernel`` (9) for the
CIFAR layout; ``l``: the layer)::

    nodeEnc.{weight,bias}                 -> node_enc.{weight,bias}
    edgeEnc.<i>.{weight,bias}             -> edge_enc.<t>.<i>...      (MyGNN: one encoder, no <i>)
    edgeEnc_<d>[.<i>].{weight,bias}       -> edge_enc.<t>[.<i>]...    (MyGNN_resnet50 / MyGNN_ViT: one per size d)
    convs.<l>.lin{1,2,3,4}.0.{weight,bias} -> convs.<l>.lin{1,2,3,4}.0.{weight,bias}   (same names)
    convs.<l>.downlin.{weight,bias}       -> convs.<l>.downlin.{weight,bias}
    nodeDec.{1,3}.{weight,bias}           -> node_dec.{1,3}.{weight,bias}
    edgeDec[_<d>].{1,3[,5]}.{weight,bias} -> edge_dec.<t>.{1,3[,5]}.{weight,bias}
    edgeInverter                          -> inv      (buffer: +1 on the first floor(H/2) channels, -1 after)
    mlps.<l>.0.{weight,bias}              -> dropped  (built by MyGNN but never used by its forward)

Sizes are read off the tensors: ``hiddim`` = rows of ``nodeEnc.weight``, ``node_dim`` = its columns, each edge type's
feature size = the columns of its encoder's first weight (and the ViT patch encoder's middle width = the rows of
``edgeEnc_256.0.weight``), ``num_layer`` = the number of ``convs.<l>`` indices. The residual ratios are not tensors in
``MyGNN``: they are plain float attributes of the module (``node_res_ratio``, ``edge_res_ratio``), so they are read
from the module's attributes (the conversion script collects them when it unpickles); a state dict that carries them
as buffers of the same names is read from those instead, and a disagreement between the two is refused.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from nn.metanetwork import MetaNetwork

__all__ = ["AuthorsMetanetworkError", "ImportedMetanetwork", "AUTHORS_METANETWORK_CLASSES", "authors_sizes",
           "import_authors_metanetwork", "RATIO_NAMES"]

# The authors' metanetwork classes (nn/GNN.py) and how many edge types each encodes.
AUTHORS_METANETWORK_CLASSES = {"MyGNN": "one edge type (CIFAR: ResNet-56/110, VGG-19)",
                               "MyGNN_resnet50": "edge types of sizes 49, 9, 1 (ResNet-18/26/50)",
                               "MyGNN_ViT": "edge types of sizes 256, 3, 1 (ViT-B/16)"}
RATIO_NAMES = ("node_res_ratio", "edge_res_ratio")

_CONV = re.compile(r"^convs\.(\d+)\.(lin[1-4]\.0|downlin)\.(weight|bias)$")
_NODE = re.compile(r"^node(Enc|Dec)\.((?:\d+\.)?)(weight|bias)$")
_EDGE = re.compile(r"^edge(Enc|Dec)(?:_(\d+))?\.((?:\d+\.)?)(weight|bias)$")
_UNUSED = re.compile(r"^mlps\.\d+\.0\.(weight|bias)$")
_SHOWN = 6


class AuthorsMetanetworkError(ValueError):
    """A state dict is not one of the authors' metanetworks, or does not fit the task's graphs."""


@dataclass
class ImportedMetanetwork:
    """An authors' metanetwork in this project's terms.

    ``options``: the ``MetaNetwork`` constructor knobs (``num_layer``, ``hiddim``, the two residual ratios, and
    ``edge_mid_dims`` when an encoder has a middle layer); ``node_dim`` / ``edge_dims``: the graph sizes it takes;
    ``state_dict``: our key names; ``renamed``: authors' key -> ours; ``dropped``: authors' keys not carried over
    (unused by their forward); ``ratio_sources``: where each residual ratio was read.
    """

    options: dict[str, Any]
    node_dim: int
    edge_dims: "OrderedDict[str, int]"
    state_dict: "OrderedDict[str, Tensor]"
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    ratio_sources: dict[str, str] = field(default_factory=dict)

    def build(self) -> MetaNetwork:
        """The ``MetaNetwork`` with the imported weights (eval mode, CPU)."""
        net = MetaNetwork(node_dim=self.node_dim, edge_dims=dict(self.edge_dims), **self.options)
        net.load_state_dict(self.state_dict, strict=True)
        return net.eval()


def _short(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _encoders(state_dict: Mapping[str, Tensor], source: str) -> "OrderedDict[str, dict]":
    """The edge encoders/decoders by their authors' suffix ('' for MyGNN's single ``edgeEnc``), in key order:
    ``{suffix: {"size": d, "mid": width or None, "keys": {authors' key: (part, index, param)}}}``."""
    found: OrderedDict[str, dict] = OrderedDict()
    for key, value in state_dict.items():
        m = _EDGE.match(key)
        if not m:
            continue
        part, suffix, index, param = m.group(1), m.group(2) or "", m.group(3), m.group(4)
        entry = found.setdefault(suffix, {"size": None, "mid": None, "keys": {}})
        entry["keys"][key] = (part, index, param)
        if part == "Enc" and param == "weight" and index in ("", "0."):
            entry["size"] = int(value.shape[1])
            if index == "0.":
                entry["mid"] = int(value.shape[0])
    if "" in found and len(found) > 1:
        raise AuthorsMetanetworkError(f"{source}: has both an unsuffixed edgeEnc/edgeDec (MyGNN) and suffixed ones "
                                      f"({[s for s in found if s]}); not a metanetwork of the authors' code")
    for suffix, entry in found.items():
        name = f"edgeEnc{'_' + suffix if suffix else ''}"
        if entry["size"] is None:
            raise AuthorsMetanetworkError(f"{source}: edge decoder edgeDec{'_' + suffix if suffix else ''} has no "
                                          f"encoder {name}.weight; not a metanetwork of the authors' code")
        if suffix and int(suffix) != entry["size"]:
            raise AuthorsMetanetworkError(f"{source}: {name} takes {entry['size']}-dim edges, but its name says "
                                          f"{suffix}")
    return found


def authors_sizes(state_dict: Mapping[str, Tensor], source: str = "metanetwork") -> dict[str, Any]:
    """``{"hiddim", "node_dim", "num_layer", "edge_sizes": [d, ...] (encoder order), "edge_mid": {d: width}}`` read
    off the tensors of an authors' metanetwork state dict (module docstring)."""
    if "nodeEnc.weight" not in state_dict:
        raise AuthorsMetanetworkError(
            f"{source}: no nodeEnc.weight, so this is not a metanetwork of the authors' code (MyGNN, "
            f"MyGNN_resnet50, MyGNN_ViT); keys start {_short(list(state_dict))}")
    hiddim, node_dim = (int(s) for s in state_dict["nodeEnc.weight"].shape)
    layers = sorted({int(m.group(1)) for k in state_dict if (m := _CONV.match(k))})
    if layers != list(range(len(layers))):
        raise AuthorsMetanetworkError(f"{source}: message-passing layers convs.{layers} are not numbered 0..n-1")
    encoders = _encoders(state_dict, source)
    if not encoders:
        raise AuthorsMetanetworkError(f"{source}: no edge encoder (edgeEnc / edgeEnc_<d>); not a metanetwork of the "
                                      "authors' code")
    return {"hiddim": hiddim, "node_dim": node_dim, "num_layer": len(layers),
            "edge_sizes": [e["size"] for e in encoders.values()],
            "edge_mid": {e["size"]: e["mid"] for e in encoders.values() if e["mid"] is not None}}


def _ratios(state_dict: Mapping[str, Tensor], attributes: Mapping[str, Any], source: str
            ) -> tuple[dict[str, float], dict[str, str]]:
    values, sources = {}, {}
    for name in RATIO_NAMES:
        buffer = state_dict.get(name)
        attribute = attributes.get(name)
        if buffer is not None:
            if not isinstance(buffer, Tensor) or buffer.numel() != 1:
                raise AuthorsMetanetworkError(f"{source}: '{name}' in the state dict must be one number")
            values[name], sources[name] = float(buffer.item()), f"state-dict entry '{name}'"
            if attribute is not None and not math.isclose(float(attribute), values[name], rel_tol=1e-6):
                raise AuthorsMetanetworkError(f"{source}: '{name}' is {values[name]} in the state dict but "
                                              f"{attribute} as a module attribute")
        elif attribute is not None:
            if isinstance(attribute, bool) or not isinstance(attribute, (int, float)):
                raise AuthorsMetanetworkError(f"{source}: attribute '{name}'={attribute!r} is not a number")
            values[name], sources[name] = float(attribute), f"module attribute '{name}'"
        else:
            raise AuthorsMetanetworkError(
                f"{source}: no '{name}'. MyGNN keeps its residual ratios as plain module attributes, not in its "
                f"state dict: convert the pickled module itself (main/convert_release.py reads its attributes), or "
                f"give both ratios explicitly (the reference's values: 0.01 for ResNet-56, 0.05 for VGG-19)")
        if not math.isfinite(values[name]):
            raise AuthorsMetanetworkError(f"{source}: {name}={values[name]} is not finite")
    return values, sources


def _check_inverter(inv: Tensor | None, hiddim: int, source: str) -> Tensor:
    expected = torch.ones(hiddim)
    expected[hiddim // 2:] = -1.0
    if inv is None:
        raise AuthorsMetanetworkError(f"{source}: no edgeInverter buffer; not a metanetwork of the authors' code")
    if tuple(inv.shape) != (hiddim,) or not torch.equal(inv.detach().to(torch.float32).cpu(), expected):
        raise AuthorsMetanetworkError(
            f"{source}: edgeInverter is not +1 on the first {hiddim // 2} channels and -1 on the other "
            f"{hiddim - hiddim // 2} (shape {tuple(inv.shape)}); MetaNetwork's sign inverter is that fixed pattern")
    return expected.to(inv.dtype)


def import_authors_metanetwork(state_dict: Mapping[str, Tensor], node_dim: int, edge_dims: Mapping[str, int],
                               attributes: Mapping[str, Any] | None = None, source: str = "metanetwork",
                               target: str = "the task") -> ImportedMetanetwork:
    """Map an authors' metanetwork onto ``MetaNetwork`` for graphs of ``node_dim`` and ``edge_dims`` (the task
    codec's ``node_dim`` / ``edge_dims``).

    ``attributes``: the pickled module's scalar attributes (``node_res_ratio``, ``edge_res_ratio``, ``num_layer``);
    ``source`` names the file and ``target`` the task in error messages. Raises :class:`AuthorsMetanetworkError` when
    the keys are not an authors' metanetwork, when its node/edge sizes are not the task's (e.g. a VGG-19 metanetwork,
    5-dim nodes, for a ResNet-56 task, 8-dim nodes), or when a residual ratio is missing.
    """
    attributes = dict(attributes or {})
    sizes = authors_sizes(state_dict, source)
    hiddim = sizes["hiddim"]
    encoders = _encoders(state_dict, source)
    edge_dims = OrderedDict((str(t), int(d)) for t, d in dict(edge_dims).items())
    theirs = sorted(sizes["edge_sizes"])
    if sizes["node_dim"] != int(node_dim) or theirs != sorted(edge_dims.values()):
        raise AuthorsMetanetworkError(
            f"{source}: this metanetwork takes {sizes['node_dim']}-dim node features and edge types of sizes "
            f"{sizes['edge_sizes']}, but {target} has graphs with {int(node_dim)}-dim nodes and edge types "
            f"{dict(edge_dims)}: it was meta-trained for another architecture (ResNet-56/110: 8-dim nodes, one "
            f"9-dim type; VGG-19: 5-dim nodes, one 9-dim type); use the metanetwork of that task's reproduce folder")
    by_size: dict[int, str] = {}
    for t, d in edge_dims.items():
        if d in by_size:
            raise AuthorsMetanetworkError(f"{target}: edge types {by_size[d]!r} and {t!r} both have size {d}; the "
                                          "authors' per-size encoders cannot be matched to them")
        by_size[d] = t
    num_layer = sizes["num_layer"]
    if "num_layer" in attributes and int(attributes["num_layer"]) != num_layer:
        raise AuthorsMetanetworkError(f"{source}: module attribute num_layer={attributes['num_layer']} but the state "
                                      f"dict has {num_layer} layers convs.0..{num_layer - 1}")
    ratios, ratio_sources = _ratios(state_dict, attributes, source)

    ours: OrderedDict[str, Tensor] = OrderedDict()
    renamed: dict[str, str] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    edge_key_type = {key: by_size[entry["size"]] for entry in encoders.values() for key in entry["keys"]}
    for key, value in state_dict.items():
        if key in RATIO_NAMES:
            continue
        if key == "edgeInverter":
            new = "inv"
            value = _check_inverter(value, hiddim, source)
        elif _CONV.match(key):
            new = key
        elif m := _NODE.match(key):
            new = f"node_{m.group(1).lower()}.{m.group(2)}{m.group(3)}"
        elif m := _EDGE.match(key):
            new = f"edge_{m.group(1).lower()}.{edge_key_type[key]}.{m.group(3)}{m.group(4)}"
        elif _UNUSED.match(key):
            dropped.append(key)
            continue
        else:
            unknown.append(key)
            continue
        renamed[key] = new
        ours[new] = value.detach().clone()
    if unknown:
        raise AuthorsMetanetworkError(f"{source}: keys no authors' metanetwork has: {_short(unknown)}")
    if "inv" not in ours:
        _check_inverter(None, hiddim, source)

    mids = {by_size[d]: w for d, w in sizes["edge_mid"].items()}
    options: dict[str, Any] = {"num_layer": num_layer, "hiddim": hiddim, **ratios}
    if mids:
        options["edge_mid_dims"] = mids
    imported = ImportedMetanetwork(options, int(node_dim), edge_dims, ours, renamed, dropped, ratio_sources)
    template = MetaNetwork(node_dim=int(node_dim), edge_dims=dict(edge_dims), **options)
    expected = template.state_dict()
    missing = [k for k in expected if k not in ours]
    extra = [k for k in ours if k not in expected]
    shapes = [f"{k}: {tuple(ours[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in ours and ours[k].shape != v.shape]
    if missing or extra or shapes:
        problems = [f"{label} {_short(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", extra), ("wrong shapes", shapes)) if keys]
        raise AuthorsMetanetworkError(f"{source}: the tensors do not form one MetaNetwork(num_layer={num_layer}, "
                                      f"hiddim={hiddim}): {'; '.join(problems)}")
    return imported
