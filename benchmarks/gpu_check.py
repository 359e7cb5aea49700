"""GPU acceptance check: what no CPU test can show, in one script, at most 7 minutes on one H100.

Run it on the GPU machine, from the repository root::

    python benchmarks/gpu_check.py                       # device cuda, paper sizes; ~3-5 min on one H100
    python benchmarks/gpu_check.py --sections b,c,e      # a subset
    python benchmarks/gpu_check.py --device cpu --tiny   # every section on CPU with tiny models (~30 s here)

It writes ``report.md`` (readable report: device, torch / CUDA / cuDNN versions, date, every section's
checks PASS / FAIL and numbers) and ``gpu_check.json`` into ``--out`` (default ``benchmarks/results/gpu_check/`` on CUDA;
a CPU run without ``--out`` writes into a fresh temporary folder, so a CPU run never overwrites the GPU report).
It prints one progress line per section and exits with 1 if any check failed. The whole run must stay within
**7 minutes** on one H100 (the report states the total); every section is a function whose failure (a FAIL or
an exception, recorded with its traceback) does not stop the others.

**Status: until this script has run on a GPU, the README must say plainly that it has not** (as of writing it
has only run with ``--device cpu --tiny``, in ``tests/test_gpu_check.py``). It is written for torch 2.11 and
later: only APIs present there are used.

Sections (paper sizes; ``--tiny``: resnet8 / VGG-19 of width 8, a 2 x 8 metanetwork, 16x16 inputs, a few
batches, K = 1, 2 in the probe):

a. codec round trip on the device: ``decode(encode(m))`` loaded into ``m`` (and into a copy whose decoded
   tensors were zeroed) changes no bit of the state dict, ResNet-56 (CIFAR-10) and VGG-19 (CIFAR-100), each
   also in ``channels_last``; compared bit pattern by bit pattern.
b. VGG-19 graph (CIFAR-100, 5607 nodes / 2,275,520 edges) with the 8 x 32 metanetwork (vgg19.yaml's ratios):
   forward + backward time (median of 3 after a warm-up) and peak memory (``torch.cuda.max_memory_allocated``),
   which must stay under 12 GB (1 GB = 1e9 bytes).
c. ResNet-56 graph with the 8 x 64 metanetwork (resnet56.yaml): device forward against the CPU forward, the
   fused kernel against the unfused PyG path (``MetaNetwork(fused=...)``), activation checkpointing on against
   off (``MetaNetwork(checkpoint=...)``, both with the fused kernel and the unfused path). Forward: the learned
   delta (output - input) compared relative to its largest entry (<= 1e-3); backward: cosine similarity
   (>= 0.999) and relative norm of the difference (<= 1e-3) of all metanetwork gradients, for a fixed random
   weighting of the outputs. TF32 is off for these comparisons (they test kernels, not TF32 rounding).
d. deterministic mode (``utils.seed.seed_everything(0, deterministic=True)``): two meta-training steps
   (``training.meta_gradient.meta_gradient`` + AdamW) and a few training steps (``training.loop.train``, amp on
   CUDA) raise nothing, and two runs from the same seed end bitwise equal (metanetwork parameters and the
   trained model's state dict). The warnings of ``warn_only`` (kernels without a deterministic version) are
   listed. The global flags are restored afterwards.
e. ``meta_gradient`` at paper size (ResNet-56, 8 x 64, 2 batches of 500, reference_batches 100, alpha 16) on
   the device and on the CPU from the same weights and batches: CE and R within 1e-4 relative, gradient cosine
   similarity above 0.999 (TF32 off; the CE with the default TF32 settings is reported too). Host
   synchronisations of one device step are counted two ways: ``torch.cuda.set_sync_debug_mode("warn")``
   warnings (CUDA only, the authoritative count) and, on any device, calls of ``Tensor.item / tolist /
   __bool__ / __float__ / __int__ / cpu / numpy`` on tensors of the device (patched for the step; a proxy).
f. ``training.loop.train`` throughput on ResNet-56 with synthetic CIFAR-shaped data (a ``TensorDataset``
   batched by a ``BatchSampler``): fp32, amp, amp + channels_last, amp + sparse learning
   (``pruning.sparse_learning.SparseLearning`` as ``after_backward``, as stages/final.py). Each variant runs one
   warm-up epoch, then one timed epoch (synchronised) in a second ``train`` call; images/s each, and the step
   cost of sparse learning over plain amp must be <= 1.5 (CUDA only).
g. ``prune_to_speed_up`` (ResNet-56, target 2.3, the paper's method: configs/method/group_l2_norm_max_normalizer)
   on the device and on the CPU from the same weights: same layer shapes, same MACs, same speed-up.
h. ``python -m torch.distributed.run --standalone --nproc_per_node=1`` of this script's hidden worker
   (``--ddp-worker``): NCCL on CUDA (gloo on CPU) through ``utils.distributed.torchrun_session``, a tensor and an
   object broadcast, ``stages.ddp.train`` (DDP on a ``DistributedSampler``), ``training.loop.evaluate`` and one
   sharded meta-training step (``stages.meta_train.sharded_loader`` + ``training.meta_gradient.accumulated_step``);
   success and time.
i. probe for batched data-model generation: K ResNet-56s trained at once with ``torch.func.functional_call``
   on stacked parameters (``stack_module_state``) under ``vmap`` against one ordinary model at a time (plain
   SGD steps, fp32), images/s for K = 1, 4, 8. BatchNorm in training mode: the running statistics are tracked
   functionally, as stacked buffers passed through ``vmap`` (in_dims 0), which BatchNorm updates in place per
   model; no ``replace_all_batch_norm_modules_`` (that would drop the running statistics a data model needs).
   Checked: the batched forward and one batched SGD step equal the plain ones for model 0. The ratio decides
   whether generation should batch (rule used in the report: batch if the best ratio is >= 1.5).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler,
                              TensorDataset)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from generate_dataset.models import build_model  # noqa: E402
from nn.apply import build_metanetwork  # noqa: E402
from nn.graph import GraphCodec  # noqa: E402
from nn.metanetwork import MetaNetwork  # noqa: E402
from pruning.depgraph import count_macs, prune_to_speed_up  # noqa: E402
from pruning.sparse_learning import SparseLearning  # noqa: E402
from stages import ddp, meta_train  # noqa: E402
from training import meta_gradient  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.loop import evaluate, train  # noqa: E402
from utils import distributed  # noqa: E402
from utils.device import configure_cuda, cpu_name  # noqa: E402
from utils.io import atomic_write, write_json  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check"
CONFIGS = ROOT / "configs"
BUDGET_S = 7 * 60
MEMORY_LIMIT_BYTES = 12e9  # section b: peak allocated memory of the VGG-19 forward + backward
PAPER_VGG19_GRAPH = (5607, 2_275_520)  # nodes, edges of VGG-19 / CIFAR-100 (nn/graph.py docstring)

# check states (JSON values; the Markdown shows them in words)
PASS, FAIL, NOT_MEASURED, NOT_APPLICABLE = "pass", "fail", "not_measured", "not_applicable"
SHOWN = {PASS: "PASS", FAIL: "FAIL", NOT_MEASURED: "cpu: not measured", NOT_APPLICABLE: "not applicable"}

# tolerances (see the module docstring)
FORWARD_RTOL = 1e-3  # max |delta_a - delta_b| / max |delta_b|
GRAD_COS_MIN = 0.999
GRAD_REL_MAX = 1e-3  # ||g_a - g_b|| / ||g_b||
SCALAR_RTOL = 1e-4  # section e: CE and R
SPARSE_RATIO_MAX = 1.5
BATCH_PAYS_OFF = 1.5  # section i: batched / one-at-a-time images/s above which generation should batch
SECTION_KEYS = "abcdefghi"


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Model and data sizes of a run: the paper's (default) or tiny ones (``--tiny``, CPU tests)."""

    tiny: bool
    resnet: str  # ResNet-56's stand-in
    vgg_widths: tuple[int, ...] | None  # None: VGG-19's own widths
    resnet_net: tuple[int, int]  # (num_layer, hiddim) of the ResNet metanetwork
    vgg_net: tuple[int, int]
    image: int  # input height = width
    batch: int  # training batch
    meta_batch: int  # meta-training batch
    meta_batches: int
    train_batches: int  # batches of one timed training epoch (section f)
    det_train_batches: int  # training batches of the deterministic run (section d)
    repeats: int  # timed repeats (section b)
    prune_target: float
    prune_steps: int
    probe_ks: tuple[int, ...]
    probe_steps: int  # timed steps per K (section i)
    ddp_batches: int
    ddp_timeout_s: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image, self.image)


