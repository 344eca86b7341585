"""Plugin discovery and the registry of strategies and serializers."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from actsparse.core import _hookspecs
from actsparse.core._errors import (
    ConfigError,
    DuplicateStrategyError,
    PluginError,
    UnknownStrategyError,
)
from actsparse.core._hookspecs import PROJECT_NAME
from actsparse.core._records import (
    AggregateStrategy,
    KernelStrategy,
    MaskStrategy,
    ReduceStrategy,
    Serializer,
    infer_params,
)
from actsparse.core._unknown import unknown_name_message

__all__ = [
    "BLOCK_ENV_VAR",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_DISTRIBUTIONS",
    "KINDS",
    "Entry",
    "Kind",
    "PluginManager",
    "PluginWarning",
    "Registry",
    "get_plugin_manager",
    "get_registry",
    "make_plugin_manager",
    "register_plugin",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = PROJECT_NAME
BLOCK_ENV_VAR = "ACTSPARSE_BLOCK_PLUGINS"
FIRST_PARTY_DISTRIBUTIONS = frozenset(
    {"actsparse-core", "actsparse-masks", "actsparse-hooks", "actsparse-serialize", "actsparse-cli"}
)


class PluginWarning(UserWarning):
    """A third-party plugin was skipped."""


@attrs.frozen
class Kind:
    """One family of records: which hook returns them and who ships the built-ins."""

    key: str
    hook: str
    record_type: type
    label: str
    package: str


KINDS: Mapping[str, Kind] = {
    k.key: k
    for k in (
        Kind(
            "aggregate",
            "actsparse_aggregate_strategies",
            AggregateStrategy,
            "aggregate strategy",
            "actsparse-masks",
        ),
        Kind(
            "reduce",
            "actsparse_reduce_strategies",
            ReduceStrategy,
            "reduce strategy",
            "actsparse-masks",
        ),
        Kind("mask", "actsparse_mask_strategies", MaskStrategy, "mask strategy", "actsparse-masks"),
        Kind(
            "serializer", "actsparse_serializers", Serializer, "serializer", "actsparse-serialize"
        ),
        Kind("kernel", "actsparse_kernels", KernelStrategy, "kernel", "actsparse-hooks"),
    )
}


@attrs.frozen
class Entry:
    """A registered record, tagged with the plugin (and distribution) that gave it."""

    record: Any
    plugin: str
    distribution: str | None = None
    version: str | None = None

    @property
    def provider(self) -> str:
        if self.distribution is None:
            return f"plugin {self.plugin!r}"
        return f"plugin {self.plugin!r} ({self.distribution} {self.version})"


class PluginManager(pluggy.PluginManager):
    """A pluggy manager for the ``actsparse`` project that remembers distributions."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(_hookspecs)
        #: plugin name -> (distribution name, version), for plugins from entry points
        self.distributions: dict[str, tuple[str, str]] = {}

    def load_entrypoints(self, blocked: Iterable[str] = ()) -> None:
        """Register every plugin of the ``actsparse`` entry-point group.

        A third-party plugin that fails to import is named in a
        :class:`PluginWarning` and skipped; a first-party one raises
        :class:`PluginError`.
        """
        blocked = set(blocked)
        for name in blocked:
            self.set_blocked(name)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.is_blocked(ep.name) or self.get_plugin(ep.name) is not None:
                continue
            dist = ep.dist
            dist_name = _canonical(dist.name) if dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:
                where = f"{ep.name!r} ({ep.value}) from {dist_name or 'an unknown distribution'}"
                if dist_name in FIRST_PARTY_DISTRIBUTIONS:
                    raise PluginError(f"built-in plugin {where} failed to import: {exc!r}") from exc
                warnings.warn(
                    f"actsparse: skipped plugin {where}: import failed: {exc!r}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            try:
                self.register(plugin, name=ep.name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                where = f"{ep.name!r} ({ep.value}) from {dist_name or 'an unknown distribution'}"
                if dist_name in FIRST_PARTY_DISTRIBUTIONS:
                    raise PluginError(f"built-in plugin {where} is invalid: {exc}") from exc
                warnings.warn(
                    f"actsparse: skipped plugin {where}: {exc}", PluginWarning, stacklevel=2
                )
                continue
            if dist is not None and dist_name is not None:
                self.distributions[ep.name] = (dist_name, dist.version)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocked_from_env(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The plugin names listed (comma-separated) in ``ACTSPARSE_BLOCK_PLUGINS``."""
    raw = (os.environ if environ is None else environ).get(BLOCK_ENV_VAR, "")
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def make_plugin_manager(
    *, load_entrypoints: bool = True, blocked: Iterable[str] | None = None
) -> PluginManager:
    """Build a new, independent plugin manager.

    Args:
        load_entrypoints: Register the plugins of the ``actsparse`` entry-point group.
        blocked: Plugin names to skip; ``None`` reads ``ACTSPARSE_BLOCK_PLUGINS``.
    """
    pm = PluginManager()
    if load_entrypoints:
        pm.load_entrypoints(blocked_from_env() if blocked is None else blocked)
    return pm


_lock = threading.RLock()
_cache: dict[str, Registry] = {}


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built with entry points on first use."""
    return make_plugin_manager()


def get_registry() -> Registry:
    """The registry built from :func:`get_plugin_manager`, cached until a plugin changes."""
    with _lock:
        registry = _cache.get("registry")
        if registry is None:
            registry = _cache["registry"] = Registry.from_plugin_manager(get_plugin_manager())
        return registry


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object in-process and return its name.

    The registry is rebuilt first; if the plugin is invalid or registers a
    name that is already taken, it raises and nothing changes.
    """
    with _lock:
        pm = get_plugin_manager()
        try:
            registered = pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"plugin {name or plugin!r} cannot be registered: {exc}") from exc
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked")
        try:
            registry = Registry.from_plugin_manager(pm)
        except BaseException:
            pm.unregister(plugin)
            raise
        _cache["registry"] = registry
        return registered


def unregister_plugin(plugin: object | None = None, *, name: str | None = None) -> None:
    """Remove a plugin registered with :func:`register_plugin` (by object or name)."""
    with _lock:
        pm = get_plugin_manager()
        if (name is not None and pm.get_plugin(name) is None) or (
            plugin is not None and not pm.is_registered(plugin)
        ):
            raise PluginError(f"no plugin {name or plugin!r} is registered")
        pm.unregister(plugin, name=name)
        _cache.pop("registry", None)


@attrs.define
class Registry:
    """Every strategy and serializer that the registered plugins provide, by kind and name."""

    _entries: dict[str, dict[str, Entry]] = attrs.field(
        factory=lambda: {key: {} for key in KINDS}, alias="entries"
    )

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        """Call every plugin's hooks, validate and tag what they return."""
        distributions: Mapping[str, tuple[str, str]] = getattr(pm, "distributions", {})
        registry = cls()
        for kind in KINDS.values():
            caller = getattr(pm.hook, kind.hook)
            # get_hookimpls() lists plugins in registration order (pluggy *calls*
            # them last-registered first): the earlier plugin keeps a contested name.
            for impl in caller.get_hookimpls():
                dist = distributions.get(impl.plugin_name)
                try:
                    result = impl.function()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {impl.plugin_name!r} raised in {kind.hook}(): {exc!r}"
                    ) from exc
                registry._add_all(kind, result, impl.plugin_name, dist)
        return registry

    def _add_all(
        self,
        kind: Kind,
        result: object,
        plugin: str,
        dist: tuple[str, str] | None,
    ) -> None:
        if result is None:
            return
        if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
            raise PluginError(
                f"plugin {plugin!r}: {kind.hook}() must return a list of "
                f"{kind.record_type.__name__}, got {type(result).__name__}"
            )
        for record in result:
            self.add(kind.key, record, plugin=plugin, distribution=dist)

    def add(
        self,
        kind: str,
        record: object,
        *,
        plugin: str,
        distribution: tuple[str, str] | None = None,
    ) -> None:
        """Add one record; refuse a wrong type or a name that is already taken."""
        info = _kind(kind)
        if not isinstance(record, info.record_type):
            raise PluginError(
                f"plugin {plugin!r}: {info.hook}() returned {record!r}, "
                f"not a {info.record_type.__name__}"
            )
        entry = Entry(
            record,
            plugin,
            distribution[0] if distribution else None,
            distribution[1] if distribution else None,
        )
        name: str = record.name  # type: ignore[attr-defined]
        table = self._entries[info.key]
        if name in table:
            raise DuplicateStrategyError(
                f"{info.label} {name!r} is registered twice: by {table[name].provider} "
                f"and by {entry.provider}"
            )
        table[name] = entry

    def names(self, kind: str) -> list[str]:
        """The registered names of one kind, sorted."""
        return sorted(self._entries[_kind(kind).key])

    def entries(self, kind: str) -> list[Entry]:
        """The registered entries of one kind, sorted by name."""
        table = self._entries[_kind(kind).key]
        return [table[name] for name in sorted(table)]

    def entry(self, kind: str, name: str) -> Entry:
        """The entry registered under ``name``; an error listing the known names if none."""
        info = _kind(kind)
        table = self._entries[info.key]
        try:
            return table[name]
        except (KeyError, TypeError):
            raise UnknownStrategyError(
                unknown_name_message(
                    kind=info.key, label=info.label, package=info.package, name=name, known=table
                )
            ) from None

    def get(self, kind: str, name: str) -> Any:
        """The record registered under ``name``."""
        return self.entry(kind, name).record

    def name_of(self, kind: str, value: object) -> str | None:
        """The registered name of a record or of a registered record's ``fn``, else None."""
        for name, entry in self._entries[_kind(kind).key].items():
            record = entry.record
            if value is record or value is getattr(record, "fn", None):
                return name
        return None

    def resolve(self, kind: str, value: object, *, key: str | None = None) -> Any:
        """Turn a name, a record or a plain callable into a record of ``kind``.

        A callable that is a registered strategy's ``fn`` resolves to that
        strategy; any other callable is wrapped in an unregistered record.
        """
        info = _kind(kind)
        if isinstance(value, str):
            return self.get(kind, value)
        if isinstance(value, info.record_type):
            return value
        if not callable(value):
            raise ConfigError(
                f"{key or kind} must be callable or the name of a registered "
                f"{info.label}, got {value!r}"
            )
        name = self.name_of(kind, value)
        if name is not None:
            return self.get(kind, name)
        return wrap_callable(kind, value)


def wrap_callable(kind: str, fn: Callable[..., Any]) -> Any:
    """Wrap a plain callable in an unregistered record of ``kind``."""
    label = getattr(fn, "__qualname__", None) or type(fn).__name__
    name = f"<callable {label}>"
    if kind == "aggregate":
        return AggregateStrategy(name=name, fn=fn)
    if kind == "reduce":
        return ReduceStrategy(name=name, fn=fn)
    if kind == "mask":
        params, required = infer_params(fn)
        return MaskStrategy(name=name, fn=fn, params=params, required=required)
    raise ConfigError(f"a plain callable cannot serve as a {_kind(kind).label}")


def _kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ConfigError(
            f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}"
        ) from None
