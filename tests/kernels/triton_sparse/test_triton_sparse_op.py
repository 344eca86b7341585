"""The ``triton_sparse`` kernel's own op, on CUDA or in Triton's interpreter: what the
contract suite (tests/kernels/test_contract.py) does not cover.

``nox -s triton`` runs these on CPU tensors under ``TRITON_INTERPRET=1``
(small shapes: the interpreter runs every program in Python); with a GPU,
``pytest tests/kernels`` runs them on CUDA. Its plans (blocks and slices of
the inputs) on shapes up to 200 wide, its rounding of the threshold and of
bfloat16 outputs, and the crossover on a GPU. Results are compared with the
bound of ``_kernel_cases``, the reference computed on the CPU in the same
dtype.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _kernel_cases import (
    add_specials,
    assert_close_to_reference,
    dense_reference,
    error_bound,
    make_x,
    threshold_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import (
    KernelStrategy,
    get_registry,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import is_input_major, sparse_linear_reference
from actsparse.kernels.triton_sparse import (
    KERNEL_NAME,
    clear_cuda_crossover_cache,
    measure_cuda_crossover,
    triton_sparse_linear,
)

triton = pytest.importorskip("triton", reason="triton is not installed (the triton extra)")
# the interpreter computes in numpy, which warns where inf meets 0 (a masked-off lane)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def kernels(device: torch.device) -> types.ModuleType:
    from actsparse.kernels.triton_sparse import _kernel

    return _kernel


def reference(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    return dense_reference(x, weight_t, bias, threshold)


def assert_matches(
    y: torch.Tensor,
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
) -> None:
    assert y.device == x.device
    ref = reference(x, weight_t, bias, threshold)
    assert_close_to_reference(y, ref, error_bound(x, weight_t, bias, threshold))


# ------------------------------------------------------------------ cases


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return {
        "lead": lead,
        "in_features": draw(st.integers(1, 200)),
        "out_features": draw(st.integers(1, 200)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "sparsity": draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        "bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "specials": draw(
            st.sampled_from(
                [(), (float("nan"),), (float("inf"), float("-inf")), (float("nan"), float("inf"))]
            )
        ),
        # None: the plan's own choice; else forced blocks and slices of the inputs
        "plan": draw(
            st.sampled_from(
                [None, {"splits": 1}, {"splits": 3, "block_k": 16}, {"block_n": 16, "block_k": 32}]
            )
        ),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build(
    case: dict[str, Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    generator = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = make_x(generator, case["lead"], case["in_features"], dtype, case["layout"])
    threshold = threshold_for(x, case["sparsity"])
    add_specials(x, generator, case["specials"])
    weight_t = torch.randn(case["in_features"], case["out_features"], generator=generator)
    bias = torch.randn(case["out_features"], generator=generator) if case["bias"] else None
    if device.type != "cpu":
        x = _to_device_keeping_strides(x, device)
    weight_t = weight_t.to(dtype=dtype, device=device)
    return x, weight_t, None if bias is None else bias.to(dtype=dtype, device=device), threshold


def _to_device_keeping_strides(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    base = x._base if x._base is not None else x
    moved = base.to(device)
    return moved.as_strided(x.shape, x.stride(), x.storage_offset())


# ------------------------------------------------------------ the kernel against the reference


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_kernel_matches_the_dense_reference(
    case: dict[str, Any], device: torch.device, kernels: types.ModuleType
) -> None:
    x, weight_t, bias, threshold = build(case, device)
    if case["layout"] != "contiguous" and x.shape[-1] > 1 and case["lead"][-1] > 1:
        assert not x.is_contiguous()
    with torch.no_grad():
        y = kernels.run(x, weight_t, bias, threshold, **(case["plan"] or {}))
        assert_matches(y, x, weight_t, bias, threshold)
        y = triton_sparse_linear(x, weight_t, bias, threshold)
        assert_matches(y, x, weight_t, bias, threshold)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lead", "in_features", "out_features"),
    [((1,), 130, 70), ((3,), 33, 257), ((2, 3), 100, 129), ((2, 1, 2), 1, 1), ((5,), 64, 128)],
)
@pytest.mark.parametrize("plan", [None, {"splits": 1}, {"splits": 4, "block_k": 16}])
def test_shapes_that_are_no_multiple_of_the_blocks(
    dtype: torch.dtype,
    lead: tuple[int, ...],
    in_features: int,
    out_features: int,
    plan: dict[str, int] | None,
    device: torch.device,
    kernels: types.ModuleType,
) -> None:
    generator = torch.Generator().manual_seed(in_features * out_features)
    x = torch.randn(*lead, in_features, generator=generator).to(dtype=dtype, device=device)
    weight_t = torch.randn(in_features, out_features, generator=generator).to(dtype=dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype=dtype)
    weight_t, bias = weight_t.to(device), bias.to(device)
    threshold = threshold_for(x.cpu(), 0.5)
    y = kernels.run(x, weight_t, bias, threshold, **(plan or {}))
    assert_matches(y, x, weight_t, bias, threshold)
    # the same call gives the same bits: partial sums are added in a fixed order
    assert torch.equal(kernels.run(x, weight_t, bias, threshold, **(plan or {})), y)


def test_the_plan_splits_the_inputs_only_at_few_tokens(kernels: types.ModuleType) -> None:
    plan = kernels.plan
    # one token, 4096 -> 11008 on 132 multiprocessors: 86 output blocks, 7 slices
    one = plan(1, 4096, 11008, 4 * 132)
    assert (one.block_n, one.block_k) == (128, 64)
    assert one.splits == 7
    assert one.k_chunk % one.block_k == 0
    assert one.splits * one.k_chunk >= 4096 > (one.splits - 1) * one.k_chunk
    assert plan(64, 4096, 11008, 4 * 132).splits == 1
    assert plan(1, 40, 10, 1000) == kernels.Plan(16, 64, 1, 64)
    assert plan(2, 100, 30, 64, splits=3, block_k=16).splits == 3
    assert plan(2, 100, 30, 64, splits=50, block_k=16).splits == 7  # at most one per block


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_shapes_and_thresholds(
    dtype: torch.dtype, device: torch.device, kernels: types.ModuleType
) -> None:
    generator = torch.Generator().manual_seed(3)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)

    weight_t, bias = tensor(5, 7), tensor(7)
    x = tensor(5)
    for threshold in (0.0, -1.0, float("inf"), float("nan"), 0.3):
        for b in (bias, None):
            y = triton_sparse_linear(x, weight_t, b, threshold)
            assert_matches(y, x, weight_t, b, threshold)
    # no tokens, no input features, no outputs
    for shape_x, shape_w in (((0, 5), (5, 7)), ((2, 3, 0), (0, 7)), ((4, 5), (5, 0))):
        x, w, b = tensor(*shape_x), tensor(*shape_w), tensor(shape_w[1])
        assert_matches(triton_sparse_linear(x, w, b, 0.1), x, w, b, 0.1)
    # every input zeroed (100% sparsity): the bias alone, exactly
    x = torch.full((3, 5), 0.5, dtype=dtype, device=device)
    assert torch.equal(triton_sparse_linear(x, weight_t, bias, 0.5), bias.expand(3, 7))
    assert torch.equal(
        triton_sparse_linear(x, weight_t, None, 0.5), torch.zeros(3, 7, dtype=dtype, device=device)
    )
    # a zero threshold keeps every nonzero entry
    x = tensor(4, 5)
    x[0, 1] = 0.0
    assert_matches(kernels.run(x, weight_t, bias, 0.0, splits=1), x, weight_t, bias, 0.0)
    # a transposed weight view is read through its strides, not copied
    w_view = tensor(7, 5).T
    assert_matches(triton_sparse_linear(x + 1, w_view, None, 0.2), x + 1, w_view, None, 0.2)


@pytest.mark.parametrize(
    ("dtype", "between"),
    # 1 + 2**-8 lies halfway between two bfloat16 numbers, 1 + 2**-11 between two float16
    [(torch.bfloat16, 1.00390625), (torch.float16, 1.00048828125)],
)
def test_threshold_rounds_to_the_input_dtype_as_hardshrink_does(
    dtype: torch.dtype, between: float, device: torch.device
) -> None:
    # rounded to the dtype the threshold is 1.0, so an input of exactly 1.0 is zeroed
    step = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    x = torch.tensor([[1.0, 1.0 + step, -1.0]], dtype=dtype, device=device)
    weight_t = torch.ones(3, 2, dtype=dtype, device=device)
    y = triton_sparse_linear(x, weight_t, None, between)
    assert torch.equal(y.cpu(), reference(x, weight_t, None, between))
    assert y.tolist() == [[1.0 + step, 1.0 + step]]


def test_bfloat16_outputs_round_to_nearest_even(device: torch.device) -> None:
    # float32 sums that lie halfway between two bfloat16 numbers, and one just above
    # (every term is a bfloat16 number, every sum exact in float32)
    cases = [
        (1.0, 2.0**-8),
        (1.0 + 2.0**-7, 2.0**-8),
        (1.0, 2.0**-8 + 2.0**-14),
        (-3.0, -(2.0**-7)),
    ]
    x = torch.tensor(cases, dtype=torch.bfloat16)
    assert x.double().tolist() == [list(case) for case in cases]
    weight_t = torch.ones(2, 1, dtype=torch.bfloat16, device=device)
    y = triton_sparse_linear(x.to(device), weight_t, None, 0.0)
    sums = torch.tensor([a + b for a, b in cases], dtype=torch.float32)
    expected = sums.to(torch.bfloat16)
    assert expected.tolist() == [1.0, 1.0 + 2.0**-6, 1.0 + 2.0**-7, -3.0]
    assert torch.equal(y.cpu()[:, 0], expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_inputs_propagate_as_in_the_dense_product(
    dtype: torch.dtype, device: torch.device
) -> None:
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 40, generator=generator).to(dtype)
    x[0, 0, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    x[2, 1, 39] = float("-inf")
    x[3, 0, 5] = float("inf")
    x[3, 0, 6] = float("-inf")  # inf - inf: NaN
    x = x.to(device)
    weight_t = torch.randn(40, 24, generator=generator).to(dtype=dtype, device=device)
    y = triton_sparse_linear(x, weight_t, None, 0.7)
    ref = reference(x, weight_t, None, 0.7)
    assert bool(ref.isnan().any())
    assert bool(ref.isinf().any())
    assert_matches(y, x, weight_t, None, 0.7)


# ------------------------------------------------------------------ through the op and autograd


def test_gradients_match_the_reference(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(7)
    inputs = [
        torch.randn(2, 3, 9, generator=generator),
        torch.randn(9, 4, generator=generator),
        torch.randn(4, generator=generator),
    ]
    inputs = [t.to(dtype=torch.float16, device=device) for t in inputs]
    grad = torch.randn(2, 3, 4, generator=generator).to(dtype=torch.float16, device=device)
    grads = []
    for fn in (triton_sparse_linear, sparse_linear_reference):
        leaves = [t.clone().requires_grad_() for t in inputs]
        fn(leaves[0], leaves[1], leaves[2], 0.6).backward(grad)
        grads.append([leaf.grad for leaf in leaves])
    # the same formulas, with the matrix products in other orientations: float16 rounding
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-2, rtol=1e-2)


class ThresholdLinear(nn.Module):
    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = triton_sparse_linear(torch.relu(x) - 0.1, self.weight_t, self.bias, self.threshold)
        return torch.tanh(h)


def test_compiles_in_one_graph_and_matches_eager(device: torch.device) -> None:
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(11)
    model = ThresholdLinear(
        torch.randn(24, 16, generator=generator).half(),
        torch.randn(16, generator=generator).half(),
        0.2,
    ).to(device)
    batches = [
        torch.randn(2, 5, 24, generator=generator).half().to(device),
        torch.randn(1, 24, generator=generator).half().to(device),
    ]
    explanation = torch._dynamo.explain(model)(batches[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for x in batches:
            assert torch.equal(run(x), model(x))
    torch._dynamo.reset()


# ------------------------------------------------------------------ behind the sparsifier


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(48, 96, bias=False)
        self.up_proj = nn.Linear(48, 96, bias=False)
        self.down_proj = nn.Linear(96, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _calibrated(dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).to(dtype=dtype, device=device).eval()
    s = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    s.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 48, dtype=dtype, device=device))
    s.step()
    return model, s


@pytest.fixture
def kernel_name(device: torch.device) -> Iterator[str]:
    """The registered kernel on CUDA; in the interpreter (CPU tensors, which the kernel
    does not claim) the same apply under a test name whose supports takes any layer."""
    if device.type == "cuda":
        yield KERNEL_NAME
        return
    record: KernelStrategy = get_registry().get("kernel", KERNEL_NAME)

    @hookimpl
    def actsparse_kernels() -> list[KernelStrategy]:
        return [
            KernelStrategy(
                name="test_triton_interpreted",
                supports=lambda module: None if isinstance(module, nn.Linear) else "not Linear",
                apply=record.apply,
                crossover=lambda module, sparsity: 4,
            )
        ]

    name = register_plugin(
        types.SimpleNamespace(actsparse_kernels=actsparse_kernels), name="test-triton-interpreted"
    )
    try:
        yield "test_triton_interpreted"
    finally:
        unregister_plugin(name=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forced_kernel_gives_the_dense_outputs_with_one_copy_of_the_weights(
    dtype: torch.dtype, device: torch.device, kernel_name: str
) -> None:
    model, s = _calibrated(dtype, device)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    s.squash_mask()
    x = torch.randn(3, 5, 48, dtype=dtype, device=device)
    with torch.no_grad():
        dense = model(x)
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    s.set_kernel(kernel_name)
    with torch.no_grad():
        sparse = model(x)
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == storage
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert is_input_major(model[0].gate_proj)
    assert "forward" in model[0].gate_proj.__dict__


def test_apply_returns_the_layer_on_the_shrunk_input(device: torch.device) -> None:
    torch.manual_seed(5)
    linear = nn.Linear(40, 24).to(dtype=torch.float16, device=device)
    record: KernelStrategy = get_registry().get("kernel", KERNEL_NAME)
    assert record.apply is not None
    x = torch.randn(2, 3, 40, dtype=torch.float16, device=device)
    with torch.no_grad():
        expected = linear(F.hardshrink(x, 0.5))
        fn = record.apply(linear, 0.5)
        y = fn(x)
    weight_t = linear.weight.detach().T
    assert_matches(y, x, weight_t, linear.bias.detach(), 0.5)
    torch.testing.assert_close(y, expected, atol=1e-2, rtol=1e-2)


def test_auto_matches_dense_at_every_token_count(device: torch.device, kernel_name: str) -> None:
    model, s = _calibrated(torch.float16, device)
    twin = copy.deepcopy(model)
    s.squash_mask(kernel="auto")
    reference_sparsifier = ActivationSparsifier(twin)
    reference_sparsifier.load_state_dict(s.state_dict())
    if device.type == "cpu":  # the test kernel's crossover of 4; a GPU measures its own
        assert "forward" in model[0].gate_proj.__dict__
    with torch.no_grad():
        for tokens in (1, 2, 7, 64):
            x = torch.randn(tokens, 48, dtype=torch.float16, device=device)
            torch.testing.assert_close(model(x), twin(x), atol=5e-2, rtol=5e-2)


# ------------------------------------------------------------------ on a GPU only


def test_a_real_cuda_crossover_is_a_power_of_two(device: torch.device) -> None:
    if device.type != "cuda":
        pytest.skip("times the kernel with CUDA events: needs a GPU")
    clear_cuda_crossover_cache()
    try:
        tokens = measure_cuda_crossover(1024, 2816, torch.float16, 0.5, max_tokens=16)
    finally:
        clear_cuda_crossover_cache()
    assert tokens in (0, 1, 2, 4, 8, 16)
