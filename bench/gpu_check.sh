#!/usr/bin/env bash
# The GPU check: run once on a machine with an NVIDIA GPU, from a clone of the repository.
#
#   bash bench/gpu_check.sh            # everything below, about 10-20 minutes
#   bash bench/gpu_check.sh --quick    # small benchmark sizes, a smoke run
#
# It needs a Python environment with a CUDA build of torch, the workspace with the
# triton extra and the test dependencies, for instance (torch==2.13.0 from PyPI is
# a CUDA build on Linux x86_64; constraints.txt pins the version):
#
#   python -m venv .venv-gpu && . .venv-gpu/bin/activate
#   pip install -c constraints.txt torch==2.13.0 triton==3.9.0 \
#       -e packages/actsparse-core -e packages/actsparse-masks \
#       -e packages/actsparse-hooks -e 'packages/actsparse-kernels[triton]' \
#       -e packages/actsparse-serialize \
#       -e packages/actsparse-cli -e tests/fixtures/actsparse-fixture-plugin \
#       'pytest>=8' 'hypothesis>=6.100' numpy safetensors 'scikit-learn>=1.3' \
#       'matplotlib>=3.7' 'tqdm>=4.66'
#
# Steps, each run even if one before it failed; the exit status is 1 if any failed:
#   1. the GPU, its driver, torch, CUDA and triton, and whether the kernel can run;
#   2. the test suite (pytest tests -q): tests/kernels runs the Triton kernel
#      on the CUDA device (TRITON_INTERPRET is cleared), the other tests where they
#      support CUDA;
#   3. python bench/bench_hooks.py --device cuda (hook overhead on the GPU);
#   4. python bench/gpu_mlp.py: the Llama-shaped MLP stack at batch 1 in float16,
#      dense cuBLAS against the sparsified stack at 40% and 50% (the triton_sparse
#      kernel forced, auto, and the dense kernel), 32 tokens with auto, and each
#      layer shape alone.
# Everything printed also lands in bench-results/gpu/ (the log and the JSON files).
set -uo pipefail
cd "$(dirname "$0")/.."
quick=()
if [[ "${1:-}" == "--quick" ]]; then
    quick=(--quick)
fi
out=bench-results/gpu
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
unset TRITON_INTERPRET
export ACTSPARSE_BENCH_DIR="$out"
failed=()

step() {
    local name=$1
    shift
    echo
    echo "== $name: $*"
    if ! "$@"; then
        failed+=("$name")
    fi
}

step machine bash -c 'date -u; nvidia-smi || echo "nvidia-smi: not found"'
step versions python -c '
import torch
from actsparse.kernels import triton_kernel_status
print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
if torch.cuda.is_available():
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    print("device", index, props.name, f"{props.total_memory / 2**30:.0f} GiB",
          props.multi_processor_count, "SMs", f"sm_{props.major}{props.minor}")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton not importable:", exc)
status = triton_kernel_status()
print("triton_sparse kernel:", "available" if status.available else "UNAVAILABLE", "-", status.reason)
raise SystemExit(0 if status.available else 1)
'
step tests python -m pytest tests -q -p no:cacheprovider
step bench_hooks python bench/bench_hooks.py --device cuda "${quick[@]}" \
    --json "$out/bench_hooks_cuda.json"
step gpu_mlp python bench/gpu_mlp.py "${quick[@]}"

echo
if ((${#failed[@]})); then
    echo "gpu check: failed steps: ${failed[*]}"
    exit 1
fi
echo "gpu check: every step passed; figures in $out/"
