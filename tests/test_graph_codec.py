"""Tests of the network <-> graph codec (nn/graph.py, nn/graph_handlers.py; reference §4).

Tiny widths everywhere except the two reference graph-size checks (ResNet56 built for real, VGG19 on the
meta device). Parameters and BatchNorm statistics are randomised first so that a column or edge mix-up
cannot hide behind the identity initialisation (γ=1, β=0, μ=0, σ²=1).
"""
from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn as tnn
from torch_geometric.data import Batch

import nn.graph as graph_mod
from generate_dataset.models import build_model
from nn.graph import GraphCodec, GraphCodecError, UnsupportedModuleError

from nn.metanetwork import MetaNetwork
from pruning.depgraph import architecture_options, classifier_module, pruner_step

torch.set_num_threads(1)

RESNET50_SMALL = [4] + [4, 4, 16] * 3 + [8, 8, 32] * 4 + [8, 8, 32] * 6 + [16, 16, 64] * 3
RESNET18_SMALL = [8] + [8, 8] * 2 + [8, 16] * 2 + [8, 16] * 2 + [16, 32] * 2
VGG19_SMALL = [4, 4, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 32, 32]
RESNET20_SMALL = [8] + [8, 8] * 3 + [12, 16] * 3 + [16, 24] * 3
ARCHS = {  # name -> (widths, num_classes)
    "resnet20": (RESNET20_SMALL, 10),
    "vgg19": (VGG19_SMALL, 100),
    "resnet18": (RESNET18_SMALL, 10),
    "resnet50": (RESNET50_SMALL, 10),
    "vit_tiny": (None, 10),
}


