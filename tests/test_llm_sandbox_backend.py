import asyncio
import random
import re
from collections import Counter

import pytest

from lionkd.lion.prompts import GENERATOR_EASY, GENERATOR_HARD, LionPrompts
from lionkd.llm.base import GenRequest
from lionkd.llm.sandbox_backend import SandboxBackend
from lionkd.sandbox import oracle, world
from lionkd.sandbox.oracle import GENERIC_REPLY, wants_rare

# A simple reference parser: what any tolerant referee parser must at least read.
SCORE_LINE = re.compile(r"assistant\s*([12])\W*?(\d+(?:\.\d+)?)", re.I)


def parse_scores(text: str) -> tuple[float, float] | None:
    found = dict(SCORE_LINE.findall("\n".join(text.splitlines()[:2])))
    if set(found) != {"1", "2"}:
        return None
    return float(found["1"]), float(found["2"])


def ask(backend: SandboxBackend, content: str, **params) -> list[str]:
    (result,) = backend.generate([GenRequest.chat([{"role": "user", "content": content}], **params)])
    assert result.ok
    return [c.text for c in result.choices]


def referee_prompt(instruction: str, a1: str, a2: str) -> str:
    return (
        "Rate the two answers.\n\n"
        f"[Instruction]\n{instruction}\n\n"
        f"[Assistant 1]\n{a1}\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{a2}\n[End of Assistant 2]\n\n"
        "Reply with two lines, Assistant 1: <score> and Assistant 2: <score>, then explain."
    )


def generator_prompt(seed: str, rare: bool) -> str:
    ask_for = "a rarer instruction of the same domain" if rare else "an instruction of the same task type"
    return f"Write {ask_for}.\n\n[Seed instruction]\n{seed}\n[End of seed instruction]\n"


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="teacher, referee, generator"):
        SandboxBackend("oracle")
    with pytest.raises(ValueError, match="error_rate"):
        SandboxBackend("teacher", error_rate=1.5)


@pytest.mark.parametrize("name", sorted(world.TASKS))
def test_teacher_is_exact_on_every_task(name):
    teacher = SandboxBackend("teacher")
    rng = random.Random(name)
    items = [world.sample(rng, task=name) for _ in range(40)]
    requests = [
        GenRequest.chat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": x.instruction}]
        )
        for x in items
    ]
    for inst, result in zip(items, teacher.generate(requests), strict=True):
        assert world.score(inst, result.text) == 1.0


def test_teacher_error_rate_and_generic_reply():
    teacher = SandboxBackend("teacher", error_rate=0.3)
    rng = random.Random(0)
    items = [world.sample(rng) for _ in range(400)]
    results = teacher.generate([GenRequest(prompt=x.instruction) for x in items])
    wrong = sum(not world.is_correct(x, r.text) for x, r in zip(items, results, strict=True))
    assert 0.2 < wrong / len(items) < 0.4
    assert ask(SandboxBackend("teacher"), "Tell me a joke.") == [GENERIC_REPLY]


def test_referee_scores_parse_and_rank_right_above_wrong():
    referee = SandboxBackend("referee")
    rng = random.Random(1)
    first_lines = set()
    for _ in range(60):
        inst = world.sample(rng)
        wrong = world.corrupt(inst, rng)
        for a1, a2, right_first in ((inst.answer, wrong, True), (wrong, inst.answer, False)):
            text = ask(referee, referee_prompt(inst.instruction, a1, a2), temperature=0.2)[0]
            s1, s2 = parse_scores(text)
            assert (s1 > s2) if right_first else (s2 > s1)
            assert min(s1, s2) >= 1 and max(s1, s2) <= 10
            assert len(text.strip().splitlines()[-1].split()) > 3  # an explanation follows
            first_lines.add(re.sub(r"\d+", "N", text.splitlines()[0]))
    assert len(first_lines) >= 3  # the surface form varies
    both_right = ask(referee, referee_prompt("Add 2 and 3.", "5", "5."))[0]
    assert parse_scores(both_right) == (10, 10)
    garbage = ask(referee, referee_prompt("Add 2 and 3.", "", "pineapple"))[0]
    assert parse_scores(garbage) == (1, 1)


def test_referee_malformed_rate_and_position_bias():
    prompts = [referee_prompt(f"Add {i} and 3.", str(i + 3), str(i + 4)) for i in range(300)]
    requests = [GenRequest.chat([{"role": "user", "content": p}]) for p in prompts]
    malformed = SandboxBackend("referee", malformed_rate=0.25).generate(requests)
    unreadable = sum(parse_scores(r.text) is None for r in malformed)
    assert 0.15 < unreadable / len(requests) < 0.35
    clean = SandboxBackend("referee").generate(requests)
    assert all(parse_scores(r.text) is not None for r in clean)

    same = [GenRequest.chat([{"role": "user", "content": referee_prompt("Add 9 and 3.", "13", "13")}])]
    s1, s2 = parse_scores(SandboxBackend("referee", position_bias=2).generate(same)[0].text)
    assert s1 - s2 == 2
    s1, s2 = parse_scores(SandboxBackend("referee", position_bias=0.5).generate(same)[0].text)
    assert s1 - s2 == 0.5


def lion_generator_prompt(seed: str, mode: str) -> str:
    return LionPrompts().generator_messages(seed, mode)[0]["content"]


