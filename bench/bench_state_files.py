"""State-file size and speed on the seed CNN workflow, side by side in one run.

The seed workflow (tests/_seed.py: run_seed_workflow) calibrates the
seed CNN; torch.ao's own ActivationSparsifier is run on the same weights and
batches with the same functions, and the script checks that both give the
same masks. Then it measures, for those masks:

* ``torch.save`` of torch.ao's state dict (sparse COO masks, pickled functions)
  and its ``torch.load`` (which needs ``weights_only=False``);
* actsparse's default file (``actsparse.serialize.save``) and its ``load``;
* actsparse's torch-style file (``format="torch"``).

``to_bytes_ms`` is the in-memory encoding alone (``state_dict()`` included for
actsparse); ``save_ms`` adds the file write, and for actsparse the fsync and
rename of its atomic write, which torch.save does not do.

Run it with ``nox -s bench`` or ``python bench/bench_state_files.py``.
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from _report import median_seconds, report

# the seed CNN and its workflow live with the tests, which share them with the benches
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _seed import SeedCNN, run_seed_workflow

import actsparse.serialize as serialize
from actsparse.core import get_registry
from actsparse.masks._functions import magnitude_mask, mean_over_batch, sum_aggregate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
        ActivationSparsifier as TorchAOSparsifier,
    )

SEED = 0
BATCHES = 4
BATCH_SIZE = 16
LAYERS: list[tuple[str, dict[str, Any]]] = [
    ("conv1", {"sparsity_level": 0.3}),
    ("linear1", {"features": [0, 10, 234], "feature_dim": 1}),
    ("identity1", {"sparsity_level": 0.7}),
    ("identity2", {"features": [0, 10, 20], "feature_dim": 1}),
]


def torch_ao_workflow() -> TorchAOSparsifier:
    """torch.ao on the seed workflow: the same seed, weights, batches and functions."""
    torch.manual_seed(SEED)  # run_seed_workflow seeds, builds the model, then draws batches
    model = SeedCNN().eval()
    sparsifier = TorchAOSparsifier(
        model,
        aggregate_fn=sum_aggregate,
        reduce_fn=mean_over_batch,
        mask_fn=magnitude_mask,
        sparsity_level=0.5,
    )
    for name, config in LAYERS:
        sparsifier.register_layer(getattr(model, name), **config)
    with torch.no_grad():
        for _ in range(BATCHES):
            model(torch.randn(BATCH_SIZE, 1, 28, 28))
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def _same_masks(left: Any, right: Any) -> bool:
    if isinstance(left, list):
        return len(left) == len(right) and all(
            torch.equal(a.to_dense(), b.to_dense()) for a, b in zip(left, right, strict=True)
        )
    return torch.equal(left.to_dense(), right.to_dense())


def main() -> None:
    _, ours = run_seed_workflow(batches=BATCHES, batch_size=BATCH_SIZE, seed=SEED)
    theirs = torch_ao_workflow()
    for name, _ in LAYERS:
        if not _same_masks(ours.get_mask(name), theirs.get_mask(name)):
            raise SystemExit(f"actsparse and torch.ao disagree on the mask of {name!r}")
    torch_ao_state = theirs.state_dict()
    dense_mask_bytes = sum(
        m.numel() * m.element_size()
        for name, _ in LAYERS
        for m in (lambda v: v if isinstance(v, list) else [v])(ours.get_mask(name))
    )

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ao_path = folder / "torch_ao.pt"
        default_path = folder / "actsparse.safetensors"
        torch_path = folder / "actsparse.pt"

        def save_ao() -> None:
            torch.save(torch_ao_state, ao_path)

        def bytes_ao() -> None:
            torch.save(torch_ao_state, io.BytesIO())

        def load_ao() -> None:
            torch.load(ao_path, weights_only=False)  # it holds functions: no safe load

        rows = [
            {
                "file": "torch.save(torch.ao state_dict)",
                "bytes": 0,
                "to_bytes_ms": median_seconds(bytes_ao) * 1e3,
                "save_ms": median_seconds(save_ao) * 1e3,
                "load_ms": median_seconds(load_ao) * 1e3,
                "safe_load": "no",
            }
        ]
        rows[0]["bytes"] = ao_path.stat().st_size
        for label, path, fmt in (
            ("actsparse default (safetensors)", default_path, "safetensors"),
            ("actsparse format='torch'", torch_path, "torch"),
        ):

            def save_ours(path: Path = path, fmt: str = fmt) -> None:
                serialize.save(ours, path, format=fmt)

            def load_ours(path: Path = path) -> None:
                serialize.load(path)

            def bytes_ours(fmt: str = fmt) -> None:
                get_registry().get("serializer", fmt).dumps(ours.state_dict())

            save_ms = median_seconds(save_ours) * 1e3
            rows.append(
                {
                    "file": label,
                    "bytes": path.stat().st_size,
                    "to_bytes_ms": median_seconds(bytes_ours) * 1e3,
                    "save_ms": save_ms,
                    "load_ms": median_seconds(load_ours) * 1e3,
                    "safe_load": "yes",
                }
            )
    baseline = rows[0]["bytes"]
    for row in rows:
        row["size_vs_torch_ao"] = row["bytes"] / baseline
    report(
        "bench_state_files",
        rows,
        notes={
            "workflow": f"seed CNN, {BATCHES} batches of {BATCH_SIZE}, after squash_mask()",
            "torch threads": torch.get_num_threads(),
            "dense mask bytes (all layers)": dense_mask_bytes,
            "torch.ao / default file size": baseline / rows[1]["bytes"],
        },
    )


if __name__ == "__main__":
    main()
