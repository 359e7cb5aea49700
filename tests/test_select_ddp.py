"""run=select and run=visualize under torchrun (2 gloo CPU ranks) against one single-process run on the same inputs.

A tiny ImageNet layout written here (3 classes, colour cues), ResNet-8 data models in a two-model store (model 1
validates, trained briefly so it has something to lose), two metanetwork checkpoints (epoch 1 wrecks the network,
epoch 2 is the identity) and one sparse-learning strength, so every kind of fine-tune runs as a DDP fine-tune.
One torchrun launch runs select, then visualize on select's cache (tests/select_ddp_driver.py is written here).

What must agree with the single process, and why only that:
- the origin curve (no fine-tune): the same weights pruned the same deterministic way, so the same speed-up at every
  step (the same widths), and the same validation accuracy: the 12 validation images split evenly over the ranks
  (no DistributedSampler padding) and fit in select.max_batches batches either way; only the float summation order
  differs, and accuracy counts whole samples, so only an exact logit tie could change it (tolerance 1e-9);
- the choice (epoch 2) and the first point of every curve (the data model's recorded speed-up).
The fine-tuned curves differ by design: the DDP fine-tune sees 2 ranks x 8 images per step where the single
process sees 8, so its weights, and with them the pruned widths, are other ones. Inside the DDP run the control
and the identity checkpoint take the same seeded DDP fine-tune, so their curves must be equal there.

The last test (in process, fast) checks that the curve hands every pruning step's layer shapes to the cross-rank
equality check.
"""
import json

import pytest
import torch

from generate_dataset.models import build_model
from helpers import METHOD, REPO, compose_cfg, run_torchrun, write_imagefolder, write_selection_store
from nn.apply import build_metanetwork, save_metanetwork
from nn.graph import GraphCodec
from pruning import curves
from stages import execute
from stages.common import codec_options, task_data
from training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "resnet50_on_ImageNet"
BASE_SPEED_UP = 1.25  # recorded speed-up of the validation data model (as if init-pruned)
MAX_SPEED_UP = 2.0

DRIVER = f'''
import json, logging, sys
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(REPO / "tests")!r})
from helpers import compose_cfg
from stages import execute
from utils.distributed import cleanup, init_distributed

logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
init_distributed("gloo", "cpu")
overrides, select_dir, visualize_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    execute(compose_cfg(overrides + ["run=select"]), select_dir)
    # a re-plot from select's cache alone (its curves.json names the meta_train dir): nothing to compute
    execute(compose_cfg(overrides + ["run=visualize", f"select.cache={{select_dir}}", "select.meta_train_dir=null"]),
            visualize_dir)
finally:
    cleanup()
'''


def _overrides(root):
    return [f"task={TASK}", "task.model=resnet8", "device=cpu", f"paths.data_dir={root}",
            f"task.dataset.root={root / 'imagenet'}", "task.dataset.val_size=12", "task.dataset.num_workers=0",
            "task.input_size=[3,32,32]", "++task.dataset.image_size=32", "task.batch_size=8", "task.eval_batch_size=6",
            f"store={root / 'store'}", f"select.meta_train_dir={root / 'meta'}", "select.checkpoints=all",
            "select.finetune_epochs=1", "select.max_batches=3", "select.iterative_steps=10",
            f"select.max_speed_up={MAX_SPEED_UP}", "select.sparse_learning_regs=[0.001]"]


