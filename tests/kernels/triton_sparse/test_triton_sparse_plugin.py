"""The ``triton_sparse`` kernel plugin where it cannot run: no triton, or no GPU.

These tests need neither triton nor a GPU: the default ``tests`` session
runs them without triton installed, ``nox -s triton`` with triton and no GPU.
Both cases are also simulated (triton hidden from imports; a stand-in triton
module), so each session checks both messages. ``auto`` never picks the
kernel then, and forcing it is a ``ConfigError`` that says what is missing.
"""

from __future__ import annotations

import re
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.core import (
    ConfigError,
    KernelStrategy,
    get_registry,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier, KernelWarning
from actsparse.kernels import KernelStatus, KernelUnavailableError, sparse_linear_reference
from actsparse.kernels.triton_sparse import (
    KERNEL_NAME,
    OP_NAME,
    _crossover,
    _op,
    _status,
    clear_cuda_crossover_cache,
    interpreted_kernels,
    measure_cuda_crossover,
    triton_kernel_status,
    triton_sparse_linear,
)

NOT_INSTALLED = "triton is not installed (pip install 'actsparse-kernels[triton]')"
NO_CUDA = "no CUDA device"


@pytest.fixture
def no_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """triton cannot be imported, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "actsparse.kernels.triton_sparse._kernel", raising=False)


@pytest.fixture
def not_interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter is off, as in a user's process (``nox -s triton`` turns it on)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def triton_without_gpu(monkeypatch: pytest.MonkeyPatch, not_interpreted: None) -> None:
    """triton imports (a stand-in where it is not installed) and torch sees no GPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("triton")
        monkeypatch.setattr(_status, "_import_triton", lambda: stand_in)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _calibrated(dtype: torch.dtype = torch.float16) -> tuple[nn.Sequential, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    s = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    s.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 8, dtype=dtype))
    s.step()
    return model, s


def _record() -> KernelStrategy:
    record: KernelStrategy = get_registry().get("kernel", KERNEL_NAME)
    return record


def test_the_kernel_is_registered_by_actsparse_kernels() -> None:
    entry = next(e for e in get_registry().entries("kernel") if e.record.name == KERNEL_NAME)
    assert entry.plugin == "actsparse.kernels"
    record = entry.record
    assert record.apply is not None
    assert record.available is not None
    assert record.crossover is not None
    assert "CUDA" in record.description
    assert "actsparse-kernels[triton]" in record.description


def test_supports_only_half_precision_cuda_linears(not_interpreted: None) -> None:
    supports = _record().supports
    assert "nn.Linear" in str(supports(nn.Conv1d(2, 2, 1)))
    assert "on cpu, and the kernel runs on CUDA" in str(supports(nn.Linear(4, 4).half()))
    assert supports(nn.Linear(4, 4).to(device="meta", dtype=torch.float16)) is not None
    if torch.cuda.is_available():
        assert supports(nn.Linear(4, 4, device="cuda", dtype=torch.float16)) is None
        assert supports(nn.Linear(4, 4, device="cuda", dtype=torch.bfloat16)) is None
        reason = supports(nn.Linear(4, 4, device="cuda"))
        assert reason == "its weight is float32, not one of float16, bfloat16"


def test_without_triton_the_kernel_says_so(no_triton: None) -> None:
    status = triton_kernel_status()
    assert status == (False, NOT_INSTALLED)
    assert _record().unavailable() == NOT_INSTALLED


def test_without_a_gpu_the_kernel_says_so(triton_without_gpu: None) -> None:
    status = triton_kernel_status()
    assert not status.available
    assert status.reason.startswith(NO_CUDA), status.reason
    assert _record().unavailable() == status.reason


def test_a_broken_triton_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_import() -> Any:
        raise RuntimeError("libcuda.so cannot be loaded")

    monkeypatch.setattr(_status, "_import_triton", failing_import)
    status = triton_kernel_status()
    assert status == (False, "triton failed to import: RuntimeError: libcuda.so cannot be loaded")


