"""save / load: strategies by name, formats, devices, atomic writes, checks on load."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

import actsparse.serialize as serialize
from actsparse.core import (
    ActsparseError,
    LayerNotFoundError,
    MaskStrategy,
    SerializationError,
    UnknownStrategyError,
    hookimpl,
    register_plugin,
    unregister_plugin,
)
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize import _files
from actsparse.serialize._formats import pack, unpack


def small(mask_fn: Any = "magnitude", **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    sparsifier = ActivationSparsifier(model, aggregate_fn="sum", reduce_fn="mean")
    sparsifier.register_layer(model[0], mask_fn=mask_fn, sparsity_level=0.5, **kwargs)
    sparsifier.register_layer(
        model[2], mask_fn="magnitude", features=[0, [1, 2]], feature_dim=1, sparsity_level=0.4
    )
    with torch.no_grad():
        model(torch.randn(4, 6))
    return model, sparsifier


def fresh_copy(model: torch.nn.Module) -> ActivationSparsifier:
    clone = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    clone.load_state_dict(model.state_dict())
    return ActivationSparsifier(clone)


def test_load_returns_a_state_dict_with_names_and_dense_masks(tmp_path: Path) -> None:
    _model, sparsifier = small()
    sparsifier.step()
    path = serialize.save(sparsifier, tmp_path / "s.safetensors")
    sd = serialize.load(path)
    assert set(sd) == {"state", "data_groups", "defaults", "format_version"}
    assert sd["data_groups"]["0"]["mask_fn"] == "magnitude"
    assert sd["defaults"]["aggregate_fn"] == "sum"
    assert torch.equal(sd["state"]["0"]["mask"], sparsifier.get_mask("0"))
    assert not sd["state"]["0"]["mask"].is_sparse
    # a state dict is accepted as well as a sparsifier, and torch.ao's COO shape too
    other = serialize.save(sparsifier.state_dict(), tmp_path / "t.safetensors")
    assert serialize.load(other)["state"]["2"]["mask"][1].shape == (2,)


def test_unregistered_callable_names_layer_key_and_remedy(tmp_path: Path) -> None:
    _model, sparsifier = small(mask_fn=lambda t, sparsity_level: (t > 0).float())
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"previous")
    for fmt in ("safetensors", "torch"):
        with pytest.raises(SerializationError) as info:
            serialize.save(sparsifier, path, format=fmt)
        message = str(info.value)
        assert "layer '0'" in message
        assert "mask_fn" in message
        assert "register" in message
        assert "docs/plugins.md" in message
    assert path.read_bytes() == b"previous"


def test_registered_callable_is_written_by_name(tmp_path: Path) -> None:
    def keep_positive(t: torch.Tensor, sparsity_level: float) -> torch.Tensor:
        return (t > 0).to(t.dtype)

    class Plugin:
        @hookimpl
        def actsparse_mask_strategies(self) -> list[MaskStrategy]:
            return [MaskStrategy(name="test-keep-positive", fn=keep_positive)]

    plugin = Plugin()
    register_plugin(plugin)
    try:
        model, sparsifier = small(mask_fn=keep_positive)
        sparsifier.step()
        path = serialize.save(sparsifier, tmp_path / "s.safetensors")
        sd = serialize.load(path)
        assert sd["data_groups"]["0"]["mask_fn"] == "test-keep-positive"
        restored = fresh_copy(model)
        serialize.load_into(restored, path)
        assert torch.equal(restored.get_mask("0"), sparsifier.get_mask("0"))
    finally:
        unregister_plugin(plugin)
    # without the plugin the name is unknown: loading into a sparsifier says so
    with pytest.raises(UnknownStrategyError, match="test-keep-positive"):
        serialize.load_into(fresh_copy(model), path)


def test_plain_data_only(tmp_path: Path) -> None:
    _model, sparsifier = small()
    sd = sparsifier.state_dict()
    sd["data_groups"]["0"]["sparse_config"]["odd"] = object()
    with pytest.raises(SerializationError, match=r"data_groups/0/sparse_config/odd"):
        serialize.save(sd, tmp_path / "s")
    sd["data_groups"]["0"]["sparse_config"]["odd"] = print
    with pytest.raises(SerializationError, match="callable"):
        serialize.save(sd, tmp_path / "s")


def test_values_that_json_lacks_come_back_exactly(tmp_path: Path) -> None:
    _model, sparsifier = small()
    sd = sparsifier.state_dict()
    extra = {
        "tuple": (1, (2.5, "x")),
        "nan": float("nan"),
        "inf": float("-inf"),
        "dtype": torch.bfloat16,
        "int_keys": {1: "a", "$b": [None, True]},
        "tensor": torch.arange(6, dtype=torch.int16).reshape(2, 3),
    }
    sd["defaults"]["sparse_config"]["extra"] = extra
    back = serialize.load(serialize.save(sd, tmp_path / "s"))["defaults"]["sparse_config"]["extra"]
    assert back["tuple"] == (1, (2.5, "x"))
    assert back["nan"] != back["nan"]
    assert back["inf"] == float("-inf")
    assert back["dtype"] is torch.bfloat16
    assert back["int_keys"] == {1: "a", "$b": [None, True]}
    assert torch.equal(back["tensor"], extra["tensor"])


def test_map_location_places_every_tensor(tmp_path: Path) -> None:
    _model, sparsifier = small()  # mid-calibration: data and all-ones placeholder masks
    path = serialize.save(sparsifier, tmp_path / "s")
    sd = serialize.load(path, map_location="meta")
    assert sd["state"]["0"]["mask"].device.type == "meta"
    assert sd["data_groups"]["0"]["data"].device.type == "meta"
    assert all(d.device.type == "meta" for d in sd["data_groups"]["2"]["data"])
    cpu = serialize.load(path)
    assert sd["state"]["0"]["mask"].shape == cpu["state"]["0"]["mask"].shape
    assert cpu["state"]["0"]["mask"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda(tmp_path: Path) -> None:
    _model, sparsifier = small()
    sparsifier.step()
    path = serialize.save(sparsifier, tmp_path / "s")
    sd = serialize.load(path, map_location="cuda")
    assert sd["state"]["0"]["mask"].is_cuda
    assert torch.equal(sd["state"]["0"]["mask"].cpu(), sparsifier.get_mask("0"))


def test_format_from_suffix_and_content(tmp_path: Path) -> None:
    model, sparsifier = small()
    pt = serialize.save(sparsifier, tmp_path / "s.pt")
    st = serialize.save(sparsifier, tmp_path / "s.safetensors")
    other = serialize.save(sparsifier, tmp_path / "s.bin")
    assert pt.read_bytes()[:4] == b"PK\x03\x04"
    assert struct.unpack("<Q", st.read_bytes()[:8])[0] > 0
    assert other.read_bytes() == st.read_bytes()
    payload = torch.load(pt, weights_only=True)
    assert payload["format"] == "actsparse-torch"
    assert payload["state_dict"]["defaults"]["mask_fn"] is None
    for path in (pt, st, other):
        serialize.load_into(fresh_copy(model), path)
    with pytest.raises(SerializationError, match="cannot write files"):
        serialize.save(sparsifier, tmp_path / "x", format="sparse_coo")
    with pytest.raises(UnknownStrategyError, match="no-such-format"):
        serialize.save(sparsifier, tmp_path / "x", format="no-such-format")
    with pytest.raises(SerializationError, match=str(st)):
        serialize.load(st, format="torch")


def test_torch_ao_export_is_the_sparse_coo_serializer() -> None:
    _model, sparsifier = small()
    sparsifier.step()
    exported = serialize.to_torch_ao(sparsifier.state_dict())
    assert exported["state"]["0"]["mask"].is_sparse
    assert torch.equal(exported["state"]["0"]["mask"].to_dense(), sparsifier.get_mask("0"))
    # a file read back exports to the same torch.ao shape
    back = serialize.to_torch_ao(serialize.from_torch_ao(exported))
    assert torch.equal(back["state"]["0"]["mask"].to_dense(), sparsifier.get_mask("0"))


# ------------------------------------------------------------------ atomic writes


def test_crash_half_way_leaves_the_old_file(tmp_path: Path, monkeypatch: Any) -> None:
    model, sparsifier = small()
    path = serialize.save(sparsifier, tmp_path / "s.safetensors")
    before = path.read_bytes()
    sparsifier.step()

    def half_then_crash(fh: Any, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(_files, "_write_all", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        serialize.save(sparsifier, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
    serialize.load_into(fresh_copy(model), path)  # the old file still loads


def test_crash_before_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: Any) -> None:
    _model, sparsifier = small()
    path = serialize.save(sparsifier, tmp_path / "s.safetensors")
    before = path.read_bytes()
    sparsifier.step()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        serialize.save(sparsifier, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_save_replaces_and_keeps_permissions(tmp_path: Path) -> None:
    _model, sparsifier = small()
    path = tmp_path / "s.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o640)
    serialize.save(sparsifier, path)
    assert (path.stat().st_mode & 0o777) == 0o640
    assert serialize.load(path)["state"].keys() == {"0", "2"}


# ------------------------------------------------------------------ checks on load


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model, sparsifier = small()
    sparsifier.step()
    return model, serialize.save(sparsifier, tmp_path / "s.safetensors")


def _data_start(data: bytes) -> int:
    return 8 + int(struct.unpack("<Q", data[:8])[0])


def _flip(data: bytes, at: int) -> bytes:
    assert at < len(data)
    return data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:5], "fewer than the 8-byte header length"),
        (lambda b: b[: len(b) // 2], "truncated|data bytes"),
        (lambda b: b[:-1], "data bytes"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: struct.pack("<Q", 2**60) + b[8:], "more than the"),
        (lambda b: struct.pack("<Q", len(b)) + b[8:], "holds only"),
        (lambda b: b[:8] + b"[" + b[9:], "JSON"),
        (lambda b: _flip(b, _data_start(b)), "checksum"),
        (lambda b: _flip(b, len(b) - 1), "checksum"),
        (lambda b: _flip(b, b.index(b"mask") + 1), "checksum"),
        (lambda b: b[:8] + b"\xff" + b[9:], "UTF-8"),
    ],
)
def test_damaged_files_are_refused_naming_the_file(
    tmp_path: Path, mutate: Any, message: str
) -> None:
    _, path = _saved(tmp_path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(SerializationError, match=message) as info:
        serialize.load(path)
    assert str(path) in str(info.value)


def _rewrite_header(path: Path, edit: Any) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def test_header_that_lies_about_sizes(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)

    def grow(header: dict[str, Any]) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [10**12]
        header[name]["data_offsets"][1] = 10**12

    _rewrite_header(path, grow)
    with pytest.raises(SerializationError, match="do not lie within"):
        serialize.load(path)


def test_unknown_format_version(tmp_path: Path) -> None:
    _, path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["__metadata__"].update(format_version="2"))
    with pytest.raises(SerializationError, match="unknown format version '2'") as info:
        serialize.load(path)
    assert str(path) in str(info.value)


def test_plain_safetensors_file_is_not_a_state_file(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file({"w": torch.ones(3)}, str(path))
    with pytest.raises(SerializationError, match="not an actsparse state file"):
        serialize.load(path)


def test_layer_the_model_lacks(tmp_path: Path) -> None:
    model, path = _saved(tmp_path)
    doc, tensors = unpack(path.read_bytes())
    for key in ("state", "data_groups"):
        doc[key]["9"] = doc[key].pop("0")
    tensors = {k.replace("state/0/", "state/9/"): v for k, v in tensors.items()}
    doc["state"]["9"]["mask"]["$mask"]["tensor"] = doc["state"]["9"]["mask"]["$mask"][
        "tensor"
    ].replace("state/0/", "state/9/")
    path.write_bytes(pack(doc, tensors))
    target = fresh_copy(model)
    with pytest.raises(LayerNotFoundError, match="'9'") as info:
        serialize.load_into(target, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ActsparseError)
    assert target.data_groups == {}


def test_mask_records_are_checked(tmp_path: Path) -> None:
    _model, path = _saved(tmp_path)
    doc, tensors = unpack(path.read_bytes())
    record = doc["state"]["0"]["mask"]["$mask"]
    record["shape"] = [record["shape"][0] * 1000]
    path.write_bytes(pack(doc, tensors))
    with pytest.raises(SerializationError, match=r"state/0/mask"):
        serialize.load(path)


def test_data_that_does_not_fit_the_features(tmp_path: Path) -> None:
    model, sparsifier = small()  # mid-calibration
    path = serialize.save(sparsifier, tmp_path / "s.safetensors")
    doc, tensors = unpack(path.read_bytes())
    tensors["data_groups/2/data/0"] = torch.zeros(3)  # 1-d: cannot join along feature_dim=1
    path.write_bytes(pack(doc, tensors))
    target = fresh_copy(model)
    with pytest.raises(SerializationError, match="data of layer '2'") as info:
        serialize.load_into(target, path)
    assert str(path) in str(info.value)
    assert target.data_groups == {}


def test_integers_beyond_64_bits(tmp_path: Path) -> None:
    _model, sparsifier = small()
    sd = sparsifier.state_dict()
    sd["defaults"]["sparse_config"]["huge"] = 2**64
    with pytest.raises(SerializationError, match="64-bit"):
        serialize.save(sd, tmp_path / "s")
    path = serialize.save(sparsifier, tmp_path / "s")
    doc, tensors = unpack(path.read_bytes())
    doc["data_groups"]["2"]["features"] = [0, 2**70]
    path.write_bytes(pack(doc, tensors))
    with pytest.raises(SerializationError, match="64-bit"):
        serialize.load(path)
