"""The kernel contract: every registered kernel, on every device here, in every dtype.

A kernel gets these tests by being registered (``actsparse_kernels``). For
each kernel that computes layers itself (``apply``), the candidate layers are
``nn.Linear`` (with and without bias) and ``nn.Conv1d`` on every device torch
sees, in float64, float32, bfloat16 and float16. A candidate the kernel's
``supports`` accepts must give the dense layer's outputs on the layer's
weights as ``apply`` leaves them, within the bound of ``_kernel_cases``
(plus the declared ``tolerance`` of a lossy kernel; an exact kernel must
leave the weights' values alone; the reference weights of a kernel with a
``release`` are those it writes back): for shapes ``(*, in_features)`` including
no tokens, contiguous, transposed and strided inputs, sparsity from 0 to
100%, NaN and inf entries, eagerly and under ``torch.compile(fullgraph=True)``.
A candidate it refuses must be refused by name, with nothing changed. A
kernel that cannot run on this machine must say so, and its numeric tests
skip with the reason.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, NamedTuple

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _kernel_cases import (
    UNIT_ROUNDOFF,
    add_specials,
    assert_close_to_reference,
    check_kernel,
    error_bound,
    give_back,
    make_x,
    reference,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError, KernelStrategy, get_registry
from actsparse.hooks import ActivationSparsifier, KernelWarning

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu", *(("cuda",) if torch.cuda.is_available() else ()))
IN_FEATURES, OUT_FEATURES = 24, 10


def kernels() -> list[KernelStrategy]:
    """Every registered kernel that computes layers itself."""
    return [e.record for e in get_registry().entries("kernel") if e.record.apply is not None]


class Candidate(NamedTuple):
    kind: str  # "linear", "linear_nobias" or "conv"
    device: str
    dtype: torch.dtype

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "conv":
            module: nn.Module = nn.Conv1d(IN_FEATURES, OUT_FEATURES, 1)
        else:
            module = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=self.kind == "linear")
        return module.to(device=self.device, dtype=self.dtype)

    def sample(self, tokens: int) -> torch.Tensor:
        """An input of ``tokens`` rows for the candidate (a length-1 signal for a conv)."""
        x = torch.randn(tokens, IN_FEATURES)
        if self.kind == "conv":
            x = x[..., None]
        return x.to(device=self.device, dtype=self.dtype)

    def __str__(self) -> str:
        return f"{self.kind}-{self.device}-{str(self.dtype).removeprefix('torch.')}"


CANDIDATES = [
    Candidate(kind, device, dtype)
    for kind in ("linear", "linear_nobias", "conv")
    for device in DEVICES
    for dtype in DTYPES
]


def _pairs(supported: bool) -> list[Any]:
    out = []
    for kernel in kernels():
        for candidate in CANDIDATES:
            if (kernel.supports(candidate.build()) is None) is supported:
                out.append(pytest.param(kernel, candidate, id=f"{kernel.name}-{candidate}"))
    return out


SUPPORTED = _pairs(True)
REFUSED = _pairs(False)


def _runnable(kernel: KernelStrategy) -> None:
    missing = kernel.unavailable()
    if missing is not None:
        pytest.skip(f"kernel {kernel.name!r} cannot run here: {missing}")


# ------------------------------------------------------------------ numerics


@st.composite
def inputs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "lead": tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
        "sparsity": draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        "specials": draw(
            st.sampled_from(
                [(), (float("nan"),), (float("inf"), float("-inf")), (float("nan"), float("inf"))]
            )
        ),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=inputs())
def test_outputs_match_the_dense_layer_within_the_declared_bound(
    kernel: KernelStrategy, candidate: Candidate, case: dict[str, Any]
) -> None:
    _runnable(kernel)
    generator = torch.Generator().manual_seed(case["seed"])
    x = make_x(generator, case["lead"], IN_FEATURES, candidate.dtype, case["layout"])
    magnitudes = x.abs().double().flatten()
    threshold = (
        float(torch.quantile(magnitudes, case["sparsity"]))
        if case["sparsity"] > 0 and x.numel()
        else 0.0
    )
    add_specials(x, generator, case["specials"])
    check_kernel(kernel, candidate.build(case["seed"] % 7), x.to(candidate.device), threshold)


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_no_tokens_every_input_zeroed_and_every_input_kept(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    _runnable(kernel)
    device, dtype = candidate.device, candidate.dtype
    for shape in ((0, IN_FEATURES), (2, 0, IN_FEATURES), (IN_FEATURES,), (1, IN_FEATURES)):
        x = torch.randn(shape).to(device=device, dtype=dtype)
        for threshold in (0.0, 0.5, float("inf")):
            check_kernel(kernel, candidate.build(), x, threshold)
    # all zeroed: the bias alone
    module = candidate.build()
    fn = kernel.apply(module, 1.0)  # type: ignore[misc]
    with torch.no_grad():
        y = fn(torch.full((3, IN_FEATURES), 0.5, device=device, dtype=dtype))
    expected = torch.zeros(3, OUT_FEATURES, dtype=dtype, device=device)
    if isinstance(module, nn.Linear) and module.bias is not None:
        expected = expected + module.bias.detach()
    assert torch.equal(y, expected)


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_input_gradients_match_the_dense_layer(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    _runnable(kernel)
    module = candidate.build()
    fn = kernel.apply(module, 0.4)  # type: ignore[misc]
    x = torch.randn(3, IN_FEATURES).to(device=candidate.device, dtype=candidate.dtype)
    x.requires_grad_()
    grad = torch.randn(3, OUT_FEATURES).to(device=candidate.device, dtype=candidate.dtype)
    fn(x).backward(grad)
    give_back(kernel, module)
    assert isinstance(module, nn.Linear)
    expected = torch.ops.aten.hardshrink_backward(
        grad.cpu() @ module.weight.detach().cpu(), x.detach().cpu(), 0.4
    )
    assert x.grad is not None
    bound = error_bound(grad, module.weight.detach(), None, 0.0)
    assert_close_to_reference(x.grad, expected, bound)


class _Wrapped(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(torch.relu(x) - 0.1))


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_a_squashed_layer_compiles_in_one_graph(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    _runnable(kernel)
    model = _Wrapped(candidate.build()).eval()
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layer(model.layer, sparsity_level=0.5)
    device, dtype = candidate.device, candidate.dtype
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, IN_FEATURES).to(device=device, dtype=dtype))
    sparsifier.step()
    sparsifier.squash_mask(kernel=kernel.name)
    torch._dynamo.reset()
    x = torch.randn(2, 3, IN_FEATURES).to(device=device, dtype=dtype)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(run(x), model(x))
    torch._dynamo.reset()


# ------------------------------------------------------------------ through the sparsifier


def _squashed(candidate: Candidate) -> tuple[nn.Module, ActivationSparsifier]:
    model = nn.Sequential(candidate.build(), nn.ReLU()).eval()
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layer(model[0], sparsity_level=0.5)
    with torch.no_grad():
        for _ in range(3):
            model(candidate.sample(8))
    sparsifier.step()
    sparsifier.squash_mask()
    return model, sparsifier


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_a_forced_kernel_gives_what_dense_gives_on_the_same_weights(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    _runnable(kernel)
    model, sparsifier = _squashed(candidate)
    x = torch.randn(5, IN_FEATURES).to(device=candidate.device, dtype=candidate.dtype)
    sparsifier.set_kernel(kernel.name)
    with torch.no_grad():
        fast = model(x)
    sparsifier.set_kernel("dense")  # on the weights as the kernel left them
    with torch.no_grad():
        dense = model(x)
    layer = model[0]
    threshold = sparsifier.thresholds["0"].threshold
    bias = None if layer.bias is None else layer.bias.detach()
    bound = error_bound(x, layer.weight.detach().T, bias, threshold, kernel.tolerance)
    assert_close_to_reference(fast, dense, bound)


@pytest.mark.parametrize(("kernel", "candidate"), REFUSED)
def test_a_layer_the_kernel_cannot_compute_is_refused_by_name(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    model, sparsifier = _squashed(candidate)
    before = copy.deepcopy(model.state_dict())
    x = candidate.sample(4)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(ConfigError, match=f"kernel {kernel.name!r}") as info:
        sparsifier.set_kernel(kernel.name)
    assert "cannot" in str(info.value)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize("kernel", kernels(), ids=lambda k: k.name)
def test_the_declaration_is_complete(kernel: KernelStrategy) -> None:
    assert kernel.description, f"kernel {kernel.name!r} has no description"
    assert kernel.exact is (kernel.tolerance is None)
    missing = kernel.unavailable()
    assert missing is None or (isinstance(missing, str) and missing)
    for candidate in CANDIDATES:
        reason = kernel.supports(candidate.build())
        assert reason is None or (isinstance(reason, str) and reason), (candidate, reason)


@pytest.mark.parametrize("kernel", kernels(), ids=lambda k: k.name)
def test_a_kernel_that_cannot_run_here_says_so_and_auto_runs_dense(
    kernel: KernelStrategy,
) -> None:
    missing = kernel.unavailable()
    if missing is None:
        pytest.skip(f"kernel {kernel.name!r} runs here")
    candidates = [c for c in CANDIDATES if kernel.supports(c.build()) is None]
    _, sparsifier = _squashed(candidates[0] if candidates else CANDIDATES[0])
    with pytest.raises(ConfigError, match="cannot run on this machine"):
        sparsifier.set_kernel(kernel.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelWarning)
        sparsifier.set_kernel("auto")


# ------------------------------------------------------------------ the layer's live parameters


def _kernel_model(kernel: KernelStrategy, candidate: Candidate) -> tuple[nn.Module, float]:
    _runnable(kernel)
    if not kernel.exact:
        pytest.skip("a lossy kernel computes with the weights it prepared")
    model, sparsifier = _squashed(candidate)
    sparsifier.set_kernel(kernel.name)
    return model, sparsifier.thresholds["0"].threshold


def _dense_of(model: nn.Module, x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.relu(reference(model[0], x, threshold)).to(x.device)


def _assert_dense(
    kernel: KernelStrategy, model: nn.Module, x: torch.Tensor, threshold: float
) -> None:
    layer = model[0]
    with torch.no_grad():
        y = model(x)
    bias = None if layer.bias is None else layer.bias.detach()
    bound = error_bound(x, layer.weight.detach().T, bias, threshold, kernel.tolerance)
    assert_close_to_reference(y, _dense_of(model, x, threshold), bound)


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_the_kernel_computes_with_the_layers_current_weights(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    from actsparse.kernels import to_output_major

    model, threshold = _kernel_model(kernel, candidate)
    layer = model[0]
    x = candidate.sample(3)
    _assert_dense(kernel, model, x, threshold)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # edited in place
    _assert_dense(kernel, model, x, threshold)
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))  # replaced
    _assert_dense(kernel, model, x, threshold)
    fresh = candidate.build(seed=5).state_dict()
    model.load_state_dict({f"0.{k}": v for k, v in fresh.items()}, assign=True)
    _assert_dense(kernel, model, x, threshold)
    to_output_major(layer)  # stored output-major again, then edited
    with torch.no_grad():
        layer.weight.add_(1.0)
    _assert_dense(kernel, model, x, threshold)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.add_(3.0)
        _assert_dense(kernel, model, x, threshold)


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_gradients_reach_the_layers_weight_and_bias(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    model, threshold = _kernel_model(kernel, candidate)
    layer = model[0]
    x = candidate.sample(4)
    model(x).sum().backward()
    assert layer.weight.grad is not None, "no weight gradient under the kernel"
    grads = [layer.weight.grad.clone()]
    if layer.bias is not None:
        assert layer.bias.grad is not None, "no bias gradient under the kernel"
        grads.append(layer.bias.grad.clone())
    twin = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=layer.bias is not None)
    twin = twin.to(device=candidate.device, dtype=candidate.dtype)
    twin.load_state_dict(layer.state_dict())
    torch.relu(twin(F.hardshrink(x, threshold))).sum().backward()
    expected = [twin.weight.grad] + ([twin.bias.grad] if twin.bias is not None else [])
    for ours, theirs in zip(grads, expected, strict=True):
        assert theirs is not None
        scale = float(theirs.abs().max()) + 1.0
        torch.testing.assert_close(
            ours.double(),
            theirs.double(),
            atol=8 * UNIT_ROUNDOFF[candidate.dtype] * scale,
            rtol=0,
        )


@pytest.mark.parametrize(("kernel", "candidate"), SUPPORTED)
def test_the_kernel_follows_the_layer_to_another_dtype(
    kernel: KernelStrategy, candidate: Candidate
) -> None:
    model, threshold = _kernel_model(kernel, candidate)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        model.to(dtype)
        x = candidate.sample(2).to(dtype)
        _assert_dense(kernel, model, x, threshold)
