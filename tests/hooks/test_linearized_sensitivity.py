"""linearized_sensitivity(): each layer's error estimated from backward passes, and the
cost of sparsify()'s greedy allocations in passes over the model."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import ConfigError
from actsparse.hooks import (
    ActivationSparsifier,
    allocate_greedy,
    layer_sensitivity,
    linearized_sensitivity,
    sparsify,
)
from actsparse.hooks._sparsify import GREEDY_PROJECTIONS, greedy_levels, single_examples


def calibrated(
    model: nn.Module, batches: list[torch.Tensor], *, sums: bool = False
) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model,
        aggregate_fn="abs_histogram",
        reduce_fn="identity",
        mask_fn="target_threshold",
        **({"feature_sums": True} if sums else {}),
    )
    sparsifier.register_layers({nn.Linear: {"sparsity_level": 0.5}})
    with torch.no_grad():
        for batch in batches:
            model(batch)
    sparsifier.step()
    sparsifier.squash_mask()
    return sparsifier


def linear_stack() -> tuple[nn.Sequential, nn.Sequential, list[torch.Tensor]]:
    """Three Linears with no nonlinearity between them: each layer's output reaches the
    model's output linearly, so the second-order estimate is the exact error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 6))
    with torch.no_grad():
        model[1].weight.mul_(0.1)
        model[3].weight.mul_(3.0)
    return model.eval(), copy.deepcopy(model), [torch.randn(64, 24) for _ in range(3)]


