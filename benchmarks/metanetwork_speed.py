"""Speed and memory of ``nn.metanetwork.MetaNetwork`` against the straightforward PyG reference.

Measures forward + backward (loss = sum of every output feature) on paper-sized graphs:

* ``resnet56``: the unpruned ResNet56/CIFAR10 graph (2045 nodes, 140,720 edges, reference §4.2) with
  the paper's metanetwork (8 layers, hidden 64), ours against ``benchmarks/reference_metanetwork.py``;
* ``vgg19``: the unpruned VGG19/CIFAR100 graph (5607 nodes, 2,275,520 edges, reference §4.3) with
  8 layers, hidden 32: ours only (the reference needs tens of GB there) -- it must stay under 24 GB.

Graphs are synthetic by default: the exact block structure of the codec (dense bipartite blocks per
conv/fc, dense identity-residual blocks, projection-shortcut blocks) with random features. With
``--source codec`` the ResNet56 graph comes from ``generate_dataset.models.build_model`` through
``nn.graph.GraphCodec`` instead.

Every (implementation, graph) pair runs in its own subprocess, so the peak resident memory (VmHWM
from /proc/self/status) of one does not mix with another. "peak extra" is VmHWM minus the resident
memory just before the first forward (interpreter, torch, graph and weights excluded); ratios use it.
Time is the median of ``--repeats`` forward+backward passes after one warm-up pass.

Usage::

    python benchmarks/metanetwork_speed.py            # writes benchmarks/results/metanetwork_speed/report.md
    python benchmarks/metanetwork_speed.py --quick    # small smoke run, prints only
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch_geometric.data import Data

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from generate_dataset.models import build_model  # noqa: E402
from nn.graph import GraphCodec  # noqa: E402
from utils.io import atomic_write  # noqa: E402
from nn.metanetwork import MetaNetwork  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "metanetwork_speed" / "report.md"


# --------------------------------------------------------------------------------------------------
# Synthetic graphs with the codec's block structure.
# --------------------------------------------------------------------------------------------------
def resnet_cifar_structure(depth: int = 56, num_classes: int = 10, widths=(16, 32, 64)):
    """Node-layer sizes and edge blocks ``(out_layer, in_layer)`` of a CIFAR ResNet (reference §4.2).

    Blocks are listed in the codec's order: per residual block conv1, conv2, then the identity or
    projection-shortcut block (block output x block input); the fc block last.
    """
    n = (depth - 2) // 6
    sizes = [3, widths[0]]
    blocks = [(1, 0)]
    prev = 1
    for w in widths:
        for _ in range(n):
            sizes.append(w)
            mid = len(sizes) - 1
            blocks.append((mid, prev))
            sizes.append(w)
            out = len(sizes) - 1
            blocks.append((out, mid))
            blocks.append((out, prev))  # identity (equal widths) or projection shortcut: both dense
            prev = out
    sizes.append(num_classes)
    blocks.append((len(sizes) - 1, prev))
    return sizes, blocks


def vgg19_structure(num_classes: int = 100):
    """Node-layer sizes and edge blocks of VGG19 on CIFAR (reference §4.3): a chain, no residuals."""
    widths = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    sizes = [3] + widths + [num_classes]
    return sizes, [(k + 1, k) for k in range(len(sizes) - 1)]


def synthetic_graph(sizes, blocks, node_dim: int, edge_dim: int, seed: int = 0) -> Data:
    """Dense bipartite edges for every block, out-major, ``edge_index[0]`` = the later layer's node."""
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    parts = []
    for out_l, in_l in blocks:
        o = torch.arange(starts[out_l], starts[out_l + 1])
        i = torch.arange(starts[in_l], starts[in_l + 1])
        parts.append(torch.cartesian_prod(o, i).t())
    edge_index = torch.cat(parts, dim=1).contiguous()
    gen = torch.Generator().manual_seed(seed)
    E = edge_index.size(1)
    return Data(x=torch.randn(starts[-1], node_dim, generator=gen), edge_index=edge_index,
                edge_type=torch.zeros(E, dtype=torch.long),
                edge_attr__kernel=torch.randn(E, edge_dim, generator=gen) * 0.1)


def build_graph(name: str, source: str) -> tuple[Data, int, dict]:
    if name == "resnet56" and source == "codec":
        model = build_model("resnet56", 10)
        codec = GraphCodec(model)
        with torch.no_grad():  # plain input features: the graph is reused across passes
            graph = codec.encode(model)
        return graph, codec.node_dim, dict(codec.edge_dims)
    if name == "resnet56":
        return synthetic_graph(*resnet_cifar_structure(56, 10), 8, 9), 8, {"kernel": 9}
    if name == "vgg19":
        return synthetic_graph(*vgg19_structure(100), 5, 9), 5, {"kernel": 9}
    if name == "tiny":
        return synthetic_graph(*resnet_cifar_structure(20, 10, (4, 8, 16)), 8, 9), 8, {"kernel": 9}
    raise ValueError(f"unknown graph {name!r}")


