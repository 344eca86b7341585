"""actsparse-hooks is the runtime alone: no command line, no demo, no test models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

import pytest


@pytest.mark.parametrize("module", ["cli", "demo", "workflow", "__main__"])
def test_no_command_line_demo_or_test_model_module(module: str) -> None:
    assert importlib.util.find_spec(f"actsparse.hooks.{module}") is None


def test_no_console_script_and_only_the_progress_kernels_and_triton_extras() -> None:
    dist = importlib.metadata.distribution("actsparse-hooks")
    assert [ep.name for ep in dist.entry_points if ep.group == "console_scripts"] == []
    assert sorted(dist.metadata.get_all("Provides-Extra") or []) == [
        "kernels",
        "progress",
        "triton",
    ]


def test_requires_nothing_of_the_command_line() -> None:
    names = {
        re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0]
        for requirement in importlib.metadata.requires("actsparse-hooks") or []
    }
    assert "actsparse-core" in names
    assert not {"actsparse-cli", "scikit-learn", "matplotlib"} & names, names
    # the kernels, and ninja to build them, are the actsparse-kernels plugin's: an extra
    always = {
        re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0]
        for requirement in importlib.metadata.requires("actsparse-hooks") or []
        if "extra ==" not in requirement
    }
    assert not {"actsparse-kernels", "ninja"} & always, always
