"""Squashed threshold-mode models export: ``torch.export.export`` and ``torch.onnx.export``.

With the dense kernel the sparsify pre-hook is one ``hardshrink`` whose threshold is a
Python float, so export traces it into the graph as a constant: the exported program
zeroes what the eager model zeroes and gives the eager outputs. The ONNX tests need
the optional ``onnx``, ``onnxscript`` and ``onnxruntime`` packages and skip without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from actsparse.hooks import ActivationSparsifier, sparsify


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, 4 * width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.intermediate.dense(x))
        return x + self.output.dense(h)


class Encoder(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([Block(width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder.layer:
            x = block(x)
        return x


def squashed_encoder() -> tuple[Encoder, Encoder, ActivationSparsifier]:
    """A squashed encoder at 50%, and a dense copy of its weights."""
    torch.manual_seed(0)
    model = Encoder().eval()
    dense = Encoder().eval()
    dense.load_state_dict(model.state_dict())
    sparsifier = sparsify(model, [torch.randn(4, 10, 16) for _ in range(4)], target=0.5)
    return model, dense, sparsifier


def hardshrink_thresholds(program: torch.export.ExportedProgram) -> list[float]:
    return [
        float(node.args[1])
        for node in program.graph.nodes
        if node.op == "call_function" and node.target == torch.ops.aten.hardshrink.default
    ]


def test_torch_export_keeps_the_thresholds_in_the_graph() -> None:
    model, dense, sparsifier = squashed_encoder()
    x = torch.randn(3, 7, 16)
    program = torch.export.export(model, (x,))
    # a layer the allocation left at 0% zeroes nothing and has no hook to export
    zeroing = [r.threshold for r in sparsifier.thresholds.values() if r.threshold > 0]
    assert zeroing
    assert hardshrink_thresholds(program) == zeroing
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(program.module()(x), eager)
        assert not torch.allclose(eager, dense(x))  # the thresholds change the outputs


def test_torch_export_with_dynamic_batch_and_length() -> None:
    model, _, _ = squashed_encoder()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    program = torch.export.export(
        model, (torch.randn(2, 6, 16),), dynamic_shapes=({0: batch, 1: length},)
    )
    for shape in ((1, 3, 16), (5, 11, 16)):
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(program.module()(x), model(x))


def test_an_exported_program_saves_and_loads(tmp_path: Path) -> None:
    model, _, _ = squashed_encoder()
    x = torch.randn(2, 5, 16)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), model(x))


def test_a_state_file_loaded_into_a_fresh_model_exports(tmp_path: Path) -> None:
    serialize = pytest.importorskip("actsparse.serialize")
    model, _, sparsifier = squashed_encoder()
    path = serialize.save(sparsifier, tmp_path / "state.safetensors")
    fresh = Encoder().eval()
    fresh.load_state_dict(model.state_dict())
    serialize.load_into(ActivationSparsifier(fresh), path)
    x = torch.randn(2, 5, 16)
    program = torch.export.export(fresh, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))


def test_the_cpu_sparse_kernel_exports_as_its_custom_op() -> None:
    model, _, sparsifier = squashed_encoder()
    sparsifier.set_kernel("cpu_sparse")
    x = torch.randn(2, 5, 16)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "actsparse.sparse_linear.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


# ------------------------------------------------------------------ transformers models


def transformers_models() -> list[Any]:
    pytest.importorskip("transformers")
    import _text_models

    return [_text_models.tiny_bert(), _text_models.tiny_llama()]


@pytest.mark.parametrize("index", [0, 1], ids=["bert", "llama"])
def test_torch_export_of_a_transformers_model(index: int) -> None:
    import _text_models

    model = transformers_models()[index]
    sparsifier = sparsify(model, _text_models.token_batches(), target=0.4, progress=False)
    batch = _text_models.token_batches(1)[0]
    if index == 1:
        batch["use_cache"] = False  # no key-value cache object in the outputs
    program = torch.export.export(model, (), kwargs=batch)
    # a layer whose threshold is 0 (the greedy allocation gave it 0%) runs without a hook
    zeroing = [r for r in sparsifier.thresholds.values() if r.threshold > 0]
    assert zeroing
    assert len(hardshrink_thresholds(program)) == len(zeroing)
    with torch.no_grad():
        eager = model(**batch)[0]
        assert torch.equal(program.module()(**batch)[0], eager)


# ------------------------------------------------------------------ ONNX


def onnx_modules() -> Any:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def test_torch_onnx_export_gives_the_eager_outputs(tmp_path: Path) -> None:
    onnxruntime = onnx_modules()
    model, dense, _ = squashed_encoder()
    x = torch.randn(3, 7, 16)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.from_numpy(out), eager, rtol=1e-5, atol=1e-5)
        # the zeroing is in the ONNX graph: it is far from the dense model
        assert not torch.allclose(torch.from_numpy(out), dense(x), atol=1e-3)


def test_torch_onnx_export_of_a_transformers_encoder(tmp_path: Path) -> None:
    onnxruntime = onnx_modules()
    import _text_models

    model = transformers_models()[0]
    sparsify(model, _text_models.token_batches(), target=0.4, progress=False)
    batch = _text_models.token_batches(1)[0]
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, (), str(path), kwargs=batch, dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, {name: batch[name].numpy() for name in names})
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(outputs[0]), eager, rtol=1e-4, atol=1e-5)


def test_the_cpu_sparse_kernel_does_not_go_to_onnx(tmp_path: Path) -> None:
    onnx_modules()
    model, _, sparsifier = squashed_encoder()
    sparsifier.set_kernel("cpu_sparse")
    with pytest.raises(Exception, match="ONNX"):
        torch.onnx.export(
            model, (torch.randn(2, 5, 16),), str(tmp_path / "m.onnx"), dynamo=True, verbose=False
        )
