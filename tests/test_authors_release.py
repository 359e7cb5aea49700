"""The authors' quick-reproduce release and Torch-Pruning's base models: key mappings, the conversion script, its
errors, the recorded layout, and a final run from converted files. No code of the authors is used: the tests build
state dicts in the authors' key layout (nn/GNN.py ``MyGNN``, generate_dataset/resnet_family.py, VGG_family.py, as
described in reference §3.1/§5.2), and a tiny stand-in package with the authors' module and class names for the
files that must be unpickled."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.utils import scatter

from generate_dataset.models import build_model, load_model, load_pretrained
from generate_dataset.models.authors import ExternalModelError, external_model
from helpers import REPO, load_script, recorded, tiny_cfg
from nn.apply import LayoutMismatchError, load_metanetwork
from nn.authors import AuthorsMetanetworkError, authors_sizes, import_authors_metanetwork
from nn.graph import GraphCodec
from stages import final

pytestmark = pytest.mark.usefixtures("one_thread")

convert_script = load_script(REPO / "main" / "convert_release.py", "convert_release_script")
ReleaseError = convert_script.ReleaseError
TINY_TASK = ("resnet20_on_digits", ("task.model=resnet8",))  # resnet8 on 1x8x8 digits
RATIOS = {"node_res_ratio": 0.3, "edge_res_ratio": 0.2}


def sha256_of(path: Path) -> str:
    """The file's SHA-256, computed here independently of the code under test."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# State dicts in the authors' key layout
# ----------------------------------------------------------------------------------------------------------------

