"""Every torch.ao path that the docs and docstrings name imports.

actsparse calls itself a drop-in replacement for a class that lives deep in
torch.ao's private modules; a reader copies that path, so it must resolve.
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATH = re.compile(r"\btorch\.ao(?:\.[A-Za-z_]\w*)+")
SOURCES = sorted(
    {
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "packages").rglob("*.md"),
        *(ROOT / "packages").rglob("*.py"),
        *(ROOT / "packages").rglob("*.toml"),
    }
)


def _named_paths() -> list[tuple[str, str]]:
    found = set()
    for source in SOURCES:
        for match in PATH.finditer(source.read_text()):
            found.add((match.group(0), str(source.relative_to(ROOT))))
    return sorted(found)


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module, or an attribute of one, that imports."""
    parts = dotted.split(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.pruning warns that it is experimental
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                if not hasattr(obj, name):
                    return False
                obj = getattr(obj, name)
            return True
    return False


def test_the_resolver_tells_a_real_path_from_a_wrong_one() -> None:
    real = "torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier"
    assert resolves(f"{real}.ActivationSparsifier")
    assert not resolves("torch.ao.pruning._experimental.activation_sparsifier.ActivationSparsifier")


def test_there_are_paths_to_check() -> None:
    assert any("ActivationSparsifier" in path for path, _ in _named_paths())


@pytest.mark.parametrize(("path", "source"), _named_paths())
def test_a_named_torch_ao_path_imports(path: str, source: str) -> None:
    assert resolves(path), f"{source} names {path}, which does not import"
