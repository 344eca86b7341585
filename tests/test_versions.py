"""Every distribution in packages/ is released at one version.

Each ``packages/*/pyproject.toml`` states the same ``version``; every
requirement on an actsparse distribution, in the dependencies and in every
extra, pins exactly that version (``==``); and the installed distributions
report it, both in their metadata and as ``actsparse.<name>.__version__``.
Packages are found by globbing, so a new one is checked without editing this file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = sorted((ROOT / "packages").glob("*/pyproject.toml"))


def _project(pyproject: Path) -> dict[str, Any]:
    with pyproject.open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


PROJECTS = {path.parent.name: _project(path) for path in PYPROJECTS}


def _version(package: str) -> str:
    project = PROJECTS[package]
    assert "version" in project, f"{package}: pyproject.toml states no [project] version"
    version: str = project["version"]
    return version


def _distributions() -> dict[str, str]:
    """Canonical distribution name -> the version its pyproject.toml states."""
    return {canonicalize_name(p["name"]): _version(folder) for folder, p in PROJECTS.items()}


def _requirements(project: dict[str, Any]) -> list[tuple[str, Requirement]]:
    """(where, requirement) for the dependencies and every optional-dependencies extra."""
    found = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        found.extend((f"optional-dependencies.{extra}", Requirement(r)) for r in reqs)
    return found


def _modules(package: str) -> list[str]:
    """The ``actsparse.<name>`` modules that ``packages/<package>/src`` holds."""
    src = ROOT / "packages" / package / "src" / "actsparse"
    return sorted(f"actsparse.{init.parent.name}" for init in src.glob("*/__init__.py"))


def test_the_packages_are_found() -> None:
    assert PROJECTS, f"no pyproject.toml under {ROOT / 'packages'}"
    for package in PROJECTS:
        assert _modules(package), f"{package}: no src/actsparse/<name>/__init__.py"


def test_every_package_states_the_same_version() -> None:
    versions = {package: _version(package) for package in PROJECTS}
    assert len(set(versions.values())) == 1, f"the packages disagree on the version: {versions}"


@pytest.mark.parametrize("package", sorted(PROJECTS))
def test_every_actsparse_requirement_pins_the_version(package: str) -> None:
    version = _version(package)
    distributions = _distributions()
    for where, req in _requirements(PROJECTS[package]):
        name = canonicalize_name(req.name)
        if not name.startswith("actsparse-"):
            continue
        assert name in distributions, f"{package} {where}: {req} is not a package in packages/"
        pins = [(spec.operator, spec.version) for spec in req.specifier]
        assert pins == [("==", version)], f"{package} {where}: {req} must pin =={version}"
        assert distributions[name] == version, (
            f"{package} {where}: {req} pins a package that states {distributions[name]}"
        )


@pytest.mark.parametrize("package", sorted(PROJECTS))
def test_the_installed_package_reports_the_version(package: str) -> None:
    version = _version(package)
    name = PROJECTS[package]["name"]
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: pip install -c constraints.txt packages/{package}")
    assert installed == version, f"{name} is installed at {installed}; reinstall it"
    for module in _modules(package):
        reported = importlib.import_module(module).__version__
        assert reported == version, f"{module}.__version__ is {reported!r}, not {version!r}"
