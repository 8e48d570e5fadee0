"""Every relative link in the READMEs points at something in the tree.

Covers README.md and every README.md below it outside benchmarks/results (results READMEs are dated records
of their run; their links are checked when the run is committed). A link is relative when it has no scheme
(`https:`, `mailto:`) and is not a bare `#anchor`; its `#fragment` and `?query` are ignored, and it resolves
against the README's own folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_PARTS = {".git", "node_modules", ".venv", "venv", "build", "dist"}

# [text](target) and [text](target "title"), images too; reference definitions: [label]: target
INLINE = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def readmes(root: Path = ROOT) -> list[Path]:
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    for path in sorted(root.rglob("README.md")):
        rel = path.relative_to(root)
        if path == root / "README.md" or SKIP_PARTS & set(rel.parts) or rel.as_posix().startswith("benchmarks/results/"):
            continue
        found.append(path)
    return found


def relative_links(text: str) -> list[str]:
    """Link targets in markdown text that are relative paths (code blocks and code spans hold no links)."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def broken_links(readme: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in relative_links(readme.read_text()):
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (readme.parent / path).resolve()
        if not resolved.exists() or root.resolve() not in (resolved, *resolved.parents):
            broken.append(target)
    return broken


def test_link_parser_on_known_markdown(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md) [ok dir](docs/) [ok anchor](docs/a.md#part) ![img](docs/a.md \"t\")\n"
        "[web](https://example.com/x.md) [mail](mailto:a@b.c) [here](#section)\n"
        "[missing](docs/b.md) [nested [brackets]](nope/) [outside](../../etc/passwd)\n"
        "`[code span](not/a/link.md)`\n```\n[fenced](not/a/link.md)\n```\n"
        "[ref]: docs/gone.md\n")
    assert sorted(broken_links(readme, tmp_path)) == ["../../etc/passwd", "docs/b.md", "docs/gone.md", "nope/"]


def test_readmes_are_found():
    names = [p.relative_to(ROOT).as_posix() for p in readmes()]
    assert names[0] == "README.md" and "tools/gpu/README.md" in names
    assert not any(n.startswith("benchmarks/results/") for n in names)


@pytest.mark.parametrize("readme", readmes(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(readme):
    broken = broken_links(readme)
    assert not broken, f"{readme.relative_to(ROOT)}: links to nothing in the tree: {broken}"
