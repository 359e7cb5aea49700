"""Speed of the network <-> graph codec (``nn.graph.GraphCodec``) against cloning the state dict.

For each model (default: CIFAR ResNet56 and torchvision ResNet50, unpruned) this measures, side by side
in one process and interleaved repeat by repeat (so the same CPU load hits every quantity):

* ``clone``: ``{k: v.clone() for k, v in sd.items()}`` of a precomputed ``sd = model.state_dict()``;
* ``encode``: ``codec.encode(model)``; ``decode``: ``codec.decode(graph)``;
* ``enc+dec``: ``codec.decode(codec.encode(model))``, the quantity of the target
  ``enc+dec / clone <= 3`` (medians of ``--repeats`` repeats after one warm-up);
* the ratio of the minimum times too: on a machine shared with other busy processes the medians
  include time the process spent descheduled, the minimums much less;
* the one-off costs: the first ``GraphCodec(model)`` (trace + analysis + static edge index) and a
  second ``GraphCodec`` of the same architecture+widths (cache hit).

Everything runs under ``torch.no_grad()`` (the copies are the same with autograd on). On CUDA every timed
call ends with ``torch.cuda.synchronize()``.

Usage::

    python benchmarks/codec_speed.py                       # CPU; writes benchmarks/results/codec_speed/report.md
    python benchmarks/codec_speed.py --devices cpu,cuda --append   # add a section to the results file
    python benchmarks/codec_speed.py --quick               # resnet20 only, prints, writes nothing
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from generate_dataset.models import build_model  # noqa: E402
from nn import graph as graph_mod  # noqa: E402
from nn.graph import GraphCodec  # noqa: E402
from utils.io import atomic_write  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "codec_speed" / "report.md"
HEADER = """# Codec speed: `GraphCodec` encode + decode vs cloning the state dict

Produced by `python benchmarks/codec_speed.py` (see its docstring; `--devices cpu,cuda --append` adds a
section). Target: **enc+dec / clone <= 3**, where *clone* is `{k: v.clone() for k, v in sd.items()}` of
a precomputed state dict and *enc+dec* is `codec.decode(codec.encode(model))`, both medians of
interleaved repeats in one process (the ratio of the minimum times is shown beside it).

What the codec does per call (no Python loop over channels or edges): `encode` walks `_modules` to the
encoded tensors, builds the node features with one `torch.cat` and one gather on a cached index, and
each edge type's features with one `cat` of the weights as stored, the zero-padded small kernels and
cached constant identity blocks. `decode` is one gather + split for all node parameters, one
split + cat + view-split per edge type (each weight starts at an aligned offset of a fresh buffer, so
the decoded network computes bit for bit what the source computes), and a copy for the few weights
stored padded or permuted. The structure analysis (fx trace, layout, static `edge_index`) is paid once
per architecture+widths and cached (columns *first* / *cached* `GraphCodec()`).
Large models are memory-bound: enc+dec reads and writes the parameters twice (model -> graph ->
parameters) where a clone does it once, so about 2x is the floor there; the graph of ResNet56 also holds
1.5x more floats than its parameters (dense identity blocks, 1x1 kernels padded to 9 features).

Machines. The development machine is a shared 2-core VM: other agents run on it at the same time (the
load average, printed per run, is often above 2, i.e. more runnable threads than cores) and fresh
memory is slow to fault in there, so its timings vary from run to run (ResNet56 medians between 1.7x
and 9x were seen minutes apart, for no change of code; ResNet50's enc+dec needs ~200 MB of fresh
memory per call). The device machine (16 cores, otherwise idle, one H100) gives the ordinary-host CPU
figures and the CUDA figures.
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def bench_model(name: str, num_classes: int, device: torch.device, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(name, num_classes).to(device).eval()
    sd = model.state_dict()
    graph_mod.clear_cache()
    first = _timed(lambda: GraphCodec(model), device)
    cached = min(_timed(lambda: GraphCodec(model), device) for _ in range(3))
    codec = GraphCodec(model)
    with torch.no_grad():
        graph = codec.encode(model)
        fns = {
            "clone": lambda: {k: v.clone() for k, v in sd.items()},
            "encode": lambda: codec.encode(model),
            "decode": lambda: codec.decode(graph),
            "enc+dec": lambda: codec.decode(codec.encode(model)),
        }
        for fn in fns.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                times[k].append(_timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    graph_floats = graph.x.numel() + sum(graph[f"edge_attr__{t}"].numel() for t in codec.edge_dims)
    return {
        "model": name,
        "device": str(device),
        "params": sum(v.numel() for v in sd.values() if v.is_floating_point()),
        "nodes": codec.num_nodes,
        "edges": codec.num_edges,
        "graph_floats": graph_floats,
        **{f"{k}_ms": 1e3 * v for k, v in med.items()},
        "ratio": med["enc+dec"] / med["clone"],
        "ratio_min": best["enc+dec"] / best["clone"],
        "first_codec_s": first,
        "cached_codec_ms": 1e3 * cached,
    }


def markdown(rows: list[dict], title: str, env: str) -> str:
    lines = [
        f"## {title}",
        "",
        env,
        "",
        "| model | device | params | nodes | edges | graph floats | clone ms | encode ms | decode ms "
        "| enc+dec ms | **enc+dec / clone** (medians) | ratio of minimums | first `GraphCodec()` s "
        "| cached `GraphCodec()` ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['params']:,} | {r['nodes']:,} | {r['edges']:,} | "
            f"{r['graph_floats']:,} | {r['clone_ms']:.2f} | {r['encode_ms']:.2f} | {r['decode_ms']:.2f} | "
            f"{r['enc+dec_ms']:.2f} | **{r['ratio']:.2f}** | {r['ratio_min']:.2f} | {r['first_codec_s']:.2f} | "
            f"{r['cached_codec_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu, cuda")
    parser.add_argument("--models", default="resnet56,resnet50")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--title", default=None, help="section title (default: the host description)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--append", action="store_true", help="append a section instead of rewriting the file")
    parser.add_argument("--quick", action="store_true", help="resnet20, 3 repeats, print only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = ["resnet20"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    repeats = 3 if args.quick else args.repeats
    classes = {"resnet50": 1000, "resnet18": 1000}
    devices = []
    for d in args.devices.split(","):
        d = d.strip()
        if d == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--devices names cuda but no CUDA device is available")
        devices.append(torch.device(d))

    load_before = os.getloadavg()
    rows = [bench_model(m, classes.get(m, 10), dev, repeats) for dev in devices for m in models]
    load_after = os.getloadavg()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if any(d.type == "cuda" for d in devices) else ""
    env = (
        f"Host `{platform.node()}`: {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads{gpu}; load average (1 min) {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; {repeats} repeats, medians."
    )
    title = args.title or f"{os.cpu_count()}-core host" + (gpu.replace(", GPU", " +") if gpu else "")
    table = markdown(rows, title, env)
    print(table)
    if args.quick:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        text = out.read_text().rstrip("\n") + "\n\n" + table
    else:
        text = HEADER + "\n" + table
    atomic_write(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
