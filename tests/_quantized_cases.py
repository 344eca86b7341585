"""What the tests of the quantized kernels (cpu_sparse_int8, cpu_sparse_int4) share.

Each kernel's folder runs the same checks on its own format: the op against
``F.linear`` on the dequantized weight (every path of the compiled operator),
the layer's life through the sparsifier (what ``weight``, ``state_dict()``
and ``load_state_dict()`` give while the kernel holds it, what ``dense``
gets back), and the memory a Llama-7B-shaped layer takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _kernel_cases import add_specials, assert_close_to_reference, error_bound, threshold_for
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError, KernelStrategy
from actsparse.hooks import ActivationSparsifier, sparsify
from actsparse.kernels._common.crossover import num_threads
from actsparse.kernels._common.quantized import (
    QuantizedFormat,
    QuantizedWeights,
    quantized_weights,
)

#: the compiled operator's paths: picked by the kept entries, vector, scalar, matmul
PATHS = (0, 1, 2, 3)

#: ``run(x, weights, bias, threshold, path) -> y``: one kernel's compiled operator
Compiled = Callable[[torch.Tensor, QuantizedWeights, "torch.Tensor | None", float, int], Any]


@st.composite
def op_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "in_features": draw(st.integers(1, 160)),
        "out_features": draw(st.integers(1, 150)),
        "lead": tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))),
        "sparsity": draw(st.sampled_from([0.0, 0.4, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        "specials": draw(st.sampled_from([(), (float("nan"),), (float("inf"), float("-inf"))])),
        "bias": draw(st.booleans()),
        "path": draw(st.sampled_from(PATHS)),
        "scale": draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_op_case(
    fmt: QuantizedFormat, kernel: KernelStrategy, compiled: Compiled, case: dict[str, Any]
) -> None:
    """One case: the compiled operator on ``fmt``'s weights against the dense reference."""
    generator = torch.Generator().manual_seed(case["seed"])
    n_in, n_out = case["in_features"], case["out_features"]
    weight = torch.randn(n_out, n_in, generator=generator) * case["scale"]
    bias = torch.randn(n_out, generator=generator) if case["bias"] else None
    x = torch.randn(*case["lead"], n_in, generator=generator)
    threshold = threshold_for(x, case["sparsity"])
    add_specials(x, generator, case["specials"])
    weights = fmt.quantize(weight)
    dequantized = fmt.dequantize(weights)
    y = compiled(x, weights, bias, threshold, case["path"])
    ref = F.linear(F.hardshrink(x, threshold), dequantized, bias)
    bound = error_bound(x, dequantized.T, bias, threshold, kernel.tolerance)
    assert_close_to_reference(y, ref, bound)
    # the public op (path 0 behind the custom op) agrees as well
    public = fmt.op(
        x, weights.qweight, weights.scales, weights.zeros, bias, threshold, weights.out_features
    )
    assert_close_to_reference(public, ref, bound)


def check_threads_split_the_columns(
    fmt: QuantizedFormat, kernel: KernelStrategy, compiled: Compiled
) -> None:
    """At two threads the output columns are cut in chunks: every path still matches."""
    for tokens, n_out in ((1, 700), (3, 193), (12, 450)):
        case = {
            "in_features": 300,
            "out_features": n_out,
            "lead": (tokens,),
            "sparsity": 0.5,
            "specials": (float("nan"),),
            "bias": True,
            "scale": 0.05,
            "seed": tokens,
        }
        with num_threads(2):
            for path in PATHS:
                check_op_case(fmt, kernel, compiled, {**case, "path": path})


