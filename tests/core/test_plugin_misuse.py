"""A bad plugin is refused with the documented error and changes nothing; entry points
that fail to import are skipped (third party), not imported (blocked) or an error
(first party)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import (
    ENTRY_POINT_GROUP,
    KINDS,
    ActsparseError,
    DuplicateStrategyError,
    MaskStrategy,
    PluginError,
    PluginWarning,
    ReduceStrategy,
    Registry,
    get_plugin_manager,
    get_registry,
    hookimpl,
    make_plugin_manager,
    register_plugin,
)


class _DuplicateMagnitude:
    @hookimpl
    def actsparse_mask_strategies(self) -> list[MaskStrategy]:
        return [MaskStrategy(name="magnitude", fn=lambda data: data)]


class _RaisingHook:
    @hookimpl
    def actsparse_reduce_strategies(self) -> list[Any]:
        raise OSError("cannot read the table")


class _NotAList:
    @hookimpl
    def actsparse_reduce_strategies(self) -> Any:
        return ReduceStrategy(name="max", fn=torch.amax)


def _plugin_snapshot() -> tuple[Any, ...]:
    pm = get_plugin_manager()
    registry = get_registry()
    return (
        registry,
        sorted(name for name, _ in pm.list_name_plugin()),
        {kind: registry.names(kind) for kind in KINDS},
    )


@pytest.mark.parametrize(
    ("plugin", "error", "builtin", "match"),
    [
        (
            _DuplicateMagnitude(),
            DuplicateStrategyError,
            ValueError,
            r"mask strategy 'magnitude' is registered twice: by plugin 'actsparse.masks' "
            r"\(actsparse-masks .*\) and by plugin 'bad'",
        ),
        (
            _RaisingHook(),
            PluginError,
            RuntimeError,
            r"plugin 'bad' raised in actsparse_reduce_strategies\(\): OSError",
        ),
        (
            _NotAList(),
            PluginError,
            RuntimeError,
            r"plugin 'bad': actsparse_reduce_strategies\(\) must return a list",
        ),
    ],
    ids=["duplicate name", "hook raises", "hook returns a record, not a list"],
)
def test_a_bad_plugin_is_refused_and_changes_nothing(
    plugin: object, error: type[Exception], builtin: type[Exception], match: str
) -> None:
    before = _plugin_snapshot()
    with pytest.raises(error, match=match) as info:
        register_plugin(plugin, name="bad")
    assert isinstance(info.value, ActsparseError)
    assert isinstance(info.value, builtin)
    after = _plugin_snapshot()
    assert after[0] is before[0]
    assert after[1:] == before[1:]
    # The built-in strategies still resolve by name.
    from actsparse.hooks import ActivationSparsifier

    model = nn.Sequential(nn.Linear(6, 3))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])


class _EntryPoint:
    """What ``importlib.metadata.entry_points`` yields, for a plugin that fails to import."""

    def __init__(self, name: str, dist: str | None) -> None:
        self.name = name
        self.value = "actsparse_no_such_module:plugin"
        self.dist = None if dist is None else SimpleNamespace(name=dist, version="0.0.1")

    def load(self) -> object:
        raise ImportError("No module named 'actsparse_no_such_module'")


@pytest.fixture
def broken_entry_point(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    real = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))

    def install(dist: str | None) -> None:
        def entry_points(**kwargs: Any) -> list[Any]:
            assert kwargs == {"group": ENTRY_POINT_GROUP}
            return [*real, _EntryPoint("broken", dist)]

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    return install


def test_a_third_party_plugin_that_fails_to_import_is_named_and_skipped(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point("actsparse-contrib")
    with pytest.warns(PluginWarning, match=r"skipped plugin 'broken' .*actsparse-contrib.*"):
        pm = make_plugin_manager(blocked=())
    assert pm.get_plugin("broken") is None
    registry = Registry.from_plugin_manager(pm)
    assert "magnitude" in registry.names("mask")


def test_a_blocked_plugin_is_not_imported(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point(None)
    pm = make_plugin_manager(blocked={"broken"})  # no warning: pytest turns them into errors
    assert pm.get_plugin("broken") is None


def test_a_first_party_plugin_that_fails_to_import_raises(
    broken_entry_point: Callable[[str | None], None],
) -> None:
    broken_entry_point("actsparse-masks")
    with pytest.raises(PluginError, match=r"built-in plugin 'broken'.*failed to import") as info:
        make_plugin_manager(blocked=())
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, ImportError)
