"""Calibration across processes: two gloo ranks on the CPU agree with one process.

One pair of worker processes (this file, run as a script) calibrates every case
below on its shard of the data and writes masks, finalized statistics, state
files and the errors it saw; the tests compare them with one process that
calibrates on all the data. Starting the pair once keeps the module fast.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _support import same_state
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from actsparse.core import (
    AggregateStrategy,
    ConfigError,
    StateError,
    get_registry,
)
from actsparse.hooks import ActivationSparsifier
from actsparse.masks import sum_aggregate
from actsparse.serialize import load, load_into, save

WORLD = 2
DDP_AGGREGATE = "abs_mean"
TIMEOUT_S = 120
LINEAR_FEATURES = [0, [5, 7], 20]


def builtin_aggregates() -> list[str]:
    return [
        entry.record.name
        for entry in get_registry().entries("aggregate")
        if entry.distribution == "actsparse-masks"
    ]


#: Aggregates for threshold mode, whose mask strategy is dynamic: they get a
#: case of their own, with target_threshold instead of magnitude.
THRESHOLD_AGGREGATES = {"abs_histogram"}


def static_aggregates() -> list[str]:
    return [name for name in builtin_aggregates() if name not in THRESHOLD_AGGREGATES]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 6)).double()


def batches(sizes: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=generator) for n in sizes]


def batch_sizes(aggregate: str) -> list[int]:
    # An elementwise accumulator keeps the batch shape: every batch alike there.
    if get_registry().get("aggregate", aggregate).elementwise:
        return [4, 4, 4, 4, 4]
    return [4, 3, 5, 2, 6]


def shard(data: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    return data[rank::WORLD]


def reduce_for(aggregate: Any) -> str:
    record = aggregate if isinstance(aggregate, AggregateStrategy) else None
    if record is None and isinstance(aggregate, str):
        record = get_registry().get("aggregate", aggregate)
    return "mean" if record is None or record.elementwise else "identity"


def register(
    sparsifier: ActivationSparsifier,
    model: nn.Module,
    reduce: Callable[[str], Any] | None = None,
) -> None:
    """Register the conv (whole input) and the linear layer (three features)."""
    sparsifier.register_layer(model[0], **({} if reduce is None else {"reduce_fn": reduce("0")}))
    sparsifier.register_layer(
        model[3],
        features=LINEAR_FEATURES,
        feature_dim=1,
        **({} if reduce is None else {"reduce_fn": reduce("3")}),
    )


def masks_of(sparsifier: ActivationSparsifier) -> dict[str, Any]:
    return {name: sparsifier.get_mask(name) for name in sparsifier.data_groups}


def feed(model: nn.Module, data: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in data:
            model(x)


def calibrate_case(
    aggregate: Any, data: list[torch.Tensor], path: Path | None, **step: Any
) -> dict[str, Any]:
    """Masks, finalized statistics and (with ``path``) a state file of one calibration."""
    model = make_model()
    named = ActivationSparsifier(
        model,
        aggregate_fn=aggregate,
        reduce_fn=reduce_for(aggregate),
        mask_fn="magnitude",
        sparsity_level=0.5,
    )
    register(named, model)
    stats: dict[str, list[torch.Tensor]] = {"0": [], "3": []}
    base = reduce_for(aggregate)

    def recorder(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def record(data: torch.Tensor) -> torch.Tensor:
            stats[name].append(data.clone())
            return data.mean(dim=0) if base == "mean" else data

        return record

    recording = ActivationSparsifier(
        model, aggregate_fn=aggregate, mask_fn="magnitude", sparsity_level=0.5
    )
    register(recording, model, reduce=recorder)
    feed(model, data)
    named.step(**step)
    recording.step(**step)
    if path is not None:
        save(named, path)
    return {"masks": masks_of(named), "stats": stats}


#: Threshold cases: the plain score, the weighted one (|x| * ||W[:, i]||, so the
#: Linear layer only) and the compensated one (signed sums per feature as well).
THRESHOLD_CASES = {
    "target_threshold": ("target_threshold", False),
    "weighted_threshold": ("weighted_threshold", False),
    "compensated": ("target_threshold", True),
}


def threshold_case(
    aggregate: str, data: list[torch.Tensor], path: Path | None, case: str = "target_threshold"
) -> dict[str, Any]:
    """Thresholds, offsets (and with ``path`` a state file) of one threshold-mode
    calibration."""
    mask_fn, sums = THRESHOLD_CASES[case]
    model = make_model()
    sparsifier = ActivationSparsifier(
        model,
        aggregate_fn=aggregate,
        reduce_fn="identity",
        mask_fn=mask_fn,
        # Above the zero fraction after the ReLU (about 0.48), so reachable.
        sparsity_level=0.6,
        **({"feature_sums": True} if sums else {}),
    )
    if mask_fn == "target_threshold":
        sparsifier.register_layer(model[0])
    sparsifier.register_layer(model[3])
    feed(model, data)
    sparsifier.step()
    if path is not None:
        save(sparsifier, path)
    state = sparsifier.state_dict()["state"]
    return {
        "thresholds": {n: r.to_dict() for n, r in sparsifier.thresholds.items()},
        "offsets": {n: e["offset"] for n, e in state.items() if "offset" in e},
    }


def _sum_all_reduce(accumulator: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(accumulator, group=group)
    return accumulator


# Neither elementwise nor with a feature_axis: the runtime keeps one
# accumulator per feature, and combine runs once for each.
CALLABLE_COMBINE = AggregateStrategy(
    name="sum_combined_by_callable", fn=sum_aggregate, combine=_sum_all_reduce
)


def _plain_sum(accumulator: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return accumulator + x


def _error(call: Callable[[], object]) -> tuple[str, str] | None:
    try:
        call()
    except (ConfigError, StateError) as exc:
        return type(exc).__name__, str(exc)
    return None


def _data_of(sparsifier: ActivationSparsifier) -> dict[str, Any]:
    out = {}
    for name, group in sparsifier.data_groups.items():
        data = group.get("data")
        if isinstance(data, list):
            out[name] = [d.clone() for d in data]
        else:
            out[name] = None if data is None else data.clone()
    return out


def _failing_step(data: list[torch.Tensor], aggregate: Any, **step: Any) -> dict[str, Any]:
    """A step() expected to fail on every rank: the error and whether data survived."""
    model = make_model()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    register(sparsifier, model)
    feed(model, data)
    before = (_data_of(sparsifier), _masks(sparsifier)) if data else None
    error = _error(lambda: sparsifier.step(**step))
    unchanged = before is None or (
        same_state(before[0], _data_of(sparsifier)) and same_state(before[1], _masks(sparsifier))
    )
    return {"error": error, "data_unchanged": unchanged}


def _masks(sparsifier: ActivationSparsifier) -> dict[str, Any]:
    return {name: entry["mask"] for name, entry in sparsifier.state.items()}


def _ddp_case(rank: int, out: Path) -> dict[str, Any]:
    """Calibrate through DistributedDataParallel, as a training script would."""
    wrapped = DistributedDataParallel(make_model())
    sparsifier = ActivationSparsifier(
        wrapped,
        aggregate_fn=DDP_AGGREGATE,
        reduce_fn="identity",
        mask_fn="magnitude",
        sparsity_level=0.5,
    )
    sparsifier.register_layer(wrapped.module[0])
    sparsifier.register_layer(wrapped.module[3], features=LINEAR_FEATURES, feature_dim=1)
    feed(wrapped, shard(batches(batch_sizes(DDP_AGGREGATE)), rank))
    sparsifier.step()
    save(sparsifier, out / f"ddp-rank{rank}.safetensors")
    return {"names": sorted(sparsifier.data_groups)}


def worker(rank: int, init_file: str, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}

    def run(case: str, call: Callable[[], dict[str, Any]]) -> None:
        # One failing case is reported by its own test, not by all of them.
        try:
            results[case] = call()
        except Exception:
            results[case] = {"crash": traceback.format_exc()}

    try:
        for aggregate in static_aggregates():
            data = shard(batches(batch_sizes(aggregate)), rank)
            path = out / f"{aggregate}-rank{rank}.safetensors"
            run(aggregate, functools.partial(calibrate_case, aggregate, data, path))
        for aggregate in sorted(THRESHOLD_AGGREGATES):
            data = shard(batches(batch_sizes(aggregate)), rank)
            for name in THRESHOLD_CASES:
                case = f"{aggregate}-{name}"
                path = out / f"{case}-rank{rank}.safetensors"
                run(case, functools.partial(threshold_case, aggregate, data, path, name))
        sums = shard(batches(batch_sizes("sum")), rank)
        run("callable_combine", lambda: calibrate_case(CALLABLE_COMBINE, sums, None))
        group = dist.new_group(list(range(WORLD)))
        maxes = shard(batches(batch_sizes("abs_max")), rank)
        run(
            "explicit_group",
            lambda: calibrate_case("abs_max", maxes, None, process_group=group),
        )
        run("ddp", lambda: _ddp_case(rank, out))
        run("no_combine", lambda: _failing_step(sums, _plain_sum))
        run(
            "local_only",
            lambda: calibrate_case(_plain_sum, sums, None, process_group=False),
        )
        uneven = batches([4] if rank == 0 else [3])
        run("shape_mismatch", lambda: _failing_step(uneven, "sum"))
        run("no_data", lambda: _failing_step(sums if rank == 0 else [], "sum"))
        run("bad_group", lambda: _failing_step(sums, "sum", process_group="world"))
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()


# ----------------------------------------------------------------- the tests

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is absent")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("distributed")
    init_file = out / "store"
    # The ranks run this file as a script: give them tests/ for _support.
    support = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(init_file), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    return out, [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def _case(result: dict[str, Any], case: str) -> dict[str, Any]:
    got: dict[str, Any] = result[case]
    assert "crash" not in got, got.get("crash")
    return got


def _assert_masks_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert same_state(got[name], want[name]), f"layer {name!r}: masks differ"


def _assert_stats_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in want:
        assert len(got[name]) == len(want[name]) > 0
        for a, b in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregate", static_aggregates())
def test_every_rank_gets_the_masks_of_one_process_on_all_data(
    ranks: tuple[Path, list[dict[str, Any]]], aggregate: str, tmp_path: Path
) -> None:
    out, results = ranks
    single = calibrate_case(
        aggregate, batches(batch_sizes(aggregate)), tmp_path / "one.safetensors"
    )
    for result in results:
        _assert_masks_equal(_case(result, aggregate)["masks"], single["masks"])
        # The statistic itself, not only its ranking: sums and counts combine.
        _assert_stats_close(_case(result, aggregate)["stats"], single["stats"])
    # The masks are not those of any one shard alone.
    alone = calibrate_case(aggregate, shard(batches(batch_sizes(aggregate)), 0), None)
    assert not same_state(alone["masks"], single["masks"])

    want = load(tmp_path / "one.safetensors")
    for rank in range(WORLD):
        got = load(out / f"{aggregate}-rank{rank}.safetensors")
        assert got["data_groups"] == want["data_groups"]
        assert got["defaults"] == want["defaults"]
        assert same_state(
            {k: v["mask"] for k, v in got["state"].items()},
            {k: v["mask"] for k, v in want["state"].items()},
        )


@pytest.mark.parametrize("name", list(THRESHOLD_CASES))
@pytest.mark.parametrize("aggregate", sorted(THRESHOLD_AGGREGATES))
def test_every_rank_gets_the_thresholds_of_one_process_on_all_data(
    ranks: tuple[Path, list[dict[str, Any]]], aggregate: str, name: str, tmp_path: Path
) -> None:
    out, results = ranks
    data = batches(batch_sizes(aggregate))
    single = threshold_case(aggregate, data, tmp_path / "one.safetensors", name)
    layers = {"3"} if name == "weighted_threshold" else {"0", "3"}
    assert set(single["thresholds"]) == layers
    assert set(single["offsets"]) == (layers if name == "compensated" else set())
    case = f"{aggregate}-{name}"
    for result in results:
        got = _case(result, case)
        # Histogram counts are integers: the combined thresholds are exact.
        assert got["thresholds"] == single["thresholds"]
        # The signed sums are float64, added in another order: equal to rounding.
        assert set(got["offsets"]) == set(single["offsets"])
        for layer, offset in single["offsets"].items():
            torch.testing.assert_close(got["offsets"][layer], offset)
    alone = threshold_case(aggregate, shard(data, 0), None, name)
    assert alone["thresholds"] != single["thresholds"]
    want = load(tmp_path / "one.safetensors")
    for rank in range(WORLD):
        got = load(out / f"{case}-rank{rank}.safetensors")
        assert got["data_groups"] == want["data_groups"]
        assert {k: v.get("threshold") for k, v in got["state"].items()} == {
            k: v.get("threshold") for k, v in want["state"].items()
        }


def test_every_builtin_aggregate_declares_combine() -> None:
    for name in builtin_aggregates():
        assert get_registry().get("aggregate", name).combine is not None, name


def test_a_state_saved_under_ddp_loads_into_the_plain_model(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, results = ranks
    single = calibrate_case(DDP_AGGREGATE, batches(batch_sizes(DDP_AGGREGATE)), None)
    for rank, result in enumerate(results):
        assert _case(result, "ddp")["names"] == ["module.0", "module.3"]
        plain = ActivationSparsifier(make_model())
        load_into(plain, out / f"ddp-rank{rank}.safetensors")
        assert sorted(plain.data_groups) == ["0", "3"]
        _assert_masks_equal(masks_of(plain), single["masks"])


def test_a_callable_combine_runs_once_per_feature_accumulator(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    single = calibrate_case(CALLABLE_COMBINE, batches(batch_sizes("sum")), None)
    for result in ranks[1]:
        _assert_masks_equal(_case(result, "callable_combine")["masks"], single["masks"])
        _assert_stats_close(_case(result, "callable_combine")["stats"], single["stats"])


def test_an_explicit_process_group_is_used(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    single = calibrate_case("abs_max", batches(batch_sizes("abs_max")), None)
    for result in ranks[1]:
        _assert_masks_equal(_case(result, "explicit_group")["masks"], single["masks"])
        _assert_stats_close(_case(result, "explicit_group")["stats"], single["stats"])


def test_an_aggregate_without_combine_is_an_error_on_every_rank(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    for rank, result in enumerate(ranks[1]):
        case = _case(result, "no_combine")
        assert case["error"] is not None, f"rank {rank} did not raise"
        kind, message = case["error"]
        assert kind == "ConfigError"
        assert "combine=" in message
        assert "process_group=False" in message
        assert case["data_unchanged"]


def test_process_group_false_keeps_each_rank_to_its_own_data(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    sums = batches(batch_sizes("sum"))
    for rank, result in enumerate(ranks[1]):
        local = calibrate_case(_plain_sum, shard(sums, rank), None)
        _assert_masks_equal(_case(result, "local_only")["masks"], local["masks"])


def test_accumulators_of_other_shapes_fail_on_every_rank(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    for result in ranks[1]:
        case = _case(result, "shape_mismatch")
        assert case["error"] is not None
        kind, message = case["error"]
        assert kind == "StateError"
        assert "on rank 1" in message
        assert "same shape" in message
        assert case["data_unchanged"]


def test_a_rank_without_data_fails_every_rank(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    zero, one = (_case(result, "no_data") for result in ranks[1])
    assert zero["error"] is not None
    assert one["error"] is not None
    assert zero["error"][0] == one["error"][0] == "StateError"
    assert "on rank 1" in zero["error"][1]
    assert "no aggregated data" in zero["error"][1]
    assert "this rank (1)" in one["error"][1]
    assert zero["data_unchanged"]


def test_a_bad_process_group_is_refused(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    for result in ranks[1]:
        kind, message = _case(result, "bad_group")["error"]
        assert kind == "ConfigError"
        assert "process_group" in message
        assert _case(result, "bad_group")["data_unchanged"]


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
