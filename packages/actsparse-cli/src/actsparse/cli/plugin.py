"""actsparse-cli's ``actsparse`` entry point: the built-in subcommands.

``plugins``, ``inspect``, ``demo``, and the text-model commands ``calibrate``,
``evaluate`` and ``sweep`` are added through the
``actsparse_cli_commands`` hook, exactly as a third-party plugin adds its own.
Every process that builds the strategy registry imports this module, so it
imports nothing heavy: each command imports what it needs when it runs.
"""

from __future__ import annotations

from actsparse.cli import (
    _cmd_calibrate,
    _cmd_demo,
    _cmd_evaluate,
    _cmd_inspect,
    _cmd_plugins,
    _cmd_sweep,
)
from actsparse.cli._app import Command
from actsparse.core import CommandRegistrar, hookimpl

__all__ = ["COMMANDS", "actsparse_cli_commands"]

#: The built-in commands, in the order ``actsparse --help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(
        name="plugins",
        help=_cmd_plugins.HELP,
        configure=_cmd_plugins.configure,
        run=_cmd_plugins.run,
    ),
    Command(
        name="inspect",
        help=_cmd_inspect.HELP,
        configure=_cmd_inspect.configure,
        run=_cmd_inspect.run,
    ),
    Command(
        name="demo",
        help=_cmd_demo.HELP,
        configure=_cmd_demo.configure,
        run=_cmd_demo.run,
    ),
    Command(
        name="calibrate",
        help=_cmd_calibrate.HELP,
        configure=_cmd_calibrate.configure,
        run=_cmd_calibrate.run,
    ),
    Command(
        name="evaluate",
        help=_cmd_evaluate.HELP,
        configure=_cmd_evaluate.configure,
        run=_cmd_evaluate.run,
    ),
    Command(
        name="sweep",
        help=_cmd_sweep.HELP,
        configure=_cmd_sweep.configure,
        run=_cmd_sweep.run,
    ),
)


@hookimpl
def actsparse_cli_commands(commands: CommandRegistrar) -> None:
    """Add the built-in commands."""
    for command in COMMANDS:
        commands.add(
            command.name,
            help=command.help,
            configure=command.configure,
            run=command.run,
            description=command.description,
        )
