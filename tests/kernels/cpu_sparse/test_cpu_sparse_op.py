"""The ``cpu_sparse`` kernel's own op, ``actsparse::sparse_linear``: what the contract suite
(tests/kernels/test_contract.py) does not cover.

Its two schedules, its thread chunks and blocking on shapes up to 300 wide,
the dtypes it hands to the dense path, the input-major layout, the measured
crossover and the C++ build with its fallbacks. Results are compared with
the bound of ``_kernel_cases``. The kernel is compiled once per test session
(the first test that needs it waits for the build; later sessions load it
from the cache). The fallback without a kernel runs in subprocesses, with the
build disabled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from _kernel_cases import (
    add_specials,
    assert_close_to_reference,
    dense_reference,
    error_bound,
    make_x,
    threshold_for,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import actsparse.kernels.cpu_sparse as cpu_sparse
from actsparse.core import ConfigError
from actsparse.kernels import (
    DISABLE_ENV_VAR,
    clear_crossover_cache,
    cpu_kernel_status,
    is_input_major,
    measure_crossover,
    sparse_linear,
    sparse_linear_reference,
    to_input_major,
    to_output_major,
)
from actsparse.kernels._common import build as _build
from actsparse.kernels._common.status import KernelStatus

DTYPES = (torch.float32, torch.bfloat16)
#: the compiled operator's schedules: 1 streams the weight rows, 2 uses register tiles
SCHEDULES = (1, 2)


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    """Every machine that runs these tests has g++: the compiled path must be there."""
    status = cpu_kernel_status()
    assert status.available, status.reason


def compiled(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    schedule: int,
) -> torch.Tensor:
    """The compiled operator under one schedule (the public op picks one by token count)."""
    y: torch.Tensor = torch.ops.actsparse_kernels.sparse_linear_cpu(
        x, weight_t, bias, threshold, schedule
    )
    return y


def assert_matches(
    y: torch.Tensor,
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
) -> None:
    ref = dense_reference(x, weight_t, bias, threshold)
    assert_close_to_reference(y, ref, error_bound(x, weight_t, bias, threshold))


# ------------------------------------------------------------------ cases


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    return {
        "lead": lead,
        "in_features": draw(st.integers(1, 300)),
        "out_features": draw(st.integers(1, 300)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "sparsity": draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        "bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "specials": draw(
            st.sampled_from(
                [(), (float("nan"),), (float("inf"), float("-inf")), (float("nan"), float("inf"))]
            )
        ),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = make_x(generator, case["lead"], case["in_features"], dtype, case["layout"])
    if case["layout"] != "contiguous" and x.shape[-1] > 1 and case["lead"][-1] > 1:
        assert not x.is_contiguous()
    threshold = threshold_for(x, case["sparsity"])
    add_specials(x, generator, case["specials"])
    weight_t = torch.randn(case["in_features"], case["out_features"], generator=generator)
    bias = torch.randn(case["out_features"], generator=generator) if case["bias"] else None
    return x, weight_t.to(dtype), None if bias is None else bias.to(dtype), threshold


# ------------------------------------------------------------------ the op against the reference


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
# a NaN in one row: torch's bfloat16 product writes NaN into another row too
@example(
    case={
        "lead": (2, 3, 3),
        "in_features": 33,
        "out_features": 33,
        "dtype": torch.bfloat16,
        "sparsity": 0.0,
        "bias": False,
        "layout": "contiguous",
        "specials": (float("nan"),),
        "seed": 0,
    }
)
def test_op_matches_the_dense_reference(case: dict[str, Any]) -> None:
    x, weight_t, bias, threshold = build(case)
    with torch.no_grad():
        assert_matches(sparse_linear(x, weight_t, bias, threshold), x, weight_t, bias, threshold)
        for schedule in SCHEDULES:
            y = compiled(x, weight_t, bias, threshold, schedule)
            assert_matches(y, x, weight_t, bias, threshold)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize(
    ("tokens", "in_features", "out_features"),
    [(9, 1100, 300), (3, 2100, 1000), (1, 700, 1300)],
)
def test_larger_layers_cross_slabs_blocks_and_thread_chunks(
    dtype: torch.dtype, schedule: int, tokens: int, in_features: int, out_features: int
) -> None:
    """Shapes past the kernel's slab (512 rows at fp32) and block sizes, on 1 and 2 threads."""
    generator = torch.Generator().manual_seed(tokens * in_features)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    weight_t = torch.randn(in_features, out_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    threshold = threshold_for(x, 0.5)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(compiled(x, weight_t, bias, threshold, schedule))
    finally:
        torch.set_num_threads(saved)
    assert_matches(results[0], x, weight_t, bias, threshold)
    # Each output column adds its terms in the same order whatever the chunking.
    assert torch.equal(results[0], results[1])


def test_the_kernel_runs_on_torchs_thread_count() -> None:
    width = torch.ops.actsparse_kernels.parallel_width
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert width() == threads
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_shapes_and_thresholds(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(3)
    weight_t = torch.randn(5, 7, generator=generator).to(dtype)
    bias = torch.randn(7, generator=generator).to(dtype)
    x = torch.randn(5, generator=generator).to(dtype)
    for threshold in (0.0, -1.0, float("inf"), float("nan"), 0.3):
        for b in (bias, None):
            assert_matches(sparse_linear(x, weight_t, b, threshold), x, weight_t, b, threshold)
    # no tokens, no input features, no outputs
    for shape_x, shape_w in (((0, 5), (5, 7)), ((2, 3, 0), (0, 7)), ((4, 5), (5, 0))):
        x = torch.randn(shape_x, generator=generator).to(dtype)
        w = torch.randn(shape_w, generator=generator).to(dtype)
        b = torch.randn(shape_w[1], generator=generator).to(dtype)
        assert_matches(sparse_linear(x, w, b, 0.1), x, w, b, 0.1)
    # every input zeroed: the bias alone
    x = torch.full((3, 5), 0.5, dtype=dtype)
    assert torch.equal(sparse_linear(x, weight_t, bias, 0.5), bias.expand(3, 7))
    # a non-contiguous weight_t is copied, not misread
    w_view = torch.randn(7, 5, generator=generator).to(dtype).T
    assert_matches(sparse_linear(x + 1, w_view, None, 0.2), x + 1, w_view, None, 0.2)


def test_threshold_rounds_to_the_input_dtype_as_hardshrink_does() -> None:
    # 1.00390625 = 1 + 2**-8 lies between two bfloat16 values; rounded to bfloat16
    # it is 1.0, so an input of exactly 1.0 is zeroed by hardshrink and by the op.
    x = torch.tensor([[1.0, 1.0078125, -1.0]], dtype=torch.bfloat16)
    weight_t = torch.ones(3, 2, dtype=torch.bfloat16)
    threshold = 1.00390625
    ref = sparse_linear_reference(x, weight_t, None, threshold)
    assert torch.equal(sparse_linear(x, weight_t, None, threshold), ref)
    assert ref.tolist() == [[1.0078125, 1.0078125]]


def test_other_dtypes_take_the_dense_path() -> None:
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.float64):
        x = torch.randn(2, 6, generator=generator).to(dtype)
        weight_t = torch.randn(6, 3, generator=generator).to(dtype)
        y = sparse_linear(x, weight_t, None, 0.4)
        assert torch.equal(y, sparse_linear_reference(x, weight_t, None, 0.4))


def test_mismatched_arguments_raise_config_errors() -> None:
    x = torch.randn(2, 6)
    weight_t = torch.randn(6, 3)
    with pytest.raises(ConfigError, match="features"):
        sparse_linear(x, weight_t.T.contiguous(), None, 0.1)
    with pytest.raises(ConfigError, match="bias"):
        sparse_linear(x, weight_t, torch.randn(6), 0.1)
    with pytest.raises(ConfigError, match="dtype"):
        sparse_linear(x, weight_t.double(), None, 0.1)
    with pytest.raises(ConfigError, match="2-D"):
        sparse_linear(x, weight_t[None], None, 0.1)


def test_gradients_match_the_reference() -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = [
        torch.randn(2, 3, 9, generator=generator),
        torch.randn(9, 4, generator=generator),
        torch.randn(4, generator=generator),
    ]
    grad = torch.randn(2, 3, 4, generator=generator)
    grads = []
    for fn in (sparse_linear, sparse_linear_reference):
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(leaves[0], leaves[1], leaves[2], 0.6).backward(grad)
        grads.append([leaf.grad for leaf in leaves])
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs)


