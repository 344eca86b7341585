"""The registry: isolated managers, validation of hook results, lookups and the global manager."""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import pluggy
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from actsparse.core import (
    KINDS,
    AggregateStrategy,
    ConfigError,
    DuplicateStrategyError,
    Entry,
    KernelStrategy,
    MaskStrategy,
    PluginError,
    ReduceStrategy,
    Registry,
    Serializer,
    UnknownStrategyError,
    get_plugin_manager,
    get_registry,
    hookimpl,
    make_plugin_manager,
    register_plugin,
    unregister_plugin,
)
from actsparse.core._unknown import BUILTIN_NAMES

HOOKS = {
    "aggregate": "actsparse_aggregate_strategies",
    "reduce": "actsparse_reduce_strategies",
    "mask": "actsparse_mask_strategies",
    "serializer": "actsparse_serializers",
    "kernel": "actsparse_kernels",
}
PACKAGES = {
    "aggregate": "actsparse-masks",
    "reduce": "actsparse-masks",
    "mask": "actsparse-masks",
    "serializer": "actsparse-serialize",
    "kernel": "actsparse-hooks",
}
LABELS = {
    "aggregate": "aggregate strategy",
    "reduce": "reduce strategy",
    "mask": "mask strategy",
    "serializer": "serializer",
    "kernel": "kernel",
}


def _fold(acc: Any, x: Any) -> Any:
    return acc


def _ident(x: Any) -> Any:
    return x


def record(kind: str, name: str, fn: Callable[..., Any] | None = None) -> Any:
    """A valid record of ``kind`` named ``name``."""
    if kind == "aggregate":
        return AggregateStrategy(name=name, fn=fn or _fold)
    if kind == "reduce":
        return ReduceStrategy(name=name, fn=fn or _ident)
    if kind == "mask":
        return MaskStrategy(name=name, fn=fn or _ident)
    if kind == "kernel":
        return KernelStrategy(name=name, supports=fn or _ident)
    return Serializer(name=name, dumps=fn or _ident, loads=_ident)


def plugin(**hooks: Callable[[], Any]) -> types.SimpleNamespace:
    """A plugin object whose hooks (by kind) return what the given functions return."""
    ns = types.SimpleNamespace()
    for kind, body in hooks.items():
        impl = hookimpl(_named(HOOKS[kind], body))
        setattr(ns, HOOKS[kind], impl)
    return ns


def _named(name: str, body: Callable[[], Any]) -> Callable[[], Any]:
    def hook() -> Any:
        return body()

    hook.__name__ = name
    return hook


def returning(kind: str, *names: str) -> types.SimpleNamespace:
    return plugin(**{kind: lambda: [record(kind, n) for n in names]})


def registry_of(*plugins: tuple[str, object]) -> Registry:
    pm = make_plugin_manager(load_entrypoints=False)
    for name, obj in plugins:
        pm.register(obj, name=name)
    return Registry.from_plugin_manager(pm)


kinds = st.sampled_from(list(KINDS))
record_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12
).filter(lambda s: s == s.strip())


# --------------------------------------------------------------- isolation


def test_kinds_are_the_five_hooks() -> None:
    assert {key: kind.hook for key, kind in KINDS.items()} == HOOKS
    assert {key: kind.package for key, kind in KINDS.items()} == PACKAGES


def test_isolated_manager_has_no_plugins_and_an_empty_registry() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    assert pm.get_plugins() == set()
    assert pm.distributions == {}
    registry = Registry.from_plugin_manager(pm)
    for kind in KINDS:
        assert registry.names(kind) == []
        assert registry.entries(kind) == []


def test_isolated_managers_are_independent() -> None:
    first = make_plugin_manager(load_entrypoints=False)
    second = make_plugin_manager(load_entrypoints=False)
    first.register(returning("mask", "only_here"), name="mine")
    assert Registry.from_plugin_manager(first).names("mask") == ["only_here"]
    assert Registry.from_plugin_manager(second).names("mask") == []
    assert "only_here" not in get_registry().names("mask")


