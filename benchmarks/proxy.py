"""Proxy benchmark: does the metanetwork make pruning better than DepGraph, with and without sparse learning?

One command runs the whole comparison on a task this machine has data for (default: the CPU-sized
``resnet20_on_FashionMNIST``, see its task file for the sizing), every stage through the project's own
run modes, each in its own folder under ``--out``::

    generate      N data models (the first task.meta_train.train_split meta-train, the rest validate)
    meta_train    the metanetwork, one checkpoint per epoch (diagnostics in meta_train_metrics.csv / .png)
    select        every checkpoint scored on the VALIDATION data models (validation images only), next to
                  the control (same fine-tune, no metanetwork) and DepGraph sparse learning at each
                  select.sparse_learning_regs strength; picks the checkpoint and the sparse-learning strength
    final/seed<s>/pretrain        a model trained from scratch, init-pruned and fine-tuned: the start every
                                  method of that seed shares (pretrain_final with final.init_prune=true)
    final/seed<s>/<method>        pruning_final at every target from that start (targets share everything
                                  before the final pruning), for the methods:
        metanetwork      apply the selected metanetwork, after_metanetwork fine-tune, prune, fine-tune
        control          the same fine-tune without metanetwork (equal budget), prune, fine-tune
        sparse_learning  the same budget with DepGraph's regulariser (strength chosen in select), prune, fine-tune
        depgraph         prune right away (group-L2, the reference baseline), fine-tune
        random           prune right away with random channel importance, fine-tune
        transfer         (with --transfer) a metanetwork trained elsewhere, used like `metanetwork`
    report        benchmarks/results/proxy/ (``--results``): report.md, generated from report.json (every number
                  it shows, saved beside it), figures/accuracy.png (test accuracy vs speed-up per method),
                  figures/selection.png (the selection curves), figures/meta_train.png (meta-training
                  diagnostics); ablation.json holds the --ablation rows; reading.md, the hand-written reading, is
                  linked from the report when it exists (never generated)

A stage whose results.json exists is skipped, so re-running the same command resumes after a crash or a
session end (the running stage is lost, nothing else) and rewrites the report from the working folder. Everything
chosen is chosen on validation data; test accuracy is only reported. The report's paired table gives, per
baseline and target, the mean per-seed difference, its standard error, the paired t and p, a 95 % confidence
interval and the smallest detectable effect (2.8 x SE: 80 % power at alpha 0.05, two-sided).

Usage::

    python benchmarks/proxy.py                                    # the full benchmark (see docs/proxy.md for time)
    python benchmarks/proxy.py --out runs/proxy task.meta_train.epochs=30   # any Hydra override at the end
    python benchmarks/proxy.py --transfer outputs/.../select      # add a transferred metanetwork
    python benchmarks/proxy.py --ablation lr3e-4 task.meta_train.lr=3e-4   # meta_train + select only, on the
                                                                  # benchmark's store; a row of ablation.json
    python benchmarks/proxy.py --variant capped method.max_pruning_ratio=0.9   # the final runs again with the
                      # overrides, from the same starts, metanetwork and sparse-learning strength: the report
                      # goes to benchmarks/results/proxy/variants/capped/ (report.md, report.json, figures/)
    python benchmarks/proxy.py --variant ft --select runs/proxy/ablation/ft/select   # the finals with another
                      # selection (an ablation row's choice of checkpoint and sparse-learning strength)
    python benchmarks/proxy.py --report-only [--variant NAME]     # run nothing: report.md again from report.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402
from termcolor import colored  # noqa: E402

from stages.pipeline import generate_stage, run_stage  # noqa: E402
from stages.report import find_results, mean_std  # noqa: E402
from utils.device import cpu_name  # noqa: E402
from utils.io import atomic_write, write_json  # noqa: E402

log = logging.getLogger("proxy")

METHODS = ("metanetwork", "control", "sparse_learning", "depgraph", "random")
LABELS = {
    "metanetwork": "Meta-pruning (metanetwork)",
    "control": "DepGraph + equal-budget fine-tune (control)",
    "sparse_learning": "DepGraph + sparse learning",
    "depgraph": "DepGraph (no sparse learning)",
    "random": "Random pruning",
    "transfer": "Meta-pruning, transferred metanetwork",
}
DEFAULT_SPARSE_REGS = [5e-4, 5e-3, 5e-2]
# overrides that cannot change a baseline's final run (no baseline reads meta-training, the metanetwork or selection;
# every final run sets its own seed): a --variant may pair its metanetwork runs with the benchmark's own baselines
# (--reuse-baselines) when every other override has the value those baselines ran with
REUSE_SAFE_PREFIXES = ("task.meta_train.", "metanetwork.", "select.", "task.select.")
REUSE_SAFE_KEYS = ("seed",)
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "proxy"
ABLATION = "ablation.json"  # the ablation rows, in the benchmark's results folder
# the per-layer cap's method keys, which the random stage (its own method section) takes from the configured method
LAYER_CAP_KEYS = ("max_pruning_ratio", "hard_cap")


def compose_config(task: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("main", overrides=[f"task={task}", *overrides])


def method_config(name: str) -> DictConfig:
    return OmegaConf.load(ROOT / "configs" / "method" / f"{name}.yaml")


class Timings:
    """Wall time per stage, kept in ``<out>/timings.json`` across resumed invocations."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, done: Path, fn, *args, **kwargs):
        started = time.time()
        fresh = not done.exists()
        result = fn(*args, **kwargs)
        if fresh:
            self.values[name] = round(time.time() - started, 1)
            write_json(self.path, self.values)
        return result


