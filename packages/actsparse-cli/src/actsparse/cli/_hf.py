"""A local ``transformers`` model directory and plain-text passages, as the text commands use them.

``actsparse calibrate``, ``evaluate`` and ``sweep`` load a model directory
written by ``save_pretrained()`` (config.json, weights, tokenizer files) with
``transformers``, which comes with the ``actsparse-cli[hf]`` extra, and never
reach the network (``local_files_only``). A model whose ``architectures`` name
a causal language model (``...ForCausalLM``, ``...LMHeadModel``) is loaded
with ``AutoModelForCausalLM``; any other with ``AutoModel``, as an encoder
whose mean-pooled last hidden state is its embedding.

Text comes from a plain UTF-8 file, one passage per paragraph (paragraphs are
separated by blank lines; the lines of one are joined by spaces).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from actsparse.cli._app import CommandError, UsageError
from actsparse.cli._inputs import JSONBoundError, parse_json, read_regular
from actsparse.core import ActsparseError, get_registry

__all__ = [
    "CAUSAL",
    "ENCODER",
    "HF_EXTRA",
    "SPLITS",
    "TextModel",
    "add_model_argument",
    "each",
    "layer_selection",
    "load_model",
    "one_line",
    "read_passages",
    "require",
    "select_split",
    "sha256",
    "tokenize",
]

#: What ``pip install`` needs for the text commands.
HF_EXTRA = 'pip install "actsparse-cli[hf]" (with -c constraints.txt in a clone)'
ENCODER = "encoder"
CAUSAL = "causal"
#: Which passages a command uses: all, or every other one (the sweep calibrates on the
#: even ones, counting from 0, and evaluates on the odd ones).
SPLITS = ("all", "even", "odd")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def require(command: str, *, plot: bool = False) -> Any:
    """Import ``transformers`` (returned) and check the other packages ``command`` needs.

    Raises:
        CommandError: Something is missing; the message says what to install.
    """
    missing = []
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        missing.append("transformers")
    if importlib.util.find_spec("tqdm") is None:
        missing.append("tqdm")
    if plot and importlib.util.find_spec("matplotlib") is None:
        missing.append("matplotlib")
    if missing:
        raise CommandError(f"actsparse {command} needs {', '.join(missing)}: {HF_EXTRA}")
    registry = get_registry()
    for kind, name in (
        ("aggregate", "abs_histogram"),
        ("reduce", "identity"),
        ("mask", "target_threshold"),
    ):
        registry.entry(kind, name)  # UnknownStrategyError names the package to install
    if importlib.util.find_spec("actsparse.serialize") is None:
        raise CommandError(
            f"actsparse {command} reads and writes state files with actsparse-serialize: {HF_EXTRA}"
        )
    logging = transformers.utils.logging
    logging.set_verbosity_error()  # no load reports: the command says what it loaded
    logging.disable_progress_bar()  # the command's own bars cover the long loops
    return transformers


@attrs.frozen
class TextModel:
    """A loaded model directory.

    Attributes:
        path: The directory.
        model: The model, in eval mode.
        tokenizer: Its tokenizer, padding on the right.
        kind: ``"encoder"`` or ``"causal"``.
        max_positions: The longest input the model takes, if its config says.
    """

    path: Path
    model: nn.Module
    tokenizer: Any
    kind: str
    max_positions: int | None

    @property
    def description(self) -> str:
        what = "causal language model" if self.kind == CAUSAL else "encoder"
        return f"{type(self.model).__name__} ({what}) from {self.path}"

    def accepted(self) -> set[str]:
        """The keyword arguments of the model's ``forward``."""
        return set(inspect.signature(self.model.forward).parameters)


