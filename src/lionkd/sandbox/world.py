"""The sandbox task world: small instruction tasks with exact answers, written as an LLM writes them.

Every task type knows its exact answer, gives partial credit to near misses (what the referee oracle
turns into 1-10 scores), and has a difficulty continuum of five levels (more digits, longer lists and
words, more weekday steps, longer boolean expressions) that is read back from the arguments.

An instruction is written in slots, so that two instructions of one type differ in several of them,
as two written by a generator LLM do:

    [context sentence] framing(core wording with the arguments) [answer-format clause]
    "I'm checking my homework. Quick question: what is 37 plus 5? Reply with just the number."

The core wordings use the type's verb and noun synonyms in three grammatical forms (an imperative,
a noun phrase, a whole question); a framing ("Can you ...?", "I need ...", "Quick question: ...")
fits one form. `parse` reads every form back into its task, arguments, level and phrasing, so the
teacher, the referee and the scoring are exact on all of them.

Train and test problems are split by a hash of the task's arguments, not by wording, so a test
problem is never seen in training in any phrasing.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
TEST_FRACTION = 0.2
LEVELS = (1, 2, 3, 4, 5)
# Seed pools are mostly easy, as real ones are; the test set is balanced over levels.
SEED_LEVEL_WEIGHTS = {1: 0.3, 2: 0.25, 3: 0.2, 4: 0.15, 5: 0.1}
CONTEXT_RATE = 0.4  # share of sampled instructions that open with a context sentence
FORMAT_RATE = 0.55  # share that end with an answer-format clause


class WorldOptionError(ValueError):
    """A world option out of its range; the message starts with the option's name."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option}: {problem}")
        self.option = option


# ---- how arguments are written ------------------------------------------------------------------

# A field in a wording is "{name}" or "{name:notation}" (a boolean expression in symbols, say).
_FIELD = re.compile(r"\{(\w+)(?::(\w+))?\}")
_BOOL = r"(?:true|false)"
FIELD_PATTERNS = {
    "int": r"\d+",
    "nums": r"\d+(?:, \d+)+",
    "word": r"[a-z]+",
    "day": "|".join(DAYS),
    "expr": rf"{_BOOL}(?: (?:and|or) {_BOOL})+",
    "expr:sym": rf"{_BOOL}(?: (?:&&|\|\|) {_BOOL})+",
    "expr:caps": r"(?:TRUE|FALSE)(?: (?:AND|OR) (?:TRUE|FALSE))+",
}


def _render_field(kind: str, value: Any) -> str:
    if kind == "nums":
        return ", ".join(map(str, value))
    if kind == "expr:sym":
        return value.replace(" and ", " && ").replace(" or ", " || ")
    if kind == "expr:caps":
        return value.upper()
    return str(value)


def _read_field(kind: str, text: str) -> Any:
    if kind == "int":
        return int(text)
    if kind == "nums":
        return tuple(int(x) for x in text.split(", "))
    if kind == "expr:sym":
        return text.replace(" && ", " and ").replace(" || ", " or ")
    if kind == "expr:caps":
        return text.lower()
    return text


# ---- the slots of a phrasing ---------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A framing of one grammatical form: text before and after the core wording."""

    form: str  # "verb" (an imperative), "noun" (a noun phrase) or "question" (a whole question)
    prefix: str
    suffix: str
    capital: bool = False  # the core's first letter is capitalised (it opens the sentence)


FRAMES: dict[str, tuple[Frame, ...]] = {
    "verb": (
        Frame("verb", "", ".", capital=True),
        Frame("verb", "Please ", "."),
        Frame("verb", "Can you ", "?"),
        Frame("verb", "Could you ", ", please?"),
        Frame("verb", "Quick question: can you ", "?"),
        Frame("verb", "I need you to ", "."),
        Frame("verb", "I'd like you to ", "."),
        Frame("verb", "Your task: ", "."),
        Frame("verb", "Help me out and ", "."),
        Frame("verb", "Would you mind if I asked you to ", "?"),
        Frame("verb", "Try to ", " for me."),
        Frame("verb", "Go ahead and ", "."),
    ),
    "noun": (
        Frame("noun", "What is ", "?"),
        Frame("noun", "I need ", "."),
        Frame("noun", "Tell me ", "."),
        Frame("noun", "Quick question: what is ", "?"),
        Frame("noun", "Give me ", ", please."),
        Frame("noun", "Can you tell me ", "?"),
        Frame("noun", "I'm looking for ", "."),
        Frame("noun", "Do you know ", "?"),
        Frame("noun", "Work out ", " for me."),
        Frame("noun", "I would like to know ", "."),
    ),
    "question": (
        Frame("question", "", "", capital=True),
        Frame("question", "Quick question: ", ""),
        Frame("question", "Question: ", "", capital=True),
        Frame("question", "Here is one for you: ", ""),
        Frame("question", "Hey, ", ""),
        Frame("question", "Simple one: ", ""),
        Frame("question", "Let me ask you something. ", "", capital=True),
    ),
}

