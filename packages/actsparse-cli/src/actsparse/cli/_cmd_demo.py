"""``actsparse demo``: the arguments of :func:`actsparse.cli.demo.run_demo`.

The demo module (torch training, scikit-learn, matplotlib) is imported only
when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli._app import CommandError

__all__ = ["HELP", "configure", "run"]

HELP = (
    "train a small CNN on scikit-learn's digits, sweep activation sparsity, plot "
    "accuracy, save and reload the sparsifier"
)


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


def configure(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    from actsparse.cli import demo

    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    levels = args.levels or (demo.QUICK_LEVELS if args.quick else demo.DEFAULT_LEVELS)
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {str(args.out)!r} exists and is not a directory")
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
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write to {str(args.out)!r}: {exc}") from None
    if not result.identical:
        raise CommandError("the reloaded sparsifier gave different outputs")
    return 0
