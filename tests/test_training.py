"""Training loop, evaluation, schedules, epoch selection, seeding and device helpers (CPU, tiny)."""
import csv
import os
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from training.config import TrainConfig
import training.loop as loop
from training.loop import CSV_COLUMNS, THROUGHPUT_COLUMNS, _BatchMixer, autocast_dtype, evaluate, train
from utils.device import configure_cuda, resolve_device
from utils.logging_utils import setup_logging
from utils.seed import derive_seed, make_generator, seed_everything

CPU = torch.device("cpu")
NUM_CLASSES = 4


def _blobs(n: int, seed: int) -> TensorDataset:
    """Four well separated Gaussian blobs in 8-d: x [n, 8] float32, y [n] int64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(NUM_CLASSES, 8) * 4.0
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = centres[y] + torch.randn(n, 8, generator=g)
    return TensorDataset(x, y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def _loaders(val=True, test=True, shuffle=True, seed=0, batch_size=32):
    train_loader = DataLoader(_blobs(256, 1), batch_size=batch_size, shuffle=shuffle,
                              generator=make_generator(seed) if shuffle else None)
    return SimpleNamespace(
        train=train_loader,
        val=DataLoader(_blobs(96, 2), batch_size=64) if val else None,
        test=DataLoader(_blobs(96, 3), batch_size=64) if test else None,
    )


def _cfg(**overrides) -> TrainConfig:
    values = dict(epochs=4, lr=0.1, scheduler="constant", weight_decay=0.0, select="last")
    values.update(overrides)
    return TrainConfig(**values)


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _ScriptedEval:
    """Eval loader that snapshots the model when iterated (= weights after each epoch) and shows
    the true labels only in epoch ``good_epoch`` (shifted labels otherwise), so that exactly that
    epoch has the best accuracy on this split."""

    def __init__(self, model: nn.Module, good_epoch: int):
        self.model, self.good_epoch = model, good_epoch
        self.snapshots: list[dict] = []
        self.x, self.y = _blobs(96, 2).tensors

    def __iter__(self):
        self.snapshots.append(_state(self.model))
        epoch = len(self.snapshots)
        y = self.y if epoch == self.good_epoch else (self.y + 1) % NUM_CLASSES
        yield self.x, y


def test_training_learns_and_writes_csv(tmp_path):
    model = _mlp()
    result = train(model, _loaders(), _cfg(epochs=5, select="val"), CPU, run_dir=tmp_path, desc="fit")
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.3 * losses[0]
    assert result.final_metrics["test_acc"] >= 0.95 and result.final_metrics["val_acc"] >= 0.95

    with open(tmp_path / "fit_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == 5 == len(result.history)
    for row, hist in zip(rows, result.history):
        assert int(row["epoch"]) == hist["epoch"]
        for key in CSV_COLUMNS[1:]:
            if key == "peak_mem_gb":  # CUDA only: blank on the CPU
                assert row[key] == "" and key not in hist
                continue
            assert math.isclose(float(row[key]), hist[key], rel_tol=1e-12)
        assert hist["images_per_s"] > 0 and hist["epoch_seconds"] >= hist["train_seconds"] > 0


@pytest.mark.parametrize("select", ["val", "test"])
def test_selection_restores_the_chosen_epoch(select):
    model = _mlp()
    scripted = _ScriptedEval(model, good_epoch=2)
    loaders = _loaders()
    setattr(loaders, select, scripted)
    result = train(model, loaders, _cfg(epochs=4, select=select), CPU)

    accs = [row[f"{select}_acc"] for row in result.history]
    assert result.selected_epoch == 2 == 1 + accs.index(max(accs))
    assert _same(_state(model), scripted.snapshots[1])  # exactly the epoch-2 weights
    assert not _same(scripted.snapshots[1], scripted.snapshots[3])  # training did move them
    assert result.final_metrics[f"{select}_acc"] == max(accs)
    assert result.selection == select
    if select == "test":
        assert "paper protocol" in result.protocol_note and "TEST" in result.protocol_note
    else:
        assert "validation" in result.protocol_note


def test_select_last_keeps_final_weights():
    model = _mlp()
    scripted = _ScriptedEval(model, good_epoch=1)
    loaders = _loaders(test=False)
    loaders.val = scripted
    result = train(model, loaders, _cfg(epochs=3, select="last"), CPU)
    assert result.selected_epoch == 3 and result.selection == "last"
    assert _same(_state(model), scripted.snapshots[-1])
    assert "test_acc" not in result.final_metrics


def test_select_val_without_val_loader_is_rejected():
    with pytest.raises(ValueError, match="loaders.val is None"):
        train(_mlp(), _loaders(val=False), _cfg(select="val"), CPU)


def test_zero_epochs_only_evaluates():
    model = _mlp()
    before = _state(model)
    result = train(model, _loaders(), _cfg(epochs=0, select="val"), CPU)
    assert result.history == [] and result.selected_epoch == 0
    assert _same(before, _state(model))
    expected = evaluate(model, _loaders().test, CPU)
    assert result.final_metrics["test_acc"] == expected["acc"]
    assert result.final_metrics["test_loss"] == expected["loss"]


def _lrs(**overrides) -> list[float]:
    cfg = _cfg(max_batches_per_epoch=1, **overrides)
    result = train(_mlp(), _loaders(val=False, test=False), cfg, CPU)
    return [row["lr"] for row in result.history]


def test_multistep_schedule_follows_milestones():
    assert _lrs(epochs=6, lr=0.1, scheduler="multistep", milestones="2,4") == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)
    # With a warm-up, milestones count from the end of the warm-up (torch SequentialLR, reference).
    assert _lrs(epochs=5, lr=0.1, scheduler="multistep", milestones=[2], warmup_epochs=1,
                warmup_start_factor=0.5) == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01], rel=1e-12)


def test_cosine_schedule_with_linear_warmup():
    lr, lr_min, warm, epochs = 1.0, 0.1, 2, 6
    got = _lrs(epochs=epochs, lr=lr, scheduler="cosine", warmup_epochs=warm, warmup_start_factor=0.1,
               lr_min=lr_min)
    t_max = epochs - warm
    expected = [0.1 * lr, 0.55 * lr] + [
        lr_min + (lr - lr_min) * (1 + math.cos(math.pi * t / t_max)) / 2 for t in range(epochs - warm)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_train_loss_matches_cross_entropy_with_label_smoothing():
    """One batch, no shuffle: the logged loss is the loss at the initial weights."""
    x, y = next(iter(_loaders(shuffle=False).train))
    logged = {}
    for eps in (0.0, 0.3):
        with torch.no_grad():
            log_p = F.log_softmax(_mlp().train()(x), dim=1)
        expected = (1 - eps) * F.nll_loss(log_p, y) - eps * log_p.mean(dim=1).mean()
        result = train(_mlp(), _loaders(shuffle=False, val=False, test=False),
                       _cfg(epochs=1, max_batches_per_epoch=1, label_smoothing=eps), CPU)
        logged[eps] = result.history[0]["train_loss"]
        assert logged[eps] == pytest.approx(expected.item(), rel=1e-6)
    assert abs(logged[0.3] - logged[0.0]) > 1e-3  # smoothing changed the loss


def test_nan_loss_raises_with_location():
    data = _blobs(64, 1)
    x, y = data.tensors
    x = x.clone()
    x[40] = float("nan")  # second batch of 32
    loaders = SimpleNamespace(train=DataLoader(TensorDataset(x, y), batch_size=32), val=None, test=None)
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        train(_mlp(), loaders, _cfg(epochs=2), CPU)


def test_evaluate_is_exact_sample_weighted_and_restores_mode():
    model = _mlp().train()
    data = _blobs(23, 5)
    loader = DataLoader(data, batch_size=5)  # last batch has 3 samples
    metrics = evaluate(model, loader, CPU, topk=(1, 2))
    model.eval()
    with torch.no_grad():
        logits = model(data.tensors[0])
    y = data.tensors[1]
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item(), abs=1e-12)
    top2 = logits.topk(2, dim=1).indices.eq(y[:, None]).any(1).double().mean().item()
    assert metrics["acc2"] == pytest.approx(top2, abs=1e-12)
    with pytest.raises(ValueError, match="top-5"):
        evaluate(model, loader, CPU, topk=(1, 5))
    model.train()
    evaluate(model, loader, CPU)
    assert model.training


@pytest.mark.parametrize("size,batch", [(5, 2), (7, 3), (6, 4)])
def test_distributed_eval_counts_every_sample_once(size, batch):
    """A DistributedSampler pads the split to a multiple of the ranks by repeating samples; the per-rank sums
    (what the all-reduce adds) count each real sample once, so DDP evaluation equals the single-process one."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(size, 4), torch.randint(0, 3, (size,)))
    model = nn.Linear(4, 3)
    whole = evaluate(model, DataLoader(data, batch_size=batch), "cpu")
    loss_sum = correct = count = 0.0
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        real = len(range(rank, size, 2))  # positions of this rank in the padded list that are real
        part = evaluate(model, DataLoader(data, batch_size=batch, sampler=sampler), "cpu")
        loss_sum, correct, count = loss_sum + part["loss"] * real, correct + part["acc"] * real, count + real
    assert count == size
    assert correct / count == pytest.approx(whole["acc"])
    assert loss_sum / count == pytest.approx(whole["loss"])


