"""Every task composes with every primary config, and every recipe in it is valid for the code that reads it."""
import pytest
import torch
from omegaconf import OmegaConf

from data_loaders.image_datasets import list_datasets
from generate_dataset.models import list_models
from helpers import CONFIG_DIR, compose_cfg
from stages import UnknownRunError, execute, list_runs
from stages.common import recipe, setup

PRIMARY = ["main", "generate", "imagenet"]
TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
PAPER_TASKS = {
    "resnet56_on_CIFAR10", "resnet56_on_CIFAR100", "resnet56_on_SVHN", "resnet110_on_CIFAR10",
    "VGG19_on_CIFAR100", "resnet50_on_ImageNet", "vit_b_16_on_ImageNet",
}


def test_all_required_tasks_exist():
    assert PAPER_TASKS | {"resnet20_on_digits", "resnet20_on_FashionMNIST"} <= set(TASKS)


@pytest.mark.parametrize("primary", PRIMARY)
@pytest.mark.parametrize("task", TASKS)
def test_task_composes_with_primary(primary, task):
    cfg = compose_cfg([f"task={task}"], primary=primary)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["task"]["name"] == task
    assert set(resolved["metanetwork"]) >= {"num_layer", "hiddim", "node_res_ratio", "edge_res_ratio"}


@pytest.mark.parametrize("method", METHODS)
def test_methods_compose(method):
    cfg = compose_cfg([f"method={method}"])
    assert cfg.method.name == method


@pytest.mark.parametrize("task", TASKS)
def test_task_recipes_are_valid(task):
    cfg = compose_cfg([f"task={task}"])
    assert cfg.task.model in list_models()
    assert cfg.task.dataset.name in list_datasets()
    sections = [cfg.task.train, *cfg.task.finetune.values()]
    for section in sections:
        for protocol in ("validation", "paper"):
            recipe(section, protocol)  # raises on an unknown key or a bad value
    assert cfg.task.initial_speed_up >= 1.0
    assert cfg.task.pruning.target_speed_up > cfg.task.initial_speed_up


def test_paper_protocol_switches_validation_selection_to_test():
    cfg = compose_cfg(["task=resnet56_on_CIFAR10"])
    assert recipe(cfg.task.finetune.after_pruning, "validation").select == "val"
    assert recipe(cfg.task.finetune.after_pruning, "paper").select == "test"
    # a recipe that keeps the last epoch is not changed by the protocol
    assert recipe(cfg.task.finetune.after_metanetwork, "paper").select == "last"


def test_paper_recipe_numbers():
    """Spot-check the reference's recipe numbers (reference §7.5, §5.4, §10)."""
    c = compose_cfg(["task=resnet56_on_CIFAR10"])
    assert (c.task.train.epochs, c.task.train.lr, list(c.task.train.milestones)) == (200, 0.1, [100, 150, 180])
    assert c.task.initial_speed_up == 1.32
    assert list(c.task.finetune.after_pruning.milestones) == [80, 120]
    assert (c.metanetwork.num_layer, c.metanetwork.hiddim, c.metanetwork.node_res_ratio) == (8, 64, 0.01)
    assert (c.task.meta_train.lr, list(c.task.meta_train.milestones), c.task.meta_train.pruner_reg) == (1e-3, [3], 10)
    v = compose_cfg(["task=VGG19_on_CIFAR100"])
    assert v.task.initial_speed_up == 2.0 and v.task.finetune.after_pruning.epochs == 2000
    assert (v.metanetwork.hiddim, v.metanetwork.edge_res_ratio) == (32, 0.05)
    r = compose_cfg(["task=resnet50_on_ImageNet"], primary="imagenet")
    assert r.task.pruning.target_speed_up == 2.3095 and r.metanetwork.num_layer == 6


def test_metanetwork_choice_follows_task_and_command_line_wins():
    assert compose_cfg(["task=VGG19_on_CIFAR100"]).metanetwork.hiddim == 32
    assert compose_cfg(["task=resnet56_on_CIFAR10"]).metanetwork.hiddim == 64
    small = compose_cfg(["task=resnet56_on_CIFAR10", "metanetwork=small"]).metanetwork
    assert small.hiddim != 64


