"""actsparse.cli: the ``actsparse`` command line.

``actsparse plugins``, ``actsparse inspect FILE``, ``actsparse demo`` and, on a
``transformers`` model directory, ``actsparse calibrate``, ``evaluate`` and
``sweep`` are the built-in subcommands; plugins add more by implementing the
``actsparse_cli_commands`` hook (see the plugin guide), and the built-ins are
added through that same hook, from this distribution's ``actsparse`` entry
point (:mod:`actsparse.cli.plugin`). ``python -m actsparse.cli`` runs the same
command as the ``actsparse`` script.

Exit status: 0 on success, 1 when the command fails (the message goes to
stderr, without a traceback), 2 for bad arguments (argparse's usage message,
or a :class:`UsageError` for an argument that does not fit the model), 130
when interrupted.
"""

from __future__ import annotations

from actsparse.cli._app import (
    FIRST_PARTY_DISTRIBUTIONS,
    PROG,
    Command,
    CommandError,
    DuplicateCommandError,
    UsageError,
    build_parser,
    collect_commands,
    main,
)
from actsparse.cli.plugin import COMMANDS

__version__ = "0.1.0"

__all__ = [
    "COMMANDS",
    "FIRST_PARTY_DISTRIBUTIONS",
    "PROG",
    "Command",
    "CommandError",
    "DuplicateCommandError",
    "UsageError",
    "__version__",
    "build_parser",
    "collect_commands",
    "main",
]
