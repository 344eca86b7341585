"""``"block_norm"`` gives torch.ao's ``DataNormSparsifier`` masks on the same data."""

from __future__ import annotations

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core import get_registry

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier


def _torch_mask(
    data: torch.Tensor,
    level: float,
    block: tuple[int, int],
    zeros: int | None,
    norm: str,
) -> torch.Tensor:
    sparsifier = DataNormSparsifier(
        sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm
    )
    sparsifier.add_data("data", data.clone())
    sparsifier.step()
    return sparsifier.get_mask("data")


# torch squeezes the data and handles at most 2 non-singleton dims (one at least).
SHAPES = st.one_of(
    st.tuples(st.integers(2, 12), st.integers(2, 17)),
    st.tuples(st.integers(2, 24)),
    st.tuples(st.just(1), st.integers(2, 12)),
    st.tuples(st.integers(2, 12), st.just(1)),
    st.tuples(st.just(1), st.integers(2, 9), st.integers(2, 9)),
)


@settings(max_examples=150, deadline=None)
@given(
    shape=SHAPES,
    block=st.tuples(st.integers(1, 4), st.integers(1, 5)),
    data=st.data(),
    norm=st.sampled_from(["L1", "L2"]),
    seed=st.integers(0, 2**16),
)
def test_block_norm_equals_data_norm_sparsifier(
    shape: tuple[int, ...],
    block: tuple[int, int],
    data: st.DataObject,
    norm: str,
    seed: int,
) -> None:
    level = data.draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0, 1)))
    zeros = data.draw(st.one_of(st.none(), st.integers(0, block[0] * block[1])))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    config: dict[str, object] = {"sparsity_level": level, "sparse_block_shape": block}
    if zeros is not None:
        config["zeros_per_block"] = zeros
    if norm != "L1" or data.draw(st.booleans()):
        config["norm"] = norm
    ours = get_registry().get("mask", "block_norm").fn(x, **config)
    theirs = _torch_mask(x, level, block, zeros, norm)
    assert ours.shape == x.shape
    assert ours.dtype == x.dtype
    # torch returns int8 and, for 1-D rows, a (1, n) mask: compare the values in order.
    assert torch.equal(ours.flatten(), theirs.flatten().to(x.dtype))


def test_more_dims_are_a_batch_of_planes() -> None:
    x = torch.randn(3, 6, 8)
    config = {"sparsity_level": 0.5, "sparse_block_shape": (2, 2), "zeros_per_block": 3}
    mask = get_registry().get("mask", "block_norm").fn(x, **config)
    for plane in range(3):
        expected = _torch_mask(x[plane], 0.5, (2, 2), 3, "L1")
        assert torch.equal(mask[plane], expected.to(x.dtype))
