"""The seed workflow: the small CNN that torch.ao's tests use, calibrated end to end.

:func:`seed_sparsifier` registers the seed's layers on :class:`SeedCNN`;
:func:`run_seed_workflow` does that, calibrates them on random data, steps
and squashes. The tests and the benchmarks build on both; no actsparse
distribution ships them. It needs the built-in strategies (``pip install
actsparse-masks``).

``tests/`` is on pytest's ``sys.path`` (``from _seed import SeedCNN``); the
scripts in ``bench/`` put it there themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.hooks import ActivationSparsifier

__all__ = ["SeedCNN", "mask_sparsity", "run_seed_workflow", "seed_sparsifier"]


class SeedCNN(nn.Module):
    """The seed CNN.

    conv 1->32 k3, conv 32->32 k3, identity, maxpool 2, linear 4608->128,
    identity, linear 128->10; inputs of shape (N, 1, 28, 28).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=3)
        self.identity1 = nn.Identity()
        self.max_pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.linear1 = nn.Linear(4608, 128)
        self.identity2 = nn.Identity()
        self.linear2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.max_pool1(self.identity1(self.conv2(self.conv1(x))))
        out = out.reshape(x.shape[0], -1)
        out = F.relu(self.identity2(self.linear1(out)))
        logits: torch.Tensor = self.linear2(out)
        return logits


def mask_sparsity(mask: torch.Tensor | list[torch.Tensor]) -> float:
    """The fraction of zeros in a mask (or in all of a feature list's masks)."""
    masks = mask if isinstance(mask, list) else [mask]
    zeros = sum(int((m == 0).sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    return zeros / total if total else 0.0


def seed_sparsifier(model: SeedCNN) -> ActivationSparsifier:
    """A sparsifier with the seed's functions and its four registrations on ``model``.

    Whole inputs of conv1 (sparsity 0.3) and identity1 (0.7), features
    ``[0, 10, 234]`` of linear1's input and ``[0, 10, 20]`` of identity2's.
    """
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model.conv1, sparsity_level=0.3)
    sparsifier.register_layer(model.linear1, features=[0, 10, 234], feature_dim=1)
    sparsifier.register_layer(model.identity1, sparsity_level=0.7)
    sparsifier.register_layer(model.identity2, features=[0, 10, 20], feature_dim=1)
    return sparsifier


def run_seed_workflow(
    *, batches: int = 4, batch_size: int = 16, seed: int = 0
) -> tuple[SeedCNN, ActivationSparsifier]:
    """Register the seed's layers, calibrate on random batches, step and squash."""
    torch.manual_seed(seed)
    model = SeedCNN().eval()
    sparsifier = seed_sparsifier(model)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 1, 28, 28))
    sparsifier.step()
    sparsifier.squash_mask()
    return model, sparsifier
