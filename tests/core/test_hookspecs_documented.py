"""Meta-test: every hook is documented (docstring with an example), tested and in the guide."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from actsparse.core import KINDS, PROJECT_NAME, _hookspecs, make_plugin_manager

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
PLUGIN_GUIDE = ROOT / "docs" / "plugins.md"
SPEC_ATTR = f"{PROJECT_NAME}_spec"

HOOKSPECS = {
    name: obj
    for name, obj in vars(_hookspecs).items()
    if inspect.isfunction(obj) and hasattr(obj, SPEC_ATTR)
}


def _test_sources() -> dict[Path, str]:
    this = Path(__file__).resolve()
    return {
        path: path.read_text(encoding="utf-8")
        for path in TESTS.rglob("test_*.py")
        if path.resolve() != this
    }


def test_hookspecs_are_found() -> None:
    assert HOOKSPECS, "no hookspec found in actsparse.core._hookspecs"
    # every hook the registry calls is a hookspec, and the manager knows each one
    assert {kind.hook for kind in KINDS.values()} <= set(HOOKSPECS)
    pm = make_plugin_manager(load_entrypoints=False)
    for name in HOOKSPECS:
        assert getattr(pm.hook, name).has_spec()


@pytest.mark.parametrize("hook", sorted(HOOKSPECS))
def test_hookspec_docstring_has_an_example(hook: str) -> None:
    doc = inspect.getdoc(HOOKSPECS[hook])
    assert doc, f"{hook} has no docstring"
    assert "Example" in doc, f"{hook}'s docstring has no Example"
    example = doc.split("Example", 1)[1]
    assert "@hookimpl" in example
    assert f"def {hook}(" in example


@pytest.mark.parametrize("hook", sorted(HOOKSPECS))
def test_hook_is_used_in_a_test(hook: str) -> None:
    users = [path for path, text in _test_sources().items() if hook in text]
    assert users, f"no test under tests/ mentions {hook}"


@pytest.mark.parametrize("hook", sorted(HOOKSPECS))
def test_hook_is_in_the_plugin_guide(hook: str) -> None:
    if not PLUGIN_GUIDE.exists():
        pytest.xfail("docs/plugins.md not written yet")
    assert hook in PLUGIN_GUIDE.read_text(encoding="utf-8")