def test_default_main_config_is_the_offline_quickstart():
    cfg = compose_cfg([])
    assert cfg.task.name == "resnet20_on_digits"
    assert cfg.protocol == "validation"


def test_unknown_run_mode_lists_valid_modes(tmp_path):
    cfg = compose_cfg(["run=does_not_exist"])
    with pytest.raises(UnknownRunError) as err:
        execute(cfg, tmp_path)
    for name in list_runs():
        assert name in str(err.value)
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("primary", ["main", "generate"])
def test_threads_key_sets_torch_threads_and_rejects_bad_values(primary):
    before = torch.get_num_threads()
    try:
        setup(compose_cfg(["device=cpu", "threads=1"], primary=primary))
        assert torch.get_num_threads() == 1
        setup(compose_cfg(["device=cpu", "threads=null"], primary=primary))  # null leaves torch's setting alone
        assert torch.get_num_threads() == 1
        for bad in ("0", "2.5", "abc"):
            with pytest.raises(ValueError, match="threads="):
                setup(compose_cfg(["device=cpu", f"threads={bad}"], primary=primary))
    finally:
        torch.set_num_threads(before)


# Sections the run modes read (configs/shared/default.yaml), composed by main.yaml and imagenet.yaml alike.
SHARED_SECTIONS = ("name", "seed", "deterministic", "device", "threads", "protocol", "store", "codec", "meta_train",
                   "select", "final", "pipeline", "report")


@pytest.mark.parametrize("task", ["resnet50_on_ImageNet", "vit_b_16_on_ImageNet", "resnet20_on_digits"])
def test_imagenet_config_has_every_run_mode_section_with_main_values(task):
    main = OmegaConf.to_container(compose_cfg([f"task={task}"]), resolve=True)
    imagenet = OmegaConf.to_container(compose_cfg([f"task={task}"], primary="imagenet"), resolve=True)
    for section in SHARED_SECTIONS:
        assert section in imagenet, section
        assert imagenet[section] == main[section], section
    # what differs: the torchrun default run mode and the DDP section
    assert imagenet["run"] == "train" and main["run"] == "pipeline"
    assert imagenet["distributed"] == {"backend": "auto", "sync_bn": False, "timeout_minutes": None} and "distributed" not in main
    assert {k: v for k, v in imagenet.items() if k not in ("run", "distributed")} == \
        {k: v for k, v in main.items() if k != "run"}


@pytest.mark.parametrize("run", sorted(set(list_runs())))
def test_every_run_mode_composes_under_imagenet(run):
    cfg = compose_cfg([f"run={run}", "task=resnet50_on_ImageNet"], primary="imagenet")
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.run == run and cfg.final.target_speed_up == cfg.task.pruning.target_speed_up == 2.3095
    assert cfg.select.meta_train_dir is None and cfg.pipeline.num_data_models == 5 and cfg.report.per_run


def test_run_dirs_and_experiments_per_primary():
    """imagenet.yaml's run dir has no timestamp (every torchrun rank resolves it alike); an experiment file still
    overrides the primary config's own values (it comes last in both)."""
    hydra_main = compose_cfg([], hydra_cfg=True).hydra
    hydra_imagenet = compose_cfg([], primary="imagenet", hydra_cfg=True).hydra
    assert "now:" in OmegaConf.to_yaml(hydra_main.run) and "now:" not in OmegaConf.to_yaml(hydra_imagenet.run)
    assert hydra_imagenet.run.dir.endswith("resnet50_on_ImageNet/default/train")
    subdir = [OmegaConf.to_container(h.sweep)["subdir"] for h in (hydra_main, hydra_imagenet)]
    assert subdir == ["${hydra.job.num}_seed${seed}"] * 2 and hydra_imagenet.job.chdir is False
    for primary in ("main", "imagenet"):
        cfg = compose_cfg(["experiment=resnet56_cifar10_2.3x"], primary=primary)
        assert (cfg.run, cfg.name, cfg.final.target_speed_up) == ("pruning_final", "resnet56_cifar10_2.3x", 2.3)


def test_generate_config_composes_the_distributed_section():
    generate = compose_cfg([], primary="generate")
    assert generate.distributed == compose_cfg([], primary="imagenet").distributed
