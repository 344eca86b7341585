"""Real entry-point discovery: the first-party plugins and the fixture distribution.

Needs ``tests/fixtures/actsparse-fixture-plugin`` installed (the nox ``tests``
session installs it).
"""

from __future__ import annotations

import importlib.metadata
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import (
    BLOCK_ENV_VAR,
    ENTRY_POINT_GROUP,
    ConfigError,
    MaskStrategy,
    PluginError,
    PluginWarning,
    ReduceStrategy,
    Registry,
    UnknownStrategyError,
    _registry,
    get_registry,
    hookimpl,
    make_plugin_manager,
)

FIXTURE_DIST = "actsparse-fixture-plugin"
BROKEN_MODULE = "actsparse_fixture_plugin.broken"
BREAK_ENV_VAR = "ACTSPARSE_FIXTURE_BREAK"
EXPECTED = {
    "actsparse.masks": "actsparse-masks",
    "actsparse.serialize": "actsparse-serialize",
    "actsparse.cli": "actsparse-cli",
    "fixture": FIXTURE_DIST,
    "fixture-broken": FIXTURE_DIST,
}

try:
    importlib.metadata.distribution(FIXTURE_DIST)
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - environment problem
    pytest.fail(
        f"{FIXTURE_DIST} is not installed: pip install -c constraints.txt "
        "-e tests/fixtures/actsparse-fixture-plugin",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BLOCK_ENV_VAR, raising=False)
    monkeypatch.delenv(BREAK_ENV_VAR, raising=False)


def _break_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BREAK_ENV_VAR, "1")
    # An earlier, successful import would be reused by ep.load(): forget it for this test.
    monkeypatch.delitem(sys.modules, BROKEN_MODULE, raising=False)


def test_entry_points_are_declared() -> None:
    declared = {
        ep.name: ep.dist.name if ep.dist else None
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    }
    for name, dist in EXPECTED.items():
        assert declared.get(name) == dist


def test_discovery_records_distributions_and_versions() -> None:
    pm = make_plugin_manager()
    for name, dist in EXPECTED.items():
        assert pm.get_plugin(name) is not None, name
        assert pm.distributions[name] == (dist, importlib.metadata.version(dist))
    assert pm.get_plugin("fixture").__name__ == "actsparse_fixture_plugin.plugin"


def test_discovered_records_are_tagged_with_their_distribution() -> None:
    registry = Registry.from_plugin_manager(make_plugin_manager())
    version = importlib.metadata.version(FIXTURE_DIST)
    for kind, name in (("mask", "fixture_sign"), ("reduce", "fixture_max")):
        entry = registry.entry(kind, name)
        assert entry.plugin == "fixture"
        assert (entry.distribution, entry.version) == (FIXTURE_DIST, version)
        assert entry.provider == f"plugin 'fixture' ({FIXTURE_DIST} {version})"
    magnitude = registry.entry("mask", "magnitude")
    assert magnitude.plugin == "actsparse.masks"
    assert magnitude.distribution == "actsparse-masks"
    assert registry.entry("serializer", "sparse_coo").distribution == "actsparse-serialize"


def test_fixture_strategies_are_usable_by_name() -> None:
    registry = get_registry()
    sign = registry.resolve("mask", "fixture_sign")
    assert isinstance(sign, MaskStrategy)
    assert sign.params == frozenset()
    sign.check_config({}, layer="fc")
    data = torch.tensor([[-1.5, 0.0, 2.0], [3.0, -0.0, 1e-30]])
    mask = sign(data)
    assert torch.equal(mask, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))
    assert mask.is_floating_point()

    amax = registry.resolve("reduce", "fixture_max")
    assert isinstance(amax, ReduceStrategy)
    assert torch.equal(amax(data), torch.tensor([3.0, 0.0, 2.0]))


