"""``actsparse calibrate MODEL_DIR --text FILE --target T --out STATE``: threshold mode on a
``transformers`` model through :func:`actsparse.hooks.sparsify`, calibrated on real tokens."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from actsparse.cli import _hf, _recipe
from actsparse.cli._app import CommandError, UsageError
from actsparse.cli._outputs import check_file

__all__ = ["HELP", "add_text_options", "configure", "run"]

HELP = (
    "calibrate per-layer thresholds of a transformers model on a text file for a target "
    "sparsity; write a state file"
)


def add_text_options(
    parser: argparse.ArgumentParser, *, defaults: bool, layers: bool = True
) -> None:
    """The options that decide how the text is read (and, with ``layers``, which layers
    are sparsified).

    With ``defaults`` False they default to None, so that a recipe can fill them.
    """
    settings = _recipe.Settings()

    def default(value: Any) -> Any:
        return value if defaults else None

    if layers:
        parser.add_argument(
            "--layers",
            type=_recipe.layers_spec,
            default=default(settings.layers),
            metavar="PRESET_OR_REGEX",
            help="a layer preset (auto, bert, llama) or a regular expression that matches "
            "the full names of the layers to sparsify (default: auto, the preset that fits)",
        )
    parser.add_argument(
        "--max-tokens",
        type=_recipe.positive_int,
        default=None,
        metavar="N",
        help="cut each passage to N tokens (default: 128, or the model's limit if lower)",
    )
    parser.add_argument(
        "--batch",
        type=_recipe.positive_int,
        default=default(settings.batch),
        metavar="B",
        help=f"passages per forward pass (default: {settings.batch})",
    )
    parser.add_argument(
        "--max-passages",
        type=_recipe.positive_int,
        default=None,
        metavar="N",
        help="read only the first N passages of the text file (default: all)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    _hf.add_model_argument(parser)
    parser.add_argument(
        "--text",
        type=Path,
        required=True,
        metavar="FILE",
        help="a UTF-8 text file, one passage per paragraph (blank lines between passages)",
    )
    parser.add_argument(
        "--target",
        type=_recipe.target,
        default=None,
        metavar="T",
        help="the model-wide sparsity in [0, 1) (required unless --recipe gives it)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="STATE", help="the state file to write"
    )
    add_text_options(parser, defaults=False)
    parser.add_argument(
        "--allocation",
        type=_recipe.allocation,
        default=None,
        help="greedy: per-layer levels from each layer's sensitivity, estimated on 4 "
        "passages (default, as sparsify()); greedy_exact: the same, measured with a "
        "forward pass per layer and level; uniform: every layer at the target",
    )
    parser.add_argument(
        "--split",
        type=_recipe.split,
        default=None,
        help="calibrate on all passages (default), or on the even or odd ones (counting "
        "from 0: actsparse sweep calibrates on the even ones)",
    )
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="FILE",
        help="settings from a recipe file (written by actsparse sweep); options given here win",
    )


def settings_of(args: argparse.Namespace, recipe: dict[str, Any]) -> _recipe.Settings:
    """The settings: the command line's, else the recipe's, else the defaults."""
    values: dict[str, Any] = {}
    for field in attrs.fields(_recipe.Settings):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
        elif field.name in recipe:
            values[field.name] = recipe[field.name]
    return _recipe.Settings(**values)


def widths(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Each layer's input width: its weight in the model-wide share."""
    out = {}
    for name in names:
        module = model.get_submodule(name)
        width = getattr(module, "in_features", None)
        if not isinstance(width, int):
            weight = getattr(module, "weight", None)
            width = int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else 1
        out[name] = width
    return out


def weighted(values: dict[str, float], weights: dict[str, int]) -> float:
    total = sum(weights[name] for name in values)
    return sum(values[name] * weights[name] for name in values) / total if total else 0.0


def threshold_table(sparsifier: Any) -> str:
    thresholds = sparsifier.thresholds
    width = max([5, *(len(name) for name in thresholds)])
    lines = [f"{'layer':<{width}}  {'threshold':>10}  {'expected':>8}  reachable"]
    for name, result in thresholds.items():
        lines.append(
            f"{name:<{width}}  {result.threshold:>10.4g}  {result.expected_sparsity:>8.1%}  "
            + _reach(result)
        )
    return "\n".join(lines)


