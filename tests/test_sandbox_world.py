import random
from collections import Counter

import pytest

from lionkd.sandbox import world
from lionkd.sandbox.world import DOMAINS, FRAMES, TASKS, Instance, Phrasing, parse, sample, score


def test_registry_has_enough_tasks_domains_phrasings_and_levels():
    assert len(TASKS) >= 12
    assert len(DOMAINS) >= 4
    for spec in TASKS.values():
        assert spec.surface_forms() >= 30, spec.name
        assert {core.form for core in spec.cores} == set(FRAMES), spec.name  # verbs, nouns and questions
        assert len(spec.cores) >= 10 and len(spec.contexts) >= 5 and len(spec.formats) >= 5, spec.name
        assert spec.levels == world.LEVELS and len(spec.levels) >= 5, spec.name
        assert spec.name in DOMAINS[spec.domain]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_wording_framing_and_level_round_trips(name):
    rng = random.Random(name)
    spec = TASKS[name]
    for ci, core in enumerate(spec.cores):
        for fi in range(len(FRAMES[core.form])):
            for level in spec.levels:
                phrasing = Phrasing(ci, fi, rng.choice((None, *spec.formats)), rng.choice((None, *spec.contexts)))
                inst = sample(rng, task=name, level=level, phrasing=phrasing, split="any")
                assert inst.level == level
                back = parse(inst.instruction)
                assert back is not None, inst.instruction
                assert (back.task, back.args, back.level) == (inst.task, inst.args, level), inst.instruction
                assert back.instruction == inst.instruction
                assert back.answer == inst.answer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_context_and_answer_format_round_trips(name):
    rng = random.Random(f"slots:{name}")
    spec = TASKS[name]
    for context in (None, *spec.contexts):
        for answer_format in (None, *spec.formats):
            core = rng.randrange(len(spec.cores))
            phrasing = Phrasing(core, rng.randrange(len(FRAMES[spec.cores[core].form])), answer_format, context)
            inst = sample(rng, task=name, phrasing=phrasing)
            assert parse(inst.instruction) == inst, inst.instruction