def test_fixture_strategies_work_in_a_sparsifier() -> None:
    from actsparse.hooks import ActivationSparsifier

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="fixture_max", mask_fn="fixture_sign"
    )
    sparsifier.register_layer(model[0])
    batches = [torch.randn(4, 5) for _ in range(2)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    sparsifier.step()
    expected = ((batches[0] + batches[1]).amax(dim=0) > 0).float()
    assert torch.equal(sparsifier.get_mask("0"), expected)


def test_a_broken_third_party_plugin_is_warned_about_and_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _break_fixture(monkeypatch)
    with pytest.warns(PluginWarning) as record:
        pm = make_plugin_manager()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1
    assert "'fixture-broken'" in messages[0]
    assert FIXTURE_DIST in messages[0]
    assert "ImportError" in messages[0]
    assert pm.get_plugin("fixture-broken") is None
    assert "fixture-broken" not in pm.distributions
    for name in ("actsparse.masks", "actsparse.serialize", "fixture"):
        assert pm.get_plugin(name) is not None
    registry = Registry.from_plugin_manager(pm)
    assert {"fixture_sign", "magnitude"} <= set(registry.names("mask"))


def test_without_the_break_switch_no_warning_is_emitted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, BROKEN_MODULE, raising=False)
    # PluginWarning is an error under the project's filterwarnings: any warning fails here.
    pm = make_plugin_manager()
    assert pm.get_plugin("fixture-broken") is not None


@pytest.mark.parametrize(
    ("blocked", "gone"),
    [
        ("fixture", {"fixture"}),
        ("fixture,fixture-broken", {"fixture", "fixture-broken"}),
        (" fixture-broken , ,actsparse.serialize ", {"fixture-broken", "actsparse.serialize"}),
    ],
)
def test_block_environment_variable(
    monkeypatch: pytest.MonkeyPatch, blocked: str, gone: set[str]
) -> None:
    monkeypatch.setenv(BLOCK_ENV_VAR, blocked)
    pm = make_plugin_manager()
    for name in EXPECTED:
        if name in gone:
            assert pm.get_plugin(name) is None
            assert pm.is_blocked(name)
            assert name not in pm.distributions
        else:
            assert pm.get_plugin(name) is not None
    registry = Registry.from_plugin_manager(pm)
    assert ("fixture_sign" in registry.names("mask")) == ("fixture" not in gone)
    assert ("sparse_coo" in registry.names("serializer")) == ("actsparse.serialize" not in gone)


def test_blocking_the_broken_plugin_silences_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _break_fixture(monkeypatch)
    monkeypatch.setenv(BLOCK_ENV_VAR, "fixture-broken")
    pm = make_plugin_manager()  # no PluginWarning: it is never imported
    assert pm.get_plugin("fixture") is not None


def test_explicit_blocked_argument_overrides_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(BLOCK_ENV_VAR, "fixture")
    pm = make_plugin_manager(blocked=["actsparse.serialize"])
    assert pm.get_plugin("fixture") is not None
    assert pm.get_plugin("actsparse.serialize") is None


def test_no_entry_points_without_load_entrypoints() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    assert pm.get_plugins() == set()


# ------------------------------------------------- simulated entry points


class FakeDist:
    def __init__(self, name: str, version: str = "9.9") -> None:
        self.name = name
        self.version = version


class FakeEntryPoint:
    def __init__(self, name: str, dist: FakeDist | None, load: Callable[[], Any]) -> None:
        self.name = name
        self.value = f"{name.replace('-', '_')}.plugin"
        self.group = ENTRY_POINT_GROUP
        self.dist = dist
        self._load = load

    def load(self) -> Any:
        return self._load()


def types_module_with_mask(name: str) -> types.ModuleType:
    """A module object that registers one mask strategy called ``name``."""
    module = types.ModuleType(f"fake_{name}")

    @hookimpl
    def actsparse_mask_strategies() -> list[MaskStrategy]:
        return [MaskStrategy(name=name, fn=lambda t: t)]

    module.actsparse_mask_strategies = actsparse_mask_strategies  # type: ignore[attr-defined]
    return module


