"""sparsify(): threshold mode in one call, its presets, and the input it refuses.

The toy encoder is named like a BERT encoder so that the ``"bert"`` preset
finds it; its batches are mappings with an attention mask, as a tokenizer
gives them. The decoder tests build a tiny random Llama with ``transformers``
(skipped when it is not installed).
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.core import CalibrationWarning, ConfigError, UnknownStrategyError
from actsparse.hooks import PRESETS, ActivationSparsifier, sparsify


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(width, width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, 4 * width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.output.dense(x)
        return x + self.output.dense(torch.nn.functional.gelu(self.intermediate.dense(x)))


class Encoder(nn.Module):
    """``forward(x, attention_mask=None)``; padded positions hold large values, so that
    counting them would move every threshold."""

    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.encoder.layer:
            x = block(x)
        return x


def padded(batch: int = 6, length: int = 10, width: int = 16) -> dict[str, torch.Tensor]:
    lengths = torch.randint(3, length + 1, (batch,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = torch.randn(batch, length, width)
    x = torch.where(mask[..., None], x, 50 * torch.ones_like(x))
    return {"x": x, "attention_mask": mask.long()}


def model_and_batches(count: int = 6) -> tuple[Encoder, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    return Encoder().eval(), [padded() for _ in range(count)]


def hooked(model: nn.Module) -> list[str]:
    """The modules that carry a hook or a replaced forward."""
    return [
        name
        for name, module in model.named_modules()
        if module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__
    ]


BERT_MLP = [
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.0.output.dense",
    "encoder.layer.1.intermediate.dense",
    "encoder.layer.1.output.dense",
]


def real_token_sparsity(model: nn.Module, names: list[str], batches: list[Any]) -> float:
    zeros = total = 0
    current: dict[str, torch.Tensor] = {}

    def count(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal zeros, total
        real = args[0][current["mask"]]
        zeros += int((real == 0).sum())
        total += real.numel()

    handles = [model.get_submodule(n).register_forward_pre_hook(count) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return zeros / total


def test_one_call_returns_a_squashed_sparsifier_at_the_target() -> None:
    model, batches = model_and_batches()
    sparsifier = sparsify(model, batches, target=0.5)
    assert isinstance(sparsifier, ActivationSparsifier)
    assert list(sparsifier.thresholds) == BERT_MLP  # the attention's output.dense is not selected
    assert all(g["hook_state"] == "sparsify" for g in sparsifier.data_groups.values())
    assert sorted(hooked(model)) == BERT_MLP
    torch.manual_seed(1)
    fresh = [padded() for _ in range(6)]
    assert abs(real_token_sparsity(model, BERT_MLP, fresh) - 0.5) < 0.03


def test_the_attention_mask_becomes_the_valid_positions() -> None:
    model, batches = model_and_batches()
    by_hand = ActivationSparsifier(
        model, aggregate_fn="abs_histogram", reduce_fn="identity", mask_fn="target_threshold"
    )
    by_hand.register_layers({PRESETS["bert"].patterns[0]: {"sparsity_level": 0.4}})
    with torch.no_grad():
        for batch in batches:
            with by_hand.valid_positions(batch["attention_mask"].bool()):
                model(**batch)
    by_hand.step()
    expected = by_hand.thresholds
    for name in list(expected):
        by_hand.unregister_layer(name)

    got = sparsify(model, batches, target=0.4, layers="bert", allocation="uniform")
    assert got.thresholds == expected
    # the padding holds 50s: counted, they would have moved every threshold
    counted = sparsify(
        Encoder().eval(), [b["x"] for b in batches], target=0.4, layers="bert"
    ).thresholds
    assert all(counted[n].threshold != expected[n].threshold for n in expected)


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_batches_may_be_tensors_tuples_or_dicts(form: str) -> None:
    model, batches = model_and_batches(3)
    shaped = {
        "tensor": [b["x"] for b in batches],
        "tuple": [(b["x"],) for b in batches],
        "list": [[b["x"]] for b in batches],
        "dict": [{"x": b["x"]} for b in batches],
    }[form]
    sparsifier = sparsify(model, iter(shaped), target=0.3)  # any iterable, once
    assert set(sparsifier.thresholds) == set(BERT_MLP)


def test_greedy_allocation_meets_the_model_wide_target() -> None:
    model, batches = model_and_batches()
    sparsifier = sparsify(model, batches, target=0.5, allocation="greedy")
    levels = {n: r.target for n, r in sparsifier.thresholds.items()}
    widths = {n: model.get_submodule(n).in_features for n in levels}
    mean = sum(widths[n] * levels[n] for n in levels) / sum(widths.values())
    assert math.isclose(mean, 0.5, abs_tol=1e-9)
    assert len(set(levels.values())) > 1
    assert sorted(hooked(model)) == BERT_MLP


def _non_finite_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, int]:
    """How many non-finite values each layer's input holds when the model runs on ``x``."""
    counts = dict.fromkeys(names, 0)
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: counts.__setitem__(name, int((~a[0].isfinite()).sum()))
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return counts