@given(
    kind=kinds,
    names=st.lists(record_names, unique=True, max_size=6),
    split=st.integers(0, 6),
)
def test_records_of_several_plugins_are_registered_and_tagged(
    kind: str, names: list[str], split: int
) -> None:
    left, right = names[:split], names[split:]
    registry = registry_of(("left", returning(kind, *left)), ("right", returning(kind, *right)))
    assert registry.names(kind) == sorted(names)
    assert [e.record.name for e in registry.entries(kind)] == sorted(names)
    for name in names:
        entry = registry.entry(kind, name)
        assert entry.plugin == ("left" if name in left else "right")
        assert entry.distribution is None
        assert entry.version is None
        assert entry.provider == f"plugin {entry.plugin!r}"
        assert registry.get(kind, name) is entry.record
    for other in set(KINDS) - {kind}:
        assert registry.names(other) == []


def test_one_plugin_may_implement_every_hook() -> None:
    obj = plugin(**{kind: (lambda k=kind: [record(k, "same")]) for kind in KINDS})
    registry = registry_of(("all", obj))
    for kind in KINDS:
        # the same name in different kinds is no clash
        assert registry.names(kind) == ["same"]
        assert isinstance(registry.get(kind, "same"), KINDS[kind].record_type)


def test_a_hook_returning_none_or_an_empty_list_adds_nothing() -> None:
    registry = registry_of(("none", plugin(mask=lambda: None)), ("empty", plugin(mask=lambda: [])))
    assert registry.names("mask") == []


def test_a_tuple_is_a_valid_result() -> None:
    registry = registry_of(("tup", plugin(reduce=lambda: (record("reduce", "t"),))))
    assert registry.names("reduce") == ["t"]


def test_add_with_a_distribution_tags_the_entry() -> None:
    registry = Registry()
    rec = record("mask", "dist_mask")
    registry.add("mask", rec, plugin="p", distribution=("some-dist", "1.2.3"))
    entry = registry.entry("mask", "dist_mask")
    assert entry == Entry(rec, "p", "some-dist", "1.2.3")
    assert entry.provider == "plugin 'p' (some-dist 1.2.3)"


# -------------------------------------------------------------- duplicates


@given(kind=kinds, name=record_names)
def test_duplicates_across_plugins_are_refused_naming_both(kind: str, name: str) -> None:
    with pytest.raises(DuplicateStrategyError) as info:
        registry_of(("alpha", returning(kind, name)), ("beta", returning(kind, name)))
    message = str(info.value)
    assert f"{LABELS[kind]} {name!r}" in message
    assert "'alpha'" in message
    assert "'beta'" in message


def test_duplicates_within_one_plugin_are_refused() -> None:
    with pytest.raises(DuplicateStrategyError, match=r"'twice'.*plugin 'solo'.*plugin 'solo'"):
        registry_of(("solo", returning("aggregate", "twice", "twice")))


def test_duplicate_message_names_the_distribution() -> None:
    registry = Registry()
    registry.add("mask", record("mask", "m"), plugin="a", distribution=("dist-a", "1.0"))
    with pytest.raises(DuplicateStrategyError) as info:
        registry.add("mask", record("mask", "m"), plugin="b", distribution=("dist-b", "2.0"))
    assert "plugin 'a' (dist-a 1.0)" in str(info.value)
    assert "plugin 'b' (dist-b 2.0)" in str(info.value)
    # the first registration is kept
    assert registry.entry("mask", "m").plugin == "a"


def test_duplicate_message_names_the_earlier_plugin_first() -> None:
    with pytest.raises(DuplicateStrategyError) as info:
        registry_of(("earlier", returning("mask", "x")), ("later", returning("mask", "x")))
    message = str(info.value)
    assert message.index("'earlier'") < message.index("'later'")


def _file_format(name: str, suffix: str) -> Serializer:
    return Serializer(name=name, dumps=_ident, loads=_ident, binary=True, suffix=suffix)


