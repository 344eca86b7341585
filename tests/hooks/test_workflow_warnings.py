"""Calls that torch.ao accepts silently but that rarely do what was meant: they warn.

They stay warnings (torch.ao raised nothing there); as errors, through a
warnings filter, they are raised before the call changes anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _support import assert_unchanged, snapshot
from torch import nn

from actsparse.hooks import ActivationSparsifier, WorkflowWarning


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))


def _sparsifier(model: nn.Module) -> ActivationSparsifier:
    return ActivationSparsifier(model, "sum", "mean", "magnitude", sparsity_level=0.5)


def test_squash_after_forward_passes_without_step_warns_that_the_layers_stay_dense() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    s.register_layer(model[4])
    x = torch.randn(4, 6)
    with torch.no_grad():
        dense = model(x)
    with pytest.warns(
        WorkflowWarning,
        match=r"squash_mask\(\): layer\(s\) '2', '4' saw forward passes but no step\(\), so "
        r"their mask is the placeholder of ones and they stay dense; call step\(\) before",
    ):
        s.squash_mask()
    with torch.no_grad():
        assert torch.equal(model(x), dense)  # what the warning says: nothing was sparsified


def test_squash_after_new_passes_since_a_step_keeps_that_mask_quietly() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(4, 6))
    s.step()
    mask = s.get_mask("2")
    with torch.no_grad():
        model(torch.randn(4, 6))  # an evaluation pass: aggregated, the mask stays
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowWarning)
        s.squash_mask()
    assert s.get_mask("2") is mask


def test_squash_after_step_does_not_warn() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(4, 6))
    s.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowWarning)
        s.squash_mask()


def test_squash_without_hooks_does_not_warn() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowWarning)
        s.squash_mask(attach_sparsify_hook=False)  # nothing is applied: nothing to warn about


def test_the_squash_warning_as_an_error_changes_nothing() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with torch.no_grad():
        model(torch.randn(4, 6))
    before = snapshot(model, s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WorkflowWarning)
        with pytest.raises(WorkflowWarning):
            s.squash_mask()
    assert_unchanged(before, snapshot(model, s))
    assert s.data_groups["2"]["hook_state"] == "aggregate"


def test_step_with_no_layer_registered_warns() -> None:
    model = _model()
    s = _sparsifier(model)
    with pytest.warns(WorkflowWarning, match=r"step\(\) ran with no layer registered"):
        s.step()
    s.register_layer(model[2])
    s.unregister_layer("2")
    with pytest.warns(WorkflowWarning, match="no layer registered"):
        s.step()


def test_registering_again_says_what_is_discarded() -> None:
    model = _model()
    s = _sparsifier(model)
    s.register_layer(model[2])
    with pytest.warns(WorkflowWarning, match=r"discards nothing yet \(no input was aggregated\)"):
        s.register_layer(model[2], sparsity_level=0.3)
    with torch.no_grad():
        model(torch.randn(4, 6))
    with pytest.warns(
        WorkflowWarning,
        match=r"layer '2' is already registered: .* discards its aggregated data and mask; "
        r".*update_config",
    ):
        s.register_layer(model[2], sparsity_level=0.3)
    with torch.no_grad():
        model(torch.randn(4, 6))
    s.register_layer(model[4])
    with pytest.warns(
        WorkflowWarning, match=r"layers '2', '4' are already registered: .* discards their"
    ):
        s.register_layers({nn.Linear: None}, missing_ok=True)


def test_the_warnings_are_user_warnings() -> None:
    assert issubclass(WorkflowWarning, UserWarning)
