# Triton kernels take untyped parameters (Triton reads the annotations itself).
# mypy: disable-error-code="untyped-decorator,no-untyped-def"
"""The Triton kernels: a split-K matrix-vector product over the kept inputs.

Imported only when the kernel runs: it imports triton. For every token (row
of ``x``) the product ``y = hardshrink(x, t) @ weight_t + bias`` needs only
the rows of the input-major weight ``weight_t`` (``(in_features,
out_features)``, each input's weights contiguous) whose input is kept, ``not
|x| <= t``. The work is cut into programs, one per

* token (grid axis 0, the fastest: the tokens that read one weight tile run
  side by side and share it in the cache),
* block of ``BLOCK_N`` outputs (axis 1), and
* slice of the inputs (axis 2, the split of "split-K"): at one token a layer
  has too few output blocks to occupy the GPU, so the inputs are cut into
  ``splits`` slices whose partial sums are added afterwards.

A program walks its slice ``BLOCK_K`` inputs at a time: it loads those
inputs, keeps ``not |x| <= t`` (NaN is kept, as hardshrink keeps it), and
loads the ``BLOCK_K x BLOCK_N`` weight tile with the rows of dropped inputs
masked off, so their memory is never read. Products are summed in float32
in a ``BLOCK_K x BLOCK_N`` register tile, reduced once at the end.

With one slice the program adds the bias and writes the output in x's dtype.
With several, each writes its float32 partial sums to a ``(splits, tokens,
out_features)`` buffer and a second kernel adds them up in slice order (the
result does not depend on scheduling: no atomics), adds the bias and writes
the output. Rounding to bfloat16 is done with integer operations, to nearest
even, so that Triton's interpreter (which truncates) and the GPU round alike.

The block sizes and the number of programs aimed at are first guesses, not
tuned on a GPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton  # type: ignore[import-not-found,unused-ignore]
import triton.language as tl  # type: ignore[import-not-found,unused-ignore]
from torch import Tensor

from actsparse.kernels.triton_sparse._status import round_threshold

__all__ = ["INTERPRETED", "Plan", "plan", "run"]

#: the most outputs and inputs a program handles per step
MAX_BLOCK_N = 128
MAX_BLOCK_K = 64
#: programs aimed at per streaming multiprocessor when the inputs are split
PROGRAMS_PER_SM = 4
#: the multiprocessor count assumed by Triton's interpreter (CPU tensors)
INTERPRETER_SMS = 4
NUM_WARPS = 4


@triton.jit
def _finish(acc, b_ptr, out_ptr, n_offs, n_mask, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr):
    """Add the bias to the float32 sums and store them in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + n_offs, mask=n_mask, other=0.0).to(tl.float32)
    if OUT_BF16:
        # float32 -> bfloat16, to nearest even; NaN stays a (quiet) NaN
        bits = acc.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(acc != acc, (bits >> 16) | 0x40, rounded)
        tl.store(out_ptr + n_offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=n_mask)
    else:
        tl.store(out_ptr + n_offs, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _split_k_gemv(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    tokens,
    in_features,
    out_features,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    threshold,
    k_chunk,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    part = tl.program_id(2)
    n_offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < out_features
    k_start = part * k_chunk
    k_end = tl.minimum(k_start + k_chunk, in_features)
    x_row = x_ptr + m * stride_xm
    w_cols = w_ptr + n_offs[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < k_end
        xv = tl.load(x_row + k_offs.to(tl.int64) * stride_xk, mask=k_mask, other=0.0)
        xv = xv.to(tl.float32)
        keep = k_mask & ~(tl.abs(xv) <= threshold)
        xv = tl.where(keep, xv, 0.0)
        # the rows of dropped inputs are masked off: never read
        w = tl.load(
            w_cols + k_offs[:, None].to(tl.int64) * stride_wk,
            mask=keep[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += xv[:, None] * w.to(tl.float32)
    total = tl.sum(acc, axis=0)
    if SPLIT:
        tl.store(out_ptr + (part * tokens + m) * out_features + n_offs, total, mask=n_mask)
    else:
        _finish(total, b_ptr, out_ptr + m * out_features, n_offs, n_mask, HAS_BIAS, OUT_BF16)


@triton.jit
def _sum_splits(
    part_ptr,
    b_ptr,
    out_ptr,
    tokens,
    out_features,
    splits,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    n_offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n_offs < out_features
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for part in range(0, splits):
        row = part_ptr + (part * tokens + m) * out_features
        total += tl.load(row + n_offs, mask=n_mask, other=0.0)
    _finish(total, b_ptr, out_ptr + m * out_features, n_offs, n_mask, HAS_BIAS, OUT_BF16)


def _interpreted() -> bool:
    return type(_split_k_gemv).__name__ == "InterpretedFunction"


#: whether Triton's interpreter runs these kernels (TRITON_INTERPRET=1 at import)
INTERPRETED = _interpreted()


class Plan(NamedTuple):
    """How one call is cut into programs."""

    block_n: int
    block_k: int
    #: slices of the inputs; 1: no partial sums, one kernel launch
    splits: int
    #: inputs per slice, a multiple of ``block_k``
    k_chunk: int


def _block(size: int, largest: int) -> int:
    return min(largest, max(16, int(triton.next_power_of_2(size))))


def plan(
    tokens: int,
    in_features: int,
    out_features: int,
    programs: int,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> Plan:
    """Block sizes and slices for a call; ``programs``: how many to aim at.

    The inputs are split only as far as needed to reach ``programs`` programs,
    and never into slices of fewer than ``block_k`` inputs. Explicit values
    (powers of two for the blocks) override the choice.
    """
    bn = block_n or _block(out_features, MAX_BLOCK_N)
    bk = block_k or _block(in_features, MAX_BLOCK_K)
    k_blocks = triton.cdiv(in_features, bk)
    if splits is None:
        splits = triton.cdiv(programs, tokens * triton.cdiv(out_features, bn))
    splits = max(1, min(splits, k_blocks))
    k_chunk = triton.cdiv(k_blocks, splits) * bk
    return Plan(bn, bk, triton.cdiv(in_features, k_chunk), k_chunk)


_sm_counts: dict[int, int] = {}


def _programs(device: torch.device) -> int:
    if device.type != "cuda":
        return PROGRAMS_PER_SM * INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return PROGRAMS_PER_SM * count


def run(
    x: Tensor,
    weight_t: Tensor,
    bias: Tensor | None,
    threshold: float,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> Tensor:
    """``F.linear(F.hardshrink(x, threshold), weight_t.T, bias)`` by the Triton kernels.

    The caller has checked shapes, dtypes and devices. ``x`` is ``(*,
    in_features)`` with any strides, ``weight_t`` ``(in_features,
    out_features)`` with any strides (contiguous reads fastest), ``bias``
    ``(out_features,)`` or None. The keyword arguments override :func:`plan`.
    """
    in_features, out_features = weight_t.shape
    lead = x.shape[:-1]
    tokens = math.prod(lead)
    x2 = x.reshape(tokens, in_features)
    out = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    if tokens == 0 or out_features == 0:
        return out.reshape(*lead, out_features)
    if in_features == 0:
        out.copy_(bias.expand_as(out) if bias is not None else torch.zeros_like(out))
        return out.reshape(*lead, out_features)
    limit = round_threshold(threshold, x.dtype)
    p = plan(
        tokens,
        in_features,
        out_features,
        _programs(x.device),
        block_n=block_n,
        block_k=block_k,
        splits=splits,
    )
    n_blocks = triton.cdiv(out_features, p.block_n)
    has_bias = bias is not None
    bias_arg = bias if bias is not None else out  # never read without a bias
    out_bf16 = x.dtype == torch.bfloat16
    split = p.splits > 1
    target = (
        torch.empty((p.splits, tokens, out_features), dtype=torch.float32, device=x.device)
        if split
        else out
    )
    _split_k_gemv[(tokens, n_blocks, p.splits)](
        x2,
        weight_t,
        bias_arg,
        target,
        tokens,
        in_features,
        out_features,
        x2.stride(0),
        x2.stride(1),
        weight_t.stride(0),
        weight_t.stride(1),
        limit,
        p.k_chunk,
        BLOCK_K=p.block_k,
        BLOCK_N=p.block_n,
        SPLIT=split,
        HAS_BIAS=has_bias,
        OUT_BF16=out_bf16,
        num_warps=NUM_WARPS,
    )
    if split:
        _sum_splits[(tokens, n_blocks)](
            target,
            bias_arg,
            out,
            tokens,
            out_features,
            p.splits,
            BLOCK_N=p.block_n,
            HAS_BIAS=has_bias,
            OUT_BF16=out_bf16,
            num_warps=NUM_WARPS,
        )
    return out.reshape(*lead, out_features)