def test_config_from_dict_and_validation():
    cfg = TrainConfig.from_dict(OmegaConf.create({"epochs": 3, "lr": "1e-3", "milestones": "60, 90"}))
    assert cfg.milestones == [60, 90] and cfg.lr == 1e-3 and cfg.select == "val"
    assert TrainConfig.from_dict({"epochs": 1, "lr": 0.1, "clip_grad_norm": 0}).clip_grad_norm is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_steps'\]"):
        TrainConfig.from_dict({"epochs": 1, "lr": 0.1, "lr_steps": [1]})
    with pytest.raises(ValueError, match="missing required"):
        TrainConfig.from_dict({"epochs": 1})
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(epochs=1, lr=0.1, optimizer="adam")
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(epochs=1, lr=0.1, milestones="90,60")
    with pytest.raises(ValueError, match="select"):
        TrainConfig(epochs=1, lr=0.1, select="best")


def test_adamw_clipping_and_cuda_only_flags_on_cpu():
    messages = []
    result = train(_mlp(), _loaders(), _cfg(epochs=2, optimizer="adamw", lr=0.01, clip_grad_norm=1.0,
                                            scheduler="cosine", amp=True, channels_last=True),
                   CPU, log=messages.append)
    assert result.final_metrics["test_acc"] > 0.5
    assert any("amp=True ignored on cpu" in m for m in messages)
    assert any("channels_last=True ignored on cpu" in m for m in messages)
    assert sum("epoch" in m and "test_acc" in m for m in messages) == 2  # one line per epoch


