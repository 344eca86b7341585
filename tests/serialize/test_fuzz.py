"""Mutated and hand-made state files: every outcome is a clean load or an actsparse error.

A seeded random loop mutates valid files (truncations, bit flips, byte
overwrites, header edits, spliced lengths) thousands of times. A second loop
edits the stored state itself and re-signs the file, so the checks behind the
checksum (mask records, tensor references, the state's outline and
``load_state_dict``) are reached too. Two more loops build hostile files from
scratch, signed the library's own way, in both formats.
"""

from __future__ import annotations

import contextlib
import copy
import io
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
from actsparse.serialize._formats import _torch_checksum, pack, pack_text, unpack
from actsparse.serialize._packing import encode_mask

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


# ------------------------------------------------ structurally valid hostile files
#
# The files below are not damaged copies of good ones: each document and tensor
# table is made by hand, then signed with the package's own writer (pack /
# pack_text, or torch.save with the format's own checksum), so that every
# check behind the header and the checksum is reached. The element cap is set
# low; a "big" claim lies between it and 16 times it, so that a regression in
# the cap costs at most a few hundred MB, and an astronomical claim is refused
# by arithmetic alone.

HOSTILE_CASES = 1500
FUZZ_CAP = 2**20
_DTYPE_NAMES = ["float32", "float64", "bool", "uint8", "int64", "float16", "complex64", "Tensor"]


def _hostile_shape(rng: random.Random) -> Any:
    return rng.choice(
        [
            [rng.randrange(0, 9) for _ in range(rng.randrange(0, 4))],
            [rng.randrange(FUZZ_CAP + 1, 16 * FUZZ_CAP)],
            [2**40],
            [2**31, 2**31, 2**31],
            [2**62] * 3,
            [-1],
            [1.5],
            [True],
            ["3"],
            [1] * 65,
            "shape",
            None,
        ]
    )