def authors_mygnn(num_layer=2, hiddim=6, node_dim=8, edge_dims=(9,), seed=0, mid=None) -> OrderedDict:
    """An authors' metanetwork state dict: ``MyGNN`` for one edge size, ``MyGNN_resnet50``/``_ViT`` naming
    (``edgeEnc_<d>``) for several; ``mid`` gives the first size a 2-layer encoder / 3-layer decoder (ViT patch)."""
    gen = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    inv = torch.ones(hiddim)
    inv[hiddim // 2:] = -1
    sd["edgeInverter"] = inv

    def linear(prefix, n_in, n_out):
        sd[f"{prefix}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(n_out, generator=gen)

    linear("nodeEnc", node_dim, hiddim)
    for layer in range(num_layer):
        for k in range(1, 5):
            linear(f"convs.{layer}.lin{k}.0", hiddim, hiddim)
        linear(f"convs.{layer}.downlin", 4 * hiddim, hiddim)
    for layer in range(num_layer):
        linear(f"mlps.{layer}.0", hiddim, hiddim)
    single = len(edge_dims) == 1
    for i, d in enumerate(edge_dims):
        name = "edgeEnc" if single else f"edgeEnc_{d}"
        if mid and i == 0:
            linear(f"{name}.0", d, mid)
            linear(f"{name}.2", mid, hiddim)
        else:
            linear(name, d, hiddim)
    for i, d in enumerate(edge_dims):
        name = "edgeDec" if single else f"edgeDec_{d}"
        linear(f"{name}.1", hiddim, hiddim)
        if mid and i == 0:
            linear(f"{name}.3", hiddim, mid)
            linear(f"{name}.5", mid, d)
        else:
            linear(f"{name}.3", hiddim, d)
    linear("nodeDec.1", hiddim, hiddim)
    linear("nodeDec.3", hiddim, node_dim)
    return sd


def paper_forward(sd, ratios, x, edge_index, edge_attr):
    """The authors' metanetwork computed from reference §5.1-5.2 directly on their key names (an independent check
    of the mapping: a swapped or misplaced tensor changes the result)."""
    def lin(prefix, h):
        return F.linear(h, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def decode(prefix, z):
        return lin(f"{prefix}.3", F.silu(lin(f"{prefix}.1", F.layer_norm(z, z.shape[-1:]))))

    n = x.shape[0]
    inv = sd["edgeInverter"]
    h, e = lin("nodeEnc", x), lin("edgeEnc", edge_attr)
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("convs."))
    for layer in range(layers):
        hn = F.layer_norm(h, h.shape[-1:])
        lins = [F.silu(lin(f"convs.{layer}.lin{k}.0", hn)) for k in range(1, 5)]

        def conv(index, feat):
            src, tgt = index
            msg = lins[1][tgt] * lins[0][src] * feat
            mean = scatter(msg, tgt, 0, dim_size=n, reduce="mean")
            var = scatter(msg * msg, tgt, 0, dim_size=n, reduce="mean") - mean * mean
            std = var.clamp(min=1e-5).sqrt()
            std = std.masked_fill(std <= 1e-5 ** 0.5, 0.0)
            agg = torch.cat([mean, std, scatter(msg, tgt, 0, dim_size=n, reduce="max"),
                             scatter(msg, tgt, 0, dim_size=n, reduce="min")], dim=1)
            return lin(f"convs.{layer}.downlin", agg), lins[2][src] * lins[3][tgt] * feat

        n1, e1 = conv(edge_index, e)
        n2, e2 = conv(edge_index.flip(0), inv * e)
        h, e = h + n1 + n2, e + e1 + inv * e2
    return (x + ratios["node_res_ratio"] * decode("nodeDec", h),
            edge_attr + ratios["edge_res_ratio"] * decode("edgeDec", e))


def authors_resnet_keys(depth: int, widths: list[int], in_channels: int, classes: int) -> OrderedDict:
    """Shapes of the authors' (= Torch-Pruning's resnet_tiny) CIFAR ResNet state dict, written from its structure:
    stem conv1/bn1, ``layer{s}.{b}`` BasicBlocks with conv1/bn1/conv2/bn2, ``downsample.{0,1}`` in layer2.0 and
    layer3.0, fc. ``widths`` as ours: [stem, mid_1, out_1, ...]."""
    shapes: OrderedDict[str, tuple] = OrderedDict()

    def bn(prefix, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{p}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    n = (depth - 2) // 6
    shapes["conv1.weight"] = (widths[0], in_channels, 3, 3)
    bn("bn1", widths[0])
    cin, k = widths[0], 1
    for s in range(1, 4):
        for b in range(n):
            mid, out = widths[k], widths[k + 1]
            p = f"layer{s}.{b}"
            shapes[f"{p}.conv1.weight"] = (mid, cin, 3, 3)
            bn(f"{p}.bn1", mid)
            shapes[f"{p}.conv2.weight"] = (out, mid, 3, 3)
            bn(f"{p}.bn2", out)
            if s > 1 and b == 0:
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                bn(f"{p}.downsample.1", out)
            cin, k = out, k + 2
    shapes["fc.weight"], shapes["fc.bias"] = (classes, cin), (classes,)
    return shapes


def authors_vgg19_keys(widths: list[int], classes: int) -> OrderedDict:
    """Shapes of the authors' (= Torch-Pruning's vgg19_bn) VGG-19 state dict: ``block{b}.{3j}`` conv with bias,
    ``block{b}.{3j+1}`` BatchNorm, ``classifier``."""
    shapes: OrderedDict[str, tuple] = OrderedDict()
    cin, k = 3, 0
    for b, convs in enumerate((2, 2, 4, 4, 4)):
        for j in range(convs):
            shapes[f"block{b}.{3 * j}.weight"] = (widths[k], cin, 3, 3)
            shapes[f"block{b}.{3 * j}.bias"] = (widths[k],)
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"block{b}.{3 * j + 1}.{p}"] = (widths[k],)
            shapes[f"block{b}.{3 * j + 1}.num_batches_tracked"] = ()
            cin, k = widths[k], k + 1
    shapes["classifier.weight"], shapes["classifier.bias"] = (classes, cin), (classes,)
    return shapes


def random_tensors(shapes: OrderedDict, seed: int = 0) -> OrderedDict:
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.tensor(7) if s == () else torch.rand(s, generator=gen) + 0.1) for k, s in
                       shapes.items())


def tiny_codec(legacy: bool = True) -> GraphCodec:
    return GraphCodec(build_model("resnet8", 10, in_channels=1), input_shape=(1, 8, 8), legacy_fc_permutation=legacy)


