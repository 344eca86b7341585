"""The ``cpu_sparse_int8`` kernel: what the contract suite (tests/kernels/test_contract.py)
does not cover.

The compiled operator's four paths (picked, vector, scalar, dequantize-then-matmul)
against ``F.linear`` on the dequantized weight, with hypothesis over shapes,
weight scales, sparsities from 0 to 100%, NaN and inf; the quantization error
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

import actsparse.kernels.cpu_sparse_int8 as int8
from actsparse.kernels._common.quantized import QuantizedWeights

pytestmark = pytest.mark.skipif(
    not int8.int8_kernel_status().available, reason="the C++ kernel could not be built here"
)


def compiled(
    x: torch.Tensor, weights: QuantizedWeights, bias: torch.Tensor | None, t: float, path: int
) -> torch.Tensor:
    y: torch.Tensor = torch.ops.actsparse_kernels.int8_linear_cpu(
        x, weights.qweight, weights.scales, bias, t, path
    )
    return y


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=op_cases())
def test_every_path_matches_the_dense_layer_on_the_dequantized_weight(
    case: dict[str, Any],
) -> None:
    check_op_case(int8.FORMAT, int8.KERNEL, compiled, case)


def test_two_threads_split_the_columns() -> None:
    check_threads_split_the_columns(int8.FORMAT, int8.KERNEL, compiled)


def test_the_status_names_the_vector_path() -> None:
    reason = int8.int8_kernel_status().reason
    assert any(f"({isa} path)" in reason for isa in ("avx512", "avx2", "scalar")), reason


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (64, 64)])
def test_the_quantization_error_is_half_a_step_per_output_channel(
    shape: tuple[int, int],
) -> None:
    torch.manual_seed(1)
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]
    weights = int8.quantize(weight)
    assert weights.qweight.dtype == torch.int8
    assert weights.qweight.shape == shape[::-1]
    step = weight.abs().amax(dim=1) / 127
    error = (int8.dequantize(weights) - weight).abs()
    # half a step, and the 2**-16 by which the scale was rounded (for idempotence)
    assert bool((error <= step[:, None] * (0.5 + 2**-8)).all())
    relative = float((int8.dequantize(weights) - weight).norm() / weight.norm())
    assert relative < 0.01
    # quantizing the dequantized weight gives the same quantized weight back
    again = int8.quantize(int8.dequantize(weights))
    assert torch.equal(again.qweight, weights.qweight)
    assert torch.equal(again.scales, weights.scales)


def test_a_zero_channel_and_a_zero_width_layer_quantize() -> None:
    weight = torch.randn(5, 9)
    weight[2] = 0.0
    weights = int8.quantize(weight)
    assert float(weights.scales[2]) == 0.0
    assert torch.equal(int8.dequantize(weights)[2], torch.zeros(9))
    empty = int8.quantize(torch.empty(4, 0))
    assert tuple(int8.dequantize(empty).shape) == (4, 0)


def test_a_layer_through_the_sparsifier() -> None:
    check_lifecycle(int8.FORMAT, int8.KERNEL_NAME)


def test_auto_never_picks_it_and_naming_it_does() -> None:
    check_auto_never_picks(int8.KERNEL_NAME)


def test_sparsify_takes_it_by_name() -> None:
    check_sparsify(int8.KERNEL_NAME)


def test_weights_with_nan_are_refused_before_anything_changes() -> None:
    check_nan_refused(int8.KERNEL_NAME)


def test_a_llama_7b_shaped_layer_takes_at_most_1_1_bytes_per_weight() -> None:
    per_weight, left = llama_layer_bytes(int8.KERNEL_NAME)
    assert per_weight <= 1.1, per_weight
    assert left == 4  # no float copy beside the quantized weights
