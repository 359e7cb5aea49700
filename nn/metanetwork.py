"""The graph metanetwork of "Meta Pruning via Graph Metanetworks" (reference §5), made fast.

``MetaNetwork`` maps a network graph (format: ``nn/graph.py`` / the project's graph-format note) to a
graph of identical shapes whose features are new weights: ``new = old + ratio * decoder(...)``.

The math is exactly the authors' (reference §5.1-5.3), for any ordered set of edge types:

* ``h = node_enc(x)`` [N, H]; ``e[edge_type == t] = edge_enc[t](edge_attr__t)`` [E, H];
  ``inv`` = +1 on the first floor(H/2) channels, -1 on the rest.
* per layer, with ``hn = LayerNorm(h)`` (no affine) shared by both passes and ``s = edge_index[0]``,
  ``t = edge_index[1]``:

  - pass 1 on the edges as stored (source s, target t): message ``lin2(hn_t) * lin1(hn_s) * e``,
    aggregated at t by [mean, std, max, min] then ``downlin`` -> n1; edge output
    ``e1 = lin3(hn_s) * lin4(hn_t) * e``;
  - pass 2 on the reversed edges with ``inv * e`` and the same weights -> n2, e2;
  - ``h <- h + n1 + n2`` and ``e <- e + e1 + inv * e2``.

  ``lin1..lin4`` are Linear(H, H) + SiLU; std follows PyG 2.8 (``sqrt(clamp(var, 1e-5))``, values
  ``<= sqrt(1e-5)`` set to 0) and empty neighbourhoods give 0 for every statistic.
* decoders LayerNorm(no affine) -> Linear(H, H) -> SiLU -> Linear(H, out) (a wider tail for types in
  ``edge_mid_dims``, e.g. the ViT 256-dim patch edges).

How it is made fast (the straightforward version is ``benchmarks/reference_metanetwork.py``):

1. ``lin1..lin4`` act on the N node states once per layer instead of on 2E gathered endpoints
   (both passes share them: pass 2 only swaps which endpoint reads lin1/lin2 and lin3/lin4).
2. Pass 2's sign inverter is moved off the edges: ``inv`` is +-1 per channel, so the pass-2 statistics
   of ``inv * r`` are ``inv * sum r``, ``sum r^2`` and max/min swapped on the negative channels, and
   ``e + e1 + inv * e2 = e + (L3_s L4_t) e + (L3_t L4_s) e`` exactly (sign flips are exact in float).
3. All per-edge work of a layer (both passes' messages, their sum / sum of squares / max / min, and
   the edge update) runs in one ``torch.autograd.Function`` that walks the edges in cache-sized chunks
   with preallocated buffers and saves only its inputs; the backward recomputes the messages chunk by
   chunk. A layer therefore keeps a single [E, H] tensor (its input ``e``) for backward, and the only
   [E, H] tensors allocated are the outputs ``e_new`` and its gradient (large fresh allocations are
   slow on CPU: every page faults). Both passes are reduced by one ``index_add_`` and one
   ``scatter_reduce_`` per chunk (max of ``(r, -r)`` gives max and min).
4. On CPU the edges are split into one contiguous range per torch thread, each run by a Python thread
   with single-threaded torch ops (see ``_single_threaded_ops``); results are deterministic for a
   given thread count. On GPU one range, larger chunks.
5. Edge decoders run chunk by chunk under activation checkpointing (option ``checkpoint``).

The layer is a PyG ``MessagePassing`` subclass; ``fused=False`` runs the same math through PyG's
``propagate``/``edge_updater`` (differentiable to any order; per-layer checkpointing applies there).
torch_scatter is not used (and not needed): the kernel relies only on torch's ``index_add_`` and
``scatter_reduce_``, whose contiguous fast paths it is laid out for.

Caveats: the fused backward is first-order only (``once_differentiable``: a second ``.backward()``
through it raises; use ``fused=False`` for higher-order gradients), and on CPU
the kernel briefly sets ``torch.set_num_threads(1)`` while its worker threads run, so do not run
other torch work in parallel Python threads of the same process during a forward/backward.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn as tnn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint as _checkpoint
from torch_geometric.nn import MessagePassing

__all__ = ["MetaNetwork", "GatedMultiAggrConv"]

_STD_EPS = 1e-5  # PyG StdAggregation's clamp value
# CPU: a [chunk, H] float32 tile of ~256 KiB keeps a chunk's dozen tiles in L2/L3 cache.
_CPU_CHUNK_ELEMS = 1 << 16
# GPU: few, large chunks: kernel launches and atomics dominate small ones. Measured on an H100
# (fwd+bwd, 8 layers): 1 << 22 elements per tile gave ResNet56 84 ms / 1.2 GB and VGG19 0.49 s / 3.8 GB,
# 1 << 24 gave 75 ms / 1.9 GB and 0.42 s / 5.8 GB (the reference: 76-111 ms / 9.2 GB on ResNet56).
_GPU_CHUNK_ELEMS = 1 << 24
_DECODER_CHUNK_ROWS = 1 << 15
_AUTO_CHECKPOINT_ELEMS = 1 << 22  # E * H above which checkpoint="auto" turns on


def _lin_silu(h: int) -> tnn.Sequential:
    return tnn.Sequential(tnn.Linear(h, h), tnn.SiLU())


# --------------------------------------------------------------------------------------------------
# Per-graph index data, computed once per forward and shared by all layers.
# --------------------------------------------------------------------------------------------------
@dataclass
class _EdgeIndexData:
    """Index tensors of one graph. ``s = edge_index[0]`` (pass-1 source, pass-2 target) and
    ``t = edge_index[1]`` (pass-1 target, pass-2 source), both [E]."""

    num_nodes: int
    num_edges: int
    ts_rows: Tensor  # [2E] long: (t, s + N) per edge, rows of [pass-1 table; pass-2 table] ([2N, ...])
    st_rows: Tensor  # [2E] long: (s, t + N) per edge
    s: Tensor
    t: Tensor
    deg: Tensor  # [2, N, 1] float: (pass-1, pass-2) number of messages, clamped to >= 1 (PyG's mean)
    empty: Tensor  # [2, N, 1] bool: no message in that pass
    chunk: int  # edges per chunk in the fused kernel

    @classmethod
    def build(cls, edge_index: Tensor, num_nodes: int, hiddim: int, dtype: torch.dtype,
              chunk: int | None) -> "_EdgeIndexData":
        N = num_nodes
        s = edge_index[0].contiguous()
        t = edge_index[1].contiguous()
        cnt = torch.stack([torch.bincount(t, minlength=N), torch.bincount(s, minlength=N)], dim=0)
        cnt = cnt.to(dtype).unsqueeze(2)
        if chunk is None:
            elems = _CPU_CHUNK_ELEMS if edge_index.device.type == "cpu" else _GPU_CHUNK_ELEMS
            chunk = max(1, elems // hiddim)
        return cls(N, s.numel(), torch.stack([t, s + N], dim=1).view(-1),
                   torch.stack([s, t + N], dim=1).view(-1), s, t, cnt.clamp(min=1), cnt == 0, int(chunk))


# --------------------------------------------------------------------------------------------------
# Running edge ranges in parallel on CPU.
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _single_threaded_ops():
    """torch ops on one thread each while the kernel's own worker threads run.

    The kernel works on small cache-sized chunks; with torch's intra-op threads every small op is a
    fork/join barrier, which collapses when the cores are shared with other processes (measured: 20x
    slower forward passes). Threads that each own a range of edges have no such barrier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _edge_ranges(idx: "_EdgeIndexData", device: torch.device) -> list[tuple[int, int]]:
    """Contiguous edge ranges processed by separate threads (one per torch thread on CPU, at least
    4 chunks each); a single range on GPU. Deterministic for a given thread count."""
    E, C = idx.num_edges, idx.chunk
    workers = 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), E // (4 * C)))
    step = -(-E // workers) if E else 1
    step = -(-step // C) * C  # ranges on chunk boundaries
    return [(a, min(a + step, E)) for a in range(0, E, step)] or [(0, 0)]


def _map_ranges(fn, ranges: list[tuple[int, int]]) -> list:
    """``[fn(a, b) for (a, b) in ranges]``, the ranges on separate threads (autograd off in each: the
    kernel's tensors are plain buffers and grad mode is thread-local)."""
    def run(r):
        with torch.no_grad():
            return fn(*r)

    if len(ranges) == 1:
        return [run(ranges[0])]
    with _single_threaded_ops(), ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        return list(pool.map(run, ranges))


# --------------------------------------------------------------------------------------------------
# The fused per-edge kernel of one layer.
# --------------------------------------------------------------------------------------------------
def _swap_pairs(L: Tensor, H: int) -> Tensor:
    """[A | B | C | D] -> [B | A | D | C] on the last dim (4 groups of H)."""
    return L.view(-1, 2, 2, H).flip(2).reshape(L.shape)


class _FusedLayerEdges(torch.autograd.Function):
    """All per-edge work of one layer, both directions, chunk by chunk.

    Inputs: ``L`` [N, 4H] = [L1 | L2 | L3 | L4] (SiLU outputs of lin1..lin4 on the normed node states),
    ``e`` [E, H], the index data. With pass-1 messages ``r1 = (L1[s] * L2[t]) * e`` (reduced at t) and
    pass-2 messages before the sign inverter ``r2 = (L2[s] * L1[t]) * e`` (reduced at s), returns

    * ``sq`` [2, N, 2, H]: ``sq[p, n] = (sum r_p, sum r_p^2)`` over the messages of pass p reaching n;
    * ``mx``, ``mn`` [2, N, H]: max / min of those messages, 0 where there is none;
    * ``e_new`` [E, H] = ``(e + (L3[s] * L4[t]) * e) + (L4[s] * L3[t]) * e``.

    Every product uses the reference's association order, so results equal it up to the order of the
    sums. The max/min gradient is split evenly among tied messages (torch ``scatter_reduce``
    semantics, which the PyG reference uses on CPU). Saves only ``L``, ``e`` and [N, ...] statistics;
    the backward recomputes the messages.
    """

    # Under autocast the kernel computes in float32 (its sums of squares overflow or lose the std in
    # half precision): inputs are cast up and autocast is off inside, on either device type.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, L: Tensor, e: Tensor, idx: _EdgeIndexData):
        N, H = idx.num_nodes, e.size(1)
        Lsw = _swap_pairs(L, H)  # gathered at t: [L2 | L1 | L4 | L3]
        e_new = torch.empty_like(e)
        parts = _map_ranges(lambda a, b: _forward_range(L, Lsw, e, e_new, idx, a, b), _edge_ranges(idx, e.device))
        acc, ext = parts[0]
        for acc_k, ext_k in parts[1:]:
            acc += acc_k
            torch.maximum(ext, ext_k, out=ext)
        ext = ext.view(2, N, 2, H)
        mx = ext[:, :, 0].masked_fill(idx.empty, 0.0)
        mn = torch.neg(ext[:, :, 1]).masked_fill_(idx.empty, 0.0)
        ctx.save_for_backward(L, e, mx, mn)
        ctx.idx = idx
        return acc.view(2, N, 2, H), mx, mn, e_new

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.amp.custom_bwd(device_type="cpu")
    @once_differentiable
    def backward(ctx, g_sq, g_mx, g_mn, g_e_new):
        L, e, mx, mn = ctx.saved_tensors
        idx: _EdgeIndexData = ctx.idx
        N, H = idx.num_nodes, e.size(1)
        zeros = L.new_zeros(2, N, H)
        if g_sq is None:
            g_sq = L.new_zeros(2, N, 2, H)
        g_mx = zeros if g_mx is None else g_mx
        g_mn = zeros if g_mn is None else g_mn
        # Node-side terms, rows [pass 1 per node; pass 2 per node]: [gS | 2 gQ | gMax | gMin | max | min]
        G = torch.stack([g_sq[:, :, 0], 2 * g_sq[:, :, 1], g_mx, g_mn, mx, mn], dim=2).view(2 * N, 6, H)
        Lsw = _swap_pairs(L, H)
        ge = torch.empty_like(e)
        ranges = _edge_ranges(idx, e.device)
        parts = _map_ranges(lambda a, b: _backward_range(L, Lsw, e, idx, G, g_e_new, ge, True, a, b), ranges)
        gacc, cnt = parts[0]
        for gacc_k, cnt_k in parts[1:]:
            gacc += gacc_k
            cnt += cnt_k
        # The sweep gave every tied max/min message the whole gradient; take (1 - 1/k) of it back from
        # each of the k tied ones. Ties are rare, so this second sweep seldom runs.
        tied = cnt > 1.5
        if bool(tied.any()):
            scale = torch.where(tied, 1.0 / cnt.clamp(min=1) - 1.0, torch.zeros_like(cnt))
            Gc = G.clone()
            Gc[:, :2] = 0
            Gc[:, 2:4] *= scale
            for gacc_k, _ in _map_ranges(lambda a, b: _backward_range(L, Lsw, e, idx, Gc, None, ge, False, a, b),
                                         ranges):
                gacc += gacc_k
        # rows N..2N hold the t-side gradients in swapped column order
        gL = gacc[:N] + _swap_pairs(gacc[N:], H)
        return gL, ge, None


def _forward_range(L: Tensor, Lsw: Tensor, e: Tensor, e_new: Tensor, idx: _EdgeIndexData, a0: int,
                   b0: int) -> tuple[Tensor, Tensor]:
    """Forward over edges [a0, b0): writes ``e_new[a0:b0]``, returns the partial statistics
    ``acc`` [2N, 2H] = (sum r, sum r^2) and ``ext`` [2N, 2H] = (max r, max -r); rows are
    [pass 1 per node; pass 2 per node]. Every chunk reduces both passes in one call on a contiguous
    [2c, 2H] source (the fast path of ``index_add_`` / ``scatter_reduce_``)."""
    N, H, C = idx.num_nodes, e.size(1), idx.chunk
    acc = L.new_zeros(2 * N, 2 * H)
    ext = L.new_full((2 * N, 2 * H), -math.inf)
    C0 = max(0, min(C, b0 - a0))
    sq_buf = L.new_empty(C0, 2, 2, H)  # per edge, per pass: (r, r^2)
    ext_buf = L.new_empty(C0, 2, 2, H)  # per edge, per pass: (r, -r)
    edge_buf = L.new_empty(C0, 2, H)  # (P e, R e)
    Ls_buf, Lt_buf = L.new_empty(C0, 4 * H), L.new_empty(C0, 4 * H)
    for a in range(a0, b0, C):
        b = min(a + C, b0)
        c = b - a
        ec = e[a:b]
        Ls = torch.index_select(L, 0, idx.s[a:b], out=Ls_buf[:c]).view(c, 2, 2, H)  # ((L1s, L2s), (L3s, L4s))
        Lt = torch.index_select(Lsw, 0, idx.t[a:b], out=Lt_buf[:c]).view(c, 2, 2, H)  # ((L2t, L1t), (L4t, L3t))
        sqb, exb, edb = sq_buf[:c], ext_buf[:c], edge_buf[:c]
        r = sqb[:, :, 0]
        torch.mul(Ls[:, 0], Lt[:, 0], out=r)  # (L1s L2t, L2s L1t)
        r.mul_(ec.unsqueeze(1))
        torch.mul(r, r, out=sqb[:, :, 1])
        exb[:, :, 0].copy_(r)
        torch.neg(r, out=exb[:, :, 1])
        rows = idx.ts_rows[2 * a:2 * b]
        acc.index_add_(0, rows, sqb.view(2 * c, 2 * H))
        ext.scatter_reduce_(0, rows.unsqueeze(1).expand(2 * c, 2 * H), exb.view(2 * c, 2 * H), "amax")
        torch.mul(Ls[:, 1], Lt[:, 1], out=edb)  # (L3s L4t, L4s L3t)
        edb.mul_(ec.unsqueeze(1))
        out = e_new[a:b]
        torch.add(ec, edb[:, 0], out=out)
        out.add_(edb[:, 1])
    return acc, ext


def _backward_range(L: Tensor, Lsw: Tensor, e: Tensor, idx: _EdgeIndexData, G: Tensor, g_e_new: Tensor | None,
                    ge: Tensor, first: bool, a0: int, b0: int) -> tuple[Tensor, Tensor | None]:
    """Backward over edges [a0, b0) (see ``_FusedLayerEdges.backward``).

    ``G`` [2N, 6, H]: node-side terms, rows [pass 1 at t; pass 2 at s]. Writes (``first``) or adds
    ``ge[a0:b0]``. Returns ``gacc`` [2N, 4H] (rows s: d[L1|L2|L3|L4]; rows N + t: d[L2|L1|L4|L3]) and,
    with ``first``, per (pass, node, channel) the number of messages equal to the max and to the min,
    [2N, 2, H].
    """
    N, H, C = idx.num_nodes, e.size(1), idx.chunk
    max_min_sign = L.new_tensor([1.0, -1.0]).view(1, 1, 2, 1)
    cnt = L.new_zeros(2 * N, 2, H) if first else None
    with_edge = g_e_new is not None
    width = 4 * H if with_edge else 2 * H
    gacc = L.new_zeros(2 * N, 4 * H)
    # per-chunk work buffers, allocated once per range (fresh allocations cost page faults)
    C0 = max(0, min(C, b0 - a0))
    tiles = L.new_empty(C0, 2, width)  # (at s, at t)
    Ls_buf, Lt_buf = L.new_empty(C0, 4 * H), L.new_empty(C0, 4 * H)
    G_buf = L.new_empty(2 * C0, 6, H)
    p_buf, r_buf, gr_buf, pr_buf = (L.new_empty(C0, 2, H) for _ in range(4))
    hit_buf = L.new_empty(C0, 2, 2, H)
    f_buf, gE_buf = L.new_empty(C0, H), L.new_empty(C0, 1, H)
    for a in range(a0, b0, C):
        b = min(a + C, b0)
        c = b - a
        ec = e[a:b].view(c, 1, H)
        Ls = torch.index_select(L, 0, idx.s[a:b], out=Ls_buf[:c]).view(c, 2, 2, H)  # ((L1s, L2s), (L3s, L4s))
        Lt = torch.index_select(Lsw, 0, idx.t[a:b], out=Lt_buf[:c]).view(c, 2, 2, H)  # ((L2t, L1t), (L4t, L3t))
        rows = idx.ts_rows[2 * a:2 * b]
        Gc = torch.index_select(G, 0, rows, out=G_buf[:2 * c]).view(c, 2, 6, H)
        p = torch.mul(Ls[:, 0], Lt[:, 0], out=p_buf[:c])  # (p1, p2) = (L1s L2t, L2s L1t)
        r = torch.mul(p, ec, out=r_buf[:c])  # messages (r1, r2)
        gr = torch.addcmul(Gc[:, :, 0], r, Gc[:, :, 1], out=gr_buf[:c])  # gS + r * 2gQ
        # hit = 1 where the message equals the max (resp. min), else 0. Float arithmetic instead of
        # `==` (bool tensors are several times slower on CPU): sign(r - max) is -1 or 0,
        # sign(r - min) is 0 or 1.
        hit = torch.sub(r.unsqueeze(2), Gc[:, :, 4:6], out=hit_buf[:c])  # [c, 2, 2(max, min), H]
        hit.sign_().mul_(max_min_sign).add_(1.0)
        if first:
            cnt.index_add_(0, rows, hit.view(2 * c, 2, H))
        hit.mul_(Gc[:, :, 2:4])
        gr += hit[:, :, 0]
        gr += hit[:, :, 1]
        ge_c = ge[a:b]
        p.mul_(gr)
        if first:
            torch.add(p[:, 0], p[:, 1], out=ge_c)
        else:
            ge_c += p[:, 0]
            ge_c += p[:, 1]
        gr.mul_(ec)  # d r / d(one endpoint factor) = gr * e * (the other factor)
        ts_, tt_ = tiles[:c, 0], tiles[:c, 1]
        torch.mul(gr, Lt[:, 0], out=ts_[:, :2 * H].view(c, 2, H))  # at s: d L1 (pass 1), d L2 (pass 2)
        torch.mul(gr, Ls[:, 0], out=tt_[:, :2 * H].view(c, 2, H))  # at t: d L2 (pass 1), d L1 (pass 2)
        if with_edge:
            g = g_e_new[a:b]
            PR = torch.mul(Ls[:, 1], Lt[:, 1], out=pr_buf[:c])  # (P, R) = (L3s L4t, L4s L3t)
            f = torch.add(PR[:, 0], PR[:, 1], out=f_buf[:c])
            f += 1.0
            ge_c.addcmul_(g, f)  # e_new = e (1 + P + R)
            gE = torch.mul(g.unsqueeze(1), ec, out=gE_buf[:c])
            torch.mul(gE, Lt[:, 1], out=ts_[:, 2 * H:].view(c, 2, H))  # at s: d L3, d L4
            torch.mul(gE, Ls[:, 1], out=tt_[:, 2 * H:].view(c, 2, H))  # at t: d L4, d L3
        gacc[:, :width].index_add_(0, idx.st_rows[2 * a:2 * b], tiles[:c].view(2 * c, width))
    return gacc, cnt


# --------------------------------------------------------------------------------------------------
# The layer.
# --------------------------------------------------------------------------------------------------
class GatedMultiAggrConv(MessagePassing):
    """One metanetwork layer (reference §5.1), run in both edge directions with shared weights.

    ``forward(h, e, edge_index, idx, inv, fused)`` with ``h`` [N, H] node states, ``e`` [E, H] edge
    states, ``edge_index`` [2, E], ``inv`` [H] the sign inverter; returns the new ``(h, e)``:
    ``h + n1 + n2`` and ``e + e1 + inv * e2`` (see the module docstring).

    PyG view: ``message(l1_j, l2_i, e) = l2_i * l1_j * e`` aggregated by mean/std/max/min
    (``flow="source_to_target"``: j = ``edge_index[0]``, i = ``edge_index[1]``) and
    ``edge_update(l3_j, l4_i, e) = l3_j * l4_i * e``. ``fused=True`` computes exactly that with the
    chunked kernel ``_FusedLayerEdges``; ``fused=False`` goes through ``propagate``.
    """

    def __init__(self, hiddim: int):
        super().__init__(aggr=["mean", "std", "max", "min"], flow="source_to_target", node_dim=-2)
        self.hiddim = hiddim
        self.lin1 = _lin_silu(hiddim)
        self.lin2 = _lin_silu(hiddim)
        self.lin3 = _lin_silu(hiddim)
        self.lin4 = _lin_silu(hiddim)
        self.downlin = tnn.Linear(4 * hiddim, hiddim)

    # PyG message-passing hooks (used by the unfused path) --------------------------------------
    def message(self, l1_j: Tensor, l2_i: Tensor, e: Tensor) -> Tensor:
        return l2_i * l1_j * e

    def edge_update(self, l3_j: Tensor, l4_i: Tensor, e: Tensor) -> Tensor:
        return l3_j * l4_i * e

    # ---------------------------------------------------------------------------------------------
    def forward(self, h: Tensor, e: Tensor, edge_index: Tensor, idx: _EdgeIndexData, inv: Tensor,
                fused: bool = True) -> tuple[Tensor, Tensor]:
        hn = F.layer_norm(h, (h.size(1),))
        L1, L2, L3, L4 = self.lin1(hn), self.lin2(hn), self.lin3(hn), self.lin4(hn)
        if not fused:
            rev = edge_index.flip(0)
            size = (h.size(0), h.size(0))
            agg1 = self.propagate(edge_index, l1=L1, l2=L2, e=e, size=size)
            e1 = self.edge_updater(edge_index, l3=L3, l4=L4, e=e, size=size)
            e_inv = inv * e
            agg2 = self.propagate(rev, l1=L1, l2=L2, e=e_inv, size=size)
            e2 = self.edge_updater(rev, l3=L3, l4=L4, e=e_inv, size=size)
            return h + self.downlin(agg1) + self.downlin(agg2), e + e1 + inv * e2

        L = torch.cat([L1, L2, L3, L4], dim=1)
        sq, mx, mn, e_new = _FusedLayerEdges.apply(L, e, idx)
        # pass 2 aggregated inv * r2: its sums flip sign and its max/min swap and flip where inv < 0
        pos = inv > 0
        agg1 = _stats(sq[0, :, 0], sq[0, :, 1], mx[0], mn[0], idx.deg[0])
        agg2 = _stats(sq[1, :, 0] * inv, sq[1, :, 1], torch.where(pos, mx[1], -mn[1]), torch.where(pos, mn[1], -mx[1]),
                      idx.deg[1])
        return h + self.downlin(agg1) + self.downlin(agg2), e_new


def _stats(msum: Tensor, msq: Tensor, mmax: Tensor, mmin: Tensor, deg: Tensor) -> Tensor:
    """[mean | std | max | min] from sums, exactly as PyG's fused mean/std aggregation; [N, 4H]."""
    mean = msum / deg
    var = msq / deg - mean * mean
    std = var.clamp(min=_STD_EPS).sqrt()
    std = std.masked_fill(std <= math.sqrt(_STD_EPS), 0.0)
    return torch.cat([mean, std, mmax, mmin], dim=1)


# --------------------------------------------------------------------------------------------------
# Encoders / decoders.
# --------------------------------------------------------------------------------------------------
def _decoder(hiddim: int, out_dim: int, mid: int | None) -> tnn.Sequential:
    layers: list[tnn.Module] = [tnn.LayerNorm(hiddim, elementwise_affine=False), tnn.Linear(hiddim, hiddim),
                                tnn.SiLU()]
    if mid is None:
        layers.append(tnn.Linear(hiddim, out_dim))
    else:  # reference §5.3 ViT patch decoder: ... -> Linear(H, mid) -> SiLU -> Linear(mid, out)
        layers += [tnn.Linear(hiddim, mid), tnn.SiLU(), tnn.Linear(mid, out_dim)]
    return tnn.Sequential(*layers)


def _encoder(in_dim: int, hiddim: int, mid: int | None) -> tnn.Module:
    if mid is None:
        return tnn.Linear(in_dim, hiddim)
    return tnn.Sequential(tnn.Linear(in_dim, mid), tnn.SiLU(), tnn.Linear(mid, hiddim))


def _residual_decode(dec: tnn.Module, z: Tensor, old: Tensor, ratio: float) -> Tensor:
    return old + ratio * dec(z)


# --------------------------------------------------------------------------------------------------
# The metanetwork.
# --------------------------------------------------------------------------------------------------
class MetaNetwork(tnn.Module):
    """Graph metanetwork: ``forward(graph) -> graph`` with identical shapes.

    Args:
        node_dim: node feature size (``codec.node_dim``).
        edge_dims: ordered mapping edge type -> feature size (``codec.edge_dims``); ``edge_type == k``
            refers to the k-th key; features of type ``t`` are ``graph.edge_attr__<t>`` [E_t, d_t].
        num_layer, hiddim: trunk depth and width H.
        node_res_ratio, edge_res_ratio: ``new = old + ratio * decoder(...)``.
        edge_mid_dims: optional {edge type: width}: that type's encoder becomes
            Linear(d, w) -> SiLU -> Linear(w, H) and its decoder ends Linear(H, w) -> SiLU -> Linear(w, d)
            (the ViT patch edges, reference §5.3).
        fused: use the chunked fused kernel (default); ``False`` runs the same math through PyG's
            ``propagate`` (slow, memory hungry, but differentiable to any order).
        checkpoint: ``True``/``False``/``"auto"``: activation checkpointing of the edge decoders (chunk by
            chunk) and, with ``fused=False``, of every layer. ``"auto"`` turns it on when gradients are
            being recorded and E * H >= 2**22.
        edge_chunk: edges per chunk in the fused kernel (default: ~256 KiB tiles on CPU, large on GPU).
        zero_init_decoders: start the last layer of every decoder at zero, so the untrained metanetwork
            returns its input unchanged (not in the reference, whose decoders start random; off by default).

    Parameter names match ``benchmarks/reference_metanetwork.py`` (``node_enc``, ``edge_enc.<t>``,
    ``convs.<l>.lin1..lin4/downlin``, ``node_dec``, ``edge_dec.<t>``) and every parameter is used.
    """

    def __init__(self, node_dim: int, edge_dims: Mapping[str, int], num_layer: int, hiddim: int,
                 node_res_ratio: float, edge_res_ratio: float, edge_mid_dims: Mapping[str, int] | None = None,
                 fused: bool = True, checkpoint: bool | str = "auto", edge_chunk: int | None = None,
                 zero_init_decoders: bool = False):
        super().__init__()
        edge_dims = OrderedDict((str(k), int(v)) for k, v in dict(edge_dims).items())
        if not edge_dims:
            raise ValueError("MetaNetwork: edge_dims is empty; pass codec.edge_dims (edge type -> feature size)")
        for name, d in edge_dims.items():
            if not name or "." in name or d < 1:
                raise ValueError(f"MetaNetwork: edge type {name!r} with size {d} is invalid; type names must be "
                                 "non-empty without '.', sizes >= 1 (check codec.edge_dims)")
        mids = dict(edge_mid_dims or {})
        unknown = set(mids) - set(edge_dims)
        if unknown:
            raise ValueError(f"MetaNetwork: edge_mid_dims names unknown edge types {sorted(unknown)}; "
                             f"known: {list(edge_dims)} (fix configs/metanetwork/*.yaml)")
        if int(num_layer) < 0 or int(hiddim) < 1:
            raise ValueError(f"MetaNetwork: num_layer={num_layer}, hiddim={hiddim} must be >= 0 and >= 1")
        if checkpoint not in (True, False, "auto"):
            raise ValueError(f"MetaNetwork: checkpoint={checkpoint!r}; use true, false or auto")
        self.node_dim = int(node_dim)
        self.edge_dims = edge_dims
        self.hiddim = int(hiddim)
        self.node_res_ratio = float(node_res_ratio)
        self.edge_res_ratio = float(edge_res_ratio)
        self.fused = bool(fused)
        self.checkpoint = checkpoint
        self.edge_chunk = None if edge_chunk is None else int(edge_chunk)

        self.node_enc = tnn.Linear(self.node_dim, self.hiddim)
        self.edge_enc = tnn.ModuleDict({t: _encoder(d, self.hiddim, mids.get(t)) for t, d in edge_dims.items()})
        self.convs = tnn.ModuleList([GatedMultiAggrConv(self.hiddim) for _ in range(int(num_layer))])
        self.node_dec = _decoder(self.hiddim, self.node_dim, None)
        self.edge_dec = tnn.ModuleDict({t: _decoder(self.hiddim, d, mids.get(t)) for t, d in edge_dims.items()})
        inv = torch.ones(self.hiddim)
        inv[self.hiddim // 2:] = -1.0
        self.register_buffer("inv", inv)
        if zero_init_decoders:
            # the untrained metanetwork is then exactly the identity (new = old): a large residual ratio no
            # longer means a large random perturbation of the data model at the first step
            for dec in [self.node_dec, *self.edge_dec.values()]:
                tnn.init.zeros_(dec[-1].weight)
                tnn.init.zeros_(dec[-1].bias)

    # ---------------------------------------------------------------------------------------------
    def _check(self, graph) -> tuple[Tensor, Tensor, Tensor | None, list[Tensor]]:
        x = getattr(graph, "x", None)
        edge_index = getattr(graph, "edge_index", None)
        if x is None or edge_index is None:
            raise ValueError("MetaNetwork.forward: the graph needs `x` [N, node_dim] and `edge_index` [2, E] "
                             "(encode the model with nn.graph.GraphCodec)")
        if x.dim() != 2 or x.size(1) != self.node_dim:
            raise ValueError(f"MetaNetwork.forward: graph.x has shape {tuple(x.shape)}, expected [N, {self.node_dim}]"
                             " (node_dim must be codec.node_dim)")
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"MetaNetwork.forward: graph.edge_index has shape {tuple(edge_index.shape)}, "
                             "expected [2, E]")
        E = edge_index.size(1)
        edge_type = getattr(graph, "edge_type", None)
        if edge_type is None and len(self.edge_dims) > 1:
            raise ValueError("MetaNetwork.forward: graph.edge_type is missing but edge_dims has several types "
                             f"{list(self.edge_dims)}")
        if edge_type is not None and edge_type.shape != (E,):
            raise ValueError(f"MetaNetwork.forward: graph.edge_type has shape {tuple(edge_type.shape)}, "
                             f"expected [{E}]")
        attrs = []
        for t, d in self.edge_dims.items():
            key = f"edge_attr__{t}"
            a = getattr(graph, key, None)
            if a is None:
                raise ValueError(f"MetaNetwork.forward: graph has no `{key}` for edge type {t!r} (edge_dims "
                                 f"{dict(self.edge_dims)} must equal the codec's)")
            if a.dim() != 2 or a.size(1) != d:
                raise ValueError(f"MetaNetwork.forward: graph.{key} has shape {tuple(a.shape)}, expected "
                                 f"[E_{t}, {d}]")
            attrs.append(a)
        return x, edge_index, edge_type, attrs

    def _use_checkpoint(self, E: int) -> bool:
        if not torch.is_grad_enabled():
            return False
        if self.checkpoint == "auto":
            return E * self.hiddim >= _AUTO_CHECKPOINT_ELEMS
        return bool(self.checkpoint)

    def forward(self, graph):
        """``graph``: a PyG ``Data``/``Batch`` in the shared format. Returns a shallow copy of it with
        ``x`` [N, node_dim] and every ``edge_attr__<t>`` [E_t, d_t] replaced by ``old + ratio * delta``;
        ``edge_index``, ``edge_type`` and every other attribute are the input's."""
        x, edge_index, edge_type, attrs = self._check(graph)
        N, E, H = x.size(0), edge_index.size(1), self.hiddim
        use_ckpt = self._use_checkpoint(E)

        # Edge positions of each type. Fast path: types stored in contiguous blocks in type order.
        if len(attrs) == 1:
            pos = None
            if edge_type is not None and edge_type.numel() and bool((edge_type != 0).any()):
                raise ValueError("MetaNetwork.forward: graph.edge_type has values other than 0 but edge_dims "
                                 f"has one type {list(self.edge_dims)}")
            if attrs[0].size(0) != E:
                raise ValueError(f"MetaNetwork.forward: {attrs[0].size(0)} edge features for {E} edges")
        else:
            counts = torch.bincount(edge_type, minlength=len(attrs))
            if counts.numel() > len(attrs):
                raise ValueError(f"MetaNetwork.forward: graph.edge_type has values >= {len(attrs)} "
                                 f"(edge_dims {list(self.edge_dims)})")
            for (t, a), n in zip(zip(self.edge_dims, attrs), counts.tolist()):
                if a.size(0) != n:
                    raise ValueError(f"MetaNetwork.forward: graph.edge_attr__{t} has {a.size(0)} rows but "
                                     f"{n} edges have that type")
            grouped = E == 0 or bool((edge_type[1:] >= edge_type[:-1]).all())
            pos = None if grouped else torch.argsort(edge_type, stable=True)

        h = self.node_enc(x)
        encoded = [enc(a) for enc, a in zip(self.edge_enc.values(), attrs)]
        e = encoded[0] if len(encoded) == 1 else torch.cat(encoded, dim=0)
        if pos is not None:  # rows are grouped by type; scatter them back to edge order
            e = e.index_select(0, torch.argsort(pos))
        e = e.contiguous()

        idx = _EdgeIndexData.build(edge_index, N, H, h.dtype, self.edge_chunk) if self.fused else None
        for conv in self.convs:
            if use_ckpt and not self.fused:
                h, e = _checkpoint(conv, h, e, edge_index, idx, self.inv, False, use_reentrant=False)
            else:
                h, e = conv(h, e, edge_index, idx, self.inv, self.fused)

        out = copy.copy(graph)
        out.x = x + self.node_res_ratio * self.node_dec(h)
        # per-type edge states, in each type's row order
        if pos is None:
            sizes = [a.size(0) for a in attrs]
            e_types = torch.split(e, sizes, dim=0)
        else:
            e_sorted = e.index_select(0, pos)
            e_types = torch.split(e_sorted, [a.size(0) for a in attrs], dim=0)
        for (t, dec), z, a in zip(self.edge_dec.items(), e_types, attrs):
            out[f"edge_attr__{t}"] = self._decode_edges(dec, z, a, use_ckpt)
        return out

    def _decode_edges(self, dec: tnn.Module, z: Tensor, old: Tensor, use_ckpt: bool) -> Tensor:
        if not use_ckpt or z.size(0) <= _DECODER_CHUNK_ROWS:
            return _residual_decode(dec, z, old, self.edge_res_ratio)
        # chunk-wise recomputation: keeps no [E, H] decoder activation alive until backward
        parts = [_checkpoint(_residual_decode, dec, z[a:a + _DECODER_CHUNK_ROWS], old[a:a + _DECODER_CHUNK_ROWS],
                             self.edge_res_ratio, use_reentrant=False)
                 for a in range(0, z.size(0), _DECODER_CHUNK_ROWS)]
        return torch.cat(parts, dim=0)