def _finite_sparsity(model: nn.Module, names: list[str], x: torch.Tensor) -> float:
    """The share of zeros among the finite input entries of the layers, on ``x``."""
    zeros = total = 0

    def count(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal zeros, total
        finite = args[0][args[0].isfinite()]
        zeros += int((finite == 0).sum())
        total += finite.numel()

    handles = [model.get_submodule(name).register_forward_pre_hook(count) for name in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return zeros / total


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_calibration_value_is_skipped_counted_and_named(bad: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16)  # 512 entries, one of them bad
    x[1, 2, 3] = bad
    torch.manual_seed(0)
    counts = _non_finite_inputs(Encoder().eval(), BERT_MLP, x)
    assert all(counts.values())  # the bad value reaches every layer
    reached = {}
    for allocation in ("uniform", "greedy"):
        torch.manual_seed(0)
        model = Encoder().eval()
        with pytest.warns(CalibrationWarning) as caught:
            sparsifier = sparsify(model, [x], target=0.5, allocation=allocation)
        text = " ".join(str(w.message) for w in caught if w.category is CalibrationWarning)
        for name, count in counts.items():
            assert re.search(rf"{re.escape(name)}'? \({count} non-finite", text), text
        levels = {n: r.target for n, r in sparsifier.thresholds.items()}
        widths = {n: model.get_submodule(n).in_features for n in levels}
        mean = sum(widths[n] * levels[n] for n in levels) / sum(widths.values())
        assert math.isclose(mean, 0.5, abs_tol=1e-9), levels
        reached[allocation] = _finite_sparsity(model, BERT_MLP, x)
    assert reached["uniform"] == pytest.approx(0.5, abs=0.02), reached
    assert reached["greedy"] == pytest.approx(0.5, abs=0.02), reached


def test_rules_select_layers_like_register_layers() -> None:
    model, batches = model_and_batches(2)
    sparsifier = sparsify(model, batches, target=0.25, layers={nn.Linear: None})
    assert len(sparsifier.thresholds) == 6


# ------------------------------------------------------------------ bad input


def _refused(model: nn.Module, batches: Any, error: type[Exception], match: str, **kw: Any) -> None:
    kw.setdefault("target", 0.5)
    with pytest.raises(error, match=match):
        sparsify(model, batches, **kw)
    assert hooked(model) == []


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, math.nan, True, "0.5", None])
def test_a_target_outside_0_1_is_refused(target: Any) -> None:
    model, batches = model_and_batches(1)
    _refused(model, batches, ConfigError, "target must be a sparsity in", target=target)


def test_no_batches_are_refused() -> None:
    model, _ = model_and_batches(0)
    _refused(model, [], ConfigError, "calibration_batches is empty")
    _refused(model, iter(()), ConfigError, "calibration_batches is empty")
    _refused(model, torch.ones(2, 3, 16), ConfigError, "wrap a single batch in a list")


def test_a_batch_the_model_rejects_is_refused_before_hooks() -> None:
    model, batches = model_and_batches(2)
    bad = [{"y": b["x"]} for b in batches]
    with pytest.raises(ConfigError, match="the model rejects the first calibration batch") as info:
        sparsify(model, bad, target=0.5)
    assert isinstance(info.value.__cause__, TypeError)
    assert hooked(model) == []


