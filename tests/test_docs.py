"""The docs stay true to the tree: the module map in docs/modules.md names every raysr module and
nothing else, every relative link in README.md and docs/*.md reaches a file (and a heading, when it
names one), and the README stays a front page."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raysr"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MODULE_MAP = DOCS / "modules.md"
README_MAX_LINES = 300

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)


def package_modules() -> set[str]:
    """Every module under raysr/, from the files (nothing imported). ``__main__`` modules are left
    out: each only calls its package's command line, which the map lists as the package."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def mapped_modules() -> list[str]:
    """The modules in the first column of the module map's table (``| `raysr.x` | … |`` rows)."""
    return re.findall(r"^\|\s*`(raysr(?:\.\w+)*)`\s*\|", MODULE_MAP.read_text(), flags=re.MULTILINE)


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown text: lower case, punctuation other than
    ``-`` and ``_`` dropped, spaces to ``-``, repeats suffixed ``-1``, ``-2``…"""
    anchors, seen = set(), {}
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = m.group(1).lower()
        slug = "".join(c for c in title if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", text)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_module_map_names_every_module_under_raysr():
    missing = sorted(package_modules() - set(mapped_modules()))
    assert not missing, f"docs/modules.md lacks {missing}: add a row saying what each owns"


def test_every_module_in_the_map_exists():
    mapped = mapped_modules()
    assert len(mapped) > 20, "docs/modules.md: the table of modules was not found"
    doubled = sorted({m for m in mapped if mapped.count(m) > 1})
    assert not doubled, f"docs/modules.md lists {doubled} more than once"
    gone = sorted(set(mapped) - package_modules())
    assert not gone, f"docs/modules.md lists modules that do not exist under raysr/: {gone}"


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for page in doc_pages():
        for target in relative_links(page.read_text()):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not file.exists():
                broken.append(f"{where}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{where}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_helpers_find_links_and_anchors():
    text = ("# Scale out: AWS, or KubeRay\n## 2. Point training at them\n## Evaluate on Set5 / Set14-style folders\n"
            "## Notes\n## Notes\n```\n# not a heading\n[x](inside.md)\n```\n"
            "See [a](a.md#notes-1), [b](https://x.org/b.md), ![img](pic.png) and [c](#scale-out-aws-or-kuberay).\n")
    assert heading_anchors(text) == {"scale-out-aws-or-kuberay", "2-point-training-at-them",
                                     "evaluate-on-set5--set14-style-folders", "notes", "notes-1"}
    assert relative_links(text) == ["a.md#notes-1", "#scale-out-aws-or-kuberay"]


def test_the_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it a front page (<= {README_MAX_LINES}) and move the rest to docs/")
