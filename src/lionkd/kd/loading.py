"""Loading the models and tokenizers a training takes: from a folder, or as given (a model object)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
)

from ..errors import UserError


def load_model(spec: str | Path | PreTrainedModel, dtype: torch.dtype | None = None) -> PreTrainedModel:
    if isinstance(spec, PreTrainedModel):
        return spec
    path = str(spec)
    if not Path(path).exists():
        from ..llm.models import model_not_found

        raise model_not_found(path)
    config = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype) if dtype is not None else cls.from_pretrained(path)


def load_tokenizer(spec: str | Path | PreTrainedModel, tokenizer: Any = None) -> Any:
    if tokenizer is None:
        path = spec.name_or_path if isinstance(spec, PreTrainedModel) else str(spec)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"no tokenizer found for {path}: pass one") from exc
    if tokenizer.pad_token_id is None:
        # masks come from positions, so padding with EOS never hides a real EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_vocab(student_tok: Any, teacher_tok: Any) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens): "
            "logit KD needs one vocabulary; use sequence-level KD (objective 'ce' on teacher text)"
        )