def load_reference():
    path = ROOT / "benchmarks" / "reference_metanetwork.py"
    spec = importlib.util.spec_from_file_location("reference_metanetwork", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reference_metanetwork"] = mod  # PyG's MessagePassing inspector looks the module up
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------
# Worker: one (implementation, graph) measurement in a fresh process.
# --------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args) -> None:
    graph, node_dim, edge_dims = build_graph(args.graph, args.source)
    torch.manual_seed(0)
    ours = MetaNetwork(node_dim, edge_dims, args.layers, args.hiddim, 0.01, 0.01)
    if args.impl == "ours":
        net = ours
    else:
        net = load_reference().ReferenceMetaNetwork(node_dim, edge_dims, args.layers, args.hiddim, 0.01, 0.01)
        net.load_state_dict(ours.state_dict())
        del ours
    keys = ["x"] + [f"edge_attr__{t}" for t in edge_dims]
    gc.collect()
    base_kib = _status_kib("VmRSS")
    times = []
    for it in range(args.repeats + 1):
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = net(graph)
        loss = sum(out[k].sum() for k in keys)
        loss.backward()
        dt = time.perf_counter() - t0
        if it > 0:
            times.append(dt)
        if it < args.repeats:
            del out, loss
    peak_kib = _status_kib("VmHWM")
    if args.save:
        torch.save({"out": {k: out[k].detach() for k in keys},
                    "grad": {n: p.grad for n, p in net.named_parameters()}}, args.save)
    print(json.dumps({"times": times, "base_mib": base_kib / 1024, "peak_mib": peak_kib / 1024,
                      "nodes": graph.num_nodes, "edges": graph.edge_index.size(1)}))


def run_worker(impl, graph, layers, hiddim, repeats, source, save=None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--graph", graph,
           "--layers", str(layers), "--hiddim", str(hiddim), "--repeats", str(repeats), "--source", source]
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {impl}/{graph} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["ours", "ref"], default="ours")
    ap.add_argument("--graph", default="resnet56")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hiddim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", choices=["synthetic", "codec"], default="synthetic")
    ap.add_argument("--save", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny graph, 1 repeat, print only")
    ap.add_argument("--no-vgg", action="store_true", help="skip the VGG19 memory check")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    if args.quick:
        configs = [("tiny", 4, 16, True)]
        repeats = 1
    else:
        configs = [("resnet56", 8, 64, True)] + ([] if args.no_vgg else [("vgg19", 8, 32, False)])
        repeats = args.repeats
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for graph, layers, hiddim, with_ref in configs:
            res = {}
            impls = ["ours", "ref"] if with_ref else ["ours"]
            for impl in impls:
                save = os.path.join(tmp, f"{graph}_{impl}.pt")
                print(f"[{graph}] {impl}: {layers} layers x {hiddim} hidden ...", file=sys.stderr, flush=True)
                res[impl] = run_worker(impl, graph, layers, hiddim, repeats, args.source, save)
                res[impl]["save"] = save
            diff_out = diff_grad = None
            if with_ref:
                a = torch.load(res["ours"]["save"], weights_only=True)
                b = torch.load(res["ref"]["save"], weights_only=True)
                diff_out = max((a["out"][k] - b["out"][k]).abs().max().item() for k in a["out"])
                diff_grad = max(((a["grad"][k] - b["grad"][k]).abs().max() / b["grad"][k].abs().max().clamp(min=1e-30)
                                 ).item() for k in a["grad"])
            rows.append((graph, layers, hiddim, res, diff_out, diff_grad))
    load_after = os.getloadavg()

    md = [
        "# MetaNetwork speed and memory (forward + backward)", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/metanetwork_speed.py` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, CPU float32, graph source: {args.source}.",
        f"Load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} (the CPU is shared; "
        "ours and the reference ran back to back in this one run).", "",
        "Time: median of the timed passes (after one warm-up). Peak extra: VmHWM minus resident memory "
        "before the first pass (each configuration in its own process). Diff: max |ours - reference| over "
        "all outputs; grad diff: max over parameters of max |grad diff| / max |reference grad|.", "",
        "| graph | nodes | edges | layers x hidden | impl | time (s) | passes (s) | peak extra (MiB) | "
        "peak RSS (MiB) | time ratio | memory ratio | max abs out diff | max rel grad diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for graph, layers, hiddim, res, diff_out, diff_grad in rows:
        for impl in res:
            r = res[impl]
            t = statistics.median(r["times"])
            extra = r["peak_mib"] - r["base_mib"]
            if impl == "ours" and "ref" in res:
                tr = t / statistics.median(res["ref"]["times"])
                mr = extra / (res["ref"]["peak_mib"] - res["ref"]["base_mib"])
                ratios = f"{tr:.3f} | {mr:.3f} | {diff_out:.2e} | {diff_grad:.2e}"
            else:
                ratios = "- | - | - | -"
            passes = ", ".join(f"{x:.2f}" for x in r["times"])
            md.append(f"| {graph} | {r['nodes']} | {r['edges']} | {layers} x {hiddim} | {impl} | {t:.3f} | {passes} "
                      f"| {extra:.0f} | {r['peak_mib']:.0f} | {ratios} |")
    md += ["", "Ratios are ours / reference (targets: time <= 0.333, memory <= 0.333). The reference is "
           "`benchmarks/reference_metanetwork.py` (PyG MessagePassing + MultiAggregation, each layer run twice); "
           "it is not run on VGG19, where it would need far more than the machine's 24 GB."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
