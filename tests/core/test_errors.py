"""The error family: every class is an ActsparseError and the builtins docs/errors.md names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import actsparse.core as core
from actsparse.core import (
    ActsparseError,
    ConfigError,
    DuplicateStrategyError,
    LayerNotFoundError,
    MaskError,
    MaskNotReadyError,
    PluginError,
    SerializationError,
    StateError,
    StrategyError,
    UnknownStrategyError,
)

# The builtins each error must also derive from (docs/errors.md, torch.ao parity).
DOCUMENTED_BASES: dict[type[ActsparseError], tuple[type[BaseException], ...]] = {
    ConfigError: (ValueError, AssertionError),
    LayerNotFoundError: (ValueError, KeyError, AssertionError),
    MaskNotReadyError: (ValueError,),
    StateError: (RuntimeError, KeyError),
    MaskError: (ValueError,),
    UnknownStrategyError: (ValueError, KeyError, AssertionError),
    DuplicateStrategyError: (ValueError,),
    PluginError: (RuntimeError,),
    SerializationError: (ValueError,),
    StrategyError: (RuntimeError,),
}

KEY_ERRORS = [cls for cls, bases in DOCUMENTED_BASES.items() if KeyError in bases]


def test_every_exported_error_is_covered() -> None:
    exported = {
        obj
        for obj in vars(core).values()
        if isinstance(obj, type) and issubclass(obj, ActsparseError) and obj is not ActsparseError
    }
    assert exported == set(DOCUMENTED_BASES)


def test_base_is_an_exception() -> None:
    assert issubclass(ActsparseError, Exception)
    assert not issubclass(ActsparseError, (ValueError, KeyError, RuntimeError, AssertionError))


@pytest.mark.parametrize(("cls", "bases"), DOCUMENTED_BASES.items(), ids=lambda v: repr(v))
def test_error_derives_from_documented_builtins(
    cls: type[ActsparseError], bases: tuple[type[BaseException], ...]
) -> None:
    assert issubclass(cls, ActsparseError)
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} is not a {base.__name__}"
    err = cls("boom")
    # ``except`` clauses written for either the family or the builtin catch it.
    for catch in (ActsparseError, *bases):
        with pytest.raises(catch):
            raise err


@pytest.mark.parametrize(
    ("cls", "not_a"),
    [
        (ConfigError, KeyError),
        (MaskNotReadyError, KeyError),
        (MaskNotReadyError, AssertionError),
        (StateError, ValueError),
        (PluginError, ValueError),
        (SerializationError, RuntimeError),
    ],
)
def test_error_is_not_an_undocumented_builtin(
    cls: type[ActsparseError], not_a: type[BaseException]
) -> None:
    assert not issubclass(cls, not_a)


@pytest.mark.parametrize("cls", KEY_ERRORS, ids=lambda c: c.__name__)
@given(message=st.text(min_size=1))
def test_key_error_subclasses_are_not_quoted(cls: type[ActsparseError], message: str) -> None:
    err = cls(message)
    assert str(err) == message
    # A plain KeyError would quote it: the override is what makes the difference.
    assert str(KeyError(message)) == repr(message)


@pytest.mark.parametrize("cls", list(DOCUMENTED_BASES), ids=lambda c: c.__name__)
def test_str_of_every_error_is_the_message(cls: type[ActsparseError]) -> None:
    assert str(cls("layer 'fc' is not registered")) == "layer 'fc' is not registered"
    assert str(cls(42)) == "42"


def test_str_with_several_args_is_the_default() -> None:
    assert str(StateError("a", "b")) == str(("a", "b"))
    assert str(ConfigError()) == ""
