"""``actsparse plugins``: every registered strategy and serializer, its provider and parameters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["HELP", "configure", "run"]

HELP = "list every registered strategy and serializer, who provides it, and its parameters"


def configure(parser: argparse.ArgumentParser) -> None:
    from actsparse.core import KINDS

    parser.add_argument(
        "--kind",
        choices=list(KINDS),
        action="append",
        help="list only this kind (repeatable); default: every kind",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _parameters(kind: str, record: Any) -> str:
    if kind == "mask":
        if record.params is None:
            return "any sparse_config key"
        if not record.params:
            return "none"
        return ", ".join(
            f"{key} (required)" if key in record.required else key for key in sorted(record.params)
        )
    if kind == "aggregate":
        flags = []
        if record.elementwise:
            flags.append("elementwise")
        if record.init is not None:
            flags.append("custom init")
        if record.finalize is not None:
            flags.append("finalize")
        return ", ".join(flags) or "-"
    if kind == "serializer":
        if record.binary:
            return f"file format ({record.suffix})" if record.suffix else "file format"
        return "in-memory"
    if kind == "kernel":
        if record.apply is None:
            return "exact (the runtime's own path)"
        if record.exact:
            return "exact"
        tolerance = record.tolerance
        return f"lossy (rtol {tolerance.rtol:g}, atol {tolerance.atol:g}); only when named"
    return "-"


_DETAILS_HEADER = {
    "aggregate": "properties",
    "reduce": "properties",
    "mask": "parameters (sparse_config)",
    "serializer": "format",
    "kernel": "exact or lossy",
}


def _plugin_rows(kinds: Sequence[str]) -> list[dict[str, Any]]:
    from actsparse.core import get_registry

    registry = get_registry()
    rows = []
    for kind in kinds:
        for entry in registry.entries(kind):
            record = entry.record
            row: dict[str, Any] = {
                "kind": kind,
                "name": record.name,
                "plugin": entry.plugin,
                "distribution": entry.distribution,
                "version": entry.version,
                "parameters": _parameters(kind, record),
                "description": record.description,
            }
            if kind == "mask":
                row["params"] = None if record.params is None else sorted(record.params)
                row["required"] = sorted(record.required)
            elif kind == "aggregate":
                row["elementwise"] = record.elementwise
            elif kind == "serializer":
                row["binary"] = record.binary
                row["suffix"] = record.suffix
            elif kind == "kernel":
                tolerance = record.tolerance
                row["exact"] = record.exact
                row["tolerance"] = (
                    None if tolerance is None else {"rtol": tolerance.rtol, "atol": tolerance.atol}
                )
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from actsparse.core import KINDS

    kinds = list(dict.fromkeys(args.kind or KINDS))
    rows = _plugin_rows(kinds)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for position, kind in enumerate(kinds):
        info = KINDS[kind]
        if position:
            print()
        title = f"{info.label}s" if not info.label.endswith("y") else f"{info.label[:-1]}ies"
        print(title)
        table = [
            (
                row["name"],
                f"{row['distribution']} {row['version']}"
                if row["distribution"]
                else f"plugin {row['plugin']!r} (no distribution)",
                row["parameters"],
                row["description"],
            )
            for row in rows
            if row["kind"] == kind
        ]
        if not table:
            print(f"  (none registered: pip install {info.package})")
            continue
        header = ("name", "provided by", _DETAILS_HEADER.get(kind, "details"), "description")
        widths = [max(len(str(r[i])) for r in (header, *table)) for i in range(3)]
        for cells in (header, *table):
            line = "  ".join(
                str(cell).ljust(width) for cell, width in zip(cells, widths, strict=False)
            )
            print(f"  {line}  {cells[3]}".rstrip())
    return 0