def _save_metanet(path, codec, ratio, seed, epoch, store):
    torch.manual_seed(seed)
    options = {"num_layer": 2, "hiddim": 8, "node_res_ratio": ratio, "edge_res_ratio": ratio}
    save_metanetwork(path, build_metanetwork(codec, options), codec, options, task=TASK, epoch=epoch,
                     meta={"task": TASK, "store": str(store), "train_indices": [0]})  # as meta_train records


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ImageFolder, store (model 0 meta-trains, model 1 validates) and a meta_train dir with two checkpoints."""
    root = tmp_path_factory.mktemp("select_ddp")
    write_imagefolder(root / "imagenet", classes=3, per_class=12, size=20)
    overrides = _overrides(root)
    cfg = compose_cfg(overrides)
    _splits, loaders = task_data(cfg.task, 0)
    model = write_selection_store(root / "store", TASK, cfg.method.name, loaders,
                                  TrainConfig(epochs=4, lr=0.05, milestones=[3], select="last"), BASE_SPEED_UP, 3, 3)
    codec = GraphCodec(model, **codec_options(cfg))
    checkpoints = root / "meta" / "checkpoints"
    _save_metanet(checkpoints / "epoch_0001.pt", codec, 50.0, 0, 1, root / "store")  # destroys the network
    _save_metanet(checkpoints / "epoch_0002.pt", codec, 0.0, 1, 2, root / "store")  # the identity
    return {"root": root, "overrides": overrides}


@pytest.fixture(scope="module")
def single(env):
    """The single-process reference run (in this process)."""
    run_dir = env["root"] / "single"
    execute(compose_cfg(env["overrides"] + ["run=select"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def ddp(env):
    """One torchrun launch: run=select, then run=visualize from its cache."""
    root = env["root"]
    driver = root / "select_ddp_driver.py"
    driver.write_text(DRIVER)
    proc = run_torchrun([json.dumps(env["overrides"]), str(root / "ddp_select"), str(root / "ddp_visualize")], root,
                        script=driver, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return {"select": root / "ddp_select", "visualize": root / "ddp_visualize", "output": output}


def _entries(run_dir):
    return {e["label"]: e for e in json.loads((run_dir / "curves.json").read_text())["entries"]}


@pytest.mark.slow
def test_select_under_torchrun_chooses_like_one_process_and_only_rank0_writes(env, single, ddp):
    chosen = json.loads((ddp["select"] / "selection.json").read_text())
    reference = json.loads((single / "selection.json").read_text())
    assert chosen["epoch"] == reference["epoch"] == 2, (chosen["ranking"], reference["ranking"])
    assert [r["epoch"] for r in chosen["ranking"]] == [2, 1]
    assert chosen["best_sparse_reg"] == 0.001 and set(chosen["sparse_learning_scores"]) == {"0.001"}
    results = json.loads((ddp["select"] / "results.json").read_text())
    assert results["curves_computed"] == 5 and results["curves_reused"] == 0
    out = ddp["output"]
    # one rank-0 print and log line each, although both ranks ran the whole selection
    assert out.count("select: epoch 2 (auc") == 1 and out.count("chose epoch 2") == 1, out[-4000:]
    assert out.count("curve origin, data model 1: computed") == 1
    assert "rank 1/2" in out  # both ranks did join
    # fine-tune metrics CSVs come from rank 0 only, one per fine-tuned curve
    assert sorted(p.name for p in (ddp["select"] / "finetune").iterdir()) == [
        "control_model1_metrics.csv", "epoch_1_model1_metrics.csv", "epoch_2_model1_metrics.csv",
        "sparse_reg_0.001_model1_metrics.csv"]
    assert (ddp["select"] / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_origin_curve_under_torchrun_equals_the_single_process_one(single, ddp):
    ours, theirs = _entries(ddp["select"])["origin"], _entries(single)["origin"]
    assert ours["settings"]["world_size"] == 2 and "world_size" not in theirs["settings"]
    assert len(ours["points"]) == len(theirs["points"]) >= 3
    # the same widths at every step: the same MACs, so exactly the same speed-ups
    assert [x for x, _ in ours["points"]] == [x for x, _ in theirs["points"]]
    assert [a for _, a in ours["points"]] == pytest.approx([a for _, a in theirs["points"]], abs=1e-9)
    assert ours["points"][0][1] > 0.5  # the trained data model has something to lose (3 classes: chance 1/3)


@pytest.mark.slow
def test_ddp_finetuned_curves_are_reproducible_and_span_the_range(single, ddp):
    ours, theirs = _entries(ddp["select"]), _entries(single)
    assert set(ours) == set(theirs) == {"origin", "control", "sparse_reg_0.001", "epoch_1", "epoch_2"}
    for label, entry in ours.items():
        xs = [x for x, _ in entry["points"]]
        assert xs[0] == pytest.approx(BASE_SPEED_UP) and xs[-1] >= MAX_SPEED_UP, (label, xs)
        if label != "origin":
            assert entry["finetune"]["epochs"] == 1
    # the identity checkpoint and the control take the same seeded DDP fine-tune: the same curve
    flat = [v for point in ours["control"]["points"] for v in point]
    assert flat == pytest.approx([v for point in ours["epoch_2"]["points"] for v in point])


@pytest.mark.slow
def test_visualize_under_torchrun_reuses_select_cache(ddp):
    results = json.loads((ddp["visualize"] / "results.json").read_text())
    assert results["curves_computed"] == 0 and results["curves_reused"] == 5
    chosen = json.loads((ddp["select"] / "selection.json").read_text())
    assert results["scores"]["epoch_2"] == pytest.approx(chosen["score"])
    assert (ddp["visualize"] / "curves.png").stat().st_size > 1000
    assert ddp["output"].count("visualize: 0 curve(s) computed, 5 reused") == 1


def test_curve_compares_the_pruned_structure_across_ranks_after_every_step(monkeypatch):
    """In process: under torchrun the curve hands every step's layer shapes to the cross-rank check (which raises
    on every rank when they differ: tests/test_distributed.py)."""
    checked = []
    monkeypatch.setattr(curves, "is_distributed", lambda: True)
    monkeypatch.setattr(curves, "check_same_on_all_ranks", lambda value, what: checked.append((value, what)))
    torch.manual_seed(0)
    model = build_model("resnet8", 3, in_channels=3).eval()
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    points = curves.accuracy_speed_up_curve(model, torch.utils.data.DataLoader(data, batch_size=4), "cpu", METHOD,
                                            torch.ones(1, 3, 16, 16), max_speed_up=1.5, iterative_steps=10,
                                            desc="probe")
    assert len(checked) == len(points) - 1 >= 1
    first, what = checked[0]
    assert what == "probe: the pruned structure after step 1"
    assert [name for name, _ in first] == [name for name, _ in model.named_parameters()]
    assert first != curves.layer_shapes(model)  # the shapes after pruning, not the model's own