# ------------------------------------------------------------------ input-major weights


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("requires_grad", [True, False])
def test_to_input_major_stores_the_weight_once_in_the_kernels_layout(
    dtype: torch.dtype, requires_grad: bool
) -> None:
    torch.manual_seed(13)
    linear = nn.Linear(12, 5).to(dtype)
    linear.weight.requires_grad_(requires_grad)
    param = linear.weight
    before = param.detach().clone()
    x = torch.randn(3, 12).to(dtype)
    dense_before = linear(x).detach()
    state_before = {k: v.clone() for k, v in linear.state_dict().items()}

    weight_t = to_input_major(linear)

    assert linear.weight is param  # optimizers and tied weights keep their reference
    assert isinstance(linear.weight, nn.Parameter)
    assert linear.weight.requires_grad is requires_grad
    assert linear.weight.shape == (5, 12)
    assert torch.equal(linear.weight, before)
    assert is_input_major(linear)
    assert weight_t.shape == (12, 5)
    assert weight_t.is_contiguous()
    assert weight_t.data_ptr() == linear.weight.data_ptr()
    # one storage, exactly the size of the weight: no second copy anywhere
    assert linear.weight.untyped_storage().nbytes() == 12 * 5 * before.element_size()
    torch.testing.assert_close(linear(x).detach(), dense_before)
    state = linear.state_dict()
    assert state.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state[key], value)
    with torch.no_grad():
        y = sparse_linear(x, weight_t, linear.bias, 0.3)
    assert_matches(y, x, weight_t, linear.bias.detach(), 0.3)
    # idempotent: no new storage
    assert to_input_major(linear).data_ptr() == weight_t.data_ptr()


