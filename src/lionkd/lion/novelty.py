"""The novelty filter: keep a new instruction only if it is not too close to any known one.

Closeness is the ROUGE-L F-measure exactly as `rouge_score` computes it (`RougeScorer(["rougeL"],
use_stemmer=False)`: lower-case, runs of [a-z0-9] as tokens, F = 2PR/(P+R) of the longest common
subsequence of tokens), but fast:

- every distinct token becomes one character, so a text becomes a short string and rapidfuzz's
  bit-parallel LCS (`LCSseq`) compares one candidate with thousands of pool texts in one C++ call;
- the pool is kept in buckets by token length, and a bucket is skipped when even a perfect LCS
  (L = min(m, n), F <= 2 min(m, n) / (m + n)) could not push F above the threshold.

A candidate is novel when its highest F against the pool is <= threshold (the Lion rule: 0.7).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

Tokenizer = Literal["rouge", "unicode"]

_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")
_WORD = re.compile(r"\w+")
_SURROGATES = range(0xD800, 0xE000)
_MAX_TOKENS = 0x10FFFF - len(_SURROGATES)
_CHUNK = 256  # candidates per cdist call: bounds the score matrix in memory


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation (no stemming): lower-case, non-[a-z0-9] runs split tokens."""
    return _ROUGE_TOKEN.findall(text.lower())


def unicode_tokens(text: str) -> list[str]:
    """Word tokens in any script, case-folded (for pools that are not English)."""
    return _WORD.findall(text.casefold())


def f_measure(lcs: int, m: int, n: int) -> float:
    """ROUGE-L F from an LCS length and the two token counts, with rouge_score's float operations."""
    if m == 0 or n == 0:
        return 0.0
    precision, recall = lcs / m, lcs / n
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _f_matrix(lcs: np.ndarray, m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`f_measure` elementwise; each numpy op is one IEEE operation, so results equal the scalar ones."""
    lcs = lcs.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty texts: 0/0, masked below
        precision = lcs / m[:, None]
        recall = lcs / n[None, :]
        total = precision + recall
        f = 2 * precision * recall / total
    return np.where(total > 0, f, 0.0)  # NaN > 0 is False


class NoveltyFilter:
    """A growing pool of texts; `add_if_novel` keeps a text only if no pool text is too close to it."""

    def __init__(self, pool_texts: Iterable[str] = (), threshold: float = 0.7, tokenizer: Tokenizer = "rouge",
                 workers: int = 1) -> None:
        if tokenizer not in ("rouge", "unicode"):
            raise ValueError(f"tokenizer must be 'rouge' or 'unicode', got {tokenizer!r}")
        self.threshold = threshold
        self.workers = workers
        self._tokenize = rouge_tokens if tokenizer == "rouge" else unicode_tokens
        self._codes: dict[str, str] = {}
        self._buckets: dict[int, list[str]] = {}  # token count -> encoded texts
        self._order: list[tuple[int, int]] = []  # (bucket, position) of each text, in insertion order
        self._exceedable: dict[tuple[int, int], bool] = {}
        for text in pool_texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self._order)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> str:
        """The text as a string with one character per token (the same token, the same character)."""
        out = []
        for token in self._tokenize(text):
            code = self._codes.get(token)
            if code is None:
                n = len(self._codes) + 1
                if n > _MAX_TOKENS:
                    raise ValueError("novelty filter: more distinct tokens than Unicode has characters")
                code = chr(n if n < _SURROGATES.start else n + len(_SURROGATES))
                self._codes[token] = code
            out.append(code)
        return "".join(out)

    def add(self, text: str) -> None:
        """Put a text in the pool unconditionally."""
        self._add_encoded(self.encode(text))

    def _add_encoded(self, code: str) -> None:
        bucket = self._buckets.setdefault(len(code), [])
        self._order.append((len(code), len(bucket)))
        bucket.append(code)

    # ------------------------------------------------------------------ scoring
    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F of `text` against every pool text, in insertion order (exact, no pruning)."""
        code = self.encode(text)
        by_bucket = {
            n: _f_matrix(self._lcs([code], texts), np.array([len(code)]), np.full(len(texts), n))[0]
            for n, texts in self._buckets.items()
        }
        return np.array([by_bucket[n][i] for n, i in self._order], dtype=np.float64)

    def _lcs(self, queries: Sequence[str], choices: Sequence[str]) -> np.ndarray:
        return process.cdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers)

    def _can_exceed(self, m: int, n: int) -> bool:
        key = (m, n)
        if key not in self._exceedable:
            self._exceedable[key] = f_measure(min(m, n), m, n) > self.threshold
        return self._exceedable[key]

    def _band_max(self, codes: Sequence[str], m: int, buckets: dict[int, list[str]]) -> np.ndarray:
        """For candidates of `m` tokens: the highest F over the buckets that could exceed the threshold."""
        best = np.zeros(len(codes))
        lengths = [n for n, texts in buckets.items() if texts and self._can_exceed(m, n)]
        if not codes or not lengths:
            return best
        choices = [t for n in lengths for t in buckets[n]]
        starts = np.cumsum([0] + [len(buckets[n]) for n in lengths[:-1]])
        m_tokens, n_tokens = np.full(len(codes), m), np.array(lengths)
        for lo in range(0, len(codes), _CHUNK):
            lcs = self._lcs(codes[lo : lo + _CHUNK], choices)
            # F grows with the LCS when both lengths are fixed: only each bucket's longest LCS matters
            longest = np.maximum.reduceat(lcs, starts, axis=1)
            best[lo : lo + _CHUNK] = _f_matrix(longest, m_tokens[lo : lo + _CHUNK], n_tokens).max(axis=1)
        return best

    # ------------------------------------------------------------------ filtering
    def add_if_novel(self, text: str) -> tuple[bool, float]:
        """(kept, max F). Kept texts join the pool, so later candidates are compared with them too."""
        return self.add_many([text])[0]

    def add_many(self, texts: Sequence[str], thresholds: Sequence[float] | None = None) -> list[tuple[bool, float]]:
        """`add_if_novel` for each text in turn (same decisions), with the pool comparisons batched.

        The max F is taken over the pool texts whose lengths allow a score above the threshold, so it
        is exact whenever a text is rejected; a kept text may be closer to a pool text outside that band,
        but never above the threshold. `thresholds`, one per text and none below the filter's own,
        lets each text be held to its own threshold (exact too: the max F is exact above the lowest).
        """
        if thresholds is not None and (len(thresholds) != len(texts) or min(thresholds, default=1) < self.threshold):
            raise ValueError("thresholds: one per text, none below the filter's threshold")
        codes = [self.encode(t) for t in texts]
        against_pool = np.zeros(len(codes))
        by_length: dict[int, list[int]] = {}
        for i, code in enumerate(codes):
            by_length.setdefault(len(code), []).append(i)
        for m, idx in by_length.items():
            if m:
                against_pool[idx] = self._band_max([codes[i] for i in idx], m, self._buckets)
        out: list[tuple[bool, float]] = []
        kept: list[str] = []  # earlier kept texts of this batch, not yet in the pool
        kept_buckets: dict[int, list[str]] = {}
        for i, (code, pool_best) in enumerate(zip(codes, against_pool, strict=True)):
            best = float(pool_best)
            if code and kept:
                best = max(best, float(self._band_max([code], len(code), kept_buckets)[0]))
            novel = best <= (self.threshold if thresholds is None else thresholds[i])
            if novel:
                kept.append(code)
                kept_buckets.setdefault(len(code), []).append(code)
            out.append((novel, best))
        for code in kept:
            self._add_encoded(code)
        return out
