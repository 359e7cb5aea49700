"""Network <-> graph codec (original-method.md §4, with the §4.7 defects fixed).

``GraphCodec(model)`` analyses the module structure once and then converts any model of that
architecture and widths into a ``torch_geometric.data.Data`` graph and back::

    codec = GraphCodec(model)
    graph = codec.encode(model)                 # Data on the model's device
    params = codec.decode(graph)                # {state-dict key: tensor}, differentiable w.r.t. graph
    model.load_state_dict(params, strict=False) # exact: decode(encode(m)) changes no bit of m
    torch.func.functional_call(model, {**dict(model.named_buffers()), **params}, x)

Graph format (shared with ``nn.metanetwork``)
---------------------------------------------
* ``x`` float [N, node_dim]: one node per channel/neuron. Input-channel nodes first, layers in forward
  order, classifier nodes last, channels in index order inside a layer.
* ``edge_index`` long [2, E]: row 0 = node of the later layer (output channel), row 1 = node of the
  earlier layer (input channel). Edge types are concatenated in ``edge_dims`` order; inside a type,
  edges follow the forward order of the weights, and inside one weight its row-major (out, in) order.
* ``edge_type`` long [E]: index of the edge's type in ``edge_dims`` (non-decreasing: types are contiguous).
* ``edge_attr__<type>`` float [E_t, edge_dims[type]]: the features of the edges of that type, in the
  order they appear in ``edge_index``.
``edge_index``/``edge_type`` are int64 (as PyG's scatter ops need). On a CPU they are cached int64 copies
shared between encodes: treat them as read-only; on another device every encode makes its own from a
cached int32 ``edge_index`` without a host synchronisation (see "Memory" below). ``decode``
returns freshly allocated contiguous tensors (never views of the graph: CPU kernels choose their summation
order by stride and pointer alignment, and the decoded network must compute bit for bit what the source
network computes).

How the structure is found
--------------------------
The model is traced with ``torch.fx`` (``_trace_model``). Every traced value also gets a meta-device
example value, so shape-dependent Python control flow still traces and handlers know shapes. One
generic walk (``nn.graph_handlers.Builder``) with handlers registered per module type / function turns
the trace into layers of nodes, edge blocks and per-node parameters. Nothing is inferred from state-dict
key positions or from widths; in particular "identity or projection shortcut" is decided from the traced
``add`` (see ``nn.graph_handlers``), so coinciding stage widths after pruning are harmless (§4.7.2).
The analysis and the static ``edge_index``/``edge_type`` are cached per (model class, module types and
hyper-parameters, tensor shapes, options) in a module-level LRU (``clear_cache()`` empties it); the
cache holds no reference to any model. New module types / functions are supported by registering a
handler (``nn.graph_handlers.register_module_handler`` / ``register_function_handler`` /
``register_channelwise_function``); an unsupported leaf module raises ``UnsupportedModuleError`` naming
it and listing the supported types.

Memory. Index tensors are stored as int32: the plan (CPU) holds 12 bytes per edge and a device 8
(``edge_index`` only; ``edge_type`` is filled per type at encode), where int64 triples took 24 bytes per
edge on every device (1.7 GB for ViT-B/16's ~70M edges). Only the CPU's entry keeps int64 copies (24 bytes
per edge): casting there costs more than the rest of an encode of a large model. The copies of a plan's
static tensors on a device (index tensors; constants per dtype) live in one module-level LRU bounded in
bytes (``set_device_cache_limit``, default :data:`DEFAULT_DEVICE_CACHE_BYTES` = 2 GiB; ``device_cache_info()``
reports it): when an insertion passes the bound, the least recently used copies (any plan, any device) are
dropped, and a copy larger than the bound is used for its call without being kept. A "copy" that is the
plan's own CPU tensor costs nothing.

Per call (no Python loop over channels or edges): ``encode`` walks ``_modules`` to the encoded tensors,
builds ``x`` with one ``cat`` and one gather on a cached index, and each ``edge_attr__<t>`` with one
``cat`` of the weights as stored, the zero-padded small kernels and cached constant identity blocks.
``decode`` is one gather + split for all node parameters, one split + cat + view-split per edge type,
and a copy for the few weights stored padded or permuted. ``benchmarks/codec_speed.py`` measures it.

Which parameters become which features (the architecture-independent rule)
-------------------------------------------------------------------------
Nodes:
* A Conv2d / Linear creates one node per output channel; its weight gives one edge per (out, in) pair
  (grouped/depthwise convs: only the pairs inside a group). A self-attention creates two layers: the
  q/k/v nodes (3-dim edges Wq[i, j], Wk[i, j], Wv[i, j]) and the out_proj nodes.
* A projection shortcut (a conv branch added to a block output) creates no nodes: its edges go from
  the block-input nodes to the block-output nodes, its BatchNorm fills the *shortcut* columns.
* A normalisation (BatchNorm / LayerNorm) fills the normalisation columns of the nodes of the layer it
  normalises: [γ, β, μ, σ²] for BatchNorm, [γ, β] for LayerNorm.
* A conv/linear bias goes to a dedicated ``bias`` column if some layer has both a bias and a
  normalisation (VGG19, ViT) or no normalisation exists; otherwise into the β column of its nodes
  (the ResNets' classifier: column 1 = fc.bias, §4.2).
* Columns, in order: [normalisation (4 if any BatchNorm, else 2 if any LayerNorm), bias?,
  shortcut normalisation?, shortcut bias?, q/k/v bias (3) if attention]; node_dim = their total.
* Unset columns hold the identity pattern: γ=1, β=0, μ=0, σ²=1, biases 0 (input and classifier nodes
  [1, 0, 0, 1, ...]); the paper's ViT attention nodes have zeros in their normalisation/bias columns.
* BatchNorm running statistics are encoded but never decoded; ``num_batches_tracked`` is ignored.
  Tensors combined with activations but not owned by a handled module (ViT ``class_token`` and
  ``encoder.pos_embedding``) are not encoded and are kept (listed in ``codec.unencoded_keys``).
Edges:
* ``edge_layout="padded"`` (the CIFAR layout, chosen by "auto" when there is no attention and every conv
  kernel is at most 3x3, odd and square): a single type ``kernel`` of K*K features (K = largest kernel,
  3); smaller kernels, Linear weights (as 1x1) and identity residuals sit zero-padded at the centre
  (index 4 for 3x3).
* ``edge_layout="by_kernel"`` (everything else): one type per kernel size, ``k{h}x{w}`` with h*w features
  (Linear weights and identity edges are ``k1x1``); in a model with attention the conv type is
  ``patch``, the 1-dim type ``linear`` and the in-projection type ``qkv`` (3). Types are ordered by
  decreasing feature size (k7x7, k3x3, k1x1; patch, qkv, linear).
* Identity residuals: ``identity_edges="dense"`` (default with the padded layout, §4.2): every
  (out, in) pair between block output and block input, feature δ_ij (at the centre); ``"sparse"``
  (default otherwise, §4.4/4.5): one edge per channel with feature 1. Their predictions are not decoded.

Paper layouts reproduced: CIFAR ResNet 8-dim nodes [γ, β, μ, σ², sγ, sβ, sμ, sσ²] and 9-dim edges
(ResNet56/CIFAR10: 2045 nodes, 140,720 edges); VGG19 5-dim nodes [γ, β, μ, σ², bias] (CIFAR100: 5607 nodes,
2,275,520 edges); torchvision ResNet18/50: 8-dim nodes, types k7x7/k3x3/k1x1, sparse identity edges;
ViT: 6-dim nodes [LN γ, LN β, bias, q, k, v bias], types patch/qkv/linear.
The classifier decodes correctly; ``legacy_fc_permutation=True`` reproduces the authors' scrambled fc
decode (§4.7.1, padded layout only).

Batches: ``torch_geometric.data.Batch.from_data_list`` works on encoded graphs; ``decode_batch(batch)``
decodes a batch of graphs of this codec's architecture+widths into one dict per graph. For a batch
mixing architectures, split it with ``batch.to_data_list()`` and decode each graph with its own codec.
"""
from __future__ import annotations

