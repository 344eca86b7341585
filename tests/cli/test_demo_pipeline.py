"""``nox -s demo`` end to end on a tiny model: a 2-layer Llama written as a GGUF file,
turned into a model directory by bench/gguf_model.py, then ``actsparse sweep`` with the
demo's own argument list (fewer targets, repeats and decoded tokens)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers loads a GGUF file only with it

import _text_models
import gguf
import torch

from actsparse import cli

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<unk>", "<s>", "</s>"]
MERGES = ["t h", "th e", "Ġ the", "e r", "i n"]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gguf_model", ROOT / "bench" / "gguf_model.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _byte_tokens() -> list[str]:
    """The 256 byte-level symbols of a GPT-2 style BPE vocabulary, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _vocabulary() -> list[str]:
    return SPECIALS + _byte_tokens() + [merge.replace(" ", "") for merge in MERGES]


def _interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """GGUF's row order for a query or key projection: each head's two rotary halves
    interleaved, as llama.cpp stores them (transformers undoes it on load)."""
    rows, cols = weight.shape
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def _write_gguf(model: Any, tokens: list[str], path: Path) -> Path:
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
    )
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    weights = {name: tensor.detach().float() for name, tensor in model.state_dict().items()}
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors = {
        "token_embd.weight": weights["model.embed_tokens.weight"],
        "output_norm.weight": weights["model.norm.weight"],
        "output.weight": weights["lm_head.weight"],
    }
    for layer in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            weight = weights[f"model.layers.{layer}.{ours}.weight"]
            if ours == "self_attn.q_proj":
                weight = _interleave(weight, config.num_attention_heads)
            elif ours == "self_attn.k_proj":
                weight = _interleave(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{theirs}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    work = tmp_path_factory.mktemp("demo")
    tokens = _vocabulary()
    model = _text_models.tiny_llama(
        len(tokens), rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    )
    gguf_file = _write_gguf(model, tokens, work / "tiny-llama.F32.gguf")
    out = work / "model"
    assert _script().main(["--gguf", str(gguf_file), "--out", str(out)]) == 0
    return model, out


def test_the_script_writes_the_gguf_model_as_a_transformers_directory(
    converted: tuple[Any, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    original, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2
    assert "quantization_config" not in config
    assert not out.with_name(out.name + ".partial").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer("the other text", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == 1  # <s>
    assert ids.shape[1] > 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    # a second run keeps the directory
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert _script().main(["--gguf", "absent.gguf", "--out", str(out)]) == 0
    assert "kept" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_the_gguf_file_is_found_in_the_package_folder_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "model_wheel_of_no_name"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    script = _script()
    with pytest.raises(SystemExit, match=r"one \.gguf file .*, found 0"):
        script.find_gguf(package.name)
    (package / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert script.find_gguf(package.name) == package / "model.Q4_1.gguf"
    (package / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match="found 2"):
        script.find_gguf(package.name)
    with pytest.raises(SystemExit, match="not installed"):
        script.find_gguf("absent_package_of_no_name")


def test_the_demo_sweep_runs_on_the_converted_model(
    converted: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, model = converted
    text = _text_models.write_text(tmp_path / "text.txt")
    out = tmp_path / "sweep"
    script = _script()
    argv = script.demo_sweep_args(
        model, text, out, targets="0.25,0.5", repeat="1", decode_tokens="3", batch="4"
    )
    assert argv[:2] == ["sweep", str(model)]
    assert argv[argv.index("--kernel") + 1] == "auto"
    code = cli.main(argv)
    err = capsys.readouterr().err
    sys.stdout.flush()
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "causal"
    assert results["max_tokens"] == int(script.DEMO_SWEEP["--max-tokens"])
    assert [row["target"] for row in results["rows"]] == [0.25, 0.5]
    for row in results["rows"]:
        assert row["perplexity"] > 0
        assert row["decode"]["new_tokens"] == 3
        assert row["decode"]["sparse_tokens_per_s"] > 0
        assert (out / row["state"]).is_file()
    table = (out / "table.txt").read_text().splitlines()[0]
    assert "perplexity" in table
    assert "decode tok/s" in table
    assert (out / "recipe.json").is_file()


def test_the_demo_arguments_take_only_options_the_demo_sets() -> None:
    with pytest.raises(KeyError, match="--layers"):
        _script().demo_sweep_args("m", "t", "o", layers="llama")
