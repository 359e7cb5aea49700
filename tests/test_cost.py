"""benchmarks/cost.py, the cost of a paper row before launching: image counts follow the composed configs (a
changed epoch count or batches_per_step changes them in proportion), the ImageNet meta-training step counts what
stages/meta_train.py runs per rank, every figure without a measurement is labelled an estimate, a gpu_check.json
with a training images/s of the architecture is used and labelled measured (and ignored when it does not fit),
and ImageNet rows compose with --primary imagenet."""
import json
import math
import sys

import pytest

from helpers import CONFIG_DIR, REPO, load_script

SCRIPT = REPO / "benchmarks" / "cost.py"
cost = load_script(SCRIPT, "cost")

pytestmark = pytest.mark.usefixtures("one_thread")

ROW = "experiment=resnet56_cifar10_2.3x"
CIFAR_TRAIN, CIFAR_VAL, CIFAR_TEST = 45_000, 5_000, 10_000  # 50k - val_size 5000; test 10k


def parts(result, stage):
    return [p for p in result["parts"] if p["stage"] == stage]


def priced(overrides=(ROW,), gpu_check=None, **options):
    row = cost.make_row(list(overrides), **{k: v for k, v in options.items() if k != "tflops"})
    return cost.cost(row, tflops=options.get("tflops", cost.DEFAULT_TFLOPS), gpu_check=gpu_check)


@pytest.fixture(scope="module")
def row_result():
    return priced()


def test_generation_images_follow_the_task_recipes(row_result):
    assert row_result["data_models"] == cost.PAPER_CIFAR_DATA_MODELS == 10
    train, init = parts(row_result, "generate")
    assert train["train_images"] == 10 * 200 * CIFAR_TRAIN
    assert train["eval_images"] == 10 * 200 * (CIFAR_VAL + CIFAR_TEST)  # validation + test after every epoch
    assert init["train_images"] == 10 * 80 * CIFAR_TRAIN
    assert init["macs"] == pytest.approx(row_result["macs_unpruned"] / 1.32)

    halved = priced([ROW, "task.train.epochs=100", "pipeline.num_data_models=4"])
    assert halved["data_models"] == 4  # the row's setting wins over the paper's default
    assert parts(halved, "generate")[0]["train_images"] == 4 * 100 * CIFAR_TRAIN
    assert parts(halved, "generate")[1]["train_images"] == 4 * 80 * CIFAR_TRAIN
    assert parts(halved, "pretrain_final")[0]["train_images"] == 100 * CIFAR_TRAIN


def test_meta_training_images_follow_batches_per_step(row_result):
    (one_pass,) = parts(row_result, "meta_train")
    assert row_result["meta_train_data_models"] == 8  # first 80 % of 10
    assert one_pass["train_images"] == 100 * 8 * CIFAR_TRAIN  # null: one pass over the training split per step
    (two,) = parts(priced([ROW, "task.meta_train.batches_per_step=2", "task.meta_train.epochs=10"]), "meta_train")
    assert two["train_images"] == 10 * 8 * 2 * 500  # 2 batches of task.meta_train.batch_size 500


