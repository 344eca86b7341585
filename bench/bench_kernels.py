"""The zero-skipping CPU kernel against F.linear on Llama-7B MLP layers, side by side.

For each layer shape (4096 -> 11008, the up and gate projections; 11008 ->
4096, the down projection), dtype (float32, bfloat16), thread count (1, 2),
input sparsity (0.4, 0.5) and token count (1, 32), one process times

* ``dense``: threshold mode today, ``F.linear(F.hardshrink(x, t), weight)``
  with the usual contiguous ``(out, in)`` weight;
* ``dense_view``: the same on the transposed view that
  ``to_input_major`` leaves as ``linear.weight`` (the dense path of a layer
  whose weight was re-stored for the kernel);
* ``sparse``: ``actsparse::sparse_linear`` on the input-major weight.

The three calls are interleaved (the order rotates every repetition) so that
load from other processes hits them alike; ``speedup`` is the median over
repetitions of dense time / sparse time within a repetition (above 1: the
kernel is faster), ``speedup_vs_view`` the same against ``dense_view``.
``crossover_tokens`` is ``measure_crossover`` for the row's shape, dtype,
threads and sparsity: the largest token count (1, 2, 4, ... 64) at which the
kernel still wins. The inputs are Gaussian with the threshold at the
sparsity's quantile of |x|; the layers have no bias, as in Llama.

Run it with ``nox -s bench`` or ``python bench/bench_kernels.py [--quick]``
(``--quick``: layers a quarter the size, fewer repetitions).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _report import report

from actsparse.kernels import cpu_kernel_status, measure_crossover, sparse_linear

SHAPES = ((4096, 11008), (11008, 4096))
QUICK_SHAPES = ((1024, 2752), (2752, 1024))
DTYPES = (torch.float32, torch.bfloat16)
THREADS = (1, 2)
SPARSITIES = (0.4, 0.5)
TOKENS = (1, 32)


def time_interleaved(
    variants: dict[str, Callable[[], Any]], reps: int, budget_s: float
) -> dict[str, list[float]]:
    """Seconds per call of each variant, per repetition, the order rotating."""
    names = list(variants)
    for fn in variants.values():  # warm up
        fn()
    start = time.perf_counter()
    variants[names[0]]()
    inner = max(1, int(budget_s / max(time.perf_counter() - start, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check(sparse: torch.Tensor, dense: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel computes what the dense path computes (a guard, not the test suite)."""
    error = float((sparse.double() - dense.double()).norm() / dense.double().norm())
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    if not error < limit:
        raise SystemExit(f"sparse and dense results differ: relative error {error:.3g}")


def layer_rows(
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(in_features * 7 + out_features)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    weight_t = weight.T.contiguous()  # what to_input_major stores
    view = weight_t.T  # what to_input_major leaves as linear.weight
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for sparsity in SPARSITIES:
            crossover = measure_crossover(
                in_features, out_features, dtype, sparsity, threads=threads, max_tokens=64
            )
            for tokens in TOKENS:
                x = torch.randn(tokens, in_features, generator=generator).to(dtype)
                t = float(torch.quantile(x.abs().double().flatten(), sparsity))
                with torch.no_grad():
                    check(
                        sparse_linear(x, weight_t, None, t),
                        F.linear(F.hardshrink(x, t), weight),
                        dtype,
                    )
                    samples = time_interleaved(
                        {
                            "dense": lambda x=x, t=t: F.linear(F.hardshrink(x, t), weight),
                            "dense_view": lambda x=x, t=t: F.linear(F.hardshrink(x, t), view),
                            "sparse": lambda x=x, t=t: sparse_linear(x, weight_t, None, t),
                        },
                        args.reps,
                        args.budget,
                    )
                zeroed = float((x.abs() <= t).float().mean())
                row = {
                    "layer": f"{in_features}->{out_features}",
                    "dtype": str(dtype).removeprefix("torch."),
                    "threads": threads,
                    "sparsity": round(zeroed, 3),
                    "tokens": tokens,
                    "dense_ms": round(statistics.median(samples["dense"]) * 1e3, 3),
                    "dense_view_ms": round(statistics.median(samples["dense_view"]) * 1e3, 3),
                    "sparse_ms": round(statistics.median(samples["sparse"]) * 1e3, 3),
                    "speedup": round(paired_ratio(samples["dense"], samples["sparse"]), 3),
                    "speedup_vs_view": round(
                        paired_ratio(samples["dense_view"], samples["sparse"]), 3
                    ),
                    "crossover_tokens": crossover,
                }
                rows.append(row)
                print(
                    f"{row['layer']:>12} {row['dtype']:>8} threads={threads} s={sparsity} "
                    f"tokens={tokens:>2}: {row['speedup']:.2f}x (crossover {crossover})",
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller layers, fewer repetitions")
    args = parser.parse_args(argv)
    args.reps = 5 if args.quick else 11
    args.budget = 0.005 if args.quick else 0.02  # seconds per timed sample, at least one call
    status = cpu_kernel_status()
    loadavg_before = [round(v, 2) for v in os.getloadavg()]
    notes: dict[str, Any] = {
        "kernel": status.reason,
        "cpu": cpu_model(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "repetitions": args.reps,
        "quick": args.quick,
        "speedup": "dense time / sparse time, median of interleaved pairs (>1: kernel faster)",
    }
    if not status.available:
        print(f"the CPU kernel is unavailable: {status.reason}")
        report("bench_kernels", [], notes=notes)
        return 0
    saved = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    try:
        for in_features, out_features in QUICK_SHAPES if args.quick else SHAPES:
            for dtype in DTYPES:
                rows.extend(layer_rows(in_features, out_features, dtype, args))
    finally:
        torch.set_num_threads(saved)
    notes["loadavg_before"] = loadavg_before
    notes["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    report("bench_kernels", rows, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