# ----------------------------------------------------------------------------------------------------------------
# Nothing but the conversion script unpickles
# ----------------------------------------------------------------------------------------------------------------
UNPICKLING_ALLOWED = {
    # path: why
    "main/convert_release.py": "the one-off conversion of the authors' pickled release (its docstring)",
}
# (path, call): calls that unpickle bytes the same code pickled a line before, never a file
IN_MEMORY_ROUND_TRIPS = {("tests/test_io.py", "pickle.loads")}
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
              "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unpickling_calls(path: Path) -> list[str]:
    """Each call in ``path`` that can unpickle: ``weights_only`` not literally True, ``torch.load`` without
    ``weights_only=True``, ``np.load(allow_pickle=True)``, the pickle modules' loaders."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        weights_only = kw.get("weights_only")
        literal_true = isinstance(weights_only, ast.Constant) and weights_only.value is True
        is_torch_load = name == "torch.load" or name.endswith(".torch.load")
        if (weights_only is not None or is_torch_load) and not literal_true:
            shown = ast.unparse(weights_only) if weights_only is not None else "missing"
            found.append(f"{node.lineno}: {name}(weights_only={shown})")
        elif name in UNPICKLERS:
            found.append(f"{node.lineno}: {name}")
        elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy"):
            allow = kw.get("allow_pickle")
            if not (isinstance(allow, ast.Constant) and not allow.value) and allow is not None:
                found.append(f"{node.lineno}: {name}(allow_pickle={ast.unparse(allow)})")
    return found


def test_only_the_conversion_script_unpickles():
    skip = {".venv", "outputs", "data", "data_models", "multirun", ".git", "__pycache__"}
    files = sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)
                   and "egg-info" not in str(p))
    assert len(files) > 50
    wrong, allowed = [], {}
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        calls = [c for c in unpickling_calls(path)
                 if (rel, c.split(": ")[1].split("(")[0]) not in IN_MEMORY_ROUND_TRIPS]
        if rel in UNPICKLING_ALLOWED:
            allowed[rel] = calls
        else:
            wrong += [f"{rel}:{c}" for c in calls]
    assert not wrong, ("only main/convert_release.py may unpickle (load with weights_only=True everywhere else):\n"
                       + "\n".join(wrong))
    # the scan is not vacuous: it finds the script's one unpickling call
    assert [c.split(": ")[1] for c in allowed["main/convert_release.py"]] == ["torch.load(weights_only=False)"]


def test_the_scan_catches_the_usual_forms(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        import pickle, torch, numpy as np
        torch.load("a")
        torch.load("b", weights_only=False)
        flag = False
        torch.load("c", map_location="cpu", weights_only=flag)
        pickle.load(open("d", "rb"))
        np.load("e.npy", allow_pickle=True)
        torch.load("f", weights_only=True)
    """))
    assert [line.split(":")[0] for line in unpickling_calls(bad)] == ["3", "4", "6", "7", "8"]


# ----------------------------------------------------------------------------------------------------------------
# The metanetwork mapping
# ----------------------------------------------------------------------------------------------------------------
def test_mygnn_maps_onto_metanetwork_and_computes_the_same_function():
    codec = tiny_codec()
    sd = authors_mygnn(num_layer=2, hiddim=6, node_dim=codec.node_dim, edge_dims=(9,), seed=1)
    imported = import_authors_metanetwork(sd, codec.node_dim, codec.edge_dims, RATIOS, source="mn.pth")
    assert imported.options == {"num_layer": 2, "hiddim": 6, **RATIOS}
    assert imported.ratio_sources == {k: f"module attribute '{k}'" for k in RATIOS}
    assert imported.dropped == [f"mlps.{layer}.0.{p}" for layer in range(2) for p in ("weight", "bias")]
    assert imported.renamed["nodeEnc.weight"] == "node_enc.weight"
    assert imported.renamed["edgeEnc.bias"] == "edge_enc.kernel.bias"
    assert imported.renamed["edgeDec.3.weight"] == "edge_dec.kernel.3.weight"
    assert imported.renamed["nodeDec.1.bias"] == "node_dec.1.bias"
    assert imported.renamed["convs.1.lin3.0.weight"] == "convs.1.lin3.0.weight"
    assert imported.renamed["edgeInverter"] == "inv"
    assert set(imported.renamed) | set(imported.dropped) == set(sd)
    net = imported.build()
    for key, new in imported.renamed.items():
        assert torch.equal(net.state_dict()[new], sd[key]), key
    model = build_model("resnet8", 10, in_channels=1).eval()
    graph = codec.encode(model)
    with torch.no_grad():
        out = net(graph)
        node_ref, edge_ref = paper_forward(sd, RATIOS, graph.x, graph.edge_index, graph.edge_attr__kernel)
    assert torch.allclose(out.x, node_ref, atol=1e-5, rtol=0)
    assert torch.allclose(out.edge_attr__kernel, edge_ref, atol=1e-5, rtol=0)
    assert (out.x - graph.x).abs().max() > 1e-3  # the ratios moved the weights: the comparison is not vacuous


