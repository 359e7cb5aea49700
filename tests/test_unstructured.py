"""Unstructured pruning: exact global L1 sparsity, N:M patterns, zeros held through fine-tuning, sparse MACs."""
import json

import pytest
import torch
from torch import nn

from generate_dataset.models import build_model, load_model
from helpers import recorded, save_tiny_metanetwork, tiny_cfg
from pruning.unstructured import (MaskedGradients, MaskViolationError, check_masks, count_sparse_macs,
                                  global_l1_prune, nm_mask, nm_prune, prunable_layers, sparsity)
from stages import execute, final
from stages.common import FinalRunConfigError


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def all_weights(model):
    return torch.cat([m.weight.detach().flatten() for _, m in prunable_layers(model)])


def test_global_l1_reaches_exact_sparsity_and_prunes_the_smallest():
    model = tiny_net()
    before = all_weights(model).abs()
    masks = global_l1_prune(model, 0.7)
    after = all_weights(model)
    expected = round(0.7 * before.numel())
    assert int((after == 0).sum()) == expected == sparsity(model)["zeros"]
    assert sparsity(model)["sparsity"] == pytest.approx(expected / before.numel())
    kept = after != 0
    assert before[~kept].max() <= before[kept].min()  # global: the smallest magnitudes across layers go
    assert torch.equal(after[kept], all_weights(tiny_net())[kept])  # survivors unchanged
    assert torch.equal(torch.cat([m.flatten() for m in masks.values()]), kept)
    # plain modules again: no weight_orig / weight_mask left behind
    assert all(not hasattr(m, "weight_mask") and isinstance(m.weight, nn.Parameter) for _, m in prunable_layers(model))
    # biases and BatchNorm untouched
    assert torch.equal(model[0].bias, tiny_net()[0].bias) and torch.equal(model[1].weight, tiny_net()[1].weight)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        global_l1_prune(model, 1.0)


def test_nm_mask_keeps_the_n_largest_of_every_group():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, -4.0]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, False, False, True]]  # tie: earlier kept
    model = tiny_net()
    masks, skipped = nm_prune(model, 2, 4)
    assert skipped == ["0"]  # first conv: 2 * 3 * 3 = 18 weights per filter, not a multiple of 4
    for name, module in prunable_layers(model):
        groups = module.weight.detach().reshape(module.weight.shape[0], -1)
        if name in skipped:
            assert (groups != 0).all()
            continue
        nonzero = (groups.reshape(groups.shape[0], -1, 4) != 0).sum(-1)
        assert (nonzero <= 2).all() and torch.equal(masks[name], module.weight != 0)
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_prune(model, 4, 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masked_gradients_keep_zeros_through_training(optimizer):
    model = tiny_net()
    masks = global_l1_prune(model, 0.5)
    zeros_before = int((all_weights(model) == 0).sum())
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=5e-4))
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 3, (8,))
    with MaskedGradients(model, masks):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    check_masks(model, masks)
    assert int((all_weights(model) == 0).sum()) == zeros_before
    # hooks are gone after the block: the same training now moves the pruned weights
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with pytest.raises(MaskViolationError, match="nonzero after fine-tuning"):
        check_masks(model, masks)


def test_sparse_macs_count_nonzero_weights_per_output_position():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    with torch.no_grad():
        model[0].weight.view(-1)[:27] = 0  # half of the 54 conv weights
        model[2].weight[0] = 0  # one row of 75
    macs = count_sparse_macs(model, torch.ones(1, 2, 5, 5))
    assert macs["dense_macs"] == 25 * 54 + 4 * 75
    assert macs["sparse_macs"] == 25 * 27 + 3 * 75
    assert macs["macs_reduction_percent"] == pytest.approx(100 * (1 - (25 * 27 + 225) / (25 * 54 + 300)))
    # batch size scales both
    assert count_sparse_macs(model, torch.ones(2, 2, 5, 5))["sparse_macs"] == 2 * macs["sparse_macs"]


def test_unstructured_final_l1_with_metanetwork(tmp_path):
    mn = save_tiny_metanetwork(tmp_path / "mn.pt")
    cfg = tiny_cfg(["run=unstructured_pruning_final", "method=unstructured_l1_norm", "final.amount=0.8",
                       f"final.metanetwork={mn}"])
    summary, model, masks = recorded(final.unstructured_pruning_final, cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    total = sum(m.weight.numel() for _, m in prunable_layers(build_model("resnet8", 10, in_channels=1)))
    # exact global sparsity, still exact after the masked fine-tune (pruned weights stayed zero)
    assert results["prunable_weights"] == total and results["zero_weights"] == round(0.8 * total)
    assert results["sparsity"] == pytest.approx(round(0.8 * total) / total)
    assert results["pruning"] == "L1 80%" and results["amount"] == 0.8
    assert results["finetune_epochs"] == {"after_metanetwork": 1, "after_pruning": 1}
    assert results["metanetwork"] == str(mn.resolve()) and results["selection"] == "val"
    assert 0 < results["sparse_macs"] < results["dense_macs"] and results["macs_reduction_percent"] > 50
    loaded, _ = load_model(tmp_path / "run" / "pruned_model.pt")
    check_masks(loaded, masks)
    assert sparsity(loaded)["zeros"] == round(0.8 * total)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_unstructured_final_nm_pattern_holds(tmp_path):
    cfg = tiny_cfg(["run=unstructured_pruning_final", "method=nm_sparsity", "final.metanetwork=null"])
    results = execute(cfg, tmp_path)
    assert results["pruning"] == "2:4" and results["finetune_epochs"]["after_metanetwork"] == 0
    loaded, _ = load_model(tmp_path / "pruned_model.pt")
    checked = 0
    for name, module in prunable_layers(loaded):
        flat = module.weight.detach().reshape(module.weight.shape[0], -1)
        if name in results["dense_layers"]:
            assert flat.shape[1] % 4 != 0
            continue
        assert ((flat.reshape(flat.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
        checked += 1
    assert checked >= 5 and results["dense_layers"] == ["conv1"]  # 1 input channel x 3 x 3 = 9 per filter


def test_structured_method_is_refused(tmp_path):
    with pytest.raises(FinalRunConfigError, match="unstructured method"):
        execute(tiny_cfg(["run=unstructured_pruning_final"]), tmp_path)