def _hostile_stored(rng: random.Random, n_hint: int) -> torch.Tensor:
    length = rng.choice([0, 1, 2, 3, max(0, n_hint), max(0, n_hint // 8 + 1), 17])
    dtype = rng.choice([torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32])
    kind = rng.randrange(5)
    if kind == 0:
        values = torch.zeros(length, dtype=dtype)
    elif kind == 1:
        values = torch.arange(length).to(dtype)
    elif kind == 2 and dtype.is_floating_point is False:
        high = min(torch.iinfo(dtype).max, 2**62)
        values = torch.randint(0, high, (length,), dtype=dtype)
    elif kind == 3:
        values = -torch.ones(length, dtype=dtype)
    else:
        values = torch.full((length,), n_hint if n_hint < 2**15 else 7, dtype=torch.int64)
    if rng.random() < 0.15:
        values = values.reshape(1, -1)
    return values


def _hostile_mask(rng: random.Random, tensors: dict[str, torch.Tensor], name: str) -> Any:
    record: dict[str, Any] = {
        "encoding": rng.choice(["constant", "bitpack", "rle", "coo", "dense", "zip", 3]),
        "dtype": rng.choice(_DTYPE_NAMES),
        "shape": _hostile_shape(rng),
    }
    for key in ("value", "first", "fill"):
        if rng.random() < 0.7:
            record[key] = rng.choice([0, 1, 2, -1, True, None, "1"])
    shape = record["shape"]
    n_hint = 0
    if isinstance(shape, list) and all(type(s) is int and 0 <= s < 2**20 for s in shape):
        n_hint = int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1
    if rng.random() < 0.75:
        stored = _hostile_stored(rng, n_hint)
        if record["encoding"] == "dense" and 0 < n_hint < 2**16 and len(shape) <= 8:
            stored = torch.ones(shape, dtype=torch.float32)
        tensors[name] = stored
        record["tensor"] = name if rng.random() < 0.9 else rng.choice(["absent", 7, None])
    if rng.random() < 0.1:
        return [{"$mask": record}, {"$mask": dict(record)}]
    return {"$mask": record}


def _hostile_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(14)
    if choice == 0 and depth < 3:
        return {f"k{i}": _hostile_value(rng, depth + 1) for i in range(rng.randrange(3))}
    if choice == 1 and depth < 3:
        return [_hostile_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if choice == 2:
        nested: Any = 0
        for _ in range(rng.choice([10, 63, 64, 65, 200])):
            nested = [nested]
        return nested
    return rng.choice(
        [
            None,
            2**63,
            -(2**63) - 1,
            1e308,
            {"$float": "nan"},
            {"$float": "1e999"},
            {"$tuple": [1, {"$dtype": "float32"}]},
            {"$dict": [[1, 2], [[1], 3]]},
            {"$dict": [[{"$tuple": [1]}, "x"]]},
            {"$dtype": "float128"},
            {"$tensor": "nowhere"},
            "magnitude",
            "$notatag",
        ]
    )


_LAYERS = {"0": 12, "2": 10}  # the inputs of _model()'s two Linear layers


def _valid_layer(
    rng: random.Random, layer: str, tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A layer's state and data group as save() would write them, for a random mask."""
    mask = (torch.rand(_LAYERS[layer]) < rng.random()).to(rng.choice(_MASK_DTYPES))
    record, stored = encode_mask(mask)
    if stored is not None:
        record["tensor"] = f"state/{layer}/mask"
        tensors[record["tensor"]] = stored
    group = {
        "aggregate_fn": "sum",
        "reduce_fn": "mean",
        "mask_fn": "magnitude",
        "features": None,
        "feature_dim": None,
        "sparse_config": {"sparsity_level": 0.5},
        "hook_state": "aggregate",
    }
    return {"mask": {"$mask": record}}, group


_MASK_DTYPES = [torch.float32, torch.float64, torch.bool, torch.float16]


def _hostile_edit(
    rng: random.Random, doc: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """One hostile change to an otherwise valid document or tensor table."""
    layer = rng.choice(list(_LAYERS))
    groups = doc.get("data_groups")
    state = doc["state"].get(layer)
    group = groups.get(layer) if isinstance(groups, dict) else None
    mask = state["mask"] if isinstance(state, dict) else None
    if not (isinstance(group, dict) and group and isinstance(mask, dict) and "$mask" in mask):
        tensors["unreferenced"] = _hostile_stored(rng, 8)  # the layer was edited away
        return
    record = mask["$mask"]
    edit = rng.randrange(12)
    if edit == 0:
        state["mask"] = _hostile_mask(rng, tensors, f"state/{layer}/mask#2")
    elif edit == 1:
        record["shape"] = _hostile_shape(rng)
    elif edit == 2:
        record["dtype"] = rng.choice(_DTYPE_NAMES)
    elif edit == 3:
        record["encoding"] = rng.choice(["constant", "bitpack", "rle", "coo", "dense", "?"])
    elif edit == 4:
        for key in ("value", "first", "fill"):
            if key in record:
                record[key] = rng.choice([0, 1, 2, -1, True, None])
    elif edit == 5 and "tensor" in record:
        tensors[record["tensor"]] = _hostile_stored(rng, _LAYERS[layer])
    elif edit == 6:
        group[rng.choice(list(group))] = _hostile_value(rng)
    elif edit == 7:
        del group[rng.choice(list(group))]
    elif edit == 8:
        group["sparse_config"][rng.choice(["sparsity_level", "odd"])] = _hostile_value(rng)
    elif edit == 9:
        doc["state"]["missing.layer"] = doc["state"].pop(layer)
    elif edit == 10:
        tensors["unreferenced"] = _hostile_stored(rng, 8)
    else:
        doc[rng.choice(["format_version", "defaults", "data_groups"])] = _hostile_value(rng)


def hostile_document(rng: random.Random) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A valid document made from scratch, then made hostile in one to three places."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for layer in _LAYERS:
        state[layer], groups[layer] = _valid_layer(rng, layer, tensors)
    doc: dict[str, Any] = {
        "state": state,
        "data_groups": groups,
        "defaults": copy.deepcopy(groups["0"]),
        "format_version": 1,
    }
    del doc["defaults"]["hook_state"]
    for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
        _hostile_edit(rng, doc, tensors)
    return doc, tensors


def _signed(rng: random.Random, doc: Any, tensors: dict[str, torch.Tensor]) -> bytes:
    text = json.dumps(doc, separators=(",", ":"))
    if rng.random() < 0.1:
        text = text.replace('"sparse_config"', '"sparse_\\udcffconfig"', 1)
    if rng.random() < 0.05:
        text = text[: rng.randrange(len(text))]  # signed, but not JSON
    return pack_text(text, tensors)


def _refused_cleanly(message: str) -> None:
    message.encode("utf-8")  # printable: a lone surrogate is shown escaped
    for sign in ("not enough memory", "can't allocate", "MemoryError", "RecursionError"):
        assert sign not in message, message


def test_fuzz_hand_made_hostile_files(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    model = _model()
    path = tmp_path / "hostile.safetensors"
    outcomes: dict[str, int] = {}
    for case in range(HOSTILE_CASES):
        doc, tensors = hostile_document(rng)
        path.write_bytes(_signed(rng, doc, tensors))
        t0 = time.perf_counter()
        try:
            sd = serialize.load(path, max_elements=FUZZ_CAP)
        except ActsparseError as exc:
            _refused_cleanly(str(exc))
            outcome = "refused"
        except Exception as exc:  # pragma: no cover - a failure shows the case
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{json.dumps(doc)[:2000]}")
        else:
            try:
                ActivationSparsifier(model).load_state_dict(sd)
                outcome = "loaded"
            except ActsparseError:
                outcome = "refused by load_state_dict"
            except Exception as exc:  # pragma: no cover - a failure shows the case
                pytest.fail(f"case {case}: load_state_dict raised {type(exc).__name__}: {exc}")
        assert time.perf_counter() - t0 < 2.0, f"case {case} took too long"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # every layer of checks is reached: the reader, load_state_dict, and neither
    assert set(outcomes) == {"refused", "refused by load_state_dict", "loaded"}, outcomes
    assert outcomes["refused"] > HOSTILE_CASES * 0.4, outcomes


def _quantized() -> torch.Tensor:
    quantize = getattr(torch, "quantize_per_tensor", None)  # deprecated by torch
    if quantize is None:  # pragma: no cover - a torch without quantized tensors
        return torch.ones(3, dtype=torch.complex128)
    tensor: torch.Tensor = quantize(torch.ones(3), 0.1, 0, torch.qint8)
    return tensor


def _hostile_torch_state(rng: random.Random) -> Any:
    mask: Any = rng.choice(
        [
            lambda: torch.ones(6),
            lambda: torch.ones(1).expand(rng.randrange(FUZZ_CAP + 1, 16 * FUZZ_CAP)),
            lambda: torch.ones(1).expand(2**31 - 1),
            lambda: torch.tensor([1.0, 0.0, 1.0]).to_sparse_coo(),
            lambda: torch.tensor([[1.0, 0.0]]).to_sparse_csr(),
            lambda: torch.ones(3, dtype=torch.complex64),
            _quantized,
            lambda: [torch.ones(2), torch.zeros(0)],
            lambda: "mask",
            lambda: None,
        ]
    )()
    state: Any = {
        "state": {rng.choice(["0", "x\udcff"]): {"mask": mask}},
        "data_groups": {"0": {"sparse_config": {"v": _hostile_value(rng)}}},
        "defaults": rng.choice([{}, [], {"mask_fn": 3}]),
    }
    if rng.random() < 0.1:
        state = rng.choice([[], "state", {"state": {}}])
    return state


def _small(value: Any) -> bool:
    """Whether every tensor in ``value`` is small enough to checksum here."""
    if isinstance(value, torch.Tensor):
        return value.numel() <= FUZZ_CAP
    if isinstance(value, dict):
        return all(_small(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_small(v) for v in value)
    return True


# torch's own notes about the odd tensors built here, not about actsparse
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_fuzz_hand_made_hostile_torch_files(tmp_path: Path) -> None:
    rng = random.Random(5)
    path = tmp_path / "hostile.pt"
    outcomes: dict[str, int] = {}
    for case in range(300):
        sd = _hostile_torch_state(rng)
        checksum = "sha256:" + "0" * 64
        if _small(sd):
            # the format's own checksum, so the checks after it are reached too
            with contextlib.suppress(ActsparseError, TypeError, KeyError, AttributeError):
                checksum = _torch_checksum(sd)
        payload: Any = {
            "format": rng.choice(["actsparse-torch"] * 5 + ["other"]),
            "format_version": rng.choice([1] * 5 + [2, "1"]),
            "state_dict": sd,
            "checksum": checksum,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
        t0 = time.perf_counter()
        try:
            serialize.load(path, max_elements=FUZZ_CAP)
            outcome = "loaded"
        except ActsparseError as exc:
            _refused_cleanly(str(exc))
            outcome = "refused"
        except Exception as exc:  # pragma: no cover - a failure shows the case
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
        assert time.perf_counter() - t0 < 2.0, f"case {case} took too long"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("refused", 0) > 100, outcomes
