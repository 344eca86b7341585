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
import math
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


# ------------------------------------------------------------------ inspect

_STRATEGY_KEYS = ("aggregate_fn", "reduce_fn", "mask_fn")
_ZIP_MAGIC = b"PK\x03\x04"


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="a state file written by save()")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def _import_serialize() -> Any:
    try:
        import actsparse.serialize as serialize
    except ImportError:
        raise CommandFailed(
            "reading state files needs actsparse-serialize: pip install actsparse-serialize"
        ) from None
    return serialize


def _sniff_format(path: Path) -> str:
    """The file format ``actsparse.serialize.load`` would pick: a zip is a torch file."""
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    return "torch" if head == _ZIP_MAGIC else "safetensors"


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data (tuples as lists, dtypes and odd keys as strings)."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinities
    return value


def _tensor_info(value: Any, where: str, bad: Callable[[str], CommandFailed]) -> dict[str, Any]:
    import torch

    if not isinstance(value, torch.Tensor):
        raise bad(f"{where} is of type {type(value).__name__}, not a tensor")
    zeros = int((value == 0).sum())
    numel = value.numel()
    return {
        "shape": list(value.shape),
        "dtype": str(value.dtype).removeprefix("torch."),
        "zeros": zeros,
        "numel": numel,
        "sparsity": zeros / numel if numel else 0.0,
    }


def _tensors_info(value: Any, where: str, bad: Callable[[str], CommandFailed]) -> Any:
    """None, one tensor's info, or a list of them (one per feature)."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_tensor_info(item, f"{where}[{i}]", bad) for i, item in enumerate(value)]
    return _tensor_info(value, where, bad)


def _describe_state(
    path: Path, state_dict: Any, file_format: str, serialize: Any
) -> dict[str, Any]:
    from actsparse.hooks import STATE_FORMAT_VERSION

    def bad(detail: str) -> CommandFailed:
        return CommandFailed(f"{path}: not a sparsifier state: {detail}")

    if not isinstance(state_dict, dict):
        raise bad(f"the file holds a {type(state_dict).__name__}")
    version = state_dict.get("format_version")
    if version is not None and version != STATE_FORMAT_VERSION:
        raise CommandFailed(
            f"{path}: unknown state format_version {version!r}: this actsparse-hooks reads "
            f"{STATE_FORMAT_VERSION}; a newer file needs a newer actsparse"
        )
    parts: dict[str, Any] = {}
    for key in ("state", "data_groups", "defaults"):
        parts[key] = state_dict.get(key)
        if not isinstance(parts[key], dict):
            raise bad(f"{key!r} is of type {type(parts[key]).__name__}, not a dict")
    state, groups, defaults = parts["state"], parts["data_groups"], parts["defaults"]
    layers = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise bad(f"data_groups[{name!r}] is of type {type(group).__name__}, not a dict")
        entry = state.get(name, {})
        if not isinstance(entry, dict):
            raise bad(f"state[{name!r}] is of type {type(entry).__name__}, not a dict")
        layers.append(
            {
                "name": name,
                "hook_state": group.get("hook_state"),
                **{key: group.get(key) for key in _STRATEGY_KEYS},
                "sparse_config": _plain(group.get("sparse_config", {})),
                "features": _plain(group.get("features")),
                "feature_dim": group.get("feature_dim"),
                "mask": _tensors_info(entry.get("mask"), f"state[{name!r}]['mask']", bad),
                "data": _tensors_info(group.get("data"), f"data_groups[{name!r}]['data']", bad),
            }
        )
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": file_format,
        # the reader refuses any file layout version it does not know
        "file_format_version": serialize.FORMAT_VERSION,
        "state_format_version": version,
        "defaults": _plain(defaults),
        "calibration_data": any(layer["data"] is not None for layer in layers),
        "layers": layers,
    }


def _shape(info: dict[str, Any]) -> str:
    return str(tuple(info["shape"]))


def _summarise(infos: Any) -> str:
    """One line for a mask or for aggregated data: shapes, dtype and share of zeros."""
    if infos is None:
        return "none"
    items = infos if isinstance(infos, list) else [infos]
    zeros = sum(item["zeros"] for item in items)
    numel = sum(item["numel"] for item in items)
    share = f"{zeros / numel:.1%}" if numel else "n/a"
    shapes = ", ".join(_shape(item) for item in items)
    dtypes = ", ".join(dict.fromkeys(item["dtype"] for item in items))
    if isinstance(infos, list):
        shapes = f"{len(items)} features: [{shapes}]"
    return f"{shapes} {dtypes}, {share} zeros ({zeros:,} of {numel:,})"


def _text(value: Any) -> str:
    return "none" if value is None else json.dumps(value, sort_keys=True)


def _print_inspection(report: dict[str, Any]) -> None:
    version = report["state_format_version"]
    print(f"file: {report['file']} ({report['size_bytes']:,} bytes)")
    print(
        f"format: {report['format']}, file format version {report['file_format_version']}, "
        "state format_version "
        + (str(version) if version is not None else "absent (a torch.ao-style state dict)")
    )
    defaults = report["defaults"]
    strategies = ", ".join(f"{key}={defaults.get(key) or 'none'}" for key in _STRATEGY_KEYS)
    print(f"defaults: {strategies}, sparse_config={_text(defaults.get('sparse_config', {}))}")
    print(f"mid-calibration data: {'present' if report['calibration_data'] else 'none'}")
    layers = report["layers"]
    print(f"layers: {len(layers)}")
    for layer in layers:
        strategies = ", ".join(f"{key}={layer[key] or 'none'}" for key in _STRATEGY_KEYS)
        features = "none"
        if layer["features"] is not None:
            features = f"{_text(layer['features'])} along dim {layer['feature_dim']}"
        print(f"  {layer['name']}")
        print(f"    hook_state:    {layer['hook_state']}")
        print(f"    strategies:    {strategies}")
        print(f"    sparse_config: {_text(layer['sparse_config'])}")
        print(f"    features:      {features}")
        print(f"    mask:          {_summarise(layer['mask'])}")
        print(f"    data:          {_summarise(layer['data'])}")


def _run_inspect(args: argparse.Namespace) -> int:
    serialize = _import_serialize()
    path: Path = args.file
    try:
        file_format = _sniff_format(path)
        state_dict = serialize.load(path, format=file_format)
    except OSError as exc:
        raise CommandFailed(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    report = _describe_state(path, state_dict, file_format, serialize)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspection(report)
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
    from actsparse.cli import demo

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
        name="inspect",
        help="show what a state file holds: format, each layer's strategies, masks and hook state",
        configure=_configure_inspect,
        run=_run_inspect,
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
    for name in (
        "actsparse-core",
        "actsparse-masks",
        "actsparse-hooks",
        "actsparse-serialize",
        "actsparse-cli",
    ):
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
