"""The sandbox task world: small instruction tasks with exact answers.

Every task type renders its arguments into one of several phrasings ("Add 37 and 5.", "What is 37
plus 5?"), knows its exact answer, and gives partial credit to near misses, which is what the
referee oracle turns into 1-10 scores. Difficulty levels are read back from the arguments, so an
instruction text alone says which task, level and arguments it is (`parse`).

Train and test problems are split by a hash of the task's arguments, not by wording, so a test
problem is never seen in training in any phrasing.
"""

from __future__ import annotations

import difflib
import hashlib
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
TEST_FRACTION = 0.2

# How each argument kind is written into an instruction, and the pattern that reads it back.
FIELD_PATTERNS = {
    "int": r"\d+",
    "nums": r"\d+(?:, \d+)+",
    "word": r"[a-z]+",
    "day": "|".join(DAYS),
    "expr": r"(?:true|false)(?: (?:and|or) (?:true|false))+",
}


def _render_field(kind: str, value: Any) -> str:
    return ", ".join(map(str, value)) if kind == "nums" else str(value)


def _read_field(kind: str, text: str) -> Any:
    if kind == "int":
        return int(text)
    if kind == "nums":
        return tuple(int(x) for x in text.split(", "))
    return text


@dataclass(frozen=True)
class Task:
    """One task type: how to draw, phrase, solve and grade its problems."""

    name: str
    domain: str
    fields: tuple[tuple[str, str], ...]  # (placeholder name, kind), in argument order
    phrasings: tuple[str, ...]
    draw: Callable[[random.Random, int], tuple]  # arguments for a level
    level_of: Callable[[tuple], int]
    solve: Callable[[tuple], str]
    answer_kind: str  # "number" | "list" | "text" | "choice"
    weight: float = 1.0  # how common the type is in seed pools; "rare" generation favours low weights
    levels: tuple[int, ...] = (1, 2, 3)
    case_sensitive: bool = False
    options: Callable[[tuple], tuple[str, ...]] | None = None  # the valid answers of a "choice" task

    def level(self, args: tuple) -> int:
        return min(max(self.level_of(args), self.levels[0]), self.levels[-1])

    def render(self, args: tuple, phrasing: int) -> str:
        values = {name: _render_field(kind, v) for (name, kind), v in zip(self.fields, args, strict=True)}
        return self.phrasings[phrasing].format(**values)

    def patterns(self) -> list[re.Pattern[str]]:
        kinds = dict(self.fields)
        out = []
        for text in self.phrasings:
            parts = re.split(r"\{(\w+)\}", text)  # literal, name, literal, name, ...
            regex = "".join(
                re.escape(p) if i % 2 == 0 else f"(?P<{p}>{FIELD_PATTERNS[kinds[p]]})"
                for i, p in enumerate(parts)
            )
            out.append(re.compile(regex))
        return out


# ---- argument drawing helpers ----------------------------------------------------------------


def _word(rng: random.Random, length: int) -> str:
    letters = [rng.choice(VOWELS if i % 2 else CONSONANTS) for i in range(length)]
    return "".join(letters)


def _digits(n: int) -> int:
    return 1 if n < 10 else 2


def _nums(rng: random.Random, count: int, hi: int) -> tuple[int, ...]:
    return tuple(rng.randint(0, hi) for _ in range(count))


def _by_level(levels: dict[int, tuple[int, int]]) -> Callable[[int], int]:
    """Level from a value, given inclusive (lo, hi) ranges per level; values outside clamp to the ends."""

    def level(value: int) -> int:
        for lv, (lo, hi) in levels.items():
            if lo <= value <= hi:
                return lv
        return min(levels) if value < min(lo for lo, _ in levels.values()) else max(levels)

    return level


def _eval_bool(expr: str) -> bool:
    # Ordinary precedence: "and" binds tighter than "or".
    return any(all(t == "true" for t in conj.split(" and ")) for conj in expr.split(" or "))


def _draw_expr(rng: random.Random, level: int) -> tuple:
    words = [rng.choice(("true", "false"))]
    for _ in range(level):
        words += [rng.choice(("and", "or")), rng.choice(("true", "false"))]
    return (" ".join(words),)


def _draw_add(rng: random.Random, level: int) -> tuple:
    small, big = rng.randint(0, 9), rng.randint(10, 99)
    if level == 1:
        return (small, rng.randint(0, 9))
    if level == 2:
        return (big, small) if rng.random() < 0.5 else (small, big)
    return (big, rng.randint(10, 99))


