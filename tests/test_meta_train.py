"""Meta-training: exact one-backward gradient, the regulariser vs torch-pruning, CE/regulariser balance,
exact resumption, NaN stop, the per-epoch diagnostics, the batch stream (one loader iterator per epoch, the
batches of one iterator per pass), and a run composed through Hydra on a tiny store."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_loaders.store import DataModelStore, ShardWriter
from generate_dataset.models import build_model, model_spec
from helpers import METHOD, compose_cfg
from nn.apply import LayoutMismatchError, build_metanetwork, load_metanetwork
from nn.graph import GraphCodec
from pruning.regularizer import build_regularizer, group_gamma, relative_change, small_share, without_scale_component
from stages import artifacts, execute, meta_train, meta_train_metrics, meta_train_resume
from stages.common import codec_options
from training import meta_gradient

WIDTHS = [8, 5, 8, 7, 16, 3, 32]  # resnet8, non-uniform as after pruning
TINY_NET = {"num_layer": 2, "hiddim": 8, "node_res_ratio": 0.01, "edge_res_ratio": 0.01}


pytestmark = pytest.mark.usefixtures("one_thread")


def data_model(seed, widths=WIDTHS, dtype=torch.float32, in_channels=1):
    torch.manual_seed(seed)
    model = build_model("resnet8", 10, widths=widths, in_channels=in_channels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial BN so every group has distinct importances
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, std=0.1)
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
            torch.nn.init.normal_(m.running_mean, std=0.1)
    return model.to(dtype).eval()


class _Settings:
    pruner_reg = 10.0


def make_entry(model, dtype=torch.float32):
    return meta_gradient.build_entry(0, model, torch.ones(1, 1, 8, 8, dtype=dtype), METHOD, _Settings,
                                     input_shape=(1, 8, 8))


def tiny_metanetwork(entry, seed=1, dtype=torch.float32):
    torch.manual_seed(seed)
    return build_metanetwork(entry.codec, TINY_NET).to(dtype)


def grads_of(net):
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


# ------------------------------------------------------------------------------------------------
# The gradient
# ------------------------------------------------------------------------------------------------
def float64_case(seed, num_batches, batch_size):
    """(model, entry, metanetwork, batches) in float64, for gradient comparisons at tight tolerances."""
    model = data_model(seed, dtype=torch.float64)
    entry = make_entry(model, torch.float64)
    net = tiny_metanetwork(entry, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch_size, 1, 8, 8, generator=g, dtype=torch.float64),
                torch.randint(0, 10, (batch_size,), generator=g)) for _ in range(num_batches)]
    return model, entry, net, batches


def test_one_backward_equals_per_batch_retain_graph_reference():
    model, entry, net, batches = float64_case(0, num_batches=3, batch_size=5)

    result = meta_gradient.meta_gradient(net, entry, batches, reference_batches=3, alpha=16.0)
    fast = grads_of(net)

    # the authors' way: a backward through the GNN per batch (retain_graph), then the regulariser's
    net.zero_grad(set_to_none=True)
    generated = entry.codec.decode(net(entry.codec.encode(model)))
    ces = []
    for x, y in batches:
        loss = F.cross_entropy(torch.func.functional_call(model, (entry.buffers, generated), (x,)), y)
        loss.backward(retain_graph=True)
        ces.append(loss.item())
    reg = entry.regularizer.gradient({k: v.detach() for k, v in generated.items()}, alpha=16.0)
    keys = sorted(reg)
    torch.cat([generated[k].flatten() for k in keys]).backward(torch.cat([reg[k].flatten() for k in keys]))
    reference = grads_of(net)

    assert result.batches == 3 and result.ce == pytest.approx(sum(ces) / 3, rel=1e-12)
    assert result.reg > 0
    for name, ref in reference.items():
        assert ref.abs().max() > 0, name  # every parameter gets a gradient
        torch.testing.assert_close(fast[name], ref, rtol=1e-10, atol=1e-12, msg=name)


def test_balance_is_independent_of_batches_per_step():
    _, entry, net, (batch,) = float64_case(1, num_batches=1, batch_size=8)

    def gradient(k, reference_batches):
        net.zero_grad(set_to_none=True)
        meta_gradient.meta_gradient(net, entry, [batch] * k, reference_batches=reference_batches, alpha=16.0)
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    k2, k4 = gradient(2, 100), gradient(4, 100)
    torch.testing.assert_close(k2, k4, rtol=1e-10, atol=1e-12)  # same CE/reg balance with 2 or 4 batches
    # without the scaling (the authors' literal sum) the CE part doubles: the check above can fail
    assert not torch.allclose(gradient(2, None), gradient(4, None), rtol=1e-6)
    # with reference_batches == batches the scaled gradient is the plain sum, the paper's gradient
    torch.testing.assert_close(gradient(4, 4), gradient(4, None), rtol=1e-12, atol=1e-12)


def test_gradient_parts_are_the_ce_and_regulariser_gradients_and_leave_the_step_unchanged():
    _, entry, net, batches = float64_case(2, num_batches=2, batch_size=6)

    def step(diagnostics, prior=None):
        net.zero_grad(set_to_none=True)
        if prior is not None:  # meta_gradient accumulates: a gradient already there must not leak into the parts
            for p in net.parameters():
                p.grad = torch.full_like(p, prior)
        result = meta_gradient.meta_gradient(net, entry, batches, reference_batches=50, alpha=16.0,
                                             diagnostics=diagnostics)
        return result, torch.cat([p.grad.flatten() for p in net.parameters()])

    result, total = step(True, prior=0.25)
    plain, plain_total = step(False, prior=0.25)
    assert torch.equal(total, plain_total)  # the diagnostics never change the step's gradient
    assert math.isnan(plain.grad_ce_norm) and math.isnan(plain.grad_reg_norm)

    # the CE part alone: the same step on a data model whose regulariser contributes nothing
    reg_gradient = entry.regularizer.gradient
    entry.regularizer.gradient = lambda leaves, **kw: {k: torch.zeros_like(v) for k, v in reg_gradient(leaves, **kw).items()}
    try:
        ce_only, ce_total = step(True)
    finally:
        entry.regularizer.gradient = reg_gradient
    _, with_reg = step(True)
    assert result.grad_ce_norm == pytest.approx(ce_total.norm().item(), rel=1e-9)
    assert result.grad_reg_norm == pytest.approx((with_reg - ce_total).norm().item(), rel=1e-9)
    assert ce_only.grad_reg_norm == pytest.approx(0.0, abs=1e-9)
    assert result.grad_ce_norm > 0 and result.grad_reg_norm > 0


# ------------------------------------------------------------------------------------------------
# The regulariser
# ------------------------------------------------------------------------------------------------
def torch_pruning_grads(regularizer, model, alpha, bias):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    regularizer.pruner.regularize(model, alpha=alpha, bias=bias)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("bias", [False, True])
def test_regularizer_equals_torch_pruning_regularize(bias):
    model = data_model(2)
    regularizer = build_regularizer(model, torch.ones(1, 1, 8, 8), METHOD, reg=10.0)
    # "generated" weights: a perturbed copy, so the regulariser must read them, not the model's own
    generated = {k: p.detach() * 1.5 + 0.01 for k, p in model.named_parameters()}
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    mine = regularizer.gradient(generated, alpha=16.0, bias=bias)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), f"{k} was modified"
    own = regularizer.gradient(before, alpha=16.0, bias=bias)
    assert not torch.equal(own["conv1.weight"], mine["conv1.weight"])

    # torch-pruning's regularize on a model holding the generated weights
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(generated[k])
    expected = torch_pruning_grads(regularizer, model, 16.0, bias)
    for k in expected:
        assert torch.equal(mine.get(k, torch.zeros_like(expected[k])), expected[k]), k
    # BN weights, conv weights and the classifier's input columns are pulled; BN biases only with bias=True
    assert mine["layer1.0.bn1.weight"].abs().min() > 0 and mine["conv1.weight"].abs().max() > 0
    assert mine["fc.weight"].abs().max() > 0 and "fc.bias" not in mine
    assert ("layer1.0.bn1.bias" in mine) == bias
    # value: (reg/2) sum gamma w^2 with gamma in [1, alpha]
    value = regularizer.value(generated, mine).item()
    plain = sum(0.5 * 10.0 * (mine[k] / 10.0 * generated[k]).sum().item() for k in mine)
    assert value == pytest.approx(plain, rel=1e-5)


def test_group_gamma():
    torch.testing.assert_close(group_gamma(torch.tensor([1.0, 2.0, 3.0]), 16.0), torch.tensor([16.0, 4.0, 1.0]))
    assert torch.equal(group_gamma(torch.tensor([0.7, 0.7, 0.7]), 16.0), torch.ones(3))
    assert torch.equal(group_gamma(torch.tensor([0.5]), 16.0), torch.ones(1))
    assert torch.equal(group_gamma(torch.tensor([float("nan"), float("nan")]), 16.0), torch.ones(2))


def test_regularizer_is_finite_on_degenerate_groups():
    # layer1.0.conv1 has ONE channel (a group of one), and layer2.0's inner channels all have equal norms
    model = data_model(3, widths=[8, 1, 8, 7, 16, 3, 32])
    with torch.no_grad():
        model.layer2[0].conv1.weight.fill_(0.1)
        model.layer2[0].bn1.weight.fill_(1.0)
        model.layer2[0].conv2.weight.fill_(-0.2)
    regularizer = build_regularizer(model, torch.ones(1, 1, 8, 8), METHOD, reg=10.0)
    expected = torch_pruning_grads(regularizer, model, 16.0, False)
    degenerate = ["layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv2.weight",
                  "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.conv2.weight"]
    for k in degenerate:  # torch-pruning writes NaN there (and the authors drop those whole tensors)
        assert torch.isnan(expected[k]).any(), k
    params = {k: p.detach() for k, p in model.named_parameters()}
    mine = regularizer.gradient(params, alpha=16.0)
    for k, g in mine.items():
        assert torch.isfinite(g).all(), k
    for k in expected:
        if not torch.isnan(expected[k]).any():
            assert torch.equal(mine.get(k, torch.zeros_like(expected[k])), expected[k]), k
    # gamma = 1 in a degenerate group: the plain pull reg * w on its members that no other group touches
    for k in ("layer1.0.bn1.weight", "layer2.0.bn1.weight"):
        torch.testing.assert_close(mine[k], 10.0 * params[k])
    # members shared with a regular group keep that group's part: layer1.0.conv1's input columns
    assert mine["layer1.0.conv1.weight"].abs().min() > 0
    assert mine["layer2.0.conv2.weight"].abs().min() > 0


def test_scale_free_regulariser_gradient_is_the_plain_one_minus_each_tensors_own_direction():
    model = data_model(3, dtype=torch.float64)
    entry = make_entry(model, torch.float64)
    own = {k: p.detach().clone() for k, p in model.named_parameters()}
    plain = entry.regularizer.gradient(own, alpha=16.0)
    free = without_scale_component(plain, own)
    assert free.keys() == plain.keys()
    singled_out = 0
    for key, grad in plain.items():
        w = own[key].double()
        assert float((free[key].double() * w).sum()) == pytest.approx(0.0, abs=1e-9 * float(w.norm() * grad.double().norm()))
        # what is removed is a multiple of the weight: the rest of the plain gradient is untouched
        removed = plain[key].double() - free[key].double()
        coef = float((removed * w).sum() / (w * w).sum())
        torch.testing.assert_close(removed, coef * w)
        singled_out += int(free[key].abs().max() > 1e-6 * grad.abs().max())
    assert singled_out > 0  # gamma differs across channels, so a relative pull remains
    # a whole layer shrunk alike: the plain pull is exactly along the weight (gamma 1 everywhere) -> nothing left
    uniform = {k: 3.0 * w for k, w in own.items()}
    assert all(v.abs().max() < 1e-6 for v in without_scale_component(uniform, own).values())
    # shrink_only: the projected pull where it points towards zero, nothing where it would make a weight grow
    shrink = without_scale_component(plain, own, shrink_only=True)
    for key, grad in free.items():
        w = own[key]
        pulls = grad * w > 0
        torch.testing.assert_close(shrink[key][pulls], grad[pulls])
        assert torch.all(shrink[key][~pulls] == 0)
        assert float((shrink[key] * w).sum()) >= 0
    assert any(bool((g * own[k] < 0).any()) for k, g in free.items())  # scale_free does push some to grow
    zero = {"w": torch.zeros(3)}
    assert torch.equal(without_scale_component({"w": torch.ones(3)}, zero)["w"], torch.ones(3))
    with pytest.raises(ValueError, match="gradient \\(3,\\) but weight \\(4,\\)"):
        without_scale_component({"w": torch.ones(3)}, {"w": torch.ones(4)})


def test_reg_projection_changes_only_the_regulariser_part_of_the_step():
    _, entry, net, batches = float64_case(4, num_batches=2, batch_size=6)

    def step(reg_projection):
        net.zero_grad(set_to_none=True)
        result = meta_gradient.meta_gradient(net, entry, batches, reference_batches=50, alpha=16.0,
                                             reg_projection=reg_projection)
        return result, torch.cat([p.grad.flatten() for p in net.parameters()])

    plain, plain_total = step("none")
    for mode in ("scale_free", "shrink_only"):
        projected, projected_total = step(mode)
        assert projected.reg == plain.reg and projected.ce == plain.ce  # same R and CE: only the pushed gradient
        assert projected.grad_ce_norm == pytest.approx(plain.grad_ce_norm, rel=1e-9)
        assert projected.grad_reg_norm < plain.grad_reg_norm
        assert not torch.allclose(projected_total, plain_total)
    with pytest.raises(ValueError, match="reg_projection='both'"):
        step("both")


def test_unstructured_methods_use_the_sign_regularizer():
    model = data_model(4)
    regularizer = build_regularizer(model, torch.ones(1, 1, 8, 8), {"name": "unstructured_l1_norm",
                                                                     "kind": "unstructured"}, reg=0.1)
    params = {k: p.detach() * 2 for k, p in model.named_parameters()}
    grads = regularizer.gradient(params, alpha=16.0)
    assert sorted(grads) == sorted(k for k in params if k.endswith("weight") and params[k].dim() in (2, 4))
    assert torch.equal(grads["fc.weight"], 0.1 * torch.sign(params["fc.weight"]))
    expected = sum(0.1 * params[k].abs().sum().item() for k in grads)
    assert regularizer.value(params, grads).item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Diagnostics
# ------------------------------------------------------------------------------------------------
# the 3 x 3 channels of layer2.0's output group: out-rows, BN weights and the next layers' in-columns
LAYER2_OUT_ROWS = ("layer2.0.conv2.weight", "layer2.0.downsample.0.weight")
LAYER2_OUT_BN = ("layer2.0.bn2.weight", "layer2.0.downsample.1.weight")
LAYER2_IN_COLUMNS = ("layer3.0.conv1.weight", "layer3.0.downsample.0.weight")


def test_channel_norms_are_the_unnormalised_importance_and_zeroed_channels_are_small():
    model = data_model(5)
    regularizer = build_regularizer(model, torch.ones(1, 1, 8, 8), METHOD, reg=10.0)
    own = {k: p.detach().clone() for k, p in model.named_parameters()}
    per_group = regularizer.channel_norms(own, per_group=True)
    # squared, max-normalised: torch-pruning's group importance of the paper's method (mean, max-normaliser)
    for group, norms in zip(regularizer.pruner._groups, per_group):
        imp = regularizer.pruner.estimate_importance(group)
        torch.testing.assert_close((norms ** 2 / (norms ** 2).max()).float(), imp, rtol=1e-5, atol=1e-7)
    sizes = sorted(len(n) for n in per_group)
    assert sizes == [3, 5, 7, 8, 16, 32]  # every channel of WIDTHS' groups once (the classifier is no root)
    total = sum(sizes)
    # a direct computation for one channel of the 16-channel group (all its members' slices)
    c = 4
    direct = math.sqrt(sum(own[k][c].pow(2).sum().item() for k in LAYER2_OUT_ROWS + LAYER2_OUT_BN)
                       + sum(own[k][:, c].pow(2).sum().item() for k in LAYER2_IN_COLUMNS))
    (norms16,) = [n for n in per_group if len(n) == 16]
    assert norms16[c].item() == pytest.approx(direct, rel=1e-6)
    assert small_share(regularizer.channel_norms(own)) == 0.0  # a random network has no tiny group

    zeroed = {k: v.clone() for k, v in own.items()}
    channels = [1, 7, 12]
    for k in LAYER2_OUT_ROWS + LAYER2_OUT_BN:
        zeroed[k][channels] = 0
    for k in LAYER2_IN_COLUMNS:
        zeroed[k][:, channels] = 0
    assert small_share(regularizer.channel_norms(zeroed)) == pytest.approx(3 / total)
    # only the out-rows zeroed: the BN weights and in-columns keep those channels' group norms large
    partly = {k: own[k].clone() for k in LAYER2_OUT_ROWS}
    for k in LAYER2_OUT_ROWS:
        partly[k][channels] = 0
    assert small_share(regularizer.channel_norms(partly)) == 0.0
    # the model's own weights are read when none are given, and were never changed
    assert torch.equal(regularizer.channel_norms({}), regularizer.channel_norms(own))
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), own[k]), k


def test_small_share_and_relative_change_edge_cases():
    assert small_share(torch.tensor([1.0, 0.01, 0.0101, 0.0])) == pytest.approx(0.5)  # <= 1 % of the global max
    assert small_share(torch.zeros(4)) == 1.0 and small_share(torch.zeros(0)) == 0.0
    old = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    new = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[4.0]])}
    assert relative_change(new, old) == pytest.approx(1 / 5)  # one global norm, not a mean over tensors
    assert relative_change(old, old) == 0.0


def test_unstructured_channel_norms_are_weight_magnitudes():
    model = data_model(6)
    regularizer = build_regularizer(model, torch.ones(1, 1, 8, 8), {"name": "unstructured_l1_norm",
                                                                     "kind": "unstructured"}, reg=0.1)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    params["conv1.weight"][:2] = 0  # 18 weights
    norms = regularizer.channel_norms(params)
    weights = [k for k in params if k.endswith("weight") and params[k].dim() in (2, 4)]
    assert norms.numel() == sum(params[k].numel() for k in weights)
    expected = sum(int((params[k].abs() <= 0.01 * norms.max()).sum()) for k in weights) / norms.numel()
    assert small_share(norms) == pytest.approx(expected) and expected >= 18 / norms.numel()


def test_step_diagnostics_are_those_of_the_generated_weights():
    model = data_model(7)
    entry = make_entry(model)
    batch = [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))]
    own = {k: p.detach().clone() for k, p in model.named_parameters()}
    input_share = small_share(entry.regularizer.channel_norms(own))

    # residual ratios 0: the generated weights are the data model's, whatever the decoders output
    torch.manual_seed(0)
    still = build_metanetwork(entry.codec, {**TINY_NET, "node_res_ratio": 0.0, "edge_res_ratio": 0.0})
    result = meta_gradient.meta_gradient(still, entry, batch, reference_batches=1, alpha=16.0)
    assert result.weight_change == 0.0
    assert result.small_group_share == result.small_group_share_input == input_share
    assert (result.norm_ratio_p10, result.norm_ratio_p50, result.norm_ratio_p90) == (1.0, 1.0, 1.0)

    net = tiny_metanetwork(entry)
    result = meta_gradient.meta_gradient(net, entry, batch, reference_batches=1, alpha=16.0)
    with torch.no_grad():
        generated = entry.codec.decode(net(entry.codec.encode(model)))
    diff = math.sqrt(sum((generated[k].double() - own[k].double()).pow(2).sum().item() for k in generated))
    base = math.sqrt(sum(own[k].double().pow(2).sum().item() for k in generated))
    assert result.weight_change == pytest.approx(diff / base, rel=1e-6) and result.weight_change > 0
    assert result.small_group_share == small_share(entry.regularizer.channel_norms(generated))
    assert result.small_group_share_input == input_share
    ratios = entry.regularizer.channel_norms(generated) / entry.regularizer.channel_norms(own)
    expected = torch.quantile(ratios, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    assert [result.norm_ratio_p10, result.norm_ratio_p50, result.norm_ratio_p90] == pytest.approx(expected)
    plain = meta_gradient.meta_gradient(net, entry, batch, reference_batches=1, alpha=16.0, diagnostics=False)
    assert math.isnan(plain.weight_change) and plain.ce == result.ce and plain.reg == result.reg


def test_norm_ratio_quantiles_tell_a_uniform_shrink_from_singled_out_channels():
    own = torch.linspace(1.0, 2.0, 100, dtype=torch.float64)
    p10, p50, p90 = meta_gradient.norm_ratio_quantiles(0.5 * own, own)
    assert p10 == pytest.approx(0.5) and p90 == pytest.approx(0.5)  # uniform: every channel alike
    selective = own.clone()
    selective[:30] = 0.0  # 30 % of the channels removed, the rest untouched
    p10, p50, p90 = meta_gradient.norm_ratio_quantiles(selective, own)
    assert p10 == 0.0 and p50 == pytest.approx(1.0) and p90 == pytest.approx(1.0)
    own[0] = 0.0  # a channel with no own norm has no ratio: left out, never NaN or inf
    assert all(math.isfinite(q) for q in meta_gradient.norm_ratio_quantiles(selective, own))
    assert all(math.isnan(q) for q in meta_gradient.norm_ratio_quantiles(torch.zeros(3), torch.zeros(3)))
    with pytest.raises(ValueError, match="3 generated norms vs 4"):
        meta_gradient.norm_ratio_quantiles(torch.ones(3), torch.ones(4))


def test_batch_bn_mode_uses_batch_statistics_and_never_touches_the_running_ones():
    model = data_model(11)
    with torch.no_grad():  # running statistics far from any batch's, so the two modes must differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(9.0)
    entry = make_entry(model)
    saved = {k: v.clone() for k, v in entry.buffers.items()}
    batch = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    net = tiny_metanetwork(entry)
    eval_ce = meta_gradient.meta_gradient(net, entry, batch, reference_batches=1, alpha=16.0).ce
    net.zero_grad()
    batch_ce = meta_gradient.meta_gradient(net, entry, batch, reference_batches=1, alpha=16.0, bn_mode="batch").ce
    assert batch_ce != pytest.approx(eval_ce)
    for key, value in entry.buffers.items():  # running stats and the batch counter unchanged
        assert torch.equal(value, saved[key]), key
    assert not model.training
    # batch mode equals a train-mode forward of a copy carrying the generated weights
    with torch.no_grad():
        generated = entry.codec.decode(net(entry.codec.encode(model)))
        copy_ = data_model(11)
        copy_.load_state_dict({**model.state_dict(), **generated})
        copy_.train()
        expected = torch.nn.functional.cross_entropy(copy_(batch[0][0]), batch[0][1]).item()
    assert batch_ce == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="bn_mode"):
        meta_gradient.meta_gradient(net, entry, batch, reference_batches=1, alpha=16.0, bn_mode="train")


def test_settings_errors_name_the_config_key():
    task = OmegaConf.create({"name": "t", "batch_size": 64, "meta_train": {
        "epochs": 1, "lr": 1e-3, "weight_decay": 0.0, "milestones": "3,5", "gamma": 0.1, "pruner_reg": 10.0,
        "alpha": 16.0, "bias": False, "train_split": 0.8}})
    with pytest.raises(KeyError, match=r"configs/task/t\.yaml.*reference_batches"):
        meta_train.MetaTrainSettings.from_task(task)
    task.meta_train.reference_batches = 100
    settings = meta_train.MetaTrainSettings.from_task(task)
    assert settings.milestones == (3, 5) and settings.batch_size == 64 and settings.batches_per_step is None
    task.meta_train.batches_per_step = 0
    with pytest.raises(ValueError, match="batches_per_step"):
        meta_train.MetaTrainSettings.from_task(task)
    task.meta_train.batches_per_step = None


@pytest.mark.parametrize("key, value, message", [
    ("epochs", "abc", r"task\.meta_train\.epochs='abc' is not a valid int"),
    ("epochs", 2.5, r"task\.meta_train\.epochs=2\.5 is not a valid int"),
    ("lr", "fast", r"task\.meta_train\.lr='fast' is not a valid float"),
    ("pruner_reg", float("nan"), r"task\.meta_train\.pruner_reg=nan must be finite"),
    ("milestones", "3,x", r"task\.meta_train\.milestones='3,x'"),
    ("bias", "no", r"task\.meta_train\.bias='no'"),
    ("lr", 0.0, r"lr > 0"),
    ("train_split", 1.5, r"train_split"),
    ("pruner_rg", 1.0, r"unknown key\(s\) task\.meta_train\.pruner_rg"),  # misspelt: refused, not ignored
])
def test_bad_settings_fail_fast_naming_the_key(key, value, message):
    task = OmegaConf.create({"name": "t", "batch_size": 64, "meta_train": {
        "epochs": 1, "lr": 1e-3, "weight_decay": 0.0, "milestones": [3], "gamma": 0.1, "pruner_reg": 10.0,
        "alpha": 16.0, "bias": False, "train_split": 0.8, "reference_batches": 100}})
    meta_train.MetaTrainSettings.from_task(task)  # valid as given
    task.meta_train[key] = value
    with pytest.raises((KeyError, ValueError), match=message):
        meta_train.MetaTrainSettings.from_task(task)


# ------------------------------------------------------------------------------------------------
# The batch stream
# ------------------------------------------------------------------------------------------------
class NoisyDataset(torch.utils.data.Dataset):
    """Item i: (i + augmentation noise from the global torch RNG, i), like a random-crop/flip pipeline."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return torch.full((2,), float(i)) + torch.rand(2), i


