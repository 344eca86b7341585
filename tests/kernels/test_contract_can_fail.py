"""The contract's checks reject kernels that break it (the suite can fail)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_cases import check_kernel
from torch import nn

from actsparse.core import KernelStrategy, Tolerance


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 6)


def _any(module: object) -> str | None:
    return None


def _rounding_apply(module: nn.Linear, threshold: float):  # type: ignore[no-untyped-def]
    """Rounds the weights to bfloat16's values, then computes the dense layer on them."""
    with torch.no_grad():
        module.weight.copy_(module.weight.to(torch.bfloat16).float())

    def run(x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.hardshrink(x, threshold), module.weight, module.bias)

    return run


def test_an_exact_kernel_that_changes_the_weights_fails() -> None:
    kernel = KernelStrategy(name="k", supports=_any, apply=_rounding_apply)
    with pytest.raises(AssertionError, match="exact kernel changed weight"):
        check_kernel(kernel, _linear(), torch.randn(3, 16), 0.2)


def test_a_lossy_kernel_is_held_to_the_dense_layer_on_its_new_weights() -> None:
    kernel = KernelStrategy(
        name="k", supports=_any, apply=_rounding_apply, tolerance=Tolerance(rtol=0.0)
    )
    check_kernel(kernel, _linear(), torch.randn(3, 16), 0.2)


def test_a_kernel_that_drops_the_bias_fails() -> None:
    def apply(module: nn.Linear, threshold: float):  # type: ignore[no-untyped-def]
        return lambda x: F.linear(F.hardshrink(x, threshold), module.weight)

    kernel = KernelStrategy(name="k", supports=_any, apply=apply)
    with pytest.raises(AssertionError, match="max excess"):
        check_kernel(kernel, _linear(), torch.randn(3, 16), 0.2)


def test_a_kernel_that_keeps_entries_it_should_zero_fails_beyond_its_tolerance() -> None:
    def apply(module: nn.Linear, threshold: float):  # type: ignore[no-untyped-def]
        return lambda x: F.linear(x, module.weight, module.bias)  # never zeroes

    kernel = KernelStrategy(
        name="k", supports=_any, apply=apply, tolerance=Tolerance(rtol=1e-3, atol=1e-3)
    )
    with pytest.raises(AssertionError, match="max excess"):
        check_kernel(kernel, _linear(), torch.randn(3, 16), 0.5)


def test_tolerances_are_checked_records() -> None:
    from actsparse.core import ConfigError

    with pytest.raises(ConfigError, match=r"Tolerance\.rtol"):
        Tolerance(rtol=-1.0)
    with pytest.raises(ConfigError, match=r"Tolerance\.atol"):
        Tolerance(rtol=0.1, atol=float("nan"))
    with pytest.raises(ConfigError, match=r"KernelStrategy\.tolerance"):
        KernelStrategy(name="k", supports=_any, tolerance=0.1)  # type: ignore[arg-type]
    assert KernelStrategy(name="k", supports=_any).exact
    assert not KernelStrategy(name="k", supports=_any, tolerance=Tolerance(0.1)).exact
