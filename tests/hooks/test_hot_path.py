"""The hooks' hot path, observed at the aten level.

After the first call, a hook must run the same few operators whatever the
number of selected features (no Python loop over features), create no tensor
from Python data or factories (index tensors and masks are built once) and
never read a value back to the host (no ``.item()``-style sync).
"""

from __future__ import annotations

import pytest
import torch
from _support import Recorder
from torch import nn

from actsparse.hooks import ActivationSparsifier

#: operators that build a tensor from nothing or read one back to the host
FORBIDDEN = (
    "aten.lift_fresh",
    "aten.scalar_tensor",
    "aten.ones",
    "aten.zeros.",
    "aten.full.",
    "aten.empty.memory_format",
    "aten.arange",
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.is_nonzero",
)


def hook_ops(phase: str, n_features: int, aggregate: str = "sum") -> list[str]:
    """The aten operators that one hooked call of an nn.Identity runs, after warm-up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity())
    sparsifier = ActivationSparsifier(
        model, aggregate_fn=aggregate, reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0], features=[3 * i for i in range(n_features)], feature_dim=1)
    x = torch.randn(4, 3 * n_features)
    with torch.no_grad():
        model(x)
        model(x)
        if phase == "sparsify":
            sparsifier.step()
            sparsifier.squash_mask()
            model(x)
        recorder = Recorder()
        with recorder:
            model(x)
    return recorder.ops


@pytest.mark.parametrize("phase", ["aggregate", "sparsify"])
def test_hook_ops_do_not_depend_on_the_number_of_features(phase: str) -> None:
    few = hook_ops(phase, 3)
    many = hook_ops(phase, 300)
    assert few == many
    assert 0 < len(few) <= 4, few  # e.g. index_select + add, or one mul


@pytest.mark.parametrize("phase", ["aggregate", "sparsify"])
def test_hooks_build_no_tensors_and_never_sync(phase: str) -> None:
    ops = hook_ops(phase, 50)
    bad = [op for op in ops if op.startswith(FORBIDDEN)]
    assert not bad, ops


def test_the_recorder_sees_a_per_feature_loop() -> None:
    """A plain callable aggregate loops per feature: the check above can fail."""

    def add(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return left + right

    assert len(hook_ops("aggregate", 30, aggregate=add)) > len(  # type: ignore[arg-type]
        hook_ops("aggregate", 3, aggregate=add)  # type: ignore[arg-type]
    )
