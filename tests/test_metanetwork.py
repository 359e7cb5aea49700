"""MetaNetwork (nn/metanetwork.py) against the straightforward PyG reference and the paper's properties."""
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch_geometric.data import Batch, Data

import nn.metanetwork as mn_module
from nn.metanetwork import MetaNetwork

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64


@pytest.fixture(scope="module")
def ref():
    path = ROOT / "benchmarks" / "reference_metanetwork.py"
    spec = importlib.util.spec_from_file_location("reference_metanetwork", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reference_metanetwork"] = mod  # PyG's MessagePassing inspector looks the module up
    spec.loader.exec_module(mod)
    return mod


def make_graph(seed=0, n=14, e=70, edge_dims=None, isolated=2, grouped=True, node_dim=5):
    """Random graph in the shared format; the last `isolated` nodes have no edge."""
    edge_dims = edge_dims or {"kernel": 9}
    g = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n - isolated, (2, e), generator=g)
    types = torch.randint(0, len(edge_dims), (e,), generator=g)
    if grouped:
        types = types.sort().values
    data = Data(x=torch.randn(n, node_dim, generator=g, dtype=DT), edge_index=edge_index, edge_type=types)
    for k, (t, d) in enumerate(edge_dims.items()):
        data[f"edge_attr__{t}"] = torch.randn(int((types == k).sum()), d, generator=g, dtype=DT)
    return data


def build_pair(ref, edge_dims=None, node_dim=5, layers=2, hiddim=8, ratios=(0.3, 0.2), seed=0, **options):
    edge_dims = edge_dims or {"kernel": 9}
    torch.manual_seed(seed)
    ours = MetaNetwork(node_dim, edge_dims, layers, hiddim, *ratios, **options).to(DT)
    theirs = ref.ReferenceMetaNetwork(node_dim, edge_dims, layers, hiddim, *ratios,
                                      edge_mid_dims=options.get("edge_mid_dims")).to(DT)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def out_keys(edge_dims):
    return ["x"] + [f"edge_attr__{t}" for t in edge_dims]


def run_with_grads(net, graph, keys, seed=1):
    """Outputs and gradients of a random linear loss w.r.t. the inputs and every parameter."""
    graph = graph.clone()
    inputs = []
    for k in keys:
        graph[k] = graph[k].clone().requires_grad_(True)
        inputs.append(graph[k])
    out = net(graph)
    g = torch.Generator().manual_seed(seed)
    loss = sum((out[k] * torch.randn(out[k].shape, generator=g, dtype=DT)).sum() for k in keys)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss, inputs + params)
    return [out[k].detach() for k in keys], grads


def assert_close_lists(a, b, atol=1e-10, rtol=1e-8):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)


