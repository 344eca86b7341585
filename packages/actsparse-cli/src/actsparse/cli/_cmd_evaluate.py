"""``actsparse evaluate MODEL_DIR STATE --text FILE``: a state file on a fresh model, against
the dense model: sparsity on real tokens, quality, and time measured side by side."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from actsparse.cli import _hf, _measure, _recipe
from actsparse.cli._app import CommandError, UsageError
from actsparse.cli._cmd_calibrate import add_text_options
from actsparse.cli._outputs import check_file, write_atomic
from actsparse.core import (
    ActsparseError,
    SerializationError,
    find_module,
    parse_state_dict,
)

__all__ = ["HELP", "configure", "run"]

HELP = (
    "load a state file into a transformers model; measure sparsity on real tokens, quality "
    "and time against the dense model"
)

#: How many times each batch is timed on both models, by default.
REPEAT = 3


def configure(parser: argparse.ArgumentParser) -> None:
    _hf.add_model_argument(parser)
    parser.add_argument(
        "state", type=Path, metavar="STATE", help="a state file (actsparse calibrate)"
    )
    parser.add_argument(
        "--text",
        type=Path,
        required=True,
        metavar="FILE",
        help="a UTF-8 text file, one passage per paragraph (blank lines between passages)",
    )
    parser.add_argument(
        "--kernel",
        default="dense",
        metavar="auto|dense|NAME",
        help="how the thresholded layers run (set_kernel): dense (default), auto, or a "
        "kernel's name (actsparse plugins --kind kernel)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON"
    )
    add_text_options(parser, defaults=True, layers=False)
    parser.add_argument(
        "--split",
        type=_recipe.split,
        default="all",
        help="evaluate on all passages (default), or on the even or odd ones (counting from "
        "0: actsparse sweep evaluates on the odd ones)",
    )
    parser.add_argument(
        "--repeat",
        type=_recipe.positive_int,
        default=REPEAT,
        metavar="R",
        help=f"how many times each batch is timed on both models (default: {REPEAT})",
    )
    add_decode_option(parser)


#: How many tokens the decode measurement generates after the first (causal models).
DECODE_TOKENS = 16


def add_decode_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decode-tokens",
        type=_recipe.non_negative_int,
        default=DECODE_TOKENS,
        metavar="N",
        help="causal language models: also time greedy generate() with the KV cache, "
        "dense and sparse side by side, N new tokens after the first (the prefill taken "
        f"out), --repeat times each; 0 turns it off (default: {DECODE_TOKENS})",
    )


def decode_line(decode: _measure.Decode) -> str:
    return (
        f"decoding (greedy generate(), {decode.new_tokens} tokens after the prefill): "
        f"dense {decode.dense:.2f} tok/s, sparse {decode.sparse:.2f} tok/s "
        f"({decode.ratio:.3f}x)"
    )


def check_kernel(kernel: str) -> None:
    """Refuse a ``--kernel`` that is neither ``auto`` nor a registered kernel (the runtime's
    one check, shown as a usage error)."""
    from actsparse.hooks import check_kernel_name

    try:
        check_kernel_name(kernel)
    except ActsparseError as exc:
        raise UsageError(f"--kernel {kernel}: {exc}") from None


def read_state(path: Path) -> list[str]:
    """The layer names of a state file of squashed threshold-mode layers.

    Raises:
        CommandError: The file is missing or not such a state.
    """
    from actsparse.serialize import load

    try:
        state_dict = load(path)
    except FileNotFoundError:
        raise CommandError(f"state file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise CommandError(f"state file {str(path)!r} is a directory") from None
    except OSError as exc:
        raise CommandError(f"cannot read state file {str(path)!r}: {exc.strerror or exc}") from None
    except SerializationError as exc:
        raise CommandError(f"state file {exc}") from None
    try:
        parsed = parse_state_dict(state_dict, names_only=True)
    except SerializationError as exc:
        raise CommandError(f"{str(path)!r} is not a sparsifier state: {exc}") from None
    static = [name for name, record in parsed.layers.items() if record.threshold is None]
    if static:
        raise CommandError(
            f"state file {str(path)!r} holds layers without a threshold ({_names(static)}): "
            "evaluate takes the squashed threshold-mode states that actsparse calibrate writes"
        )
    if not parsed.layers:
        raise CommandError(f"state file {str(path)!r} holds no layer")
    return list(parsed.layers)


def _names(names: list[str], shown: int = 3) -> str:
    text = ", ".join(map(repr, names[:shown]))
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_layers(text_model: _hf.TextModel, state: Path, names: list[str]) -> None:
    missing = [name for name in names if find_module(text_model.model, name) is None]
    if missing:
        raise CommandError(
            f"state file {str(state)!r} was made for another model: {len(missing)} of its "
            f"{len(names)} layers are not in {str(text_model.path)!r}: {_names(missing)}"
        )


def load_sparse(text_model: _hf.TextModel, state: Path, kernel: str) -> tuple[Any, Any]:
    """A copy of the model with the state file loaded and the kernel set."""
    from actsparse.hooks import ActivationSparsifier
    from actsparse.serialize import load_into

    sparse = copy.deepcopy(text_model.model)
    sparsifier = ActivationSparsifier(sparse)
    load_into(sparsifier, state)
    sparsifier.set_kernel(kernel)
    return sparse, sparsifier


def report(evaluation: _measure.Evaluation, kernel: str) -> str:
    width = max([10, *(len(name) for name in evaluation.layers)])
    lines = [f"{'layer':<{width}}  sparsity"]
    lines += [f"{name:<{width}}  {value:>8.1%}" for name, value in evaluation.layers.items()]
    lines.append(f"{'all layers':<{width}}  {evaluation.sparsity:>8.1%}")
    lines.append("")
    if evaluation.cosine is not None:
        lines.append(
            "quality: mean cosine of the mean-pooled embeddings to the dense model's: "
            f"{evaluation.cosine:.4f}"
        )
    else:
        lines.append(
            f"quality: perplexity {evaluation.perplexity:.4g}, dense "
            f"{evaluation.dense_perplexity:.4g} ({evaluation.perplexity_change:+.1%})"
        )
    lines.append(
        f"time over the dense model: {evaluation.time_ratio:.3f}x (kernel {kernel}; median "
        f"over {evaluation.repeat} repetitions of each batch, timed side by side; for a "
        "causal model this is prefill)"
    )
    if evaluation.decode is not None:
        lines.append(decode_line(evaluation.decode))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    transformers = _hf.require("evaluate")
    check_kernel(args.kernel)
    if args.json is not None:
        check_file(args.json, "the JSON results")
    names = read_state(args.state)
    passages = _hf.select_split(
        _hf.read_passages(args.text, limit=args.max_passages), args.split, args.text
    )
    text_model = _hf.load_model(
        transformers, args.model_dir, trust_remote_code=args.trust_remote_code
    )
    check_layers(text_model, args.state, names)
    max_tokens = _hf.check_max_tokens(text_model, args.max_tokens)
    batches = _hf.tokenize(text_model, passages, max_tokens=max_tokens, batch=args.batch)
    sparse, sparsifier = load_sparse(text_model, args.state, args.kernel)
    thresholds = {name: result.threshold for name, result in sparsifier.thresholds.items()}
    print(f"model: {text_model.description}")
    which = "" if args.split == "all" else f", the {args.split} ones"
    print(
        f"text: {args.text}, {len(passages)} passages{which}: "
        f"{_hf.real_tokens(batches):,} real tokens (at most {max_tokens} per passage)"
    )
    print(f"state: {args.state}, {len(names)} layers")
    with _hf.model_failures(text_model, args.text):
        dense_reference = _measure.reference(
            text_model.model, text_model.kind, batches, progress=args.progress
        )
        evaluation = _measure.evaluate(
            text_model.model,
            sparse,
            text_model.kind,
            batches,
            thresholds,
            dense_reference,
            repeat=args.repeat,
            progress=args.progress,
            decode_tokens=args.decode_tokens,
        )
    print()
    print(report(evaluation, args.kernel))
    if args.json is not None:
        body = {
            "model": str(args.model_dir),
            "kind": text_model.kind,
            "state": str(args.state),
            "text": str(args.text),
            "split": args.split,
            "passages": len(passages),
            "tokens": _hf.real_tokens(batches),
            "kernel": args.kernel,
            **evaluation.to_json(),
        }
        try:
            write_atomic(args.json, (json.dumps(body, indent=2) + "\n").encode())
        except OSError as exc:
            raise CommandError(f"cannot write {str(args.json)!r}: {exc.strerror or exc}") from None
        print(f"wrote {args.json}")
    return 0