def _randomise(model: tnn.Module, seed: int = 0) -> tnn.Module:
    """Random BN affine/statistics and biases (the defaults would hide column mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (tnn.BatchNorm2d, tnn.LayerNorm)):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, tnn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, (tnn.Conv2d, tnn.Linear)) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, tnn.MultiheadAttention):
                m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=g))
    return model


def _make(name: str, seed: int = 0) -> tnn.Module:
    torch.manual_seed(seed)
    widths, classes = ARCHS[name]
    return _randomise(build_model(name, classes, widths=widths), seed).eval()


def _prune(model: tnn.Module, seed: int, steps: int = 2) -> tnn.Module:
    """torch-pruning GroupNormPruner, global group-L2 magnitude, classifier ignored by identity.

    Two of three iterative steps towards a 60 % global ratio; the random initial weights (and the
    randomised BN) make the per-layer ratios non-uniform.
    """
    torch.manual_seed(seed)
    example = torch.randn(2, 3, 32, 32)
    extra = {}
    options = architecture_options(model)  # a ViT: whole heads, embedding pruned through its bare parameters
    if options:
        params = dict(model.named_parameters())
        extra = dict(
            num_heads={m: m.num_heads for m in model.modules() if isinstance(m, tnn.MultiheadAttention)},
            unwrapped_parameters=[(params[name], 2) for name in options["unwrapped_parameters"]],
            round_to=options["round_to"],
        )
    pruner = tp.pruner.GroupNormPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=0.6, iterative_steps=3, ignored_layers=[classifier_module(model, example)], **extra,
    )
    for _ in range(steps):
        pruner_step(pruner, model)
    return model.eval()


def _buffers_and_params(model: tnn.Module) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_exact_roundtrip(model: tnn.Module, codec: GraphCodec | None = None) -> GraphCodec:
    codec = codec or GraphCodec(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    decoded = codec.decode(codec.encode(model))
    params = {k for k, _ in model.named_parameters()}
    assert set(decoded) == params - set(codec.unencoded_keys)
    for k, v in decoded.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    # Loading into the model changes no bit; loading into another instance reproduces the model.
    model.load_state_dict(decoded, strict=False)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(decoded, strict=False)
    other_sd = other.state_dict()
    for k in params - set(codec.unencoded_keys):
        assert torch.equal(other_sd[k], sd[k]), k
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_model = model(x)
        y_graph = torch.func.functional_call(model, {**_buffers_and_params(model), **decoded}, (x,))
    assert torch.equal(y_model, y_graph)
    return codec


# ----------------------------------------------------------------------------------------------------
# Reference sizes and layouts
# ----------------------------------------------------------------------------------------------------


def test_resnet56_reference_graph_size_and_roundtrip():
    model = _randomise(build_model("resnet56", 10)).eval()
    codec = _assert_exact_roundtrip(model)
    assert codec.num_nodes == 2045 and codec.num_edges == 140_720
    assert codec.node_dim == 8 and dict(codec.edge_dims) == {"kernel": 9}
    blocks = codec.edge_blocks
    main = sum(b["rows"][1] - b["rows"][0] for b in blocks if b["kind"] in ("conv", "linear") and not b["shortcut"])
    residual = sum(b["rows"][1] - b["rows"][0] for b in blocks if b["kind"] == "identity" or b["shortcut"])
    assert (main, residual) == (94_896, 45_824)
    assert len(codec.layer_slices) == 57  # node layers: input, 55 convs, classifier


def test_vgg19_reference_graph_size_on_meta_device():
    with torch.device("meta"):
        model = build_model("vgg19", 100)
    codec = GraphCodec(model)
    assert (codec.num_nodes, codec.num_edges) == (5607, 2_275_520)
    assert codec.node_dim == 5 and dict(codec.edge_dims) == {"kernel": 9}
    assert len(codec.layer_slices) == 18
    graph = codec.encode(model)  # the graph lives on the model's device
    assert graph.x.device.type == "meta" and graph.edge_attr__kernel.shape == (2_275_520, 9)


def test_cifar_resnet_feature_layout():
    model = _make("resnet20")
    codec = GraphCodec(model)
    g = codec.encode(model)
    sd = model.state_dict()
    x = g.x
    assert codec.node_features[:4] == ["norm.weight", "norm.bias|bias", "norm.running_mean", "norm.running_var"]
    ident = torch.tensor([1.0, 0, 0, 1, 1, 0, 0, 1])
    assert torch.equal(x[codec.node_slice("input")], ident.expand(3, 8))
    rows = codec.node_slice("layer1.1.conv1")
    bn = "layer1.1.bn1"
    expected = torch.stack([sd[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")], 1)
    assert torch.equal(x[rows, :4], expected) and torch.equal(x[rows, 4:], ident[4:].expand(rows.stop - rows.start, 4))
    # projection block: block-output nodes carry bn2 in cols 0-3 and the downsample BN in cols 4-7
    rows = codec.node_slice("layer2.0.conv2")
    ds = torch.stack([sd[f"layer2.0.downsample.1.{k}"] for k in ("weight", "bias", "running_mean", "running_var")], 1)
    assert torch.equal(x[rows, 4:], ds)
    assert "layer2.0.downsample.0" not in codec.layer_slices  # projections create no nodes
    # classifier nodes: [1, fc.bias, 0, 1, 1, 0, 0, 1]
    cls = x[codec.node_slice("fc")]
    assert torch.equal(cls[:, 1], sd["fc.bias"])
    assert torch.equal(cls[:, [0, 2, 3, 4, 5, 6, 7]], ident[[0, 2, 3, 4, 5, 6, 7]].expand(10, 7))
    # edges: 3x3 kernels in row-major order; 1x1 and fc at the centre (index 4), zeros around
    by_key = {b["key"]: b for b in codec.edge_blocks}
    ea = g.edge_attr__kernel
    a, b = by_key["layer1.0.conv2.weight"]["rows"]
    assert torch.equal(ea[a:b], sd["layer1.0.conv2.weight"].reshape(-1, 9))
    for key in ("layer2.0.downsample.0.weight", "fc.weight"):
        a, b = by_key[key]["rows"]
        assert torch.equal(ea[a:b, 4], sd[key].reshape(-1))
        assert not ea[a:b, [0, 1, 2, 3, 5, 6, 7, 8]].any()
    # identity residuals: dense blocks with δ_ij at the centre
    ident_blocks = [b for b in codec.edge_blocks if b["kind"] == "identity"]
    assert len(ident_blocks) == 7  # 9 blocks minus 2 projection blocks
    a, b = ident_blocks[0]["rows"]
    n = int((b - a) ** 0.5)
    assert torch.equal(ea[a:b, 4].reshape(n, n), torch.eye(n)) and not ea[a:b, :4].any()


def test_edges_connect_the_right_nodes():
    """edge_index of every block = (out, in) pairs in row-major weight order, between the right layers."""
    model = _make("resnet20")
    codec = GraphCodec(model)
    g = codec.encode(model)
    sl = codec.node_slice
    expect = {
        "layer1.0.conv2.weight": ("layer1.0.conv2", "layer1.0.conv1"),
        "layer2.0.conv1.weight": ("layer2.0.conv1", "layer1.2.conv2"),
        "layer2.0.downsample.0.weight": ("layer2.0.conv2", "layer1.2.conv2"),  # block input -> block output
        "fc.weight": ("fc", "layer3.2.conv2"),
        "conv1.weight": ("conv1", "input"),
    }
    seen = set()
    type_offsets = {}
    start = 0
    for t in codec.edge_dims:
        type_offsets[t] = start
        start += codec.edge_counts[t]
    for blk in codec.edge_blocks:
        a, b = blk["edges"]
        assert (a - type_offsets[blk["type"]], b - type_offsets[blk["type"]]) == blk["rows"]
        out_r = torch.arange(*blk["out_nodes"])
        in_r = torch.arange(*blk["in_nodes"])
        pairs = torch.cartesian_prod(out_r, in_r).t()
        assert torch.equal(g.edge_index[:, a:b], pairs)
        assert bool((g.edge_type[a:b] == list(codec.edge_dims).index(blk["type"])).all())
        if blk["key"] in expect:
            out_name, in_name = expect[blk["key"]]
            assert blk["out_nodes"] == (sl(out_name).start, sl(out_name).stop)
            assert blk["in_nodes"] == (sl(in_name).start, sl(in_name).stop)
            seen.add(blk["key"])
        if blk["kind"] == "identity" and blk["out_nodes"][0] == sl("layer1.0.conv2").start:
            assert blk["in_nodes"] == (sl("conv1").start, sl("conv1").stop)
            seen.add("identity")
    assert seen == set(expect) | {"identity"}


def test_vgg19_feature_layout():
    model = _make("vgg19")
    codec = GraphCodec(model)
    g = codec.encode(model)
    sd = model.state_dict()
    assert codec.node_features == ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "bias"]
    rows = codec.node_slice("block2.3")
    assert torch.equal(g.x[rows, 4], sd["block2.3.bias"]) and torch.equal(g.x[rows, 0], sd["block2.4.weight"])
    cls = g.x[codec.node_slice("classifier")]
    assert torch.equal(cls[:, 4], sd["classifier.bias"])
    assert torch.equal(cls[:, :4], torch.tensor([1.0, 0, 0, 1]).expand(100, 4))
    assert torch.equal(g.x[codec.node_slice("input")], torch.tensor([1.0, 0, 0, 1, 0]).expand(3, 5))


def test_torchvision_resnet_layout_sparse_identity():
    model = _make("resnet18")
    codec = GraphCodec(model)
    assert dict(codec.edge_dims) == {"k7x7": 49, "k3x3": 9, "k1x1": 1} and codec.node_dim == 8
    g = codec.encode(model)
    ident = [b for b in codec.edge_blocks if b["kind"] == "identity"]
    assert len(ident) == 5  # 8 blocks, 3 with projection
    for blk in ident:
        a, b = blk["edges"]
        assert blk["out_nodes"][1] - blk["out_nodes"][0] == b - a  # one edge per channel
        assert torch.equal(g.edge_index[0, a:b] - blk["out_nodes"][0], g.edge_index[1, a:b] - blk["in_nodes"][0])
        r0, r1 = blk["rows"]
        assert bool((g.edge_attr__k1x1[r0:r1] == 1).all())
    types = g.edge_type.tolist()
    assert types == sorted(types)  # types stored in contiguous blocks, in edge_dims order
    ds = [b for b in codec.edge_blocks if b["key"] == "layer2.0.downsample.0.weight"][0]
    assert ds["type"] == "k1x1" and ds["shortcut"]


def test_vit_layout():
    model = _make("vit_tiny")
    codec = GraphCodec(model)
    assert dict(codec.edge_dims) == {"patch": 64, "qkv": 3, "linear": 1} and codec.node_dim == 6
    assert codec.node_features == ["norm.weight", "norm.bias", "bias", "q_bias", "k_bias", "v_bias"]
    assert set(codec.unencoded_keys) == {"class_token", "encoder.pos_embedding"}
    g = codec.encode(model)
    sd = model.state_dict()
    att = "encoder.layers.encoder_layer_0.self_attention"
    rows = codec.node_slice(f"{att}.in_proj")
    d = rows.stop - rows.start
    assert not g.x[rows, :3].any()  # the paper's attention nodes: zeros in cols 0-2
    assert torch.equal(g.x[rows, 3:].t().reshape(-1), sd[f"{att}.in_proj_bias"])
    r0 = codec.node_slice("conv_proj")
    assert torch.equal(g.x[r0, 2], sd["conv_proj.bias"])
    assert torch.equal(g.x[r0, 0], sd["encoder.layers.encoder_layer_0.ln_1.weight"])
    assert torch.equal(g.x[codec.node_slice(f"{att}.out_proj"), 0], sd["encoder.layers.encoder_layer_0.ln_2.weight"])
    last = codec.node_slice("encoder.layers.encoder_layer_1.mlp.3")
    assert torch.equal(g.x[last, 1], sd["encoder.ln.bias"])
    assert torch.equal(g.x[codec.node_slice("heads.head"), 2], sd["heads.head.bias"])
    qkv = [b for b in codec.edge_blocks if b["kind"] == "qkv"][0]
    a, b = qkv["rows"]
    w = sd[f"{att}.in_proj_weight"].reshape(3, d, d)
    assert torch.equal(g.edge_attr__qkv[a:b].reshape(d, d, 3), w.permute(1, 2, 0))
    assert sum(1 for b in codec.edge_blocks if b["kind"] == "identity") == 4  # 2 residuals per layer


def test_layout_is_json_and_checked():
    codec = GraphCodec(_make("resnet20"))
    layout = json.loads(json.dumps(codec.layout))
    assert layout["node_dim"] == 8 and layout["edge_dims"] == {"kernel": 9}
    assert layout["family"].endswith("CifarResNet") and layout["identity_edges"] == "dense"
    codec.check_layout(layout)
    # a ResNet of other widths has the same layout (metanetworks are shared across widths)
    GraphCodec(build_model("resnet20", 10)).check_layout(layout)
    with pytest.raises(GraphCodecError, match="node_dim"):
        GraphCodec(_make("vgg19")).check_layout(layout)


# ----------------------------------------------------------------------------------------------------
# Exact round trips, unpruned and pruned
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARCHS))
def test_roundtrip_unpruned(name):
    _assert_exact_roundtrip(_make(name))


@pytest.mark.parametrize("name", list(ARCHS))
def test_roundtrip_pruned_by_torch_pruning(name):
    model = _make(name, seed=3)
    before = model.state_dict()
    model = _prune(model, seed=3)
    after = model.state_dict()
    changed = [k for k in after if k in before and after[k].shape != before[k].shape]
    assert changed, "torch-pruning pruned nothing"
    _assert_exact_roundtrip(model)
    if name.startswith("resnet") or name == "vgg19":
        widths = model.widths
        assert len(set(widths)) > 2  # non-uniform per-layer widths


def test_roundtrip_coinciding_stage_widths_keeps_projections():
    """layer1 width == layer2 width == layer3 width: projections stay projections (§4.7.2)."""
    widths = [8] + [5, 8] * 3 + [6, 8] * 3 + [7, 8] * 3
    model = _randomise(build_model("resnet20", 10, widths=widths)).eval()
    codec = _assert_exact_roundtrip(model)
    blocks = codec.edge_blocks
    shortcut = [b["key"] for b in blocks if b["shortcut"]]
    assert shortcut == ["layer2.0.downsample.0.weight", "layer3.0.downsample.0.weight"]
    assert sum(b["kind"] == "identity" for b in blocks) == 7  # no identity edges at projection blocks
    expected_edges = 3 * 8 + (5 * 8 + 8 * 5) * 3 + (6 * 8 + 8 * 6) * 3 + (7 * 8 + 8 * 7) * 3 + 2 * 64 + 7 * 64 + 80
    assert codec.num_edges == expected_edges


def test_sparse_identity_option_and_legacy_fc():
    model = _make("resnet20")
    dense = GraphCodec(model)
    sparse = GraphCodec(model, identity_edges="sparse")
    _assert_exact_roundtrip(model, sparse)
    ident = [b for b in dense.edge_blocks if b["kind"] == "identity"]
    n_dense = sum(b["rows"][1] - b["rows"][0] for b in ident)
    n_sparse = sum(b["out_nodes"][1] - b["out_nodes"][0] for b in ident)
    assert sparse.num_edges == dense.num_edges - n_dense + n_sparse
    legacy = GraphCodec(model, legacy_fc_permutation=True)
    decoded = legacy.decode(legacy.encode(model))
    w = model.fc.weight
    assert torch.equal(decoded["fc.weight"], w.reshape(-1).reshape(w.shape[1], w.shape[0]).t())
    assert not torch.equal(decoded["fc.weight"], w)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in decoded.items() if k != "fc.weight")


class _Grouped(tnn.Module):
    def __init__(self):
        super().__init__()
        self.stem = tnn.Conv2d(3, 8, 5, padding=2, bias=True)
        self.dw = tnn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = tnn.BatchNorm2d(8)
        self.gc = tnn.Conv2d(8, 6, 1, groups=2)
        self.head = tnn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.dw(self.stem(x))))
        x = self.gc(x).mean(dim=(2, 3))
        return self.head(x)


def test_grouped_and_depthwise_convs():
    model = _randomise(_Grouped()).eval()
    codec = _assert_exact_roundtrip(model)
    assert dict(codec.edge_dims) == {"k5x5": 25, "k3x3": 9, "k1x1": 1}
    by_key = {b["key"]: b for b in codec.edge_blocks}
    g = codec.encode(model)
    a, b = by_key["dw.weight"]["edges"]
    assert b - a == 8  # depthwise: one edge per channel, channel i -> i
    assert torch.equal(g.edge_index[0, a:b] - by_key["dw.weight"]["out_nodes"][0],
                       g.edge_index[1, a:b] - by_key["dw.weight"]["in_nodes"][0])
    a, b = by_key["gc.weight"]["edges"]
    out_local = g.edge_index[0, a:b] - by_key["gc.weight"]["out_nodes"][0]
    in_local = g.edge_index[1, a:b] - by_key["gc.weight"]["in_nodes"][0]
    assert b - a == 6 * 4 and bool((out_local // 3 == in_local // 4).all())  # pairs stay inside a group
    # conv bias without a BatchNorm on the same nodes and no bias/BN conflict -> β column
    assert "bias" not in codec.node_features


class _ImageMLP(tnn.Module):
    """Flatten the input image, then Linear-ReLU-Linear (input nodes = the 784 pixels)."""

    def __init__(self):
        super().__init__()
        self.body = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 16), tnn.ReLU(), tnn.Dropout(0.1), tnn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def test_mlp_on_flattened_images():
    model = _randomise(_ImageMLP()).eval()
    codec = GraphCodec(model, input_shape=(1, 28, 28))
    assert codec.num_nodes == 784 + 16 + 10 and codec.num_edges == 784 * 16 + 16 * 10
    assert dict(codec.edge_dims) == {"kernel": 1} and codec.node_features == ["bias"]
    decoded = codec.decode(codec.encode(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in decoded.items()) and len(decoded) == 4


# ----------------------------------------------------------------------------------------------------
# Decode semantics, batching, errors, cache
# ----------------------------------------------------------------------------------------------------


def test_decode_never_writes_running_statistics():
    model = _make("resnet20")
    codec = GraphCodec(model)
    g = codec.encode(model)
    decoded = codec.decode(g)
    assert not [k for k in decoded if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats_cols = [i for i, n in enumerate(codec.node_features) if "running" in n]
    assert len(stats_cols) == 4
    g.x = g.x.clone()
    g.x[:, stats_cols] += 1.0  # predictions for running statistics are discarded
    again = codec.decode(g)
    assert all(torch.equal(again[k], decoded[k]) for k in decoded)


def test_decode_batch_and_mismatched_graphs():
    m1, m2 = _make("resnet20", 1), _make("resnet20", 2)
    codec = GraphCodec(m1)
    g1, g2 = codec.encode(m1), codec.encode(m2)
    batch = Batch.from_data_list([g1, g2])
    assert torch.equal(batch.edge_index[:, codec.num_edges:] - codec.num_nodes, g2.edge_index)
    d1, d2 = codec.decode_batch(batch)
    assert all(torch.equal(d1[k], v) for k, v in m1.state_dict().items() if k in d1)
    assert all(torch.equal(d2[k], v) for k, v in m2.state_dict().items() if k in d2)
    other = build_model("resnet20", 10)  # default widths
    with pytest.raises(GraphCodecError, match="decode: graph.x has shape"):
        codec.decode(GraphCodec(other).encode(other))
    with pytest.raises(GraphCodecError, match="build a GraphCodec"):
        codec.encode(other)


class _WithGroupNorm(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv2d(3, 4, 3)
        self.gn = tnn.GroupNorm(2, 4)
        self.fc = tnn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gn(self.conv(x)).mean(dim=(2, 3)))


class _ChannelConcat(tnn.Module):
    def __init__(self):
        super().__init__()
        self.a = tnn.Conv2d(3, 4, 3, padding=1)
        self.b = tnn.Conv2d(3, 4, 3, padding=1)
        self.fc = tnn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], dim=1).mean(dim=(2, 3)))


def test_unsupported_module_and_operation_errors():
    with pytest.raises(UnsupportedModuleError) as info:
        GraphCodec(_WithGroupNorm())
    msg = str(info.value)
    assert "'gn'" in msg and "GroupNorm" in msg and "Conv2d" in msg and "BatchNorm2d" in msg
    with pytest.raises(GraphCodecError, match="channel"):
        GraphCodec(_ChannelConcat())


def test_structure_analysis_is_cached(monkeypatch):
    calls = []
    real = graph_mod._trace_model

    def counting(model, shape):
        calls.append(type(model).__name__)
        return real(model, shape)

    monkeypatch.setattr(graph_mod, "_trace_model", counting)
    graph_mod.clear_cache()
    a = GraphCodec(_make("resnet20", 1))
    b = GraphCodec(_make("resnet20", 2))  # same architecture + widths: no re-trace
    assert len(calls) == 1
    assert b._plan is a._plan and b.encode(_make("resnet20", 2)).edge_index is a.encode(_make("resnet20", 3)).edge_index
    GraphCodec(build_model("resnet20", 10))  # other widths: traced
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------------------
# Permutation equivariance, gradients, MetaNetwork integration
# ----------------------------------------------------------------------------------------------------


def _permute_hidden(model: tnn.Module, perm: torch.Tensor) -> tnn.Module:
    """Function-preserving permutation of layer1.0.conv1's out channels (and bn1, conv2's in channels)."""
    m = copy.deepcopy(model)
    blk = m.layer1[0]
    with torch.no_grad():
        blk.conv1.weight.copy_(blk.conv1.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(blk.bn1, name).copy_(getattr(blk.bn1, name)[perm])
        blk.conv2.weight.copy_(blk.conv2.weight[:, perm])
    return m


def _node_perm(codec: GraphCodec, perm: torch.Tensor) -> torch.Tensor:
    full = torch.arange(codec.num_nodes)
    rows = codec.node_slice("layer1.0.conv1")
    full[rows] = rows.start + perm
    return full


def test_permutation_equivariance_of_the_encoding():
    model = _make("resnet20")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    permuted = _permute_hidden(model, perm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), permuted(x), atol=1e-5)
    codec = GraphCodec(model)
    g, gp = codec.encode(model), codec.encode(permuted)
    full = _node_perm(codec, perm)
    assert torch.equal(gp.x, g.x[full])
    # Edge (u, v) of the permuted graph carries the features of edge (full[u], full[v]) of the original.
    n = codec.num_nodes
    key = g.edge_index[0] * n + g.edge_index[1]
    order = torch.argsort(key)
    pos = order[torch.searchsorted(key[order], full[gp.edge_index[0]] * n + full[gp.edge_index[1]])]
    assert torch.equal(gp.edge_attr__kernel, g.edge_attr__kernel[pos])
    assert not torch.equal(gp.edge_attr__kernel, g.edge_attr__kernel)  # the permutation did something


def test_gradients_reach_graph_features():
    model = _make("resnet20")
    codec = GraphCodec(model)
    g = codec.encode(model)  # differentiable w.r.t. the model's parameters: take leaf copies
    g.x = g.x.detach().requires_grad_(True)
    for t in codec.edge_dims:
        g[f"edge_attr__{t}"] = g[f"edge_attr__{t}"].detach().requires_grad_(True)
    params = codec.decode(g)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(torch.func.functional_call(model, {**_buffers_and_params(model), **params}, (x,)), y)
    loss.backward()
    assert g.x.grad is not None and g.x.grad[:, :2].abs().sum() > 0
    assert not g.x.grad[:, 2:4].any()  # running statistics are not decoded
    assert g.edge_attr__kernel.grad is not None and g.edge_attr__kernel.grad.abs().sum() > 0


def test_encode_is_differentiable_and_accepts_a_state_dict():
    model = _make("vgg19")
    codec = GraphCodec(model)
    g = codec.encode(model)
    from_sd = codec.encode(model.state_dict())
    assert torch.equal(g.x, from_sd.x) and torch.equal(g.edge_attr__kernel, from_sd.edge_attr__kernel)
    (g.x[:, 4].sum() + g.edge_attr__kernel.sum()).backward()  # conv bias column, every kernel entry
    assert torch.equal(model.block0[0].weight.grad, torch.ones_like(model.block0[0].weight))
    assert torch.equal(model.block1[3].bias.grad, torch.ones_like(model.block1[3].bias))
    assert not model.block0[1].weight.grad.any()  # BN γ is in column 0, not summed
    assert g.edge_attr__kernel.data_ptr() != model.block0[0].weight.data_ptr()


def _metanet(codec: GraphCodec, ratio: float, seed: int = 0) -> tnn.Module:
    torch.manual_seed(seed)
    return MetaNetwork(codec.node_dim, codec.edge_dims, num_layer=2, hiddim=8,
                       node_res_ratio=ratio, edge_res_ratio=ratio)


def test_metanetwork_then_decode_is_permutation_equivariant():
    model = _make("resnet20")
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    permuted = _permute_hidden(model, perm)
    codec = GraphCodec(model)
    net = _metanet(codec, ratio=0.5)
    with torch.no_grad():
        out = codec.decode(net(codec.encode(model)))
        out_p = codec.decode(net(codec.encode(permuted)))
    assert not torch.allclose(out["layer1.0.conv1.weight"], model.layer1[0].conv1.weight)  # it changed something
    expected = dict(out)
    expected["layer1.0.conv1.weight"] = out["layer1.0.conv1.weight"][perm]
    expected["layer1.0.bn1.weight"] = out["layer1.0.bn1.weight"][perm]
    expected["layer1.0.bn1.bias"] = out["layer1.0.bn1.bias"][perm]
    expected["layer1.0.conv2.weight"] = out["layer1.0.conv2.weight"][:, perm]
    for k, v in expected.items():
        assert torch.allclose(out_p[k], v, atol=1e-5, rtol=1e-4), k


def test_metanetwork_ratio_zero_is_identity():
    model = _make("resnet18")
    codec = GraphCodec(model)
    with torch.no_grad():
        out = codec.decode(_metanet(codec, ratio=0.0)(codec.encode(model)))
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in out.items())


def test_gradients_reach_every_metanetwork_parameter():
    model = _make("vit_tiny")
    codec = GraphCodec(model)
    net = _metanet(codec, ratio=0.05)
    params = codec.decode(net(codec.encode(model)))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    logits = torch.func.functional_call(model, {**_buffers_and_params(model), **params}, (x,))
    F.cross_entropy(logits, y).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------
# Stored indices (int32) and the bounded cache of device copies
# ----------------------------------------------------------------------------------------------------
META = torch.device("meta")  # stands in for a second device: its tensors have sizes but hold no memory


@pytest.fixture
def fresh_device_cache():
    graph_mod.clear_cache()
    previous = graph_mod.set_device_cache_limit(None)
    yield
    graph_mod.set_device_cache_limit(previous)
    graph_mod.clear_cache()


def _entries(device=None, kind=None):
    return [e for e in graph_mod.device_cache_info()["entries"]
            if (device is None or e["device"] == device) and (kind is None or e["kind"] == kind)]


def _tensors(nest):
    if isinstance(nest, torch.Tensor):
        return [nest]
    items = nest.values() if isinstance(nest, dict) else nest if isinstance(nest, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def test_indices_are_stored_as_int32_and_graphs_get_int64(fresh_device_cache):
    model = _make("resnet20", 0)
    codec = GraphCodec(model)
    plan = codec._plan
    stored = (plan.edge_index, plan.edge_type, plan.x_index, plan.fast.node_index)
    assert all(t.dtype == torch.int32 for t in stored)
    graph = codec.encode(model)
    assert graph.edge_index.dtype == graph.edge_type.dtype == torch.int64  # what PyG's scatter ops need
    assert torch.equal(graph.edge_index, plan.edge_index.long()) and torch.equal(graph.edge_type, plan.edge_type.long())
    meta_graph = codec.encode(copy.deepcopy(model).to(META))
    assert meta_graph.edge_index.device == META and meta_graph.edge_index.dtype == torch.int64
    assert meta_graph.edge_type.shape == (codec.num_edges,) and meta_graph.edge_type.dtype == torch.int64
    copies = plan.on(META, torch.float32)
    assert all(copies[k].dtype == torch.int32 and copies[k].device == META
               for k in ("edge_index", "x_index", "node_dec_index"))
    # a device's edge copy: 8 bytes per edge (int32 [2, E]), no edge_type; the CPU keeps the int64 ones
    assert [e["bytes"] for e in _entries("meta", "edges")] == [8 * codec.num_edges]
    assert [e["bytes"] for e in _entries("cpu", "edges")] == [24 * codec.num_edges]
    # the other CPU index tensors are the plan's own: they cost the cache nothing
    assert [e["bytes"] for e in _entries("cpu", "nodes")] == [0]


def test_int32_edge_copies_give_the_same_graph(fresh_device_cache, monkeypatch):
    # what an accelerator does (a cached int32 edge_index, cast and filled per encode), checked on the CPU
    model = _make("vit_tiny", 0)  # several edge types
    codec = GraphCodec(model)
    shared = codec.encode(model)
    graph_mod.clear_cache()
    monkeypatch.setattr(graph_mod, "_INT64_EDGE_DEVICES", ())
    codec = GraphCodec(model)
    first, second = codec.encode(model), codec.encode(model)
    assert len(codec.edge_dims) == 3
    assert [e["bytes"] for e in _entries("cpu", "edges")] == [0]  # the plan's own int32 edge_index, no copy
    for graph in (first, second):
        assert graph.edge_index.dtype == graph.edge_type.dtype == torch.int64
        assert torch.equal(graph.edge_index, shared.edge_index) and torch.equal(graph.edge_type, shared.edge_type)
    assert first.edge_index is not second.edge_index  # each graph its own int64 copy
    _assert_exact_roundtrip(_make("resnet20", 1))


def test_device_cache_stays_within_its_bound_and_frees_what_it_evicts(fresh_device_cache):
    model = _make("resnet20", 0)
    on_meta = copy.deepcopy(model).to(META)
    codec = GraphCodec(model)
    codec.decode(codec.encode(on_meta))
    meta_bytes = graph_mod.device_cache_info()["bytes"]
    assert meta_bytes >= 8 * codec.num_edges
    codec.decode(codec.encode(model))  # + the CPU copies (float32 constants)
    both = graph_mod.device_cache_info()["bytes"]
    assert both > meta_bytes

    # a lower bound evicts the least recently used copies at once (meta's) and releases their tensors
    before = graph_mod.device_cache_info()["entries"]
    refs = {key: [weakref.ref(t) for t in _tensors(entry.tensors)] for key, entry in graph_mod._DEVICE_CACHE.items()}
    assert graph_mod.set_device_cache_limit(both - 1) == graph_mod.DEFAULT_DEVICE_CACHE_BYTES
    after = graph_mod.device_cache_info()["entries"]
    assert graph_mod.device_cache_info()["bytes"] <= both - 1
    assert before[0]["device"] == "meta" and before[0] not in after and after == before[len(before) - len(after):]
    gc.collect()
    evicted = [key for key in refs if key not in graph_mod._DEVICE_CACHE]
    assert evicted and all(ref() is None for key in evicted for ref in refs[key])

    # two devices in turn under a bound that holds one device's copies: the other one's are evicted each time
    graph_mod.set_device_cache_limit(meta_bytes)
    for _ in range(2):
        codec.decode(codec.encode(on_meta))
        assert graph_mod.device_cache_info()["bytes"] <= meta_bytes
        assert {e["kind"] for e in _entries("meta")} == {"edges", "nodes", "consts"}
        assert all(e["bytes"] == 0 for e in _entries("cpu"))
        _assert_exact_roundtrip(model, codec)
        assert graph_mod.device_cache_info()["bytes"] <= meta_bytes
        assert _entries("meta", "edges") == []  # the CPU's constants pushed out meta's least recent copy

    # a bound below any copy: nothing that costs memory is kept, and the round trip stays bit-exact
    graph_mod.set_device_cache_limit(0)
    assert graph_mod.device_cache_info()["bytes"] == 0
    _assert_exact_roundtrip(model, codec)
    graph = codec.encode(on_meta)
    assert graph.edge_attr__kernel.device == META
    assert graph_mod.device_cache_info()["bytes"] == 0
    assert all(e["bytes"] == 0 for e in graph_mod.device_cache_info()["entries"])
    with pytest.raises(ValueError, match=">= 0"):
        graph_mod.set_device_cache_limit(-1)
