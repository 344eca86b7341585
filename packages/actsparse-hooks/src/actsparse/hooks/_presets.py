"""Named layer selections for :func:`~actsparse.hooks.sparsify`: which inputs to sparsify.

A preset is a list of :class:`~actsparse.hooks.LayerRule` objects, found by
the module names that common model families use (the names of Hugging Face
``transformers`` models, with any prefix such as ``bert.`` or ``model.``):

* ``"bert"``: BERT-style encoders, the inputs of the two MLP Linear layers of
  every block (``encoder.layer.N.intermediate.dense`` and
  ``encoder.layer.N.output.dense``, not the attention's ``output.dense``);
* ``"llama"``: Llama, Mistral and Qwen2-style decoders, the inputs of every
  projection of a block (TEAL's set): ``self_attn.q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj`` and ``mlp.gate_proj``, ``up_proj``, ``down_proj``.

``"auto"`` picks the one preset that selects layers of the model; when two or
more do, it refuses and names them, so that the choice is the user's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from torch import nn

from actsparse.core import ConfigError
from actsparse.hooks._patterns import LayerRule

__all__ = ["AUTO_PRESET", "PRESETS", "Preset", "resolve_layers"]

#: ``layers="auto"``: the one preset whose rules select layers of the model.
AUTO_PRESET = "auto"


@attrs.frozen
class Preset:
    """A named selection: one rule per pattern, each of ``nn.Linear`` layers."""

    name: str
    description: str
    patterns: tuple[str, ...]

    def rules(self) -> list[LayerRule]:
        return [LayerRule(pattern=p, module_type=nn.Linear) for p in self.patterns]

    def selects(self, model: nn.Module) -> bool:
        """Whether every rule selects at least one layer of ``model``."""
        rules = self.rules()
        hit = [False] * len(rules)
        for name, module in model.named_modules():
            for index, rule in enumerate(rules):
                hit[index] = hit[index] or rule.matches(name, module)
        return all(hit)

    def count(self, model: nn.Module) -> int:
        """How many layers of ``model`` the rules select."""
        rules = self.rules()
        return sum(
            any(rule.matches(name, module) for rule in rules)
            for name, module in model.named_modules()
        )


_PREFIX = r"(?:.*\.)?"

PRESETS: Mapping[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "bert",
            "BERT-style encoders: the MLP inputs (intermediate.dense, output.dense)",
            (_PREFIX + r"encoder\.layer\.\d+\.(?:intermediate|output)\.dense",),
        ),
        Preset(
            "llama",
            "Llama/Mistral/Qwen2-style decoders: the q/k/v, o, gate/up and down projection inputs",
            (
                _PREFIX + r"layers\.\d+\.self_attn\.(?:q|k|v|o)_proj",
                _PREFIX + r"layers\.\d+\.mlp\.(?:gate|up|down)_proj",
            ),
        ),
    )
}


def _listing() -> str:
    return "; ".join(f"{name!r}: {p.description}" for name, p in PRESETS.items())


def resolve_layers(model: nn.Module, layers: object) -> Mapping[Any, Any] | Iterable[Any]:
    """The rules for ``register_layers``: a preset's, or ``layers`` itself.

    Raises:
        ConfigError: An unknown preset name, a preset that selects no layer of
            ``model``, or ``"auto"`` when no preset or more than one does; the
            message lists the presets (those that match, for more than one).
    """
    if not isinstance(layers, str):
        if isinstance(layers, (Mapping, list, tuple)):
            return layers
        raise ConfigError(
            "layers must be a preset name ('auto', "
            f"{', '.join(map(repr, PRESETS))}) or register_layers() rules (a mapping "
            f"{{selector: config}} or a list), got {layers!r}"
        )
    if layers == AUTO_PRESET:
        found = [p for p in PRESETS.values() if p.selects(model)]
        if not found:
            raise ConfigError(
                "layers='auto': no preset matches the module names of this "
                f"{type(model).__name__}; presets: {_listing()}. Pass register_layers() "
                "rules instead, such as {r'encoder\\.layer\\.\\d+\\.mlp\\.fc\\d': None}"
            )
        if len(found) > 1:
            shown = ", ".join(f"{p.name!r} ({p.count(model)} layers)" for p in found)
            raise ConfigError(
                f"layers='auto': {len(found)} presets match the module names of this "
                f"{type(model).__name__}: {shown}; auto does not choose between them. Pick "
                f"one by name (layers={found[0].name!r}), or pass the rules of several "
                f"(layers=[{', '.join(f'*PRESETS[{p.name!r}].rules()' for p in found)}])"
            )
        return found[0].rules()
    preset = PRESETS.get(layers)
    if preset is None:
        raise ConfigError(
            f"unknown layer preset {layers!r}; presets: 'auto' (the one that matches the "
            f"model), {_listing()}"
        )
    if not preset.selects(model):
        matching = [p.name for p in PRESETS.values() if p.selects(model)]
        hint = f"; preset(s) that match: {', '.join(map(repr, matching))}" if matching else ""
        raise ConfigError(
            f"layer preset {layers!r} selects no layer of this {type(model).__name__} "
            f"(patterns: {', '.join(preset.patterns)}){hint}"
        )
    return preset.rules()
