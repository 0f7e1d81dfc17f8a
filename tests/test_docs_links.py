"""The README stays a front door (at most 150 lines), and every relative link of it and of docs/ resolves: the
file exists and a ``#anchor`` names a heading of its target, slugged as GitHub does."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks: a ``# comment`` in a bash block is no heading."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's heading anchor: markdown links reduced to their text, lower case, everything but letters, digits,
    ``_``, ``-`` and spaces dropped, spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in ``path``; a repeated one also gets GitHub's ``-1``, ``-2`` ... suffixes."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def broken_links(path: Path) -> list[str]:
    """``path``'s relative links whose file is missing or whose ``#anchor`` matches no heading of the target."""
    problems = []
    for target in LINK.findall(CODE_SPAN.sub("", prose(path.read_text()))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{path.name}: {target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{path.name}: {target} (no heading #{anchor} in {resolved.name})")
    return problems


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail to docs/<topic>.md"


def test_every_relative_link_resolves():
    problems = [problem for path in documents(ROOT) for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Run on a cluster (`ray start`)\n\n```bash\n# not a "
                                                "heading\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/guide.md#run-on-a-cluster-ray-start) [gone](docs/missing.md) [bad](docs/guide.md#not-a-heading)"
        " [self](#guide-to-nothing) `[code](nowhere.md)` [web](https://example.com/x#y)\n")
    assert broken_links(tmp_path / "README.md") == [
        f"README.md: docs/missing.md (no file {tmp_path / 'docs' / 'missing.md'})",
        "README.md: docs/guide.md#not-a-heading (no heading #not-a-heading in guide.md)",
        "README.md: #guide-to-nothing (no heading #guide-to-nothing in README.md)"]
