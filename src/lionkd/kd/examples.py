"""Training examples, their tokenisation and collation into batches with loss masks.

A `TrainExample` is a prompt (chat messages or plain text) and a target text. Decoder-only students
see `render_prompt(prompt) + target + EOS` and learn the target and EOS only; encoder-decoder
students read the prompt as source and produce the target. Masks are built from positions, never
by comparing token ids with the pad id, so an EOS that equals the pad token is still learned.

Batches carry, for every logits position t, the token the model must predict there
(`target_ids`) and its weight (`target_mask`): the shift of causal models happens here, once,
so the losses never slice or copy a logits tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..llm.base import Message
from ..llm.templates import answer_end_id, render_prompt
from ..records import content_id, stable_json

PromptTemplate = Literal["chat", "alpaca", "raw"]  # "raw": a text prompt is used verbatim


@dataclass
class TopK:
    """The teacher's top-k next-token ids and log-probabilities for each target token (and EOS)."""

    ids: list[list[int]]
    logprobs: list[list[float]]


@dataclass
class TrainExample:
    """One (prompt, target) pair. Give `messages` or `prompt` (text, one user turn)."""

    target: str
    prompt: str | None = None
    messages: list[Message] | None = None
    weight: float = 1.0
    teacher_topk: TopK | None = None  # cached teacher outputs for exactly these target tokens
    source: str = "gold"  # "gold" | "pt" | "student" - provenance, for logs and schedules
    id: str = ""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("TrainExample needs exactly one of prompt or messages")
        if not self.id:
            self.id = content_id(stable_json(self.prompt_messages()), self.target)

    def prompt_messages(self) -> list[Message]:
        return list(self.messages) if self.messages is not None else [{"role": "user", "content": self.prompt or ""}]

    def source_text(self) -> str:
        """The prompt as one plain text (the encoder input of encoder-decoder students)."""
        if self.prompt is not None:
            return self.prompt
        return "\n\n".join(m["content"] for m in self.messages or () if m["role"] in ("system", "user"))


def is_encoder_decoder(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", model), "is_encoder_decoder", False))


def prompt_text(tokenizer: Any, example: TrainExample, template: PromptTemplate) -> str:
    if template == "raw":
        return example.source_text()
    return render_prompt(tokenizer, example.prompt_messages(), template)


def prompt_ids(tokenizer: Any, example: TrainExample, template: PromptTemplate, encoder_decoder: bool) -> list[int]:
    """Token ids the student is conditioned on (decoder prefix, or encoder input)."""
    if encoder_decoder:
        return tokenizer(example.source_text(), add_special_tokens=True)["input_ids"]
    text = prompt_text(tokenizer, example, template)
    # A chat template writes its own BOS; other prompts get the tokenizer's special tokens.
    rendered_by_chat = template == "chat" and bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not rendered_by_chat)["input_ids"]


def target_ids(tokenizer: Any, text: str, template: PromptTemplate = "chat") -> list[int]:
    """The answer's tokens and the token that ends it (the chat template's end of turn, else EOS)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, answer_end_id(tokenizer, template)]


def fit_length(prompt: list[int], target: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut to `max_length` tokens: the prompt loses its start (down to half), then the target its end."""
    if len(prompt) + len(target) <= max_length:
        return prompt, target
    keep_prompt = max(max_length - len(target), min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt :] if keep_prompt else []
    return prompt, target[: max_length - len(prompt)]


def encode_example(
    tokenizer: Any,
    example: TrainExample,
    *,
    template: PromptTemplate = "chat",
    max_length: int = 1024,
    encoder_decoder: bool = False,
) -> dict[str, Any]:
    """Token ids of one example: {"prompt", "target", "weight", "topk_ids"?, "topk_logprobs"?, "id"}."""
    prompt = prompt_ids(tokenizer, example, template, encoder_decoder)
    target = target_ids(tokenizer, example.target, "raw" if encoder_decoder else template)
    if encoder_decoder:
        prompt, target = prompt[:max_length], target[:max_length]
    else:
        prompt, target = fit_length(prompt, target, max_length)
    feature: dict[str, Any] = {"prompt": prompt, "target": target, "weight": example.weight, "id": example.id}
    if example.teacher_topk is not None:
        n = len(target)
        if len(example.teacher_topk.ids) < n:
            raise ValueError(f"example {example.id}: cached teacher top-k covers fewer tokens than the target")
        feature["topk_ids"] = example.teacher_topk.ids[:n]
        feature["topk_logprobs"] = example.teacher_topk.logprobs[:n]
    return feature


