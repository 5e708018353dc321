"""The referee's reply parser (a corpus of real-looking replies) and judging in both orders."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from lionkd.config import PromptOverrides
from lionkd.errors import UserError
from lionkd.lion.prompts import LionPrompts
from lionkd.llm.base import Backend, Choice, GenRequest, GenResult
from lionkd.llm.cache import CachedLLM
from lionkd.referee import RefereeCallError, judge_pairs, parse_scores, stream_judgements, summarise
from lionkd.store import Store

CORPUS = Path(__file__).parent / "data" / "referee_replies.jsonl"


def _corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpus_is_large_and_varied() -> None:
    rows = _corpus()
    assert len(rows) >= 100
    assert sum(r["expected"] is None for r in rows) >= 20
    assert len({r["note"] for r in rows}) >= 40


@pytest.mark.parametrize("row", _corpus(), ids=lambda r: r["note"])
def test_parse_scores_corpus(row: dict) -> None:
    expected = tuple(row["expected"]) if row["expected"] is not None else None
    assert parse_scores(row["reply"]) == expected


GPT_CORPUS = Path(__file__).parent / "data" / "referee_replies_gpt.jsonl"


def test_gpt_style_reviews_are_read_and_never_misread() -> None:
    """Pairwise reviews as GPT-3.5/GPT-4 referees write them (scores first or last, sections, tables,
    prose, long worked solutions, explanations full of counts and percentages): at least 99% of the
    readable ones read, and none read wrong, whether readable or not."""
    rows = [json.loads(line) for line in GPT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 250 and sum(r["expected"] is None for r in rows) >= 20
    readable = [r for r in rows if r["expected"] is not None]
    got = [parse_scores(r["reply"]) for r in rows]
    misread = [r["reply"][:80] for r, g in zip(rows, got, strict=True)
               if g is not None and (r["expected"] is None or g != tuple(r["expected"]))]
    read = sum(g is not None for r, g in zip(rows, got, strict=True) if r["expected"] is not None)
    assert misread == []
    assert read / len(readable) >= 0.99, [r["reply"][-80:] for r, g in zip(rows, got, strict=True)
                                          if r["expected"] is not None and g is None]


@pytest.mark.parametrize(("reply", "expected"), [
    # counts, shares and differences about an assistant beside its score lines
    ("Assistant 1: 8\nAssistant 2: 6\n\nAssistant 1 is 100% correct; Assistant 2 is 50% right.", (8, 6)),
    ("Assistant 1 gets 3 of the 3 steps right.\n\nAssistant 1: 9\nAssistant 2: 5", (9, 5)),
    ("Assistant 2 is 3 sentences shorter.\nAssistant 1: 7\nAssistant 2: 7", (7, 7)),
    ("Assistant 2 is 2 points better on accuracy.\n\nAssistant 1: 6\nAssistant 2: 8", (6, 8)),
    ("Assistant 1: 12 * 4 = 48, correct.\nAssistant 2: 40, wrong.\n\nAssistant 1: 9\nAssistant 2: 2", (9, 2)),
    ("I would rate Assistant 1's code a 7 out of 10 and Assistant 2's a 9 out of 10.", (7, 9)),
    ("Long explanation.\n\n8 6", (8, 6)),
    # ... and alone they are not scores
    ("Assistant 1 is 100% correct, while Assistant 2 is 50% correct.", None),
    ("Assistant 1 gets 3 of the 3 steps; Assistant 2 gets 2 of the 3 steps.", None),
    ("| | Assistant 1 | Assistant 2 |\n|---|---|---|\n| Score | 7 | 9 |", (7, 9)),
    ("| | Assistant 1 | Assistant 2 |\n|---|---|---|\n| Helpfulness | 7 | 9 |\n| Accuracy | 8 | 5 |", None),
])
def test_hard_replies(reply: str, expected: tuple[float, float] | None) -> None:
    assert parse_scores(reply) == expected


# --------------------------------------------------------------------------- prompts


def test_prompts_carry_the_shared_markers() -> None:
    p = LionPrompts()
    referee = p.referee_messages("Add 2 and 3.", "5", "6")[-1]["content"]
    for marker in ("[Instruction]\nAdd 2 and 3.", "[Assistant 1]\n5\n[End of Assistant 1]",
                   "[Assistant 2]\n6\n[End of Assistant 2]", "Assistant 1: <score>", "Assistant 2: <score>"):
        assert marker in referee
    hard = p.generator_messages("Sort 3, 1, 2.", "hard")[-1]["content"]
    easy = p.generator_messages("Sort 3, 1, 2.", "easy")[-1]["content"]
    for text in (hard, easy):
        assert "[Seed instruction]\nSort 3, 1, 2.\n[End of seed instruction]" in text
    assert not re.search("rare", hard, re.I)
    # the paper asks for similar length and difficulty: no drift towards ever harder tasks
    assert re.search(r"about as\s+long and about as difficult", hard) and "at least as" not in hard
    assert re.search("rare", easy, re.I)
    assert p.teacher_messages("Hi")[-1] == {"role": "user", "content": "Hi"}


def test_referee_order_is_a_choice_and_the_sandbox_follows_it() -> None:
    import random

    from lionkd.referee.prompt import REFEREE, REFEREE_EXPLANATION_FIRST, REFEREE_SCORES_FIRST
    from lionkd.sandbox.oracle import asks_explanation_first, referee_reply

    assert REFEREE is REFEREE_EXPLANATION_FIRST  # the paper's order is the default
    first = LionPrompts.from_config(PromptOverrides(), "explanation_first")
    scores = LionPrompts.from_config(PromptOverrides(), "scores_first")
    assert first.referee == REFEREE_EXPLANATION_FIRST and scores.referee == REFEREE_SCORES_FIRST
    text = first.referee
    assert text.index("explain") < text.index("Assistant 1: <score>")
    assert scores.referee.index("Assistant 1: <score>") < scores.referee.index("justification")
    # an override wins over the order
    assert LionPrompts.from_config(PromptOverrides(referee="{instruction}{answer_1}{answer_2}"),
                                   "scores_first").referee == "{instruction}{answer_1}{answer_2}"
    for prompts, explanation_first in ((first, True), (scores, False)):
        message = prompts.referee_messages("Add 2 and 3.", "5", "6")[-1]["content"]
        assert asks_explanation_first(message) == explanation_first
        for k in range(20):
            reply = referee_reply(message, random.Random(k))
            lines = [line for line in reply.splitlines() if line.strip()]
            assert parse_scores(reply) is not None and parse_scores(reply)[0] == 10, reply
            score_line = re.compile(r"^\**Assistant [12]\W*\d+(?:\.\d)?(?:/10| out of 10)?$")
            # the score lines end the reply when the explanation comes first, and open it otherwise
            assert all(score_line.match(line) for line in (lines[-2:] if explanation_first else lines[:2])), reply
            assert not score_line.match(lines[0]) if explanation_first else not score_line.match(lines[-1]), reply


def test_prompt_overrides_are_checked() -> None:
    ok = LionPrompts.from_config(PromptOverrides(generator_hard="More like this: {seed}", teacher_system=""))
    assert ok.generator_messages("x", "hard")[0]["content"] == "More like this: x"
    assert ok.teacher_messages("q") == [{"role": "user", "content": "q"}]
    with pytest.raises(UserError, match=r"lion\.prompts\.referee: missing placeholder \{answer_2\}"):
        LionPrompts.from_config(PromptOverrides(referee="{instruction} {answer_1}"))
    with pytest.raises(UserError, match=r"lion\.prompts\.generator_easy: unknown placeholder \{sed\}"):
        LionPrompts.from_config(PromptOverrides(generator_easy="{seed} {sed}"))
    with pytest.raises(UserError, match=r"lion\.prompts\.generator_hard"):
        LionPrompts.from_config(PromptOverrides(generator_hard="{seed"))


# --------------------------------------------------------------------------- judging


class ScriptedReferee(Backend):
    """Scores answers by their number ("a7" -> 7); position bias +1 for Assistant 1; scripted failures."""

    kind = "scripted"

    def __init__(self, garbled: dict[str, int]) -> None:
        super().__init__("scripted-referee")
        self.garbled = garbled  # answer text shown first -> how many replies to garble
        self.sent: Counter[tuple] = Counter()

    def reply(self, request: GenRequest) -> str:
        text = request.messages[-1][1]
        first = re.search(r"\[Assistant 1\]\n(.*)\n\[End of Assistant 1\]", text).group(1)
        second = re.search(r"\[Assistant 2\]\n(.*)\n\[End of Assistant 2\]", text).group(1)
        if self.garbled.get(first, 0) > 0:
            self.garbled[first] -= 1
            return "Both are fine."
        s1, s2 = min(10, int(first[1:]) + 1), int(second[1:])
        return f"Assistant 1: {s1}\nAssistant 2: {s2}\nbecause."

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, req in enumerate(requests):
            self.sent[(req.messages, req.seed)] += 1
            if "boom" in req.messages[-1][1]:
                yield i, GenResult(error="HTTP 500 after 6 attempts")
                continue
            yield i, GenResult(choices=[Choice(self.reply(req))], prompt_tokens=10, completion_tokens=5)


def test_judge_pairs_both_orders_retries_and_exclusion(tmp_path: Path) -> None:
    import asyncio

    backend = ScriptedReferee({"a5": 1, "a2": 10})
    store = Store.open_run(tmp_path)
    llm = CachedLLM(backend, store, role="referee")
    items = [("q1", "a8", "a6"), ("q2", "a5", "a4"), ("q3", "a2", "a9")]
    verdicts = asyncio.run(judge_pairs(llm, items, params={"temperature": 0.2, "max_tokens": 64}, retries=2,
                                       iteration=1))
    v1, v2, v3 = verdicts
    # bias +1 for whoever is first, mapped back to (a, b)
    assert v1.ok and v1.scores_a_first == (9, 6) and v1.scores_b_first == (8, 7)
    assert v1.a_score == 8.5 and v1.b_score == 6.5 and v1.orders_agree
    # a5 first was garbled once, then re-asked with another seed and read
    assert v2.ok and v2.parse_failures == 1 and v2.scores_a_first == (6, 4) and v2.scores_b_first == (5, 5)
    assert not v2.orders_agree  # a wins when first, a tie when second
    # a2 first stays garbled: excluded with an error, never scored
    assert not v3.ok and v3.error and v3.parse_failures == 3 and v3.scores_a_first is None
    assert v3.scores_b_first == (2, 10)
    # no call was sent twice: each re-ask had its own seed
    assert max(backend.sent.values()) == 1
    assert Counter(seed for (_, seed) in backend.sent) == {None: 6, 1: 2, 2: 1}
    s = summarise(verdicts)
    assert (s.judged, s.excluded, s.parse_failures) == (2, 1, 4)
    assert s.order_agreement == 0.5
    assert s.first_position_advantage == 1.0  # the +1 bias, measured
    # a rerun is answered from the cache: nothing is sent again
    again = asyncio.run(judge_pairs(llm, items, params={"temperature": 0.2, "max_tokens": 64}, retries=2))
    assert [v.ok for v in again] == [True, True, False]
    assert max(backend.sent.values()) == 1 and sum(backend.sent.values()) == 9
    store.close()


def test_failed_calls_are_not_verdicts(tmp_path: Path) -> None:
    import asyncio

    backend = ScriptedReferee({})
    store = Store.open_run(tmp_path)
    llm = CachedLLM(backend, store, role="referee")
    got = {}

    async def judge() -> None:
        async for i, verdict in stream_judgements(llm, [("q1", "a8", "a6"), ("q2", "boom", "a3")], retries=2):
            got[i] = verdict

    with pytest.raises(RefereeCallError, match="2 referee call"):
        asyncio.run(judge())
    assert list(got) == [0] and got[0].ok  # the good item was delivered; the failed one is not a verdict
    assert sum(backend.sent.values()) == 4  # a failed call is not re-asked with another seed
    store.close()