def _failing_import() -> Any:
    raise ModuleNotFoundError("No module named 'torch_extras'")


def _only(monkeypatch: pytest.MonkeyPatch, *eps: FakeEntryPoint) -> None:
    def entry_points(**kwargs: Any) -> list[FakeEntryPoint]:
        assert kwargs == {"group": ENTRY_POINT_GROUP}
        return list(eps)

    monkeypatch.setattr(_registry.importlib.metadata, "entry_points", entry_points)


@pytest.mark.parametrize(
    "dist_name",
    ["actsparse-masks", "actsparse_serialize", "Actsparse.Core", "actsparse-hooks"],
)
def test_a_first_party_plugin_that_fails_to_import_is_an_error(
    monkeypatch: pytest.MonkeyPatch, dist_name: str
) -> None:
    _only(monkeypatch, FakeEntryPoint("actsparse.masks", FakeDist(dist_name), _failing_import))
    with pytest.raises(PluginError) as info:
        make_plugin_manager()
    message = str(info.value)
    assert "'actsparse.masks'" in message
    assert "torch_extras" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    ("dist", "shown"),
    [
        (FakeDist("someone-elses-masks"), "someone-elses-masks"),
        (FakeDist("actsparse-masks-extra"), "actsparse-masks-extra"),
        (None, "an unknown distribution"),
    ],
)
def test_a_third_party_plugin_that_fails_to_import_is_skipped(
    monkeypatch: pytest.MonkeyPatch, dist: FakeDist | None, shown: str
) -> None:
    good = types_module_with_mask("fake_good_mask")
    _only(
        monkeypatch,
        FakeEntryPoint("bad-one", dist, _failing_import),
        FakeEntryPoint("good-one", FakeDist("good-dist", "1.0"), lambda: good),
    )
    with pytest.warns(PluginWarning, match=r"'bad-one'") as record:
        pm = make_plugin_manager()
    assert shown in str(record[0].message)
    assert pm.get_plugin("bad-one") is None
    assert pm.distributions == {"good-one": ("good-dist", "1.0")}
    assert Registry.from_plugin_manager(pm).names("mask") == ["fake_good_mask"]


def test_an_entry_point_without_a_distribution_loads_untagged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _only(monkeypatch, FakeEntryPoint("orphan", None, lambda: types_module_with_mask("orph")))
    pm = make_plugin_manager()
    assert pm.distributions == {}
    entry = Registry.from_plugin_manager(pm).entry("mask", "orph")
    assert (entry.plugin, entry.distribution) == ("orphan", None)


# ------------------------------------------- two plugins under one name


def _real_entry_points() -> list[Any]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _with_real(monkeypatch: pytest.MonkeyPatch, *first: FakeEntryPoint) -> None:
    """The installed entry points, with ``first`` listed ahead of them."""
    _only(monkeypatch, *first, *_real_entry_points())  # type: ignore[arg-type]


def _impostor() -> FakeEntryPoint:
    return FakeEntryPoint(
        "actsparse.masks", FakeDist("evil-masks", "6.6"), lambda: types_module_with_mask("evil")
    )


def test_a_third_party_plugin_named_like_a_built_in_does_not_displace_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _with_real(monkeypatch, _impostor())
    with pytest.warns(PluginWarning) as record:
        pm = make_plugin_manager()
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1, messages
    assert "'actsparse.masks'" in messages[0]
    assert "evil-masks 6.6" in messages[0]
    assert "actsparse-masks" in messages[0]
    assert f"{BLOCK_ENV_VAR}=evil-masks:actsparse.masks" in messages[0]
    assert pm.distributions["actsparse.masks"][0] == "actsparse-masks"
    registry = Registry.from_plugin_manager(pm)
    assert {"sum", "mean"} <= set(registry.names("aggregate"))
    assert "magnitude" in registry.names("mask")
    assert "evil" not in registry.names("mask")


