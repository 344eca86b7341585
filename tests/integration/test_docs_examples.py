"""The code in README.md and docs/ runs, and the manual covers what is installed.

Every fenced ``python`` block runs, in order, in one namespace per file (so a
later block can use what an earlier one defined), in a temporary directory.
A block that only illustrates (it needs a model or data the page does not
define) is marked by an HTML comment on the line just before its fence::

    <!-- docs-test: skip (why) -->

Blocks in other languages (bash, toml) never run.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import actsparse.core as core
from actsparse import cli

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SKIP_MARK = "<!-- docs-test: skip"
# Fences may be indented (inside a list item); the block is dedented before it runs.
FENCE = re.compile(r"^( *)```(\w*)\s*$")


def code_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """(line, language, code, skipped) for every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        language, start = match.group(2), i
        previous = lines[i - 1].strip() if i > 0 else ""
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        code = textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"
        blocks.append((start + 1, language, code, previous.startswith(SKIP_MARK)))
        i = end + 1
    return blocks


def test_the_extractor_finds_blocks_and_marks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n<!-- docs-test: skip (needs data) -->\n"
        "```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    )
    assert code_blocks(page) == [
        (2, "python", "x = 1\n", False),
        (6, "python", "raise SystemExit\n", True),
        (9, "bash", "ls\n", False),
    ]


FILES_WITH_PYTHON = [
    path
    for path in DOC_FILES
    if any(lang == "python" and not skip for _, lang, _, skip in code_blocks(path))
]


def test_there_are_examples_to_run() -> None:
    names = {path.name for path in FILES_WITH_PYTHON}
    assert {"README.md", "quickstart.md", "distributed.md", "strategies.md"} <= names


@pytest.mark.parametrize("path", FILES_WITH_PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    plugins_before = set(core.get_plugin_manager().list_name_plugin())
    for line, language, code, skipped in code_blocks(path):
        if language != "python" or skipped:
            continue
        compiled = compile(code, f"{path.relative_to(ROOT)}:{line}", "exec")
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


def test_every_cli_command_is_documented() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    missing = [c.name for c in cli.COMMANDS if f"## `actsparse {c.name}`" not in text]
    assert not missing, f"docs/cli.md lacks a section for {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if f": {page}" not in nav]
    assert not missing, f"mkdocs.yml nav lacks {missing}"
