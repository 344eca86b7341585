"""actsparse.core: protocols, records, the plugin manager, the registry and errors.

Plugin authors import :data:`hookimpl` and the record types from here.
"""

from __future__ import annotations

from actsparse.core._errors import (
    ActsparseError,
    ConfigError,
    DuplicateStrategyError,
    LayerNotFoundError,
    MaskError,
    MaskNotReadyError,
    PluginError,
    SerializationError,
    StateError,
    StrategyError,
    UnknownStrategyError,
)
from actsparse.core._fqn import (
    WRAPPER_ATTRIBUTES,
    find_module,
    fqn_to_module,
    module_to_fqn,
    normalize_fqn,
)
from actsparse.core._hookspecs import PROJECT_NAME, hookimpl, hookspec
from actsparse.core._protocols import (
    CONFIG_KEYS,
    DATA_GROUP_KEYS,
    HOOK_STATES,
    AggregateFn,
    CommandRegistrar,
    DataGroup,
    Mask,
    MaskFn,
    ReduceFn,
)
from actsparse.core._records import (
    COMBINE_OPS,
    AggregateStrategy,
    BoundAggregate,
    MaskStrategy,
    ReduceStrategy,
    Serializer,
    infer_params,
    split_sparse_config,
)
from actsparse.core._registry import (
    BLOCK_ENV_VAR,
    ENTRY_POINT_GROUP,
    KINDS,
    Entry,
    PluginManager,
    PluginWarning,
    Registry,
    get_plugin_manager,
    get_registry,
    make_plugin_manager,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "BLOCK_ENV_VAR",
    "COMBINE_OPS",
    "CONFIG_KEYS",
    "DATA_GROUP_KEYS",
    "ENTRY_POINT_GROUP",
    "HOOK_STATES",
    "KINDS",
    "PROJECT_NAME",
    "ActsparseError",
    "AggregateFn",
    "AggregateStrategy",
    "BoundAggregate",
    "CommandRegistrar",
    "ConfigError",
    "DataGroup",
    "DuplicateStrategyError",
    "Entry",
    "LayerNotFoundError",
    "Mask",
    "MaskError",
    "MaskFn",
    "MaskNotReadyError",
    "MaskStrategy",
    "PluginError",
    "PluginManager",
    "PluginWarning",
    "ReduceFn",
    "ReduceStrategy",
    "Registry",
    "SerializationError",
    "Serializer",
    "StateError",
    "StrategyError",
    "UnknownStrategyError",
    "__version__",
    "WRAPPER_ATTRIBUTES",
    "find_module",
    "fqn_to_module",
    "normalize_fqn",
    "hookimpl",
    "hookspec",
    "infer_params",
    "split_sparse_config",
    "make_plugin_manager",
    "module_to_fqn",
    "get_plugin_manager",
    "get_registry",
    "register_plugin",
    "unregister_plugin",
]