GENERIC_CONTEXTS = (
    "Here is a small task.",
    "This is for a quiz.",
    "I am testing something.",
    "A friend asked me this.",
    "I would appreciate your help.",
    "This should be quick.",
)
GENERIC_FORMATS = ("No explanation needed.", "Give only the final answer.", "Keep the reply short.")
_FORMATS_BY_KIND = {
    "number": ("Answer with the number only.", "Reply with just the number.", "Respond with a single number."),
    "list": ("Give the numbers separated by commas.", "Reply with the list only.",
             "Write the list and nothing else."),
    "text": ("Reply with the result only.", "Write only the result."),
    "choice": ("Reply with the answer only.", "Answer in one word."),
}


@dataclass(frozen=True)
class Core:
    """One core wording of a task type: its grammatical form and its text with fields."""

    form: str
    text: str


def _cores(verbs: Iterable[str], nouns: Iterable[str], questions: Iterable[str]) -> tuple[Core, ...]:
    return (*(Core("verb", t) for t in verbs), *(Core("noun", t) for t in nouns),
            *(Core("question", t) for t in questions))


class Phrasing(NamedTuple):
    """How one instruction is written: a core wording, a framing of its form, and the optional slots."""

    core: int = 0
    frame: int = 0
    answer_format: str | None = None
    context: str | None = None


PLAIN = Phrasing()  # the first core wording in its bare framing: "Add 37 and 5."


@dataclass(frozen=True)
class Task:
    """One task type: how to draw, phrase, solve and grade its problems."""

    name: str
    domain: str
    fields: tuple[tuple[str, str], ...]  # (placeholder name, kind), in argument order
    cores: tuple[Core, ...]
    draw: Callable[[random.Random, int], tuple]  # arguments for a level
    level_of: Callable[[tuple], int]
    solve: Callable[[tuple], str]
    answer_kind: str  # "number" | "list" | "text" | "choice"
    weight: float = 1.0  # how common the type is in seed pools; "rare" generation favours low weights
    levels: tuple[int, ...] = LEVELS
    case_sensitive: bool = False
    options: Callable[[tuple], tuple[str, ...]] | None = None  # the valid answers of a "choice" task
    own_contexts: tuple[str, ...] = ()
    own_formats: tuple[str, ...] = ()
    contexts: tuple[str, ...] = field(init=False)
    formats: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "contexts", (*self.own_contexts, *GENERIC_CONTEXTS))
        object.__setattr__(self, "formats", (*self.own_formats, *_FORMATS_BY_KIND[self.answer_kind],
                                             *GENERIC_FORMATS))

    def level(self, args: tuple) -> int:
        return min(max(self.level_of(args), self.levels[0]), self.levels[-1])

    def surface_forms(self) -> int:
        """How many distinct ways this type's instructions are written (arguments aside)."""
        framed = sum(len(FRAMES[core.form]) for core in self.cores)
        return framed * (len(self.formats) + 1) * (len(self.contexts) + 1)

    def render(self, args: tuple, phrasing: Phrasing = PLAIN) -> str:
        kinds = dict(self.fields)
        values = dict(zip((name for name, _ in self.fields), args, strict=True))
        core = self.cores[phrasing.core]
        frame = FRAMES[core.form][phrasing.frame]

        def fill(m: re.Match[str]) -> str:
            name, notation = m.group(1), m.group(2)
            return _render_field(f"{kinds[name]}:{notation}" if notation else kinds[name], values[name])

        body = _FIELD.sub(fill, core.text)
        if frame.capital:
            body = body[0].upper() + body[1:]
        sentence = frame.prefix + body + frame.suffix
        return " ".join(s for s in (phrasing.context, sentence, phrasing.answer_format) if s)

    def random_phrasing(self, rng: random.Random) -> Phrasing:
        core = rng.randrange(len(self.cores))
        frame = rng.randrange(len(FRAMES[self.cores[core].form]))
        answer_format = rng.choice(self.formats) if rng.random() < FORMAT_RATE else None
        context = rng.choice(self.contexts) if rng.random() < CONTEXT_RATE else None
        return Phrasing(core, frame, answer_format, context)


# ---- argument drawing helpers -------------------------------------------------------------------


def _word(rng: random.Random, length: int) -> str:
    letters = [rng.choice(VOWELS if i % 2 else CONSONANTS) for i in range(length)]
    return "".join(letters)


def _digits(n: int) -> int:
    return len(str(abs(n)))


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _nums(rng: random.Random, count: int, hi: int, lo: int = 0) -> tuple[int, ...]:
    return tuple(rng.randint(lo, hi) for _ in range(count))


def _until(level_of: Callable[[tuple], int], make: Callable[[random.Random, int], tuple]) -> Callable:
    """A drawing function that redraws until the arguments are at the level asked for."""

    def draw(rng: random.Random, level: int) -> tuple:
        while True:
            args = make(rng, level)
            if level_of(args) == level:
                return args

    return draw


