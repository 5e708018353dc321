"""Output heads: whether a model's logits are a plain linear layer over its last hidden states, and
capturing those hidden states while the layer scores no position (the fused losses project them).

Used by the KD trainer and by evaluation's target perplexity, which both skip the full
[batch, length, vocabulary] logits where the model allows it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Models whose logits are lm_head(input of lm_head) with nothing after it (no soft-capping, logit
# scale or final bias); T5 scales its decoder output before lm_head, which the captured input includes.
PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "t5", "mt5", "phi3"})


def plain_linear_head(model: nn.Module) -> nn.Linear | None:
    """The output layer of `model` (or of the model a PEFT wrapper holds) when it is a plain linear head."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None  # a LoRA-wrapped head is not plain


@contextlib.contextmanager
def head_inputs(head: nn.Module | None) -> Iterator[list[torch.Tensor]]:
    """Record the hidden states `head` is called on and let it score no position at all.

    The forward still runs through the top-level module (so DDP and PEFT wrappers do their work);
    only the output layer's [batch, length, vocabulary] product is skipped.
    """
    seen: list[torch.Tensor] = []
    if head is None:
        yield seen
        return

    def skip(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(skip)
    try:
        yield seen
    finally:
        handle.remove()
