"""``sparsify()``: threshold mode in one call, from calibration batches to a squashed sparsifier.

It composes the public steps and nothing else: :meth:`~ActivationSparsifier.register_layers`
(a preset or rules), :func:`~actsparse.hooks.calibrate` (with the batches'
attention masks as valid positions), :meth:`~ActivationSparsifier.step`,
:meth:`~ActivationSparsifier.squash_mask`, the per-layer allocation
(:func:`~actsparse.hooks.layer_sensitivity` and
:meth:`~ActivationSparsifier.retarget`), and
:meth:`~ActivationSparsifier.set_kernel`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from actsparse.core import (
    LAYER_KEY,
    ActsparseError,
    CalibrationWarning,
    ConfigError,
    MaskStrategy,
    get_registry,
)
from actsparse.hooks._allocate import (
    allocate_greedy,
    layer_sensitivity,
    linearized_sensitivity,
)
from actsparse.hooks._calibrate import calibrate, evaluating, run_batch
from actsparse.hooks._execution import DENSE, check_kernel_name
from actsparse.hooks._presets import AUTO_PRESET, resolve_layers
from actsparse.hooks._sparsifier import ActivationSparsifier
from actsparse.hooks._threshold import SparsityTargetWarning

__all__ = ["ALLOCATIONS", "sparsify"]

#: The key of a batch (a mapping) whose positions are the real tokens.
ATTENTION_MASK = "attention_mask"

#: How the model-wide target is spread over the layers: every layer at the target, or
#: greedily from each layer's sensitivity, estimated (:func:`linearized_sensitivity`) or
#: measured with a forward pass per layer and level (:func:`layer_sensitivity`).
ALLOCATIONS = ("uniform", "greedy", "greedy_exact")
#: The allocations that search per-layer levels.
GREEDY = frozenset(ALLOCATIONS) - {"uniform"}
#: Random projections of :func:`linearized_sensitivity` for ``allocation="greedy"``.
GREEDY_PROJECTIONS = 4

#: The grid of the sensitivity for the greedy allocations, as multiples of the target
#: (at most :data:`GREEDY_CAP`): four levels, so ``"greedy_exact"`` costs
#: ``1 + 4 * layers`` passes over the probe examples.
GREEDY_FACTORS = (0.5, 1.0, 1.5, 2.0)
#: The highest level the greedy allocation gives a layer.
GREEDY_CAP = 0.95


def greedy_levels(target: float) -> list[float]:
    """The levels at which ``allocation="greedy"`` measures each layer for ``target``."""
    return sorted({min(GREEDY_CAP, round(f * target, 6)) for f in GREEDY_FACTORS})


def _check_target(target: object) -> float:
    if (
        isinstance(target, bool)
        or not isinstance(target, (int, float))
        or not math.isfinite(target)
        or not 0.0 <= target < 1.0
    ):
        raise ConfigError(f"target must be a sparsity in [0, 1), got {target!r}")
    return float(target)


def _check_mask_fn(mask_fn: object) -> MaskStrategy:
    if not isinstance(mask_fn, str):
        raise ConfigError(f"mask_fn must be the name of a dynamic mask strategy, got {mask_fn!r}")
    record = get_registry().get("mask", mask_fn)  # UnknownStrategyError, naming the known ones
    if not record.dynamic or record.target_key is None:
        dynamic = [e.record.name for e in get_registry().entries("mask") if e.record.dynamic]
        raise ConfigError(
            f"mask_fn {mask_fn!r} is not a threshold strategy that can be retargeted "
            f"(dynamic, with a target_key); threshold strategies: {', '.join(map(repr, dynamic))}"
        )
    return record


def _examples(batch: Any, count: int) -> tuple[Any, int]:
    """The first ``count`` examples of ``batch`` (every tensor cut along dim 0), and how
    many it gave."""
    if isinstance(batch, torch.Tensor):
        return (batch[:count], min(count, batch.shape[0])) if batch.ndim else (batch, 1)
    values = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    sizes = [v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.ndim]
    if isinstance(batch, (str, bytes)) or not sizes or len(set(sizes)) != 1:
        return batch, 1  # no common batch dimension: the whole batch is one probe

    def cut(value: Any) -> Any:
        return value[:count] if isinstance(value, torch.Tensor) and value.ndim else value

    if isinstance(batch, Mapping):
        return {key: cut(value) for key, value in batch.items()}, min(count, sizes[0])
    out = [cut(value) for value in batch]
    return (tuple(out) if isinstance(batch, tuple) else out), min(count, sizes[0])


def single_examples(batch: Any) -> list[Any]:
    """``batch`` cut into batches of one example each (every tensor along dim 0), or
    ``[batch]`` when its tensors share no batch dimension."""
    _, count = _examples(batch, 1 << 62)
    if count <= 1:
        return [batch]

    def cut(value: Any, i: int) -> Any:
        return value[i : i + 1] if isinstance(value, torch.Tensor) and value.ndim else value

    if isinstance(batch, torch.Tensor):
        return [batch[i : i + 1] for i in range(count)]
    if isinstance(batch, Mapping):
        return [{key: cut(value, i) for key, value in batch.items()} for i in range(count)]
    kind = tuple if isinstance(batch, tuple) else list
    return [kind(cut(value, i) for value in batch) for i in range(count)]


def probe_set(batches: Sequence[Any], count: int) -> list[Any]:
    """The first ``count`` examples of ``batches``, as batches of the same form."""
    out = []
    for batch in batches:
        if count <= 0:
            break
        cut, taken = _examples(batch, count)
        out.append(cut)
        count -= taken
    return out


def _batches(calibration_batches: object) -> list[Any]:
    if isinstance(calibration_batches, (torch.Tensor, str, bytes, Mapping)) or not isinstance(
        calibration_batches, Iterable
    ):
        raise ConfigError(
            "calibration_batches must be an iterable of batches (a list, a DataLoader), got "
            f"{type(calibration_batches).__name__}; wrap a single batch in a list"
        )
    out = list(calibration_batches)
    if not out:
        raise ConfigError("calibration_batches is empty: calibration needs at least one batch")
    return out


def valid_mask(batch: Any) -> torch.Tensor | None:
    """A mapping batch's ``attention_mask`` as a bool tensor, or None."""
    if isinstance(batch, Mapping):
        mask = batch.get(ATTENTION_MASK)
        if isinstance(mask, torch.Tensor) and mask.ndim >= 1:
            return mask.bool()
    return None


