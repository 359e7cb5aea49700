"""benchmarks/proxy.py end to end on the offline digits task (tiny budgets): the report, resumption, an ablation,
a variant of the finals."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import REPO
TARGETS = (1.5, 2.0)
METHOD_LABELS = {  # benchmarks/proxy.py LABELS, in table order
    "metanetwork": "Meta-pruning (metanetwork)",
    "control": "DepGraph + equal-budget fine-tune (control)",
    "sparse_learning": "DepGraph + sparse learning",
    "depgraph": "DepGraph (no sparse learning)",
    "random": "Random pruning",
}
PRE_PRUNING = {"metanetwork": "metanetwork", "control": "finetune", "sparse_learning": "sparse_learning",
               "depgraph": "none", "random": "none"}
TINY = ["task.model=resnet8", "task.train.epochs=1", "task.finetune.after_init_pruning.epochs=1",
        "task.finetune.after_metanetwork.epochs=1", "task.finetune.after_pruning.epochs=1",
        "task.meta_train.epochs=2", "task.visualize.max_speed_up=2.0", "select.checkpoints=all"]


def proxy(tmp_path, *extra):
    cmd = [sys.executable, str(REPO / "benchmarks" / "proxy.py"), "--task", "resnet20_on_digits",
           "--out", str(tmp_path / "out"), "--results", str(tmp_path / "results"), "--data-models", "3",
           "--seeds", "1", "--targets", *map(str, TARGETS), "--sparse-regs", "0.01", *TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.time()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc, time.time() - started


def table_rows(markdown, title):
    """{first cell: other cells} of the Markdown table that follows the line starting with ``title``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows, seen = {}, False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif seen:
            break
    return rows


