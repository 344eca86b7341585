"""The seed workflow: the small CNN that torch.ao's tests use, calibrated end to end.

``python -m actsparse.hooks`` runs :func:`run_seed_workflow` on random data
and prints each layer's mask shape and sparsity. It needs the built-in
strategies (``pip install actsparse-masks``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.hooks._sparsifier import ActivationSparsifier

__all__ = ["SeedCNN", "main", "mask_sparsity", "run_seed_workflow"]


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


def run_seed_workflow(
    *, batches: int = 4, batch_size: int = 16, seed: int = 0
) -> tuple[SeedCNN, ActivationSparsifier]:
    """Register the seed's layers, calibrate on random batches, step and squash."""
    torch.manual_seed(seed)
    model = SeedCNN().eval()
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model.conv1, sparsity_level=0.3)
    sparsifier.register_layer(model.linear1, features=[0, 10, 234], feature_dim=1)
    sparsifier.register_layer(model.identity1, sparsity_level=0.7)
    sparsifier.register_layer(model.identity2, features=[0, 10, 20], feature_dim=1)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 1, 28, 28))
    sparsifier.step()
    sparsifier.squash_mask()
    return model, sparsifier


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m actsparse.hooks",
        description="Run the seed workflow on the seed CNN with random data.",
    )
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, sparsifier = run_seed_workflow(
        batches=args.batches, batch_size=args.batch_size, seed=args.seed
    )
    print(f"{'layer':<12} {'hook_state':<10} {'mask shape':<28} {'sparsity':>8}")
    for name, group in sparsifier.data_groups.items():
        mask = sparsifier.get_mask(name)
        shape = (
            "[" + ", ".join(str(tuple(m.shape)) for m in mask) + "]"
            if isinstance(mask, list)
            else str(tuple(mask.shape))
        )
        print(f"{name:<12} {group['hook_state']:<10} {shape:<28} {mask_sparsity(mask):>8.3f}")
    with torch.no_grad():
        out = model(torch.randn(args.batch_size, 1, 28, 28))
    print(f"masked forward pass: output {tuple(out.shape)}")
    return 0
