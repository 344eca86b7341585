"""Hostile state files: small files that must not crash, hang or exhaust the reader.

Each file here is structurally valid where that matters (headers, tensor
tables and checksums are made with the package's own writers), so the checks
behind the checksum are reached. Whatever could crash the interpreter or
allocate gigabytes runs in a child process, under an address-space limit
(``RLIMIT_AS``) where memory is the point, so that a regression fails a test
instead of killing pytest or the machine.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import same_state

import actsparse.serialize as serialize
from actsparse.core import SerializationError
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize._formats import (
    pack_text,
    unpack,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, sockets and /dev/zero")

CHILD_PRELUDE = """
import json, os, resource, sys, time
import torch
from torch import nn
import actsparse.serialize as serialize
from actsparse.core import ActsparseError, SerializationError
from actsparse.hooks import ActivationSparsifier

def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def limit_address_space(nbytes):
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))

def attempt(call):
    start = time.perf_counter()
    try:
        call()
    except SerializationError as exc:
        kind, message = "SerializationError", str(exc)
    except BaseException as exc:
        kind, message = type(exc).__name__, repr(exc)
    else:
        kind, message = "loaded", ""
    return {"kind": kind, "message": message, "seconds": time.perf_counter() - start}
"""


def run_child(body: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``body`` after the prelude in a fresh interpreter; its exit code is returned."""
    if sys.platform != "linux":
        pytest.skip("the child processes limit and measure memory with Linux rlimits")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    env.pop("ACTSPARSE_MAX_ELEMENTS", None)
    script = CHILD_PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def child_results(body: str, *args: str, timeout: float = 120) -> Any:
    """Run ``body``, which prints one JSON document last; a crash fails the test."""
    done = run_child(body, *args, timeout=timeout)
    assert done.returncode == 0, (
        f"the child died with status {done.returncode}\nstdout: {done.stdout[-3000:]}\n"
        f"stderr: {done.stderr[-3000:]}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def stepped(model: torch.nn.Module) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    with torch.no_grad():
        model(torch.randn(4, 6))
    sparsifier.step()
    return sparsifier


# ------------------------------------------------- 3: files that are not files


@posix_only
def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "state.safetensors"
    os.mkfifo(fifo)
    result = child_results(
        """
        print(json.dumps({fmt or "sniff": attempt(lambda: serialize.load(sys.argv[1], format=fmt))
                          for fmt in (None, "safetensors", "torch")}))
        """,
        str(fifo),
        timeout=30,
    )
    for fmt, outcome in result.items():
        assert outcome["kind"] == "SerializationError", (fmt, outcome)
        assert "is a FIFO, not a regular file" in outcome["message"]
        assert outcome["seconds"] < 1


@posix_only
def test_other_non_regular_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="is a directory, not a regular file"):
        serialize.load(tmp_path)
    with pytest.raises(SerializationError, match="is a character device, not a regular file"):
        serialize.load("/dev/zero")
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(SerializationError, match="is a socket, not a regular file"):
            serialize.load(sock_path)
    sparsifier = ActivationSparsifier(small_model())
    with pytest.raises(SerializationError, match="not a regular file"):
        serialize.load_into(sparsifier, "/dev/zero")


@posix_only
def test_a_symlink_to_a_regular_file_loads(tmp_path: Path) -> None:
    path = serialize.save(stepped(small_model()), tmp_path / "s.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    assert same_state(serialize.load(link), serialize.load(path))
    with pytest.raises(FileNotFoundError):
        serialize.load(tmp_path / "absent.safetensors")


# ---------------------------------------------- 7: strings that UTF-8 cannot hold


def _surrogate_states() -> dict[str, tuple[dict[str, Any], str]]:
    base = stepped(small_model()).state_dict()
    cases: dict[str, tuple[dict[str, Any], str]] = {}

    sd = copy.deepcopy(base)
    sd["data_groups"]["0"]["sparse_config"]["note"] = "x\udcff"
    cases["sparse_config value"] = (sd, "data_groups/0/sparse_config/note")

    sd = copy.deepcopy(base)
    sd["defaults"]["sparse_config"]["x\udcff"] = 1
    cases["sparse_config key"] = (sd, "defaults/sparse_config")

    sd = copy.deepcopy(base)
    sd["state"]["x\udcff"] = sd["state"].pop("0")
    sd["data_groups"]["x\udcff"] = sd["data_groups"].pop("0")
    cases["layer name"] = (sd, "state")

    sd = copy.deepcopy(base)
    sd["data_groups"]["0"]["sparse_config"]["pairs"] = {1: ("ok", "\ud800")}
    cases["inside a tuple in a $dict"] = (sd, "data_groups/0/sparse_config/pairs/1/1")

    sd = copy.deepcopy(base)
    sd["defaults"]["mask_fn"] = "magnitude\udcff"
    cases["strategy name"] = (sd, "defaults/mask_fn")
    return cases


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("case", list(_surrogate_states()))
def test_a_lone_surrogate_is_refused_naming_its_place_and_nothing_is_written(
    tmp_path: Path, fmt: str, case: str
) -> None:
    sd, where = _surrogate_states()[case]
    target = tmp_path / "out.bin"
    with pytest.raises(SerializationError) as info:
        serialize.save(sd, target, format=fmt)
    message = str(info.value)
    assert f"{where}:" in message, message
    assert "surrogate" in message
    message.encode("utf-8")  # the message itself can be printed
    assert list(tmp_path.iterdir()) == []


def test_a_file_whose_state_holds_a_lone_surrogate_is_refused(tmp_path: Path) -> None:
    """A JSON escape decodes to a lone surrogate; the file is signed, so the decoder decides."""
    data = serialize.save(stepped(small_model()), tmp_path / "s.safetensors").read_bytes()
    doc, tensors = unpack(data)
    doc["data_groups"]["0"]["sparse_config"]["note"] = "placeholder"
    text = json.dumps(doc).replace('"placeholder"', '"\\udcff"')
    path = tmp_path / "bad.safetensors"
    path.write_bytes(pack_text(text, tensors))
    with pytest.raises(SerializationError, match=r"data_groups/0/sparse_config/note.*surrogate"):
        serialize.load(path)
    doc["data_groups"]["0"]["sparse_config"]["note"] = {"placeholder": 1}
    path.write_bytes(pack_text(json.dumps(doc).replace('"placeholder"', '"\\ud800"'), tensors))
    with pytest.raises(SerializationError, match=r"data_groups/0/sparse_config/note.*surrogate"):
        serialize.load(path)
