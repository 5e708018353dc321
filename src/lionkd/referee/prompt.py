"""The referee's pairwise prompt: one instruction, two answers ([Assistant 1], [Assistant 2]), two scores.

Two orders of the reply are built in (`lion.referee_order`): the paper's, where the referee explains
before it scores, and scores first. The bracketed markers are the shared format that the sandbox
referee parses; an override of the template must keep the placeholders.
"""

from __future__ import annotations

from ..llm.base import Message

_REFEREE_TASK = """\
Two AI assistants were given the same request. Compare how well each one responded.

[Instruction]
{instruction}

[Assistant 1]
{answer_1}
[End of Assistant 1]

[Assistant 2]
{answer_2}
[End of Assistant 2]

Rate each response on a scale from 1 to 10, where 10 is best, taking into account how helpful, \
relevant and accurate it is and how much useful detail it gives. Judge the content only: neither the \
order of the responses nor their length should sway you.
"""

# The paper's order: the referee reasons before it commits to numbers.
REFEREE_EXPLANATION_FIRST = _REFEREE_TASK + """\
First explain your assessment of the two responses in a few sentences. Then end your reply with \
exactly two lines, and nothing after them:
Assistant 1: <score>
Assistant 2: <score>"""

REFEREE_SCORES_FIRST = _REFEREE_TASK + """\
Reply with exactly two lines first:
Assistant 1: <score>
Assistant 2: <score>
Then give a brief justification of the scores."""

REFEREE_ORDERS = {"explanation_first": REFEREE_EXPLANATION_FIRST, "scores_first": REFEREE_SCORES_FIRST}
REFEREE = REFEREE_EXPLANATION_FIRST  # the default (`lion.referee_order`)

# The placeholders a referee template must keep.
REFEREE_PLACEHOLDERS = ("instruction", "answer_1", "answer_2")


def pairwise_messages(template: str, instruction: str, answer_1: str, answer_2: str) -> list[Message]:
    """The referee's request: `template` filled with the instruction and the two answers in this order."""
    text = template.format(instruction=instruction, answer_1=answer_1, answer_2=answer_2)
    return [{"role": "user", "content": text}]