def test_setup_logging_writes_run_log_once(tmp_path):
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        setup_logging(tmp_path)
        setup_logging(tmp_path)  # idempotent: no duplicated handlers
        logging.getLogger("training.loop").info("hello run log")
        assert (tmp_path / "run.log").read_text().count("hello run log") == 1
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def test_seed_everything_makes_runs_identical():
    def run():
        seed_everything(123)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))
        loaders = SimpleNamespace(train=DataLoader(_blobs(128, 1), batch_size=32, shuffle=True),
                                  val=None, test=None)
        result = train(model, loaders, _cfg(epochs=2), CPU)
        return [{k: v for k, v in row.items() if k not in THROUGHPUT_COLUMNS} for row in result.history], _state(model)

    (hist_a, state_a), (hist_b, state_b) = run(), run()
    assert hist_a == hist_b and _same(state_a, state_b)
    draws = [(seed_everything(s), torch.rand(3))[1] for s in (123, 124, 123)]
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_derive_seed_is_stable_and_distinct():
    # Pinned values: any change (or a dependence on PYTHONHASHSEED) breaks reproducibility.
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) == 162588057
    assert derive_seed("prune", 7) == 1275092828
    seeds = {derive_seed(s, i, p) for s in range(5) for i in range(20) for p in range(10)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert derive_seed(1, 23) != derive_seed(12, 3)
    assert derive_seed("1") != derive_seed(1)
    with pytest.raises(TypeError):
        derive_seed(1.5)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="not a valid device"):
        resolve_device("gpu0")


