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
import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import _bombs
import pytest
import torch
from _bombs import full_state, signed_with_mask, small_model, stepped, torch_file_with
from _support import same_state

import actsparse.serialize as serialize
from actsparse.core import ConfigError, SerializationError
from actsparse.hooks import ActivationSparsifier
from actsparse.serialize._formats import (
    pack,
    pack_text,
    torch_dumps,
    unpack,
)
from actsparse.serialize._limits import MIN_FILE_ELEMENTS

#: The address space a child may use after importing torch and actsparse.
ADDRESS_SPACE = 1536 * 1024 * 1024
#: How much a child's peak resident memory may grow while it refuses a file.
RSS_GROWTH = 200 * 1024 * 1024

posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, sockets and /dev/zero")

CHILD_PRELUDE = """
import json, os, resource, sys, time
import torch
from torch import nn
import actsparse.serialize as serialize
from actsparse.core import ActsparseError, SerializationError
from actsparse.hooks import ActivationSparsifier


def peak_rss():
    # VmHWM, not ru_maxrss: after exec, ru_maxrss starts from the parent's resident size,
    # which would hide as much growth as pytest holds
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

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


def many_masks(records: list[tuple[dict[str, Any], torch.Tensor | None]]) -> bytes:
    """A signed file of bare layers, one per mask record (stored tensors beside them)."""
    state: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i, (record, stored) in enumerate(records):
        mask = dict(record)
        if stored is not None:
            mask["tensor"] = f"state/l{i}/mask"
            tensors[mask["tensor"]] = stored
        state[f"l{i}"] = {"mask": {"$mask": mask}}
    return pack({"state": state, "data_groups": {}, "defaults": {}}, tensors)


# ------------------------------------------ 1: sparse tensors in a torch file


def _bad_coo(index: int, *, size: tuple[int, ...] = (4,)) -> torch.Tensor:
    indices = torch.tensor([[0]] * (len(size) - 1) + [[index]])  # one entry, last dim bad
    return torch.sparse_coo_tensor(
        indices,
        torch.ones(1),
        size,
        check_invariants=False,
        is_coalesced=True,  # to_dense() then writes without looking
    )


HOSTILE_SPARSE = {
    "far-out-of-range": lambda: _bad_coo(10**8),
    "just-out-of-range": lambda: _bad_coo(9),
    "negative": lambda: _bad_coo(-3),
    "out-of-range-2d": lambda: _bad_coo(900_000, size=(2, 3)),
    "csr-out-of-range": lambda: torch.sparse_csr_tensor(
        torch.tensor([0, 1]), torch.tensor([10**6]), torch.ones(1), (1, 4), check_invariants=False
    ),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")  # torch's note
@pytest.mark.parametrize("case", list(HOSTILE_SPARSE))
def test_a_torch_file_with_an_out_of_range_sparse_mask_is_refused_and_the_process_lives(
    tmp_path: Path, case: str
) -> None:
    state = full_state({"a": {"mask": HOSTILE_SPARSE[case]()}})
    path = tmp_path / "bad.pt"
    path.write_bytes(torch_file_with(state))
    assert path.stat().st_size < 4096
    result = child_results(
        """
        print(json.dumps(attempt(lambda: serialize.load(sys.argv[1]))))
        """,
        str(path),
    )
    assert result["kind"] == "SerializationError", result
    assert "bad.pt" in result["message"]


@pytest.mark.parametrize("case", list(HOSTILE_SPARSE)[:4])
def test_an_out_of_range_sparse_mask_in_memory_is_refused_before_to_dense(
    tmp_path: Path, case: str
) -> None:
    """torch.ao's state-dict shape holds COO masks: every conversion checks them first."""
    path = tmp_path / "bad.pt"
    state = full_state({"0": {"mask": HOSTILE_SPARSE[case]()}})
    torch.save(state, path)
    result = child_results(
        """
        state = torch.load(sys.argv[1], weights_only=True)
        target = os.path.join(os.path.dirname(sys.argv[1]), "out.safetensors")
        results = {
            "save": attempt(lambda: serialize.save(state, target)),
            "save-torch": attempt(lambda: serialize.save(state, target + ".pt")),
            "from_torch_ao": attempt(lambda: serialize.from_torch_ao(state)),
            "dense_masks": attempt(lambda: serialize.dense_masks(state["state"])),
        }
        net = model()
        sparsifier = ActivationSparsifier(
            net, aggregate_fn="sum", reduce_fn="mean", mask_fn="magnitude", sparsity_level=0.5
        )
        sparsifier.register_layer(net[0])
        with torch.no_grad():
            net(torch.randn(4, 6))
        sparsifier.step()
        own = sparsifier.state_dict()
        own["state"]["0"]["mask"] = state["state"]["0"]["mask"]
        fresh = ActivationSparsifier(model())
        results["load_state_dict"] = attempt(lambda: fresh.load_state_dict(own))
        results["written"] = sorted(os.listdir(os.path.dirname(sys.argv[1])))
        print(json.dumps(results))
        """,
        str(path),
    )
    assert result.pop("written") == ["bad.pt"]
    for call, outcome in result.items():
        assert outcome["kind"] == "SerializationError", (call, outcome)
        assert "state['0']['mask']" in outcome["message"], (call, outcome)


