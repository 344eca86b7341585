"""Whether the Triton kernel can run in this process, and why not.

Two things are needed: the ``triton`` package (the ``actsparse-kernels[triton]``
extra, never a dependency of actsparse itself) and a CUDA device that torch
sees. Nothing here imports triton until asked, and nothing is cached, so the
answer follows the process (a test that hides triton sees it missing).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from actsparse.kernels._common.status import KernelStatus

__all__ = ["INSTALL_HINT", "TRITON_DTYPES", "interpreter_requested", "round_threshold", "status"]

#: the dtypes the Triton kernel computes; other dtypes take the dense reference
TRITON_DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = "pip install 'actsparse-kernels[triton]'"

_TRUE = frozenset(("1", "true", "on", "yes"))


def _import_triton() -> ModuleType:
    return importlib.import_module("triton")


def status() -> KernelStatus:
    """Whether triton imports and torch sees a CUDA device; else what is missing."""
    try:
        triton = _import_triton()
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "triton"):
            return KernelStatus(False, f"triton failed to import: {exc}")
        return KernelStatus(False, f"triton is not installed ({INSTALL_HINT})")
    except Exception as exc:  # a broken installation raises anything at import
        return KernelStatus(False, f"triton failed to import: {type(exc).__name__}: {exc}")
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        build = "a CPU-only build" if cuda is None else f"built for CUDA {cuda}"
        return KernelStatus(
            False, f"no CUDA device (torch.cuda.is_available() is False; this torch is {build})"
        )
    version = getattr(triton, "__version__", "?")
    return KernelStatus(True, f"triton {version} on {torch.cuda.get_device_name()}")


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to interpret kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=256)
def round_threshold(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype`` as hardshrink rounds it (through float32)."""
    return float(torch.tensor(threshold, dtype=torch.float32).to(dtype).item())