def first_output(output: Any) -> torch.Tensor | None:
    """The model output's first tensor: the tensor itself, ``last_hidden_state`` or
    ``logits`` of a ``transformers`` output, the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    values: Iterable[Any]
    if isinstance(output, Mapping):
        values = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


class OutputError:
    """``error()``: how far the model's first output tensor on probe batches lies from the
    outputs recorded before any hook (real tokens only).

    ``divergence="squared"``: the relative squared error. ``"kl"``, for logits
    (a ``transformers`` output's ``logits``): the mean over positions of the KL
    divergence of the reference's next-token distribution to the output's.
    Entries where the reference is NaN or inf are left out (``skipped`` counts
    them; for ``"kl"`` the whole position); an output that is not finite where
    the reference is counts as an infinite error.
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[Any],
        references: Sequence[Any],
        divergence: str = "squared",
    ) -> None:
        self.model = model
        self.probes = list(probes)
        self.divergence = divergence
        restricted = [
            self.restrict(batch, reference)
            for batch, reference in zip(self.probes, references, strict=True)
        ]
        self.finite = [reference.isfinite() for reference in restricted]
        self.skipped = sum(int((~finite).sum()) for finite in self.finite)
        if divergence == "kl":
            self.finite = [f.all(-1, keepdim=True).expand_as(f) for f in self.finite]
            restricted = [
                torch.where(f, r, torch.zeros_like(r)).log_softmax(-1)
                for f, r in zip(self.finite, restricted, strict=True)
            ]
        self.references = restricted

    @staticmethod
    def restrict(batch: Any, tensor: torch.Tensor) -> torch.Tensor:
        mask = valid_mask(batch)
        if mask is not None and tuple(tensor.shape[: mask.ndim]) == tuple(mask.shape):
            return tensor[mask]
        return tensor

    def output(self, batch: Any) -> torch.Tensor:
        """The model's first output tensor on ``batch``, real tokens only, with its graph
        when grad is enabled (what :func:`linearized_sensitivity` differentiates)."""
        out = first_output(run_batch(self.model, batch))
        if out is None:  # pragma: no cover - checked on the reference already
            raise ConfigError("the model's output holds no tensor")
        return self.restrict(batch, out.float())

    def __call__(self) -> float:
        num = den = 0.0
        with torch.no_grad():
            for batch, reference, finite in zip(
                self.probes, self.references, self.finite, strict=True
            ):
                out = self.output(batch)
                if self.divergence == "kl":
                    rows = finite[..., 0]
                    kl = reference.exp() * (reference - out.log_softmax(-1))
                    num += float(kl[rows].sum())
                    den += float(rows.sum())
                else:
                    diff = out - reference
                    num += float(diff[finite].pow(2).sum())
                    den += float(reference[finite].pow(2).sum())
        if math.isnan(num):  # inf - inf: the output is not finite where the reference is
            num = math.inf
        return num / den if den > 0 else num


