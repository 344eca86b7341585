"""``actsparse sweep MODEL_DIR --text FILE --targets 0.3,0.4 --out DIR``: calibrate once on the
even passages, retarget to each target, evaluate each on the odd (held-out) passages, and
write the table, ``results.json``, the plot, one state file per target and a recipe."""

from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from actsparse.cli import _hf, _measure, _recipe
from actsparse.cli._app import CommandError
from actsparse.cli._cmd_calibrate import (
    add_text_options,
    describe_text,
    report_warnings,
    run_sparsify,
    weighted,
    widths,
)
from actsparse.cli._cmd_evaluate import REPEAT, add_decode_option, check_kernel, decode_line
from actsparse.cli._outputs import check_dir, written_together

__all__ = ["HELP", "configure", "run"]

HELP = (
    "calibrate a transformers model once, evaluate several targets on held-out text; write "
    "a table, a plot, state files and a recipe"
)

DEFAULT_TARGETS = "0.3,0.4,0.5,0.6"
DEFAULT_TOLERANCE = 0.02
PLOT_FILE = "quality_vs_sparsity.png"
TABLE_FILE = "table.txt"
RESULTS_FILE = "results.json"
RECIPE_FILE = "recipe.json"
FIXED_FILES = (TABLE_FILE, RESULTS_FILE, PLOT_FILE, RECIPE_FILE)
FILES_WHAT = "the sweep's files"


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1)")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    _hf.add_model_argument(parser)
    parser.add_argument(
        "--text",
        type=Path,
        required=True,
        metavar="FILE",
        help="a UTF-8 text file, one passage per paragraph; the even passages calibrate, "
        "the odd ones evaluate",
    )
    parser.add_argument(
        "--targets",
        type=_recipe.targets,
        default=_recipe.targets(DEFAULT_TARGETS),
        metavar="T,T,...",
        help=f"model-wide sparsity targets in [0, 1) (default: {DEFAULT_TARGETS})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("actsparse-sweep-out"),
        metavar="DIR",
        help="where the files go (default: ./actsparse-sweep-out)",
    )
    add_text_options(parser, defaults=True)
    parser.add_argument(
        "--kernel",
        default="dense",
        metavar="auto|dense|NAME",
        help="how the thresholded layers run while timed (default: dense)",
    )
    parser.add_argument(
        "--repeat",
        type=_recipe.positive_int,
        default=REPEAT,
        metavar="R",
        help=f"how many times each batch is timed on both models, per target (default: {REPEAT})",
    )
    add_decode_option(parser)
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help="the recipe gets the highest target whose quality loss is at most this: "
        "1 - cosine for encoders, the relative perplexity increase for causal language "
        f"models (default: {DEFAULT_TOLERANCE})",
    )


@attrs.frozen
class Row:
    target: float
    expected: float
    evaluation: _measure.Evaluation
    state: str


def state_name(target: float) -> str:
    return f"state-{target:g}.safetensors"


