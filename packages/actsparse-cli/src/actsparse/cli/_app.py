"""Commands from plugins, the ``actsparse`` parser and :func:`main`.

Every subcommand is a :class:`Command`. Plugins add them through the
``actsparse_cli_commands`` hook, which :func:`collect_commands` calls once per
plugin with a registrar that knows the plugin; the built-in commands come the
same way, from actsparse-cli's own entry point (:mod:`actsparse.cli.plugin`).

Failures are kept apart by who wrote the code. The commands of actsparse's own
distributions are part of actsparse: a bug in them shows its traceback. A
third-party plugin whose hook or ``configure`` raises is reported in one line
(a :class:`~actsparse.core.PluginWarning`) and its commands are left out; one
whose ``run`` raises fails that command with a one-line message naming the
plugin, and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import attrs

from actsparse.core import (
    BLOCK_ENV_VAR,
    FIRST_PARTY_DISTRIBUTIONS,
    ActsparseError,
    CommandRegistrar,
    PluginError,
    PluginWarning,
    get_plugin_manager,
)

if TYPE_CHECKING:
    import pluggy

__all__ = [
    "FIRST_PARTY_DISTRIBUTIONS",
    "HOOK",
    "PROG",
    "Command",
    "CommandError",
    "DuplicateCommandError",
    "UsageError",
    "build_parser",
    "collect_commands",
    "main",
]

PROG = "actsparse"
#: The hook that plugins implement to add subcommands.
HOOK = "actsparse_cli_commands"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CommandError(ActsparseError, RuntimeError):
    """A command cannot go on; shown as ``actsparse NAME: error: ...``, exit status 1."""


class UsageError(CommandError):
    """An argument that parsed but does not fit what it is used on (such as a layer preset
    that the model lacks); shown as ``actsparse NAME: error: ...``, exit status 2."""


class DuplicateCommandError(ActsparseError, ValueError):
    """Two plugins add a subcommand of the same name."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``configure`` of a command that takes no arguments."""


@attrs.frozen
class Command:
    """One ``actsparse`` subcommand.

    Attributes:
        name: What users type after ``actsparse``.
        help: One line for ``actsparse --help``.
        configure: Adds the subcommand's arguments to its parser.
        run: Runs it with the parsed arguments; returns the exit status
            (``None`` means 0).
        description: The text of ``actsparse NAME --help``; default ``help``.
        plugin: The plugin that added it; ``None`` for a command given to
            :func:`build_parser` directly.
        distribution: The distribution that installed the plugin (``None``
            for a plugin registered in-process).
        version: That distribution's version.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None
    plugin: str | None = None
    distribution: str | None = None
    version: str | None = None

    @property
    def provider(self) -> str:
        """Who added the command, for messages."""
        if self.plugin is None:
            return "the caller"
        distribution = None if self.distribution is None else (self.distribution, self.version)
        return _provider(self.plugin, distribution)

    @property
    def first_party(self) -> bool:
        """Whether actsparse itself provides the command (then a failure is a bug)."""
        return self.plugin is None or self.distribution in FIRST_PARTY_DISTRIBUTIONS


def _provider(plugin: str, distribution: tuple[str, str | None] | None) -> str:
    if distribution is None:
        return f"plugin {plugin!r}"
    return f"plugin {plugin!r} ({distribution[0]} {distribution[1]})"


class _Registrar:
    """The :class:`~actsparse.core.CommandRegistrar` that one plugin's hook receives."""

    def __init__(
        self, taken: Mapping[str, Command], plugin: str, distribution: tuple[str, str] | None
    ) -> None:
        self._taken = taken
        self._plugin = plugin
        self._distribution = distribution
        self.added: list[Command] = []

    def add(
        self,
        name: str,
        *,
        help: str,
        run: Callable[[argparse.Namespace], int | None],
        configure: Callable[[argparse.ArgumentParser], object] | None = None,
        description: str | None = None,
    ) -> None:
        def refuse(detail: str) -> PluginError:
            return PluginError(f"plugin {self._plugin!r}: {HOOK}() {detail}")

        if not isinstance(name, str) or _NAME.fullmatch(name) is None:
            raise refuse(
                f"added a command named {name!r}: a name holds letters, digits, '-', '_' "
                "and '.', and does not start with '-'"
            )
        if not isinstance(help, str):
            raise refuse(f"added command {name!r} with help {help!r}, not a str")
        if not callable(run):
            raise refuse(f"added command {name!r} with run={run!r}, which is not callable")
        if configure is not None and not callable(configure):
            raise refuse(
                f"added command {name!r} with configure={configure!r}, which is not callable"
            )
        if description is not None and not isinstance(description, str):
            raise refuse(f"added command {name!r} with description {description!r}, not a str")
        command = Command(
            name=name,
            help=help,
            configure=_no_arguments if configure is None else configure,
            run=run,
            description=description,
            plugin=self._plugin,
            distribution=self._distribution[0] if self._distribution else None,
            version=self._distribution[1] if self._distribution else None,
        )
        earlier = self._taken.get(name) or next((c for c in self.added if c.name == name), None)
        if earlier is not None:
            raise _duplicate(earlier, command)
        self.added.append(command)


def _duplicate(earlier: Command, later: Command) -> DuplicateCommandError:
    return DuplicateCommandError(
        f"command {later.name!r} is added twice: by {earlier.provider} and by "
        f"{later.provider}; uninstall one of them, or skip a plugin by its name with "
        f"{BLOCK_ENV_VAR}=NAME"
    )


def _skip(message: str) -> None:
    warnings.warn(f"{PROG}: {message}", PluginWarning, stacklevel=3)


