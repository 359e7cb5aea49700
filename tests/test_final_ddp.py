"""pruning_final / unstructured_pruning_final / pretrain_final under torchrun (2 gloo CPU ranks), and ViT-B/16's
pruning unit (the attention head) on the tiny ViT in one process.

One torchrun launch (tests/final_ddp_driver.py is written here) runs, on a tiny ImageFolder written by the test:
1. ResNet-8, a metanetwork checkpoint, two targets, ``method=random`` and a DIFFERENT seed on each rank: pruning
   decided on each rank would give two structures; decided on rank 0 and broadcast, both ranks must agree;
2. the tiny ViT without metanetwork, its start model the "pretrained" weights file (``task.pretrained``, 0 training
   epochs: as the paper's ViT data model is the pretrained network);
3. unstructured L1 pruning of ResNet-8 without metanetwork, with ``final.model=null``: its start model is trained
   in the run (one DDP epoch from a weights file) and saved by rank 0 as ``pretrained_model.pt``;
4. ``pretrain_final`` with ``final.init_prune=true``: DDP training, init pruning on rank 0 (broadcast, rebuilt on
   every rank), DDP fine-tune, all-reduced evaluation, ``init_pruned_model.pt`` written by rank 0.
Each rank records the widths and a weight checksum of the pruned model it ends with; the run itself fails on any
rank whose widths differ (``check_same_on_all_ranks``). The test compares both ranks' records with what rank 0
wrote, reloads every ``pruned_model.pt`` here (CPU, no torchrun) and re-evaluates it: the same test accuracy as the
all-reduced one.
"""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from generate_dataset.models import build_model, load_model, model_from_state_dict, model_spec
from helpers import CONFIG_DIR, METHOD, REPO, compose_cfg, run_torchrun, write_imagefolder
from nn.apply import apply_metanetwork, build_metanetwork, save_metanetwork
from nn.graph import GraphCodec
from pruning.depgraph import architecture_options, build_pruner, count_macs, prune_to_speed_up
from stages import DDP_RUNS
from stages.common import codec_options, task_data
from training.loop import evaluate
from utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FINETUNES = ("after_init_pruning", "after_metanetwork", "after_pruning")
TARGETS = (1.5, 2.0)

DRIVER = f'''
import json, logging, sys
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(REPO / "tests")!r})
from helpers import compose_cfg, recorded
from stages import final, train
from utils.distributed import cleanup, init_distributed, rank

# the run modes' library functions: they also return the model the run ends with
LIBRARY = {{"pruning_final": final.pruning_final, "unstructured_pruning_final": final.unstructured_pruning_final,
           "pretrain_final": train.pretrain_final}}

logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] %(message)s")
init_distributed("gloo", "cpu")
runs = json.loads(sys.argv[1])
try:
    for name, overrides, run_dir in runs:
        if name == "random":  # each rank its own random stream: only one pruning decision keeps them together
            overrides = overrides + [f"seed={{11 + rank()}}"]
        cfg = compose_cfg(overrides)
        # the run mode's library function with stages.execute's boilerplate: it also returns the model this rank
        # ends with (the last target's with several), and unstructured runs their masks
        out = recorded(LIBRARY[cfg.run], cfg, run_dir)
        model = out[1]
        mine = {{"widths": model.widths,
                "checksum": sum(float(t.double().sum()) for t in model.state_dict().values())}}
        if len(out) > 2:
            mine["kept"] = {{layer: int(mask.sum()) for layer, mask in out[2].items()}}
        with open(f"{{run_dir}}.rank{{rank()}}.json", "w") as handle:  # the test's record, not the run's output
            json.dump(mine, handle)
finally:
    cleanup()
'''


