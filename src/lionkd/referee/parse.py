"""Reading a referee reply: the two 1-10 scores in free text.

`parse_scores` reads them out of a reply ("Assistant 1: 8", "**Assistant 1:** 8/10", "8 7", ...)
and returns None when it cannot tell them reliably (a missing or conflicting score, a score out of
10 that is out of range, a range like "7-8"). A reply it cannot read is asked again with a
different seed; a pair still unreadable after the retries is reported with an error and must be
left out by the caller, never scored.
"""

from __future__ import annotations

import re

MAX_SCORE = 10.0

_NUMBER = r"(?<![\d.])(?P<num>\d+(?:\.\d+)?)(?![\d.]*\d)"
_DENOMINATOR = r"(?P<tail>\s*(?:/|out\s+of)\s*(?P<den>\d+(?:\.\d+)?)|\s*[-–]\s*\d)?"
# How a labelled score may be written between the label and the number: punctuation, markdown and a
# few connecting words ("Assistant 1 receives a score of 8", "**Assistant 1:** 8/10").
_GAP_WORDS = (r"score|scores|rating|rated|scored|gets|get|receives|earns|deserves|is|a|an|of|given|overall|final"
              r"|total|s|would|be|should|i|give")
_LABELLED = re.compile(
    r"assistant\s*#?\s*(?P<who>[12])(?!\d)"
    rf"(?P<gap>(?:[^\w\n]|_|\n|\b(?:{_GAP_WORDS})\b){{0,40}}?)"
    rf"{_NUMBER}{_DENOMINATOR}",
    re.IGNORECASE,
)
# "I would rate Assistant 1's code a 7 out of 10": any few words between label and a score out of 10.
_LOOSE = re.compile(
    r"assistant\s*#?\s*(?P<who>[12])(?!\d)(?P<gap>[^\n.!?]{0,40}?)"
    rf"{_NUMBER}(?P<tail>\s*(?:/|out\s+of)\s*(?P<den>10(?:\.0+)?))(?![\d.]*\d)",
    re.IGNORECASE,
)
# "Assistant 1's answer is clear, scoring 9": a scoring word right before the number, in one sentence
# about one assistant.
_SCORED_AS = re.compile(
    r"assistant\s*#?\s*(?P<who>[12])(?!\d)(?P<gap>(?:(?!assistant)[^\n.!?;]){0,60}?)"
    r"\b(?:scoring|scores|scored|score\s+of|rating\s+of|rated(?:\s+at)?)\s+(?:an?\s+)?"
    rf"{_NUMBER}{_DENOMINATOR}",
    re.IGNORECASE,
)
# Words that may follow a score ("8 and Assistant 2 ...", "8 points", "8 because ..."); any other word
# ("3 sentences shorter", "3 of the 4 steps") or sign ("100% correct", "12 * 4") makes it a count, not a score.
_FOLLOWERS = frozenset({"and", "while", "whereas", "but", "because", "since", "as", "due", "points", "point",
                        "pts", "overall", "so", "which", "with", "given", "vs", "versus", "compared", "then",
                        "thanks", "out"})
# "2 points better" is a difference, "8 points on clarity" one criterion: neither is the score
_NOT_AFTER_POINTS = re.compile(
    r"\s*(?:better|worse|higher|lower|more|less|ahead|behind|above|below|lead|up|down|on|for|in)\b", re.IGNORECASE)
# "8 for its clarity" is a score with a reason; "8 for accuracy" may be one criterion of several
_FOR_A_REASON = re.compile(r"\s*(?:a|an|its|their|the|being|providing|giving|offering)\b", re.IGNORECASE)
_SCORE_WORDS = re.compile(r"\b(?:scores?|scored|rat(?:e|ed|ing|ings)|give|gives|award|assign|receives|earns|deserves)\b",
                          re.IGNORECASE)
# A line holding only a label ("Assistant 1:", "**Assistant 2's response**", "### Assistant 1") opens a
# section, and a score line inside it ("Overall score: 8/10", "Rating: 7") is that assistant's score.
_SECTION_LABEL = re.compile(
    r"^[\W_]*assistant\s*#?\s*(?P<who>[12])(?!\d)(?:'s)?(?:\s+(?:response|answer|reply|output))?[\W_]*$",
    re.IGNORECASE,
)
_SECTION_SCORE = re.compile(
    r"^[\W_]*(?:(?P<overall>overall|final|total)(?:\s+(?:score|rating|grade))?|(?:score|rating|grade))"
    r"(?:\s+(?:for|of)\s+\w+)?[\W_]*"
    rf"{_NUMBER}{_DENOMINATOR}[\s*_.)]*(?:\(.*\))?[\s.]*$",
    re.IGNORECASE,
)
_BARE = r"\**(?P<{n}>\d+(?:\.\d+)?)\**(?:\s*/\s*10(?:\.0+)?)?"
_TWO_BARE = re.compile(rf"^[^\w*]*(?:{_BARE.format(n='a')})\s*(?:[,;]\s*|\s+)(?:{_BARE.format(n='b')})[\s.]*$")
_ONE_BARE = re.compile(rf"^[^\w*]*(?:{_BARE.format(n='a')})[\s.]*$")
_WORDS = re.compile(r"[^\W\d_]+")


