"""Pseudo-targets (PTs): targets a local teacher generates for labeled and unlabeled inputs.

PTs are generated once, K per input, and kept as records with their provenance (method,
parameters, teacher, index k). Training then follows a schedule: epoch e trains on the gold
targets plus PT number e mod K of every input. The teacher's top-k log-probabilities for each
target token can be cached too, so the teacher forward is not repeated every epoch (the sparse
top-k loss applies then).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from ..config import KDConfig
from ..records import content_id, stable_json
from .decoding import generate_token_ids
from .examples import (
    Collator,
    PromptTemplate,
    TopK,
    TrainExample,
    encode_example,
    is_encoder_decoder,
    prompt_ids,
)

PTMethod = Literal["beam", "sample", "high_temp"]


@dataclass
class PTConfig:
    method: PTMethod = "sample"
    k: int = 4  # pseudo-targets per input
    temperature: float | None = None  # default: 1.0 for "sample", 1.5 for "high_temp"
    top_p: float = 0.95
    num_beams: int = 4  # "beam": at least k
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 0

    @classmethod
    def from_config(cls, kd: KDConfig) -> PTConfig:
        method = "sample" if kd.pt_method == "none" else kd.pt_method
        return cls(method=method, k=kd.pt_count, temperature=kd.pt_temperature, top_p=kd.pt_top_p,
                   num_beams=kd.pt_num_beams, max_new_tokens=kd.pt_max_new_tokens)

    def generation_params(self) -> dict[str, Any]:
        if self.method == "beam":
            return {"do_sample": False, "num_beams": max(self.num_beams, self.k), "num_return_sequences": self.k}
        default_t = 1.5 if self.method == "high_temp" else 1.0
        t = self.temperature if self.temperature is not None else default_t
        return {"do_sample": True, "temperature": t, "top_p": self.top_p, "num_return_sequences": self.k}


def generate_pseudo_targets(
    teacher: Any,
    tokenizer: Any,
    inputs: Sequence[TrainExample],
    settings: PTConfig | None = None,
    *,
    template: PromptTemplate = "chat",
    teacher_name: str | None = None,
) -> list[dict[str, Any]]:
    """K pseudo-targets for each input (its `target`, if any, is ignored), as provenance records.

    Record keys: id, input_id, k, target, finished (ended with EOS), method, params, teacher, and the
    input's prompt or messages.
    """
    settings = settings or PTConfig()
    encdec = is_encoder_decoder(teacher)
    params = settings.generation_params()
    name = teacher_name or getattr(teacher, "name_or_path", "") or type(teacher).__name__
    prompts = [prompt_ids(tokenizer, x, template, encdec) for x in inputs]
    torch.manual_seed(settings.seed)
    outputs = generate_token_ids(
        teacher, tokenizer, prompts, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
        num_beams=params.get("num_beams", 1), num_return_sequences=settings.k, do_sample=params["do_sample"],
        temperature=params.get("temperature", 1.0), top_p=params.get("top_p", 1.0),
    )
    eos = tokenizer.eos_token_id
    records = []
    recorded_params = {**params, "max_new_tokens": settings.max_new_tokens, "seed": settings.seed}
    for example, sequences in zip(inputs, outputs, strict=True):
        for k, ids in enumerate(sequences):
            records.append({
                "id": content_id(example.id, settings.method, stable_json(recorded_params), name, str(k)),
                "input_id": example.id,
                "k": k,
                "target": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "finished": bool(ids) and ids[-1] == eos,
                "method": settings.method,
                "params": recorded_params,
                "teacher": name,
                "prompt": example.prompt,
                "messages": example.messages,
            })
    return records


def pt_examples(records: Sequence[dict[str, Any]], weight: float = 1.0) -> list[TrainExample]:
    return [
        TrainExample(target=r["target"], prompt=r.get("prompt"), messages=r.get("messages"), weight=weight,
                     source="pt")
        for r in records
    ]


def pt_schedule(gold: Sequence[TrainExample], records: Sequence[dict[str, Any]]) -> list[list[TrainExample]]:
    """Per-epoch example lists: list e holds the gold examples and PT number e mod K of every input.

    Pass the result to `train_student` as `examples`; it trains epoch e on list e mod len(lists).
    """
    by_input: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_input[r["input_id"]].append(r)
    if not by_input:
        return [list(gold)]
    for rs in by_input.values():
        rs.sort(key=lambda r: r["k"])
    k = max(len(rs) for rs in by_input.values())
    return [list(gold) + pt_examples([rs[e % len(rs)] for rs in by_input.values()]) for e in range(k)]


def records_to_dataset(records: Sequence[dict[str, Any]]) -> Any:
    """The records as a Hugging Face `datasets.Dataset` (Arrow), for export and larger pipelines."""
    import datasets

    rows = [{**r, "params": stable_json(r["params"]), "messages": stable_json(r["messages"])} for r in records]
    return datasets.Dataset.from_list(rows)


@torch.no_grad()
def cache_teacher_topk(
    teacher: Any,
    tokenizer: Any,
    examples: Sequence[TrainExample],
    k: int = 20,
    *,
    template: PromptTemplate = "chat",
    max_length: int = 1024,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[TrainExample]:
    """The examples with the teacher's top-k log-probabilities (at `temperature`) for every target token.

    Tokenised exactly as training does (same template and `max_length`), so the cache lines up.
    """
    encdec = is_encoder_decoder(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad_token_id=pad, encoder_decoder=encdec,
                       decoder_start_token_id=getattr(teacher.config, "decoder_start_token_id", None),
                       features_key=False)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out: list[TrainExample] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            feats = [encode_example(tokenizer, e, template=template, max_length=max_length, encoder_decoder=encdec)
                     for e in chunk]
            batch = collate(feats)
            names = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
            logits = teacher(**{n: batch[n].to(device) for n in names if n in batch}, use_cache=False).logits
            for i, (example, f) in enumerate(zip(chunk, feats, strict=True)):
                first = 0 if encdec else len(f["prompt"]) - 1
                rows = logits[i, max(first, 0) : first + len(f["target"])].float() / temperature
                values, ids = rows.log_softmax(-1).topk(k, dim=-1)
                top_ids, top_lp = ids.tolist(), values.tolist()
                if first < 0:  # no prompt: the first target token has no prediction; pad its slot
                    top_ids, top_lp = [top_ids[0], *top_ids], [top_lp[0], *top_lp]
                out.append(replace(example, teacher_topk=TopK(ids=top_ids, logprobs=top_lp)))
    finally:
        teacher.train(was_training)
    return out