#: The largest ``config.json`` or ``tokenizer_config.json`` read (real ones are well under 1 MiB;
#: a tokenizer's with many added tokens can reach a few MiB).
MAX_MODEL_JSON_BYTES = 64 * 1024 * 1024
#: The files that transformers' tokenizers read their vocabulary from.
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_SAVE_TOKENIZER = "save the tokenizer beside the model (tokenizer.save_pretrained(MODEL_DIR))"
#: The flag that lets a model directory run its own code.
TRUST_REMOTE_CODE = "--trust-remote-code"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``MODEL_DIR`` and ``--trust-remote-code``, as every command that loads a model takes
    them."""
    parser.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="a transformers model directory"
    )
    parser.add_argument(
        TRUST_REMOTE_CODE,
        action="store_true",
        help="run the Python code of a model directory whose config.json or "
        "tokenizer_config.json has an auto_map (refused without this flag); only for a "
        "model whose code you have read",
    )


def load_model(transformers: Any, path: Path, *, trust_remote_code: bool = False) -> TextModel:
    """Load the model and tokenizer of a ``save_pretrained()`` directory, offline.

    Every ``transformers`` loader gets ``trust_remote_code``: without it, a directory
    whose ``config.json`` or ``tokenizer_config.json`` has an ``auto_map`` (Python code
    of its own) is refused before anything is loaded, and ``transformers`` never asks.

    Raises:
        CommandError: The directory is missing, is not a transformers model
            directory, needs its own code without ``trust_remote_code``, has no
            tokenizer files, or cannot be loaded.
    """
    where = str(path)
    if not path.exists():
        raise CommandError(f"model directory {where!r} does not exist")
    if not path.is_dir():
        raise CommandError(
            f"{where!r} is not a directory: MODEL_DIR is a transformers model directory "
            "(config.json, weights and tokenizer files, as save_pretrained() writes them)"
        )
    if not (path / "config.json").exists():
        raise CommandError(
            f"{where!r} is not a transformers model directory: it has no config.json"
        )
    settings = [("config.json", _model_json(path, "config.json"))]
    if (path / "tokenizer_config.json").exists():
        settings.append(("tokenizer_config.json", _model_json(path, "tokenizer_config.json")))
    if not trust_remote_code:
        for name, values in settings:
            _refuse_own_code(path, name, values)
    offline = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **offline)
    except Exception as exc:
        raise CommandError(f"{where!r}: cannot read its config.json: {one_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise CommandError(
            f"{where!r} holds an encoder-decoder model ({config.model_type}); the text "
            "commands take encoders and causal language models"
        )
    architectures = getattr(config, "architectures", None) or []
    kind = CAUSAL if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures) else ENCODER
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **offline)
    except Exception as exc:
        if not any((path / name).is_file() for name in VOCABULARY_FILES):
            raise CommandError(
                f"{where!r} has no tokenizer files: none of {', '.join(VOCABULARY_FILES)}; "
                f"{_SAVE_TOKENIZER}"
            ) from None
        raise CommandError(f"{where!r}: cannot load its tokenizer: {one_line(exc)}") from None
    _refuse_missing_vocabulary(path, tokenizer)  # before the weights: they may be large
    auto = transformers.AutoModelForCausalLM if kind == CAUSAL else transformers.AutoModel
    try:
        with warnings.catch_warnings():
            # torch warns (two lines) about a pickle protocol it did not write before it
            # refuses such a file; the refusal below says all there is to say
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            model = auto.from_pretrained(path, **offline)
    except pickle.UnpicklingError as exc:
        raise CommandError(_pickle_refusal(path, exc)) from None
    except Exception as exc:
        raise CommandError(f"{where!r}: cannot load the model: {one_line(exc)}") from None
    if tokenizer.pad_token is None:
        # decoders often have none; padding is masked out everywhere, any token does
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CommandError(f"{where!r}: its tokenizer has no padding, end or unknown token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    model.eval()
    positions = getattr(config, "max_position_embeddings", None)
    return TextModel(
        path=path,
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        max_positions=positions if isinstance(positions, int) and positions > 0 else None,
    )


def _model_json(path: Path, name: str) -> dict[str, Any]:
    """A JSON file of the model directory, as an object; refused in one line if it cannot
    be read, is not a regular file, passes a bound of :func:`parse_json`, or is not JSON."""
    where = f"{str(path)!r}: its {name}"
    raw = read_regular(path / name, where, limit=MAX_MODEL_JSON_BYTES)
    try:
        values = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"{str(path)!r}: cannot read its {name}: it is not UTF-8 text ({exc.reason} at "
            f"byte {exc.start})"
        ) from None
    except JSONBoundError as exc:
        raise CommandError(f"{str(path)!r}: cannot read its {name}: it {exc}") from None
    if not isinstance(values, dict):
        raise CommandError(
            f"{str(path)!r}: cannot read its {name}: it holds a JSON {type(values).__name__}, "
            "not an object"
        )
    return values


def _refuse_own_code(path: Path, name: str, values: dict[str, Any]) -> None:
    """Refuse a JSON file of the model directory whose ``auto_map`` points at Python code."""
    auto_map = values.get("auto_map")
    if not auto_map:
        return
    if isinstance(auto_map, dict):
        key, value = next(iter(auto_map.items()))
        entry = f"{json.dumps(key)}: {json.dumps(value)}"
        more = len(auto_map) - 1
    else:
        entry, more = json.dumps(auto_map), 0
    if len(entry) > 120:
        entry = entry[:117] + "..."
    others = f" (and {more} more)" if more else ""
    raise CommandError(
        f"{str(path)!r}: its {name} has an auto_map entry {entry}{others}, which runs Python "
        f"code of the model directory; actsparse loads none unless you pass "
        f"{TRUST_REMOTE_CODE} (only for a model whose code you have read)"
    )


def _refuse_missing_vocabulary(path: Path, tokenizer: Any) -> None:
    """Refuse a tokenizer that found none of the files it reads its vocabulary from
    (``transformers`` then builds one that knows only its special tokens)."""
    names = getattr(tokenizer, "vocab_files_names", None)
    if not isinstance(names, dict) or not names:
        return  # a tokenizer that reads no file (one of bytes or characters)
    # every tokenizers-backed class reads tokenizer.json, whatever else it names
    wanted = list(dict.fromkeys(["tokenizer.json", *map(str, names.values())]))
    if any((path / name).is_file() for name in wanted):
        return
    raise CommandError(
        f"{str(path)!r} has no tokenizer files: its tokenizer ({type(tokenizer).__name__}) "
        f"reads {' or '.join(wanted)}, and the directory has none of them; {_SAVE_TOKENIZER}"
    )


def _pickle_refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """One line for pickled weights that ``torch.load(weights_only=True)`` refuses."""
    message = str(exc)
    lines = message.partition("WeightsUnpickler error:")[2].strip().splitlines()
    detail = lines[0].strip() if lines else one_line(exc)
    if len(detail) > 120:
        detail = detail[:117] + "..."
    files = sorted(p.name for p in path.glob("*.bin"))
    what = f"its weights ({', '.join(files[:3])}) are" if files else "its weights are"
    return (
        f"{str(path)!r}: cannot load the model: {what} a pickle that torch.load(weights_only="
        f"True) refuses ({detail}); nothing in it was run: save the model with "
        "save_pretrained(), which writes safetensors"
    )


def read_passages(path: Path, *, limit: int | None = None) -> list[str]:
    """The passages of a UTF-8 text file: its paragraphs, whitespace collapsed, at most ``limit``.

    Raises:
        CommandError: The file is missing, not a regular file (a FIFO, a device),
            unreadable, not UTF-8, or holds no text.
    """
    where = f"text file {str(path)!r}"
    try:
        text = read_regular(path, where).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    passages = [" ".join(part.split()) for part in _PARAGRAPH.split(text)]
    passages = [p for p in passages if p]
    if not passages:
        raise CommandError(
            f"text file {str(path)!r} holds no text: give passages separated by blank lines"
        )
    return passages if limit is None else passages[:limit]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def select_split(passages: Sequence[str], split: str, path: Path) -> list[str]:
    """``passages``, or every other one (``"even"``: 0, 2, 4, ...; ``"odd"``: 1, 3, ...)."""
    chosen = list(passages) if split == "all" else list(passages[split == "odd" :: 2])
    if not chosen:
        raise CommandError(
            f"text file {str(path)!r} holds {len(passages)} passage(s): too few for the "
            f"{split} ones; separate passages by blank lines"
        )
    return chosen


#: Tokens per passage when --max-tokens is not given (fewer if the model takes fewer).
MAX_TOKENS = 128


def check_max_tokens(text_model: TextModel, max_tokens: int | None) -> int:
    """The tokens per passage: ``max_tokens``, or by default 128 or the model's limit.

    Raises:
        UsageError: ``max_tokens`` is more than the model takes.
    """
    limit = text_model.max_positions
    if max_tokens is None:
        return MAX_TOKENS if limit is None else min(MAX_TOKENS, limit)
    if limit is not None and max_tokens > limit:
        raise UsageError(
            f"--max-tokens {max_tokens} is more than the {limit} positions the model takes"
        )
    return max_tokens


def tokenize(
    text_model: TextModel, passages: Sequence[str], *, max_tokens: int, batch: int
) -> list[dict[str, torch.Tensor]]:
    """Batches of at most ``batch`` passages, each cut to ``max_tokens`` tokens and padded;
    only the inputs the model's ``forward`` takes (``attention_mask`` marks real tokens)."""
    check_max_tokens(text_model, max_tokens)
    accepted = text_model.accepted()
    out = []
    for start in range(0, len(passages), batch):
        encoded = text_model.tokenizer(
            list(passages[start : start + batch]),
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        kept = {key: value for key, value in encoded.items() if key in accepted}
        if "input_ids" not in kept or "attention_mask" not in kept:
            raise CommandError(
                f"{str(text_model.path)!r}: its model does not take input_ids and "
                "attention_mask, or its tokenizer does not give them"
            )
        out.append(kept)
    return out


def real_tokens(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def layer_selection(model: nn.Module, spec: str) -> str | dict[str, None]:
    """The ``layers`` argument of ``sparsify()`` for ``--layers``: a preset name, else a
    regular expression over the module names (matched entirely).

    Raises:
        UsageError: The preset does not fit the model, or the expression selects no layer.
    """
    from actsparse.hooks import PRESETS

    presets = "; ".join(f"{name} ({p.description})" for name, p in PRESETS.items())
    kind = type(model).__name__
    if spec == "auto":
        if not any(p.selects(model) for p in PRESETS.values()):
            raise UsageError(
                f"--layers auto: no preset fits the layers of this {kind}; presets: {presets}; "
                f"or give a regular expression over layer names, such as "
                f"{_example(model)!r}"
            )
        return spec
    preset = PRESETS.get(spec)
    if preset is not None:
        if not preset.selects(model):
            others = [name for name, p in PRESETS.items() if p.selects(model)]
            hint = f"; preset {others[0]!r} does" if others else ""
            raise UsageError(
                f"--layers {spec}: the preset does not match the layers of this {kind}{hint}"
            )
        return spec
    pattern = re.compile(spec)  # checked by the parser
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        raise UsageError(
            f"--layers {spec!r} is no preset ({', '.join(['auto', *PRESETS])}) and matches "
            f"the full name of no layer of this {kind}; its Linear layers are named like "
            f"{_example(model)!r}"
        )
    return {spec: None}


def _example(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[0] if names else next((n for n, _ in model.named_modules() if n), "")


class _Step(nn.Module):
    """A module whose forward runs one step of a loop (``calibrate`` drives the loop)."""

    def __init__(self, step: Callable[[Any], object]) -> None:
        super().__init__()
        self.step = step

    def forward(self, item: Any) -> None:
        self.step(item)


def each(
    items: Sequence[Any], step: Callable[[Any], object], *, desc: str, progress: bool | None
) -> None:
    """Call ``step`` on every item, with :func:`actsparse.hooks.calibrate`'s progress bar
    (on a terminal by default; ``progress`` True forces it, False hides it)."""
    from actsparse.hooks import calibrate

    calibrate(
        _Step(step), [(item,) for item in items], progress=progress, desc=desc, eval_mode=False
    )


@contextlib.contextmanager
def model_failures(text_model: TextModel, text: Path) -> Iterator[None]:
    """Report an exception of the model on the text in one line."""
    try:
        yield
    except ActsparseError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise CommandError(
            f"the model of {str(text_model.path)!r} failed on the passages of {str(text)!r}: "
            f"{one_line(exc)}"
        ) from exc
