"""Structure analysis for :mod:`nn.graph`: the intermediate representation and the per-operation handlers.

A traced ``torch.fx`` graph whose nodes carry meta-device example values (``node.meta["val"]``) is walked
once in forward order by :class:`Builder`. Every traced value gets a *channel info*:

* :class:`Chan` ``(layer, dim)``: the tensor is indexed by the nodes of graph layer ``layer`` along
  tensor dimension ``dim`` (e.g. ``[B, C, H, W]`` with ``dim=1``, ``[B, S, D]`` with ``dim=2``);
* ``None``: the value carries no channels (a shape, a constant, an unencoded parameter such as a ViT
  ``class_token``);
* a tuple of infos for tuple outputs (``nn.MultiheadAttention`` returns ``(out, weights)``).

Handlers are registered per module type (:func:`register_module_handler`), per function
(:func:`register_function_handler`) and per tensor-method name (:func:`register_method_handler`). They
read the infos of their inputs and

* create node layers (:meth:`Builder.new_layer`): one node per output channel of a Conv2d / Linear
  (two layers for a self-attention: the q/k/v nodes and the out_proj nodes);
* record edge blocks (:class:`EdgeBlock`): dense (out, in) pairs of a weight matrix, grouped-conv pairs,
  and identity residual edges;
* record per-node parameters (:class:`NodeParam`): BatchNorm / LayerNorm affine and statistics, biases,
  attention in-projection biases.

Residual ``add`` nodes are resolved from the traced structure only (:meth:`Builder.residual_add`), never
from widths: the operand with the larger conv depth is the main path; the other operand is an *identity*
shortcut if its layer is an ancestor of the main layer, or a *projection* shortcut if it is a fresh layer
produced by a single conv branch (each node of that branch used once) that reads from an ancestor of the
main layer. A projection's layer is merged into the main layer: its conv edges become (block output,
block input) edges and its BatchNorm goes to the shortcut feature columns of the block-output nodes.

An operation the analysis does not understand raises :class:`GraphCodecError` naming the traced node,
and an unsupported leaf module raises :class:`UnsupportedModuleError` naming the module and listing the
supported module types.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn as tnn

__all__ = [
    "GraphCodecError",
    "UnsupportedModuleError",
    "Chan",
    "Layer",
    "EdgeBlock",
    "NodeParam",
    "Op",
    "Builder",
    "register_module_handler",
    "register_function_handler",
    "register_method_handler",
    "register_channelwise_function",
    "supported_module_types",
    "find_module_handler",
]


class GraphCodecError(ValueError):
    """A model (or graph) the codec cannot convert; the message names the module / node / key."""


class UnsupportedModuleError(GraphCodecError):
    """A leaf module of a type without a registered handler."""


# ----------------------------------------------------------------------------------------------------
# Intermediate representation
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chan:
    """A tensor indexed by the nodes of ``layer`` along tensor dimension ``dim`` (non-negative)."""

    layer: int
    dim: int


@dataclass
class Layer:
    """One group of graph nodes (one per channel), created in forward order.

    ``depth`` = number of node-creating ops on the longest path from the input; ``parents`` = layers the
    creating op reads; ``merged_into`` is set when a projection-shortcut layer is folded into the block
    output layer (it then owns no nodes). ``zero_default`` marks layers whose unused node columns are
    zero instead of the identity-normalisation pattern (the paper's ViT attention nodes).
    """

    id: int
    size: int
    depth: int
    parents: tuple[int, ...]
    name: str
    fx_node: Any = None
    zero_default: bool = False
    merged_into: int | None = None


@dataclass
class EdgeBlock:
    """The edges between two layers carried by one weight (or an identity residual).

    kind: ``conv`` (weight [out, in/groups, kh, kw]), ``linear`` (weight [out, in]), ``qkv``
    (``in_proj_weight`` [3*out, in]) or ``identity`` (no weight; feature 1 on channel i -> i).
    Edges are (out node, in node) pairs; their order is the row-major order of the weight.
    """

    kind: str
    out_layer: int
    in_layer: int
    key: str | None
    kernel: tuple[int, int] = (1, 1)
    groups: int = 1
    shortcut: bool = False
    module: str = ""


@dataclass
class NodeParam:
    """Per-node parameters written to node feature columns.

    field: ``bn`` (keys weight, bias, running_mean, running_var; any may be absent), ``ln`` (weight, bias),
    ``bias`` (key bias) or ``qkv_bias`` (key bias, length 3*size, q then k then v).
    group: ``main``, or ``shortcut`` for the parameters of a merged projection branch.
    """

    layer: int
    field: str
    keys: dict[str, str]
    group: str = "main"
    module: str = ""


@dataclass
class Op:
    """One traced fx node as seen by a handler.

    ``args``/``kwargs`` hold channel infos (``Chan`` / ``None`` / tuples) where the fx arguments were
    traced values, and the constants otherwise; ``arg_vals``/``kwarg_vals`` hold the meta example values;
    ``out`` is the meta example output. ``name`` is the module's qualified name for call_module nodes.
    """

    node: torch.fx.Node
    target: Any
    args: tuple
    kwargs: dict
    arg_vals: tuple
    kwarg_vals: dict
    out: Any
    module: tnn.Module | None = None
    name: str = ""

    def describe(self) -> str:
        if self.module is not None:
            return f"module '{self.name}' ({type(self.module).__name__})"
        target = self.target if isinstance(self.target, str) else _callable_name(self.target)
        return f"traced node '{self.node.name}' ({self.node.op} {target})"


def _callable_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if qual.startswith("_VariableFunctionsClass."):  # torch.flatten & co.
        module, qual = "torch", qual.split(".", 1)[1]
    if module == "_operator":
        module = "operator"
    return f"{module}.{qual}" if module else qual


# ----------------------------------------------------------------------------------------------------
# Handler registries
# ----------------------------------------------------------------------------------------------------

_MODULE_HANDLERS: dict[type, Callable[["Builder", Op], Any]] = {}
_FUNCTION_HANDLERS: dict[Any, Callable[["Builder", Op], Any]] = {}
_FUNCTION_HANDLERS_BY_NAME: dict[str, Callable[["Builder", Op], Any]] = {}
_METHOD_HANDLERS: dict[str, Callable[["Builder", Op], Any]] = {}


def register_module_handler(*types: type) -> Callable:
    """Decorator: ``fn(builder, op) -> info`` handles leaf modules of ``types`` (and subclasses)."""

    def deco(fn):
        for t in types:
            _MODULE_HANDLERS[t] = fn
        return fn

    return deco


def register_function_handler(*targets: Any) -> Callable:
    """Decorator: ``fn(builder, op) -> info`` handles call_function nodes of ``targets``.

    A target may be a function object or its ``"module.qualname"`` string (for functions that cannot be
    imported here, e.g. a model file's ``torch.fx.wrap``-ped helper).
    """

    def deco(fn):
        for t in targets:
            if isinstance(t, str):
                _FUNCTION_HANDLERS_BY_NAME[t] = fn
            else:
                _FUNCTION_HANDLERS[t] = fn
        return fn

    return deco


def register_method_handler(*names: str) -> Callable:
    """Decorator: ``fn(builder, op) -> info`` handles call_method nodes (``x.name(...)``)."""

    def deco(fn):
        for n in names:
            _METHOD_HANDLERS[n] = fn
        return fn

    return deco


def register_channelwise_function(fn_or_name: Any) -> None:
    """Declare a function that maps each channel to itself (an activation, a pooling, ...).

    Use it for model-specific helpers that ``torch.fx`` records as one opaque call (``torch.fx.wrap``).
    """
    register_function_handler(fn_or_name)(_channelwise)


def find_module_handler(module: tnn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in _MODULE_HANDLERS:
            return _MODULE_HANDLERS[cls]
    return None


def supported_module_types() -> list[str]:
    """Names of the leaf module types with a handler, sorted."""
    return sorted({t.__name__ for t in _MODULE_HANDLERS})


def _find_function_handler(target: Any) -> Callable | None:
    try:
        handler = _FUNCTION_HANDLERS.get(target)
    except TypeError:  # unhashable target
        handler = None
    if handler is None:
        handler = _FUNCTION_HANDLERS_BY_NAME.get(_callable_name(target))
    return handler


# ----------------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------------


def _contains_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_contains_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_contains_tensor(v) for v in value.values())
    return False


def _chans(info: Any) -> list[Chan]:
    """All Chan entries inside an info (nested tuples/lists/dicts)."""
    if isinstance(info, Chan):
        return [info]
    if isinstance(info, (tuple, list)):
        return [c for v in info for c in _chans(v)]
    if isinstance(info, dict):
        return [c for v in info.values() for c in _chans(v)]
    return []


@dataclass
class Builder:
    """Walks a meta-valued fx graph and builds the layer / edge / node-parameter IR."""

    root: tnn.Module
    graph: torch.fx.Graph
    layers: list[Layer] = field(default_factory=list)
    edges: list[EdgeBlock] = field(default_factory=list)
    node_params: list[NodeParam] = field(default_factory=list)
    has_attention: bool = False
    infos: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- layers, edges, node params
    def resolve(self, layer: int) -> int:
        while self.layers[layer].merged_into is not None:
            layer = self.layers[layer].merged_into
        return layer

    def size(self, layer: int) -> int:
        return self.layers[self.resolve(layer)].size

    def new_layer(self, size: int, parents: list[int], name: str, fx_node: Any = None, zero_default: bool = False) -> int:
        parents_r = tuple(self.resolve(p) for p in parents)
        depth = 1 + max((self.layers[p].depth for p in parents_r), default=-1)
        layer = Layer(len(self.layers), int(size), depth, parents_r, name, fx_node, zero_default)
        self.layers.append(layer)
        return layer.id

    def add_edges(self, block: EdgeBlock) -> None:
        block.out_layer = self.resolve(block.out_layer)
        block.in_layer = self.resolve(block.in_layer)
        self.edges.append(block)

    def add_node_param(self, param: NodeParam, op: Op) -> None:
        param.layer = self.resolve(param.layer)
        if param.field in ("bn", "ln"):
            for other in self.node_params:
                if other.layer == param.layer and other.group == param.group and other.field in ("bn", "ln"):
                    raise GraphCodecError(
                        f"{op.describe()} normalises the channels of layer '{self.layers[param.layer].name}', "
                        f"which already has a normalisation ({other.module}); the graph format has one "
                        "normalisation slot per node"
                    )
        self.node_params.append(param)

    def ancestors(self, layer: int) -> set[int]:
        """All layers reachable through parents (excluding ``layer`` itself)."""
        seen: set[int] = set()
        stack = list(self.layers[self.resolve(layer)].parents)
        while stack:
            p = self.resolve(stack.pop())
            if p not in seen:
                seen.add(p)
                stack.extend(self.layers[p].parents)
        return seen

    # ---------------------------------------------------------------- argument checks
    def chan_arg(self, op: Op, index: int = 0, key: str | None = None) -> tuple[Chan, torch.Tensor]:
        """The (Chan, meta value) of positional arg ``index`` (or kwarg ``key``); error if not layered."""
        if key is not None and key in op.kwargs:
            info, val = op.kwargs[key], op.kwarg_vals[key]
        elif index < len(op.args):
            info, val = op.args[index], op.arg_vals[index]
        else:
            raise GraphCodecError(f"{op.describe()}: missing input argument {key or index}")
        if not isinstance(info, Chan):
            raise GraphCodecError(
                f"{op.describe()}: its input is not a per-channel activation of the network "
                "(it does not depend on the network input through supported operations)"
            )
        return Chan(self.resolve(info.layer), info.dim), val

    def check_width(self, op: Op, chan: Chan, expected: int, what: str) -> None:
        if self.size(chan.layer) != expected:
            raise GraphCodecError(
                f"{op.describe()}: {what} is {expected} but its input has {self.size(chan.layer)} channels"
            )

    # ---------------------------------------------------------------- residuals
    def residual_add(self, op: Op, a: Chan, b: Chan) -> Chan:
        """Resolve ``a + b`` of two layered tensors into an identity or projection shortcut."""
        la, lb = self.resolve(a.layer), self.resolve(b.layer)
        out_ndim = op.out.dim()
        va, vb = op.arg_vals[0], op.arg_vals[1]
        da = a.dim + out_ndim - va.dim()
        db = b.dim + out_ndim - vb.dim()
        if da != db:
            raise GraphCodecError(f"{op.describe()}: adds two tensors whose channel dimensions do not line up")
        if la == lb:
            return Chan(la, da)
        # Main path = the deeper operand; ties keep the left operand as the main path.
        if self.layers[lb].depth > self.layers[la].depth:
            main, short = lb, la
        else:
            main, short = la, lb
        if self.layers[main].size != self.layers[short].size:
            raise GraphCodecError(f"{op.describe()}: adds layers of different widths")
        main_anc = self.ancestors(main)
        if short in main_anc:
            self.add_edges(EdgeBlock("identity", main, short, None, module=op.node.name))
            return Chan(main, da)
        if self._is_projection(short, main, main_anc, op.node):
            self._merge_projection(short, main)
            return Chan(main, da)
        raise GraphCodecError(
            f"{op.describe()}: adds two branches ('{self.layers[main].name}' and '{self.layers[short].name}') "
            "that are neither an identity shortcut (one operand is an ancestor of the other) nor a projection "
            "shortcut (a single conv branch from an ancestor of the other operand)"
        )

    def _is_projection(self, short: int, main: int, main_anc: set[int], add_node: torch.fx.Node) -> bool:
        layer = self.layers[short]
        if layer.fx_node is None or not layer.parents:
            return False
        if not all(p in main_anc or p == main for p in layer.parents):
            return False
        if any(e.in_layer == short for e in self.edges):  # consumed by another conv/linear
            return False
        if any(l.merged_into == short for l in self.layers):
            return False
        # Every traced value on the branch from the creating op to the add is used exactly once.
        node = layer.fx_node
        for _ in range(len(self.graph.nodes)):
            if node is add_node:
                return True
            users = list(node.users)
            if len(users) != 1:
                return False
            node = users[0]
        return False

    def _merge_projection(self, short: int, main: int) -> None:
        self.layers[short].merged_into = main
        moved = [e for e in self.edges if e.out_layer == short]
        self.edges = [e for e in self.edges if e.out_layer != short]
        for e in moved:  # shortcut edges come after the main-path edges of the block (reference order)
            e.out_layer, e.shortcut = main, True
            self.edges.append(e)
        for p in self.node_params:
            if p.layer == short:
                p.layer, p.group = main, "shortcut"

    # ---------------------------------------------------------------- the walk
    def run(self) -> None:
        placeholders = 0
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if placeholders == 0:
                    val = node.meta["val"]
                    size = int(val.shape[1]) if val.dim() >= 2 else int(val.shape[0])
                    layer = self.new_layer(size, [], "input", None)
                    self.infos[node] = Chan(layer, 1 if val.dim() >= 2 else 0)
                else:
                    self.infos[node] = None
                placeholders += 1
                continue
            if node.op in ("get_attr", "output"):
                self.infos[node] = None
                continue
            self.infos[node] = self._visit(node)

    def _make_op(self, node: torch.fx.Node) -> Op:
        def info_of(n):
            return self.infos.get(n)

        def val_of(n):
            return n.meta.get("val")

        args = torch.fx.node.map_arg(node.args, info_of)
        kwargs = torch.fx.node.map_arg(node.kwargs, info_of)
        arg_vals = torch.fx.node.map_arg(node.args, val_of)
        kwarg_vals = torch.fx.node.map_arg(node.kwargs, val_of)
        module = self.root.get_submodule(node.target) if node.op == "call_module" else None
        name = node.target if node.op == "call_module" else node.name
        return Op(node, node.target, tuple(args), dict(kwargs), tuple(arg_vals), dict(kwarg_vals),
                  node.meta.get("val"), module, name)

    def _visit(self, node: torch.fx.Node) -> Any:
        op = self._make_op(node)
        layered = _chans(op.args) + _chans(op.kwargs)
        if node.op == "call_module":
            handler = find_module_handler(op.module)
            if handler is None:
                raise UnsupportedModuleError(
                    f"GraphCodec: module '{op.name}' of type {type(op.module).__name__} is not supported. "
                    f"Supported module types: {', '.join(supported_module_types())}. "
                    "Register a handler with nn.graph_handlers.register_module_handler to add one."
                )
            if not layered:
                return None
            return handler(self, op)
        if not layered or not _contains_tensor(op.out):
            # Shapes, asserts, constants and unencoded parameters (e.g. a class token) carry no channels.
            return None
        if node.op == "call_method":
            handler = _METHOD_HANDLERS.get(node.target)
        else:
            handler = _find_function_handler(node.target)
        if handler is None:
            what = f"method '.{node.target}()'" if node.op == "call_method" else f"function {_callable_name(node.target)}"
            raise GraphCodecError(
                f"GraphCodec: unsupported operation {what} on network activations at traced node '{node.name}'. "
                "Channel-preserving helpers can be declared with nn.graph_handlers.register_channelwise_function."
            )
        return handler(self, op)


# ----------------------------------------------------------------------------------------------------
# Module handlers
# ----------------------------------------------------------------------------------------------------


@register_module_handler(tnn.Conv2d)
def _conv2d(b: Builder, op: Op) -> Chan:
    m: tnn.Conv2d = op.module
    chan, val = b.chan_arg(op, 0, "input")
    if chan.dim != 1 or val.dim() not in (3, 4):
        raise GraphCodecError(f"{op.describe()}: expects channels in dimension 1 of a 4-d tensor")
    b.check_width(op, chan, m.in_channels, "in_channels")
    out = b.new_layer(m.out_channels, [chan.layer], op.name, op.node)
    kh, kw = m.kernel_size
    b.add_edges(EdgeBlock("conv", out, chan.layer, f"{op.name}.weight", (kh, kw), m.groups, module=op.name))
    if m.bias is not None:
        b.add_node_param(NodeParam(out, "bias", {"bias": f"{op.name}.bias"}, module=op.name), op)
    return Chan(out, 1)


@register_module_handler(tnn.Linear)
def _linear(b: Builder, op: Op) -> Chan:
    m: tnn.Linear = op.module
    chan, val = b.chan_arg(op, 0, "input")
    if chan.dim != val.dim() - 1:
        raise GraphCodecError(f"{op.describe()}: its input channels are not in the last dimension")
    b.check_width(op, chan, m.in_features, "in_features")
    out = b.new_layer(m.out_features, [chan.layer], op.name, op.node)
    b.add_edges(EdgeBlock("linear", out, chan.layer, f"{op.name}.weight", module=op.name))
    if m.bias is not None:
        b.add_node_param(NodeParam(out, "bias", {"bias": f"{op.name}.bias"}, module=op.name), op)
    return Chan(out, val.dim() - 1)


@register_module_handler(tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d)
def _batchnorm(b: Builder, op: Op) -> Chan:
    m = op.module
    chan, _ = b.chan_arg(op, 0, "input")
    if chan.dim != 1:
        raise GraphCodecError(f"{op.describe()}: expects channels in dimension 1")
    b.check_width(op, chan, m.num_features, "num_features")
    keys = _present_keys(op, ("weight", "bias", "running_mean", "running_var"))
    b.add_node_param(NodeParam(chan.layer, "bn", keys, module=op.name), op)
    return chan


def _present_keys(op: Op, names: Sequence[str]) -> dict[str, str]:
    """State-dict keys of the tensors a normalisation module actually has (affine/stats are optional)."""
    return {n: f"{op.name}.{n}" for n in names if getattr(op.module, n) is not None}


@register_module_handler(tnn.LayerNorm)
def _layernorm(b: Builder, op: Op) -> Chan:
    m: tnn.LayerNorm = op.module
    chan, val = b.chan_arg(op, 0, "input")
    if len(m.normalized_shape) != 1 or chan.dim != val.dim() - 1:
        raise GraphCodecError(f"{op.describe()}: only a LayerNorm over the channel (last) dimension is supported")
    b.check_width(op, chan, m.normalized_shape[0], "normalized_shape")
    keys = _present_keys(op, ("weight", "bias"))
    b.add_node_param(NodeParam(chan.layer, "ln", keys, module=op.name), op)
    return chan


@register_module_handler(tnn.MultiheadAttention)
def _multihead_attention(b: Builder, op: Op) -> tuple:
    m: tnn.MultiheadAttention = op.module
    q, qv = b.chan_arg(op, 0, "query")
    k, _ = b.chan_arg(op, 1, "key")
    v, _ = b.chan_arg(op, 2, "value")
    if not (q == k == v) or op.arg_vals[0] is not op.arg_vals[1] or op.arg_vals[0] is not op.arg_vals[2]:
        raise GraphCodecError(f"{op.describe()}: only self-attention (query, key and value the same tensor) is supported")
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.bias_v is not None:
        raise GraphCodecError(
            f"{op.describe()}: only attention with a packed in_proj_weight (kdim == vdim == embed_dim) "
            "and without add_bias_kv is supported"
        )
    if q.dim != qv.dim() - 1:
        raise GraphCodecError(f"{op.describe()}: its input channels are not in the last dimension")
    b.check_width(op, q, m.embed_dim, "embed_dim")
    b.has_attention = True
    e = m.embed_dim
    # Attention nodes: the q/k/v in-projection outputs (one node per embedding channel, 3-dim edges).
    attn = b.new_layer(e, [q.layer], f"{op.name}.in_proj", op.node, zero_default=True)
    b.add_edges(EdgeBlock("qkv", attn, q.layer, f"{op.name}.in_proj_weight", module=op.name))
    if m.in_proj_bias is not None:
        b.add_node_param(NodeParam(attn, "qkv_bias", {"bias": f"{op.name}.in_proj_bias"}, module=op.name), op)
    out = b.new_layer(e, [attn], f"{op.name}.out_proj", op.node)
    b.add_edges(EdgeBlock("linear", out, attn, f"{op.name}.out_proj.weight", module=f"{op.name}.out_proj"))
    if m.out_proj.bias is not None:
        b.add_node_param(NodeParam(out, "bias", {"bias": f"{op.name}.out_proj.bias"}, module=op.name), op)
    return (Chan(out, q.dim), None)


def _channelwise(b: Builder, op: Op) -> Chan:
    """Ops that keep every channel in place (activations, dropout, pooling over dims after the channel)."""
    chans = _chans(op.args) + _chans(op.kwargs)
    if len({(c.layer, c.dim) for c in chans}) != 1:
        raise GraphCodecError(f"{op.describe()}: expected exactly one per-channel input")
    chan = chans[0]
    out = op.out
    if not isinstance(out, torch.Tensor):
        raise GraphCodecError(f"{op.describe()}: expected a tensor output")
    tensors = [v for v in (*op.arg_vals, *op.kwarg_vals.values()) if isinstance(v, torch.Tensor)]
    first = tensors[0] if tensors else None
    if first is None or out.dim() != first.dim() or out.shape[chan.dim] != b.size(chan.layer):
        raise GraphCodecError(f"{op.describe()}: does not keep the channel dimension in place")
    return Chan(b.resolve(chan.layer), chan.dim)


register_module_handler(
    tnn.ReLU, tnn.ReLU6, tnn.LeakyReLU, tnn.GELU, tnn.SiLU, tnn.Sigmoid, tnn.Tanh, tnn.Hardswish,
    tnn.Hardsigmoid, tnn.ELU, tnn.Mish, tnn.Identity, tnn.Dropout, tnn.Dropout1d, tnn.Dropout2d,
    tnn.MaxPool1d, tnn.MaxPool2d, tnn.AvgPool1d, tnn.AvgPool2d, tnn.AdaptiveAvgPool1d, tnn.AdaptiveAvgPool2d,
    tnn.AdaptiveMaxPool1d, tnn.AdaptiveMaxPool2d,
)(_channelwise)


def _pool_channelwise(b: Builder, op: Op) -> Chan:
    chan, _ = b.chan_arg(op, 0, "input")
    if chan.dim != 1:
        raise GraphCodecError(f"{op.describe()}: pools over the channel dimension")
    return _channelwise(b, op)


for _pool in (tnn.MaxPool1d, tnn.MaxPool2d, tnn.AvgPool1d, tnn.AvgPool2d, tnn.AdaptiveAvgPool1d,
              tnn.AdaptiveAvgPool2d, tnn.AdaptiveMaxPool1d, tnn.AdaptiveMaxPool2d):
    _MODULE_HANDLERS[_pool] = _pool_channelwise


def _reshape_chan(b: Builder, op: Op, chan: Chan, in_shape: torch.Size, out_shape: torch.Size) -> Chan:
    """Where the channel dimension lands after a view/reshape/flatten (same extent and same inner stride).

    Flattening the *network input* before anything read it (an MLP on images) turns the input layer into
    one node per flattened input feature.
    """
    n = in_shape[chan.dim]
    inner = math.prod(in_shape[chan.dim + 1:])
    for k in range(len(out_shape)):
        if out_shape[k] == n and math.prod(out_shape[k + 1:]) == inner:
            return Chan(b.resolve(chan.layer), k)
    layer = b.resolve(chan.layer)
    outer = math.prod(in_shape[:chan.dim])
    untouched = not any(e.in_layer == layer for e in b.edges) and not any(p.layer == layer for p in b.node_params)
    if layer == 0 and untouched:
        for k in range(len(out_shape)):
            if math.prod(out_shape[:k]) == outer and out_shape[k] % n == 0:
                b.layers[0].size = int(out_shape[k])
                return Chan(0, k)
    raise GraphCodecError(
        f"{op.describe()}: reshapes the channel dimension together with other dimensions (e.g. a Linear on "
        "flattened HxW conv features); pool to 1x1 before flattening"
    )


@register_module_handler(tnn.Flatten, tnn.Unflatten)
def _flatten_module(b: Builder, op: Op) -> Chan:
    chan, val = b.chan_arg(op, 0, "input")
    return _reshape_chan(b, op, chan, val.shape, op.out.shape)


# ----------------------------------------------------------------------------------------------------
# Function / method handlers
# ----------------------------------------------------------------------------------------------------

register_function_handler(
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid, F.mish,
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_pool1d, F.avg_pool1d,
    torch.clone, torch.Tensor.contiguous,
    # VGG's "MaxPool only if the network input is 64 high" helper (generate_dataset/models/vgg.py).
    "generate_dataset.models.vgg._pool3_if_input_is_64",
)(_channelwise)
register_method_handler(
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as", "detach",
)(_channelwise)


def _first_tensor_chan(b: Builder, op: Op) -> tuple[Chan, torch.Tensor]:
    for info, val in zip(op.args, op.arg_vals):
        if isinstance(info, Chan):
            return Chan(b.resolve(info.layer), info.dim), val
    return b.chan_arg(op, 0, "input")


@register_function_handler(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
def _reshape_fn(b: Builder, op: Op) -> Chan:
    chan, val = _first_tensor_chan(b, op)
    return _reshape_chan(b, op, chan, val.shape, op.out.shape)


register_method_handler("flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten")(_reshape_fn)


@register_function_handler(torch.permute)
def _permute(b: Builder, op: Op) -> Chan:
    chan, val = _first_tensor_chan(b, op)
    dims = op.arg_vals[1:] if len(op.arg_vals) > 1 else (op.kwarg_vals.get("dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    dims = [d % val.dim() for d in dims]
    return Chan(chan.layer, dims.index(chan.dim))


register_method_handler("permute")(_permute)


@register_function_handler(torch.transpose, torch.swapaxes)
def _transpose(b: Builder, op: Op) -> Chan:
    chan, val = _first_tensor_chan(b, op)
    d0, d1 = (v % val.dim() for v in op.arg_vals[1:3])
    dim = d1 if chan.dim == d0 else d0 if chan.dim == d1 else chan.dim
    return Chan(chan.layer, dim)


register_method_handler("transpose", "swapaxes")(_transpose)


@register_function_handler(torch.mean, torch.sum, torch.amax)
def _reduce(b: Builder, op: Op) -> Chan:
    chan, val = _first_tensor_chan(b, op)
    dims = op.arg_vals[1] if len(op.arg_vals) > 1 else op.kwarg_vals.get("dim")
    keepdim = op.arg_vals[2] if len(op.arg_vals) > 2 else op.kwarg_vals.get("keepdim", False)
    if dims is None:
        raise GraphCodecError(f"{op.describe()}: reduces over all dimensions, including the channels")
    dims = [d % val.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
    if chan.dim in dims:
        raise GraphCodecError(f"{op.describe()}: reduces over the channel dimension")
    shift = 0 if keepdim else sum(d < chan.dim for d in dims)
    return Chan(chan.layer, chan.dim - shift)


register_method_handler("mean", "sum", "amax")(_reduce)


@register_function_handler(operator.getitem)
def _getitem(b: Builder, op: Op) -> Any:
    container = op.args[0]
    if isinstance(container, (tuple, list)):
        return container[op.arg_vals[1]]
    chan, val = b.chan_arg(op, 0)
    index = op.arg_vals[1]
    index = index if isinstance(index, tuple) else (index,)
    consuming = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded: list = []
    for i in index:
        if i is Ellipsis:
            expanded += [slice(None)] * (val.dim() - consuming)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (val.dim() - sum(1 for i in expanded if i is not None))
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        if isinstance(i, torch.Tensor) or isinstance(i, (list, tuple)):
            raise GraphCodecError(f"{op.describe()}: advanced (tensor) indexing of network activations is not supported")
        if in_dim == chan.dim:
            n = val.shape[in_dim]
            if not (isinstance(i, slice) and range(*i.indices(n)) == range(n)):
                raise GraphCodecError(f"{op.describe()}: selects a subset of the channels")
            return Chan(chan.layer, out_dim)
        in_dim += 1
        if isinstance(i, slice):
            out_dim += 1
    raise GraphCodecError(f"{op.describe()}: could not follow the channel dimension through the indexing")


@register_function_handler(torch.cat, torch.concat)
def _cat(b: Builder, op: Op) -> Chan:
    tensors_info = op.args[0] if op.args else op.kwargs["tensors"]
    tensors_val = op.arg_vals[0] if op.arg_vals else op.kwarg_vals["tensors"]
    dim = op.arg_vals[1] if len(op.arg_vals) > 1 else op.kwarg_vals.get("dim", 0)
    chans = [(i, v) for i, v in zip(tensors_info, tensors_val) if isinstance(i, Chan)]
    keys = {(b.resolve(c.layer), c.dim) for c, _ in chans}
    if len(keys) != 1:
        raise GraphCodecError(f"{op.describe()}: concatenates activations of different layers (channel concatenation is not supported)")
    chan, val = chans[0]
    if dim % val.dim() == chan.dim:
        raise GraphCodecError(f"{op.describe()}: concatenates along the channel dimension")
    return Chan(b.resolve(chan.layer), chan.dim)


def _broadcast_chan(b: Builder, op: Op, chan: Chan, val: torch.Tensor) -> Chan:
    out = op.out
    dim = chan.dim + out.dim() - val.dim()
    if out.shape[dim] != b.size(chan.layer):
        raise GraphCodecError(f"{op.describe()}: broadcasting changes the channel dimension")
    return Chan(b.resolve(chan.layer), dim)


@register_function_handler(operator.add, operator.iadd, torch.add)
def _add(b: Builder, op: Op) -> Chan:
    layered = [(i, v) for i, v in zip(op.args, op.arg_vals) if isinstance(i, Chan)]
    if len(layered) == 2 and len(op.args) >= 2 and isinstance(op.args[0], Chan) and isinstance(op.args[1], Chan):
        if "alpha" in op.kwargs:
            raise GraphCodecError(f"{op.describe()}: residual add with alpha is not supported")
        return b.residual_add(op, op.args[0], op.args[1])
    if len(layered) != 1:
        raise GraphCodecError(f"{op.describe()}: unsupported combination of activations")
    # One activation plus an unencoded tensor (e.g. ViT's pos_embedding) or a constant.
    return _broadcast_chan(b, op, *layered[0])


register_method_handler("add", "add_")(_add)


@register_function_handler(operator.mul, operator.imul, operator.truediv, operator.sub, operator.isub,
                           torch.mul, torch.sub, torch.div)
def _arith(b: Builder, op: Op) -> Chan:
    layered = [(i, v) for i, v in zip(op.args, op.arg_vals) if isinstance(i, Chan)]
    if len(layered) != 1:
        raise GraphCodecError(f"{op.describe()}: multiplies/subtracts two network activations (not supported)")
    return _broadcast_chan(b, op, *layered[0])


register_method_handler("mul", "mul_", "sub", "div")(_arith)


@register_method_handler("expand", "expand_as")
def _expand(b: Builder, op: Op) -> Chan:
    chan, val = b.chan_arg(op, 0)
    return _broadcast_chan(b, op, chan, val)
