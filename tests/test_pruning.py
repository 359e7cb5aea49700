"""pruning.depgraph: MACs speed-up targets, first-step stopping, classifier exclusion, clear errors, and the
one progressive pruning loop (pruning_steps) shared with the accuracy curves."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from generate_dataset.models import build_model, model_from_state_dict
from helpers import METHOD
from pruning.curves import accuracy_speed_up_curve
from pruning.depgraph import (
    SpeedUpNotReachedError,
    architecture_options,
    build_pruner,
    classifier_module,
    count_macs,
    hard_cap,
    prune_to_speed_up,
    pruning_steps,
)


class TinyNet(nn.Module):
    """Convs + BN with a residual add and a classifier whose width equals a hidden width (10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(10, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.Conv2d(24, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(10, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(self.pool(x).flatten(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    for m in net.modules():  # non-trivial BN so importances differ
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return net.eval()


EXAMPLE = torch.ones(1, 3, 16, 16)


def test_classifier_found_by_identity_not_width():
    net = make_net()
    assert classifier_module(net, EXAMPLE) is net.head
    # a hidden conv with exactly num_classes outputs is *not* ignored: it is pruned
    prune_to_speed_up(net, 3.0, METHOD, EXAMPLE)
    assert net.head.out_features == 10
    assert net.stem[0].out_channels < 10 and net.head.in_features == net.stem[0].out_channels


@pytest.mark.parametrize("target", [1.3, 2.0, 3.0])
def test_reaches_target_and_stops_at_first_step_past_it(target):
    net = make_net()
    reference = copy.deepcopy(net)
    base = count_macs(net, EXAMPLE)
    achieved = prune_to_speed_up(net, target, METHOD, EXAMPLE, iterative_steps=50)
    assert achieved >= target
    assert achieved == pytest.approx(base / count_macs(net, EXAMPLE))
    # replay the same deterministic pruner step by step: the step before the last is below target
    pruner = build_pruner(reference, EXAMPLE, METHOD, iterative_steps=50)
    history = [1.0]
    while history[-1] < target:
        pruner.step()
        history.append(base / count_macs(reference, EXAMPLE))
    assert history[-1] == pytest.approx(achieved)
    assert history[-2] < target
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_total_speed_up_against_a_given_base():
    net = make_net()
    base = count_macs(net, EXAMPLE)
    first = prune_to_speed_up(net, 1.3, METHOD, EXAMPLE, iterative_steps=50)
    total = prune_to_speed_up(net, 2.0, METHOD, EXAMPLE, iterative_steps=50, base_macs=base)
    assert first >= 1.3 and total >= 2.0
    assert total == pytest.approx(base / count_macs(net, EXAMPLE))


def test_unreachable_target_reports_best_reached():
    net = make_net()
    with pytest.raises(SpeedUpNotReachedError) as err:
        prune_to_speed_up(net, 1e6, METHOD, EXAMPLE, iterative_steps=20)
    assert 1.0 < err.value.achieved < 1e6
    assert f"{err.value.achieved:.4f}" in str(err.value)
    net2 = make_net()
    achieved = prune_to_speed_up(net2, 1e6, METHOD, EXAMPLE, iterative_steps=20, strict=False)
    assert achieved == pytest.approx(err.value.achieved)


def test_already_fast_enough_is_untouched():
    net = make_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert prune_to_speed_up(net, 1.0, METHOD, EXAMPLE) == 1.0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_method_and_target_are_clear_errors():
    with pytest.raises(ValueError, match="structured"):
        prune_to_speed_up(make_net(), 2.0, {"name": "unstructured_l1_norm", "kind": "unstructured"}, EXAMPLE)
    with pytest.raises(ValueError, match=">= 1"):
        prune_to_speed_up(make_net(), 0.5, METHOD, EXAMPLE)


def test_vit_prunes_to_a_speed_up_and_stays_runnable_and_rebuildable():
    torch.manual_seed(0)
    vit = build_model("vit_tiny", 10).eval()
    example = torch.ones(1, 3, 32, 32)
    options = architecture_options(vit)
    assert options["round_to"] == 2 and "class_token" in options["unwrapped_parameters"]
    assert architecture_options(make_net()) == {}
    achieved = prune_to_speed_up(vit, 1.5, METHOD, example, iterative_steps=20)
    assert achieved >= 1.5
    x = torch.randn(2, 3, 32, 32)
    out = vit(x)  # hidden_dim kept in sync with the pruned embedding
    assert vit.hidden_dim == vit.conv_proj.out_channels and vit.hidden_dim % 2 == 0
    rebuilt = model_from_state_dict("vit_tiny", vit.state_dict(), 10)
    assert torch.equal(rebuilt(x), out)


def test_prune_to_speed_up_and_the_curve_walk_the_same_pruning_steps():
    """pruning_steps is the one progressive pruning loop: prune_to_speed_up stops at its first step reaching the
    target, and an accuracy curve has one point per step of it."""
    base = count_macs(make_net(), EXAMPLE)
    speed_ups = [base / macs for macs in pruning_steps(make_net(), EXAMPLE, METHOD, iterative_steps=20)]
    assert len(speed_ups) == 20 and speed_ups == sorted(speed_ups) and speed_ups[0] > 1.0
    target = (speed_ups[5] + speed_ups[6]) / 2  # reached at step 7, not before
    assert speed_ups[5] < target <= speed_ups[6]
    assert prune_to_speed_up(make_net(), target, METHOD, EXAMPLE, iterative_steps=20) == speed_ups[6]
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(10, (8,))), batch_size=4)
    points = accuracy_speed_up_curve(make_net(), loader, "cpu", METHOD, EXAMPLE, max_speed_up=target,
                                     iterative_steps=20, progress=False)
    assert [x for x, _ in points] == [1.0] + speed_ups[:7]


def test_max_pruning_ratio_keeps_a_share_of_every_layer():
    """method.max_pruning_ratio caps the share of a layer's channels global ranking removes (torch-pruning's
    max_pruning_ratio, within one pruning step); null is the reference's no cap."""
    def skewed():  # one strong channel in the middle layer, the rest weak: global ranking drains that layer
        net = make_net()
        with torch.no_grad():
            net.body[0].weight[1:].mul_(0.01)
            net.body[1].weight[1:].mul_(0.01)
        return net

    uncapped, capped = skewed(), skewed()
    assert prune_to_speed_up(uncapped, 3.0, {**METHOD, "max_pruning_ratio": None}, EXAMPLE, iterative_steps=50) >= 3.0
    assert uncapped.body[0].out_channels < 12
    assert prune_to_speed_up(capped, 3.0, {**METHOD, "max_pruning_ratio": 0.5}, EXAMPLE, iterative_steps=50) >= 3.0
    assert capped.body[0].out_channels >= 12 - 1  # soft: checked before each step, one step may pass it
    assert capped.stem[0].out_channels < uncapped.stem[0].out_channels  # the target is met elsewhere
    for bad in (0.0, 1.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="max_pruning_ratio"):
            prune_to_speed_up(make_net(), 2.0, {**METHOD, "max_pruning_ratio": bad}, EXAMPLE)


def graded_net():
    """make_net with the body's middle channels graded 1.5x apart (conv rows, BN scales, the next conv's
    columns), so their group importance ranks them by index; BN running means tag each channel with its index."""
    net = make_net()
    scale = 0.01 * 1.5 ** torch.arange(24.0)
    with torch.no_grad():
        net.body[0].weight.mul_(scale.view(-1, 1, 1, 1))
        net.body[1].weight.mul_(scale)
        net.body[3].weight.mul_(scale.view(1, -1, 1, 1))
        net.body[1].running_mean.copy_(torch.arange(24.0))
    return net


@pytest.mark.parametrize("hard", [False, True])
def test_hard_cap_no_step_passes_the_floor_and_the_strongest_channels_stay(hard):
    """With 5 coarse steps, one global step would take the weak middle layer from 17 channels to 10, past the 0.5
    cap's floor of 12: the soft cap (torch-pruning's) lets it, the hard cap clips that step at the floor and
    keeps the group's 12 most important channels; the target is still reached elsewhere."""
    net = graded_net()
    method = {**METHOD, "max_pruning_ratio": 0.5, "hard_cap": hard}
    base = count_macs(net, EXAMPLE)
    widths = []
    for macs in pruning_steps(net, EXAMPLE, method, iterative_steps=5):
        widths.append(net.body[0].out_channels)
        if base / macs >= 3.0:
            break
    assert base / macs >= 3.0
    if hard:
        assert min(widths) == 12 and net.body[1].running_mean.tolist() == list(range(12, 24))
        assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    else:
        assert min(widths) < 12


@pytest.mark.parametrize("importance", ["group_magnitude", "random"])
def test_hard_cap_changes_nothing_where_no_floor_binds(importance):
    """Without a binding floor the hard cap prunes exactly as torch-pruning does, random draws included."""
    method = {**METHOD, "importance": importance}
    soft, hard = make_net(), make_net()
    torch.manual_seed(1)
    prune_to_speed_up(soft, 2.0, method, EXAMPLE, iterative_steps=50)
    torch.manual_seed(1)
    prune_to_speed_up(hard, 2.0, {**method, "hard_cap": True}, EXAMPLE, iterative_steps=50)
    assert soft.state_dict().keys() == hard.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(soft.state_dict().values(), hard.state_dict().values()))


def test_hard_cap_bad_values_and_unsupported_layouts_are_clear_errors():
    assert hard_cap(METHOD) is False
    for bad in ("true", 1, None):
        with pytest.raises(ValueError, match="hard_cap"):
            prune_to_speed_up(make_net(), 2.0, {**METHOD, "hard_cap": bad}, EXAMPLE)
    vit = build_model("vit_tiny", 10).eval()
    before = copy.deepcopy(vit.state_dict())
    with pytest.raises(ValueError, match="channel groups"):
        prune_to_speed_up(vit, 1.5, {**METHOD, "max_pruning_ratio": 0.5, "hard_cap": True}, torch.ones(1, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())  # refused before any pruning
    with pytest.raises(ValueError, match="round_to"):
        prune_to_speed_up(vit, 1.5, {**METHOD, "max_pruning_ratio": 0.5, "hard_cap": True, "vit_heads": "round_to"},
                          torch.ones(1, 3, 32, 32))