def test_the_built_in_wins_whatever_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _only(monkeypatch, *_real_entry_points(), _impostor())  # type: ignore[arg-type]
    with pytest.warns(PluginWarning, match="evil-masks"):
        pm = make_plugin_manager()
    assert pm.distributions["actsparse.masks"][0] == "actsparse-masks"


def test_blocking_one_distribution_keeps_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_real(monkeypatch, _impostor())
    monkeypatch.setenv(BLOCK_ENV_VAR, "Evil_Masks:actsparse.masks")
    pm = make_plugin_manager()  # no warning: the impostor is blocked by distribution
    assert pm.distributions["actsparse.masks"][0] == "actsparse-masks"
    assert not pm.is_blocked("actsparse.masks")
    assert "magnitude" in Registry.from_plugin_manager(pm).names("mask")


def test_blocking_the_built_in_by_distribution_loads_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _with_real(monkeypatch, _impostor())
    pm = make_plugin_manager(blocked=["actsparse-masks:actsparse.masks"])
    assert pm.distributions["actsparse.masks"] == ("evil-masks", "6.6")
    assert Registry.from_plugin_manager(pm).names("mask") == ["evil", "fixture_sign"]


def test_a_bare_name_blocks_every_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_real(monkeypatch, _impostor())
    pm = make_plugin_manager(blocked=["actsparse.masks"])
    assert pm.get_plugin("actsparse.masks") is None
    assert "actsparse.masks" not in pm.distributions


def test_a_star_blocks_every_entry_point_of_a_distribution() -> None:
    pm = make_plugin_manager(blocked=[f"{FIXTURE_DIST}:*"])
    assert pm.get_plugin("fixture") is None
    assert pm.get_plugin("fixture-broken") is None
    assert pm.get_plugin("actsparse.masks") is not None


@pytest.mark.parametrize("item", [":fixture", "fixture-dist:", " : "])
def test_a_malformed_block_item_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError, match=BLOCK_ENV_VAR):
        make_plugin_manager(blocked=[item])


def test_two_third_party_plugins_under_one_name_are_both_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = types_module_with_mask("first_mask")
    second = types_module_with_mask("second_mask")
    _only(
        monkeypatch,
        FakeEntryPoint("same", FakeDist("dist-one", "1.0"), lambda: first),
        FakeEntryPoint("same", FakeDist("dist-two", "2.0"), lambda: second),
    )
    with pytest.warns(PluginWarning) as record:
        pm = make_plugin_manager()
    message = str(record[0].message)
    assert "'same'" in message
    assert "dist-one 1.0" in message
    assert "dist-two 2.0" in message
    assert f"{BLOCK_ENV_VAR}=dist-two:same" in message
    assert pm.get_plugin("same") is None
    # blocking one of them settles it
    pm = make_plugin_manager(blocked=["dist-two:same"])
    assert pm.get_plugin("same") is first
    assert pm.distributions["same"] == ("dist-one", "1.0")


def test_unknown_name_says_when_the_built_ins_are_installed_but_not_registered() -> None:
    registry = Registry.from_plugin_manager(make_plugin_manager(blocked=["actsparse.masks"]))
    with pytest.raises(UnknownStrategyError) as info:
        registry.get("mask", "magnitude")
    message = str(info.value)
    assert "actsparse-masks is installed, but its plugin is not registered" in message
    assert BLOCK_ENV_VAR in message
    # with the built-ins registered, a wrong name gets no such note
    with pytest.raises(UnknownStrategyError) as info:
        get_registry().get("mask", "magnitud")
    assert "is installed" not in str(info.value)


def test_an_entry_point_whose_name_is_taken_in_process_is_skipped_with_a_warning() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(types_module_with_mask("in_process"), name="fixture")
    with pytest.warns(PluginWarning, match=rf"'fixture'.*{FIXTURE_DIST}.*in-process"):
        pm.load_entrypoints()
    assert "fixture" not in pm.distributions
    # loading again warns about nothing new
    pm = make_plugin_manager()
    pm.load_entrypoints()