def one_iterator_per_pass(loader, counts):
    """The stream as it was before one iterator per epoch: a fresh loader iterator whenever a pass ends (and at
    every epoch start, marked by a count of None); returns each step's batches and the generator's state after."""
    steps, it = [], None
    for count in counts:
        if count is None:
            it = None
            continue
        batches = []
        for _ in range(count):
            if it is None:
                it = iter(loader)
            try:
                batches.append(next(it))
            except StopIteration:
                it = iter(loader)
                batches.append(next(it))
        steps.append((batches, loader.generator.get_state()))
    return steps


def streamed(loader, counts):
    stream, steps = meta_train._BatchStream(loader), []
    for count in counts:
        if count is None:
            stream.restart()
            continue
        steps.append((list(stream.take(count)), loader.generator.get_state()))
    return steps


@pytest.mark.parametrize("size, batch_size", [(10, 4), (12, 4), (3, 5)])
def test_the_stream_gives_the_batches_and_generator_states_of_one_iterator_per_pass(size, batch_size):
    # steps within and across pass boundaries, several passes in one step, epoch restarts (None)
    counts = [1, 3, 5, None, 2, 7, 3, None, 4, 1, 9]
    torch.manual_seed(0)
    expected = one_iterator_per_pass(meta_train.meta_loader(NoisyDataset(size), batch_size, 0, seed=3), counts)
    expected_rng = torch.get_rng_state()
    torch.manual_seed(0)
    got = streamed(meta_train.meta_loader(NoisyDataset(size), batch_size, 0, seed=3), counts)
    assert torch.equal(torch.get_rng_state(), expected_rng)  # the augmentations drew the same random numbers
    assert len(got) == len(expected) == 9
    for (batches, state), (want, want_state) in zip(got, expected):
        assert len(batches) == len(want)
        for (x, y), (wx, wy) in zip(batches, want):
            assert torch.equal(x, wx) and torch.equal(y, wy)  # order and augmentation, bit for bit
        assert torch.equal(state, want_state)  # what a checkpoint saves


