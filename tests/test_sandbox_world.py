import random

import pytest

from lionkd.sandbox import world
from lionkd.sandbox.world import DOMAINS, TASKS, Instance, parse, sample, score


def test_registry_has_enough_tasks_domains_phrasings_and_levels():
    assert len(TASKS) >= 12
    assert len(DOMAINS) >= 4
    for spec in TASKS.values():
        assert len(spec.phrasings) >= 3, spec.name
        assert len(spec.levels) >= 2, spec.name
        assert spec.name in DOMAINS[spec.domain]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_phrasing_and_level_round_trips(name):
    rng = random.Random(name)
    spec = TASKS[name]
    for level in spec.levels:
        for phrasing in range(len(spec.phrasings)):
            for _ in range(30):
                inst = sample(rng, task=name, level=level, phrasing=phrasing, split="any")
                assert inst.level == level
                back = parse(inst.instruction)
                assert back == inst, (inst.instruction, back)
                assert back.answer == inst.answer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_exact_answer_scores_one_and_slips_score_less(name):
    rng = random.Random(name)
    for _ in range(100):
        inst = sample(rng, task=name)
        assert score(inst, inst.answer) == 1.0
        assert score(inst, f"  {inst.answer}. ") == 1.0  # whitespace and a final period are forgiven
        wrong = world.corrupt(inst, rng)
        assert 0.0 <= score(inst, wrong) < 1.0
        assert score(inst, "") == 0.0
        assert score(inst, "%%%") == 0.0


def test_partial_credit_orders_near_misses():
    inst = parse("Add 37 and 5.")
    assert inst == Instance("add", (37, 5), 0)
    assert inst.answer == "42"
    assert score(inst, "42") > score(inst, "The answer is 42") > score(inst, "90") > score(inst, "banana")
    assert score(inst, "41") > score(inst, "60")

    sort = parse("Sort 3, 1, 2 in ascending order.")
    assert score(sort, "1, 2, 3") == 1.0
    assert 0.5 < score(sort, "1 2 3") < 1.0
    assert score(sort, "1, 3, 2") > score(sort, "7, 8, 9")

    upper = parse("Convert bako to uppercase.")
    assert score(upper, "BAKO") == 1.0
    assert score(upper, "bako") < 1.0  # the case is the task
    assert score(upper, "BAKA") > score(upper, "ZZZZZZZZ")

    day = parse("What day is 3 days after Monday?")
    assert score(day, "thursday") == 1.0  # case does not matter here
    assert score(day, "It is Thursday") > score(day, "Friday") > score(day, "blue")


def test_parse_rejects_other_text():
    for text in ["", "Hello there", "Add 3 and.", "Sort the numbers please.", "Add 3 and 4 and 5."]:
        assert parse(text) is None


def test_levels_make_problems_harder():
    rng = random.Random(0)
    assert all(max(sample(rng, task="add", level=1).args) < 10 for _ in range(50))
    assert all(min(sample(rng, task="add", level=3).args) >= 10 for _ in range(50))
    assert all(len(sample(rng, task="reverse_list", level=3).args[0]) == 5 for _ in range(50))


def test_train_and_test_are_split_by_arguments():
    rng = random.Random(1)
    train = [sample(rng) for _ in range(2000)]
    assert all(x.split == "train" for x in train)
    tests = world.test_set(per_task=30, seed=0)
    assert len(tests) == 30 * len(TASKS)
    assert all(x.split == "test" for x in tests)
    train_args = {(x.task, x.args) for x in train}
    assert not train_args & {(x.task, x.args) for x in tests}
    # the split ignores wording: every phrasing of a test problem is a test problem
    x = tests[0]
    assert all(Instance(x.task, x.args, i).split == "test" for i in range(len(x.spec.phrasings)))
    assert world.test_set(per_task=30, seed=0) == tests
    assert world.test_set(per_task=30, seed=1) != tests


def test_seed_pool_records():
    pool = world.seed_pool(200, seed=3)
    assert len(pool) == 200
    assert len({r["instruction"] for r in pool}) == 200
    assert pool == world.seed_pool(200, seed=3)
    for record in pool:
        assert set(record) == {"instruction", "domain", "task", "level"}
        inst = parse(record["instruction"])
        assert (inst.task, inst.domain, inst.level) == (record["task"], record["domain"], record["level"])
        assert inst.split == "train"
    counts = {t: sum(r["task"] == t for r in pool) for t in TASKS}
    assert counts["add"] > counts["multiply"]  # common types are common, rare ones rare


def test_corpus_covers_every_phrasing():
    text = "\n".join(world.corpus(n_per_phrasing=2))
    for spec in TASKS.values():
        for phrasing in spec.phrasings:
            assert phrasing.split("{")[0].strip() in text


def test_instructions_pass_the_generation_filters():
    # Lion drops generated instructions of <= 3 words, starting with punctuation, or naming "instruction".
    rng = random.Random(5)
    for name, spec in TASKS.items():
        for phrasing in range(len(spec.phrasings)):
            text = sample(rng, task=name, level=1, phrasing=phrasing).instruction
            assert len(text.split()) > 3, text
            assert text[0].isalpha() and text.isascii()
            assert "instruction" not in text.lower()