@pytest.fixture
def two_threads():
    """Exercise the kernel's multi-threaded edge ranges (they need >= 2 torch threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused,checkpoint", [(True, False), (True, True), (False, False), (False, True)])
def test_matches_reference_single_type(ref, fused, checkpoint, two_threads, monkeypatch):
    monkeypatch.setattr(mn_module, "_DECODER_CHUNK_ROWS", 16)  # several checkpointed decoder chunks
    graph = make_graph(e=90)
    ours, theirs = build_pair(ref, fused=fused, checkpoint=checkpoint, edge_chunk=7)
    keys = out_keys({"kernel": 9})
    out_a, grad_a = run_with_grads(ours, graph, keys)
    out_b, grad_b = run_with_grads(theirs, graph, keys)
    assert_close_lists(out_a, out_b)
    assert_close_lists(grad_a, grad_b)
    # the fused kernel really ran in several threads and chunks here
    if fused:
        idx = mn_module._EdgeIndexData.build(graph.edge_index, graph.num_nodes, 8, DT, 7)
        assert len(mn_module._edge_ranges(idx, torch.device("cpu"))) == 2


@pytest.mark.parametrize("grouped", [True, False])
def test_matches_reference_multiple_edge_types(ref, grouped):
    edge_dims = {"patch": 12, "qkv": 3, "linear": 1}
    graph = make_graph(seed=3, n=16, e=80, edge_dims=edge_dims, grouped=grouped, node_dim=6)
    ours, theirs = build_pair(ref, edge_dims, node_dim=6, layers=3, hiddim=6, edge_mid_dims={"patch": 5},
                              edge_chunk=9)
    assert isinstance(ours.edge_enc["patch"], torch.nn.Sequential) and ours.edge_dec["patch"][-1].in_features == 5
    keys = out_keys(edge_dims)
    out_a, grad_a = run_with_grads(ours, graph, keys)
    out_b, grad_b = run_with_grads(theirs, graph, keys)
    assert_close_lists(out_a, out_b)
    assert_close_lists(grad_a, grad_b)


def test_tied_messages_split_the_max_min_gradient_like_pyg(ref):
    """Duplicated edges give exactly equal messages; PyG (torch scatter_reduce) splits the max/min
    gradient evenly among them, and so must the fused backward."""
    graph = make_graph(seed=5, n=10, e=30)
    dup = torch.arange(0, 30, 2)
    graph.edge_index = torch.cat([graph.edge_index, graph.edge_index[:, dup]], 1)
    graph.edge_type = torch.zeros(graph.edge_index.size(1), dtype=torch.long)
    graph.edge_attr__kernel = torch.cat([graph.edge_attr__kernel, graph.edge_attr__kernel[dup]])
    ours, theirs = build_pair(ref, edge_chunk=8)
    keys = out_keys({"kernel": 9})
    out_a, grad_a = run_with_grads(ours, graph, keys)
    out_b, grad_b = run_with_grads(theirs, graph, keys)
    assert_close_lists(out_a, out_b)
    assert_close_lists(grad_a, grad_b)


def test_parameter_count_and_names_match_the_paper_config(ref):
    cfg = yaml.safe_load((ROOT / "configs" / "metanetwork" / "resnet56.yaml").read_text())
    net = MetaNetwork(8, {"kernel": 9}, **cfg)
    # reference §5.2: ~308.6k parameters including 33.3k unused `mlps`, which are dropped here
    assert sum(p.numel() for p in net.parameters()) == 275_345
    refnet = ref.ReferenceMetaNetwork(8, {"kernel": 9}, cfg["num_layer"], cfg["hiddim"], 0.01, 0.01)
    assert net.state_dict().keys() == refnet.state_dict().keys()
    assert torch.equal(net.inv, torch.tensor([1.0] * 32 + [-1.0] * 32))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "metanetwork").glob("*.yaml")))
def test_every_config_builds_and_runs(name):
    cfg = yaml.safe_load((ROOT / "configs" / "metanetwork" / f"{name}.yaml").read_text())
    assert {"num_layer", "hiddim", "node_res_ratio", "edge_res_ratio"} <= set(cfg)
    assert not {"node_dim", "edge_dims", "_target_"} & set(cfg)
    edge_dims = {"patch": 256, "qkv": 3, "linear": 1} if name == "vit_b_16" else {"kernel": 9}
    graph = make_graph(n=8, e=20, edge_dims=edge_dims, node_dim=6)
    net = MetaNetwork(6, edge_dims, **cfg).to(DT)
    out = net(graph)
    for k in out_keys(edge_dims):
        assert out[k].shape == graph[k].shape


# --------------------------------------------------------------------------------------------------
def test_shapes_and_other_attributes_carried_over():
    edge_dims = {"k7x7": 49, "k3x3": 9, "k1x1": 1}
    graph = make_graph(edge_dims=edge_dims, node_dim=8)
    graph.node_index = [0, 3, 9, 14]
    graph.spec = {"name": "resnet50"}
    graph.extra = torch.arange(5)
    net = MetaNetwork(8, edge_dims, 2, 8, 0.1, 0.1).to(DT)
    out = net(graph)
    assert out is not graph and type(out) is type(graph)
    assert out.edge_index is graph.edge_index and out.edge_type is graph.edge_type
    assert out.node_index == [0, 3, 9, 14] and out.spec == {"name": "resnet50"} and out.extra is graph.extra
    for k in out_keys(edge_dims):
        assert out[k].shape == graph[k].shape and out[k].dtype == DT
        assert not torch.equal(out[k], graph[k])
    assert set(out.keys()) == set(graph.keys())
    # the input graph is untouched
    assert graph.x is not out.x


@pytest.mark.parametrize("fused", [True, False])
def test_batch_of_two_graphs_equals_separate_runs(fused):
    edge_dims = {"a": 4, "b": 2}
    g1 = make_graph(seed=1, n=9, e=30, edge_dims=edge_dims)
    g2 = make_graph(seed=2, n=12, e=45, edge_dims=edge_dims)
    net = MetaNetwork(5, edge_dims, 2, 8, 0.3, 0.3, fused=fused, edge_chunk=8).to(DT)
    batch = Batch.from_data_list([g1, g2])
    out = net(batch)
    assert isinstance(out, Batch) and out.num_graphs == 2
    parts = out.to_data_list()
    for g, p in zip([g1, g2], parts):
        single = net(g)
        for k in out_keys(edge_dims):
            torch.testing.assert_close(p[k], single[k], atol=1e-12, rtol=1e-10)


def test_zero_ratio_returns_the_input_exactly():
    edge_dims = {"a": 4, "b": 2}
    graph = make_graph(edge_dims=edge_dims)
    net = MetaNetwork(5, edge_dims, 2, 8, 0.0, 0.0).to(DT)
    out = net(graph)
    for k in out_keys(edge_dims):
        assert torch.equal(out[k], graph[k])


def test_zeroed_decoder_outputs_return_the_input_exactly():
    edge_dims = {"a": 4, "b": 2}
    graph = make_graph(edge_dims=edge_dims)
    net = MetaNetwork(5, edge_dims, 2, 8, 0.5, 0.5).to(DT)
    with torch.no_grad():
        for dec in [net.node_dec, *net.edge_dec.values()]:
            dec[-1].weight.zero_()
            dec[-1].bias.zero_()
    out = net(graph)
    for k in out_keys(edge_dims):
        assert torch.equal(out[k], graph[k])


def test_zero_init_decoders_start_as_the_identity_and_still_learn():
    edge_dims = {"a": 4, "b": 2}
    graph = make_graph(edge_dims=edge_dims)
    net = MetaNetwork(5, edge_dims, 2, 8, 0.5, 0.5, zero_init_decoders=True).to(DT)
    out = net(graph)
    for k in out_keys(edge_dims):
        assert torch.equal(out[k], graph[k])
    # the last decoder layers get a gradient at once, so training moves the output away from the input
    loss = sum(out[k].square().sum() for k in out_keys(edge_dims))
    loss.backward()
    assert net.edge_dec["a"][-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    moved = net(graph)
    assert not torch.equal(moved["edge_attr__a"], graph["edge_attr__a"])
    # the default (reference) start is random: not the identity
    plain = MetaNetwork(5, edge_dims, 2, 8, 0.5, 0.5).to(DT)
    assert not torch.equal(plain(graph)["edge_attr__a"], graph["edge_attr__a"])


def test_permutation_equivariance():
    edge_dims = {"a": 4, "b": 2}
    graph = make_graph(seed=7, n=15, e=60, edge_dims=edge_dims, grouped=False)
    net = MetaNetwork(5, edge_dims, 3, 8, 0.5, 0.5, edge_chunk=8).to(DT)
    out = net(graph)

    g = torch.Generator().manual_seed(11)
    node_perm = torch.randperm(graph.num_nodes, generator=g)  # new node k = old node node_perm[k]
    old_to_new = torch.argsort(node_perm)
    edge_perm = torch.randperm(graph.edge_index.size(1), generator=g)  # new edge k = old edge edge_perm[k]
    perm_graph = Data(x=graph.x[node_perm], edge_index=old_to_new[graph.edge_index[:, edge_perm]],
                      edge_type=graph.edge_type[edge_perm])
    for k, t in enumerate(edge_dims):
        # rows of a type follow that type's edges in edge order
        pos_old = torch.full((graph.edge_index.size(1),), -1)
        pos_old[graph.edge_type == k] = torch.arange(int((graph.edge_type == k).sum()))
        perm_graph[f"edge_attr__{t}"] = graph[f"edge_attr__{t}"][pos_old[edge_perm][perm_graph.edge_type == k]]
    perm_out = net(perm_graph)
    torch.testing.assert_close(perm_out.x, out.x[node_perm], atol=1e-12, rtol=1e-10)
    for k, t in enumerate(edge_dims):
        pos_old = torch.full((graph.edge_index.size(1),), -1)
        pos_old[graph.edge_type == k] = torch.arange(int((graph.edge_type == k).sum()))
        expected = out[f"edge_attr__{t}"][pos_old[edge_perm][perm_graph.edge_type == k]]
        torch.testing.assert_close(perm_out[f"edge_attr__{t}"], expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
def test_edge_direction_matters_through_the_sign_inverter(fused):
    graph = make_graph(seed=4, n=12, e=50)
    net = MetaNetwork(5, {"kernel": 9}, 2, 8, 0.5, 0.5, fused=fused).to(DT)
    rev = graph.clone()
    rev.edge_index = graph.edge_index.flip(0)
    out, out_rev = net(graph), net(rev)
    assert (out.x - out_rev.x).abs().max() > 1e-4
    assert (out.edge_attr__kernel - out_rev.edge_attr__kernel).abs().max() > 1e-4
    # without the inverter both passes are symmetric, so reversing every edge would change nothing
    net.inv.fill_(1.0)
    out, out_rev = net(graph), net(rev)
    torch.testing.assert_close(out.x, out_rev.x, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.edge_attr__kernel, out_rev.edge_attr__kernel, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
def test_every_parameter_gets_a_gradient(fused):
    edge_dims = {"patch": 12, "qkv": 3}
    graph = make_graph(edge_dims=edge_dims)
    net = MetaNetwork(5, edge_dims, 2, 8, 0.1, 0.1, edge_mid_dims={"patch": 4}, fused=fused).to(DT)
    out = net(graph)
    sum(out[k].square().sum() for k in out_keys(edge_dims)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_works_without_torch_scatter(monkeypatch):
    """torch_scatter is optional: the module imports and runs when importing it fails."""
    monkeypatch.setitem(sys.modules, "torch_scatter", None)  # `import torch_scatter` now raises
    with pytest.raises(ImportError):
        import torch_scatter  # noqa: F401
    fresh = importlib.reload(mn_module)
    try:
        graph = make_graph()
        net = fresh.MetaNetwork(5, {"kernel": 9}, 2, 8, 0.1, 0.1).to(DT)
        out = net(graph)
        out.x.sum().backward()
        assert "torch_scatter" not in fresh.__dict__
    finally:
        monkeypatch.undo()
        importlib.reload(mn_module)


def test_clear_errors_for_graph_mismatches():
    graph = make_graph()
    net = MetaNetwork(5, {"kernel": 9, "extra": 1}, 1, 4, 0.1, 0.1)
    with pytest.raises(ValueError, match="edge_attr__extra"):
        net(graph)
    net = MetaNetwork(6, {"kernel": 9}, 1, 4, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"graph.x has shape"):
        net(graph)
    with pytest.raises(ValueError, match="edge_mid_dims"):
        MetaNetwork(5, {"kernel": 9}, 1, 4, 0.1, 0.1, edge_mid_dims={"patch": 64})


def test_fused_backward_refuses_double_backward_but_unfused_allows_it():
    graph = make_graph()
    for fused in (True, False):
        net = MetaNetwork(5, {"kernel": 9}, 1, 4, 0.1, 0.1, fused=fused).to(DT)
        x = graph.x.clone().requires_grad_(True)
        g = graph.clone()
        g.x = x
        (gx,) = torch.autograd.grad(net(g).edge_attr__kernel.square().sum(), x, create_graph=True)
        if fused:
            with pytest.raises(RuntimeError, match="differentiate twice"):
                gx.sum().backward()
        else:
            (ggx,) = torch.autograd.grad(gx.sum(), x)
            assert ggx.abs().sum() > 0


def test_threaded_kernel_is_deterministic(two_threads):
    graph = make_graph(seed=9, n=30, e=400)
    net = MetaNetwork(5, {"kernel": 9}, 2, 8, 0.3, 0.3, edge_chunk=16).to(DT)
    outs = []
    for _ in range(2):
        out = net(graph)
        net.zero_grad()
        (out.x.square().sum() + out.edge_attr__kernel.square().sum()).backward()
        outs.append([out.x.detach(), out.edge_attr__kernel.detach()] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fused_kernel_computes_in_float32_under_autocast(monkeypatch):
    """Under autocast (bfloat16 here; float16 on a GPU) the fused per-edge kernel gets float32 inputs: its sums of
    squares (the std aggregation) would lose the std or overflow in half precision."""
    seen = []
    inner = mn_module._forward_range

    def spy(L, Lsw, e, *args):
        seen.append((L.dtype, e.dtype))
        return inner(L, Lsw, e, *args)

    monkeypatch.setattr(mn_module, "_forward_range", spy)
    graph = make_graph(seed=3)
    graph.x = graph.x.float()
    graph["edge_attr__kernel"] = graph["edge_attr__kernel"].float()
    torch.manual_seed(0)
    net = MetaNetwork(5, {"kernel": 9}, 2, 8, 0.3, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(graph)
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert torch.isfinite(out.x).all() and torch.isfinite(out["edge_attr__kernel"]).all()
