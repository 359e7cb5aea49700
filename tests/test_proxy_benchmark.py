"""benchmarks/proxy.py: end to end on the offline digits task (tiny budgets): the report, resumption, an ablation,
a variant of the finals, the report rebuilt from its report.json; and, fast, the paired statistics and
``--report-only`` on a hand-made report.json."""
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy import stats

from helpers import REPO, load_script
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


def section_rows(markdown, title):
    """The cells of the rows of the first Markdown table after the line starting with ``title`` (header and rule
    left out), in order."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows, seen = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif seen:
            break
    return rows[2:]


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
    markdown = (results / "report.md").read_text()
    rows = table_rows(markdown, "## Test accuracy")
    assert rows["Method"] == ["1.5x", "2x", "seeds"]
    assert [k for k in rows if k not in ("Method", "---")] == list(METHOD_LABELS.values())
    for label in METHOD_LABELS.values():
        cells = rows[label]
        assert cells[2] == "1"
        for cell in cells[:2]:
            assert 0.0 <= float(cell) <= 100.0, (label, cell)
    assert list(table_rows(markdown, "Validation accuracy"))[2:] == list(METHOD_LABELS.values())
    paired = table_rows(markdown, "## Paired differences")
    assert paired["Difference"] == ["target", "n", "mean", "SE", "paired t", "p", "95 % CI", "MDE (2.8 × SE)"]
    assert len(paired) == 2 + len(METHOD_LABELS) - 1  # one row per baseline (rows are keyed by label, one target kept)
    assert len(section_rows(markdown, "## Paired differences")) == 2 * (len(METHOD_LABELS) - 1)
    for row in list(paired.values())[2:]:  # one seed: a mean, no spread
        assert row[1] == "1" and math.isfinite(float(row[2])) and row[3:] == ["-"] * 5
    # before pruning (one column) and right after pruning (a column per target), paired the same way
    early = section_rows(markdown, "Paired differences before pruning")
    baselines = len(METHOD_LABELS) - 1
    assert [row[1] for row in early] == ["before pruning"] * baselines + [f"{t:g}x" for _ in range(baselines)
                                                                         for t in TARGETS]
    start = json.loads((out / "final" / "seed1" / "control" / "target_2x" / "results.json").read_text())
    meta = json.loads((out / "final" / "seed1" / "metanetwork" / "target_2x" / "results.json").read_text())
    assert early[0][0] == "Meta-pruning − DepGraph + equal-budget fine-tune (control)"
    assert float(early[0][3]) == pytest.approx(100 * (meta["pre_pruning_acc"] - start["pre_pruning_acc"]), abs=0.006)
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
    for name in ("accuracy.png", "selection.png", "meta_train.png"):
        assert (results / "figures" / name).stat().st_size > 0, name
        assert f"](figures/{name})" in markdown
    assert "reading.md" not in markdown  # no reading written yet: no link to one
    assert json.loads((results / "report.json").read_text())["runs"]

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
    assert (results / "report.md").exists()

    # the report again from report.json alone, with the working folder gone; a reading beside it is linked
    (results / "reading.md").write_text("# Reading\n")
    (out / "final").rename(tmp_path / "final_away")
    proxy(tmp_path, "--report-only")
    (tmp_path / "final_away").rename(out / "final")
    rebuilt = (results / "report.md").read_text()
    assert "re-rendered from `report.json` by `--report-only`" in rebuilt and "](reading.md)" in rebuilt
    assert [line for line in rebuilt.splitlines() if line.startswith("|")] == \
        [line for line in markdown.splitlines() if line.startswith("|")]

    # an ablation: meta_train + select only, on the benchmark's store, appended to the ablation table; this one
    # scores by the accuracy after pruning and fine-tuning (select.score=finetuned)
    proxy(tmp_path, "--ablation", "smoke", "select.score=finetuned", "select.finetuned_targets=[1.5]",
          "task.meta_train.epochs=1")
    rows = json.loads((results / "ablation.json").read_text())
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
    variant = (results / "variants" / "capped" / "report.md").read_text()
    assert "method.max_pruning_ratio=0.5 method.hard_cap=true" in variant.splitlines()[4]
    assert "(here 0.5, hard: no step passes it)" in variant
    assert list(table_rows(variant, "## Test accuracy"))[2:] == list(METHOD_LABELS.values())
    assert "](../../figures/selection.png)" in variant and "](../../report.md)" in variant
    assert not (results / "variants" / "capped" / "figures" / "selection.png").exists()
    assert (results / "variants" / "capped" / "figures" / "accuracy.png").exists()
    for method in METHOD_LABELS:
        stage = out / "variants" / "capped" / "final" / "seed1" / method
        capped = OmegaConf.load(stage / "config.yaml").method
        assert capped.max_pruning_ratio == 0.5 and capped.hard_cap is True, method
        for target in TARGETS:
            result = json.loads((stage / f"target_{target:g}x" / "results.json").read_text())
            assert result["source_model"] == str(start) and result["speed_up"] >= target

    # a variant with another selection (the ablation row's): its checkpoint in the metanetwork's finals
    # paired with the benchmark's own baselines (--reuse-baselines): only the metanetwork's finals run again
    proxy(tmp_path, "--variant", "smoke_select", "--select", str(out / "ablation" / "smoke" / "select"),
          "--methods", "metanetwork", "--reuse-baselines")
    assert {p: p.stat().st_mtime_ns for p in (out / "final").rglob("results.json")} == finished
    assert [p.name for p in (out / "variants" / "smoke_select" / "final" / "seed1").iterdir()] == ["metanetwork"]
    result = json.loads((out / "variants" / "smoke_select" / "final" / "seed1" / "metanetwork" / "target_2x" /
                         "results.json").read_text())
    assert Path(result["metanetwork"]) == (out / "ablation" / "smoke" / "meta_train" / "checkpoints" /
                                           "epoch_0001.pt").resolve()
    smoke = results / "variants" / "smoke_select"
    report = (smoke / "report.md").read_text()
    assert "chosen by the selection in `<out>/ablation/smoke/select`" in report
    assert "](figures/selection.png)" in report and (smoke / "figures" / "selection.png").exists()
    assert "the benchmark's own finals" in report and "`--reuse-baselines`" in report
    assert json.loads((smoke / "report.json").read_text())["variant"]["reused"] == \
        sorted(m for m in METHOD_LABELS if m != "metanetwork")
    reused_rows = table_rows(report, "## Test accuracy")
    benchmark_rows = table_rows(markdown, "## Test accuracy")
    for method in ("control", "sparse_learning", "depgraph", "random"):  # the benchmark's numbers, unchanged
        assert reused_rows[METHOD_LABELS[method]] == benchmark_rows[METHOD_LABELS[method]], method
    assert len(section_rows(report, "## Paired differences")) == 2 * (len(METHOD_LABELS) - 1)
    assert "scored by `finetuned`" in report
    assert "after pruning to 1.5x" in report  # the row's own select.finetuned_targets
    # its own meta-training (not the benchmark's): its own diagnostics plot
    assert "](figures/meta_train.png)" in report and (smoke / "figures" / "meta_train.png").exists()
    checkpoints = sorted(p.name for p in (out / "ablation" / "smoke" / "meta_train" / "checkpoints").glob("*.pt"))
    assert checkpoints == ["epoch_0001.pt"]
    assert not (out / "ablation" / "smoke" / "final").exists()


@pytest.fixture(scope="module")
def proxy_module():
    return load_script(REPO / "benchmarks" / "proxy.py", "proxy_benchmark_script")


def test_paired_statistics_match_a_paired_t_test(proxy_module):
    ours, theirs = [80.1, 79.3, 81.0, 78.2, 80.6, 79.9], [80.9, 80.0, 80.2, 80.1, 81.7, 80.0]
    diffs = [a - b for a, b in zip(ours, theirs)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    got = proxy_module.paired_stats(mean, sd, len(diffs))
    want = stats.ttest_rel(ours, theirs)
    assert got["se"] == pytest.approx(sd / math.sqrt(6))
    assert got["t"] == pytest.approx(want.statistic) and got["p"] == pytest.approx(want.pvalue)
    assert got["ci"] == pytest.approx(stats.t.ppf(0.975, 5) * got["se"])
    assert got["mde"] == pytest.approx(2.8 * got["se"])
    row = proxy_module.paired_row("a − b", 2.0, got)
    assert row.startswith(f"| a − b | 2x | 6 | {mean:+.2f} | {got['se']:.2f} | {got['t']:+.2f} | {got['p']:.3f} |")
    # one seed: the mean only
    assert proxy_module.paired_row("a − b", 3.0, proxy_module.paired_stats(-1.5, None, 1)) == \
        "| a − b | 3x | 1 | -1.50 | - | - | - | - | - |"


def _report_data(seeds=(1, 2, 3), targets=(2.0, 3.0)):
    runs = []
    for method_index, method in enumerate(METHOD_LABELS):
        for seed in seeds:
            for target in targets:
                acc = 0.8 - 0.01 * target + 0.003 * method_index + 0.002 * seed * (method_index % 2)
                runs.append({"method": method, "seed": seed, "target": target, "speed_up": target + 0.01,
                             "pruned_acc": acc, "pruned_val_acc": acc - 0.01, "pre_pruning_acc": 0.81,
                             "just_pruned_acc": 0.3, "widths": [1, 4, 8]})
    return {"task": "t", "command": "python benchmarks/proxy.py --seeds 1 2 3", "generated": "2026-01-01 00:00 UTC",
            "hardware": "h", "variant": None, "setup": ["- setup line"], "cap": None, "seeds": list(seeds),
            "targets": list(targets), "runs": runs,
            "selection": {"epoch": 2, "score": 0.5, "score_kind": "auc", "control_score": 0.4,
                          "gain_over_control": 0.1, "ranking": [{"epoch": 2, "score": 0.5, "unpruned_acc": 0.8,
                                                                 "eligible": True}]},
            "figures": {"selection": None, "meta_train": None}, "timings": {"generate": 3.0}}


def test_report_only_rebuilds_from_report_json(tmp_path, proxy_module):
    results = tmp_path / "results"
    variant = results / "variants" / "v"
    for folder in (results, variant):
        folder.mkdir(parents=True, exist_ok=True)
        data = _report_data()
        if folder == variant:
            data["variant"] = {"overrides": ["method.hard_cap=true"], "select": None}
        (folder / "report.json").write_text(json.dumps(data))
    (results / "reading.md").write_text("# Reading\n")
    (results / "ablation.json").write_text(json.dumps([{
        "name": "row1", "overrides": ["task.meta_train.lr=3e-4"], "epoch": 4, "score": 0.3, "score_kind": "auc",
        "unpruned_acc": 0.8, "eligible": True, "control_score": 0.2, "gain_over_control": 0.1, "seconds": 12.0}]))
    assert proxy_module.main(["--results", str(results), "--report-only"]) == 0
    assert proxy_module.main(["--results", str(results), "--variant", "v", "--report-only"]) == 0

    report = (results / "report.md").read_text()
    assert "](reading.md)" in report and "by `--report-only` on" in report and "--seeds 1 2 3" in report
    assert table_rows(report, "## Ablation")["row1"][:3] == ["`task.meta_train.lr=3e-4`", "4", "0.3000"]
    assert (results / "figures" / "accuracy.png").stat().st_size > 0
    rows = ["| " + " | ".join(cells) + " |" for cells in section_rows(report, "## Paired differences")
            if cells[0] == "Meta-pruning − DepGraph + sparse learning"]
    assert [row.split(" | ")[1:3] for row in rows] == [["2x", "3"], ["3x", "3"]]
    data = _report_data()
    diffs = [100 * (a["pruned_acc"] - b["pruned_acc"]) for a in data["runs"] for b in data["runs"]
             if a["method"] == "metanetwork" and b["method"] == "sparse_learning" and a["seed"] == b["seed"]
             and a["target"] == b["target"] == 2.0]
    stats = proxy_module.paired_stats(statistics.fmean(diffs), statistics.stdev(diffs), 3)
    assert rows[0] == proxy_module.paired_row("Meta-pruning − DepGraph + sparse learning", 2.0, stats)
    assert table_rows(report, "Collapsed layers")[METHOD_LABELS["control"]] == ["1.0 ± 0.0", "1.0 ± 0.0", "3"]

    variant_report = (variant / "report.md").read_text()
    assert "](../../report.md)" in variant_report and "`method.hard_cap=true`" in variant_report
    assert "reading.md" not in variant_report and "## Ablation" not in variant_report

    with pytest.raises(SystemExit, match="report.json"):
        proxy_module.main(["--results", str(tmp_path / "nothing"), "--report-only"])


def test_reuse_baselines_refuses_overrides_the_baselines_read(tmp_path, proxy_module):
    """--reuse-baselines pairs a variant's metanetwork runs with the benchmark's baselines: only honest when no
    override changes what those baselines' finals read."""
    out = tmp_path / "out"
    base = ["--out", str(out), "--results", str(tmp_path / "results")]
    with pytest.raises(SystemExit):  # not a variant
        proxy_module.main([*base, "--reuse-baselines"])
    with pytest.raises(SystemExit, match="no baseline finals"):
        proxy_module.main([*base, "--variant", "v", "--reuse-baselines", "--methods", "metanetwork"])
    # a baseline that ran with a 5-epoch after-pruning fine-tune and no cap
    stage = out / "final" / "seed7" / "control"
    stage.mkdir(parents=True)
    recorded = proxy_module.compose_config("resnet20_on_FashionMNIST", ["task.finetune.after_pruning.epochs=5"])
    OmegaConf.save(recorded, stage / "config.yaml")

    def changing(overrides):
        cfg = proxy_module.compose_config("resnet20_on_FashionMNIST", overrides)
        return proxy_module.overrides_changing_baselines(cfg, out, overrides, ["metanetwork"])

    assert changing(["task.finetune.after_pruning.epochs=5", "seed=1", "task.meta_train.pruner_reg=1",
                     "metanetwork.node_res_ratio=0.01"]) == []
    assert changing(["task.finetune.after_pruning.epochs=9", "method.hard_cap=true", "task.meta_train.epochs=3"]) == \
        ["task.finetune.after_pruning.epochs=9", "method.hard_cap=true"]
    with pytest.raises(SystemExit):
        proxy_module.main([*base, "--variant", "v", "--reuse-baselines", "--methods", "metanetwork",
                           "method.hard_cap=true"])
    # meta-training and metanetwork overrides pass the check and reach the variant (which then needs a selection)
    with pytest.raises(SystemExit, match="finished selection"):
        proxy_module.main([*base, "--variant", "v", "--reuse-baselines", "--methods", "metanetwork",
                           "task.meta_train.pruner_reg=1", "metanetwork.node_res_ratio=0.01"])


