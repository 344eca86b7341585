"""Compile the CPU kernel on first use, once per process, and cache it on disk.

``pip install`` never needs a compiler: the C++ source ships inside the
package and is compiled with :func:`torch.utils.cpp_extension.load` the first
time a process asks for the kernel. Later processes find the shared library in
the cache and only load it (ninja sees nothing to rebuild).

Compiler flags: ``-O3 -march=native`` lets the compiler vectorise the loops
for the exact CPU (AVX-512 where there is one), and ``-ffp-contract=fast``
allows fused multiply-adds under ``-std=c++17`` and later. A binary built with
``-march=native`` may hold instructions that another CPU lacks, so the
extension's name, and with it its cache directory, carries a digest of the CPU
(model and feature flags), of the torch version, of the source and of the
flags: a cache shared between machines (a network home directory, a CI cache)
never hands one CPU the binary built for another. ``-fopenmp`` makes
``at::parallel_for`` use the OpenMP runtime that torch itself loaded, so the
kernel follows :func:`torch.set_num_threads`.

Environment:

``ACTSPARSE_DISABLE_KERNEL_BUILD=1``
    Never compile nor load the kernel: the process behaves as one on a
    machine without a compiler (tests use it for the fallback).
``ACTSPARSE_KERNEL_CACHE=DIR``
    Build into ``DIR/<name>`` instead of torch's extension cache
    (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``).
``CXX``
    The compiler torch uses (default ``c++``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import platform
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from actsparse.core import ConfigError

__all__ = [
    "CACHE_ENV_VAR",
    "DISABLE_ENV_VAR",
    "KernelStatus",
    "KernelUnavailableError",
    "cpu_kernel_status",
    "require_cpu_kernel",
]

DISABLE_ENV_VAR = "ACTSPARSE_DISABLE_KERNEL_BUILD"
CACHE_ENV_VAR = "ACTSPARSE_KERNEL_CACHE"

#: the C++ source, package data of actsparse-hooks
SOURCE = Path(__file__).with_name("sparse_linear.cpp")
#: the namespace of the compiled operators (torch.ops.actsparse_kernels)
NAMESPACE = "actsparse_kernels"

#: lines of compiler output quoted in the reason of a failed build
_ERROR_LINES = 6


class KernelStatus(NamedTuple):
    """Whether the compiled CPU kernel can run in this process, and why (not)."""

    available: bool
    reason: str


class KernelUnavailableError(ConfigError, RuntimeError):
    """The compiled CPU kernel was asked for but could not be built or loaded.

    A :class:`~actsparse.core.ConfigError` (asking for the kernel is the
    configuration that cannot be met) and a ``RuntimeError``, as torch's own
    missing-kernel errors are. The message says what is missing.
    """


_lock = threading.Lock()
_status: KernelStatus | None = None


def cpu_kernel_status(*, build: bool = True) -> KernelStatus:
    """Whether the zero-skipping CPU kernel is available, and the reason.

    The first call in a process compiles the kernel (tens of seconds) or loads
    it from the cache; every later call returns the same answer at once. The
    attempt is made at most once per process, under a lock, so concurrent
    first calls wait for one build. With ``build=False`` nothing is attempted:
    before the first attempt the answer is ``(False, "not attempted ...")``.

    Reasons when unavailable: the build is disabled by
    ``ACTSPARSE_DISABLE_KERNEL_BUILD``; no C++ compiler was found; ninja is
    missing; the build failed (the first lines of the compiler's error).
    """
    global _status
    status = _status
    if status is not None:
        return status
    if not build:
        return KernelStatus(False, "not attempted yet in this process")
    with _lock:
        if _status is None:
            _status = _attempt()
        return _status


def require_cpu_kernel() -> None:
    """Build or load the kernel if needed; raise :class:`KernelUnavailableError` if it cannot."""
    status = cpu_kernel_status()
    if not status.available:
        raise KernelUnavailableError(
            f"the actsparse CPU kernel is unavailable: {status.reason}. The dense path "
            "(hardshrink + F.linear) needs no kernel."
        )


# ------------------------------------------------------------------ the attempt


def _attempt() -> KernelStatus:
    disabled = os.environ.get(DISABLE_ENV_VAR, "").strip()
    if disabled not in ("", "0"):
        return KernelStatus(False, f"the build is disabled by {DISABLE_ENV_VAR}={disabled}")
    compiler = find_compiler()
    if compiler is None:
        cxx = os.environ.get("CXX", "c++")
        return KernelStatus(
            False, f"no C++ compiler found ({cxx!r} is not on PATH; install g++ or set CXX)"
        )
    ninja_dir = find_ninja()
    if ninja_dir is None:
        return KernelStatus(False, "ninja is missing (pip install ninja)")
    try:
        with _on_path(ninja_dir), warnings.catch_warnings():
            # torch warns about compiler versions and ABI details here; the
            # outcome is reported by the status instead.
            warnings.simplefilter("ignore")
            path = _load()
    except Exception as exc:  # any failure of the build becomes the reason
        return KernelStatus(False, f"the build failed: {_first_error_lines(str(exc))}")
    if not hasattr(getattr(torch.ops, NAMESPACE), "sparse_linear_cpu"):
        return KernelStatus(False, f"{path} loaded but registered no sparse_linear_cpu")
    return KernelStatus(True, f"compiled kernel loaded from {path}")


def find_compiler() -> str | None:
    """The C++ compiler torch's extension builder would call, or ``None``."""
    return shutil.which(os.environ.get("CXX", "c++"))


def find_ninja() -> str | None:
    """The directory holding a ninja executable (the ninja wheel's first), or ``None``."""
    with contextlib.suppress(ImportError):
        module = importlib.import_module("ninja")
        bin_dir = getattr(module, "BIN_DIR", None)
        if isinstance(bin_dir, str) and shutil.which("ninja", path=bin_dir):
            return bin_dir
    found = shutil.which("ninja")
    return str(Path(found).parent) if found else None


@contextlib.contextmanager
def _on_path(directory: str) -> Iterator[None]:
    """``directory`` first on PATH while torch's builder looks for ninja."""
    saved = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(p for p in (directory, saved) if p)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def compile_flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) for this platform."""
    cflags = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
    ldflags: list[str] = []
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        cflags.append("-march=native")
    if sys.platform.startswith("linux"):
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def cpu_identity() -> str:
    """What a ``-march=native`` binary depends on: the CPU model and its feature flags."""
    parts = [platform.machine(), platform.processor()]
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        first = text.split("\n\n", 1)[0]
        for line in first.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name", "flags", "Features", "CPU part"):
                parts.append(f"{key.strip()}={value.strip()}")
    return "\n".join(parts)


def extension_name() -> str:
    """``actsparse_sparse_linear_<digest>``: one name per CPU, torch version, source and flags."""
    cflags, ldflags = compile_flags()
    digest = hashlib.sha256()
    for part in (
        cpu_identity(),
        torch.__version__,
        " ".join(cflags + ldflags),
        SOURCE.read_text(),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"actsparse_sparse_linear_{digest.hexdigest()[:16]}"


def _load() -> str:
    from torch.utils.cpp_extension import load

    name = extension_name()
    build_directory = None
    cache = os.environ.get(CACHE_ENV_VAR)
    if cache:
        directory = Path(cache).expanduser() / name
        directory.mkdir(parents=True, exist_ok=True)
        build_directory = str(directory)
    cflags, ldflags = compile_flags()
    path = load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=build_directory,
        verbose=False,
        is_python_module=False,
    )
    return str(path)


def _first_error_lines(message: str) -> str:
    """The lines of a build log that say what went wrong, at most a few."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    chosen = (errors or lines)[:_ERROR_LINES]
    return " | ".join(chosen) if chosen else "no output"