@pytest.mark.parametrize(
    ("situation", "message"), [("no_triton", NOT_INSTALLED), ("triton_without_gpu", NO_CUDA)]
)
def test_forcing_the_kernel_names_what_is_missing_and_changes_nothing(
    situation: str, message: str, request: pytest.FixtureRequest
) -> None:
    model, s = _calibrated()
    request.getfixturevalue(situation)
    before = snapshot(model, s)
    pattern = f"kernel '{KERNEL_NAME}' cannot run on this machine: {message}"
    with pytest.raises(ConfigError, match=re.escape(pattern)):
        s.squash_mask(kernel=KERNEL_NAME)
    assert_unchanged(before, snapshot(model, s))
    s.squash_mask()
    with pytest.raises(ConfigError, match="cannot run on this machine"):
        s.set_kernel(KERNEL_NAME)
    assert "forward" not in model[0].__dict__


@pytest.mark.parametrize("situation", ["no_triton", "triton_without_gpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_never_picks_it_and_stays_quiet_about_cpu_layers(
    situation: str, dtype: torch.dtype, request: pytest.FixtureRequest
) -> None:
    model, s = _calibrated(dtype)
    request.getfixturevalue(situation)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.squash_mask(kernel="auto")
    assert not [w for w in caught if KERNEL_NAME in str(w.message)]
    x = torch.randn(1, 8, dtype=dtype)
    with torch.no_grad():
        y = model(x)
    s.set_kernel("dense")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)


def _as_if_on_a_gpu() -> types.SimpleNamespace:
    """The kernel's own availability and apply, for layers of any device."""
    record = _record()

    @hookimpl
    def actsparse_kernels() -> list[KernelStrategy]:
        return [
            KernelStrategy(
                name="test_triton_anywhere",
                supports=lambda module: None,
                apply=record.apply,
                available=record.available,
                crossover=lambda module, sparsity: 64,
            )
        ]

    return types.SimpleNamespace(actsparse_kernels=actsparse_kernels)


@pytest.fixture
def anywhere() -> Iterator[str]:
    name = register_plugin(_as_if_on_a_gpu(), name="test-triton-anywhere")
    try:
        yield "test_triton_anywhere"
    finally:
        unregister_plugin(name=name)


@pytest.mark.parametrize(
    ("situation", "message"), [("no_triton", NOT_INSTALLED), ("triton_without_gpu", NO_CUDA)]
)
def test_a_layer_the_kernel_would_compute_runs_dense_with_a_warning(
    situation: str, message: str, anywhere: str, request: pytest.FixtureRequest
) -> None:
    """As a CUDA layer would on a machine that lacks triton: auto warns, runs dense."""
    model, s = _calibrated()
    request.getfixturevalue(situation)
    with pytest.warns(KernelWarning, match=re.escape(message)):
        s.squash_mask(kernel="auto")
    assert "forward" not in model[0].__dict__
    assert "forward" not in model[2].__dict__


# ------------------------------------------------------------------ the op without the kernel


def test_under_the_interpreter_it_computes_cpu_layers_and_never_wins_auto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton", reason="triton is not installed (the triton extra)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    record = _record()
    if interpreted_kernels() is None:
        pytest.skip("Triton's interpreter was not on when its kernel module was first imported")
    assert record.supports(nn.Linear(4, 4).half()) is None
    assert record.supports(nn.Linear(4, 4)) is not None  # float32: not a dtype it computes
    assert record.unavailable() is None
    assert record.crossover is not None
    assert record.crossover(nn.Linear(4, 4).half(), 0.5) == 0