@pytest.mark.slow
def test_proxy_benchmark_report_resume_and_ablation(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    first, first_seconds = proxy(tmp_path)

    # the report: one row per method, a column per target, numbers in every cell
    markdown = (results / "proxy.md").read_text()
    rows = table_rows(markdown, "## Test accuracy")
    assert rows["Method"] == ["1.5x", "2x", "seeds"]
    assert [k for k in rows if k not in ("Method", "---")] == list(METHOD_LABELS.values())
    for label in METHOD_LABELS.values():
        cells = rows[label]
        assert cells[2] == "1"
        for cell in cells[:2]:
            assert 0.0 <= float(cell) <= 100.0, (label, cell)
    assert list(table_rows(markdown, "Validation accuracy"))[2:] == list(METHOD_LABELS.values())
    paired = table_rows(markdown, "Paired differences")
    assert paired["Difference"] == ["1.5x", "2x", "seeds"] and len(paired) == 2 + len(METHOD_LABELS) - 1
    assert all(float(cell) == float(cell) for row in list(paired.values())[2:] for cell in row[:2])
    prunability = table_rows(markdown, "Prunability itself")  # accuracy right after pruning, no fine-tune
    assert prunability["Method"] == ["before pruning", "1.5x", "2x", "seeds"]
    for label in METHOD_LABELS.values():
        assert all(0.0 <= float(cell.split(" ")[0]) <= 100.0 for cell in prunability[label][:3]), label
    collapsed = table_rows(markdown, "Collapsed layers")  # layers left with <= 2 channels, from the widths
    assert collapsed["Method"] == ["1.5x", "2x", "seeds"]
    for method, label in METHOD_LABELS.items():
        for target, cell in zip(TARGETS, collapsed[label]):
            result = json.loads((out / "final" / "seed1" / method / f"target_{target:g}x" / "results.json").read_text())
            assert float(cell) == sum(w <= 2 for w in result["model"]["widths"]), (method, target)
    for name in ("proxy.png", "proxy_selection.png"):
        assert (results / name).stat().st_size > 0, name

    # every stage timed
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"generate", "meta_train", "select", "seed 1: pretrain + init prune",
                            *(f"seed 1: {m}" for m in METHOD_LABELS)}
    assert all(v >= 0 for v in timings.values())

    # the wiring: every method starts from the seed's init-pruned model, prunes to every target from it
    selection = json.loads((out / "select" / "selection.json").read_text())
    assert selection["best_sparse_reg"] == 0.01
    start = (out / "final" / "seed1" / "pretrain" / "init_pruned_model.pt").resolve()
    for method, kind in PRE_PRUNING.items():
        top = json.loads((out / "final" / "seed1" / method / "results.json").read_text())
        assert top["run"] == "pruning_final_targets" and top["pre_pruning"] == kind
        prepared = None
        for target in TARGETS:
            result = json.loads((out / "final" / "seed1" / method / f"target_{target:g}x" / "results.json").read_text())
            assert result["pre_pruning"] == kind and result["speed_up"] >= target
            assert result["source_model"] == str(start) and result["finetune_epochs"]["after_init_pruning"] == 0
            assert result["finetune_epochs"]["after_metanetwork"] == (0 if kind == "none" else 1)
            assert result["method"] == ("random" if method == "random" else "group_l2_norm_max_normalizer")
            before_pruning = result["stages"][:[s["stage"] for s in result["stages"]].index("pruned")]
            assert prepared is None or before_pruning == prepared
            prepared = before_pruning
        if method == "sparse_learning":
            assert result["sparse_learning"]["reg"] == selection["best_sparse_reg"]
        if method == "metanetwork":
            assert Path(result["metanetwork"]) == Path(selection["chosen"]).resolve()

    # the same command again: every stage is found finished, nothing is trained or pruned again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    timings_text = (out / "timings.json").read_text()
    again, again_seconds = proxy(tmp_path)
    log = again.stdout + again.stderr
    assert log.count("already finished") == 3 + 1 + len(METHOD_LABELS)  # generate, meta_train, select, pretrain, methods
    assert "results written to" not in log and "pruning:" not in log and "epoch 1/" not in log
    assert (out / "timings.json").read_text() == timings_text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == before
    assert again_seconds < 0.6 * first_seconds
    assert (results / "proxy.md").exists()

    # an ablation: meta_train + select only, on the benchmark's store, appended to the ablation table; this one
    # scores by the accuracy after pruning and fine-tuning (select.score=finetuned)
    proxy(tmp_path, "--ablation", "smoke", "select.score=finetuned", "select.finetuned_targets=[1.5]",
          "task.meta_train.epochs=1")
    rows = json.loads((results / "proxy_ablation.json").read_text())
    assert [r["name"] for r in rows] == ["smoke"]
    row = rows[0]
    assert row["epoch"] == 1 and row["overrides"][-1] == "task.meta_train.epochs=1"
    assert row["score_kind"] == "finetuned"
    smoke = json.loads((out / "ablation" / "smoke" / "select" / "ranking.json").read_text())["ranking"][0]
    assert row["score"] == pytest.approx(smoke["finetuned"]["1.5"])
    for key in ("score", "control_score", "gain_over_control"):
        assert math.isfinite(row[key]), key
    assert row["gain_over_control"] == pytest.approx(row["score"] - row["control_score"])
    assert 0.0 <= row["unpruned_acc"] <= 1.0 and row["eligible"] in (True, False)

    # a variant: only the finals again, with overrides, from the same starts; the benchmark's own stay untouched
    finished = {p: p.stat().st_mtime_ns for p in (out / "final").rglob("results.json")}
    proxy(tmp_path, "--variant", "capped", "method.max_pruning_ratio=0.5", "method.hard_cap=true")
    assert {p: p.stat().st_mtime_ns for p in (out / "final").rglob("results.json")} == finished
    variant = (results / "proxy_capped.md").read_text()
    assert "method.max_pruning_ratio=0.5 method.hard_cap=true" in variant.splitlines()[4]
    assert "(here 0.5, hard: no step passes it)" in variant
    assert list(table_rows(variant, "## Test accuracy"))[2:] == list(METHOD_LABELS.values())
    assert "](proxy_selection.png)" in variant and not (results / "proxy_capped_selection.png").exists()
    for method in METHOD_LABELS:
        stage = out / "variants" / "capped" / "final" / "seed1" / method
        capped = OmegaConf.load(stage / "config.yaml").method
        assert capped.max_pruning_ratio == 0.5 and capped.hard_cap is True, method
        for target in TARGETS:
            result = json.loads((stage / f"target_{target:g}x" / "results.json").read_text())
            assert result["source_model"] == str(start) and result["speed_up"] >= target

    # a variant with another selection (the ablation row's): its checkpoint in the metanetwork's finals
    proxy(tmp_path, "--variant", "smoke_select", "--select", str(out / "ablation" / "smoke" / "select"),
          "--methods", "metanetwork")
    assert {p: p.stat().st_mtime_ns for p in (out / "final").rglob("results.json")} == finished
    result = json.loads((out / "variants" / "smoke_select" / "final" / "seed1" / "metanetwork" / "target_2x" /
                         "results.json").read_text())
    assert Path(result["metanetwork"]) == (out / "ablation" / "smoke" / "meta_train" / "checkpoints" /
                                           "epoch_0001.pt").resolve()
    report = (results / "proxy_smoke_select.md").read_text()
    assert "chosen by the selection in" in report and "](proxy_smoke_select_selection.png)" in report
    assert "scored by `finetuned`" in report and (results / "proxy_smoke_select_selection.png").exists()
    assert "after pruning to 1.5x" in report  # the row's own select.finetuned_targets
    # its own meta-training (not the benchmark's): its own diagnostics plot
    assert "](proxy_smoke_select_meta_train.png)" in report and (results / "proxy_smoke_select_meta_train.png").exists()
    checkpoints = sorted(p.name for p in (out / "ablation" / "smoke" / "meta_train" / "checkpoints").glob("*.pt"))
    assert checkpoints == ["epoch_0001.pt"]
    assert not (out / "ablation" / "smoke" / "final").exists()