def test_a_valid_sparse_mask_still_converts() -> None:
    dense = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    back = serialize.from_sparse_coo(serialize.to_sparse_coo(dense))
    assert same_state(back, dense)
    uncoalesced = torch.sparse_coo_tensor(torch.tensor([[1, 0]]), torch.ones(2), (3,))
    assert same_state(serialize.from_sparse_coo(uncoalesced), torch.tensor([1.0, 1.0, 0.0]))


def test_a_torch_file_holds_dense_tensors_only(tmp_path: Path) -> None:
    """A sparse tensor that passes torch's checks is refused too, before the checksum."""
    mask = torch.tensor([1.0, 0.0, 1.0]).to_sparse_coo()
    state = full_state({"a": {"mask": mask}})
    path = tmp_path / "sparse.pt"
    path.write_bytes(torch_file_with(state))
    with pytest.raises(SerializationError, match=r"state_dict/state/a/mask.*sparse_coo"):
        serialize.load(path)


# ------------------------------------------ 2: small files, large allocations


def test_the_header_length_is_checked_before_the_file_is_read(tmp_path: Path) -> None:
    """A 3 GiB file of holes behind an 8-byte length: refused from its first 8 bytes."""
    path = tmp_path / "holes.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 3 << 30))
        fh.truncate((3 << 30) + 8)
    result = child_results(
        """
        base = peak_rss()
        limit_address_space(int(sys.argv[2]))
        outcome = attempt(lambda: serialize.load(sys.argv[1]))
        outcome["growth"] = peak_rss() - base
        print(json.dumps(outcome))
        """,
        str(path),
        str(ADDRESS_SPACE),
    )
    assert result["kind"] == "SerializationError", result
    assert "16777216" in result["message"]
    assert result["growth"] < RSS_GROWTH


