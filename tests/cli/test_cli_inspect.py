"""``actsparse inspect FILE``: what a state file holds, and a one-line error for a bad file."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import _bombs
import pytest
import torch
from _seed import run_seed_workflow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import actsparse.serialize as serialize
import actsparse.serialize._formats as formats
from actsparse import cli
from actsparse.core import SerializationError
from actsparse.hooks import STATE_FORMAT_VERSION, ActivationSparsifier


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = run(["inspect", "--json", str(path)], capsys)
    assert code == 0, err
    assert err == ""

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    report: dict[str, Any] = json.loads(out, parse_constant=refuse)
    return report


def zeros_of(mask: torch.Tensor | list[torch.Tensor]) -> tuple[int, int]:
    masks = mask if isinstance(mask, list) else [mask]
    return sum(int((m == 0).sum()) for m in masks), sum(m.numel() for m in masks)


def small_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def small_sparsifier(model: nn.Sequential, level: float = 0.5) -> ActivationSparsifier:
    sparsifier = ActivationSparsifier(
        model, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=level
    )
    sparsifier.register_layer(model[2])
    sparsifier.register_layer(model[4], features=[0, [1, 3]], feature_dim=1, sparsity_level=0.25)
    return sparsifier


def feed(model: nn.Module, batches: int = 3) -> None:
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(5, 6))


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1
    assert out == ""
    assert err.startswith("actsparse inspect: error: ")
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# ------------------------------------------------------------------ every point of the workflow


@pytest.fixture
def seed_file(tmp_path: Path) -> tuple[Path, ActivationSparsifier]:
    _, sparsifier = run_seed_workflow(batches=2, batch_size=4)
    return serialize.save(sparsifier, tmp_path / "seed.safetensors"), sparsifier


def test_text_report_of_the_seed_workflow(
    seed_file: tuple[Path, ActivationSparsifier], capsys: pytest.CaptureFixture[str]
) -> None:
    path, sparsifier = seed_file
    code, out, err = run(["inspect", str(path)], capsys)
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"file: {path} ({path.stat().st_size:,} bytes)"
    assert lines[1] == (
        f"format: safetensors, file format version {serialize.FORMAT_VERSION}, "
        f"state format_version {STATE_FORMAT_VERSION}"
    )
    assert lines[2] == (
        "defaults: aggregate_fn=sum, reduce_fn=mean, mask_fn=magnitude, "
        'sparse_config={"sparsity_level": 0.5}'
    )
    assert "mid-calibration data: none" in lines
    assert "layers: 4" in lines
    for name in ("conv1", "linear1", "identity1", "identity2"):
        block = lines[lines.index(f"  {name}") :][:7]
        assert block[1] == "    hook_state:    sparsify"
        assert block[2] == "    strategies:    aggregate_fn=sum, reduce_fn=mean, mask_fn=magnitude"
        zeros, numel = zeros_of(sparsifier.get_mask(name))
        assert f"({zeros:,} of {numel:,})" in block[5]
        assert block[6] == "    data:          none"
    conv1 = lines[lines.index("  conv1") :]
    assert conv1[3] == '    sparse_config: {"sparsity_level": 0.3}'
    assert conv1[4] == "    features:      none"
    assert conv1[5].startswith("    mask:          (1, 28, 28) float32, 30.0% zeros")
    linear1 = lines[lines.index("  linear1") :]
    assert linear1[4] == "    features:      [0, 10, 234] along dim 1"
    assert linear1[5].startswith("    mask:          3 features: [(1,), (1,), (1,)] float32")


def test_json_report_of_the_seed_workflow(
    seed_file: tuple[Path, ActivationSparsifier], capsys: pytest.CaptureFixture[str]
) -> None:
    path, sparsifier = seed_file
    report = inspect_json(path, capsys)
    assert report["file"] == str(path)
    assert report["size_bytes"] == path.stat().st_size
    assert report["format"] == "safetensors"
    assert report["file_format_version"] == serialize.FORMAT_VERSION
    assert report["state_format_version"] == STATE_FORMAT_VERSION
    assert report["calibration_data"] is False
    assert report["defaults"]["mask_fn"] == "magnitude"
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert list(layers) == list(sparsifier.data_groups)
    for name, layer in layers.items():
        group = sparsifier.data_groups[name]
        assert layer["hook_state"] == "sparsify"
        assert layer["sparse_config"] == group["sparse_config"]
        assert layer["features"] == group["features"]
        assert layer["feature_dim"] == group["feature_dim"]
        assert layer["data"] is None
        mask = sparsifier.get_mask(name)
        infos = layer["mask"] if isinstance(mask, list) else [layer["mask"]]
        for info, tensor in zip(infos, mask if isinstance(mask, list) else [mask], strict=True):
            assert info["shape"] == list(tensor.shape)
            assert info["dtype"] == "float32"
            assert info["zeros"] == int((tensor == 0).sum())
            assert info["numel"] == tensor.numel()
            assert info["sparsity"] == pytest.approx(info["zeros"] / info["numel"])


def test_after_registration_no_mask_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = small_model()
    path = serialize.save(small_sparsifier(model), tmp_path / "fresh.safetensors")
    report = inspect_json(path, capsys)
    assert [layer["hook_state"] for layer in report["layers"]] == ["aggregate", "aggregate"]
    assert [layer["mask"] for layer in report["layers"]] == [None, None]
    assert report["calibration_data"] is False
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert out.count("    mask:          none") == 2


def test_mid_calibration_data_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model()
    sparsifier = small_sparsifier(model)
    feed(model)
    path = serialize.save(sparsifier, tmp_path / "mid.safetensors")
    report = inspect_json(path, capsys)
    assert report["calibration_data"] is True
    first, second = report["layers"]
    assert first["hook_state"] == "aggregate"
    assert first["data"]["shape"] == list(sparsifier.data_groups["2"]["data"].shape)
    # per-feature data: one entry per feature, each the width of its slice
    assert [info["shape"][1] for info in second["data"]] == [1, 2]
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "mid-calibration data: present" in out
    assert "    data:          2 features: [" in out


@pytest.mark.parametrize("squash", [False, True])
def test_after_step_and_after_squash(
    squash: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model()
    sparsifier = small_sparsifier(model)
    feed(model)
    sparsifier.step()
    if squash:
        sparsifier.squash_mask()
    path = serialize.save(sparsifier, tmp_path / "stepped.safetensors")
    report = inspect_json(path, capsys)
    expected = "sparsify" if squash else "aggregate"
    assert [layer["hook_state"] for layer in report["layers"]] == [expected, expected]
    assert report["calibration_data"] is False
    first, second = report["layers"]
    assert (first["mask"]["zeros"], first["mask"]["numel"]) == zeros_of(sparsifier.get_mask("2"))
    assert first["sparse_config"] == {"sparsity_level": 0.5}
    assert second["sparse_config"] == {"sparsity_level": 0.25}
    assert second["features"] == [0, [1, 3]]
    assert second["feature_dim"] == 1
    masks = sparsifier.get_mask("4")
    assert isinstance(masks, list)
    assert [info["zeros"] for info in second["mask"]] == [int((m == 0).sum()) for m in masks]


def test_torch_format_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = small_model()
    sparsifier = small_sparsifier(model)
    feed(model)
    sparsifier.step()
    path = serialize.save(sparsifier, tmp_path / "state.pt")
    report = inspect_json(path, capsys)
    assert report["format"] == "torch"
    assert report["layers"][0]["mask"]["numel"] == 8
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert out.splitlines()[1].startswith("format: torch, file format version 1")


def test_a_torch_ao_state_dict_has_no_format_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model()
    sparsifier = small_sparsifier(model)
    feed(model)
    sparsifier.step()
    state = serialize.to_torch_ao(sparsifier.state_dict())
    state.pop("format_version", None)
    path = serialize.save(state, tmp_path / "ao.safetensors")
    report = inspect_json(path, capsys)
    assert report["state_format_version"] is None
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "state format_version absent (a torch.ao-style state dict)" in out


def test_json_stays_strict_for_odd_config_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # values that a file can hold but JSON cannot, written straight into the state dict
    state = small_sparsifier(small_model()).state_dict()
    state["data_groups"]["2"]["mask_fn"] = None
    state["data_groups"]["2"]["sparse_config"] = {
        "odd": (1, 2),
        "scale": math.nan,
        "cap": math.inf,
        "kind": torch.float16,
        "table": {3: "x"},
    }
    path = serialize.save(state, tmp_path / "odd.safetensors")
    report = inspect_json(path, capsys)
    config = report["layers"][0]["sparse_config"]
    assert config == {
        "odd": [1, 2],
        "scale": "nan",
        "cap": "inf",
        "kind": "float16",
        "table": {"3": "x"},
    }
    assert report["layers"][0]["mask_fn"] is None
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "mask_fn=none" in out


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mask=st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200),
    bools=st.booleans(),
)
def test_reported_sparsity_counts_the_zeros(
    mask: list[float], bools: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensor = torch.tensor(mask, dtype=torch.bool if bools else torch.float32)
    state = small_sparsifier(small_model()).state_dict()
    state["state"]["2"]["mask"] = tensor
    path = serialize.save(state, tmp_path / "prop.safetensors")
    info = inspect_json(path, capsys)["layers"][0]["mask"]
    assert info["zeros"] == mask.count(0.0)
    assert info["numel"] == len(mask)
    assert info["dtype"] == ("bool" if bools else "float32")


# ------------------------------------------------------------------ bad files


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.safetensors"
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path), "No such file or directory")


def test_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["inspect", str(tmp_path)], capsys)
    assert_one_line_error(code, out, err, str(tmp_path), "cannot read")


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(
    keep: int, seed_file: tuple[Path, ActivationSparsifier], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = seed_file
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path))


def test_truncated_torch_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, sparsifier = run_seed_workflow(batches=1, batch_size=2)
    path = serialize.save(sparsifier, tmp_path / "cut.pt")
    path.write_bytes(path.read_bytes()[:-200])
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path))


@pytest.mark.parametrize(
    "content", [b"", b"hello, world\n", b"\x00" * 64, b"PK\x03\x04 not really a zip"]
)
def test_not_a_state_file(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path))


def test_someone_elses_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.ones(3)}, str(path))
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path), "not an actsparse state file")


def test_a_torch_file_of_something_else(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.pt"
    torch.save(small_model().state_dict(), path)
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path), "not an actsparse torch-style file")


def test_unknown_file_format_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "future.safetensors"
    save_file(
        {"x": torch.zeros(1)},
        str(path),
        metadata={"format": "actsparse", "format_version": "99", "state": "{}", "checksum": "-"},
    )
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path), "unknown format version '99'")


def test_unknown_state_format_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = small_sparsifier(small_model()).state_dict()
    state["format_version"] = STATE_FORMAT_VERSION + 1
    with pytest.raises(SerializationError, match="unknown state format_version 2"):
        serialize.save(state, tmp_path / "refused.safetensors")  # never written by save()
    # A file from a newer actsparse: a valid file whose state names the next version.
    doc, tensors = formats.unpack(
        serialize.save(small_sparsifier(small_model()), tmp_path / "v1.st").read_bytes()
    )
    doc["format_version"] = STATE_FORMAT_VERSION + 1
    path = tmp_path / "newer.safetensors"
    path.write_bytes(formats.pack(doc, tensors))
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(
        code, out, err, str(path), f"unknown state format_version {STATE_FORMAT_VERSION + 1}"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda sd: sd.update(data_groups=[1, 2]),
            "state_dict['data_groups'] must be a mapping, got list",
        ),
        (lambda sd: sd.pop("defaults"), "the state dict lacks the key(s) 'defaults'"),
        (
            lambda sd: sd["data_groups"].update({"2": "x"}),
            "data_groups['2'] must be a mapping, got str",
        ),
        (lambda sd: sd["state"].update({"2": 7}), "state['2'] must be a mapping, got int"),
        (
            lambda sd: sd["state"].update({"2": {"mask": "m"}}),
            "state['2']['mask'] must be None, a tensor or a list of tensors, got str",
        ),
        (
            lambda sd: sd["data_groups"]["2"].update(data=[torch.ones(1), 3]),
            "data_groups['2']['data'][1] is of type int",
        ),
    ],
)
def test_a_state_of_the_wrong_shape(
    change: Any,
    message: str,
    seed_file: tuple[Path, ActivationSparsifier],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # actsparse.serialize neither writes nor reads such states; inspect checks anyway
    path, _ = seed_file
    state = small_sparsifier(small_model()).state_dict()
    change(state)
    monkeypatch.setattr(serialize, "load", lambda *args, **kwargs: state)
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, str(path), "not a sparsifier state", message)


def test_a_state_that_is_not_a_dict(
    seed_file: tuple[Path, ActivationSparsifier],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = seed_file
    monkeypatch.setattr(serialize, "load", lambda *args, **kwargs: [1, 2])
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(
        code, out, err, str(path), "a sparsifier state dict must be a mapping, got list"
    )


def test_without_actsparse_serialize(
    seed_file: tuple[Path, ActivationSparsifier],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = seed_file
    monkeypatch.setitem(sys.modules, "actsparse.serialize", None)
    code, out, err = run(["inspect", str(path)], capsys)
    assert_one_line_error(code, out, err, "pip install actsparse-serialize")


def test_file_argument_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["inspect"], capsys)
    assert code == 2
    assert "the following arguments are required: FILE" in err


# ------------------------------------------------------------------ as a program


def test_python_m_actsparse_cli_is_the_actsparse_command(
    seed_file: tuple[Path, ActivationSparsifier], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = seed_file
    _, expected, _ = run(["inspect", str(path)], capsys)
    script = shutil.which("actsparse", path=sysconfig.get_path("scripts"))
    assert script is not None, "the actsparse console script is not installed"
    for argv in (
        [sys.executable, "-m", "actsparse.cli", "inspect", str(path)],
        [script, "inspect", str(path)],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout == expected
    bad = subprocess.run(
        [sys.executable, "-m", "actsparse.cli", "inspect", str(path.with_name("absent"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("actsparse inspect: error: cannot read")


def test_threshold_layers_show_their_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = small_model()
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layer(model[0], sparsity_level=0.4)
    with torch.no_grad():
        model(torch.randn(64, 6))
    sparsifier.step()
    path = serialize.save(sparsifier, tmp_path / "threshold.safetensors")
    report = inspect_json(path, capsys)
    (layer,) = report["layers"]
    assert layer["mask"] is None
    assert layer["threshold"] == sparsifier.thresholds["0"].to_dict()
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    expected = sparsifier.thresholds["0"]
    assert f"threshold:     {expected.threshold:.6g} (target 0.4, expected sparsity" in out
    assert "unreachable" not in out
    assert "mask:" not in out.split("features:", 1)[1]


# ------------------------------------------------- files that stand for far more


@pytest.mark.parametrize("case", _bombs.MASK_BOMBS)
def test_a_1_kb_file_that_declares_1e8_mask_elements_is_one_line_in_bounded_memory(
    tmp_path: Path, case: str
) -> None:
    """Once 1.2 GiB of resident memory to inspect a run-length mask of 792 bytes."""
    path = tmp_path / f"{case}.bin"
    path.write_bytes(_bombs.mask_bomb(case))
    result = _bombs.measure("inspect", path)
    assert result["growth"] < _bombs.GROWTH_LIMIT, result
    assert result["kind"] == "exit 1", result
    assert_one_line_error(1, "", result["message"], str(path))
    if case != "torch-coo":  # a sparse tensor in a torch file is refused as such
        assert f"declares {_bombs.DECLARED} elements" in result["message"]
        assert f"ACTSPARSE_MAX_ELEMENTS={_bombs.DECLARED}" in result["message"]


def test_a_deflate_bomb_is_one_line_in_bounded_memory(tmp_path: Path) -> None:
    path = _bombs.write_deflate_bomb(tmp_path / "bomb.pt")
    result = _bombs.measure("inspect", path)
    assert result["growth"] < _bombs.GROWTH_LIMIT, result
    assert result["kind"] == "exit 1", result
    assert_one_line_error(1, "", result["message"], f"{path}: zip member 'bomb/data/0' declares")


def test_a_mask_of_2_23_elements_in_a_small_file_is_inspected_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """The most that a small file may declare: counting its zeros copies nothing."""
    path = tmp_path / "rle.safetensors"
    path.write_bytes(_bombs.mask_bomb("rle", elements=2**23, dtype="bool"))
    result = _bombs.measure("inspect", path)
    assert result["kind"] == "exit 0", result
    assert result["growth"] < 2**23 + 32 * 2**20, result  # the mask's bytes, and a little
