"""Judge evaluation end to end: OpenAI-compatible client -> local server -> a scripted referee."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from lionkd.eval.judge import JudgeItem, judge_answers
from lionkd.llm.base import Backend, Choice, GenRequest, GenResult
from lionkd.llm.cache import CachedLLM
from lionkd.llm.openai_backend import OpenAIBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.store import Store

ANSWER = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]", re.DOTALL)


class ScriptedReferee(Backend):
    """Scores each answer by the "score=N" it carries. Questions steer the reply's form:
    "malformed" never gives scores, "flaky" only on a re-ask (seed set), "bias" adds 3 to Assistant 1,
    "markdown" writes "**Assistant 1:** 9/10"."""

    kind = "scripted"

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, req in enumerate(requests):
            yield i, GenResult([Choice(self.reply(req))], prompt_tokens=10, completion_tokens=5)

    @staticmethod
    def reply(req: GenRequest) -> str:
        text = req.message_dicts()[-1]["content"]
        question = text.split("[Instruction]\n", 1)[1].split("\n", 1)[0]
        scores = {who: int(re.search(r"score=(\d+)", body).group(1)) for who, body in ANSWER.findall(text)}
        if "malformed" in question or ("flaky" in question and req.seed is None):
            return "Both answers have merits; I cannot decide."
        if "bias" in question:
            scores["1"] = min(10, scores["1"] + 3)
        if "markdown" in question:
            return f"**Assistant 1:** {scores['1']}/10\n**Assistant 2:** {scores['2']}/10\nReasons follow."
        return f"Assistant 1: {scores['1']}\nAssistant 2: {scores['2']}\nThe first is clearer."


ITEMS = [
    # question, category, candidate score, reference score
    ("q1 tie", "writing", 8, 8),
    ("q2 plain", "writing", 6, 9),
    ("q3 bias", "math", 7, 5),  # candidate first: 10 vs 5; reference first: 8 vs 7 -> orders disagree
    ("q4 malformed", "math", 9, 2),  # never readable: left out
    ("q5 flaky", "math", 4, 8),  # unreadable once per order, fixed by the re-ask
    ("q6 markdown", "writing", 9, 7),
]


def test_judge_scores_exactly_through_an_openai_compatible_server(tmp_path: Path) -> None:
    items = [JudgeItem(q, f"candidate answer, score={c}", f"reference answer, score={r}", cat) for q, cat, c, r in ITEMS]
    store = Store.open_run(tmp_path)
    with ServerThread(create_app({"referee": ScriptedReferee("referee")})) as server:
        backend = OpenAIBackend("referee", base_url=server.base_url, api_key="unused", max_retries=0)
        referee = CachedLLM(backend, store, role="referee")
        seen: list[int] = []
        scores, verdicts = asyncio.run(judge_answers(referee, items, params={"temperature": 0.2, "max_tokens": 64},
                                                     retries=2, on_verdict=lambda i, v: seen.append(i)))
        # a second run is served from the cache: same numbers, nothing sent
        calls = sum(r["calls"] for r in store.usage())
        again, _ = asyncio.run(judge_answers(referee, items, params={"temperature": 0.2, "max_tokens": 64}, retries=2))
        assert sum(r["calls"] for r in store.usage()) == calls
    assert sorted(seen) == list(range(6))
    cand = 8 + 6 + (10 + 7) / 2 + 4 + 9
    ref = 8 + 9 + (5 + 8) / 2 + 8 + 7
    assert scores.questions == 6 and scores.judged == 5 and scores.unparseable == 1
    assert scores.parse_failures == 2 * 3 + 2  # q4: both orders x 3 attempts; q5: both orders once
    assert scores.relative_score == pytest.approx(100 * cand / ref)
    assert scores.candidate_total == pytest.approx(cand) and scores.reference_total == pytest.approx(ref)
    assert scores.order_agreement == pytest.approx(4 / 5)
    assert (scores.wins, scores.ties, scores.losses) == (2, 1, 2)
    writing, math = scores.per_category["writing"], scores.per_category["math"]
    assert writing.relative_score == pytest.approx(100 * 23 / 24) and writing.judged == 3
    assert math.relative_score == pytest.approx(100 * 12.5 / 14.5)
    assert (math.judged, math.unparseable, math.questions) == (2, 1, 3)
    assert math.order_agreement == pytest.approx(1 / 2)
    assert verdicts[3].error is not None and not verdicts[3].ok
    assert again.to_dict() == scores.to_dict()
    # 6 questions x 2 orders, plus re-asks: q4 2 orders x 2, q5 2 orders x 1
    assert calls == 12 + 4 + 2
    store.close()