def test_sizes_are_read_off_the_tensors():
    sd = authors_mygnn(num_layer=3, hiddim=10, node_dim=5, edge_dims=(9,))
    assert authors_sizes(sd) == {"hiddim": 10, "node_dim": 5, "num_layer": 3, "edge_sizes": [9], "edge_mid": {}}
    vit = authors_mygnn(num_layer=1, hiddim=4, node_dim=6, edge_dims=(256, 3, 1), mid=64)
    assert authors_sizes(vit)["edge_mid"] == {256: 64} and authors_sizes(vit)["edge_sizes"] == [256, 3, 1]


def test_per_size_encoders_of_the_imagenet_classes_map_by_feature_size():
    sd = authors_mygnn(num_layer=1, hiddim=4, node_dim=8, edge_dims=(49, 9, 1))
    imported = import_authors_metanetwork(sd, 8, {"k7x7": 49, "k3x3": 9, "k1x1": 1}, RATIOS)
    assert imported.renamed["edgeEnc_49.weight"] == "edge_enc.k7x7.weight"
    assert imported.renamed["edgeDec_1.3.bias"] == "edge_dec.k1x1.3.bias"
    imported.build()
    vit = authors_mygnn(num_layer=1, hiddim=4, node_dim=6, edge_dims=(256, 3, 1), mid=64)
    imported = import_authors_metanetwork(vit, 6, {"patch": 256, "qkv": 3, "linear": 1}, RATIOS)
    assert imported.options["edge_mid_dims"] == {"patch": 64}
    assert imported.renamed["edgeEnc_256.2.weight"] == "edge_enc.patch.2.weight"
    assert imported.renamed["edgeDec_256.5.weight"] == "edge_dec.patch.5.weight"
    imported.build()


def test_residual_ratios_from_buffers_attributes_or_nowhere():
    codec = tiny_codec()
    sd = authors_mygnn(node_dim=codec.node_dim)
    with pytest.raises(AuthorsMetanetworkError, match="plain module attributes"):
        import_authors_metanetwork(sd, codec.node_dim, codec.edge_dims, {}, source="mn.pth")
    buffers = OrderedDict(sd, node_res_ratio=torch.tensor(0.05), edge_res_ratio=torch.tensor(0.07))
    imported = import_authors_metanetwork(buffers, codec.node_dim, codec.edge_dims, {})
    assert imported.options["node_res_ratio"] == pytest.approx(0.05)
    assert imported.ratio_sources["edge_res_ratio"] == "state-dict entry 'edge_res_ratio'"
    with pytest.raises(AuthorsMetanetworkError, match="0.3 as a module attribute"):
        import_authors_metanetwork(buffers, codec.node_dim, codec.edge_dims, RATIOS)


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.update(edgeInverter=-sd["edgeInverter"]), "edgeInverter is not"),
    (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), "keys no authors' metanetwork has: extra.weight"),
    (lambda sd: sd.pop("convs.1.downlin.bias"), "missing convs.1.downlin.bias"),
    (lambda sd: sd.pop("nodeEnc.weight"), "no nodeEnc.weight"),
    (lambda sd: sd.update({"convs.1.lin1.0.weight": torch.zeros(6, 5)}), "wrong shapes convs.1.lin1.0.weight"),
])
def test_broken_authors_state_dicts_are_refused(change, match):
    codec = tiny_codec()
    sd = authors_mygnn(node_dim=codec.node_dim)
    change(sd)
    with pytest.raises(AuthorsMetanetworkError, match=match) as info:
        import_authors_metanetwork(sd, codec.node_dim, codec.edge_dims, RATIOS, source="rel/metanetwork.pth")
    assert "rel/metanetwork.pth" in str(info.value)


