"""Streaming aggregates: fold the sample dimensions on every call.

Their accumulator keeps only the feature dimensions, so its size does not
depend on the batch size or the sequence length, and calibration batches of
different shapes can follow each other.

The accumulator is one tensor of shape ``(2, *kept)``: row 0 holds the running
statistic (a sum, or a maximum for ``abs_max``), row 1 the number of samples
folded into each position so far. ``kept`` is the input's shape without its
leading sample dimensions; a sample dimension that follows a feature
dimension stays, with size 1, so the statistic (and the mask computed from
it) broadcasts to the input. It is in ``float32`` for inputs of a smaller
floating type (so half-precision inputs do not overflow the sum), else in the
input's floating type. ``finalize`` turns it into the statistic of shape
``kept``: the sum divided by the count, or the maximum.

Which dimensions are samples is the ``sample_dims`` option (a ``sparse_config``
key): an int or a list of ints, negative ones counting from the end. When it
is absent or ``None``, inputs with 4 or more dimensions (``(N, C, H, W)``,
``(N, C, D, H, W)``) fold dim 0 and keep the rest, and smaller ones (a
Linear-style ``(..., D)``) keep only the last dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from actsparse.core import ConfigError

__all__ = [
    "SAMPLE_DIMS",
    "abs_max_aggregate",
    "abs_mean_aggregate",
    "feature_axis",
    "finalize_max",
    "finalize_mean",
    "init_streaming",
    "mean_aggregate",
    "resolve_sample_dims",
    "sq_mean_aggregate",
]

#: The ``sparse_config`` key that names the sample dimensions.
SAMPLE_DIMS = "sample_dims"


def resolve_sample_dims(ndim: int, sample_dims: int | Sequence[int] | None) -> tuple[int, ...]:
    """The sample dimensions of an ``ndim``-dimensional input, sorted and non-negative."""
    if sample_dims is None:
        return (0,) if ndim >= 4 else tuple(range(ndim - 1))
    dims = (sample_dims,) if isinstance(sample_dims, int) else sample_dims
    if (
        isinstance(dims, (str, bytes))
        or not isinstance(dims, Sequence)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)
    ):
        raise ConfigError(f"sample_dims must be an int or a list of ints, got {sample_dims!r}")
    out = set()
    for d in dims:
        if not -ndim <= d < ndim:
            raise ConfigError(
                f"sample_dims={sample_dims!r} names dimension {d}, out of range for an input "
                f"with {ndim} dimensions"
            )
        out.add(d % ndim)
    if len(out) != len(dims):
        raise ConfigError(f"sample_dims={sample_dims!r} names a dimension twice")
    return tuple(sorted(out))


def _leading(ndim: int, dims: tuple[int, ...]) -> int:
    """How many dimensions at the front are all sample dimensions."""
    lead = 0
    while lead < ndim and lead in dims:
        lead += 1
    return lead


def _kept_shape(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    """The statistic's shape: leading sample dims dropped, later ones kept as 1.

    A sample dim between or after feature dims stays as a dimension of size
    1, so that the mask computed from the statistic broadcasts to the input
    the right way round (``(N, C, L)`` folded over N and L gives ``(C, 1)``).
    """
    lead = _leading(x.ndim, dims)
    return tuple(1 if d in dims else x.shape[d] for d in range(lead, x.ndim))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def init_streaming(x: torch.Tensor, sample_dims: int | Sequence[int] | None = None) -> torch.Tensor:
    """A zero accumulator of shape ``(2, *kept)`` for inputs shaped like ``x``."""
    dims = resolve_sample_dims(x.ndim, sample_dims)
    return torch.zeros((2, *_kept_shape(x, dims)), dtype=_acc_dtype(x), device=x.device)


def feature_axis(dim: int, ndim: int, sample_dims: int | Sequence[int] | None = None) -> int:
    """The accumulator dimension that holds input dimension ``dim`` (non-negative)."""
    dims = resolve_sample_dims(ndim, sample_dims)
    if dim in dims:
        raise ConfigError(
            f"dimension {dim} is a sample dimension (sample_dims resolves to {list(dims)} "
            f"for {ndim}-dimensional inputs), folded away on every call"
        )
    # Rows 0 and 1 of the accumulator come first, then the input's dimensions
    # from the first one that is not a sample dimension on.
    return 1 + dim - _leading(ndim, dims)


def _elementwise(x: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The statistic of one sample: x, |x| or x**2 (squared in ``dtype``).

    ``x`` may stay in a smaller floating type: the in-place update of the
    accumulator computes in the accumulator's type.
    """
    if kind == "sq":
        return x.to(dtype).square()
    return x if kind == "sum" else x.abs()


