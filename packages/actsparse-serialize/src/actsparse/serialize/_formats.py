"""The two file formats: ``safetensors`` (the default) and ``torch``.

Both ``dumps`` a state dict to bytes and ``loads`` bytes back into a state
dict with dense masks on the CPU, names in place of strategies, ready for
``ActivationSparsifier.load_state_dict``. Neither ever unpickles code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import torch

from actsparse.core import STATE_KEYS, SerializationError
from actsparse.serialize._codec import (
    MAX_DEPTH,
    Decoder,
    Encoder,
    check_loaded,
    named_state_dict,
    path_segment,
)
from actsparse.serialize._limits import (
    BYTES_PER_ELEMENT,
    DEFAULT_MAX_ELEMENTS,
    MIN_PICKLE_BYTES,
    check_elements,
    explicit_cap,
    file_cap,
    trust_remedy,
)
from actsparse.serialize._safetensors import (
    DTYPES,
    MAX_HEADER_BYTES,
    TensorEntry,
    parse_header,
    tensor_at,
    write_safetensors,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "check_header",
    "check_torch_zip",
    "declared_elements",
    "is_safetensors",
    "is_torch_zip",
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


_ZIP_MAGIC = b"PK\x03\x04"


def is_safetensors(head: bytes) -> bool:
    """Whether a file starting with ``head`` looks like a safetensors file: an 8-byte
    little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2


def is_torch_zip(head: bytes) -> bool:
    """Whether a file starting with ``head`` is a zip archive, as ``torch.save`` writes."""
    return head[:4] == _ZIP_MAGIC


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


def _state_text(metadata: Mapping[str, str]) -> tuple[str, str]:
    """The state JSON and checksum of a file's metadata, once its format and version pass."""
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
    return state_json, checksum


def _parse_state(state_json: str) -> Any:
    try:
        return json.loads(state_json)
    except (ValueError, RecursionError) as exc:
        raise SerializationError(f"the stored state is not valid JSON: {exc}") from None


