"""Plugins add ``actsparse`` subcommands through the ``actsparse_cli_commands`` hook.

In-process plugins are registered with ``actsparse.core.register_plugin``; the
fixture distribution (``tests/fixtures/actsparse-fixture-plugin``) adds
``fixture-echo`` and ``fixture-fail`` through its real entry point.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import actsparse.core as core
from actsparse import cli
from actsparse.cli import plugin as builtin
from actsparse.core import (
    BLOCK_ENV_VAR,
    ActsparseError,
    CommandRegistrar,
    ConfigError,
    PluginWarning,
    hookimpl,
)

FIXTURE_DIST = "actsparse-fixture-plugin"
BUILTIN_NAMES = ["plugins", "inspect", "demo", "calibrate", "evaluate", "sweep"]

Register = Callable[[object, str], None]


@pytest.fixture
def register() -> Iterator[Register]:
    """Register plugins in-process for one test; unregister them afterwards."""
    added: list[object] = []

    def add(plugin: object, name: str) -> None:
        core.register_plugin(plugin, name=name)
        added.append(plugin)

    yield add
    for plugin in reversed(added):
        core.unregister_plugin(plugin)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def greet(args: argparse.Namespace) -> None:
    print(f"hello, {args.who}")


def add_who(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("who")


class Adds:
    """A plugin whose hook adds the given commands (``commands.add`` keyword arguments)."""

    def __init__(self, *specs: dict[str, Any], then: BaseException | None = None) -> None:
        self.specs = specs
        self.then = then

    @hookimpl
    def actsparse_cli_commands(self, commands: CommandRegistrar) -> None:
        for spec in self.specs:
            commands.add(**spec)
        if self.then is not None:
            raise self.then


def greeter(name: str = "greet") -> Adds:
    return Adds({"name": name, "help": "say hello", "configure": add_who, "run": greet})


def running(fn: Callable[[argparse.Namespace], Any], name: str = "job") -> Adds:
    return Adds({"name": name, "help": "runs fn", "run": fn})


# ------------------------------------------------------------------ adding commands


def test_an_in_process_plugin_adds_a_command(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    register(greeter(), "greeter")
    assert run(["greet", "world"], capsys) == (0, "hello, world\n", "")

    code, out, _ = run(["--help"], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.strip().startswith("greet "))
    assert "say hello [greeter]" in line  # a third party's command names its plugin

    code, out, _ = run(["greet", "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: actsparse greet [-h] who")

    code, _, err = run(["greet"], capsys)
    assert code == 2
    assert "actsparse greet: error: the following arguments are required: who" in err


def test_the_builtin_commands_come_through_the_hook() -> None:
    (entry_point,) = importlib.metadata.entry_points(group="actsparse", name="actsparse.cli")
    assert entry_point.value == "actsparse.cli.plugin"
    assert entry_point.dist is not None
    assert entry_point.dist.name == "actsparse-cli"

    commands = cli.collect_commands()
    ours = [command for command in commands if command.plugin == "actsparse.cli"]
    assert [command.name for command in ours] == BUILTIN_NAMES
    version = importlib.metadata.version("actsparse-cli")
    for command in ours:
        assert (command.distribution, command.version) == ("actsparse-cli", version)
        assert command.first_party
        assert command.provider == f"plugin 'actsparse.cli' (actsparse-cli {version})"
    assert [command.name for command in commands[: len(BUILTIN_NAMES)]] == BUILTIN_NAMES


def test_blocking_the_builtin_entry_point_removes_the_builtin_commands() -> None:
    pm = core.make_plugin_manager(blocked=["actsparse.cli"])
    names = [command.name for command in cli.collect_commands(pm)]
    assert not set(BUILTIN_NAMES) & set(names), names
    with pytest.raises(SystemExit) as exc:
        cli.build_parser(plugin_manager=pm).parse_args(["plugins"])
    assert exc.value.code == 2


def test_builtin_commands_come_first_then_plugins_in_registration_order(
    register: Register,
) -> None:
    register(greeter("zeta"), "later-alphabetically")
    register(greeter("alpha"), "earlier-alphabetically")
    names = [command.name for command in cli.collect_commands()]
    assert names[: len(BUILTIN_NAMES)] == BUILTIN_NAMES
    assert names.index("zeta") < names.index("alpha")


def test_a_hook_may_leave_out_the_registrar(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    class Quiet:
        @hookimpl
        def actsparse_cli_commands(self) -> None:
            """Adds nothing: pluggy lets an implementation take fewer arguments."""

    register(Quiet(), "quiet")
    code, _, err = run(["plugins", "--kind", "reduce"], capsys)
    assert (code, err) == (0, "")


def test_a_command_without_arguments(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    register(running(lambda args: print("ran")), "jobs")
    assert run(["job"], capsys) == (0, "ran\n", "")
    code, _, err = run(["job", "extra"], capsys)
    assert code == 2
    assert "unrecognized arguments: extra" in err


def test_the_description_is_the_command_help_text(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"name": "job", "help": "one line", "run": greet, "description": "Many words."}
    register(Adds(spec), "jobs")
    code, out, _ = run(["job", "--help"], capsys)
    assert code == 0
    assert "Many words." in out


# ------------------------------------------------------------------ one name, two plugins


def test_two_plugins_adding_one_name_is_an_error_naming_both(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    register(greeter(), "first")
    register(greeter(), "second")
    code, out, err = run(["greet", "you"], capsys)
    assert (code, out) == (1, "")
    line = one_line(err)
    assert line.startswith(
        "actsparse: error: command 'greet' is added twice: by plugin 'first' and by plugin 'second'"
    )
    assert BLOCK_ENV_VAR in line
    with pytest.raises(cli.DuplicateCommandError, match="'first' and by plugin 'second'") as exc:
        cli.collect_commands()
    assert isinstance(exc.value, ActsparseError)
    assert isinstance(exc.value, ValueError)


def test_a_plugin_cannot_take_a_builtin_name(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    register(greeter("plugins"), "thief")
    code, _, err = run(["plugins"], capsys)
    assert code == 1
    version = importlib.metadata.version("actsparse-cli")
    assert (
        f"command 'plugins' is added twice: by plugin 'actsparse.cli' (actsparse-cli {version}) "
        "and by plugin 'thief'"
    ) in one_line(err)


def test_one_plugin_adding_a_name_twice(register: Register) -> None:
    twice = Adds(*2 * ({"name": "job", "help": "h", "run": greet},))
    register(twice, "twice")
    with pytest.raises(cli.DuplicateCommandError, match="by plugin 'twice' and by plugin 'twice'"):
        cli.collect_commands()


def test_commands_given_directly_must_not_share_a_name() -> None:
    command = cli.Command(name="job", help="h", configure=add_who, run=greet)
    with pytest.raises(cli.DuplicateCommandError, match="'job' is added twice"):
        cli.build_parser((command, command))


# ------------------------------------------------------------------ a plugin that fails


def test_a_failing_hook_is_reported_and_the_rest_works(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    shaky = Adds({"name": "shaky-one", "help": "h", "run": greet}, then=RuntimeError("boom"))
    register(shaky, "shaky")
    register(greeter(), "greeter")
    code, out, err = run(["greet", "all"], capsys)
    assert (code, out) == (0, "hello, all\n")
    assert one_line(err) == (
        "actsparse: warning: left out the commands of plugin 'shaky': "
        "actsparse_cli_commands() raised RuntimeError('boom')"
    )
    # what it added before it raised is left out too
    code, _, err = run(["shaky-one", "x"], capsys)
    assert code == 2
    assert "invalid choice: 'shaky-one'" in err
    # outside main() the report is a PluginWarning
    with pytest.warns(PluginWarning, match="plugin 'shaky'"):
        names = [command.name for command in cli.collect_commands()]
    assert "shaky-one" not in names
    assert "greet" in names


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "-x"}, "a command named '-x': a name holds letters"),
        ({"name": ""}, "a command named '': a name holds letters"),
        ({"name": "two words"}, "a command named 'two words'"),
        ({"name": 3}, "a command named 3"),
        ({"help": None}, "added command 'job' with help None, not a str"),
        ({"run": "go"}, "added command 'job' with run='go', which is not callable"),
        ({"configure": 5}, "added command 'job' with configure=5, which is not callable"),
        ({"description": 1}, "added command 'job' with description 1, not a str"),
    ],
)
def test_bad_arguments_to_add_leave_out_the_plugin(
    spec: dict[str, Any],
    message: str,
    register: Register,
    capsys: pytest.CaptureFixture[str],
) -> None:
    register(Adds({"name": "job", "help": "h", "run": greet, **spec}), "sloppy")
    code, _, err = run(["plugins", "--kind", "reduce"], capsys)
    assert code == 0
    line = one_line(err)
    assert line.startswith("actsparse: warning: left out the commands of plugin 'sloppy': ")
    assert "PluginError" in line
    assert message in line


def test_a_failing_configure_leaves_out_that_command_only(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    def half_way(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--first")
        raise ValueError("no second")

    register(
        Adds(
            {"name": "bad", "help": "h", "configure": half_way, "run": greet},
            {"name": "good", "help": "h", "configure": add_who, "run": greet},
        ),
        "mixed",
    )
    code, out, err = run(["good", "me"], capsys)
    assert (code, out) == (0, "hello, me\n")
    assert one_line(err) == (
        "actsparse: warning: left out command 'bad' of plugin 'mixed': "
        "its configure raised ValueError('no second')"
    )
    code, _, err = run(["bad", "--first", "1"], capsys)
    assert code == 2
    assert "invalid choice: 'bad'" in err


def test_a_failing_run_is_one_line_naming_the_plugin(
    register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    def crash(args: argparse.Namespace) -> None:
        raise RuntimeError("boom")

    register(running(crash, "crash"), "crasher")
    code, out, err = run(["crash"], capsys)
    assert (code, out) == (1, "")
    assert one_line(err) == (
        "actsparse crash: error: the command of plugin 'crasher' failed: RuntimeError: boom "
        "(`actsparse --traceback crash ...` shows where)"
    )
    code, _, err = run(["--traceback", "crash"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert 'raise RuntimeError("boom")' in err
    assert err.endswith(
        "actsparse crash: error: the command of plugin 'crasher' failed: RuntimeError: boom\n"
    )


@pytest.mark.parametrize(
    ("outcome", "code", "err"),
    [
        (None, 0, ""),
        (4, 4, ""),
        (ConfigError("bad input"), 1, "actsparse job: error: bad input\n"),
        (KeyboardInterrupt(), 130, "actsparse job: interrupted\n"),
        (
            "yes",
            1,
            "actsparse job: error: the command of plugin 'jobs' returned 'yes', "
            "not an exit status\n",
        ),
        (
            True,
            1,
            "actsparse job: error: the command of plugin 'jobs' returned True, "
            "not an exit status\n",
        ),
    ],
)
def test_what_a_plugin_command_returns_or_raises(
    outcome: object, code: int, err: str, register: Register, capsys: pytest.CaptureFixture[str]
) -> None:
    def job(args: argparse.Namespace) -> Any:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    register(running(job), "jobs")
    assert run(["job"], capsys) == (code, "", err)


def test_a_builtin_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(parser: argparse.ArgumentParser) -> None:
        raise ZeroDivisionError("bug")

    command = cli.Command(name="boom", help="fails", configure=broken, run=greet)
    monkeypatch.setattr(builtin, "COMMANDS", (command,))
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])

    class Unreadable:
        def __iter__(self) -> Iterator[cli.Command]:
            raise ZeroDivisionError("bug in the hook")

    monkeypatch.setattr(builtin, "COMMANDS", Unreadable())
    with pytest.raises(ZeroDivisionError, match="bug in the hook"):
        cli.main(["plugins"])


# ------------------------------------------------------------------ real entry points


def test_the_fixture_distribution_adds_commands(capsys: pytest.CaptureFixture[str]) -> None:
    version = importlib.metadata.version(FIXTURE_DIST)
    by_name = {command.name: command for command in cli.collect_commands()}
    echo = by_name["fixture-echo"]
    assert (echo.plugin, echo.distribution, echo.version) == ("fixture", FIXTURE_DIST, version)
    assert not echo.first_party
    assert run(["fixture-echo", "a", "b", "--upper"], capsys) == (0, "A B\n", "")
    assert run(["fixture-echo", "exit", "three"], capsys) == (3, "exit three\n", "")


def _console_script(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = shutil.which("actsparse", path=sysconfig.get_path("scripts"))
    assert script is not None, "the actsparse console script is not installed"
    return subprocess.run([script, *argv], capture_output=True, text=True, check=False, env=env)


def test_a_third_party_command_failing_in_a_real_process() -> None:
    version = importlib.metadata.version(FIXTURE_DIST)
    done = _console_script("fixture-fail")
    assert (done.returncode, done.stdout) == (1, "")
    assert one_line(done.stderr) == (
        f"actsparse fixture-fail: error: the command of plugin 'fixture' ({FIXTURE_DIST} "
        f"{version}) failed: RuntimeError: fixture-fail fails on purpose "
        "(`actsparse --traceback fixture-fail ...` shows where)"
    )
    env = {**os.environ, BLOCK_ENV_VAR: "fixture"}
    blocked = _console_script("fixture-echo", "hi", env=env)
    assert blocked.returncode == 2
    assert "invalid choice: 'fixture-echo'" in blocked.stderr
