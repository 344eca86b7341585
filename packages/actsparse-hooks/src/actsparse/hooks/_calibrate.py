"""Run a model over calibration batches: the loop between ``register_layer`` and ``step()``.

:func:`calibrate` feeds every batch to the model under ``torch.no_grad()``
(and, by default, in eval mode), optionally with a progress bar, and stops
when the batches run out, after a number of steps, or once a time budget is
spent. It knows nothing about sparsifiers: whatever hooks are attached to the
model (an :class:`~actsparse.hooks.ActivationSparsifier`'s aggregation hooks,
for instance) see the inputs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

import attrs
import torch
from torch import nn

from actsparse.core import ConfigError

__all__ = ["CalibrationSummary", "calibrate", "run_batch"]

StopReason = Literal["exhausted", "steps", "time_budget"]


@attrs.frozen
class CalibrationSummary:
    """What :func:`calibrate` did.

    Attributes:
        batches: How many batches went through the model.
        samples: The sum of the leading dimension of each batch's first
            tensor (the number of examples, for batch-first data); None when
            a batch held no tensor.
        elapsed: Wall-clock seconds spent in the loop.
        stopped_by: Why the loop ended: ``"exhausted"`` (no batches left),
            ``"steps"`` (the step count was reached) or ``"time_budget"``.
    """

    batches: int
    samples: int | None
    elapsed: float
    stopped_by: StopReason


def _check_steps(steps: object) -> int | None:
    if steps is None:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int or None, got {steps!r}")
    return steps


def _check_time_budget(time_budget: object) -> float | None:
    if time_budget is None:
        return None
    if (
        isinstance(time_budget, bool)
        or not isinstance(time_budget, (int, float))
        or not math.isfinite(time_budget)
        or time_budget <= 0
    ):
        raise ConfigError(
            f"time_budget must be a positive, finite number of seconds or None, got {time_budget!r}"
        )
    return float(time_budget)


def _progress_class(progress: object) -> Any:
    """The tqdm class to use, or None. ``progress=None`` means: only on a terminal, if installed."""
    if progress is False:
        return None
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        if not (callable(isatty) and isatty()):
            return None
    elif progress is not True:
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        if progress is True:
            raise ConfigError(
                "progress=True needs tqdm: pip install tqdm (or actsparse-hooks[progress])"
            ) from None
        return None
    return tqdm


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, Mapping):
        for value in values:
            if isinstance(value, torch.Tensor):
                return value
    return None


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; each module's own mode put back after."""
    training = {module: module.training for module in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, flag in training.items():
            module.training = flag


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` with ``batch`` as :func:`calibrate` does; return the output."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    time_budget: float | None = None,
    progress: bool | None = None,
    inputs: Callable[[Any], Any] | None = None,
    device: torch.device | str | None = None,
    eval_mode: bool = True,
    desc: str = "calibrating",
    context: Callable[[Any], AbstractContextManager[Any]] | None = None,
) -> CalibrationSummary:
    """Run ``model`` over ``batches`` without gradients, so that its hooks see real data.

    Each batch (after ``inputs``, if given) is passed to the model by its type:
    a mapping as keyword arguments (``model(**batch)``), a tuple or list as
    positional arguments (``model(*batch)``), anything else as the one
    argument (``model(batch)``). A DataLoader that yields ``(inputs, labels)``
    pairs therefore needs ``inputs=lambda batch: batch[0]``.

    Args:
        model: The model to run; its outputs are discarded.
        batches: Any iterable of batches: a DataLoader, a list, a generator.
        steps: Stop after this many batches; None runs until ``batches`` ends.
        time_budget: Stop before starting a batch once this many seconds have
            passed; at least one batch always runs. None means no limit.
        progress: Show a tqdm progress bar on stderr. None (the default) shows
            one only when stderr is a terminal and tqdm is installed; True
            requires tqdm; False never shows one.
        inputs: Turns each batch into what the model receives, such as
            ``lambda batch: batch[0]`` to drop labels.
        device: Move every tensor of the batch (inside tuples, lists and
            mappings too) to this device first.
        eval_mode: Put the model in eval mode for the loop (dropout off, batch
            norm statistics frozen) and restore every submodule's training
            flag afterwards, also on error.
        desc: The progress bar's label.
        context: Called with each batch (as the model receives it); the
            forward pass runs inside the context manager it returns, such as
            ``lambda b: sparsifier.valid_positions(b["attention_mask"].bool())``.

    Returns:
        A :class:`CalibrationSummary`.

    Raises:
        ConfigError: An argument is invalid, or ``batches`` yields nothing.
            Nothing has run in that case.

    Example::

        sparsifier.register_layer(model.fc1)
        summary = calibrate(model, loader, inputs=lambda b: b[0], time_budget=30)
        sparsifier.step()
    """
    if not isinstance(model, nn.Module):
        hint = " (pass sparsifier.model)" if hasattr(model, "model") else ""
        raise ConfigError(f"model must be a torch.nn.Module{hint}, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, str, bytes, Mapping)) or not isinstance(
        batches, Iterable
    ):
        raise ConfigError(
            f"batches must be an iterable of batches (a DataLoader, a list, a generator), "
            f"got {type(batches).__name__}; wrap a single batch in a list"
        )
    max_steps = _check_steps(steps)
    budget = _check_time_budget(time_budget)
    if inputs is not None and not callable(inputs):
        raise ConfigError(f"inputs must be callable or None, got {inputs!r}")
    if not isinstance(eval_mode, bool):
        raise ConfigError(f"eval_mode must be a bool, got {eval_mode!r}")
    if not isinstance(desc, str):
        raise ConfigError(f"desc must be a string, got {desc!r}")
    if context is not None and not callable(context):
        raise ConfigError(f"context must be callable or None, got {context!r}")
    target = torch.device(device) if device is not None else None
    bar_class = _progress_class(progress)

    total: int | None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)

    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ConfigError("batches yielded nothing: calibration needs at least one batch") from None

    bar = (
        None
        if bar_class is None
        else bar_class(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True)
    )
    count = 0
    samples: int | None = 0
    stopped_by: StopReason = "exhausted"
    start = time.perf_counter()
    mode = evaluating(model) if eval_mode else contextlib.nullcontext()
    try:
        batch = first
        with mode, torch.no_grad():
            while True:
                if inputs is not None:
                    batch = inputs(batch)
                if target is not None:
                    batch = _to_device(batch, target)
                leading = _first_tensor(batch)
                if leading is None or leading.ndim == 0:
                    samples = None
                elif samples is not None:
                    samples += int(leading.shape[0])
                with contextlib.nullcontext() if context is None else context(batch):
                    run_batch(model, batch)
                count += 1
                if bar is not None:
                    bar.update(1)
                if max_steps is not None and count >= max_steps:
                    stopped_by = "steps"
                    break
                if budget is not None and time.perf_counter() - start >= budget:
                    stopped_by = "time_budget"
                    break
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
    finally:
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return CalibrationSummary(
        batches=count, samples=samples, elapsed=elapsed, stopped_by=stopped_by
    )
