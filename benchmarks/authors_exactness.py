"""Exactness of the quick-reproduce import, side by side with the authors' own code.

    python benchmarks/authors_exactness.py /path/to/MetaPruning      # a checkout of github.com/Yewei-Liu/MetaPruning

What it does, per case (ResNet-56 / CIFAR-10 and VGG-19 / CIFAR-100, each at the paper's widths and at init-pruned
widths; the paper's metanetwork sizes, reference §5.4):

1. In a child process whose imports resolve to the authors' checkout (their package names ``nn``, ``utils``,
   ``generate_dataset`` collide with ours), their code builds the model (``resnet56`` / ``vgg19_bn``, or
   ``MyResNet`` / ``MyVGG`` at pruned widths) and a ``MyGNN`` with random weights (and random BatchNorm statistics),
   saves both as the release does (``torch.save`` of the whole module, into
   ``final/<task>/group_l2_norm_max_normalizer/reproduce_<k>/{model.pth, metanetwork.pth}``), and computes with their
   code: the graph (``utils.convert.state_dict_to_graph``), the metanetwork's output on it, the decoded state dict
   (``graph_to_state_dict``), and the logits of the model before and after the metanetwork on the same images.
2. This process converts each folder with ``main/convert_release.py --trust-pickles`` exactly as a user would,
   loads the converted files with the loaders a final run uses, and computes the same quantities with this project's
   code (``GraphCodec(legacy_fc_permutation=True)``, ``MetaNetwork``, ``codec.decode``).
3. It prints and writes the maximum absolute differences (``benchmarks/results/authors_exactness/report.md``); the
   graphs must be identical and every other difference at most 1e-5.

Nothing of the authors' code is in this repository: the checkout is an argument. Their code needs no package
missing here (``torch_scatter`` is not used by PyG 2.8's aggregations; the report records whether it was present).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

_AUTHORS_FLAG = "--authors-side-child-process"
METHOD = "group_l2_norm_max_normalizer"
TOLERANCE = 1e-5
NUM_IMAGES = 32

# (task, reproduce index, authors' model name, classes, pruned widths or None, MyGNN(num_layer, hiddim, in_node_dim,
# in_edge_dim, node_res_ratio, edge_res_ratio)); the sizes are the reference's (§5.4).
CASES = [
    ("resnet56_on_CIFAR10", 0, "resnet56", 10, None, (8, 64, 8, 9, 0.01, 0.01)),
    ("resnet56_on_CIFAR10", 1, "resnet56", 10, "pruned", (8, 64, 8, 9, 0.01, 0.01)),
    ("VGG19_on_CIFAR100", 0, "VGG19", 100, None, (8, 32, 5, 9, 0.05, 0.05)),
    ("VGG19_on_CIFAR100", 1, "VGG19", 100, "pruned", (8, 32, 5, 9, 0.05, 0.05)),
]


# --------------------------------------------------------------------------------------------------------------
# The authors' side (child process; only torch and their checkout are imported)
# --------------------------------------------------------------------------------------------------------------
def _pruned_resnet56_widths(gen: torch.Generator) -> list[int]:
    """The authors' ``MyResNet`` ``node_num``: [3, stem, (mid, out) x 27, classes]; residuals couple the outs of a
    stage (stage 1 with the stem); stage widths differ, so their converter's equal-width defect (§4.7.2) is not hit."""
    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))
    outs = [r(9, 14), r(20, 28), r(40, 56)]
    widths = [3, outs[0]]
    for stage in range(3):
        for _ in range(9):
            widths += [r(4, (16, 32, 64)[stage]), outs[stage]]
    return widths


