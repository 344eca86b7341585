"""Fixtures shared by the test folders."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _group_of_one() -> Iterator[None]:
    if not dist.is_available():
        pytest.skip("torch.distributed is absent")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def group_of_one() -> Iterator[None]:
    """torch.distributed initialised in this process alone (gloo, world size 1)."""
    with _group_of_one():
        yield


@pytest.fixture(scope="module")
def module_group_of_one() -> Iterator[None]:
    """As ``group_of_one``, kept for the whole test module."""
    with _group_of_one():
        yield
