"""run=report: results.json files of final runs -> the paper's table format, mean ± sample std over seeds."""
import json
import statistics

import pytest

from helpers import tiny_cfg
from stages import execute
from stages.report import ReportError, build_report, find_results, format_stat, group_results

EPOCHS = {"after_init_pruning": 80, "after_metanetwork": 100, "after_pruning": 140}


def structured(seed, base, pruned, speed_up, metanetwork="/mn/epoch_7.pt", protocol="validation", **extra):
    return {"run": "pruning_final", "task": "resnet56_on_CIFAR10", "architecture": "resnet56",
            "method": "group_l2_norm_max_normalizer", "seed": seed, "protocol": protocol,
            "selection": "test" if protocol == "paper" else "val", "metanetwork": metanetwork,
            "metanetwork_task": "resnet56_on_CIFAR10" if metanetwork else None,
            "base_acc": base, "pruned_acc": pruned, "speed_up": speed_up,
            "pruned_flops_percent": 100 * (1 - 1 / speed_up), "target_speed_up": 2.3,
            "finetune_epochs": dict(EPOCHS, after_metanetwork=100 if metanetwork else 0), **extra}


def write(root, name, payload):
    path = root / name / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def sweep(tmp_path):
    """A multirun with 3 metanetwork seeds, 2 baseline seeds, and files the report must ignore."""
    for i, (seed, pruned, speed) in enumerate([(7, 0.9408, 2.30), (8, 0.9356, 2.30), (9, 0.9381, 2.32)]):
        write(tmp_path, f"mn/{i}_seed{seed}", structured(seed, 0.9351, pruned, speed))
    write(tmp_path, "base/0_seed7", structured(7, 0.9351, 0.9346, 2.31, metanetwork=None))
    write(tmp_path, "base/1_seed8", structured(8, 0.9351, 0.9336, 2.33, metanetwork=None))
    write(tmp_path, "pretrain", {"run": "pretrain_final", "metrics": {"test_acc": 0.93}})  # not a final run
    write(tmp_path, "broken", {"run": "pruning_final", "task": "x"})  # incomplete
    return tmp_path


