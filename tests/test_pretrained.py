"""Pretrained starts (``task.pretrained``): torchvision weights from the local hub cache or a local weights file,
checked key by key, and the runs that start from them (a generated data model, pretrain_final, pruning_final with
final.model=null). No test touches the network: downloads are replaced by a stub that would fail the test."""
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_loaders.store import DataModelStore
from generate_dataset.models import (PretrainedWeightsError, build_model, load_model, load_pretrained, model_spec,
                                     resolve_pretrained, torchvision_weights_path)
from helpers import compose_cfg, tiny_cfg
from stages import execute, generate
from stages.common import run_recorded, start_model, task_data
from utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name in torchvision's ResNet18_Weights.IMAGENET1K_V1 url


def distinctive_weights(name: str = "resnet8", num_classes: int = 10, in_channels: int = 1, seed: int = 123) -> dict:
    """A state dict no fresh model has: seeded init plus non-default BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes, in_channels=in_channels)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key].cpu(), value), key


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt fails the test."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A temporary TORCH_HOME: torch.hub.get_dir() is <it>/hub."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    return home


# ----------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------
def test_plain_state_dict_file_loads_exactly(tmp_path, no_download):
    weights = distinctive_weights()
    path = tmp_path / "w.pth"
    torch.save(weights, path)
    model = build_model("resnet8", 10, in_channels=1)
    assert load_pretrained(model, "resnet8", str(path)) == path.resolve()
    assert_same_tensors(model.state_dict(), weights)


def test_wrapped_ddp_and_project_checkpoint_files_load(tmp_path, no_download):
    weights = distinctive_weights()
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    save_checkpoint(tmp_path / "ckpt.pt", weights, model_spec("resnet8", weights, 10))
    for name in ("ddp.pt", "ckpt.pt"):
        model = build_model("resnet8", 10, in_channels=1)
        load_pretrained(model, "resnet8", tmp_path / name)
        assert_same_tensors(model.state_dict(), weights)
    # a project checkpoint of another architecture is refused by name
    other = build_model("resnet20", 10, in_channels=1).state_dict()
    save_checkpoint(tmp_path / "r20.pt", other, model_spec("resnet20", other, 10))
    with pytest.raises(PretrainedWeightsError, match="architecture 'resnet20'.*task's model is 'resnet8'"):
        load_pretrained(build_model("resnet8", 10, in_channels=1), "resnet8", tmp_path / "r20.pt")


def test_mismatching_shapes_and_keys_are_named(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(distinctive_weights(num_classes=7), path)
    model = build_model("resnet8", 10, in_channels=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(model, "resnet8", path)
    text = str(err.value)
    assert "2 wrong shapes" in text and "fc.weight: file (7, " in text and "vs model (10, " in text
    assert "fc.bias" in text and str(path) in text
    assert_same_tensors(model.state_dict(), before)  # nothing half-loaded
    extra = distinctive_weights() | {"extra.weight": torch.zeros(1)}
    del extra["conv1.weight"]
    torch.save(extra, path)
    with pytest.raises(PretrainedWeightsError,
                       match=r"missing keys \(conv1.weight\).*unexpected keys \(extra.weight\)"):
        load_pretrained(model, "resnet8", path)


def test_torchvision_legacy_vit_keys_are_renamed(tmp_path):
    weights = distinctive_weights("vit_tiny", 10, in_channels=3)
    legacy = {re.sub(r"\.mlp\.([03])\.", lambda m: f".mlp.linear_{int(m.group(1)) // 3 + 1}.", k): v
              for k, v in weights.items()}
    assert legacy.keys() != weights.keys()
    torch.save(legacy, tmp_path / "vit.pth")
    model = build_model("vit_tiny", 10)
    load_pretrained(model, "vit_tiny", tmp_path / "vit.pth")
    assert_same_tensors(model.state_dict(), weights)


def test_torchvision_name_is_read_from_the_hub_cache_without_network(torch_home, no_download):
    expected = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    assert torchvision_weights_path("resnet18", "IMAGENET1K_V1") == expected
    weights = distinctive_weights("resnet18", 10, in_channels=3)
    expected.parent.mkdir(parents=True)
    torch.save(weights, expected)
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"):
        model = build_model("resnet18", 10)
        assert load_pretrained(model, "resnet18", name) == expected
        assert_same_tensors(model.state_dict(), weights)


def test_missing_torchvision_file_names_both_ways_and_download_is_opt_in(torch_home, monkeypatch):
    expected = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    fetched = []

    def fake_download(url, dst, progress=True):
        fetched.append(url)
        torch.save(distinctive_weights("resnet18", 10, in_channels=3), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(PretrainedWeightsError) as err:
        resolve_pretrained("resnet18", "IMAGENET1K_V1")
    text = str(err.value)
    assert f"at exactly {expected}" in text and "https://download.pytorch.org/models/" + RESNET18_FILE in text
    assert "task.pretrained=/path/to/file.pth" in text and "task.pretrained_download=true" in text
    assert not fetched and not expected.exists()
    assert resolve_pretrained("resnet18", "IMAGENET1K_V1", download=True) == expected
    assert fetched == ["https://download.pytorch.org/models/" + RESNET18_FILE] and expected.is_file()


def test_bad_values_are_one_clear_error(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="no weights for architecture 'resnet8'.*task.pretrained=null"):
        resolve_pretrained("resnet8", "IMAGENET1K_V1")
    with pytest.raises(PretrainedWeightsError, match="unknown torchvision weights for resnet18; valid: IMAGENET1K_V1"):
        resolve_pretrained("resnet18", "IMAGENET_V9")
    with pytest.raises(PretrainedWeightsError, match="no such file"):
        resolve_pretrained("resnet8", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_text("not weights")
    with pytest.raises(PretrainedWeightsError, match="cannot be read as weights"):
        load_pretrained(build_model("resnet8", 10, in_channels=1), "resnet8", tmp_path / "junk.pth")


def test_start_model_uses_task_pretrained_and_null_is_a_fresh_model(tmp_path):
    weights = distinctive_weights()
    torch.save(weights, tmp_path / "w.pth")
    cfg = tiny_cfg([f"++task.pretrained={tmp_path / 'w.pth'}"])
    splits, _ = task_data(cfg.task, cfg.seed)
    assert_same_tensors(start_model(cfg.task, splits).state_dict(), weights)
    fresh = start_model(tiny_cfg(["++task.pretrained=null"]).task, splits).state_dict()
    assert not torch.equal(fresh["conv1.weight"], weights["conv1.weight"])


def test_imagenet_tasks_name_torchvision_weights_and_download_is_off():
    for task in ("resnet50_on_ImageNet", "vit_b_16_on_ImageNet"):
        cfg = compose_cfg([f"task={task}"], primary="imagenet")
        assert cfg.task.pretrained == "IMAGENET1K_V1" and cfg.task.pretrained_download is False
        assert torchvision_weights_path(cfg.task.model, cfg.task.pretrained).name.endswith(".pth")


# ----------------------------------------------------------------------------------------------
# The runs that start from it
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def weights_file(tmp_path):
    weights = distinctive_weights()
    path = tmp_path / "given_weights.pth"
    torch.save(weights, path)
    return path, weights


def test_generated_data_model_starts_from_the_weights_file(tmp_path, weights_file, no_download):
    """train.epochs 0 and no init pruning (the ViT-B/16 recipe): the data model IS the pretrained network."""
    path, weights = weights_file
    store = tmp_path / "store"
    cfg = compose_cfg(["num=2", f"store={store}", "no_init_pruning=true", "task.train.epochs=0",
                       f"++task.pretrained={path}"], primary="generate", tiny=True)
    summary = run_recorded(generate.run, cfg, tmp_path / "gen")
    assert summary["produced"] == [0, 1]
    records = DataModelStore(store)
    assert len(records) == 2
    for i in range(2):
        assert_same_tensors(records[i].state_dict, weights)
        assert records[i].metrics["test_acc"] >= 0.0


def test_pretrain_final_and_pruning_final_without_model_start_from_the_weights_file(tmp_path, weights_file):
    path, weights = weights_file
    common = ["task.train.epochs=0", f"++task.pretrained={path}"]
    execute(tiny_cfg(["run=pretrain_final"] + common), tmp_path / "pretrain")
    model, checkpoint = load_model(tmp_path / "pretrain" / "model.pt")
    assert_same_tensors(model.state_dict(), weights)
    assert OmegaConf.create(checkpoint["spec"]).name == "resnet8"
    results = (tmp_path / "pretrain" / "results.json").read_text()
    assert f'"pretrained": "{path}"' in results

    execute(tiny_cfg(["run=pruning_final", "final.model=null", "final.metanetwork=null"] + common),
            tmp_path / "final")
    started, _ = load_model(tmp_path / "final" / "pretrained_model.pt")
    assert_same_tensors(started.state_dict(), weights)
    assert (tmp_path / "final" / "pruned_model.pt").exists()


def test_missing_weights_file_stops_a_run_before_training(tmp_path):
    cfg = tiny_cfg(["run=train", f"++task.pretrained={tmp_path / 'nowhere.pth'}"])
    with pytest.raises(PretrainedWeightsError, match="nowhere.pth: no such file"):
        execute(cfg, tmp_path / "run")
    assert not Path(tmp_path / "run" / "model.pt").exists()


def test_truncated_weights_file_names_its_path(tmp_path):
    """A weights file cut short (a killed download or copy) fails naming task.pretrained's file, whichever error
    torch.load meets at the cut (a bare "[Errno 22]" or a zip error)."""
    model = build_model("resnet8", 10, in_channels=1)
    whole = tmp_path / "whole.pth"
    torch.save(model.state_dict(), whole)
    data = whole.read_bytes()
    for cut in (len(data) // 7, len(data) // 2, len(data) - 30):
        path = tmp_path / f"cut_{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises((OSError, PretrainedWeightsError), match=re.escape(str(path))):
            load_pretrained(build_model("resnet8", 10, in_channels=1), "resnet8", path)