def _final_overrides(method: str, start_model: Path, targets: list[float], select_dir: Path,
                     sparse_reg: float | None, transfer: str | None) -> dict:
    updates = {"final.model": str(start_model), "final.target_speed_up": targets, "final.metanetwork": None}
    if method == "metanetwork":
        updates["final.metanetwork"] = str(select_dir)
    elif method == "transfer":
        updates["final.metanetwork"] = transfer
    elif method == "control":
        updates["final.finetune_without_metanetwork"] = True
    elif method == "sparse_learning":
        updates["final.sparse_learning.enabled"] = True
        updates["final.sparse_learning.reg"] = sparse_reg
    return updates


def _run_methods(cfg: DictConfig, timings: Timings, final_root: Path, seed: int, start_model: Path, methods: list[str],
                 targets: list[float], select_dir: Path, sparse_reg: float, transfer: str | None) -> None:
    """Every method's pruning_final at every target from one seed's start, into ``final_root/seed<s>/<method>``."""
    for method in methods + (["transfer"] if transfer else []):
        stage_cfg = cfg
        if method == "random":
            stage_cfg = cfg.copy()
            with open_dict(stage_cfg):
                # the random importance, with the configured per-layer cap (random.yaml's defaults where unset)
                cap = {key: cfg.method[key] for key in LAYER_CAP_KEYS if key in cfg.method}
                stage_cfg.method = OmegaConf.merge(method_config("random"), cap)
        updates = _final_overrides(method, start_model, targets, select_dir, sparse_reg, transfer)
        timings.run(f"seed {seed}: {method}", final_root / f"seed{seed}" / method / "results.json", run_stage,
                    f"{method} (seed {seed})", "pruning_final", stage_cfg, final_root / f"seed{seed}" / method,
                    **{"seed": seed, **updates})


def run_variant(cfg: DictConfig, out: Path, name: str, seeds: list[int], targets: list[float], transfer: str | None,
                methods: list[str], select_dir: Path | None = None) -> tuple[Path, dict]:
    """The final runs again with ``cfg``'s overrides, into ``<out>/variants/<name>/final``: the same per-seed starts,
    selected metanetwork and sparse-learning strength as the benchmark's own finals (or those of ``select_dir``, a
    select run dir such as an ablation row's), so the two are paired."""
    select_dir = select_dir or out / "select"
    select_file = select_dir / "selection.json"
    if not select_file.exists():
        raise SystemExit(f"--variant needs a finished selection at {select_file}: run the benchmark (or the "
                         "ablation row named by --select) first")
    starts = {seed: out / "final" / f"seed{seed}" / "pretrain" / "init_pruned_model.pt" for seed in seeds}
    missing = [str(path) for path in starts.values() if not path.exists()]
    if missing:
        raise SystemExit(f"--variant needs each seed's start from the benchmark; missing: {', '.join(missing)}")
    folder = out / "variants" / name
    timings = Timings(folder / "timings.json")
    sparse_reg = json.loads(select_file.read_text()).get("best_sparse_reg") or float(cfg.final.sparse_learning.reg)
    print(colored(f"proxy benchmark variant {name}: the finals of seeds {seeds} -> {folder}", "cyan"))
    for seed, start in starts.items():
        _run_methods(cfg, timings, folder / "final", seed, start, methods, targets, select_dir, sparse_reg,
                     transfer)
    return folder / "final", timings.values