def test_metanetwork_of_another_architecture_names_both_layouts():
    codec = tiny_codec()  # a ResNet: 8-dim nodes
    vgg_sized = authors_mygnn(node_dim=5)
    with pytest.raises(AuthorsMetanetworkError) as info:
        import_authors_metanetwork(vgg_sized, codec.node_dim, codec.edge_dims, RATIOS, source="x/metanetwork.pth",
                                   target="task resnet56_on_CIFAR10 (resnet56)")
    message = str(info.value)
    assert "x/metanetwork.pth" in message and "5-dim node features" in message
    assert "task resnet56_on_CIFAR10 (resnet56)" in message and "8-dim nodes" in message and "'kernel': 9" in message
    imagenet = authors_mygnn(node_dim=8, edge_dims=(49, 9, 1))
    with pytest.raises(AuthorsMetanetworkError, match=r"edge types of sizes \[49, 9, 1\]"):
        import_authors_metanetwork(imagenet, codec.node_dim, codec.edge_dims, RATIOS)


# ----------------------------------------------------------------------------------------------------------------
# The model mappings (authors' and Torch-Pruning's key names are ours)
# ----------------------------------------------------------------------------------------------------------------
def test_authors_resnet56_at_any_widths_loads_unchanged():
    widths = [12] + [7, 12] * 9 + [20, 26] + [11, 26] * 8 + [33, 50] + [40, 50] * 8  # init-pruned, stages coupled
    sd = random_tensors(authors_resnet_keys(56, widths, 3, 10))
    model, spec = external_model("resnet56", sd, "final/r56/model.pth", "generate_dataset.resnet_family.MyResNet")
    assert spec == {"name": "resnet56", "num_classes": 10, "in_channels": 3, "widths": widths}
    assert list(model.state_dict()) == list(sd)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_authors_vgg19_at_any_widths_loads_unchanged():
    widths = [20, 22, 40, 44, 80, 90, 100, 110, 150, 160, 170, 180, 190, 200, 210, 220]
    sd = random_tensors(authors_vgg19_keys(widths, 100))
    model, spec = external_model("vgg19", OrderedDict((f"module.{k}", v) for k, v in sd.items()), "vgg.pth")
    assert spec["widths"] == widths and spec["num_classes"] == 100
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_another_architecture_is_named_in_the_error():
    vgg = random_tensors(authors_vgg19_keys([8] * 16, 100))
    with pytest.raises(ExternalModelError) as info:
        external_model("resnet56", vgg, "final/resnet56_on_CIFAR10/m/reproduce_0/model.pth",
                       "generate_dataset.VGG_family.VGG")
    message = str(info.value)
    assert "final/resnet56_on_CIFAR10/m/reproduce_0/model.pth" in message
    assert "expected the weights of a resnet56 (it held a VGG" in message and "['vgg19']" in message
    r110 = random_tensors(authors_resnet_keys(110, [16] + [16, 16] * 18 + [32, 32] * 18 + [64, 64] * 18, 3, 10))
    with pytest.raises(ExternalModelError, match=r"resnet110"):
        external_model("resnet56", r110, "model.pth")


@pytest.mark.parametrize("name, shapes, classes", [
    ("resnet56", authors_resnet_keys(56, [16] + [16, 16] * 9 + [32, 32] * 9 + [64, 64] * 9, 3, 10), 10),
    ("vgg19", authors_vgg19_keys([64, 64, 128, 128] + [256] * 4 + [512] * 8, 100), 100),
])
def test_torch_pruning_base_model_loads_through_task_pretrained(tmp_path, name, shapes, classes):
    """Torch-Pruning's released cifar10_resnet56.pth / cifar100_vgg19.pth are plain state dicts of resnet_tiny /
    vgg19_bn, whose keys are the authors' (the same files): task.pretrained loads them weights-only."""
    sd = random_tensors(shapes, seed=3)
    path = tmp_path / f"cifar_{name}.pth"
    torch.save(sd, path)
    model = build_model(name, classes)
    assert load_pretrained(model, name, path) == path.resolve()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    record = convert_script.convert_model_file(path, {"resnet56": "resnet56_on_CIFAR10",
                                                      "vgg19": "VGG19_on_CIFAR100"}[name], tmp_path / "out")
    assert record["unpickled"] is False and record["files"]["model.pt"]["sha256"] == sha256_of(path)
    loaded, checkpoint = load_model(tmp_path / "out" / "model.pt")
    assert checkpoint["source"]["source"] == str(path.resolve())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


