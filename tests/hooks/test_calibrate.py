"""actsparse.hooks.calibrate: batch dispatch, stopping rules, progress, and state restored."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from actsparse.core import ConfigError
from actsparse.hooks import ActivationSparsifier, CalibrationSummary, calibrate
from actsparse.hooks import _calibrate as calibrate_module


class Recorder(nn.Module):
    """Records how it was called and whether gradients were enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], bool, bool]] = []
        self.dropout = nn.Dropout(0.5)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs, torch.is_grad_enabled(), self.training))


def test_dispatch_by_batch_type() -> None:
    model = Recorder()
    a, b, c = torch.ones(2, 3), torch.zeros(2, 3), torch.full((4, 1), 2.0)
    summary = calibrate(model, [a, (a, b), [b, c], {"x": c, "mask": a}], progress=False)
    args = [(call[0], call[1]) for call in model.calls]
    assert len(args) == 4
    assert args[0][0] == (a,)
    assert args[0][1] == {}
    assert args[1][0] == (a, b)
    assert args[2][0] == (b, c)
    assert args[3][0] == ()
    assert set(args[3][1]) == {"x", "mask"}
    assert args[3][1]["x"] is c
    # samples: the leading dimension of each batch's first tensor
    assert summary.samples == 2 + 2 + 2 + 4
    assert summary.batches == 4
    assert summary.stopped_by == "exhausted"
    assert summary.elapsed >= 0


def test_no_grad_and_eval_mode_restored() -> None:
    model = Recorder().train()
    model.dropout.eval()  # a submodule's own flag must come back too
    calibrate(model, [torch.ones(1, requires_grad=True)], progress=False)
    (_, _, grad_enabled, training) = model.calls[0]
    assert grad_enabled is False
    assert training is False
    assert model.training is True
    assert model.dropout.training is False
    assert torch.is_grad_enabled()


def test_eval_mode_false_keeps_training() -> None:
    model = Recorder().train()
    calibrate(model, [torch.ones(1)], progress=False, eval_mode=False)
    assert model.calls[0][3] is True


def test_training_flags_restored_on_error() -> None:
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            raise RuntimeError("boom")

    model = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, [torch.ones(1)], progress=False)
    assert model.training is True


def test_inputs_and_device() -> None:
    model = Recorder()
    x, y = torch.ones(3, 2), torch.arange(3)
    summary = calibrate(
        model, [(x, y), (x, y)], inputs=lambda batch: batch[0], device="cpu", progress=False
    )
    assert [call[0] for call in model.calls] == [(x,), (x,)]
    assert summary.samples == 6


def test_samples_none_without_tensors() -> None:
    model = Recorder()
    assert calibrate(model, [3, 4], progress=False).samples is None


def test_steps_stop_early_and_leave_the_rest_unconsumed() -> None:
    model = Recorder()
    consumed: list[int] = []

    def gen() -> Iterator[torch.Tensor]:
        for i in range(10):
            consumed.append(i)
            yield torch.ones(1)

    summary = calibrate(model, gen(), steps=3, progress=False)
    assert summary.batches == 3
    assert summary.stopped_by == "steps"
    assert consumed == [0, 1, 2]


@given(n=st.integers(1, 12), steps=st.one_of(st.none(), st.integers(1, 15)))
def test_steps_property(n: int, steps: int | None) -> None:
    model = Recorder()
    summary = calibrate(model, [torch.ones(1)] * n, steps=steps, progress=False)
    expected = n if steps is None else min(n, steps)
    assert summary.batches == expected == len(model.calls)
    if steps is not None and steps <= n:
        assert summary.stopped_by == "steps"
    else:
        assert summary.stopped_by == "exhausted"


def test_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(1000))
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(clock)))
    monkeypatch.setattr(calibrate_module, "time", fake_time)
    model = Recorder()
    # start at t=0; after each batch the clock reads 1, 2, 3, ...: the budget
    # of 2.5 s is spent after the third batch.
    summary = calibrate(model, [torch.ones(1)] * 10, time_budget=2.5, progress=False)
    assert summary.batches == 3
    assert summary.stopped_by == "time_budget"


def test_tiny_time_budget_still_runs_one_batch() -> None:
    model = Recorder()
    summary = calibrate(model, [torch.ones(1)] * 5, time_budget=1e-12, progress=False)
    assert summary.batches == 1
    assert summary.stopped_by == "time_budget"


