"""Novelty filter speed: lionkd's ROUGE-L filter against pairwise `rouge_score`, side by side.

2,000 candidate instructions are filtered against a 20,000-instruction pool (synthetic but
instruction-like: an opening verb, 8-30 words drawn from a Zipf-distributed vocabulary, some
near-duplicates). lionkd filters all of them; pairwise rouge_score is timed on the first few
candidates against the full pool (sequentially, as the filter would run) and extrapolated to 2,000,
and on that sample the two must take identical keep/reject decisions.

    python -m benchmarks.novelty          (or: python benchmarks/novelty.py)
"""

from __future__ import annotations

import random
import time

from rouge_score import rouge_scorer

from _common import write_results
from lionkd.lion.novelty import NoveltyFilter

POOL_SIZE = 20_000
CANDIDATES = 2_000
REFERENCE_SAMPLE = 8  # candidates scored with rouge_score against the whole pool
THRESHOLD = 0.7

OPENINGS = ["Write", "Explain", "List", "Describe", "Give", "Summarize", "Create", "Suggest", "Compare",
            "Classify", "Translate", "Rewrite", "Generate", "Identify", "Find", "Calculate", "Design", "Name"]


def _vocabulary(rng: random.Random, size: int = 6000) -> tuple[list[str], list[float]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(size)})
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words are everywhere
    return words, weights


def _instruction(rng: random.Random, words: list[str], weights: list[float]) -> str:
    body = rng.choices(words, weights, k=rng.randint(7, 29))
    return f"{rng.choice(OPENINGS)} {' '.join(body)}{rng.choice(['.', '?', ':', ''])}"


def _near_duplicate(rng: random.Random, text: str, words: list[str], weights: list[float]) -> str:
    tokens = text.split()
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(tokens))
        if rng.random() < 0.5:
            tokens[i] = rng.choices(words, weights)[0]
        elif len(tokens) > 8:
            tokens.pop(i)
    return " ".join(tokens)


def make_corpus(seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    words, weights = _vocabulary(rng)
    pool: list[str] = []
    for _ in range(POOL_SIZE):
        if pool and rng.random() < 0.05:
            pool.append(_near_duplicate(rng, rng.choice(pool), words, weights))
        else:
            pool.append(_instruction(rng, words, weights))
    candidates = [
        _near_duplicate(rng, rng.choice(pool), words, weights) if rng.random() < 0.3
        else _instruction(rng, words, weights)
        for _ in range(CANDIDATES)
    ]
    return pool, candidates


def reference_decisions(pool: list[str], candidates: list[str]) -> list[bool]:
    """The public scripts' way: rouge_score on every (candidate, known instruction) pair."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    known = list(pool)
    kept = []
    for cand in candidates:
        best = max(scorer.score(p, cand)["rougeL"].fmeasure for p in known)
        kept.append(best <= THRESHOLD)
        if kept[-1]:
            known.append(cand)
    return kept


def main() -> dict:
    pool, candidates = make_corpus()

    start = time.perf_counter()
    filt = NoveltyFilter(pool, threshold=THRESHOLD)
    decisions = filt.add_many(candidates)
    ours_s = time.perf_counter() - start

    sample = candidates[:REFERENCE_SAMPLE]
    start = time.perf_counter()
    expected = reference_decisions(pool, sample)
    sample_s = time.perf_counter() - start
    reference_s = sample_s / len(sample) * len(candidates)

    ours_sample = [kept for kept, _ in NoveltyFilter(pool, threshold=THRESHOLD).add_many(sample)]
    identical = ours_sample == expected
    result = {
        "pool": len(pool),
        "candidates": len(candidates),
        "kept": sum(kept for kept, _ in decisions),
        "lionkd_s": round(ours_s, 3),
        "rouge_score_s_extrapolated": round(reference_s, 1),
        "rouge_score_sample": f"{len(sample)} candidates x {len(pool)} pool texts, {sample_s:.1f} s",
        "speedup": round(reference_s / ours_s, 1),
        "sample_rejected": expected.count(False),
        "identical_decisions_on_sample": identical,
        "threshold": THRESHOLD,
    }
    print(f"Novelty filter: {len(candidates)} candidates vs a {len(pool)}-instruction pool, ROUGE-L F <= {THRESHOLD}")
    print(f"{'method':<34}{'seconds':>12}{'kept':>8}")
    print(f"{'lionkd NoveltyFilter (1 worker)':<34}{ours_s:>12.2f}{result['kept']:>8}")
    print(f"{'rouge_score pairwise (extrapolated)':<34}{reference_s:>12.1f}{'-':>8}")
    print(f"speed ratio: {result['speedup']:.0f}x  (rouge_score timed on {result['rouge_score_sample']},"
          f" extrapolated to {len(candidates)} candidates)")
    print(f"identical decisions on the sample ({expected.count(False)} rejected of {len(sample)}): {identical}")
    write_results("novelty", result)
    if not identical:
        raise SystemExit("decisions differ from rouge_score")
    return result


if __name__ == "__main__":
    main()