def test_a_model_that_raises_mid_calibration_keeps_no_hook() -> None:
    model, batches = model_and_batches(4)
    calls = 0

    def fail_in_calibration(module: nn.Module, args: Any, kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 6:  # after the 4 probe examples' references and one calibration batch
            raise RuntimeError("out of memory, say")

    handle = model.register_forward_pre_hook(fail_in_calibration, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        sparsify(model, batches, target=0.5)
    handle.remove()
    assert hooked(model) == []


def test_unknown_and_unmatched_presets_list_the_presets() -> None:
    model, batches = model_and_batches(1)
    _refused(
        model, batches, ConfigError, "unknown layer preset 'gpt'.*'bert'.*'llama'", layers="gpt"
    )
    _refused(model, batches, ConfigError, "preset 'llama' selects no layer.*'bert'", layers="llama")
    plain = nn.Sequential(nn.Linear(4, 4))
    _refused(plain, [torch.ones(2, 4)], ConfigError, "no preset matches.*'bert'.*'llama'")
    _refused(plain, [torch.ones(2, 4)], ConfigError, "must be a preset name", layers=3)


class TwoFamilies(nn.Module):
    """An encoder block named as "bert" expects beside a decoder block named as "llama"
    expects: both presets match."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.encoder = Encoder(width, depth=1).encoder
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.layers[0].self_attn, name, nn.Linear(width, width))
        self.layers[0].mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.layers[0].mlp, name, nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder.layer[0](x)
        attention, mlp = self.layers[0].self_attn, self.layers[0].mlp
        x = x + attention.o_proj(attention.q_proj(x) + attention.k_proj(x) + attention.v_proj(x))
        return x + mlp.down_proj(mlp.gate_proj(x) * mlp.up_proj(x))


def test_auto_refuses_a_model_that_two_presets_match_and_names_both() -> None:
    model = TwoFamilies()
    batches = [torch.randn(4, 3, 8)]
    _refused(
        model,
        batches,
        ConfigError,
        r"layers='auto'.*'bert' \(2 layers\).*'llama' \(7 layers\).*layers='bert'",
    )
    # naming one preset picks it; rules pick both
    assert len(sparsify(model, batches, target=0.5, layers="llama").thresholds) == 7
    both = TwoFamilies()
    rules = [*PRESETS["bert"].rules(), *PRESETS["llama"].rules()]
    assert len(sparsify(both, batches, target=0.5, layers=rules).thresholds) == 9


def test_rules_that_select_nothing_are_refused() -> None:
    model, batches = model_and_batches(1)
    _refused(model, batches, ConfigError, "selected no layer", layers={r"nothing\.here": None})


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"kernel": "no_such_kernel"}, UnknownStrategyError, "no_such_kernel"),
        ({"kernel": 3}, ConfigError, "kernel must be"),
        ({"allocation": "best"}, ConfigError, "allocation must be one of"),
        ({"probe_examples": 0}, ConfigError, "probe_examples"),
        ({"mask_fn": "magnitude"}, ConfigError, "not a threshold strategy.*weighted_threshold"),
        ({"mask_fn": "no_such_mask"}, UnknownStrategyError, "no_such_mask"),
        ({"progress": "yes"}, ConfigError, "progress must be"),
    ],
)
def test_bad_options_are_refused_before_anything(kw: Any, error: type, match: str) -> None:
    model, batches = model_and_batches(1)
    _refused(model, batches, error, match, **kw)


def test_not_a_model_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module"):
        sparsify(object(), [torch.ones(1)], target=0.5)  # type: ignore[arg-type]


# ----------------------------------------------------------- decoder presets


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, batch: int = 3, length: int = 12) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(count):
        lengths = torch.randint(4, length + 1, (batch,))
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = torch.randint(0, 64, (batch, length)) * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


LLAMA_SUFFIXES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def test_the_llama_preset_selects_teals_projections() -> None:
    model = tiny_llama()
    torch.manual_seed(0)
    batches = token_batches(4)
    sparsifier = sparsify(model, batches, target=0.4)  # "auto" finds the decoder preset
    expected = {f"model.layers.{i}.{s}" for i in range(2) for s in LLAMA_SUFFIXES}
    assert set(sparsifier.thresholds) == expected
    # a layer the allocation left at 0% zeroes nothing and runs without a hook
    zeroing = {n for n, r in sparsifier.thresholds.items() if r.threshold > 0}
    assert zeroing
    assert sorted(hooked(model)) == sorted(zeroing)
    names = sorted(expected)
    got = real_token_sparsity(model, names, token_batches(4))
    assert abs(got - 0.4) < 0.06, got


def test_the_llama_preset_by_name_with_greedy_allocation() -> None:
    model = tiny_llama()
    torch.manual_seed(0)
    sparsifier = sparsify(model, token_batches(3), target=0.5, layers="llama", allocation="greedy")
    levels = {n: r.target for n, r in sparsifier.thresholds.items()}
    widths = {n: model.get_submodule(n).in_features for n in levels}
    mean = sum(widths[n] * levels[n] for n in levels) / sum(widths.values())
    assert math.isclose(mean, 0.5, abs_tol=1e-9)
    with torch.no_grad():
        out = model(**token_batches(1)[0]).logits
    assert torch.isfinite(out).all()


def test_the_bert_preset_refuses_a_decoder() -> None:
    model = tiny_llama()
    _refused(
        model,
        token_batches(1),
        ConfigError,
        "preset 'bert' selects no layer.*'llama'",
        layers="bert",
    )


# ------------------------------------------------------------ score, compensation


def test_by_default_every_layer_compensates_its_zeros() -> None:
    model, batches = model_and_batches()
    state = sparsify(model, batches, target=0.5).state_dict()["state"]
    assert sorted(state) == BERT_MLP
    widths = {n: model.get_submodule(n).in_features for n in BERT_MLP}
    assert all(state[n]["offset"].shape == (widths[n],) for n in BERT_MLP)

    plain, batches = model_and_batches()
    state = sparsify(plain, batches, target=0.5, compensate=False).state_dict()["state"]
    assert all("offset" not in entry for entry in state.values())


def test_mask_fn_chooses_the_score() -> None:
    model, batches = model_and_batches()
    sparsifier = sparsify(model, batches, target=0.5, mask_fn="weighted_threshold")
    assert {g["mask_fn"] for g in sparsifier.data_groups.values()} == {"weighted_threshold"}
    plain, batches = model_and_batches()
    other = sparsify(plain, batches, target=0.5, allocation="uniform")
    weighted, batches = model_and_batches()
    same = sparsify(
        weighted, batches, target=0.5, allocation="uniform", mask_fn="weighted_threshold"
    )
    assert other.thresholds != same.thresholds


def test_greedy_levels_lie_around_the_target() -> None:
    from actsparse.hooks._sparsify import greedy_levels

    assert greedy_levels(0.4) == [0.2, 0.4, 0.6, 0.8]
    assert greedy_levels(0.6) == [0.3, 0.6, 0.9, 0.95]
    model, batches = model_and_batches()
    levels = [r.target for r in sparsify(model, batches, target=0.3).thresholds.values()]
    assert max(levels) <= 0.6 + 1e-9  # twice the target at most; a layer may stay at 0


def test_compensate_must_be_a_bool() -> None:
    model, batches = model_and_batches(1)
    _refused(model, batches, ConfigError, "compensate must be True or False", compensate="yes")


def test_the_probe_examples_are_the_first_rows_of_the_first_batches() -> None:
    from actsparse.hooks._sparsify import probe_set

    x = torch.arange(12.0).reshape(6, 2)
    batches = [{"x": x[:3], "attention_mask": torch.ones(3, 2)}, {"x": x[3:], "n": 7}]
    got = probe_set(batches, 5)
    assert [b["x"].tolist() for b in got] == [x[:3].tolist(), x[3:5].tolist()]
    assert got[1]["n"] == 7  # what is not a tensor passes through
    assert [t.shape[0] for t in probe_set([x, x], 4)] == [4]
    assert [t[0].shape[0] for t in probe_set([(x,), (x,)], 8)] == [6, 2]
    assert probe_set([torch.tensor(1.0)], 3)[0].ndim == 0  # no batch dimension: whole


def _level_threshold(histogram: Any, level: float) -> Any:
    """The built-in ``target_threshold``, under a target key of its own (``level``)."""
    from actsparse.masks._histogram import target_threshold

    return target_threshold(histogram, sparsity_level=level)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_a_third_party_threshold_gets_the_target_under_its_own_key(allocation: str) -> None:
    import types

    from actsparse.core import MaskStrategy, hookimpl, register_plugin, unregister_plugin

    @hookimpl
    def actsparse_mask_strategies() -> list[MaskStrategy]:
        return [
            MaskStrategy(
                name="level_threshold",
                fn=_level_threshold,
                params={"level"},
                required={"level"},
                dynamic=True,
                target_key="level",
            )
        ]

    name = register_plugin(
        types.SimpleNamespace(actsparse_mask_strategies=actsparse_mask_strategies),
        name="level-threshold",
    )
    try:
        model, batches = model_and_batches()
        sparsifier = sparsify(
            model,
            batches,
            target=0.5,
            mask_fn="level_threshold",
            allocation=allocation,
            compensate=False,
        )
        for name_ in sparsifier.thresholds:
            assert sparsifier.data_groups[name_]["sparse_config"]["level"] > 0
            assert "sparsity_level" not in sparsifier.data_groups[name_]["sparse_config"]
        assert real_token_sparsity(model, hooked(model), batches) == pytest.approx(0.5, abs=0.05)
    finally:
        unregister_plugin(name=name)
