"""Rebuildable architectures: torch-pruning round trips, specs, structure, errors, reference sizes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx
import torch_pruning as tp
import torchvision
from torch import nn

from generate_dataset.models import (
    ArchitectureMismatchError,
    UnknownModelError,
    build_model,
    list_models,
    model_from_state_dict,
    model_spec,
    register_model,
)
from generate_dataset.models.registry import _template


def _small(name: str, divisor: int) -> list[int]:
    """The default widths of ``name`` divided by ``divisor`` (at least 2)."""
    return [max(2, w // divisor) for w in _template(name).widths]


def _classifier(model: nn.Module) -> nn.Module:
    return model.get_submodule(model.classifier_key.rsplit(".", 1)[0])


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Give every layer and channel a different scale, and BN non-trivial running stats.

    Makes magnitude-based global pruning non-uniform and makes eval-mode output comparisons meaningful.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.numel() == 0:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            if p.dim() >= 2:  # per-output-row scale in [0.05, 2]
                scale = 0.05 + 1.95 * torch.rand(p.shape[0], generator=gen)
                p.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.num_batches_tracked.fill_(7)


# name, num_classes, width divisor, input shape
CASES = [
    ("resnet8", 10, 2, (2, 3, 32, 32)),
    ("resnet20", 10, 2, (2, 3, 32, 32)),
    ("vgg19", 100, 8, (2, 3, 32, 32)),
    ("resnet18", 10, 8, (2, 3, 64, 64)),
    ("resnet50", 10, 16, (2, 3, 64, 64)),
    ("vit_tiny", 10, 1, (2, 3, 32, 32)),
]


def _prune(name: str, model: nn.Module, example: torch.Tensor) -> None:
    """Global group-magnitude pruning in 2 steps (torch-pruning 1.6.1), classifier ignored by identity."""
    kwargs = {}
    if name.startswith("vit"):
        heads = model.encoder.layers[0].self_attention.num_heads
        kwargs = dict(
            unwrapped_parameters=[(model.class_token, 2), (model.encoder.pos_embedding, 2)],
            round_to=heads,
            # Force the residual-stream (hidden dim) group to shrink too, not only the MLPs.
            pruning_ratio_dict={model.conv_proj: 0.5},
        )
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="max"),
        global_pruning=True,
        pruning_ratio=0.45,
        max_pruning_ratio=0.9,
        iterative_steps=2,
        ignored_layers=[_classifier(model)],
        **kwargs,
    )
    for _ in range(2):
        pruner.step()
    if name.startswith("vit"):
        model.hidden_dim = model.conv_proj.out_channels


@pytest.mark.parametrize("name,num_classes,divisor,shape", CASES, ids=[c[0] for c in CASES])
def test_pruned_state_dict_rebuilds_exactly(name, num_classes, divisor, shape):
    torch.manual_seed(0)
    model = build_model(name, num_classes, widths=_small(name, divisor))
    _randomize(model, seed=1)
    model.eval()
    example = torch.randn(*shape)
    before = model.widths
    _prune(name, model, example)
    after = model.widths
    ratios = [a / b for a, b in zip(after, before)]
    assert len(set(ratios)) > 2, f"pruning should be non-uniform across layers, got ratios {ratios}"
    assert any(r < 1 for r in ratios)
    if name.startswith("vit"):
        assert after[0] < before[0], "the hidden dim itself should have been pruned"

    state = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = model_from_state_dict(name, state, num_classes)
    assert not rebuilt.training
    assert type(rebuilt) is type(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(example), model(example))
    assert rebuilt.widths == after

    spec = model_spec(name, model, num_classes)
    spec = json.loads(json.dumps(spec))  # JSON-serialisable and unchanged by a round trip
    assert spec == {"name": name, "num_classes": num_classes, "in_channels": 3, "widths": after}
    fresh = build_model(**spec)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert model_spec(name, state, num_classes) == spec  # also from a bare state dict


def test_projection_shortcut_survives_coinciding_stage_widths():
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    _randomize(model, seed=2)
    model.eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    # Shrink layer2's residual group from 32 to 16 channels: now equal to layer1's width.
    dg.get_pruning_group(model.layer2[0].conv2, tp.prune_conv_out_channels, idxs=list(range(0, 32, 2))).prune()
    assert model.layer2[0].conv2.out_channels == model.layer1[0].conv2.out_channels == 16
    state = model.state_dict()
    rebuilt = model_from_state_dict("resnet20", state, 10)
    assert isinstance(rebuilt.layer2[0].downsample, nn.Sequential)
    assert rebuilt.layer2[1].downsample is None and rebuilt.layer1[0].downsample is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # Built directly with all stage widths equal, the projections are still where the unpruned net has them.
    flat = build_model("resnet20", 10, widths=[8] * 19)
    projections = [n for n, _ in flat.named_modules() if n.endswith("downsample")]
    assert projections == ["layer2.0.downsample", "layer3.0.downsample"]


def test_coupled_widths_are_validated():
    widths = [16] * 19
    widths[4] = 12  # layer1.1 output differs from the stem / layer1.0 output
    with pytest.raises(ValueError, match="identity shortcuts"):
        build_model("resnet20", 10, widths=widths)
    with pytest.raises(ValueError, match="needs 19 widths"):
        build_model("resnet20", 10, widths=[16] * 5)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_model("vit_tiny", 10, widths=[15, 32, 32])
    r18 = [64] * 17
    r18[16] = 32  # last block of layer4 differs from the first
    with pytest.raises(ValueError, match="layer4"):
        build_model("resnet18", 10, widths=r18)


def test_wrong_architecture_state_dicts_raise_clear_errors():
    small20 = build_model("resnet20", 10, widths=_small("resnet20", 4)).state_dict()
    with pytest.raises(ArchitectureMismatchError, match="resnet56") as err:
        model_from_state_dict("resnet56", small20, 10)
    assert "layer1.3.conv1.weight" in str(err.value) and "resnet20" in str(err.value)  # missing key + suggestion

    vgg = build_model("vgg19", 10, widths=_small("vgg19", 16)).state_dict()
    with pytest.raises(ArchitectureMismatchError, match="resnet20") as err:
        model_from_state_dict("resnet20", vgg, 10)
    assert "block0.0.weight" in str(err.value) and "vgg19" in str(err.value)

    with pytest.raises(ArchitectureMismatchError, match="10 classes"):
        model_from_state_dict("resnet20", small20, 100)

    ddp = {f"module.{k}": v for k, v in small20.items()}
    with pytest.raises(ArchitectureMismatchError, match="module."):
        model_from_state_dict("resnet20", ddp, 10)

    # Right keys, impossible shapes: a clear error, not a load_state_dict traceback.
    bad = dict(small20)
    bad["layer1.0.bn2.weight"] = torch.ones(3)
    with pytest.raises(ArchitectureMismatchError, match="resnet20"):
        model_from_state_dict("resnet20", bad, 10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownModelError) as err:
        build_model("resnet57", 10)
    assert isinstance(err.value, (KeyError, ValueError))
    msg = str(err.value)
    assert all(n in msg for n in ("resnet56", "vgg19", "vit_b_16")) and "Did you mean" in msg
    with pytest.raises(ValueError):
        model_from_state_dict("nope", {}, 10)


def test_registry_names_and_duplicate_registration():
    names = list_models()
    for required in ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg19",
                     "resnet18", "resnet50", "vit_b_16", "vit_tiny"):
        assert required in names
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet56")(lambda num_classes, widths=None, in_channels=3: None)


def test_reference_sizes():
    resnet56 = build_model("resnet56", 10).eval()
    macs, params, layer_macs, _ = tp.utils.count_ops_and_params(
        resnet56, torch.randn(1, 3, 32, 32), layer_wise=True
    )
    assert params == 855_770
    conv_macs = sum(v for m, v in layer_macs.items() if isinstance(m, nn.Conv2d))
    assert abs(conv_macs / 125.5e6 - 1) < 0.01  # the paper's 125.5M counts convolutions
    # Reference counting (batch 1): BN and the mid-block ReLU modules are counted, the post-add F.relu is not.
    assert macs == 127_115_914
    assert sum(p.numel() for p in build_model("resnet110", 10).parameters()) == 1_730_714
    assert sum(p.numel() for p in build_model("vgg19", 100).parameters()) == 20_086_692
    # torchvision models: same parameter counts, key names and shapes as torchvision's own (meta: free).
    for name, ref_fn in (("resnet50", torchvision.models.resnet50), ("vit_b_16", torchvision.models.vit_b_16)):
        with torch.device("meta"):
            ours, ref = build_model(name, 1000), ref_fn()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_torchvision_state_dicts_load_with_identical_outputs():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=7).eval()
    _randomize(ref, seed=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model_from_state_dict("resnet18", ref.state_dict(), 7)(x), ref(x))
    vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).eval()
    _randomize(vit, seed=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model_from_state_dict("vit_tiny", vit.state_dict(), 5)(x), vit(x))
    # Legacy torchvision names (mlp.linear_1 / mlp.linear_2) and absent num_batches_tracked still load.
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
              for k, v in vit.state_dict().items()}
    assert any("linear_1" in k for k in legacy)
    with torch.no_grad():
        assert torch.equal(model_from_state_dict("vit_tiny", legacy, 5)(x), vit(x))
    no_nbt = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert model_spec("resnet18", no_nbt, 7)["widths"] == build_model("resnet18", 7).widths
    model_from_state_dict("resnet18", no_nbt, 7)


@pytest.mark.parametrize("name,divisor,size", [("resnet20", 4, 32), ("vgg19", 16, 32), ("resnet18", 16, 64)])
def test_fx_traceable(name, divisor, size):
    model = build_model(name, 10, widths=_small(name, divisor)).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_vgg_pool3_quirk():
    model = build_model("vgg19", 10, widths=_small("vgg19", 16)).eval()
    traced = torch.fx.symbolic_trace(model)  # the runtime condition survives tracing
    seen = []
    # block4's first conv is a leaf module shared by the traced copy, so the hook fires for both.
    model.block4[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    for size in (32, 64, 48):
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
            traced(torch.randn(1, 3, size, size))
    # 32: no pool3, blocks 3 and 4 at 4x4; 64: pool3 runs (8x8 -> 4x4); 48: no pool3 (6x6).
    assert seen == [(4, 4), (4, 4), (4, 4), (4, 4), (6, 6), (6, 6)]


@pytest.mark.parametrize("name,divisor,size", [("resnet8", 4, 28), ("vgg19", 16, 28), ("resnet18", 16, 32),
                                               ("vit_tiny", 1, 32)])
def test_in_channels(name, divisor, size):
    model = build_model(name, 10, widths=_small(name, divisor), in_channels=1).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    spec = model_spec(name, model, 10)
    assert spec["in_channels"] == 1
    rebuilt = model_from_state_dict(name, model.state_dict(), 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_cifar_resnet_accepts_8x8_inputs():
    model = build_model("resnet8", 10, widths=_small("resnet8", 4), in_channels=1).eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
