"""A role that cannot do its job stops the run early, in one line, instead of letting it build on nothing.

A teacher whose answers are empty, a referee whose verdicts cannot be read, a generator whose replies
all fail the filters: each is seen after the first batch of its stage (before the rest is paid for)
and again at the stage's end. The line names the role's model, the share that worked against the
floor, and the shortest failing reply, so the user sees at once what the model wrote.
"""

from __future__ import annotations

from ..errors import UserError

# Replies looked at before the first check: enough not to stop on one bad reply, few enough to be cheap.
FIRST_BATCH = 8
EXAMPLE_CHARS = 100


class RoleCannotWork(UserError):
    """A role's replies are mostly unusable; finished work is saved, the stage stops before paying for more."""


def shortest(texts: list[str]) -> str:
    """The shortest of `texts`, on one line and cut to EXAMPLE_CHARS characters, quoted."""
    if not texts:
        return "''"
    text = " ".join(min(texts, key=len).split())
    return repr(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "...")


def check_share(*, role: str, model: str, good: int, total: int, floor: float, what: str, failing: list[str],
                key: str, advice: str) -> None:
    """Raise RoleCannotWork when `good / total` is below `floor` (0 disables the check)."""
    if floor <= 0 or total == 0 or good / total >= floor:
        return
    raise RoleCannotWork(
        f"{role} '{model}': only {good} of {total} {what} ({good / total:.0%}, below {key} {floor:g}); "
        f"shortest failing reply: {shortest(failing)}; stopped before the rest of the stage is paid for - "
        f"{advice}, or set {key}: 0 to go on anyway; finished work is saved")
