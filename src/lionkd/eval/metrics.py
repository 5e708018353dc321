"""Task metrics for generated text: sacreBLEU, ROUGE-1/2/L, exact match, target perplexity, BERTScore.

Every score is on a 0-100 scale except perplexity. BLEU and ROUGE are computed by the reference
libraries (`sacrebleu`, `rouge_score`) so the numbers match what papers report; ROUGE is the mean
of per-example F1, and `rouge_mean` the mean of R-1/2/L as in the pseudo-target study.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from ..kd.examples import Collator, PromptTemplate, TrainExample, encode_example, is_encoder_decoder
from ..kd.heads import head_inputs, plain_linear_head

TASK_METRICS = ("bleu", "rouge", "exact_match")
ALL_METRICS = (*TASK_METRICS, "perplexity", "bertscore")
SCORE_CHUNK = 1024  # target positions projected onto the vocabulary at once in `perplexity`


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def bleu(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacreBLEU defaults). A reference may be one string or a list of alternatives."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    per_example = [[r] if isinstance(r, str) else list(r) for r in references]
    depth = max(len(r) for r in per_example)
    # sacrebleu wants one stream per reference position; a missing alternative is None
    streams = [[refs[i] if i < len(refs) else None for refs in per_example] for i in range(depth)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L over examples, and their mean (`rouge_mean`)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=use_stemmer)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    n = max(len(predictions), 1)
    out = {kind: 100 * totals[kind] / n for kind in kinds}
    out["rouge_mean"] = sum(out[k] for k in kinds) / len(kinds)
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no English articles, single spaces (SQuAD-style)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalise_answer`, in %."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(normalise_answer(p) == normalise_answer(r) for p, r in zip(predictions, references, strict=True))
    return 100 * hits / len(predictions)


@torch.no_grad()
def target_perplexity(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    *,
    template: PromptTemplate = "chat",
    batch_size: int = 8,
    max_length: int = 1024,
) -> float:
    """exp of the mean teacher-forced loss over all target tokens (and EOS); prompt tokens are masked.

    Examples are encoded exactly as in training (`lionkd.kd.examples`), so the number is comparable to
    the training loss.
    """
    if not examples:
        return float("nan")
    encoder_decoder = is_encoder_decoder(model)
    features = [
        encode_example(tokenizer, ex, template=template, max_length=max_length, encoder_decoder=encoder_decoder)
        for ex in examples
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = getattr(model.config, "decoder_start_token_id", None)
    collate = Collator(pad, encoder_decoder=encoder_decoder, decoder_start_token_id=start, features_key=False)
    device = next(model.parameters()).device
    head = plain_linear_head(model)  # its input is captured and projected at the target positions only
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0.0
    try:
        for begin in range(0, len(features), batch_size):
            batch = collate(features[begin : begin + batch_size])
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            if encoder_decoder:
                inputs["decoder_input_ids"] = batch["decoder_input_ids"].to(device)
                inputs["decoder_attention_mask"] = batch["decoder_attention_mask"].to(device)
            chosen = batch["target_mask"].to(device) > 0
            targets = batch["target_ids"].to(device)[chosen]
            with torch.no_grad(), head_inputs(head) as hidden:
                out = model(**inputs)
            # Only target positions are scored, a chunk at a time: fp32 logits of a whole batch over a
            # 150K vocabulary would take tens of GB.
            rows = hidden[-1][chosen] if head is not None else out.logits[chosen]
            for c in range(0, len(rows), SCORE_CHUNK):
                logits = head(rows[c : c + SCORE_CHUNK]) if head is not None else rows[c : c + SCORE_CHUNK]
                total_nll += float(torch.nn.functional.cross_entropy(
                    logits.float(), targets[c : c + SCORE_CHUNK], reduction="sum"))
            total_tokens += float(chosen.sum())
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def bertscore(
    predictions: Sequence[str], references: Sequence[str], *, model_type: str | None = None, lang: str = "en",
    batch_size: int = 32, device: str | None = None,
) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 (x100). Needs the optional `bert-score` package."""
    try:
        from bert_score import score as bert_score
    except ImportError:
        raise UserError("metric 'bertscore' needs the bert-score package: pip install 'lionkd[eval]'") from None
    _check_lengths(predictions, references)
    p, r, f = bert_score(list(predictions), list(references), model_type=model_type, lang=lang,
                         batch_size=batch_size, device=device, verbose=False)
    return {"bertscore_precision": 100 * float(p.mean()), "bertscore_recall": 100 * float(r.mean()),
            "bertscore_f1": 100 * float(f.mean())}


def text_metrics(predictions: Sequence[str], references: Sequence[str], names: Sequence[str] = TASK_METRICS,
                 **bertscore_options: Any) -> dict[str, float]:
    """The requested text-only metrics (`bleu`, `rouge`, `exact_match`, `bertscore`) as one flat dict."""
    out: dict[str, float] = {}
    if "bleu" in names:
        out["bleu"] = bleu(predictions, references)
    if "rouge" in names:
        out.update(rouge(predictions, references))
    if "exact_match" in names:
        out["exact_match"] = exact_match(predictions, references)
    if "bertscore" in names:
        out.update(bertscore(predictions, references, **bertscore_options))
    return out
