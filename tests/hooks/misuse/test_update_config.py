"""Misuse of update_config() and of the sparse_config copy that data_groups shows."""

from __future__ import annotations

from _misuse_table import (
    Misuse,
    Net,
    Scenario,
    after,
    calibrated,
    check_misuse,
    make,
    misuse_table,
    registered,
    sample,
    squashed,
    stepped,
)

from actsparse.core import ConfigError, LayerNotFoundError, StateError
from actsparse.hooks import ActivationSparsifier


def _streaming_calibrated() -> tuple[Net, ActivationSparsifier]:
    """Both layers with the streaming abs_mean aggregate, after one forward pass."""
    model, s = make(aggregate_fn="abs_mean", reduce_fn="identity")
    s.register_layer(model.first)
    s.register_layer(model.second)
    model(sample())
    return model, s


def _detached() -> Scenario:
    model, s = stepped()
    s.squash_mask(attach_sparsify_hook=False)
    return model, s, lambda: s.update_config("first", sparsity_level=0.2)


CASES: dict[str, Misuse] = {
    "an unregistered name": Misuse(
        lambda: after(calibrated, lambda m, s: s.update_config("third", sparsity_level=0.2)),
        LayerNotFoundError,
        KeyError,
        r"no layer named 'third' is registered \(registered: 'first', 'second'\)",
    ),
    "a value the strategy refuses": Misuse(
        lambda: after(calibrated, lambda m, s: s.update_config("first", sparsity_level="0.2")),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'magnitude': sparsity_level must be "
        r"a number in \[0, 1\], got '0.2'",
    ),
    "a key the strategies do not accept": Misuse(
        lambda: after(calibrated, lambda m, s: s.update_config("first", level=0.2)),
        ConfigError,
        ValueError,
        r"layer 'first': sparse_config for mask strategy 'magnitude' has unknown key\(s\) 'level'",
    ),
    "a configuration key": Misuse(
        lambda: after(calibrated, lambda m, s: s.update_config("first", mask_fn="topk")),
        ConfigError,
        ValueError,
        r"layer 'first': update_config\(\) sets sparse_config keys; 'mask_fn' belong",
    ),
    "a squashed layer": Misuse(
        lambda: after(squashed, lambda m, s: s.update_config("first", sparsity_level=0.2)),
        StateError,
        RuntimeError,
        r"layer 'first' is squashed \(hook_state='sparsify'\)",
    ),
    "a layer squashed without hooks": Misuse(
        _detached,
        StateError,
        RuntimeError,
        r"hook_state='None'",
    ),
    "an aggregate key while the layer holds data": Misuse(
        lambda: after(
            _streaming_calibrated, lambda m, s: s.update_config("first", sample_dims=[0])
        ),
        StateError,
        RuntimeError,
        r"layer 'first': changing sample_dims=None -> \[0\] would invalidate the aggregated "
        r"data, which aggregate strategy 'abs_mean' built",
    ),
    "editing the copy in data_groups": Misuse(
        lambda: after(
            calibrated,
            lambda m, s: s.data_groups["first"]["sparse_config"].__setitem__("sparsity_level", 0.2),
        ),
        ConfigError,
        ValueError,
        r"data_groups\['first'\]\['sparse_config'\] is a copy.*"
        r"sparsifier.update_config\('first', key=value\)",
    ),
    "updating the copy in data_groups": Misuse(
        lambda: after(
            registered,
            lambda m, s: s.data_groups["first"]["sparse_config"].update(sparsity_level=0.2),
        ),
        ConfigError,
        ValueError,
        "is a copy",
    ),
}


@misuse_table(CASES)
def test_misuse_raises_and_changes_nothing(case: Misuse) -> None:
    check_misuse(case)