def calibrated(seed: int = 0) -> tuple[nn.Sequential, ActivationSparsifier]:
    """Two float32 linear layers in threshold mode at 50%, stepped (not squashed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(40, 70), nn.ReLU(), nn.Linear(70, 33)).eval()
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 40))
    sparsifier.step()
    return model, sparsifier


def check_lifecycle(fmt: QuantizedFormat, name: str) -> None:
    """squash_mask(kernel=name) through state dicts and back to dense."""
    model, sparsifier = calibrated()
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    sparsifier.squash_mask(kernel=name)
    x = torch.randn(3, 40)
    layers = [model[0], model[2]]
    held = [quantized_weights(layer) for layer in layers]
    assert all(h is not None for h in held)
    # the float weights are gone: each parameter holds one NaN
    for layer in layers:
        assert layer.weight.untyped_storage().nbytes() == 4
        assert tuple(layer.weight.shape) == (layer.out_features, layer.in_features)
        assert bool(layer.weight.isnan().all())
    with torch.no_grad():
        fast = model(x)
    # state_dict(): the dequantized weights, under the usual keys
    state = model.state_dict()
    for index, layer_held in zip(("0", "2"), held, strict=True):
        assert layer_held is not None
        assert torch.equal(state[f"{index}.weight"], fmt.dequantize(layer_held))
        assert not torch.equal(state[f"{index}.weight"], originals[f"{index}.weight"])
    # which load into an ordinary float model that computes the same thing densely
    twin, twin_sparsifier = calibrated()
    twin.load_state_dict(state)
    twin_sparsifier.load_state_dict(sparsifier.state_dict())  # squashed, dense kernel
    with torch.no_grad():
        torch.testing.assert_close(twin(x), fast, rtol=1e-4, atol=1e-5)
    # loading into the quantized model quantizes what it loads
    model.load_state_dict(originals)
    for layer, before in zip(layers, held, strict=True):
        after = quantized_weights(layer)
        assert after is before  # the same storage the kernel reads, overwritten
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast, rtol=1e-4, atol=1e-5)
    # setting the kernel again keeps the same quantized values (the quantizer is idempotent)
    dequantized = [fmt.dequantize(h) for h in held if h is not None]
    sparsifier.set_kernel(name)
    for layer, values in zip(layers, dequantized, strict=True):
        again = quantized_weights(layer)
        assert again is not None
        assert torch.equal(fmt.dequantize(again), values)
    # dense afterwards: the dequantized weights, as ordinary parameters
    sparsifier.set_kernel("dense")
    for layer, values in zip(layers, dequantized, strict=True):
        assert quantized_weights(layer) is None
        assert torch.equal(layer.weight.detach(), values)
        assert layer.weight.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast, rtol=1e-4, atol=1e-5)


def check_auto_never_picks(name: str) -> None:
    model, sparsifier = calibrated()
    sparsifier.squash_mask(kernel="auto")
    for layer in (model[0], model[2]):
        assert quantized_weights(layer) is None
        assert layer.weight.untyped_storage().nbytes() >= 4 * layer.weight.numel()
    sparsifier.set_kernel(name)
    assert quantized_weights(model[0]) is not None


def check_sparsify(name: str) -> None:
    """sparsify(..., kernel=name) leaves the layers quantized; dense gets them back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 70), nn.Tanh(), nn.Linear(70, 33)).eval()
    batches = [torch.randn(8, 40) for _ in range(3)]
    sparsifier = sparsify(model, batches, target=0.4, layers={nn.Linear: {}}, kernel=name)
    x = torch.randn(2, 40)
    assert all(quantized_weights(layer) is not None for layer in (model[0], model[2]))
    with torch.no_grad():
        fast = model(x)
    sparsifier.set_kernel("dense")
    assert all(quantized_weights(layer) is None for layer in (model[0], model[2]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast, rtol=1e-4, atol=1e-5)


def check_nan_refused(name: str) -> None:
    """A weight holding NaN is refused by name before any layer is quantized."""
    model, sparsifier = calibrated()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"layer '2'.*NaN or inf"):
        sparsifier.squash_mask(kernel=name)
    assert quantized_weights(model[0]) is None
    assert model[0].weight.untyped_storage().nbytes() == 4 * model[0].weight.numel()


def llama_layer_bytes(name: str) -> tuple[float, int]:
    """A 4096 x 11008 float32 layer under the kernel: (bytes per weight kept, float bytes
    left in the layer's weight parameter)."""
    torch.manual_seed(0)
    layer = nn.Linear(4096, 11008, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    model = nn.Sequential(layer)
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layer(layer, sparsity_level=0.5)
    with torch.no_grad():
        model(torch.randn(4, 4096))
    sparsifier.step()
    sparsifier.squash_mask(kernel=name)
    held = quantized_weights(layer)
    assert held is not None
    return held.nbytes / layer.weight.numel(), layer.weight.untyped_storage().nbytes()
