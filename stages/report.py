"""Run mode ``report``: aggregate final-run ``results.json`` files into the paper's tables.

``python main/main.py run=report report.dir=outputs/resnet56_on_CIFAR10/resnet56_cifar10_2.3x`` finds every
``results.json`` written by ``pruning_final`` / ``unstructured_pruning_final`` below ``report.dir``
(recursively, e.g. a Hydra multirun folder), groups runs that differ only by seed, and writes
``<run_dir>/report.md``: per task one table in the paper's format (Method, Base, Pruned, ΔAcc, Pruned
FLOPs, Speed Up) plus the fine-tune epochs, the epoch-selection rule and the seeds, each cell the mean ±
sample standard deviation (n - 1) over seeds; then one row per run, as the paper lists its seeds.
Accuracies are test top-1 in percent. Runs made with ``protocol=paper`` (final fine-tune epoch chosen on
the TEST set, as the authors did) are marked with † and never pooled with honest runs.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig

from stages.common import RESULTS_FILE
from utils import distributed
from utils.io import atomic_write

log = logging.getLogger(__name__)

FINAL_RUNS = ("pruning_final", "unstructured_pruning_final")
STRUCTURED_KEYS = ("task", "method", "seed", "protocol", "base_acc", "pruned_acc", "speed_up",
                   "pruned_flops_percent", "target_speed_up", "finetune_epochs")
UNSTRUCTURED_KEYS = ("task", "method", "seed", "protocol", "base_acc", "pruned_acc", "sparsity",
                     "macs_reduction_percent", "pruning", "finetune_epochs")
PAPER_MARK = "†"
PAPER_NOTE = (f"{PAPER_MARK} protocol=paper: the after-pruning fine-tune kept the epoch with the best TEST "
              "accuracy, as the authors did; these numbers are optimistic and not comparable with honest "
              "(validation-selected) rows.")
DEFAULT_METHOD = "group_l2_norm_max_normalizer"


class ReportError(ValueError):
    """Nothing to report (no final-run results under the folder)."""


@dataclass
class Group:
    """Runs that differ only by seed (same task, method, metanetwork, target, epochs and protocol)."""

    key: tuple
    runs: list[dict] = field(default_factory=list)

    @property
    def first(self) -> dict:
        return self.runs[0]


def find_results(root: str | Path) -> tuple[list[dict], list[str]]:
    """Load every final-run ``results.json`` below ``root``; returns ``(results, skipped notes)``.

    Each result gets ``_path`` (its file). Results of other run modes (train, pretrain_final, ...) are
    ignored silently; unreadable or incomplete final results are skipped with a note.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"report.dir={root} is not a folder; point it at a multirun/run folder of final runs")
    results, skipped = [], []
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            skipped.append(f"{path}: unreadable ({err})")
            continue
        if not isinstance(data, dict) or data.get("run") not in FINAL_RUNS:
            continue
        required = STRUCTURED_KEYS if data["run"] == "pruning_final" else UNSTRUCTURED_KEYS
        missing = [key for key in required if key not in data]
        if missing:
            skipped.append(f"{path}: missing {missing}")
            continue
        data["_path"] = str(path)
        results.append(data)
    for note in skipped:
        log.warning("report: skipped %s", note)
    return results, skipped


def _epochs_text(epochs: dict) -> str:
    """``after_init_pruning + after_metanetwork + after_pruning`` fine-tune epochs, e.g. ``80+100+140``."""
    order = ("after_init_pruning", "after_metanetwork", "after_pruning")
    return "+".join(str(epochs.get(name, 0) or 0) for name in order if name in epochs)


def _group_key(result: dict) -> tuple:
    target = (round(float(result["target_speed_up"]), 4) if result["run"] == "pruning_final"
              else str(result["pruning"]))
    sparse = result.get("sparse_learning") or {}
    return (result["run"], result["task"], result.get("architecture"), target, result["method"],
            result.get("metanetwork"), _epochs_text(result["finetune_epochs"]), result["protocol"],
            result.get("selection"), result.get("pre_pruning") or "none", sparse.get("reg"), sparse.get("alpha"))