def _by_level(levels: dict[int, tuple[int, int]]) -> Callable[[int], int]:
    """Level from a value, given inclusive (lo, hi) ranges per level; values outside clamp to the ends."""

    def level(value: int) -> int:
        for lv, (lo, hi) in levels.items():
            if lo <= value <= hi:
                return lv
        return min(levels) if value < min(lo for lo, _ in levels.values()) else max(levels)

    return level


# arithmetic: a level per extra digit of the operands (1+1 digits up to 3+3)
def _level_digits(args: tuple) -> int:
    return _digits(args[0]) + _digits(args[1]) - 1


_OPERAND_DIGITS = {1: ((1, 1),), 2: ((2, 1), (1, 2)), 3: ((2, 2),), 4: ((3, 2), (2, 3)), 5: ((3, 3),)}


def _draw_add(rng: random.Random, level: int) -> tuple:
    da, db = rng.choice(_OPERAND_DIGITS[level])
    return (_number(rng, da), _number(rng, db))


def _draw_subtract(rng: random.Random, level: int) -> tuple:
    da, db = _OPERAND_DIGITS[level][0]  # the larger operand first: answers are never negative
    a = _number(rng, da)
    return (a, rng.randint(0 if db == 1 else 10 ** (db - 1), a) if da == db else _number(rng, db))


def _level_multiply(args: tuple) -> int:
    hi, lo = max(args), min(args)
    return 1 if hi <= 5 else 2 if hi <= 9 else 3 if lo <= 9 else 4 if lo <= 19 else 5


def _make_multiply(rng: random.Random, level: int) -> tuple:
    pair = {
        1: lambda: (rng.randint(0, 5), rng.randint(0, 5)),
        2: lambda: (rng.randint(6, 9), rng.randint(0, 9)),
        3: lambda: (rng.randint(2, 9), rng.randint(10, 99)),
        4: lambda: (rng.randint(10, 19), rng.randint(10, 99)),
        5: lambda: (rng.randint(20, 99), rng.randint(20, 99)),
    }[level]()
    return pair if rng.random() < 0.5 else pair[::-1]


def _level_compare(args: tuple) -> int:
    a, b = args
    digits, same_prefix = _digits(max(a, b)), a // 10 == b // 10
    if digits == 1:
        return 1
    if digits == 2:
        return 3 if same_prefix else 2
    return 5 if same_prefix else 4


def _make_compare(rng: random.Random, level: int) -> tuple:
    digits = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3}[level]
    a = _number(rng, digits)
    # at levels 3 and 5 the numbers differ in the last digit only
    b = a // 10 * 10 + rng.randint(0, 9) if level in (3, 5) else _number(rng, digits)
    return (a, b) if a != b else (a, a + 1 if a % 10 < 9 else a - 1)


# lists: longer lists, and two-digit numbers from level 3
def _level_sort(args: tuple) -> int:
    n, big = len(args[0]), max(args[0]) >= 10
    if not big:
        return 1 if n <= 3 else 2
    return 3 if n <= 4 else 4 if n == 5 else 5


def _make_sort(rng: random.Random, level: int) -> tuple:
    count = {1: 3, 2: 4, 3: 4, 4: 5, 5: 6}[level]
    return (_nums(rng, count, 9 if level <= 2 else 99),)


def _level_max(args: tuple) -> int:
    n, big = len(args[0]), max(args[0]) >= 10
    if not big:
        return 1 if n <= 3 else 2
    return 3 if n <= 4 else 4 if n <= 6 else 5


def _make_max(rng: random.Random, level: int) -> tuple:
    count = {1: 3, 2: 5, 3: 4, 4: 6, 5: 8}[level]
    return (_nums(rng, count, 9 if level <= 2 else 99),)


def _level_sum(args: tuple) -> int:
    n, top = len(args[0]), max(args[0])
    if top >= 10:
        return 5
    if n >= 5:
        return 4
    if n == 4:
        return 3
    return 1 if top <= 5 else 2


def _make_sum(rng: random.Random, level: int) -> tuple:
    if level == 5:
        return (_nums(rng, 3, 99, lo=10),)
    return (_nums(rng, {1: 3, 2: 3, 3: 4, 4: 5}[level], 5 if level == 1 else 9),)


def _draw_reverse_list(rng: random.Random, level: int) -> tuple:
    return (_nums(rng, level + 2, 9 if level == 1 else 99),)


def _word_task_draw(lengths: dict[int, tuple[int, int]]) -> Callable[[random.Random, int], tuple]:
    def draw(rng: random.Random, level: int) -> tuple:
        return (_word(rng, rng.randint(*lengths[level])),)

    return draw


def _word_task_level(lengths: dict[int, tuple[int, int]]) -> Callable[[tuple], int]:
    level = _by_level(lengths)
    return lambda args: level(len(args[0]))


