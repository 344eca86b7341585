"""Compensated thresholds: ``abs_histogram(feature_sums=True)`` gives each threshold
an offset, the mean of the values it zeroes per input feature, and the layer adds
the offset's contribution ``W @ offset`` back to its output. The kernel and
torch.compile tests cover every threshold variant.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import _thresholds as shared
import pytest
import torch
from _support import Recorder
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import MaskError, SerializationError, parse_state_dict
from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import cpu_kernel_status
from actsparse.masks import (
    abs_histogram_aggregate,
    finalize_histogram,
    init_histogram,
    target_threshold,
)

mlp = shared.mlp
data = shared.data


def calibrated(
    model: nn.Sequential,
    *,
    sums: bool = True,
    mask_fn: str = "target_threshold",
    level: float = 0.6,
) -> ActivationSparsifier:
    return shared.calibrated(model, mask_fn=mask_fn, level=level, sums=sums)


def relative_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = dense(x)
        return float((model(x) - want).pow(2).sum() / want.pow(2).sum())


# ---------------------------------------------------------------- the statistic


def test_the_offset_is_the_mean_of_the_zeroed_values_per_feature() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, generator=generator) + torch.tensor([0.0, 0.3, -0.3, 1.0, -2.0])
    acc = init_histogram(x, feature_sums=True)
    acc = abs_histogram_aggregate(acc, x, feature_sums=True)
    stats = finalize_histogram(acc, feature_sums=True)
    for level in (0.2, 0.5, 0.8):
        threshold, expected, _, offset = target_threshold(stats, level)
        assert expected == level
        exact = (x * (x.abs() <= threshold)).double().mean(0)
        # the coarse bin that holds the threshold is shared in proportion to its counts
        edge = threshold * 2**0.25
        boundary = (x * ((x.abs() > threshold / 2**0.25) & (x.abs() <= edge))).double()
        assert bool(((offset - exact).abs() <= boundary.abs().mean(0) + 1e-12).all())
    threshold, _, _, offset = target_threshold(stats, 1.0)
    torch.testing.assert_close(offset, x.double().mean(0))  # everything is zeroed


def test_a_threshold_of_zero_has_no_offset() -> None:
    # values too small for the histogram's octaves share its first bin with the zeros;
    # a threshold of 0 keeps them, so nothing nonzero is zeroed and nothing is added back
    x = torch.randn(400, 3)
    x[:100] = 0.0
    x[100:200] = 1e-38
    acc = init_histogram(x, feature_sums=True)
    acc = abs_histogram_aggregate(acc, x, feature_sums=True)
    stats = finalize_histogram(acc, feature_sums=True)
    threshold, _, zero_fraction, offset = target_threshold(stats, 0.0)
    assert threshold == 0.0
    assert zero_fraction > 0.25
    assert not offset.any()


def test_invalid_positions_stay_out_of_the_sums() -> None:
    x = torch.randn(2, 10, 3)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    valid[:, :6] = True
    acc = init_histogram(x, feature_sums=True)
    acc = abs_histogram_aggregate(acc, x, valid=valid.unsqueeze(-1), feature_sums=True)
    alone = init_histogram(x, feature_sums=True)
    alone = abs_histogram_aggregate(alone, x[:, :6], feature_sums=True)
    got, want = (
        finalize_histogram(acc, feature_sums=True),
        finalize_histogram(alone, feature_sums=True),
    )
    assert torch.equal(got.histogram, want.histogram)
    torch.testing.assert_close(got.sums, want.sums)


def test_without_sums_the_strategy_returns_three_numbers_as_before() -> None:
    x = torch.randn(100, 4)
    acc = abs_histogram_aggregate(init_histogram(x), x)
    assert acc.dtype == torch.int64
    assert len(target_threshold(finalize_histogram(acc), 0.5)) == 3


# ------------------------------------------------------------------ the runtime


def _compensated_reference(
    model: nn.Sequential, offset: torch.Tensor, threshold: float, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the last layer must give from its parameters as they are now, and the
    gradients of ``sum()`` for its weight and bias, by autograd on the formula."""
    weight = model[2].weight.detach().clone().requires_grad_()
    bias = model[2].bias.detach().clone().requires_grad_()
    with torch.no_grad():
        zeroed = torch.nn.functional.hardshrink(model[1](model[0](x)), threshold)
    with torch.enable_grad():
        want = nn.functional.linear(zeroed, weight, bias) + weight @ offset.float()
        want.sum().backward()
    assert weight.grad is not None
    assert bias.grad is not None
    return want.detach(), weight.grad, bias.grad


