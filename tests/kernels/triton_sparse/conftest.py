"""Where the Triton kernel's tests run.

``TRITON_INTERPRET=1`` (``nox -s triton``): Triton's interpreter, on CPU
tensors, with no GPU. Otherwise a CUDA device if torch sees one; else the
kernel tests skip. The plugin tests (test_triton_plugin.py) need neither
triton nor a GPU and run everywhere.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the kernel runs on here: cpu (interpreted) or cuda."""
    pytest.importorskip("triton", reason="triton is not installed (the triton extra)")
    from actsparse.kernels.triton_sparse import interpreted_kernels

    if interpreted_kernels() is not None:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("the Triton kernel needs a CUDA device or TRITON_INTERPRET=1")