def test_generator_does_what_lions_prompts_ask():
    # The sandbox generator tells Lion's two prompts apart by their words (oracle.RARE_CUE); this test
    # feeds it the prompts of lion/prompts.py, so that neither can drift from the other unnoticed.
    assert not wants_rare(GENERATOR_HARD) and wants_rare(GENERATOR_EASY)
    generator = SandboxBackend("generator")
    rng = random.Random(2)
    hard_steps, easy_steps, reworded = Counter(), Counter(), 0
    for _ in range(150):
        seed = world.sample(rng)
        # hard: "the same task type ... about as long and about as difficult"
        hard = world.parse(ask(generator, lion_generator_prompt(seed.instruction, "hard"))[0])
        assert hard is not None and hard.task == seed.task and hard.instruction != seed.instruction
        hard_steps[hard.level - seed.level] += 1
        reworded += hard.phrasing.core != seed.phrasing.core
        # easy: "a rarer, less common topic or kind of request" of the same subject area, similar difficulty
        easy = world.parse(ask(generator, lion_generator_prompt(seed.instruction, "easy"))[0])
        assert easy is not None and easy.domain == seed.domain and easy.task != seed.task
        rarer_exists = any(world.TASKS[t].weight < seed.spec.weight for t in world.DOMAINS[seed.domain])
        assert easy.spec.weight < seed.spec.weight or not rarer_exists, (seed.task, easy.task)
        easy_steps[easy.level - seed.level] += 1
    for steps in (hard_steps, easy_steps):
        assert set(steps) == {-1, 0, 1}  # the seed's level or one either side, never a jump
        assert steps[0] > max(steps[-1], steps[1])
    assert reworded > 100  # a new instruction is newly worded, as a generator LLM's is


def test_referee_position_bias_cancels_over_both_orders():
    # A correct teacher against a student one point below it: Lion averages the two orders, and the
    # bias must not shrink the gap (capping Assistant 1 at 10 made a 9/10 student look easy).
    referee = SandboxBackend("referee", position_bias=0.5)
    inst = world.parse("Sort 3, 1, 2 in ascending order.")
    close = "1 2 3"  # the right numbers, the wrong separators
    assert oracle.points(inst, close) == 9
    t1, s2 = parse_scores(ask(referee, referee_prompt(inst.instruction, "1, 2, 3", close))[0])
    s1, t2 = parse_scores(ask(referee, referee_prompt(inst.instruction, close, "1, 2, 3"))[0])
    assert ((t1 - s2) + (t2 - s1)) / 2 == 1.0
    assert (t1, s2) == (10, 8.5) and (s1, t2) == (9.5, 10)


def test_generator_seed_with_the_word_rare_inside_is_not_a_rare_request():
    generator = SandboxBackend("generator")
    seed = "Reverse the word rare."
    for text in ask(generator, generator_prompt(seed, rare=False), n=10):
        assert world.parse(text).task == "reverse_word"


def test_generator_unrecognised_seed_gives_a_random_task():
    texts = ask(SandboxBackend("generator"), generator_prompt("Write a poem about spring.", rare=False), n=5)
    assert all(world.parse(t) is not None for t in texts)


def test_replies_are_deterministic_and_depend_on_seed_and_index():
    request = GenRequest.chat([{"role": "user", "content": generator_prompt("Add 3 and 4.", rare=True)}], n=8)
    a = SandboxBackend("generator", seed=7).generate([request])[0]
    b = SandboxBackend("generator", seed=7).generate([request])[0]
    c = SandboxBackend("generator", seed=8).generate([request])[0]
    texts = [x.text for x in a.choices]
    assert texts == [x.text for x in b.choices]
    assert texts != [x.text for x in c.choices]
    assert len(set(texts)) > 1  # samples differ by index


def test_usage_limits_stop_and_stream():
    teacher = SandboxBackend("teacher")
    request = GenRequest.chat([{"role": "user", "content": "Repeat bako 4 times."}], n=2, logprobs=3)
    (result,) = teacher.generate([request])
    assert result.prompt_tokens == 4
    assert result.completion_tokens == 8
    assert all(c.logprobs is None and c.finish_reason == "stop" for c in result.choices)

    (cut,) = teacher.generate(
        [GenRequest.chat([{"role": "user", "content": "Repeat bako 4 times."}], max_tokens=2)]
    )
    assert (cut.text, cut.choices[0].finish_reason) == ("bako bako", "length")
    (stopped,) = teacher.generate([GenRequest(prompt="Sort 3, 1, 2 in ascending order.", stop=(", 3",))])
    assert stopped.text == "1, 2"

    async def collect():
        requests = [GenRequest(prompt=f"Add {i} and 1.") for i in range(5)]
        return {i: r.text async for i, r in teacher.stream(requests)}

    assert asyncio.run(collect()) == {i: str(i + 1) for i in range(5)}


@pytest.mark.parametrize("name", sorted(world.TASKS))
def test_generated_instructions_pass_the_novelty_filter_as_a_real_generators_do(name):
    # The paper's filter (ROUGE-L <= 0.7) against 50 same-type pool items must remove near copies, not a
    # whole task type: a generator LLM rewords every instruction, and so does the sandbox generator.
    from lionkd.lion.novelty import NoveltyFilter

    pool = [r["instruction"] for r in world.seed_pool(50, seed=4, task_weights={name: 1.0})]
    novelty = NoveltyFilter(pool, threshold=0.7)
    generator = SandboxBackend("generator", seed=4)
    rng = random.Random(name)
    new = [ask(generator, lion_generator_prompt(rng.choice(pool), "hard"))[0] for _ in range(120)]
    assert all(world.parse(t).task == name for t in new)
    passed = sum(float(novelty.scores(t).max()) <= 0.7 for t in new) / len(new)
    assert passed >= 0.5, passed
