"""How a student sees a conversation: its tokenizer's chat template, or the Alpaca template.

Training and inference both go through `render_prompt`, so the student is asked questions in
exactly the form it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

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


def render_prompt(tokenizer: Any, messages: Sequence[Message], template: Template = "chat") -> str:
    """The text a causal student is conditioned on, ending where its answer starts."""
    if template == "chat" and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    user = [m["content"] for m in messages if m["role"] == "user"]
    instruction = user[-1] if user else ""
    return alpaca_prompt(instruction if not system else f"{system}\n\n{instruction}")