import itertools
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch import nn as tnn
from torch_geometric.data import Data

from . import graph_handlers as gh
from .graph_handlers import GraphCodecError, UnsupportedModuleError

__all__ = [
    "GraphCodec",
    "GraphCodecError",
    "UnsupportedModuleError",
    "clear_cache",
    "device_cache_info",
    "set_device_cache_limit",
    "DEFAULT_DEVICE_CACHE_BYTES",
    "LAYOUT_VERSION",
]

LAYOUT_VERSION = 1
_CACHE_MAX_ENTRIES = 64
_CACHE_MAX_EDGES = 100_000_000  # bounds the CPU plans' edge_index + edge_type memory (12 bytes per edge, int32)
DEFAULT_DEVICE_CACHE_BYTES = 2 * 1024 ** 3  # the per-device copies of all plans together (set_device_cache_limit)
_INDEX_DTYPE = torch.int32  # stored indices; every graph here has far fewer than 2**31 nodes, edges, entries
_INT64_EDGE_DEVICES = ("cpu",)  # device types whose cache keeps int64 edge_index/edge_type (Plan._copies)


# ====================================================================================================
# Tracing with meta example values
# ====================================================================================================


def _meta_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


class _MetaTracer(torch.fx.Tracer):
    """``torch.fx`` tracer that also evaluates every node on meta tensors (``node.meta["val"]``).

    Knowing the values lets shape-dependent Python control flow (``if x.shape[2] == 64``) and tuple
    unpacking trace, and gives the handlers the shapes they need. Leaf modules: every module type with
    a handler, plus torch's own modules (so an unsupported torch module is reported by name).
    """

    def __init__(self, root: tnn.Module, example: Tensor):
        super().__init__()
        self._root_module = root
        self._example = example
        self._placeholders = 0
        self._evaluating = False
        # Captured before tracing: fx patches Module.__getattr__ while it traces.
        self._tensors = {**dict(root.named_parameters()), **dict(root.named_buffers())}

    def call_module(self, m, forward, args, kwargs):
        # While a leaf module is being evaluated on meta tensors, fx's patched Module.__call__ still routes
        # through here: run it for real instead of recording a node.
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: tnn.Module, module_qualified_name: str) -> bool:
        if gh.find_module_handler(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        try:
            node.meta["val"] = self._evaluate(node)
        except GraphCodecError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the node named
            raise GraphCodecError(
                f"GraphCodec: could not evaluate traced node '{node.name}' ({kind} {target}) on example input "
                f"of shape {tuple(self._example.shape)}: {err}. Pass input_shape=(C, H, W) matching the model."
            ) from err
        return node

    def _evaluate(self, node: torch.fx.Node) -> Any:
        def val(n):
            return n.meta.get("val")

        args = torch.fx.node.map_arg(node.args, val)
        kwargs = torch.fx.node.map_arg(node.kwargs, val)
        if node.op == "placeholder":
            self._placeholders += 1
            if self._placeholders == 1:
                return self._example
            if node.args:  # a defaulted extra forward() argument
                return node.args[0]
            raise GraphCodecError(f"GraphCodec: forward() takes more than one required input ('{node.target}')")
        if node.op == "get_attr":
            obj = self._tensors.get(str(node.target))
            if obj is None:
                self._evaluating = True  # plain attribute walk, no proxies
                try:
                    obj = self._root_module
                    for part in str(node.target).split("."):
                        obj = getattr(obj, part)
                finally:
                    self._evaluating = False
            return _meta_like(obj) if isinstance(obj, Tensor) else obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            mod = self._root_module.get_submodule(node.target)
            state = {k: _meta_like(v) for k, v in [*mod.named_parameters(), *mod.named_buffers()]}
            self._evaluating = True
            try:
                return torch.func.functional_call(mod, state, tuple(args), kwargs)
            finally:
                self._evaluating = False
        return None

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return bool(obj.node.meta["val"])

    def iter(self, obj: torch.fx.Proxy):
        value = obj.node.meta["val"]
        return iter([obj[i] for i in range(len(value))])


def _default_input_shape(model: tnn.Module) -> tuple[int, ...]:
    for m in model.modules():
        if isinstance(m, tnn.Conv2d):
            size = getattr(model, "image_size", 32)
            return (m.in_channels, int(size), int(size))
        if isinstance(m, tnn.Linear):
            return (m.in_features,)
    raise GraphCodecError(
        f"GraphCodec: {type(model).__name__} has no Conv2d or Linear module; pass input_shape=(C, H, W)"
    )


def _trace_model(model: tnn.Module, input_shape: tuple[int, ...]) -> torch.fx.Graph:
    """Trace ``model`` once; returns an fx Graph whose nodes carry ``meta['val']`` (meta tensors)."""
    example = torch.empty((2, *input_shape), dtype=_float_dtype(model), device="meta")
    tracer = _MetaTracer(model, example)
    try:
        return tracer.trace(model)
    except (GraphCodecError, UnsupportedModuleError):
        raise
    except torch.fx.proxy.TraceError as err:
        raise GraphCodecError(f"GraphCodec: torch.fx could not trace {type(model).__name__}: {err}") from err


def _float_dtype(model: tnn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


# ====================================================================================================
# The cached plan: layout, static indices, encode/decode recipes
# ====================================================================================================


@dataclass
class _EdgePiece:
    """One contiguous run of rows of an edge-type feature tensor.

    op: ``flat`` (weight.reshape(-1, dim)), ``pad`` (kernel zero-padded into K x K, centred),
    ``qkv`` (in_proj_weight [3o, i] -> [o*i, 3]) or ``const`` (identity residual features).
    """

    op: str
    key: str | None
    rows: int
    shape: tuple[int, ...] = ()
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    const: Tensor | None = None


@dataclass
class _Decoder:
    """How one parameter is read back: from ``source`` ('x' or an edge type) rows [start, stop)."""

    key: str
    source: str
    start: int
    stop: int
    op: str  # 'col' | 'qkv_bias' | 'flat' | 'pad' | 'qkv' | 'legacy_fc'
    col: int = 0
    shape: tuple[int, ...] = ()
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # r0, c0, kh, kw inside K x K
    piece: int = -1  # index of the edge piece (block) it is read from


_PLAN_IDS = itertools.count()


@dataclass
class _Plan:
    num_nodes: int
    node_dim: int
    node_features: list[str]
    edge_dims: "OrderedDict[str, int]"
    edge_counts: "OrderedDict[str, int]"
    edge_index: Tensor  # CPU int32 [2, E]
    edge_type: Tensor  # CPU int32 [E], non-decreasing (types are contiguous, in edge_dims order)
    x_consts: Tensor  # CPU float64 [n_const] default values
    x_sources: list[str]  # keys concatenated (flattened) after the constants
    x_index: Tensor  # CPU int32 [N * node_dim] into cat(consts, sources)
    edge_pieces: "OrderedDict[str, list[_EdgePiece]]"
    decoders: list[_Decoder]
    shapes: dict[str, tuple[int, ...]]  # every encoded key -> expected shape
    layer_slices: "OrderedDict[str, tuple[int, int]]"  # layer name -> node rows
    edge_blocks: list[dict]  # one per weight / residual: key, kind, type, rows, edges, out_nodes, in_nodes
    unencoded_keys: list[str]
    layout: dict
    fast: "_FastPath | None" = None
    uid: int = field(default_factory=lambda: next(_PLAN_IDS))  # names its copies in the device cache

    def on(self, device: torch.device, dtype: torch.dtype, edges: bool = True) -> dict:
        """Static tensors on ``device`` (constants cast to ``dtype``) from the bounded device cache (module doc,
        "Memory"): ``node_dec_index``, ``x_index``, ``x_consts``, ``consts``, ``pads`` and, with ``edges``,
        ``edge_index`` (int32; on the CPU int64, with ``edge_type``: see :meth:`_copies`)."""
        static = {**_device_copy(self, "nodes", device, None), **_device_copy(self, "consts", device, dtype)}
        if edges:
            static.update(_device_copy(self, "edges", device, None))
        return static

    def _copies(self, kind: str, device: torch.device, dtype: torch.dtype | None) -> dict:
        """The tensors of one cache entry, made on ``device`` (no host synchronisation is needed later)."""
        fp = self.fast
        if kind == "edges":
            if device.type in _INT64_EDGE_DEVICES:
                # On a CPU the int64 copy an encode hands out costs a freshly page-faulted buffer per call (a
                # third of a large model's encode time), so the int64 tensors are kept, within the bound, and
                # shared by the graphs as before. On an accelerator the cast is nearly free: int32 is kept.
                return {"edge_index": self.edge_index.long(), "edge_type": self.edge_type.long()}
            return {"edge_index": self.edge_index.to(device)}
        if kind == "nodes":
            return {"x_index": self.x_index.to(device), "node_dec_index": fp.node_index.to(device)}
        converted: dict[int, Tensor] = {}  # identity blocks shared between pieces stay shared

        def const(t: Tensor) -> Tensor:
            if id(t) not in converted:
                converted[id(t)] = t.to(device=device, dtype=dtype)
            return converted[id(t)]

        return {
            "x_consts": self.x_consts.to(device=device, dtype=dtype),
            "consts": {t: [const(p.const) if p.const is not None else None for p in pieces]
                       for t, pieces in self.edge_pieces.items()},
            # zero rows [k, dim] that pad each decoded weight to an aligned offset in its buffer
            "pads": {t: [torch.zeros(k, self.edge_dims[t], device=device, dtype=dtype) for k in range(_ALIGN)]
                     for t in fp.edge_dec},
        }

    def _own_tensors(self) -> set[int]:
        """ids of the plan's own (CPU) tensors: a "copy" that is one of them costs the cache nothing."""
        own = {id(self.edge_index), id(self.x_index), id(self.x_consts), id(self.fast.node_index)}
        own.update(id(p.const) for pieces in self.edge_pieces.values() for p in pieces if p.const is not None)
        return own


# ----------------------------------------------------------------------------------------------------
# The bounded cache of device copies (module doc, "Memory")
# ----------------------------------------------------------------------------------------------------
@dataclass
class _DeviceEntry:
    tensors: dict
    nbytes: int


_DEVICE_CACHE: "OrderedDict[tuple, _DeviceEntry]" = OrderedDict()  # (plan uid, kind, device, dtype) -> entry
_DEVICE_CACHE_LIMIT = [DEFAULT_DEVICE_CACHE_BYTES]
_DEVICE_CACHE_LOCK = threading.Lock()


def _tensor_bytes(tensors: Any, skip: set[int]) -> int:
    """Bytes held by the distinct tensors in a nest of dicts/lists, not counting those whose id is in ``skip``."""
    seen: set[int] = set(skip)
    total = 0
    stack = [tensors]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                total += item.numel() * item.element_size()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _cache_bytes() -> int:
    return sum(e.nbytes for e in _DEVICE_CACHE.values())


def _evict_to(limit: int, keep: tuple | None = None) -> None:
    """Drop least recently used entries (never ``keep``) until the cache holds at most ``limit`` bytes. The
    entries' tensors are released with the cache's references (callers hold none beyond their call)."""
    total = _cache_bytes()
    for key in list(_DEVICE_CACHE):
        if total <= limit:
            break
        if key == keep:
            continue
        total -= _DEVICE_CACHE.pop(key).nbytes


def _device_copy(plan: "_Plan", kind: str, device: torch.device, dtype: torch.dtype | None) -> dict:
    key = (plan.uid, kind, str(device), dtype)
    with _DEVICE_CACHE_LOCK:
        entry = _DEVICE_CACHE.get(key)
        if entry is not None:
            _DEVICE_CACHE.move_to_end(key)
            return entry.tensors
    tensors = plan._copies(kind, device, dtype)
    nbytes = _tensor_bytes(tensors, plan._own_tensors())
    with _DEVICE_CACHE_LOCK:
        limit = _DEVICE_CACHE_LIMIT[0]
        if nbytes <= limit:
            _DEVICE_CACHE[key] = _DeviceEntry(tensors, nbytes)
            _DEVICE_CACHE.move_to_end(key)
            _evict_to(limit, keep=key)
    return tensors


def set_device_cache_limit(max_bytes: int | None) -> int:
    """Bound the device copies of the codecs' static tensors to ``max_bytes`` (``None``: the default, 2 GiB);
    evicts least recently used copies at once if the cache holds more. Returns the previous bound."""
    limit = DEFAULT_DEVICE_CACHE_BYTES if max_bytes is None else int(max_bytes)
    if limit < 0:
        raise ValueError(f"set_device_cache_limit: max_bytes must be >= 0, got {max_bytes!r}")
    with _DEVICE_CACHE_LOCK:
        previous = _DEVICE_CACHE_LIMIT[0]
        _DEVICE_CACHE_LIMIT[0] = limit
        _evict_to(limit)
    return previous


def device_cache_info() -> dict:
    """``{"bytes": held, "limit": bound, "entries": [{"plan", "kind", "device", "dtype", "bytes"}, ...]}``, the
    entries from least to most recently used."""
    with _DEVICE_CACHE_LOCK:
        entries = [{"plan": uid, "kind": kind, "device": device, "dtype": dtype, "bytes": e.nbytes}
                   for (uid, kind, device, dtype), e in _DEVICE_CACHE.items()]
        return {"bytes": _cache_bytes(), "limit": _DEVICE_CACHE_LIMIT[0], "entries": entries}


_flatten = torch._C._nn.flatten_dense_tensors  # cat of flattened tensors, one C++ call
_unflatten = torch._C._nn.unflatten_dense_tensors  # views of a flat tensor shaped like templates

_ALIGN = 32  # decoded tensors start at multiples of 32 elements (>= 64 bytes) inside their buffer


@dataclass
class _FastPath:
    """Per-call recipes on positions in ``keys`` (the encoded tensors, fetched without ``named_parameters``).

    fetch_steps: (parent module index, child name) walking ``_modules`` from the root (index 0);
    fetch_items: (module index, '_parameters' | '_buffers', attribute) per key.
    Decoding: node parameters are one gather of ``x`` (``node_index``) split by ``node_sizes``; the weights of each edge type whose rows are stored as is ('flat') are one
    ``cat`` of row blocks and zero pads (``edge_dec[t] = (selection, templates, keys)``), split the same way;
    the few others (1x1 kernels padded into a larger kernel, q/k/v, legacy fc) use ``special``.
    """

    keys: list[str]
    shapes: list[torch.Size]
    fetch_steps: list[tuple[int, str]]
    fetch_items: list[tuple[int, str, str]]
    x_src: list[int]
    edge_enc: "OrderedDict[str, list[tuple]]"
    node_index: Tensor
    node_sizes: list[int]
    node_keys: list[str]
    x_src_1d: bool
    edge_dec: "OrderedDict[str, tuple[list[int], list[Tensor], list[str], list[bool]]]"
    special: list[_Decoder]
    out_order: list[str]
    piece_rows: dict[str, list[int]]


_PLAN_CACHE: "OrderedDict[tuple, _Plan]" = OrderedDict()


def clear_cache() -> None:
    """Forget every cached architecture analysis (and the cached edge indices and device copies)."""
    _PLAN_CACHE.clear()
    with _DEVICE_CACHE_LOCK:
        _DEVICE_CACHE.clear()


def _cache_put(key: tuple, plan: _Plan) -> None:
    _PLAN_CACHE[key] = plan
    _PLAN_CACHE.move_to_end(key)
    while len(_PLAN_CACHE) > _CACHE_MAX_ENTRIES or (
        len(_PLAN_CACHE) > 1 and sum(p.edge_type.numel() for p in _PLAN_CACHE.values()) > _CACHE_MAX_EDGES
    ):
        _PLAN_CACHE.popitem(last=False)


def _architecture_key(model: tnn.Module, input_shape: tuple[int, ...], options: tuple) -> tuple:
    """Class + module types and hyper-parameters + tensor shapes + options: equal keys trace equally."""
    modules = tuple(
        (name, type(m), getattr(m, "groups", None), getattr(m, "num_heads", None))
        for name, m in model.named_modules()
    )
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items())
    return (type(model), modules, shapes, tuple(input_shape), options)


# ----------------------------------------------------------------------------------------------------
# Layout construction from the IR
# ----------------------------------------------------------------------------------------------------

_BN_COLS = ("weight", "bias", "running_mean", "running_var")
_BN_DEFAULTS = (1.0, 0.0, 0.0, 1.0)


def _build_plan(model: tnn.Module, input_shape: tuple[int, ...], identity_edges: str | None,
                edge_layout: str, legacy_fc: bool) -> _Plan:
    graph = _trace_model(model, input_shape)
    builder = gh.Builder(model, graph)
    builder.run()
    plan = _layout(model, builder, identity_edges, edge_layout, legacy_fc)
    plan.fast = _compile(model, plan)
    return plan


def _compile(model: tnn.Module, plan: _Plan) -> _FastPath:
    """Turn the plan's per-key recipes into position-based ones for the vectorised encode/decode."""
    order = list(model.state_dict(keep_vars=True))
    keys = [k for k in order if k in plan.shapes]
    pos = {k: i for i, k in enumerate(keys)}
    steps, items = _module_walk(model, keys)

    edge_enc: OrderedDict[str, list[tuple]] = OrderedDict()
    for t, pieces in plan.edge_pieces.items():
        edge_enc[t] = [(p.op, pos.get(p.key, -1), p.shape, p.pad) for p in pieces]

    node_index, node_sizes, node_keys, flat_decs, special = _split_decoders(plan)
    edge_dec = _edge_decoding(plan, flat_decs)

    decoded = {d.key for d in plan.decoders}
    return _FastPath(
        keys=keys,
        shapes=[torch.Size(plan.shapes[k]) for k in keys],
        fetch_steps=steps,
        fetch_items=items,
        x_src=[pos[k] for k in plan.x_sources],
        edge_enc=edge_enc,
        node_index=node_index,
        node_sizes=node_sizes,
        node_keys=node_keys,
        x_src_1d=all(len(plan.shapes[k]) == 1 for k in plan.x_sources),
        edge_dec=edge_dec,
        special=special,
        out_order=[k for k in order if k in decoded],
        piece_rows={t: [p.rows for p in pieces] for t, pieces in plan.edge_pieces.items()},
    )


def _module_walk(model: tnn.Module, keys: list[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Every module on the path to an encoded tensor, parents first: ``(steps, items)`` of :class:`_FastPath`."""
    steps: list[tuple[int, str]] = []
    mod_index: dict[str, int] = {"": 0}
    items: list[tuple[int, str, str]] = []
    for key in keys:
        path, _, attr = key.rpartition(".")
        parts = path.split(".") if path else []
        for depth in range(len(parts)):
            prefix = ".".join(parts[:depth + 1])
            if prefix not in mod_index:
                steps.append((mod_index[".".join(parts[:depth])], parts[depth]))
                mod_index[prefix] = len(steps)
        module = model.get_submodule(path) if path else model
        where = "_parameters" if attr in module._parameters else "_buffers"
        items.append((mod_index[path], where, attr))
    return steps, items


def _split_decoders(plan: _Plan) -> tuple[Tensor, list[int], list[str], dict[str, list[_Decoder]], list[_Decoder]]:
    """Node parameters: the gather index of their rows*F+col positions of ``x`` (with sizes and keys); edge
    weights stored as is, per type (``flat``); the rest (``special``)."""
    F_ = plan.node_dim
    node_idx: list[Tensor] = []
    node_sizes: list[int] = []
    node_keys: list[str] = []
    special: list[_Decoder] = []
    flat_decs: dict[str, list[_Decoder]] = {t: [] for t in plan.edge_dims}
    for d in plan.decoders:
        if d.source == "x":
            rows = torch.arange(d.start, d.stop) * F_ + d.col
            idx = torch.cat([rows + j for j in range(3)]) if d.op == "qkv_bias" else rows
            # Per-channel vectors feed elementwise ops only, so they need no alignment padding.
            node_idx.append(idx)
            node_sizes.append(idx.numel())
            node_keys.append(d.key)
        elif d.op == "flat":
            flat_decs[d.source].append(d)
        else:
            special.append(d)
    node_index = torch.cat(node_idx) if node_idx else torch.empty(0, dtype=torch.long)
    return node_index.to(_INDEX_DTYPE), node_sizes, node_keys, flat_decs, special


def _edge_decoding(plan: _Plan, flat_decs: Mapping[str, list[_Decoder]]
                   ) -> OrderedDict[str, tuple[list[int], list[Tensor], list[str], list[bool]]]:
    """Edge weights stored as is: cat(row blocks of the type, zero pads), split into the parameters, each
    parameter padded to an aligned offset."""
    edge_dec: OrderedDict[str, tuple[list[int], list[Tensor], list[str], list[bool]]] = OrderedDict()
    for t, decs in flat_decs.items():
        if not decs:
            continue
        dim = plan.edge_dims[t]
        n_pieces = len(plan.edge_pieces[t])
        unit = _ALIGN // math.gcd(dim, _ALIGN)  # rows per aligned step
        sel: list[int] = []
        templates: list[Tensor] = []
        slots: list[bool] = []  # True where the template is a parameter (False: alignment padding)
        for d in decs:
            rows = d.stop - d.start
            k = (-rows) % unit
            sel.append(d.piece)
            templates.append(torch.empty(d.shape, device="meta"))
            slots.append(True)
            if k:
                sel.append(n_pieces + k)
                templates.append(torch.empty(k * dim, device="meta"))
                slots.append(False)
        edge_dec[t] = (sel, templates, [d.key for d in decs], slots)
    return edge_dec


def _layout(model: tnn.Module, b: gh.Builder, identity_edges: str | None, edge_layout: str,
            legacy_fc: bool) -> _Plan:
    """The plan of one architecture + widths: node rows, node columns, edge types, edge rows and indices."""
    shapes_all = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    nodes = _node_layers(model, b)
    columns, defaults, col_of = _node_columns(b)
    features = _node_features(b, nodes, defaults, col_of, shapes_all)
    types = _edge_types(b, edge_layout, identity_edges, legacy_fc)
    edges = _edge_pieces(b, nodes, types, legacy_fc, shapes_all, features)
    edge_index, edge_type = _edge_indices(b, nodes, types, edges)
    x_index = features.x_index.reshape(-1)
    largest = max(nodes.num_nodes * len(columns), int(x_index.max()) + 1 if x_index.numel() else 0, edges.total)
    if largest >= 2 ** 31:
        raise GraphCodecError(f"GraphCodec: {largest} nodes/edges/features exceed the int32 indices this codec stores")
    # encode makes edge_type from the per-type counts: the types must be contiguous, in edge_dims order
    expected = torch.repeat_interleave(torch.arange(len(types.edge_dims), dtype=_INDEX_DTYPE),
                                       torch.tensor(list(edges.counts.values()), dtype=torch.long))
    if not torch.equal(edge_type, expected):
        raise GraphCodecError("GraphCodec: internal error, edge types are not contiguous in edge_dims order")

    encoded = set(features.shapes)
    param_keys = [k for k, _ in model.named_parameters()]
    unencoded = [k for k in param_keys if k not in encoded]
    layout = {
        "version": LAYOUT_VERSION,
        "family": f"{type(model).__module__}.{type(model).__qualname__}",
        "node_dim": len(columns),
        "edge_dims": dict(types.edge_dims),
        "edge_layout": types.edge_layout,
        "identity_edges": types.identity_edges,
        "legacy_fc_permutation": bool(legacy_fc),
        "node_features": columns,
    }
    return _Plan(
        num_nodes=nodes.num_nodes,
        node_dim=len(columns),
        node_features=columns,
        edge_dims=types.edge_dims,
        edge_counts=edges.counts,
        edge_index=edge_index,
        edge_type=edge_type,
        x_consts=features.consts,
        x_sources=features.x_sources,
        x_index=x_index.to(_INDEX_DTYPE),
        edge_pieces=edges.pieces,
        decoders=features.decoders,
        shapes=features.shapes,
        layer_slices=nodes.layer_slices,
        edge_blocks=edges.edge_blocks,
        unencoded_keys=unencoded,
        layout=layout,
    )


# ---------------------------------------------------------------- node rows
@dataclass
class _NodeLayers:
    """The node layers (merged ones removed) and their first node rows."""

    layers: list  # gh layers in node order
    offset: dict[int, int]  # layer id -> first node row
    layer_slices: "OrderedDict[str, tuple[int, int]]"  # layer name -> node rows
    num_nodes: int


def _node_layers(model: tnn.Module, b: gh.Builder) -> _NodeLayers:
    layers = [l for l in b.layers if l.merged_into is None]
    if len(layers) < 2:
        raise GraphCodecError(f"GraphCodec: {type(model).__name__} has no Conv2d/Linear layer on its input path")
    offset: dict[int, int] = {}
    n = 0
    layer_slices: OrderedDict[str, tuple[int, int]] = OrderedDict()
    for l in layers:
        offset[l.id] = n
        name = l.name if l.name not in layer_slices else f"{l.name}#{l.id}"  # a module called twice
        layer_slices[name] = (n, n + l.size)
        n += l.size
    return _NodeLayers(layers, offset, layer_slices, n)


# ---------------------------------------------------------------- node columns
def _node_columns(b: gh.Builder) -> tuple[list[str], list[float], dict[tuple[str, str], int]]:
    """Column names, their identity defaults and ``(group, role) -> column`` (module docstring, "Nodes")."""
    def norm_width(group: str) -> int:
        fields = {p.field for p in b.node_params if p.group == group}
        return 4 if "bn" in fields else 2 if "ln" in fields else 0

    def needs_bias_col(group: str, width: int) -> bool:
        biased = {p.layer for p in b.node_params if p.group == group and p.field == "bias"}
        normed = {p.layer for p in b.node_params if p.group == group and p.field in ("bn", "ln")}
        return bool(biased) and (width == 0 or bool(biased & normed))

    columns: list[str] = []
    defaults: list[float] = []
    col_of: dict[tuple[str, str], int] = {}
    for group, prefix in (("main", "norm"), ("shortcut", "shortcut_norm")):
        w = norm_width(group)
        for i in range(w):
            col_of[(group, _BN_COLS[i])] = len(columns)
            columns.append(f"{prefix}.{_BN_COLS[i]}")
            defaults.append(_BN_DEFAULTS[i])
        if needs_bias_col(group, w):
            col_of[(group, "conv_bias")] = len(columns)
            columns.append("bias" if group == "main" else "shortcut_bias")
            defaults.append(0.0)
        elif any(p.group == group and p.field == "bias" for p in b.node_params):
            col_of[(group, "conv_bias")] = col_of[(group, "bias")]  # bias shares the β column
            columns[col_of[(group, "bias")]] += "|bias"
    if any(p.field == "qkv_bias" for p in b.node_params):
        col_of[("main", "qkv_bias")] = len(columns)
        columns += ["q_bias", "k_bias", "v_bias"]
        defaults += [0.0, 0.0, 0.0]
    if not columns:  # no normalisation and no bias anywhere: keep one (identity-scale) column
        columns, defaults = ["norm.weight"], [1.0]
    return columns, defaults, col_of


# ---------------------------------------------------------------- node features
@dataclass
class _NodeFeatures:
    """``x = cat(consts, sources...)[x_index]``, and how node parameters are decoded."""

    consts: Tensor  # [0, 1]
    x_index: Tensor  # long [num_nodes, node_dim]
    x_sources: list[str]
    decoders: list[_Decoder]  # node decoders; the edge decoders are appended by _edge_pieces
    shapes: dict[str, tuple[int, ...]]  # every encoded key -> shape (edge weights added by _edge_pieces)


def _node_features(b: gh.Builder, nodes: _NodeLayers, defaults: list[float], col_of: dict[tuple[str, str], int],
                   shapes_all: Mapping[str, tuple[int, ...]]) -> _NodeFeatures:
    offset = nodes.offset
    consts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x_index = torch.empty((nodes.num_nodes, len(defaults)), dtype=torch.long)
    x_index[:] = torch.tensor([1 if d == 1.0 else 0 for d in defaults], dtype=torch.long)
    for l in nodes.layers:
        if l.zero_default:
            x_index[offset[l.id]:offset[l.id] + l.size] = 0
    x_sources: list[str] = []
    src_offset = consts.numel()
    decoders: list[_Decoder] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def place(key: str, layer_id: int, col: int, count: int, decode: bool, qkv: bool = False) -> None:
        nonlocal src_offset
        start = offset[layer_id]
        size = b.layers[layer_id].size
        x_sources.append(key)
        shapes[key] = shapes_all[key]
        if qkv:
            for j in range(3):
                x_index[start:start + size, col + j] = src_offset + j * size + torch.arange(size)
            if decode:
                decoders.append(_Decoder(key, "x", start, start + size, "qkv_bias", col))
        else:
            x_index[start:start + size, col] = src_offset + torch.arange(size)
            if decode:
                decoders.append(_Decoder(key, "x", start, start + size, "col", col))
        src_offset += count

    for p in b.node_params:
        layer = b.resolve(p.layer)
        if p.field in ("bn", "ln"):
            for role, key in p.keys.items():
                decode = role in ("weight", "bias")  # running statistics are never written back
                place(key, layer, col_of[(p.group, role)], b.layers[layer].size, decode)
        elif p.field == "bias":
            place(p.keys["bias"], layer, col_of[(p.group, "conv_bias")], b.layers[layer].size, True)
        elif p.field == "qkv_bias":
            place(p.keys["bias"], layer, col_of[("main", "qkv_bias")], 3 * b.layers[layer].size, True, qkv=True)
    return _NodeFeatures(consts, x_index, x_sources, decoders, shapes)


# ---------------------------------------------------------------- edge types
@dataclass
class _EdgeTypes:
    """The resolved edge layout: one feature size per edge type, and each edge block's type."""

    edge_layout: str  # padded | by_kernel
    identity_edges: str  # dense | sparse
    kmax: int  # largest conv kernel side
    has_attention: bool
    edge_dims: "OrderedDict[str, int]"  # by decreasing feature size, then first appearance

    def type_of(self, e: gh.EdgeBlock) -> tuple[str, int]:
        kmax = self.kmax
        if self.edge_layout == "padded":
            return "kernel", kmax * kmax
        if e.kind == "conv":
            kh, kw = e.kernel
            if self.has_attention:
                return "patch", kh * kw
            return f"k{kh}x{kw}", kh * kw
        if e.kind == "qkv":
            return "qkv", 3
        return ("linear" if self.has_attention else "k1x1"), 1


def _edge_types(b: gh.Builder, edge_layout: str, identity_edges: str | None, legacy_fc: bool) -> _EdgeTypes:
    conv_kernels = [e.kernel for e in b.edges if e.kind == "conv"]
    kmax = max([max(k) for k in conv_kernels], default=1)
    fits_padded = (
        not b.has_attention
        and kmax <= 3
        and all(kh == kw and kh % 2 == 1 for kh, kw in conv_kernels)
    )
    if edge_layout == "auto":
        edge_layout = "padded" if fits_padded else "by_kernel"
    elif edge_layout == "padded" and (b.has_attention or not all(
            (kmax - kh) % 2 == 0 and (kmax - kw) % 2 == 0 for kh, kw in conv_kernels) or kmax % 2 == 0):
        raise GraphCodecError(
            "GraphCodec: edge_layout='padded' needs odd kernels that centre inside the largest one and no "
            "attention; use edge_layout='by_kernel'"
        )
    if identity_edges is None:
        identity_edges = "dense" if edge_layout == "padded" else "sparse"
    if legacy_fc and edge_layout != "padded":
        raise GraphCodecError("GraphCodec: legacy_fc_permutation reproduces the padded (CIFAR) layout only")

    types = _EdgeTypes(edge_layout, identity_edges, kmax, b.has_attention, OrderedDict())
    first_seen: dict[str, int] = {}
    dims: dict[str, int] = {}
    for i, e in enumerate(b.edges):
        t, d = types.type_of(e)
        if t in dims and dims[t] != d:
            raise GraphCodecError(f"GraphCodec: edge type '{t}' has inconsistent sizes {dims[t]} and {d}")
        dims[t] = d
        first_seen.setdefault(t, i)
    type_names = sorted(dims, key=lambda t: (-dims[t], first_seen[t]))
    types.edge_dims = OrderedDict((t, dims[t]) for t in type_names)
    return types


# ---------------------------------------------------------------- edge rows
@dataclass
class _EdgePieces:
    """Pass 1 over the edge blocks: feature recipes per type, and where each block's rows go."""

    pieces: "OrderedDict[str, list[_EdgePiece]]"
    counts: "OrderedDict[str, int]"  # edges per type
    blocks: list[tuple[int, int, gh.EdgeBlock]]  # (type index, first edge row overall, block)
    edge_blocks: list[dict]
    total: int  # edges of all types


def _edge_pieces(b: gh.Builder, nodes: _NodeLayers, types: _EdgeTypes, legacy_fc: bool,
                 shapes_all: Mapping[str, tuple[int, ...]], features: _NodeFeatures) -> _EdgePieces:
    """Edge rows and feature recipes per block, grouped by type; appends the edge decoders and weight shapes to
    ``features``."""
    offset, kmax, identity_edges = nodes.offset, types.kmax, types.identity_edges
    type_names = list(types.edge_dims)
    last_layer = nodes.layers[-1].id
    decoders, shapes = features.decoders, features.shapes
    pieces: OrderedDict[str, list[_EdgePiece]] = OrderedDict((t, []) for t in type_names)
    counts: OrderedDict[str, int] = OrderedDict()
    identity_cache: dict[tuple, Tensor] = {}
    blocks: list[tuple[int, int, gh.EdgeBlock]] = []
    edge_blocks: list[dict] = []
    total = 0
    for ti, t in enumerate(type_names):
        dim = types.edge_dims[t]
        row = 0
        for e in b.edges:
            if types.type_of(e)[0] != t:
                continue
            o_size, i_size = b.size(e.out_layer), b.size(e.in_layer)
            if e.kind == "identity":
                rows = o_size * i_size if identity_edges == "dense" else o_size
                ckey = (identity_edges, o_size, dim)
                if ckey not in identity_cache:
                    feat = torch.zeros(rows, dim, dtype=torch.float64)
                    diag = torch.arange(o_size) * (o_size + 1 if identity_edges == "dense" else 1)
                    feat[diag, dim // 2] = 1.0  # δ_ij at the centre
                    identity_cache[ckey] = feat
                piece = _EdgePiece("const", None, rows, const=identity_cache[ckey])
            else:
                shape = shapes_all[e.key]
                shapes[e.key] = shape
                if e.kind == "qkv":
                    rows = o_size * i_size
                    piece = _EdgePiece("qkv", e.key, rows, shape=(o_size, i_size))
                    dec = _Decoder(e.key, t, row, row + rows, "qkv", shape=shape)
                else:
                    kh, kw = e.kernel
                    ig = i_size // e.groups
                    rows = o_size * ig
                    if kh * kw == dim:
                        piece = _EdgePiece("flat", e.key, rows, shape=shape)
                        dec = _Decoder(e.key, t, row, row + rows, "flat", shape=shape)
                    else:
                        r0, c0 = (kmax - kh) // 2, (kmax - kw) // 2
                        pad = (c0, kmax - kw - c0, r0, kmax - kh - r0)
                        piece = _EdgePiece("pad", e.key, rows, shape=(o_size, ig, kh, kw), pad=pad)
                        dec = _Decoder(e.key, t, row, row + rows, "pad", shape=shape, window=(r0, c0, kh, kw))
                        if legacy_fc and e.kind == "linear" and b.resolve(e.out_layer) == last_layer:
                            dec = _Decoder(e.key, t, row, row + rows, "legacy_fc", col=dim // 2, shape=shape)
                dec.piece = len(pieces[t])
                decoders.append(dec)
            pieces[t].append(piece)
            blocks.append((ti, total, e))
            o_off, i_off = offset[b.resolve(e.out_layer)], offset[b.resolve(e.in_layer)]
            edge_blocks.append({
                "key": e.key, "module": e.module, "kind": e.kind, "shortcut": e.shortcut, "type": t,
                "rows": (row, row + rows), "edges": (total, total + rows),
                "out_nodes": (o_off, o_off + o_size), "in_nodes": (i_off, i_off + i_size), "groups": e.groups,
            })
            row += rows
            total += rows
        counts[t] = row
    return _EdgePieces(pieces, counts, blocks, edge_blocks, total)


def _edge_indices(b: gh.Builder, nodes: _NodeLayers, types: _EdgeTypes, edges: _EdgePieces) -> tuple[Tensor, Tensor]:
    """Pass 2: ``edge_index`` [2, E] and ``edge_type`` [E] of every block's rows."""
    offset = nodes.offset
    edge_index = torch.empty((2, edges.total), dtype=_INDEX_DTYPE)
    edge_type = torch.empty(edges.total, dtype=_INDEX_DTYPE)
    in_order = [p for t in types.edge_dims for p in edges.pieces[t]]
    for (ti, start, e), piece in zip(edges.blocks, in_order):
        stop = start + piece.rows
        o_off, i_off = offset[b.resolve(e.out_layer)], offset[b.resolve(e.in_layer)]
        out_row, in_row = edge_index[0, start:stop], edge_index[1, start:stop]
        edge_type[start:stop] = ti
        if e.kind == "identity" and types.identity_edges == "sparse":
            torch.arange(o_off, o_off + piece.rows, out=out_row)
            torch.arange(i_off, i_off + piece.rows, out=in_row)
            continue
        # Row r of a weight [out, in/groups, ...] is the pair (o, group(o) * ig + j) with r = o * ig + j;
        # written as broadcast copies (memory-bound, no integer division).
        o_size, i_size = b.size(e.out_layer), b.size(e.in_layer)
        g = e.groups
        ig, og = i_size // g, o_size // g
        out_row.view(o_size, ig).copy_(torch.arange(o_off, o_off + o_size).unsqueeze(1).expand(o_size, ig))
        first_in = (torch.arange(g) * ig + i_off).view(g, 1, 1) + torch.arange(ig).view(1, 1, ig)
        in_row.view(g, og, ig).copy_(first_in.expand(g, og, ig))
    return edge_index, edge_type


# ====================================================================================================
# The codec
# ====================================================================================================


class GraphCodec:
    """Network <-> graph conversion for one architecture at one set of widths (module docstring).

    Args:
        model: the network to analyse (only its structure and shapes are used).
        identity_edges: ``"dense"`` (every out/in pair, δ_ij, §4.2) or ``"sparse"`` (one edge per
            channel); default: dense for the padded layout, sparse otherwise.
        edge_layout: ``"auto"``, ``"padded"`` (one K*K type, §4.2/4.3) or ``"by_kernel"`` (§4.4/4.5).
        legacy_fc_permutation: decode the classifier with the authors' transposed reshape (§4.7.1).
        input_shape: ``(C, H, W)`` of one example used for tracing; default: the first conv's in_channels
            and ``model.image_size`` (else 32) pixels.

    Attributes: ``node_dim`` (int), ``edge_dims`` (OrderedDict type -> feature size), ``num_nodes``,
    ``edge_counts`` (OrderedDict type -> number of edges), ``layout`` (JSON-serialisable description),
    ``node_features`` (column names), ``unencoded_keys`` (parameters kept as they are),
    ``layer_slices`` (layer name -> (first, last+1) node row), ``edge_blocks`` (per weight / residual).
    """

    def __init__(self, model: tnn.Module, identity_edges: str | None = None, edge_layout: str = "auto",
                 legacy_fc_permutation: bool = False, input_shape: tuple[int, ...] | None = None):
        if not isinstance(model, tnn.Module):
            raise TypeError(f"GraphCodec needs an nn.Module, got {type(model).__name__}")
        if identity_edges not in (None, "dense", "sparse"):
            raise ValueError(f"identity_edges must be 'dense', 'sparse' or None, got {identity_edges!r}")
        if edge_layout not in ("auto", "padded", "by_kernel"):
            raise ValueError(f"edge_layout must be 'auto', 'padded' or 'by_kernel', got {edge_layout!r}")
        shape = tuple(int(s) for s in input_shape) if input_shape is not None else _default_input_shape(model)
        options = (identity_edges, edge_layout, bool(legacy_fc_permutation))
        key = _architecture_key(model, shape, options)
        plan = _PLAN_CACHE.get(key)
        if plan is None:
            plan = _build_plan(model, shape, identity_edges, edge_layout, bool(legacy_fc_permutation))
            _cache_put(key, plan)
        else:
            _PLAN_CACHE.move_to_end(key)
        self._plan = plan
        self.node_dim: int = plan.node_dim
        self.edge_dims: OrderedDict[str, int] = OrderedDict(plan.edge_dims)
        self.num_nodes: int = plan.num_nodes
        self.edge_counts: OrderedDict[str, int] = OrderedDict(plan.edge_counts)
        self.num_edges: int = int(plan.edge_type.numel())
        self.node_features: list[str] = list(plan.node_features)
        self.unencoded_keys: list[str] = list(plan.unencoded_keys)
        self.layer_slices: OrderedDict[str, tuple[int, int]] = OrderedDict(plan.layer_slices)
        self.decoded_keys: list[str] = [d.key for d in plan.decoders]

    @property
    def edge_blocks(self) -> list[dict]:
        """One dict per weight or residual, in edge order: ``key`` (state-dict key, None for identity
        residuals), ``module``, ``kind`` (conv / linear / qkv / identity), ``shortcut`` (projection branch),
        ``type``, ``rows`` (rows of ``edge_attr__<type>``), ``edges`` (columns of ``edge_index``),
        ``out_nodes`` / ``in_nodes`` (node ranges), ``groups``."""
        return [dict(b) for b in self._plan.edge_blocks]

    # ------------------------------------------------------------------------------------------------
    @property
    def layout(self) -> dict:
        """JSON-serialisable {version, family, node_dim, edge_dims, edge_layout, identity_edges, ...}."""
        return json.loads(json.dumps(self._plan.layout))

    def check_layout(self, layout: Mapping[str, Any]) -> None:
        """Raise GraphCodecError if ``layout`` (e.g. from a metanetwork checkpoint) has other feature sizes."""
        mine = self._plan.layout
        for k in ("node_dim", "edge_dims", "node_features"):
            if k not in layout:
                raise GraphCodecError(f"graph layout is missing '{k}'; expected a GraphCodec.layout dict")
            if json.loads(json.dumps(layout[k])) != json.loads(json.dumps(mine[k])):
                raise GraphCodecError(
                    f"graph layout mismatch in '{k}': checkpoint has {layout[k]}, this model needs {mine[k]} "
                    f"(model family {mine['family']}); use a metanetwork trained for this architecture"
                )

    def node_slice(self, name: str) -> slice:
        """Node rows of the layer created by module ``name`` ('input' for the input channels)."""
        if name not in self._plan.layer_slices:
            raise KeyError(f"no node layer named '{name}'; layers: {list(self._plan.layer_slices)}")
        a, b = self._plan.layer_slices[name]
        return slice(a, b)

    # ------------------------------------------------------------------------------------------------
    def _tensors(self, model: tnn.Module | Mapping[str, Tensor]) -> list[Tensor]:
        """The encoded tensors in ``fast.keys`` order (a walk of ``_modules``, no ``named_parameters``)."""
        fp = self._plan.fast
        tensors: list[Tensor] | None = None
        if isinstance(model, tnn.Module):
            try:
                mods = [model]
                for parent, name in fp.fetch_steps:
                    mods.append(mods[parent]._modules[name])
                tensors = [vars(mods[m])[where][attr] for m, where, attr in fp.fetch_items]
            except (KeyError, AttributeError):  # parametrised / restructured module: slow but general
                tensors = None
            if tensors is None or any(t is None for t in tensors):
                named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
                tensors = [named.get(k) for k in fp.keys]
        elif isinstance(model, Mapping):
            tensors = [model.get(k) for k in fp.keys]
        else:
            raise TypeError(f"encode() needs an nn.Module or a state dict, got {type(model).__name__}")
        try:
            ok = [t.shape for t in tensors] == fp.shapes
        except AttributeError:
            ok = False
        if not ok:
            for key, t, shape in zip(fp.keys, tensors, fp.shapes):
                if t is None:
                    raise GraphCodecError(f"encode: the model has no tensor '{key}'; build a GraphCodec for this model")
                if t.shape != shape:
                    raise GraphCodecError(
                        f"encode: '{key}' has shape {tuple(t.shape)} but this codec was built for {tuple(shape)}; "
                        "build a GraphCodec for this model's widths"
                    )
        return tensors

    def encode(self, model: tnn.Module | Mapping[str, Tensor]) -> Data:
        """Model (or its state dict) -> Data(x [N, node_dim], edge_index [2, E], edge_type [E],
        edge_attr__<t> [E_t, edge_dims[t]]), on the model's device, differentiable w.r.t. the parameters.
        The features are fresh tensors (never views of the model's parameters)."""
        plan, fp = self._plan, self._plan.fast
        tensors = self._tensors(model)
        ref = tensors[0]
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        static = plan.on(ref.device, dtype)
        if "edge_type" in static:  # the CPU's shared int64 copies (Plan._copies)
            edge_index, edge_type = static["edge_index"], static["edge_type"]
        else:  # int64 as PyG's scatter ops need: a device-side cast, and one fill per type (no upload, no sync)
            edge_index = static["edge_index"].long()
            edge_type = torch.empty(self.num_edges, dtype=torch.long, device=ref.device)
            start = 0
            for t, count in enumerate(plan.edge_counts.values()):
                edge_type[start:start + count].fill_(t)
                start += count
        sources = [static["x_consts"], *[tensors[i] for i in fp.x_src]]
        flat = torch.cat(sources) if fp.x_src_1d else _flatten(sources)
        x = flat[static["x_index"]].view(plan.num_nodes, plan.node_dim)
        attrs = {}
        for t, recipe in fp.edge_enc.items():
            consts = static["consts"][t]
            parts = []
            for j, (op, i, shape, pad) in enumerate(recipe):
                if op == "flat":
                    parts.append(tensors[i])
                elif op == "const":
                    parts.append(consts[j])
                elif op == "pad":  # kernel zero-padded into the type's K x K, centred
                    parts.append(F.pad(tensors[i].reshape(shape), pad))
                else:  # qkv: in_proj_weight [3o, i] -> rows (o, i) with features (q, k, v)
                    parts.append(rearrange(tensors[i], "(qkv o) i -> o i qkv", qkv=3))
            attrs[f"edge_attr__{t}"] = _flatten(parts).view(plan.edge_counts[t], plan.edge_dims[t])
        return Data(x=x, edge_index=edge_index, edge_type=edge_type, **attrs)

    # ------------------------------------------------------------------------------------------------
    def _features(self, graph: Any) -> dict[str, Tensor]:
        plan = self._plan
        feats = {"x": getattr(graph, "x", None)}
        for t in plan.edge_dims:
            feats[t] = getattr(graph, f"edge_attr__{t}", None)
        if feats["x"] is None or tuple(feats["x"].shape) != (plan.num_nodes, plan.node_dim):
            got = None if feats["x"] is None else tuple(feats["x"].shape)
            raise GraphCodecError(
                f"decode: graph.x has shape {got}, this codec expects {(plan.num_nodes, plan.node_dim)} "
                "(a graph of another architecture/widths, or a Batch: use decode_batch)"
            )
        for t, dim in plan.edge_dims.items():
            a = feats[t]
            if a is None or tuple(a.shape) != (plan.edge_counts[t], dim):
                got = None if a is None else tuple(a.shape)
                raise GraphCodecError(
                    f"decode: graph.edge_attr__{t} has shape {got}, this codec expects {(plan.edge_counts[t], dim)}"
                )
        return feats

    @staticmethod
    def _decode_features(plan: _Plan, feats: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # Decoded tensors never alias the graph, and each starts at an aligned offset of a fresh buffer:
        # CPU conv/matmul kernels pick their summation order by stride and pointer alignment, and the
        # decoded network must compute bit for bit what the source network computes.
        fp = plan.fast
        x = feats["x"]
        static = plan.on(x.device, x.dtype, edges=False)
        out: dict[str, Tensor] = {}
        if fp.node_keys:
            out.update(zip(fp.node_keys, torch.split(x.reshape(-1)[static["node_dec_index"]], fp.node_sizes)))
        for t, (sel, templates, keys, slots) in fp.edge_dec.items():
            ext = [*torch.split(feats[t], fp.piece_rows[t]), *static["pads"][t]]
            views = _unflatten(torch.cat([ext[i] for i in sel]).view(-1), templates)
            out.update(zip(keys, (v for v, is_param in zip(views, slots) if is_param)))
        for d in fp.special:
            src = feats[d.source]
            if d.op == "pad":
                r0, c0, kh, kw = d.window
                k = int(math.isqrt(src.shape[1]))
                kernels = rearrange(src[d.start:d.stop], "n (rows cols) -> n rows cols", rows=k)
                w = kernels[:, r0:r0 + kh, c0:c0 + kw].reshape(d.shape)
                out[d.key] = w.clone(memory_format=torch.contiguous_format)
            elif d.op == "qkv":
                out[d.key] = rearrange(src[d.start:d.stop], "(o i) qkv -> (qkv o) i", i=d.shape[1])
            else:  # legacy_fc: the authors' reshape(in, C).T of the out-major fc rows (§4.7.1)
                w = rearrange(src[d.start:d.stop, d.col], "(i c) -> c i", c=d.shape[0])
                out[d.key] = w.clone(memory_format=torch.contiguous_format)
        return {k: out[k] for k in fp.out_order}

    def decode(self, graph: Any) -> dict[str, Tensor]:
        """Graph (Data with ``x`` and ``edge_attr__<t>``) -> {state-dict key: tensor} of the parameters
        written back: conv/linear weights and biases, BatchNorm/LayerNorm γ and β, attention projections.
        Never running statistics, ``num_batches_tracked`` or unencoded tensors. Differentiable."""
        return self._decode_features(self._plan, self._features(graph))

    def decode_batch(self, batch: Any) -> list[dict[str, Tensor]]:
        """A PyG ``Batch`` of graphs of this architecture+widths -> one decoded dict per graph."""
        plan = self._plan
        x = batch.x
        num = x.shape[0] // plan.num_nodes if plan.num_nodes else 0
        if num * plan.num_nodes != x.shape[0] or x.shape[1] != plan.node_dim:
            raise GraphCodecError(
                f"decode_batch: batch.x has shape {tuple(x.shape)}, not a multiple of this codec's "
                f"{(plan.num_nodes, plan.node_dim)}; decode mixed batches graph by graph (batch.to_data_list())"
            )
        attrs = {}
        for t, dim in plan.edge_dims.items():
            a = getattr(batch, f"edge_attr__{t}", None)
            if a is None or tuple(a.shape) != (num * plan.edge_counts[t], dim):
                raise GraphCodecError(
                    f"decode_batch: batch.edge_attr__{t} has shape {None if a is None else tuple(a.shape)}, "
                    f"expected {(num * plan.edge_counts[t], dim)} for {num} graphs"
                )
            attrs[t] = a
        results = []
        for g in range(num):
            feats = {"x": x[g * plan.num_nodes:(g + 1) * plan.num_nodes]}
            for t, a in attrs.items():
                c = plan.edge_counts[t]
                feats[t] = a[g * c:(g + 1) * c]
            results.append(self._decode_features(plan, feats))
        return results

    def __repr__(self) -> str:
        edges = ", ".join(f"{t}: {self.edge_counts[t]}x{d}" for t, d in self.edge_dims.items())
        return f"GraphCodec({self._plan.layout['family']}, nodes={self.num_nodes}x{self.node_dim}, edges={{{edges}}})"
