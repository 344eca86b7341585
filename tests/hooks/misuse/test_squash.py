"""Misuse of squash_mask(): before any input, twice, with a bad argument."""

from __future__ import annotations

from _misuse_table import Misuse, after, check_misuse, misuse_table, registered, squashed, stepped

from actsparse.core import ConfigError, MaskNotReadyError, StateError

CASES: dict[str, Misuse] = {
    "squash_mask before any input": Misuse(
        lambda: after(registered, lambda m, s: s.squash_mask()),
        MaskNotReadyError,
        ValueError,
        "layer 'first' has no mask",
    ),
    "squash_mask twice": Misuse(
        lambda: after(squashed, lambda m, s: s.squash_mask()),
        StateError,
        RuntimeError,
        "layer 'first' is already squashed",
    ),
    "squash_mask with an unknown argument": Misuse(
        lambda: after(stepped, lambda m, s: s.squash_mask(attach=True)),
        ConfigError,
        ValueError,
        "unexpected keyword argument",
    ),
    "squash_mask with a non-bool flag": Misuse(
        lambda: after(stepped, lambda m, s: s.squash_mask(attach_sparsify_hook="yes")),  # type: ignore[arg-type]
        ConfigError,
        ValueError,
        "attach_sparsify_hook must be a bool",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)