REVERSE_LENGTHS = {1: (3, 3), 2: (4, 4), 3: (5, 5), 4: (6, 7), 5: (8, 9)}
UPPER_LENGTHS = {1: (2, 3), 2: (4, 5), 3: (6, 7), 4: (8, 9), 5: (10, 12)}
COUNT_LENGTHS = {1: (2, 4), 2: (5, 6), 3: (7, 8), 4: (9, 10), 5: (11, 13)}
WEEKDAY_STEPS = {1: (2, 3), 2: (4, 6), 3: (7, 13), 4: (14, 30), 5: (31, 99)}


def _draw_weekday(rng: random.Random, level: int) -> tuple:
    return (rng.choice(DAYS), rng.randint(*WEEKDAY_STEPS[level]))


def _eval_bool(expr: str) -> bool:
    # Ordinary precedence: "and" binds tighter than "or".
    return any(all(t == "true" for t in conj.split(" and ")) for conj in expr.split(" or "))


def _draw_expr(rng: random.Random, level: int) -> tuple:
    words = [rng.choice(("true", "false"))]
    for _ in range(level):  # one operator per level
        words += [rng.choice(("and", "or")), rng.choice(("true", "false"))]
    return (" ".join(words),)


# ---- the registry -------------------------------------------------------------------------------

_ARITHMETIC_CONTEXTS = ("I am checking my homework.", "I am practising mental arithmetic.",
                        "This came up while I was doing my budget.")
_LIST_CONTEXTS = ("I have a short list of numbers.", "These numbers come from a spreadsheet.",
                  "I wrote down a few numbers.")
_WORD_CONTEXTS = ("I am making up words for a game.", "The word below is invented.", "I'm playing a word game.")

