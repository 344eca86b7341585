"""``actsparse inspect FILE``: what a state file holds, without a model."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actsparse.cli._app import CommandError
from actsparse.core import (
    FEATURE_DIM_KEY,
    FEATURES_KEY,
    SNIFF_BYTES,
    SPARSE_CONFIG_KEY,
    STRATEGY_KEYS,
    SerializationError,
    ThresholdResult,
    parse_state_dict,
)

__all__ = ["HELP", "configure", "run"]

HELP = "show what a state file holds: format, each layer's strategies, masks and hook state"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, metavar="FILE", help="a state file written by save()")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")


def _import_serialize() -> Any:
    try:
        import actsparse.serialize as serialize
    except ImportError:
        raise CommandError(
            "reading state files needs actsparse-serialize: pip install actsparse-serialize"
        ) from None
    return serialize


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data (tuples as lists, dtypes and odd keys as strings)."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinities
    return value


def _tensor_info(value: Any, where: str, bad: Callable[[str], CommandError]) -> dict[str, Any]:
    import torch

    if not isinstance(value, torch.Tensor):
        raise bad(f"{where} is of type {type(value).__name__}, not a tensor")
    numel = value.numel()
    # count_nonzero allocates nothing in proportion; (value == 0).sum() makes an int64 copy
    zeros = numel - int(torch.count_nonzero(value))
    return {
        "shape": list(value.shape),
        "dtype": str(value.dtype).removeprefix("torch."),
        "zeros": zeros,
        "numel": numel,
        "sparsity": zeros / numel if numel else 0.0,
    }


def _tensors_info(value: Any, where: str, bad: Callable[[str], CommandError]) -> Any:
    """None, one tensor's info, or a list of them (one per feature)."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_tensor_info(item, f"{where}[{i}]", bad) for i, item in enumerate(value)]
    return _tensor_info(value, where, bad)


def _describe_state(
    path: Path, state_dict: Any, file_format: str, serialize: Any
) -> dict[str, Any]:
    try:
        parsed = parse_state_dict(state_dict, names_only=True)
    except SerializationError as exc:
        raise CommandError(f"{path}: not a sparsifier state: {exc}") from None

    def bad(detail: str) -> CommandError:
        return CommandError(f"{path}: not a sparsifier state: {detail}")

    layers = []
    for name, record in parsed.layers.items():
        config = record.config
        layers.append(
            {
                "name": name,
                "hook_state": record.hook_state,
                **{key: config[key] for key in STRATEGY_KEYS},
                SPARSE_CONFIG_KEY: _plain(config[SPARSE_CONFIG_KEY]),
                FEATURES_KEY: _plain(config[FEATURES_KEY]),
                FEATURE_DIM_KEY: config[FEATURE_DIM_KEY],
                "mask": _tensors_info(record.mask, f"state[{name!r}]['mask']", bad),
                "threshold": None if record.threshold is None else record.threshold.to_dict(),
                "offset": _tensors_info(record.offset, f"state[{name!r}]['offset']", bad),
                "data": _tensors_info(record.data, f"data_groups[{name!r}]['data']", bad),
            }
        )
    return {
        "file": str(path),
        "size_bytes": path.stat().st_size,
        "format": file_format,
        # the reader refuses any file layout version it does not know
        "file_format_version": serialize.FORMAT_VERSION,
        "state_format_version": parsed.format_version,
        "defaults": _plain(dict(parsed.defaults)),
        "calibration_data": any(layer["data"] is not None for layer in layers),
        "layers": layers,
    }


def _shape(info: dict[str, Any]) -> str:
    return str(tuple(info["shape"]))


def _summarise(infos: Any) -> str:
    """One line for a mask or for aggregated data: shapes, dtype and share of zeros."""
    if infos is None:
        return "none"
    items = infos if isinstance(infos, list) else [infos]
    zeros = sum(item["zeros"] for item in items)
    numel = sum(item["numel"] for item in items)
    share = f"{zeros / numel:.1%}" if numel else "n/a"
    shapes = ", ".join(_shape(item) for item in items)
    dtypes = ", ".join(dict.fromkeys(item["dtype"] for item in items))
    if isinstance(infos, list):
        shapes = f"{len(items)} features: [{shapes}]"
    return f"{shapes} {dtypes}, {share} zeros ({zeros:,} of {numel:,})"


def _text(value: Any) -> str:
    return "none" if value is None else json.dumps(value, sort_keys=True)


def _print_inspection(report: dict[str, Any]) -> None:
    version = report["state_format_version"]
    print(f"file: {report['file']} ({report['size_bytes']:,} bytes)")
    print(
        f"format: {report['format']}, file format version {report['file_format_version']}, "
        "state format_version "
        + (str(version) if version is not None else "absent (a torch.ao-style state dict)")
    )
    defaults = report["defaults"]
    strategies = ", ".join(f"{key}={defaults.get(key) or 'none'}" for key in STRATEGY_KEYS)
    shown = _text(defaults.get(SPARSE_CONFIG_KEY, {}))
    print(f"defaults: {strategies}, {SPARSE_CONFIG_KEY}={shown}")
    print(f"mid-calibration data: {'present' if report['calibration_data'] else 'none'}")
    layers = report["layers"]
    print(f"layers: {len(layers)}")
    for layer in layers:
        strategies = ", ".join(f"{key}={layer[key] or 'none'}" for key in STRATEGY_KEYS)
        features = "none"
        if layer[FEATURES_KEY] is not None:
            features = f"{_text(layer[FEATURES_KEY])} along dim {layer[FEATURE_DIM_KEY]}"
        print(f"  {layer['name']}")
        print(f"    hook_state:    {layer['hook_state']}")
        print(f"    strategies:    {strategies}")
        print(f"    sparse_config: {_text(layer[SPARSE_CONFIG_KEY])}")
        print(f"    features:      {features}")
        threshold = layer["threshold"]
        if threshold is None:
            print(f"    mask:          {_summarise(layer['mask'])}")
        else:
            result = ThresholdResult(**threshold)
            reach = (
                ""
                if result.reachable
                else ", unreachable: the zeros alone exceed the target"
                if result.zeros_exceed_target
                else ", unreachable: many inputs share the magnitude at the target"
            )
            print(
                f"    threshold:     {threshold['threshold']:.6g} (target "
                f"{threshold['target']:.4g}, expected sparsity "
                f"{threshold['expected_sparsity']:.4g}{reach})"
            )
            if layer["offset"] is not None:
                print(f"    offset:        {_summarise(layer['offset'])} (compensates the zeros)")
        print(f"    data:          {_summarise(layer['data'])}")


def run(args: argparse.Namespace) -> int:
    serialize = _import_serialize()
    path: Path = args.file
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        file_format = serialize.detect_format(head, source=path)
        state_dict = serialize.load(path, format=file_format)
    except OSError as exc:
        raise CommandError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    report = _describe_state(path, state_dict, file_format, serialize)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspection(report)
    return 0