def parse_scores(text: str) -> tuple[float, float] | None:
    """The scores of Assistant 1 and Assistant 2 in a referee reply, or None when unreadable.

    Read in this order: a first line holding only the two scores (the paper's format, "8 9"), labelled
    scores anywhere in the reply ("Assistant 1: 8", "Assistant 2 receives a 7", "rate Assistant 1's
    code a 7 out of 10"), each assistant's section ("Assistant 1:" ...
    "Overall score: 8/10"), then bare numbers on the first or the last lines ("8 7"). A number that
    reads as a count or a share ("Assistant 1 is 100% correct", "gets 3 of the 4 steps", "is 3
    sentences shorter") is not a score; two different scores for one assistant make the reply
    unreadable rather than a guess.
    """
    if not text or not text.strip():
        return None
    labelled = _labelled_scores(text)
    # The paper's format: a first line holding only the two scores, then the explanation. What the
    # explanation says about "Assistant 1" or "Assistant 2" cannot unsettle that line; only a complete
    # pair of labelled scores that disagrees with it makes the reply unreadable.
    first = _two_bare(text.strip().splitlines()[0].strip())
    if first is not None:
        return first if labelled in (None, (), first) else None
    if labelled is not None:
        return labelled if labelled != () else None
    return _bare_scores(text)


def _labelled_scores(text: str) -> tuple[float, float] | tuple[()] | None:
    """Scores from labels and sections; () when they exist but are unreliable; None when absent."""
    found: dict[str, list[float]] = {"1": [], "2": []}
    bad = False
    claimed: list[tuple[int, int]] = []
    last_end = 0
    for m in _LABELLED.finditer(text):
        gap = m.group("gap")
        strict = not re.search(r"[^\W\d_]", gap)  # punctuation and markdown only: "Assistant 1: 8"
        strong = (strict or m.group("den") is not None or _SCORE_WORDS.search(gap) or _score_word_before(text, m)
                  or re.search(r"\ban?\W*$", gap))  # "gets a 10": a grade, not a count
        if "\n\n" in gap or not (strong or _near_line_start(text, m.start(), last_end)):
            continue
        if "\n" in gap and not strict or "\n" in gap and "|" in gap:
            continue  # only "Assistant 1:" may stand alone above its score, not a table header or a heading
        if not _plausible_follower(text[m.end():]):
            continue
        last_end = m.end()
        claimed.append(m.span())
        value = _checked(m.group("num"), m.group("tail"), m.group("den"))
        if value is None and not m.group("tail"):
            continue  # "Assistant 2: 40, wrong": an answer quoted in a worked solution, not a score
        if value is None or gap.endswith(("-", "−")):  # out of its scale, a range, or negative
            bad = bad or strict
        else:
            found[m.group("who")].append(value)
    for loose in (_LOOSE, _SCORED_AS):
        for m in loose.finditer(text):
            if any(a <= m.start("num") < b for a, b in claimed) or not _plausible_follower(text[m.end():]):
                continue
            claimed.append((m.start("num"), m.end("num")))
            value = _checked(m.group("num"), m.group("tail"), m.group("den"))
            if value is not None:
                found[m.group("who")].append(value)
    for who, value in (_section_scores(text) | _table_scores(text)).items():
        if not found[who]:
            found[who].append(value)
    if not found["1"] and not found["2"] and not bad:
        return None
    if bad or not found["1"] or not found["2"]:
        return ()
    if len(set(found["1"])) > 1 or len(set(found["2"])) > 1:
        return ()  # the reply contradicts itself
    return found["1"][0], found["2"][0]


def _score_word_before(text: str, m: re.Match[str]) -> bool:
    """"I would rate Assistant 1 ...", "I give Assistant 2 ...": a scoring verb just before the label."""
    line_begin = text.rfind("\n", 0, m.start()) + 1
    return _SCORE_WORDS.search(" ".join(_WORDS.findall(text[line_begin:m.start()])[-3:])) is not None


