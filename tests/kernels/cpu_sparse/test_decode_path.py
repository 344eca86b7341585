"""What the decode path costs: the compiled operator called directly, cold-weight crossovers,
and no hook at all on a layer that zeroes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import actsparse.kernels.cpu_sparse as cpu_sparse
from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import cpu_kernel_status

pytestmark = pytest.mark.skipif(
    not cpu_kernel_status().available, reason="the C++ kernel could not be built here"
)


def _squashed(kernel: str, level: float = 0.5) -> tuple[nn.Module, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers({nn.Linear: {"sparsity_level": level}})
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 32))
    sparsifier.step()
    sparsifier.squash_mask(kernel=kernel)
    return model, sparsifier


def _ops(fn: Any) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_without_autograd_the_layer_calls_the_compiled_operator_directly() -> None:
    model, _ = _squashed("cpu_sparse")
    x = torch.randn(1, 32)
    with torch.no_grad():
        ops = _ops(lambda: model(x))
    assert "actsparse_kernels::sparse_linear_cpu" in ops
    assert "actsparse::sparse_linear" not in ops  # the custom op's Python layers are skipped


def test_with_autograd_the_layer_goes_through_the_op_and_its_formula() -> None:
    model, _ = _squashed("cpu_sparse")
    x = torch.randn(2, 32, requires_grad=True)
    ops = _ops(lambda: model(x).sum().backward())
    assert "actsparse::sparse_linear" in ops
    assert x.grad is not None
    assert model[0].weight.grad is not None


def test_the_direct_call_gives_the_ops_result() -> None:
    model, sparsifier = _squashed("cpu_sparse")
    x = torch.randn(5, 32)
    with torch.no_grad():
        direct = model(x)
    sparsifier.set_kernel("dense")
    with torch.no_grad():
        dense = model(x)
    torch.testing.assert_close(direct, dense, rtol=1e-5, atol=1e-5)


def _compiled_targets(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    targets: set[str] = set()

    def capture(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Any:
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=capture, fullgraph=True)(x), targets


def test_a_compiled_inference_graph_calls_the_compiled_operator_directly() -> None:
    model, sparsifier = _squashed("cpu_sparse")
    x = torch.randn(1, 32)
    with torch.no_grad():
        out, targets = _compiled_targets(model, x)
        assert "actsparse_kernels.sparse_linear_cpu.default" in targets
        assert "actsparse.sparse_linear.default" not in targets
        sparsifier.set_kernel("dense")
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


def test_a_compiled_training_graph_keeps_the_op_and_its_formula() -> None:
    model, _ = _squashed("cpu_sparse")
    x = torch.randn(2, 32, requires_grad=True)
    out, targets = _compiled_targets(model, x)
    assert "actsparse.sparse_linear.default" in targets
    assert "actsparse_kernels.sparse_linear_cpu.default" not in targets
    out.sum().backward()
    assert x.grad is not None


def test_an_exported_program_keeps_the_op() -> None:
    model, _ = _squashed("cpu_sparse")
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 32),))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "actsparse.sparse_linear.default" in targets
    assert "actsparse_kernels.sparse_linear_cpu.default" not in targets


def test_a_float64_input_is_left_to_the_op() -> None:
    # the compiled operator runs float32 and bfloat16 only; the op computes the reference
    model, _ = _squashed("cpu_sparse")
    model.double()
    with torch.no_grad():
        ops = _ops(lambda: model(torch.randn(1, 32, dtype=torch.float64)))
    assert "actsparse::sparse_linear" in ops


def test_a_misshapen_input_is_refused_by_the_ops_checks() -> None:
    from actsparse.core import ConfigError

    model, _ = _squashed("cpu_sparse")
    with torch.no_grad(), pytest.raises(ConfigError, match="features"):
        model[0](torch.randn(1, 31))


def test_the_crossover_is_measured_on_cold_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[torch.Tensor]] = []

    def wins(x: torch.Tensor, weights: list[torch.Tensor], threshold: float) -> bool:
        seen.append(weights)
        return False

    monkeypatch.setattr(cpu_sparse, "_wins", wins)
    cpu_sparse.clear_crossover_cache()
    try:
        assert cpu_sparse.measure_crossover(64, 128, torch.float32, 0.5) == 0
    finally:
        cpu_sparse.clear_crossover_cache()
    (weights,) = seen
    assert sum(w.numel() * w.element_size() for w in weights) >= cpu_sparse.COLD_BYTES or (
        len(weights) == cpu_sparse.MAX_COPIES
    )
    assert len({w.data_ptr() for w in weights}) == len(weights) > 1


def test_the_crossover_times_the_kernel_as_a_decoding_step_calls_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timed: list[set[str]] = []

    def faster(sparse: Any, dense: Any, timer: Any, **kwargs: Any) -> bool:
        timed.append(_ops(sparse))
        return False

    monkeypatch.setattr(cpu_sparse, "sparse_faster", faster)
    cpu_sparse.clear_crossover_cache()
    try:
        cpu_sparse.measure_crossover(32, 48, torch.float32, 0.5)
    finally:
        cpu_sparse.clear_crossover_cache()
    (ops,) = timed
    assert "actsparse_kernels::sparse_linear_cpu" in ops
    assert "actsparse::sparse_linear" not in ops  # no custom-op layers in the timing


@pytest.mark.parametrize("kernel", ["dense", "auto"])
def test_a_layer_at_threshold_zero_runs_without_a_hook(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # auto gives such a layer no kernel even where the kernel measured faster: it has
    # nothing to skip
    monkeypatch.setattr(cpu_sparse, "measure_crossover", lambda *args, **kwargs: 64)
    model, sparsifier = _squashed(kernel, level=0.0)
    assert all(r.threshold <= 0 for r in sparsifier.thresholds.values())
    assert set(sparsifier.kernels.values()) == {"dense"}
    for layer in (model[0], model[2]):
        assert not layer._forward_pre_hooks
        assert "forward" not in layer.__dict__
    sparsifier.retarget({"0": 0.5})  # a threshold above 0 brings the hook back
    assert model[0]._forward_pre_hooks or "forward" in model[0].__dict__
    assert not model[2]._forward_pre_hooks
    assert "forward" not in model[2].__dict__