def _reach(result: Any) -> str:
    if result.reachable:
        return "yes"
    if result.zero_fraction > result.target:
        return "no (more zeros than the target)"
    return "no (many inputs share the magnitude at the target)"


def run_sparsify(
    text_model: _hf.TextModel,
    batches: list[dict[str, torch.Tensor]],
    *,
    text: Path,
    target: float,
    layers: str,
    allocation: str,
    kernel: str,
    progress: bool | None,
    command: str,
) -> Any:
    """``sparsify()`` on the model; its warnings become one line each."""
    from actsparse.hooks import sparsify

    selection = _hf.layer_selection(text_model.model, layers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _hf.model_failures(text_model, text):
            sparsifier = sparsify(
                text_model.model,
                batches,
                target=target,
                layers=selection,
                allocation=allocation,
                kernel=kernel,
                progress=progress,
            )
    report_warnings(caught, command)
    return sparsifier


def report_warnings(caught: Sequence[warnings.WarningMessage], command: str) -> None:
    from actsparse.hooks import SparsityTargetWarning

    for item in caught:
        if issubclass(item.category, SparsityTargetWarning):
            continue  # the table says which layers cannot reach the target
        print(f"actsparse {command}: warning: {item.message}", file=sys.stderr)


def describe_text(
    path: Path,
    passages: int,
    split: str,
    batches: list[dict[str, torch.Tensor]],
    settings: _recipe.Settings,
) -> str:
    which = "" if split == "all" else f", the {split} ones"
    return (
        f"text: {path}, {passages} passages{which}: {_hf.real_tokens(batches):,} real tokens "
        f"(at most {settings.max_tokens} per passage) in {len(batches)} batches"
    )


def run(args: argparse.Namespace) -> int:
    recipe: dict[str, Any] = {}
    digest = None
    if args.recipe is not None:
        recipe, digest = _recipe.read_recipe(args.recipe)
    settings = settings_of(args, recipe)
    target = settings.target
    if target is None:
        raise UsageError("give --target T, or a --recipe that holds a target")
    transformers = _hf.require("calibrate")
    check_file(args.out, "the state file")
    passages = _hf.read_passages(args.text, limit=settings.max_passages)
    chosen = _hf.select_split(passages, settings.split, args.text)
    if digest is not None and digest != _hf.sha256(args.text):
        print(
            f"actsparse calibrate: warning: {str(args.text)!r} is not the text that recipe "
            f"{str(args.recipe)!r} was made with (its SHA-256 differs); the thresholds will "
            "differ from the recipe's",
            file=sys.stderr,
        )
    text_model = _hf.load_model(
        transformers, args.model_dir, trust_remote_code=args.trust_remote_code
    )
    max_tokens = _hf.check_max_tokens(text_model, settings.max_tokens)
    settings = attrs.evolve(settings, max_tokens=max_tokens)
    _hf.layer_selection(text_model.model, settings.layers)  # refused before tokenizing
    batches = _hf.tokenize(text_model, chosen, max_tokens=max_tokens, batch=settings.batch)
    print(f"model: {text_model.description}")
    print(describe_text(args.text, len(chosen), settings.split, batches, settings))
    start = time.perf_counter()
    sparsifier = run_sparsify(
        text_model,
        batches,
        text=args.text,
        target=target,
        layers=settings.layers,
        allocation=settings.allocation,
        kernel="dense",
        progress=args.progress,
        command="calibrate",
    )
    seconds = time.perf_counter() - start
    names = list(sparsifier.thresholds)
    print(
        f"calibrated {len(names)} layers ({settings.layers}, {settings.allocation} allocation) "
        f"in {seconds:.1f} s"
    )
    print()
    print(threshold_table(sparsifier))
    print()
    expected = weighted(
        {n: r.expected_sparsity for n, r in sparsifier.thresholds.items()},
        widths(text_model.model, names),
    )
    print(
        f"expected sparsity over all layers: {expected:.1%} (target {target:.1%}; "
        "each layer weighted by its input width)"
    )
    save_state(sparsifier, args.out)
    print(f"wrote {args.out}")
    return 0


def save_state(state: Any, path: Path) -> Path:
    from actsparse.serialize import save

    try:
        return save(state, path)
    except OSError as exc:
        raise CommandError(
            f"cannot write the state file {str(path)!r}: {exc.strerror or exc}"
        ) from None