class Doubled(nn.Linear):
    """A Linear whose forward is its own (twice the product): not a plain nn.Linear, so
    the estimate runs it alone at each level instead of reading its input's change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    ("sums", "doubled"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["plain", "compensated", "a-module-run-alone", "compensated-and-run-alone"],
)
def test_on_a_linear_model_the_estimate_is_the_measured_error(sums: bool, doubled: bool) -> None:
    model, dense, batches = linear_stack()
    if doubled:  # the middle layer, halved so that the model computes the same function
        twin = Doubled(24, 24)
        with torch.no_grad():
            twin.weight.copy_(model[2].weight / 2)
            twin.bias.copy_(model[2].bias / 2)
        model[2] = twin
    sparsifier = calibrated(model, batches, sums=sums)
    probes = [torch.randn(8, 24) for _ in range(6)]
    references = [dense(p).detach() for p in probes]
    scale = sum(float(r.pow(2).sum()) for r in references)

    def error() -> float:
        with torch.no_grad():
            pairs = zip(probes, references, strict=True)
            return sum(float((model(p) - r).pow(2).sum()) for p, r in pairs) / scale

    levels = [0.25, 0.5, 0.75]
    exact = layer_sensitivity(sparsifier, error, levels)
    estimated = linearized_sensitivity(sparsifier, model, probes, levels, projections=600)
    assert set(estimated) == {"1", "2", "3"}
    for name, row in exact.items():
        assert estimated[name][0.0] == 0.0
        for level in levels:
            assert estimated[name][level] == pytest.approx(row[level], rel=0.15), (name, level)
    # the damped first layer is the cheapest, the amplified last one the dearest
    assert estimated["1"][0.5] < estimated["2"][0.5] < estimated["3"][0.5]


def test_a_plain_linear_is_never_run_alone() -> None:
    # its estimate comes from the gradient at its input: one call per probe, in the
    # probe's forward pass, whatever the number of levels
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    calls = dict.fromkeys(("1", "2", "3"), 0)

    def count(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            calls[name] += 1

        return hook

    for name in calls:
        model.get_submodule(name).register_forward_pre_hook(count(name))
    probes = [torch.randn(4, 24) for _ in range(3)]
    linearized_sensitivity(sparsifier, model, probes, [0.25, 0.5, 0.75], projections=2)
    assert calls == dict.fromkeys(("1", "2", "3"), len(probes))


def test_the_thresholds_and_hooks_are_as_before_and_no_gradient_is_left() -> None:
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    sparsifier.retarget({"1": 0.3, "2": 0.6})
    before = {n: (r.target, r.threshold) for n, r in sparsifier.thresholds.items()}

    def hooks() -> dict[str, tuple[int, int]]:
        return {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        }

    attached = hooks()
    linearized_sensitivity(sparsifier, model, [torch.randn(4, 24)], [0.5], projections=2)
    assert {n: (r.target, r.threshold) for n, r in sparsifier.thresholds.items()} == before
    assert hooks() == attached
    assert all(p.grad is None for p in model.parameters())


def test_parameters_that_need_no_gradient_still_give_an_estimate() -> None:
    model, _, batches = linear_stack()
    model.requires_grad_(False)
    sparsifier = calibrated(model, batches)
    table = linearized_sensitivity(sparsifier, model, [torch.randn(4, 24)], [0.5], projections=2)
    assert all(row[0.5] > 0 for row in table.values())


def test_the_same_seed_gives_the_same_table() -> None:
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    probes = [torch.randn(4, 24)]
    first = linearized_sensitivity(sparsifier, model, probes, [0.5], seed=3)
    assert linearized_sensitivity(sparsifier, model, probes, [0.5], seed=3) == first
    assert linearized_sensitivity(sparsifier, model, probes, [0.5], seed=4) != first


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"projections": 0}, "projections must be a positive int"),
        ({"projections": True}, "projections must be a positive int"),
        ({"levels": []}, "levels must be a non-empty list"),
        ({"layers": ["nope"]}, "'nope' are not"),
    ],
)
def test_bad_arguments_are_refused(kw: dict[str, Any], match: str) -> None:
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    args: dict[str, Any] = {"levels": [0.5], **kw}
    with pytest.raises(ConfigError, match=match):
        linearized_sensitivity(sparsifier, model, [torch.randn(4, 24)], **args)


def test_an_output_that_does_not_depend_on_the_layers_is_refused() -> None:
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    before = {n: r.target for n, r in sparsifier.thresholds.items()}
    with pytest.raises(ConfigError, match="depends on the layers"):
        linearized_sensitivity(sparsifier, lambda batch: torch.ones(3), [torch.randn(4, 24)], [0.5])
    assert {n: r.target for n, r in sparsifier.thresholds.items()} == before


def test_the_greedy_levels_on_the_estimate_spend_sparsity_where_it_costs_least() -> None:
    model, dense, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    probes = [torch.randn(8, 24) for _ in range(4)]
    table = linearized_sensitivity(sparsifier, model, probes, [0.25, 0.5, 0.75, 1.0])
    levels = allocate_greedy(table, 0.5, dict.fromkeys(table, 1.0))
    assert levels["1"] > levels["2"] > levels["3"]
    held_out = torch.randn(256, 24)

    def error() -> float:
        with torch.no_grad():
            return float((model(held_out) - dense(held_out)).pow(2).mean())

    sparsifier.retarget(levels)
    greedy = error()
    sparsifier.retarget(dict.fromkeys(levels, 0.5))
    assert greedy < error()


def test_single_examples_cut_every_tensor_along_the_batch() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    cut = single_examples({"x": x, "attention_mask": torch.ones(3, 2), "n": 1})
    assert [b["x"].tolist() for b in cut] == [[[0.0, 1.0]], [[2.0, 3.0]], [[4.0, 5.0]]]
    assert all(b["n"] == 1 for b in cut)
    assert [t.tolist() for t in single_examples((x,))[1]] == [[[2.0, 3.0]]]
    scalar = torch.tensor(1.0)
    assert single_examples(scalar) == [scalar]


class Counting(nn.Module):
    """Three Linears between two more; it counts its forward calls and the backward
    passes through its output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, 4)
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        h = self.embed(x)
        for layer in self.layers:
            h = torch.relu(layer(h)) + h
        out = self.head(h)
        if out.requires_grad:
            out.register_hook(lambda g: setattr(self, "backwards", self.backwards + 1))
        return out


