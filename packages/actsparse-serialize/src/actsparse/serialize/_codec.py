"""A sparsifier state dict as JSON-ready data plus named tensors, and back.

Strategies are written by registered name; every other value must be plain
data (None, bools, ints, floats, strings, lists, tuples, dicts), a torch
dtype or a tensor. A tensor becomes ``{"$tensor": name}`` and its bytes go to
the tensor table; masks become ``{"$mask": record}`` (see
:mod:`actsparse.serialize._packing`). Values that JSON cannot hold exactly
are tagged: ``{"$tuple": [...]}``, ``{"$float": "nan"}``, ``{"$dtype":
"float32"}`` and ``{"$dict": [[key, value], ...]}`` for a dict whose keys are
not all strings or start with ``$``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from actsparse.core import (
    STATE_KEYS,
    STRATEGY_KEYS,
    SerializationError,
    get_registry,
    parse_state_dict,
)
from actsparse.serialize._packing import decode_mask, dtype_str, encode_mask, parse_dtype

__all__ = [
    "MAX_DEPTH",
    "Decoder",
    "Encoder",
    "check_text",
    "named_state_dict",
    "path_segment",
]
_RECORDS = {"aggregate": "AggregateStrategy", "reduce": "ReduceStrategy", "mask": "MaskStrategy"}
#: How deeply values may nest in a state file.
MAX_DEPTH = 64
#: Integers in a file are signed 64-bit, like torch's and safetensors' own.
_INT_RANGE = range(-(2**63), 2**63)


def check_text(text: str, where: str, *, what: str = "the string") -> None:
    """Refuse a string that UTF-8 cannot encode (one holding a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise SerializationError(
            f"{where}: {what} {shown!r} holds the lone surrogate U+{ord(text[exc.start]):04X} "
            f"at index {exc.start}, which UTF-8 cannot encode; a state file holds valid "
            "Unicode text only"
        ) from None


def path_segment(key: object) -> str:
    """``key`` as one step of a path in a message: as it is, unless UTF-8 cannot hold it."""
    if isinstance(key, str):
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            return repr(key)
        return key
    return str(key)


def strategy_name(value: object, *, kind: str, where: str, key: str) -> str | None:
    """The name under which ``value`` (a name, a record or a callable) is registered."""
    if value is None or isinstance(value, str):
        return value
    name = get_registry().name_of(kind, value)
    if name is not None:
        return name
    label = getattr(value, "name", None) or getattr(value, "__qualname__", None) or repr(value)
    raise SerializationError(
        f"{where}: {key}={label} is not a registered {kind} strategy, so it cannot be "
        f"written (a state file holds names, never code). Register it under a name: return "
        f"{_RECORDS[kind]}(name=..., fn=...) from an actsparse_{kind}_strategies hook of a "
        "plugin (an entry point of the 'actsparse' group, or "
        "actsparse.core.register_plugin(obj) in-process; see docs/plugins.md), then pass "
        "the name or the function"
    )


def named_config(config: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """A copy of a config mapping with its strategies replaced by their names."""
    out = dict(config)
    for key, kind in STRATEGY_KEYS.items():
        if key in out:
            out[key] = strategy_name(out[key], kind=kind, where=where, key=key)
    return out


def named_state_dict(state_dict: object) -> dict[str, Any]:
    """The state dict, checked, with dense masks and every strategy replaced by its name."""
    sd = parse_state_dict(state_dict).as_dict(sparse=False)
    return {
        **sd,
        "data_groups": {
            name: named_config(group, where=f"layer {name!r}")
            for name, group in sd["data_groups"].items()
        },
        "defaults": named_config(sd["defaults"], where="defaults"),
    }


class Encoder:
    """Turns a named state dict into a JSON-ready document and a tensor table."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _add(self, path: str, tensor: torch.Tensor) -> str:
        name = path
        suffix = 1
        while name in self.tensors:
            suffix += 1
            name = f"{path}#{suffix}"
        self.tensors[name] = tensor
        return name

    def value(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            check_text(value, path)
            return value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value not in _INT_RANGE:
                raise SerializationError(f"{path}: {value} does not fit in a signed 64-bit int")
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise SerializationError(
                    f"{path}: only strided tensors can be written, got layout {value.layout}"
                )
            return {"$tensor": self._add(path, value.detach().contiguous())}
        if isinstance(value, torch.dtype):
            return {"$dtype": dtype_str(value)}
        if isinstance(value, list):
            return [self.value(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.value(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                for k in value:
                    check_text(k, path, what="the key")
                return {k: self.value(v, f"{path}/{k}") for k, v in value.items()}
            return {
                "$dict": [
                    [self.value(k, f"{path}/<key>"), self.value(v, f"{path}/{k}")]
                    for k, v in value.items()
                ]
            }
        if callable(value):
            raise SerializationError(
                f"{path}: {value!r} is a callable; only aggregate_fn, reduce_fn and mask_fn "
                "may name strategies, and a file never holds code"
            )
        raise SerializationError(
            f"{path}: a {type(value).__name__} cannot be written; values must be plain data "
            "(None, bool, int, float, str, list, tuple, dict), torch dtypes or tensors"
        )

    def mask(self, mask: Any, path: str) -> Any:
        if mask is None:
            return None
        if isinstance(mask, (list, tuple)):
            return [self.mask(m, f"{path}/{i}") for i, m in enumerate(mask)]
        if not isinstance(mask, torch.Tensor):
            raise SerializationError(f"{path}: a mask must be a tensor, a list of tensors or None")
        record, tensor = encode_mask(mask)
        if tensor is not None:
            record["tensor"] = self._add(path, tensor)
        return {"$mask": record}

    def state_dict(self, state_dict: object) -> dict[str, Any]:
        """The document for a state dict (from an actsparse or torch.ao sparsifier)."""
        sd = named_state_dict(state_dict)
        state: dict[str, Any] = {}
        for name, layer_state in sd["state"].items():
            if not isinstance(name, str):
                raise SerializationError(f"state: layer names must be strings, got {name!r}")
            check_text(name, "state", what="the layer name")
            for key in layer_state:
                if isinstance(key, str):
                    check_text(key, f"state/{name}", what="the key")
            encoded = {
                k: self.value(v, f"state/{name}/{k}") for k, v in layer_state.items() if k != "mask"
            }
            encoded["mask"] = self.mask(layer_state["mask"], f"state/{name}/mask")
            state[name] = encoded
        doc: dict[str, Any] = {"state": state}
        for key, value in sd.items():
            if key != "state":
                doc[key] = self.value(value, key)
        return doc


class Decoder:
    """Turns a document and its tensor table back into a state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()

    def _tensor(self, name: object, path: str) -> torch.Tensor:
        if not isinstance(name, str) or name not in self.tensors:
            raise SerializationError(f"{path}: refers to a tensor {name!r} that the file lacks")
        if name in self.used:
            raise SerializationError(f"{path}: tensor {name!r} is referred to twice")
        self.used.add(name)
        return self.tensors[name]

    def value(self, value: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError(f"{path}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, int) and not isinstance(value, bool) and value not in _INT_RANGE:
            raise SerializationError(f"{path}: {value} does not fit in a signed 64-bit int")
        if isinstance(value, str):
            check_text(value, path)
            return value
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, list):
            return [self.value(v, f"{path}/{i}", depth + 1) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            raise SerializationError(f"{path}: unexpected {type(value).__name__}")
        for key in value:
            check_text(key, path, what="the key")
        if len(value) == 1:
            ((tag, body),) = value.items()
            if tag.startswith("$"):
                return self._tagged(tag, body, path, depth)
        return {k: self.value(v, f"{path}/{k}", depth + 1) for k, v in value.items()}

    def _tagged(self, tag: str, body: Any, path: str, depth: int) -> Any:
        if tag == "$tensor":
            return self._tensor(body, path)
        if tag == "$mask":
            return self.mask_record(body, path)
        if tag == "$tuple" and isinstance(body, list):
            return tuple(self.value(v, f"{path}/{i}", depth + 1) for i, v in enumerate(body))
        if tag == "$float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "$dtype":
            return parse_dtype(body, where=path)
        if tag == "$dict" and isinstance(body, list):
            out: dict[Any, Any] = {}
            for item in body:
                if not isinstance(item, list) or len(item) != 2:
                    raise SerializationError(f"{path}: $dict items must be [key, value] pairs")
                key = self.value(item[0], f"{path}/<key>", depth + 1)
                try:
                    out[key] = self.value(item[1], f"{path}/{key}", depth + 1)
                except TypeError:
                    raise SerializationError(f"{path}: unhashable key {key!r}") from None
            return out
        raise SerializationError(f"{path}: malformed {tag!r} value")

    def mask_record(self, record: Any, path: str) -> torch.Tensor:
        if not isinstance(record, dict):
            raise SerializationError(f"{path}: a mask record must be an object")
        name = record.get("tensor")
        tensor = None if name is None else self._tensor(name, path)
        return decode_mask(record, tensor, where=path)

    def state_dict(self, doc: object) -> dict[str, Any]:
        if not isinstance(doc, dict):
            raise SerializationError("the stored state must be a JSON object")
        missing = [key for key in STATE_KEYS if key not in doc]
        if missing:
            raise SerializationError(f"the stored state lacks {', '.join(map(repr, missing))}")
        for key in doc:
            check_text(key, "the stored state", what="the key")
        out: dict[str, Any] = {key: self.value(value, key) for key, value in doc.items()}
        out = check_loaded(out)
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise SerializationError(f"tensors that nothing refers to: {', '.join(unused[:5])}")
        return out


def check_loaded(sd: object) -> dict[str, Any]:
    """Check a state dict read from a file (strategies must be names) and return it with
    dense masks: what ``load_state_dict`` accepts."""
    return parse_state_dict(sd, names_only=True).as_dict(sparse=False)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    return value