def group_results(results: Iterable[dict]) -> list[Group]:
    """Group runs by everything but the seed; sorted by run kind, task, target, baseline first."""
    groups: dict[tuple, Group] = {}
    for result in results:
        key = _group_key(result)
        groups.setdefault(key, Group(key)).runs.append(result)
    for group in groups.values():
        group.runs.sort(key=lambda r: (r["seed"], r["_path"]))
    def order(group: Group) -> tuple:
        run, task, architecture, target, method, metanetwork, epochs, protocol, _selection, pre, _reg, _a = group.key
        # per task and target: baseline first, then metanetwork runs, honest before paper protocol
        return (run, task, str(architecture), target, method, metanetwork is not None, str(metanetwork), pre,
                protocol == "paper", epochs)

    return sorted(groups.values(), key=order)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_stat(values: Sequence[float], digits: int = 2, suffix: str = "") -> str:
    """``"93.82 ± 0.26"`` (mean ± sample std) or ``"93.82"`` for one value."""
    mean, std = mean_std(values)
    text = f"{mean:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return text + suffix


# runs without a metanetwork, by what they do before the final pruning (results.json "pre_pruning")
_BASELINE_LABELS = {
    "none": "No metanetwork (baseline)",
    "finetune": "No metanetwork + equal-budget fine-tune (control)",
    "sparse_learning": "DepGraph sparse learning",
}


def _method_label(result: dict, metanetwork_ids: dict[str, int]) -> str:
    mn = result.get("metanetwork")
    if mn:
        label = "Meta-Pruning"
        source_task = result.get("metanetwork_task")
        if source_task and source_task != result["task"]:
            label += f" (metanetwork from {source_task})"
        if len(metanetwork_ids) > 1:
            label += f" [{metanetwork_ids[mn]}]"
    else:
        label = _BASELINE_LABELS.get(result.get("pre_pruning") or "none", "No metanetwork (baseline)")
        sparse = result.get("sparse_learning")
        if sparse:
            label += f" (reg {sparse['reg']:g}, alpha {sparse['alpha']:g})"
    if result["method"] != DEFAULT_METHOD:
        label += f", {result['method']}"
    if result["protocol"] == "paper":
        label += f" {PAPER_MARK}"
    return label


def _selection_text(result: dict) -> str:
    selection = result.get("selection") or "?"
    return f"{selection} {PAPER_MARK}" if result["protocol"] == "paper" else selection


def _pct(runs: Sequence[dict], key: str) -> list[float]:
    return [100.0 * float(r[key]) for r in runs]


def _delta(runs: Sequence[dict]) -> list[float]:
    return [100.0 * (float(r["pruned_acc"]) - float(r["base_acc"])) for r in runs]


def _structured_cells(runs: Sequence[dict]) -> list[str]:
    return [format_stat(_pct(runs, "base_acc")), format_stat(_pct(runs, "pruned_acc")), format_stat(_delta(runs)),
            format_stat([float(r["pruned_flops_percent"]) for r in runs], 1, "%"),
            format_stat([float(r["speed_up"]) for r in runs])]


def _unstructured_cells(runs: Sequence[dict]) -> list[str]:
    return [format_stat(_pct(runs, "base_acc")), format_stat(_pct(runs, "pruned_acc")), format_stat(_delta(runs)),
            format_stat(_pct(runs, "sparsity"), 1, "%"),
            format_stat([float(r["macs_reduction_percent"]) for r in runs], 1, "%")]


_HEADERS = {
    "pruning_final": ["Method", "Base", "Pruned", "ΔAcc", "Pruned FLOPs", "Speed Up", "Target",
                      "Fine-tune epochs", "Selection"],
    "unstructured_pruning_final": ["Method", "Base", "Pruned", "ΔAcc", "Sparsity", "Sparse FLOPs saved",
                                   "Pruning", "Fine-tune epochs", "Selection"],
}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _row(runs: Sequence[dict], metanetwork_ids: dict[str, int], seeds_col: str) -> list[str]:
    first = runs[0]
    structured = first["run"] == "pruning_final"
    cells = _structured_cells(runs) if structured else _unstructured_cells(runs)
    target = f"{float(first['target_speed_up']):.2f}" if structured else str(first["pruning"])
    return ([_method_label(first, metanetwork_ids)] + cells
            + [target, _epochs_text(first["finetune_epochs"]), _selection_text(first), seeds_col])


