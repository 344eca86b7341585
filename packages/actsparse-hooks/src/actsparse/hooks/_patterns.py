"""Register many layers in one call: rules that select layers by name pattern and type.

:meth:`ActivationSparsifier.register_layers` takes rules. A rule selects the
model's submodules whose fully qualified name matches a regular expression
(``re.fullmatch``) and/or whose type is one of the given ``nn.Module``
classes, and gives each the same configuration (the keyword arguments of
``register_layer``). Every rule is checked and every selected layer's
configuration is resolved before anything is registered; a layer selected by
two rules is an error that names both rules and the layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from torch import nn

from actsparse.core import ConfigError

__all__ = ["LayerRule", "match_rules", "to_rules"]


def _to_pattern(value: object) -> re.Pattern[str] | None:
    if value is None or isinstance(value, re.Pattern):
        return value
    if not isinstance(value, str):
        raise ConfigError(
            f"LayerRule.pattern must be a regular expression (str or re.Pattern) or None, "
            f"got {value!r}"
        )
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(f"LayerRule.pattern {value!r} is not a valid regex: {exc}") from None


def _to_types(value: object) -> tuple[type[nn.Module], ...] | None:
    if value is None:
        return None
    types = value if isinstance(value, tuple) else (value,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ConfigError(
            "LayerRule.module_type must be an nn.Module subclass or a non-empty tuple of "
            f"them, got {value!r}"
        )
    return types


def _to_config(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(
            f"LayerRule.config must be a mapping of register_layer keyword arguments, got {value!r}"
        )
    return dict(value)


@attrs.frozen
class LayerRule:
    """Select layers by name and/or type and give them one configuration.

    Attributes:
        pattern: A regular expression that the layer's fully qualified name
            must match entirely (``re.fullmatch``), or None for any name.
        module_type: An ``nn.Module`` subclass (or a tuple of them) the layer
            must be an instance of, or None for any type.
        config: The keyword arguments of ``register_layer`` for every
            selected layer: ``aggregate_fn``, ``reduce_fn``, ``mask_fn``,
            ``features``, ``feature_dim``; other keys go to ``sparse_config``.
    """

    pattern: re.Pattern[str] | None = attrs.field(default=None, converter=_to_pattern)
    module_type: tuple[type[nn.Module], ...] | None = attrs.field(default=None, converter=_to_types)
    config: dict[str, Any] = attrs.field(factory=dict, converter=_to_config)

    def __attrs_post_init__(self) -> None:
        if self.pattern is None and self.module_type is None:
            raise ConfigError(
                "LayerRule needs a pattern, a module_type or both; it would select every module"
            )

    def matches(self, name: str, module: nn.Module) -> bool:
        if self.pattern is not None and self.pattern.fullmatch(name) is None:
            return False
        return self.module_type is None or isinstance(module, self.module_type)

    def describe(self) -> str:
        """How the rule reads in messages."""
        parts = []
        if self.pattern is not None:
            parts.append(f"pattern={self.pattern.pattern!r}")
        if self.module_type is not None:
            names = ", ".join(t.__qualname__ for t in self.module_type)
            parts.append(f"module_type={names}")
        return f"rule({', '.join(parts)})"


def to_rules(rules: object) -> list[LayerRule]:
    """Normalise the ``rules`` argument of ``register_layers``.

    It is a mapping from selector to configuration (a selector is a regex
    string, an ``nn.Module`` subclass or a tuple of them; the configuration a
    mapping or None), or an iterable of :class:`LayerRule` objects and
    ``(selector, configuration)`` pairs.
    """
    items: Iterable[Any]
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, (str, bytes, LayerRule)) or not isinstance(rules, Iterable):
        raise ConfigError(
            "rules must be a mapping {selector: config} or a list of LayerRule objects and "
            f"(selector, config) pairs, got {rules!r}"
        )
    else:
        items = list(rules)
    out = []
    for position, item in enumerate(items):
        if isinstance(item, LayerRule):
            out.append(item)
            continue
        if not isinstance(item, tuple) or len(item) != 2:
            raise ConfigError(
                f"rules[{position}] must be a LayerRule or a (selector, config) pair, got {item!r}"
            )
        selector, config = item
        try:
            if isinstance(selector, (str, re.Pattern)):
                out.append(LayerRule(pattern=selector, config=config))
            else:
                out.append(LayerRule(module_type=selector, config=config))
        except ConfigError as exc:
            raise ConfigError(f"rules[{position}] (selector {selector!r}): {exc}") from None
    if not out:
        raise ConfigError("rules is empty: give at least one rule")
    return out


def match_rules(
    model: nn.Module, rules: list[LayerRule], *, missing_ok: bool
) -> list[tuple[str, nn.Module, LayerRule]]:
    """The model's submodules that the rules select, in ``named_modules`` order.

    Raises ConfigError when a layer is selected by two rules (naming both and
    the layer) or, unless ``missing_ok``, when a rule selects nothing.
    """
    chosen: dict[str, tuple[nn.Module, LayerRule]] = {}
    used = [False] * len(rules)
    for name, module in model.named_modules():
        for index, rule in enumerate(rules):
            if not rule.matches(name, module):
                continue
            used[index] = True
            if name in chosen:
                raise ConfigError(
                    f"layer {name!r} is selected by two rules: {chosen[name][1].describe()} "
                    f"and {rule.describe()}; make the rules exclusive"
                )
            chosen[name] = (module, rule)
    if not missing_ok:
        unused = [rule.describe() for rule, hit in zip(rules, used, strict=True) if not hit]
        if unused:
            raise ConfigError(
                f"{', '.join(unused)} selected no layer of the model; fix the rule or pass "
                "missing_ok=True"
            )
    return [(name, module, rule) for name, (module, rule) in chosen.items()]