def test_reused_baselines_are_the_benchmarks_own_runs(tmp_path, proxy_module, monkeypatch):
    runs = [{"method": m, "seed": s, "target": t} for m in ("control", "sparse_learning", "metanetwork")
            for s in (1, 2) for t in (2.0, 3.0)]
    monkeypatch.setattr(proxy_module, "collect", lambda root: runs)
    got = proxy_module._reused_runs(tmp_path, ["control", "sparse_learning", "depgraph"], [1, 2], [2.0])
    assert sorted((r["method"], r["seed"]) for r in got) == [("control", 1), ("control", 2),
                                                             ("sparse_learning", 1), ("sparse_learning", 2)]
    assert proxy_module._reused_runs(tmp_path, None, [1], [2.0]) == []
    with pytest.raises(SystemExit, match=r"control \(seed 3\)"):  # a seed the benchmark never ran
        proxy_module._reused_runs(tmp_path, ["control"], [1, 3], [2.0])


def test_report_commands_leave_out_this_checkouts_path(proxy_module):
    root = proxy_module.ROOT
    assert proxy_module.shown_command(f"python benchmarks/proxy.py --results {root}/benchmarks/results/x "
                                      "--out /elsewhere/o") == \
        "python benchmarks/proxy.py --results benchmarks/results/x --out /elsewhere/o"
