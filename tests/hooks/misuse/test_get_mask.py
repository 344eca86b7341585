"""Misuse of get_mask(): before any input, an unknown layer, neither a name nor a layer."""

from __future__ import annotations

from _misuse_table import Misuse, after, calibrated, check_misuse, misuse_table, registered

from actsparse.core import ConfigError, LayerNotFoundError, MaskNotReadyError

CASES: dict[str, Misuse] = {
    "get_mask before any input": Misuse(
        lambda: after(registered, lambda m, s: s.get_mask("first")),
        MaskNotReadyError,
        ValueError,
        "layer 'first' has no mask yet",
    ),
    "get_mask of an unknown name": Misuse(
        lambda: after(calibrated, lambda m, s: s.get_mask("third")),
        LayerNotFoundError,
        ValueError,
        r"no layer named 'third' is registered \(registered: 'first', 'second'\)",
    ),
    "get_mask without a name or layer": Misuse(
        lambda: after(calibrated, lambda m, s: s.get_mask()),
        ConfigError,
        ValueError,
        "needs a layer name or a layer module",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)
