"""Choosing the kernel that computes each squashed threshold-mode layer.

``squash_mask(kernel=...)`` and ``set_kernel()`` name a registered kernel
(``actsparse_kernels``) or ``"auto"``. A name forces that kernel on every
threshold-mode layer, and a layer it cannot compute, or a machine that
cannot run it, is an error before anything changes. ``"auto"`` gives each
layer the registered kernel that supports it and measured the largest
crossover (the most tokens up to which it beats the dense layer at the
layer's expected sparsity); inputs of more tokens take the dense path. The
choice is never saved: it belongs to the machine.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from actsparse.core import ConfigError, KernelStrategy, get_registry
from actsparse.hooks._layer import Layer
from actsparse.hooks._modes import MaskingMode
from actsparse.hooks._threshold import KernelPlan, KernelThreshold, Threshold

__all__ = ["AUTO", "DENSE", "KernelWarning", "kernel_modes"]

#: Pick per call the fastest kernel that supports it.
AUTO = "auto"
#: The runtime's own path: zero with hardshrink in a pre-hook, then the layer.
DENSE = "dense"


class KernelWarning(UserWarning):
    """A kernel that would fit a layer cannot run on this machine; the dense path runs."""


def _dense(mode: Threshold) -> Threshold:
    return mode.dense() if isinstance(mode, KernelThreshold) else mode


def _auto(name: str, layer: Layer, mode: Threshold, kernels: list[KernelStrategy]) -> Threshold:
    best: tuple[KernelStrategy, int] | None = None
    result = mode.threshold
    if result is None:
        return mode
    for kernel in kernels:
        if kernel.supports(layer.module) is not None:
            continue
        missing = kernel.unavailable()
        if missing is not None:
            warnings.warn(
                f"kernel {kernel.name!r} could compute layer {name!r} but cannot run here "
                f"({missing}); the layer runs dense",
                KernelWarning,
                stacklevel=4,
            )
            continue
        crossover = kernel.crossover
        if crossover is None:  # pragma: no cover - the caller keeps only kernels with one
            continue
        limit = int(crossover(layer.module, result.expected_sparsity))
        if limit > 0 and (best is None or limit > best[1]):
            best = (kernel, limit)
    if best is None:
        return mode
    return KernelThreshold.of(mode, KernelPlan(best[0], best[1]))


def kernel_modes(layers: Mapping[str, Layer], kernel: object) -> dict[str, MaskingMode]:
    """The masking mode of every threshold-mode layer for ``kernel``; changes nothing.

    Raises:
        ConfigError: ``kernel`` is not a string, the kernel cannot run on this
            machine, or it cannot compute one of the layers (named).
        UnknownStrategyError: No kernel has that name.
    """
    if not isinstance(kernel, str):
        raise ConfigError(f"kernel must be a kernel name or 'auto', got {kernel!r}")
    targets = {
        name: _dense(layer.mode)
        for name, layer in layers.items()
        if isinstance(layer.mode, Threshold)
    }
    registry = get_registry()
    if kernel == AUTO:
        kernels = [
            entry.record
            for entry in registry.entries("kernel")
            if entry.record.apply is not None and entry.record.crossover is not None
        ]
        return {name: _auto(name, layers[name], mode, kernels) for name, mode in targets.items()}
    record: KernelStrategy = registry.get("kernel", kernel)
    if record.apply is None:
        return dict(targets)
    missing = record.unavailable()
    if missing is not None:
        raise ConfigError(f"kernel {kernel!r} cannot run on this machine: {missing}")
    for name in targets:
        reason = record.supports(layers[name].module)
        if reason is not None:
            raise ConfigError(f"layer {name!r}: kernel {kernel!r} cannot compute it: {reason}")
    return {name: KernelThreshold.of(mode, KernelPlan(record)) for name, mode in targets.items()}
