"""Small state files that stand for far more than they hold, and a child that measures them.

The serialize and CLI tests share them: a file of about 1 KB whose mask
declares 10**8 elements (run-length, sparse-index or a stride-0 view), and a
``torch`` zip whose one storage is deflated from 256 MiB of zeros. Each is
signed or structurally valid where that matters, so that the reader's size
checks, and not some earlier refusal, decide. :func:`measure` loads or
inspects a file in a fresh interpreter, under an address-space limit, and
reports how far its peak resident memory grew, so that a regression fails a
test instead of exhausting the machine.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from actsparse.core import CONFIG_KEYS
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize._formats import TORCH_FORMAT_NAME, pack, safetensors_dumps, unpack

#: The elements that each mask bomb declares.
DECLARED = 10**8
#: The float64 elements of the deflated storage in :func:`write_deflate_bomb` (256 MiB).
BOMB_ELEMENTS = 2**25
#: How far a child's peak resident memory may grow while it refuses a bomb.
GROWTH_LIMIT = 100 * 1024 * 1024
#: The checksum of a file whose checksum is never reached.
PLACEHOLDER = "sha256:" + "0" * 64
#: The address space a child may use after importing torch and actsparse.
ADDRESS_SPACE = 2048 * 1024 * 1024

_CHILD = """
import contextlib, io, json, resource, sys
import torch
from torch import nn
import actsparse.serialize as serialize
from actsparse import cli
from actsparse.core import SerializationError
from actsparse.hooks import ActivationSparsifier

action, path, limit, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cap = None if cap == "-" else int(cap)
torch.manual_seed(0)
sparsifier = ActivationSparsifier(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out, err = io.StringIO(), io.StringIO()


def peak_rss():
    # VmHWM, not ru_maxrss: after exec, ru_maxrss starts from the parent's resident size
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


base = peak_rss()
try:
    if action == "inspect":
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["inspect", path])
        kind, message = f"exit {code}", err.getvalue()
    elif action == "load_into":
        serialize.load_into(sparsifier, path, max_elements=cap)
        kind, message = "loaded", ""
    else:
        state = serialize.load(path, max_elements=cap)
        kind, message = "loaded", ""
except SerializationError as exc:
    kind, message = "SerializationError", str(exc)
except BaseException as exc:
    kind, message = type(exc).__name__, repr(exc)
