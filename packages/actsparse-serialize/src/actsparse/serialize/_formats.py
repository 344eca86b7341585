"""The two file formats: ``safetensors`` (the default) and ``torch``.

Both ``dumps`` a state dict to bytes and ``loads`` bytes back into a state
dict with dense masks on the CPU, names in place of strategies, ready for
``ActivationSparsifier.load_state_dict``. Neither ever unpickles code.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from actsparse.core import SerializationError
from actsparse.serialize._codec import Decoder, Encoder, check_loaded, named_state_dict
from actsparse.serialize._safetensors import (
    TensorEntry,
    parse_header,
    tensor_at,
    write_safetensors,
)
from actsparse.serialize._state import STATE_KEYS

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "safetensors_dumps",
    "safetensors_loads",
    "torch_dumps",
    "torch_loads",
]

#: ``__metadata__["format"]`` of an actsparse safetensors file.
FORMAT_NAME = "actsparse"
#: The version of the file layout this package writes; readers refuse others.
FORMAT_VERSION = 1
#: The ``format`` entry of a torch-style file.
TORCH_FORMAT_NAME = "actsparse-torch"


def _digest(entries: list[TensorEntry], state_json: str, data: memoryview) -> str:
    table = json.dumps([e.describe() for e in entries], separators=(",", ":")).encode()
    h = hashlib.sha256()
    for part in (table, b"\0", state_json.encode(), b"\0", data):
        h.update(part)
    return "sha256:" + h.hexdigest()


def pack(doc: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A signed safetensors file holding ``doc`` (JSON-ready) and ``tensors``."""
    state_json = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return pack_text(state_json, tensors)


def pack_text(state_json: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A signed safetensors file whose state is the text ``state_json``, taken as it is."""
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "state": state_json,
    }
    unsigned = bytearray(write_safetensors(tensors, metadata))
    entries, _, start = parse_header(unsigned)
    metadata["checksum"] = _digest(entries, state_json, memoryview(unsigned)[start:])
    return write_safetensors(tensors, metadata)


def unpack(buf: bytes | bytearray) -> tuple[Any, dict[str, torch.Tensor]]:
    """Check a file and return its document (parsed JSON) and tensor table."""
    data = buf if isinstance(buf, bytearray) else bytearray(buf)
    entries, metadata, start = parse_header(data)
    if metadata.get("format") != FORMAT_NAME:
        raise SerializationError(
            f"not an actsparse state file: __metadata__['format'] is "
            f"{metadata.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise SerializationError(
            f"unknown format version {version!r}: this actsparse-serialize reads version "
            f"{FORMAT_VERSION}; a newer file needs a newer actsparse-serialize"
        )
    state_json = metadata.get("state")
    checksum = metadata.get("checksum")
    if state_json is None or checksum is None:
        raise SerializationError("the file's __metadata__ lacks 'state' or 'checksum'")
    if _digest(entries, state_json, memoryview(data)[start:]) != checksum:
        raise SerializationError("the checksum does not match the contents: the file is corrupted")
    try:
        doc = json.loads(state_json)
    except (ValueError, RecursionError) as exc:
        raise SerializationError(f"the stored state is not valid JSON: {exc}") from None
    return doc, {e.name: tensor_at(data, e, start) for e in entries}


def safetensors_dumps(state_dict: object) -> bytes:
    """The default format: tensors in safetensors, everything else JSON in its metadata."""
    encoder = Encoder()
    doc = encoder.state_dict(state_dict)
    return pack(doc, encoder.tensors)


def safetensors_loads(buf: bytes | bytearray) -> dict[str, Any]:
    """Read the default format; every claim is checked before it is trusted."""
    doc, tensors = unpack(buf)
    return Decoder(tensors).state_dict(doc)


def torch_dumps(state_dict: object) -> bytes:
    """A ``torch.save`` file that ``torch.load(..., weights_only=True)`` reads.

    It holds ``{"format": "actsparse-torch", "format_version": 1, "state_dict":
    ..., "checksum": ...}``: the state dict with dense masks and strategy
    names, and the SHA-256 of its default-format encoding, so that a damaged
    file is detected on load.
    """
    sd = named_state_dict(state_dict)
    payload = {
        "format": TORCH_FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "state_dict": sd,
        # also refuses anything but plain data and tensors, naming it
        "checksum": _torch_checksum(sd),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _torch_checksum(state_dict: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(safetensors_dumps(state_dict)).hexdigest()


def torch_loads(buf: bytes | bytearray) -> dict[str, Any]:
    """Read a torch-style file with ``weights_only=True``: a pickle of code is refused."""
    if bytes(buf[:4]) != b"PK\x03\x04":
        # torch.load would fall back to its legacy (bare pickle) reader; never go there.
        raise SerializationError("not a torch zip file (torch.save writes zip files)")
    try:
        payload = torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SerializationError(
            f"torch.load(weights_only=True) refused the file (it may carry code): {exc}"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as exc:
        raise SerializationError(f"not a readable torch file: {exc!r}") from None
    if not isinstance(payload, dict) or payload.get("format") != TORCH_FORMAT_NAME:
        raise SerializationError(
            f"not an actsparse torch-style file: it lacks format={TORCH_FORMAT_NAME!r}"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise SerializationError(
            f"unknown format version {version!r}: this actsparse-serialize reads version "
            f"{FORMAT_VERSION}"
        )
    sd = payload.get("state_dict")
    if not isinstance(sd, dict) or any(key not in sd for key in STATE_KEYS):
        raise SerializationError(f"the file's state_dict lacks one of {', '.join(STATE_KEYS)}")
    check_loaded(sd)
    if payload.get("checksum") != _torch_checksum(sd):
        raise SerializationError("the checksum does not match the contents: the file is corrupted")
    return sd
