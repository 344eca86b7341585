"""The layer configuration's key names are spelled in actsparse.core only.

Every other package reads them from core's constants (``SPARSE_CONFIG_KEY``,
``CONFIG_KEYS``, ...), so a key is renamed in one place. Docstrings and
messages may name a key; code may not use the literal as a key.
"""

from __future__ import annotations

import ast
from pathlib import Path

from actsparse.core import CONFIG_KEYS

ROOT = Path(__file__).resolve().parents[2]


def _literal_keys(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants equal to a config key, used as code (not a docstring or message)."""
    found = []
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    in_fstrings = {
        id(value)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for value in node.values
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and node.value in CONFIG_KEYS
            and id(node) not in docstrings
            and id(node) not in in_fstrings
        ):
            found.append((node.lineno, node.value))
    return found


def test_no_package_but_core_spells_a_config_key() -> None:
    offenders = []
    for path in sorted(ROOT.glob("packages/*/src/actsparse/**/*.py")):
        if "actsparse-core" in path.parts:
            continue
        for line, key in _literal_keys(ast.parse(path.read_text())):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {key!r}")
    assert not offenders, "\n".join(offenders)


def test_a_spelled_key_is_found() -> None:
    tree = ast.parse('"""mask_fn is documented here."""\nconfig = {"mask_fn": 1}\n')
    assert _literal_keys(tree) == [(2, "mask_fn")]