@pytest.mark.parametrize("name", sorted(TASKS))
def test_sampled_phrasings_vary_in_several_slots_and_parse_exactly(name):
    rng = random.Random(f"varied:{name}")
    items = [sample(rng, task=name) for _ in range(300)]
    assert all(parse(x.instruction) == x for x in items)
    phrasings = [x.phrasing for x in items]
    assert len(set(phrasings)) > 200  # as many ways of writing it as a generator LLM has
    assert len({p.core for p in phrasings}) == len(TASKS[name].cores)
    assert 0.2 < sum(p.context is not None for p in phrasings) / 300 < 0.6
    assert 0.35 < sum(p.answer_format is not None for p in phrasings) / 300 < 0.75
    # whitespace from a reply does not change what the instruction is
    assert parse("  " + items[0].instruction.replace(" ", "\n ", 1) + " ") == items[0]


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
    assert inst == Instance("add", (37, 5))
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

    def draws(task, level, n=60):
        return [sample(rng, task=task, level=level).args for _ in range(n)]

    assert all(max(a) < 10 for a in draws("add", 1))
    assert all(min(a) >= 100 for a in draws("add", 5))
    assert all(a >= b >= 100 for a, b in draws("subtract", 5))
    assert all(len(a[0]) == lv + 2 for lv in range(1, 6) for a in draws("reverse_list", lv, 10))
    assert all(a[0].count(" and ") + a[0].count(" or ") == 5 for a in draws("boolean", 5))
    assert all(a[1] >= 31 for a in draws("weekday", 5))
    assert all(a[0] // 10 == a[1] // 10 and a[0] != a[1] for a in draws("compare", 5))
    for name, spec in TASKS.items():  # a continuum: each level's problems are longer or bigger on average
        size = [sum(len(str(v)) for v in spec.draw(rng, lv)) for lv in spec.levels for _ in range(40)]
        means = [sum(size[i * 40:(i + 1) * 40]) / 40 for i in range(len(spec.levels))]
        assert means[-1] > means[0], name


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
    assert all(Instance(x.task, x.args, Phrasing(i)).split == "test" for i in range(len(x.spec.cores)))
    assert world.test_set(per_task=30, seed=0) == tests
    assert world.test_set(per_task=30, seed=1) != tests


def test_test_set_is_balanced_over_types_and_levels():
    tests = world.test_set(per_task=20, seed=2)
    cells = Counter((x.task, x.level) for x in tests)
    assert set(cells) == {(t, lv) for t in TASKS for lv in world.LEVELS}
    assert set(cells.values()) == {4}
    assert len({(x.task, x.args) for x in tests}) > 0.95 * len(tests)  # distinct problems, in many phrasings
    assert len({x.phrasing for x in tests}) > len(tests) / 2
    low = world.test_set(per_task=6, seed=2, levels=(1, 2))
    assert Counter(x.level for x in low) == {1: 3 * len(TASKS), 2: 3 * len(TASKS)}


def test_seed_pool_records():
    pool = world.seed_pool(300, seed=3)
    assert len(pool) == 300
    assert len({r["instruction"] for r in pool}) == 300
    assert pool == world.seed_pool(300, seed=3)
    for record in pool:
        assert set(record) == {"instruction", "domain", "task", "level"}
        inst = parse(record["instruction"])
        assert (inst.task, inst.domain, inst.level) == (record["task"], record["domain"], record["level"])
        assert inst.split == "train"
    counts = Counter(r["task"] for r in pool)
    assert counts["add"] > counts["multiply"]  # common types are common, rare ones rare
    levels = Counter(r["level"] for r in pool)
    assert levels[1] > levels[3] > levels[5] > 0  # mostly easy, every level present
    assert {r["level"] for r in world.seed_pool(50, seed=3, levels=[4, 5])} == {4, 5}


def test_long_tailed_pool_and_the_two_accuracies():
    shares = world.zipf_shares(1.0)
    assert abs(sum(shares.values()) - 1) < 1e-9 and shares["add"] == max(shares.values())
    assert len(set(world.zipf_shares(0).values())) == 1  # zipf 0: uniform
    pool = world.seed_pool(600, seed=1, task_weights=shares)
    observed = world.pool_shares(pool)
    assert observed["add"] > 3 * observed["reverse_word"]
    assert world.pool_shares([r["instruction"] for r in pool]) == observed  # from texts alone, by parsing
    assert world.pool_shares(["Write a poem.", "Add 2 and 3."]) == {"add": 1.0}

    by_task = {t: 0.0 for t in TASKS} | {"add": 1.0}
    assert world.balanced_accuracy(by_task) == pytest.approx(1 / len(TASKS))
    assert world.weighted_accuracy(by_task, {"add": 0.5, "sum": 0.5}) == pytest.approx(0.5)
    assert world.weighted_accuracy(by_task, observed) == pytest.approx(observed["add"])
    with pytest.raises(ValueError, match="'sort'"):
        world.weighted_accuracy({"add": 1.0}, {"add": 0.5, "sort": 0.5})


@pytest.mark.parametrize(("call", "option"), [
    (lambda: world.seed_pool(0), "N"),
    (lambda: world.seed_pool(10, levels=[0, 1]), "levels"),
    (lambda: world.seed_pool(10, levels=[]), "levels"),
    (lambda: world.seed_pool(10, task_weights={"poems": 1.0}), "task_weights"),
    (lambda: world.zipf_shares(-1), "zipf"),
    (lambda: world.zipf_shares(float("nan")), "zipf"),
    (lambda: world.test_set(per_task=0), "per_task"),
    (lambda: world.test_set(levels=[6]), "levels"),
    (lambda: sample(random.Random(0), task="add", level=6), "level"),
])
def test_options_out_of_range_name_the_option(call, option):
    with pytest.raises(world.WorldOptionError) as caught:
        call()
    assert caught.value.option == option and str(caught.value).startswith(f"{option}: ")
    assert "\n" not in str(caught.value)


def test_corpus_covers_every_wording_framing_and_slot():
    text = "\n".join(world.corpus(n_per_phrasing=2))
    for spec in TASKS.values():
        for core in spec.cores:
            assert world._FIELD.split(core.text)[0].strip().lower() in text.lower(), core.text
        assert all(c in text for c in spec.contexts) and all(f in text for f in spec.formats)
    assert all(f.prefix in text for frames in FRAMES.values() for f in frames)
    assert "Reverse the word." in text  # the made-up word is left out


def test_instructions_pass_the_generation_filters():
    # Lion drops generated instructions of <= 3 words, starting with punctuation, or naming "instruction".
    rng = random.Random(5)
    for name, spec in TASKS.items():
        for ci, core in enumerate(spec.cores):
            for fi in range(len(FRAMES[core.form])):
                text = sample(rng, task=name, level=1, phrasing=Phrasing(ci, fi)).instruction
                assert len(text.split()) > 3, text
                assert text[0].isalpha() and text.isascii()
                assert "instruction" not in text.lower()