# ----------------------------------------------------------------------------------------------
# MixUp / CutMix (ViT recipe)
# ----------------------------------------------------------------------------------------------
def test_batch_mixer_off_is_identity_and_on_mixes_with_matching_soft_label_loss():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.arange(8) % 4
    same, y_b, lam = _BatchMixer(0.0, 0.0)(x, y)
    assert same is x and lam == 1.0 and torch.equal(y_b, y)
    for mixer in (_BatchMixer(0.4, 0.0), _BatchMixer(0.0, 1.0)):
        draws = [mixer(x, y) for _ in range(5)]
        assert any(not torch.equal(mixed, x) for mixed, _, _ in draws)  # a draw may paste an empty box
        mixed, y_b, lam = draws[0]
        assert mixed.shape == x.shape and 0.0 <= lam <= 1.0
        # the convex combination of hard-label losses equals the soft-label cross-entropy
        logits = torch.randn(8, 4)
        crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        soft = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y_b, 4).float()
        combined = lam * crit(logits, y) + (1 - lam) * crit(logits, y_b)
        assert torch.allclose(combined, crit(logits, soft), atol=1e-6)


def test_cutmix_lambda_is_the_kept_area():
    torch.manual_seed(3)
    x = torch.zeros(4, 1, 10, 10)
    x[1:] = 1.0  # sample 0 is all zeros, the others all ones
    mixed, y_b, lam = _BatchMixer(0.0, 1.0)(x, torch.arange(4))
    for i in range(4):
        pasted_from_other = (mixed[i] != x[i]).float().mean().item()
        if x[i].sum() != x[y_b[i]].sum():  # only visible when the partner differs
            assert abs(pasted_from_other - (1 - lam)) < 1e-6


def test_training_with_mixup_runs_and_reports_hard_label_accuracy(tmp_path):
    cfg = {"epochs": 2, "lr": 0.05, "scheduler": "constant", "select": "last", "mixup_alpha": 0.2, "cutmix_alpha": 0.1}
    loaders = _mixup_loaders()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    result = train(model, loaders, cfg, "cpu", run_dir=tmp_path)
    assert len(result.history) == 2 and 0.0 <= result.history[-1]["train_acc"] <= 1.0
    with pytest.raises(ValueError, match="mixup_alpha"):
        TrainConfig.from_dict({"epochs": 1, "lr": 0.1, "mixup_alpha": -1})