def divergence_of(output: Any) -> str:
    """``"kl"`` when the model's first output tensor is a ``transformers`` output's
    ``logits``, else ``"squared"``."""
    logits = getattr(output, "logits", None)
    tensor = first_output(output)
    kl = isinstance(logits, torch.Tensor) and logits is tensor and logits.ndim >= 2
    return "kl" if kl else "squared"


def _reference(model: nn.Module, batch: Any) -> tuple[torch.Tensor, str]:
    """The model's first output tensor on ``batch``, before any hook (the dry run), and
    the divergence that measures it (:func:`divergence_of`)."""
    output = _dry_run(model, batch)
    tensor = first_output(output)
    if tensor is None:
        raise ConfigError(
            f"the model's output ({type(output).__name__}) holds no tensor to measure the "
            "error of sparsity on; use allocation='uniform'"
        )
    return tensor.detach().float(), divergence_of(output)


def _dry_run(model: nn.Module, batch: Any) -> Any:
    """The model's output on ``batch`` in eval mode without grad; a ConfigError if it
    rejects the batch."""
    try:
        with evaluating(model), torch.no_grad():
            output = run_batch(model, batch)
    except ActsparseError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"the model rejects the first calibration batch ({type(exc).__name__}: {exc}); "
            "a mapping is passed as keyword arguments, a tuple or list as positional "
            "arguments, anything else as the one argument"
        ) from exc
    return output


def _widths(sparsifier: ActivationSparsifier, names: Iterable[str]) -> dict[str, float]:
    """Each layer's share of the model-wide count: its input width (every layer sees the
    same tokens in the presets)."""
    out = {}
    for name in names:
        module = sparsifier.data_groups[name][LAYER_KEY]
        width = getattr(module, "in_features", None)
        if not isinstance(width, int):
            weight = getattr(module, "weight", None)
            width = weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.ndim > 1 else 1
        out[name] = float(width)
    return out