growth = peak_rss() - base
print(json.dumps({"kind": kind, "message": message, "growth": growth}))
"""


def measure(action: str, path: Path, *, max_elements: int | None = None) -> dict[str, Any]:
    """``load``, ``load_into`` or ``inspect`` the file in a child; its outcome and memory growth.

    Returns ``{"kind", "message", "growth"}``: ``kind`` is ``"loaded"``,
    ``"SerializationError"``, another exception's name, or ``"exit N"`` for
    ``inspect``, whose ``message`` is then what it wrote to stderr.
    """
    if sys.platform != "linux":
        pytest.skip("the child measures its memory with Linux rlimits")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    env.pop("ACTSPARSE_MAX_ELEMENTS", None)
    cap = "-" if max_elements is None else str(max_elements)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, action, str(path), str(ADDRESS_SPACE), cap],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, (
        f"the child died with status {done.returncode}\nstdout: {done.stdout[-3000:]}\n"
        f"stderr: {done.stderr[-3000:]}"
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def full_state(state: dict[str, Any]) -> dict[str, Any]:
    """A valid state dict around ``state``: one plain data group per layer, full defaults."""
    config = dict.fromkeys(CONFIG_KEYS)
    config["sparse_config"] = {}
    groups = {name: {**config, "sparse_config": {}, "hook_state": "aggregate"} for name in state}
    return {"state": state, "data_groups": groups, "defaults": config}


def payload(state_dict: dict[str, Any], checksum: str = PLACEHOLDER) -> dict[str, Any]:
    """What a ``torch`` file holds around ``state_dict``."""
    return {
        "format": TORCH_FORMAT_NAME,
        "format_version": 1,
        "state_dict": state_dict,
        "checksum": checksum,
    }


def torch_file_with(state_dict: dict[str, Any], checksum: str = PLACEHOLDER) -> bytes:
    """A ``torch`` file of ``state_dict``; by default its checksum is a placeholder, which
    the reader compares only after every size check."""
    buffer = io.BytesIO()
    torch.save(payload(state_dict, checksum), buffer)
    return buffer.getvalue()


#: The empty lists of :func:`structure_bomb`: one pickle operation each.
BOMB_LISTS = 1_000_000


def structure_bomb(lists: int = BOMB_LISTS) -> bytes:
    """A stored ``torch`` file of about 1 MB whose state, otherwise valid, holds ``lists``
    empty lists in one ``sparse_config`` value: one byte of pickle each."""
    marker = "MARKER-OF-THE-BOMB"
    state = full_state({"0": {"mask": None}})
    state["defaults"]["sparse_config"] = {"bomb": marker}
    plain = zipfile.ZipFile(io.BytesIO(torch_file_with(state)))
    pushed = b"X" + len(marker).to_bytes(4, "little") + marker.encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in plain.infolist():
            data = plain.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(pushed) == 1
                # one list pushed where the string was, holding `lists` empty lists
                data = data.replace(pushed, b"](" + b"]" * lists + b"e")
            archive.writestr(info, data)
    return out.getvalue()


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def stepped(model: torch.nn.Module) -> ActivationSparsifier:
    """A sparsifier over ``model[0]`` that has stepped once: its mask is bit-packed."""
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    with torch.no_grad():
        model(torch.randn(4, 6))
    sparsifier.step()
    return sparsifier


def signed_with_mask(record: dict[str, Any], stored: torch.Tensor | None = None) -> bytes:
    """A real, signed state file whose layer '0' holds the mask ``record`` (and ``stored``)."""
    doc, tensors = unpack(safetensors_dumps(stepped(small_model()).state_dict()))
    old = doc["state"]["0"]["mask"]["$mask"]
    tensors = {k: v for k, v in tensors.items() if k != old.get("tensor")}
    record = dict(record)
    if stored is not None:
        record["tensor"] = "state/0/mask"
        tensors[record["tensor"]] = stored
    doc["state"]["0"]["mask"] = {"$mask": record}
    return pack(doc, tensors)


def mask_bomb(case: str, elements: int = DECLARED, dtype: str = "float32") -> bytes:
    """A file of about 1 KB whose one mask declares ``elements``; ``case`` names its form.

    ``rle``: two runs; ``coo``: two indices that differ from ``fill``; both
    in the default format. ``torch-view``: a ``torch`` file whose mask is one
    stored value viewed with stride 0; ``torch-coo``: a ``torch`` file whose
    mask is a sparse COO tensor with two entries.
    """
    half = elements // 2
    if case == "rle":
        record = {"encoding": "rle", "first": 1, "dtype": dtype, "shape": [elements]}
        return signed_with_mask(record, torch.tensor([half, elements - half], dtype=torch.int32))
    if case == "coo":
        record = {"encoding": "coo", "fill": 1, "dtype": dtype, "shape": [elements]}
        return signed_with_mask(record, torch.tensor([5, half], dtype=torch.int32))
    kind = getattr(torch, dtype)
    if case == "torch-view":
        view = torch.ones(1, dtype=kind).expand(elements)
        return torch_file_with(full_state({"0": {"mask": view}}))
    if case == "torch-coo":
        indices = torch.tensor([[5, half]])
        mask = torch.sparse_coo_tensor(
            indices, torch.zeros(2, dtype=kind), (elements,), check_invariants=True
        ).coalesce()
        return torch_file_with(full_state({"0": {"mask": mask}}))
    raise ValueError(f"unknown mask bomb {case!r}")


MASK_BOMBS = ("rle", "coo", "torch-view", "torch-coo")


def write_deflate_bomb(path: Path, elements: int = BOMB_ELEMENTS) -> Path:
    """A ``torch`` file at ``path`` whose mask of ``elements`` float64 zeros is deflated.

    ``torch.save`` writes the storage as holes (``skip_data``), and the zip is
    rewritten with that member deflated from zeros a MiB at a time, so that
    neither the storage nor the inflated member is ever in this process's
    memory. The zip's central directory declares the member's full size.
    """
    if not hasattr(torch.serialization, "skip_data"):
        pytest.skip("building the bomb needs torch.serialization.skip_data (torch >= 2.5)")
    mask = torch.empty(elements, dtype=torch.float64)  # never written to: costs no memory
    holes = path.with_name(path.stem + ".holes")  # torch names the archive by the stem
    with torch.serialization.skip_data():
        torch.save(payload(full_state({"0": {"mask": mask}})), holes)
    zero = bytes(1 << 20)
    with zipfile.ZipFile(holes) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            if info.file_size < elements * 8:
                dst.writestr(info.filename, src.read(info))
                continue
            member = zipfile.ZipInfo(info.filename)
            member.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(member, "w", force_zip64=True) as fh:
                for start in range(0, info.file_size, len(zero)):
                    fh.write(zero[: min(len(zero), info.file_size - start)])
    holes.unlink()
    return path
