"""Fully qualified names of submodules."""

from __future__ import annotations

from torch import nn

__all__ = ["fqn_to_module", "module_to_fqn"]


def module_to_fqn(model: nn.Module, module: nn.Module, prefix: str = "") -> str | None:
    """Return the fully qualified name of ``module`` inside ``model``, or None.

    The model itself is ``""``; a module reachable by several paths gets the
    first one in registration order, as ``named_modules`` would list it.
    """
    if module is model:
        return ""
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return f"{prefix}{name}"
    return None


def fqn_to_module(model: nn.Module | None, path: str) -> nn.Module | None:
    """Return the submodule (or tensor attribute) at ``path``, or None if there is none."""
    target: object = model
    if path:
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                return None
    return target  # type: ignore[return-value]
