"""The ``actsparse`` command line: every subcommand, its output and its error paths."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import actsparse.core as core
import actsparse.serialize as serialize
from actsparse import cli
from actsparse.cli import demo
from actsparse.cli import plugin as builtin
from actsparse.core import MaskStrategy, PluginError, Registry, hookimpl
from actsparse.hooks import ActivationSparsifier


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err


# ------------------------------------------------------------------ top level


def test_console_script_entry_point() -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts", name="actsparse")
    assert [ep.value for ep in scripts] == ["actsparse.cli:main"]


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run([], capsys)
    assert code == 2
    assert "the following arguments are required: COMMAND" in err
    assert_no_traceback(err)


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2
    assert "invalid choice: 'frobnicate'" in err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in cli.COMMANDS:
        assert command.name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert f"actsparse-hooks {importlib.metadata.version('actsparse-hooks')}" in out
    assert "actsparse-core" in out
    assert f"actsparse-cli {importlib.metadata.version('actsparse-cli')}" in out


def test_a_command_is_one_table_entry(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []
    extra = cli.Command(
        name="echo",
        help="say it",
        configure=lambda parser: parser.add_argument("word"),
        run=lambda args: seen.append(args.word) or 0,
    )
    parser = cli.build_parser((*cli.COMMANDS, extra))
    args = parser.parse_args(["echo", "hi"])
    assert args._command.run(args) == 0
    assert seen == ["hi"]


def test_real_process_exit_codes(tmp_path: Path) -> None:
    """The module runs as a program: bad arguments exit 2 with a usage line, no traceback."""
    bad = subprocess.run(
        [sys.executable, "-m", "actsparse.cli", "demo", "--epochs", "zero"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "argument --epochs: 'zero' is not an integer" in bad.stderr
    assert_no_traceback(bad.stderr)


# ------------------------------------------------------------------ plugins


def test_plugins_lists_every_registered_entry(capsys: pytest.CaptureFixture[str]) -> None:
    registry = core.get_registry()
    code, out, err = run(["plugins"], capsys)
    assert code == 0
    assert err == ""
    for kind in core.KINDS:
        for entry in registry.entries(kind):
            line = next(
                line for line in out.splitlines() if line.split()[:1] == [entry.record.name]
            )
            assert f"{entry.distribution} {entry.version}" in line
    assert "sparsity_level (required)" in out
    for title in ("aggregate strategies", "reduce strategies", "mask strategies", "serializers"):
        assert title in out


def test_plugins_json_matches_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plugins", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    registry = core.get_registry()
    expected = {(kind, name) for kind in core.KINDS for name in registry.names(kind)}
    assert {(row["kind"], row["name"]) for row in rows} == expected
    magnitude = next(row for row in rows if row["name"] == "magnitude")
    assert magnitude["distribution"] == "actsparse-masks"
    assert magnitude["version"] == importlib.metadata.version("actsparse-masks")
    assert magnitude["params"] == ["sparsity_level"]
    assert magnitude["required"] == ["sparsity_level"]
    total = next(row for row in rows if row["kind"] == "aggregate" and row["name"] == "sum")
    assert total["elementwise"] is True
    coo = next(row for row in rows if row["name"] == "sparse_coo")
    assert coo["binary"] is False
    assert coo["parameters"] == "in-memory"


def test_plugins_kind_filter(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plugins", "--kind", "reduce", "--kind", "serializer", "--json"], capsys)
    assert code == 0
    assert {row["kind"] for row in json.loads(out)} == {"reduce", "serializer"}


def test_plugins_shows_an_in_process_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    class Plugin:
        @hookimpl
        def actsparse_mask_strategies(self) -> list[MaskStrategy]:
            return [
                MaskStrategy(name="cli_anything", fn=lambda t, **kw: t, description="any keys"),
                MaskStrategy(name="cli_nothing", fn=lambda t: t, params=()),
            ]

    plugin = Plugin()
    core.register_plugin(plugin, name="cli-test-plugin")
    try:
        code, out, _ = run(["plugins", "--kind", "mask"], capsys)
    finally:
        core.unregister_plugin(plugin)
    assert code == 0
    anything = next(line for line in out.splitlines() if "cli_anything" in line)
    assert "plugin 'cli-test-plugin' (no distribution)" in anything
    assert "any sparse_config key" in anything
    nothing = next(line for line in out.splitlines() if "cli_nothing" in line)
    assert "none" in nothing


def test_plugins_with_nothing_registered(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "get_registry", lambda: Registry())
    code, out, _ = run(["plugins"], capsys)
    assert code == 0
    assert "(none registered: pip install actsparse-masks)" in out
    assert "(none registered: pip install actsparse-serialize)" in out


def test_plugins_broken_plugin_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Registry:
        raise PluginError("plugin 'x' raised in actsparse_mask_strategies(): boom")

    monkeypatch.setattr(core, "get_registry", broken)
    code, _out, err = run(["plugins"], capsys)
    assert code == 1
    assert err.startswith("actsparse plugins: error: plugin 'x' raised")
    assert_no_traceback(err)


def test_plugins_bad_kind(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["plugins", "--kind", "colour"], capsys)
    assert code == 2
    assert "argument --kind: invalid choice: 'colour'" in err


# ------------------------------------------------------------------ demo


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "0,1.5"], "argument --levels: sparsity level 1.5 is outside [0, 1]"),
        (["--levels", "0,x"], "argument --levels: 'x' is not a number"),
        (["--levels", ","], "argument --levels: give at least one level"),
        (["--levels", "0.5,0.5"], "argument --levels: levels repeat a value"),
        (["--epochs", "0"], "argument --epochs: 0 is not a positive integer"),
        (["--batch-size", "-3"], "argument --batch-size: -3 is not a positive integer"),
        (["--tolerance", "200"], "argument --tolerance: 200 is outside [0, 100]"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_demo_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(["demo", "--out", str(tmp_path / "out"), *args], capsys)
    assert code == 2
    assert message in err
    assert_no_traceback(err)
    assert not (tmp_path / "out").exists()


def test_demo_out_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("")
    code, _, err = run(["demo", "--quick", "--out", str(target)], capsys)
    assert code == 1
    assert "exists and is not a directory" in err


@pytest.mark.parametrize("module", ["sklearn", "matplotlib", "tqdm"])
def test_demo_without_its_extra(
    module: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    code, _out, err = run(["demo", "--quick", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert 'pip install "actsparse-cli[demo]"' in err
    assert {"sklearn": "scikit-learn"}.get(module, module) in err
    assert_no_traceback(err)
    assert not (tmp_path / "out").exists()


def test_demo_without_the_builtin_strategies(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(demo, "get_registry", lambda: Registry())
    code, _, err = run(["demo", "--quick", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert "pip install actsparse-masks" in err
    assert_no_traceback(err)


def test_demo_without_actsparse_serialize(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "actsparse.serialize", None)
    code, _, err = run(["demo", "--quick", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert "pip install actsparse-serialize" in err
    assert_no_traceback(err)
    assert not (tmp_path / "out").exists()


def test_demo_extra_brings_what_the_demo_imports() -> None:
    """``actsparse-cli[demo]`` pulls the siblings the demo needs; the base install does not."""
    requires = importlib.metadata.requires("actsparse-cli") or []

    def name(requirement: str) -> str:
        found = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert found, requirement
        return found.group()

    base = {name(r) for r in requires if "extra" not in r}
    demo_extra = {name(r) for r in requires if re.search(r"extra\s*==\s*['\"]demo['\"]", r)}
    assert not {"actsparse-masks", "actsparse-serialize"} & base, base
    assert {"actsparse-masks", "actsparse-serialize", "scikit-learn", "matplotlib", "tqdm"} <= (
        demo_extra
    )


@pytest.mark.slow
def test_demo_quick_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "demo-out"
    code, out, err = run(
        ["demo", "--quick", "--out", str(out_dir), "--no-progress", "--levels", "0,0.5,1"], capsys
    )
    assert code == 0, err
    # the table: one row per level, then the dense row
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mask", "level"])
    rows = lines[header + 1 : header + 5]
    assert [row.split()[0] for row in rows] == ["0%", "50%", "100%", "dense"]
    assert "outputs identical on all 360 test images" in out

    results = json.loads((out_dir / "results.json").read_text())
    assert results["identical_after_reload"] is True
    levels = [row["level"] for row in results["rows"]]
    assert levels == [0.0, 0.5, 1.0]
    by_level = {row["level"]: row for row in results["rows"]}
    # level 0 zeroes nothing: its accuracy is the dense model's
    assert by_level[0.0]["accuracy"] == results["dense_accuracy"]
    # level 1 zeroes every input of conv2, fc1 and fc2
    assert by_level[1.0]["overall_sparsity"] == 1.0
    # masks only add zeros: measured sparsity never falls below level 0's
    assert by_level[0.5]["overall_sparsity"] >= by_level[0.0]["overall_sparsity"]
    for name in demo.SPARSIFIED_LAYERS:
        assert by_level[0.5]["activation_sparsity"][name] >= 0.5 - 1e-6

    png = (out_dir / demo.PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000

    # the state file is actsparse.serialize's default format; it loads into a fresh model
    state_file = out_dir / demo.STATE_FILE
    assert state_file.name == "sparsifier_state.safetensors"
    state = serialize.load(state_file, format="safetensors")
    model = demo.DigitsCNN()
    sparsifier = ActivationSparsifier(model)
    sparsifier.load_state_dict(state)
    assert set(sparsifier.data_groups) == set(demo.SPARSIFIED_LAYERS)
    assert all(g["hook_state"] == "sparsify" for g in sparsifier.data_groups.values())
    saved = results["saved_level"]
    assert state["defaults"]["sparse_config"] == {"sparsity_level": saved}
    mask = sparsifier.get_mask("fc1")
    assert isinstance(mask, torch.Tensor)
    assert float((mask == 0).float().mean()) == pytest.approx(saved, abs=1 / mask.numel())

    # and `actsparse inspect` describes it
    code, out, err = run(["inspect", "--json", str(state_file)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "safetensors"
    assert [layer["name"] for layer in report["layers"]] == list(demo.SPARSIFIED_LAYERS)
    fc1 = next(layer for layer in report["layers"] if layer["name"] == "fc1")
    assert fc1["mask"]["zeros"] == int((mask == 0).sum())


def test_heavy_packages_load_only_when_a_command_needs_them() -> None:
    # (tqdm is left out: torch itself imports it when it is installed)
    code = (
        "import sys\n"
        "from actsparse.cli import demo\nimport actsparse.cli as cli\n"
        "assert cli.main(['plugins', '--kind', 'mask']) == 0\n"
        "heavy = sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def _command_raising(exc: BaseException) -> cli.Command:
    def run(args: Any) -> int:
        raise exc

    return cli.Command(name="boom", help="fails", configure=lambda parser: None, run=run)


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (core.StateError("step() before any forward pass"), 1, "actsparse boom: error: step()"),
        (cli.CommandError("cannot go on"), 1, "actsparse boom: error: cannot go on"),
        (KeyboardInterrupt(), 130, "actsparse boom: interrupted"),
    ],
)
def test_failures_are_messages_with_an_exit_status(
    exc: BaseException,
    code: int,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(builtin, "COMMANDS", (_command_raising(exc),))
    got, _, err = run(["boom"], capsys)
    assert got == code
    assert err.startswith(message)
    assert_no_traceback(err)


def test_an_unexpected_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin, "COMMANDS", (_command_raising(ZeroDivisionError("bug")),))
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])


def test_demo_out_cannot_be_created(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(["demo", "--quick", "--out", str(blocker / "sub")], capsys)
    assert code == 1
    assert "cannot write to" in err
    assert_no_traceback(err)


def test_demo_fails_when_reloaded_outputs_differ(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    different = demo.DemoResult(
        dense_accuracy=0.9, rows=(), saved_level=0.0, files={}, identical=False, elapsed=0.0
    )
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: different)
    code, _, err = run(["demo", "--quick", "--out", str(tmp_path)], capsys)
    assert code == 1
    assert "different outputs" in err


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"levels": []}, "levels"),
        ({"levels": [0.5, 2]}, "levels"),
        ({"levels": [0.5, 0.5]}, "levels"),
        ({"tolerance": 5}, "tolerance"),
        ({"tolerance": "1"}, "tolerance"),
    ],
)
def test_run_demo_rejects_bad_arguments_before_writing(
    kwargs: dict[str, Any], field: str, tmp_path: Path
) -> None:
    with pytest.raises(core.ConfigError, match=field):
        demo.run_demo(out=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