def test_the_stream_starts_one_loader_iterator_per_epoch_not_per_pass():
    loader = meta_train.meta_loader(NoisyDataset(6), 4, 1, seed=3)  # a worker process: 2 batches per pass
    stream = meta_train._BatchStream(loader)
    first = list(stream.take(3))
    iterator = stream._it
    assert type(iterator).__name__ == "_MultiProcessingDataLoaderIter"
    second = list(stream.take(4))  # passes 2 to 4 ...
    assert stream._it is iterator  # ... read by the same iterator (its worker started once)
    labels = [y.tolist() for _x, y in first + second]
    for p in range(0, 6, 2):  # every pass covers the split once
        assert sorted(labels[p] + labels[p + 1]) == list(range(6))
    stream.restart()
    list(stream.take(1))
    assert stream._it is not iterator  # a new epoch: a new iterator, as before
    # seeded alike, a stream with workers repeats its batches (augmentation included): resumption stays exact
    again = meta_train._BatchStream(meta_train.meta_loader(NoisyDataset(6), 4, 1, seed=3))
    for (x, y), (wx, wy) in zip(list(again.take(7)), first + second):
        assert torch.equal(x, wx) and torch.equal(y, wy)


# ------------------------------------------------------------------------------------------------
# Runs through Hydra on a tiny store
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    identity = {"task": "resnet20_on_digits", "architecture": "resnet8", "num_classes": 10,
                "method": "group_l2_norm_max_normalizer"}
    writer = ShardWriter(path, 0, identity)
    for position, widths in enumerate([WIDTHS, [8, 6, 8, 4, 16, 5, 32], [8, 3, 8, 7, 16, 8, 32]]):
        model = data_model(10 + position, widths=widths)
        writer.append(position, model.state_dict(), model_spec("resnet8", model, 10), {"test_acc": 0.1}, 1.3,
                      seed=position, config={})
    return path