@dataclass
class Collator:
    """Pads encoded examples into a batch (right padding; left-padded prompts for generation).

    Keys: input_ids, attention_mask, target_ids, target_mask (float weights), token_mask (the
    target tokens' own positions, for hidden-state objectives), prompt_ids / prompt_mask (left
    padded), decoder_input_ids (encoder-decoder), topk_ids / topk_logprobs (when cached), and
    `features` (the encoded examples, so a batch can be rebuilt with new targets).
    """

    pad_token_id: int
    encoder_decoder: bool = False
    decoder_start_token_id: int | None = None
    features_key: bool = True

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self._encdec(features) if self.encoder_decoder else self._causal(features)
        batch.update(self._prompts(features))
        if all("topk_ids" in f for f in features):
            batch.update(self._topk(features))
        elif any("topk_ids" in f for f in features):
            raise ValueError("a batch mixes examples with and without cached teacher top-k")
        if self.features_key:
            batch["features"] = list(features)
        return batch

    def _causal(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["prompt"]) + len(f["target"]) for f in features)
        b = len(features)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(b, width, dtype=torch.long)
        token_mask = torch.zeros(b, width)
        for i, f in enumerate(features):
            ids = f["prompt"] + f["target"]
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            token_mask[i, len(f["prompt"]) : len(ids)] = f["weight"]
        # logits at t predict token t + 1
        target_ids = torch.full_like(input_ids, self.pad_token_id)
        target_ids[:, :-1] = input_ids[:, 1:]
        target_mask = torch.zeros_like(token_mask)
        target_mask[:, :-1] = token_mask[:, 1:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "target_ids": target_ids,
            "target_mask": target_mask,
            "token_mask": token_mask,
        }

    def _encdec(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        b = len(features)
        src_w = max(len(f["prompt"]) for f in features)
        tgt_w = max(len(f["target"]) for f in features)
        input_ids = torch.full((b, src_w), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros(b, src_w, dtype=torch.long)
        targets = torch.full((b, tgt_w), self.pad_token_id, dtype=torch.long)
        target_mask = torch.zeros(b, tgt_w)
        decoder_attention = torch.zeros(b, tgt_w, dtype=torch.long)
        for i, f in enumerate(features):
            input_ids[i, : len(f["prompt"])] = torch.tensor(f["prompt"])
            attention[i, : len(f["prompt"])] = 1
            targets[i, : len(f["target"])] = torch.tensor(f["target"])
            target_mask[i, : len(f["target"])] = f["weight"]
            decoder_attention[i, : len(f["target"])] = 1
        start = self.decoder_start_token_id if self.decoder_start_token_id is not None else self.pad_token_id
        decoder_input_ids = torch.full_like(targets, self.pad_token_id)
        decoder_input_ids[:, 0] = start
        decoder_input_ids[:, 1:] = targets[:, :-1]
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "decoder_input_ids": decoder_input_ids,
            "decoder_attention_mask": decoder_attention,
            "target_ids": targets,
            "target_mask": target_mask,
            "token_mask": target_mask.clone(),
        }

    def _prompts(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["prompt"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["prompt"])
            if n:
                ids[i, width - n :] = torch.tensor(f["prompt"])
                mask[i, width - n :] = 1
        return {"prompt_ids": ids, "prompt_mask": mask}

    def _topk(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Cached top-k, aligned with the logits positions that predict each target token."""
        k = len(features[0]["topk_ids"][0])
        width = (
            max(len(f["target"]) for f in features)
            if self.encoder_decoder
            else max(len(f["prompt"]) + len(f["target"]) for f in features)
        )
        ids = torch.zeros(len(features), width, k, dtype=torch.long)
        logprobs = torch.zeros(len(features), width, k)
        for i, f in enumerate(features):
            top_ids, top_logprobs = f["topk_ids"], f["topk_logprobs"]
            start = 0 if self.encoder_decoder else len(f["prompt"]) - 1
            if start < 0:  # no prompt: nothing predicts the first target token
                top_ids, top_logprobs, start = top_ids[1:], top_logprobs[1:], 0
            n = len(top_ids)
            if n:
                ids[i, start : start + n] = torch.tensor(top_ids, dtype=torch.long)
                logprobs[i, start : start + n] = torch.tensor(top_logprobs)
        return {"topk_ids": ids, "topk_logprobs": logprobs}


class ExampleDataset(torch.utils.data.Dataset):
    """Encoded examples; `set_epoch` (called by the trainer each epoch) may swap the examples in."""

    def __init__(self, features: Sequence[dict[str, Any]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]


class EpochDataset(torch.utils.data.Dataset):
    """A different list of encoded examples each epoch (same length): epoch e reads lists[e mod n]."""

    def __init__(self, per_epoch: Sequence[Sequence[dict[str, Any]]]) -> None:
        if not per_epoch or len({len(x) for x in per_epoch}) != 1:
            raise ValueError("EpochDataset needs one or more lists of equal length")
        self.per_epoch = [list(x) for x in per_epoch]
        self.epoch = 0
        self.read: set[int] = set()  # the lists items were read from since `set_epoch`: what really trained

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.read = set()

    def __len__(self) -> int:
        return len(self.per_epoch[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.epoch % len(self.per_epoch)
        self.read.add(k)
        return self.per_epoch[k][i]