def format_report(results: Sequence[dict], source: str | Path, skipped: Sequence[str] = (),
                  per_run: bool = True) -> str:
    """The Markdown report of ``results`` (from :func:`find_results`)."""
    if not results:
        raise ReportError(
            f"no pruning_final / unstructured_pruning_final results.json under {source}; run the final runs first "
            "(e.g. python main/main.py -m experiment=resnet56_cifar10_2.3x) and point report.dir at their folder"
        )
    metanetworks = sorted({r["metanetwork"] for r in results if r.get("metanetwork")})
    metanetwork_ids = {path: i + 1 for i, path in enumerate(metanetworks)}
    groups = group_results(results)
    lines = ["# Final pruning results", "",
             f"{len(results)} runs from `{source}`, {len(groups)} settings. Cells: mean ± sample std (n - 1) over "
             "seeds. Accuracies: test top-1 %; ΔAcc = Pruned - Base per seed; Pruned FLOPs = 1 - pruned/unpruned "
             "MACs; Speed Up = unpruned/pruned MACs (torch-pruning counter, batch 1). Fine-tune epochs: after "
             "init pruning + after metanetwork + after pruning. Selection: how the after-pruning fine-tune "
             "picked its epoch (val = best validation accuracy).", ""]
    any_paper = any(r["protocol"] == "paper" for r in results)
    sections = (("pruning_final", "Structured pruning"), ("unstructured_pruning_final", "Unstructured pruning"))
    for kind, title in sections:
        kind_groups = [g for g in groups if g.key[0] == kind]
        if not kind_groups:
            continue
        lines += [f"## {title} (`{kind}`)", ""]
        tasks = list(dict.fromkeys((g.key[1], g.key[2]) for g in kind_groups))
        for task, architecture in tasks:
            task_groups = [g for g in kind_groups if (g.key[1], g.key[2]) == (task, architecture)]
            header = _HEADERS[kind] + ["Seeds"]
            rows = [_row(g.runs, metanetwork_ids, ", ".join(str(r["seed"]) for r in g.runs)) for g in task_groups]
            lines += [f"### {task}" + (f" ({architecture})" if architecture else ""), ""]
            lines += _table(header, rows) + [""]
            if per_run:
                run_rows = [_row([r], metanetwork_ids, str(r["seed"])) + [f"`{Path(r['_path']).parent}`"]
                            for g in task_groups for r in g.runs]
                lines += ["Per run:", ""] + _table(_HEADERS[kind] + ["Seed", "Run dir"], run_rows) + [""]
    if any_paper:
        lines += [PAPER_NOTE, ""]
    if len(metanetworks) > 1:
        lines += ["Metanetworks:", ""] + [f"- [{i}] `{path}`" for path, i in metanetwork_ids.items()] + [""]
    elif metanetworks:
        lines += [f"Metanetwork: `{metanetworks[0]}`", ""]
    if skipped:
        lines += ["Skipped files:", ""] + [f"- {note}" for note in skipped] + [""]
    return "\n".join(lines)


def build_report(root: str | Path, per_run: bool = True) -> tuple[str, list[dict]]:
    """Find, aggregate and format the final results under ``root``; returns ``(markdown, results)``."""
    results, skipped = find_results(root)
    return format_report(results, root, skipped, per_run=per_run), results


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run mode ``report``: aggregate ``cfg.report.dir``'s final results into ``<run_dir>/report.md`` and print
    it. Under torchrun rank 0 does it (the others wait, return {} and end with rank 0's error if it fails)."""
    summary = distributed.run_on_main(_report, cfg, Path(run_dir))
    return summary if distributed.is_main_process() else {}


def _report(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    source = cfg.report.get("dir")
    if not source:
        raise ReportError("run=report needs report.dir=<folder with final-run results.json files> "
                          "(e.g. a Hydra multirun dir of pruning_final runs)")
    markdown, results = build_report(source, per_run=cfg.report.get("per_run", True))
    path = Path(run_dir) / "report.md"
    atomic_write(path, markdown + "\n")  # a failed write (disk full) leaves the earlier report whole
    print(markdown)
    log.info("report of %d runs written to %s", len(results), path)
    return {"run": "report", "report": str(path), "runs": len(results), "source": str(source)}
