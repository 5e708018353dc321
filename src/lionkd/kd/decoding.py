"""Decoding with a local transformers model: batched beam search or sampling, returning new token ids only.

Used for pseudo-targets (teacher) and Joint-Teaching (student). Decoder-only prompts are left padded
so every continuation starts at the same column; the prompt is cut off by that column, never by
searching for the prompt text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..llm.templates import stop_token_ids
from .examples import is_encoder_decoder


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
    return ids, mask


def _pad_right(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p))
        mask[i, : len(p)] = 1
    return ids, mask


def cut_at_eos(ids: Sequence[int], eos_ids: set[int]) -> list[int]:
    """Tokens up to and including the first EOS (kept: the student must learn to stop)."""
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


@torch.no_grad()
def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    batch_size: int = 16,
    synced_gpus: bool = False,
    logits_processor: Any = None,
) -> list[list[list[int]]]:
    """For each prompt, `num_return_sequences` continuations as token ids (ending at EOS if reached).

    The model is put in eval mode (no dropout while sampling) and restored afterwards. A
    `logits_processor` (rows as the prompts of one batch) reshapes the scores before each choice.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encdec = is_encoder_decoder(model)
    eos_ids = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[list[int]]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = (_pad_right if encdec else _pad_left)(chunk, pad_id)
            params: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "num_beams": num_beams,
                "num_return_sequences": num_return_sequences,
                "pad_token_id": pad_id,
                "eos_token_id": sorted(eos_ids) or None,
            }
            if synced_gpus:  # sharded parameters: keep stepping until every process is done
                params["synced_gpus"] = True
            if do_sample:
                params.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
            else:
                params.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if logits_processor is not None:
                params["logits_processor"] = logits_processor
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **params)
            new = out[:, 1:] if encdec else out[:, ids.shape[1] :]  # drop decoder start / prompt
            rows = [cut_at_eos(r.tolist(), eos_ids) for r in new]
            for i in range(len(chunk)):
                results.append(rows[i * num_return_sequences : (i + 1) * num_return_sequences])
    finally:
        model.train(was_training)
    return results
