"""Sparsity on a GPU: the Llama-shaped MLP stack at batch 1 in float16, side by side.

The stack of ``bench_llama_mlp.py`` (4 blocks, hidden 4096, intermediate
11008, ``x + down(silu(gate(x)) * up(x))``, random weights), in float16 on a
CUDA device, is calibrated in threshold mode on the inputs of all three
projections (320 tokens), then ``retarget`` moves every layer to 40% and to
50%. For each target one process times, interleaved (the order rotates every
repetition, each sample is a loop of calls between two CUDA events):

* 1 token (single-batch decoding): the plain model (dense cuBLAS, no
  sparsifier) against the sparsified model with the kernel forced
  (``--kernel``, default ``triton_sparse``), with ``kernel="auto"``, and with
  ``kernel="dense"`` (hardshrink, then cuBLAS);
* 1 token replayed from a CUDA graph, plain against the forced kernel, which
  takes Python and launch overhead out of both;
* 32 tokens: plain against ``auto`` (which takes the dense path above the
  crossover it measured) and against the forced kernel;
* each layer shape alone at 1 token: ``F.linear`` against
  ``actsparse::triton_sparse_linear`` on the input-major weight.

It prints the GPU, its driver, torch, CUDA and triton, the crossover that
``auto`` measured per layer shape, the sparsity the inputs reached, and the
largest difference between the forced kernel's outputs and the dense
kernel's. Ratios are plain time over variant time: above 1 is faster.
The JSON lands in ``$ACTSPARSE_BENCH_DIR/gpu_mlp.json`` (default
``bench-results/``). ``bench/gpu_check.sh`` runs it; ``--quick`` uses a small
stack for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import subprocess
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
from bench_llama_mlp import achieved, stack, weight_bytes

from actsparse.hooks import ActivationSparsifier
from actsparse.kernels import (
    measure_cuda_crossover,
    triton_kernel_status,
    triton_sparse_linear,
)

TARGETS = (0.4, 0.5)
#: seconds a timed sample lasts at least (a loop of calls between two events)
SAMPLE_SECONDS = 2e-3


def gpu_and_driver() -> dict[str, str]:
    """The GPU's name, memory and driver as nvidia-smi reports them, and torch's view."""
    found: dict[str, str] = {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        found["torch device"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor}"
        )
    smi = shutil.which("nvidia-smi")
    if smi is None:
        found["nvidia-smi"] = "not found"
        return found
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    done = subprocess.run(
        [smi, query, "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    found["nvidia-smi"] = (done.stdout or done.stderr).strip().splitlines()[0]
    return found


def timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """Seconds per call of ``fn`` over ``inner`` calls: CUDA events on a GPU."""
    if device.type != "cuda":

        def wall(fn: Callable[[], Any], inner: int) -> float:
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - start) / inner

        return wall

    def events(fn: Callable[[], Any], inner: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3 / inner

    return events


def interleaved(
    calls: dict[str, Callable[[], Any]], repeat: int, device: torch.device
) -> dict[str, tuple[float, float]]:
    """Per call: (median seconds per call, median ratio first call / this call)."""
    seconds_of = timer(device)
    for call in calls.values():  # warm up: the first call of a shape compiles the kernel
        call()
    inner = max(1, round(SAMPLE_SECONDS / max(seconds_of(c, 1) for c in calls.values())))
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        seconds = {name: seconds_of(calls[name], inner) for name in order}
        for name in names:
            samples[name].append(seconds[name])
            ratios[name].append(seconds[names[0]] / seconds[name])
    return {
        name: (statistics.median(samples[name]), statistics.median(ratios[name])) for name in names
    }


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rows_for(
    label: str,
    target: float,
    sparsity: float | str,
    timings: dict[str, tuple[float, float]],
) -> list[dict[str, Any]]:
    return [
        {
            "row": label,
            "target": target,
            "achieved": sparsity,
            "variant": name,
            "us/call": round(seconds * 1e6, 2),
            "plain/variant": round(ratio, 3),
        }
        for name, (seconds, ratio) in timings.items()
    ]


def target_rows(
    plain: nn.Module,
    forced: nn.Module,
    state: dict[str, Any],
    target: float,
    kernel: str,
    repeat: int,
    notes: dict[str, Any],
) -> list[dict[str, Any]]:
    """The rows of one target: ``forced`` runs ``kernel``; ``state`` holds its thresholds."""
    device = next(plain.parameters()).device
    dtype = next(plain.parameters()).dtype
    hidden = next(m for m in plain.modules() if isinstance(m, nn.Linear)).in_features
    # the same thresholds on copies of the plain model; a loaded state runs dense
    dense_kernel = copy.deepcopy(plain)
    ActivationSparsifier(dense_kernel).load_state_dict(state)
    auto = copy.deepcopy(plain)
    auto_sparsifier = ActivationSparsifier(auto)
    auto_sparsifier.load_state_dict(state)
    auto_sparsifier.set_kernel("auto")
    shapes = sorted(
        {(m.in_features, m.out_features) for m in plain.modules() if isinstance(m, nn.Linear)}
    )
    for n_in, n_out in shapes:
        notes[f"auto crossover {n_in}->{n_out} at {target} (tokens)"] = (
            measure_cuda_crossover(n_in, n_out, dtype, target, device=device)
            if device.type == "cuda"
            else "n/a"
        )
    rows: list[dict[str, Any]] = []
    torch.manual_seed(2)
    one = torch.randn(1, hidden, dtype=dtype, device=device)
    prefill = torch.randn(32, hidden, dtype=dtype, device=device)
    with torch.no_grad():
        for tokens, x in ((1, one), (32, prefill)):
            sparsity = round(achieved(dense_kernel, x), 4)
            difference = (forced(x).float() - dense_kernel(x).float()).abs().max()
            notes[f"max |forced - dense kernel| at {target}, {tokens} token(s)"] = float(difference)
            calls = {
                "plain": lambda x=x: plain(x),
                f"{kernel} (forced)": lambda x=x: forced(x),
                "auto": lambda x=x: auto(x),
                "dense kernel": lambda x=x: dense_kernel(x),
            }
            timings = interleaved(calls, repeat, device)
            rows.extend(rows_for(f"MLP stack, {tokens} token(s)", target, sparsity, timings))
        if device.type == "cuda":
            sparsity = round(achieved(dense_kernel, one), 4)
            try:
                calls = {
                    "plain": graphed(lambda: plain(one)),
                    f"{kernel} (forced)": graphed(lambda: forced(one)),
                }
            except Exception as exc:  # report it, and go on with the other rows
                notes[f"CUDA graph at {target}"] = f"failed: {type(exc).__name__}: {exc}"
            else:
                timings = interleaved(calls, repeat, device)
                label = "MLP stack, 1 token, CUDA graph"
                rows.extend(rows_for(label, target, sparsity, timings))
        for n_in, n_out in shapes:
            x = torch.randn(1, n_in, dtype=dtype, device=device)
            t = float(x.float().abs().quantile(target))
            w = (torch.randn(n_out, n_in, device=device) / n_in**0.5).to(dtype)
            w_t = w.t().contiguous()
            calls = {
                "F.linear": lambda x=x, w=w: F.linear(x, w),
                "triton_sparse_linear": lambda x=x, w_t=w_t, t=t: triton_sparse_linear(
                    x, w_t, None, t
                ),
            }
            sparsity = round(float((x.abs() <= t).float().mean()), 4)
            timings = interleaved(calls, repeat * 4, device)
            rows.extend(rows_for(f"layer {n_in}->{n_out}, 1 token", target, sparsity, timings))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small stack, few repetitions")
    parser.add_argument("--device", default="cuda", help="the CUDA device (default cuda)")
    parser.add_argument("--kernel", default="triton_sparse", help="the kernel to force")
    parser.add_argument(
        "--shape", help="BLOCKS,HIDDEN,INTERMEDIATE (default 4,4096,11008; --quick 2,512,1376)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    notes: dict[str, Any] = {
        "torch": torch.__version__,
        "CUDA (torch built for)": torch.version.cuda,
        "triton kernel": triton_kernel_status().reason,
        **gpu_and_driver(),
    }
    try:
        import triton

        notes["triton"] = triton.__version__
    except ImportError as exc:
        notes["triton"] = f"not importable: {exc}"
    for key, value in notes.items():
        print(f"{key}: {value}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU")
        return 2
    dtype = torch.float16
    blocks, hidden, intermediate, repeat = (2, 512, 1376, 7) if args.quick else (4, 4096, 11008, 25)
    if args.shape:
        blocks, hidden, intermediate = (int(v) for v in args.shape.split(","))
    notes["stack"] = f"{blocks} blocks, hidden {hidden}, intermediate {intermediate}, {dtype}"
    plain = stack(blocks, hidden, intermediate).to(dtype=dtype, device=device)
    bytes_dense = weight_bytes(plain)
    forced = copy.deepcopy(plain)
    sparsifier = ActivationSparsifier(forced, "abs_histogram", "identity", "target_threshold")
    sparsifier.register_layers({nn.Linear: {"sparsity_level": TARGETS[0]}})
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(10):
            forced(torch.randn(32, hidden, dtype=dtype, device=device))
    sparsifier.step()
    rows: list[dict[str, Any]] = []
    for index, target in enumerate(TARGETS):
        sparsifier.retarget(dict.fromkeys(sparsifier.thresholds, target))
        if index == 0:
            sparsifier.squash_mask(kernel=args.kernel)
        else:
            sparsifier.set_kernel(args.kernel)
        notes[f"weight bytes over dense at {target}"] = weight_bytes(forced) / bytes_dense
        state = sparsifier.state_dict()  # the thresholds, squashed; never the kernel
        rows.extend(target_rows(plain, forced, state, target, args.kernel, repeat, notes))
    report("gpu_mlp", rows, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