def _shape_elements(shape: object) -> int:
    """The elements of a claimed shape; 0 for a malformed one (the decoder refuses it)."""
    if (
        isinstance(shape, list)
        and len(shape) <= MAX_DEPTH
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        return math.prod(shape)
    return 0


def declared_elements(doc: Any, entries: list[TensorEntry]) -> int:
    """The elements that a document and its tensor table declare, before any is decoded.

    A mask counts its full shape, or its stored tensor where that is larger
    (the decoder refuses such a mask, but only after the data is read); every
    tensor that is not a mask's storage counts its own elements.
    """
    held = {entry.name: entry.numel for entry in entries}
    stored: set[str] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            continue  # the decoder refuses it
        if isinstance(node, list):
            stack.extend((item, depth + 1) for item in node)
        elif isinstance(node, dict):
            record = node.get("$mask") if len(node) == 1 else None
            if isinstance(record, dict):
                name = record.get("tensor")
                own = held.get(name, 0) if isinstance(name, str) else 0
                if isinstance(name, str):
                    stored.add(name)
                total += max(_shape_elements(record.get("shape")), own)
            else:
                stack.extend((value, depth + 1) for value in node.values())
    return total + sum(count for name, count in held.items() if name not in stored)


def check_header(head: bytes | bytearray, size: int) -> None:
    """Check everything a file's beginning (length field and header) says, before its data.

    ``size`` is the size of the whole file. The format, its version, the
    tensor table against ``size`` and the elements the state declares against
    the cap (see :mod:`actsparse.serialize._limits`) are checked, so that a
    reader need not read a data section that would be refused anyway.
    """
    entries, metadata, _ = parse_header(head, size)
    state_json, _ = _state_text(metadata)
    check_elements(declared_elements(_parse_state(state_json), entries), size)


def unpack(buf: bytes | bytearray) -> tuple[Any, dict[str, torch.Tensor]]:
    """Check a file and return its document (parsed JSON) and tensor table."""
    data = buf if isinstance(buf, bytearray) else bytearray(buf)
    entries, metadata, start = parse_header(data)
    state_json, checksum = _state_text(metadata)
    if _digest(entries, state_json, memoryview(data)[start:]) != checksum:
        raise SerializationError("the checksum does not match the contents: the file is corrupted")
    doc = _parse_state(state_json)
    check_elements(declared_elements(doc, entries), len(data))
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


def _zip_budgets(size: int) -> tuple[int, str, int, str]:
    """What the members of a torch zip of ``size`` bytes may declare uncompressed, together
    and for the pickled state, each with the reason a message gives."""
    cap = explicit_cap()
    pickled = f"plus {MAX_HEADER_BYTES} for the pickled state"
    if cap is not None:
        why = f"{BYTES_PER_ELEMENT} bytes for each of the max_elements={cap} elements, {pickled}"
        return BYTES_PER_ELEMENT * cap + MAX_HEADER_BYTES, why, MAX_HEADER_BYTES, ""
    # No cap set: a deflated member may inflate, but not into more than a stored file
    # of the same size could hold.
    if size < DEFAULT_MAX_ELEMENTS:
        held = size
        why = f"{BYTES_PER_ELEMENT} bytes for each byte of the file, {pickled}"
    else:
        held = DEFAULT_MAX_ELEMENTS
        why = f"{BYTES_PER_ELEMENT} bytes for each of the {held} elements allowed, {pickled}"
    return (
        BYTES_PER_ELEMENT * held + MAX_HEADER_BYTES,
        why + ", unless max_elements is set",
        min(MAX_HEADER_BYTES, max(MIN_PICKLE_BYTES, size)),
        f" for a file of {size} bytes (its size, and at least {MIN_PICKLE_BYTES}, unless "
        "max_elements is set)",
    )


#: The most operations a torch file's pickled state may hold when no cap is set.
MAX_PICKLE_OPS = 2**19


def check_torch_zip(source: IO[bytes], size: int) -> None:
    """Check the sizes a torch zip declares before ``torch.load`` reads (and inflates) it.

    The central directory's uncompressed sizes are read (nothing is inflated)
    and checked against the file's caps (see :mod:`actsparse.serialize._limits`).
    With a cap set, the pickled state may take at most as many bytes as a
    safetensors header (16 MiB), and the members together at most 8 bytes for
    each element that the cap allows, plus 16 MiB; so may the file itself.
    With none, what a member declares is bounded by the file's own size: the
    pickled state by that size (at least 1 MiB, at most 16 MiB), the members
    together by 8 bytes for each byte of the file, plus 16 MiB. A stored
    member (``torch.save`` writes no other) always passes; a deflated one
    passes only as far as a stored file of the same size could hold. With no
    cap set, the pickled state may also hold at most :data:`MAX_PICKLE_OPS`
    operations (counted, not run), which bounds the objects it builds.
    """
    budget, why, pickle_budget, pickle_why = _zip_budgets(size)
    if size > budget:
        raise SerializationError(
            f"the file holds {size} bytes, more than the {budget} allowed ({why}); "
            + trust_remedy(_elements_for(size))
        )
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except Exception as exc:  # zipfile parses untrusted bytes: any failure is a bad file
        raise SerializationError(f"not a readable torch file: {exc!r}") from None
    declared = sum(member.file_size for member in members)
    total = 0
    for member in members:
        if member.filename.rsplit("/", 1)[-1] == "data.pkl" and member.file_size > pickle_budget:
            remedy = "" if not pickle_why else "; " + trust_remedy(file_cap(size))
            raise SerializationError(
                f"zip member {member.filename!r} declares {member.file_size} uncompressed bytes, "
                f"more than the {pickle_budget} allowed for the pickled state{pickle_why}{remedy}"
            )
        total += member.file_size
        if total > budget:
            raise SerializationError(
                f"zip member {member.filename!r} declares {member.file_size} uncompressed bytes, "
                f"which brings the members to {total}, more than the {budget} allowed ({why}); "
                + trust_remedy(max(_elements_for(declared), file_cap(size)))
            )
    if explicit_cap() is not None:
        return
    for member in members:
        if member.filename.rsplit("/", 1)[-1] != "data.pkl":
            continue
        try:
            source.seek(0)
            with zipfile.ZipFile(source) as archive:
                data = archive.read(member)  # at most pickle_budget bytes, checked above
        except Exception as exc:  # zipfile parses untrusted bytes: any failure is a bad file
            raise SerializationError(f"not a readable torch file: {exc!r}") from None
        _check_pickle_ops(data, member.filename)


def _check_pickle_ops(data: bytes, name: str) -> None:
    """Refuse a pickled state of more than :data:`MAX_PICKLE_OPS` operations, counted
    before anything is unpickled.

    Each operation builds at most one small object, and what a state becomes in
    memory, once loaded, checked and copied, grows with their number: a 1 MB
    pickle of a million empty lists would take hundreds of MiB. A state dict
    that actsparse writes takes a few hundred operations per layer.
    """
    count = 0
    try:
        for _ in pickletools.genops(data):
            count += 1
            if count > MAX_PICKLE_OPS:
                raise SerializationError(
                    f"zip member {name!r} holds a pickled state of more than {MAX_PICKLE_OPS} "
                    "operations, more than any sparsifier state needs; "
                    + trust_remedy(DEFAULT_MAX_ELEMENTS)
                )
    except SerializationError:
        raise
    except Exception as exc:  # a malformed pickle: torch.load would refuse it too
        raise SerializationError(f"zip member {name!r} is not a readable pickle: {exc!r}") from None


def _elements_for(nbytes: int) -> int:
    """An element cap under which a torch zip may declare ``nbytes`` uncompressed bytes
    (and its tensors, were they all of 8-byte elements, pass too)."""
    return max(1, -(-nbytes // BYTES_PER_ELEMENT))


def _torch_elements(value: Any, where: str) -> int:
    """Check every tensor in a loaded payload (dense, CPU, a storable dtype) and count them."""
    total = 0
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SerializationError(f"{path}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, torch.Tensor):
            if node.layout != torch.strided:
                layout = str(node.layout).removeprefix("torch.")
                raise SerializationError(
                    f"{path}: a {layout} tensor; a torch-format state file holds dense "
                    "(strided) tensors only"
                )
            if node.dtype not in _STORABLE or node.device.type != "cpu":
                raise SerializationError(
                    f"{path}: a {node.dtype} tensor on {node.device} cannot be part of a state file"
                )
            total += node.numel()
        elif isinstance(node, dict):
            stack.extend((v, f"{path}/{path_segment(k)}", depth + 1) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{path}/{i}", depth + 1) for i, v in enumerate(node))
    return total


_STORABLE = frozenset(DTYPES.values())


def torch_loads(buf: bytes | bytearray) -> dict[str, Any]:
    """Read a torch-style file with ``weights_only=True``: a pickle of code is refused.

    Before ``torch.load`` the zip's declared sizes are checked; ``torch.load``
    runs with sparse-tensor invariant checks on; then every tensor must be
    dense and the total within the element cap before the checksum (which
    reads every tensor) is compared.
    """
    if not is_torch_zip(bytes(buf[:4])):
        # torch.load would fall back to its legacy (bare pickle) reader; never go there.
        raise SerializationError("not a torch zip file (torch.save writes zip files)")
    check_torch_zip(io.BytesIO(buf), len(buf))
    try:
        with torch.sparse.check_sparse_tensor_invariants():  # type: ignore[no-untyped-call]
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
    check_elements(_torch_elements(sd, "state_dict"), len(buf))
    checked = check_loaded(sd)
    if payload.get("checksum") != _torch_checksum(checked):
        raise SerializationError("the checksum does not match the contents: the file is corrupted")
    return checked
