"""Proxy benchmark across independent meta-training runs: is the result a property of one metanetwork?

Each argument is the results folder of one ``benchmarks/proxy.py`` run (its ``report.json``) with its own store and
meta-training (``--generate-seed S seed=S``) and the same final seeds. Per replicate, and over the replicates, this
reports the paired differences of the metanetwork against the control and sparse learning (before pruning, right
after pruning, after the after-pruning fine-tune), the spread between the metanetworks, and the smallest effect the
seeds can detect::

    python benchmarks/proxy_replicates.py benchmarks/results/proxy_seed0 benchmarks/results/proxy_seed1 \\
        benchmarks/results/proxy_seed2 --out benchmarks/results/proxy_replicates

Two summaries over replicates, both in the report:
- between metanetworks: the replicate means d_1..d_k, their sd, and mean ± sd/√k with a t-test on k − 1 degrees of
  freedom: the metanetwork treated as a random draw (what a user training their own metanetwork can expect);
- over seeds: per seed the mean over replicates of (metanetwork_r − baseline), paired over the seeds; the
  metanetworks treated as fixed. Its SE gives the smallest detectable effect (2.8 × SE).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy  # noqa: E402  (the sibling benchmark: its labels and paired statistics)
from scipy.stats import t as student_t  # noqa: E402

BASELINES = ("control", "sparse_learning")
KEYS = (("pre_pruning_acc", "before pruning"), ("just_pruned_acc", "right after pruning"),
        ("pruned_acc", "after fine-tune"))


def load(folder: Path) -> dict:
    path = folder / proxy.REPORT_DATA
    if not path.exists():
        raise SystemExit(f"{path} not found: each argument must be a results folder written by benchmarks/proxy.py")
    data = json.loads(path.read_text())
    data["name"], data["folder"] = folder.name, folder.resolve()
    return data


def differences(data: dict, baseline: str, key: str, target: float) -> dict[int, float]:
    """seed -> metanetwork − baseline (points) of ``key`` at ``target``."""
    def values(method):
        return {r["seed"]: r[key] for r in data["runs"] if r["method"] == method
                and round(float(r["target"]), 4) == round(float(target), 4) and r.get(key) is not None}
    mine, theirs = values("metanetwork"), values(baseline)
    return {s: 100 * (mine[s] - theirs[s]) for s in sorted(mine.keys() & theirs.keys())}


def columns(targets: list[float]) -> list[tuple[str, str, float]]:
    """(key, column name, target) of every compared quantity; before pruning is the same at every target."""
    cols = [("pre_pruning_acc", "before pruning", targets[0])]
    cols += [("just_pruned_acc", f"right after pruning, {t:g}x", t) for t in targets]
    cols += [("pruned_acc", f"after fine-tune, {t:g}x", t) for t in targets]
    return cols


def stats_of(values: list[float]) -> dict:
    mean, sd = proxy.mean_std(values)
    return proxy.paired_stats(mean, sd, len(values))


def summarise(replicates: list[dict]) -> dict:
    targets = sorted(set.intersection(*(set(map(float, r["targets"])) for r in replicates)))
    if not targets:
        raise SystemExit("the replicates share no target speed-up")
    rows = []
    for baseline in BASELINES:
        for key, column, target in columns(targets):
            per_replicate = [differences(r, baseline, key, target) for r in replicates]
            seeds = sorted(set.intersection(*(set(d) for d in per_replicate)))
            if not seeds:
                continue
            means = [statistics.fmean(d[s] for s in seeds) for d in per_replicate]
            over_seeds = [statistics.fmean(d[s] for d in per_replicate) for s in seeds]
            rows.append({"baseline": baseline, "column": column, "key": key, "target": target, "seeds": seeds,
                         "replicates": [stats_of([d[s] for s in seeds]) for d in per_replicate],
                         "between": stats_of(means), "over_seeds": stats_of(over_seeds)})
    return {"targets": targets, "rows": rows}


def _identical_baselines(replicates: list[dict]) -> dict[str, bool]:
    """Whether each baseline's final test accuracies are the same runs in every replicate (same seeds, same
    starts: they do not depend on the store, only on the selected sparse-learning strength)."""
    def runs(r, method):
        return {(x["seed"], x["target"]): x["pruned_acc"] for x in r["runs"] if x["method"] == method}
    return {m: all(runs(r, m) == runs(replicates[0], m) for r in replicates[1:]) for m in BASELINES}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(replicates: list[dict], summary: dict, command: str, out: Path) -> str:
    names = [r["name"] for r in replicates]
    links = [Path(os.path.relpath(r["folder"] / "report.md", out)).as_posix() for r in replicates]
    lines = ["# Proxy benchmark across meta-training runs", "",
             f"Generated by `{command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from the `report.json` of "
             + ", ".join(f"[{n}]({link})" for n, link in zip(names, links)) + ". Hardware of each run: "
             + "; ".join(f"{r['name']}: {r['hardware']}" for r in replicates) + ".", "",
             *([f"**The reading of these numbers** (written by hand, not generated): [{proxy.READING}]({proxy.READING}).",
                ""] if (out / proxy.READING).exists() else []),
             "Each replicate has its own data models and meta-training; the final seeds and their start models are "
             "shared. Differences are metanetwork − baseline in test accuracy (points), paired by seed.", "",
             "## The metanetworks", "",
             "| replicate | command | chosen epoch | validation AUC | control | gain over control | sparse learning "
             "(chosen reg) | gain over sparse learning | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in replicates:
        sel = r["selection"]
        sparse = (sel.get("sparse_learning_scores") or {}).get(str(sel.get("best_sparse_reg")))
        if sparse is None:
            sparse = next((v for k, v in (sel.get("sparse_learning_scores") or {}).items()
                           if float(k) == float(sel.get("best_sparse_reg") or -1)), None)
        gain_sl = sel.get("gain_over_sparse_learning")
        lines.append(f"| {r['name']} | `{r['command'].replace(str(proxy.ROOT) + '/', '')}` | {sel['epoch']} | {sel['score']:.4f} | "
                     f"{sel['control_score']:.4f} | {sel['gain_over_control']:+.4f} | "
                     f"{_num(sparse, '.4f')} ({sel.get('best_sparse_reg')}) | {_num(gain_sl, '+.4f')} | "
                     f"{len(r['seeds'])} |")
    same = _identical_baselines(replicates)
    lines += ["", "Baselines identical across replicates (the same runs, as they should be: they do not read the "
              "store): " + ", ".join(f"{proxy.LABELS[m]}: {'yes' if ok else 'no'}" for m, ok in same.items()) + ".",
              "", "## Per replicate", "", proxy.PAIRED_EXPLANATION, ""]
    for baseline in BASELINES:
        lines += [f"### Meta-pruning − {proxy.LABELS[baseline]}", "",
                  "| column | " + " | ".join(f"{n}: mean (SE), t" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for row in (x for x in summary["rows"] if x["baseline"] == baseline):
            cells = [f"{s['mean']:+.2f} ({_num(s['se'], '.2f')}), {_num(s['t'], '+.2f')}" for s in row["replicates"]]
            lines.append(f"| {row['column']} | " + " | ".join(cells) + " |")
        lines.append("")
    k = len(replicates)
    t_factor = float(student_t.ppf(0.975, k - 1) + student_t.ppf(0.80, k - 1))
    lines += ["## Over the replicates", "",
              f"**Between metanetworks**: n = {k} replicate means; SE = their sd / √n, t on n − 1 degrees of freedom. "
              "The metanetwork is a random draw: what someone meta-training their own can expect. With so few "
              "replicates the t quantiles make the smallest detectable effect much larger than 2.8 × SE: "
              f"(t(0.975, {k - 1}) + t(0.80, {k - 1})) × SE = {t_factor:.1f} × SE.",
              "", "| Difference | column | n | mean | SE | t | p | 95 % CI | MDE (2.8 × SE) | sd between metanetworks |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        base = proxy.paired_row(f"Meta-pruning − {proxy.LABELS[row['baseline']]}", row["column"], row["between"])
        sd = row["between"]["sd"]
        lines.append(base + (" - |" if sd is None else f" {sd:.2f} |"))
    lines += ["", "**Over seeds**: per seed, the mean over the replicates of metanetwork − baseline; n = seeds. The "
              "metanetworks are fixed, so this SE leaves out the spread between them; its MDE is the smallest effect "
              "these seeds detect for these metanetworks.", "",
              proxy.PAIRED_HEADER[0].replace("| target |", "| column |"), proxy.PAIRED_HEADER[1]]
    lines += [proxy.paired_row(f"Meta-pruning − {proxy.LABELS[row['baseline']]}", row["column"], row["over_seeds"])
              for row in summary["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results folders of benchmarks/proxy.py runs (with report.json)")
    parser.add_argument("--out", default=str(proxy.DEFAULT_RESULTS.parent / "proxy_replicates"),
                        help="where report.md and report.json go (default: %(default)s)")
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error("give at least two replicates")
    replicates = [load(Path(folder)) for folder in args.results]
    summary = summarise(replicates)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/proxy_replicates.py",
                        *(Path(f).as_posix() for f in args.results), "--out", Path(args.out).as_posix()])
    proxy.write_json(out / proxy.REPORT_DATA, {"replicates": [r["name"] for r in replicates], **summary})
    (out / "report.md").write_text(render(replicates, summary, command, out.resolve()))
    print(f"proxy replicates report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