_TASK_LIST = [
    # arithmetic
    Task(
        "add", "arithmetic", (("a", "int"), ("b", "int")),
        _cores(
            ("add {a} and {b}", "compute {a} + {b}", "add {b} to {a}", "calculate {a} plus {b}",
             "find the sum of {a} and {b}", "work out {a} + {b}", "total up {a} and {b}"),
            ("the sum of {a} and {b}", "the total of {a} and {b}", "the result of adding {a} and {b}",
             "the value of {a} + {b}"),
            ("what is {a} plus {b}?", "how much is {a} plus {b}?", "what do you get when you add {a} and {b}?",
             "if you add {a} to {b}, what do you get?"),
        ),
        _draw_add, _level_digits, lambda a: str(a[0] + a[1]), "number", weight=3.0,
        own_contexts=_ARITHMETIC_CONTEXTS,
    ),
    Task(
        "subtract", "arithmetic", (("a", "int"), ("b", "int")),
        _cores(
            ("subtract {b} from {a}", "compute {a} - {b}", "calculate {a} minus {b}", "take {b} away from {a}",
             "work out {a} - {b}", "find the difference between {a} and {b}"),
            ("the difference between {a} and {b}", "the result of taking {b} from {a}", "the value of {a} - {b}",
             "what remains when {b} is taken from {a}"),
            ("what is {a} minus {b}?", "how much is {a} take away {b}?",
             "what do you get when you subtract {b} from {a}?", "if you take {b} away from {a}, what is left?"),
        ),
        _draw_subtract, _level_digits, lambda a: str(a[0] - a[1]), "number", weight=2.0,
        own_contexts=_ARITHMETIC_CONTEXTS,
    ),
    Task(
        "multiply", "arithmetic", (("a", "int"), ("b", "int")),
        _cores(
            ("multiply {a} by {b}", "compute {a} * {b}", "calculate {a} times {b}", "work out {a} x {b}",
             "find the product of {a} and {b}", "multiply {a} and {b} together"),
            ("the product of {a} and {b}", "the result of multiplying {a} by {b}", "the value of {a} * {b}",
             "{a} multiplied by {b}"),
            ("what is {a} times {b}?", "how much is {a} multiplied by {b}?",
             "what do you get when you multiply {a} by {b}?", "what's {a} x {b}?"),
        ),
        _until(_level_multiply, _make_multiply), _level_multiply, lambda a: str(a[0] * a[1]), "number",
        own_contexts=_ARITHMETIC_CONTEXTS,
    ),
    Task(
        "compare", "arithmetic", (("a", "int"), ("b", "int")),
        _cores(
            ("pick the bigger number: {a} or {b}", "tell me which is larger, {a} or {b}",
             "choose the larger of {a} and {b}", "identify the greater number out of {a} and {b}",
             "name the bigger of {a} and {b}"),
            ("the larger of {a} and {b}", "the bigger number out of {a} and {b}", "the greater of {a} and {b}",
             "whichever is larger, {a} or {b}"),
            ("which is larger, {a} or {b}?", "which number is bigger: {a} or {b}?",
             "of {a} and {b}, which is greater?", "is {a} or {b} the larger number?"),
        ),
        _until(_level_compare, _make_compare), _level_compare, lambda a: str(max(a)), "choice", weight=2.0,
        options=lambda a: tuple(map(str, a)), own_contexts=_ARITHMETIC_CONTEXTS,
        own_formats=("Reply with the larger number only.",),
    ),
    # number lists
    Task(
        "sort", "lists", (("nums", "nums"),),
        _cores(
            ("sort {nums} in ascending order", "put {nums} in order from smallest to largest",
             "arrange these numbers in increasing order: {nums}", "order {nums} from lowest to highest",
             "rearrange {nums} so that they go from small to large", "sort the list {nums} from least to greatest"),
            ("{nums} sorted in ascending order", "the numbers {nums} in increasing order",
             "the ascending order of {nums}", "the sorted version of the list {nums}"),
            ("what do you get when you sort {nums} in ascending order?",
             "how would {nums} look sorted from low to high?", "what is the list {nums} in increasing order?"),
        ),
        _until(_level_sort, _make_sort), _level_sort, lambda a: ", ".join(map(str, sorted(a[0]))), "list",
        weight=2.0, own_contexts=_LIST_CONTEXTS,
    ),
    Task(
        "max", "lists", (("nums", "nums"),),
        _cores(
            ("find the maximum of {nums}", "pick the largest number in {nums}",
             "identify the biggest value among {nums}", "select the highest number from {nums}",
             "give the largest of {nums}"),
            ("the largest of {nums}", "the maximum of the list {nums}", "the biggest number among {nums}",
             "the highest value in {nums}"),
            ("which value in {nums} is the largest?", "which number is biggest: {nums}?", "which of {nums} is the highest?",
             "among {nums}, which is the greatest?"),
        ),
        _until(_level_max, _make_max), _level_max, lambda a: str(max(a[0])), "number", weight=2.0,
        own_contexts=_LIST_CONTEXTS,
    ),
    Task(
        "sum", "lists", (("nums", "nums"),),
        _cores(
            ("add up {nums}", "sum the numbers {nums}", "total the list {nums}", "compute the sum of {nums}",
             "find the total of {nums}", "work out the sum of the list {nums}"),
            ("the total of {nums}", "the sum of {nums}", "the sum of the list {nums}",
             "the result of adding up {nums}"),
            ("what do {nums} add up to?", "if you add {nums} together, what do you get?", "how much do {nums} come to altogether?"),
        ),
        _until(_level_sum, _make_sum), _level_sum, lambda a: str(sum(a[0])), "number",
        own_contexts=_LIST_CONTEXTS,
    ),
    Task(
        "reverse_list", "lists", (("nums", "nums"),),
        _cores(
            ("reverse the list {nums}", "write {nums} in reverse order", "list {nums} backwards",
             "flip the order of {nums}", "give {nums} from last to first", "turn the list {nums} around"),
            ("the list {nums} reversed", "{nums} in reverse order", "the reverse of the list {nums}",
             "the numbers {nums} backwards"),
            ("how does {nums} look in reverse order?", "how does the list {nums} read backwards?",
             "what do you get if you reverse {nums}?"),
        ),
        _draw_reverse_list, lambda a: len(a[0]) - 2, lambda a: ", ".join(map(str, a[0][::-1])), "list",
        own_contexts=_LIST_CONTEXTS,
    ),
    # words (made-up words, so nothing is known in advance)
    Task(
        "reverse_word", "words", (("word", "word"),),
        _cores(
            ("reverse the word {word}", "spell the word {word} backwards", "write {word} in reverse",
             "spell {word} from the last letter to the first", "flip the letters of {word}",
             "write the letters of {word} in reverse order"),
            ("the word {word} spelled backwards", "{word} written in reverse", "the reverse of the word {word}",
             "the letters of {word} in reverse order"),
            ("what is {word} spelled backwards?", "how do you spell {word} in reverse?",
             "what does {word} look like written backwards?"),
        ),
        _word_task_draw(REVERSE_LENGTHS), _word_task_level(REVERSE_LENGTHS), lambda a: a[0][::-1], "text",
        own_contexts=_WORD_CONTEXTS,
    ),
    Task(
        "uppercase", "words", (("word", "word"),),
        _cores(
            ("write {word} in capital letters", "convert {word} to uppercase", "uppercase the word {word}",
             "capitalise every letter of {word}", "put {word} in all caps", "turn {word} into upper case"),
            ("{word} in capital letters", "the word {word} in uppercase", "the all-caps form of {word}",
             "the uppercase version of {word}"),
            ("how do you write {word} in capital letters?", "how is {word} written in all caps?",
             "what does {word} look like in uppercase?"),
        ),
        _word_task_draw(UPPER_LENGTHS), _word_task_level(UPPER_LENGTHS), lambda a: a[0].upper(), "text",
        weight=2.0, case_sensitive=True, own_contexts=_WORD_CONTEXTS,
    ),
    Task(
        "count_letters", "words", (("word", "word"),),
        _cores(
            ("count the letters in {word}", "tell me how many letters {word} has",
             "find the length of the word {word}", "count how many characters are in {word}",
             "give the number of letters in {word}"),
            ("the number of letters in {word}", "the length of the word {word}", "the letter count of {word}",
             "how many characters {word} is made of"),
            ("how many letters are in {word}?", "how many letters long is the word {word}?",
             "how long is the word {word}, in letters?", "how many characters does {word} have?"),
        ),
        _word_task_draw(COUNT_LENGTHS), _word_task_level(COUNT_LENGTHS), lambda a: str(len(a[0])), "number",
        weight=2.0, own_contexts=_WORD_CONTEXTS,
    ),
    Task(
        "repeat", "words", (("word", "word"), ("k", "int")),
        _cores(
            ("repeat {word} {k} times", "write {word} {k} times", "say {word} {k} times, separated by spaces",
             "write the word {word} {k} times in a row", "print {word} {k} times"),
            ("the word {word} repeated {k} times", "{word} written out {k} times",
             "{k} copies of {word}, separated by spaces"),
            ("what is {word} repeated {k} times?", "what do you get if you write {word} {k} times?",
             "how does {word} look when repeated {k} times?"),
        ),
        lambda rng, lv: (_word(rng, rng.randint(2, 4)), lv + 1), lambda a: a[1] - 1,
        lambda a: " ".join([a[0]] * a[1]), "text", weight=2.0, own_contexts=_WORD_CONTEXTS,
    ),
    # logic and dates
    Task(
        "weekday", "logic", (("day", "day"), ("n", "int")),
        _cores(
            ("tell me what day it is {n} days after {day}", "work out the day {n} days after {day}",
             "name the weekday {n} days after {day}", "count {n} days forward from {day} and name the day",
             "find the day of the week {n} days after {day}"),
            ("the day {n} days after {day}", "the weekday that comes {n} days after {day}",
             "the day of the week {n} days from {day}"),
            ("what day is {n} days after {day}?", "if today is {day}, what day is it in {n} days?",
             "which weekday comes {n} days after {day}?", "starting from {day}, what day is it after {n} days?"),
        ),
        _draw_weekday, lambda a: _by_level(WEEKDAY_STEPS)(a[1]),
        lambda a: DAYS[(DAYS.index(a[0]) + a[1]) % 7], "choice", options=lambda a: DAYS,
        own_contexts=("I am planning my week.", "I'm trying to plan ahead.", "This is about a calendar."),
        own_formats=("Name the day only.",),
    ),
    Task(
        "boolean", "logic", (("expr", "expr"),),
        _cores(
            ("evaluate {expr}", "decide whether {expr} is true or false", "work out the truth value of {expr}",
             "simplify {expr:sym} to true or false", "compute the boolean value of {expr:caps}",
             "determine if {expr:sym} holds"),
            ("the value of {expr}", "the truth value of {expr:sym}", "the result of the logical expression {expr:caps}"),
            ("is {expr} true or false?", "what does {expr:sym} evaluate to?",
             "what is the value of the boolean expression {expr}?"),
        ),
        _draw_expr, lambda a: a[0].count(" and ") + a[0].count(" or "),
        lambda a: "true" if _eval_bool(a[0]) else "false", "choice", weight=2.0,
        options=lambda a: ("true", "false"),
        own_contexts=("This is from a logic exercise.", "Use the usual precedence: and before or."),
        own_formats=("Answer true or false.", "Reply with true or false only."),
    ),
]

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}
DOMAINS: dict[str, tuple[str, ...]] = {}
for _t in _TASK_LIST:
    DOMAINS[_t.domain] = (*DOMAINS.get(_t.domain, ()), _t.name)


