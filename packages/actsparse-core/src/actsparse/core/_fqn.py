"""Fully qualified names of submodules."""

from __future__ import annotations

from torch import nn

__all__ = ["WRAPPER_ATTRIBUTES", "find_module", "fqn_to_module", "module_to_fqn", "normalize_fqn"]


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


#: Attribute names under which wrappers keep the wrapped model: DistributedDataParallel
#: and DataParallel (``module``), ``torch.compile`` (``_orig_mod``), FSDP
#: (``_fsdp_wrapped_module``) and activation checkpointing (``_checkpoint_wrapped_module``).
WRAPPER_ATTRIBUTES = frozenset(
    {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
)


def normalize_fqn(fqn: str) -> str:
    """``fqn`` without the path components that wrappers insert.

    ``"module._orig_mod.encoder.0"`` becomes ``"encoder.0"``.
    """
    return ".".join(part for part in fqn.split(".") if part and part not in WRAPPER_ATTRIBUTES)


def find_module(model: nn.Module, fqn: str) -> tuple[str, nn.Module] | None:
    """Find the submodule that ``fqn`` names, looking through wrapper prefixes.

    An exact match wins. Otherwise the names are compared without wrapper
    components, so a name taken from a DDP-wrapped or compiled model finds the
    layer in the plain model and the other way round. Returns the name the
    module has in ``model`` and the module, or None when there is no single match.
    """
    exact = fqn_to_module(model, fqn)
    if isinstance(exact, nn.Module):
        # Wrappers forward attribute access: report the name the module really has.
        canonical = module_to_fqn(model, exact)
        return (fqn if canonical is None else canonical), exact
    wanted = normalize_fqn(fqn)
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if normalize_fqn(name) == wanted:
            found.setdefault(id(module), (name, module))
    if len(found) != 1:
        return None
    return next(iter(found.values()))