PAPER = Sizes(tiny=False, resnet="resnet56", vgg_widths=None, resnet_net=(8, 64), vgg_net=(8, 32), image=32,
              batch=128, meta_batch=500, meta_batches=2, train_batches=50, det_train_batches=3, repeats=3,
              prune_target=2.3, prune_steps=200, probe_ks=(1, 4, 8), probe_steps=10, ddp_batches=4,
              ddp_timeout_s=300)
TINY = Sizes(tiny=True, resnet="resnet8", vgg_widths=(8,) * 16, resnet_net=(2, 8), vgg_net=(2, 8), image=16,
             batch=16, meta_batch=16, meta_batches=2, train_batches=3, det_train_batches=2, repeats=2,
             prune_target=2.3, prune_steps=40, probe_ks=(1, 2), probe_steps=2, ddp_batches=2, ddp_timeout_s=120)


# --------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One section's outcome: checks (name, state, detail), numbers, notes, an exception, its time."""

    key: str
    title: str
    checks: list[dict] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "status": PASS if ok else FAIL, "detail": detail})
        return bool(ok)

    def not_measured(self, name: str, why: str) -> None:
        self.checks.append({"name": name, "status": NOT_MEASURED, "detail": why})

    def not_applicable(self, name: str, why: str) -> None:
        self.checks.append({"name": name, "status": NOT_APPLICABLE, "detail": why})

    @property
    def status(self) -> str:
        if self.error is not None or any(c["status"] == FAIL for c in self.checks):
            return FAIL
        return PASS

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "status": self.status, "seconds": round(self.seconds, 3),
                "checks": self.checks, "numbers": self.numbers, "notes": self.notes, "error": self.error}


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    method: dict
    resnet_options: dict
    vgg_options: dict

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _metanetwork_options(name: str, shape: tuple[int, int]) -> dict:
    """configs/metanetwork/<name>.yaml (the paper's ratios and knobs) with ``(num_layer, hiddim)``."""
    options = OmegaConf.to_container(OmegaConf.load(CONFIGS / "metanetwork" / f"{name}.yaml"), resolve=True)
    options.update(num_layer=int(shape[0]), hiddim=int(shape[1]))
    return options


def _paper_method() -> dict:
    """The paper's structured criterion, configs/method/group_l2_norm_max_normalizer.yaml, as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "method" / "group_l2_norm_max_normalizer.yaml"),
                                  resolve=True)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def _exact_float32():
    """TF32 off for matmuls and cuDNN convolutions (restored afterwards): comparisons test kernels, not TF32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bit pattern (``-0.0 != 0.0``, NaN payloads compared), whatever the memory format."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a = a.detach().cpu().contiguous().reshape(-1)
    b = b.detach().cpu().contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Distinct BatchNorm parameters and running statistics: a codec or pruning test must see non-trivial values
    (and distinct channel importances)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model


def _resnet(ctx: Context, seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize_bn(build_model(ctx.sizes.resnet, classes), seed)


def _vgg(ctx: Context, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    widths = list(ctx.sizes.vgg_widths) if ctx.sizes.vgg_widths is not None else None
    return _randomize_bn(build_model("vgg19", 100, widths=widths), seed)


def _images(n: int, sizes: Sizes, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *sizes.input_shape, generator=gen),
            torch.randint(0, classes, (n,), generator=gen))


def _batches(count: int, batch: int, sizes: Sizes, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _images(count * batch, sizes, seed)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)]


def _batched_loader(dataset: TensorDataset, batch: int, shuffle: bool, seed: int) -> DataLoader:
    """Whole batches in one indexing call (a ``BatchSampler`` as sampler, ``batch_size=None``): the loader costs
    next to nothing, so the timings are the training step's."""
    base = (RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle
            else SequentialSampler(dataset))
    return DataLoader(dataset, sampler=BatchSampler(base, batch, drop_last=True), batch_size=None)


def _synthetic_loaders(sizes: Sizes, batches: int, seed: int) -> types.SimpleNamespace:
    """``.train`` / ``.val`` / ``.test`` as ``training.loop.train`` expects (no val/test: ``select="last"``)."""
    x, y = _images(batches * sizes.batch, sizes, seed)
    return types.SimpleNamespace(train=_batched_loader(TensorDataset(x, y), sizes.batch, True, seed), val=None,
                                 test=None)


