"""The novelty filter decides and scores exactly as pairwise rouge_score does, only faster."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from lionkd.lion.novelty import NoveltyFilter, f_measure, rouge_tokens, unicode_tokens

VOCAB = ["write", "a", "poem", "about", "the", "sea", "list", "three", "Facts", "on", "cats", "explain",
         "why", "sky", "is", "blue", "sort", "numbers", "7", "42", "x-ray", "don't", "café", "naïve", "U.S.A"]


def _text(rng: random.Random, lo: int = 3, hi: int = 14) -> str:
    words = [rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))]
    return " ".join(words) + rng.choice(["", ".", "?", "!!", " :)"])


def _near(rng: random.Random, text: str) -> str:
    """A small edit of `text`: such pairs land around the 0.7 threshold."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(3)
        if op == 0 and len(words) > 1:
            words.pop(rng.randrange(len(words)))
        elif op == 1:
            words.insert(rng.randrange(len(words) + 1), rng.choice(VOCAB))
        else:
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
    return " ".join(words)


@pytest.fixture(scope="module")
def scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def test_tokens_match_rouge_score(scorer: rouge_scorer.RougeScorer) -> None:
    for text in ["Hello, World!", "x-ray   don't", "Café naïve U.S.A 42", "", "  ...  ", "ÀB cd_ef", "İstanbul"]:
        assert rouge_tokens(text) == scorer._tokenizer.tokenize(text)
    assert unicode_tokens("Ünïcode Wörter, 東京 tower") == ["ünïcode", "wörter", "東京", "tower"]


def test_scores_equal_rouge_score(scorer: rouge_scorer.RougeScorer) -> None:
    rng = random.Random(0)
    pool = [_text(rng) for _ in range(150)]
    pool += [_near(rng, rng.choice(pool)) for _ in range(100)] + ["", "!!!"]
    filt = NoveltyFilter(pool)
    near_threshold = 0
    for _ in range(80):
        cand = _near(rng, rng.choice(pool)) if rng.random() < 0.6 else _text(rng)
        ours = filt.scores(cand)
        ref = np.array([scorer.score(p, cand)["rougeL"].fmeasure for p in pool])
        assert np.abs(ours - ref).max() <= 1e-9
        assert ((ours > 0.7) == (ref > 0.7)).all()
        near_threshold += int(((ref > 0.6) & (ref < 0.8)).sum())
    assert near_threshold > 30  # the corpus really tests the boundary


def test_decisions_equal_sequential_rouge_score(scorer: rouge_scorer.RougeScorer) -> None:
    rng = random.Random(1)
    pool = [_text(rng) for _ in range(120)]
    candidates = []
    for _ in range(250):
        base = rng.choice(pool + candidates) if candidates else rng.choice(pool)
        candidates.append(_near(rng, base) if rng.random() < 0.7 else _text(rng))
    # the reference: pairwise rouge_score against the pool and every candidate kept before
    ref_pool, expected = list(pool), []
    for cand in candidates:
        best = max((scorer.score(p, cand)["rougeL"].fmeasure for p in ref_pool), default=0.0)
        expected.append((best <= 0.7, best))
        if best <= 0.7:
            ref_pool.append(cand)
    one_by_one = NoveltyFilter(pool)
    got = [one_by_one.add_if_novel(c) for c in candidates]
    batched = NoveltyFilter(pool).add_many(candidates)
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert [k for k, _ in batched] == [k for k, _ in expected]
    assert 40 < sum(k for k, _ in expected) < 210
    for (kept, ours), (_, ref) in zip(got, expected, strict=True):
        if not kept:  # a rejected text's max is exact
            assert abs(ours - ref) <= 1e-9
        else:
            assert ours <= ref + 1e-12 and ours <= 0.7
    assert len(one_by_one) == len(ref_pool)


def test_threshold_is_inclusive_and_pool_grows() -> None:
    # 2 of 4 tokens in common: P = R = 0.5, F = 0.5 exactly, which is not above a threshold of 0.5
    filt = NoveltyFilter(["one two three four"], threshold=0.5)
    assert filt.add_if_novel("one two five six") == (True, 0.5)
    kept, score = filt.add_if_novel("One, two: five six.")
    assert not kept and score == 1.0
    assert f_measure(3, 5, 5) == pytest.approx(0.6)
    assert NoveltyFilter([]).add_if_novel("anything at all") == (True, 0.0)


def test_unicode_tokenizer() -> None:
    filt = NoveltyFilter(["Напиши стихотворение о море"], tokenizer="unicode")
    assert not filt.add_if_novel("напиши СТИХОТВОРЕНИЕ о море!")[0]
    assert filt.add_if_novel("Объясни, почему небо голубое")[0]
    # the rouge tokenizer sees no tokens in Cyrillic: everything is "novel"
    assert NoveltyFilter(["Напиши стихотворение о море"]).add_if_novel("напиши стихотворение о море")[0]