def _draw_subtract(rng: random.Random, level: int) -> tuple:
    if level == 1:
        a = rng.randint(0, 9)
        return (a, rng.randint(0, a))
    if level == 2:
        return (rng.randint(10, 99), rng.randint(0, 9))
    a = rng.randint(10, 99)
    return (a, rng.randint(10, a))


def _draw_multiply(rng: random.Random, level: int) -> tuple:
    if level == 1:
        return (rng.randint(0, 5), rng.randint(0, 5))
    if level == 2:
        pair = (rng.randint(6, 9), rng.randint(0, 9))
        return pair if rng.random() < 0.5 else pair[::-1]
    return (rng.randint(2, 9), rng.randint(10, 20))


def _level_multiply(args: tuple) -> int:
    return 3 if max(args) >= 10 else 2 if max(args) >= 6 else 1


def _draw_compare(rng: random.Random, level: int) -> tuple:
    lo, hi = (0, 9) if level == 1 else (10, 99)
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if a != b and _level_compare((a, b)) == level:
            return (a, b)


def _level_compare(args: tuple) -> int:
    a, b = args
    if max(a, b) < 10:
        return 1
    return 3 if a // 10 == b // 10 else 2


def _level_sort(args: tuple) -> int:
    (nums,) = args
    return 3 if max(nums) >= 10 else 2 if len(nums) >= 4 else 1


def _draw_sort(rng: random.Random, level: int) -> tuple:
    if level == 1:
        return (_nums(rng, 3, 9),)
    if level == 2:
        return (_nums(rng, 4, 9),)
    while True:
        nums = _nums(rng, 4, 99)
        if max(nums) >= 10:
            return (nums,)


def _draw_max(rng: random.Random, level: int) -> tuple:
    if level == 1:
        return (_nums(rng, 3, 9),)
    if level == 2:
        return (_nums(rng, 5, 9),)
    return (tuple(rng.randint(10, 99) for _ in range(4)),)


def _level_sum(args: tuple) -> int:
    (nums,) = args
    return 3 if len(nums) >= 4 else 2 if max(nums) > 5 else 1


def _draw_sum(rng: random.Random, level: int) -> tuple:
    while True:
        nums = _nums(rng, 3, 5) if level == 1 else _nums(rng, 3 if level == 2 else 4, 9)
        if _level_sum((nums,)) == level:
            return (nums,)


def _draw_reverse_list(rng: random.Random, level: int) -> tuple:
    return (_nums(rng, level + 2, 9 if level == 1 else 99),)


def _word_task_draw(lengths: dict[int, tuple[int, int]]) -> Callable[[random.Random, int], tuple]:
    def draw(rng: random.Random, level: int) -> tuple:
        return (_word(rng, rng.randint(*lengths[level])),)

    return draw


def _word_task_level(lengths: dict[int, tuple[int, int]]) -> Callable[[tuple], int]:
    level = _by_level(lengths)
    return lambda args: level(len(args[0]))


REVERSE_LENGTHS = {1: (3, 3), 2: (4, 5), 3: (6, 7)}
UPPER_LENGTHS = {1: (2, 3), 2: (4, 5), 3: (6, 8)}
COUNT_LENGTHS = {1: (2, 4), 2: (5, 7), 3: (8, 10)}
WEEKDAY_STEPS = {1: (2, 3), 2: (4, 6), 3: (7, 20)}


def _draw_weekday(rng: random.Random, level: int) -> tuple:
    return (rng.choice(DAYS), rng.randint(*WEEKDAY_STEPS[level]))


# ---- the registry ----------------------------------------------------------------------------

