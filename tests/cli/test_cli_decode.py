"""The decode measurement of ``evaluate`` and ``sweep``: greedy ``generate()`` with the KV
cache, the prefill taken out, dense and sparse side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import _text_models
import torch

from actsparse import cli
from actsparse.cli import _measure


def _llama() -> Any:
    model = _text_models.tiny_llama().eval()
    model.generation_config.pad_token_id = 0
    return model


def test_the_decode_measurement_runs_one_token_at_a_time_on_the_cache() -> None:
    model = _llama()
    seen: list[tuple[int, bool]] = []

    def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # transformers 5 passes the KV cache as ``cache``: what it holds before this forward
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(
            (kwargs["input_ids"].shape[1], cache is not None and cache.get_seq_length() > 0)
        )

    model.register_forward_pre_hook(record, with_kwargs=True)
    prompt = torch.randint(3, 60, (1, 7))
    assert _measure.decode_seconds(model, prompt, 5) > 0
    # 1 + 5 new tokens, then 1: each generation is one prefill, then a forward per token
    longer, shorter = seen[:6], seen[6:]
    assert len(shorter) == 1
    for calls in (longer, shorter):
        assert calls[0] == (7, False)  # the prompt, on an empty cache
        assert all(call == (1, True) for call in calls[1:])  # one new token on the cache


def test_decode_speed_times_both_models_and_reports_tokens_per_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dense, sparse = _llama(), _llama()
    timed: list[int] = []
    seconds = {id(dense): 0.5, id(sparse): 0.25}

    def fake(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
        timed.append(id(model))
        return seconds[id(model)]

    monkeypatch.setattr(_measure, "decode_seconds", fake)
    decode = _measure.decode_speed(
        dense, sparse, torch.ones(1, 3, dtype=torch.long), new_tokens=8, repeat=3
    )
    assert timed.count(id(dense)) == timed.count(id(sparse)) == 1 + 3  # a warm-up, then 3
    assert decode.dense == 16.0
    assert decode.sparse == 32.0
    assert decode.ratio == 2.0
    assert decode.to_json() == {
        "new_tokens": 8,
        "dense_tokens_per_s": 16.0,
        "sparse_tokens_per_s": 32.0,
        "ratio": 2.0,
    }


def _run(argv: list[Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    sys.stdout.flush()
    return code, out.out, out.err


def test_sweep_reports_decode_speed_for_a_causal_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _text_models.save_model(tmp_path / "llama", "llama")
    text = _text_models.write_text(tmp_path / "text.txt")
    out = tmp_path / "sweep"
    argv = ["sweep", model, "--text", text, "--targets", "0.3,0.5", "--out", out]
    code, _, err = _run([*argv, "--repeat", "1", "--decode-tokens", "3"], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows:
        decode = row["decode"]
        assert decode["new_tokens"] == 3
        assert decode["dense_tokens_per_s"] > 0
        assert decode["sparse_tokens_per_s"] > 0
        assert decode["ratio"] == pytest.approx(
            decode["sparse_tokens_per_s"] / decode["dense_tokens_per_s"]
        )
    table = (out / "table.txt").read_text()
    assert "decode tok/s" in table.splitlines()[0]
    assert "prefill/dense" in table.splitlines()[0]
    assert (out / "quality_vs_sparsity.png").read_bytes().startswith(b"\x89PNG")
    # --decode-tokens 0 turns it off
    code, _, err = _run([*argv, "--repeat", "1", "--decode-tokens", "0"], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all("decode" not in row for row in rows)
    assert "decode tok/s" not in (out / "table.txt").read_text()


@pytest.mark.parametrize("value", ["-1", "4097", "many"])
def test_decode_tokens_must_be_a_small_count(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        ["sweep", tmp_path, "--text", tmp_path / "t", "--decode-tokens", value], capsys
    )
    assert code == 2
    assert "--decode-tokens" in err
