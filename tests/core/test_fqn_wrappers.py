"""Names seen through wrappers (DDP's ``module.``, torch.compile's ``_orig_mod.``, FSDP)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actsparse.core import find_module, normalize_fqn


class Wrapper(nn.Module):
    """Holds the model under an attribute name that a real wrapper uses."""

    def __init__(self, attribute: str, inner: nn.Module) -> None:
        super().__init__()
        self.add_module(attribute, inner)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("module.1.1", "1.1"),
        ("_orig_mod.module.0", "0"),
        ("_fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.fc", "layers.0.fc"),
        ("encoder.block", "encoder.block"),
        ("", ""),
    ],
)
def test_normalize_fqn(raw: str, expected: str) -> None:
    assert normalize_fqn(raw) == expected


@pytest.mark.parametrize(
    "attribute", ["module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"]
)
def test_names_resolve_between_wrapped_and_plain(attribute: str) -> None:
    plain = _net()
    wrapped = Wrapper(attribute, _net())
    found = find_module(plain, f"{attribute}.1.1")
    assert found is not None
    assert found[0] == "1.1"
    assert found[1] is plain[1][1]
    back = find_module(wrapped, "1.1")
    assert back is not None
    assert back[0] == f"{attribute}.1.1"
    assert back[1] is getattr(wrapped, attribute)[1][1]


def test_compiled_model_reports_its_real_name() -> None:
    plain = _net()
    compiled = torch.compile(plain)
    found = find_module(compiled, "0")
    assert found is not None
    assert found == ("_orig_mod.0", plain[0])


def test_exact_name_wins_and_missing_or_ambiguous_is_none() -> None:
    plain = _net()
    assert find_module(plain, "0") == ("0", plain[0])
    assert find_module(plain, "module.7") is None
    both = nn.Module()
    both.add_module("module", nn.Linear(1, 1))
    both.add_module("_orig_mod", nn.Linear(1, 1))
    # both normalise to "" (the root) only through different modules: ambiguous
    inner = nn.Module()
    inner.add_module("a", both)
    assert find_module(inner, "a._fsdp_wrapped_module") is None
