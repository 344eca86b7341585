"""Calibration settings: the options of ``actsparse calibrate``, their checks, and the recipe
file (JSON) that ``actsparse sweep`` writes and ``actsparse calibrate --recipe`` replays.

A recipe holds the settings that decide the thresholds (the target, the
layers, the allocation, how the text is cut into batches and which passages
calibrate) and the SHA-256 of the text file they were calibrated on. Options
given on the command line win over the recipe's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from actsparse import hooks
from actsparse.cli._app import CommandError
from actsparse.cli._hf import SPLITS
from actsparse.cli._inputs import JSONBoundError, parse_json, read_regular

__all__ = [
    "ALLOCATIONS",
    "MAX_RECIPE_BYTES",
    "RECIPE_FORMAT",
    "Settings",
    "layers_spec",
    "positive_int",
    "read_recipe",
    "recipe_json",
    "target",
    "targets",
]

RECIPE_FORMAT = "actsparse-recipe"
RECIPE_VERSION = 1
#: The largest recipe read; the recipes that ``actsparse sweep`` writes are under 1 KiB.
MAX_RECIPE_BYTES = 64 * 1024
#: How ``sparsify()`` spreads the target over the layers (its ``allocation``).
ALLOCATIONS = hooks.ALLOCATIONS


def target(text: str) -> float:
    """A sparsity target in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"target {text} is outside [0, 1)")
    return value


def targets(text: str) -> tuple[float, ...]:
    """Comma-separated distinct targets in [0, 1), in increasing order."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one target, such as 0.3,0.4,0.5")
    values = tuple(target(part) for part in parts)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"targets repeat a value: {text}")
    return tuple(sorted(values))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


#: the most new tokens a decode measurement may ask for
MAX_DECODE_TOKENS = 4096


def non_negative_int(text: str) -> int:
    """A count of new tokens: an integer from 0 to :data:`MAX_DECODE_TOKENS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_DECODE_TOKENS:
        raise argparse.ArgumentTypeError(f"{text} is not an integer from 0 to {MAX_DECODE_TOKENS}")
    return value


def layers_spec(text: str) -> str:
    """A preset name or a regular expression (checked against the model later)."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a preset nor a valid regular expression: {exc}"
        ) from None
    return text


def split(text: str) -> str:
    if text not in SPLITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(SPLITS)}")
    return text


def allocation(text: str) -> str:
    if text not in ALLOCATIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(ALLOCATIONS)}")
    return text


@attrs.frozen
class Settings:
    """What decides a calibration, with the command line's defaults."""

    target: float | None = None
    layers: str = "auto"
    allocation: str = "greedy"
    max_tokens: int | None = None
    batch: int = 16
    max_passages: int | None = None
    split: str = "all"


#: Each setting's check, as the recipe's values are strings or numbers.
_CHECKS: Mapping[str, Any] = {
    "target": target,
    "layers": layers_spec,
    "allocation": allocation,
    "max_tokens": positive_int,
    "batch": positive_int,
    "max_passages": positive_int,
    "split": split,
}
_INFORMATION = ("format", "version", "text_sha256", "made_by", "model", "text")


def read_recipe(path: Path) -> tuple[dict[str, Any], str | None]:
    """The settings a recipe file holds (checked) and the SHA-256 of its text, if recorded.

    Raises:
        CommandError: The file is missing, not a regular file, larger than
            :data:`MAX_RECIPE_BYTES`, not JSON (or nested deeper, or with longer numbers,
            than :func:`~actsparse.cli._inputs.parse_json` reads), not a recipe, or holds a
            bad value.
    """
    where = f"recipe {str(path)!r}"
    raw = read_regular(path, where, limit=MAX_RECIPE_BYTES)
    try:
        data = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except JSONBoundError as exc:
        raise CommandError(f"{where} {exc}") from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise CommandError(f'{where} is not an actsparse recipe (no "format": {RECIPE_FORMAT!r})')
    if data.get("version") != RECIPE_VERSION:
        raise CommandError(
            f"{where} has version {data.get('version')!r}; this actsparse reads version "
            f"{RECIPE_VERSION}"
        )
    unknown = sorted(set(data) - set(_CHECKS) - set(_INFORMATION))
    if unknown:
        raise CommandError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    settings: dict[str, Any] = {}
    for key, check in _CHECKS.items():
        if key not in data or (key in ("max_passages", "max_tokens") and data[key] is None):
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CommandError(f"{where}: {key} is {value!r}, not a string or a number")
        if check is positive_int and not isinstance(value, int):
            raise CommandError(f"{where}: {key} is {value!r}, not an integer")
        try:
            settings[key] = check(str(value))
        except argparse.ArgumentTypeError as exc:
            raise CommandError(f"{where}: {key}: {exc}") from None
    digest = data.get("text_sha256")
    return settings, digest if isinstance(digest, str) else None


def recipe_json(settings: Settings, *, text_sha256: str, made_by: str, model: str) -> bytes:
    """A recipe file's bytes."""
    body = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "made_by": made_by,
        "model": model,
        **attrs.asdict(settings),
        "text_sha256": text_sha256,
    }
    return (json.dumps(body, indent=2) + "\n").encode()
