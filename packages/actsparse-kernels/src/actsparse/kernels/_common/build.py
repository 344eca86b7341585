"""The JIT build of the C++ kernels: compiled on first use, once per process, cached on disk.

``pip install`` never needs a compiler: each kernel's C++ sources ship inside
the package, and a :class:`CppExtension` compiles them with
:func:`torch.utils.cpp_extension.load` the first time a process asks for the
kernel. Later processes find the shared library in the cache and only load
it (ninja sees nothing to rebuild). Several C++ kernels coexist: each has its
own extension (name, sources, cache directory, status), and their operators
join the one ``torch.ops.actsparse_kernels`` namespace
(``TORCH_LIBRARY_FRAGMENT``), each under names of its own.

Compiler flags: ``-O3 -march=native`` lets the compiler vectorise the loops
for the exact CPU (AVX-512 where there is one), and ``-ffp-contract=fast``
allows fused multiply-adds under ``-std=c++17`` and later. A binary built with
``-march=native`` may hold instructions that another CPU lacks, so the
extension's name, and with it its cache directory, carries a digest of the CPU
(model and feature flags), of the torch version, of the sources and of the
flags: a cache shared between machines (a network home directory, a CI cache)
never hands one CPU the binary built for another. ``-fopenmp`` makes
``at::parallel_for`` use the OpenMP runtime that torch itself loaded, so the
kernels follow :func:`torch.set_num_threads`.

Environment:

``ACTSPARSE_DISABLE_KERNEL_BUILD=1``
    Never compile nor load a C++ kernel: the process behaves as one on a
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
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from actsparse.kernels._common.status import KernelStatus, KernelUnavailableError

__all__ = ["CACHE_ENV_VAR", "DISABLE_ENV_VAR", "NAMESPACE", "CppExtension"]

DISABLE_ENV_VAR = "ACTSPARSE_DISABLE_KERNEL_BUILD"
CACHE_ENV_VAR = "ACTSPARSE_KERNEL_CACHE"

#: the namespace of the compiled operators (torch.ops.actsparse_kernels)
NAMESPACE = "actsparse_kernels"

#: lines of compiler output quoted in the reason of a failed build
_ERROR_LINES = 6


class CppExtension:
    """One kernel's C++ sources, compiled on first use and loaded once per process.

    Args:
        name: The kernel's name (``"cpu_sparse"``): it names the extension,
            its cache directory and the errors.
        sources: The C++ files, package data of the kernel's folder.
        ops: The operators the sources register in ``torch.ops.actsparse_kernels``;
            a build that loads but lacks one is reported as failed.
        headers: Files the sources include (``_common/quantized_kernel.h``):
            not compiled on their own, but part of the cache key, so that a
            changed header rebuilds the kernel.
    """

    def __init__(
        self,
        name: str,
        sources: Sequence[Path],
        ops: Sequence[str],
        *,
        headers: Sequence[Path] = (),
    ) -> None:
        if not sources or not ops:
            raise ValueError(f"CppExtension {name!r} needs at least one source and one op")
        self.name = name
        self.sources = tuple(Path(source) for source in sources)
        self.headers = tuple(Path(header) for header in headers)
        self.ops = tuple(ops)
        self._lock = threading.Lock()
        self._status: KernelStatus | None = None

    def status(self, *, build: bool = True) -> KernelStatus:
        """Whether the kernel is available, and the reason.

        The first call in a process compiles the kernel (tens of seconds) or
        loads it from the cache; every later call returns the same answer at
        once. The attempt is made at most once per process, under a lock, so
        concurrent first calls wait for one build. With ``build=False`` nothing
        is attempted: before the first attempt the answer is ``(False, "not
        attempted ...")``.

        Reasons when unavailable: the build is disabled by
        ``ACTSPARSE_DISABLE_KERNEL_BUILD``; no C++ compiler was found; ninja is
        missing; the build failed (the first lines of the compiler's error).
        """
        status = self._status
        if status is not None:
            return status
        if not build:
            return KernelStatus(False, "not attempted yet in this process")
        with self._lock:
            if self._status is None:
                self._status = self.attempt()
            return self._status

    def require(self) -> None:
        """Build or load the kernel if needed; raise :class:`KernelUnavailableError` if it
        cannot."""
        status = self.status()
        if not status.available:
            raise KernelUnavailableError(
                f"the actsparse {self.name} kernel is unavailable: {status.reason}. The dense "
                "path (hardshrink + F.linear) needs no kernel."
            )

    def attempt(self) -> KernelStatus:
        """One attempt to build or load the kernel, whatever the cached status says."""
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
                path = self._load()
        except Exception as exc:  # any failure of the build becomes the reason
            return KernelStatus(False, f"the build failed: {_first_error_lines(str(exc))}")
        namespace = getattr(torch.ops, NAMESPACE)
        missing = [op for op in self.ops if not hasattr(namespace, op)]
        if missing:
            return KernelStatus(False, f"{path} loaded but registered no {', '.join(missing)}")
        return KernelStatus(True, f"compiled kernel loaded from {path}")

    def extension_name(self) -> str:
        """``actsparse_<name>_<digest>``: one name per CPU, torch version, sources and flags."""
        cflags, ldflags = compile_flags()
        digest = hashlib.sha256()
        parts = [cpu_identity(), torch.__version__, " ".join(cflags + ldflags)]
        parts.extend(source.read_text() for source in (*self.sources, *self.headers))
        for part in parts:
            digest.update(part.encode())
            digest.update(b"\0")
        return f"actsparse_{self.name}_{digest.hexdigest()[:16]}"

    def _load(self) -> str:
        from torch.utils.cpp_extension import load

        name = self.extension_name()
        build_directory = None
        cache = os.environ.get(CACHE_ENV_VAR)
        if cache:
            directory = Path(cache).expanduser() / name
            directory.mkdir(parents=True, exist_ok=True)
            build_directory = str(directory)
        cflags, ldflags = compile_flags()
        path = load(
            name=name,
            sources=[str(source) for source in self.sources],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=build_directory,
            verbose=False,
            is_python_module=False,
        )
        return str(path)


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


def _first_error_lines(message: str) -> str:
    """The lines of a build log that say what went wrong, at most a few."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    chosen = (errors or lines)[:_ERROR_LINES]
    return " | ".join(chosen) if chosen else "no output"
