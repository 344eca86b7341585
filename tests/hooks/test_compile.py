"""torch.compile over hooked models: no graph breaks, the same results as eager.

torch.ao's hooks break the graph (4 breaks on the seed CNN); ours must not,
while calibrating and after ``squash_mask()``. Compilation is slow, so the
models are small and each test compiles once.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from _seed import SeedCNN, seed_sparsifier


def add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return left + right


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=0)


def nonzero_mask(data: torch.Tensor) -> torch.Tensor:
    return (data != 0).to(data.dtype)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


def test_calibration_hooks_compile_without_graph_breaks_and_match_eager() -> None:
    torch.manual_seed(0)
    eager_model = SeedCNN().eval()
    compiled_model = copy.deepcopy(eager_model)
    eager = seed_sparsifier(eager_model)
    compiled = seed_sparsifier(compiled_model)
    batches = [torch.randn(2, 1, 28, 28) for _ in range(3)]

    explanation = torch._dynamo.explain(compiled_model)(batches[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # explain() ran the hooks once: start the compiled side afresh
    compiled = seed_sparsifier(compiled_model)

    run = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for x in batches:
            torch.testing.assert_close(run(x), eager_model(x))
    for name, group in eager.data_groups.items():
        expected = group["data"]
        got = compiled.data_groups[name]["data"]
        if isinstance(expected, list):
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e)
        else:
            torch.testing.assert_close(got, expected)
    eager.step()
    compiled.step()
    for name in eager.data_groups:
        expected_mask = eager.get_mask(name)
        got_mask = compiled.get_mask(name)
        if isinstance(expected_mask, list):
            for g, e in zip(got_mask, expected_mask, strict=True):
                assert torch.equal(g, e)
        else:
            assert torch.equal(got_mask, expected_mask)


@pytest.mark.slow
def test_squashed_model_compiles_without_graph_breaks_and_matches_eager() -> None:
    torch.manual_seed(1)
    model = SeedCNN().eval()
    sparsifier = seed_sparsifier(model)
    with torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    sparsifier.step()
    sparsifier.squash_mask()
    x = torch.randn(3, 1, 28, 28)

    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    # inductor, the default backend, generates and runs real kernels
    run = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(run(x), expected, rtol=1e-4, atol=1e-5)
        y = torch.randn(3, 1, 28, 28)
        torch.testing.assert_close(run(y), model(y), rtol=1e-4, atol=1e-5)


def test_explain_counts_the_graph_breaks_of_torch_ao_hooks() -> None:
    """The check above can fail: torch.ao's feature loop breaks the graph."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.pruning._experimental.activation_sparsifier.activation_sparsifier import (
            ActivationSparsifier as TorchAOSparsifier,
        )
    model = SeedCNN().eval()
    sparsifier = TorchAOSparsifier(
        model, aggregate_fn=add, reduce_fn=batch_mean, mask_fn=nonzero_mask
    )
    sparsifier.register_layer(model.linear1, features=[0, 10, 234], feature_dim=1)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 1, 28, 28))
    assert explanation.graph_break_count > 0