def table(rows: Sequence[Row], kind: str, dense_perplexity: float | None) -> str:
    head = f"{'perplexity':>10}  {'change':>7}" if kind == _hf.CAUSAL else f"{'cosine':>7}"
    decoding = any(row.evaluation.decode is not None for row in rows)
    if decoding:
        head += (
            f"  {'prefill/dense':>13}  {'decode tok/s':>12}  {'dense tok/s':>11}  {'speed-up':>8}"
        )
    else:
        head += f"  {'time/dense':>10}"
    lines = [f"{'target':>6}  {'expected':>8}  {'sparsity':>8}  {head}  state"]
    for row in rows:
        e = row.evaluation
        if kind == _hf.CAUSAL:
            quality = f"{e.perplexity:>10.4g}  {e.perplexity_change:>+7.1%}"
        else:
            quality = f"{e.cosine:>7.4f}"
        if decoding:
            d = e.decode
            speed = f"{e.time_ratio:>12.3f}x  " + (
                f"{d.sparse:>12.2f}  {d.dense:>11.2f}  {d.ratio:>7.3f}x"
                if d is not None
                else f"{'-':>12}  {'-':>11}  {'-':>8}"
            )
        else:
            speed = f"{e.time_ratio:>9.3f}x"
        lines.append(
            f"{row.target:>6.2f}  {row.expected:>8.1%}  {e.sparsity:>8.1%}  {quality}  "
            f"{speed}  {row.state}"
        )
    if kind == _hf.CAUSAL and dense_perplexity is not None:
        lines.append(f"dense perplexity: {dense_perplexity:.4g}")
    if decoding:
        lines.append(
            "prefill/dense: whole passages, sparse time over dense; decode: greedy "
            "generate() with the KV cache, the prefill taken out, side by side"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], kind: str, title: str, dense_perplexity: float | None) -> bytes:
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]

    decodes = [row.evaluation.decode for row in rows]
    decoding = all(d is not None for d in decodes) and bool(decodes)
    figure = Figure(figsize=(12.5 if decoding else 7.5, 4.5), layout="constrained")
    axes: Any = figure.subplots(1, 2)[0] if decoding else figure.subplots()
    sparsity = [100 * row.evaluation.sparsity for row in rows]
    if kind == _hf.CAUSAL:
        quality = [row.evaluation.perplexity for row in rows]
        axes.set_ylabel("perplexity (held-out text)")
        if dense_perplexity is not None:
            axes.axhline(dense_perplexity, color="gray", linestyle=":", label="dense model")
    else:
        quality = [row.evaluation.cosine for row in rows]
        axes.set_ylabel("cosine to the dense embeddings (held-out text)")
    axes.plot(sparsity, quality, marker="o", color="tab:blue", label="quality")
    for row, x, y in zip(rows, sparsity, quality, strict=True):
        axes.annotate(
            f"{row.target:g}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8
        )
    axes.set_xlabel("activation sparsity on real tokens (%)")
    axes.grid(True, alpha=0.3)
    speed = axes.twinx()
    speed.plot(
        sparsity,
        [row.evaluation.time_ratio for row in rows],
        marker="s",
        linestyle="--",
        color="tab:orange",
        label="time / dense" + (" (prefill)" if decoding else ""),
    )
    speed.axhline(1.0, color="tab:orange", linestyle=":", alpha=0.5)
    ratios = [row.evaluation.time_ratio for row in rows]
    # at least 0.9 to 1.1, so that a few percent of timing noise does not fill the axis
    speed.set_ylim(min(0.9, min(ratios) - 0.02), max(1.1, max(ratios) + 0.02))
    speed.set_ylabel("time over the dense model (side by side)")
    lines = axes.get_legend_handles_labels()
    more = speed.get_legend_handles_labels()
    axes.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    axes.set_title(title, fontsize=10)
    if decoding:
        right = figure.axes[1]
        right.plot(
            sparsity, [d.sparse for d in decodes if d], marker="o", color="tab:green",
            label="sparse model",
        )  # fmt: skip
        right.plot(
            sparsity, [d.dense for d in decodes if d], linestyle=":", color="gray",
            label="dense model (timed beside each)",
        )  # fmt: skip
        right.set_xlabel("activation sparsity on real tokens (%)")
        right.set_ylabel("decode tokens/s (greedy generate(), KV cache)")
        right.set_ylim(bottom=0)
        right.grid(True, alpha=0.3)
        right.legend(loc="lower left")
        right.set_title("token-by-token decoding", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def choose(rows: Sequence[Row], tolerance: float) -> Row:
    within = [row for row in rows if row.evaluation.quality_loss <= tolerance]
    return max(within, key=lambda row: row.target) if within else rows[0]


def run(args: argparse.Namespace) -> int:
    transformers = _hf.require("sweep", plot=True)
    check_kernel(args.kernel)
    names_seen = {state_name(t) for t in args.targets}
    if len(names_seen) != len(args.targets):
        raise CommandError("two targets give one state file name; give targets that differ more")
    check_dir(args.out, FILES_WHAT, [*sorted(names_seen), *FIXED_FILES])
    passages = _hf.read_passages(args.text, limit=args.max_passages)
    if len(passages) < 2:
        raise CommandError(
            f"text file {str(args.text)!r} holds 1 passage; a sweep needs two or more (the "
            "even ones calibrate, the odd ones evaluate), separated by blank lines"
        )
    calibration_text = _hf.select_split(passages, "even", args.text)
    evaluation_text = _hf.select_split(passages, "odd", args.text)
    text_model = _hf.load_model(
        transformers, args.model_dir, trust_remote_code=args.trust_remote_code
    )
    max_tokens = _hf.check_max_tokens(text_model, args.max_tokens)
    _hf.layer_selection(text_model.model, args.layers)
    size = {"max_tokens": max_tokens, "batch": args.batch}
    calibration = _hf.tokenize(text_model, calibration_text, **size)
    evaluation = _hf.tokenize(text_model, evaluation_text, **size)
    settings = _recipe.Settings(
        target=args.targets[0],
        layers=args.layers,
        allocation="uniform",
        max_tokens=max_tokens,
        batch=args.batch,
        max_passages=args.max_passages,
        split="even",
    )
    print(f"model: {text_model.description}")
    print(
        "calibration "
        + describe_text(args.text, len(calibration_text), "even", calibration, settings)
    )
    print(
        "evaluation " + describe_text(args.text, len(evaluation_text), "odd", evaluation, settings)
    )

    with _hf.model_failures(text_model, args.text):
        dense_reference = _measure.reference(
            text_model.model, text_model.kind, evaluation, progress=args.progress
        )
    dense = text_model.model
    sparse_model = attrs.evolve(text_model, model=copy.deepcopy(dense))
    start = time.perf_counter()
    sparsifier = run_sparsify(
        sparse_model,
        calibration,
        text=args.text,
        target=args.targets[0],
        layers=args.layers,
        allocation="uniform",
        kernel=args.kernel,
        progress=args.progress,
        command="sweep",
    )
    seconds = time.perf_counter() - start
    names = list(sparsifier.thresholds)
    layer_widths = widths(sparse_model.model, names)
    print(f"calibrated {len(names)} layers ({args.layers}) once, in {seconds:.1f} s", flush=True)

    rows: list[Row] = []
    states: dict[str, Any] = {}
    for target in args.targets:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsifier.retarget(dict.fromkeys(names, target))
            if args.kernel != "dense":
                sparsifier.set_kernel(args.kernel)  # "auto" weighs the new expected sparsity
        report_warnings(caught, "sweep")
        expected = weighted(
            {n: r.expected_sparsity for n, r in sparsifier.thresholds.items()}, layer_widths
        )
        thresholds = {n: r.threshold for n, r in sparsifier.thresholds.items()}
        with _hf.model_failures(text_model, args.text):
            result = _measure.evaluate(
                dense,
                sparse_model.model,
                text_model.kind,
                evaluation,
                thresholds,
                dense_reference,
                repeat=args.repeat,
                progress=args.progress,
                label=f"target {target:g}",
                decode_tokens=args.decode_tokens,
            )
        name = state_name(target)
        states[name] = copy.deepcopy(sparsifier.state_dict())
        rows.append(Row(target=target, expected=expected, evaluation=result, state=name))
        quality = (
            f"cosine {result.cosine:.4f}"
            if result.cosine is not None
            else f"perplexity {result.perplexity:.4g}"
        )
        print(
            f"target {target:g}: sparsity {result.sparsity:.1%}, {quality}, "
            f"time over dense {result.time_ratio:.3f}x",
            flush=True,
        )
        if result.decode is not None:
            print(f"target {target:g}: {decode_line(result.decode)}", flush=True)

    chosen = choose(rows, args.tolerance)
    text = table(rows, text_model.kind, dense_reference.perplexity)
    loss = "1 - cosine" if text_model.kind == _hf.ENCODER else "perplexity increase"
    within = chosen.evaluation.quality_loss <= args.tolerance
    print()
    print(text)
    print()
    print(
        f"recipe: target {chosen.target:g}, "
        + (
            f"the highest with {loss} at most {args.tolerance:g}"
            if within
            else f"the lowest (none has {loss} at most {args.tolerance:g})"
        )
    )
    where = "/".join(args.model_dir.resolve().parts[-2:])
    title = f"{type(dense).__name__} ({where}): quality and time against sparsity"
    results = {
        "model": str(args.model_dir),
        "kind": text_model.kind,
        "text": str(args.text),
        "passages": {"calibration": len(calibration_text), "evaluation": len(evaluation_text)},
        "tokens": {
            "calibration": _hf.real_tokens(calibration),
            "evaluation": _hf.real_tokens(evaluation),
        },
        "max_tokens": max_tokens,
        "batch": args.batch,
        "layers": names,
        "kernel": args.kernel,
        "calibration_s": seconds,
        "dense_perplexity": dense_reference.perplexity,
        "rows": [
            {
                "target": r.target,
                "expected_sparsity": r.expected,
                "state": r.state,
                **r.evaluation.to_json(),
            }
            for r in rows
        ],
        "recipe": {"file": RECIPE_FILE, "target": chosen.target, "tolerance": args.tolerance},
    }
    recipe = _recipe.recipe_json(
        attrs.evolve(settings, target=chosen.target),
        text_sha256=_hf.sha256(args.text),
        made_by="actsparse sweep",
        model=str(args.model_dir),
    )
    image = plot(rows, text_model.kind, title, dense_reference.perplexity)
    from actsparse.serialize import save

    with written_together(args.out, FILES_WHAT) as staged:
        for name, state in states.items():
            staged.write(name, functools.partial(save, state))
        for name, data in (
            (TABLE_FILE, (text + "\n").encode()),
            (RESULTS_FILE, (json.dumps(results, indent=2) + "\n").encode()),
            (PLOT_FILE, image),
            (RECIPE_FILE, recipe),
        ):
            staged.write_bytes(name, data)
    for name in (PLOT_FILE, TABLE_FILE, RESULTS_FILE, RECIPE_FILE, *states):
        print(f"wrote {args.out / name}")
    return 0
