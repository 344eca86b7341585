"""Hook overhead, accumulator size, peak memory and folding: actsparse next to torch.ao.

Run ``python bench/bench_hooks.py [--quick] [--json PATH] [--device cpu|cuda]``
(``nox -s bench`` runs it). Every ratio comes from one process: the plain
model, the model hooked by actsparse and the model hooked by torch.ao share
weights and inputs, and their timings are interleaved (the order rotates every
repetition) so that load from other processes hits all of them alike. Each
figure is the median over the repetitions of the mean time of one call.

Both sparsifiers get the seed's functions: an additive aggregate, a mean over
dim 0 and a magnitude mask. actsparse gets them by registered name (``"sum"``,
``"mean"``, ``"magnitude"``); torch.ao gets the equivalent plain functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

# the seed CNN lives with the tests, which share it with the benches
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _seed import SeedCNN

from actsparse.hooks import ActivationSparsifier

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
        ActivationSparsifier as TorchAOSparsifier,
    )

#: actsparse aggregates benchmarked against torch.ao's seed-style ``x + y``:
#: one entry per aggregate strategy name (a streaming aggregate is one more line).
# "sum" is the seed's aggregate (its accumulator has the input's shape); the
# streaming "abs_mean" folds the sample dimensions, so its accumulator does not
# grow with the batch. torch.ao always runs the seed's functions.
AGGREGATES: tuple[str, ...] = ("sum", "abs_mean")

SEED_BATCHES = (1, 16, 64)
#: peak memory only (no timing) at these batch sizes
MEMORY_ONLY_BATCHES = (256,)


# ------------------------------------------------------------------ the seed


def add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return left + right


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=0)


def per_feature_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean |x| over every dimension but the last: one value per input feature."""
    return t.abs().flatten(0, -2).mean(0)


def magnitude(data: torch.Tensor, sparsity_level: float) -> torch.Tensor:
    flat = data.abs().flatten()
    keep = torch.ones_like(flat)
    keep[torch.sort(flat).indices[: round(sparsity_level * flat.numel())]] = 0
    return keep.view(data.shape)


class MLPBlock(nn.Module):
    """A transformer MLP block: Linear 384->1536, GELU, Linear 1536->384."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(384, 1536)
        self.act = nn.GELU()
        self.down = nn.Linear(1536, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(self.act(self.up(x)))
        return out


#: (layer, per-layer arguments) for each registration set
Registration = list[tuple[str, dict[str, Any]]]


def seed_layers(linear1_features: list[int]) -> Registration:
    return [
        ("conv1", {"sparsity_level": 0.3}),
        ("linear1", {"features": linear1_features, "feature_dim": 1}),
        ("identity1", {"sparsity_level": 0.7}),
        ("identity2", {"features": [0, 10, 20], "feature_dim": 1}),
    ]


SEED_FEATURES = [0, 10, 234]
WIDE_FEATURES = [8 * i for i in range(576)]  # 576 single-index features of 4608

MLP_LAYERS: Registration = [("up", {}), ("down", {})]


def attach_actsparse(model: nn.Module, layers: Registration, aggregate: str) -> Any:
    # A streaming aggregate has already folded the samples: reduce with "identity".
    reduce = "mean" if aggregate == "sum" else "identity"
    sparsifier = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn=reduce, mask_fn="magnitude", sparsity_level=0.5
    )
    for name, kwargs in layers:
        sparsifier.register_layer(model.get_submodule(name), **kwargs)
    return sparsifier


def attach_torch_ao(model: nn.Module, layers: Registration) -> Any:
    sparsifier = TorchAOSparsifier(
        model, aggregate_fn=add, reduce_fn=batch_mean, mask_fn=magnitude, sparsity_level=0.5
    )
    for name, kwargs in layers:
        sparsifier.register_layer(model.get_submodule(name), **kwargs)
    return sparsifier


# ------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timings:
    """Per-repetition seconds per call of each variant, taken side by side."""

    def __init__(self, samples: dict[str, list[float]]) -> None:
        self.samples = samples

    def median(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over repetitions of numerator / denominator within the repetition."""
        pairs = zip(self.samples[numerator], self.samples[denominator], strict=True)
        return statistics.median(a / b for a, b in pairs)