def _data_overrides(root, task, model):
    """A tiny ImageNet task: 3 classes of 20x20 images at 32x32, one epoch of at most 2 batches per recipe."""
    tiny = [f"task.finetune.{stage}.epochs=1" for stage in FINETUNES]
    tiny += [f"++task.finetune.{stage}.max_batches_per_epoch=2" for stage in FINETUNES]
    return [f"task={task}", f"task.model={model}", "device=cpu", f"paths.data_dir={root}",
            f"task.dataset.root={root / 'imagenet'}", "task.dataset.val_size=6", "task.dataset.num_workers=0",
            "task.input_size=[3,32,32]", "++task.dataset.image_size=32", "task.batch_size=4", "task.eval_batch_size=6",
            "task.pruning.iterative_steps=20", *tiny]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ImageFolder, a ResNet-8 start model, a ResNet-8 metanetwork (3x32x32 graphs) and a ViT "pretrained" file."""
    root = tmp_path_factory.mktemp("final_ddp")
    write_imagefolder(root / "imagenet", classes=3, per_class=8, size=20)
    torch.manual_seed(0)
    resnet = build_model("resnet8", 3, in_channels=3).eval()
    save_checkpoint(root / "resnet8.pt", resnet.state_dict(), model_spec("resnet8", resnet, 3))
    codec = GraphCodec(resnet, input_shape=(3, 32, 32))
    options = {"num_layer": 2, "hiddim": 8, "node_res_ratio": 0.05, "edge_res_ratio": 0.05}
    save_metanetwork(root / "metanetwork.pt", build_metanetwork(codec, options), codec, options,
                     task="resnet50_on_ImageNet", epoch=4)
    vit = build_model("vit_tiny", 3)
    torch.save(vit.state_dict(), root / "vit_tiny.pth")
    resnet_data = _data_overrides(root, "resnet50_on_ImageNet", "resnet8")
    resnet_task = resnet_data + [f"final.model={root / 'resnet8.pt'}"]
    # the start model trained in the run: one DDP epoch of at most 2 batches from the ResNet-8 weights
    trained_now = [f"task.pretrained={root / 'resnet8.pt'}", "task.train.epochs=1",
                   "++task.train.max_batches_per_epoch=2"]
    runs = {
        "random": resnet_task + ["run=pruning_final", "method=random", "task.initial_speed_up=1.2",
                                 f"final.target_speed_up=[{TARGETS[0]},{TARGETS[1]}]",
                                 f"final.metanetwork={root / 'metanetwork.pt'}"],
        "vit": _data_overrides(root, "vit_b_16_on_ImageNet", "vit_tiny")
        + ["run=pruning_final", f"task.pretrained={root / 'vit_tiny.pth'}", "final.model=null",
           "final.metanetwork=null"],
        "unstructured": resnet_data + trained_now + ["run=unstructured_pruning_final", "method=unstructured_l1_norm",
                                                     "final.amount=0.5", "final.metanetwork=null", "final.model=null"],
        "pretrain": resnet_data + trained_now + ["run=pretrain_final", "final.init_prune=true",
                                                 "task.initial_speed_up=1.2"],
    }
    return {"root": root, "runs": runs}


@pytest.fixture(scope="module")
def ddp(env):
    """The one torchrun launch: {run name: {rank: widths, weight checksum (and kept weights per layer) of the model
    that rank ended with}} and the output."""
    root = env["root"]
    driver = root / "final_ddp_driver.py"
    driver.write_text(DRIVER)
    runs = [[name, overrides, str(root / name)] for name, overrides in env["runs"].items()]
    proc = run_torchrun([json.dumps(runs)], root, script=driver, timeout=400)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    specs = {name: {r: json.loads((root / f"{name}.rank{r}.json").read_text()) for r in (0, 1)}
             for name in env["runs"]}
    return {"specs": specs, "output": output}


def _checksum(model: nn.Module) -> float:
    return sum(float(t.double().sum()) for t in model.state_dict().values())


def _reloads_and_scores(run_dir, results, overrides):
    """pruned_model.pt rebuilt here on the CPU, without torchrun: the test accuracy the DDP run all-reduced."""
    model, checkpoint = load_model(run_dir / "pruned_model.pt")
    assert checkpoint["spec"] == results["model"] and model.widths == results["model"]["widths"]
    cfg = compose_cfg(overrides)
    _splits, loaders = task_data(cfg.task, cfg.seed)
    assert evaluate(model, loaders.test, "cpu")["acc"] == pytest.approx(results["pruned_acc"], abs=1e-12)
    return model


@pytest.mark.slow
def test_pruning_final_under_torchrun_one_structure_on_both_ranks(env, ddp):
    """Two targets from one metanetwork-treated model, random importance, a different seed per rank: the same
    widths on both ranks (the run checks it too), each target reached, the models reload anywhere."""
    root, specs = env["root"], ddp["specs"]
    top = json.loads((root / "random" / "results.json").read_text())
    assert top["run"] == "pruning_final_targets" and top["pre_pruning"] == "metanetwork"
    for target in TARGETS:
        run_dir = root / "random" / f"target_{target:g}x"
        results = json.loads((run_dir / "results.json").read_text())
        assert results["speed_up"] >= target and results["method"] == "random"
        assert results["seed"] == 11  # rank 0's config is the one recorded
        stages = {s["stage"]: s for s in results["stages"]}
        assert stages["metanetwork"]["test_loss"] != stages["after_init_pruning_finetune"]["test_loss"]
        assert results["finetune_epochs"] == {"after_init_pruning": 1, "after_metanetwork": 1, "after_pruning": 1}
        _reloads_and_scores(run_dir, results, env["runs"]["random"])
        assert sorted(p.name for p in run_dir.glob("*.csv")) == ["finetune_after_pruning_metrics.csv"]
    # the returned model is the last target's: both ranks hold exactly the weights rank 0 saved
    last = root / "random" / f"target_{TARGETS[-1]:g}x"
    saved, _ = load_model(last / "pruned_model.pt")
    assert specs["random"][0] == specs["random"][1] == {"widths": saved.widths, "checksum": _checksum(saved)}
    assert saved.widths != build_model("resnet8", 3, in_channels=3).widths
    out = ddp["output"]
    assert out.count("pruning_final (metanetwork, random)") == len(TARGETS)  # rank 0's headline only
    assert "rank 1/2" in out  # both ranks joined


@pytest.mark.slow
def test_vit_pruning_final_under_torchrun_starts_from_the_pretrained_network(env, ddp):
    root, specs = env["root"], ddp["specs"]
    results = json.loads((root / "vit" / "results.json").read_text())
    assert results["speed_up"] >= 1.7 and results["architecture"] == "vit_tiny"
    hidden = results["model"]["widths"][0]
    assert hidden < 16 and hidden % 2 == 0  # the embedding pruned, whole heads kept (2 heads)
    # the data model is the pretrained network: 0 training epochs, the start stage scores the given weights
    cfg = compose_cfg(env["runs"]["vit"])
    _splits, loaders = task_data(cfg.task, cfg.seed)
    pretrained = model_from_state_dict("vit_tiny", torch.load(root / "vit_tiny.pth", weights_only=True), 3)
    start = results["stages"][0]
    assert start["stage"] == "start"
    expected = evaluate(pretrained, loaders.test, "cpu")
    assert (start["test_loss"], start["test_acc"]) == pytest.approx((expected["loss"], expected["acc"]), rel=1e-5)
    model = _reloads_and_scores(root / "vit", results, env["runs"]["vit"])
    assert specs["vit"][0] == specs["vit"][1] == {"widths": model.widths, "checksum": _checksum(model)}
    assert model.encoder.layers[0].self_attention.num_heads == 2
    assert model.class_token.shape[-1] == model.encoder.pos_embedding.shape[-1] == hidden


@pytest.mark.slow
def test_unstructured_pruning_final_under_torchrun(env, ddp):
    root, specs = env["root"], ddp["specs"]
    results = json.loads((root / "unstructured" / "results.json").read_text())
    assert results["run"] == "unstructured_pruning_final" and results["sparsity"] >= 0.5
    model = _reloads_and_scores(root / "unstructured", results, env["runs"]["unstructured"])
    assert specs["unstructured"][0] == specs["unstructured"][1]  # the same masks (kept weights per layer) too
    assert specs["unstructured"][0]["checksum"] == _checksum(model) and sum(specs["unstructured"][0]["kept"].values()) \
        == results["prunable_weights"] - results["zero_weights"]
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros == results["zero_weights"]  # the masked fine-tune kept rank 0's zeros


def _scores(model: nn.Module, overrides) -> dict:
    """``model`` evaluated here, in one process, on the whole val and test splits."""
    cfg = compose_cfg(overrides)
    _splits, loaders = task_data(cfg.task, cfg.seed)
    return {f"{split}_{key}": value for split in ("val", "test")
            for key, value in evaluate(model, getattr(loaders, split), "cpu").items()}


@pytest.mark.slow
def test_final_run_without_model_trains_its_start_with_ddp_and_rank_0_saves_it(env, ddp):
    """final.model=null under torchrun: a DDP training (not each rank on its own shard), whose rank-0 weights every
    rank starts from and rank 0 alone saves: pretrained_model.pt scores what the all-reduced start stage scored."""
    root = env["root"]
    results = json.loads((root / "unstructured" / "results.json").read_text())
    assert results["source_model"] is None
    start = results["stages"][0]
    assert start["stage"] == "start"
    saved, _ = load_model(root / "unstructured" / "pretrained_model.pt")
    given, _ = load_model(root / "resnet8.pt")
    assert _checksum(saved) != _checksum(given)  # trained for one epoch in the run
    scores = _scores(saved, env["runs"]["unstructured"])
    assert start["test_acc"] == pytest.approx(scores["test_acc"], abs=1e-12)
    assert start["val_acc"] == pytest.approx(scores["val_acc"], abs=1e-12)
    assert (start["test_loss"], start["val_loss"]) == pytest.approx((scores["test_loss"], scores["val_loss"]),
                                                                    rel=1e-5)
    rows = (root / "unstructured" / "pretrain_metrics.csv").read_text().splitlines()
    assert len(rows) == 2  # rank 0's header and its one epoch


@pytest.mark.slow
def test_pretrain_final_with_init_prune_under_torchrun(env, ddp):
    """Every rank takes part in the init pruning (no hang in its all-reduced evaluation): one init_pruned_model.pt,
    written by rank 0, holding exactly the weights both ranks ended with; its metrics are the whole splits'."""
    root, specs = env["root"], ddp["specs"]
    results = json.loads((root / "pretrain" / "results.json").read_text())
    assert results["run"] == "pretrain_final" and results["epochs"] == 1
    info = results["init_pruned"]
    assert info["checkpoint"] == "init_pruned_model.pt" and info["finetune_epochs"] == 1
    assert info["speed_up"] >= 1.2
    unpruned, _ = load_model(root / "pretrain" / "model.pt")
    init_pruned, checkpoint = load_model(root / "pretrain" / "init_pruned_model.pt")
    assert unpruned.widths == build_model("resnet8", 3, in_channels=3).widths != init_pruned.widths
    example = torch.ones(1, 3, 32, 32)
    assert count_macs(unpruned, example) / count_macs(init_pruned, example) == pytest.approx(info["speed_up"])
    assert specs["pretrain"][0] == specs["pretrain"][1] == {"widths": init_pruned.widths,
                                                            "checksum": _checksum(init_pruned)}
    scores = _scores(init_pruned, env["runs"]["pretrain"])
    assert info["metrics"]["test_acc"] == pytest.approx(scores["test_acc"], abs=1e-12)
    assert info["metrics"]["test_loss"] == pytest.approx(scores["test_loss"], rel=1e-5)
    assert checkpoint["metrics"] == info["metrics"]
    assert sorted(p.name for p in (root / "pretrain").glob("*.csv")) == ["finetune_after_init_pruning_metrics.csv",
                                                                         "train_metrics.csv"]


