"""Inputs and the error bound that every zero-skipping kernel is checked against.

A kernel computes ``F.linear(F.hardshrink(x, t), W, b)`` and adds the same
products in another order, so results are compared within a bound on the
rounding of both. For output j let ``S_j = |b_j| + sum_i |xs_i * w_ij|``
(float64, over finite terms; ``xs`` the input after hardshrink), ``n =
in_features`` and ``u`` the unit roundoff of the dtype. Products are summed
in float32 (or better); any order of that sum lies within ``(n + 2) * 2**-24
* S_j`` of the exact value, each side rounds to the dtype once and the
reference may round once more before adding the bias:

    |y - ref| <= (4 * u + 2 * (n + 2) * 2**-24) * S_j + tiny

(``tiny`` covers float16's subnormal spacing). A lossy kernel adds its
declared ``rtol * S_j + atol`` (:class:`actsparse.core.Tolerance`). NaN and
infinite outputs must match exactly: same positions, same signs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.core import KernelStrategy, Tolerance

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def error_bound(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    tolerance: Tolerance | None = None,
) -> torch.Tensor:
    """The bound of the module docstring, per output (on the CPU, float64)."""
    shrunk = F.hardshrink(x.cpu(), threshold).double()
    shrunk = torch.where(shrunk.isfinite(), shrunk, 0.0)
    scale = shrunk.abs() @ weight_t.cpu().double().abs()
    if bias is not None:
        scale = scale + bias.cpu().double().abs()
    u = UNIT_ROUNDOFF[x.dtype]
    tiny = 2.0**-23 if x.dtype in (torch.float16, torch.bfloat16) else 1e-30
    bound = (4 * u + 2 * (weight_t.shape[0] + 2) * 2.0**-24) * scale + tiny
    if tolerance is not None:
        bound = bound + tolerance.rtol * scale + tolerance.atol
    return bound


def dense_reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)`` on the CPU, in x's dtype:
    what a kernel's output is checked against.

    The zeros are made in x's dtype (hardshrink rounds the threshold to it). A
    bfloat16 or float16 product is then taken in float32 and rounded once, within
    the bound above: torch's bfloat16 GEMM on the CPU can write NaN into a row whose
    inputs are all finite when another row of the same call holds a NaN (seen with
    a (18, 33) @ (33, 33) product), and a kernel that skips rows must not copy that.
    """
    shrunk = F.hardshrink(x.detach().cpu(), threshold)
    w = weight_t.detach().cpu()
    b = None if bias is None else bias.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
        out = F.linear(shrunk.float(), w.float().T, None if b is None else b.float())
        return out.to(x.dtype)
    return F.linear(shrunk, w.T, b)


def assert_close_to_reference(
    y: torch.Tensor,
    ref: torch.Tensor,
    bound: torch.Tensor,
) -> None:
    """``y`` within ``bound`` of ``ref``, with NaN and inf in the same places."""
    y, ref = y.detach().cpu(), ref.detach().cpu()
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert y.dtype == ref.dtype, (y.dtype, ref.dtype)
    assert torch.equal(y.isnan(), ref.isnan()), "NaN positions differ"
    assert torch.equal(y.isinf(), ref.isinf()), "inf positions differ"
    assert torch.equal(y[y.isinf()], ref[ref.isinf()]), "inf signs differ"
    finite = ref.isfinite()
    error = (y.double() - ref.double()).abs()[finite]
    limit = bound.expand_as(ref)[finite]
    assert bool((error <= limit).all()), f"max excess {float((error - limit).max())}"


def make_x(
    generator: torch.Generator,
    lead: tuple[int, ...],
    features: int,
    dtype: torch.dtype,
    layout: str,
) -> torch.Tensor:
    """An input of shape (*lead, features): contiguous, a transposed view or a strided slice."""
    if layout == "transposed" and lead:
        base = torch.randn(*lead[:-1], features, lead[-1], generator=generator).to(dtype)
        return base.transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(*lead, 2 * features, generator=generator).to(dtype)[..., ::2]
    return torch.randn(*lead, features, generator=generator).to(dtype)


def threshold_for(x: torch.Tensor, sparsity: float) -> float:
    """A threshold that zeroes about ``sparsity`` of x's entries (0 keeps every entry)."""
    if sparsity == 0.0 or x.numel() == 0:
        return 0.0
    magnitudes = x.detach().abs().double().flatten()
    return float(torch.quantile(magnitudes, sparsity))


def add_specials(x: torch.Tensor, generator: torch.Generator, values: tuple[float, ...]) -> None:
    """Set two entries of x (in place, keeping its strides) to each of ``values``."""
    if x.numel() == 0:
        return
    for value in values:
        for _ in range(2):
            index = tuple(int(torch.randint(size, (1,), generator=generator)) for size in x.shape)
            x[index] = value


def reference(module: nn.Module, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The dense layer on the weights as they are now, computed on the CPU."""
    assert isinstance(module, nn.Linear)
    return dense_reference(x, module.weight.T, module.bias, threshold)


def give_back(kernel: KernelStrategy, module: nn.Module) -> None:
    """Detach ``kernel`` from ``module`` as the runtime does: its ``release``, if any, writes
    the weights it computed with back into the module (the reference weights)."""
    if kernel.release is not None:
        kernel.release(module)


def check_kernel(
    kernel: KernelStrategy, module: nn.Module, x: torch.Tensor, threshold: float
) -> None:
    """``kernel`` applied to ``module`` gives the dense outputs within its bound, on the
    weights as the kernel leaves them (after its ``release``)."""
    assert isinstance(module, nn.Linear)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    fn = kernel.apply(module, threshold)  # type: ignore[misc]
    if kernel.exact:
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), f"exact kernel changed {key}"
    with torch.no_grad():
        y = fn(x)
    give_back(kernel, module)
    weight_t = module.weight.detach().T
    bias = None if module.bias is None else module.bias.detach()
    bound = error_bound(x, weight_t, bias, threshold, kernel.tolerance)
    assert_close_to_reference(y, reference(module, x, threshold), bound)