@pytest.mark.parametrize("other_suffix", [".safetensors", ".SafeTensors"])
def test_a_suffix_claimed_twice_is_refused_naming_both(other_suffix: str) -> None:
    own = plugin(serializer=lambda: [_file_format("safetensors", ".safetensors")])
    rival = plugin(serializer=lambda: [_file_format("fast_tensors", other_suffix)])
    with pytest.raises(DuplicateStrategyError) as info:
        registry_of(("actsparse.serialize", own), ("rival", rival))
    message = str(info.value)
    assert f"file suffix {other_suffix!r} is claimed twice" in message
    assert "serializer 'safetensors' of plugin 'actsparse.serialize'" in message
    assert "serializer 'fast_tensors' of plugin 'rival'" in message


def test_a_suffix_claim_against_the_installed_formats_is_refused() -> None:
    rival = plugin(serializer=lambda: [_file_format("fast_tensors", ".safetensors")])
    before = get_registry()
    with pytest.raises(DuplicateStrategyError, match=r"'fast_tensors'.*'rival'"):
        register_plugin(rival, name="rival")
    assert get_registry() is before
    assert get_plugin_manager().get_plugin("rival") is None


def test_distinct_suffixes_and_empty_ones_coexist() -> None:
    registry = registry_of(
        ("p", plugin(serializer=lambda: [_file_format("a", ".a"), _file_format("b", ".b")])),
        ("q", returning("serializer", "c", "d")),  # in-memory: no suffix
    )
    assert registry.names("serializer") == ["a", "b", "c", "d"]


# ------------------------------------------------------------ bad results


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(
    "result",
    [
        "a string",
        b"bytes",
        {"name": "dict"},
        42,
        iter(()),
    ],
    ids=["str", "bytes", "dict", "int", "iterator"],
)
def test_a_result_that_is_not_a_list_is_a_plugin_error(kind: str, result: object) -> None:
    with pytest.raises(PluginError) as info:
        registry_of(("wrong_type", plugin(**{kind: lambda: result})))
    message = str(info.value)
    assert "'wrong_type'" in message
    assert HOOKS[kind] in message
    assert type(result).__name__ in message


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_single_record_instead_of_a_list_is_a_plugin_error(kind: str) -> None:
    with pytest.raises(PluginError, match="'single'"):
        registry_of(("single", plugin(**{kind: lambda: record(kind, "lonely")})))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("other", list(KINDS))
def test_a_record_of_the_wrong_kind_is_a_plugin_error(kind: str, other: str) -> None:
    wrong = record(other, "misfiled")
    obj = plugin(**{kind: lambda: [wrong]})
    if other == kind:
        assert registry_of(("misfiler", obj)).get(kind, "misfiled") is wrong
        return
    with pytest.raises(PluginError) as info:
        registry_of(("misfiler", obj))
    message = str(info.value)
    assert "'misfiler'" in message
    assert HOOKS[kind] in message
    assert KINDS[kind].record_type.__name__ in message


@pytest.mark.parametrize("junk", [None, "name", {"name": "x", "fn": _ident}], ids=repr)
def test_junk_inside_the_list_is_a_plugin_error(junk: object) -> None:
    with pytest.raises(PluginError, match="plugin 'junk'"):
        registry_of(("junk", plugin(mask=lambda: [record("mask", "ok"), junk])))


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_hook_that_raises_is_a_plugin_error(kind: str) -> None:
    def explode() -> Any:
        raise ZeroDivisionError("kaboom")

    with pytest.raises(PluginError) as info:
        registry_of(("fine", returning(kind, "ok")), ("raiser", plugin(**{kind: explode})))
    message = str(info.value)
    assert "'raiser'" in message
    assert HOOKS[kind] in message
    assert "kaboom" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_hook_building_an_invalid_record_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="'invalid'") as info:
        registry_of(("invalid", plugin(mask=lambda: [MaskStrategy(name=" bad", fn=_ident)])))
    assert isinstance(info.value.__cause__, ConfigError)


# ----------------------------------------------------------------- lookups