def test_cifar_tasks_offer_task_pretrained():
    for task in ("resnet56_on_CIFAR10", "VGG19_on_CIFAR100"):
        cfg = convert_script.compose_task(task)
        assert "pretrained" in cfg.task and cfg.task.pretrained is None


# ----------------------------------------------------------------------------------------------------------------
# The conversion script: release folders, errors, the recorded layout
# ----------------------------------------------------------------------------------------------------------------
def state_dict_release(folder: Path, model_sd=None, mn_sd=None) -> Path:
    """A reproduce folder whose files are plain state dicts (the authors' pruning_final also accepts an
    OrderedDict model.pth); nothing to unpickle."""
    folder.mkdir(parents=True, exist_ok=True)
    codec = tiny_codec()
    if model_sd is None:
        torch.manual_seed(0)
        model_sd = build_model("resnet8", 10, in_channels=1).state_dict()
    torch.save(OrderedDict(model_sd), folder / "model.pth")
    torch.save(mn_sd if mn_sd is not None else authors_mygnn(node_dim=codec.node_dim), folder / "metanetwork.pth")
    return folder


def test_state_dict_release_converts_and_records_the_legacy_layout(tmp_path):
    folder = state_dict_release(tmp_path / "final" / "resnet20_on_digits" / "m" / "reproduce_3")
    record = convert_script.convert_release(folder, None, False, None, tmp_path / "out", TINY_TASK[1], epoch=5,
                                            ratios=RATIOS)
    assert record["task"] == "resnet20_on_digits"  # from the path
    assert record["unpickled"] is False
    mn_info = record["files"]["metanetwork.pt"]
    assert mn_info["sha256"] == sha256_of(folder / "metanetwork.pth")
    assert mn_info["dropped_keys"] == [f"mlps.{i}.0.{p}" for i in range(2) for p in ("weight", "bias")]
    assert mn_info["layout"]["legacy_fc_permutation"] is True
    assert json.loads((tmp_path / "out" / "conversion.json").read_text()) == json.loads(json.dumps(record))
    assert all("codec.legacy_fc_permutation=true" in line for line in record["final_runs"])
    model, _ = load_model(tmp_path / "out" / "model.pt")
    _net, checkpoint = load_metanetwork(tmp_path / "out" / "metanetwork.pt",
                                        GraphCodec(model, legacy_fc_permutation=True))
    assert checkpoint["spec"]["layout"]["legacy_fc_permutation"] is True and checkpoint["spec"]["epoch"] == 5
    assert checkpoint["spec"]["options"] == {"num_layer": 2, "hiddim": 6, **RATIOS}
    assert checkpoint["dropped_keys"] == mn_info["dropped_keys"]
    with pytest.raises(LayoutMismatchError, match="legacy_fc_permutation"):
        load_metanetwork(tmp_path / "out" / "metanetwork.pt", GraphCodec(model))


def test_missing_file_names_the_file_and_what_a_release_holds(tmp_path):
    folder = state_dict_release(tmp_path / "reproduce_0")
    (folder / "metanetwork.pth").unlink()
    with pytest.raises(ReleaseError) as info:
        convert_script.convert_release(folder, None, False, "resnet20_on_digits", tmp_path / "out", TINY_TASK[1])
    message = str(info.value)
    assert str(folder / "metanetwork.pth") in message and "meta-trained metanetwork (MyGNN)" in message
    assert "found model.pth" in message
    with pytest.raises(ReleaseError, match="no such folder"):
        convert_script.convert_release(tmp_path / "nope", None, False, "resnet20_on_digits")


