"""The sparsifier under no_grad, inference_mode, autograd, train/eval, and after .to().

What is refused is refused with an error that names the layer; everything
else behaves as the plain model with masked inputs would.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import MaskError, StrategyError
from actsparse.hooks import ActivationSparsifier, WorkflowWarning

FEATURES = [None, [0, [2, 5]]]
FEATURE_IDS = ["whole input", "features"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.second = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.tanh(self.first(x)))
        return out


def _x(seed: int, batch: int = 4, requires_grad: bool = False) -> torch.Tensor:
    x = torch.randn(batch, 6, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def _setup(features: list[Any] | None) -> tuple[Net, ActivationSparsifier]:
    model = Net()
    s = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    extra = {} if features is None else {"features": features, "feature_dim": 1}
    s.register_layer(model.first, **extra)
    return model, s


def _full_mask(s: ActivationSparsifier, features: list[Any] | None, width: int = 6) -> torch.Tensor:
    """The first layer's mask spread over its whole input (ones where not selected)."""
    mask = s.get_mask("first")
    if features is None:
        return mask  # type: ignore[no-any-return]
    lead = torch.broadcast_shapes(*(m.shape[:-1] for m in mask))  # type: ignore[no-untyped-call]
    full = torch.ones(*lead, width)
    for feature, m in zip(features, mask, strict=True):
        index = torch.tensor([feature] if isinstance(feature, int) else feature)
        full[..., index] = m.expand(*lead, len(index))
    return full


