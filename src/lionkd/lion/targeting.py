"""Lion's own targeting: seeds and novelty chosen from what the run has measured, group by group.

The paper draws seeds uniformly from the hard set, splits hard:easy 1:1 and rejects anything with
ROUGE-L > 0.7 against the pool. Three measured alternatives, each a config option:

- progress (`lion.seed_weighting: progress`). The whole Cache Pool is judged again every iteration,
  so for every instruction judged in iterations k-1 and k the referee's gap has moved by
  d(k-1) - d(k): how much of it the training in iteration k closed. None of them were trained on in
  iteration k (that trained on the instructions new in k-1), so this is held-out progress. A group's
  progress is its mean, shrunk toward 0 for small groups; hard seeds are drawn in proportion to it,
  so the generator works on the hard groups the student is learning (the learnable band), not on
  those it cannot move yet.
- adaptive split (`lion.hard_easy_ratio: adaptive`). A bandit over (seed group, prompt): each
  instruction generated in k-1 was trained on in k, and its pay-off is the progress of the group it
  fell in. An arm's value is the shrunk mean pay-off of what it generated (an arm not tried yet:
  the mean of all); seeds are weighted by their arm's value and the hard share of the seeds is the hard prompt's value over both (within
  [0.2, 0.8], so that each prompt keeps being tried).
- group novelty (`lion.novelty_scope: group`). A group's own members are as close to each other as
  they are (short templated requests share most words); a new instruction must be as far from the
  pool as a typical member is from its nearest group-mate (the median), never closer than the
  paper's threshold demands of it, and never a near-copy.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from ..records import Instruction, Judgement
from .novelty import NoveltyFilter, Tokenizer

Group = Callable[[Instruction], str]

PRIOR = 2.0  # pseudo-items at the prior mean: a group measured on two items counts half
EXPLORE = 0.1  # the least weight of a group or arm, as a share of the best one's
SPLIT_BOUNDS = (0.2, 0.8)  # the adaptive hard share stays within these
_NEIGHBOUR_SAMPLE = 100  # members per group whose nearest group-mate is measured


def gap_progress(judged: Iterable[Instruction], before: dict[str, Judgement], now: dict[str, Judgement],
                 group: Group) -> dict[str, float]:
    """Per group: the mean of d(before) - d(now) over its instructions read in both, shrunk toward 0."""
    closed: dict[str, list[float]] = defaultdict(list)
    for ins in judged:
        a, b = before.get(ins.id), now.get(ins.id)
        if a is not None and b is not None and a.ok and b.ok:
            closed[group(ins)].append(a.gap - b.gap)
    return {g: sum(v) / (len(v) + PRIOR) for g, v in closed.items()}


def positive_weights(values: dict[str, float]) -> dict[str, float]:
    """Values as sampling weights: the positive part plus a floor of EXPLORE x the best; all equal
    when nothing is positive (no signal: the paper's uniform draw)."""
    best = max((v for v in values.values() if v > 0), default=0.0)
    if best <= 0:
        return dict.fromkeys(values, 1.0)
    return {g: max(v, 0.0) + EXPLORE * best for g, v in values.items()}


def progress_weights(seeds: Sequence[Instruction], progress: dict[str, float], group: Group) -> list[float] | None:
    """Hard seeds in proportion to their group's progress (None: no progress measured yet, uniform)."""
    if not progress:
        return None
    w = positive_weights(progress)
    unmeasured = min(w.values())  # a group that was not judged twice: as little as the least one
    return [w.get(group(ins), unmeasured) for ins in seeds]


class Bandit:
    """Arms (seed group, prompt); an arm's value is the shrunk mean pay-off of what it generated."""

    def __init__(self, generated: Iterable[Instruction], parents: dict[str, Instruction],
                 progress: dict[str, float], group: Group) -> None:
        payoffs: dict[tuple[str, str], list[float]] = defaultdict(list)
        for ins in generated:
            parent = parents.get(ins.parent_id or "")
            landed = progress.get(group(ins))
            if parent is None or ins.mode not in ("hard", "easy") or landed is None:
                continue
            payoffs[group(parent), ins.mode].append(landed)
        everything = [p for v in payoffs.values() for p in v]
        self.mean = statistics.fmean(everything) if everything else 0.0
        self.by_mode = {
            mode: self._shrunk([p for (_, m), v in payoffs.items() if m == mode for p in v]) for mode in ("hard", "easy")
        }
        self.arms = {arm: self._shrunk(v) for arm, v in payoffs.items()}
        self.measured = bool(everything)

    def _shrunk(self, payoffs: list[float]) -> float:
        return (sum(payoffs) + PRIOR * self.mean) / (len(payoffs) + PRIOR)

    def hard_fraction(self, default: float = 0.5) -> float:
        if not self.measured:
            return default
        w = positive_weights(self.by_mode)
        lo, hi = SPLIT_BOUNDS
        return min(hi, max(lo, w["hard"] / (w["hard"] + w["easy"])))

    def weights(self, seeds: Sequence[Instruction], mode: str, group: Group) -> list[float] | None:
        """Per seed: its arm's value as a weight (an arm not tried yet gets the mean pay-off of all)."""
        if not self.measured:
            return None
        values = {g: v for (g, m), v in self.arms.items() if m == mode}
        keys = [group(ins) for ins in seeds]
        w = positive_weights({**dict.fromkeys(keys, self.mean), **values})
        return [w[k] for k in keys]


def group_thresholds(pool: Sequence[Instruction], group: Group, *, floor: float, ceiling: float,
                     tokenizer: Tokenizer = "rouge", seed: int | str = 0) -> dict[str, float]:
    """Per group: the median ROUGE-L of a member to its nearest other member, within [floor, ceiling]."""
    members: dict[str, list[str]] = defaultdict(list)
    for ins in pool:
        members[group(ins)].append(ins.text)
    out = {}
    rng = random.Random(f"group-thresholds-{seed}")
    for g, texts in members.items():
        texts = sorted(set(texts))
        if len(texts) < 2:
            out[g] = floor
            continue
        sample = rng.sample(range(len(texts)), min(_NEIGHBOUR_SAMPLE, len(texts)))
        filt = NoveltyFilter(texts, threshold=floor, tokenizer=tokenizer)
        nearest = []
        for i in sample:
            scores = filt.scores(texts[i])
            scores[i] = 0.0
            nearest.append(float(scores.max()))
        out[g] = min(ceiling, max(floor, statistics.median(nearest)))
    return out