def test_pickled_module_needs_trust_and_the_authors_code(tmp_path):
    folder = state_dict_release(tmp_path / "reproduce_0")
    torch.save(build_model("resnet8", 10, in_channels=1), folder / "model.pth")  # a whole pickled module
    with pytest.raises(ReleaseError) as info:
        convert_script.convert_release(folder, None, False, "resnet20_on_digits", tmp_path / "out", TINY_TASK[1])
    assert str(folder / "model.pth") in str(info.value) and "--trust-pickles" in str(info.value)
    assert "runs code stored in the file" in str(info.value)
    with pytest.raises(ReleaseError, match="pass --code"):
        convert_script.convert_release(folder, None, True, "resnet20_on_digits", tmp_path / "out", TINY_TASK[1])
    assert not (tmp_path / "out").exists()


def test_model_of_another_architecture_is_refused_with_the_file_named(tmp_path):
    vgg = random_tensors(authors_vgg19_keys([8] * 16, 10))
    folder = state_dict_release(tmp_path / "reproduce_0", model_sd=vgg)
    with pytest.raises(ReleaseError) as info:
        convert_script.convert_release(folder, None, False, "resnet20_on_digits", tmp_path / "out", TINY_TASK[1],
                                       ratios=RATIOS)
    assert str((folder / "model.pth").resolve()) in str(info.value)
    assert "expected the weights of a resnet8" in str(info.value) and "task resnet20_on_digits" in str(info.value)


def test_metanetwork_of_another_task_is_refused_with_the_file_named(tmp_path):
    folder = state_dict_release(tmp_path / "reproduce_0", mn_sd=authors_mygnn(node_dim=5))  # VGG-sized nodes
    with pytest.raises(ReleaseError) as info:
        convert_script.convert_release(folder, None, False, "resnet20_on_digits", tmp_path / "out", TINY_TASK[1],
                                       ratios=RATIOS)
    message = str(info.value)
    assert str((folder / "metanetwork.pth").resolve()) in message
    assert "5-dim node features" in message and "task resnet20_on_digits (resnet8)" in message