def test_mean_and_sample_std_over_seeds(sweep):
    markdown, results = build_report(sweep)
    assert len(results) == 5
    pruned = [94.08, 93.56, 93.81]
    mean, std = statistics.fmean(pruned), statistics.stdev(pruned)
    assert (round(mean, 2), round(std, 2)) == (93.82, 0.26)  # sample std (n - 1), by hand: sqrt(0.13527 / 2)
    row = next(line for line in markdown.splitlines() if line.startswith("| Meta-Pruning |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:9] == ["Meta-Pruning", "93.51 ± 0.00", "93.82 ± 0.26", "0.31 ± 0.26",
                         f"{statistics.fmean([100 * (1 - 1 / s) for s in (2.3, 2.3, 2.32)]):.1f} ± 0.2%",
                         "2.31 ± 0.01", "2.30", "80+100+140", "val"]
    assert cells[9] == "7, 8, 9"
    base_row = next(line for line in markdown.splitlines() if line.startswith("| No metanetwork (baseline) |"))
    base_cells = [c.strip() for c in base_row.strip("|").split("|")]
    assert base_cells[2] == "93.41 ± 0.07" and base_cells[3] == "-0.10 ± 0.07" and base_cells[7] == "80+0+140"
    assert base_cells[9] == "7, 8"
    # per-run rows as in the paper's tables
    assert markdown.count("| Meta-Pruning | 93.51 | 94.08 | 0.57 | 56.5% | 2.30 |") == 1
    assert "broken" in markdown and "missing" in markdown  # the incomplete file is reported, not silently used
    assert "pretrain" not in markdown.replace("pretrain_final", "")
    assert "†" not in markdown


def test_paper_protocol_is_labelled_and_not_pooled(sweep):
    write(sweep, "paper/0_seed7", structured(7, 0.9351, 0.9420, 2.30, protocol="paper"))
    markdown, _ = build_report(sweep)
    paper_row = next(line for line in markdown.splitlines() if line.startswith("| Meta-Pruning †"))
    assert "| 94.20 |" in paper_row and "test †" in paper_row
    assert "protocol=paper" in markdown and "TEST" in markdown
    # the honest group is unchanged by the paper-protocol run
    assert "| Meta-Pruning | 93.51 ± 0.00 | 93.82 ± 0.26 |" in markdown


def test_groups_split_by_target_and_metanetwork():
    results = [dict(structured(s, 0.9, 0.9, 2.3), _path=f"/r{s}") for s in (7, 8)]
    results += [dict(structured(7, 0.9, 0.9, 2.9, target_speed_up=2.9), _path="/t")]
    results += [dict(structured(7, 0.9, 0.9, 2.3, metanetwork="/other.pt"), _path="/o")]
    groups = group_results(results)
    assert sorted(len(g.runs) for g in groups) == [1, 1, 2]


def test_unstructured_results_get_their_own_table(tmp_path):
    for seed, pruned in ((7, 0.93), (8, 0.92)):
        write(tmp_path, f"u{seed}", {
            "run": "unstructured_pruning_final", "task": "resnet56_on_CIFAR10", "architecture": "resnet56",
            "method": "unstructured_l1_norm", "seed": seed, "protocol": "validation", "selection": "val",
            "metanetwork": None, "base_acc": 0.94, "pruned_acc": pruned, "sparsity": 0.8,
            "macs_reduction_percent": 75.0, "pruning": "L1 80%",
            "finetune_epochs": {"after_metanetwork": 0, "after_pruning": 140}})
    markdown, _ = build_report(tmp_path)
    assert "## Unstructured pruning" in markdown and "## Structured pruning" not in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| No metanetwork (baseline), unstructured"))
    assert "| 92.50 ± 0.71 |" in row and "| 80.0 ± 0.0% |" in row and "| L1 80% |" in row


def test_format_stat_single_value_has_no_std():
    assert format_stat([93.5]) == "93.50" and format_stat([1.0, 2.0], 1, "%") == "1.5 ± 0.7%"


def test_report_run_writes_markdown(sweep, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("report")
    summary = execute(tiny_cfg(["run=report", f"report.dir={sweep}"]), out)
    text = (out / "report.md").read_text()
    assert summary["runs"] == 5 and "| Meta-Pruning | 93.51 ± 0.00 | 93.82 ± 0.26 |" in text
    assert "93.82 ± 0.26" in capsys.readouterr().out


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(ReportError, match="no pruning_final"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="not a folder"):
        find_results(tmp_path / "missing")
    with pytest.raises(ReportError, match="report.dir"):
        execute(tiny_cfg(["run=report"]), tmp_path / "out")


def test_baselines_are_grouped_and_labelled_by_what_ran_before_pruning(tmp_path):
    # same task, target, epochs and protocol: only pre_pruning (and the sparse-learning strength) differ
    same = dict(metanetwork=None, finetune_epochs=dict(EPOCHS))
    for seed in (7, 8):
        write(tmp_path, f"none/{seed}", structured(seed, 0.93, 0.90, 2.3, pre_pruning="none", **same))
        write(tmp_path, f"ft/{seed}", structured(seed, 0.93, 0.91, 2.3, pre_pruning="finetune", **same))
        write(tmp_path, f"sl/{seed}", structured(seed, 0.93, 0.92, 2.3, pre_pruning="sparse_learning",
                                                 sparse_learning={"reg": 0.01, "alpha": 16.0, "bias": False}, **same))
        write(tmp_path, f"sl5/{seed}", structured(seed, 0.93, 0.94, 2.3, pre_pruning="sparse_learning",
                                                  sparse_learning={"reg": 0.5, "alpha": 16.0, "bias": False}, **same))
    write(tmp_path, "mn/7", structured(7, 0.93, 0.95, 2.3, pre_pruning="metanetwork"))
    markdown, results = build_report(tmp_path)
    groups = group_results(results)
    assert sorted((g.first.get("pre_pruning"), (g.first.get("sparse_learning") or {}).get("reg"), len(g.runs))
                  for g in groups) == [("finetune", None, 2), ("metanetwork", None, 1), ("none", None, 2),
                                       ("sparse_learning", 0.01, 2), ("sparse_learning", 0.5, 2)]
    for group in groups:  # a group never mixes what ran before pruning
        assert len({(r.get("pre_pruning"), str(r.get("sparse_learning"))) for r in group.runs}) == 1
    table = markdown.split("Per run:")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Method")}
    labels = {label: next(k for k in rows if label in k) for label in
              ("control", "sparse learning (reg 0.01,", "sparse learning (reg 0.5,", "baseline", "Meta-Pruning")}
    assert len(set(labels.values())) == 5 == len(rows)
    assert "sparse learning" not in labels["control"] and "control" not in labels["baseline"]
    assert rows[labels["baseline"]][2] == "90.00 ± 0.00" and rows[labels["control"]][2] == "91.00 ± 0.00"
    assert rows[labels["sparse learning (reg 0.01,"]][2] == "92.00 ± 0.00"
    assert rows[labels["sparse learning (reg 0.5,"]][2] == "94.00 ± 0.00"
    for label in ("control", "sparse learning (reg 0.01,", "baseline"):
        assert rows[labels[label]][-1] == "7, 8"
