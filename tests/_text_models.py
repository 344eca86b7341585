"""Tiny ``transformers`` models with random weights and a word-level tokenizer, saved as
``save_pretrained()`` saves a real one, and a text file of paragraphs to feed them.

A BERT encoder (``BertModel``) and a Llama decoder (``LlamaForCausalLM``): each
builds and saves in well under a second. The Llama tokenizer has no padding
token, as real decoder tokenizers often do.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "the",
    "a",
    "model",
    "layer",
    "token",
    "text",
    "sparse",
    "dense",
    "input",
    "output",
    "value",
    "zero",
    "threshold",
    "batch",
    "passage",
    "word",
    "simple",
    "small",
    "large",
    "fast",
    "slow",
    "first",
    "last",
    "every",
    "other",
    "some",
    "many",
    "few",
    "one",
    "two",
    "three",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = 64
POSITIONS = 64


def _tokenizer(causal: bool) -> Any:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if causal:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)]
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
    )


def tiny_bert() -> Any:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
    )
    return transformers.BertModel(config).eval()


def tiny_llama(vocab: int = VOCAB, **config: Any) -> Any:
    """A 2-layer random Llama; ``config`` overrides its LlamaConfig."""
    import transformers

    torch.manual_seed(0)
    settings: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
    )
    settings.update(config)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()


def save_model(directory: Path, kind: str) -> Path:
    """Save the tiny ``"bert"`` or ``"llama"`` model and its tokenizer under ``directory``."""
    model = tiny_bert() if kind == "bert" else tiny_llama()
    model.save_pretrained(directory)
    _tokenizer(causal=kind == "llama").save_pretrained(directory)
    return directory


def write_text(path: Path, passages: int = 24, seed: int = 0) -> Path:
    """``passages`` paragraphs of 6 to 30 words, separated by blank lines."""
    rng = random.Random(seed)
    paragraphs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) for _ in range(passages)
    ]
    # a paragraph broken over two lines stays one passage
    paragraphs[0] = paragraphs[0].replace(" ", "\n", 1)
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def token_batches(count: int = 3, batch: int = 4, length: int = 12) -> list[dict[str, Any]]:
    """Random token batches with right padding, as a tokenizer gives them."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
        lengths = torch.randint(3, length + 1, (batch,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out
