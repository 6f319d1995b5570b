"""The README and docs/ stay true to the repository: every relative link reaches a file and
heading that exist, every environment variable the code reads is documented, and every make
target the docs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from local.template import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert broken == []


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    code = "\n".join(
        p.read_text()
        for p in [*(ROOT / "layers/hermes/hermes").rglob("*.py"), *(ROOT / "local").rglob("*.py")]
    )
    read = set(re.findall(r"[\"'](HERMES_[A-Z_]+)[\"']", code))
    documented = "\n".join(p.read_text() for p in PAGES)
    assert sorted(v for v in read if v not in documented) == []


def test_every_make_target_the_docs_name_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"`make ([a-z][a-z-]*)", page.read_text()))
    assert sorted(named - targets) == []
