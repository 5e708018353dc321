"""The KD trainer's objectives by name ("ce", "logits", "noisy", "attention", "on_policy") and their weights, and the
noise of Noisy KD: does a teacher drop anything in train mode, and the student's noised input tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..config import KD_OBJECTIVES
from ..errors import UserError


def resolve_objective(objective: str | Mapping[str, float] | None, has_teacher: bool) -> dict[str, float]:
    if objective is None:
        objective = {"logits": 1.0} if has_teacher else {"ce": 1.0}
    if isinstance(objective, str):
        objective = {objective: 1.0}
    unknown = sorted(set(objective) - set(KD_OBJECTIVES))  # checked again for callers without a config
    if unknown:
        raise UserError(f"kd.objective: unknown objective '{unknown[0]}' (valid: {', '.join(KD_OBJECTIVES)})")
    weights = {k: float(v) for k, v in objective.items() if v}
    if not weights:
        raise UserError("kd.objective: every weight is zero")
    return weights



DROPOUT_SETTINGS = ("dropout", "attention_dropout", "hidden_dropout", "dropout_rate", "attention_probs_dropout_prob",
                    "hidden_dropout_prob", "activation_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def has_dropout(model: nn.Module) -> bool:
    """Does `model` drop anything in train mode? (Llama-family configs set every dropout to 0.)"""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, k, None), float) and getattr(config, k) > 0 for k in DROPOUT_SETTINGS)


def noisy_input_ids(input_ids: torch.Tensor, where: torch.Tensor, rate: float, vocab: int,
                    special_ids: Sequence[int]) -> torch.Tensor:
    """`input_ids` with each position of `where` replaced, with probability `rate`, by a random ordinary
    token (the noisy student input of Noisy KD; special tokens such as a chat template's stay)."""
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    hit = where.bool() & (torch.rand(input_ids.shape, device=input_ids.device) < rate) & ~torch.isin(input_ids, special)
    random_ids = torch.randint(0, vocab, input_ids.shape, device=input_ids.device)
    bad = torch.isin(random_ids, special)
    return torch.where(hit & ~bad, random_ids, input_ids)
