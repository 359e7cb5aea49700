"""A straightforward PyG implementation of the paper's metanetwork (reference §5.1-5.3).

This is the yardstick for ``nn.metanetwork.MetaNetwork``: the same math written the obvious way, the
way the authors wrote it. Every layer is a PyG ``MessagePassing`` with
``aggr=["mean", "std", "max", "min"]`` (a ``MultiAggregation`` in ``cat`` mode), the per-edge maps
``lin1..lin4`` run on gathered ``[E, h]`` endpoint tensors, and each layer runs twice (once per edge
direction) with the sign inverter on the second pass. Nothing is fused, cached or checkpointed.

Parameter names equal ``MetaNetwork``'s, so ``ref.load_state_dict(ours.state_dict())`` gives the same
function; the benchmark (``benchmarks/metanetwork_speed.py``) and ``tests/test_metanetwork.py`` rely
on that.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as tnn
from torch_geometric.nn import MessagePassing


def _lin_silu(h: int) -> tnn.Sequential:
    return tnn.Sequential(tnn.Linear(h, h), tnn.SiLU())


class ReferenceConv(MessagePassing):
    """The authors' gated layer: ``m_ji = lin2(x_i) * lin1(x_j) * e_ji`` aggregated by
    mean/std/max/min at the target ``i``, then ``downlin``; edge output ``lin3(x_j) * lin4(x_i) * e_ji``.

    Shapes: ``x`` [N, h] (already layer-normed), ``edge_index`` [2, E] (row 0 = source j, row 1 =
    target i), ``edge_attr`` [E, h]. Returns (node update [N, h], edge update [E, h]).
    """

    def __init__(self, hiddim: int):
        super().__init__(aggr=["mean", "std", "max", "min"], flow="source_to_target", node_dim=-2)
        self.lin1 = _lin_silu(hiddim)
        self.lin2 = _lin_silu(hiddim)
        self.lin3 = _lin_silu(hiddim)
        self.lin4 = _lin_silu(hiddim)
        self.downlin = tnn.Linear(4 * hiddim, hiddim)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        out = self.propagate(edge_index, x=x, edge_attr=edge_attr)
        node = self.downlin(out)
        edge = self.lin3(x[edge_index[0]]) * self.lin4(x[edge_index[1]]) * edge_attr
        return node, edge

    def message(self, x_i: Tensor, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        return self.lin2(x_i) * self.lin1(x_j) * edge_attr


def _decoder(hiddim: int, out_dim: int, mid: int | None) -> tnn.Sequential:
    layers: list[tnn.Module] = [tnn.LayerNorm(hiddim, elementwise_affine=False), tnn.Linear(hiddim, hiddim),
                                tnn.SiLU()]
    if mid is None:
        layers.append(tnn.Linear(hiddim, out_dim))
    else:
        layers += [tnn.Linear(hiddim, mid), tnn.SiLU(), tnn.Linear(mid, out_dim)]
    return tnn.Sequential(*layers)


def _encoder(in_dim: int, hiddim: int, mid: int | None) -> tnn.Module:
    if mid is None:
        return tnn.Linear(in_dim, hiddim)
    return tnn.Sequential(tnn.Linear(in_dim, mid), tnn.SiLU(), tnn.Linear(mid, hiddim))


class ReferenceMetaNetwork(tnn.Module):
    """The reference metanetwork; same constructor and graph format as ``nn.metanetwork.MetaNetwork``.

    ``edge_mid_dims`` maps an edge type to the hidden width of its 2-layer encoder / 3-layer decoder
    (the ViT 256-dim patch edges use 64, reference §5.3); other types use one Linear.
    """

    def __init__(self, node_dim: int, edge_dims: Mapping[str, int], num_layer: int, hiddim: int,
                 node_res_ratio: float, edge_res_ratio: float, edge_mid_dims: Mapping[str, int] | None = None,
                 **_ignored):
        super().__init__()
        self.edge_dims = OrderedDict(edge_dims)
        self.node_res_ratio = float(node_res_ratio)
        self.edge_res_ratio = float(edge_res_ratio)
        mids = dict(edge_mid_dims or {})
        self.node_enc = tnn.Linear(node_dim, hiddim)
        self.edge_enc = tnn.ModuleDict({t: _encoder(d, hiddim, mids.get(t)) for t, d in self.edge_dims.items()})
        self.convs = tnn.ModuleList([ReferenceConv(hiddim) for _ in range(num_layer)])
        self.node_dec = _decoder(hiddim, node_dim, None)
        self.edge_dec = tnn.ModuleDict({t: _decoder(hiddim, d, mids.get(t)) for t, d in self.edge_dims.items()})
        inv = torch.ones(hiddim)
        inv[hiddim // 2:] = -1.0
        self.register_buffer("inv", inv)

    def forward(self, graph):
        x, edge_index = graph.x, graph.edge_index
        edge_type = graph.edge_type
        E = edge_index.size(1)
        h = self.node_enc(x)
        e = x.new_zeros(E, h.size(1))
        masks = {}
        for k, t in enumerate(self.edge_dims):
            masks[t] = edge_type == k
            e = e.masked_scatter(masks[t].unsqueeze(1), self.edge_enc[t](graph[f"edge_attr__{t}"]))
        rev = edge_index.flip(0)
        for conv in self.convs:
            hn = F.layer_norm(h, (h.size(1),))
            n1, e1 = conv(hn, edge_index, e)
            n2, e2 = conv(hn, rev, self.inv * e)
            h = h + n1 + n2
            e = e + e1 + self.inv * e2
        out = copy.copy(graph)
        out.x = x + self.node_res_ratio * self.node_dec(h)
        for t in self.edge_dims:
            attr = graph[f"edge_attr__{t}"]
            out[f"edge_attr__{t}"] = attr + self.edge_res_ratio * self.edge_dec[t](e[masks[t]])
        return out
