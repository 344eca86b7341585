"""The built-in ``cpu_sparse`` kernel behind the sparsifier: same outputs, one copy of weights."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import cpu_kernel_status

pytestmark = pytest.mark.skipif(
    not cpu_kernel_status().available, reason="the C++ kernel could not be built here"
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(48, 96, bias=False)
        self.up_proj = nn.Linear(48, 96, bias=False)
        self.down_proj = nn.Linear(96, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _calibrated(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ActivationSparsifier]:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).to(dtype).eval()
    s = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    s.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 48, dtype=dtype))
    s.step()
    return model, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_cpu_sparse_gives_the_dense_kernels_outputs(dtype: torch.dtype) -> None:
    model, s = _calibrated(dtype)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    s.squash_mask()
    x = torch.randn(3, 5, 48, dtype=dtype)
    with torch.no_grad():
        dense = model(x)
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    s.set_kernel("cpu_sparse")
    with torch.no_grad():
        sparse = model(x)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(sparse, dense, **tol)
    # one copy of every weight, the same values as before
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == storage
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert not model[0].gate_proj.weight.is_contiguous()  # stored input-major now


def test_auto_matches_dense_at_every_token_count() -> None:
    model, s = _calibrated()
    twin = copy.deepcopy(model)
    s.squash_mask(kernel="auto")
    reference = ActivationSparsifier(twin)
    reference.load_state_dict(s.state_dict())
    with torch.no_grad():
        for tokens in (1, 2, 7, 64):
            x = torch.randn(tokens, 48)
            torch.testing.assert_close(model(x), twin(x), atol=1e-5, rtol=1e-4)


def test_cpu_sparse_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    model, s = _calibrated()
    s.squash_mask(kernel="cpu_sparse")
    x = torch.randn(1, 48)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    run = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x))