def _squashed(kernel: str = "dense") -> tuple[nn.Sequential, torch.Tensor, float, torch.Tensor]:
    """A compensated model with ``kernel`` set, its last layer's offset and threshold, and
    an input."""
    model = mlp()
    sparsifier = calibrated(model)
    sparsifier.set_kernel(kernel)
    offset = sparsifier.state_dict()["state"]["2"]["offset"]
    return model, offset, sparsifier.thresholds["2"].threshold, data(seed=5, batches=1)[0]


def test_the_layer_adds_the_contribution_of_the_offset_to_its_output() -> None:
    model, offset, threshold, x = _squashed()
    want = _compensated_reference(model, offset, threshold, x)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_the_compensated_layer_follows_its_live_parameters_and_passes_gradients() -> None:
    model, offset, threshold, x = _squashed()
    layer = model[2]
    with torch.no_grad():
        before = model(x)
        layer.bias.add_(1.0)  # an in-place edit
        torch.testing.assert_close(model(x), before + 1.0)
        layer.weight.mul_(0.5)
        torch.testing.assert_close(model(x), _compensated_reference(model, offset, threshold, x)[0])
    other = mlp(seed=3)[2]
    layer.load_state_dict(other.state_dict())  # a copy into the parameters
    with torch.no_grad():
        torch.testing.assert_close(model(x), _compensated_reference(model, offset, threshold, x)[0])
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # a new parameter
    layer.bias = nn.Parameter(torch.randn_like(layer.bias))
    want, weight_grad, bias_grad = _compensated_reference(model, offset, threshold, x)
    out = model(x)
    torch.testing.assert_close(out.detach(), want)
    out.sum().backward()
    assert layer.bias.grad is not None
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer.bias.grad, bias_grad)
    torch.testing.assert_close(layer.weight.grad, weight_grad)  # the shift's share too


def test_without_gradients_the_compensated_layer_runs_what_the_plain_one_runs() -> None:
    # bias + W @ offset is kept between calls, computed again only after a change
    plain, compensated = mlp(), mlp()
    calibrated(plain, sums=False)
    calibrated(compensated)
    x = torch.randn(64, 32)
    runs: dict[str, list[str]] = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("compensated", compensated)):
            model[2](x)
            with Recorder() as recorder:
                model[2](x)
            runs[name] = recorder.ops
        compensated[2].bias.add_(1.0)
        with Recorder() as recorder:
            compensated[2](x)
    assert runs["compensated"] == runs["plain"]
    assert len(recorder.ops) > len(runs["plain"])  # the first call after the change


def test_compensation_lowers_the_error_at_equal_sparsity() -> None:
    dense = mlp()
    plain, compensated = copy.deepcopy(dense), copy.deepcopy(dense)
    a = calibrated(plain, sums=False)
    b = calibrated(compensated)
    assert a.thresholds == b.thresholds  # the same zeros
    x = data(seed=9, batches=1)[0]
    assert relative_error(compensated, dense, x) < 0.9 * relative_error(plain, dense, x)


def test_retarget_recomputes_the_offset() -> None:
    model = mlp()
    sparsifier = calibrated(model)
    before = sparsifier.state_dict()["state"]["2"]["offset"]
    sparsifier.retarget({"2": 0.9})
    after = sparsifier.state_dict()["state"]["2"]["offset"]
    assert after.abs().sum() > before.abs().sum()


