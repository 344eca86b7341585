"""The ``actsparse`` command line.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: a name, a help
line, a function that adds its arguments to an ``argparse`` parser and a
function that runs it and returns the exit status. Adding a subcommand means
adding one entry. Heavy packages (scikit-learn, matplotlib, tqdm) are imported
only by the subcommand that needs them.

Exit status: 0 on success, 1 when the command fails (the message goes to
stderr, without a traceback), 2 for bad arguments (argparse's usage message).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

PROG = "actsparse"


@attrs.frozen
class Command:
    """One ``actsparse`` subcommand.

    Attributes:
        name: What users type after ``actsparse``.
        help: One line for ``actsparse --help``.
        configure: Adds the subcommand's arguments to its parser.
        run: Runs it with the parsed arguments; returns the exit status.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class CommandFailed(Exception):
    """A subcommand cannot go on; the message is shown as ``actsparse NAME: error: ...``."""


# ------------------------------------------------------------------ plugins


def _configure_plugins(parser: argparse.ArgumentParser) -> None:
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
    return "-"


_DETAILS_HEADER = {
    "aggregate": "properties",
    "reduce": "properties",
    "mask": "parameters (sparse_config)",
    "serializer": "format",
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
            rows.append(row)
    return rows


def _run_plugins(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------ demo


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"sparsity level {text} is outside [0, 1]")
    return value


def _levels(text: str) -> tuple[float, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one level, such as 0,0.5,0.9")
    levels = tuple(_level(part) for part in parts)
    if len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"levels repeat a value: {text}")
    return levels


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 100] percentage points")
    return value


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("actsparse-demo-out"),
        help="output directory for the plot, the state file, the weights and results.json "
        "(default: ./actsparse-demo-out)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (2 epochs, levels 0,0.5,0.9) for smoke tests; accuracy is lower",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs (default: 10)"
    )
    parser.add_argument(
        "--levels",
        type=_levels,
        default=None,
        help="comma-separated mask sparsity levels in [0, 1] (default: 0,0.1,...,0.9,0.95)",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="default: 64")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=1.0,
        help="save the sparsest level whose test accuracy is at most this many "
        "percentage points below the dense model's (default: 1)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars while calibrating (default: only on a terminal)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from actsparse.hooks import demo

    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    levels = args.levels or (demo.QUICK_LEVELS if args.quick else demo.DEFAULT_LEVELS)
    if args.out.exists() and not args.out.is_dir():
        raise CommandFailed(f"--out {str(args.out)!r} exists and is not a directory")
    try:
        result = demo.run_demo(
            out=args.out,
            epochs=epochs,
            levels=levels,
            batch_size=args.batch_size,
            seed=args.seed,
            tolerance=args.tolerance / 100.0,
            progress=args.progress,
        )
    except demo.DemoDependencyError as exc:
        raise CommandFailed(str(exc)) from None
    except OSError as exc:
        raise CommandFailed(f"cannot write to {str(args.out)!r}: {exc}") from None
    if not result.identical:
        raise CommandFailed("the reloaded sparsifier gave different outputs")
    return 0


# ------------------------------------------------------------------ the table

COMMANDS: tuple[Command, ...] = (
    Command(
        name="plugins",
        help="list every registered strategy and serializer, who provides it, and its parameters",
        configure=_configure_plugins,
        run=_run_plugins,
    ),
    Command(
        name="demo",
        help="train a small CNN on scikit-learn's digits, sweep activation sparsity, plot "
        "accuracy, save and reload the sparsifier",
        configure=_configure_demo,
        run=_run_demo,
    ),
)


def _versions() -> str:
    found = []
    for name in ("actsparse-core", "actsparse-masks", "actsparse-hooks", "actsparse-serialize"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or "no actsparse distribution installed"


def build_parser(commands: Sequence[Command] | None = None) -> argparse.ArgumentParser:
    """The ``actsparse`` parser with one subparser per command (default: :data:`COMMANDS`)."""
    if commands is None:
        commands = COMMANDS
    parser = argparse.ArgumentParser(
        prog=PROG, description="Activation sparsity for PyTorch: the command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s: {_versions()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``actsparse`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    command: Command = args._command
    from actsparse.core import ActsparseError

    try:
        return command.run(args)
    except (CommandFailed, ActsparseError) as exc:
        print(f"{PROG} {command.name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {command.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