@given(
    kind=kinds,
    known=st.lists(record_names, unique=True, max_size=5),
    asked=record_names,
)
@example(kind="kernel", known=[], asked="des")  # close to the built-in "dense"
def test_unknown_name_lists_known_names_and_the_package_of_a_builtin(
    kind: str, known: list[str], asked: str
) -> None:
    registry = registry_of(("p", returning(kind, *known)))
    if asked in known:
        assert registry.get(kind, asked).name == asked
        return
    with pytest.raises(UnknownStrategyError) as info:
        registry.get(kind, asked)
    message = str(info.value)
    assert f"unknown {LABELS[kind]} {asked!r}" in message
    # the package is named for a built-in name only (a third party's name is not in it);
    # a close built-in name that is missing gets it in its "did you mean" instead
    builtin_note = f"{asked!r} is a built-in {LABELS[kind]}: it comes with `pip install"
    assert (builtin_note in message) == (asked in BUILTIN_NAMES[kind])
    listed = message.split("known: ", 1)[1]
    if known:
        assert listed.startswith(", ".join(repr(n) for n in sorted(known)) + ".")
    else:
        assert listed.startswith("none.")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", [None, 3, ["list"], {"a": 1}], ids=repr)
def test_a_non_string_name_is_unknown(kind: str, name: Any) -> None:
    registry = registry_of(("p", returning(kind, "real")))
    with pytest.raises(UnknownStrategyError, match="'real'"):
        registry.entry(kind, name)


