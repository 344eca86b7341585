"""Sparse COO mask conversion and the registered ``sparse_coo`` serializer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.core import SerializationError, Serializer, get_registry
from actsparse.serialize import (
    STATE_KEYS,
    dense_masks,
    from_sparse_coo,
    from_torch_ao,
    sparse_coo_masks,
    to_sparse_coo,
    to_torch_ao,
)

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.bool,
]


@st.composite
def masks(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    bits = draw(hnp.arrays(np.bool_, shape))
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    return torch.from_numpy(bits).to(dtype)


layer_names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=8)
mask_values = st.one_of(
    st.none(),
    masks(),
    st.lists(masks(), max_size=3),
)


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(layer_names, unique=True, max_size=4))
    state = {name: {"mask": draw(mask_values)} for name in names}
    for layer_state in state.values():
        if draw(st.booleans()):
            layer_state["extra"] = draw(st.integers())
    return {
        "state": state,
        "data_groups": {name: {"sparse_config": {"sparsity_level": 0.5}} for name in names},
        "defaults": {"aggregate_fn": "sum", "reduce_fn": "mean"},
    }


def _serializer() -> Serializer:
    ser = get_registry().get("serializer", "sparse_coo")
    assert isinstance(ser, Serializer)
    return ser


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert not got.is_sparse
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(got, want)


def assert_same_mask(got: Any, want: Any) -> None:
    if want is None:
        assert got is None
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert_same_tensor(got, want)
    else:
        assert isinstance(got, list)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_tensor(g, w)


def _snapshot(value: Any) -> Any:
    """A structure that compares equal iff ``value`` is unchanged (tensors by layout and bytes)."""
    if isinstance(value, torch.Tensor):
        dense = value.to_dense() if value.is_sparse else value
        return ("tensor", value.layout, value.dtype, tuple(value.shape), dense.tolist())
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value), [_snapshot(v) for v in value])
    return value


# -------------------------------------------------------------- functions


@settings(max_examples=150, deadline=None)
@given(mask=masks())
def test_to_and_from_sparse_coo_round_trip(mask: torch.Tensor) -> None:
    sparse = to_sparse_coo(mask)
    assert sparse.is_sparse
    assert sparse.layout == torch.sparse_coo
    assert sparse.dtype == mask.dtype
    assert sparse.shape == mask.shape
    assert_same_tensor(from_sparse_coo(sparse), mask)
    # only the nonzero entries are stored
    assert sparse.coalesce()._nnz() == int((mask != 0).sum())


@given(mask=masks())
def test_conversions_are_idempotent(mask: torch.Tensor) -> None:
    sparse = to_sparse_coo(mask)
    assert to_sparse_coo(sparse) is sparse
    assert from_sparse_coo(mask) is mask


# ------------------------------------------------------------- serializer


def test_serializer_is_registered() -> None:
    ser = _serializer()
    assert ser.dumps is to_torch_ao
    assert ser.loads is from_torch_ao
    assert ser.binary is False
    entry = get_registry().entry("serializer", "sparse_coo")
    assert entry.plugin == "actsparse.serialize"
    assert entry.distribution == "actsparse-serialize"


@settings(max_examples=100, deadline=None)
@given(sd=state_dicts())
def test_dumps_loads_round_trip(sd: dict[str, Any]) -> None:
    ser = _serializer()
    stored = ser.dumps(sd)
    assert set(stored) == set(sd)
    assert stored["data_groups"] == sd["data_groups"]
    assert stored["defaults"] == sd["defaults"]
    for name, layer_state in sd["state"].items():
        dumped = stored["state"][name]["mask"]
        mask = layer_state["mask"]
        if mask is None:
            assert dumped is None
        elif isinstance(mask, torch.Tensor):
            assert dumped.is_sparse
        else:
            assert all(m.is_sparse for m in dumped)
        assert {k: v for k, v in stored["state"][name].items() if k != "mask"} == {
            k: v for k, v in layer_state.items() if k != "mask"
        }
    loaded = ser.loads(stored)
    assert set(loaded) == set(sd)
    assert set(loaded["state"]) == set(sd["state"])
    for name, layer_state in sd["state"].items():
        assert_same_mask(loaded["state"][name]["mask"], layer_state["mask"])
        assert loaded["state"][name].keys() == layer_state.keys()


@settings(max_examples=60, deadline=None)
@given(sd=state_dicts())
def test_dumps_and_loads_do_not_mutate_their_input(sd: dict[str, Any]) -> None:
    ser = _serializer()
    before = _snapshot(sd)
    tensors_before = {name: layer_state["mask"] for name, layer_state in sd["state"].items()}
    stored = ser.dumps(sd)
    assert _snapshot(sd) == before
    for name, layer_state in sd["state"].items():
        assert layer_state["mask"] is tensors_before[name]
    stored_before = _snapshot(stored)
    ser.loads(stored)
    assert _snapshot(stored) == stored_before


def test_loads_accepts_dense_masks() -> None:
    sd = {"state": {"fc": {"mask": torch.tensor([1.0, 0.0])}}, "data_groups": {}, "defaults": {}}
    assert_same_mask(_serializer().loads(sd)["state"]["fc"]["mask"], sd["state"]["fc"]["mask"])


def test_a_tuple_of_masks_becomes_a_list() -> None:
    masks_ = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    stored = _serializer().dumps(
        {"state": {"f": {"mask": masks_}}, "data_groups": {}, "defaults": {}}
    )
    loaded = _serializer().loads(stored)["state"]["f"]["mask"]
    assert_same_mask(loaded, list(masks_))


def test_state_mapping_helpers() -> None:
    state = {"a": {"mask": torch.tensor([0.0, 1.0])}, "b": {"mask": None}}
    coo = sparse_coo_masks(state)
    assert coo["a"]["mask"].is_sparse
    assert coo["b"]["mask"] is None
    assert_same_mask(dense_masks(coo)["a"]["mask"], state["a"]["mask"])


# -------------------------------------------------------------- malformed

GOOD_MASK = torch.tensor([1.0, 0.0])


def _sd(state: Any) -> dict[str, Any]:
    return {"state": state, "data_groups": {}, "defaults": {}}


MALFORMED: list[tuple[str, Any, str]] = [
    ("not-a-mapping", [("state", {})], "mapping"),
    ("none", None, "mapping"),
    ("missing-state", {"data_groups": {}, "defaults": {}}, "'state'"),
    ("missing-two", {"state": {}}, "'data_groups', 'defaults'"),
    ("state-not-mapping", _sd([GOOD_MASK]), "state"),
    ("layer-not-mapping", _sd({"fc": GOOD_MASK}), "state['fc']"),
    ("layer-without-mask", _sd({"fc": {"data": GOOD_MASK}}), "state['fc']"),
    ("mask-string", _sd({"fc": {"mask": "1,0"}}), "state['fc']['mask']"),
    ("mask-number", _sd({"fc": {"mask": 1.0}}), "state['fc']['mask']"),
    ("mask-numpy", _sd({"fc": {"mask": np.ones(2)}}), "state['fc']['mask']"),
    ("mask-list-with-junk", _sd({"fc": {"mask": [GOOD_MASK, None]}}), "state['fc']['mask']"),
    ("mask-dict", _sd({"fc": {"mask": {"0": GOOD_MASK}}}), "state['fc']['mask']"),
]


@pytest.mark.parametrize("direction", ["dumps", "loads"])
@pytest.mark.parametrize(
    ("state_dict", "named"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_state_is_a_serialization_error(
    direction: str, state_dict: Any, named: str
) -> None:
    call: Callable[[Any], Any] = getattr(_serializer(), direction)
    before = _snapshot(state_dict)
    with pytest.raises(SerializationError) as info:
        call(state_dict)
    assert named in str(info.value)
    assert _snapshot(state_dict) == before


def test_state_keys_are_torch_aos() -> None:
    assert STATE_KEYS == ("state", "data_groups", "defaults")