def run_benchmark(cfg: DictConfig, out: Path, seeds: list[int], targets: list[float], transfer: str | None,
                  methods: list[str], generate_seed: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    store = out / "store"
    stages = ["generate", "meta_train", "select"] + [f"seed {s}" for s in seeds] + ["report"]
    print(colored(f"proxy benchmark on {cfg.task.name}: stages {', '.join(stages)} -> {out}", "cyan"))

    # the data models come from one generation seed (generate_dataset/generate.py's default), whatever the seeds
    # of the final runs are
    generation = OmegaConf.merge(cfg, {"seed": generate_seed})
    timings.run("generate", out / "generate" / "results.json", generate_stage, generation, store, out / "generate")
    timings.run("meta_train", out / "meta_train" / "results.json", run_stage, "meta_train", "meta_train", cfg,
                out / "meta_train", store=str(store))
    selection = timings.run("select", out / "select" / "results.json", run_stage, "select", "select", cfg,
                            out / "select", store=str(store), **{"select.meta_train_dir": str(out / "meta_train")})
    sparse_reg = selection.get("best_sparse_reg") or float(cfg.final.sparse_learning.reg)

    for seed in seeds:
        seed_dir = out / "final" / f"seed{seed}"
        pretrain = seed_dir / "pretrain"
        timings.run(f"seed {seed}: pretrain + init prune", pretrain / "results.json", run_stage,
                    f"pretrain (seed {seed})", "pretrain_final", cfg, pretrain,
                    **{"seed": seed, "final.init_prune": True})
        _run_methods(cfg, timings, out / "final", seed, pretrain / "init_pruned_model.pt", methods, targets,
                     out / "select", sparse_reg, transfer)
    return timings.values


# ----------------------------------------------------------------------------------------------
# Report: gathered from the working folder into report.json, rendered from that file
# ----------------------------------------------------------------------------------------------
REPORT_DATA = "report.json"  # every number the report shows: `--report-only` rebuilds report.md from it
READING = "reading.md"  # the hand-written reading of a result, kept beside its report and linked from it
FIGURES = "figures"
# the figures a report can show: (key, file in figures/, alt text); "accuracy" is drawn from the runs
FIGURE_FILES = {"accuracy": "accuracy.png", "selection": "selection.png", "meta_train": "meta_train.png"}
SELECTION_KEYS = ("epoch", "score", "score_kind", "origin_score", "control_score", "gain_over_control",
                  "sparse_learning_scores", "best_sparse_reg", "gain_over_sparse_learning",
                  "sparse_learning_unpruned_acc", "control_unpruned_acc", "max_accuracy_drop", "accuracy_floor",
                  "validation_models")
# smallest detectable effect: (z_{1-alpha/2} + z_{power}) x SE = (1.960 + 0.842) x SE for alpha = 0.05 two-sided
# and 80 % power (normal approximation of the paired t-test)
MDE_FACTOR = 2.8


def _just_pruned_acc(result: dict) -> float | None:
    return next((stage["test_acc"] for stage in result.get("stages", []) if stage["stage"] == "pruned"), None)


def run_record(method: str, result: dict) -> dict:
    """What the report needs of one final run's ``results.json``."""
    return {"method": method, "seed": result["seed"], "target": round(float(result["target_speed_up"]), 4),
            "speed_up": result["speed_up"], "pruned_acc": result["pruned_acc"],
            "pruned_val_acc": result["pruned_val_acc"], "pre_pruning_acc": result["pre_pruning_acc"],
            "just_pruned_acc": _just_pruned_acc(result), "widths": (result.get("model") or {}).get("widths")}


def collect(final_root: Path) -> list[dict]:
    """One :func:`run_record` per final run under ``<final_root>/seed*/<method>/target_*x``."""
    results, _skipped = find_results(final_root)
    records = []
    for result in results:
        parts = Path(result["_path"]).parts
        method = parts[-3] if "target_" in parts[-2] else parts[-2]
        records.append(run_record(method, result))
    return sorted(records, key=lambda r: (r["method"], r["seed"], r["target"]))


def by_method(records: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """method -> target -> records (one per seed)."""
    table: dict[str, dict[float, list[dict]]] = {}
    for record in records:
        table.setdefault(record["method"], {}).setdefault(round(float(record["target"]), 4), []).append(record)
    return table


def _stat(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _hardware() -> str:
    cpu = cpu_name()
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} on CPU with {threads} threads"


def plot_results(table: dict, path: Path, title: str) -> Path:
    # lazily: matplotlib costs about a second at import and only the report needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for method in [m for m in (*METHODS, "transfer") if m in table]:
        targets = sorted(table[method])
        means, stds = [], []
        for t in targets:
            values = [100 * r["pruned_acc"] for r in table[method][t]]
            mean, std = mean_std(values)
            means.append(mean)
            stds.append(std or 0.0)
        ax.errorbar(targets, means, yerr=stds, marker="o", capsize=4, label=LABELS[method],
                    linestyle="-" if method in ("metanetwork", "transfer") else "--")
    ax.set_xlabel("MACs speed-up (target)")
    ax.set_ylabel("test accuracy after fine-tune (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _reused_runs(final_root: Path, methods: list[str] | None, seeds: list[int], targets: list[float]) -> list[dict]:
    """The benchmark's own final runs of ``methods`` at ``seeds`` and ``targets`` (``--reuse-baselines``)."""
    if not methods:
        return []
    wanted = {round(float(t), 4) for t in targets}
    runs = [r for r in collect(final_root) if r["method"] in methods and r["seed"] in seeds and r["target"] in wanted]
    methods = sorted({r["method"] for r in runs})  # the baselines the benchmark ran
    missing = sorted({(m, s) for m in methods for s in seeds} - {(r["method"], r["seed"]) for r in runs})
    if missing:
        raise SystemExit("--reuse-baselines: the benchmark has no finals for "
                         + ", ".join(f"{m} (seed {s})" for m, s in missing) + f" under {final_root}")
    return runs


def _budget_lines(cfg: DictConfig, seeds: list[int], targets: list[float], meta: dict, select: dict,
                  benchmark_selection: bool = False) -> list[str]:
    """The setup lines of a report; ``benchmark_selection``: a variant that reuses the benchmark's selection, which
    was made with the benchmark's settings, not the variant's overrides."""
    task, ft = cfg.task, cfg.task.finetune
    mt = task.meta_train
    steps = (meta.get("epochs") or 0) * len(meta.get("train_data_models") or [])
    selection = (
        "- Selection: the benchmark's own, made with its settings (its report says how), not with this variant's "
        "overrides." if benchmark_selection else
        f"- Selection: checkpoints scored by `{select.get('score_kind')}` "
        + (f"(mean validation accuracy after pruning to {', '.join(f'{t}x' for t in select['ranking'][0]['finetuned'])}"
           " and the after-pruning fine-tune)" if select.get("score_kind") == "finetuned" else
           f"of validation accuracy (no fine-tune after pruning) up to {cfg.select.max_speed_up}x")
        + f" on the validation data model(s) {select.get('validation_models')}, after the "
        f"{ft.after_metanetwork.epochs}-epoch after_metanetwork fine-tune.")
    return [
        f"- Task `{task.name}`: {task.model}, dataset {task.dataset.name} at {list(task.input_size)} "
        f"(training subset: {task.dataset.get('train_size') or 'all'} images; validation: "
        f"{task.dataset.val_size}{' of the' if isinstance(task.dataset.val_size, float) else ''} training images, "
        "carved from the training set; full test set).",
        f"- Data models: {len(meta.get('train_data_models') or [])} for meta-training, "
        f"{len(meta.get('val_data_models') or [])} for selection; each trained {task.train.epochs} epochs, "
        f"init-pruned to {task.initial_speed_up}x, fine-tuned {ft.after_init_pruning.epochs} epochs.",
        f"- Meta-training: {meta.get('epochs')} epochs = {steps} optimiser steps (AdamW lr {mt.lr}, milestones "
        f"{list(mt.milestones)}), pruner_reg {mt.pruner_reg}, alpha {mt.alpha}, reference_batches "
        f"{mt.reference_batches}, {mt.batches_per_step or 'all'} batches of {mt.batch_size or task.batch_size} "
        "images per step; metanetwork "
        f"{OmegaConf.to_container(cfg.metanetwork)}.",
        selection,
        f"- Final runs, per seed ({', '.join(map(str, seeds))}) from one shared start (trained "
        f"{task.train.epochs} epochs, init-pruned, fine-tuned {ft.after_init_pruning.epochs}): metanetwork, "
        f"control and sparse learning get {ft.after_metanetwork.epochs} epochs before pruning, DepGraph and "
        f"random 0; every method gets {ft.after_pruning.epochs} epochs after pruning, epoch selected on "
        f"validation. Targets: {', '.join(f'{t:g}x' for t in targets)} (total MACs speed-up vs the unpruned "
        "network).",
    ]


def _shown_path(path: Path, out: Path) -> str:
    """``path`` as ``<out>/...`` when it lies in the working folder (no machine's absolute paths in a report)."""
    try:
        return str(Path("<out>") / path.resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _figure(results_dir: Path, bench_dir: Path, key: str, source: Path, own: bool) -> str | None:
    """The link (relative to ``results_dir``) of figure ``key``: ``source`` copied into ``results_dir/figures``
    when the report has its own (``own``), else the benchmark's copy in ``bench_dir/figures``, if there is one."""
    if own:
        if not source.exists():
            return None
        target = results_dir / FIGURES / FIGURE_FILES[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return f"{FIGURES}/{FIGURE_FILES[key]}"
    shared = bench_dir / FIGURES / FIGURE_FILES[key]
    return Path(os.path.relpath(shared, results_dir)).as_posix() if shared.exists() else None


def gather_report(cfg: DictConfig, out: Path, results_dir: Path, seeds: list[int], targets: list[float],
                  timings: dict, final_root: Path | None = None, variant: list[str] | None = None,
                  select_dir: Path | None = None, bench_dir: Path | None = None, command: str = "",
                  reused: list[str] | None = None) -> dict:
    """Everything the report of the finals under ``final_root`` (default ``<out>/final``) shows, as one JSON-able
    dict; copies the selection and meta-training figures into ``<results_dir>/figures``. ``variant``: the overrides
    a ``--variant`` run gave its finals; such a report links the benchmark's (``bench_dir``'s) selection and
    meta-training figures instead of copying its own, unless ``select_dir`` (default ``<out>/select``) names
    another selection: then its own. ``reused``: methods whose runs come from the benchmark's own finals
    (``<out>/final``, same seeds and targets) rather than from ``final_root`` (``--reuse-baselines``)."""
    own_selection = select_dir is not None and select_dir.resolve() != (out / "select").resolve()
    select_dir = select_dir or out / "select"
    bench_dir = bench_dir or results_dir
    select = json.loads((select_dir / "selection.json").read_text())
    # another selection reports the meta-training it chose from; the benchmark's own stays <out>/meta_train, so
    # that a moved working folder still reports
    meta_dir = out / "meta_train"
    if own_selection and select.get("meta_train_dir") and Path(select["meta_train_dir"]).is_dir():
        meta_dir = Path(select["meta_train_dir"])
    meta = json.loads((meta_dir / "results.json").read_text())
    cap = cfg.method.get("max_pruning_ratio")
    own = variant is None or own_selection
    diag = meta_dir / "meta_train_diagnostics.png"
    shared_diag = bench_dir / FIGURES / FIGURE_FILES["meta_train"]
    # another selection of the same meta-training (a copy in an ablation row) shows the benchmark's plot
    own_diag = own and not (variant is not None and diag.exists() and shared_diag.exists()
                            and shared_diag.read_bytes() == diag.read_bytes())
    reused_runs = _reused_runs(out / "final", reused, seeds, targets)
    return {
        "task": cfg.task.name,
        "command": command,
        "generated": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "hardware": _hardware(),
        "variant": None if variant is None else {
            "overrides": list(variant),
            "select": _shown_path(select_dir, out) if own_selection else None,
            "reused": sorted({r["method"] for r in reused_runs})},
        "setup": _budget_lines(cfg, seeds, targets, meta, select, benchmark_selection=not own),
        "cap": None if cap is None else {"ratio": cap, "hard": bool(cfg.method.get("hard_cap"))},
        "seeds": list(seeds),
        "targets": list(targets),
        "runs": collect(final_root or out / "final") + reused_runs,
        "selection": {key: select.get(key) for key in SELECTION_KEYS} | {
            "ranking": [{key: r.get(key) for key in ("epoch", "score", "unpruned_acc", "eligible")}
                        for r in select["ranking"]]},
        "figures": {"selection": _figure(results_dir, bench_dir, "selection", select_dir / "curves.png", own),
                    "meta_train": _figure(results_dir, bench_dir, "meta_train", diag, own_diag)},
        "timings": dict(timings),
    }


def write_report(cfg: DictConfig, out: Path, results_dir: Path, seeds: list[int], targets: list[float],
                 timings: dict, **kwargs) -> Path:
    """``<results_dir>/report.json`` (see :func:`gather_report` for ``kwargs``) and the report rendered from it."""
    results_dir.mkdir(parents=True, exist_ok=True)
    data = gather_report(cfg, out, results_dir, seeds, targets, timings, **kwargs)
    write_json(results_dir / REPORT_DATA, data)
    return render_report(data, results_dir)


def rebuild_report(results_dir: Path) -> Path:
    """``--report-only``: ``<results_dir>/report.md`` and its accuracy figure again from ``report.json``; nothing
    is run, the working folder is not read."""
    path = results_dir / REPORT_DATA
    if not path.exists():
        raise SystemExit(f"--report-only needs {path}: proxy.py saves it with every report it writes; a report "
                         "older than that has none and is regenerated only by running its command again")
    data = json.loads(path.read_text())
    data["rebuilt"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    return render_report(data, results_dir)


def render_report(data: dict, results_dir: Path) -> Path:
    """``<results_dir>/report.md`` (and ``figures/accuracy.png``) from :func:`gather_report`'s dict."""
    table, targets, variant = by_method(data["runs"]), data["targets"], data.get("variant")
    lines = [f"# Proxy benchmark: {data['task']}" + (" (variant of the finals)" if variant is not None else ""), "",
             f"Generated by `{shown_command(data.get('command') or 'python benchmarks/proxy.py')}` on {data['generated']}"
             + (f" (this file re-rendered from `{REPORT_DATA}` by `--report-only` on {data['rebuilt']})"
                if data.get("rebuilt") else "")
             + f". Hardware: {data['hardware']}. The numbers are kept in [`{REPORT_DATA}`]({REPORT_DATA}).", ""]
    if (results_dir / READING).exists():
        lines += [f"**The reading of these numbers** (written by hand, not generated): [{READING}]({READING}).", ""]
    if variant is not None:
        base = Path(os.path.relpath(results_dir.parent.parent / "report.md", results_dir)).as_posix()
        overrides = " ".join(variant["overrides"])
        if variant.get("select"):
            lines += [f"A variant of [the benchmark's report]({base}): every final run again with "
                      f"`{overrides or 'no overrides'}`, from the same per-seed starts, with the metanetwork "
                      f"checkpoint and sparse-learning strength chosen by the selection in `{variant['select']}` "
                      "(below) instead of the benchmark's; data models are the benchmark's.", ""]
        else:
            lines += [f"A variant of [the benchmark's report]({base}): every final run again with `{overrides}`, "
                      "from the same per-seed starts, with the same selected metanetwork and sparse-learning strength "
                      "(so each seed's runs pair with the benchmark's own); data models, meta-training and selection "
                      "are the benchmark's.", ""]
        if variant.get("reused"):
            reused = ", ".join(LABELS.get(m, m) for m in variant["reused"])
            lines += [f"Runs not repeated here: {reused} are the benchmark's own finals (same seeds, starts and "
                      "targets; `--reuse-baselines`), since the overrides touch only meta-training, the metanetwork "
                      "and selection, which those runs do not read.", ""]
    lines += ["## Setup and budgets", "", *data["setup"]]
    lines += ["", "## Test accuracy after pruning and fine-tune (mean ± std over seeds, %)", ""]
    lines += _method_table(table, targets, lambda r: r["pruned_acc"])
    lines += ["", "Achieved speed-ups (mean): " + "; ".join(
        f"{t:g}x -> {statistics.fmean(r['speed_up'] for m in table.values() for r in m.get(round(t, 4), [])):.3f}x"
        for t in targets if any(round(t, 4) in m for m in table.values())) + ".", ""]
    lines += ["Validation accuracy of the same runs (what a user may select on):", ""]
    lines += _method_table(table, targets, lambda r: r["pruned_val_acc"])
    lines += ["", "Prunability itself: test accuracy right after pruning, BEFORE the after-pruning fine-tune (first "
              "column: just before pruning, after each method's pre-pruning training):", ""]
    lines += _method_table(table, targets, lambda r: r["just_pruned_acc"], before=lambda r: r["pre_pruning_acc"])
    cap = data.get("cap")
    cap_text = ("null: no cap, the reference" if cap is None
                else f"{cap['ratio']}, {'hard: no step passes it' if cap['hard'] else 'soft'}")
    lines += ["", f"Collapsed layers: how many entries of the pruned network's widths (`results.json` `model.widths`, "
              f"one per prunable layer) keep at most {NARROW_CHANNELS} channels. Global ranking can cut a layer, or "
              "a whole residual stage, to one channel; `method.max_pruning_ratio` caps that, softly unless "
              f"`method.hard_cap=true` (here {cap_text}):", ""]
    lines += _method_table(table, targets, _narrow_layers, scale=1, digits=1)
    lines += ["", "## Paired differences (test accuracy, points)", "", PAIRED_EXPLANATION, ""]
    lines += _paired_table(table, targets)
    lines += ["", _goals(table, targets), ""]
    lines += ["Paired differences before pruning (after each method's pre-pruning training) and right after pruning, "
              "before the after-pruning fine-tune (test accuracy, points; the same conventions): what the "
              "pre-pruning training costs, and prunability itself.", ""]
    lines += _paired_table(table, targets, key="pre_pruning_acc") + \
        _paired_table(table, targets, key="just_pruned_acc")[len(PAIRED_HEADER):]
    lines += [""]

    plot = plot_results(table, results_dir / FIGURES / FIGURE_FILES["accuracy"],
                        f"{data['task']}: accuracy vs speed-up (test)")
    lines += [f"![accuracy vs speed-up]({FIGURES}/{plot.name})", ""]
    select = data["selection"]
    lines += ["## Selection (validation data models, validation images)", ""]

    def num(value, sign=""):
        return "-" if value is None else f"{value:{sign}.4f}"

    sparse_scores = ", ".join(f"reg {reg}: {num(v)}" for reg, v in (select.get("sparse_learning_scores") or {}).items())
    lines += [f"- chosen checkpoint: epoch {select['epoch']} with {select['score_kind']} {select['score']:.4f}",
              f"- control (same fine-tune, no metanetwork): {num(select.get('control_score'))}; gain of the chosen "
              f"checkpoint {num(select.get('gain_over_control'), '+')}",
              f"- DepGraph sparse learning (same fine-tune + regulariser): {sparse_scores or '-'}; chosen reg "
              f"{select.get('best_sparse_reg')}; gain of the chosen checkpoint over it "
              f"{num(select.get('gain_over_sparse_learning'), '+')}",
              f"- untouched data model (no fine-tune): {num(select.get('origin_score'))}", ""]
    if select.get("accuracy_floor") is not None:
        lines += [f"- accuracy-aware choice (`select.max_accuracy_drop={select['max_accuracy_drop']:g}`): candidates "
                  f"must keep an unpruned validation accuracy of at least {select['accuracy_floor']:.4f} (control "
                  f"{select['control_unpruned_acc']:.4f}); sparse-learning unpruned accuracy: " + ", ".join(
                      f"reg {reg}: {acc:.4f}" for reg, acc in (select.get("sparse_learning_unpruned_acc") or {}).items()),
                  ""]
    lines += ["| checkpoint | score | unpruned accuracy | eligible |", "|---|---|---|---|"]
    lines += [f"| epoch {r['epoch']} | {r['score']:.4f} | {num(r.get('unpruned_acc'))} | {r.get('eligible', '-')} |"
              for r in sorted(select["ranking"], key=lambda r: r["epoch"])]
    figures = data.get("figures") or {}
    for key, alt in (("selection", "selection curves"), ("meta_train", "meta-training diagnostics")):
        if figures.get(key):
            lines += ["", f"![{alt}]({figures[key]})"]
    ablation = results_dir / ABLATION
    if ablation.exists():
        lines += ["", "## Ablation of meta-training settings (validation only)", "",
                  f"From [`{ABLATION}`]({ABLATION}). Each row: meta_train + select on this benchmark's store with the "
                  "overrides shown; score = the row's "
                  "`select.score` (auc unless the overrides say otherwise; finetuned = mean validation accuracy after "
                  "pruning and the after-pruning fine-tune) on the validation data model(s) of the checkpoint chosen as "
                  "`run=select` chooses (with select.max_accuracy_drop when set: eligible = it keeps the unpruned "
                  "accuracy). Gain = chosen checkpoint - control, in the same score.", "",
                  "| name | overrides | chosen epoch | score | kind | unpruned acc. | eligible | control | gain | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in json.loads(ablation.read_text()):
            lines.append(f"| {row['name']} | `{' '.join(row['overrides'])}` | {row['epoch']} | {row['score']:.4f} | "
                         f"{row.get('score_kind', 'auc')} | "
                         f"{num(row.get('unpruned_acc'))} | {row.get('eligible', '-')} | {row['control_score']:.4f} | "
                         f"{row['gain_over_control']:+.4f} | {row['seconds']:.0f} |")
    timings = data.get("timings") or {}
    lines += ["", "## Wall time per stage (seconds)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [f"| total | {sum(timings.values()):.0f} |", ""]
    path = results_dir / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path


NARROW_CHANNELS = 2  # a layer left with this many channels or fewer counts as collapsed


def _narrow_layers(record: dict) -> int | None:
    widths = record.get("widths")
    return None if widths is None else sum(1 for w in widths if w <= NARROW_CHANNELS)


def _method_table(table: dict, targets: list[float], value, before=None, scale: float = 100,
                  digits: int = 2) -> list[str]:
    """Markdown rows method x target of ``scale * value(record)`` (mean ± std over seeds); ``before``: a first
    column of a per-run value measured before pruning (the same for every target, taken from the first)."""
    header = ["Method"] + (["before pruning"] if before else []) + [f"{t:g}x" for t in targets] + ["seeds"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in [m for m in (*METHODS, "transfer") if m in table]:
        per_target = [table[method].get(round(t, 4), []) for t in targets]
        cells = [_stat([scale * v for v in map(value, runs) if v is not None], digits) for runs in per_target]
        if before:
            first = next((runs for runs in per_target if runs), [])
            cells = [_stat([scale * before(r) for r in first], digits)] + cells
        n = max(len(v) for v in table[method].values())
        rows.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {n} |")
    return rows


PAIRED_EXPLANATION = (
    "Per seed, both methods start from the same model, and d = method − baseline (test accuracy, points). n: seeds; "
    "mean: the mean of d; SE = sd(d) / √n, its standard error; paired t = mean / SE with n − 1 degrees of freedom, "
    "and its two-sided p; 95 % CI = mean ± t(0.975, n − 1) × SE. Where the interval contains 0, these seeds cannot "
    "tell the difference from zero, and its ends bound the effect they leave possible. MDE, the smallest effect "
    "these seeds detect with 80 % power at α = 0.05 (two-sided), is (z(0.975) + z(0.80)) × SE = (1.96 + 0.84) × SE "
    f"≈ {MDE_FACTOR:g} × SE (the normal approximation; with few seeds the t quantiles give more, about 3.5 × SE "
    "at n = 6).")


def paired_stats(mean: float, sd: float | None, n: int) -> dict:
    """The paired statistics of ``n`` per-seed differences with mean ``mean`` and sample sd ``sd`` (None: n = 1):
    SE, t, two-sided p, the 95 % confidence half-width and the MDE (see :data:`PAIRED_EXPLANATION`)."""
    stats = {"n": n, "mean": mean, "sd": sd, "se": None, "t": None, "p": None, "ci": None, "mde": None}
    if sd is None or n < 2:
        return stats
    se = sd / n ** 0.5
    stats.update(se=se, ci=float(student_t.ppf(0.975, n - 1)) * se, mde=MDE_FACTOR * se)
    if se > 0:
        stats.update(t=mean / se, p=float(2 * student_t.sf(abs(mean / se), n - 1)))
    return stats


def paired_row(label: str, target: float | str, stats: dict) -> str:
    """One Markdown row of the paired table from :func:`paired_stats` (``target``: a speed-up, or a column name)."""
    def cell(key, fmt):
        return "-" if stats[key] is None else format(stats[key], fmt)

    ci = "-" if stats["ci"] is None else \
        f"[{stats['mean'] - stats['ci']:+.2f}, {stats['mean'] + stats['ci']:+.2f}]"
    column = target if isinstance(target, str) else f"{target:g}x"
    return (f"| {label} | {column} | {stats['n']} | {stats['mean']:+.2f} | {cell('se', '.2f')} | "
            f"{cell('t', '+.2f')} | {cell('p', '.3f')} | {ci} | {cell('mde', '.2f')} |")


PAIRED_HEADER = ["| Difference | target | n | mean | SE | paired t | p | 95 % CI | MDE (2.8 × SE) |",
                 "|---|---|---|---|---|---|---|---|---|"]


def paired_differences(table: dict, method: str, baseline: str, key: str, target: float) -> dict[int, float]:
    """seed -> ``method`` − ``baseline`` (points) of the runs' ``key`` at ``target``, for the seeds both ran;
    ``table``: :func:`by_method`'s."""
    def values(name):
        return {r["seed"]: r[key] for r in table.get(name, {}).get(round(float(target), 4), [])
                if r.get(key) is not None}
    mine, theirs = values(method), values(baseline)
    return {s: 100 * (mine[s] - theirs[s]) for s in sorted(mine.keys() & theirs.keys())}


def shown_command(command: str) -> str:
    """A report's command with this checkout's absolute path left out (reports are committed)."""
    return command.replace(str(ROOT) + "/", "")


def _paired_table(table: dict, targets: list[float], method: str = "metanetwork", key: str = "pruned_acc") -> list[str]:
    """Markdown rows ``method - baseline`` x target of the per-seed differences (points) of the runs' ``key``: the
    final test accuracy, ``just_pruned_acc`` (right after pruning) or ``pre_pruning_acc`` (one column: it is the
    same at every target)."""
    if method not in table:
        return []
    columns = [("before pruning", targets[0])] if key == "pre_pruning_acc" else [(t, t) for t in targets]
    rows = list(PAIRED_HEADER)
    for baseline in [m for m in METHODS if m != method and m in table]:
        for column, t in columns:
            diffs = list(paired_differences(table, method, baseline, key, t).values())
            if diffs:
                rows.append(paired_row(f"{LABELS[method].split(' (')[0]} − {LABELS[baseline]}", column,
                                       paired_stats(*mean_std(diffs), len(diffs))))
    return rows


def _goals(table: dict, targets: list[float]) -> str:
    """The issue's yardsticks, stated as measured (mean test accuracy)."""
    def mean(method, t):
        runs = table.get(method, {}).get(round(t, 4))
        return statistics.fmean(100 * r["pruned_acc"] for r in runs) if runs else None

    missing = [LABELS[m] for m in ("metanetwork", "sparse_learning", "depgraph") if m not in table]
    if missing:
        return f"Goal check: not made, these runs have no {', '.join(missing)} (see `--methods`)."
    parts = []
    for t in targets:
        meta, sparse, plain = mean("metanetwork", t), mean("sparse_learning", t), mean("depgraph", t)
        if None in (meta, sparse, plain):
            continue
        order = "meta >= sparse >= plain" if meta >= sparse >= plain else \
            f"not met (meta {meta:.2f}, sparse {sparse:.2f}, plain {plain:.2f})"
        parts.append(f"{t:g}x: {order}, meta - plain = {meta - plain:+.2f} points")
    return "Goal check (mean test accuracy; goal: meta-pruning >= sparse learning >= DepGraph at every target, " \
           "and >= +1 point over DepGraph at 3x): " + ("; ".join(parts) if parts else "no complete targets yet") + \
           ". Means only: whether a difference is distinguishable from zero is the paired table's question."


# ----------------------------------------------------------------------------------------------
# Ablation: meta_train + select with overrides, on the benchmark's store
# ----------------------------------------------------------------------------------------------
def ablation_row(selection_file: Path) -> dict:
    """What an ablation row reports from its select run: the choice, its unpruned accuracy and eligibility under
    select.max_accuracy_drop, and the reference scores."""
    selection = json.loads(selection_file.read_text())
    best = selection["ranking"][0]
    return {"epoch": selection["epoch"], "score": selection["score"], "score_kind": selection.get("score_kind", "auc"),
            "unpruned_acc": best.get("unpruned_acc"),
            "eligible": best.get("eligible", True), "max_accuracy_drop": selection.get("max_accuracy_drop"),
            "control_score": selection["control_score"], "gain_over_control": selection["gain_over_control"],
            "control_unpruned_acc": selection.get("control_unpruned_acc"),
            "sparse_learning_scores": selection.get("sparse_learning_scores")}


def overrides_changing_baselines(cfg: DictConfig, out: Path, overrides: list[str], methods: list[str]) -> list[str]:
    """The overrides that would make ``--reuse-baselines`` dishonest: those outside :data:`REUSE_SAFE_PREFIXES`
    whose value in ``cfg`` differs from the one a baseline of the benchmark ran with (its ``config.yaml``)."""
    recorded = next((OmegaConf.load(path) for method in METHODS if method not in methods
                     for path in sorted((out / "final").glob(f"seed*/{method}/config.yaml"))), None)
    if recorded is None:
        raise SystemExit(f"--reuse-baselines: no baseline finals of the benchmark under {out / 'final'}")

    def value(config: DictConfig, key: str):
        found = OmegaConf.select(config, key, default="<unset>")
        return OmegaConf.to_container(found) if OmegaConf.is_config(found) else found

    changed = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in REUSE_SAFE_KEYS or key.startswith(REUSE_SAFE_PREFIXES):
            continue
        if value(cfg, key) != value(recorded, key):
            changed.append(override)
    return changed


def run_ablation(cfg: DictConfig, out: Path, name: str, overrides: list[str], results_dir: Path) -> dict:
    """meta_train + select with ``overrides`` into ``<out>/ablation/<name>``; its row into
    ``<results_dir>/ablation.json`` (replacing a row of the same name)."""
    store = out / "store"
    if not store.exists():
        raise SystemExit(f"--ablation needs the benchmark's store at {store}: run the benchmark (or its generate "
                         "stage) first")
    folder = out / "ablation" / name
    started = time.time()
    run_stage("meta_train", "meta_train", cfg, folder / "meta_train", store=str(store))
    # the reference curves (origin, control, sparse learning) do not depend on the metanetwork: reuse the
    # newest earlier select's curves where their settings match (stages.select's cache checks them)
    earlier = sorted(out.glob("**/select/curves.json"), key=lambda p: p.stat().st_mtime)
    run_stage("select", "select", cfg, folder / "select", store=str(store),
              **{"select.meta_train_dir": str(folder / "meta_train"),
                 "select.cache": str(earlier[-1]) if earlier else None})
    row = {"name": name, "overrides": overrides, **ablation_row(folder / "select" / "selection.json"),
           "seconds": round(time.time() - started, 1)}
    path = results_dir / ABLATION
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["name"] != name]
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, rows + [row])
    print(colored(f"ablation {name}: best epoch {row['epoch']} score {row['score']:.4f}, control "
                  f"{row['control_score']:.4f}, gain {row['gain_over_control']:+.4f}", "green"))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="resnet20_on_FashionMNIST")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "runs" / "proxy"),
                        help="working folder (resumable; not committed)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS),
                        help="the benchmark's results folder: report.md, report.json, figures/, ablation.json; a "
                             "variant's go to <results>/variants/NAME (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    parser.add_argument("--data-models", type=int, default=8)
    parser.add_argument("--generate-seed", type=int, default=0, help="seed of the data-model generation")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparse-regs", type=float, nargs="+", default=DEFAULT_SPARSE_REGS,
                        help="sparse-learning strengths scored in select (the best on validation is used)")
    parser.add_argument("--transfer", default=None,
                        help="a metanetwork (.pt or select run dir) trained on another setting, added as a method")
    parser.add_argument("--ablation", default=None, metavar="NAME",
                        help="only meta_train + select with the overrides, into <out>/ablation/NAME; its row goes to "
                             "<results>/ablation.json")
    parser.add_argument("--variant", default=None, metavar="NAME",
                        help="only the final runs, with the overrides, into <out>/variants/NAME; report in "
                             "<results>/variants/NAME/")
    parser.add_argument("--select", default=None, metavar="DIR",
                        help="with --variant: the select run dir whose checkpoint and sparse-learning strength the "
                             "finals use (default <out>/select), e.g. <out>/ablation/NAME/select")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="with --variant: run only --methods and pair them with the benchmark's own finals of "
                             "the other methods; refused when an override outside "
                             f"{', '.join(REUSE_SAFE_PREFIXES)} (settings the baselines' finals do not read) differs "
                             "from what those baselines ran with")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild report.md and figures/accuracy.png of <results> (with --variant "
                             "NAME: of <results>/variants/NAME) from the report.json saved beside it")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra overrides (key=value, anywhere on the line) are told apart from the options by their '='
    hydra_overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in hydra_overrides])
    args.overrides = hydra_overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if args.ablation and args.variant:
        parser.error("--ablation and --variant exclude each other")
    if args.select and not args.variant:
        parser.error("--select goes with --variant")
    if args.reuse_baselines and not args.variant:
        parser.error("--reuse-baselines goes with --variant")
    results_dir = Path(args.results).resolve()
    variant_dir = results_dir / "variants" / args.variant if args.variant else None
    if args.report_only:
        if args.ablation:
            parser.error("--report-only rebuilds a report; an ablation row has none (its table is in the report)")
        if args.overrides or args.select:
            log.info("--report-only: overrides and --select ignored (the report is rebuilt from report.json as saved)")
        path = rebuild_report(variant_dir or results_dir)
        print(colored(f"proxy benchmark report rebuilt: {path}", "green", attrs=["bold"]))
        return 0

    overrides = [f"pipeline.num_data_models={args.data_models}",
                 f"select.sparse_learning_regs=[{','.join(f'{r:g}' for r in args.sparse_regs)}]", *args.overrides]
    cfg = compose_config(args.task, overrides)
    out = Path(args.out).resolve()
    select_dir = Path(args.select).resolve() if args.select else None
    command = " ".join(["python benchmarks/proxy.py", *argv])
    if args.ablation:
        run_ablation(cfg, out, args.ablation, args.overrides, results_dir)
        return 0
    if args.variant:
        if args.reuse_baselines:
            changed = overrides_changing_baselines(cfg, out, args.overrides, args.methods)
            if changed:
                parser.error(f"--reuse-baselines: {' '.join(changed)} differ from what the benchmark's baselines ran "
                             f"with (their config.yaml under {out / 'final'}); only overrides under "
                             f"{', '.join(REUSE_SAFE_PREFIXES)} may differ")
        final_root, timings = run_variant(cfg, out, args.variant, args.seeds, args.targets, args.transfer,
                                          args.methods, select_dir)
        reused = [m for m in METHODS if m not in args.methods] if args.reuse_baselines else None
        path = write_report(cfg, out, variant_dir, args.seeds, args.targets, timings, final_root=final_root,
                            variant=args.overrides, select_dir=select_dir, bench_dir=results_dir, command=command,
                            reused=reused)
        print(colored(f"proxy benchmark variant report: {path}", "green", attrs=["bold"]))
        return 0
    timings = run_benchmark(cfg, out, args.seeds, args.targets, args.transfer, args.methods, args.generate_seed)
    path = write_report(cfg, out, results_dir, args.seeds, args.targets, timings, command=command)
    print(colored(f"proxy benchmark report: {path}", "green", attrs=["bold"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
