"""Every check of the actsparse monorepo, one nox session each.

torch is pinned through constraints.txt to the CPU wheel that the build
machines keep on disk; every install below passes ``-c constraints.txt`` so no
session ever resolves a CUDA build.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = {
    name: str(ROOT / "packages" / f"actsparse-{name}")
    for name in ("core", "masks", "hooks", "serialize")
}
FIXTURE_PLUGIN = str(ROOT / "tests" / "fixtures" / "actsparse-fixture-plugin")
EXAMPLE_PLUGIN = ROOT / "examples" / "actsparse-example-plugin"
TEST_DEPS = ("pytest>=8", "hypothesis>=6.100", "numpy")

nox.options.sessions = ["lint", "typecheck", "tests", "isolated", "example_plugin"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *args: str) -> None:
    session.install(*CONSTRAINTS, *args)


def install_workspace(session: nox.Session, *, editable: bool = False) -> None:
    flag = ("-e",) if editable else ()
    args: list[str] = []
    for path in PACKAGES.values():
        args.extend((*flag, path))
    install(session, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against all four packages and the fixture plugin."""
    install_workspace(session, editable=True)
    install(session, FIXTURE_PLUGIN, *TEST_DEPS)
    session.run(
        "pytest",
        *(session.posargs or ("tests",)),
        env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole repository."""
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over every package."""
    install_workspace(session, editable=True)
    install(session, "mypy==2.4.1")
    session.run("mypy", *(arg for name in PACKAGES for arg in ("-p", f"actsparse.{name}")))


ISOLATED_SMOKE = {
    "core": """
import actsparse.core as c
r = c.make_plugin_manager()
reg = c.Registry.from_plugin_manager(r)
assert reg.names('mask') == [], reg.names('mask')
try:
    reg.get('mask', 'magnitude')
except c.UnknownStrategyError as e:
    assert 'pip install actsparse-masks' in str(e), e
else:
    raise SystemExit('unknown strategy did not raise')
print('core alone: ok')
""",
    "masks": """
import torch, actsparse.core as c
reg = c.get_registry()
names = reg.names('aggregate') + reg.names('reduce') + reg.names('mask')
assert {'sum', 'mean', 'magnitude'} <= set(names), names
m = reg.get('mask', 'magnitude').fn(torch.arange(10.), sparsity_level=0.3)
assert int((m == 0).sum()) == 3
print('masks with core: ok')
""",
    "hooks": """
import torch, actsparse.core as c
from actsparse.hooks import ActivationSparsifier
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
s = ActivationSparsifier(model, aggregate_fn=lambda a, x: a + x,
                         reduce_fn=lambda t: t.mean(0),
                         mask_fn=lambda t, level: (t.abs() > level).float(), level=0.0)
s.register_layer(model[0])
model(torch.randn(3, 4)); s.step(); s.squash_mask(); model(torch.randn(3, 4))
try:
    s.state_dict()
except c.UnknownStrategyError as e:
    assert 'pip install actsparse-serialize' in str(e), e
else:
    raise SystemExit('state_dict without actsparse-serialize did not raise')
print('hooks with core: ok')
""",
    "serialize": """
import torch, actsparse.core as c
ser = c.get_registry().get('serializer', 'sparse_coo')
sd = {'state': {'a': {'mask': torch.tensor([1., 0., 1.])}}, 'data_groups': {}, 'defaults': {}}
out = ser.dumps(sd)
assert out['state']['a']['mask'].is_sparse
assert torch.equal(ser.loads(out)['state']['a']['mask'], sd['state']['a']['mask'])
print('serialize with core: ok')
""",
}


@nox.session(reuse_venv=False)
@nox.parametrize("package", list(PACKAGES))
def isolated(session: nox.Session, package: str) -> None:
    """Install one distribution into a fresh venv with only core beside it; smoke test it."""
    install(session, PACKAGES["core"], PACKAGES[package])
    installed = session.run("python", "-m", "pip", "list", "--format=freeze", silent=True)
    names = sorted(
        line.split("==")[0] for line in str(installed).splitlines() if line.startswith("actsparse")
    )
    expected = sorted({"actsparse-core", f"actsparse-{package}"})
    if names != expected:
        session.error(f"installing actsparse-{package} brought {names}, expected {expected}")
    session.run("python", "-c", ISOLATED_SMOKE[package])


@nox.session
def example_plugin(session: nox.Session) -> None:
    """Install the example plugin beside core, masks and hooks; use its strategies by name."""
    install(session, PACKAGES["core"], PACKAGES["masks"], PACKAGES["hooks"], *TEST_DEPS)
    # A regular (non-editable) install: the entry point must come from the built wheel.
    install(session, str(EXAMPLE_PLUGIN))
    session.run("pytest", str(EXAMPLE_PLUGIN / "tests"), "-p", "no:cacheprovider")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: run the seed workflow on the seed CNN and print each layer's mask."""
    install_workspace(session)
    session.run("python", "-m", "actsparse.hooks", *session.posargs)