def test_input_major_weights_train_load_and_convert_back() -> None:
    torch.manual_seed(17)
    linear = nn.Linear(6, 4)
    reference = nn.Linear(6, 4)
    reference.load_state_dict(linear.state_dict())
    to_input_major(linear)
    x = torch.randn(8, 6)
    for model in (linear, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).square().sum().backward()
        optimizer.step()
    torch.testing.assert_close(linear.weight, reference.weight)
    assert is_input_major(linear)
    # loading writes through the transposed view into the one storage
    fresh = nn.Linear(6, 4)
    linear.load_state_dict(fresh.state_dict())
    assert torch.equal(linear.weight, fresh.weight)
    assert is_input_major(linear)
    # gradients reach the parameter through the op too
    linear.zero_grad()
    sparse_linear(x, linear.weight.T, linear.bias, 0.2).sum().backward()
    assert linear.weight.grad is not None
    assert linear.weight.grad.shape == (4, 6)

    back = to_output_major(linear)
    assert back.is_contiguous()
    assert back.shape == (4, 6)
    assert linear.weight.is_contiguous()
    assert not is_input_major(linear)
    assert torch.equal(linear.weight, fresh.weight)
    assert linear.weight.untyped_storage().nbytes() == 4 * 6 * 4


# ------------------------------------------------------------------ crossover


@pytest.fixture
def fresh_crossovers() -> Iterator[None]:
    clear_crossover_cache()
    yield
    clear_crossover_cache()