# ---- reading an instruction back ----------------------------------------------------------------


def _core_regex(task: Task, index: int) -> str:
    kinds = dict(task.fields)
    parts = _FIELD.split(task.cores[index].text)  # literal, name, notation, literal, ...
    out = []
    for i in range(0, len(parts), 3):
        out.append(re.escape(parts[i]))
        if i + 1 < len(parts):
            name, notation = parts[i + 1], parts[i + 2]
            kind = f"{kinds[name]}:{notation}" if notation else kinds[name]
            out.append(f"(?P<f{_TASK_LIST.index(task)}_{index}_{name}>{FIELD_PATTERNS[kind]})")
    return "".join(out)


def _form_regex(form: str) -> re.Pattern[str]:
    """Every core wording of one form, of every task, as one alternation; the outer group names which."""
    alternatives = [f"(?P<c{ti}_{ci}>{_core_regex(task, ci)})"
                    for ti, task in enumerate(_TASK_LIST) for ci, core in enumerate(task.cores) if core.form == form]
    return re.compile("|".join(alternatives))


_FORM_REGEX = {form: _form_regex(form) for form in FRAMES}
_ALL_CONTEXTS = sorted({c for t in _TASK_LIST for c in t.contexts}, key=len, reverse=True)
_ALL_FORMATS = sorted({f for t in _TASK_LIST for f in t.formats}, key=len, reverse=True)


