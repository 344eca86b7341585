"""Misuse found by step(): masks a strategy gets wrong, bad data, the workflow's order."""

from __future__ import annotations

import torch
from _misuse_table import (
    Misuse,
    Scenario,
    after,
    check_misuse,
    mask_fn_returning,
    misuse_table,
    raising,
    registered,
    sample,
    squashed,
    stepped,
    with_first,
)

from actsparse.core import MaskError, StateError


def _only_first_saw_input() -> Scenario:
    model, s = registered()
    model.first(sample())
    return model, s, s.step


def _nan_input() -> Scenario:
    model, s = registered()
    x = sample()
    x[1, 2] = float("nan")
    model(x)
    return model, s, s.step


def _inf_input() -> Scenario:
    model, s = registered()
    x = sample()
    x[0, 0] = float("inf")
    model(x)
    return model, s, s.step


CASES: dict[str, Misuse] = {
    # ---- the masks a strategy returns
    "mask of the wrong shape": Misuse(
        lambda: with_first({"mask_fn": mask_fn_returning(lambda d: torch.ones(5))}, "step"),
        MaskError,
        ValueError,
        r"layer 'first': mask strategy .* returned a mask of shape \(5,\), which does not "
        r"broadcast to the input's \(4, 6\)",
    ),
    "mask grows the input": Misuse(
        lambda: with_first({"mask_fn": mask_fn_returning(lambda d: torch.ones(2, 4, 6))}, "step"),
        MaskError,
        ValueError,
        "does not broadcast",
    ),
    "mask of a complex dtype": Misuse(
        lambda: with_first(
            {"mask_fn": mask_fn_returning(lambda d: torch.ones(6, dtype=torch.complex64))},
            "step",
        ),
        MaskError,
        ValueError,
        "torch.complex64 tensor; masks must be real",
    ),
    "mask on the meta device": Misuse(
        lambda: with_first(
            {"mask_fn": mask_fn_returning(lambda d: torch.ones(6, device="meta"))}, "step"
        ),
        MaskError,
        ValueError,
        "meta device",
    ),
    "mask is sparse": Misuse(
        lambda: with_first(
            {"mask_fn": mask_fn_returning(lambda d: torch.ones(6).to_sparse())}, "step"
        ),
        MaskError,
        ValueError,
        "masks must be dense",
    ),
    "mask not 0/1": Misuse(
        lambda: with_first({"mask_fn": mask_fn_returning(lambda d: torch.full((6,), 0.5))}, "step"),
        MaskError,
        ValueError,
        "values other than 0 and 1",
    ),
    "mask with NaN": Misuse(
        lambda: with_first(
            {"mask_fn": mask_fn_returning(lambda d: torch.full((6,), float("nan")))}, "step"
        ),
        MaskError,
        ValueError,
        "returned NaN",
    ),
    "mask not a tensor": Misuse(
        lambda: with_first({"mask_fn": mask_fn_returning(lambda d: [1.0] * 6)}, "step"),
        MaskError,
        ValueError,
        "returned list, not a tensor",
    ),
    "mask strategy raises": Misuse(
        lambda: with_first({"mask_fn": raising(ArithmeticError("no"))}, "step"),
        MaskError,
        ValueError,
        r"layer 'first': computing the mask .* failed: ArithmeticError\('no'\)",
    ),
    # ---- the aggregated data
    "NaN activations": Misuse(
        _nan_input,
        MaskError,
        ValueError,
        r"layer 'first': the data that reduce 'mean' returned holds 1 NaN or Inf value",
    ),
    "Inf activations": Misuse(
        _inf_input,
        MaskError,
        ValueError,
        "NaN or Inf",
    ),
    # ---- the workflow's order
    "step before any input": Misuse(
        lambda: after(registered, lambda m, s: s.step()),
        StateError,
        KeyError,
        "layer 'first' has no aggregated data",
    ),
    "step before input of one layer": Misuse(
        _only_first_saw_input,
        StateError,
        KeyError,
        "layer 'second' has no aggregated data",
    ),
    "step twice": Misuse(
        lambda: after(stepped, lambda m, s: s.step()),
        StateError,
        KeyError,
        "has no aggregated data",
    ),
    "step after squash_mask": Misuse(
        lambda: after(squashed, lambda m, s: s.step()),
        StateError,
        RuntimeError,
        "layer 'first' is squashed",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)