def _reference(model: Net, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model with the first layer's input masked, computed without hooks."""
    first = nn.functional.linear(x * mask, model.first.weight, model.first.bias)
    return nn.functional.linear(torch.tanh(first), model.second.weight, model.second.bias)


def _calibrate(model: Net, s: ActivationSparsifier, *, requires_grad: bool = False) -> None:
    for seed in (1, 2, 3):
        model(_x(seed, requires_grad=requires_grad))
    s.step()


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_no_grad_calibration_and_application_match_grad_mode(features: list[Any] | None) -> None:
    model_a, a = _setup(features)
    with torch.no_grad():
        _calibrate(model_a, a)
    model_b, b = _setup(features)
    _calibrate(model_b, b, requires_grad=True)
    for left, right in zip(_list(a.get_mask("first")), _list(b.get_mask("first")), strict=True):
        assert torch.equal(left, right)
    a.squash_mask()
    b.squash_mask()
    x = _x(9)
    with torch.no_grad():
        out = model_a(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, model_b(x).detach())


def _list(mask: Any) -> list[torch.Tensor]:
    return list(mask) if isinstance(mask, list) else [mask]


def test_the_accumulator_holds_no_autograd_graph() -> None:
    model, s = _setup(None)
    model(_x(1, requires_grad=True))
    model(_x(2, requires_grad=True))
    data = s.data_groups["first"]["data"]
    assert not data.requires_grad
    assert data.grad_fn is None


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_gradients_flow_through_masked_inputs(features: list[Any] | None) -> None:
    model, s = _setup(features)
    _calibrate(model, s)
    s.squash_mask()
    mask = _full_mask(s, features)
    assert 0 < int((mask == 0).sum()) < mask.numel()

    x = _x(7, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None
    x_ref = _x(7, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_model = Net()
    with torch.no_grad():
        for p, w in zip(ref_model.parameters(), weights, strict=True):
            p.copy_(w)
    loss: torch.Tensor = _reference(ref_model, x_ref, mask).square().sum()
    loss.backward()  # type: ignore[no-untyped-call]
    assert x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad)
    # Masked-out inputs get no gradient; the layers' parameters get theirs.
    assert bool((x.grad[:, mask == 0] == 0).all())
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_calibration_does_not_change_gradients() -> None:
    model, s = _setup(None)
    x = _x(3, requires_grad=True)
    model(x).sum().backward()
    plain = Net()
    y = _x(3, requires_grad=True)
    plain(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(s.data_groups["first"]["data"], _x(3))


INFERENCE_STEPS = ["calibrate and step", "calibrate only", "first masked pass", "load_state_dict"]


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("in_inference", INFERENCE_STEPS)
def test_work_done_in_inference_mode_does_not_break_training_later(
    features: list[Any] | None, in_inference: str
) -> None:
    model, s = _setup(features)
    if in_inference == "calibrate and step":
        with torch.inference_mode():
            _calibrate(model, s)
    elif in_inference == "calibrate only":  # squash_mask() applies the ones placeholder
        with torch.inference_mode():
            model(_x(1))
    else:
        _calibrate(model, s)
    if in_inference == "load_state_dict":
        sd = s.state_dict()
        model = Net()
        s = ActivationSparsifier(model)
        with torch.inference_mode():
            s.load_state_dict(sd)
    with warnings.catch_warnings():  # "calibrate only" squashes the placeholder on purpose
        warnings.simplefilter("ignore", WorkflowWarning)
        s.squash_mask()
    if in_inference == "first masked pass":
        with torch.inference_mode():
            model(_x(4))
    for mask in _list(s.get_mask("first")):
        assert not mask.is_inference()

    x = _x(5, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        out = model(_x(5))
    torch.testing.assert_close(out, _reference(model, _x(5), _full_mask(s, features)))


def test_train_and_eval_switches_keep_hooks_and_state() -> None:
    model, s = _setup(None)
    hook = s.data_groups["first"]["hook"]
    model.eval()
    model(_x(1))
    model.train()
    model(_x(2))
    assert s.data_groups["first"]["hook"] is hook
    torch.testing.assert_close(s.data_groups["first"]["data"], _x(1) + _x(2))
    s.step()
    s.squash_mask()
    x = _x(3)
    model.eval()
    out_eval = model(x)
    model.train()
    torch.testing.assert_close(model(x), out_eval)
    torch.testing.assert_close(out_eval, _reference(model, x, s.get_mask("first")))


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_changing_the_dtype_after_squash_applies_the_mask_in_the_new_dtype(
    features: list[Any] | None, dtype: torch.dtype
) -> None:
    model, s = _setup(features)
    _calibrate(model, s)
    s.squash_mask()
    x = _x(6)
    model.to(dtype)
    out = model(x.to(dtype))
    assert out.dtype == dtype
    expected = _reference(model, x.to(dtype), _full_mask(s, features).to(dtype))
    torch.testing.assert_close(out, expected)
    model.float()  # and back: the applied mask follows again
    out = model(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _reference(model, x, _full_mask(s, features)))


def test_changing_the_dtype_during_calibration_promotes_the_accumulator() -> None:
    model, s = _setup(None)
    model(_x(1))
    model.double()
    model(_x(2).double())
    data = s.data_groups["first"]["data"]
    assert data.dtype == torch.float64
    torch.testing.assert_close(data, (_x(1) + _x(2)).double())
    s.step()
    mask = s.get_mask("first")
    assert int((mask == 0).sum()) == 3


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_moving_a_squashed_model_to_another_device_applies_the_mask_there(
    features: list[Any] | None,
) -> None:
    model, s = _setup(features)
    _calibrate(model, s)
    s.squash_mask()
    model.to("meta")
    out = model(_x(1).to("meta"))
    assert out.device.type == "meta"
    assert out.shape == (4, 3)


def test_moving_the_model_during_calibration_is_refused_and_keeps_the_data() -> None:
    model, s = _setup(None)
    model(_x(1))
    data = s.data_groups["first"]["data"].clone()
    model.to("meta")
    with pytest.raises(StrategyError, match="layer 'first': aggregate strategy 'sum'") as info:
        model(_x(2).to("meta"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert torch.equal(s.data_groups["first"]["data"], data)
    # The data stays usable: step() on it, and the masks follow the input's device.
    s.step()
    s.squash_mask()
    model.to("meta")
    assert model(_x(3).to("meta")).device.type == "meta"


def test_masks_cannot_be_computed_on_the_meta_device() -> None:
    model, s = _setup(None)
    model.to("meta")
    model(_x(1).to("meta"))
    with pytest.raises(MaskError, match=r"layer 'first': .*meta device"):
        s.step()
    assert s.data_groups["first"]["data"].device.type == "meta"


@pytest.mark.parametrize("features", FEATURES, ids=FEATURE_IDS)
def test_the_hooks_compile_without_graph_breaks(features: list[Any] | None) -> None:
    torch._dynamo.reset()
    model, s = _setup(features)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for seed in (1, 2):
        compiled(_x(seed))
    torch.testing.assert_close(s.data_groups["first"]["data"], _stack(features, _x(1) + _x(2)))
    s.step()
    s.squash_mask()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = _x(3)
    with torch.inference_mode():
        compiled(x)  # the applied mask is first built here...
    torch.testing.assert_close(compiled(x), _reference(model, x, _full_mask(s, features)))
    x.requires_grad_()
    compiled(x).sum().backward()  # ...and autograd can still save it
    assert x.grad is not None


def _stack(features: list[Any] | None, total: torch.Tensor) -> Any:
    if features is None:
        return total
    return [total[:, [f] if isinstance(f, int) else f] for f in features]