def _stat(x: torch.Tensor, dims: tuple[int, ...], kind: str, dtype: torch.dtype) -> torch.Tensor:
    """``x`` folded over ``dims``: a sum of x, |x| or x**2, or a max of |x|."""
    if kind == "sum":
        return x.sum(dim=dims, dtype=dtype, keepdim=True)
    if kind == "sq":
        return x.to(dtype).square().sum(dim=dims, keepdim=True)
    if kind == "abs":
        # abs() then sum(): an input-sized temporary, but an order of magnitude
        # faster on CPU than vector_norm(ord=1) over a leading dimension.
        return x.abs().sum(dim=dims, dtype=dtype, keepdim=True)
    # max |x| = max(max x, -min x): no temporary of the input's size.
    high = x.amax(dim=dims, keepdim=True)
    low = x.amin(dim=dims, keepdim=True)
    return torch.maximum(high, low.neg_())


def _dims_key(sample_dims: int | Sequence[int] | None) -> object:
    """``sample_dims`` in a hashable form (a list becomes a tuple) for the plan cache."""
    if isinstance(sample_dims, list):
        return tuple(sample_dims)
    return sample_dims


#: (input shape, sample_dims) -> plan; bounded, cleared when full
_PLANS: dict[tuple[tuple[int, ...], object], tuple[tuple[int, ...], tuple[int, ...], int]] = {}
_MAX_PLANS = 256


def _compute_plan(
    shape: tuple[int, ...], sample_dims: int | Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    dims = resolve_sample_dims(len(shape), sample_dims)
    lead = _leading(len(shape), dims)
    kept = tuple(1 if d in dims else shape[d] for d in range(lead, len(shape)))
    count = 1
    for d in dims:
        count *= shape[d]
    return dims, kept, count


def _plan(
    shape: tuple[int, ...], sample_dims: int | Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """``(dims, kept, count)`` for an input of ``shape``: computed once per shape.

    The forward hook runs on every call; the Python work of resolving the
    dimensions is done once per input shape, not once per call (under
    ``torch.compile`` it is done while tracing, and the graph holds none of it).
    """
    if torch.compiler.is_compiling():
        return _compute_plan(shape, sample_dims)
    key = (shape, _dims_key(sample_dims))
    try:
        return _PLANS[key]
    except KeyError:
        pass
    except TypeError:  # unhashable sample_dims: resolve_sample_dims reports it
        return _compute_plan(shape, sample_dims)
    plan = _compute_plan(shape, sample_dims)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _streaming(
    acc: torch.Tensor, x: torch.Tensor, sample_dims: int | Sequence[int] | None, kind: str
) -> torch.Tensor:
    dims, kept, count = _plan(tuple(x.shape), sample_dims)
    if kept != acc.shape[1:]:
        raise ConfigError(
            f"the kept dimensions of the input changed from {tuple(acc.shape[1:])} to "
            f"{kept} (input shape {tuple(x.shape)}, sample dimensions "
            f"{list(dims)}); name the dimensions that vary in sample_dims"
        )
    if count == 1:
        # One sample (a batch of one, or no sample dimension): folding over
        # size-1 dimensions would only copy, so the statistic is x itself.
        stat = _elementwise(x.reshape(kept), kind, acc.dtype)
    else:
        # keepdim, then drop the leading sample dims: the layout of _kept_shape.
        stat = _stat(x, dims, kind, acc.dtype).reshape(kept)
    # In place: the accumulator belongs to the runtime, which hands it to no
    # one else, and every check above runs before it changes. The update
    # computes in the accumulator's type.
    if kind == "max":
        torch.maximum(acc[0], stat, out=acc[0])
    else:
        acc[0].add_(stat)
    acc[1].add_(count)
    return acc


def mean_aggregate(
    acc: torch.Tensor, x: torch.Tensor, sample_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Add ``x``'s sum over the sample dimensions and its sample count."""
    return _streaming(acc, x, sample_dims, "sum")


def abs_mean_aggregate(
    acc: torch.Tensor, x: torch.Tensor, sample_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Add the sum of ``|x|`` over the sample dimensions and its sample count."""
    return _streaming(acc, x, sample_dims, "abs")


def sq_mean_aggregate(
    acc: torch.Tensor, x: torch.Tensor, sample_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Add the sum of ``x ** 2`` over the sample dimensions and its sample count."""
    return _streaming(acc, x, sample_dims, "sq")


def abs_max_aggregate(
    acc: torch.Tensor, x: torch.Tensor, sample_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Keep the running maximum of ``|x|`` over the sample dimensions and the sample count."""
    return _streaming(acc, x, sample_dims, "max")


def finalize_mean(
    acc: torch.Tensor, sample_dims: int | Sequence[int] | None = None
) -> torch.Tensor:
    """The running sum divided by the sample count."""
    return acc[0] / acc[1]


def finalize_max(acc: torch.Tensor, sample_dims: int | Sequence[int] | None = None) -> torch.Tensor:
    """The running maximum."""
    return acc[0].clone()
