"""Mask strategies beyond ``magnitude``: threshold, top-k, n:m and block norm.

Each returns a tensor of ``data``'s shape and dtype holding zeros and ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from actsparse.core import ConfigError
from actsparse.masks._checks import block_shape as _block_shape
from actsparse.masks._checks import fraction as _fraction
from actsparse.masks._checks import is_int as _is_int
from actsparse.masks._checks import number as _number

__all__ = ["block_norm_mask", "n_m_mask", "threshold_mask", "topk_mask"]


def _dim(data: torch.Tensor, dim: object) -> int:
    if not _is_int(dim):
        raise ConfigError(f"dim must be an int, got {dim!r}")
    ndim = max(data.ndim, 1)
    if not -ndim <= dim < ndim:  # type: ignore[operator]
        raise ConfigError(f"dim={dim} is out of range for data with {data.ndim} dimensions")
    return dim % ndim  # type: ignore[operator, no-any-return]


def threshold_mask(data: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the entries with ``|x| <= threshold``; ones elsewhere.

    The registered ``threshold`` mask strategy: how many entries it zeroes
    depends on the data's scale, not on a fixed fraction.

    Args:
        data: The reduced data, of any shape.
        threshold: The largest magnitude that is zeroed, a number (not NaN).

    Returns:
        A mask of ``data``'s shape and dtype.

    Raises:
        ConfigError: ``threshold`` is not a number.
    """
    limit = _number("threshold", threshold)
    return (data.abs() > limit).to(data.dtype)


def topk_mask(
    data: torch.Tensor,
    k: int | None = None,
    fraction: float | None = None,
    dim: int | None = -1,
) -> torch.Tensor:
    """Keep the ``k`` entries of largest ``|x|`` along ``dim``; zero the rest.

    The registered ``topk`` mask strategy: every slice along ``dim`` keeps the
    same number of entries. Which of several tied entries is kept is not
    specified.

    Args:
        data: The reduced data, of any shape.
        k: How many entries to keep per slice, an int in [0, size along ``dim``].
        fraction: Instead of ``k``: ``k = round(fraction * size)``, a number in
            [0, 1]. Give exactly one of ``k`` and ``fraction``.
        dim: The dimension along which entries are ranked; ``None`` ranks all
            entries together.

    Returns:
        A mask of ``data``'s shape and dtype.

    Raises:
        ConfigError: Both or neither of ``k`` and ``fraction``, a ``k`` out of
            range, a ``fraction`` outside [0, 1], or a ``dim`` out of range.
    """
    if (k is None) == (fraction is None):
        raise ConfigError("topk needs exactly one of k and fraction")
    flat = dim is None or data.ndim == 0
    scores = data.abs().reshape(-1) if flat else data.abs()
    axis = 0 if flat else _dim(data, dim)
    size = scores.shape[axis]
    if k is None:
        count = round(_fraction("fraction", fraction) * size)
    else:
        if not _is_int(k) or not 0 <= k <= size:
            raise ConfigError(f"k must be an int in [0, {size}] (the size along dim), got {k!r}")
        count = k
    mask = torch.zeros_like(scores)
    mask.scatter_(axis, scores.topk(count, dim=axis).indices, 1)
    return mask.reshape(data.shape)


def n_m_mask(data: torch.Tensor, n: int, m: int, dim: int = -1) -> torch.Tensor:
    """Keep the ``n`` entries of largest ``|x|`` in every group of ``m`` along ``dim``.

    The registered ``n_m`` mask strategy. Groups are consecutive and start at
    index 0 (``n=2, m=4`` is 2:4 sparsity). A last, shorter group keeps
    ``min(n, its size)`` entries.

    Args:
        data: The reduced data, with at least one dimension.
        n: How many entries each group keeps, an int in [0, m].
        m: The size of a group, a positive int.
        dim: The dimension along which the groups run.

    Returns:
        A mask of ``data``'s shape and dtype.

    Raises:
        ConfigError: ``n`` or ``m`` out of range, a ``dim`` out of range, or
            data without a dimension.
    """
    if not _is_int(m) or m < 1:
        raise ConfigError(f"m must be a positive int, got {m!r}")
    if not _is_int(n) or not 0 <= n <= m:
        raise ConfigError(f"n must be an int in [0, m={m}], got {n!r}")
    if data.ndim == 0:
        raise ConfigError("n_m needs data with at least one dimension")
    axis = _dim(data, dim)
    scores = data.abs().movedim(axis, -1)
    size = scores.shape[-1]
    pad = -size % m
    if pad:
        # Padding ranks below every real entry (NaN aside), so a short last group keeps all.
        scores = F.pad(scores, (0, pad), value=-math.inf)
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    keep = torch.zeros_like(groups)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, 1)
    mask = keep.reshape(*scores.shape[:-1], -1)[..., :size]
    return mask.movedim(-1, axis).contiguous()