def sparsify(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    *,
    target: float,
    layers: str | Mapping[Any, Any] | Sequence[Any] = AUTO_PRESET,
    allocation: str = "greedy",
    mask_fn: str = "target_threshold",
    compensate: bool = True,
    kernel: str = DENSE,
    progress: bool | None = None,
    probe_examples: int = 4,
) -> ActivationSparsifier:
    r"""Threshold-mode activation sparsity at a model-wide ``target``, in one call.

    Registers the selected layers with the ``abs_histogram`` aggregate and the
    ``mask_fn`` threshold strategy (compensating its zeros unless ``compensate``
    is False), runs ``calibration_batches`` through
    ``model`` (:func:`calibrate`; a mapping batch's ``attention_mask`` becomes
    the valid positions), calls ``step()`` and ``squash_mask()``, spreads
    ``target`` over the layers (``allocation``) and returns the squashed
    sparsifier.

    Args:
        model: The model; its layers get the sparsify hooks.
        calibration_batches: Batches as :func:`calibrate` takes them: a tensor
            (``model(batch)``), a tuple or list (``model(*batch)``) or a
            mapping (``model(**batch)``). They are iterated once into a list.
        target: The model-wide sparsity in [0, 1): the share of the selected
            layers' input entries that are zeroed, each layer counted by its
            input width.
        layers: A preset name (``"auto"``: the one whose module names the model
            has, refused when several presets match; ``"bert"``; ``"llama"``)
            or the rules of :meth:`~ActivationSparsifier.register_layers`.
        allocation: ``"greedy"`` (the default): each layer's error alone is
            estimated on the probe examples at 0.5, 1, 1.5 and 2 times
            ``target`` (at most 0.95; :func:`linearized_sensitivity`, one
            forward pass with grad and 4 backward passes per probe example,
            whatever the number of layers), then :func:`allocate_greedy` picks
            per-layer levels whose width-weighted mean is ``target``; they are
            kept if the probes measure them no worse than every layer at
            ``target``, else every layer gets ``target``. ``"greedy_exact"``:
            the same with the error measured, ``1 + 4 * layers`` passes over
            the probes (:func:`layer_sensitivity`). ``"uniform"``: every layer
            at ``target``. ``layer_sensitivity``, ``linearized_sensitivity``
            and ``allocate_greedy`` take any grid, for a finer search at a
            higher cost.
        mask_fn: The threshold strategy, by name: ``"target_threshold"`` (the
            default; the score is ``|x|``), ``"weighted_threshold"`` (WINA's
            ``|x_i| * ||W[:, i]||``) or any registered dynamic mask strategy
            with a ``target_key``.
        compensate: Whether each layer adds back to its output the mean
            contribution of the entries it zeroes (``abs_histogram`` with
            ``feature_sums=True``: the mean of the zeroed values per input
            feature, measured on the calibration batches, times the layer's
            weights; the inputs stay as sparse).
        kernel: Passed to ``set_kernel()`` at the end (``squash_mask``'s ``kernel``).
        progress: The calibration progress bar (:func:`calibrate`'s ``progress``).
        probe_examples: How many of the first calibration examples (rows of
            the first batches) measure the error that the greedy allocations
            weigh, on real tokens, against the dense model's: for a
            ``transformers`` output with ``logits``, the mean KL divergence of
            the next-token distributions; otherwise the relative squared error
            of the model's first output tensor.

    Raises:
        ConfigError: A bad argument, an unknown preset or one that selects no
            layer, ``"auto"`` on a model that no preset or several presets
            match, no batch, or a first batch that the model rejects. Nothing
            is attached to the model then.
        UnknownStrategyError: No kernel or mask strategy of that name.

    If the model raises during calibration, every hook is removed before the
    error propagates.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    level = _check_target(target)
    kernel = check_kernel_name(kernel)
    mask = _check_mask_fn(mask_fn)
    if not isinstance(allocation, str) or allocation not in ALLOCATIONS:
        raise ConfigError(
            f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}"
        )
    if (
        isinstance(probe_examples, bool)
        or not isinstance(probe_examples, int)
        or probe_examples < 1
    ):
        raise ConfigError(f"probe_examples must be a positive int, got {probe_examples!r}")
    if progress not in (None, True, False):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    if not isinstance(compensate, bool):
        raise ConfigError(f"compensate must be True or False, got {compensate!r}")
    batches = _batches(calibration_batches)
    rules = resolve_layers(model, layers)
    greedy = allocation in GREEDY and level > 0
    # the dry run, before anything is attached: the model takes the first batch; one
    # probe per example, the terms of the estimated sensitivity
    probes = (
        [one for batch in probe_set(batches, probe_examples) for one in single_examples(batch)]
        if greedy
        else []
    )
    measured = [_reference(model, batch) for batch in probes]
    references = [tensor for tensor, _ in measured]
    divergence = measured[0][1] if measured else "squared"
    if not greedy:
        _dry_run(model, batches[0])

    sparsifier = ActivationSparsifier(
        model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn=mask.name,
        # the level goes to the key the strategy declares for its target
        **{str(mask.target_key): level},
        **({"feature_sums": True} if compensate else {}),
    )
    names = sparsifier.register_layers(rules)
    try:
        calibrate(model, batches, progress=progress, context=_valid_context(sparsifier))
        sparsifier.step()
        sparsifier.squash_mask()
        if greedy:
            error = OutputError(model, probes, references, divergence)
            if error.skipped:
                warnings.warn(
                    f"the model's outputs on the {probe_examples} probe example(s) hold "
                    f"{error.skipped} NaN or inf values: the greedy allocation measures the "
                    "error of sparsity without them",
                    CalibrationWarning,
                    stacklevel=2,
                )
            sparsifier.retarget(_greedy(sparsifier, error, allocation, level, names))
        if kernel != DENSE:
            sparsifier.set_kernel(kernel)
    except BaseException:
        for name in names:
            sparsifier.unregister_layer(name)
        raise
    return sparsifier


def _greedy(
    sparsifier: ActivationSparsifier,
    error: OutputError,
    allocation: str,
    level: float,
    names: Sequence[str],
) -> dict[str, float]:
    """Greedy per-layer levels for ``level``, or every layer at ``level`` where the
    probes measure those levels no better than uniform."""
    grid = greedy_levels(level)
    if allocation == "greedy":
        with evaluating(error.model):
            table = linearized_sensitivity(
                sparsifier,
                error.output,
                error.probes,
                grid,
                projections=GREEDY_PROJECTIONS,
                divergence=error.divergence,
            )
    else:
        table = layer_sensitivity(sparsifier, error, grid)
    levels = allocate_greedy(table, level, _widths(sparsifier, names))
    uniform = dict.fromkeys(names, level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityTargetWarning)
        sparsifier.retarget(uniform)
        at_uniform = error()
        sparsifier.retarget(levels)
        at_levels = error()
    return levels if at_levels <= at_uniform else uniform


def _valid_context(
    sparsifier: ActivationSparsifier,
) -> Callable[[Any], contextlib.AbstractContextManager[Any]]:
    def context(batch: Any) -> contextlib.AbstractContextManager[Any]:
        mask = valid_mask(batch)
        return contextlib.nullcontext() if mask is None else sparsifier.valid_positions(mask)

    return context