def time_interleaved(
    variants: dict[str, Callable[[], Any]], reps: int, device: torch.device, budget_s: float
) -> Timings:
    """Time every variant in each repetition, the order rotating from one to the next."""
    names = list(variants)
    for fn in variants.values():  # warm up
        for _ in range(3):
            fn()
    sync(device)
    start = time.perf_counter()
    variants[names[0]]()
    sync(device)
    once = time.perf_counter() - start
    inner = max(1, int(budget_s / max(once, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            fn = variants[name]
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / inner)
    return Timings(samples)


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence the profiler's native start/stop lines on fd 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during one call, above what was allocated before it."""
    fn()  # the accumulators exist before the measured call
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with quiet_fds(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def accumulator_bytes(sparsifier: Any) -> int:
    return sum(tensor_bytes(group.get("data")) for group in sparsifier.data_groups.values())


# ------------------------------------------------------------------ scenarios


class Hooked(NamedTuple):
    """One set of weights three times: plain, hooked by actsparse, hooked by torch.ao."""

    calls: dict[str, Callable[[], Any]]  # "plain", "actsparse", "torch.ao": one forward each
    ours: Any
    theirs: Any

    def accumulator_bytes(self) -> dict[str, int]:
        return {
            "actsparse": accumulator_bytes(self.ours),
            "torch.ao": accumulator_bytes(self.theirs),
        }

    def peak_bytes(self, device: torch.device) -> dict[str, int]:
        return {k: peak_bytes(fn, device) for k, fn in self.calls.items()}


def hooked(
    make_model: Callable[[], nn.Module],
    layers: Registration,
    x: torch.Tensor,
    aggregate: str,
    device: torch.device,
) -> Hooked:
    torch.manual_seed(0)
    plain = make_model().eval().to(device)
    ours = copy.deepcopy(plain)
    theirs = copy.deepcopy(plain)
    ours_sparsifier = attach_actsparse(ours, layers, aggregate)
    theirs_sparsifier = attach_torch_ao(theirs, layers)
    calls = {
        "plain": lambda: plain(x),
        "actsparse": lambda: ours(x),
        "torch.ao": lambda: theirs(x),
    }
    return Hooked(calls, ours_sparsifier, theirs_sparsifier)


def hooks_row(
    label: str,
    make_model: Callable[[], nn.Module],
    layers: Registration,
    x: torch.Tensor,
    aggregate: str,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Calibration and masked inference: plain vs actsparse vs torch.ao."""
    models = hooked(make_model, layers, x, aggregate, device)
    calls = models.calls
    row: dict[str, Any] = {"scenario": label, "aggregate": aggregate}
    with torch.no_grad():
        t = time_interleaved(calls, args.reps, device, args.budget)
        row["calibration_s"] = t.median()
        row["calibration_ratio"] = {k: t.ratio(k, "plain") for k in ("actsparse", "torch.ao")}
        row["calibration_ao_over_actsparse"] = t.ratio("torch.ao", "actsparse")
        row["accumulator_bytes"] = models.accumulator_bytes()
        row["peak_bytes_calibration"] = models.peak_bytes(device)
        for sparsifier in (models.ours, models.theirs):
            sparsifier.step()
            sparsifier.squash_mask()
        t = time_interleaved(calls, args.reps, device, args.budget)
        row["masked_s"] = t.median()
        row["masked_ratio"] = {k: t.ratio(k, "plain") for k in ("actsparse", "torch.ao")}
        if aggregate == "sum":  # the seed's functions on both sides: same masks, same outputs
            torch.testing.assert_close(calls["actsparse"](), calls["torch.ao"]())
    return row


def memory_row(
    label: str,
    make_model: Callable[[], nn.Module],
    layers: Registration,
    x: torch.Tensor,
    aggregate: str,
    device: torch.device,
) -> dict[str, Any]:
    models = hooked(make_model, layers, x, aggregate, device)
    with torch.no_grad():
        peaks = models.peak_bytes(device)
    return {
        "scenario": label,
        "aggregate": aggregate,
        "peak_bytes_calibration": peaks,
        "accumulator_bytes": models.accumulator_bytes(),
    }


def fold_row(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """MLP block, 50% per-feature sparsity on the down projection's input."""
    torch.manual_seed(0)
    x = torch.randn(8, 128, 384, device=device)
    calibration = [torch.randn(8, 128, 384, device=device) for _ in range(2)]
    dense = MLPBlock().eval().to(device)
    models: dict[str, nn.Module] = {}
    with torch.no_grad():
        for key in ("actsparse hooked", "fold", "fold+prune"):
            model = copy.deepcopy(dense)
            sparsifier = ActivationSparsifier(
                model,
                aggregate_fn="sum",
                reduce_fn=per_feature_mean,
                mask_fn="magnitude",
                sparsity_level=0.5,
            )
            sparsifier.register_layer(model.down)
            for batch in calibration:
                model(batch)
            sparsifier.step()
            sparsifier.squash_mask()
            if key != "actsparse hooked":
                folded = sparsifier.fold(prune=key == "fold+prune")
                if folded != ["down"]:
                    raise SystemExit(f"{key}: fold() folded {folded}, expected ['down']")
            models[key] = model
        theirs = copy.deepcopy(dense)
        ao = TorchAOSparsifier(
            theirs,
            aggregate_fn=add,
            reduce_fn=per_feature_mean,
            mask_fn=magnitude,
            sparsity_level=0.5,
        )
        ao.register_layer(theirs.down)
        for batch in calibration:
            theirs(batch)
        ao.step()
        ao.squash_mask()
        models["torch.ao hooked"] = theirs
        reference = models["actsparse hooked"](x)
        for key, model in models.items():
            torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-5, msg=key)
        calls: dict[str, Callable[[], Any]] = {"dense": lambda: dense(x)}
        for key, model in models.items():
            calls[key] = lambda model=model: model(x)
        t = time_interleaved(calls, args.reps, device, args.budget)
    pruned = models["fold+prune"]
    return {
        "scenario": "MLP block, 50% per-feature mask on down's input",
        "seconds": t.median(),
        "speedup_over_dense": {k: t.ratio("dense", k) for k in t.samples if k != "dense"},
        "shapes_after_prune": {
            "up": list(pruned.get_submodule("up").weight.shape),
            "down": list(pruned.get_submodule("down").weight.shape),
        },
    }


# ------------------------------------------------------------------ report


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_report(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(
        f"torch {meta['torch']} on {meta['device']}, {meta['threads']} thread(s), "
        f"{meta['reps']} interleaved repetitions, medians; "
        f"load average {meta['loadavg_before']} -> {meta['loadavg_after']}"
    )
    print()
    header = (
        f"{'scenario':<34} {'agg':<5} {'calib ours':>10} {'calib ao':>9} {'ao/ours':>8} "
        f"{'masked ours':>11} {'masked ao':>9} {'acc KiB ours':>12} {'acc KiB ao':>10} "
        f"{'peak MiB plain/ours/ao':>24}"
    )
    print(header)
    print("-" * len(header))
    for row in result["hooks"]:
        peak = row["peak_bytes_calibration"]
        acc = row["accumulator_bytes"]
        print(
            f"{row['scenario']:<34} {row['aggregate']:<5} "
            f"{row['calibration_ratio']['actsparse']:>9.3f}x "
            f"{row['calibration_ratio']['torch.ao']:>8.3f}x "
            f"{row['calibration_ao_over_actsparse']:>7.2f}x "
            f"{row['masked_ratio']['actsparse']:>10.3f}x "
            f"{row['masked_ratio']['torch.ao']:>8.3f}x "
            f"{acc['actsparse'] / 1024:>12.1f} {acc['torch.ao'] / 1024:>10.1f} "
            f"{mib(peak['plain']):>8}/{mib(peak['actsparse'])}/{mib(peak['torch.ao'])}"
        )
    print()
    print("calib/masked: hooked forward time / plain forward time (lower is better);")
    print("ao/ours: torch.ao calibration time / actsparse calibration time.")
    if result["memory"]:
        print()
        print(
            f"{'peak memory during calibration':<34} {'agg':<5} {'plain MiB':>10} "
            f"{'ours MiB':>9} {'ao MiB':>9} {'ours/plain':>10} {'ao/plain':>9}"
        )
        for row in result["memory"]:
            peak = row["peak_bytes_calibration"]
            print(
                f"{row['scenario']:<34} {row['aggregate']:<5} {mib(peak['plain']):>10} "
                f"{mib(peak['actsparse']):>9} {mib(peak['torch.ao']):>9} "
                f"{peak['actsparse'] / peak['plain']:>9.3f}x "
                f"{peak['torch.ao'] / peak['plain']:>8.3f}x"
            )
    fold = result["fold"]
    print()
    print(fold["scenario"])
    for key, seconds in fold["seconds"].items():
        speedup = fold["speedup_over_dense"].get(key, 1.0)
        print(f"  {key:<18} {seconds * 1e3:>8.3f} ms   {speedup:>5.2f}x dense speed")
    print(
        f"  after fold(prune=True): up {fold['shapes_after_prune']['up']}, "
        f"down {fold['shapes_after_prune']['down']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rows")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only-fold", action="store_true", help="run only the fold rows")
    args = parser.parse_args(argv)
    if args.json is None and "ACTSPARSE_BENCH_DIR" in os.environ:
        args.json = Path(os.environ["ACTSPARSE_BENCH_DIR"]) / "bench_hooks.json"
    args.reps = 9 if args.quick else 61
    args.budget = 0.002 if args.quick else 0.004  # seconds per timed sample
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    loadavg_before = [round(v, 2) for v in os.getloadavg()]

    batches = () if args.only_fold else (1, 16) if args.quick else SEED_BATCHES
    hooks: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    for aggregate in () if args.only_fold else AGGREGATES:
        for batch in batches:
            x = torch.randn(batch, 1, 28, 28, device=device)
            for tag, features in (("seed features", SEED_FEATURES), ("576", WIDE_FEATURES)):
                label = f"seed CNN b{batch}, {tag}"
                hooks.append(
                    hooks_row(label, SeedCNN, seed_layers(features), x, aggregate, args, device)
                )
        x = torch.randn(8, 128, 384, device=device)
        hooks.append(
            hooks_row("MLP block (8,128,384)", MLPBlock, MLP_LAYERS, x, aggregate, args, device)
        )
        for batch in (1, *MEMORY_ONLY_BATCHES):
            x = torch.randn(batch, 1, 28, 28, device=device)
            memory.append(
                memory_row(
                    f"seed CNN b{batch}, seed features",
                    SeedCNN,
                    seed_layers(SEED_FEATURES),
                    x,
                    aggregate,
                    device,
                )
            )
    fold = fold_row(args, device)
    result = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "quick": args.quick,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_before": loadavg_before,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "command": " ".join(["python", "bench/bench_hooks.py", *(argv or sys.argv[1:])]),
        },
        "hooks": hooks,
        "memory": memory,
        "fold": fold,
    }
    print_report(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