@pytest.mark.parametrize("bad_kind", ["masks", "Mask", "", "serialize"])
def test_an_unknown_kind_is_a_config_error(bad_kind: str) -> None:
    registry = Registry()
    for call in (
        lambda: registry.names(bad_kind),
        lambda: registry.get(bad_kind, "x"),
        lambda: registry.resolve(bad_kind, "x"),
        lambda: registry.add(bad_kind, record("mask", "x"), plugin="p"),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        for kind in KINDS:
            assert repr(kind) in str(info.value)


@pytest.fixture
def mixed() -> tuple[Registry, dict[str, Any]]:
    records = {kind: record(kind, f"reg_{kind}", fn=_fresh_fn()) for kind in KINDS}
    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(plugin(**{k: (lambda r=r: [r]) for k, r in records.items()}), name="mixed")
    return Registry.from_plugin_manager(pm), records


def _fresh_fn() -> Callable[..., Any]:
    def fn(*args: Any) -> Any:
        return args

    return fn


@pytest.mark.parametrize("kind", list(KINDS))
def test_resolve_a_name(mixed: tuple[Registry, dict[str, Any]], kind: str) -> None:
    registry, records = mixed
    assert registry.resolve(kind, f"reg_{kind}") is records[kind]
    with pytest.raises(UnknownStrategyError):
        registry.resolve(kind, "unregistered")


@pytest.mark.parametrize("kind", list(KINDS))
def test_resolve_a_record_returns_it(mixed: tuple[Registry, dict[str, Any]], kind: str) -> None:
    registry, records = mixed
    assert registry.resolve(kind, records[kind]) is records[kind]
    unregistered = record(kind, "elsewhere")
    assert registry.resolve(kind, unregistered) is unregistered


@pytest.mark.parametrize("kind", ["aggregate", "reduce", "mask"])
def test_resolve_a_registered_fn_returns_its_record(
    mixed: tuple[Registry, dict[str, Any]], kind: str
) -> None:
    registry, records = mixed
    assert registry.resolve(kind, records[kind].fn) is records[kind]
    assert registry.name_of(kind, records[kind].fn) == f"reg_{kind}"
    assert registry.name_of(kind, records[kind]) == f"reg_{kind}"
    # a different function with the same code is not the registered one
    assert registry.name_of(kind, _fresh_fn()) is None


def test_resolve_a_plain_callable_wraps_it(mixed: tuple[Registry, dict[str, Any]]) -> None:
    registry, _ = mixed

    def my_mask(data: Any, level: float, *, scale: float = 1.0) -> Any:
        return data

    wrapped = registry.resolve("mask", my_mask)
    assert isinstance(wrapped, MaskStrategy)
    assert wrapped.fn is my_mask
    assert "my_mask" in wrapped.name
    assert wrapped.params == frozenset({"level", "scale"})
    assert wrapped.required == frozenset({"level"})
    assert wrapped.name not in registry.names("mask")

    def add(acc: Any, x: Any) -> Any:
        return acc + x

    agg = registry.resolve("aggregate", add)
    assert isinstance(agg, AggregateStrategy)
    assert agg.fn is add
    assert agg(1, 2) == 3
    red = registry.resolve("reduce", sum)
    assert isinstance(red, ReduceStrategy)
    assert red.fn is sum


def test_resolve_a_plain_callable_as_serializer_is_refused(
    mixed: tuple[Registry, dict[str, Any]],
) -> None:
    registry, _ = mixed
    with pytest.raises(ConfigError, match="serializer"):
        registry.resolve("serializer", _ident)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("value", [None, 3, 0.5, ["magnitude"]], ids=repr)
def test_resolve_a_non_callable_names_the_key(kind: str, value: object) -> None:
    registry = Registry()
    with pytest.raises(ConfigError) as info:
        registry.resolve(kind, value, key="mask_fn")
    assert str(info.value).startswith("mask_fn must be callable")
    assert repr(value) in str(info.value)
    with pytest.raises(ConfigError, match=rf"^{kind} must be callable"):
        registry.resolve(kind, value)


# ---------------------------------------------------------- global manager


def _global_snapshot() -> tuple[Any, ...]:
    pm = get_plugin_manager()
    registry = get_registry()
    return (
        sorted(name for name, _ in pm.list_name_plugin()),
        {kind: registry.names(kind) for kind in KINDS},
        {kind: [e.plugin for e in registry.entries(kind)] for kind in KINDS},
    )


def _remove_if_registered(obj: object) -> None:
    if get_plugin_manager().is_registered(obj):
        unregister_plugin(obj)


def test_register_and_unregister_a_plugin_globally() -> None:
    before = _global_snapshot()
    obj = returning("reduce", "global_test_reduce")
    try:
        name = register_plugin(obj, name="global-test")
        assert name == "global-test"
        assert get_plugin_manager().get_plugin("global-test") is obj
        entry = get_registry().entry("reduce", "global_test_reduce")
        assert entry.plugin == "global-test"
        # earlier strategies are still there
        assert set(before[1]["reduce"]) < set(get_registry().names("reduce"))
    finally:
        _remove_if_registered(obj)
    assert _global_snapshot() == before
    with pytest.raises(UnknownStrategyError):
        get_registry().get("reduce", "global_test_reduce")


def test_register_by_object_unregister_by_name() -> None:
    before = _global_snapshot()
    obj = returning("mask", "global_by_name")
    try:
        name = register_plugin(obj)
        assert "global_by_name" in get_registry().names("mask")
        unregister_plugin(name=name)
        assert not get_plugin_manager().is_registered(obj)
    finally:
        _remove_if_registered(obj)
    assert _global_snapshot() == before


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda existing: returning("mask", existing), id="duplicate"),
        pytest.param(
            lambda existing: plugin(
                reduce=lambda: [record("reduce", "would_be_added")],
                mask=lambda: 1 / 0,
            ),
            id="raising-hook",
        ),
        pytest.param(
            lambda existing: plugin(
                aggregate=lambda: [record("aggregate", "would_be_added")],
                mask=lambda: "not a list",
            ),
            id="wrong-type",
        ),
    ],
)
def test_register_plugin_failure_changes_nothing(bad: Callable[[str], object]) -> None:
    existing = get_registry().names("mask")
    assert existing, "no mask strategy installed to clash with"
    registry_before = get_registry()
    before = _global_snapshot()
    obj = bad(existing[0])
    try:
        with pytest.raises((DuplicateStrategyError, PluginError)) as info:
            register_plugin(obj, name="refused")
        assert "'refused'" in str(info.value)
        assert not get_plugin_manager().is_registered(obj)
        assert get_plugin_manager().get_plugin("refused") is None
        assert get_registry() is registry_before
        assert _global_snapshot() == before
        # the name is free again afterwards
        good = returning("mask", "after_refusal")
        try:
            assert register_plugin(good, name="refused") == "refused"
        finally:
            _remove_if_registered(good)
    finally:
        _remove_if_registered(obj)
    assert _global_snapshot() == before