def block_norm_mask(
    data: torch.Tensor,
    sparsity_level: float,
    sparse_block_shape: Sequence[int] = (1, 4),
    zeros_per_block: int | None = None,
    norm: str = "L1",
) -> torch.Tensor:
    """The mask of torch.ao's ``DataNormSparsifier`` for ``data``.

    The registered ``block_norm`` mask strategy. Blocks of
    ``sparse_block_shape`` tile the data from index 0 (the last ones may be
    cut by the edge). The ``round(sparsity_level * n_blocks)`` blocks of
    smallest mean norm (``|x|`` for ``"L1"``, ``x ** 2`` for ``"L2"``) are
    sparsified: in each, the ``zeros_per_block`` entries of smallest norm are
    zeroed (all of them by default). As torch does, singleton dimensions are
    dropped first and the data must then be at most 2-D, a 1-D row being one
    row of blocks; beyond torch, more dimensions are a batch of 2-D planes
    (the last two dimensions), each sparsified on its own.

    Args:
        data: The reduced data.
        sparsity_level: The fraction of blocks to sparsify, a number in [0, 1].
        sparse_block_shape: The block's (height, width), two positive ints.
        zeros_per_block: How many entries of a sparsified block are zeroed,
            an int from 0 to the entries of a block; ``None``: all of them.
        norm: ``"L1"`` or ``"L2"``.

    Returns:
        A mask of ``data``'s shape and dtype.

    Raises:
        ConfigError: A value out of its range.
    """
    level = _fraction("sparsity_level", sparsity_level)
    bh, bw = _block_shape(sparse_block_shape)
    per_block = bh * bw
    zeros = per_block if zeros_per_block is None else zeros_per_block
    if not _is_int(zeros) or not 0 <= zeros <= per_block:
        raise ConfigError(
            f"zeros_per_block must be an int in [0, {per_block}] (the entries of a block), "
            f"got {zeros_per_block!r}"
        )
    if norm not in ("L1", "L2"):
        raise ConfigError(f"norm must be 'L1' or 'L2', got {norm!r}")

    values = (data.abs() if norm == "L1" else data * data).squeeze()
    if values.ndim <= 1:
        values = values.reshape(1, 1, -1)
    planes = values.reshape(-1, *values.shape[-2:])
    batch, height, width = planes.shape
    rows, cols = -(-height // bh), -(-width // bw)
    n_blocks = rows * cols

    # Which blocks are sparsified: the ones of smallest mean norm (edge blocks
    # average the entries they hold, as avg_pool2d with ceil_mode does).
    means = F.avg_pool2d(
        planes[:, None], kernel_size=(bh, bw), stride=(bh, bw), ceil_mode=True
    ).reshape(batch, n_blocks)
    chosen = torch.sort(means, dim=1).indices[:, : round(level * n_blocks)]
    sparsified = torch.zeros((batch, n_blocks), dtype=torch.bool, device=data.device)
    sparsified.scatter_(1, chosen, True)

    # Inside a sparsified block: zero its `zeros` smallest entries; the padding
    # beyond the edge is NaN, which sorts last.
    if zeros == per_block:
        inside = torch.zeros((batch, n_blocks, per_block), dtype=data.dtype, device=data.device)
    else:
        padded = torch.full(
            (batch, rows * bh, cols * bw), math.nan, dtype=planes.dtype, device=data.device
        )
        padded[:, :height, :width] = planes
        blocks = (
            padded.reshape(batch, rows, bh, cols, bw)
            .permute(0, 1, 3, 2, 4)
            .reshape(batch, n_blocks, per_block)
        )
        smallest = torch.sort(blocks, dim=2).indices[:, :, :zeros]
        inside = torch.ones((batch, n_blocks, per_block), dtype=data.dtype, device=data.device)
        inside.scatter_(2, smallest, 0)
    blocks_mask = torch.where(sparsified[..., None], inside, torch.ones_like(inside))
    mask = (
        blocks_mask.reshape(batch, rows, cols, bh, bw)
        .permute(0, 1, 3, 2, 4)
        .reshape(batch, rows * bh, cols * bw)[:, :height, :width]
    )
    return mask.reshape(data.shape).contiguous()