# ----------------------------------------------------------------------------------------------------
# ViT: the attention head as the pruning unit (one process)
# ----------------------------------------------------------------------------------------------------
def _labelled_vit(seed: int) -> nn.Module:
    """vit_tiny (2 heads x 8 dims) with spread-out random weights; conv_proj.bias[c] = c names every embedding
    channel, so the kept channels can be read back after pruning."""
    torch.manual_seed(seed)
    vit = build_model("vit_tiny", 10).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_()
        vit.conv_proj.bias.copy_(torch.arange(16.0))
    return vit


def _kept_per_head(vit: nn.Module) -> list[list[int]]:
    """The original embedding channels in each head of the pruned model (heads are contiguous chunks)."""
    kept = vit.conv_proj.bias.round().long().tolist()
    head_dim = vit.encoder.layers[0].self_attention.head_dim
    return [kept[h * head_dim:(h + 1) * head_dim] for h in range(2)]


def test_vit_prunes_the_same_dims_in_every_head():
    vit = _labelled_vit(4)
    original = {k: v.clone() for k, v in vit.state_dict().items()}
    assert architecture_options(vit)["head_groups"]
    prune_to_speed_up(vit, 1.8, METHOD, torch.ones(1, 3, 32, 32), iterative_steps=10)
    hidden = vit.hidden_dim
    assert hidden == vit.conv_proj.out_channels < 16
    heads = _kept_per_head(vit)
    # every kept dim is still in its own head, and each head kept the same offsets
    assert [[c // 8 for c in head] for head in heads] == [[0] * (hidden // 2), [1] * (hidden // 2)]
    assert [c % 8 for c in heads[0]] == [c % 8 for c in heads[1]]
    kept = heads[0] + heads[1]
    for i, layer in enumerate(vit.encoder.layers):
        attention = layer.self_attention
        assert attention.num_heads == 2 and attention.embed_dim == hidden and attention.head_dim == hidden // 2
        key = f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight"
        q, k, v = original[key].reshape(3, 16, 16)
        expected = torch.cat([w[kept][:, kept] for w in (q, k, v)])  # each head: the original one, fewer dims
        assert torch.equal(attention.in_proj_weight, expected)
    assert vit.class_token.shape == (1, 1, hidden) and vit.encoder.pos_embedding.shape == (1, 17, hidden)
    assert torch.equal(vit.class_token, original["class_token"][..., kept])
    x = torch.randn(2, 3, 32, 32)
    assert vit(x).shape == (2, 10)
    assert torch.equal(model_from_state_dict("vit_tiny", vit.state_dict(), 10)(x), vit(x))


def test_reference_round_to_can_move_dims_into_another_head():
    """The reference's round_to = num_heads only rounds how many channels go, not which: a head can lose more dims
    than another, and the contiguous re-chunking moves dims into the next head (why per-head groups are the
    default)."""
    mixed = []
    for seed in (4, 5):
        vit = _labelled_vit(seed)
        prune_to_speed_up(vit, 1.8, METHOD, torch.ones(1, 3, 32, 32), iterative_steps=10, heads="round_to")
        assert vit.hidden_dim % 2 == 0 and vit.hidden_dim < 16
        mixed.append(any(c // 8 != h for h, head in enumerate(_kept_per_head(vit)) for c in head))
    assert any(mixed)
    pruner = build_pruner(_labelled_vit(0), torch.ones(1, 3, 32, 32), METHOD, heads="round_to")
    assert pruner.round_to == 2 and not pruner.out_channel_groups
    with pytest.raises(ValueError, match="heads='whole'"):
        architecture_options(_labelled_vit(0), heads="whole")


def test_method_config_key_vit_heads_chooses_the_head_mode():
    """``vit_heads`` in configs/method/*.yaml picks the mode when the caller gives none: ``round_to`` prunes
    exactly as the explicit reference mode does; every structured method file ships ``per_head``."""
    reference = _labelled_vit(4)
    prune_to_speed_up(reference, 1.8, METHOD, torch.ones(1, 3, 32, 32), iterative_steps=10, heads="round_to")
    configured = _labelled_vit(4)
    prune_to_speed_up(configured, 1.8, {**METHOD, "vit_heads": "round_to"}, torch.ones(1, 3, 32, 32),
                      iterative_steps=10)
    assert _kept_per_head(configured) == _kept_per_head(reference)
    assert build_pruner(_labelled_vit(0), torch.ones(1, 3, 32, 32), METHOD).out_channel_groups  # per_head default
    with pytest.raises(ValueError, match="heads='whole'"):
        build_pruner(_labelled_vit(0), torch.ones(1, 3, 32, 32), {**METHOD, "vit_heads": "whole"})
    for path in (CONFIG_DIR / "method").glob("*.yaml"):
        method = OmegaConf.to_container(OmegaConf.load(path))
        assert method.get("vit_heads") == ("per_head" if method["kind"] == "structured" else None), path.name


def test_vit_b_16_metanetwork_config_on_the_tiny_vit_then_pruning():
    """configs/metanetwork/vit_b_16.yaml (reference §5.3-5.4: MyGNN_ViT, 3 layers of width 4, ratio 0.05, the
    patch edges through a 64-wide encoder/decoder) built for the tiny ViT's graphs: apply it, prune to a target,
    the model runs; the same metanetwork also fits the pruned widths."""
    options = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "metanetwork" / "vit_b_16.yaml"))
    assert (options["num_layer"], options["hiddim"], options["node_res_ratio"], options["edge_res_ratio"],
            options["edge_mid_dims"]) == (3, 4, 0.05, 0.05, {"patch": 64})
    torch.manual_seed(0)
    vit = build_model("vit_tiny", 3).eval()
    cfg_codec = codec_options(OmegaConf.create({"task": {"input_size": [3, 32, 32]}}))
    codec = GraphCodec(vit, **cfg_codec)
    assert dict(codec.edge_dims) == {"patch": 64, "qkv": 3, "linear": 1} and codec.node_dim == 6
    net = build_metanetwork(codec, options)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    apply_metanetwork(vit, net, codec)
    after = vit.state_dict()
    assert not torch.equal(after["conv_proj.weight"], before["conv_proj.weight"])
    assert torch.equal(after["class_token"], before["class_token"])  # not encoded: kept
    example = torch.ones(1, 3, 32, 32)
    base = count_macs(vit, example)
    assert prune_to_speed_up(vit, 1.7, METHOD, example, iterative_steps=20) >= 1.7
    assert base / count_macs(vit, example) >= 1.7
    assert vit.hidden_dim < 16  # the embedding itself was pruned (every head lost dims)
    pruned_codec = GraphCodec(vit, **cfg_codec)
    pruned_codec.check_layout(codec.layout)  # one metanetwork for every width
    state = vit.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pruned_codec.decode(pruned_codec.encode(vit)).items())
    apply_metanetwork(vit, net, pruned_codec)
    out = vit(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_final_runs_are_torchrun_run_modes():
    assert {"pruning_final", "unstructured_pruning_final", "pretrain_final"} <= DDP_RUNS