def test_register_plugin_with_a_hookimpl_of_the_wrong_signature_changes_nothing() -> None:
    class WrongSignature:
        @hookimpl
        def actsparse_reduce_strategies(self) -> list[ReduceStrategy]:
            return [record("reduce", "half_registered")]

        @hookimpl
        def actsparse_mask_strategies(self, unexpected: object) -> list[MaskStrategy]:
            return []

    before = _global_snapshot()
    obj = WrongSignature()
    try:
        with pytest.raises(Exception, match="unexpected"):
            register_plugin(obj, name="wrong-signature")
        assert not get_plugin_manager().is_registered(obj)
    finally:
        _remove_if_registered(obj)
    assert _global_snapshot() == before
    assert "half_registered" not in Registry.from_plugin_manager(get_plugin_manager()).names(
        "reduce"
    )


def test_register_plugin_with_a_hookimpl_of_the_wrong_signature_is_a_plugin_error() -> None:
    class WrongSignature:
        @hookimpl
        def actsparse_mask_strategies(self, unexpected: object) -> list[MaskStrategy]:
            return []

    obj = WrongSignature()
    try:
        with pytest.raises(PluginError):
            register_plugin(obj, name="wrong-signature")
    finally:
        _remove_if_registered(obj)


def test_register_plugin_under_a_taken_name_changes_nothing() -> None:
    before = _global_snapshot()
    taken = next(name for name, _ in get_plugin_manager().list_name_plugin())
    obj = returning("mask", "under_taken_name")
    try:
        with pytest.raises(PluginError):
            register_plugin(obj, name=taken)
        assert not get_plugin_manager().is_registered(obj)
    finally:
        _remove_if_registered(obj)
    assert _global_snapshot() == before


def test_register_a_blocked_plugin_is_refused() -> None:
    pm = get_plugin_manager()
    before = _global_snapshot()
    obj = returning("mask", "blocked_one")
    pm.set_blocked("blocked-test")
    try:
        with pytest.raises(PluginError, match="blocked"):
            register_plugin(obj, name="blocked-test")
        assert not pm.is_registered(obj)
    finally:
        pm.unblock("blocked-test")
        _remove_if_registered(obj)
    assert _global_snapshot() == before


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"name": "never-registered"}, id="name"),
        pytest.param({"plugin": types.SimpleNamespace()}, id="object"),
    ],
)
def test_unregister_an_unknown_plugin_changes_nothing(kwargs: dict[str, Any]) -> None:
    before = _global_snapshot()
    registry_before = get_registry()
    with pytest.raises(PluginError, match="no plugin"):
        unregister_plugin(**kwargs)
    assert get_registry() is registry_before
    assert _global_snapshot() == before


def test_global_manager_is_one_object() -> None:
    assert get_plugin_manager() is get_plugin_manager()
    assert get_registry() is get_registry()
    assert isinstance(get_plugin_manager(), pluggy.PluginManager)


def test_hook_results_are_collected_once_per_registry() -> None:
    calls: list[str] = []

    def counted() -> Sequence[MaskStrategy]:
        calls.append("called")
        return [record("mask", "counted")]

    pm = make_plugin_manager(load_entrypoints=False)
    pm.register(plugin(mask=counted), name="counter")
    registry = Registry.from_plugin_manager(pm)
    for _ in range(3):
        registry.get("mask", "counted")
        registry.names("mask")
    assert calls == ["called"]


# ------------------------------------------------------------------ typing


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is new in 3.11")
@pytest.mark.parametrize("method", [Registry.get, Registry.resolve], ids=["get", "resolve"])
def test_lookups_are_typed_per_kind(method: Callable[..., Any]) -> None:
    """mypy sees the record type of each kind: Literal["mask"] -> MaskStrategy, ..."""
    returns: dict[str, Any] = {}
    fallback = []
    for variant in typing.get_overloads(method):
        hints = typing.get_type_hints(variant)
        if typing.get_origin(hints["kind"]) is typing.Literal:
            (kind,) = typing.get_args(hints["kind"])
            returns[kind] = hints["return"]
        else:
            fallback.append(hints["return"])
    assert returns == {key: info.record_type for key, info in KINDS.items()}
    assert len(fallback) == 1
    assert set(typing.get_args(fallback[0])) == {info.record_type for info in KINDS.values()}
