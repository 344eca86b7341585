"""What a sparsified text model costs and gains, measured against the dense model.

* Sparsity: at the input of every sparsified layer, the share of the entries
  of real tokens (the attention mask; padding left out) that the layer's
  threshold zeroes (``|x| <= threshold``), per layer and over all of them.
* Quality: for an encoder, the mean cosine similarity between the sparse and
  the dense model's mean-pooled embeddings of each passage; for a causal
  language model, the perplexity of next-token prediction over real tokens,
  beside the dense model's.
* Time: the sparse model's time over the dense model's on the same batches,
  measured side by side: each batch runs through both back to back, in an
  order that alternates, and the median of the ratios is reported. That is
  the time of whole passages (for a causal model, prefill).
* Decoding (causal models): tokens per second of greedy ``generate()`` with
  the KV cache, dense and sparse side by side (:func:`decode_speed`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from actsparse.cli._hf import CAUSAL, each
from actsparse.core import ConfigError

__all__ = ["Decode", "Evaluation", "Reference", "decode_speed", "evaluate", "reference"]

#: The prompt of the decode measurement: the first passage's first real tokens.
DECODE_PROMPT = 32

Batch = dict[str, torch.Tensor]


@attrs.frozen
class Decode:
    """Token-by-token generation, dense and sparse, measured side by side.

    Attributes:
        new_tokens: How many tokens each timed generation adds after the first.
        dense: The dense model's tokens per second.
        sparse: The sparse model's tokens per second.
    """

    new_tokens: int
    dense: float
    sparse: float

    @property
    def ratio(self) -> float:
        """The sparse model's tokens per second over the dense model's."""
        return self.sparse / self.dense

    def to_json(self) -> dict[str, Any]:
        return {
            "new_tokens": self.new_tokens,
            "dense_tokens_per_s": self.dense,
            "sparse_tokens_per_s": self.sparse,
            "ratio": self.ratio,
        }


def _generate_seconds(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds for greedy ``generate()`` of exactly ``tokens`` new tokens, with the cache."""
    generation = getattr(model, "generate", None)
    if generation is None:
        raise ConfigError("the model has no generate(); decode speed needs a causal LM")
    start = time.perf_counter()
    with torch.inference_mode():
        generation(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            use_cache=True,
        )
    return time.perf_counter() - start


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` tokens of greedy decoding after ``prompt``'s prefill: the
    time of ``1 + new_tokens`` generated tokens minus the time of 1 (the prefill and the
    first token)."""
    longer = _generate_seconds(model, prompt, 1 + new_tokens)
    return max(longer - _generate_seconds(model, prompt, 1), 1e-9)


def decode_speed(
    dense: nn.Module,
    sparse: nn.Module,
    prompt: torch.Tensor,
    *,
    new_tokens: int,
    repeat: int,
) -> Decode:
    """Greedy decoding tokens per second of ``dense`` and ``sparse`` from ``prompt``
    (``(1, length)`` token ids), side by side.

    After one warm-up decode on each, the two are timed ``repeat`` times in an
    order that alternates; each side's median time gives its tokens per second.
    """
    for model in (dense, sparse):
        decode_seconds(model, prompt, new_tokens)
    times: dict[int, list[float]] = {0: [], 1: []}
    models = (dense, sparse)
    for rep in range(repeat):
        for side in (0, 1) if rep % 2 == 0 else (1, 0):
            times[side].append(decode_seconds(models[side], prompt, new_tokens))
    return Decode(
        new_tokens=new_tokens,
        dense=new_tokens / statistics.median(times[0]),
        sparse=new_tokens / statistics.median(times[1]),
    )


def decode_prompt(batches: Sequence[Batch]) -> torch.Tensor:
    """The first passage's first :data:`DECODE_PROMPT` real tokens, as ``(1, length)``."""
    batch = batches[0]
    real = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    return real[:DECODE_PROMPT].unsqueeze(0)


@attrs.frozen
class Reference:
    """The dense model's outputs on the evaluation batches.

    Attributes:
        embeddings: Encoders: one mean-pooled embedding per passage.
        nll: Causal models: the summed negative log-likelihood of the real next tokens.
        predicted: Causal models: how many next tokens that sum covers.
    """

    embeddings: torch.Tensor | None = None
    nll: float = 0.0
    predicted: int = 0

    @property
    def perplexity(self) -> float | None:
        return math.exp(self.nll / self.predicted) if self.predicted else None


def _forward(model: nn.Module, kind: str, batch: Batch, into: dict[str, Any]) -> None:
    with torch.inference_mode():
        output = model(**batch)
    mask = batch["attention_mask"].bool()
    if kind == CAUSAL:
        logits = output.logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        real = mask[:, 1:] & mask[:, :-1]
        into["nll"] += float(F.cross_entropy(logits[real], targets[real], reduction="sum"))
        into["predicted"] += int(real.sum())
    else:
        hidden = output.last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        into["embeddings"].append(pooled)


def _run(model: nn.Module, kind: str, batches: Sequence[Batch], **loop: Any) -> Reference:
    into: dict[str, Any] = {"embeddings": [], "nll": 0.0, "predicted": 0}
    each(batches, lambda batch: _forward(model, kind, batch, into), **loop)
    embeddings = torch.cat(into["embeddings"]) if into["embeddings"] else None
    return Reference(embeddings=embeddings, nll=into["nll"], predicted=into["predicted"])


def reference(
    model: nn.Module, kind: str, batches: Sequence[Batch], *, progress: bool | None
) -> Reference:
    """The dense model's outputs (a progress bar over the batches)."""
    found = _run(model, kind, batches, desc="dense model", progress=progress)
    if kind == CAUSAL and not found.predicted:
        raise ValueError("no passage holds two tokens: perplexity needs a next token to predict")
    return found


@attrs.frozen
class Evaluation:
    """One sparse model against the dense one.

    Attributes:
        layers: Layer name -> sparsity of its input over real tokens.
        sparsity: The same over every sparsified layer together.
        cosine: Encoders: the mean cosine of the passages' embeddings.
        perplexity: Causal models: the sparse model's perplexity.
        dense_perplexity: Causal models: the dense model's.
        time_ratio: The sparse model's time over the dense model's (the median over the
            pairs of timed batches).
        repeat: How many times each batch was timed on both models.
        decode: Causal models: greedy decoding speed, dense and sparse (None when
            not measured).
    """

    layers: dict[str, float]
    sparsity: float
    cosine: float | None
    perplexity: float | None
    dense_perplexity: float | None
    time_ratio: float
    repeat: int
    decode: Decode | None = None

    @property
    def perplexity_change(self) -> float | None:
        """The relative change of perplexity, sparse over dense minus 1."""
        if self.perplexity is None or not self.dense_perplexity:
            return None
        return self.perplexity / self.dense_perplexity - 1.0

    @property
    def quality_loss(self) -> float:
        """1 - cosine (encoders), or the relative perplexity increase (causal models)."""
        if self.cosine is not None:
            return 1.0 - self.cosine
        change = self.perplexity_change
        return math.inf if change is None else change

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sparsity": self.sparsity, "layers": dict(self.layers)}
        if self.cosine is not None:
            out["cosine"] = self.cosine
        else:
            out["perplexity"] = self.perplexity
            out["dense_perplexity"] = self.dense_perplexity
            out["perplexity_change"] = self.perplexity_change
        out["time_ratio"] = self.time_ratio
        out["timing_repeats"] = self.repeat
        if self.decode is not None:
            out["decode"] = self.decode.to_json()
        return out


class _ZeroCount:
    """Counts, at each layer's input, the real-token entries with ``|x| <= threshold``."""

    def __init__(self, model: nn.Module, thresholds: Mapping[str, float]) -> None:
        self.model = model
        self.thresholds = dict(thresholds)
        self.mask: torch.Tensor | None = None
        self.zeros = dict.fromkeys(self.thresholds, 0)
        self.total = dict.fromkeys(self.thresholds, 0)

    def hook(self, name: str) -> Any:
        threshold = self.thresholds[name]

        def count(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            mask = self.mask
            if mask is not None and tuple(x.shape[: mask.ndim]) == tuple(mask.shape):
                x = x[mask]
            # the dense path has zeroed them already; a kernel zeroes them inside the layer
            self.zeros[name] += int((x.abs() <= threshold).sum())
            self.total[name] += x.numel()

        return count

    def attach(self) -> list[Any]:
        return [
            self.model.get_submodule(name).register_forward_pre_hook(self.hook(name))
            for name in self.thresholds
        ]


def _timed(model: nn.Module, batch: Batch) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(**batch)
    return time.perf_counter() - start


def time_ratio(
    dense: nn.Module,
    sparse: nn.Module,
    batches: Sequence[Batch],
    *,
    repeat: int,
    progress: bool | None,
) -> float:
    """The sparse model's time over the dense model's, timed side by side.

    Both models have just run on these batches (the quality passes warm them
    up). Each repetition runs every batch through both models back to back,
    the dense model first for every other pair, so that load from other
    processes hits both sides of a ratio alike; the median over all pairs of
    the ratio within a pair.
    """
    pairs = [(rep, index) for rep in range(repeat) for index in range(len(batches))]
    ratios: list[float] = []

    def step(pair: tuple[int, int]) -> None:
        rep, index = pair
        batch = batches[index]
        if (rep + index) % 2 == 0:
            first = _timed(dense, batch)
            ratios.append(_timed(sparse, batch) / first)
        else:
            second = _timed(sparse, batch)
            ratios.append(second / _timed(dense, batch))

    each(pairs, step, desc="timing", progress=progress)
    return statistics.median(ratios)


def evaluate(
    dense: nn.Module,
    sparse: nn.Module,
    kind: str,
    batches: Sequence[Batch],
    thresholds: Mapping[str, float],
    dense_reference: Reference,
    *,
    repeat: int,
    progress: bool | None,
    label: str = "sparse model",
    decode_tokens: int = 0,
) -> Evaluation:
    """Sparsity, quality and time of ``sparse`` (hooked) against ``dense`` on ``batches``;
    for a causal model with ``decode_tokens`` > 0, also its decoding speed
    (:func:`decode_speed`, ``repeat`` times each, from :func:`decode_prompt`)."""
    counter = _ZeroCount(sparse, thresholds)
    handles = counter.attach()
    into: dict[str, Any] = {"embeddings": [], "nll": 0.0, "predicted": 0}

    def step(batch: Batch) -> None:
        counter.mask = batch["attention_mask"].bool()
        _forward(sparse, kind, batch, into)

    try:
        each(batches, step, desc=label, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    layers = {
        name: counter.zeros[name] / counter.total[name] if counter.total[name] else 0.0
        for name in thresholds
    }
    total = sum(counter.total.values())
    overall = sum(counter.zeros.values()) / total if total else 0.0
    cosine = perplexity = None
    if kind == CAUSAL:
        perplexity = math.exp(into["nll"] / into["predicted"]) if into["predicted"] else None
    elif dense_reference.embeddings is not None:
        embeddings = torch.cat(into["embeddings"])
        cosine = float(F.cosine_similarity(embeddings, dense_reference.embeddings, dim=-1).mean())
    ratio = time_ratio(dense, sparse, batches, repeat=repeat, progress=progress)
    decode = None
    if kind == CAUSAL and decode_tokens > 0:
        decode = decode_speed(
            dense, sparse, decode_prompt(batches), new_tokens=decode_tokens, repeat=repeat
        )
    return Evaluation(
        layers=layers,
        sparsity=overall,
        cosine=cosine,
        perplexity=perplexity,
        dense_perplexity=dense_reference.perplexity,
        time_ratio=ratio,
        repeat=repeat,
        decode=decode,
    )
