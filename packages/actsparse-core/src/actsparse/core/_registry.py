"""Plugin discovery and the registry of strategies and serializers."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, overload

import attrs
import pluggy

from actsparse.core import _hookspecs
from actsparse.core._errors import (
    ActsparseWarning,
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
    "BlockRules",
    "ENTRY_POINT_GROUP",
    "FIRST_PARTY_DISTRIBUTIONS",
    "KINDS",
    "Entry",
    "Kind",
    "KindName",
    "PluginManager",
    "PluginWarning",
    "Record",
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
    {
        "actsparse-core",
        "actsparse-masks",
        "actsparse-hooks",
        "actsparse-kernels",
        "actsparse-serialize",
        "actsparse-cli",
    }
)


class PluginWarning(ActsparseWarning):
    """A third-party plugin was skipped."""


#: The name of a kind of record, as ``Registry.get`` and ``Registry.resolve`` take it.
KindName: TypeAlias = Literal["aggregate", "reduce", "mask", "serializer", "kernel"]
#: Any record that a plugin hook returns.
Record: TypeAlias = AggregateStrategy | ReduceStrategy | MaskStrategy | Serializer | KernelStrategy


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


@attrs.frozen
class BlockRules:
    """Which entry points to skip, parsed from ``ACTSPARSE_BLOCK_PLUGINS`` items.

    An item ``name`` blocks every entry point called ``name``, whichever
    distribution declares it. An item ``dist:name`` blocks only the entry
    point ``name`` of the distribution ``dist`` (distribution names compare
    as pip compares them: case, ``-``, ``_`` and ``.`` do not matter), and
    ``dist:*`` blocks every entry point of ``dist``.
    """

    names: frozenset[str] = frozenset()
    qualified: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def parse(cls, items: Iterable[str]) -> BlockRules:
        names: set[str] = set()
        qualified: set[tuple[str, str]] = set()
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            dist, sep, name = item.partition(":")
            if not sep:
                names.add(item)
                continue
            dist, name = dist.strip(), name.strip()
            if not dist or not name:
                raise ConfigError(
                    f"{BLOCK_ENV_VAR}: {item!r} must be a plugin name, "
                    "'distribution:plugin-name' or 'distribution:*'"
                )
            qualified.add((_canonical(dist), name))
        return cls(frozenset(names), frozenset(qualified))

    def blocks(self, name: str, distribution: str | None) -> bool:
        """Whether the entry point ``name`` of ``distribution`` (canonical) is blocked."""
        if name in self.names:
            return True
        if distribution is None:
            return False
        return (distribution, name) in self.qualified or (distribution, "*") in self.qualified


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    if dist is None:
        return "an unknown distribution"
    return f"{dist.name} {dist.version}"


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    return _canonical(ep.dist.name) if ep.dist is not None else None


class PluginManager(pluggy.PluginManager):
    """A pluggy manager for the ``actsparse`` project that remembers distributions."""

    def __init__(self) -> None:
        super().__init__(PROJECT_NAME)
        self.add_hookspecs(_hookspecs)
        #: plugin name -> (distribution name, version), for plugins from entry points
        self.distributions: dict[str, tuple[str, str]] = {}

    def load_entrypoints(self, blocked: Iterable[str] = ()) -> None:
        """Register every plugin of the ``actsparse`` entry-point group.

        ``blocked`` holds :class:`BlockRules` items (``name``, ``dist:name``,
        ``dist:*``). A third-party plugin that fails to import is named in a
        :class:`PluginWarning` and skipped; a first-party one raises
        :class:`PluginError`. When several distributions declare an entry
        point of one name, a built-in plugin is kept and the others are
        skipped with a :class:`PluginWarning` naming every distribution;
        without a built-in among them, all of them are skipped. Nothing
        replaces a plugin silently.
        """
        rules = BlockRules.parse(blocked)
        for name in rules.names:
            self.set_blocked(name)
        by_name: dict[str, list[importlib.metadata.EntryPoint]] = {}
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.is_blocked(ep.name) or rules.blocks(ep.name, _dist_name(ep)):
                continue
            by_name.setdefault(ep.name, []).append(ep)
        for name, eps in by_name.items():
            chosen = self._one_of(name, eps)
            if chosen is not None:
                self._load_one(chosen)

    def _one_of(
        self, name: str, eps: list[importlib.metadata.EntryPoint]
    ) -> importlib.metadata.EntryPoint | None:
        """The entry point to load among those called ``name``; warn about the rest."""
        registered = self.get_plugin(name)
        if registered is not None:
            holder = self.distributions.get(name)
            owner = f"{holder[0]} {holder[1]}" if holder else "an in-process plugin"
            for ep in eps:
                if holder is not None and holder[0] == _dist_name(ep):
                    continue  # loaded by an earlier call
                _warn(
                    f"skipped plugin {name!r} ({ep.value}) from {_describe(ep)}: the name is "
                    f"taken by {owner}; block one with {BLOCK_ENV_VAR}={_block_item(ep)}"
                )
            return None
        if len(eps) == 1:
            return eps[0]
        builtins = [ep for ep in eps if _dist_name(ep) in FIRST_PARTY_DISTRIBUTIONS]
        everyone = ", ".join(_describe(ep) for ep in eps)
        if len(builtins) == 1:
            (builtin,) = builtins
            for ep in eps:
                if ep is not builtin:
                    _warn(
                        f"skipped plugin {name!r} ({ep.value}) from {_describe(ep)}: the "
                        f"built-in plugin of that name comes from {_describe(builtin)} and is "
                        f"kept. Rename the other entry point, or silence this with "
                        f"{BLOCK_ENV_VAR}={_block_item(ep)}"
                    )
            return builtin
        if builtins:
            raise PluginError(
                f"built-in plugin {name!r} is declared by several distributions: {everyone}; "
                "reinstall actsparse"
            )
        items = ",".join(_block_item(ep) for ep in eps[1:])
        _warn(
            f"skipped plugin {name!r}: {len(eps)} distributions declare it ({everyone}), and "
            f"none of them is loaded rather than an arbitrary one. Uninstall all but one, or "
            f"block the others, for example {BLOCK_ENV_VAR}={items}"
        )
        return None

    def _load_one(self, ep: importlib.metadata.EntryPoint) -> None:
        dist = ep.dist
        dist_name = _dist_name(ep)
        where = f"{ep.name!r} ({ep.value}) from {dist_name or 'an unknown distribution'}"
        try:
            plugin = ep.load()
        except Exception as exc:
            if dist_name in FIRST_PARTY_DISTRIBUTIONS:
                raise PluginError(f"built-in plugin {where} failed to import: {exc!r}") from exc
            _warn(f"skipped plugin {where}: import failed: {exc!r}")
            return
        try:
            self.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            if dist_name in FIRST_PARTY_DISTRIBUTIONS:
                raise PluginError(f"built-in plugin {where} is invalid: {exc}") from exc
            _warn(f"skipped plugin {where}: {exc}")
            return
        if dist is not None and dist_name is not None:
            self.distributions[ep.name] = (dist_name, dist.version)


def _warn(message: str) -> None:
    warnings.warn(f"actsparse: {message}", PluginWarning, stacklevel=3)


def _block_item(ep: importlib.metadata.EntryPoint) -> str:
    dist = _dist_name(ep)
    return ep.name if dist is None else f"{dist}:{ep.name}"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocked_from_env(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The items listed (comma-separated) in ``ACTSPARSE_BLOCK_PLUGINS``.

    Each item is a plugin name, ``distribution:plugin-name`` or
    ``distribution:*`` (see :class:`BlockRules`).
    """
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
        """Add one record; refuse a wrong type, a taken name or a file suffix already claimed."""
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
        if isinstance(record, Serializer) and record.suffix:
            suffix = record.suffix.lower()
            for other in table.values():
                if other.record.suffix.lower() == suffix:
                    raise DuplicateStrategyError(
                        f"file suffix {record.suffix!r} is claimed twice: by serializer "
                        f"{other.record.name!r} of {other.provider} and by serializer "
                        f"{name!r} of {entry.provider}"
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
                    kind=info.key,
                    label=info.label,
                    package=info.package,
                    name=name,
                    known=table,
                    note=self._absent_builtins(info),
                    marks={
                        key: "lossy"
                        for key, entry in table.items()
                        if isinstance(entry.record, KernelStrategy) and not entry.record.exact
                    },
                )
            ) from None

    def _absent_builtins(self, info: Kind) -> str:
        """A note for the case where the built-ins' package is installed but not registered."""
        package = info.package
        table = self._entries[info.key]
        if any(entry.distribution == package for entry in table.values()):
            return ""
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            return ""
        return (
            f" ({package} is installed, but its plugin is not registered here: "
            f"check {BLOCK_ENV_VAR} and any PluginWarning)"
        )

    @overload
    def get(self, kind: Literal["aggregate"], name: str) -> AggregateStrategy: ...
    @overload
    def get(self, kind: Literal["reduce"], name: str) -> ReduceStrategy: ...
    @overload
    def get(self, kind: Literal["mask"], name: str) -> MaskStrategy: ...
    @overload
    def get(self, kind: Literal["serializer"], name: str) -> Serializer: ...
    @overload
    def get(self, kind: Literal["kernel"], name: str) -> KernelStrategy: ...
    @overload
    def get(self, kind: str, name: str) -> Record: ...

    def get(self, kind: str, name: str) -> Record:
        """The record registered under ``name``."""
        record: Record = self.entry(kind, name).record
        return record

    def name_of(self, kind: str, value: object) -> str | None:
        """The registered name of a record or of a registered record's ``fn``, else None."""
        for name, entry in self._entries[_kind(kind).key].items():
            record = entry.record
            if value is record or value is getattr(record, "fn", None):
                return name
        return None

    @overload
    def resolve(
        self, kind: Literal["aggregate"], value: object, *, key: str | None = None
    ) -> AggregateStrategy: ...
    @overload
    def resolve(
        self, kind: Literal["reduce"], value: object, *, key: str | None = None
    ) -> ReduceStrategy: ...
    @overload
    def resolve(
        self, kind: Literal["mask"], value: object, *, key: str | None = None
    ) -> MaskStrategy: ...
    @overload
    def resolve(
        self, kind: Literal["serializer"], value: object, *, key: str | None = None
    ) -> Serializer: ...
    @overload
    def resolve(
        self, kind: Literal["kernel"], value: object, *, key: str | None = None
    ) -> KernelStrategy: ...
    @overload
    def resolve(self, kind: str, value: object, *, key: str | None = None) -> Record: ...

    def resolve(self, kind: str, value: object, *, key: str | None = None) -> Record:
        """Turn a name, a record or a plain callable into a record of ``kind``.

        A callable that is a registered strategy's ``fn`` resolves to that
        strategy; any other callable is wrapped in an unregistered record.
        """
        info = _kind(kind)
        if isinstance(value, str):
            return self.get(kind, value)
        if isinstance(value, info.record_type):
            record: Record = value  # type: ignore[assignment]
            return record
        if not callable(value):
            raise ConfigError(
                f"{key or kind} must be callable or the name of a registered "
                f"{info.label}, got {value!r}"
            )
        name = self.name_of(kind, value)
        if name is not None:
            return self.get(kind, name)
        return wrap_callable(kind, value)


def wrap_callable(
    kind: str, fn: Callable[..., Any]
) -> AggregateStrategy | ReduceStrategy | MaskStrategy:
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
