"""The parts every kernel shares: the crossover search, its cache, and the op declaration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from actsparse.core import ConfigError
from actsparse.kernels._common.crossover import (
    CrossoverCache,
    check_crossover_arguments,
    last_winning_count,
    num_threads,
    sparse_faster,
)
from actsparse.kernels._common.reference import check_arguments, define_op


def test_the_search_stops_at_the_first_loss() -> None:
    seen: list[int] = []

    def wins_up_to(limit: int) -> Callable[[int], bool]:
        def wins(tokens: int) -> bool:
            seen.append(tokens)
            return tokens <= limit

        return wins

    assert last_winning_count(wins_up_to(4), 64) == 4
    assert seen == [1, 2, 4, 8]
    assert last_winning_count(wins_up_to(0), 64) == 0
    assert last_winning_count(wins_up_to(1000), 48) == 32


def _timer(costs: dict[Any, list[float]]) -> Callable[[Callable[[], object], int], float]:
    """A timer that reports the next scripted cost of each callable."""

    def timer(fn: Callable[[], object], inner: int) -> float:
        for _ in range(inner):
            fn()
        return costs[fn].pop(0)

    return timer


def test_the_median_of_interleaved_pairs_decides() -> None:
    calls: list[str] = []

    def sparse() -> None:
        calls.append("sparse")

    def dense() -> None:
        calls.append("dense")

    # sizing samples, then three pairs: one pair slowed by a neighbour does not decide
    costs: dict[Any, list[float]] = {sparse: [1.0, 1.0, 9.0, 1.0], dense: [2.0, 2.0, 2.0, 2.0]}
    assert sparse_faster(sparse, dense, _timer(costs), min_sample_seconds=1.0)
    assert calls[:2] == ["sparse", "dense"]  # one warm-up call of each first
    costs = {sparse: [2.0, 2.0, 1.0, 2.5], dense: [2.0, 2.0, 2.0, 2.0]}
    assert not sparse_faster(sparse, dense, _timer(costs), min_sample_seconds=1.0)


def test_the_cache_measures_once_per_key() -> None:
    cache = CrossoverCache()
    calls: list[int] = []

    def measure() -> int:
        calls.append(1)
        return 8

    assert cache.get(("a", 1), measure) == 8
    assert cache.get(("a", 1), measure) == 8
    assert len(calls) == 1
    cache.get(("a", 2), measure)
    assert len(calls) == 2
    cache.clear()
    cache.get(("a", 1), measure)
    assert len(calls) == 3


def test_arguments_and_threads() -> None:
    for args, word in (((0, 8, 0.5, 4), "features"), ((8, 8, 1.5, 4), "sparsity")):
        with pytest.raises(ConfigError, match=word):
            check_crossover_arguments("m", *args)
    with pytest.raises(ConfigError, match="max_tokens"):
        check_crossover_arguments("m", 8, 8, 0.5, 0)
    saved = torch.get_num_threads()
    with num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == saved


def test_a_declared_op_checks_traces_and_differentiates() -> None:
    seen: list[str] = []

    def impl(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, t: float) -> torch.Tensor:
        seen.append("impl")
        return torch.nn.functional.linear(torch.nn.functional.hardshrink(x, t), w.T, b)

    op = define_op("common_test_linear", {"CompositeExplicitAutograd": impl})
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5, 2, requires_grad=True)
    y = op(x, w, None, 0.3)
    y.sum().backward()
    assert seen == ["impl"]
    assert x.grad is not None
    assert w.grad is not None
    with pytest.raises(ConfigError, match="common_test_linear: x has 4 features"):
        op(torch.randn(3, 4), w.detach(), None, 0.3)
    with pytest.raises(ConfigError, match="dtype"):
        check_arguments(torch.randn(2, 5), torch.randn(5, 2).double(), None)
    compiled = torch.compile(
        lambda a: op(a, w.detach(), None, 0.3), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(compiled(x.detach()), op(x.detach(), w.detach(), None, 0.3))
