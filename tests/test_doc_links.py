"""Every relative Markdown link in the documentation resolves: README.md, docs/*.md, benchmarks/README.md and
every Markdown file under benchmarks/results/. A link's path must name a file or folder of the repository, and
its ``#anchor`` (in the same file or in a linked Markdown file) a heading there, by GitHub's heading slugs.
Links inside code (fenced blocks, inline code spans) and to other sites are not links and are skipped.
The results index must name every experiment folder under benchmarks/results/."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from helpers import REPO

RESULTS = REPO / "benchmarks" / "results"


def documents() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
             *sorted(RESULTS.rglob("*.md"))]
    return [f for f in files if f.is_file()]


FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets and code spans
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: ...


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link in ``text`` outside code."""
    found = []
    for number, line in prose_lines(text):
        # code spans are not links; inside a link's text they are kept as plain text
        plain = CODE_SPAN.sub(lambda m: "x" * len(m.group(2)), line)
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(plain)]
        match = REFERENCE_DEF.match(plain)
        if match:
            found.append((number, match.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text lower-cased, every character but letters, digits, marks,
    '_', '-' and spaces removed, spaces turned into '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file offers: heading slugs (repeats numbered -1, -2, ... as GitHub does) and
    explicit ``<a name=...>`` / ``id=`` anchors."""
    text = path.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    result = set(EXPLICIT_ANCHOR.findall(text))
    for _number, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """'file:line: target (why)' for every relative link of ``path`` that does not resolve inside ``root``."""
    problems = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        where, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(where)).resolve() if where else path
        label = f"{path.relative_to(root)}:{number}: {target}"
        if where.startswith("/") or not resolved.is_relative_to(root):
            problems.append(f"{label} (leaves the repository)")
        elif not resolved.exists():
            problems.append(f"{label} (no such file or folder)")
        elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
            problems.append(f"{label} (no heading with anchor #{anchor} in {resolved.relative_to(root)})")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text(
        "# Title\n\n## Choosing the checkpoint (`run=select`, `run=visualize`)\n## Twice\n## Twice\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Page\n\n"
                    "[fine](other.md) [folder](../docs/) [same file](#page) [`code` text](other.md#twice-1)\n"
                    "[anchor](other.md#choosing-the-checkpoint-runselect-runvisualize) [web](https://example.com)\n"
                    "`[not a link](missing.md)`\n```\n[also code](missing.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#nope) ![img](figures/a.png) [out](../../etc)\n"
                    "[ref]: gone_too.md\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ", 1)[1].split(" (")[0] for p in problems] == [
        "missing.md", "other.md#nope", "figures/a.png", "../../etc", "gone_too.md"]
    assert "leaves the repository" in problems[3]


def test_slug_follows_github():
    assert slug("Choosing the checkpoint (`run=select`, `run=visualize`)") == \
        "choosing-the-checkpoint-runselect-runvisualize"
    assert slug("Meta-training (`run=meta_train`)") == "meta-training-runmeta_train"
    assert slug("The [reading](x.md) of 2× results") == "the-reading-of-2-results"


def test_results_index_names_every_experiment_folder():
    index = (RESULTS / "README.md").read_text(encoding="utf-8")
    targets = {(RESULTS / t.partition("#")[0]).resolve() for _n, t in links(index) if not EXTERNAL.match(t)}
    folders = [p for p in RESULTS.iterdir() if p.is_dir()]
    folders += [p for p in RESULTS.glob("*/variants/*") if p.is_dir()]
    for folder in folders:
        assert any(t == folder or folder in t.parents for t in targets), f"{folder.relative_to(REPO)} not in the index"
    # each experiment folder has a generated report; a reading, where there is one, is linked from that report
    for report in RESULTS.rglob("report.md"):
        if (report.parent / "reading.md").exists():
            assert "](reading.md)" in report.read_text(encoding="utf-8"), report.relative_to(REPO)
