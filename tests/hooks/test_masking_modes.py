"""The seam between a layer and its masking mode, and the plugin contract it declares."""

from __future__ import annotations

import ast
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import (
    AggregateStrategy,
    ConfigError,
    MaskStrategy,
    StateError,
    StrategyError,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier

PACKAGES = Path(__file__).resolve().parents[2] / "packages"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGES.glob("*/src/actsparse/*/*.py")):
        package = path.parent.name
        name = f"actsparse.{package}" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _runtime_imports(tree: ast.Module) -> set[str]:
    """The actsparse modules a module imports when it runs (not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actsparse"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("actsparse"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_module_of_ours_imports_one_that_imports_it_back() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(tree) & modules.keys() for name, tree in modules.items()}
    # a package's __init__ re-exports its modules; cycles through it are the import system's
    graph = {n: {d for d in deps if d.count(".") != 1} for n, deps in graph.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return [*path, dep]
                if dep not in path:
                    stack.append((dep, [*path, dep]))
        return None

    cycles = [c for name in graph if (c := cycle_from(name))]
    assert not cycles, cycles


def _private_attributes_by_module(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    owned: dict[str, set[str]] = {}
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owned.setdefault(node.attr, set()).add(name)
    return owned


def test_no_module_reads_another_modules_private_attributes() -> None:
    modules = _modules()
    owned = _private_attributes_by_module(modules)
    offences = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in owned
                # torch's own private members (``tensor._indices()``) are not ours
                and not hasattr(torch.Tensor, node.attr)
                and not hasattr(nn.Module, node.attr)
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and name not in owned[node.attr]
            ):
                offences.append(f"{name}:{node.lineno} reads .{node.attr} of {owned[node.attr]}")
    assert not offences, offences


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def _plugin(**hooks: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{k: hookimpl(v) for k, v in hooks.items()})


def _level_threshold(histogram: Any, level: float) -> tuple[float, float, float]:
    return float(level), float(level), 0.0


@pytest.fixture
def custom_threshold() -> Iterator[None]:
    def masks() -> list[MaskStrategy]:
        return [
            MaskStrategy(
                name="test_level_threshold",
                fn=_level_threshold,
                params={"level"},
                required={"level"},
                dynamic=True,
                target_key="level",
            )
        ]

    def aggregates() -> list[AggregateStrategy]:
        return [AggregateStrategy(name="test_count", fn=lambda acc, x: acc + x.abs().sum())]

    name = register_plugin(
        _plugin(actsparse_mask_strategies=masks, actsparse_aggregate_strategies=aggregates),
        name="test-custom-threshold",
    )
    try:
        yield
    finally:
        unregister_plugin(name=name)


def test_retarget_moves_the_key_the_strategy_declares(custom_threshold: None) -> None:
    model = _model()
    s = ActivationSparsifier(model, "test_count", "identity", "test_level_threshold", level=0.2)
    s.register_layer(model[2])
    model(torch.randn(3, 8))
    s.step()
    assert s.thresholds["2"].target == pytest.approx(0.2)
    s.retarget({"2": 0.4})
    assert s.thresholds["2"].threshold == pytest.approx(0.4)
    assert s.data_groups["2"]["sparse_config"] == {"level": 0.4}


def test_valid_positions_refuse_an_aggregate_that_does_not_take_them(
    custom_threshold: None,
) -> None:
    model = _model()
    s = ActivationSparsifier(model, "test_count", "identity", "test_level_threshold", level=0.2)
    s.register_layer(model[2])
    with (
        pytest.raises(ConfigError, match=r"'2' \('test_count'\) do not take valid positions"),
        s.valid_positions(torch.ones(3, dtype=torch.bool)),
    ):
        pass  # pragma: no cover


def test_a_dynamic_strategy_without_target_key_cannot_be_retargeted() -> None:
    def masks() -> list[MaskStrategy]:
        return [
            MaskStrategy(name="test_fixed", fn=_level_threshold, params={"level"}, dynamic=True)
        ]

    name = register_plugin(_plugin(actsparse_mask_strategies=masks), name="test-fixed")
    try:
        model = _model()
        s = ActivationSparsifier(model, "abs_histogram", "identity", "test_fixed", level=0.3)
        s.register_layer(model[2])
        model(torch.randn(3, 8))
        s.step()
        with pytest.raises(StateError, match="declares no target_key"):
            s.retarget({"2": 0.5})
    finally:
        unregister_plugin(name=name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_key": "level"}, "only meaningful with dynamic=True"),
        ({"target_key": "not an identifier", "dynamic": True}, "parameter name"),
        ({"target_key": "other", "dynamic": True, "params": {"level"}}, "missing from"),
    ],
)
def test_target_key_is_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MaskStrategy(name="m", fn=_level_threshold, **kwargs)


def test_takes_valid_is_declared_by_the_histogram() -> None:
    from actsparse.core import get_registry

    assert get_registry().get("aggregate", "abs_histogram").takes_valid is True
    assert get_registry().get("mask", "target_threshold").target_key == "sparsity_level"


@pytest.mark.parametrize("mask_fn", ["magnitude", "target_threshold"])
def test_both_modes_report_a_failing_aggregate_the_same_way(mask_fn: str) -> None:
    def boom(acc: Any, x: Any, **options: Any) -> Any:
        raise ZeroDivisionError("boom")

    model = _model()
    aggregate = "sum" if mask_fn == "magnitude" else "abs_histogram"
    s = ActivationSparsifier(model, aggregate, "identity", mask_fn, sparsity_level=0.5)
    s.register_layer(model[2], aggregate_fn=boom)
    with pytest.raises(StrategyError, match=r"layer '2': aggregate strategy .* raised during"):
        model(torch.randn(2, 8))