def _plausible_follower(rest: str) -> bool:
    """Can the text right after a number follow a score (and not a count, a share or a calculation)?"""
    rest = rest.lstrip(" \t*_")
    if not rest or rest[0] in "\n.,;:)]|!?(—–-\"'":
        return True
    if not rest[0].isalpha():
        return False  # "%", "*", "=", "x": a share or a calculation
    word = _WORDS.match(rest)
    name = word.group().lower() if word else ""
    if name == "for":
        return _FOR_A_REASON.match(rest[word.end():]) is not None  # type: ignore[union-attr]
    if name not in _FOLLOWERS:
        return False
    if name in ("points", "point", "pts"):
        return _NOT_AFTER_POINTS.match(rest[word.end():]) is None  # type: ignore[union-attr]
    return True


def _section_scores(text: str) -> dict[str, float]:
    """The score of each assistant's own section: its one overall score line, else its one score line."""
    out: dict[str, float] = {}
    who: str | None = None
    lines: dict[str, list[re.Match[str]]] = {"1": [], "2": []}
    for line in text.splitlines():
        label = _SECTION_LABEL.match(line)
        if label:
            who = label.group("who")
            continue
        score = _SECTION_SCORE.match(line) if who else None
        if score and who:
            lines[who].append(score)
    for key, matches in lines.items():
        overall = [m for m in matches if m.group("overall")] or matches
        values = {_checked(m.group("num"), m.group("tail"), m.group("den")) for m in overall}
        if len(values) == 1 and None not in values:
            out[key] = values.pop()  # type: ignore[assignment]
    return out


_CELL_LABEL = re.compile(r"^[\W_]*assistant\s*#?\s*(?P<who>[12])(?!\d)[\W_]*$", re.IGNORECASE)
_CELL_TOTAL = re.compile(r"^[\W_]*(?:overall|total|final|score|rating)(?:\s+(?:score|rating))?[\W_]*$", re.IGNORECASE)
_CELL_SCORE = re.compile(rf"^[\s*_]*{_NUMBER}{_DENOMINATOR}[\s*_]*$")


def _table_scores(text: str) -> dict[str, float]:
    """A markdown table with one column per assistant and one overall (or score) row."""
    columns: dict[str, int] = {}
    rows: list[dict[str, float | None]] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if not cells:
            columns = {} if not rows else columns
            continue
        labels = {m.group("who"): i for i, c in enumerate(cells) if (m := _CELL_LABEL.match(c))}
        if set(labels) == {"1", "2"}:
            columns, rows = labels, []
        elif columns and _CELL_TOTAL.match(cells[0]):
            row: dict[str, float | None] = {}
            for who, i in columns.items():
                m = _CELL_SCORE.match(cells[i]) if i < len(cells) else None
                row[who] = _checked(m.group("num"), m.group("tail"), m.group("den")) if m else None
            rows.append(row)
    if len(rows) != 1 or None in rows[0].values():
        return {}
    return {who: value for who, value in rows[0].items() if value is not None}


def _near_line_start(text: str, start: int, last_end: int) -> bool:
    """A score label leads its line: at most a few words before it (markdown, "Score of the", "Scores:"),
    counting from the line start or from the previous score on the same line."""
    line_begin = text.rfind("\n", 0, start) + 1
    begin = max(line_begin, last_end)
    return len(_WORDS.findall(text[begin:start])) <= 4


def _checked(num: str, tail: str | None, den: str | None) -> float | None:
    value = float(num)
    if tail and den is None:
        return None  # a range such as "7-8"
    if den is not None and float(den) != MAX_SCORE:
        return None  # out of another scale
    return value if 0.0 <= value <= MAX_SCORE else None


def _bare_scores(text: str) -> tuple[float, float] | None:
    """"8 7" or "8, 7" on the first line, or one bare score on each of the first two lines; the same at
    the end of the reply (after an explanation)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    pair = _two_bare(lines[0]) or (_one_each(lines[0], lines[1]) if len(lines) > 1 else None)
    if pair is None and len(lines) > 1:
        pair = _two_bare(lines[-1]) or (_one_each(lines[-2], lines[-1]) if len(lines) > 2 else None)
    return pair


def _two_bare(line: str) -> tuple[float, float] | None:
    m = _TWO_BARE.match(line)
    return _valid_pair(m.group("a"), m.group("b")) if m else None


def _one_each(first: str, second: str) -> tuple[float, float] | None:
    a, b = _ONE_BARE.match(first), _ONE_BARE.match(second)
    return _valid_pair(a.group("a"), b.group("a")) if a and b else None


def _valid_pair(a: str, b: str) -> tuple[float, float] | None:
    pair = _checked(a, None, None), _checked(b, None, None)
    return (pair[0], pair[1]) if pair[0] is not None and pair[1] is not None else None