def _split_slots(text: str) -> Iterable[tuple[str | None, str, str | None]]:
    """Every (context, sentence, answer format) reading of a text."""
    contexts: list[tuple[str | None, str]] = [(None, text)]
    contexts += [(c, text[len(c) + 1:]) for c in _ALL_CONTEXTS if text.startswith(c + " ")]
    for context, rest in contexts:
        yield context, rest, None
        for f in _ALL_FORMATS:
            if rest.endswith(" " + f):
                yield context, rest[: -len(f) - 1], f


def _read_core(form: str, body: str) -> tuple[Task, int, tuple] | None:
    m = _FORM_REGEX[form].fullmatch(body)
    if not m or m.lastgroup is None:
        return None
    ti, ci = (int(x) for x in m.lastgroup[1:].split("_"))
    task = _TASK_LIST[ti]
    core = task.cores[ci].text
    kinds = dict(task.fields)
    notations = {name: notation for name, notation in _FIELD.findall(core)}
    args = tuple(
        _read_field(f"{kinds[name]}:{notations[name]}" if notations.get(name) else kinds[name],
                    m.group(f"f{ti}_{ci}_{name}"))
        for name, _ in task.fields
    )
    return task, ci, args


def parse(text: str) -> Instance | None:
    """Read any phrasing of any task back into its instance; None when nothing matches."""
    text = " ".join(text.split())
    for context, sentence, answer_format in _split_slots(text):
        for form, frames in FRAMES.items():
            for fi, frame in enumerate(frames):
                if not (sentence.startswith(frame.prefix) and sentence.endswith(frame.suffix)):
                    continue
                body = sentence[len(frame.prefix): len(sentence) - len(frame.suffix)]
                if not body or frame.capital != body[0].isupper():
                    continue
                if frame.capital:
                    body = body[0].lower() + body[1:]
                found = _read_core(form, body)
                if found is not None:
                    task, ci, args = found
                    return Instance(task.name, args, Phrasing(ci, fi, answer_format, context))
    return None


# ---- instances ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One problem: a task, its arguments and the phrasing its instruction is written in."""

    task: str
    args: tuple
    phrasing: Phrasing = PLAIN

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


def sample(
    rng: random.Random,
    task: str | None = None,
    domain: str | None = None,
    level: int | None = None,
    split: str = "train",
    phrasing: Phrasing | None = None,
) -> Instance:
    """Draw a problem, written in a random phrasing unless one is given.

    Unset task/domain/level are drawn uniformly; `split` is "train", "test" or "any".
    """
    if task is None:
        task = rng.choice(DOMAINS[domain] if domain else tuple(TASKS))
    spec = TASKS[task]
    level = rng.choice(spec.levels) if level is None else level
    if level not in spec.levels:
        raise WorldOptionError("level", f"task {task!r} has levels {spec.levels}, not {level}")
    while True:  # a few draws at most: the test split is a fifth of every level
        args = spec.draw(rng, level)
        if split == "any" or split_of(task, args) == split:
            break
    return Instance(task, args, spec.random_phrasing(rng) if phrasing is None else phrasing)


def answer(instance: Instance) -> str:
    return instance.answer


# ---- grading ------------------------------------------------------------------------------------


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


# ---- options, pools and corpora -----------------------------------------------------------------


def check_count(option: str, value: Any, least: int = 1) -> int:
    """An integer option (a pool size N, a number of seeds, items per type) of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise WorldOptionError(option, f"must be an integer >= {least}, not {value!r}")
    return value


def check_levels(levels: Iterable[int] | None, option: str = "levels") -> tuple[int, ...]:
    """A non-empty set of the world's levels, in order; None means all of them."""
    if levels is None:
        return LEVELS
    chosen = tuple(sorted(set(levels)))
    if not chosen or any(lv not in LEVELS for lv in chosen):
        raise WorldOptionError(option, f"must be one or more of {', '.join(map(str, LEVELS))}, not {list(levels)}")
    return chosen


def zipf_shares(zipf: float) -> dict[str, float]:
    """Seed share per task type for a long-tailed pool: types ranked by the world's commonness (`Task.weight`,
    ties in the world's order), the type of rank r getting a share proportional to 1 / r**zipf (0: uniform)."""
    if isinstance(zipf, bool) or not isinstance(zipf, (int, float)) or not 0 <= zipf <= 10 or math.isnan(zipf):
        raise WorldOptionError("zipf", f"must be a number from 0 to 10, not {zipf!r}")
    ranked = sorted(TASKS, key=lambda t: -TASKS[t].weight)
    raw = {t: 1.0 / (r + 1) ** zipf for r, t in enumerate(ranked)}
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


