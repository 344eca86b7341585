"""An unknown name says what is close, and where the name would come from."""

from __future__ import annotations

import pytest

from actsparse.core import (
    FIRST_PARTY_DISTRIBUTIONS,
    KINDS,
    AggregateStrategy,
    MaskStrategy,
    Registry,
    UnknownStrategyError,
    get_registry,
)
from actsparse.core._unknown import BUILTIN_NAMES, PLUGIN_PACKAGES


def _ident(x: object) -> object:
    return x


def _message(registry: Registry, kind: str, name: object) -> str:
    with pytest.raises(UnknownStrategyError) as info:
        registry.get(kind, name)  # type: ignore[arg-type]
    return str(info.value)


def test_the_builtin_names_are_what_actsparse_registers() -> None:
    registry = get_registry()
    for kind in KINDS:
        registered = {
            entry.record.name
            for entry in registry.entries(kind)
            if entry.distribution == KINDS[kind].package
        }
        assert registered == BUILTIN_NAMES[kind], kind
        others = {
            entry.distribution
            for entry in registry.entries(kind)
            if entry.distribution in FIRST_PARTY_DISTRIBUTIONS
            and entry.distribution != KINDS[kind].package
        }
        # another distribution of ours registers names of this kind only where core says so
        assert others <= {PLUGIN_PACKAGES.get(kind)}, (kind, others)


@pytest.mark.parametrize(
    ("kind", "typo", "meant"),
    [
        ("mask", "magnitud", "'magnitude'"),
        ("mask", "top_k", "'topk'"),
        ("mask", "target-threshold", "'target_threshold'"),
        ("aggregate", "abs-mean", "'abs_mean'"),
        ("reduce", "identiy", "'identity'"),
        ("serializer", "safetensor", "'safetensors'"),
    ],
)
def test_a_typo_gets_did_you_mean(kind: str, typo: str, meant: str) -> None:
    message = _message(get_registry(), kind, typo)
    assert f"did you mean {meant}" in message
    assert "pip install" not in message  # it is installed: only the spelling is wrong


def test_several_close_names_are_all_offered() -> None:
    registry = Registry()
    for name in ("abs_mean", "abs_max", "sq_mean"):
        registry.add("aggregate", _record(name), plugin="p")
    message = _message(registry, "aggregate", "abs_men")
    offered = message.split("(did you mean ", 1)[1].split("?)", 1)[0]
    assert "'abs_mean'" in offered
    assert " or " in offered


def _record(name: str) -> AggregateStrategy:
    return AggregateStrategy(name=name, fn=lambda a, x: a)


def test_nothing_close_offers_nothing() -> None:
    message = _message(get_registry(), "mask", "zzz-unrelated")
    assert "did you mean" not in message
    assert "known: 'block_norm'" in message


def test_a_third_party_name_does_not_point_at_actsparse_masks() -> None:
    message = _message(get_registry(), "mask", "my_company_mask")
    assert "pip install" not in message
    assert "No installed plugin provides it: install the plugin that registers it" in message
    assert "actsparse.core.register_plugin" in message


def test_a_builtin_name_without_its_package_names_the_package() -> None:
    registry = Registry()  # as if actsparse-masks registered nothing
    message = _message(registry, "mask", "magnitude")
    assert message.startswith(
        "unknown mask strategy 'magnitude'; known: none. 'magnitude' is a built-in mask "
        "strategy: it comes with `pip install actsparse-masks`"
    )
    # installed here, so the message also says that its plugin is not registered
    assert "actsparse-masks is installed, but its plugin is not registered" in message
    assert "known: none" in _message(registry, "serializer", "safetensors")
    assert "`pip install actsparse-serialize`" in _message(registry, "serializer", "safetensors")


def test_a_typo_of_an_absent_builtin_says_where_it_comes_from() -> None:
    registry = Registry()
    registry.add("mask", MaskStrategy(name="mine", fn=_ident), plugin="p")
    message = _message(registry, "mask", "magnitud")
    assert "(did you mean 'magnitude'? 'magnitude' is built in, from `pip install " in message


def test_a_name_that_is_not_a_string_gets_the_known_names_only() -> None:
    message = _message(get_registry(), "mask", 3)
    assert message.startswith("unknown mask strategy 3; known: ")
    assert "did you mean" not in message
    assert "plugin" not in message