def _mixup_loaders():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 6, 6, generator=g), torch.randint(4, (64,), generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    return SimpleNamespace(train=loader, val=loader, test=loader)


# ----------------------------------------------------------------------------------------------
# test_every_epoch=False and the after_backward hook
# ----------------------------------------------------------------------------------------------
class _CountingLoader:
    """A loader that counts how often it is iterated (one evaluation pass = one iteration)."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def test_test_split_evaluated_once_on_the_kept_weights_without_test_every_epoch(tmp_path):
    model = _mlp()
    loaders = _loaders()
    scripted = _ScriptedEval(model, good_epoch=2)  # val picks epoch 2 of 4
    loaders.val = scripted
    loaders.test = _CountingLoader(loaders.test)
    result = train(model, loaders, _cfg(epochs=4, select="val", test_every_epoch=False), CPU, run_dir=tmp_path,
                   desc="fit")
    assert result.selected_epoch == 2 and _same(_state(model), scripted.snapshots[1])
    assert len(result.history) == 4
    for row in result.history:
        assert "test_acc" not in row and "test_loss" not in row and "val_acc" in row
    assert loaders.test.passes == 1  # once, at the end
    expected = evaluate(model, loaders.test.loader, CPU)  # the kept (epoch-2) weights
    assert result.final_metrics["test_acc"] == expected["acc"]
    assert result.final_metrics["test_loss"] == expected["loss"]
    assert result.final_metrics["val_acc"] == result.history[1]["val_acc"]
    with open(tmp_path / "fit_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all(r["test_acc"] == "" and r["val_acc"] != "" for r in rows)


def test_select_test_still_evaluates_test_every_epoch():
    model = _mlp()
    loaders = _loaders()
    loaders.test = _CountingLoader(loaders.test)
    result = train(model, loaders, _cfg(epochs=3, select="test", test_every_epoch=False), CPU)
    assert loaders.test.passes == 3
    assert all("test_acc" in row for row in result.history)
    best = max(range(3), key=lambda i: (result.history[i]["test_acc"], -i))
    assert result.selected_epoch == best + 1
    assert result.final_metrics["test_acc"] == result.history[best]["test_acc"]


def test_after_backward_runs_once_per_batch_between_backward_and_step():
    model = _mlp()
    loaders = _loaders(batch_size=32)  # 256 samples -> 8 batches
    calls = []

    def hook(m):
        calls.append(m)
        assert all(p.grad is not None for p in m.parameters())  # after the backward
        for p in m.parameters():  # before the step: zeroed gradients leave the weights where they are
            p.grad.zero_()

    before = _state(model)
    cfg = _cfg(epochs=2, momentum=0.0, weight_decay=0.0)
    train(model, loaders, cfg, CPU, after_backward=hook)
    assert len(calls) == 2 * 8 and all(m is model for m in calls)
    params = dict(model.named_parameters())
    for name in params:
        assert torch.equal(params[name].detach(), before[name]), name
    # with max_batches_per_epoch, once per batch actually trained
    calls.clear()
    train(_mlp(), loaders, _cfg(epochs=2, max_batches_per_epoch=3), CPU, after_backward=calls.append)
    assert len(calls) == 2 * 3


def test_amp_dtype_resolves_to_bfloat16_where_supported(monkeypatch):
    assert autocast_dtype(_cfg(amp_dtype="float16"), CPU) == torch.float16
    assert autocast_dtype(_cfg(amp_dtype="bfloat16"), CPU) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(_cfg(), torch.device("cuda")) == torch.float16  # e.g. a V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(_cfg(), torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="amp_dtype"):
        _cfg(amp_dtype="half")


def test_configure_cuda_turns_on_autotuning_and_tf32_unless_deterministic(monkeypatch):
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        configure_cuda(deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
        configure_cuda(deterministic=False)
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.allow_tf32 = saved[2]


@pytest.fixture
def one_rank_group(tmp_path):
    """A torch.distributed group of one gloo rank in this process: the loop then takes its multi-process path."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_host_synchronises_every_sync_every_batches_and_names_the_first_bad_batch(one_rank_group, monkeypatch):
    """Under torchrun (or on a GPU) the loss is checked on the device and read every sync_every batches and at the
    end of the epoch, not after every batch; a NaN is still reported at the batch where it first appeared."""
    calls = []
    real = loop._synchronise
    monkeypatch.setattr(loop, "_synchronise", lambda flags: calls.append(1) or real(flags))
    data = _blobs(320, 1)  # 10 batches of 32
    loaders = SimpleNamespace(train=DataLoader(data, batch_size=32), val=None, test=None)
    train(_mlp(), loaders, _cfg(epochs=2, sync_every=4), CPU)
    assert len(calls) == 2 * 3  # per epoch: after batches 4 and 8, and at its end

    x, y = data.tensors
    x = x.clone()
    x[5 * 32 + 3] = float("nan")  # batch 5, read at the synchronisation after batch 8
    loaders = SimpleNamespace(train=DataLoader(TensorDataset(x, y), batch_size=32), val=None, test=None)
    with pytest.raises(FloatingPointError, match="epoch 1, batch 5"):
        train(_mlp(), loaders, _cfg(epochs=1, sync_every=4), CPU)
