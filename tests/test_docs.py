"""The documentation holds together: every relative link in README.md and docs/*.md points at a file
(and, with ``#anchor``, at a heading) that exists; README.md stays a short entry page; the data
contracts are cited by their path in the repository, docs/design.md."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_LINES = 160  # the entry page: what it is, data flow, commands, layout, links; details live in docs/
OLD_CITATION = "DESIGN" + ".md"  # spelt in two pieces so this file does not cite it itself

# [text](target) outside code: inline links only (the docs use no reference-style links).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code, where brackets are code, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchor(heading: str) -> str:
    """GitHub's heading slug: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {_anchor(h) for h in headings}


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def test_the_doc_pages_exist():
    names = {p.name for p in DOCS}
    for name in ("design.md", "shards.md", "pipelines.md", "models.md", "training.md", "evaluation.md",
                 "benchmarks.md", "testing.md"):
        assert name in names, f"docs/{name} is missing"


def _broken_links(page: Path) -> list[str]:
    bad = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: -- not checked offline
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            bad.append(f"{target}: no such file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    bad = _broken_links(page)
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## The `bench.py e2e` mode\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#the-benchpy-e2e-mode) [ok](#a-title) [web](https://x.org/y)\n"
                    "# A title\n[gone](missing.md) [bad anchor](other.md#nope)\n"
                    "`[code](not-a-link.md)`\n```\n[fenced](not-a-link-either.md)\n```\n")
    bad = _broken_links(page)
    assert len(bad) == 2 and bad[0].startswith("missing.md: no such file") and bad[1].startswith("other.md#nope")


def test_readme_links_every_doc_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move details to docs/"


def test_design_is_cited_as_docs_design_md():
    """Code and docs name the data contracts by their place in the repository; docs/design.md's own
    text is exempt. Only tracked and untracked-but-not-ignored files count (git ls-files)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert files, "git ls-files listed nothing"
    offenders = []
    for name in files:
        path = ROOT / name
        if name == "docs/design.md" or not path.is_file() or path.suffix not in {".py", ".md", ".txt", ".yaml",
                                                                                   ".toml", ".ini", ".sh", ""}:
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OLD_CITATION in line:
                offenders.append(f"{name}:{i}")
    assert not offenders, f"cite docs/design.md instead of {OLD_CITATION}: " + ", ".join(offenders)