def test_tensors_declared_beyond_the_cap_are_refused_before_the_body_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header that covers a huge (sparse) body with one tensor: the body is never read."""
    count = serialize.DEFAULT_MAX_ELEMENTS + 8
    state = {"state": {}, "data_groups": {}, "defaults": {}, "big": {"$tensor": "big"}}
    header = {
        "__metadata__": {
            "format": "actsparse",
            "format_version": "1",
            "state": json.dumps(state),
            "checksum": "sha256:" + "0" * 64,  # never reached: the body is never read
        },
        "big": {"dtype": "U8", "shape": [count], "data_offsets": [0, count]},
    }
    text = json.dumps(header).encode()
    path = tmp_path / "body.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + count)
    reads: list[int] = []
    real_read = serialize._files._read_into  # type: ignore[attr-defined]

    def spy(fh: Any, view: memoryview) -> None:
        reads.append(len(view))
        real_read(fh, view)

    monkeypatch.setattr(serialize._files, "_read_into", spy)
    with pytest.raises(SerializationError, match=r"more than the \d+ allowed"):
        serialize.load(path)
    assert sum(reads) < 1 << 20, reads


def _cap_exceeding_records() -> dict[str, bytes]:
    """Files under 1 KiB whose masks declare far more elements than the cap."""
    big = 2**31 - 1
    each = 10**8
    return {
        "one-constant-2**31-1": many_masks(
            [({"encoding": "constant", "value": 1, "dtype": "float32", "shape": [big]}, None)]
        ),
        "five-constants-1e8": many_masks(
            [({"encoding": "constant", "value": 0, "dtype": "float64", "shape": [each]}, None)] * 5
        ),
        "coo-without-indices": many_masks(
            [
                (
                    {"encoding": "coo", "fill": 1, "dtype": "float32", "shape": [big]},
                    torch.zeros(0, dtype=torch.int64),
                )
            ]
        ),
        "rle-one-run": many_masks(
            [
                (
                    {"encoding": "rle", "first": 1, "dtype": "float32", "shape": [each]},
                    torch.tensor([each], dtype=torch.int32),
                )
            ]
            * 3
        ),
        "bitpack-under-each-cap": many_masks(
            [
                (
                    {"encoding": "bitpack", "dtype": "float32", "shape": [2**20, 64]},
                    torch.zeros(2**23, dtype=torch.uint8),
                )
            ]
            * 5
        ),
    }


def test_mask_records_beyond_the_files_element_cap_are_refused_in_bounded_memory(
    tmp_path: Path,
) -> None:
    files = _cap_exceeding_records()
    paths = []
    for name, data in files.items():
        if not name.startswith("bitpack"):
            assert len(data) < 1024, (name, len(data))
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        paths.append(str(path))
    control = serialize.save(stepped(small_model()), tmp_path / "control.safetensors")
    results = child_results(
        """
        limit_address_space(int(sys.argv[1]))
        out = {"control": attempt(lambda: serialize.load_into(
            ActivationSparsifier(model()), sys.argv[2]))}
        for path in sys.argv[3:]:
            base = peak_rss()
            outcome = attempt(lambda: serialize.load(path))
            outcome["growth"] = peak_rss() - base
            out[os.path.basename(path)] = outcome
        print(json.dumps(out))
        """,
        str(ADDRESS_SPACE),
        str(control),
        *paths,
    )
    assert results.pop("control")["kind"] == "loaded"
    for name, outcome in results.items():
        assert outcome["kind"] == "SerializationError", (name, outcome)
        assert "ACTSPARSE_MAX_ELEMENTS" in outcome["message"], (name, outcome)
        assert outcome["growth"] < RSS_GROWTH, (name, outcome)
        assert outcome["seconds"] < 5, (name, outcome)


def test_load_into_a_constant_mask_of_2_31_elements(tmp_path: Path) -> None:
    """696 bytes that once took 6.4 GB and 17 s in load_state_dict."""
    record = {"encoding": "constant", "value": 1, "dtype": "float32", "shape": [2**31 - 1]}
    path = tmp_path / "constant.safetensors"
    path.write_bytes(signed_with_mask(record))
    assert path.stat().st_size < 1024
    result = child_results(
        """
        limit_address_space(int(sys.argv[2]))
        base = peak_rss()
        outcome = attempt(lambda: serialize.load_into(ActivationSparsifier(model()), sys.argv[1]))
        outcome["growth"] = peak_rss() - base
        print(json.dumps(outcome))
        """,
        str(path),
        str(ADDRESS_SPACE),
    )
    assert result["kind"] == "SerializationError", result
    assert "max_elements" in result["message"]
    assert result["growth"] < RSS_GROWTH
    assert result["seconds"] < 5


def _element_count_file(tmp_path: Path) -> tuple[Path, int]:
    """A file whose one mask has 6 elements (its stored bits are not counted again)."""
    path = serialize.save(stepped(small_model()), tmp_path / "s.safetensors")
    return path, 6


def test_the_element_cap_is_a_keyword_of_load_and_load_into(tmp_path: Path) -> None:
    path, count = _element_count_file(tmp_path)
    torch_path = serialize.save(serialize.load(path), tmp_path / "s.pt")
    for target in (path, torch_path):
        assert serialize.load(target, max_elements=count)["state"]["0"]["mask"].numel() == count
        with pytest.raises(SerializationError, match=rf"declares {count} elements, more than"):
            serialize.load(target, max_elements=count - 1)
        sparsifier = ActivationSparsifier(small_model())
        with pytest.raises(SerializationError, match="max_elements"):
            serialize.load_into(sparsifier, target, max_elements=count - 1)
        assert dict(sparsifier.data_groups) == {}
        serialize.load_into(sparsifier, target, max_elements=count)


def test_the_element_cap_reads_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, count = _element_count_file(tmp_path)
    monkeypatch.setenv(serialize.MAX_ELEMENTS_ENV_VAR, str(count - 1))
    with pytest.raises(SerializationError, match=serialize.MAX_ELEMENTS_ENV_VAR):
        serialize.load(path)
    # the keyword wins over the environment
    assert serialize.load(path, max_elements=count)["state"]["0"]["mask"].numel() == count
    monkeypatch.setenv(serialize.MAX_ELEMENTS_ENV_VAR, " 1_000 ")
    serialize.load(path)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_a_bad_element_cap_is_a_config_error(tmp_path: Path, bad: Any) -> None:
    path, _ = _element_count_file(tmp_path)
    with pytest.raises(ConfigError, match="max_elements"):
        serialize.load(path, max_elements=bad)


@pytest.mark.parametrize("bad", ["", "lots", "0", "-5", "1e9"])
def test_a_bad_element_cap_in_the_environment_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    path, _ = _element_count_file(tmp_path)
    monkeypatch.setenv(serialize.MAX_ELEMENTS_ENV_VAR, bad)
    with pytest.raises(ConfigError, match=serialize.MAX_ELEMENTS_ENV_VAR):
        serialize.load(path)


def _deflated(data: bytes) -> bytes:
    """``data`` (a zip) rewritten with every member deflated."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return out.getvalue()


