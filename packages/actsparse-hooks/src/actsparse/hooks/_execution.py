"""How squashed threshold-mode layers are computed: kernel plans, kernel modes and ``auto``.

Everything about choosing and running kernels lives here. ``squash_mask(kernel=...)``,
``set_kernel()``, ``sparsify(kernel=...)`` and the command line's ``--kernel``
name a registered kernel (``actsparse_kernels``) or ``"auto"``, checked by
:func:`check_kernel_name`. A name forces that kernel on every threshold-mode
layer, and a layer it cannot compute, or a machine that cannot run it, is an
error before anything changes. ``"auto"`` gives each layer the registered
*exact* kernel (``KernelStrategy.tolerance`` is None) that supports it and
measured the largest crossover (the most tokens up to which it beats the
dense layer at the layer's expected sparsity); inputs of more tokens take the
dense path. A lossy kernel runs only when it is named. The choice is never
saved: it belongs to the machine.

``dense``, the runtime's own kernel, is registered by actsparse-hooks; the
zero-skipping ones come with actsparse-kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch.nn import functional as F

from actsparse.core import (
    ActsparseWarning,
    ConfigError,
    KernelStrategy,
    MaskError,
    UnknownStrategyError,
    get_registry,
)
from actsparse.hooks._layer import Handle, Layer, MaskingMode
from actsparse.hooks._threshold import (
    Compensation,
    ForwardHandle,
    Threshold,
    ValidPositions,
    scored_zero,
)

__all__ = [
    "AUTO",
    "DENSE",
    "KernelPlan",
    "KernelThreshold",
    "KernelWarning",
    "ReleasingHandle",
    "check_kernel_name",
    "kernel_modes",
    "kernel_of",
]

#: Pick per layer the fastest exact kernel that supports it.
AUTO = "auto"
#: The runtime's own path: zero with hardshrink in a pre-hook, then the layer.
DENSE = "dense"


class KernelWarning(ActsparseWarning):
    """A kernel that would fit a layer cannot run on this machine; the dense path runs."""


def check_kernel_name(kernel: object) -> str:
    """``kernel`` if it is ``"auto"`` or a registered kernel's name.

    Raises:
        ConfigError: ``kernel`` is not a string.
        UnknownStrategyError: No kernel has that name; the message lists the
            known ones (lossy ones marked) and ``"auto"``, and names the
            distribution of a built-in kernel that is not installed.
    """
    if not isinstance(kernel, str):
        raise ConfigError(f"kernel must be a kernel name or 'auto', got {kernel!r}")
    if kernel == AUTO:
        return kernel
    try:
        get_registry().get("kernel", kernel)
    except UnknownStrategyError as exc:
        raise UnknownStrategyError(
            f"{exc} {AUTO!r} picks the fastest exact kernel for each layer."
        ) from None
    return kernel


@attrs.frozen
class KernelPlan:
    """Which kernel computes a squashed threshold-mode layer, and up to how many tokens.

    ``limit`` None: always the kernel (a kernel forced by name); an int: the
    kernel for inputs of at most that many tokens, the dense path above
    (``kernel="auto"``, from the crossover the kernel measured).
    """

    kernel: KernelStrategy
    limit: int | None = None


class KernelThreshold(Threshold):
    """The threshold applied by a registered kernel that computes the layer itself.

    Once squashed, the layer's ``forward`` is replaced by the kernel's
    function (``KernelStrategy.apply``), which zeroes ``|x| <= threshold`` and
    skips the work of the zeros; with a ``limit``, inputs of more tokens take
    the dense path (zero, then the layer's own forward) instead. Calibration,
    ``step()``, thresholds and state are those of :class:`Threshold`.
    """

    def __init__(self, valid: ValidPositions, plan: KernelPlan) -> None:
        super().__init__(valid)
        self.plan = plan

    @classmethod
    def of(cls, mode: Threshold, plan: KernelPlan) -> KernelThreshold:
        """``mode``'s threshold and statistics, applied by ``plan``'s kernel."""
        return mode.moved_to(lambda valid: cls(valid, plan))

    def dense(self) -> Threshold:
        """The same threshold and statistics, applied by the dense pre-hook."""
        return self.moved_to(Threshold)

    def sparsify(self, layer: Layer) -> Handle:
        result = self.threshold
        if result is None:
            raise MaskError(f"layer {layer.name!r} has no threshold: run step() first")
        module = layer.module
        threshold = result.threshold
        apply = self.plan.kernel.apply
        if apply is None:  # the runtime's own dense path
            return super().sparsify(layer)
        limit = self.plan.limit
        offset = self.offset
        compensation = None if offset is None else Compensation(layer, offset)
        own = (
            type(module).forward.__get__(module) if compensation is None else compensation.forward()
        )
        scored = scored_zero(layer, threshold)
        zero: Callable[[torch.Tensor], torch.Tensor]
        fast: Callable[[torch.Tensor], Any]
        if scored is None:
            fast = apply(module, threshold)

            def plain_zero(x: torch.Tensor) -> torch.Tensor:
                return F.hardshrink(x, threshold)

            zero = plain_zero
        else:
            # a weight-aware score: its zeros are made first, and the kernel skips them
            kernel_fast = apply(module, 0.0)
            zero = scored

            def scored_fast(x: torch.Tensor) -> Any:
                return kernel_fast(scored(x))

            fast = scored_fast
        if compensation is not None and offset is not None:
            added: Callable[[Any], Any] = compensation.added
            if not self.plan.kernel.exact:
                # a lossy kernel computes with its own weights: compensate with those
                kernel_shift = _kernel_shift(apply(module, 0.0), offset, module)

                def lossy_added(out: Any) -> Any:
                    return out + kernel_shift.to(device=out.device, dtype=out.dtype)

                added = lossy_added
            unshifted = fast

            def shifted_fast(x: torch.Tensor) -> Any:
                return added(unshifted(x))

            fast = shifted_fast

        if limit is None:

            def forward(*args: Any, **kwargs: Any) -> Any:
                if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                    layer.bad_input(args)
                return fast(args[0])

        else:

            def forward(*args: Any, **kwargs: Any) -> Any:
                if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
                    layer.bad_input(args)
                x = args[0]
                # a shape test: under torch.compile it is a guard, not a graph break
                if x.numel() <= limit * x.shape[-1]:
                    return fast(x)
                return own(zero(x))

        module.__dict__["forward"] = forward
        handle = ForwardHandle(module, forward)
        release = self.plan.kernel.release
        return handle if release is None else ReleasingHandle(handle, module, release)


class ReleasingHandle:
    """Detaches a kernel that keeps a module's weights its own way: restores the module's
    ``forward``, then calls the kernel's ``release(module)`` (once) to write the weights
    back as parameters."""

    def __init__(self, handle: Handle, module: Any, release: Callable[[Any], None]) -> None:
        self._handle = handle
        self._module = module
        self._release: Callable[[Any], None] | None = release

    def remove(self) -> None:
        self._handle.remove()
        release, self._release = self._release, None
        if release is not None:
            release(self._module)


def _kernel_shift(
    fn: Callable[[torch.Tensor], Any], offset: torch.Tensor, module: Any
) -> torch.Tensor:
    """What the zeroed values add to the output of a layer computed by ``fn`` (a kernel at
    threshold 0): ``fn(offset) - fn(0)``, in the dtype and on the device of the layer's
    weight."""
    weight = module.weight
    m = offset.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out: torch.Tensor = fn(m) - fn(torch.zeros_like(m))
    return out.detach()


def kernel_of(mode: MaskingMode) -> str | None:
    """The name of the kernel that computes a layer in ``mode``; None if it is not in
    threshold mode."""
    if isinstance(mode, KernelThreshold):
        return mode.plan.kernel.name
    return DENSE if isinstance(mode, Threshold) else None


def _dense(mode: Threshold) -> Threshold:
    return mode.dense() if isinstance(mode, KernelThreshold) else mode


def _auto(name: str, layer: Layer, mode: Threshold, kernels: list[KernelStrategy]) -> Threshold:
    best: tuple[KernelStrategy, int] | None = None
    result = mode.threshold
    if result is None or mode.zeroes_nothing(layer):
        # nothing to skip: the layer runs as it is, with no hook, whatever a kernel measured
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
    kernel = check_kernel_name(kernel)
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
            if entry.record.apply is not None
            and entry.record.crossover is not None
            and entry.record.exact
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
