"""The kernel plugin kind: how squashed threshold-mode layers are computed.

A third party's kernel registered in-process (``actsparse_kernels``) goes
through the same choice as the built-ins: forced by name, or picked by
``"auto"`` from the crossover it measured; never saved in the state.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from _support import assert_unchanged, snapshot
from torch import nn
from torch.nn import functional as F

from actsparse.core import (
    ConfigError,
    KernelStrategy,
    Tolerance,
    UnknownStrategyError,
    get_registry,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier, KernelWarning

CALLS: list[int] = []


def _supports(module: Any) -> str | None:
    return None if isinstance(module, nn.Linear) else f"{type(module).__name__} is not a Linear"


def _apply(module: nn.Linear, threshold: float) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        CALLS.append(x.numel() // x.shape[-1])
        return F.linear(F.hardshrink(x, threshold), module.weight, module.bias)

    return run


def _plugin(**fields: Any) -> types.SimpleNamespace:
    @hookimpl
    def actsparse_kernels() -> list[KernelStrategy]:
        return [
            KernelStrategy(name="test_shrink_linear", supports=_supports, apply=_apply, **fields)
        ]

    return types.SimpleNamespace(actsparse_kernels=actsparse_kernels)


@pytest.fixture
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    fields = getattr(request, "param", {"crossover": lambda module, sparsity: 4})
    # the built-in cpu_sparse kernel measures its own crossover on these small layers,
    # and may win there: auto must weigh the test kernel alone
    try:
        import actsparse.kernels.cpu_sparse as cpu_sparse
    except ImportError:  # actsparse-kernels is not installed: nothing else competes
        pass
    else:
        monkeypatch.setattr(cpu_sparse, "measure_crossover", lambda *args, **kwargs: 0)
    name = register_plugin(_plugin(**fields), name="test-kernel")
    CALLS.clear()
    try:
        yield "test_shrink_linear"
    finally:
        unregister_plugin(name=name)


def _calibrated() -> tuple[nn.Sequential, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Identity())
    s = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    s.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 8))
    s.step()
    return model, s


def test_dense_is_a_registered_kernel_of_the_runtime() -> None:
    entry = next(e for e in get_registry().entries("kernel") if e.record.name == "dense")
    assert entry.record.apply is None


def test_a_forced_kernel_computes_every_call_with_the_dense_result(kernel: str) -> None:
    model, s = _calibrated()
    x = torch.randn(32, 8)
    s.squash_mask()
    with torch.no_grad():
        dense = model(x)
    s.set_kernel(kernel)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense)
    assert CALLS == [32, 32]  # both Linear layers, at 32 tokens: forced means always


def test_auto_uses_the_kernel_up_to_its_crossover(kernel: str) -> None:
    model, s = _calibrated()
    s.squash_mask(kernel="auto")
    with torch.no_grad():
        model(torch.randn(1, 8))
        model(torch.randn(4, 8))
        model(torch.randn(2, 3, 8))
        model(torch.randn(5, 8))  # above the crossover of 4 tokens: dense
    assert CALLS == [1, 1, 4, 4]


LOSSY = {"crossover": lambda m, s: 64, "tolerance": Tolerance(rtol=1e-2)}


@pytest.mark.parametrize("kernel", [LOSSY], indirect=True)
def test_auto_never_picks_a_lossy_kernel_but_a_named_one_runs(kernel: str) -> None:
    model, s = _calibrated()
    s.squash_mask(kernel="auto")
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert CALLS == []  # a lossy kernel wins at every count, and auto still keeps dense
    s.set_kernel(kernel)
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert CALLS == [1, 1]


@pytest.mark.parametrize("kernel", [LOSSY], indirect=True)
def test_the_list_of_known_kernels_marks_the_lossy_ones(kernel: str) -> None:
    _, s = _calibrated()
    with pytest.raises(UnknownStrategyError) as info:
        s.squash_mask(kernel="no_such_kernel")
    message = str(info.value)
    assert f"{kernel!r} (lossy)" in message
    assert "'dense'," in message or "'dense'." in message  # exact kernels carry no mark
    assert "'auto' picks the fastest exact kernel" in message


@pytest.mark.parametrize("kernel", [{"crossover": lambda m, s: 0}], indirect=True)
def test_auto_never_picks_a_kernel_that_never_wins(kernel: str) -> None:
    model, s = _calibrated()
    s.squash_mask(kernel="auto")
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert CALLS == []


def test_the_kernel_is_not_part_of_the_state(kernel: str) -> None:
    model, s = _calibrated()
    s.squash_mask(kernel=kernel)
    sd = s.state_dict()
    assert "kernel" not in repr({k: v for k, v in sd.items() if k != "state"})
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Identity())
    fresh.load_state_dict(model.state_dict())
    t = ActivationSparsifier(fresh)
    t.load_state_dict(sd)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert CALLS == [3, 3]  # the loaded copy runs dense; only the original used the kernel


def test_unsupported_layers_and_unknown_kernels_change_nothing(kernel: str) -> None:
    model, s = _calibrated()
    s.register_layer(model[3], mask_fn="target_threshold", sparsity_level=0.5)
    with torch.no_grad():
        model(torch.randn(4, 8))
    s.step()
    before = snapshot(model, s)
    with pytest.raises(ConfigError, match=r"layer '3': kernel 'test_shrink_linear' cannot compute"):
        s.squash_mask(kernel=kernel)
    with pytest.raises(UnknownStrategyError, match="test_shrink_linear"):
        s.squash_mask(kernel="no_such_kernel")
    with pytest.raises(ConfigError, match="kernel must be"):
        s.squash_mask(kernel=3)  # type: ignore[arg-type]
    assert_unchanged(before, snapshot(model, s))


@pytest.mark.parametrize(
    "kernel",
    [{"available": lambda: "no C++ compiler found", "crossover": lambda m, s: 8}],
    indirect=True,
)
def test_a_kernel_the_machine_cannot_run(kernel: str) -> None:
    model, s = _calibrated()
    before = snapshot(model, s)
    with pytest.raises(ConfigError, match="cannot run on this machine: no C\\+\\+ compiler found"):
        s.squash_mask(kernel=kernel)
    assert_unchanged(before, snapshot(model, s))
    with pytest.warns(KernelWarning, match="no C\\+\\+ compiler found") as caught:
        s.squash_mask(kernel="auto")
    assert len({str(w.message) for w in caught}) == 2  # one per layer it would have computed
    with torch.no_grad():
        model(torch.randn(1, 8))
    assert CALLS == []


def test_set_kernel_back_to_dense_and_retarget_keep_the_kernel_choice(kernel: str) -> None:
    model, s = _calibrated()
    s.squash_mask(kernel=kernel)
    s.retarget({"0": 0.3})
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert CALLS == [2, 2]
    s.set_kernel("dense")
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert CALLS == [2, 2]
    assert "forward" not in model[0].__dict__


def test_a_kernel_layer_compiles_without_graph_breaks(kernel: str) -> None:
    torch._dynamo.reset()
    model, s = _calibrated()
    s.squash_mask(kernel="auto")
    x = torch.randn(1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x))
        torch.testing.assert_close(run(torch.randn(6, 8)).shape, torch.Size([6, 4]))


def test_the_kernel_warning_is_one_of_actsparses_warnings() -> None:
    from actsparse.core import ActsparseWarning

    assert issubclass(KernelWarning, ActsparseWarning)
    assert issubclass(KernelWarning, UserWarning)