def _declare_size(data: bytes, member_suffix: str, size: int) -> bytes:
    """Make a zip's local and central headers claim ``size`` uncompressed bytes for a member."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    struct.pack_into("<I", buf, info.header_offset + 22, size)
    position = buf.find(b"PK\x01\x02")
    while position != -1:
        name_length, extra, comment = struct.unpack_from("<HHH", buf, position + 28)
        if bytes(buf[position + 46 : position + 46 + name_length]) == info.filename.encode():
            struct.pack_into("<I", buf, position + 24, size)
            return bytes(buf)
        position = buf.find(b"PK\x01\x02", position + 46 + name_length + extra + comment)
    raise AssertionError(f"no central directory entry for {info.filename}")


def _torch_state_with_a_big_mask(elements: int) -> bytes:
    """A signed torch-format file whose mask holds ``elements`` float64 zeros."""
    mask = torch.zeros(elements, dtype=torch.float64)
    state = full_state({"0": {"mask": mask}})
    return torch_dumps(state)


def test_a_deflated_torch_file_is_checked_against_its_declared_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _deflated(_torch_state_with_a_big_mask(2**22))  # 32 MiB of zeros
    path = tmp_path / "bomb.pt"
    path.write_bytes(data)
    assert len(data) < 256 * 1024
    # a valid, deflated file loads when the cap allows it
    assert serialize.load(path, max_elements=2**22)["state"]["0"]["mask"].numel() == 2**22
    calls: list[Any] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(SerializationError, match=r"uncompressed.*more than"):
        serialize.load(path, max_elements=2**20)
    assert calls == [], "torch.load ran before the declared sizes were checked"


def test_a_zip_member_that_declares_gigabytes_is_refused_before_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _torch_state_with_a_big_mask(16)
    path = tmp_path / "liar.pt"
    path.write_bytes(_declare_size(data, "data.pkl", 3_900_000_000))
    calls: list[Any] = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(SerializationError, match=r"data\.pkl.*3900000000"):
        serialize.load(path)
    path.write_bytes(_declare_size(data, "data/0", 3_900_000_000))
    with pytest.raises(SerializationError, match=r"data/0.*3900000000"):
        serialize.load(path)
    assert calls == []


def test_a_torch_file_of_stride_0_tensors_is_counted_by_elements(tmp_path: Path) -> None:
    """One stored value viewed as 2**31 - 1: a tiny file, a huge tensor after torch.load."""
    view = torch.ones(1).expand(2**31 - 1)
    state = full_state({"0": {"mask": view}})
    path = tmp_path / "view.pt"
    path.write_bytes(torch_file_with(state))
    assert path.stat().st_size < 4096
    result = child_results(
        """
        limit_address_space(int(sys.argv[2]))
        base = peak_rss()
        outcome = attempt(lambda: serialize.load(sys.argv[1]))
        outcome["growth"] = peak_rss() - base
        print(json.dumps(outcome))
        """,
        str(path),
        str(ADDRESS_SPACE),
    )
    assert result["kind"] == "SerializationError", result
    assert "ACTSPARSE_MAX_ELEMENTS" in result["message"]
    assert result["growth"] < RSS_GROWTH


def test_a_deflated_member_that_claims_4_gib_in_bounded_memory(tmp_path: Path) -> None:
    """A deflated storage whose headers claim 4 GiB, under RLIMIT_AS: refused from the claim."""
    data = _declare_size(_deflated(_torch_state_with_a_big_mask(2**22)), "data/0", 2**32 - 1)
    path = tmp_path / "bomb.pt"
    path.write_bytes(data)
    result = child_results(
        """
        limit_address_space(int(sys.argv[2]))
        base = peak_rss()
        outcome = attempt(lambda: serialize.load(sys.argv[1]))
        outcome["growth"] = peak_rss() - base
        print(json.dumps(outcome))
        """,
        str(path),
        str(ADDRESS_SPACE),
    )
    assert result["kind"] == "SerializationError", result
    assert "uncompressed" in result["message"]
    assert result["growth"] < RSS_GROWTH


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


# ------------------------- 8: masks that declare 1e8 elements in 1 KB, deflate bombs


@pytest.mark.parametrize("action", ["load", "load_into"])
@pytest.mark.parametrize("case", _bombs.MASK_BOMBS)
def test_a_1_kb_file_that_declares_1e8_mask_elements_is_refused_in_bounded_memory(
    tmp_path: Path, case: str, action: str
) -> None:
    """Once 864 MiB of resident memory for a run-length mask of 792 bytes."""
    path = tmp_path / f"{case}.bin"
    path.write_bytes(_bombs.mask_bomb(case))
    assert path.stat().st_size < 4096
    result = _bombs.measure(action, path)
    assert result["growth"] < _bombs.GROWTH_LIMIT, result
    assert result["kind"] == "SerializationError", result
    message = result["message"]
    assert str(path) in message, message
    assert "\n" not in message, message
    if case != "torch-coo":  # a sparse tensor in a torch file is refused as such
        assert f"declares {_bombs.DECLARED} elements" in message, message
        assert f"for a file of {path.stat().st_size} bytes" in message, message
        assert f"max_elements={_bombs.DECLARED}" in message, message


def test_a_deflate_bomb_is_refused_from_its_central_directory(tmp_path: Path) -> None:
    """A deflated storage of 256 MiB in a file of 256 KB: refused before anything inflates."""
    path = _bombs.write_deflate_bomb(tmp_path / "bomb.pt")
    assert path.stat().st_size < 1 << 20
    result = _bombs.measure("load", path)
    assert result["growth"] < _bombs.GROWTH_LIMIT, result
    assert result["kind"] == "SerializationError", result
    message = result["message"]
    assert "\n" not in message, message
    assert f"{path}: zip member 'bomb/data/0' declares {_bombs.BOMB_ELEMENTS * 8}" in message
    assert "uncompressed bytes" in message
    assert "unless max_elements is set" in message


@pytest.mark.parametrize("action", ["load", "inspect"])
def test_a_1_mb_pickle_of_a_million_objects_is_refused_before_it_is_unpickled(
    tmp_path: Path, action: str
) -> None:
    """Once hundreds of MiB for a stored file of 1 MB: each byte of pickle built a list."""
    path = tmp_path / "structure.pt"
    path.write_bytes(_bombs.structure_bomb())
    assert path.stat().st_size <= 1 << 20
    result = _bombs.measure(action, path)
    assert result["growth"] < _bombs.GROWTH_LIMIT, result
    message = result["message"].strip()
    assert "\n" not in message, message
    assert f"{path}: zip member" in message, message
    assert "pickled state of more than 524288 operations" in message, message


def test_a_state_that_actsparse_writes_is_far_below_the_pickle_bound(tmp_path: Path) -> None:
    import pickletools

    from actsparse.serialize._formats import MAX_PICKLE_OPS

    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(64)))
    sparsifier = ActivationSparsifier(
        model, "abs_histogram", "identity", "target_threshold", sparsity_level=0.5
    )
    sparsifier.register_layers({torch.nn.Linear: {}})
    with torch.no_grad():
        model(torch.randn(64, 8))
    sparsifier.step()
    path = serialize.save(sparsifier, tmp_path / "many.pt")
    with zipfile.ZipFile(path) as archive:
        (pickled,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        ops = sum(1 for _ in pickletools.genops(archive.read(pickled)))
    assert ops * 64 < MAX_PICKLE_OPS  # room for thousands of layers
    assert serialize.load(path)["state"].keys() == sparsifier.state_dict()["state"].keys()


def test_a_cap_that_someone_sets_lifts_the_pickle_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "structure.pt"
    path.write_bytes(_bombs.structure_bomb(lists=600_000))
    with pytest.raises(SerializationError, match="524288 operations"):
        serialize.load(path)
    monkeypatch.setenv("ACTSPARSE_MAX_ELEMENTS", str(2**28))
    with pytest.raises(SerializationError) as info:  # read, and refused for what it holds
        serialize.load(path)
    assert "operations" not in str(info.value)


@pytest.mark.parametrize("case", ["rle", "coo", "torch-view"])
def test_a_small_file_may_declare_2_23_elements_and_a_cap_lifts_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The bound from a file's size has a floor, and a cap that someone sets replaces it."""
    floor = MIN_FILE_ELEMENTS

    def write(elements: int) -> Path:
        path = tmp_path / f"{case}-{elements}.bin"
        if case == "torch-view":
            view = torch.ones(1, dtype=torch.bool).expand(elements)
            path.write_bytes(torch_dumps(full_state({"0": {"mask": view}})))
        else:
            path.write_bytes(_bombs.mask_bomb(case, elements=elements, dtype="bool"))
        assert path.stat().st_size < 4096
        return path

    def expected(elements: int) -> torch.Tensor:
        if case == "torch-view":
            return torch.ones(elements, dtype=torch.bool)
        mask = torch.ones(elements, dtype=torch.bool)
        if case == "rle":
            mask[elements // 2 :] = False
        else:
            mask[[5, elements // 2]] = False
        return mask

    assert torch.equal(serialize.load(write(floor))["state"]["0"]["mask"], expected(floor))
    over = write(floor + 1)
    size = over.stat().st_size
    with pytest.raises(
        SerializationError,
        match=rf"declares {floor + 1} elements, more than the {floor} allowed for a file of "
        rf"{size} bytes \(8 per byte of the file, and at least {floor}, unless max_elements",
    ):
        serialize.load(over)
    loaded = serialize.load(over, max_elements=floor + 1)["state"]["0"]["mask"]
    assert torch.equal(loaded, expected(floor + 1))
    monkeypatch.setenv(serialize.MAX_ELEMENTS_ENV_VAR, str(floor + 1))
    assert torch.equal(serialize.load(over)["state"]["0"]["mask"], expected(floor + 1))


@pytest.mark.parametrize("encoding", ["bitpack", "rle", "coo"])
def test_a_mask_is_decoded_straight_into_its_own_dtype(tmp_path: Path, encoding: str) -> None:
    """A bool mask of 64 MiB takes 64 MiB to decode, not a uint8 or int64 copy besides."""
    elements = 2**26
    if encoding == "bitpack":
        stored = torch.full((elements // 8,), 0b10110000, dtype=torch.uint8)
        record = {"encoding": "bitpack", "dtype": "bool", "shape": [elements]}
        data = _bombs.signed_with_mask(record, stored)
    else:
        data = _bombs.mask_bomb(encoding, elements=elements, dtype="bool")
    path = tmp_path / f"{encoding}.safetensors"
    path.write_bytes(data)
    result = _bombs.measure("load", path, max_elements=elements)
    assert result["kind"] == "loaded", result
    # the mask, the file read once and its tensors copied out of it, and a few MiB of chunks
    assert result["growth"] < elements + 2 * len(data) + 16 * 2**20, result


def test_by_default_a_deflated_member_inflates_no_further_than_the_file_allows(
    tmp_path: Path,
) -> None:
    """8 bytes per byte of the file plus 16 MiB: a stored member always passes."""
    small = tmp_path / "small.pt"
    small.write_bytes(_deflated(_torch_state_with_a_big_mask(2**18)))  # 2 MiB of zeros
    assert serialize.load(small)["state"]["0"]["mask"].numel() == 2**18
    big = tmp_path / "big.pt"
    big.write_bytes(_deflated(_torch_state_with_a_big_mask(2**22)))  # 32 MiB of zeros
    with pytest.raises(SerializationError) as info:
        serialize.load(big)
    message = str(info.value)
    assert message.startswith(f"{big}: zip member 'archive/data/0' declares {2**25} uncompressed")
    assert "8 bytes for each byte of the file" in message
    assert "unless max_elements is set" in message
    assert serialize.load(big, max_elements=2**22)["state"]["0"]["mask"].numel() == 2**22


def test_by_default_a_deflated_pickle_inflates_no_further_than_the_file_allows(
    tmp_path: Path,
) -> None:
    """The pickled state may take the file's size, at least 1 MiB, unless a cap is set."""
    sd = stepped(small_model()).state_dict()
    sd["defaults"]["sparse_config"]["note"] = "x" * (2 << 20)
    stored = serialize.save(sd, tmp_path / "stored.pt")
    assert serialize.load(stored)["defaults"]["sparse_config"]["note"] == "x" * (2 << 20)
    deflated = tmp_path / "deflated.pt"
    deflated.write_bytes(_deflated(stored.read_bytes()))
    size = deflated.stat().st_size
    assert size < 1 << 20
    floor = MIN_FILE_ELEMENTS
    with pytest.raises(
        SerializationError,
        match=rf"{deflated}: zip member 'archive/data\.pkl' declares \d+ uncompressed bytes, "
        rf"more than the {1 << 20} allowed for the pickled state for a file of {size} bytes.*"
        rf"max_elements={floor}",
    ):
        serialize.load(deflated)
    loaded = serialize.load(deflated, max_elements=floor)
    assert loaded["defaults"]["sparse_config"]["note"] == "x" * (2 << 20)
