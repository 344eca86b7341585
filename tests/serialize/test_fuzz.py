"""Mutated state files: every outcome is a clean load or an actsparse error.

A seeded random loop mutates valid files (truncations, bit flips, byte
overwrites, header edits, spliced lengths) thousands of times. A second loop
edits the stored state itself and re-signs the file, so the checks behind the
checksum (mask records, tensor references, the state's outline and
``load_state_dict``) are reached too.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _support import same_state

import actsparse.serialize as serialize
from actsparse.core import ActsparseError
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize._formats import pack, unpack

CASES = 5000
SEMANTIC_CASES = 2000


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 4))


def _sparsifier(model: torch.nn.Module) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
    )
    sparsifier.register_layer(model[0])
    sparsifier.register_layer(model[2], features=[0, [1, 3]], feature_dim=1, sparsity_level=0.3)
    return sparsifier


def valid_files(tmp_path: Path) -> list[bytes]:
    """Files at three points of the workflow: mid-calibration, stepped, squashed."""
    model = _model()
    sparsifier = _sparsifier(model)
    files = []
    with torch.no_grad():
        model(torch.randn(8, 12))
    files.append(serialize.save(sparsifier, tmp_path / "a").read_bytes())
    sparsifier.step()
    files.append(serialize.save(sparsifier, tmp_path / "b").read_bytes())
    sparsifier.squash_mask()
    files.append(serialize.save(sparsifier, tmp_path / "c").read_bytes())
    return files


def _header_edit(rng: random.Random, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(6)
    if choice == 0 and names:
        header[rng.choice(names)]["shape"] = [rng.randrange(-2, 2**40)]
    elif choice == 1 and names:
        header[rng.choice(names)]["data_offsets"] = [rng.randrange(-5, 500), rng.randrange(2**62)]
    elif choice == 2 and names:
        header[rng.choice(names)]["dtype"] = rng.choice(["F32", "U8", "I64", "C64", "X", 3])
    elif choice == 3:
        header["__metadata__"][rng.choice(list(header["__metadata__"]))] = rng.choice(
            ["", "2", "{}", "[" * 5000, "actsparse"]
        )
    elif choice == 4 and names:
        del header[rng.choice(names)]
    else:
        header["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return data[: rng.randrange(len(data))]
    buf = bytearray(data)
    if kind == 1:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 2:
        start = rng.randrange(len(buf))
        for i in range(start, min(len(buf), start + rng.randint(1, 16))):
            buf[i] = rng.randrange(256)
    elif kind == 3:
        buf[:8] = struct.pack("<Q", rng.choice([0, 1, len(buf), 2**63, rng.randrange(len(buf))]))
    elif kind == 4:
        return _header_edit(rng, data)
    else:
        at = rng.randrange(len(buf))
        return bytes(
            buf[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + buf[at:]
        )
    return bytes(buf)


def _outcome(path: Path, model: torch.nn.Module, original: Any = None) -> str:
    try:
        sd = serialize.load(path)
    except ActsparseError:
        return "refused"
    if original is not None:
        # a damaged file that still loads must mean exactly what the original meant
        assert same_state(sd, original), "a damaged file loaded with different contents"
    try:
        ActivationSparsifier(model).load_state_dict(sd)
    except ActsparseError:
        return "refused by load_state_dict"
    return "loaded"


def test_fuzz_mutated_files(tmp_path: Path) -> None:
    rng = random.Random(20261128)
    files = valid_files(tmp_path)
    originals = []
    for i, data in enumerate(files):
        (tmp_path / f"original{i}").write_bytes(data)
        originals.append(serialize.load(tmp_path / f"original{i}"))
    model = _model()
    path = tmp_path / "fuzz"
    outcomes: dict[str, int] = {}
    started = time.perf_counter()
    for case in range(CASES):
        data = mutate(rng, files[case % len(files)])
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            outcome = _outcome(path, model, originals[case % len(files)])
        except Exception as exc:  # pragma: no cover - a failure shows the case
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
        assert time.perf_counter() - t0 < 2.0, f"case {case} took too long"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > CASES * 0.9, outcomes
    assert time.perf_counter() - started < 60


def _edit_doc(rng: random.Random, doc: Any) -> None:
    """Replace one value somewhere in the document with a hostile one."""
    node = doc
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            child = node[key]
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
            child = node[key]
        else:
            break
        if not isinstance(child, (dict, list)) or rng.random() < 0.3:
            break
        node = child
    replacement = rng.choice(
        [
            None,
            0,
            -1,
            1.5,
            2**70,
            "",
            "x",
            "$tensor",
            [],
            {},
            [1, [2]],
            {"$tensor": "nope"},
            {"$mask": {"encoding": "rle"}},
            {"$tuple": 3},
            {"$dict": [[1]]},
            {"$float": "1e999"},
            {"$dtype": "Tensor"},
            "aggregate",
            "sparsify",
            [0, 10**9],
            {"a": {"b": {}}},
        ]
    )
    if isinstance(node, dict) and node:
        node[rng.choice(list(node))] = replacement
    elif isinstance(node, list) and node:
        node[rng.randrange(len(node))] = replacement


def test_fuzz_signed_edits_of_the_state(tmp_path: Path) -> None:
    rng = random.Random(7)
    files = valid_files(tmp_path)
    model = _model()
    path = tmp_path / "fuzz"
    parsed = [unpack(data) for data in files]
    outcomes: dict[str, int] = {}
    for case in range(SEMANTIC_CASES):
        doc, tensors = parsed[case % len(parsed)]
        doc = copy.deepcopy(doc)
        tensors = dict(tensors)
        _edit_doc(rng, doc)
        if tensors and rng.random() < 0.2:
            name = rng.choice(list(tensors))
            tensors[name] = rng.choice(
                [torch.zeros(3, dtype=torch.int64), torch.ones(2, 2), torch.empty(0)]
            )
        path.write_bytes(pack(doc, tensors))
        try:
            outcome = _outcome(path, model)
        except Exception as exc:  # pragma: no cover - a failure shows the case
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{json.dumps(doc)[:2000]}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > 0, outcomes


def test_fuzz_torch_style_files(tmp_path: Path) -> None:
    """The torch-style format: a damaged file is refused, or loads what was saved."""
    rng = random.Random(3)
    model = _model()
    sparsifier = _sparsifier(model)
    with torch.no_grad():
        model(torch.randn(8, 12))
    saved = serialize.save(sparsifier, tmp_path / "s.pt")
    original = saved.read_bytes()
    expected = serialize.load(saved)
    path = tmp_path / "fuzz.pt"
    outcomes: dict[str, int] = {}
    for case in range(400):
        data = bytearray(original)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            outcome = _outcome(path, model, expected)
        except Exception as exc:  # pragma: no cover - a failure shows the case
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > 0, outcomes
