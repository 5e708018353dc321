"""Attention capture for MiniLM self-relation KD: the Q, K and V projections of the last attention
layer of each stack (encoder and decoder self-attention, cross-attention), recorded during a forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import UserError

QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))


SELF_ATTENTION = ("self_attn", "SelfAttention")
CROSS_ATTENTION = ("encoder_attn", "EncDecAttention", "crossattention")


def last_self_attentions(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, nn.Module]]:
    """The Q, K, V projections of the last attention layer of each stack: "encoder" and "decoder"
    self-attention, and the decoder's "cross" attention of encoder-decoder models."""
    found: dict[str, tuple[nn.Module, nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in SELF_ATTENTION + CROSS_ATTENTION:
            continue
        for names in QKV_NAMES:
            parts = [getattr(module, n, None) for n in names]
            if all(isinstance(p, nn.Module) for p in parts):
                stack = ("cross" if leaf in CROSS_ATTENTION else
                         "encoder" if "encoder" in name.split(".") else "decoder")
                found[stack] = tuple(parts)  # type: ignore[assignment]  # later layers overwrite
    return found


@contextlib.contextmanager
def capture_qkv(model: nn.Module) -> Iterator[dict[tuple[str, str], torch.Tensor]]:
    """Record the outputs of the last layer's Q, K, V projections during a forward pass."""
    states: dict[tuple[str, str], torch.Tensor] = {}
    layers = last_self_attentions(model)
    if not layers:
        raise UserError(f"attention objective: no q/k/v self-attention found in {type(model).__name__}")
    handles = []
    for stack, modules in layers.items():
        for kind, module in zip("qkv", modules, strict=True):

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: tuple[str, str] = (stack, kind)) -> None:
                states[key] = out

            handles.append(module.register_forward_hook(hook))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def relation_heads(config: Any, stack: str) -> tuple[int, int]:
    """(heads for Q, heads for K and V) of the teacher: relation heads follow the teacher."""
    stack = "decoder" if stack == "cross" else stack
    q = (
        getattr(config, f"{stack}_attention_heads", None)
        or getattr(config, "num_attention_heads", None)
        or config.num_heads
    )
    return q, getattr(config, "num_key_value_heads", None) or q