@pytest.mark.parametrize("allocation", ["greedy", "greedy_exact", "uniform"])
def test_the_passes_follow_the_documented_cost_model(allocation: str) -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    batches = [torch.randn(3, 5, 8) for _ in range(4)]
    probe_examples = 4  # cut into 4 probes of one example: 3 from the first batch, 1 after
    sparsify(
        model,
        batches,
        target=0.5,
        layers={r"layers\.\d": None},
        allocation=allocation,
        probe_examples=probe_examples,
    )
    levels = len(greedy_levels(0.5))
    calibration = len(batches)
    if allocation == "uniform":
        assert (model.forwards, model.backwards) == (1 + calibration, 0)  # dry run, calibration
        return
    references = probe_examples  # the dense outputs, once per probe
    check = 2 * probe_examples  # the greedy levels against uniform, on the probes
    if allocation == "greedy":
        sensitivity = probe_examples  # one forward pass with its graph per probe
        assert model.backwards == GREEDY_PROJECTIONS * probe_examples
    else:
        sensitivity = (1 + levels * 3) * probe_examples  # 3 layers
        assert model.backwards == 0
    assert model.forwards == references + calibration + sensitivity + check
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randn(1, 5, 8)).sum()))


def test_the_kl_estimate_follows_the_measured_kl_divergence() -> None:
    from actsparse.hooks._sparsify import OutputError

    model, dense, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    probes = [torch.randn(8, 24) for _ in range(6)]
    error = OutputError(model, probes, [dense(p).detach() for p in probes], "kl")
    levels = [0.1, 0.2]
    exact = layer_sensitivity(sparsifier, error, levels)
    estimated = linearized_sensitivity(
        sparsifier, model, probes, levels, projections=800, divergence="kl"
    )
    for name, row in exact.items():
        for level in levels:
            assert row[level] > 0
            assert estimated[name][level] == pytest.approx(row[level], rel=0.3), (name, level)


def test_kl_leaves_out_the_positions_whose_reference_is_not_finite() -> None:
    from actsparse.hooks._sparsify import OutputError

    model = nn.Linear(4, 5)
    x = torch.randn(3, 4)
    reference = model(x).detach()
    reference[1, 2] = math.inf
    error = OutputError(model, [x], [reference], "kl")
    assert error.skipped == 1
    assert error() == pytest.approx(0.0, abs=1e-6)  # rows 0 and 2 match; row 1 is out
    with torch.no_grad():
        model.bias.add_(torch.arange(5.0))
    assert error() > 0


def test_transformers_logits_are_measured_by_kl_other_outputs_by_squared_error() -> None:
    transformers = pytest.importorskip("transformers")
    from actsparse.hooks._sparsify import divergence_of

    logits = torch.randn(1, 3, 7)
    assert divergence_of(transformers.modeling_outputs.CausalLMOutput(logits=logits)) == "kl"
    hidden = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=logits)
    assert divergence_of(hidden) == "squared"
    assert divergence_of(logits) == "squared"
    assert divergence_of((logits,)) == "squared"


def test_an_unknown_divergence_is_refused() -> None:
    model, _, batches = linear_stack()
    sparsifier = calibrated(model, batches)
    with pytest.raises(ConfigError, match="divergence must be one of 'squared', 'kl'"):
        linearized_sensitivity(sparsifier, model, [torch.randn(4, 24)], [0.5], divergence="l1")


@pytest.mark.parametrize("allocation", ["greedy", "greedy_exact"])
def test_a_two_layer_llama_costs_the_documented_passes(allocation: str) -> None:
    pytest.importorskip("transformers")
    import _text_models

    model = _text_models.tiny_llama()
    batches = _text_models.token_batches(3, batch=4)
    counts = {"forward": 0, "backward": 0}

    def forward(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        counts["forward"] += 1
        if out.logits.requires_grad:
            out.logits.register_hook(
                lambda g: counts.__setitem__("backward", counts["backward"] + 1)
            )

    model.register_forward_hook(forward, with_kwargs=True)
    sparsifier = sparsify(model, batches, target=0.5, allocation=allocation)
    layers = len(sparsifier.thresholds)
    assert layers == 14
    probes, levels = 4, len(greedy_levels(0.5))  # probe_examples=4: the first batch's rows
    passes = {
        "greedy": (3 + probes + probes + 2 * probes, GREEDY_PROJECTIONS * probes),
        "greedy_exact": (3 + probes + (1 + levels * layers) * probes + 2 * probes, 0),
    }[allocation]
    assert (counts["forward"], counts["backward"]) == passes