def test_the_op_on_cpu_is_the_dense_reference_unless_interpreted() -> None:
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(2, 3, 6, generator=generator).to(dtype)
        weight_t = torch.randn(6, 5, generator=generator).to(dtype)
        bias = torch.randn(5, generator=generator).to(dtype)
        y = triton_sparse_linear(x, weight_t, bias, 0.4)
        ref = sparse_linear_reference(x, weight_t, bias, 0.4)
        if dtype in (torch.float16, torch.bfloat16) and interpreted_kernels() is not None:
            torch.testing.assert_close(y, ref, atol=5e-2, rtol=5e-2)  # the interpreted kernel
        else:
            assert torch.equal(y, ref), dtype


def test_the_op_without_triton_raises_the_missing_kernel_error(no_triton: None) -> None:
    with pytest.raises(KernelUnavailableError, match=re.escape(NOT_INSTALLED)) as caught:
        _op._kernels()
    assert isinstance(caught.value, ConfigError)


def test_mismatched_arguments_raise_config_errors() -> None:
    x = torch.randn(2, 6)
    weight_t = torch.randn(6, 3)
    with pytest.raises(ConfigError, match="triton_sparse_linear: x has 6 features"):
        triton_sparse_linear(x, weight_t.T.contiguous(), None, 0.1)
    with pytest.raises(ConfigError, match="bias"):
        triton_sparse_linear(x, weight_t, torch.randn(6), 0.1)
    with pytest.raises(ConfigError, match="dtype"):
        triton_sparse_linear(x, weight_t.double(), None, 0.1)
    with pytest.raises(ConfigError, match="2-D"):
        triton_sparse_linear(x, weight_t[None], None, 0.1)
    with pytest.raises(ConfigError, match="feature dimension"):
        triton_sparse_linear(torch.tensor(1.0), weight_t, None, 0.1)


def test_the_op_traces_as_one_node() -> None:
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(2)
    weight_t = torch.randn(12, 5, generator=generator)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(triton_sparse_linear(torch.relu(x) - 0.1, weight_t, None, 0.2))

    x = torch.randn(3, 12, generator=generator)
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    graph = explanation.graphs[0]
    assert OP_NAME.replace("::", ".") in str(graph.code)
    run = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(run(x), f(x))
    torch._dynamo.reset()


# ------------------------------------------------------------------ crossover without a GPU


def test_crossover_is_zero_where_the_kernel_cannot_run(triton_without_gpu: None) -> None:
    assert measure_cuda_crossover(64, 32, torch.float16, 0.5) == 0
    assert _record().crossover is not None


def test_crossovers_are_cached_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def measure(*args: Any) -> int:
        calls.append(args)
        return 8

    monkeypatch.setattr(_crossover, "status", lambda: KernelStatus(True, "ok"))
    monkeypatch.setattr(_crossover, "_measure", measure)
    clear_cuda_crossover_cache()
    try:
        assert measure_cuda_crossover(64, 32, torch.float16, 0.5, device="cuda:0") == 8
        assert measure_cuda_crossover(64, 32, torch.float16, 0.501, device="cuda:0") == 8
        assert len(calls) == 1
        measure_cuda_crossover(64, 32, torch.bfloat16, 0.5, device="cuda:0")
        measure_cuda_crossover(64, 32, torch.float16, 0.5, device="cuda:1")
        assert len(calls) == 3
        assert calls[0] == (64, 32, torch.float16, 0.5, 64, 0)
        assert measure_cuda_crossover(64, 32, torch.float32, 0.5, device="cuda:0") == 0
        with pytest.raises(ConfigError, match="CUDA device"):
            measure_cuda_crossover(64, 32, torch.float16, 0.5, device="cpu")
    finally:
        clear_cuda_crossover_cache()


def test_crossover_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        measure_cuda_crossover(16, 8, torch.float16, 1.5)
    with pytest.raises(ConfigError, match="features"):
        measure_cuda_crossover(0, 8, torch.float16, 0.5)
    with pytest.raises(ConfigError, match="max_tokens"):
        measure_cuda_crossover(16, 8, torch.float16, 0.5, max_tokens=0)
