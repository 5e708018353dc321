"""What the sandbox teacher, referee and generator say, as plain functions of a prompt and a RNG.

They read the prompt formats of the shared contract (the instruction is the last user message; the
referee's `[Instruction]` / `[Assistant 1]` / `[Assistant 2]` blocks; the generator's
`[Seed instruction]` block) and answer from the exact task world. Every random choice comes from
the `rng` passed in, so the backend makes them deterministic by seeding it from the request.
"""

from __future__ import annotations

import random
import re

from . import world
from .world import Instance

GENERIC_REPLY = "I am not sure what you are asking. Could you rephrase it as one of the tasks I know?"

_REFEREE_BLOCKS = re.compile(
    r"\[Instruction\]\s*\n(?P<instruction>.*?)\n\s*\[Assistant 1\]\s*\n(?P<a1>.*?)\n?\[End of Assistant 1\]"
    r".*?\[Assistant 2\]\s*\n(?P<a2>.*?)\n?\[End of Assistant 2\]",
    re.S,
)
_SEED_BLOCK = re.compile(r"\[Seed instruction\]\s*\n(?P<seed>.*?)\n?\s*\[End of seed instruction\]", re.S)

# Score lines in several surface forms a tolerant parser must read; {e} is the explanation.
_REFEREE_FORMATS = (
    "Assistant 1: {s1}\nAssistant 2: {s2}\n{e}",
    "**Assistant 1:** {s1}/10\n**Assistant 2:** {s2}/10\n\n{e}",
    "Assistant 2: {s2}\nAssistant 1: {s1}\n{e}",
    "Assistant 1: {s1} out of 10\nAssistant 2: {s2} out of 10\n{e}",
)
# The same when the prompt asks for the explanation first ({n} names the assistants in it, as real
# referees do, so a parser must tell a score line from a sentence about an assistant).
_REFEREE_FORMATS_EXPLANATION_FIRST = (
    "{n}\n\nAssistant 1: {s1}\nAssistant 2: {s2}",
    "{n}\n\n**Assistant 1:** {s1}/10\n**Assistant 2:** {s2}/10",
    "{e}\n\nAssistant 1: {s1}\nAssistant 2: {s2}",
    "{n} Scores follow.\n\nAssistant 1: {s1} out of 10\nAssistant 2: {s2} out of 10",
)
# After the answers, a prompt that mentions an explanation before its first score line asks for it first.
_EXPLANATION_WORD = re.compile(r"explain|explanation|justif|reasoning", re.I)
_SCORE_TEMPLATE = re.compile(r"assistant\s*1\W*<score>", re.I)
# Replies a parser cannot read: no scores, scores in words, one score missing.
_MALFORMED_FORMATS = (
    "Both answers address the question; each has its strengths and weaknesses.",
    "Assistant 1: good\nAssistant 2: poor\n{e}",
    "Assistant 1: {s1}\n{e}",
)


# ---- teacher ---------------------------------------------------------------------------------


def teacher_reply(instruction: str, rng: random.Random, error_rate: float = 0.0) -> str:
    """The exact answer; with probability `error_rate` a plausible wrong one instead."""
    inst = world.parse(instruction)
    if inst is None:
        return GENERIC_REPLY
    if rng.random() < error_rate:
        return world.corrupt(inst, rng)
    return inst.answer


# ---- referee ---------------------------------------------------------------------------------


def parse_referee_prompt(text: str) -> tuple[str, str, str] | None:
    """(instruction, answer 1, answer 2) from the referee blocks, or None."""
    m = _REFEREE_BLOCKS.search(text)
    if not m:
        return None
    return m["instruction"].strip(), m["a1"].strip(), m["a2"].strip()


def points(inst: Instance | None, answer_text: str) -> int:
    """Partial credit on the referee's 1-10 scale."""
    if inst is None:  # not a sandbox task: the referee can only tell empty from non-empty
        return 5 if answer_text.strip() else 1
    return 1 + round(9 * world.score(inst, answer_text))


def _explain(p1: float, p2: float) -> str:
    if p1 == p2 == 10:
        return "Both assistants give the correct answer."
    if p1 == 10:
        return "The first answer is correct and the second is not."
    if p2 == 10:
        return "The second answer is correct and the first is not."
    if p1 == p2:
        return "Neither answer is correct, and they are equally far from it."
    closer = "first" if p1 > p2 else "second"
    return f"Neither answer is correct, but the {closer} one is closer."


def _explain_named(p1: float, p2: float) -> str:
    if p1 == p2 == 10:
        return "Assistant 1 and Assistant 2 both give the correct answer."
    if p1 == 10:
        return "Assistant 1 is 100% correct, while Assistant 2 gets it wrong."
    if p2 == 10:
        return "Assistant 2 is correct; Assistant 1 is not."
    if p1 == p2:
        return "Assistant 1 and Assistant 2 are equally far from the correct answer."
    closer = "Assistant 1" if p1 > p2 else "Assistant 2"
    return f"Neither is correct, but {closer} is closer: 1 of the 2 parts is right."


