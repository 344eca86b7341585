"""``ActivationSparsifier``: a drop-in replacement for torch.ao's experimental class."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import torch
from torch import nn

from actsparse.core import (
    AGGREGATE,
    AGGREGATE_FN_KEY,
    CONFIG_KEYS,
    DATA_KEY,
    DETACHED,
    FEATURE_DIM_KEY,
    FEATURES_KEY,
    HOOK_KEY,
    HOOK_STATE_KEY,
    LAYER_KEY,
    MASK_FN_KEY,
    MASK_KEY,
    REDUCE_FN_KEY,
    SPARSE_CONFIG_KEY,
    SPARSIFY,
    THRESHOLD_KEY,
    ActsparseError,
    ActsparseWarning,
    ConfigError,
    DataGroup,
    LayerNotFoundError,
    MaskNotReadyError,
    SerializationError,
    StateDict,
    StateError,
    ThresholdResult,
    UnknownStrategyError,
    find_module,
    get_registry,
    make_config,
    merge_config,
    module_to_fqn,
    parse_state_dict,
)
from actsparse.hooks._distributed import combine_accumulators, resolve_group, uncombinable
from actsparse.hooks._execution import DENSE, kernel_modes, kernel_of
from actsparse.hooks._fold import fold_layers
from actsparse.hooks._layer import Layer, MaskingMode, changed_options, resolve_config
from actsparse.hooks._patterns import match_rules, to_rules
from actsparse.hooks._static import StaticMask
from actsparse.hooks._threshold import (
    Computed,
    Threshold,
    ValidPositions,
    retarget,
    warn_skipped,
    warn_unreachable,
)

__all__ = ["ActivationSparsifier", "WorkflowWarning"]


class WorkflowWarning(ActsparseWarning):
    """A call that torch.ao accepts silently but that probably does not do what was meant.

    ``squash_mask()`` after forward passes without ``step()``, ``step()`` with no
    layer registered, and registering a registered layer again (which discards
    its aggregated data). They stay warnings, as torch.ao raised nothing there;
    ``warnings.simplefilter("error", WorkflowWarning)`` makes them errors, raised
    before the call changes anything.
    """


class _SparseConfig(dict[str, Any]):
    """A layer's ``sparse_config`` as ``data_groups`` shows it: a copy that refuses changes.

    Changing the copy would change nothing (torch.ao's data groups are live),
    so every change raises an error that names ``update_config()``. Copies and
    pickles of it are plain dicts.
    """

    __slots__ = ("_layer",)

    def __init__(self, values: Mapping[str, Any], layer: str) -> None:
        super().__init__(values)
        self._layer = layer

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise ConfigError(
            f"data_groups[{self._layer!r}]['sparse_config'] is a copy, and changing it would "
            f"change nothing; call sparsifier.update_config({self._layer!r}, key=value), which "
            "checks the values and keeps the layer's aggregated data"
        )

    __setitem__ = _refuse
    __delitem__ = _refuse
    __ior__ = _refuse  # type: ignore[assignment]
    clear = _refuse
    pop = _refuse
    popitem = _refuse
    setdefault = _refuse
    update = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(self), memo)


def _held(layer: Layer) -> list[str]:
    """What re-registering ``layer`` throws away, for the warning."""
    held = []
    if layer.data is not None:
        held.append("aggregated data")
    if layer.mask is not None:
        held.append("mask")
    if layer.threshold is not None:
        held.append("threshold")
    return held


class _DataGroup(Mapping[str, Any]):
    """Read-only mapping view of one registered layer (the data-group protocol)."""

    __slots__ = ("_layer",)

    def __init__(self, layer: Layer) -> None:
        self._layer = layer

    def _keys(self) -> list[str]:
        keys = [*CONFIG_KEYS, LAYER_KEY]
        if self._layer.handle is not None:
            keys.append(HOOK_KEY)
        keys.append(HOOK_STATE_KEY)
        if self._layer.data is not None:
            keys.append(DATA_KEY)
        return keys

    def __getitem__(self, key: str) -> Any:
        layer = self._layer
        if key == SPARSE_CONFIG_KEY:
            return _SparseConfig(copy.deepcopy(layer.config[key]), layer.name)
        if key in CONFIG_KEYS:
            return copy.deepcopy(layer.config[key])
        if key == LAYER_KEY:
            return layer.module
        if key == HOOK_KEY and layer.handle is not None:
            return layer.handle
        if key == HOOK_STATE_KEY:
            return layer.hook_state
        if key == DATA_KEY and layer.data is not None:
            return layer.exposed_data()
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.items() if k not in (DATA_KEY, HOOK_KEY, LAYER_KEY)}
        return f"DataGroup({self._layer.name!r}, {shown!r})"


class ActivationSparsifier:
    """Zero the small activations that enter chosen layers of a model.

    It works like torch.ao's ``ActivationSparsifier``: register layers, run
    forward passes (their inputs are aggregated), call :meth:`step` to compute
    masks with ``mask_fn(reduce_fn(aggregated), **sparse_config)``, then
    :meth:`squash_mask` to replace aggregation by a hook that multiplies each
    layer's input by its mask. Wherever torch.ao takes a function, this class
    also takes the name of a registered strategy (``"sum"``, ``"mean"``,
    ``"magnitude"``, ...).

    Which strategies to pick: the recipes in the manual's *Built-in strategies*
    page. The arguments are defaults for the layers registered later; nothing
    is resolved or checked until a layer is registered (as in torch.ao, they
    may all be left out and given per layer).

    Args:
        model: The model whose layers are sparsified.
        aggregate_fn: Default aggregate: ``fn(accumulator, x) -> accumulator``,
            or the name of a registered aggregate strategy (``"sum"``,
            ``"abs_mean"``, ``"abs_histogram"``, ...).
        reduce_fn: Default reduce: ``fn(aggregated) -> Tensor``, or a name
            (``"mean"``, ``"identity"``, ...).
        mask_fn: Default mask: ``fn(reduced, **sparse_config) -> Tensor``, or a
            name (``"magnitude"``, ``"topk"``, ``"target_threshold"``, ...).
        features: Default feature selection along ``feature_dim``: a list whose
            entries are an index or a list of indices; each gets its own mask.
        feature_dim: The dimension of the input along which features are selected.
        **sparse_config: Default ``sparse_config`` keys (``sparsity_level=0.5``):
            each goes to the strategy that declares it, and ``register_layer``
            keywords update them per layer.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        model: nn.Module,
        aggregate_fn: Any = None,
        reduce_fn: Any = None,
        mask_fn: Any = None,
        features: Any = None,
        feature_dim: Any = None,
        **sparse_config: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._defaults = make_config(
            aggregate_fn, reduce_fn, mask_fn, features, feature_dim, sparse_config
        )
        self._layers: dict[str, Layer] = {}
        self._folded: list[str] = []
        self._valid = ValidPositions()

    # ---------------------------------------------------------------- views

    @property
    def defaults(self) -> dict[str, Any]:
        """The default configuration (a copy): the constructor's arguments."""
        return copy.deepcopy(self._defaults)

    @property
    def data_groups(self) -> Mapping[str, DataGroup]:
        """Layer name -> read-only mapping of its configuration and state."""
        return {name: _DataGroup(layer) for name, layer in self._layers.items()}

    @property
    def state(self) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"mask": mask}``; the mask is None until the layer sees an input.

        A layer in threshold mode has no mask (None); after ``step()`` its entry
        also holds ``"threshold"``, a :class:`~actsparse.hooks.ThresholdResult`.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, layer in self._layers.items():
            out[name] = {MASK_KEY: layer.mask}
            if layer.threshold is not None:
                out[name][THRESHOLD_KEY] = layer.threshold
        return out

    @property
    def thresholds(self) -> dict[str, ThresholdResult]:
        """Layer name -> its :class:`~actsparse.hooks.ThresholdResult`, for layers in threshold
        mode after ``step()``: the threshold, the target, the expected sparsity on the
        calibration data and whether the target was reachable."""
        return {n: la.threshold for n, la in self._layers.items() if la.threshold is not None}

    def retarget(self, levels: Mapping[str, float]) -> None:
        """Give threshold-mode layers new sparsity levels without calibrating again.

        ``levels`` maps layer names to levels in [0, 1]. Each threshold is
        recomputed from the statistics that the layer's last ``step()`` in this
        process used (state dicts do not keep them), before or after
        ``squash_mask()``; the layers' ``sparse_config`` follow. Nothing
        changes if a name or a level is refused.

        Args:
            levels: Layer name -> new target sparsity, a number in [0, 1].

        Raises:
            LayerNotFoundError: A name is not registered.
            StateError: A layer is not in threshold mode, its strategy has no
                ``target_key``, or it holds no statistics from a ``step()`` in
                this process.
            ConfigError: ``levels`` is not a mapping, or a level is not a
                number in [0, 1].
        """
        if not isinstance(levels, Mapping):
            raise ConfigError(f"levels must map layer names to levels, got {levels!r}")
        retarget(self._layers, levels)

    def valid_positions(self, mask: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """Count only the positions where ``mask`` is True while calibrating threshold layers.

        ``mask`` is a bool tensor whose shape is the leading dimensions of each
        threshold-mode layer's input, such as a ``(batch, seq_len)`` attention
        mask for inputs of shape ``(batch, seq_len, features)``::

            with sparsifier.valid_positions(batch["attention_mask"].bool()):
                model(**batch)

        Layers with a static mask strategy ignore it.

        Args:
            mask: A bool tensor, True at the positions to count.

        Returns:
            A context manager; blocks do not nest.

        Raises:
            ConfigError: ``mask`` is not a bool tensor, a block is already
                active, or a threshold-mode layer's aggregate does not take
                valid positions (``AggregateStrategy.takes_valid``); a mask
                that does not match a layer's input is refused on its forward
                pass.
        """
        return self._valid.active(mask, self._layers.values())

    # ------------------------------------------------------------ registration

    def register_layer(
        self,
        layer: nn.Module,
        aggregate_fn: Any = None,
        reduce_fn: Any = None,
        mask_fn: Any = None,
        features: Any = None,
        feature_dim: Any = None,
        **sparse_config: Any,
    ) -> None:
        """Register a submodule of the model; its inputs are aggregated from now on.

        Arguments that are not None override the defaults; ``sparse_config``
        updates the default one. Everything is checked here: the strategies
        resolve, ``features`` fit ``feature_dim``, every ``sparse_config`` key
        is one that the strategies accept, and its value passes the
        strategy's check (``sparsity_level="0.5"`` is refused now, not at
        ``step()``). Nothing changes if the configuration is invalid.

        Registering a registered layer again replaces it and discards its
        aggregated data, mask or threshold, with a :class:`WorkflowWarning`
        that says so; :meth:`update_config` changes ``sparse_config`` values
        and keeps the data.

        Args:
            layer: A submodule of the model.
            aggregate_fn: The aggregate (a callable or a registered name);
                None takes the default.
            reduce_fn: The reduce; None takes the default.
            mask_fn: The mask strategy; None takes the default.
            features: Indices along ``feature_dim`` to give masks of their
                own; None takes the default.
            feature_dim: The dimension that ``features`` index.
            **sparse_config: Keys that update the default ``sparse_config``.

        Raises:
            ConfigError: The configuration is invalid (the message names the
                layer and the argument or key at fault).
            UnknownStrategyError: A strategy name that no installed plugin
                registers.
            LayerNotFoundError: ``layer`` is not a submodule of the model.
        """
        if not isinstance(layer, nn.Module):
            raise ConfigError(f"layer must be a torch.nn.Module, got {type(layer).__name__}")
        name = module_to_fqn(self.model, layer)
        if name is None:
            raise LayerNotFoundError(
                f"layer {type(layer).__name__} is not a submodule of the model"
            )
        overrides = {
            AGGREGATE_FN_KEY: aggregate_fn,
            REDUCE_FN_KEY: reduce_fn,
            MASK_FN_KEY: mask_fn,
            FEATURES_KEY: features,
            FEATURE_DIM_KEY: feature_dim,
            **sparse_config,
        }
        new = self._build_layer(name, layer, merge_config(self._defaults, overrides))
        if name in self._layers:
            _warn_replaced([self._layers[name]])
            self._layers.pop(name).detach()
        new.attach(AGGREGATE)
        self._layers[name] = new

    def register_layers(
        self, rules: Mapping[Any, Any] | Iterable[Any], *, missing_ok: bool = False
    ) -> list[str]:
        r"""Register every layer that a rule selects, each with its rule's configuration.

        ``rules`` maps selectors to configurations, or lists :class:`~actsparse.hooks.LayerRule`
        objects and ``(selector, config)`` pairs. A selector is a regular
        expression that the layer's fully qualified name must match entirely,
        an ``nn.Module`` subclass, or a tuple of them; a :class:`~actsparse.hooks.LayerRule`
        can require both. A configuration holds ``register_layer``'s keyword
        arguments (other keys go to ``sparse_config``) or is None for the defaults::

            sparsifier.register_layers({
                r"encoder\.layer\.\d+\.intermediate\.dense": {"sparsity_level": 0.4},
                r"encoder\.layer\.\d+\.output\.dense": {"sparsity_level": 0.5},
            })

        A layer selected by two rules, a rule that selects no layer (unless
        ``missing_ok``) and any invalid configuration are errors, raised before
        anything is registered. Layers registered already are replaced, with
        one :class:`WorkflowWarning` that says what they lose.

        Args:
            rules: Selectors and their configurations, as above.
            missing_ok: Accept a rule that selects no layer.

        Returns:
            The registered names, in the model's order.

        Raises:
            ConfigError: A rule is invalid, selects nothing, or shares a layer
                with another rule, or a configuration is refused (the message
                names the rule).
            UnknownStrategyError: A strategy name that no installed plugin
                registers.
        """
        if not isinstance(missing_ok, bool):
            raise ConfigError(f"missing_ok must be a bool, got {missing_ok!r}")
        selected = match_rules(self.model, to_rules(rules), missing_ok=missing_ok)
        built = []
        for name, module, rule in selected:
            try:
                built.append(
                    self._build_layer(name, module, merge_config(self._defaults, rule.config))
                )
            except ActsparseError as exc:
                raise type(exc)(f"{rule.describe()}: {exc}") from exc
        again = [self._layers[layer.name] for layer in built if layer.name in self._layers]
        if again:
            _warn_replaced(again)
        for layer in built:
            old = self._layers.pop(layer.name, None)
            if old is not None:
                old.detach()
            layer.attach(AGGREGATE)
            self._layers[layer.name] = layer
        return [layer.name for layer in built]

    def _build_layer(self, name: str, module: nn.Module, config: dict[str, Any]) -> Layer:
        aggregate, reduce, mask, spec = resolve_config(get_registry(), name, config)
        if mask.dynamic and spec is not None:
            raise ConfigError(
                f"layer {name!r}: mask strategy {mask.name!r} sets one threshold per layer; "
                "it does not take features"
            )
        mode: MaskingMode = Threshold(self._valid) if mask.dynamic else StaticMask()
        return Layer(
            name=name,
            module=module,
            config=config,
            aggregate=aggregate,
            reduce=reduce,
            mask_strategy=mask,
            features=spec,
            mode=mode,
        )

    def update_config(self, name: str, /, **sparse_config: Any) -> None:
        """Change ``sparse_config`` values of a registered layer and keep its aggregated data.

        The keys are merged into the layer's ``sparse_config`` (the others keep
        their values) and checked as :meth:`register_layer` checks them; the
        next :meth:`step` uses them. The aggregated data, the mask or threshold
        that the last ``step()`` stored and the hook stay as they are::

            sparsifier.update_config("encoder.0.fc", sparsity_level=0.4)

        A key that goes to the aggregate strategy (``sample_dims``,
        ``bins_per_octave``, ...) changes how inputs are aggregated: while the
        layer holds aggregated data built with another value it is refused,
        as the data would no longer fit; call ``step()`` first, or register
        the layer again to discard the data.

        Args:
            name: The layer's name, as in :attr:`data_groups`.
            **sparse_config: The keys to set.

        Raises:
            LayerNotFoundError: No layer of that name is registered.
            ConfigError: A key that the layer's strategies do not accept, a
                value that their check refuses, or a configuration key
                (``mask_fn``, ``features``, ...), which only
                :meth:`register_layer` changes.
            StateError: The layer is squashed (its mask or threshold is
                applied; :meth:`retarget` moves a threshold-mode layer's), or
                an aggregate key would change while the layer holds aggregated
                data.

        Nothing changes when it raises.
        """
        layer = self._layer(name)
        reserved = sorted(set(sparse_config) & set(CONFIG_KEYS))
        if reserved:
            raise ConfigError(
                f"layer {name!r}: update_config() sets sparse_config keys; "
                f"{', '.join(map(repr, reserved))} belong to the layer's configuration, which "
                "register_layer() changes (discarding the aggregated data)"
            )
        if layer.hook_state != AGGREGATE:
            raise StateError(
                f"layer {name!r} is squashed (hook_state={layer.hook_state!r}): no step() will "
                "use a new sparse_config; retarget() moves a threshold-mode layer's sparsity, "
                "register_layer() starts the layer over"
            )
        config = {
            **layer.config,
            SPARSE_CONFIG_KEY: {
                **copy.deepcopy(layer.config[SPARSE_CONFIG_KEY]),
                **copy.deepcopy(sparse_config),
            },
        }
        built = self._build_layer(name, layer.module, config)
        moved = changed_options(layer.aggregate_options, built.aggregate_options)
        if moved and layer.data is not None:
            shown = ", ".join(
                f"{key}={layer.aggregate_options.get(key)!r} -> "
                f"{built.aggregate_options.get(key)!r}"
                for key in moved
            )
            raise StateError(
                f"layer {name!r}: changing {shown} would invalidate the aggregated data, which "
                f"aggregate strategy {layer.aggregate.name!r} built with the old value(s); call "
                "step() first, or register the layer again to discard the data"
            )
        if layer.take_sparse_config(built):
            layer.attach(AGGREGATE)

    def unregister_layer(self, name: str) -> None:
        """Detach the layer's hook and forget it: the model runs as if never registered.

        Its configuration, aggregated data and mask or threshold are dropped
        (take :meth:`state_dict` first to keep them). Other layers are not
        affected.

        Args:
            name: The layer's name, as in :attr:`data_groups`.

        Raises:
            LayerNotFoundError: No layer of that name is registered (the
                message lists the registered names).
        """
        layer = self._layer(name)
        layer.detach()
        del self._layers[name]

    def _layer(self, name: str) -> Layer:
        try:
            return self._layers[name]
        except (KeyError, TypeError):
            known = ", ".join(map(repr, self._layers)) or "none"
            raise LayerNotFoundError(
                f"no layer named {name!r} is registered (registered: {known})"
            ) from None

    # -------------------------------------------------------------- masks

    def get_mask(self, name: str | None = None, layer: nn.Module | None = None) -> Any:
        """The layer's mask, by name or by module.

        Until ``step()`` it is torch.ao's placeholder of ones in the shape of
        the first input; after it, what the mask strategy computed.

        Args:
            name: The layer's name, as in :attr:`data_groups`.
            layer: The layer's module, used when ``name`` is None.

        Returns:
            A tensor of zeros and ones, or with ``features`` a list with one
            per feature. It is the stored mask itself, not a copy.

        Raises:
            ConfigError: Neither ``name`` nor ``layer`` is given.
            LayerNotFoundError: The layer is not registered (or ``layer`` is
                not a submodule of the model).
            MaskNotReadyError: The layer has seen no input yet, or it is in
                threshold mode (its mask depends on each input; read
                :attr:`thresholds`).
        """
        if name is None:
            if layer is None:
                raise ConfigError("get_mask() needs a layer name or a layer module")
            name = module_to_fqn(self.model, layer)
            if name is None:
                raise LayerNotFoundError(
                    f"layer {type(layer).__name__} is not a submodule of the model"
                )
        found = self._layer(name)
        if found.dynamic:
            raise MaskNotReadyError(
                f"layer {name!r} is in threshold mode (mask strategy "
                f"{found.mask_strategy.name!r}): its mask depends on each input; see "
                "sparsifier.thresholds"
            )
        mask = found.mask
        if mask is None:
            raise MaskNotReadyError(
                f"layer {name!r} has no mask yet: run a forward pass through it first"
            )
        return mask

    def step(self, *, process_group: Any = None) -> None:
        """Compute every layer's mask from its aggregated data, then clear the data.

        All masks are computed and checked before any is stored: if one layer
        fails, no mask changes and the aggregated data is kept. With no layer
        registered it does nothing and warns (:class:`WorkflowWarning`).

        Under ``torch.distributed`` (initialised, more than one process) the
        layers' accumulators are first combined across the processes with the
        collective each aggregate strategy declares (``AggregateStrategy.combine``),
        so every rank computes and stores the masks that one process would
        compute from all the ranks' inputs. This is a collective call: every
        rank of the group must call ``step()``, with the same layers registered.
        The combining works on copies; a failure on any rank is raised on every
        rank and leaves all of them as they were.

        Args:
            process_group: The group to combine over. ``None`` (the default)
                means the default group when ``torch.distributed`` is
                initialised with more than one process, else no combining; a
                ``torch.distributed.ProcessGroup`` names a group; ``False``
                turns combining off, so each process computes masks from its
                own inputs only (use this to calibrate on one rank alone).

        Raises:
            StateError: A layer is squashed or has no aggregated data (on any
                rank), or the ranks' layers or accumulator shapes differ.
            ConfigError: ``process_group`` is invalid, or combining is on and
                a layer's aggregate declares no ``combine`` (a plain callable).
            MaskError: A mask cannot be computed from the (combined) data.
        """
        group = resolve_group(process_group)
        if not self._layers:
            warnings.warn(
                "step() ran with no layer registered: there is nothing to compute; register "
                "layers with register_layer() or register_layers() before calibrating",
                WorkflowWarning,
                stacklevel=2,
            )
        problem = self._step_problem(combining=group is not None)
        if group is None:
            if problem is not None:
                raise problem
            datas = {name: layer.data for name, layer in self._layers.items()}
        else:
            datas = combine_accumulators(self._layers, group, problem)
        # Masks are never inference tensors, even when step() runs in inference mode.
        with torch.no_grad(), torch.inference_mode(False):
            masks = {name: layer.compute(datas[name]) for name, layer in self._layers.items()}
        for name, layer in self._layers.items():
            layer.store(masks[name])
        computed = {n: m for n, m in masks.items() if isinstance(m, Computed)}
        warn_skipped({n: m.skipped for n, m in computed.items()})
        warn_unreachable({n: m.result for n, m in computed.items()})

    def _step_problem(self, *, combining: bool) -> ActsparseError | None:
        """The error that keeps step() from running on this process, or None."""
        for name, layer in self._layers.items():
            if layer.hook_state != AGGREGATE:
                return StateError(
                    f"layer {name!r} is squashed (hook_state={layer.hook_state!r}); "
                    "step() only runs while layers aggregate"
                )
            if layer.data is None:
                return StateError(
                    f"layer {name!r} has no aggregated data: run forward passes through it "
                    "before step()"
                )
            if combining:
                error = uncombinable(layer)
                if error is not None:
                    return error
        return None

    def squash_mask(
        self, attach_sparsify_hook: bool = True, *, kernel: str = DENSE, **kwargs: Any
    ) -> None:
        """Remove the aggregation hooks; with ``attach_sparsify_hook``, apply the masks.

        After this, each layer sees ``input * mask`` (with features, only the
        selected slices are multiplied); a threshold-mode layer sees its input
        with ``|x| <= threshold`` zeroed. Every layer must have a mask or a
        threshold.

        A layer that saw forward passes but never a ``step()`` holds torch.ao's
        placeholder mask of ones, which leaves it dense: as torch.ao does, it
        is squashed all the same, with a :class:`WorkflowWarning` naming it.

        Args:
            attach_sparsify_hook: False removes every hook and applies nothing.
            kernel: How threshold-mode layers are computed (see :meth:`set_kernel`):
                ``"dense"`` (the default: zero, then the layer), the name of a
                registered kernel, or ``"auto"``. Static masks ignore it.
            **kwargs: None is accepted: any other keyword is a ``ConfigError``
                that names it.

        Raises:
            StateError: A layer is squashed already.
            MaskNotReadyError: A layer has no mask or threshold (it has seen no
                input, or a threshold-mode layer no ``step()``).
            ConfigError: A bad argument, or a kernel that cannot run here or
                compute a layer.
            UnknownStrategyError: No kernel has that name.

        Nothing changes when it raises.
        """
        if kwargs:
            raise ConfigError(
                f"squash_mask() got unexpected keyword argument(s) {', '.join(map(repr, kwargs))}"
            )
        if not isinstance(attach_sparsify_hook, bool):
            raise ConfigError(f"attach_sparsify_hook must be a bool, got {attach_sparsify_hook!r}")
        for name, layer in self._layers.items():
            if layer.hook_state == SPARSIFY:
                raise StateError(f"layer {name!r} is already squashed")
            if not layer.mode.ready:
                raise MaskNotReadyError(
                    f"layer {name!r} has no mask: run forward passes and step() before "
                    "squash_mask()"
                )
        modes = kernel_modes(self._layers, kernel) if attach_sparsify_hook else {}
        if attach_sparsify_hook:
            _warn_unstepped(self._layers.values())
        for name, layer in self._layers.items():
            if name in modes:
                layer.mode = modes[name]
            layer.attach(SPARSIFY if attach_sparsify_hook else DETACHED)

    def set_kernel(self, kernel: str) -> None:
        """Choose how threshold-mode layers are computed once squashed; works at any time.

        ``kernel`` is ``"dense"`` (zero the entries ``|x| <= threshold`` with
        one ``hardshrink``, then run the layer), the name of a registered
        kernel (``actsparse plugins`` lists them), or ``"auto"``: each layer
        gets the kernel that supports it and beats the dense layer on this
        machine, for inputs of up to the number of tokens where it measured
        faster (single-token decoding), and the dense path above. The choice
        is not part of the state dict: a loaded state runs dense until this
        is called. Layers with a static mask are not affected.

        Args:
            kernel: ``"dense"``, a registered kernel's name, or ``"auto"``.

        Raises:
            UnknownStrategyError: No kernel has that name.
            ConfigError: The kernel cannot run on this machine (the message
                says what is missing), or cannot compute one of the layers;
                nothing changes.
        """
        modes = kernel_modes(self._layers, kernel)
        for name, mode in modes.items():
            layer = self._layers[name]
            layer.mode = mode
            if layer.hook_state == SPARSIFY:
                layer.attach(SPARSIFY)

    @property
    def kernels(self) -> dict[str, str]:
        """The kernel that computes each threshold-mode layer once squashed, by layer name:
        ``"dense"`` or a registered kernel's name (what ``"auto"`` chose, per layer; its
        inputs above the measured crossover take the dense path). Static-mask layers are
        not listed."""
        return {
            name: kernel
            for name, layer in self._layers.items()
            if (kernel := kernel_of(layer.mode)) is not None
        }

    # --------------------------------------------------------------- folding

    @property
    def folded(self) -> tuple[str, ...]:
        """The names of the layers that :meth:`fold` baked into the model, in order."""
        return tuple(self._folded)

    def fold(self, prune: bool = False) -> list[str]:
        """Bake static per-input-feature masks into the weights and drop their hooks.

        A squashed layer folds when it is an ``nn.Linear`` whose mask varies
        only along the last input dimension, or an ``nn.Conv1d/2d/3d``
        (``groups=1``) whose mask varies only along the input channels: its
        weight columns (input channels) are multiplied by the mask. With
        ``prune=True`` the input features whose mask is zero are removed: the
        producing ``Linear``/``Conv`` loses those output rows when the input
        comes straight from it through elementwise activations (found with
        ``torch.fx``), otherwise the layer is replaced by a ``Pruned*`` layer
        that gathers the kept features with one ``index_select``.

        Folded layers are unregistered: they leave ``data_groups``, ``state``
        and ``state_dict()``, and their names are added to :attr:`folded`.
        Other layers keep their hooks.

        Args:
            prune: Also remove the input features whose mask is zero.

        Returns:
            The names of the layers folded by this call, in order.

        Raises:
            ConfigError: ``prune`` is not a bool.
        """
        if not isinstance(prune, bool):
            raise ConfigError(f"prune must be a bool, got {prune!r}")
        names = fold_layers(self.model, self._layers, prune)
        for name in names:
            del self._layers[name]
        self._folded.extend(names)
        return names

    # ----------------------------------------------------------- state dict

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state: ``{"state", "data_groups", "defaults", "format_version"}``.

        Masks are sparse COO tensors, as torch.ao stores them; threshold-mode
        layers hold ``"threshold"`` instead; data groups hold neither ``hook``
        nor ``layer``. Everything is a copy. ``actsparse.serialize.save``
        writes it to a file.

        Returns:
            A new dict: ``state`` (layer name -> ``{"mask": ...}``, with
            ``"threshold"`` for threshold-mode layers), ``data_groups`` (layer
            name -> configuration, ``hook_state`` and any aggregated
            ``data``), ``defaults`` and ``format_version``.
        """
        layers = {name: layer.to_state() for name, layer in self._layers.items()}
        return StateDict(defaults=self.defaults, layers=layers).as_dict(sparse=True)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state dict taken from a sparsifier over the same architecture.

        It takes what :meth:`state_dict` returns, or torch.ao's state dict.
        Layers are found by name in this sparsifier's model and get the hook
        that their ``hook_state`` names. Everything is checked first: on error
        the sparsifier and the model's hooks are unchanged.

        Args:
            state_dict: What :meth:`state_dict` (or torch.ao's ``state_dict()``,
                or ``actsparse.serialize.load``) returned.

        Raises:
            SerializationError: The state dict is malformed, or a layer's
                mask, threshold or data does not fit it.
            LayerNotFoundError: A layer of the state dict is not in the model.
            UnknownStrategyError: A layer's strategy is named by a plugin that
                is not installed here (the message says whether it is a
                built-in and which package ships it).
            ConfigError: A layer's configuration is refused, as
                :meth:`register_layer` would refuse it.
        """
        parsed = parse_state_dict(state_dict)
        new_layers: dict[str, Layer] = {}
        for name, record in parsed.layers.items():
            found = find_module(self.model, name)
            if found is None:
                raise LayerNotFoundError(f"layer {name!r} of the state dict is not in the model")
            fqn, module = found
            try:
                layer = self._build_layer(fqn, module, dict(record.config))
            except UnknownStrategyError as exc:
                raise UnknownStrategyError(
                    f"the state dict names a strategy that is not installed here: {exc}"
                ) from None
            layer.restore(record)
            if fqn in new_layers:
                raise SerializationError(
                    f"the state dict's layer {name!r} and another one both resolve to the "
                    f"model's layer {fqn!r}"
                )
            new_layers[fqn] = layer
        # Everything is valid: swap.
        for layer in self._layers.values():
            layer.detach()
        self._layers = {}
        self._defaults = dict(parsed.defaults)
        for name, layer in new_layers.items():
            layer.attach(layer.hook_state)
            self._layers[name] = layer

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for name, layer in self._layers.items():
            lines.append(f"  {name!r}: hook_state={layer.hook_state!r}, config={layer.config!r}")
        lines.append(")")
        return "\n".join(lines)


def _warn_replaced(layers: list[Layer]) -> None:
    """Warn that registering ``layers`` again discards what they hold."""
    kinds = ("aggregated data", "mask", "threshold")
    lost = [kind for kind in kinds if any(kind in _held(layer) for layer in layers)]
    names = ", ".join(repr(layer.name) for layer in layers)
    if len(layers) == 1:
        head = f"layer {names} is already registered: registering it again replaces its"
        whose = "its"
    else:
        head = f"layers {names} are already registered: registering them again replaces their"
        whose = "their"
    what = (
        f"discards {whose} {' and '.join(lost)}"
        if lost
        else "discards nothing yet (no input was aggregated)"
    )
    warnings.warn(
        f"{head} configuration and {what}; to change sparse_config values and keep the "
        "aggregated data, call sparsifier.update_config(name, key=value) instead",
        WorkflowWarning,
        stacklevel=3,
    )


def _warn_unstepped(layers: Iterable[Layer]) -> None:
    """Warn about layers that squash_mask() would leave dense: inputs seen, no step()."""
    dense = [
        repr(layer.name)
        for layer in layers
        if isinstance(layer.mode, StaticMask) and layer.mode.placeholder
    ]
    if dense:
        warnings.warn(
            f"squash_mask(): layer(s) {', '.join(dense)} saw forward passes but no step(), "
            "so their mask is the placeholder of ones and they stay dense; call step() "
            "before squash_mask()",
            WorkflowWarning,
            stacklevel=3,
        )


def input_change(
    sparsifier: ActivationSparsifier, name: str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What layer ``name``'s threshold at its current level changes in its input
    (:meth:`Threshold.input_change <actsparse.hooks._threshold.Threshold.input_change>`),
    or None when the layer is not in threshold mode or that change is not its input's."""
    layer = sparsifier._layers[name]
    mode = layer.mode
    return mode.input_change(layer) if isinstance(mode, Threshold) else None