@pytest.mark.parametrize("mask_fn", ["target_threshold", "weighted_threshold"])
def test_state_dicts_and_files_keep_the_offset(mask_fn: str, tmp_path: Path) -> None:
    serialize = pytest.importorskip("actsparse.serialize")
    model = mlp()
    sparsifier = calibrated(model, mask_fn=mask_fn)
    x = data(seed=3, batches=1)[0]
    with torch.no_grad():
        want = model(x)
    state = sparsifier.state_dict()
    assert state["state"]["2"]["offset"].shape == (32,)

    fresh = mlp()
    ActivationSparsifier(fresh).load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    for suffix in (".safetensors", ".pt"):
        path = tmp_path / f"state{suffix}"
        serialize.save(sparsifier, path)
        loaded = mlp()
        serialize.load_into(ActivationSparsifier(loaded), path)
        with torch.no_grad():
            assert torch.equal(loaded(x), want), suffix


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (torch.zeros(2, 2), "1-D dense floating tensor"),
        (torch.zeros(3, dtype=torch.long), "1-D dense floating tensor"),
        (torch.tensor([0.0, float("nan")]), "non-finite"),
        ("zeros", "got str"),
    ],
)
def test_a_bad_offset_in_a_state_dict_is_refused(offset: object, match: str) -> None:
    state = calibrated(mlp()).state_dict()
    state["state"]["2"]["offset"] = offset
    with pytest.raises(SerializationError, match=match):
        parse_state_dict(state)


def test_an_offset_without_a_threshold_is_refused() -> None:
    state = calibrated(mlp()).state_dict()
    del state["state"]["2"]["threshold"]
    with pytest.raises(SerializationError, match="needs a threshold"):
        parse_state_dict(state)


def test_an_offset_of_another_width_is_refused_on_load() -> None:
    state = calibrated(mlp()).state_dict()
    state["state"]["2"]["offset"] = torch.zeros(7)
    target = ActivationSparsifier(mlp())
    with pytest.raises(SerializationError, match=r"offset holds 7 numbers.*32 input features"):
        target.load_state_dict(state)
    assert target.data_groups == {}


def test_a_strategy_offset_that_does_not_fit_is_a_mask_error() -> None:
    from actsparse.core import MaskStrategy

    def bad(histogram: object, sparsity_level: float) -> tuple[float, float, float, object]:
        return 0.1, sparsity_level, 0.0, torch.zeros(5)

    strategy = MaskStrategy(
        name="bad_offset",
        fn=bad,
        params={"sparsity_level"},
        dynamic=True,
        target_key="sparsity_level",
    )
    model = mlp()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn=strategy
    )
    sparsifier.register_layer(model[2], sparsity_level=0.5)
    with torch.no_grad():
        model(data()[0])
    with pytest.raises(MaskError, match=r"offset.*5 numbers.*32 features"):
        sparsifier.step()
    assert sparsifier.thresholds == {}


#: Every threshold variant: (mask_fn, feature_sums).
VARIANTS = [
    ("target_threshold", False),
    ("target_threshold", True),
    ("weighted_threshold", False),
    ("weighted_threshold", True),
]


@pytest.mark.parametrize(("mask_fn", "sums"), VARIANTS)
def test_the_cpu_sparse_kernel_computes_what_the_dense_path_does(mask_fn: str, sums: bool) -> None:
    if not cpu_kernel_status().available:
        pytest.skip("the C++ kernel could not be built here")
    model = mlp()
    sparsifier = calibrated(model, sums=sums, mask_fn=mask_fn)
    x = data(seed=11, batches=1)[0]
    with torch.no_grad():
        dense = model(x)
        sparsifier.set_kernel("cpu_sparse")
        fast = model(x)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mask_fn", "sums"), VARIANTS)
def test_the_hooks_compile_without_graph_breaks(mask_fn: str, sums: bool) -> None:
    torch._dynamo.reset()
    model = mlp()
    calibrated(model, sums=sums, mask_fn=mask_fn)
    x = data(seed=2, batches=1)[0]
    with torch.no_grad():
        eager = model(x)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch.testing.assert_close(torch.compile(model)(x), eager)


