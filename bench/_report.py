"""Shared output of the bench/bench_*.py scripts: a printed table and a JSON file.

Each script calls :func:`report` once. The JSON goes to
``$ACTSPARSE_BENCH_DIR/<script name>.json`` (default ``bench-results/``), so
``nox -s bench`` leaves one file per script that can be compared across runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["median_seconds", "report"]


def median_seconds(fn: Callable[[], Any], *, repeat: int = 7, warmup: int = 1) -> float:
    """The median wall time of ``fn()`` over ``repeat`` runs, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def report(
    name: str, rows: Sequence[dict[str, Any]], *, notes: dict[str, Any] | None = None
) -> Path:
    """Print ``rows`` (dicts with the same keys) as a table and write them as JSON."""
    columns = list(rows[0]) if rows else []
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n== {name} ==")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    for key, value in (notes or {}).items():
        print(f"{key}: {_cell(value)}")
    out_dir = Path(os.environ.get("ACTSPARSE_BENCH_DIR", "bench-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {
        "name": name,
        "rows": rows,
        "notes": notes or {},
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path
