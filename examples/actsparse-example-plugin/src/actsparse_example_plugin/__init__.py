"""An example actsparse plugin: one streaming aggregate and one mask strategy."""

from __future__ import annotations

__version__ = "0.1.0"