def test_summary_is_frozen() -> None:
    summary = calibrate(Recorder(), [torch.ones(1)], progress=False)
    assert isinstance(summary, CalibrationSummary)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        summary.batches = 5  # type: ignore[misc]


def test_drives_a_sparsifier_like_a_manual_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [torch.randn(4, 6) for _ in range(5)]

    def masks(run: Any) -> list[torch.Tensor]:
        sparsifier = ActivationSparsifier(
            model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.4
        )
        sparsifier.register_layer(model[2])
        run()
        sparsifier.step()
        mask = sparsifier.get_mask("2")
        sparsifier.unregister_layer("2")
        return [mask]

    def manual() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    expected = masks(manual)
    got = masks(lambda: calibrate(model, batches, progress=False))
    assert torch.equal(expected[0], got[0])
    assert float((got[0] == 0).float().mean()) == pytest.approx(0.4)


# ------------------------------------------------------------------ progress


def test_progress_false_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    calibrate(Recorder(), [torch.ones(1)] * 3, progress=False)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_progress_none_is_silent_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    calibrate(Recorder(), [torch.ones(1)] * 3)
    assert capsys.readouterr().err == ""


def test_progress_true_draws_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    calibrate(Recorder(), [torch.ones(1)] * 3, progress=True, desc="warming up")
    err = capsys.readouterr().err
    assert "warming up" in err
    assert "3/3" in err


def test_progress_none_on_a_terminal_draws_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")

    class FakeTTY:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    calibrate(Recorder(), [torch.ones(1)] * 2, steps=2)
    assert "2/2" in fake.text


def test_progress_true_without_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = Recorder()
    with pytest.raises(ConfigError, match="pip install tqdm"):
        calibrate(model, [torch.ones(1)], progress=True)
    assert model.calls == []
    # progress=None quietly does without it
    calibrate(model, [torch.ones(1)])
    assert len(model.calls) == 1


# ------------------------------------------------------------------ misuse


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"steps": True}, "steps"),
        ({"time_budget": 0}, "time_budget"),
        ({"time_budget": -1.0}, "time_budget"),
        ({"time_budget": float("nan")}, "time_budget"),
        ({"time_budget": "5"}, "time_budget"),
        ({"progress": "yes"}, "progress"),
        ({"inputs": 3}, "inputs"),
        ({"eval_mode": 1}, "eval_mode"),
        ({"desc": None}, "desc"),
    ],
)
def test_bad_arguments_name_the_field_and_consume_nothing(
    kwargs: dict[str, Any], field: str
) -> None:
    model = Recorder().train()
    consumed: list[int] = []

    def gen() -> Iterator[torch.Tensor]:
        consumed.append(1)
        yield torch.ones(1)

    with pytest.raises(ConfigError, match=field):
        calibrate(model, gen(), **kwargs)
    assert consumed == []
    assert model.calls == []
    assert model.training is True


@pytest.mark.parametrize("batches", [torch.ones(3, 2), "abc", {"x": torch.ones(1)}, 5])
def test_batches_must_be_an_iterable_of_batches(batches: Any) -> None:
    with pytest.raises(ConfigError, match="batches must be an iterable"):
        calibrate(Recorder(), batches)


def test_model_must_be_a_module() -> None:
    sparsifier = ActivationSparsifier(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=r"sparsifier\.model"):
        calibrate(sparsifier, [torch.ones(2)])  # type: ignore[arg-type]


def test_empty_batches() -> None:
    with pytest.raises(ConfigError, match="yielded nothing"):
        calibrate(Recorder(), [], progress=False)
    assert issubclass(ConfigError, ValueError)


def test_context_wraps_each_forward_pass() -> None:
    model = Recorder()
    entered: list[Any] = []

    class Context:
        def __init__(self, batch: Any) -> None:
            self.batch = batch

        def __enter__(self) -> None:
            entered.append(("enter", len(model.calls)))

        def __exit__(self, *exc: object) -> None:
            entered.append(("exit", len(model.calls)))

    calibrate(model, [torch.ones(1), torch.zeros(1)], progress=False, context=Context)
    assert entered == [("enter", 0), ("exit", 1), ("enter", 1), ("exit", 2)]
    with pytest.raises(ConfigError, match="context must be callable"):
        calibrate(model, [torch.ones(1)], progress=False, context=3)  # type: ignore[arg-type]
