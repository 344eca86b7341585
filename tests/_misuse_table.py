"""The misuse table behind ``tests/hooks/misuse``: its rows, scenarios and the one check.

Every row builds a sparsifier at some point of the workflow, takes a snapshot of
the model's hooks, the data groups, the aggregated data, the masks, the
defaults and the model's weights, makes one bad call, and checks that the error
is an actsparse error that is also the builtin torch.ao raised, that the
message names what is at fault, and that the snapshot is unchanged.

Each module of ``tests/hooks/misuse`` holds the rows of one workflow verb in a
single ``CASES`` table and runs them through :func:`misuse_table` and
:func:`check_misuse`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.core import ActsparseError
from actsparse.hooks import ActivationSparsifier


class Net(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.first = nn.Linear(width, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.relu(self.first(x)))
        return out


Phase = Callable[[], tuple[Net, ActivationSparsifier]]
# The model, the sparsifier, and the bad call whose failure must leave both alone.
Scenario = tuple[nn.Module, ActivationSparsifier, Callable[[], object]]


class Misuse(NamedTuple):
    """One row: how to set it up, the error, the builtin it also is, the message pattern."""

    build: Callable[[], Scenario]
    error: type[Exception]
    builtin: type[Exception]
    match: str


def misuse_table(cases: dict[str, Misuse]) -> pytest.MarkDecorator:
    """Parametrize a test over ``cases``, one test id per row name."""
    return pytest.mark.parametrize("case", list(cases.values()), ids=list(cases))


def check_misuse(case: Misuse) -> None:
    """The bad call raises the row's error, which is an ActsparseError and the builtin,
    with a message matching the row's pattern; the snapshot is unchanged."""
    model, sparsifier, call = case.build()
    before = snapshot(model, sparsifier)
    with pytest.raises(case.error, match=case.match) as info:
        call()
    assert isinstance(info.value, ActsparseError)
    assert isinstance(info.value, case.builtin)
    assert_unchanged(before, snapshot(model, sparsifier))


# ------------------------------------------------------------ points of the workflow


def make(**defaults: Any) -> tuple[Net, ActivationSparsifier]:
    model = Net()
    config: dict[str, Any] = {
        "aggregate_fn": "sum",
        "reduce_fn": "mean",
        "mask_fn": "magnitude",
        "sparsity_level": 0.5,
    }
    config.update(defaults)
    return model, ActivationSparsifier(model, **config)


def sample(batch: int = 4, width: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))


def registered(**config: Any) -> tuple[Net, ActivationSparsifier]:
    """``first`` registered with ``config``, then ``second`` with the defaults."""
    model, s = make()
    s.register_layer(model.first, **config)
    s.register_layer(model.second)
    return model, s


def calibrated(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = registered(**config)
    model(sample(seed=1))
    model(sample(seed=2))
    return model, s


def stepped(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = calibrated(**config)
    s.step()
    return model, s


def squashed(**config: Any) -> tuple[Net, ActivationSparsifier]:
    model, s = stepped(**config)
    s.squash_mask()
    return model, s


# ------------------------------------------------------------------------ scenarios


def after(phase: Phase, call: Callable[[Net, ActivationSparsifier], object]) -> Scenario:
    """The workflow up to ``phase``; ``call`` is the bad call."""
    model, s = phase()
    return model, s, lambda: call(model, s)


def with_first(config: dict[str, Any], action: str) -> Scenario:
    """Register ``first`` with ``config``; ``action`` is the bad call.

    ``"register"``: the registration itself; ``"forward"``: the first forward
    pass; ``"step"``: the step after one forward pass.
    """
    model, s = make()
    s.register_layer(model.second)
    if action == "register":
        return model, s, lambda: s.register_layer(model.first, **config)
    s.register_layer(model.first, **config)
    if action == "forward":
        return model, s, lambda: model(sample())
    model(sample())
    return model, s, s.step


def mask_fn_returning(result: Callable[[torch.Tensor], Any]) -> Callable[..., Any]:
    """A mask function that returns ``result(data)``, whatever that is."""

    def mask_fn(data: torch.Tensor, sparsity_level: float) -> Any:
        return result(data)

    return mask_fn


def raising(exc: Exception) -> Callable[..., Any]:
    """A strategy function that raises ``exc``."""

    def fn(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fn