def collect_commands(plugin_manager: pluggy.PluginManager | None = None) -> tuple[Command, ...]:
    """Every command that the plugins add through ``actsparse_cli_commands``.

    Each plugin's hook is called on its own: when a third-party one raises, a
    :class:`~actsparse.core.PluginWarning` names it and none of its commands
    are kept; a first-party one's exception propagates. The commands of
    actsparse's own distributions come first, then the others in plugin
    registration order.

    Args:
        plugin_manager: Default: :func:`actsparse.core.get_plugin_manager`.

    Raises:
        DuplicateCommandError: Two plugins add the same name.
    """
    pm = get_plugin_manager() if plugin_manager is None else plugin_manager
    distributions: Mapping[str, tuple[str, str]] = getattr(pm, "distributions", {})
    taken: dict[str, Command] = {}
    for impl in getattr(pm.hook, HOOK).get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue  # a wrapper adds no commands of its own
        distribution = distributions.get(impl.plugin_name)
        registrar = _Registrar(taken, impl.plugin_name, distribution)
        promised: CommandRegistrar = registrar  # what the hookspec promises plugins
        kwargs: dict[str, Any] = {"commands": promised} if "commands" in impl.argnames else {}
        try:
            impl.function(**kwargs)
        except DuplicateCommandError:
            raise
        except Exception as exc:
            if distribution is not None and distribution[0] in FIRST_PARTY_DISTRIBUTIONS:
                raise
            provider = _provider(impl.plugin_name, distribution)
            _skip(f"left out the commands of {provider}: {HOOK}() raised {exc!r}")
            continue
        for command in registrar.added:
            taken[command.name] = command
    return tuple(sorted(taken.values(), key=lambda command: not command.first_party))


def _versions() -> str:
    found = []
    for name in (
        "actsparse-core",
        "actsparse-masks",
        "actsparse-hooks",
        "actsparse-serialize",
        "actsparse-cli",
    ):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found) or "no actsparse distribution installed"


def build_parser(
    commands: Sequence[Command] | None = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
) -> argparse.ArgumentParser:
    """The ``actsparse`` parser with one subparser per command.

    Args:
        commands: Default: :func:`collect_commands` (every plugin's commands).
        plugin_manager: Where to collect them from; default
            :func:`actsparse.core.get_plugin_manager`.

    A third-party command whose ``configure`` raises is left out, with a
    :class:`~actsparse.core.PluginWarning` that names its plugin.
    """
    if commands is None:
        commands = collect_commands(plugin_manager)
    parser = argparse.ArgumentParser(
        prog=PROG, description="Activation sparsity for PyTorch: the command line."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s: {_versions()}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="when a plugin's command fails, show where (its traceback)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    added: dict[str, Command] = {}
    for command in commands:
        if command.name in added:
            raise _duplicate(added[command.name], command)
        # The arguments go to a parser of their own first: a third-party
        # configure that raises half way leaves nothing behind.
        staged = argparse.ArgumentParser(prog=f"{PROG} {command.name}")
        try:
            command.configure(staged)
        except Exception as exc:
            if command.first_party:
                raise
            _skip(
                f"left out command {command.name!r} of {command.provider}: "
                f"its configure raised {exc!r}"
            )
            continue
        help_line = command.help if command.first_party else f"{command.help} [{command.plugin}]"
        sub = subparsers.add_parser(
            command.name,
            help=help_line,
            description=command.description or command.help,
            parents=[staged],
            add_help=False,  # the staged parser's -h is copied
        )
        sub.set_defaults(_command=command)
        added[command.name] = command
    return parser


@contextlib.contextmanager
def _plugin_warnings_as_lines(stream: TextIO) -> Iterator[None]:
    """Show every :class:`PluginWarning` raised inside as ``actsparse: warning: ...``."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        show = warnings.showwarning

        def show_line(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, PluginWarning):
                text = str(message).removeprefix(f"{PROG}: ")
                print(f"{PROG}: warning: {text}", file=stream)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_line
        yield


#: The exit status when the reader of the output went away (``actsparse inspect F | head``):
#: 128 + SIGPIPE, what a shell reports for a command that a closed pipe stopped.
BROKEN_PIPE_STATUS = 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``actsparse`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status.

    When the reader of standard output goes away (``actsparse inspect FILE |
    head``), the command stops quietly with status 141 (128 + SIGPIPE), as
    shell tools do, rather than with a ``BrokenPipeError`` traceback.
    """
    try:
        status = _main(argv)
        # Flush here, inside the try: a pipe closed early fails on this write,
        # not at interpreter exit where nothing can catch it.
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    return status


def _silence_stdout() -> None:
    """Point standard output at devnull, so that the interpreter's last flush finds
    nothing to write to the closed pipe (and prints no second error)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's StringIO): nothing is flushed at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    try:
        with _plugin_warnings_as_lines(sys.stderr):
            parser = build_parser()
    except ActsparseError as exc:  # two plugins add one name; a built-in plugin is broken
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    command: Command = args._command
    try:
        status = command.run(args)
    except ActsparseError as exc:
        print(f"{PROG} {command.name}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print(f"{PROG} {command.name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader went away: main() stops quietly, whoever wrote the command
    except Exception as exc:
        if command.first_party:
            raise  # a bug in actsparse: show where
        if args.traceback:
            traceback.print_exc()
        hint = "" if args.traceback else f" (`{PROG} --traceback {command.name} ...` shows where)"
        print(
            f"{PROG} {command.name}: error: the command of {command.provider} failed: "
            f"{type(exc).__name__}: {exc}{hint}",
            file=sys.stderr,
        )
        return 1
    if status is None:
        return 0
    if isinstance(status, bool) or not isinstance(status, int):
        print(
            f"{PROG} {command.name}: error: the command of {command.provider} returned "
            f"{status!r}, not an exit status",
            file=sys.stderr,
        )
        return 1
    return status
