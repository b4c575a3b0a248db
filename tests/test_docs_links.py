"""The Markdown docs: every relative link and image points at a file or folder that exists, the README stays a front
page (at most 250 lines) and links every page under docs/. Plain text parsing, no torch, well under a second."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
README_MAX_LINES = 250


def markdown_files() -> list[Path]:
    files = [README, *sorted((REPO_ROOT / "docs").rglob("*.md")), REPO_ROOT / "benchmarks" / "README.md"]
    return [f for f in files if f.is_file()]


FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`)(?:(?!\n[ \t]*\n).)*?(?<!`)\1(?!`)", re.DOTALL)  # not across paragraphs
# [text](target) and ![alt](target); the text may hold one level of brackets, the target an optional "title".
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
# [label]: target (a reference-style link definition)
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def strip_code(text: str) -> str:
    """Drop fenced code blocks and inline code spans: brackets and parentheses in code are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    prose = strip_code(text)
    targets = INLINE_LINK.findall(prose) + LINK_DEFINITION.findall(prose)
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def local_path(target: str) -> str | None:
    """The file part of a relative link, or None for an external link or a link to an anchor of the same page."""
    if target.lower().startswith(EXTERNAL) or target.startswith("#"):
        return None
    return unquote(target.split("#", 1)[0].split("?", 1)[0])


def broken_links(md_file: Path) -> list[str]:
    broken = []
    for target in link_targets(md_file.read_text(encoding="utf-8")):
        path = local_path(target)
        if path is None:
            continue
        # "/x" is relative to the repository root (as GitHub renders it), anything else to the file's folder
        resolved = REPO_ROOT / path.lstrip("/") if path.startswith("/") else md_file.parent / path
        if not path or not resolved.exists():
            broken.append(target)
    return broken


@pytest.mark.parametrize("md_file", markdown_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_at_existing_files(md_file):
    broken = broken_links(md_file)
    where = md_file.relative_to(REPO_ROOT)
    assert not broken, f"{where} links to missing files: " + ", ".join(f"({t})" for t in broken)


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / p).resolve() for p in map(local_path, link_targets(README.read_text(encoding="utf-8"))) if p
    }
    pages = sorted((REPO_ROOT / "docs").glob("*.md"))
    missing = [str(p.relative_to(REPO_ROOT)) for p in pages if p.resolve() not in linked]
    assert not missing, "README.md does not link " + ", ".join(missing)


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](page.md) ![img](page.md#top) [web](https://example.org/x) [here](#anchor) [mail](mailto:a@b.c)\n"
        "`[not a link](nowhere.md)`\n\n```\n[not a link](nowhere.md)\n```\n"
        '[gone](missing.md#part) ![gone too](img/missing.png "title")\n[ref]: also_missing.md\n',
        encoding="utf-8",
    )
    assert broken_links(page) == ["missing.md#part", "img/missing.png", "also_missing.md"]
