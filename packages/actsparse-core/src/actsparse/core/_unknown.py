"""What the error for an unknown strategy or serializer name says.

A name that actsparse's own distributions register (a built-in) and a name
that only a third party's plugin could register call for different advice:
the first comes with ``pip install actsparse-masks`` (or the distribution of
its kind), the second with the plugin that provides it, which actsparse
cannot name. Both get "did you mean ...?" when a registered name is close.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Iterable, Mapping

__all__ = ["BUILTIN_NAMES", "PLUGIN_PACKAGES", "unknown_name_message"]

#: The names that actsparse's own distributions register, by kind. A test
#: checks this against what they register, so it never drifts.
BUILTIN_NAMES: Mapping[str, frozenset[str]] = {
    "aggregate": frozenset({"sum", "mean", "abs_mean", "sq_mean", "abs_max", "abs_histogram"}),
    "reduce": frozenset({"mean", "identity", "sum", "max", "l2"}),
    "mask": frozenset(
        {
            "magnitude",
            "threshold",
            "topk",
            "n_m",
            "block_norm",
            "target_threshold",
            "weighted_threshold",
        }
    ),
    "serializer": frozenset({"sparse_coo", "safetensors", "torch"}),
    "kernel": frozenset({"dense"}),
}

#: Kinds whose names another first-party distribution registers, beyond the built-ins
#: above, and that distribution: the zero-skipping kernels come with actsparse-kernels,
#: whose kernels core does not list (adding a kernel changes nothing here).
PLUGIN_PACKAGES: Mapping[str, str] = {"kernel": "actsparse-kernels"}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _quoted(names: Iterable[str], marks: Mapping[str, str] | None = None) -> str:
    marks = marks or {}
    return ", ".join(repr(n) + (f" ({marks[n]})" if n in marks else "") for n in names)


def _one_of(names: list[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def unknown_name_message(
    *,
    kind: str,
    label: str,
    package: str,
    name: object,
    known: Iterable[str],
    note: str = "",
    marks: Mapping[str, str] | None = None,
) -> str:
    """The message of the :class:`UnknownStrategyError` for ``name``.

    Args:
        kind: The record kind (``"mask"``), to find its built-in names.
        label: How messages call the kind (``"mask strategy"``).
        package: The distribution that ships the kind's built-ins.
        name: The name asked for (anything: a non-string is unknown too).
        known: The names registered now.
        note: Added after the package's name for a built-in name (why the
            package, though installed, registers nothing here).
    """
    known = sorted(known)
    builtin = BUILTIN_NAMES.get(kind, frozenset())
    message = f"unknown {label} {name!r}"
    if isinstance(name, str):
        absent = sorted(builtin - set(known))
        close = difflib.get_close_matches(name, [*known, *absent], n=3, cutoff=0.6)
        if name in builtin:
            close = []
        if close:
            missing = [n for n in close if n in absent]
            origin = (
                f" {_one_of(missing)} {'is' if len(missing) == 1 else 'are'} built in, "
                f"from `pip install {package}`"
                if missing
                else ""
            )
            message += f" (did you mean {_one_of(close)}?{origin})"
    message += f"; known: {_quoted(known, marks) or 'none'}."
    if not isinstance(name, str):
        return message
    if name in builtin:
        return message + (
            f" {name!r} is a built-in {label}: it comes with `pip install {package}`{note}."
        )
    more = PLUGIN_PACKAGES.get(kind)
    if more is not None and not _installed(more):
        return message + (
            f" actsparse's other {label}s come with `pip install {more}`; a third party's "
            "come with the plugin that registers them."
        )
    return message + (
        " No installed plugin provides it: install the plugin that registers it, or "
        "register one in-process with actsparse.core.register_plugin (see the plugin "
        "guide in docs/plugins.md)."
    )
