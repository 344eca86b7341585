"""Whether a kernel can run in this process, and the error for one that cannot."""

from __future__ import annotations

from typing import NamedTuple

from actsparse.core import ConfigError

__all__ = ["KernelStatus", "KernelUnavailableError"]


class KernelStatus(NamedTuple):
    """Whether a kernel can run in this process (``available``), and why or why not."""

    available: bool
    reason: str


class KernelUnavailableError(ConfigError, RuntimeError):
    """A kernel was asked for but cannot run here (not built, not installed, no device).

    A :class:`~actsparse.core.ConfigError` (asking for the kernel is the
    configuration that cannot be met) and a ``RuntimeError``, as torch's own
    missing-kernel errors are. The message says what is missing.
    """
