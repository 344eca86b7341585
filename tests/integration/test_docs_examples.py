"""The code in README.md and docs/ runs, and the manual covers what is installed.

Every fenced ``python`` block runs on its own, in a fresh namespace, in a
temporary directory: a reader who copies one block gets code that runs. A
block that goes on from an earlier one (a tutorial in steps) says so by an
HTML comment on the line just before its fence, and then runs in the
namespace of the page's previous python block that ran::

    <!-- docs-test: continued (why) -->

A block that only illustrates (it needs a model or data the page does not
define) is marked the same way and never runs::

    <!-- docs-test: skip (why) -->

Blocks in other languages (bash, toml) never run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

import actsparse.core as core
from actsparse import cli

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
MARK = re.compile(r"^<!-- docs-test: (skip|continued)\b")
# Fences may be indented (inside a list item); the block is dedented before it runs.
FENCE = re.compile(r"^( *)```(\w*)\s*$")


class Block(NamedTuple):
    line: int
    language: str
    code: str
    #: None, "skip" or "continued": the docs-test comment on the line before the fence
    mark: str | None


def code_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        language, start = match.group(2), i
        previous = MARK.match(lines[i - 1].strip()) if i > 0 else None
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        code = textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"
        blocks.append(Block(start + 1, language, code, previous and previous.group(1)))
        i = end + 1
    return blocks


def runs(path: Path) -> list[list[Block]]:
    """The python blocks to run, grouped by namespace: a block and those that continue it."""
    groups: list[list[Block]] = []
    for block in code_blocks(path):
        if block.language != "python" or block.mark == "skip":
            continue
        if block.mark == "continued":
            assert groups, f"{path}:{block.line}: a continued block needs a python block before it"
            groups[-1].append(block)
        else:
            groups.append([block])
    return groups


def test_the_extractor_finds_blocks_and_marks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n<!-- docs-test: skip (needs data) -->\n"
        "```python\nraise SystemExit\n```\n```bash\nls\n```\n"
        "<!-- docs-test: continued (x from above) -->\n  ```python\n  y = x\n  ```\n"
    )
    assert code_blocks(page) == [
        Block(2, "python", "x = 1\n", None),
        Block(6, "python", "raise SystemExit\n", "skip"),
        Block(9, "bash", "ls\n", None),
        Block(13, "python", "y = x\n", "continued"),
    ]


def test_blocks_run_in_fresh_namespaces_unless_continued(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n```python\ny = 2\n```\n"
        "<!-- docs-test: skip -->\n```python\nz = 1\n```\n"
        "<!-- docs-test: continued (y) -->\n```python\nw = y\n```\n"
    )
    assert [[b.line for b in group] for group in runs(page)] == [[1], [4, 12]]


def test_a_continued_block_needs_a_block_before_it(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: continued -->\n```python\nw = z\n```\n")
    with pytest.raises(AssertionError, match=r"page.md:2: a continued block needs"):
        runs(page)


FILES_WITH_PYTHON = [path for path in DOC_FILES if runs(path)]


def test_there_are_examples_to_run() -> None:
    names = {path.name for path in FILES_WITH_PYTHON}
    assert {"README.md", "quickstart.md", "distributed.md", "strategies.md"} <= names


@pytest.mark.parametrize("path", FILES_WITH_PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plugins_before = set(core.get_plugin_manager().list_name_plugin())
    for group in runs(path):
        namespace: dict[str, object] = {"__name__": "__docs_example__"}
        for block in group:
            compiled = compile(block.code, f"{path.relative_to(ROOT)}:{block.line}", "exec")
            exec(compiled, namespace)  # the documentation's own code
    # an example that registers a plugin must remove it again
    assert set(core.get_plugin_manager().list_name_plugin()) == plugins_before


def test_every_builtin_strategy_has_a_section() -> None:
    """docs/strategies.md has a '## Kind: `name`' heading per built-in strategy."""
    text = (ROOT / "docs" / "strategies.md").read_text()
    registry = core.get_registry()
    missing = []
    for kind in ("aggregate", "reduce", "mask"):
        for entry in registry.entries(kind):
            if entry.distribution != "actsparse-masks":
                continue
            heading = f"## {kind.capitalize()}: `{entry.record.name}`"
            if heading not in text:
                missing.append(heading)
    assert not missing, f"docs/strategies.md lacks {missing}"


STRATEGY_KINDS = ("aggregate", "reduce", "mask")
ROW = re.compile(r"^\| (aggregate|reduce|mask) \| `([^`]+)` \|.*\| ([^|]*) \|$")


def documented_strategies() -> dict[tuple[str, str], str]:
    """(kind, name) -> the keys cell, for every row of the list in docs/strategies.md."""
    text = (ROOT / "docs" / "strategies.md").read_text()
    section = text.split("## At a glance", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            key = (match.group(1), match.group(2))
            assert key not in rows, f"docs/strategies.md lists {key} twice"
            rows[key] = match.group(3)
    return rows


def test_the_list_of_strategies_is_the_registered_builtins() -> None:
    """docs/strategies.md's list holds every built-in strategy, no other, with its keys."""
    registry = core.get_registry()
    builtin = {
        (kind, entry.record.name): entry.record
        for kind in STRATEGY_KINDS
        for entry in registry.entries(kind)
        if entry.distribution == "actsparse-masks"
    }
    rows = documented_strategies()
    assert sorted(set(builtin) - set(rows)) == [], "registered but not in docs/strategies.md"
    assert sorted(set(rows) - set(builtin)) == [], "in docs/strategies.md but not registered"
    for key, record in builtin.items():
        cell = rows[key]
        params = sorted(getattr(record, "params", None) or ())
        if not params:
            assert cell == "none", (key, cell)
        for param in params:
            required = param in getattr(record, "required", ())
            assert f"`{param}`" in cell, (key, param, cell)
            assert (f"`{param}` (required)" in cell) == required, (key, param, cell)


def test_strategies_are_listed_in_one_place() -> None:
    """No other page keeps a table of strategies that could drift from that one."""
    for path in DOC_FILES:
        if path.name == "strategies.md":
            continue
        rows = [line for line in path.read_text().splitlines() if ROW.match(line)]
        assert not rows, f"{path.relative_to(ROOT)} lists strategies itself: {rows[:2]}"


def test_every_cli_command_is_documented() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [c.name for c in cli.COMMANDS if f"## `actsparse {c.name}`" not in text]
    assert not missing, f"docs/cli.md lacks a section for {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if f": {page}" not in nav]
    assert not missing, f"mkdocs.yml nav lacks {missing}"