def test_imagenet_meta_training_counts_full_steps_per_rank(monkeypatch):
    monkeypatch.setattr(cost, "unpruned_macs", lambda task, classes: 4e9)  # counts only: no model needed
    eight = priced([], primary="imagenet")
    (part,) = parts(eight, "meta_train")
    # ceil(1,271,167 / 8) = 158,896 images = 4,966 batches of 32 per rank -> 24 steps of 200 (README: 24 per epoch)
    assert part["epochs"].startswith("100 (24 steps")
    assert part["train_images"] == 100 * 8 * 24 * 200 * 32
    (single,) = parts(priced([], primary="imagenet", world_size=1), "meta_train")
    assert single["train_images"] == 100 * (math.ceil(1_271_167 / 32) // 200) * 200 * 32


def test_final_runs_scale_with_seeds_methods_and_speed_ups(row_result):
    base = row_result["macs_unpruned"]
    init, after_mn, after_pruning = parts(row_result, "final")
    assert row_result["seeds"] == [7, 8, 9]  # the experiment's sweeper
    assert init["runs"] == 3 * 2 and init["macs"] == pytest.approx(base / 1.32)
    assert after_mn["runs"] == 3  # the baseline (none) skips the after_metanetwork fine-tune
    assert after_pruning["runs"] == 6 and after_pruning["macs"] == pytest.approx(base / 2.3)
    assert after_pruning["train_images"] == 6 * 140 * CIFAR_TRAIN
    more = priced(methods=["metanetwork", "finetune", "sparse_learning", "none"], seeds=2)
    assert [p["runs"] for p in parts(more, "final")] == [2 * 4, 2 * 3, 2 * 4]


def test_selection_counts_checkpoints_control_and_curves():
    result = priced([ROW, "select.checkpoints=1:40:3"])
    finetunes, curves = parts(result, "select")
    assert finetunes["runs"] == 14 + 1  # epochs 1, 4, ..., 40 and the control
    assert finetunes["train_images"] == 15 * 100 * CIFAR_TRAIN
    assert finetunes["eval_images"] == 15 * 100 * CIFAR_VAL  # never the test split
    assert curves["runs"] == 16  # + origin
    points = len(cost.curve_fractions(1.32, 3.0, 200))
    assert curves["eval_images"] == 16 * points * CIFAR_VAL and curves["train_images"] == 0


def test_every_unmeasured_figure_is_an_estimate_from_macs(row_result, tmp_path):
    missing = priced(gpu_check=tmp_path / "absent.json")
    counted = [p for p in missing["parts"] if p["train_images"] or p["eval_images"]]
    assert counted and all(p["source"] == "estimate" for p in counted)
    for p in counted:
        flop = 6 * p["macs"] * p["train_images"] + 2 * p["eval_macs"] * p["eval_images"]
        assert p["gpu_hours"] == pytest.approx(flop / 100e12 / 3600)
    faster = priced(gpu_check=tmp_path / "absent.json", tflops=200)
    assert faster["total_gpu_hours"] == pytest.approx(missing["total_gpu_hours"] / 2)
    text = cost.markdown(missing)
    assert "**estimate**" in text and "100 TFLOP/s" in text and "measured (gpu_check" not in text
    rows = [line for line in text.splitlines() if line.startswith("| generate |")]
    assert rows and all(line.rstrip().endswith("| estimate |") for line in rows)


def gpu_check_json(path, architecture="resnet56", image=32, tiny=False, device_type="cuda", rates=None):
    rates = rates or {"fp32": 20_000.0, "amp": 30_000.0, "amp+channels_last": 32_000.0,
                      "amp+sparse_learning": 25_000.0}
    report = {"environment": {"date": "2026-12-01T10:00:00+00:00",
                              "device": {"type": device_type, "name": "NVIDIA H100 80GB HBM3", "count": 1}},
              "sizes": {"tiny": tiny, "resnet": architecture, "image": image, "batch": 128},
              "sections": [{"key": "f", "title": "training throughput", "status": "pass",
                            "numbers": {**{k: {"images_per_s": v, "step_ms": 1.0} for k, v in rates.items()},
                                        "sparse_over_plain_step_cost": 1.2, "timed": "1 epoch"}}]}
    path.write_text(json.dumps(report))
    return path


def test_a_gpu_check_of_the_architecture_is_used_and_labelled_measured(tmp_path):
    result = priced(gpu_check=gpu_check_json(tmp_path / "gpu_check.json"))
    label = "measured (gpu_check, 2026-12-01, NVIDIA H100 80GB HBM3)"
    counted = [p for p in result["parts"] if p["train_images"] or p["eval_images"]]
    assert all(p["source"] == label for p in counted)
    train, init = parts(result, "generate")
    # CIFAR recipes set no amp: the fp32 rate; evaluation images cost a third of a training image
    assert train["gpu_hours"] == pytest.approx(10 * 200 * (CIFAR_TRAIN + (CIFAR_VAL + CIFAR_TEST) / 3) / 20_000 / 3600)
    assert init["gpu_hours"] == pytest.approx(train["gpu_hours"] * 80 / 200 / 1.32)  # scaled by MACs
    text = cost.markdown(result)
    assert label in text and "| estimate |" not in text


@pytest.mark.parametrize("kind", ["other_architecture", "tiny", "cpu", "unparseable"])
def test_a_gpu_check_that_does_not_fit_falls_back_to_the_estimate(tmp_path, kind):
    path = tmp_path / "gpu_check.json"
    if kind == "unparseable":
        path.write_text("{not json")
    else:
        gpu_check_json(path, architecture="resnet20" if kind == "other_architecture" else "resnet56",
                       tiny=kind == "tiny", device_type="cpu" if kind == "cpu" else "cuda")
    result = priced(gpu_check=path)
    assert result["throughput"]["source"] == "estimate" and path.name in result["throughput"]["why"]
    assert {p["source"] for p in result["parts"] if p["train_images"]} == {"estimate"}


def test_the_command_line_prints_markdown_and_json(tmp_path, capsys):
    absent = str(tmp_path / "absent.json")
    assert cost.main([ROW, "--stages", "generate,final", "--gpu-check", absent]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# Cost of `{ROW}` (configs/main.yaml)")
    assert "| generate |" in text and "| final |" in text and "| meta_train |" not in text
    assert cost.main([ROW, "--json", "--gpu-check", absent, "--data-models", "12"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["data_models"] == 12 and data["data_models_source"] == "--data-models"
    assert set(data["gpu_hours"]) == set(cost.STAGES)
    with pytest.raises(SystemExit):
        cost.main([ROW, "--stages", "training"])


def test_an_imagenet_row_composes_with_the_imagenet_primary(tmp_path):
    result = priced(["task=vit_b_16_on_ImageNet"], primary="imagenet", gpu_check=tmp_path / "absent.json")
    assert result["primary"] == "configs/imagenet.yaml" and result["architecture"] == "vit_b_16"
    assert result["input_size"] == [3, 224, 224] and result["dataset"]["train_images"] == 1_281_167 - 10_000
    assert result["data_models"] == 2 and result["meta_train_data_models"] == 1
    (init,) = parts(result, "generate")  # train.epochs 0: the data model is the pretrained network
    assert "after_init_pruning" in init["what"] and init["train_images"] == 2 * 300 * 1_271_167
    assert result["macs_unpruned"] > 1e10 and result["targets"] == [1.7]


IMAGENET_ROWS = sorted(p.stem for pattern in ("resnet50_imagenet_*.yaml", "vit_b_16_imagenet_*.yaml")
                       for p in (CONFIG_DIR / "experiment").glob(pattern))
CIFAR_ROWS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if p.stem not in IMAGENET_ROWS)


@pytest.mark.parametrize("name", CIFAR_ROWS)
def test_every_cifar_paper_row_is_costed(name, tmp_path):
    result = priced([f"experiment={name}"], gpu_check=tmp_path / "absent.json")
    assert result["total_gpu_hours"] > 0 and result["seeds"] == [7, 8, 9]


@pytest.mark.parametrize("name", IMAGENET_ROWS or [pytest.param(None, marks=pytest.mark.skip(
    reason="no configs/experiment/resnet50_imagenet_*.yaml or vit_b_16_imagenet_*.yaml yet"))])
def test_every_imagenet_paper_row_is_costed(name, tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "unpruned_macs", lambda task, classes: 4e9)  # composition and counts only
    result = priced([f"experiment={name}"], primary="imagenet", gpu_check=tmp_path / "absent.json")
    assert result["dataset"]["name"] == "ImageNet" and result["total_gpu_hours"] > 0
