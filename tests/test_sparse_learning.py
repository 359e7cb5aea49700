"""DepGraph sparse learning (pruning/sparse_learning.py): the after_backward hook adds exactly the group-norm
regulariser gradient of pruning.regularizer (torch-pruning's GroupNormPruner.regularize), and training with it
shrinks the weak channel groups."""
import math

import pytest
import torch
import torch.nn.functional as F

from data_loaders.image_datasets import build_datasets, build_loaders
from generate_dataset.models import build_model
from helpers import METHOD
from pruning.regularizer import build_regularizer, group_gamma
from pruning.sparse_learning import SparseLearning
from training.config import TrainConfig
from training.loop import train

ALPHA = 16.0


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed, dtype=torch.float64):
    """resnet8 on 1x8x8 inputs with non-degenerate random weights (every group has distinct importances)."""
    torch.manual_seed(seed)
    model = build_model("resnet8", 10, in_channels=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.3, 1.7)
                m.bias.normal_(std=0.1)
            elif isinstance(m, torch.nn.Linear):
                m.bias.normal_(std=0.1)
    return model.to(dtype)


def ce_backward(model, seed=0):
    """One cross-entropy backward on a random batch (train mode); returns {name: CE gradient}."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (16,), generator=g)
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def independent_gamma(members, alpha):
    """gamma of one channel group from its members' squared L2 norms per channel, computed by hand:
    group-L2 importance = mean over members of sum(slice^2), max-normalised, square-rooted (torch-pruning)."""
    sq = torch.stack([m.detach().double() for m in members]).mean(0)
    imp = (sq / sq.max()).sqrt()
    return alpha ** ((imp.max() - imp) / (imp.max() - imp.min()))


def out_rows_sq(w):
    return w.flatten(1).pow(2).sum(1)


def in_cols_sq(w):
    return w.transpose(0, 1).flatten(1).pow(2).sum(1)


@pytest.mark.parametrize("reg, alpha", [(5e-4, 16.0), (0.3, 4.0)])
def test_hook_adds_exactly_the_regularizer_gradient(reg, alpha):
    model = random_model(1)
    example = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    hook = SparseLearning(model, example, METHOD, reg, alpha)
    assert hook.describe() == {"reg": reg, "alpha": alpha, "bias": False}
    regularizer = build_regularizer(model, example, METHOD, reg)
    # precondition: no degenerate group (torch-pruning would write NaN there)
    for group in regularizer.pruner._groups:
        imp = regularizer.pruner.estimate_importance(group)
        assert torch.isfinite(imp).all() and imp.max() > imp.min()

    ce = ce_backward(model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    hook(model)
    for k, p in model.named_parameters():  # the hook only touches gradients
        assert torch.equal(p.detach(), before[k]), k
    added = {k: p.grad.detach() - ce[k] for k, p in model.named_parameters()}
    expected = regularizer.gradient(dict(model.named_parameters()), alpha=alpha)
    assert set(expected) <= set(added)
    for k, delta in added.items():
        assert torch.isfinite(delta).all(), k
        want = expected.get(k, torch.zeros_like(delta))
        torch.testing.assert_close(delta, want, rtol=1e-9, atol=1e-15, msg=k)
    # what is and is not pulled: conv/BN weights and the classifier's input columns, no biases (bias=False)
    assert added["conv1.weight"].abs().min() > 0 and added["layer3.0.bn1.weight"].abs().min() > 0
    assert added["fc.weight"].abs().min() > 0
    for k in ("fc.bias", "bn1.bias", "layer1.0.bn1.bias"):
        assert torch.equal(added[k], torch.zeros_like(added[k])), k


def test_hook_matches_an_independent_recomputation():
    reg = 0.05
    model = random_model(2)
    hook = SparseLearning(model, torch.ones(1, 1, 8, 8, dtype=torch.float64), METHOD, reg, ALPHA)
    ce = ce_backward(model, seed=3)
    hook(model)
    added = {k: p.grad.detach() - ce[k] for k, p in model.named_parameters()}
    p = dict(model.named_parameters())

    # the stem conv: its input (the image) is not prunable, so its gradient is the out-row pull of the
    # stem/residual group alone (members: conv1, bn1, layer1.0.bn2, layer1.0.conv2 out-rows; layer1.0.conv1,
    # layer2.0.conv1, layer2.0.downsample.0 in-columns)
    stem = [out_rows_sq(p["conv1.weight"]), p["bn1.weight"].pow(2), p["layer1.0.bn2.weight"].pow(2),
            out_rows_sq(p["layer1.0.conv2.weight"]), in_cols_sq(p["layer1.0.conv1.weight"]),
            in_cols_sq(p["layer2.0.conv1.weight"]), in_cols_sq(p["layer2.0.downsample.0.weight"])]
    gamma = independent_gamma(stem, ALPHA)
    assert gamma.min() == pytest.approx(1.0) and gamma.max() == pytest.approx(ALPHA)
    want = reg * gamma.view(-1, 1, 1, 1) * p["conv1.weight"].detach()
    torch.testing.assert_close(added["conv1.weight"], want, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(added["bn1.weight"], reg * gamma * p["bn1.weight"].detach(), rtol=1e-5, atol=1e-12)

    # layer1.0's inner group (conv1 out-rows, bn1, conv2 in-columns): bn1 is touched by this group only
    inner = [out_rows_sq(p["layer1.0.conv1.weight"]), p["layer1.0.bn1.weight"].pow(2),
             in_cols_sq(p["layer1.0.conv2.weight"])]
    inner_gamma = independent_gamma(inner, ALPHA)
    torch.testing.assert_close(added["layer1.0.bn1.weight"], reg * inner_gamma * p["layer1.0.bn1.weight"].detach(),
                               rtol=1e-5, atol=1e-12)
    # layer1.0.conv1: out-rows pulled with the inner gamma, in-columns with the stem gamma
    w = p["layer1.0.conv1.weight"].detach()
    both = reg * (inner_gamma.view(-1, 1, 1, 1) + gamma.view(1, -1, 1, 1)) * w
    torch.testing.assert_close(added["layer1.0.conv1.weight"], both, rtol=1e-5, atol=1e-12)
    # the same gammas come out of pruning.regularizer.group_gamma on the pruner's importance
    groups = hook.pruner._groups
    first = [group_gamma(hook.pruner.estimate_importance(g).sqrt(), ALPHA) for g in groups
             if next(iter(g))[0].target.module is model.layer1[0].conv1]
    assert len(first) == 1
    torch.testing.assert_close(first[0].double(), inner_gamma, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reg", [0.0, -1e-3, math.nan])
def test_non_positive_reg_is_refused(reg):
    with pytest.raises(ValueError, match="reg > 0"):
        SparseLearning(random_model(0, torch.float32), torch.ones(1, 1, 8, 8), METHOD, reg)


def test_bad_alpha_and_foreign_model_are_refused():
    model = random_model(0, torch.float32)
    with pytest.raises(ValueError, match="alpha >= 1"):
        SparseLearning(model, torch.ones(1, 1, 8, 8), METHOD, 1e-3, alpha=0.5)
    hook = SparseLearning(model, torch.ones(1, 1, 8, 8), METHOD, 1e-3)
    other = random_model(0, torch.float32)
    ce_backward(other)
    with pytest.raises(ValueError, match="another model"):
        hook(other)
    # building the hook leaves the model's mode alone
    model.train()
    SparseLearning(model, torch.ones(1, 1, 8, 8), METHOD, 1e-3)
    assert model.training


def _train(with_hook, reg=0.1):
    splits = build_datasets("synthetic", "unused", val_size=0,
                            synthetic=dict(num_classes=10, in_channels=1, image_size=8, train_size=128,
                                           test_size=32, seed=0))
    loaders = build_loaders(splits, batch_size=32, eval_batch_size=64, seed=0)
    torch.manual_seed(0)
    model = random_model(4, torch.float32)
    hook = SparseLearning(model, torch.ones(1, 1, 8, 8), METHOD, reg, ALPHA) if with_hook else None
    calls = []
    recorder = None
    if hook is not None:
        def recorder(m):
            calls.append(1)
            hook(m)
    cfg = TrainConfig(epochs=2, lr=0.05, scheduler="constant", weight_decay=0.0, select="last")
    torch.manual_seed(0)
    train(model, loaders, cfg, "cpu", after_backward=recorder)
    return model, len(calls)


def test_training_with_the_hook_shrinks_the_weak_groups():
    start = random_model(4, torch.float32)
    regularizer = build_regularizer(start, torch.ones(1, 1, 8, 8), METHOD, 0.1)
    initial = regularizer.channel_norms(per_group=True)
    plain, _ = _train(False)
    sparse, calls = _train(True)
    assert calls == 2 * 4  # every training batch
    plain_norms = regularizer.channel_norms({k: p.detach() for k, p in plain.named_parameters()}, per_group=True)
    sparse_norms = regularizer.channel_norms({k: p.detach() for k, p in sparse.named_parameters()}, per_group=True)
    # (reg 0.1 rather than larger: BatchNorm makes the CE gradient of a conv grow as its weights shrink, so a
    # much stronger pull stalls the weakest channels at a floor instead of shrinking them further)
    assert torch.cat(sparse_norms).sum() < 0.7 * torch.cat(plain_norms).sum()
    # the pull is strongest (gamma -> alpha) for the least important channels of each group: in every group
    # the weakest quarter of the channels keeps a smaller share of its norm than the strongest quarter
    for start_norms, p_norms, s_norms in zip(initial, plain_norms, sparse_norms):
        ratio = s_norms / p_norms
        order = start_norms.argsort()
        quarter = max(1, len(order) // 4)
        assert ratio[order[:quarter]].mean() < ratio[order[-quarter:]].mean()


def test_degenerate_groups_get_a_finite_pull_not_nan():
    # a layer pruned to one channel: torch-pruning's regularize writes NaN there (0/0 in gamma); the hook
    # gives such a group gamma = 1 (the plain reg * w pull), so training goes on
    torch.manual_seed(3)
    model = build_model("resnet8", 10, widths=[8, 1, 8, 7, 16, 3, 32], in_channels=1).double()
    example = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    hook = SparseLearning(model, example, METHOD, reg=5e-4, alpha=16.0)
    model.train()
    F.cross_entropy(model(torch.randn(4, 1, 8, 8, dtype=torch.float64)), torch.tensor([0, 1, 2, 3])).backward()
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    hook(model)
    for key, param in model.named_parameters():
        assert torch.isfinite(param.grad).all(), key
    one = model.layer1[0].conv1.weight  # the one-channel layer's out-row is pulled by reg * 1 * w (and more
    added = one.grad - before["layer1.0.conv1.weight"]  # from its in-column groups): nonzero and finite
    assert added.abs().sum() > 0
