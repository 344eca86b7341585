"""Streaming aggregates under torch.compile: their per-shape plan cache breaks no graph."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from actsparse.hooks import ActivationSparsifier


@pytest.mark.parametrize("aggregate", ["abs_mean", "abs_max"])
def test_streaming_calibration_compiles_without_graph_breaks(aggregate: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    twin, probe = copy.deepcopy(model), copy.deepcopy(model)

    def attach(m: nn.Module) -> ActivationSparsifier:
        s = ActivationSparsifier(m, aggregate, "identity", "magnitude", sparsity_level=0.5)
        s.register_layer(m[2], features=[0, 5, 9], feature_dim=-1)
        s.register_layer(m[0])
        return s

    attach(probe)
    explanation = torch._dynamo.explain(probe)(torch.randn(4, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager, compiled = attach(twin), attach(model)
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        for batch in (torch.randn(4, 16), torch.randn(1, 16), torch.randn(4, 16)):
            torch.testing.assert_close(run(batch), twin(batch))
    for name in ("0", "2"):
        got, expected = compiled.data_groups[name]["data"], eager.data_groups[name]["data"]
        for g, e in zip(
            got if isinstance(got, list) else [got],
            expected if isinstance(expected, list) else [expected],
            strict=True,
        ):
            torch.testing.assert_close(g, e)