def test_script_refuses_an_unknown_task_and_exits_2_with_one_message(tmp_path, capsys):
    folder = state_dict_release(tmp_path / "reproduce_0")
    assert convert_script.main([str(folder), "--task", "resnet56_on_MNIST"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'resnet56_on_MNIST'") and "resnet56_on_CIFAR10" in err


# ----------------------------------------------------------------------------------------------------------------
# End to end: a release of pickled modules (a stand-in package with the authors' module and class names) ->
# conversion in a child process -> pruning_final from the converted files
# ----------------------------------------------------------------------------------------------------------------
STAND_IN = {
    "nn/__init__.py": "",
    "nn/GNN.py": '''
        import torch
        from torch import nn


        class _Layer(nn.Module):  # parameters of one message-passing layer (reference §5.1)
            def __init__(self, h):
                super().__init__()
                for k in range(1, 5):
                    setattr(self, f"lin{k}", nn.Sequential(nn.Linear(h, h), nn.SiLU()))
                self.downlin = nn.Linear(4 * h, h)


        class MyGNN(nn.Module):  # the parameter layout of reference §5.2; no forward needed here
            def __init__(self, num_layer, hiddim, in_node_dim, in_edge_dim, node_res_ratio, edge_res_ratio):
                super().__init__()
                self.node_res_ratio, self.edge_res_ratio, self.num_layer = node_res_ratio, edge_res_ratio, num_layer
                self.nodeEnc = nn.Linear(in_node_dim, hiddim)
                self.convs = nn.ModuleList([_Layer(hiddim) for _ in range(num_layer)])
                self.norm = nn.LayerNorm(hiddim, elementwise_affine=False)
                self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(hiddim, hiddim), nn.SiLU())
                                           for _ in range(num_layer)])
                self.edgeEnc = nn.Linear(in_edge_dim, hiddim)
                inv = torch.ones(hiddim)
                inv[hiddim // 2:] = -1
                self.register_buffer("edgeInverter", inv)
                self.edgeDec = nn.Sequential(nn.LayerNorm(hiddim, elementwise_affine=False), nn.Linear(hiddim, hiddim),
                                             nn.SiLU(), nn.Linear(hiddim, in_edge_dim))
                self.nodeDec = nn.Sequential(nn.LayerNorm(hiddim, elementwise_affine=False), nn.Linear(hiddim, hiddim),
                                             nn.SiLU(), nn.Linear(hiddim, in_node_dim))
    ''',
    "generate_dataset/__init__.py": "",
    "generate_dataset/resnet_family.py": '''
        from torch import nn


        class BasicBlock(nn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(cout)
                self.relu = nn.ReLU(inplace=True)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(cout)
                self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                                   if stride != 1 else None)


        class ResNet(nn.Module):  # depth 8, one block per stage, the key layout of reference §3.1
            def __init__(self, in_channels, num_classes):
                super().__init__()
                self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
                self.bn1 = nn.BatchNorm2d(16)
                self.relu = nn.ReLU(inplace=True)
                self.layer1 = nn.Sequential(BasicBlock(16, 16, 1))
                self.layer2 = nn.Sequential(BasicBlock(16, 32, 2))
                self.layer3 = nn.Sequential(BasicBlock(32, 64, 2))
                self.avgpool = nn.AvgPool2d(2)
                self.fc = nn.Linear(64, num_classes)
    ''',
    "make_release.py": '''
        import importlib
        import sys
        from pathlib import Path

        import torch

        # as in the authors' environment: their packages first, this project's installed ones out of the way
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
        ResNet = importlib.import_module("generate_dataset.resnet_family").ResNet
        MyGNN = importlib.import_module("nn.GNN").MyGNN

        torch.manual_seed(0)
        folder = sys.argv[1]
        model = ResNet(1, 10)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
        torch.save(model, f"{folder}/model.pth")
        torch.save(MyGNN(2, 8, 8, 9, 0.5, 0.5), f"{folder}/metanetwork.pth")
    ''',
}


@pytest.fixture(scope="module")
def pickled_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors_release")
    code = root / "MetaPruning"
    for rel, text in STAND_IN.items():
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(textwrap.dedent(text))
    folder = root / "final" / "resnet20_on_digits" / "group_l2_norm_max_normalizer" / "reproduce_0"
    folder.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-I", str(code / "make_release.py"), str(folder)], capture_output=True,
                          text=True, cwd=code)
    assert done.returncode == 0, done.stderr
    return root, code, folder


@pytest.mark.slow
def test_pickled_release_converts_in_a_child_process_and_runs_pruning_final(pickled_release, tmp_path):
    _root, code, folder = pickled_release
    out = tmp_path / "converted"
    args = [str(folder), "--code", str(code), "--trust-pickles", "--out", str(out), "--override", "task.model=resnet8"]
    done = subprocess.run([sys.executable, str(REPO / "main" / "convert_release.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "runs code stored in them" in done.stderr and "dropped (unused by MyGNN's forward)" in done.stdout
    record = json.loads((out / "conversion.json").read_text())
    assert record["unpickled"] is True and record["task"] == "resnet20_on_digits"
    mn = record["files"]["metanetwork.pt"]
    assert mn["class"] == "nn.GNN.MyGNN"
    assert record["files"]["model.pt"]["class"] == "generate_dataset.resnet_family.ResNet"
    assert mn["options"] == {"num_layer": 2, "hiddim": 8, "node_res_ratio": 0.5, "edge_res_ratio": 0.5}
    assert mn["residual_ratios_read_from"] == {k: f"module attribute '{k}'" for k in RATIOS}
    assert mn["sha256"] == sha256_of(folder / "metanetwork.pth")

    base = ["run=pruning_final", f"final.model={out / 'model.pt'}", f"final.metanetwork={out / 'metanetwork.pt'}"]
    with pytest.raises(LayoutMismatchError, match="legacy_fc_permutation"):
        recorded(final.pruning_final, tiny_cfg(base), tmp_path / "refused")
    summary, _model = recorded(final.pruning_final, tiny_cfg([*base, "codec.legacy_fc_permutation=true"]),
                               tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metanetwork"] == str((out / "metanetwork.pt").resolve())
    assert results["source_model"] == str((out / "model.pt").resolve())
    assert results["speed_up"] >= 2.0 and "metanetwork" in {s["stage"] for s in results["stages"]}
    assert summary["pruned_acc"] == results["pruned_acc"]