_TASK_LIST = [
    # arithmetic
    Task(
        "add", "arithmetic", (("a", "int"), ("b", "int")),
        ("Add {a} and {b}.", "What is {a} plus {b}?", "Compute {a} + {b}.", "Find the sum of {a} and {b}."),
        _draw_add, lambda a: _digits(a[0]) + _digits(a[1]) - 1, lambda a: str(a[0] + a[1]), "number",
        weight=3.0,
    ),
    Task(
        "subtract", "arithmetic", (("a", "int"), ("b", "int")),
        ("Subtract {b} from {a}.", "What is {a} minus {b}?", "Compute {a} - {b}."),
        _draw_subtract, lambda a: _digits(a[0]) + _digits(a[1]) - 1, lambda a: str(a[0] - a[1]), "number",
        weight=2.0,
    ),
    Task(
        "multiply", "arithmetic", (("a", "int"), ("b", "int")),
        ("Multiply {a} by {b}.", "What is {a} times {b}?", "Compute {a} * {b}."),
        _draw_multiply, _level_multiply, lambda a: str(a[0] * a[1]), "number",
    ),
    Task(
        "compare", "arithmetic", (("a", "int"), ("b", "int")),
        ("Which is larger, {a} or {b}?", "Pick the bigger number: {a} or {b}.",
         "What is the larger of {a} and {b}?"),
        _draw_compare, _level_compare, lambda a: str(max(a)), "choice",
        weight=2.0, options=lambda a: tuple(map(str, a)),
    ),
    # number lists
    Task(
        "sort", "lists", (("nums", "nums"),),
        ("Sort {nums} in ascending order.", "Put {nums} in order from smallest to largest.",
         "Arrange these numbers in increasing order: {nums}."),
        _draw_sort, _level_sort, lambda a: ", ".join(map(str, sorted(a[0]))), "list",
        weight=2.0,
    ),
    Task(
        "max", "lists", (("nums", "nums"),),
        ("What is the largest of {nums}?", "Find the maximum of {nums}.", "Which number is biggest: {nums}?"),
        _draw_max, lambda a: 3 if min(a[0]) >= 10 else 2 if len(a[0]) >= 4 else 1,
        lambda a: str(max(a[0])), "number", weight=2.0,
    ),
    Task(
        "sum", "lists", (("nums", "nums"),),
        ("Add up {nums}.", "What is the total of {nums}?", "Sum the numbers {nums}."),
        _draw_sum, _level_sum, lambda a: str(sum(a[0])), "number",
    ),
    Task(
        "reverse_list", "lists", (("nums", "nums"),),
        ("Reverse the list {nums}.", "Write {nums} in reverse order.", "List {nums} backwards."),
        _draw_reverse_list, lambda a: len(a[0]) - 2, lambda a: ", ".join(map(str, a[0][::-1])), "list",
    ),
    # words (made-up words, so nothing is known in advance)
    Task(
        "reverse_word", "words", (("word", "word"),),
        ("Reverse the word {word}.", "Spell the word {word} backwards.", "Write {word} in reverse."),
        _word_task_draw(REVERSE_LENGTHS), _word_task_level(REVERSE_LENGTHS), lambda a: a[0][::-1], "text",
    ),
    Task(
        "uppercase", "words", (("word", "word"),),
        ("Write {word} in capital letters.", "Convert {word} to uppercase.", "Uppercase the word {word}."),
        _word_task_draw(UPPER_LENGTHS), _word_task_level(UPPER_LENGTHS), lambda a: a[0].upper(), "text",
        weight=2.0, case_sensitive=True,
    ),
    Task(
        "count_letters", "words", (("word", "word"),),
        ("How many letters are in {word}?", "Count the letters in {word}.",
         "What is the length of the word {word}?"),
        _word_task_draw(COUNT_LENGTHS), _word_task_level(COUNT_LENGTHS), lambda a: str(len(a[0])), "number",
        weight=2.0,
    ),
    Task(
        "repeat", "words", (("word", "word"), ("k", "int")),
        ("Repeat {word} {k} times.", "Write {word} {k} times.", "Say {word} {k} times, separated by spaces."),
        lambda rng, lv: (_word(rng, rng.randint(2, 4)), lv + 1), lambda a: a[1] - 1,
        lambda a: " ".join([a[0]] * a[1]), "text", weight=2.0,
    ),
    # logic and dates
    Task(
        "weekday", "logic", (("day", "day"), ("n", "int")),
        ("What day is {n} days after {day}?", "If today is {day}, what day is it in {n} days?",
         "Which weekday comes {n} days after {day}?"),
        _draw_weekday, lambda a: _by_level(WEEKDAY_STEPS)(a[1]),
        lambda a: DAYS[(DAYS.index(a[0]) + a[1]) % 7], "choice", options=lambda a: DAYS,
    ),
    Task(
        "boolean", "logic", (("expr", "expr"),),
        ("Evaluate: {expr}.", "What is the value of {expr}?", "Decide whether {expr} is true or false."),
        _draw_expr, lambda a: a[0].count(" and ") + a[0].count(" or "),
        lambda a: "true" if _eval_bool(a[0]) else "false", "choice",
        weight=2.0, options=lambda a: ("true", "false"),
    ),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
DOMAINS: dict[str, tuple[str, ...]] = {}
for _t in _TASK_LIST:
    DOMAINS[_t.domain] = (*DOMAINS.get(_t.domain, ()), _t.name)

_PATTERNS = [(t, i, p) for t in _TASK_LIST for i, p in enumerate(t.patterns())]


# ---- instances -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One problem: a task, its arguments and the phrasing its instruction is written in."""

    task: str
    args: tuple
    phrasing: int = 0

    @property
    def spec(self) -> Task:
        return TASKS[self.task]

    @property
    def domain(self) -> str:
        return self.spec.domain

    @property
    def level(self) -> int:
        return self.spec.level(self.args)

    @property
    def instruction(self) -> str:
        return self.spec.render(self.args, self.phrasing)

    @property
    def answer(self) -> str:
        return self.spec.solve(self.args)

    @property
    def split(self) -> str:
        return split_of(self.task, self.args)

    def to_record(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "domain": self.domain,
            "task": self.task,
            "level": self.level,
        }


def split_of(task: str, args: tuple) -> str:
    """"train" or "test": a fixed hash split of the arguments, whatever the phrasing."""
    digest = hashlib.sha256(repr((task, args)).encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") / 2**32 < TEST_FRACTION else "train"


def parse(text: str) -> Instance | None:
    """Read any phrasing of any task back into its instance; None when nothing matches."""
    text = text.strip()
    for task, index, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m:
            args = tuple(_read_field(kind, m.group(name)) for name, kind in task.fields)
            return Instance(task.name, args, index)
    return None


def sample(
    rng: random.Random,
    task: str | None = None,
    domain: str | None = None,
    level: int | None = None,
    split: str = "train",
    phrasing: int | None = None,
) -> Instance:
    """Draw a problem. Unset task/domain/level are drawn uniformly; `split` is "train", "test" or "any"."""
    if task is None:
        task = rng.choice(DOMAINS[domain] if domain else tuple(TASKS))
    spec = TASKS[task]
    level = rng.choice(spec.levels) if level is None else level
    if level not in spec.levels:
        raise ValueError(f"task {task!r} has levels {spec.levels}, not {level}")
    while True:  # a few draws at most: the test split is a fifth of every level
        args = spec.draw(rng, level)
        if split == "any" or split_of(task, args) == split:
            break
    index = rng.randrange(len(spec.phrasings)) if phrasing is None else phrasing
    return Instance(task, args, index)


def answer(instance: Instance) -> str:
    return instance.answer


# ---- grading ---------------------------------------------------------------------------------


def _clean(text: str) -> str:
    return text.strip().rstrip(".").strip()


def _ints(text: str) -> list[int] | None:
    parts = [p for p in re.split(r"[,\s]+", _clean(text)) if p]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return None
    return [int(p) for p in parts]


def is_correct(instance: Instance, answer_text: str) -> bool:
    """Exact match after normalisation (whitespace, a final period, case unless the task is about case)."""
    got, want = _clean(answer_text), instance.answer
    if not instance.spec.case_sensitive:
        got, want = got.lower(), want.lower()
    return got == want


def score(instance: Instance, answer_text: str) -> float:
    """Credit in [0, 1]: 1 for the exact answer, partial for near misses, 0 for garbage."""
    if is_correct(instance, answer_text):
        return 1.0
    spec, want, got = instance.spec, instance.answer, _clean(answer_text)
    if not got:
        return 0.0
    words = re.findall(r"[\w-]+", got.lower())
    if spec.answer_kind == "number":
        values = _ints(got)
        if values is None:
            return 0.4 if want in words else 0.0  # right number buried in other text
        if len(values) != 1:
            return 0.1
        closeness = max(0.0, 1.0 - abs(values[0] - int(want)) / (abs(int(want)) + 5))
        return 0.15 + 0.5 * closeness
    if spec.answer_kind == "choice":
        options = [o.lower() for o in spec.options(instance.args)]  # type: ignore[misc]
        if want.lower() in words and not any(o in words for o in options if o != want.lower()):
            return 0.4
        return 0.15 if got.lower() in options else 0.0
    if spec.answer_kind == "list":
        values, target = _ints(got), [int(x) for x in want.split(", ")]
        if values is None:
            return 0.0
        if values == target:
            return 0.85  # right numbers, wrong separators
        hits = sum(v == t for v, t in zip(values, target, strict=False))
        same_items = sorted(values) == sorted(target)
        return 0.1 + 0.4 * hits / max(len(values), len(target)) + (0.15 if same_items else 0.0)
    # text: character similarity; a case-only miss on a case task is half right
    if spec.case_sensitive and got.lower() == want.lower():
        return 0.5
    ratio = difflib.SequenceMatcher(None, got.lower(), want.lower()).ratio()
    return 0.7 * ratio


def corrupt(instance: Instance, rng: random.Random) -> str:
    """A plausible wrong answer (a teacher's slip): close numbers, swapped items, a changed letter."""
    spec, want = instance.spec, instance.answer
    for _ in range(20):
        if spec.answer_kind == "number":
            wrong = str(max(0, int(want) + rng.choice((-2, -1, 1, 2, 10))))
        elif spec.answer_kind == "choice":
            wrong = rng.choice([o for o in spec.options(instance.args)])  # type: ignore[misc]
        elif spec.answer_kind == "list":
            items = want.split(", ")
            i, j = rng.sample(range(len(items)), 2)
            items[i], items[j] = items[j], items[i]
            wrong = ", ".join(items)
        else:
            pos = rng.randrange(len(want))
            letter = rng.choice(CONSONANTS + VOWELS)
            wrong = want[:pos] + (letter.upper() if want[pos].isupper() else letter) + want[pos + 1 :]
        if not is_correct(instance, wrong):
            return wrong
    return want + " " + want  # every small change happened to be right (e.g. "1, 1, 1")


# ---- pools and corpora -----------------------------------------------------------------------

SEED_LEVEL_WEIGHTS = {1: 0.5, 2: 0.3, 3: 0.2}  # seed pools are mostly easy, as real ones are


def seed_pool(n: int, seed: int = 0, *, task_weights: Mapping[str, float] | None = None,
              rng: random.Random | None = None) -> list[dict[str, Any]]:
    """`n` distinct training-split instructions, common task types and low levels more frequent.

    `task_weights` replaces the world's own task frequencies (e.g. a long-tailed pool); `rng` the
    generator seeded by `seed`.
    """
    rng = rng or random.Random(f"seed-pool:{seed}")
    names = list(task_weights) if task_weights else list(TASKS)
    weights = list(task_weights.values()) if task_weights else [TASKS[t].weight for t in names]
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        task = rng.choices(names, weights)[0]
        levels = TASKS[task].levels
        level = rng.choices(levels, [SEED_LEVEL_WEIGHTS.get(lv, 0.2) for lv in levels])[0]
        inst = sample(rng, task=task, level=level)
        if inst.instruction not in seen:
            seen.add(inst.instruction)
            out.append(inst.to_record())
    return out


def test_set(per_task: int = 100, seed: int = 0) -> list[Instance]:
    """Held-out problems: `per_task` per task type, levels in turn, arguments from the test split.

    Distinct instructions where the level has enough of them; small levels repeat.
    """
    rng = random.Random(f"test-set:{seed}")
    out: list[Instance] = []
    for name, spec in TASKS.items():
        seen: set[str] = set()
        for i in range(per_task):
            level = spec.levels[i % len(spec.levels)]
            for _ in range(30):
                inst = sample(rng, task=name, level=level, split="test")
                if inst.instruction not in seen:
                    break
            seen.add(inst.instruction)
            out.append(inst)
    return out


def corpus(n_per_phrasing: int = 20, seed: int = 0) -> list[str]:
    """Texts for training a tokenizer: every phrasing, number and answer form, day and truth words.

    Made-up words are left out (their phrasings appear with the word removed), so a tokenizer
    trained on this keeps them in letters and short pieces: reversing, counting and capitalising
    then act on small units instead of on arbitrary merged chunks.
    """
    rng = random.Random(f"corpus:{seed}")
    texts = [" ".join(DAYS), "true false and or", "0 1 2 3 4 5 6 7 8 9"]
    for name, spec in TASKS.items():
        has_words = any(kind == "word" for _, kind in spec.fields)
        for level in spec.levels:
            for phrasing in range(len(spec.phrasings)):
                if has_words:
                    texts.append(re.sub(r" ?\{word\}", "", spec.phrasings[phrasing]))
                    continue
                for _ in range(n_per_phrasing):
                    inst = sample(rng, task=name, level=level, split="any", phrasing=phrasing)
                    texts.append(f"{inst.instruction}\n{inst.answer}")
    return texts