def _output_loss(out: Any, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fixed random weighting of every output feature of a metanetwork (more sensitive than a plain sum)."""
    return sum((out[key] * w).sum() for key, w in weights.items())


def _output_weights(graph: Any, codec: GraphCodec, device: torch.device, seed: int = 123) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys = ["x"] + [f"edge_attr__{t}" for t in codec.edge_dims]
    return {k: torch.randn(graph[k].shape, generator=gen).to(device) for k in keys}


def _flat_grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().cpu().reshape(-1)
                      for p in net.parameters()])


def _compare_grads(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300))
    rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
    return {"cosine": cos, "rel_norm_diff": rel, "max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0}


def _compare_deltas(out_a: Any, out_b: Any, inputs: Any, keys: list[str]) -> dict:
    """Max abs difference of the outputs and of the learned deltas (output - input), relative to the delta."""
    worst = {"max_abs_diff": 0.0, "delta_max_abs_diff": 0.0, "delta_rel": 0.0}
    for key in keys:
        a = out_a[key].detach().double().cpu()
        b = out_b[key].detach().double().cpu()
        old = inputs[key].detach().double().cpu()
        diff = float((a - b).abs().max())
        delta = (b - old).abs().max().clamp_min(1e-300)
        ddiff = float(((a - old) - (b - old)).abs().max())
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["delta_max_abs_diff"] = max(worst["delta_max_abs_diff"], ddiff)
        worst["delta_rel"] = max(worst["delta_rel"], ddiff / float(delta))
    return worst


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


class _Settings:
    """What ``meta_gradient.build_entry`` reads of the meta-training settings (the paper's CIFAR value)."""

    pruner_reg = 10.0


# --------------------------------------------------------------------------------------------------
# a. codec round trip
# --------------------------------------------------------------------------------------------------
def _roundtrip(model: nn.Module, device: torch.device, channels_last: bool, input_shape: tuple[int, ...]) -> dict:
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    codec = GraphCodec(model, input_shape=input_shape)
    start = time.perf_counter()
    with torch.no_grad():
        graph = codec.encode(model)
        decoded = codec.decode(graph)
    _sync(device)
    seconds = time.perf_counter() - start
    on_device = graph.x.device.type == device.type and all(v.device.type == device.type for v in decoded.values())
    # into a copy whose decoded tensors were zeroed first: the graph alone must restore them
    other = copy.deepcopy(model)
    with torch.no_grad():
        other_state = other.state_dict()
        for key in decoded:
            other_state[key].zero_()
    unexpected = other.load_state_dict(decoded, strict=False).unexpected_keys
    model.load_state_dict(decoded, strict=False)
    after, restored = model.state_dict(), other.state_dict()
    differ_self = [k for k in before if not _bits_equal(before[k], after[k])]
    differ_copy = [k for k in before if not _bits_equal(before[k], restored[k])]
    kept_format = all(m.weight.is_contiguous(memory_format=torch.channels_last)
                      for m in model.modules() if isinstance(m, nn.Conv2d)) if channels_last else True
    return {"tensors": len(before), "decoded": len(decoded), "differ_in_model": differ_self,
            "differ_in_copy": differ_copy, "unexpected_keys": list(unexpected), "on_device": on_device,
            "kept_channels_last": kept_format, "nodes": codec.num_nodes, "edges": codec.num_edges,
            "encode_decode_s": seconds}


def section_a(ctx: Context, sec: Section) -> None:
    for arch, make in ((ctx.sizes.resnet, lambda: _resnet(ctx)), ("vgg19", lambda: _vgg(ctx))):
        for channels_last in (False, True):
            label = arch + (" channels_last" if channels_last else "")
            r = _roundtrip(make(), ctx.device, channels_last, ctx.sizes.input_shape)
            sec.numbers[label] = {"tensors": r["tensors"], "decoded": r["decoded"], "nodes": r["nodes"],
                                  "edges": r["edges"], "encode_decode_s": round(r["encode_decode_s"], 4)}
            sec.check(f"{label}: graph and decoded tensors on {ctx.device.type}", r["on_device"])
            sec.check(f"{label}: decode(encode(m)) loaded into m changes no bit", not r["differ_in_model"],
                      f"{r['tensors']} tensors compared; differing: {r['differ_in_model'][:5]}")
            sec.check(f"{label}: a copy with the decoded tensors zeroed is restored bit for bit",
                      not r["differ_in_copy"] and not r["unexpected_keys"],
                      f"{r['decoded']} decoded tensors; differing: {r['differ_in_copy'][:5]}; unexpected keys: "
                      f"{r['unexpected_keys'][:5]}")
            if channels_last:
                sec.check(f"{label}: conv weights still channels_last after loading", r["kept_channels_last"])


# --------------------------------------------------------------------------------------------------
# b. VGG-19 memory and time
# --------------------------------------------------------------------------------------------------
def section_b(ctx: Context, sec: Section) -> None:
    device = ctx.device
    model = _vgg(ctx).to(device).eval()
    codec = GraphCodec(model, input_shape=ctx.sizes.input_shape)
    with torch.no_grad():
        graph = codec.encode(model)
    sec.numbers.update(nodes=codec.num_nodes, edges=codec.num_edges, metanetwork=f"{ctx.sizes.vgg_net[0]} x "
                       f"{ctx.sizes.vgg_net[1]}", options=", ".join(f"{k}={v}" for k, v in ctx.vgg_options.items()))
    if not ctx.sizes.tiny:
        sec.check("the graph has the paper's size (5607 nodes, 2,275,520 edges)",
                  (codec.num_nodes, codec.num_edges) == PAPER_VGG19_GRAPH, f"{codec.num_nodes} nodes, "
                  f"{codec.num_edges} edges")
    torch.manual_seed(0)
    net = build_metanetwork(codec, ctx.vgg_options).to(device)
    weights = _output_weights(graph, codec, device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        _output_loss(net(graph), weights).backward()

    warm = _timed(step, device)
    _fresh_memory(device)
    base = torch.cuda.memory_allocated(device) if ctx.cuda else None
    times = [_timed(step, device) for _ in range(ctx.sizes.repeats)]
    sec.numbers.update(first_pass_s=round(warm, 4), fwd_bwd_median_s=round(statistics.median(times), 4),
                       fwd_bwd_min_s=round(min(times), 4))
    grads_finite = all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    sec.check("gradients finite", bool(grads_finite))
    if ctx.cuda:
        peak = torch.cuda.max_memory_allocated(device)
        sec.numbers.update(peak_allocated_gb=round(peak / 1e9, 3), allocated_before_gb=round(base / 1e9, 3))
        sec.check("peak memory (max_memory_allocated) under 12 GB", peak < MEMORY_LIMIT_BYTES,
                  f"{peak / 1e9:.2f} GB")
    else:
        sec.not_measured("peak memory under 12 GB", "torch.cuda.max_memory_allocated needs CUDA")


# --------------------------------------------------------------------------------------------------
# c. device vs CPU, fused vs unfused, checkpointing on vs off
# --------------------------------------------------------------------------------------------------
def _fwd_bwd(net: nn.Module, graph: Any, weights: dict[str, torch.Tensor], device: torch.device) -> dict:
    _fresh_memory(device)
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = net(graph)
    _output_loss(out, weights).backward()
    _sync(device)
    result = {"out": {k: out[k].detach() for k in weights}, "grads": _flat_grads(net),
              "seconds": time.perf_counter() - start}
    if device.type == "cuda":
        result["peak_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def section_c(ctx: Context, sec: Section) -> None:
    device = ctx.device
    model = _resnet(ctx).eval()
    codec = GraphCodec(model, input_shape=ctx.sizes.input_shape)
    with torch.no_grad():
        graph_cpu = codec.encode(model)
    graph = graph_cpu.to(device)
    torch.manual_seed(1)
    state = build_metanetwork(codec, ctx.resnet_options).state_dict()

    def make(dev: torch.device, **knobs: Any) -> MetaNetwork:
        net = build_metanetwork(codec, {**ctx.resnet_options, **knobs})
        net.load_state_dict(state)
        return net.to(dev)

    keys = ["x"] + [f"edge_attr__{t}" for t in codec.edge_dims]
    sec.numbers.update(nodes=codec.num_nodes, edges=codec.num_edges,
                       metanetwork=f"{ctx.sizes.resnet_net[0]} x {ctx.sizes.resnet_net[1]}")
    with _exact_float32():
        # device against CPU (forward)
        if ctx.cuda:
            with torch.no_grad():
                out_cpu = make(torch.device("cpu"))(graph_cpu)
                out_dev = make(device)(graph)
            cmp = _compare_deltas(out_dev, out_cpu, graph_cpu, keys)
            sec.numbers["device_vs_cpu"] = cmp
            sec.check(f"device forward agrees with CPU (delta rel <= {FORWARD_RTOL:g})",
                      cmp["delta_rel"] <= FORWARD_RTOL, f"max abs diff {cmp['max_abs_diff']:.3e}, on the delta "
                      f"{cmp['delta_max_abs_diff']:.3e} ({cmp['delta_rel']:.3e} of its max)")
        else:
            sec.not_measured("device forward agrees with CPU", "the device is the CPU")
        weights = _output_weights(graph, codec, device)
        runs = {}
        for label, knobs in (("fused", {"fused": True, "checkpoint": False}),
                             ("unfused", {"fused": False, "checkpoint": False}),
                             ("fused+checkpoint", {"fused": True, "checkpoint": True}),
                             ("unfused+checkpoint", {"fused": False, "checkpoint": True})):
            runs[label] = _fwd_bwd(make(device, **knobs), graph, weights, device)
            sec.numbers[f"{label}_fwd_bwd_s"] = round(runs[label]["seconds"], 4)
            if "peak_gb" in runs[label]:
                sec.numbers[f"{label}_peak_gb"] = round(runs[label]["peak_gb"], 3)
    for a, b, what in (("unfused", "fused", "fused agrees with unfused"),
                       ("fused+checkpoint", "fused", "checkpointing on agrees with off (fused)"),
                       ("unfused+checkpoint", "unfused", "checkpointing on agrees with off (unfused)")):
        fwd = _compare_deltas(runs[a]["out"], runs[b]["out"], graph, keys)
        grads = _compare_grads(runs[a]["grads"], runs[b]["grads"])
        sec.numbers[f"{a} vs {b}"] = {**fwd, **{f"grad_{k}": v for k, v in grads.items()}}
        sec.check(f"{what}: forward (delta rel <= {FORWARD_RTOL:g})", fwd["delta_rel"] <= FORWARD_RTOL,
                  f"max abs diff {fwd['max_abs_diff']:.3e}, delta rel {fwd['delta_rel']:.3e}")
        sec.check(f"{what}: gradients (cos >= {GRAD_COS_MIN}, rel diff <= {GRAD_REL_MAX:g})",
                  grads["cosine"] >= GRAD_COS_MIN and grads["rel_norm_diff"] <= GRAD_REL_MAX,
                  f"cos {grads['cosine']:.8f}, rel diff {grads['rel_norm_diff']:.3e}, max abs diff "
                  f"{grads['max_abs_diff']:.3e}")
    chunk_rows = 1 << 15  # nn/metanetwork.py _DECODER_CHUNK_ROWS: edge decoders checkpoint per chunk above it
    if codec.num_edges <= chunk_rows:
        sec.notes.append(f"with the fused kernel, checkpointing acts only on the edge decoders of graphs with more "
                         f"than {chunk_rows} edges of a type; this graph has {codec.num_edges} edges, so the fused "
                         "checkpoint comparison is trivially equal here")


# --------------------------------------------------------------------------------------------------
# d. deterministic mode
# --------------------------------------------------------------------------------------------------
def _deterministic_run(ctx: Context) -> dict:
    device = ctx.device
    seed_everything(0, deterministic=True)
    model = _randomize_bn(build_model(ctx.sizes.resnet, 10), 0).to(device)
    example = torch.ones(1, *ctx.sizes.input_shape, device=device)
    entry = meta_gradient.build_entry(0, model, example, ctx.method, _Settings, input_shape=ctx.sizes.input_shape)
    torch.manual_seed(1)
    net = build_metanetwork(entry.codec, ctx.resnet_options).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=5e-4)
    batches = _batches(ctx.sizes.meta_batches, ctx.sizes.batch, ctx.sizes, seed=2)
    results = []
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        results.append(meta_gradient.meta_gradient(net, entry, batches, reference_batches=100, alpha=16.0,
                                                   device=device, diagnostics=False))
        optimizer.step()
    torch.manual_seed(3)
    trained = build_model(ctx.sizes.resnet, 10)
    cfg = TrainConfig(epochs=1, lr=0.05, weight_decay=5e-4, scheduler="constant", select="last",
                      amp=ctx.cuda, test_every_epoch=False)
    train(trained, _synthetic_loaders(ctx.sizes, ctx.sizes.det_train_batches, seed=4), cfg, device, desc="det",
          log=lambda _msg: None)
    return {"net": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "model": {k: v.detach().clone() for k, v in trained.state_dict().items()},
            "ce": [r.ce for r in results], "reg": [r.reg for r in results]}


def section_d(ctx: Context, sec: Section) -> None:
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    runs, caught = [], []
    try:
        for _ in range(2):
            with warnings.catch_warnings(record=True) as records:
                warnings.simplefilter("always")
                runs.append(_deterministic_run(ctx))
            caught += [f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in records]
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    sec.check("two meta-training steps and training steps ran in deterministic mode without an exception", True,
              f"CE {runs[0]['ce']}, R {runs[0]['reg']}")
    nondet = sorted({m for m in caught if "deterministic" in m.lower()})
    sec.numbers.update(nondeterministic_warnings=nondet, other_warnings=len(caught) - sum(
        1 for m in caught if "deterministic" in m.lower()))
    for part, what in (("net", "metanetwork parameters after 2 meta-training steps"),
                       ("model", "trained model's state dict")):
        differ = [k for k in runs[0][part] if not _bits_equal(runs[0][part][k], runs[1][part][k])]
        sec.check(f"two runs bitwise equal: {what}", not differ, f"{len(runs[0][part])} tensors; differing: "
                  f"{differ[:5]}")
    sec.check("two runs bitwise equal: CE and R of every step",
              runs[0]["ce"] == runs[1]["ce"] and runs[0]["reg"] == runs[1]["reg"],
              f"{runs[0]['ce']} / {runs[1]['ce']}; {runs[0]['reg']} / {runs[1]['reg']}")
    if nondet:
        sec.notes.append("deterministic mode warned (warn_only=True) about kernels without a deterministic version: "
                         + "; ".join(nondet))


# --------------------------------------------------------------------------------------------------
# e. meta_gradient device vs CPU, host synchronisations
# --------------------------------------------------------------------------------------------------
_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


@contextlib.contextmanager
def _count_syncs(device: torch.device):
    """Count host synchronisations while the block runs. Yields a dict filled on exit with

    * ``cuda_warnings`` (CUDA only): warnings of ``torch.cuda.set_sync_debug_mode("warn")``, torch's own record
      of every synchronising CUDA call, and ``cuda_sites`` (the Python lines they came from);
    * ``calls``: calls of ``Tensor.item / tolist / __bool__ / __float__ / __int__ / cpu / numpy`` on tensors of
      ``device`` made from Python (patched on ``torch.Tensor`` meanwhile): a proxy that works on the CPU too.
    """
    counts: collections.Counter = collections.Counter()
    found: dict[str, Any] = {}
    originals = {name: (name in vars(torch.Tensor), getattr(torch.Tensor, name)) for name in _SYNC_METHODS}

    def counting(name: str, original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            if self.device.type == device.type:
                counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name, (_own, original) in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        for name, (own, original) in originals.items():
            if own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
    syncs = [w for w in records if "synchroniz" in str(w.message).lower()]
    found["calls"] = dict(counts)
    found["calls_total"] = sum(counts.values())
    if device.type == "cuda":
        found["cuda_warnings"] = len(syncs)
        sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        found["cuda_sites"] = dict(sites.most_common(12))


def section_e(ctx: Context, sec: Section) -> None:
    device = ctx.device
    cpu = torch.device("cpu")
    model = _resnet(ctx).eval()
    model_dev = copy.deepcopy(model).to(device)
    example = torch.ones(1, *ctx.sizes.input_shape)
    entry_cpu = meta_gradient.build_entry(0, model, example, ctx.method, _Settings, input_shape=ctx.sizes.input_shape)
    entry_dev = meta_gradient.build_entry(0, model_dev, example.to(device), ctx.method, _Settings,
                                          input_shape=ctx.sizes.input_shape)
    torch.manual_seed(1)
    net_cpu = build_metanetwork(entry_cpu.codec, ctx.resnet_options)
    net_dev = copy.deepcopy(net_cpu).to(device)
    batches = _batches(ctx.sizes.meta_batches, ctx.sizes.meta_batch, ctx.sizes, seed=5)

    def step(net: nn.Module, entry: Any, dev: torch.device):
        net.zero_grad(set_to_none=True)
        return meta_gradient.meta_gradient(net, entry, batches, reference_batches=100, alpha=16.0, device=dev,
                                           diagnostics=False)

    sec.numbers.update(batches=f"{ctx.sizes.meta_batches} x {ctx.sizes.meta_batch}",
                       metanetwork=f"{ctx.sizes.resnet_net[0]} x {ctx.sizes.resnet_net[1]}")
    if ctx.cuda:
        default_ce = step(net_dev, entry_dev, device).ce  # default TF32 settings (cuDNN convolutions in TF32)
        sec.numbers["ce_default_tf32_settings"] = default_ce
    with _exact_float32():
        start = time.perf_counter()
        r_cpu = step(net_cpu, entry_cpu, cpu)
        sec.numbers["cpu_step_s"] = round(time.perf_counter() - start, 3)
        g_cpu = _flat_grads(net_cpu)
        r_dev = step(net_dev, entry_dev, device)
        g_dev = _flat_grads(net_dev)
        # the counted step: warm now (kernels chosen, memory cached)
        with _count_syncs(device) as syncs:
            _sync(device)
            start = time.perf_counter()
            step(net_dev, entry_dev, device)
            _sync(device)
            step_s = time.perf_counter() - start
    sec.numbers.update(ce_device=r_dev.ce, ce_cpu=r_cpu.ce, reg_device=r_dev.reg, reg_cpu=r_cpu.reg,
                       device_step_s=round(step_s, 3))
    ce_rel = abs(r_dev.ce - r_cpu.ce) / max(abs(r_cpu.ce), 1e-300)
    reg_rel = abs(r_dev.reg - r_cpu.reg) / max(abs(r_cpu.reg), 1e-300)
    grads = _compare_grads(g_dev, g_cpu)
    sec.numbers.update(ce_rel_diff=ce_rel, reg_rel_diff=reg_rel, **{f"grad_{k}": v for k, v in grads.items()})
    if ctx.cuda:
        sec.check(f"CE within {SCALAR_RTOL:g} relative of the CPU", ce_rel <= SCALAR_RTOL, f"{ce_rel:.3e}")
        sec.check(f"R within {SCALAR_RTOL:g} relative of the CPU", reg_rel <= SCALAR_RTOL, f"{reg_rel:.3e}")
        sec.check(f"gradient cosine similarity > {GRAD_COS_MIN}", grads["cosine"] > GRAD_COS_MIN,
                  f"cos {grads['cosine']:.8f}, rel diff {grads['rel_norm_diff']:.3e}")
        sec.numbers.update(host_syncs_cuda=syncs["cuda_warnings"], host_sync_sites=syncs["cuda_sites"])
        sec.check("host synchronisations counted (set_sync_debug_mode warnings)", True,
                  f"{syncs['cuda_warnings']} per step; proxy count {syncs['calls_total']}")
    else:
        for what in ("CE", "R", "gradient"):
            sec.not_measured(f"{what} device vs CPU", "the device is the CPU")
        sec.not_measured("host synchronisations (set_sync_debug_mode)", "set_sync_debug_mode needs CUDA; the "
                         f"patched-call proxy counted {syncs['calls_total']}")
    sec.numbers.update(host_sync_proxy_calls=syncs["calls"], host_sync_proxy_total=syncs["calls_total"])
    sec.check("CE, R and the gradient are finite",
              math.isfinite(r_dev.ce) and math.isfinite(r_dev.reg) and bool(torch.isfinite(g_dev).all()))


# --------------------------------------------------------------------------------------------------
# f. training throughput
# --------------------------------------------------------------------------------------------------
def _train_speed(ctx: Context, amp: bool, channels_last: bool, sparse: bool) -> dict:
    device, sizes = ctx.device, ctx.sizes
    torch.manual_seed(0)
    model = build_model(sizes.resnet, 10).to(device)
    if channels_last and ctx.cuda:
        model = model.to(memory_format=torch.channels_last)
    hook = None
    if sparse:
        example = torch.ones(1, *sizes.input_shape, device=device)
        hook = SparseLearning(model, example, ctx.method, reg=5e-4, alpha=16.0, iterative_steps=sizes.prune_steps)
    loaders = _synthetic_loaders(sizes, sizes.train_batches, seed=6)
    cfg = TrainConfig(epochs=1, lr=0.05, weight_decay=5e-4, scheduler="constant", select="last", amp=amp,
                      channels_last=channels_last, test_every_epoch=False)
    quiet = lambda _msg: None  # noqa: E731
    train(model, loaders, cfg, device, desc="warmup", log=quiet, after_backward=hook)  # warm-up epoch
    seconds = _timed(lambda: train(model, loaders, cfg, device, desc="timed", log=quiet, after_backward=hook), device)
    images = sizes.train_batches * sizes.batch
    return {"seconds": seconds, "images_per_s": images / seconds, "step_ms": 1e3 * seconds / sizes.train_batches}


def section_f(ctx: Context, sec: Section) -> None:
    variants = {"fp32": (False, False, False), "amp": (True, False, False),
                "amp+channels_last": (True, True, False), "amp+sparse_learning": (True, False, True)}
    rows = {}
    for name, (amp, channels_last, sparse) in variants.items():
        rows[name] = _train_speed(ctx, amp, channels_last, sparse)
        sec.numbers[name] = {"images_per_s": round(rows[name]["images_per_s"], 1),
                             "step_ms": round(rows[name]["step_ms"], 3)}
    ratio = rows["amp+sparse_learning"]["seconds"] / rows["amp"]["seconds"]
    sec.numbers["sparse_over_plain_step_cost"] = round(ratio, 3)
    sec.numbers["timed"] = f"1 epoch of {ctx.sizes.train_batches} x {ctx.sizes.batch} after a warm-up epoch"
    if ctx.cuda:
        sec.check(f"sparse-learning step cost / plain (amp) <= {SPARSE_RATIO_MAX}", ratio <= SPARSE_RATIO_MAX,
                  f"{ratio:.3f}")
    else:
        sec.not_measured(f"sparse-learning step cost / plain <= {SPARSE_RATIO_MAX}",
                         f"a GPU target (amp and channels_last are ignored on the CPU); measured {ratio:.3f}")
    sec.check("every variant trained", all(math.isfinite(r["images_per_s"]) for r in rows.values()))


# --------------------------------------------------------------------------------------------------
# g. pruning device vs CPU
# --------------------------------------------------------------------------------------------------
def _prune(model: nn.Module, ctx: Context, device: torch.device) -> dict:
    model = model.to(device).eval()
    example = torch.ones(1, *ctx.sizes.input_shape, device=device)
    start = time.perf_counter()
    speed_up = prune_to_speed_up(model, ctx.sizes.prune_target, ctx.method, example,
                                 iterative_steps=ctx.sizes.prune_steps)
    seconds = time.perf_counter() - start
    return {"speed_up": speed_up, "macs": count_macs(model, example), "seconds": seconds,
            "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()}}


def section_g(ctx: Context, sec: Section) -> None:
    model = _resnet(ctx)
    on_cpu = _prune(copy.deepcopy(model), ctx, torch.device("cpu"))
    on_dev = _prune(copy.deepcopy(model), ctx, ctx.device)
    sec.numbers.update(target=ctx.sizes.prune_target, speed_up_device=on_dev["speed_up"],
                       speed_up_cpu=on_cpu["speed_up"], macs_device=on_dev["macs"], macs_cpu=on_cpu["macs"],
                       device_s=round(on_dev["seconds"], 2), cpu_s=round(on_cpu["seconds"], 2))
    differ = [k for k in on_cpu["shapes"] if on_cpu["shapes"][k] != on_dev["shapes"].get(k)]
    if ctx.cuda:
        sec.check("same layer shapes on the device as on the CPU",
                  not differ and on_cpu["shapes"].keys() == on_dev["shapes"].keys(),
                  f"{len(on_cpu['shapes'])} tensors; differing: {differ[:5]}")
        sec.check("same MACs", on_dev["macs"] == on_cpu["macs"], f"{on_dev['macs']:.0f} vs {on_cpu['macs']:.0f}")
        sec.check("same speed-up", on_dev["speed_up"] == on_cpu["speed_up"],
                  f"{on_dev['speed_up']:.6f} vs {on_cpu['speed_up']:.6f}")
    else:
        sec.not_measured("same layer shapes / MACs on the device as on the CPU", "the device is the CPU (the two "
                         f"CPU prunings agree: {not differ and on_dev['macs'] == on_cpu['macs']})")
    sec.check(f"target {ctx.sizes.prune_target} reached", on_dev["speed_up"] >= ctx.sizes.prune_target,
              f"{on_dev['speed_up']:.4f}")


# --------------------------------------------------------------------------------------------------
# h. torchrun, 1 process
# --------------------------------------------------------------------------------------------------
def ddp_worker(args: argparse.Namespace) -> None:
    """The torchrun worker of section h (hidden flag ``--ddp-worker RESULT.json``); rank 0 writes the result."""
    sizes = TINY if args.tiny else PAPER
    start = time.perf_counter()
    info: dict[str, Any] = {}
    with distributed.torchrun_session({"backend": "auto", "timeout_minutes": 5}, device=args.device) as device:
        info.update(backend=dist.get_backend(), world_size=distributed.world_size(), rank=distributed.rank(),
                    device=str(device), init_s=time.perf_counter() - start)
        # broadcasts: a tensor on the rank's device and a Python object
        value = torch.arange(8, dtype=torch.float32, device=device) * (1 + distributed.rank())
        dist.broadcast(value, src=0)
        info["broadcast_ok"] = bool(torch.equal(value.cpu(), torch.arange(8, dtype=torch.float32)))
        info["broadcast_object_ok"] = distributed.broadcast_object({"answer": 42} if distributed.rank() == 0
                                                                   else None) == {"answer": 42}
        # DDP training on a DistributedSampler shard, then evaluate
        x, y = _images(sizes.ddp_batches * sizes.batch, sizes, seed=7)
        dataset = TensorDataset(x, y)
        sampler = DistributedSampler(dataset, shuffle=True, seed=0)
        loaders = types.SimpleNamespace(
            train=DataLoader(dataset, batch_size=sizes.batch, sampler=sampler), val=None,
            test=DataLoader(dataset, batch_size=sizes.batch, sampler=DistributedSampler(dataset, shuffle=False)))
        torch.manual_seed(0)
        model = build_model(sizes.resnet, 10).to(device)
        cfg = TrainConfig(epochs=1, lr=0.05, scheduler="constant", select="last", amp=device.type == "cuda",
                          test_every_epoch=False)
        t = time.perf_counter()
        result = ddp.train(model, loaders, cfg, device, desc="ddp")
        info["ddp_train"] = {"train_loss": result.history[-1]["train_loss"], "seconds": time.perf_counter() - t}
        info["evaluate"] = evaluate(model, loaders.test, device)
        # one sharded meta-training step
        t = time.perf_counter()
        data_model = _randomize_bn(build_model(sizes.resnet, 10), 0).to(device)
        example = torch.ones(1, *sizes.input_shape, device=device)
        entry = meta_gradient.build_entry(0, data_model, example, _paper_method(), _Settings,
                                          input_shape=sizes.input_shape)
        torch.manual_seed(1)
        net = build_metanetwork(entry.codec, _metanetwork_options("resnet56", sizes.resnet_net)).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        loader = meta_train.sharded_loader(dataset, sizes.batch, 0, seed=0, rank_=distributed.rank(),
                                           world=distributed.world_size())
        step, norm = meta_gradient.accumulated_step(net, entry, list(itertools.islice(loader, 2)),
                                                    reference_batches=100, alpha=16.0, device=device, diagnostics=False)
        optimizer.step()
        info["meta_step"] = {"ce": step.ce, "reg": step.reg, "batches": step.batches, "grad_norm": norm,
                             "seconds": time.perf_counter() - t}
        info["seconds"] = time.perf_counter() - start
        if distributed.rank() == 0:
            write_json(Path(args.ddp_worker), info)


def section_h(ctx: Context, sec: Section) -> None:
    backend = "nccl" if ctx.cuda else "gloo"
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        result_path = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(Path(__file__).resolve()), "--ddp-worker", str(result_path), "--device", ctx.device.type]
        if ctx.sizes.tiny:
            cmd.append("--tiny")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx.sizes.ddp_timeout_s)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, output = None, f"timed out after {ctx.sizes.ddp_timeout_s} s: {err}"
        seconds = time.perf_counter() - start
        info = json.loads(result_path.read_text()) if result_path.exists() else {}
    sec.numbers.update(wall_s=round(seconds, 2), command="python " + " ".join(cmd[1:5])
                       + " benchmarks/gpu_check.py --ddp-worker RESULT.json --device " + ctx.device.type)
    tail = "\n".join(output.strip().splitlines()[-15:])
    ok = rc == 0 and bool(info)
    if not sec.check("torchrun --nproc_per_node=1 exited 0 and the worker wrote its result", ok,
                     f"exit code {rc}" + ("" if ok else f"; output tail:\n{tail}")):
        return
    sec.numbers.update({k: info[k] for k in ("backend", "world_size", "device", "ddp_train", "evaluate",
                                             "meta_step") if k in info},
                       worker_s=round(info.get("seconds", math.nan), 2), init_s=round(info.get("init_s", math.nan), 2))
    sec.check(f"process group on {backend}", info.get("backend") == backend, str(info.get("backend")))
    sec.check("tensor and object broadcast",
              info.get("broadcast_ok") is True and info.get("broadcast_object_ok") is True)
    sec.check("stages.ddp.train and training.loop.evaluate ran", math.isfinite(info["ddp_train"]["train_loss"])
              and 0.0 <= info["evaluate"]["acc"] <= 1.0)
    meta = info["meta_step"]
    sec.check("one sharded meta-training step (finite CE, R and gradient)",
              all(math.isfinite(meta[k]) for k in ("ce", "reg", "grad_norm")) and meta["grad_norm"] > 0,
              f"CE {meta['ce']:.4f}, R {meta['reg']:.4g}, gradient norm {meta['grad_norm']:.4g}")


# --------------------------------------------------------------------------------------------------
# i. batched data-model generation probe
# --------------------------------------------------------------------------------------------------
def _make_models(ctx: Context, k: int) -> list[nn.Module]:
    models = []
    for i in range(k):
        torch.manual_seed(100 + i)
        models.append(build_model(ctx.sizes.resnet, 10).to(ctx.device).train())
    return models


class _Batched:
    """K models of one architecture trained as one: stacked parameters and buffers, ``vmap`` over
    ``functional_call`` of a meta-device copy; BatchNorm's running statistics are stacked buffers updated in place
    per model (functional buffer tracking). One SGD over the stacked tensors = K independent SGDs."""

    def __init__(self, models: list[nn.Module], lr: float):
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=lr, momentum=0.9, weight_decay=5e-4)

        def forward(params, buffers, x):
            return functional_call(self.base, (params, buffers), (x,))

        self.forward = vmap(forward)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` [K, B, C, H, W], ``y`` [K, B]: one SGD step of every model on its own batch."""
        logits = self.forward(self.params, self.buffers, x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits


def section_i(ctx: Context, sec: Section) -> None:
    device, sizes = ctx.device, ctx.sizes
    B, lr = sizes.batch, 0.05
    # agreement: the batched forward and one batched SGD step equal plain ones (model 0)
    models = _make_models(ctx, 2)
    plain = copy.deepcopy(models[0])
    batched = _Batched(models, lr)
    x, y = _images(2 * B, sizes, seed=8)
    x, y = x.view(2, B, *sizes.input_shape).to(device), y.view(2, B).to(device)
    with _exact_float32():
        logits = batched.step(x, y).detach()
        optimizer = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        plain_logits = plain(x[0])
        F.cross_entropy(plain_logits, y[0]).backward()
        optimizer.step()
    fwd_diff = float((logits[0] - plain_logits.detach()).abs().max())
    param_diff = max(float((batched.params[k][0] - v).detach().abs().max()) for k, v in plain.named_parameters())
    buffer_diff = max(float((batched.buffers[k][0].double() - v.double()).abs().max())
                      for k, v in plain.named_buffers())
    sec.numbers.update(agreement={"logits_max_abs_diff": fwd_diff, "params_after_step_max_abs_diff": param_diff,
                                  "buffers_after_step_max_abs_diff": buffer_diff})
    sec.check("vmap forward equals the plain forward (model 0, <= 1e-4)", fwd_diff <= 1e-4, f"{fwd_diff:.3e}")
    sec.check("one batched SGD step equals the plain step, running statistics included (<= 1e-4)",
              param_diff <= 1e-4 and buffer_diff <= 1e-4, f"parameters {param_diff:.3e}, buffers {buffer_diff:.3e}")
    del models, plain, batched
    _fresh_memory(device)

    warmup, steps = 2, sizes.probe_steps
    data_x, data_y = _images(max(sizes.probe_ks) * B, sizes, seed=9)
    data_x, data_y = data_x.to(device), data_y.to(device)
    # one at a time: an ordinary model, ordinary SGD steps
    model = _make_models(ctx, 1)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(data_x[:B]), data_y[:B]).backward()
        optimizer.step()

    for _ in range(warmup):
        plain_step()
    single = steps * B / _timed(lambda: [plain_step() for _ in range(steps)], device)
    sec.numbers["one_at_a_time_images_per_s"] = round(single, 1)
    del model, optimizer
    ratios = {}
    for k in sizes.probe_ks:
        _fresh_memory(device)
        batched = _Batched(_make_models(ctx, k), lr)
        xk = data_x[:k * B].view(k, B, *sizes.input_shape)
        yk = data_y[:k * B].view(k, B)
        for _ in range(warmup):
            batched.step(xk, yk)
        seconds = _timed(lambda: [batched.step(xk, yk) for _ in range(steps)], device)
        ips = steps * k * B / seconds
        ratios[k] = ips / single
        entry = {"images_per_s": round(ips, 1), "ratio_to_one_at_a_time": round(ratios[k], 3)}
        if ctx.cuda:
            entry["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
        sec.numbers[f"K={k}"] = entry
        del batched
    best_k = max(ratios, key=ratios.get)
    verdict = ("batch" if ratios[best_k] >= BATCH_PAYS_OFF else "do not batch")
    sec.numbers["verdict"] = (f"{verdict}: best ratio {ratios[best_k]:.2f} at K={best_k} (rule: batch if >= "
                              f"{BATCH_PAYS_OFF})")
    sec.notes.append("BatchNorm: running statistics tracked functionally (stacked buffers through vmap, updated in "
                     "place per model); replace_all_batch_norm_modules_ not used. Both sides fp32, plain SGD steps "
                     f"on batches of {B}.")
    if not ctx.cuda:
        sec.notes.append("CPU timings: the ratio says nothing about the GPU")
    sec.check(f"probe ran for K = {', '.join(map(str, sizes.probe_ks))}", len(ratios) == len(sizes.probe_ks))


SECTIONS: dict[str, tuple[str, Callable[[Context, Section], None]]] = {
    "a": ("codec round trip on the device (ResNet-56, VGG-19, channels_last)", section_a),
    "b": ("VGG-19 graph, 8 x 32 metanetwork: forward + backward time and peak memory", section_b),
    "c": ("ResNet-56, 8 x 64 metanetwork: device vs CPU, fused vs unfused, checkpointing", section_c),
    "d": ("deterministic mode: meta-training and training steps, two runs bitwise equal", section_d),
    "e": ("meta_gradient at paper size: device vs CPU, host synchronisations", section_e),
    "f": ("training throughput: fp32, amp, amp + channels_last, amp + sparse learning", section_f),
    "g": ("prune_to_speed_up: device vs CPU (ResNet-56, target 2.3)", section_g),
    "h": ("torchrun, 1 process: broadcast, ddp.train, evaluate, sharded meta-training step", section_h),
    "i": ("probe: K ResNet-56s trained at once (torch.func vmap) vs one at a time", section_i),
}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:  # noqa: BLE001 - a build without NCCL: section h then fails with its own message
        return None


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
                   "count": torch.cuda.device_count() if cuda else 0,
                   "memory_gb": round(props.total_memory / 1e9, 1) if cuda else None,
                   "capability": f"{props.major}.{props.minor}" if cuda else None},
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                     "python": platform.python_version(), "torch_geometric": _version("torch_geometric"),
                     "torch_pruning": _version("torch-pruning"), "nccl": _nccl_version() if cuda else None},
        "backend_flags": {"cudnn.benchmark": torch.backends.cudnn.benchmark,
                          "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32},
    }


def _flatten(numbers: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in numbers.items():
        name = f"{prefix}{key}"
        flat = isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values())
        if flat and value and len(value) <= 6:
            rows.append((name, ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())))
        elif isinstance(value, dict):
            rows += _flatten(value, name + ".") if value else [(name, "none")]
        elif isinstance(value, list):
            rows.append((name, "; ".join(map(str, value)) if value else "none"))
        else:
            rows.append((name, _fmt(value)))
    return rows


def _describe_sizes(sizes: dict) -> str:
    vgg = "VGG-19" if sizes["vgg_widths"] is None else f"VGG-19 of width {sizes['vgg_widths'][0]}"
    kind = "tiny (--tiny): ResNet-56 stands for " + sizes["resnet"] if sizes["tiny"] else "paper"
    return (f"{kind}; {vgg}; metanetworks {sizes['resnet_net'][0]} x {sizes['resnet_net'][1]} (ResNet) and "
            f"{sizes['vgg_net'][0]} x {sizes['vgg_net'][1]} (VGG); {sizes['image']}x{sizes['image']} inputs, batch "
            f"{sizes['batch']}")


def markdown(report: dict) -> str:
    env, sizes = report["environment"], report["sizes"]
    dev = env["device"]
    lines = ["# GPU acceptance check (`benchmarks/gpu_check.py`)", ""]
    if dev["type"] != "cuda":
        lines += ["**This is a CPU run (`--device cpu`): it is NOT the GPU acceptance. Checks that need CUDA read "
                  "'cpu: not measured'.**", ""]
    v = env["versions"]
    lines += [
        f"- date: {env['date']}; host `{env['host']}` ({env['cpu_cores']} CPU cores, {env['torch_threads']} torch "
        "threads)",
        f"- device: {dev['type']} — {dev['name']}" + (f" ({dev['memory_gb']} GB, compute capability "
                                                      f"{dev['capability']})" if dev["type"] == "cuda" else ""),
        f"- versions: torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v['nccl']}, PyG "
        f"{v['torch_geometric']}, torch-pruning {v['torch_pruning']}, Python {v['python']}",
        f"- backend flags at start: " + ", ".join(f"{k}={val}" for k, val in env["backend_flags"].items()),
        f"- sizes: {_describe_sizes(sizes)}; command: `{report['command']}`",
        f"- result: **{'PASS' if report['passed'] else 'FAIL'}**; total {report['total_seconds']:.1f} s (budget "
        f"{BUDGET_S} s on one H100)",
        "",
        "| section | what | result | seconds |",
        "|---|---|---|---:|",
    ]
    for s in report["sections"]:
        lines.append(f"| {s['key']} | {s['title']} | {s['status'].upper()} | {s['seconds']:.1f} |")
    for s in report["sections"]:
        lines += ["", f"## {s['key']}. {s['title']} — {s['status'].upper()} ({s['seconds']:.1f} s)", ""]
        if s["checks"]:
            lines += ["| check | result | detail |", "|---|---|---|"]
            for c in s["checks"]:
                shown = SHOWN[c["status"]] + (f": {c['detail']}" if c["status"] == NOT_APPLICABLE else "")
                detail = "" if c["status"] == NOT_APPLICABLE else c["detail"]
                lines.append(f"| {c['name']} | {shown} | {detail.replace('|', '/').replace(chr(10), ' ')} |")
            lines.append("")
        for name, value in _flatten(s["numbers"]):
            lines.append(f"- {name}: {value}")
        for note in s["notes"]:
            lines.append(f"- note: {note}")
        if s["error"]:
            lines += ["", "```", s["error"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def run_section(key: str, ctx: Context) -> Section:
    title, fn = SECTIONS[key]
    sec = Section(key, title)
    print(f"[gpu_check] {key}: {title} ...", flush=True)
    _fresh_memory(ctx.device)
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        fn(ctx, sec)
    except Exception:  # noqa: BLE001 - recorded; the other sections still run
        sec.error = traceback.format_exc()
    sec.seconds = time.perf_counter() - start
    failed = [c["name"] for c in sec.checks if c["status"] == FAIL]
    why = " (exception: " + sec.error.strip().splitlines()[-1] + ")" if sec.error else ""
    print(f"[gpu_check] {key}: {sec.status.upper()} in {sec.seconds:.1f} s"
          + (f"; failed: {failed}" if failed else "") + why, flush=True)
    return sec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and data (CPU tests)")
    parser.add_argument("--sections", default=",".join(SECTION_KEYS), help="comma-separated subset of a..i")
    parser.add_argument("--out", default=None, help="folder for report.md / gpu_check.json (default: benchmarks/results/gpu_check "
                        "on CUDA, a fresh temporary folder on the CPU)")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.section_list = [s.strip().lower() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.section_list if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTION_KEYS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available here; run with --device cpu --tiny on a CPU")
    # what every run does before any CUDA work (stages.common.setup): the cuBLAS workspace setting (section d's
    # deterministic mode needs it from the outset), cudnn.benchmark and TF32, so the timings are a real run's
    configure_cuda(deterministic=False)
    sizes = TINY if args.tiny else PAPER
    out = Path(args.out) if args.out else (RESULTS if device.type == "cuda"
                                           else Path(tempfile.mkdtemp(prefix="gpu_check_cpu_")))
    env = environment(device)
    ctx = Context(device=device, sizes=sizes, method=_paper_method(),
                  resnet_options=_metanetwork_options("resnet56", sizes.resnet_net),
                  vgg_options=_metanetwork_options("vgg19", sizes.vgg_net))
    print(f"[gpu_check] {env['device']['name']} ({device.type}), torch {torch.__version__}, "
          f"{'tiny' if sizes.tiny else 'paper'} sizes, sections {','.join(args.section_list)}", flush=True)
    start = time.perf_counter()
    sections = [run_section(key, ctx) for key in args.section_list]
    total = time.perf_counter() - start
    report = {
        "environment": env,
        "sizes": {k: getattr(sizes, k) for k in sizes.__dataclass_fields__},
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "sections": [s.to_json() for s in sections],
        "passed": all(s.status == PASS for s in sections),
        "total_seconds": round(total, 2),
        "budget_seconds": BUDGET_S,
        "within_budget": total <= BUDGET_S,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report)
    atomic_write(out / "report.md", markdown(report))
    print(f"[gpu_check] {'PASS' if report['passed'] else 'FAIL'} in {total:.1f} s; wrote {out / 'report.md'} and "
          f"{out / 'gpu_check.json'}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