def _pruned_vgg19_widths(gen: torch.Generator) -> list[int]:
    """The authors' ``MyVGG`` ``node_num``: [3, 16 conv widths]."""
    base = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    return [3] + [int(torch.randint(max(4, b // 8), b // 2 + 1, (1,), generator=gen)) for b in base]


def _randomize(model: torch.nn.Module, gen: torch.Generator, gamma: tuple[float, float]) -> None:
    """Random BatchNorm affine parameters (``gamma`` range) and statistics, random biases. A small ``gamma`` keeps
    a deep residual net's logits at a trained network's scale (tens) instead of 1e4 and more."""
    low, high = gamma
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(low + (high - low) * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=gen))


def authors_side(code: str, tmp: str, threads: str) -> int:
    """Build, save as the release does, and compute with the authors' code (module docstring, step 1); also their
    metanetwork in float64, the reference both float32 implementations are measured against."""
    torch.set_num_threads(int(threads))
    sys.path.insert(0, str(Path(code).resolve()))
    sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    resnet_family = importlib.import_module("generate_dataset.resnet_family")
    vgg_family = importlib.import_module("generate_dataset.VGG_family")
    convert = importlib.import_module("utils.convert")
    gnn = importlib.import_module("nn.GNN")
    for module in (resnet_family, vgg_family, convert, gnn):
        if not str(module.__file__).startswith(str(Path(code).resolve())):
            raise SystemExit(f"{module.__name__} was imported from {module.__file__}, not from {code}")
    torch.manual_seed(0)
    images = torch.randn(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = {"images": images, "torch_scatter": importlib.util.find_spec("torch_scatter") is not None,
               "torch_geometric": importlib.import_module("torch_geometric").__version__, "cases": {}}
    for task, k, name, classes, pruned, mn_args in CASES:
        gen = torch.Generator().manual_seed(100 + 10 * k + len(task))
        if name == "resnet56":
            model = (resnet_family.resnet56(classes) if pruned is None
                     else resnet_family.MyResNet(56, _pruned_resnet56_widths(gen) + [classes]))
        else:
            model = (vgg_family.vgg19_bn(num_classes=classes) if pruned is None
                     else vgg_family.MyVGG(_pruned_vgg19_widths(gen) + [classes]))
        _randomize(model, gen, (0.1, 0.4) if name == "resnet56" else (0.5, 1.5))
        model.eval()
        metanetwork = gnn.MyGNN(*mn_args).eval()
        folder = Path(tmp) / "final" / task / METHOD / f"reproduce_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model, folder / "model.pth")  # as the authors' pretrain_final saves it
        torch.save(metanetwork, folder / "metanetwork.pth")  # as their meta-training saves each epoch
        state_dict = model.state_dict()
        with torch.no_grad():
            logits = model(images)
            node_index, x, edge_index, edge_attr = convert.state_dict_to_graph(name, state_dict, device="cpu")
            start = time.perf_counter()
            node_pred, edge_pred = metanetwork(x, edge_index, edge_attr)
            seconds = time.perf_counter() - start
            node64, edge64 = copy.deepcopy(metanetwork).double()(x.double(), edge_index, edge_attr.double())
            decoded = convert.graph_to_state_dict(name, state_dict, node_index, node_pred, edge_index, edge_pred,
                                                  device="cpu")
            after = convert.state_dict_to_model(name, decoded, device="cpu").eval()
            logits_after = after(images)
        results["cases"][f"{task}/reproduce_{k}"] = {
            "model_class": type(model).__name__, "x": x, "edge_index": edge_index, "edge_attr": edge_attr,
            "node_pred": node_pred, "edge_pred": edge_pred, "node64": node64, "edge64": edge64,
            "decoded": dict(decoded), "logits": logits,
            "logits_after": logits_after, "seconds": seconds}
        print(f"authors' code: {task}/reproduce_{k} ({type(model).__name__}): {x.shape[0]} nodes, "
              f"{edge_index.shape[1]} edges, MyGNN forward {seconds:.1f} s", flush=True)
    torch.save(results, Path(tmp) / "authors_outputs.pt")
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == _AUTHORS_FLAG:
    # The child stops here, before any of this project's packages is imported.
    sys.exit(authors_side(*sys.argv[2:]))

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch_geometric  # noqa: E402

from generate_dataset.models import load_model  # noqa: E402
from nn.apply import LayoutMismatchError, load_metanetwork  # noqa: E402
from nn.graph import GraphCodec  # noqa: E402
from utils.device import cpu_name  # noqa: E402
from utils.io import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "authors_exactness" / "report.md"


# --------------------------------------------------------------------------------------------------------------
# This project's side
# --------------------------------------------------------------------------------------------------------------
def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _scale(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def compare_case(folder: Path, out: Path, theirs: dict, code: Path, images: torch.Tensor) -> dict:
    """Convert ``folder`` with the script and compare this project's quantities with ``theirs``."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "main" / "convert_release.py"), str(folder),
                           "--code", str(code), "--trust-pickles", "--out", str(out)], capture_output=True, text=True)
    convert_seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"main/convert_release.py failed on {folder}:\n{done.stderr}")
    model, checkpoint = load_model(out / "model.pt")
    codec = GraphCodec(model, legacy_fc_permutation=True)
    metanetwork, mn_checkpoint = load_metanetwork(out / "metanetwork.pt", codec)
    try:
        load_metanetwork(out / "metanetwork.pt", GraphCodec(model))
        refused = False
    except LayoutMismatchError:
        refused = True
    with torch.no_grad():
        graph = codec.encode(model)
        start = time.perf_counter()
        pred = metanetwork(graph)
        seconds = time.perf_counter() - start
        decoded = codec.decode(pred)
        logits = model(images)
        after = load_model(out / "model.pt")[0]
        after.load_state_dict(decoded, strict=False)
        logits_after = after(images)
    edges = f"edge_attr__{next(iter(codec.edge_dims))}"
    after_scale = _scale(theirs["logits_after"])
    row = {
        "widths": checkpoint["spec"]["widths"], "nodes": int(graph.x.shape[0]), "edges": int(graph.edge_index.shape[1]),
        "model_class": theirs["model_class"], "options": mn_checkpoint["spec"]["options"],
        "dropped": mn_checkpoint.get("dropped_keys", []), "refused_without_legacy": refused,
        "graph": max(_maxdiff(graph.x, theirs["x"]), _maxdiff(graph.edge_index, theirs["edge_index"]),
                     _maxdiff(graph[edges], theirs["edge_attr"])),
        "node_out": _maxdiff(pred.x, theirs["node_pred"]), "edge_out": _maxdiff(pred[edges], theirs["edge_pred"]),
        "node_scale": _scale(theirs["node_pred"]), "edge_scale": _scale(theirs["edge_pred"]),
        "ours_vs_f64": (_maxdiff(pred.x, theirs["node64"]), _maxdiff(pred[edges], theirs["edge64"])),
        "theirs_vs_f64": (_maxdiff(theirs["node_pred"], theirs["node64"]),
                          _maxdiff(theirs["edge_pred"], theirs["edge64"])),
        "decoded": max(_maxdiff(v, theirs["decoded"][k]) for k, v in decoded.items()),
        "logits": _maxdiff(logits, theirs["logits"]), "logit_scale": _scale(theirs["logits"]),
        "logits_after": _maxdiff(logits_after, theirs["logits_after"]), "after_scale": after_scale,
        "ours_seconds": seconds, "theirs_seconds": theirs["seconds"], "convert_seconds": convert_seconds,
    }
    row["pass"] = (row["graph"] == 0.0 and refused
                   and all(row[k] <= TOLERANCE for k in ("node_out", "edge_out", "decoded", "logits"))
                   and row["logits_after"] <= TOLERANCE * max(1.0, after_scale))
    return row


def _machine(threads: int) -> str:
    cpu = cpu_name()
    return (f"{cpu} (CPU), {threads} torch thread(s) on each side; Python {platform.python_version()}, torch "
            f"{torch.__version__}, torch_geometric {torch_geometric.__version__}")


def report(rows: dict[str, dict], meta: dict) -> str:
    ok = all(r["pass"] for r in rows.values())
    scatter = "installed" if meta["torch_scatter"] else "not installed, and no shim was needed"
    lines = [
        f"## {meta['date']}: {meta['threads']} thread(s): {'PASS' if ok else 'FAIL'}",
        "",
        f"`python benchmarks/authors_exactness.py <checkout> --threads {meta['threads']}`. Machine: {meta['machine']}. "
        f"Authors' code: {meta['code_desc']}, run with torch_geometric {meta['their_pyg']} (torch_scatter: {scatter}).",
        "",
        "| case | model | nodes | edges | graph | metanetwork node out | metanetwork edge out | decoded params "
        "| logits | logits after metanetwork (scale) | refused w/o legacy | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for case, r in rows.items():
        lines.append(
            f"| {case} | {r['model_class']} | {r['nodes']:,} | {r['edges']:,} | {r['graph']:.0e} | "
            f"{r['node_out']:.1e} | {r['edge_out']:.1e} | {r['decoded']:.1e} | {r['logits']:.1e} | "
            f"{r['logits_after']:.1e} ({r['after_scale']:.1e}) | {'yes' if r['refused_without_legacy'] else 'NO'} | "
            f"{'PASS' if r['pass'] else 'FAIL'} |")
    lines += [
        "",
        "Float32 noise: maximum absolute difference of each implementation's metanetwork output (nodes / edges) from "
        "the authors' metanetwork run in float64 on the same graph, and the output scale:",
        "",
        "| case | ours vs float64 | authors' vs float64 | output scale (nodes / edges) |",
        "|---|---:|---:|---:|",
    ]
    for case, r in rows.items():
        lines.append(f"| {case} | {r['ours_vs_f64'][0]:.1e} / {r['ours_vs_f64'][1]:.1e} | "
                     f"{r['theirs_vs_f64'][0]:.1e} / {r['theirs_vs_f64'][1]:.1e} | "
                     f"{r['node_scale']:.1f} / {r['edge_scale']:.1f} |")
    lines += [
        "",
        "Seconds for one metanetwork forward (authors' / ours) and one conversion (a `main/convert_release.py` "
        "process): " + "; ".join(f"{c}: {r['theirs_seconds']:.1f} / {r['ours_seconds']:.1f}, "
                                 f"{r['convert_seconds']:.0f}" for c, r in rows.items()) + ".",
        "",
        "Imported: " + "; ".join(f"{c}: {r['options']}, {len(r['dropped'])} keys dropped ({r['dropped'][0]}, ...)"
                                 for c, r in rows.items()) + ".",
        "",
        "Init-pruned widths (ours, `[stem, mid_1, out_1, ...]` / the 16 conv widths): " + "; ".join(
            f"{c}: {r['widths']}" for c, r in rows.items() if c.endswith("reproduce_1")) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("code", type=Path, help="checkout of github.com/Yewei-Liu/MetaPruning")
    parser.add_argument("--code-desc", default=None, help="how to name the checkout in the report (e.g. its commit)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on each side (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="report file (default: %(default)s)")
    parser.add_argument("--append", action="store_true", help="add this run's section to the report file")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    code = args.code.resolve()
    if not (code / "nn" / "GNN.py").is_file():
        parser.error(f"{code} has no nn/GNN.py: give a checkout of github.com/Yewei-Liu/MetaPruning")
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="authors_exactness_") as tmp:
        done = subprocess.run([sys.executable, "-I", str(Path(__file__).resolve()), _AUTHORS_FLAG, str(code), tmp,
                               str(args.threads)], env=env)
        if done.returncode != 0:
            raise SystemExit("the authors' side failed (see above)")
        theirs = torch.load(Path(tmp) / "authors_outputs.pt", map_location="cpu", weights_only=True)
        rows = {}
        for task, k, *_ in CASES:
            case = f"{task}/reproduce_{k}"
            rows[case] = compare_case(Path(tmp) / "final" / task / METHOD / f"reproduce_{k}",
                                      Path(tmp) / "converted" / task / f"reproduce_{k}", theirs["cases"][case], code,
                                      theirs["images"])
            r = rows[case]
            print(f"ours: {case}: graph {r['graph']:.0e}, metanetwork nodes {r['node_out']:.1e} edges "
                  f"{r['edge_out']:.1e}, decoded {r['decoded']:.1e}, logits {r['logits']:.1e}, after "
                  f"{r['logits_after']:.1e} (scale {r['after_scale']:.1e}): {'PASS' if r['pass'] else 'FAIL'}",
                  flush=True)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(args.threads),
            "threads": args.threads, "code_desc": args.code_desc or str(code),
            "their_pyg": theirs["torch_geometric"], "torch_scatter": theirs["torch_scatter"]}
    section = report(rows, meta)
    print(section)
    if not args.no_write:
        old = args.out.read_text() if args.append and args.out.is_file() else HEADER
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, old.rstrip("\n") + "\n\n" + section)
    return 0 if all(r["pass"] for r in rows.values()) else 1


HEADER = f"""# The authors' release, imported: exactness against the authors' code

Produced by `python benchmarks/authors_exactness.py <checkout of github.com/Yewei-Liu/MetaPruning>` (its docstring
says what it does; `--append` adds a section). Per case the authors' code builds the model and a `MyGNN` with
random weights (random BatchNorm statistics too), saves both as their release does (`torch.save` of the whole
module, in `final/<task>/group_l2_norm_max_normalizer/reproduce_<k>/`), and computes the graph
(`utils.convert.state_dict_to_graph`), the metanetwork's output, the decoded state dict (`graph_to_state_dict`) and
the logits before and after the metanetwork (`state_dict_to_model`) on the same {NUM_IMAGES} random 3x32x32 images.
`main/convert_release.py --trust-pickles` converts each folder as a user would; this project's code
(`GraphCodec(legacy_fc_permutation=True)`, `MetaNetwork` with its fused kernel, `codec.decode`, the converted
model) computes the same quantities from the converted checkpoints. Metanetwork sizes are the paper's: ResNet-56
8 layers, hiddim 64, ratios 0.01; VGG-19 8 layers, hiddim 32, ratios 0.05. The `reproduce_1` cases are init-pruned
(`MyResNet` / `MyVGG` at random smaller widths).

Criterion (per case): the graphs identical (difference 0); maximum absolute differences of the metanetwork's node
and edge outputs, of the decoded parameters and of the logits <= {TOLERANCE:g}; the logits after the metanetwork
within {TOLERANCE:g} x their scale (a random metanetwork changes every weight by O(ratio), so the network after it
has logits far from a trained network's); the converted metanetwork refused (`LayoutMismatchError`) by a codec
without the legacy layout. Every number is a maximum absolute difference. With one thread both implementations
sum in the same order; with more, each splits its sums its own way and they differ by float32 rounding, whose size
the float64 table shows (both implementations against the authors' metanetwork run in float64).

Not covered: the real release files (no network on the machine that ran this; the conversion has not run on them).
"""

if __name__ == "__main__":
    sys.exit(main())