def _graph_ops(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``torch.compile(model)(x)`` and the names of the ops its captured graph calls."""
    ops: list[str] = []

    def capture(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=capture, fullgraph=True)(x), ops


@pytest.mark.parametrize("kernel", ["dense", "cpu_sparse"])
def test_a_compiled_inference_step_reads_the_kept_shift_not_the_weight(kernel: str) -> None:
    if kernel != "dense" and not cpu_kernel_status().available:
        pytest.skip("the C++ kernel could not be built here")
    model, offset, threshold, x = _squashed(kernel)
    with torch.no_grad():
        out, ops = _graph_ops(model, x)
        torch.testing.assert_close(out, _compensated_reference(model, offset, threshold, x)[0])
        # one opaque node per compensated layer; no product of a weight with the offset
        assert "actsparse.kept_shift.default" in ops
        assert not [op for op in ops if "mv" in op], ops
        # an in-place edit after compiling is seen at the next call, as in eager mode
        compiled = torch.compile(model, fullgraph=True)
        compiled(x)
        model[2].weight.mul_(0.5)
        model[2].bias.add_(1.0)
        torch.testing.assert_close(
            compiled(x), _compensated_reference(model, offset, threshold, x)[0]
        )


def test_a_cuda_graph_never_replays_the_kept_shift() -> None:
    # its check of the parameters runs at each call: inductor splits CUDA graphs there
    assert torch.Tag.cudagraph_unsafe in torch.ops.actsparse.kept_shift.default.tags


def test_a_compiled_training_step_computes_the_shift_in_the_graph() -> None:
    model, offset, threshold, x = _squashed()
    out, ops = _graph_ops(model, x)
    assert "actsparse.kept_shift.default" not in ops
    want, weight_grad, bias_grad = _compensated_reference(model, offset, threshold, x)
    torch.testing.assert_close(out.detach(), want)
    out.sum().backward()
    torch.testing.assert_close(model[2].weight.grad, weight_grad)  # the shift's share too
    torch.testing.assert_close(model[2].bias.grad, bias_grad)


def test_an_exported_program_holds_only_standard_operators() -> None:
    model, offset, threshold, x = _squashed()
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "actsparse" in t], targets
    torch.testing.assert_close(
        program.module()(x), _compensated_reference(model, offset, threshold, x)[0]
    )


def test_detaching_removes_the_output_hook_too() -> None:
    model = mlp()
    sparsifier = calibrated(model)
    sparsifier.unregister_layer("2")
    assert not model[2]._forward_hooks
    assert not model[2]._forward_pre_hooks


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), level=st.floats(0.05, 0.95), shift=st.floats(-1.0, 1.0))
def test_compensation_never_moves_the_zeros(seed: int, level: float, shift: float) -> None:
    # the offset goes to the output; the layer's input is exactly as sparse as without it
    dense = mlp(seed)
    with torch.no_grad():
        dense[0].bias.add_(shift)
    plain, compensated = copy.deepcopy(dense), copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrated(plain, sums=False, level=level)
        calibrated(compensated, level=level)
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("plain", plain), ("compensated", compensated)):
        handle = model[2].register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0]))
        with torch.no_grad():
            model(data(seed=seed + 1, batches=1)[0])
        handle.remove()
    assert torch.equal(seen["plain"] == 0, seen["compensated"] == 0)


@pytest.mark.parametrize(("mask_fn", "sums"), VARIANTS)
def test_a_squashed_model_still_runs_after_a_dtype_change(mask_fn: str, sums: bool) -> None:
    model = mlp()
    calibrated(model, sums=sums, mask_fn=mask_fn)
    x = data(seed=4, batches=1)[0]
    with torch.no_grad():
        want = model(x)
        model.double()  # the shift and the bound were built in float32
        got = model(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-4)