def seed_pool(n: int, seed: int = 0, *, task_weights: Mapping[str, float] | None = None,
              levels: Iterable[int] | None = None, rng: random.Random | None = None) -> list[dict[str, Any]]:
    """`n` distinct training-split instructions, common task types and low levels more frequent.

    `task_weights` replaces the world's own task frequencies (e.g. `zipf_shares(1.0)` for a long-tailed
    pool); `levels` restricts the levels drawn; `rng` replaces the generator seeded by `seed`.
    """
    check_count("N", n)
    allowed = check_levels(levels)
    if task_weights is not None:
        unknown = sorted(set(task_weights) - set(TASKS))
        if unknown:
            raise WorldOptionError("task_weights", f"unknown task type {unknown[0]!r}")
        if any(w < 0 for w in task_weights.values()) or sum(task_weights.values()) <= 0:
            raise WorldOptionError("task_weights", "weights must be >= 0 with a positive sum")
    rng = rng or random.Random(f"seed-pool:{seed}")
    names = list(task_weights) if task_weights else list(TASKS)
    weights = list(task_weights.values()) if task_weights else [TASKS[t].weight for t in names]
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(n * 50):
        if len(out) == n:
            break
        task = rng.choices(names, weights)[0]
        levels_here = [lv for lv in TASKS[task].levels if lv in allowed]
        level = rng.choices(levels_here, [SEED_LEVEL_WEIGHTS.get(lv, 0.1) for lv in levels_here])[0]
        inst = sample(rng, task=task, level=level)
        if inst.instruction not in seen:
            seen.add(inst.instruction)
            out.append(inst.to_record())
    return out


def test_set(per_task: int = 100, seed: int = 0, levels: Iterable[int] | None = None) -> list[Instance]:
    """Held-out problems: `per_task` per task type, balanced over levels (in turn), from the test split.

    Distinct instructions where the level has enough of them; small levels repeat.
    """
    check_count("per_task", per_task)
    allowed = check_levels(levels)
    rng = random.Random(f"test-set:{seed}")
    out: list[Instance] = []
    for name, spec in TASKS.items():
        seen: set[tuple] = set()
        levels_here = [lv for lv in spec.levels if lv in allowed]
        for i in range(per_task):
            level = levels_here[i % len(levels_here)]
            for _ in range(30):
                inst = sample(rng, task=name, level=level, split="test")
                if inst.args not in seen:
                    break
            seen.add(inst.args)
            out.append(inst)
    return out


# ---- accuracy as users see it -------------------------------------------------------------------


def pool_shares(records: Iterable[Mapping[str, Any] | str]) -> dict[str, float]:
    """The task-type distribution of a pool (records with a "task" or an "instruction", or texts)."""
    counts: Counter[str] = Counter()
    for r in records:
        task = r.get("task") if isinstance(r, Mapping) else None
        if task is None:
            inst = parse(r if isinstance(r, str) else r["instruction"])
            task = inst.task if inst else None
        if task is not None:
            counts[task] += 1
    total = sum(counts.values())
    return {t: counts[t] / total for t in TASKS if counts[t]} if total else {}


def balanced_accuracy(by_task: Mapping[str, float]) -> float:
    """Every task type counts the same (the test set's own balance)."""
    if not by_task:
        raise ValueError("no task accuracies to average")
    return sum(by_task.values()) / len(by_task)


def weighted_accuracy(by_task: Mapping[str, float], shares: Mapping[str, float]) -> float:
    """Accuracy weighted by a type distribution (a seed pool's: what a user's traffic looks like)."""
    missing = [t for t, s in shares.items() if s > 0 and t not in by_task]
    if missing:
        raise ValueError(f"no accuracy for task type {missing[0]!r}, which has a share of {shares[missing[0]]:.3f}")
    total = sum(s for s in shares.values() if s > 0)
    if total <= 0:
        raise ValueError("the shares have no positive weight")
    return sum(s * by_task[t] for t, s in shares.items() if s > 0) / total


def corpus(n_per_phrasing: int = 20, seed: int = 0) -> list[str]:
    """Texts for training a tokenizer: every core wording in every framing, the optional slots, numbers,
    answers, day and truth words (`n_per_phrasing` problems per task, level and form).

    Made-up words are left out (their instructions are written with the word removed), so a tokenizer
    trained on this keeps them in letters and short pieces: reversing, counting and capitalising
    then act on small units instead of on arbitrary merged chunks.
    """
    rng = random.Random(f"corpus:{seed}")
    texts = [" ".join(DAYS), "true false and or TRUE FALSE AND OR && ||", "0 1 2 3 4 5 6 7 8 9",
             *_ALL_CONTEXTS, *_ALL_FORMATS]
    for name, spec in TASKS.items():
        words = [n for n, kind in spec.fields if kind == "word"]
        for ci, core in enumerate(spec.cores):
            for fi in range(len(FRAMES[core.form])):
                inst = sample(rng, task=name, split="any", phrasing=Phrasing(ci, fi))
                if words:
                    args = tuple("" if n in words else v for (n, _), v in zip(spec.fields, inst.args, strict=True))
                    texts.append(re.sub(r" (?=[.,?])", "", " ".join(spec.render(args, inst.phrasing).split())))
                else:
                    texts.append(inst.instruction)
        if words:
            continue
        for level in spec.levels:
            for _ in range(n_per_phrasing):
                inst = sample(rng, task=name, level=level, split="any")
                texts.append(f"{inst.instruction}\n{inst.answer}")
    return texts
