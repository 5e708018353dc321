"""How a student sees a conversation: its tokenizer's chat template, or the Alpaca template.

Training and inference both go through `render_prompt`, so the student is asked questions in
exactly the form it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from ..errors import UserError
from .base import Message

Template = Literal["chat", "alpaca"]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_REPLY_MARK = "lionkd-reply-7f3a"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token a chat template writes right after an assistant's reply ([] if none).

    Read from the template itself, by rendering a reply and looking at what follows it: `<|im_end|>`
    for ChatML, `<|eot_id|>` for Llama 3, `<end_of_turn>` for Gemma. `tokenizer.eos_token` alone is
    not enough: many chat models' EOS is a document end that their replies never write.
    """
    if not has_chat_template(tokenizer):
        return []
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # a template that cannot render a finished turn has no end-of-turn to learn
        return []
    at = text.rfind(_REPLY_MARK)
    if at < 0:
        return []
    after = tokenizer(text[at + len(_REPLY_MARK):].lstrip(), add_special_tokens=False)["input_ids"]
    return after[:1] if after and _is_special(tokenizer, after[0]) else []


def _is_special(tokenizer: Any, token_id: int) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a generated reply: the model's EOS (generation config and config), the
    tokenizer's, and the chat template's end of turn. Extra stops cost nothing; a missing one lets a
    chat model run on into an invented next turn."""
    named = (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
             getattr(getattr(model, "config", None), "eos_token_id", None), tokenizer.eos_token_id)
    ids: set[int] = set()
    for eos in named:
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids | set(end_of_turn_ids(tokenizer))


def answer_end_id(tokenizer: Any, template: str, where: str = "") -> int:
    """The token a trained answer ends with: the chat template's end of turn, else EOS.

    A chat template that writes no special token after a reply cannot teach the student where to
    stop, so it is refused rather than trained with a token the template never shows.
    """
    where = where or getattr(tokenizer, "name_or_path", "") or "tokenizer"
    if template == "chat" and has_chat_template(tokenizer):
        ends = end_of_turn_ids(tokenizer)
        if not ends:
            raise UserError(f"{where}: the chat template writes no end-of-turn token after a "
                            "reply; use a template that does, or `template: alpaca`")
        return ends[0]
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: the tokenizer has no EOS token; an answer must end with one")
    return tokenizer.eos_token_id


def render_prompt(tokenizer: Any, messages: Sequence[Message], template: Template = "chat") -> str:
    """The text a causal student is conditioned on, ending where its answer starts."""
    if template == "chat" and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    user = [m["content"] for m in messages if m["role"] == "user"]
    instruction = user[-1] if user else ""
    return alpaca_prompt(instruction if not system else f"{system}\n\n{instruction}")
