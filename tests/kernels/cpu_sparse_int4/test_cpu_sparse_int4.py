"""The ``cpu_sparse_int4`` kernel: what the contract suite (tests/kernels/test_contract.py)
does not cover.

The compiled operator's four paths (picked, vector, scalar, dequantize-then-matmul)
against ``F.linear`` on the dequantized weight, with hypothesis over shapes
(whole and partial groups of 32 outputs), weight scales, sparsities from 0 to
100%, NaN and inf; the quantization error
against the float weight; the layer through the sparsifier (state dicts,
``dense`` afterwards, ``auto`` never picking it, ``sparsify``); the memory of
a Llama-7B-shaped layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _quantized_cases import (
    check_auto_never_picks,
    check_lifecycle,
    check_nan_refused,
    check_op_case,
    check_sparsify,
    check_threads_split_the_columns,
    llama_layer_bytes,
    op_cases,
)
from hypothesis import HealthCheck, given, settings

import actsparse.kernels.cpu_sparse_int4 as int4
from actsparse.kernels._common.quantized import QuantizedWeights

pytestmark = pytest.mark.skipif(
    not int4.int4_kernel_status().available, reason="the C++ kernel could not be built here"
)


def compiled(
    x: torch.Tensor, weights: QuantizedWeights, bias: torch.Tensor | None, t: float, path: int
) -> torch.Tensor:
    y: torch.Tensor = torch.ops.actsparse_kernels.int4_linear_cpu(
        x, weights.qweight, weights.scales, weights.zeros, bias, t, weights.out_features, path
    )
    return y


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=op_cases())
def test_every_path_matches_the_dense_layer_on_the_dequantized_weight(
    case: dict[str, Any],
) -> None:
    check_op_case(int4.FORMAT, int4.KERNEL, compiled, case)


def test_two_threads_split_the_columns() -> None:
    check_threads_split_the_columns(int4.FORMAT, int4.KERNEL, compiled)


def test_the_status_names_the_vector_path() -> None:
    reason = int4.int4_kernel_status().reason
    assert any(f"({isa} path)" in reason for isa in ("avx512", "avx2", "scalar")), reason


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (64, 64), (33, 5), (96, 3)])
def test_the_quantization_error_is_within_a_step_of_each_group(
    shape: tuple[int, int],
) -> None:
    torch.manual_seed(1)
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[1])[None, :]
    weights = int4.quantize(weight)
    out_pad = -(-shape[0] // 32) * 32
    assert weights.qweight.dtype == torch.uint8
    assert tuple(weights.qweight.shape) == (shape[1], out_pad // 2)
    assert tuple(weights.scales.shape) == (shape[1], out_pad // 32)
    assert int(weights.zeros.max()) <= 15  # type: ignore[union-attr]
    # groups of 32 outputs inside each input row: the range of a group over 12 steps
    # (the coarsest step tried) bounds the error, with the scale's bfloat16 rounding
    padded = torch.nn.functional.pad(weight.T, (0, out_pad - shape[0])).reshape(
        shape[1], out_pad // 32, 32
    )
    spread = padded.amax(-1).clamp(min=0) - padded.amin(-1).clamp(max=0)
    step = torch.repeat_interleave(spread / 12, 32, dim=1)[:, : shape[0]].T
    error = (int4.dequantize(weights) - weight).abs()
    assert bool((error <= step * 0.55 + 1e-30).all())
    # quantizing the dequantized weight gives the same values back
    dequantized = int4.dequantize(weights)
    assert torch.equal(int4.dequantize(int4.quantize(dequantized)), dequantized)


def test_the_error_on_gaussian_weights_is_a_few_percent() -> None:
    torch.manual_seed(2)
    weight = torch.randn(256, 512) * 0.02
    weights = int4.quantize(weight)
    relative = float((int4.dequantize(weights) - weight).norm() / weight.norm())
    assert relative < 0.085, relative


def test_a_zero_group_and_a_zero_width_layer_quantize() -> None:
    weight = torch.randn(64, 9)
    weight[32:] = 0.0
    weights = int4.quantize(weight)
    assert torch.equal(int4.dequantize(weights)[32:], torch.zeros(32, 9))
    empty = int4.quantize(torch.empty(4, 0))
    assert tuple(int4.dequantize(empty).shape) == (4, 0)


def test_a_layer_through_the_sparsifier() -> None:
    check_lifecycle(int4.FORMAT, int4.KERNEL_NAME)


def test_auto_never_picks_it_and_naming_it_does() -> None:
    check_auto_never_picks(int4.KERNEL_NAME)


def test_sparsify_takes_it_by_name() -> None:
    check_sparsify(int4.KERNEL_NAME)


def test_weights_with_nan_are_refused_before_anything_changes() -> None:
    check_nan_refused(int4.KERNEL_NAME)


def test_a_llama_7b_shaped_layer_takes_at_most_0_6_bytes_per_weight() -> None:
    per_weight, left = llama_layer_bytes(int4.KERNEL_NAME)
    assert per_weight <= 0.6, per_weight
    assert left == 4  # no float copy beside the quantized weights
