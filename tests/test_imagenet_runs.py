"""ImageNet-scale run modes under torchrun (2 gloo CPU ranks) on a tiny ImageFolder written here: data-model
generation starting from a given weights file (DDP training, rank 0 prunes and writes the one store), analyse
(every rank evaluates its shard, rank 0 writes), and a report whose bad path ends every rank with rank 0's message
through torchrun's error summary. Three launches, about 10 s each on an idle 2-core machine."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from data_loaders.store import DataModelStore
from generate_dataset.models import build_model, load_model, model_spec
from helpers import REPO, compose_cfg, run_torchrun, write_imagefolder
from pruning.depgraph import prune_to_speed_up
from stages.common import task_data
from training.loop import evaluate_splits
from utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.slow

GENERATE = REPO / "generate_dataset" / "generate.py"
# Recipes of 1 epoch of 2 batches at lr 1e-12 (the weights barely move, so the stored data models can be compared
# with the given weights pruned in this process) and a short init pruning.
TINY_RECIPES = ["task.train.epochs=1", "task.train.lr=1e-12", "+task.train.max_batches_per_epoch=2",
                "task.initial_speed_up=1.3", "task.pruning.iterative_steps=10",
                "task.finetune.after_init_pruning.epochs=1", "task.finetune.after_init_pruning.lr=1e-12",
                "+task.finetune.after_init_pruning.max_batches_per_epoch=2"]


def tiny_imagenet(root) -> list[str]:
    """resnet50_on_ImageNet shrunk to resnet8 on 3 classes of 32x32 images under ``root``."""
    return ["task=resnet50_on_ImageNet", "task.model=resnet8", f"paths.data_dir={root}",
            f"task.dataset.root={root}/imagenet", "task.dataset.val_size=6", "task.dataset.num_workers=0",
            "task.input_size=[3,32,32]", "+task.dataset.image_size=32", "device=cpu", "task.batch_size=4",
            "task.eval_batch_size=8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The ImageFolder, and a weights file (this project's checkpoint format) the runs start from."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    write_imagefolder(root / "imagenet", classes=3, per_class=8, size=20)
    torch.manual_seed(5)
    model = build_model("resnet8", 3)
    weights = root / "weights.pt"
    save_checkpoint(weights, model.state_dict(), model_spec("resnet8", model, 3))
    return root, weights, {k: v.clone() for k, v in model.state_dict().items()}


def output(proc) -> str:
    return proc.stdout + proc.stderr


def test_generate_under_torchrun_starts_from_the_weights_and_rank0_writes_one_store(tiny):
    root, weights_file, weights = tiny
    store, run_dir = root / "store", root / "generate"
    overrides = tiny_imagenet(root) + TINY_RECIPES + [f"task.pretrained={weights_file}", "num=2", f"store={store}",
                                                      f"hydra.run.dir={run_dir}"]
    proc = run_torchrun(overrides, root, script=GENERATE, timeout=300)
    assert proc.returncode == 0, output(proc)[-4000:]
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["produced"] == [0, 1] and summary["shard"] == str(store / "shard_0000")
    assert sorted(p.name for p in store.iterdir()) == ["shard_0000", "shard_0000.lock"]
    assert output(proc).count("pruned in ") == 2  # rank 0 alone prunes, once per data model
    assert output(proc).count("starts from task.pretrained=") == 2  # rank 1 logs warnings only

    # what each stored data model should be: the given weights (unchanged by lr 1e-12), init-pruned the same way
    cfg = compose_cfg(overrides[:-1], primary="generate")
    expected = build_model("resnet8", 3)
    expected.load_state_dict(weights)
    expected.eval()
    prune_to_speed_up(expected, 1.3, OmegaConf.to_container(cfg.method, resolve=True), torch.ones(1, 3, 32, 32),
                      iterative_steps=10)
    records = DataModelStore(store)
    assert len(records) == 2
    for i in range(2):
        stored = records[i].state_dict
        assert records[i].spec["widths"] == model_spec("resnet8", expected, 3)["widths"]
        assert records[i].speed_up >= 1.3
        for name, param in expected.named_parameters():  # BatchNorm running statistics did move in training
            assert torch.allclose(stored[name], param.detach(), atol=1e-6), name


def test_analyse_under_torchrun_evaluates_on_all_ranks_and_rank0_writes(tiny):
    root, weights_file, _ = tiny
    run_dir = root / "analyse"
    overrides = tiny_imagenet(root) + ["run=analyse", f"final.model={weights_file}"]
    proc = run_torchrun(overrides + [f"hydra.run.dir={run_dir}"], root, timeout=300)
    assert proc.returncode == 0, output(proc)[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "layer_statistics.csv").exists() and (run_dir / "layer_statistics.png").exists()
    assert output(proc).count("analyse: ") == 1  # printed by rank 0 only
    # the all-reduced accuracy over both ranks' shards is the single-process accuracy on the whole split
    cfg = compose_cfg(overrides, primary="imagenet")
    _splits, loaders = task_data(cfg.task, cfg.seed)
    model, _ = load_model(weights_file)
    single = evaluate_splits(model, loaders, "cpu")
    for key in ("val_acc", "test_acc", "val_loss", "test_loss"):
        assert results["models"]["model"][key] == pytest.approx(single[key], rel=1e-5), key


def test_report_bad_path_under_torchrun_ends_every_rank_with_the_message(tiny):
    root, _, _ = tiny
    run_dir, missing = root / "report", root / "no_such_runs"
    proc = run_torchrun(tiny_imagenet(root) + ["run=report", f"report.dir={missing}", f"hydra.run.dir={run_dir}"],
                        root, timeout=300)
    assert proc.returncode != 0
    text = output(proc)
    message = f"report.dir={missing} is not a folder"
    # torchrun's summary carries the message (@record): rank 0's ReportError, or rank 1's RankFailedError quoting it
    # (whichever rank's error torchrun saw first; rank 1 may also be stopped by torchrun before it raises)
    assert "Root Cause" in text and message in text.split("Root Cause")[1]
    assert "Traceback" in text.split("Root Cause")[1]
    assert not (run_dir / "results.json").exists()
