"""``actsparse demo``: the whole job on real data, in well under two minutes on a laptop CPU.

It trains a small CNN on scikit-learn's bundled 8x8 digits (no download),
then, for each sparsity level, registers three layers with an
:class:`~actsparse.hooks.ActivationSparsifier` (``"sum"`` / ``"mean"`` /
``"magnitude"``), calibrates their masks on the training split with
:func:`~actsparse.hooks.calibrate`, squashes them and measures test accuracy
and the fraction of zeros that actually enters each layer. It prints the
table, plots the curve, saves one sparsifier's state and checks that a fresh
model reloaded from the files gives identical outputs.

``pip install "actsparse-cli[demo]"`` brings what it needs beyond this
package: scikit-learn, matplotlib, tqdm, ``actsparse-masks`` (the strategies)
and ``actsparse-serialize`` (the state file, in its default safetensors format).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from actsparse.core import ActsparseError, ConfigError, get_registry
from actsparse.hooks import ActivationSparsifier, calibrate

__all__ = [
    "DEFAULT_LEVELS",
    "QUICK_LEVELS",
    "SPARSIFIED_LAYERS",
    "DemoDependencyError",
    "DemoResult",
    "DigitsCNN",
    "LevelResult",
    "run_demo",
]

#: The mask sparsity levels swept by default.
DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: The levels of ``actsparse demo --quick``.
QUICK_LEVELS = (0.0, 0.5, 0.9)
#: The layers whose inputs the demo sparsifies.
SPARSIFIED_LAYERS = ("conv2", "fc1", "fc2")

STATE_FILE = "sparsifier_state.safetensors"
MODEL_FILE = "model.pt"
PLOT_FILE = "accuracy_vs_sparsity.png"
RESULTS_FILE = "results.json"


class DemoDependencyError(ActsparseError, ImportError):
    """A package that the demo needs is not installed."""


class DigitsCNN(nn.Module):
    """conv 1->16 k3, conv 16->32 k3, maxpool 2, linear 512->64, linear 64->10; ReLUs between.

    Inputs have shape (N, 1, 8, 8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


@attrs.frozen
class LevelResult:
    """One row of the demo's table.

    Attributes:
        level: The ``sparsity_level`` given to the magnitude mask of every layer.
        accuracy: Test accuracy with the masks applied, in [0, 1].
        activation_sparsity: Layer name -> fraction of zeros in the inputs that
            reach it on the test split (ReLU zeros included), after masking.
        overall_sparsity: The same over all sparsified layers' inputs together.
    """

    level: float
    accuracy: float
    activation_sparsity: dict[str, float]
    overall_sparsity: float


@attrs.frozen
class DemoResult:
    """What :func:`run_demo` measured and wrote.

    Attributes:
        dense_accuracy: Test accuracy of the trained model without masks.
        rows: One :class:`LevelResult` per swept level, in order.
        saved_level: The level whose sparsifier state was saved.
        files: What was written: ``"state"``, ``"model"``, ``"plot"``, ``"results"``.
        identical: Whether the reloaded model's outputs equal the original's.
        elapsed: Wall-clock seconds for the whole run.
    """

    dense_accuracy: float
    rows: tuple[LevelResult, ...]
    saved_level: float
    files: dict[str, Path]
    identical: bool
    elapsed: float


# ------------------------------------------------------------------ state files
# The only place that decides how the demo writes the sparsifier state:
# actsparse.serialize's default format (imported here, when it is needed).


def _save_state(sparsifier: ActivationSparsifier, directory: Path) -> Path:
    """Write the sparsifier's state under ``directory``; return the file's path."""
    from actsparse.serialize import save

    return save(sparsifier, directory / STATE_FILE)


def _load_state(sparsifier: ActivationSparsifier, path: Path) -> None:
    """Load a state written by :func:`_save_state` into ``sparsifier``."""
    from actsparse.serialize import load_into

    load_into(sparsifier, path)


# ------------------------------------------------------------------ helpers


def _check_arguments(
    *, epochs: object, levels: Sequence[object], batch_size: object, tolerance: object
) -> None:
    for field, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field} must be a positive int, got {value!r}")
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
        raise ConfigError(f"levels must be a non-empty sequence of numbers, got {levels!r}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= 1:
            raise ConfigError(f"levels must hold numbers in [0, 1], got {level!r}")
    if len(set(levels)) != len(levels):
        raise ConfigError(f"levels must not repeat a value, got {list(levels)!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise ConfigError(f"tolerance must be a number, got {tolerance!r}")
    if not 0 <= tolerance <= 1:
        raise ConfigError(f"tolerance must lie in [0, 1] (a fraction), got {tolerance!r}")


def _require_dependencies() -> None:
    missing = []
    for module, package in (
        ("sklearn", "scikit-learn"),
        ("matplotlib", "matplotlib"),
        ("tqdm", "tqdm"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise DemoDependencyError(
            f"actsparse demo needs {', '.join(missing)}: "
            'pip install "actsparse-cli[demo]" (with -c constraints.txt in a clone)'
        )
    registry = get_registry()
    for kind, name in (("aggregate", "sum"), ("reduce", "mean"), ("mask", "magnitude")):
        registry.entry(kind, name)  # names the package to install if missing
    try:
        import actsparse.serialize  # noqa: F401  (the state file)
    except ImportError:
        raise DemoDependencyError(
            "actsparse demo saves its state with actsparse-serialize: "
            "pip install actsparse-serialize (or the [demo] extra)"
        ) from None
    registry.entry("serializer", "safetensors")


def load_digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as (x_train, y_train, x_test, y_test), pixels scaled to [0, 1]."""
    from sklearn.datasets import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        load_digits,
    )
    from sklearn.model_selection import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        train_test_split,
    )

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target
    )
    train, test = torch.tensor(idx_train), torch.tensor(idx_test)
    return x[train], y[train], x[test], y[test]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> float:
    """Train with Adam and cross-entropy; return the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    loss_sum = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        loss_sum = torch.zeros(())
        for start in range(0, len(y), batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            optimizer.step()
            loss_sum += loss.detach() * len(index)
    model.eval()
    return float(loss_sum) / len(y)


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str]
) -> tuple[torch.Tensor, float, dict[str, float], float]:
    """Logits, accuracy, and the fraction of zeros entering each named layer."""
    zeros = {name: torch.zeros((), dtype=torch.long) for name in layers}
    totals = dict.fromkeys(layers, 0)

    def counter(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # forward hooks see the arguments after the pre-hooks (the masks) ran
            zeros[name] += (args[0] == 0).sum()
            totals[name] += args[0].numel()

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(counter(name)) for name in layers]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    accuracy = float((logits.argmax(dim=1) == y).float().mean())
    per_layer = {name: int(zeros[name]) / totals[name] for name in layers}
    total = sum(totals.values())
    overall = sum(int(zeros[name]) for name in layers) / total if total else 0.0
    return logits, accuracy, per_layer, overall


def _sparsify(model: nn.Module, level: float) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=level
    )
    modules = dict(model.named_modules())
    for name in SPARSIFIED_LAYERS:
        sparsifier.register_layer(modules[name])
    return sparsifier


def _plot(
    path: Path, rows: Sequence[LevelResult], dense_accuracy: float, saved_level: float
) -> None:
    # no pyplot: no global backend state
    from matplotlib.figure import Figure  # type: ignore[import-not-found, unused-ignore]

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    measured = [100 * row.overall_sparsity for row in rows]
    levels = [100 * row.level for row in rows]
    accuracy = [100 * row.accuracy for row in rows]
    axes.plot(
        measured, accuracy, marker="o", label="measured: zeros entering conv2, fc1, fc2 (test)"
    )
    axes.plot(levels, accuracy, marker="s", linestyle="--", label="mask sparsity level")
    axes.axhline(100 * dense_accuracy, color="gray", linestyle=":", label="dense model (no masks)")
    saved = next(row for row in rows if row.level == saved_level)
    axes.scatter(
        [100 * saved.overall_sparsity],
        [100 * saved.accuracy],
        s=160,
        facecolors="none",
        edgecolors="red",
        zorder=3,
        label=f"saved state (level {saved_level:.0%})",
    )
    axes.set_xlabel("activation sparsity (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("actsparse demo: digits CNN, test accuracy vs activation sparsity")
    axes.set_xlim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    figure.savefig(path, dpi=110)


def format_table(rows: Sequence[LevelResult], dense_accuracy: float) -> str:
    """The accuracy table as text."""
    layer_cols = "".join(f"{name:>8}" for name in SPARSIFIED_LAYERS)
    lines = [
        "activation sparsity = share of zeros in the inputs of each layer on the test split",
        f"{'mask level':>10}{layer_cols}{'all':>8}{'test acc':>10}",
    ]
    for row in rows:
        cells = "".join(f"{row.activation_sparsity[name]:>8.1%}" for name in SPARSIFIED_LAYERS)
        lines.append(f"{row.level:>10.0%}{cells}{row.overall_sparsity:>8.1%}{row.accuracy:>10.1%}")
    lines.append(f"{'dense':>10}{'':>{8 * (len(SPARSIFIED_LAYERS) + 1)}}{dense_accuracy:>10.1%}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the demo


def run_demo(
    *,
    out: Path,
    epochs: int = 10,
    levels: Sequence[float] = DEFAULT_LEVELS,
    batch_size: int = 64,
    seed: int = 0,
    tolerance: float = 0.01,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo and write its files under ``out``; see the module docstring.

    Args:
        out: The output directory (created if needed).
        epochs: Training epochs over the 1437 training images.
        levels: The mask sparsity levels to sweep, each in [0, 1].
        batch_size: Training and calibration batch size.
        seed: Seeds the split, the initial weights and the batch order.
        tolerance: The saved state is the sparsest level whose test accuracy
            is at most this far (a fraction) below the dense model's.
        progress: Passed to :func:`~actsparse.hooks.calibrate`.
        echo: Where the report lines go.
    """
    _check_arguments(epochs=epochs, levels=levels, batch_size=batch_size, tolerance=tolerance)
    start = time.perf_counter()
    _require_dependencies()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    echo(
        f"digits: {len(y_train)} training and {len(y_test)} test images of 8x8 pixels "
        "(bundled with scikit-learn)"
    )

    model = DigitsCNN()
    t0 = time.perf_counter()
    loss = train(model, x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed)
    _, dense_accuracy, _, _ = _evaluate(model, x_test, y_test, ())
    echo(
        f"trained DigitsCNN for {epochs} epochs in {time.perf_counter() - t0:.1f} s: "
        f"final training loss {loss:.3f}, test accuracy {dense_accuracy:.1%}"
    )

    # The "sum" aggregate adds batches elementwise, so calibration batches
    # must share one shape: the last, smaller batch is left out.
    usable = len(y_train) - len(y_train) % batch_size or len(y_train)
    calibration = list(torch.split(x_train[:usable], batch_size))
    echo(
        f"calibrating masks for {', '.join(SPARSIFIED_LAYERS)} on {usable} training images, "
        f"{len(levels)} sparsity levels"
    )
    rows: list[LevelResult] = []
    states: dict[float, dict[str, Any]] = {}
    outputs: dict[float, torch.Tensor] = {}
    for level in levels:
        sparsifier = _sparsify(model, level)
        calibrate(model, calibration, progress=progress, desc=f"level {level:>4.0%}")
        sparsifier.step()
        sparsifier.squash_mask()
        logits, accuracy, per_layer, overall = _evaluate(model, x_test, y_test, SPARSIFIED_LAYERS)
        rows.append(LevelResult(level, accuracy, per_layer, overall))
        states[level] = sparsifier.state_dict()
        outputs[level] = logits
        for name in SPARSIFIED_LAYERS:
            sparsifier.unregister_layer(name)

    echo("")
    echo(format_table(rows, dense_accuracy))
    echo("")

    eligible = [row for row in rows if row.accuracy >= dense_accuracy - tolerance]
    chosen = max(eligible or rows[:1], key=lambda row: (row.level, row.accuracy)).level

    files = {"plot": out / PLOT_FILE, "model": out / MODEL_FILE, "results": out / RESULTS_FILE}
    _plot(files["plot"], rows, dense_accuracy, chosen)
    torch.save(model.state_dict(), files["model"])
    saver = ActivationSparsifier(DigitsCNN())
    saver.load_state_dict(states[chosen])
    files["state"] = _save_state(saver, out)

    # Reload into a fresh model from the files alone and compare outputs.
    fresh = DigitsCNN()
    fresh.load_state_dict(torch.load(files["model"], weights_only=True))
    fresh.eval()
    reloaded = ActivationSparsifier(fresh)
    _load_state(reloaded, files["state"])
    with torch.no_grad():
        identical = torch.equal(fresh(x_test), outputs[chosen])

    files["results"].write_text(
        json.dumps(
            {
                "dense_accuracy": dense_accuracy,
                "saved_level": chosen,
                "identical_after_reload": identical,
                "rows": [attrs.asdict(row) for row in rows],
            },
            indent=2,
        )
        + "\n"
    )
    elapsed = time.perf_counter() - start
    saved_row = next(row for row in rows if row.level == chosen)
    echo(
        f"saved the sparsest level within {100 * tolerance:g} percentage point(s) of dense "
        f"accuracy: level {chosen:.0%} "
        f"({saved_row.overall_sparsity:.1%} of activations zero, test accuracy "
        f"{saved_row.accuracy:.1%})"
    )
    echo(
        "reloaded into a fresh model: outputs "
        + ("identical" if identical else "DIFFERENT")
        + f" on all {len(y_test)} test images"
    )
    for key in ("plot", "state", "model", "results"):
        echo(f"wrote {files[key]}")
    echo(f"done in {elapsed:.1f} s")
    return DemoResult(
        dense_accuracy=dense_accuracy,
        rows=tuple(rows),
        saved_level=chosen,
        files=files,
        identical=identical,
        elapsed=elapsed,
    )