def test_crossover_is_the_last_token_count_the_sparse_op_wins(
    fresh_crossovers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []

    def wins_up_to(limit: int) -> Callable[[torch.Tensor, list[torch.Tensor], float], bool]:
        def faster(x: torch.Tensor, weights: list[torch.Tensor], threshold: float) -> bool:
            seen.append((x.shape[0], torch.get_num_threads()))
            assert all(w.shape == (16, 8) for w in weights)
            assert threshold == 0.5
            return x.shape[0] <= limit

        return faster

    monkeypatch.setattr(cpu_sparse, "_wins", wins_up_to(4))
    saved = torch.get_num_threads()
    assert measure_crossover(16, 8, torch.float32, 0.5, threads=1) == 4
    assert seen == [(1, 1), (2, 1), (4, 1), (8, 1)]  # stops at the first loss
    assert torch.get_num_threads() == saved
    monkeypatch.setattr(cpu_sparse, "_wins", wins_up_to(0))
    assert measure_crossover(16, 8, torch.float32, 0.5, threads=2) == 0
    monkeypatch.setattr(cpu_sparse, "_wins", wins_up_to(1000))
    assert measure_crossover(16, 8, torch.bfloat16, 0.5, max_tokens=48) == 32


def test_crossovers_are_cached_per_configuration(
    fresh_crossovers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def faster(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> bool:
        calls.append(x.shape[0])
        return x.shape[0] <= 2

    monkeypatch.setattr(cpu_sparse, "_wins", faster)
    assert measure_crossover(16, 8, torch.float32, 0.5, threads=1) == 2
    measured = len(calls)
    # the same key: sparsity rounded to 0.01
    assert measure_crossover(16, 8, torch.float32, 0.501, threads=1) == 2
    assert len(calls) == measured
    # another dtype, sparsity or thread count is measured anew
    measure_crossover(16, 8, torch.bfloat16, 0.5, threads=1)
    measure_crossover(16, 8, torch.float32, 0.6, threads=1)
    measure_crossover(16, 8, torch.float32, 0.5, threads=2)
    assert len(calls) == 4 * measured


def test_no_kernel_or_another_dtype_never_crosses(
    fresh_crossovers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_called(x: torch.Tensor, weight_t: torch.Tensor, threshold: float) -> bool:
        raise AssertionError("measured")

    monkeypatch.setattr(cpu_sparse, "_wins", never_called)
    assert measure_crossover(16, 8, torch.float16, 0.5) == 0
    monkeypatch.setattr(cpu_sparse, "cpu_kernel_status", lambda: KernelStatus(False, "no compiler"))
    assert measure_crossover(16, 8, torch.float32, 0.5) == 0


def test_crossover_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        measure_crossover(16, 8, torch.float32, 1.5)
    with pytest.raises(ConfigError, match="features"):
        measure_crossover(0, 8, torch.float32, 0.5)
    with pytest.raises(ConfigError, match="max_tokens"):
        measure_crossover(16, 8, torch.float32, 0.5, max_tokens=0)
    with pytest.raises(ConfigError, match="threads"):
        measure_crossover(16, 8, torch.float32, 0.5, threads=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_real_measurement_is_a_power_of_two_and_cheap(
    fresh_crossovers: None, dtype: torch.dtype
) -> None:
    saved = torch.get_num_threads()
    start = time.perf_counter()
    tokens = measure_crossover(512, 512, dtype, 0.9, threads=1, max_tokens=16)
    assert time.perf_counter() - start < 5.0
    assert tokens in (0, 1, 2, 4, 8, 16)
    assert torch.get_num_threads() == saved


# ------------------------------------------------------------------ torch.compile


class ThresholdLinear(nn.Module):
    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = sparse_linear(torch.relu(x) - 0.1, self.weight_t, self.bias, self.threshold)
        return torch.tanh(h)


def test_compiles_in_one_graph_and_matches_eager() -> None:
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(11)
    model = ThresholdLinear(
        torch.randn(24, 16, generator=generator), torch.randn(16, generator=generator), 0.2
    )
    batches = [torch.randn(2, 5, 24, generator=generator), torch.randn(1, 24, generator=generator)]
    explanation = torch._dynamo.explain(model)(batches[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for x in batches:
            assert torch.equal(run(x), model(x))
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_calls_the_op_and_matches_eager() -> None:
    """The default backend; it generates its own code for relu and tanh, hence assert_close."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(12)
    model = ThresholdLinear(
        torch.randn(24, 16, generator=generator), torch.randn(16, generator=generator), 0.2
    )
    run = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for x in (torch.randn(2, 5, 24, generator=generator), torch.randn(3, 24)):
            torch.testing.assert_close(run(x), model(x))
    torch._dynamo.reset()


# ------------------------------------------------------------------ without a kernel


def run_python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
        timeout=300,
    )


def test_disabled_build_reports_why_and_the_op_raises_a_clear_error() -> None:
    done = run_python(
        """
        import torch
        from actsparse.core import ConfigError
        from actsparse.kernels import (
            KernelUnavailableError, cpu_kernel_status, sparse_linear, sparse_linear_reference,
        )
        status = cpu_kernel_status()
        assert status == (False, status.reason)
        assert "ACTSPARSE_DISABLE_KERNEL_BUILD" in status.reason
        x, w = torch.randn(2, 8), torch.randn(8, 4)
        for dtype in (torch.float32, torch.bfloat16):
            try:
                sparse_linear(x.to(dtype), w.to(dtype), None, 0.1)
            except KernelUnavailableError as error:
                assert isinstance(error, ConfigError) and isinstance(error, RuntimeError)
                assert status.reason in str(error) and "unavailable" in str(error), error
            else:
                raise SystemExit("the op ran without a kernel")
        half = sparse_linear(x.half(), w.half(), None, 0.1)
        assert torch.equal(half, sparse_linear_reference(x.half(), w.half(), None, 0.1))
        import actsparse.kernels.cpu_sparse._op as op
        assert cpu_kernel_status() is op.EXTENSION.status(build=False)  # attempted once
        print("fallback ok")
        """,
        **{DISABLE_ENV_VAR: "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout


def test_no_compiler_is_reported_without_building() -> None:
    done = run_python(
        """
        from actsparse.kernels import cpu_kernel_status
        print(cpu_kernel_status().reason)
        """,
        CXX="/nonexistent/c++",
    )
    assert done.returncode == 0, done.stderr
    assert "no C++ compiler found" in done.stdout
    assert "/nonexistent/c++" in done.stdout


def test_missing_ninja_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV_VAR, raising=False)
    monkeypatch.setattr(_build, "find_ninja", lambda: None)
    status = cpu_sparse.EXTENSION.attempt()  # the attempt itself, not the cached status
    assert status == (False, "ninja is missing (pip install ninja)")


def test_a_failed_build_quotes_the_compiler_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("int f( { return 0; }\n")
    done = run_python(
        f"""
        from pathlib import Path
        from actsparse.kernels import CppExtension
        status = CppExtension("broken", [Path({str(broken)!r})], ["nothing"]).status()
        assert not status.available
        print(status.reason)
        """,
        ACTSPARSE_KERNEL_CACHE=str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("the build failed: ")
    assert "error" in done.stdout


def test_concurrent_first_calls_build_once() -> None:
    done = run_python(
        """
        import threading
        from actsparse.kernels.cpu_sparse import EXTENSION, cpu_kernel_status
        calls = []
        attempt = EXTENSION.attempt
        def counted():
            calls.append(1)
            return attempt()
        EXTENSION.attempt = counted
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(cpu_kernel_status()))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1, calls
        assert len(results) == 4 and all(r is results[0] for r in results)
        assert results[0].available, results[0]
        print("once")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "once" in done.stdout


def test_status_without_build_does_not_attempt() -> None:
    done = run_python(
        """
        from actsparse.kernels import cpu_kernel_status
        status = cpu_kernel_status(build=False)
        assert status == (False, "not attempted yet in this process"), status
        assert cpu_kernel_status(build=False) == status
        print("untouched")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "untouched" in done.stdout


def test_the_cache_key_names_the_cpu_torch_and_source() -> None:
    name = cpu_sparse.EXTENSION.extension_name()
    assert name.startswith("actsparse_cpu_sparse_")
    assert name == cpu_sparse.EXTENSION.extension_name()
    cflags, _ = _build.compile_flags()
    assert "-O3" in cflags
    identity = _build.cpu_identity()
    if Path("/proc/cpuinfo").exists():
        assert "flags=" in identity or "Features=" in identity