def run_cfg(store, epochs=2, extra=()):
    return compose_cfg([
        "run=meta_train", "task=resnet20_on_digits", "task.model=resnet8", f"store={store}", "device=cpu",
        f"task.meta_train.epochs={epochs}", "task.meta_train.batches_per_step=2", "task.meta_train.batch_size=32",
        "task.meta_train.milestones=[1]", "task.meta_train.lr=0.01", "task.meta_train.pruner_reg=10", "metanetwork.num_layer=2",
        "metanetwork.hiddim=8", *extra,
    ])


@pytest.fixture(scope="module")
def full_run(store_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    summary = execute(run_cfg(store_dir), run_dir)
    return run_dir, summary


def checkpoint(run_dir, epoch):
    return torch.load(artifacts.checkpoint_path(run_dir, epoch), weights_only=True)


def test_hydra_run_writes_checkpoints_metrics_and_results(full_run, store_dir):
    run_dir, summary = full_run
    assert [p.name for _, p in artifacts.list_checkpoints(run_dir)] == ["epoch_0001.pt", "epoch_0002.pt"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert results["epochs"] == 2 and results["train_data_models"] == [0, 1] and results["val_data_models"] == [2]
    assert results["checkpoints"] == ["checkpoints/epoch_0001.pt", "checkpoints/epoch_0002.pt"]
    assert results["balance"]["reg_per_mean_ce"] == pytest.approx(0.1)
    rows = list(csv.DictReader((run_dir / "meta_train_metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(meta_train_metrics.CSV_COLUMNS)
    assert float(rows[0]["lr"]) == pytest.approx(0.01) and float(rows[1]["lr"]) == pytest.approx(0.001)  # milestone 1
    for r in rows:
        assert math.isfinite(float(r["ce"])) and float(r["reg"]) > 0 and float(r["grad_norm"]) > 0
        for key in meta_gradient.DIAGNOSTIC_COLUMNS:
            assert math.isfinite(float(r[key])), key
        assert 0.0 <= float(r["small_group_share"]) <= 1.0 and float(r["weight_change"]) > 0
    assert (run_dir / meta_train_metrics.DIAGNOSTICS_PNG).stat().st_size > 0
    assert results["diagnostics_png"] == meta_train_metrics.DIAGNOSTICS_PNG
    ck = checkpoint(run_dir, 2)
    assert ck["spec"]["epoch"] == 2 and len(ck["steps"]) == 4  # 2 epochs x 2 training data models
    assert {s[1] for s in ck["steps"]} == {0, 1}
    # the metanetwork loads for a data model of other widths (one codec per data model)
    other = DataModelStore(store_dir)[1].build_model()
    net, _ = load_metanetwork(artifacts.checkpoint_path(run_dir, 2), GraphCodec(other, input_shape=(1, 8, 8)))
    assert net.hiddim == 8 and len(net.convs) == 2
    # the weights actually moved
    first = checkpoint(run_dir, 1)["state_dict"]
    assert any(not torch.equal(first[k], ck["state_dict"][k]) for k in first)


def test_resume_after_a_kill_gives_identical_losses_and_weights(full_run, store_dir, tmp_path, monkeypatch):
    run_dir, _ = full_run
    original_save = meta_train_resume.save_metanetwork

    def save_then_die(path, *args, **kwargs):
        result = original_save(path, *args, **kwargs)
        raise KeyboardInterrupt("killed after the epoch-1 checkpoint")

    monkeypatch.setattr(meta_train_resume, "save_metanetwork", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        execute(run_cfg(store_dir), tmp_path)
    monkeypatch.setattr(meta_train_resume, "save_metanetwork", original_save)
    assert [e for e, _ in artifacts.list_checkpoints(tmp_path)] == [1]
    # as if written before the diagnostics existed: history rows without their columns, no plot yet
    path = artifacts.checkpoint_path(tmp_path, 1)
    old = torch.load(path, weights_only=True)
    old["history"] = [{k: v for k, v in row.items() if k not in meta_gradient.DIAGNOSTIC_COLUMNS}
                      for row in old["history"]]
    torch.save(old, path)

    summary = execute(run_cfg(store_dir), tmp_path)
    assert summary["resumed_from_epoch"] == 1 and summary["epochs"] == 2
    resumed, uninterrupted = checkpoint(tmp_path, 2), checkpoint(run_dir, 2)
    assert resumed["steps"] == uninterrupted["steps"]  # every step's CE, R and gradient norm, bit for bit
    for k, v in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][k], v), k
    assert [r["ce"] for r in resumed["history"]] == [r["ce"] for r in uninterrupted["history"]]
    rows = list(csv.DictReader((tmp_path / "meta_train_metrics.csv").open()))
    assert [r["small_group_share"] for r in rows][0] == ""  # the old row's cells are left blank
    for key in meta_gradient.DIAGNOSTIC_COLUMNS:
        assert float(rows[1][key]) == uninterrupted["history"][1][key], key
    assert (tmp_path / meta_train_metrics.DIAGNOSTICS_PNG).exists()

    # resuming needs the same settings
    with pytest.raises(ValueError, match="pruner_reg"):
        execute(run_cfg(store_dir, epochs=3, extra=["task.meta_train.pruner_reg=1.0"]), tmp_path)
    with pytest.raises(FileExistsError, match="resume"):
        execute(run_cfg(store_dir, extra=["meta_train.resume=false"]), tmp_path)


def test_nan_loss_stops_with_floating_point_error_and_keeps_last_good_checkpoint(store_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = meta_gradient._cross_entropy

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] > 4 else loss  # epoch 1 = 2 data models x 2 batches

    monkeypatch.setattr(meta_gradient, "_cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match=r"epoch 2, data model shard_0000(\.h5)?#[01]"):
        execute(run_cfg(store_dir), tmp_path)
    assert [e for e, _ in artifacts.list_checkpoints(tmp_path)] == [1]
    net, ck = load_metanetwork(artifacts.checkpoint_path(tmp_path, 1))
    assert all(torch.isfinite(p).all() for p in net.parameters()) and ck["spec"]["epoch"] == 1
    rows = list(csv.DictReader((tmp_path / "meta_train_metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1]


def test_codec_config_keys_reach_the_codec_and_a_mismatch_is_refused(store_dir, tmp_path):
    """`codec.*` (configs/main.yaml) is what the stages build their GraphCodecs with; the metanetwork checkpoint
    records it, and applying it with other codec options is refused (the graphs would differ silently)."""
    cfg = run_cfg(store_dir, epochs=1, extra=["codec.identity_edges=sparse"])
    assert codec_options(cfg) == {"input_shape": (1, 8, 8), "identity_edges": "sparse", "edge_layout": "auto",
                                  "legacy_fc_permutation": False}
    default = codec_options(run_cfg(store_dir))
    assert default["identity_edges"] is None and default["edge_layout"] == "auto"
    assert not default["legacy_fc_permutation"]
    execute(cfg, tmp_path)
    path = artifacts.checkpoint_path(tmp_path, 1)
    layout = torch.load(path, weights_only=True)["spec"]["layout"]
    assert layout["identity_edges"] == "sparse" and layout["edge_layout"] == "padded"
    model = DataModelStore(store_dir)[0].build_model()
    dense, sparse = GraphCodec(model, **default), GraphCodec(model, **codec_options(cfg))
    assert sparse.num_edges < dense.num_edges and sparse.edge_dims == dense.edge_dims  # same sizes, other graph
    load_metanetwork(path, sparse)
    with pytest.raises(LayoutMismatchError, match="identity_edges"):
        load_metanetwork(path, dense)
    legacy = compose_cfg(["task=resnet20_on_digits", "codec.legacy_fc_permutation=true"])
    assert GraphCodec(model, **codec_options(legacy)).layout["legacy_fc_permutation"] is True
