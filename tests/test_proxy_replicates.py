"""benchmarks/proxy_replicates.py: the summary over independent meta-training runs, on hand-made report.json files
whose differences are known."""
import json
import statistics

import pytest
from scipy import stats

from helpers import REPO, load_script

SEEDS = (7, 8, 9, 10)
TARGETS = (2.0, 3.0)
# per replicate: how far its metanetwork lands above the control, right after pruning and after the fine-tune
OFFSETS = {"rep_a": 0.010, "rep_b": -0.004, "rep_c": 0.020}


@pytest.fixture(scope="module")
def module():
    return load_script(REPO / "benchmarks" / "proxy_replicates.py", "proxy_replicates_script")


def _report(name, offset, control_shift=0.0):
    runs = []
    for seed in SEEDS:
        for target in TARGETS:
            noise = 0.001 * ((seed * 7 + int(target) * 3) % 5)  # differs by seed, the same in every replicate
            base = 0.80 - 0.01 * target + noise
            runs.append({"method": "control", "seed": seed, "target": target, "pruned_acc": base + control_shift,
                         "just_pruned_acc": 0.2, "pre_pruning_acc": 0.81})
            runs.append({"method": "sparse_learning", "seed": seed, "target": target, "pruned_acc": base + 0.01,
                         "just_pruned_acc": 0.3, "pre_pruning_acc": 0.812})
            runs.append({"method": "metanetwork", "seed": seed, "target": target,
                         "pruned_acc": base + offset + 0.002 * (seed % 3),
                         "just_pruned_acc": 0.2 + 4 * offset, "pre_pruning_acc": 0.805 + 0.001 * seed})
    return {"task": "t", "command": f"python benchmarks/proxy.py --generate-seed {name}", "hardware": "h",
            "seeds": list(SEEDS), "targets": list(TARGETS), "runs": runs,
            "selection": {"epoch": 4, "score": 0.3 + offset, "control_score": 0.2, "gain_over_control": 0.1 + offset,
                          "sparse_learning_scores": {"0.005": 0.31}, "best_sparse_reg": 0.005,
                          "gain_over_sparse_learning": offset - 0.01}}


def _write(tmp_path, shifts=None):
    folders = []
    for name, offset in OFFSETS.items():
        folder = tmp_path / "results" / name
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps(_report(name, offset, (shifts or {}).get(name, 0.0))))
        folders.append(folder)
    return folders


def test_summary_matches_hand_computed_statistics(tmp_path, module):
    folders = _write(tmp_path)
    out = tmp_path / "results" / "replicates"
    assert module.main([*map(str, folders), "--out", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["replicates"] == list(OFFSETS) and data["targets"] == list(TARGETS)
    row = next(r for r in data["rows"] if r["baseline"] == "control" and r["column"] == "after fine-tune, 2x")
    per_replicate = {name: [100 * (offset + 0.002 * (s % 3)) for s in SEEDS] for name, offset in OFFSETS.items()}
    for got, (name, diffs) in zip(row["replicates"], per_replicate.items()):
        assert got["mean"] == pytest.approx(statistics.fmean(diffs)), name
        assert got["se"] == pytest.approx(statistics.stdev(diffs) / len(diffs) ** 0.5), name
    means = [statistics.fmean(d) for d in per_replicate.values()]
    assert row["between"]["mean"] == pytest.approx(statistics.fmean(means))
    assert row["between"]["p"] == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue)
    over_seeds = [statistics.fmean(d[i] for d in per_replicate.values()) for i in range(len(SEEDS))]
    assert row["over_seeds"]["t"] == pytest.approx(stats.ttest_1samp(over_seeds, 0.0).statistic)
    assert row["over_seeds"]["mde"] == pytest.approx(2.8 * statistics.stdev(over_seeds) / len(SEEDS) ** 0.5)
    # before pruning: one column, compared once per baseline
    columns = [r["column"] for r in data["rows"] if r["baseline"] == "sparse_learning"]
    assert columns == ["before pruning", "right after pruning, 2x", "right after pruning, 3x",
                       "after fine-tune, 2x", "after fine-tune, 3x"]
    before = next(r for r in data["rows"] if r["baseline"] == "sparse_learning" and r["column"] == "before pruning")
    assert before["between"]["mean"] == pytest.approx(100 * statistics.fmean(0.805 + 0.001 * s - 0.812 for s in SEEDS))

    report = (out / "report.md").read_text()
    assert "[rep_a](../rep_a/report.md)" in report
    assert "Equal-budget fine-tune (control): yes" in report.replace("DepGraph + equal", "Equal")
    assert "| rep_c | `python benchmarks/proxy.py --generate-seed rep_c` | 4 | 0.3200 |" in report
    assert "= 5.4 × SE" in report  # (t(0.975, 2) + t(0.80, 2)) for three replicates
    assert "reading.md" not in report
    (out / "reading.md").write_text("# Reading\n")  # a hand-written reading beside the report is linked
    module.main([*map(str, folders), "--out", str(out)])
    assert "](reading.md)" in (out / "report.md").read_text()


def test_baselines_that_differ_between_replicates_are_flagged(tmp_path, module):
    folders = _write(tmp_path, shifts={"rep_b": 0.001})
    out = tmp_path / "summary"
    module.main([*map(str, folders), "--out", str(out)])
    assert "DepGraph + equal-budget fine-tune (control): no" in (out / "report.md").read_text()


def test_clear_errors(tmp_path, module):
    folders = _write(tmp_path)
    with pytest.raises(SystemExit):  # one replicate is no spread
        module.main([str(folders[0]), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="report.json not found"):
        module.main([str(folders[0]), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
