"""Groups of similar instructions: the unit on which Lion's own seed choice and novelty work.

Real seed data carries no task type, so a group is found from the instruction text alone: each text
becomes a TF-IDF vector over its content words (letters only, so numbers and other arguments do not
count; words in fewer than 2 texts or in more than a fifth of them are left out, so one-off arguments
and filler words do not count either), and the vectors are clustered with spherical k-means
(k-means++ start, seeded, so a rerun finds the same groups).

With `how="task"` the groups are the instructions' task labels; an instruction without one (what the
generator's long-tail prompt returns) joins the label whose centroid is closest to its text, so every
group is a task type and no group is a domain or a cluster beside them. `how="auto"` takes the labels
when every seed has one, and clusters otherwise.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..records import Instruction
from .novelty import rouge_tokens

How = Literal["auto", "task", "text"]

_CONTENT = re.compile(r"^[a-z]+$")
# English function words: they say how a request is phrased, not what it asks for
_STOP = frozenset(re.findall(r"[a-z]+", """a about above after again all also am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her here
hers him his how i if in into is it its just me more most my no nor not now of off on once only or other our ours out
over own please same she should so some such than that the their theirs them then there these they this those through
to too under until up very was we were what when where which while who whom why will with would you your yours"""))
_MAX_VOCAB = 4096  # the most frequent content words: bounds the centroids' size on large pools
_MAX_SHARE = 0.2  # a word in more of the texts than this says how they are phrased, not what they ask
_ROUNDS = 25  # k-means rounds (it settles in far fewer on instruction pools)
_RESTARTS = 4  # k-means++ starts; the tightest clustering wins
EMPTY = "text:none"  # an instruction without a single counted word


def content_words(text: str) -> list[str]:
    return [t for t in rouge_tokens(text) if _CONTENT.match(t) and t not in _STOP]


def auto_clusters(n: int) -> int:
    """Clusters for `n` instructions when none are asked for: sqrt(n), between 2 and 100 (about as
    many groups as a group has members, so each group's statistics rest on some dozens of items)."""
    return max(2, min(100, round(math.sqrt(n))))


class Grouping:
    """The group of any instruction, fitted on a pool (the Cache Pool of one iteration)."""

    def __init__(self, pool: Sequence[Instruction], how: How = "auto", clusters: int = 0, seed: int | str = 0) -> None:
        labelled = [ins.task for ins in pool if ins.task]
        if how == "auto":
            how = "task" if pool and all(ins.origin != "seed" or ins.task for ins in pool) and labelled else "text"
        self.how = how
        docs = [content_words(ins.text) for ins in pool]
        df = Counter(w for d in docs for w in set(d))
        limit = max(2, int(len(docs) * _MAX_SHARE))
        kept = [w for w, c in df.most_common() if c >= 2 and (c <= limit or len(docs) < 10)][:_MAX_VOCAB]
        self._vocab = {w: i for i, w in enumerate(kept)}
        # squared IDF: a word that names the kind of request (reverse, weekday, poem) is rarer than
        # one of the many ways of framing a request (quick, need, short), and should count for more
        self._idf = np.array([(math.log((1 + len(docs)) / (1 + df[w])) + 1.0) ** 2 for w in kept], dtype=np.float32)
        x = self._vectors(docs)
        if how == "task":
            names = sorted(set(labelled))
            self.names = [f"task:{t}" for t in names]
            index = {t: j for j, t in enumerate(names)}
            rows = np.array([i for i, ins in enumerate(pool) if ins.task])
            self._centroids = _normalised(x.take(rows).sums(np.array([index[pool[i].task] for i in rows]), len(names))) \
                if len(rows) else np.zeros((0, len(kept)), dtype=np.float32)
        else:
            k = min(clusters or auto_clusters(len(pool)), max(1, len(pool)))
            self._centroids = _kmeans(x, k, random.Random(f"groups-{seed}"))
            self.names = [f"text:{j}:{self._name(c)}" for j, c in enumerate(self._centroids)]
        found = self._closest(x)
        self._labels = {ins.id: f"task:{ins.task}" if how == "task" and ins.task else found[i]
                        for i, ins in enumerate(pool)}
        self._memo: dict[str, str] = {}

    def _vectors(self, docs: Sequence[list[str]]) -> _Rows:
        """TF-IDF rows (1 + log tf, squared IDF), each of unit length, as a sparse matrix."""
        indptr, indices, data = [0], [], []
        for d in docs:
            counts = Counter(self._vocab[w] for w in d if w in self._vocab)
            values = [(1 + math.log(c)) * float(self._idf[j]) for j, c in counts.items()]
            norm = math.sqrt(sum(v * v for v in values)) or 1.0
            indices += counts.keys()
            data += [v / norm for v in values]
            indptr.append(len(indices))
        return _Rows(np.array(indptr), np.array(indices, dtype=np.int64), np.array(data, dtype=np.float32),
                     len(self._vocab))

    def _closest(self, x: _Rows) -> list[str]:
        if not len(self._centroids):
            return [EMPTY] * len(x)
        best = x.dot(self._centroids).argmax(axis=1)
        return [self.names[b] if filled else EMPTY for b, filled in zip(best, x.filled(), strict=True)]

    def _name(self, centroid: np.ndarray) -> str:
        return "+".join(sorted(self._vocab, key=lambda w: -centroid[self._vocab[w]])[:2])

    def of(self, ins: Instruction) -> str:
        """The instruction's group: its task label (`task`), else the closest centroid to its text."""
        if ins.id in self._labels:
            return self._labels[ins.id]
        if ins.text not in self._memo:
            self._memo[ins.text] = self.of_texts([ins.text])[0]
        return self._memo[ins.text]

    def of_texts(self, texts: Sequence[str]) -> list[str]:
        """The group of each text: the closest centroid to its words."""
        return self._closest(self._vectors([content_words(t) for t in texts]))


_CHUNK = 2048  # rows per dense block in products: bounds the memory of a large pool's clustering


class _Rows:
    """A sparse matrix of unit rows (CSR: row r holds data[indptr[r]:indptr[r+1]] at those columns)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, columns: int) -> None:
        self.indptr, self.indices, self.data, self.columns = indptr, indices, data, columns

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def filled(self) -> np.ndarray:
        return np.diff(self.indptr) > 0

    def take(self, rows: np.ndarray) -> _Rows:
        parts = [np.arange(self.indptr[r], self.indptr[r + 1]) for r in rows]
        picked = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return _Rows(np.concatenate([[0], np.cumsum(np.diff(self.indptr)[rows])]), self.indices[picked],
                     self.data[picked], self.columns)

    def row(self, r: int) -> np.ndarray:
        out = np.zeros(self.columns, dtype=np.float32)
        out[self.indices[self.indptr[r]:self.indptr[r + 1]]] = self.data[self.indptr[r]:self.indptr[r + 1]]
        return out

    def dot(self, c: np.ndarray) -> np.ndarray:
        """self @ c.T for dense rows `c` (k x columns): every row's similarity to every centroid."""
        out = np.zeros((len(self), len(c)), dtype=np.float32)
        if not len(c):
            return out
        ct = np.ascontiguousarray(c.T, dtype=np.float32)
        for lo in range(0, len(self), _CHUNK):
            hi = min(len(self), lo + _CHUNK)
            a, b = self.indptr[lo], self.indptr[hi]
            if a == b:
                continue
            lengths = np.diff(self.indptr[lo:hi + 1])
            products = ct[self.indices[a:b]] * self.data[a:b, None]
            filled = np.flatnonzero(lengths)
            out[lo + filled] = np.add.reduceat(products, (self.indptr[lo:hi] - a)[filled], axis=0)
        return out

    def sums(self, assign: np.ndarray, k: int) -> np.ndarray:
        """Per group j < k: the sum of the rows assigned to it."""
        out = np.zeros((k, self.columns), dtype=np.float32)
        rows = np.repeat(np.arange(len(self)), np.diff(self.indptr))
        np.add.at(out, (assign[rows], self.indices), self.data)
        return out


def _normalised(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)


def _kmeans(x: _Rows, k: int, rng: random.Random) -> np.ndarray:
    """Spherical k-means on unit rows (cosine similarity): k unit centroids (empty texts stay out),
    the best of a few k-means++ starts by total similarity to the closest centroid."""
    x = x.take(np.flatnonzero(x.filled()))
    if not len(x) or not x.columns:
        return np.zeros((0, x.columns), dtype=np.float32)
    best, best_fit = None, -1.0
    for _ in range(_RESTARTS):
        c = _kmeans_once(x, min(k, len(x)), rng)
        fit = float(x.dot(c).max(axis=1).sum())
        if fit > best_fit + 1e-6:
            best, best_fit = c, fit
    return best  # type: ignore[return-value]


def _kmeans_once(x: _Rows, k: int, rng: random.Random) -> np.ndarray:
    centroids = [x.row(rng.randrange(len(x)))]
    closest = x.dot(centroids[0][None])[:, 0]
    for _ in range(k - 1):  # k-means++: far from the centroids so far, in proportion to the distance
        far = np.clip(1.0 - closest, 0.0, None)
        if far.sum() <= 0:
            break
        cumulative = np.cumsum(far, dtype=np.float64)
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        centroids.append(x.row(min(pick, len(x) - 1)))
        closest = np.maximum(closest, x.dot(centroids[-1][None])[:, 0])
    c = np.stack(centroids)
    assign = None
    for _ in range(_ROUNDS):
        new = x.dot(c).argmax(axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        sums = x.sums(assign, len(c))
        empty = ~sums.any(axis=1)
        sums[empty] = c[empty]  # a centroid that lost every member stays where it was
        c = _normalised(sums)
    return c