def asks_explanation_first(prompt: str) -> bool:
    """Does the referee prompt ask for the explanation before the score lines?"""
    tail = prompt[prompt.find("[End of Assistant 2]"):]
    m = _SCORE_TEMPLATE.search(tail)
    return m is not None and _EXPLANATION_WORD.search(tail[: m.start()]) is not None


def _fmt(score: float) -> str:
    return str(int(score)) if float(score).is_integer() else f"{score:.1f}"


def biased(p1: float, p2: float, position_bias: float) -> tuple[float, float]:
    """Scores with Assistant 1 favoured by `position_bias` points on the 1-10 scale.

    The bias acts on the difference, as a real referee's preference for the first answer does: where
    Assistant 1 is already at the top of the scale, Assistant 2 is marked down instead. So the bias
    cancels exactly when Lion averages the two orders; capping Assistant 1 at 10 alone would not (a
    correct teacher could never collect it, a student could), and a student at 9/10 would look easy.
    """
    s1, s2 = p1 + position_bias, float(p2)
    if s1 > 10:
        s1, s2 = 10.0, s2 - (s1 - 10)
    elif s1 < 1:
        s1, s2 = 1.0, s2 + (1 - s1)
    return s1, min(10.0, max(1.0, s2))


def referee_reply(
    prompt: str, rng: random.Random, position_bias: float = 0.0, malformed_rate: float = 0.0
) -> str:
    """Two score lines (surface form varies) and a one-sentence explanation, in the order the prompt asks."""
    blocks = parse_referee_prompt(prompt)
    if blocks is None:
        return "I could not find an instruction and two answers to compare."
    instruction, a1, a2 = blocks
    inst = world.parse(instruction)
    p1, p2 = points(inst, a1), points(inst, a2)
    e = _explain(p1, p2)
    s1, s2 = biased(p1, p2, position_bias)
    if rng.random() < malformed_rate:
        return rng.choice(_MALFORMED_FORMATS).format(s1=_fmt(s1), s2=_fmt(s2), e=e)
    formats = _REFEREE_FORMATS_EXPLANATION_FIRST if asks_explanation_first(prompt) else _REFEREE_FORMATS
    return rng.choice(formats).format(s1=_fmt(s1), s2=_fmt(s2), e=e, n=_explain_named(p1, p2))


# ---- generator -------------------------------------------------------------------------------


def parse_generator_seed(text: str) -> str | None:
    m = _SEED_BLOCK.search(text)
    return m["seed"].strip() if m else None


# How the generator tells Lion's two prompts apart (`lion.prompts.GENERATOR_HARD` / `GENERATOR_EASY`):
# the easy (long-tail) prompt asks for a rarer topic, the hard one never says "rare". The coupling is
# checked by a test that feeds both prompts of `lionkd.lion.prompts` to this generator.
RARE_CUE = re.compile(r"\brarer?\b|long tail|less common", re.I)
# The level of a generated instruction relative to its seed's: "about as difficult" is the seed's
# level or one either side, the seed's own most often.
LEVEL_STEPS = {-1: 0.25, 0: 0.5, 1: 0.25}


def wants_rare(prompt: str) -> bool:
    """Does the prompt ask for a rarer instruction? (The seed itself may hold made-up words like "rare".)"""
    return RARE_CUE.search(_SEED_BLOCK.sub(" ", prompt)) is not None


def similar_level(seed: Instance, task: str, rng: random.Random) -> int:
    """A level of `task` within one of the seed's (the world's levels mean the same in every type)."""
    levels = world.TASKS[task].levels
    steps = [s for s in LEVEL_STEPS if seed.level + s in levels]
    return seed.level + rng.choices(steps, [LEVEL_STEPS[s] for s in steps])[0]


def rarer_tasks(seed: Instance) -> list[str]:
    """The types of the seed's domain less common than the seed's; the domain's other types if none is."""
    others = [t for t in world.DOMAINS[seed.domain] if t != seed.task]
    rarer = [t for t in others if world.TASKS[t].weight < seed.spec.weight]
    return rarer or others or [seed.task]


def _same_type(seed: Instance, rng: random.Random) -> Instance:
    """What the hard prompt asks for: the same task type, about as difficult, newly worded."""
    return world.sample(rng, task=seed.task, level=similar_level(seed, seed.task, rng))


def _rarer(seed: Instance, rng: random.Random) -> Instance:
    """What the easy prompt asks for: a less common type of the same domain at a similar level."""
    candidates = rarer_tasks(seed)
    task = rng.choices(candidates, [1.0 / world.TASKS[t].weight for t in candidates])[0]
    return world.sample(rng, task=task, level=similar_level(seed, task, rng))


def generator_reply(prompt: str, rng: random.Random) -> str:
    """A new instruction from the seed, in a fresh phrasing: the same type at a similar level, or (when the
    prompt asks for a rarer one) a less common type of the same domain at a similar level."""
    seed_text = parse_generator_seed(prompt)
    seed = world.parse(seed_text) if seed_text else None
    if seed is None:
        return world.sample(rng).instruction
    make = _rarer if wants_rare(prompt) else _same_type
    for _ in range(20):
        new = make(seed, rng)
        if new.instruction != seed.instruction:
            return new.instruction
    return new.instruction
