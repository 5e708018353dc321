"""A local model on task examples: beam-search answers, their task metrics (BLEU, ROUGE, exact
match) and the targets' perplexity under the model. The evaluation stages of `lionkd distill`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import RunConfig
from ..kd.examples import TrainExample, prompt_ids

EVAL_METRICS = ("bleu", "rouge", "exact_match")


def evaluate_model(cfg: RunConfig, path: str, examples: Sequence[TrainExample], *, dtype: str = "auto",
                   device: str = "auto", bars: Any = None, label: str = "eval") -> tuple[dict[str, Any], list[str]]:
    """Beam-search answers to `examples` and their task metrics and target perplexity."""
    from ..kd.decoding import generate_token_ids
    from ..kd.examples import is_encoder_decoder
    from ..llm.hf import load_model
    from .metrics import target_perplexity, text_metrics

    kd = cfg.kd
    model, tokenizer = load_model(path, dtype, device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encdec = is_encoder_decoder(model)
    batch = max(1, cfg.student.generation.batch_size)
    task = bars.add_task(label, total=len(examples)) if bars is not None else None
    predictions: list[str] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = [prompt_ids(tokenizer, e, cfg.student.template, encdec) for e in chunk]
        outputs = generate_token_ids(model, tokenizer, prompts, max_new_tokens=kd.eval_max_new_tokens,
                                     do_sample=False, num_beams=kd.eval_num_beams, batch_size=batch)
        predictions += [tokenizer.decode(o[0], skip_special_tokens=True).strip() for o in outputs]
        if task is not None:
            bars.advance(task, len(chunk))
    references = [e.target for e in examples]
    metrics: dict[str, Any] = {"examples": len(examples), **text_metrics(predictions, references, EVAL_METRICS)}
    metrics["perplexity"] = target_perplexity(model, tokenizer, examples, template=cfg.student.template,
                                              batch_size=batch, max_length=cfg.student.train.max_length)
    return metrics, predictions
