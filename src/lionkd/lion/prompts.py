"""The prompts of the Lion roles, in one place (the referee's own templates are `lionkd.referee.prompt`).

Each prompt is a template with named placeholders; `lion.prompts.<key>` in the config replaces the
built-in text. The bracketed markers ([Instruction], [Assistant 1], [Seed instruction], ...) are the
shared format that the referee and generator read (and that the sandbox oracles parse), so an
override must keep its placeholders; the wording around them is free.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from ..config import PromptOverrides
from ..errors import UserError
from ..llm.base import Message
from ..referee.prompt import REFEREE, REFEREE_ORDERS, REFEREE_PLACEHOLDERS, pairwise_messages

TEACHER_SYSTEM = "You are a knowledgeable assistant. Answer the user's request accurately, clearly and completely."

# The authors ask for a new task of similar length and difficulty, from both prompts: "at least as
# demanding" would let the tasks drift harder with every iteration, away from what the student is
# being tested on, and a long-tail task should be rarer in topic, not in size.
GENERATOR_HARD = """\
You write new tasks for training an AI assistant. Below is an example task.

[Seed instruction]
{seed}
[End of seed instruction]

Write one new task that belongs to the same subject area and asks for the same kind of work as the \
example (the same task type), but is a different request, not a rewording of it. Keep it about as \
long and about as difficult as the example, and answerable on its own. Reply with the new task text \
only, without a title, numbering or commentary."""

GENERATOR_EASY = """\
You write new tasks for training an AI assistant. Below is an example task.

[Seed instruction]
{seed}
[End of seed instruction]

Write one new task from the same subject area that covers a rarer, less common topic or kind of \
request than the example: something from the long tail of that area that an assistant seldom sees. \
Keep it about as long and about as difficult as the example, and answerable on its own. Reply with \
the new task text only, without a title, numbering or commentary."""

# The placeholders every template must keep.
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "teacher_system": (),
    "referee": REFEREE_PLACEHOLDERS,
    "generator_hard": ("seed",),
    "generator_easy": ("seed",),
}

# Marker lines of the shared formats; a generated instruction that repeats one is an echo of the prompt.
PROMPT_MARKERS = (
    "[Seed instruction]", "[End of seed instruction]", "[Instruction]", "[Assistant 1]", "[Assistant 2]",
)


@dataclass(frozen=True)
class LionPrompts:
    """The four prompt templates of one run."""

    teacher_system: str = TEACHER_SYSTEM
    referee: str = REFEREE
    generator_hard: str = GENERATOR_HARD
    generator_easy: str = GENERATOR_EASY

    @classmethod
    def from_config(cls, overrides: PromptOverrides, referee_order: str = "explanation_first") -> LionPrompts:
        """The built-in prompts (the referee's in `referee_order`) with the config's overrides; an
        override must keep its placeholders."""
        chosen = {"referee": REFEREE_ORDERS[referee_order]}
        for key, required in PLACEHOLDERS.items():
            text = getattr(overrides, key)
            if text is None:
                continue
            found = _placeholders(text, f"lion.prompts.{key}")
            missing = [p for p in required if p not in found]
            unknown = sorted(found - set(required))
            if missing:
                raise UserError(f"lion.prompts.{key}: missing placeholder {{{missing[0]}}} "
                                f"(needs {', '.join('{' + p + '}' for p in required)})")
            if unknown:
                raise UserError(f"lion.prompts.{key}: unknown placeholder {{{unknown[0]}}} "
                                f"(write literal braces as {{{{ and }}}})")
            chosen[key] = text
        return cls(**chosen)

    def teacher_messages(self, instruction: str) -> list[Message]:
        messages = [{"role": "system", "content": self.teacher_system}] if self.teacher_system else []
        return [*messages, {"role": "user", "content": instruction}]

    def referee_messages(self, instruction: str, answer_1: str, answer_2: str) -> list[Message]:
        return pairwise_messages(self.referee, instruction, answer_1, answer_2)

    def generator_messages(self, seed: str, mode: str) -> list[Message]:
        template = self.generator_hard if mode == "hard" else self.generator_easy
        return [{"role": "user", "content": template.format(seed=seed)}]


def _placeholders(text: str, key: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise UserError(f"{key}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None


def student_messages(instruction: str, system_prompt: str | None = None) -> list[Message]:
    """How the student is asked, in training and generation alike: the instruction, after the
    configured system prompt if there is one."""
    system: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": instruction}]
