"""Generation: new instructions from hard and easy seeds, filtered for quality and novelty.

A hard seed asks the generator for a new instruction of the same domain and task type (to train on
what the student cannot do yet); an easy seed for a rarer one of the same domain (diversity, against
forgetting). Seeds are drawn with RNGs seeded by (run seed, iteration, round), and replies are
filtered and checked for novelty in seed order, never in the order the replies arrived, so a
resumed run keeps exactly the instructions an uninterrupted one keeps.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from ..config import RunConfig
from ..llm.base import GenRequest, GenResult
from ..llm.factory import request_defaults
from ..records import Instruction, Judgement, content_id
from ..store import Store
from .calls import CallsFailed, run_async
from .groups import Grouping
from .novelty import NoveltyFilter
from .prompts import PROMPT_MARKERS, LionPrompts
from .role_checks import FIRST_BATCH, check_share
from .targeting import Bandit, Group, gap_progress, group_thresholds, progress_weights

_QUOTES = {'"': '"', "'": "'", "“": "”", "«": "»", "`": "`"}
# A reply that talks about the prompt's task instead of being a new one ("Here is a new task: ...",
# "Rewrite the instruction above ...", "This task asks ...", "Sure, ..."). The authors drop every
# reply holding the word "instruction"; this keeps real requests that mention instructions ("Write
# instructions for assembling a shelf") or frame themselves as a task ("Here is a small task. ...",
# "Your task is to ..."), and catches talk about "the task" as well.
_ABOUT_THE_TASK = re.compile(
    r"\b(?:the|this|that|above|given|example|seed|original|previous|same|new|following)\s+"
    r"(?:(?:example|seed|original|new|given)\s+)?(?:instruction|task|prompt)s?\b"
    r"|^(?:sure|certainly|of\s+course)\b[,.!]|^new\s+(?:task|instruction)\b",
    re.IGNORECASE,
)


@dataclass
class GenerationOutcome:
    new: list[Instruction] = field(default_factory=list)
    rounds: int = 0
    asked: int = 0
    seeds: Counter[str] = field(default_factory=Counter)  # by mode
    filter_rejections: Counter[str] = field(default_factory=Counter)  # by reason
    novelty_rejections: int = 0
    target: Counter[str] = field(default_factory=Counter)  # by mode: what each side should keep
    kept: Counter[str] = field(default_factory=Counter)  # by mode
    surplus: int = 0  # passed the filters after their side was full: not compared, not kept
    hard_fraction: float = 0.5  # the share of hard seeds aimed at (fixed, or the bandit's)
    groups: int | None = None  # groups of instructions the seed choice worked with, if any
    rejected: dict[str, list[str]] = field(default_factory=dict)  # by reason: a few of the replies, for the stop line


# --------------------------------------------------------------------------- seeds


def seed_counts(n: int, hard_fraction: float, have_hard: bool, have_easy: bool) -> tuple[int, int]:
    """How many of `n` seeds come from the hard and the easy set (all from one set if the other is empty)."""
    if not have_hard:
        return 0, n if have_easy else 0
    if not have_easy:
        return n, 0
    hard = round(n * hard_fraction)
    return hard, n - hard


def draw_seeds(ids: Sequence[str], k: int, rng: random.Random, weights: Sequence[float] | None = None) -> list[str]:
    """`k` seeds: uniformly without replacement (cycling through reshuffles when k > len), or by weight."""
    if k <= 0 or not ids:
        return []
    if weights is not None:
        return rng.choices(list(ids), weights=list(weights), k=k)
    out: list[str] = []
    while len(out) < k:
        order = list(ids)
        rng.shuffle(order)
        out += order
    return out[:k]


def learnable_weights(seeds: Sequence[Instruction], judged: Sequence[Instruction], judgements: dict[str, Judgement],
                      tau: float, group_of: Group) -> list[float]:
    """Weight acc * (1 - acc) per seed, acc = the student's success rate on the seed's group.

    Groups the student has mastered or cannot learn yet get little weight; partly learned ones the
    most (Laplace-smoothed, so a group seen once is not written off).
    """
    wins: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for ins in judged:
        j = judgements.get(ins.id)
        if j is not None and j.ok:
            seen[group_of(ins)] += 1
            wins[group_of(ins)] += not j.is_hard(tau)
    weights = []
    for ins in seeds:
        g = group_of(ins)
        acc = (wins[g] + 1) / (seen[g] + 2)
        weights.append(acc * (1 - acc))
    return weights


# --------------------------------------------------------------------------- filters


def clean_instruction(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def reject_reason(text: str, finish_reason: str, min_words: int) -> str | None:
    """Why a generated instruction is not kept, or None (text already cleaned)."""
    if finish_reason == "length":
        return "cut_off"
    if not text:
        return "empty"
    lowered = text.lower()
    if any(marker.lower() in lowered for marker in PROMPT_MARKERS):
        return "prompt_echo"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    if _ABOUT_THE_TASK.search(text):
        return "about_the_task"
    if len(text.split()) < min_words:
        return "too_short"
    return None


# --------------------------------------------------------------------------- the stage


def slot_seed(run_seed: int, endpoint_seed: int | None, iteration: int, round_: int, slot: int) -> int:
    """A distinct, reproducible request seed per generation slot (so repeated seeds give fresh replies)."""
    key = content_id(str(run_seed), str(endpoint_seed), str(iteration), str(round_), str(slot))
    return int(key[:8], 16)


async def _ask(llm: Any, requests: list[GenRequest], iteration: int, progress: Progress, label: str
               ) -> list[GenResult]:
    results: list[GenResult | None] = [None] * len(requests)
    task = progress.add_task(label, total=len(requests))
    async for i, result in llm.stream(requests, iteration=iteration):
        results[i] = result
        progress.advance(task)
    progress.remove_task(task)
    failed = [r for r in results if r is None or not r.ok]
    if failed:
        raise CallsFailed(f"generator: {len(failed)} call(s) failed, e.g. {failed[0].error if failed[0] else '?'}; "
                          "finished work is saved, run the same command again to retry")
    return results  # type: ignore[return-value]


def generate(cfg: RunConfig, store: Store, generator: Any, prompts: LionPrompts, iteration: int, *,
             hard: Sequence[str], easy: Sequence[str], judgements: dict[str, Judgement],
             progress: Progress) -> GenerationOutcome:
    """Up to `lion.new_per_iteration` new, novel instructions, split hard:easy as configured.

    The split holds in what is KEPT, not only in the seeds asked for: each side has its own target
    and is asked again, round after round, until that target is kept. A side whose replies often fail
    the filters is asked for more seeds in the next round (its remaining need divided by its yield so
    far), but never for more than `generation_rounds` times its target in all, so the dry-run bound
    (N x rounds generator calls) holds.
    """
    lion = cfg.lion
    cache = store.instructions(store.pool(iteration, "cache"))
    by_id = {ins.id: ins for ins in cache}
    known = set(by_id)
    # The authors compare instruction texts: an Alpaca input (kept apart in `Instruction.input`) would
    # hide a copied instruction behind its input text.
    novelty = NoveltyFilter([ins.text for ins in cache], threshold=lion.rouge_l_max,
                            tokenizer=lion.novelty_tokenizer)
    pools = {"hard": hard, "easy": easy}
    choice = SeedChoice.measure(cfg, store, iteration, cache, pools, judgements)
    target = dict(zip(("hard", "easy"), seed_counts(lion.new_per_iteration, choice.hard_fraction, bool(hard),
                                                    bool(easy)), strict=True))
    params = request_defaults(cfg.generator)
    out = GenerationOutcome(target=Counter(target), hard_fraction=choice.hard_fraction,
                            groups=len(choice.grouping.names) if choice.grouping else None)
    weights = choice.weights
    for round_ in range(lion.generation_rounds):
        asks = {mode: _seeds_to_ask(out, mode, target[mode], lion.generation_rounds) for mode in pools}
        if not any(asks.values()):
            break
        rng = random.Random(f"{cfg.seed}-{iteration}-generation-{round_}")
        seeds = [(i, mode) for mode in pools for i in draw_seeds(pools[mode], asks[mode], rng, weights[mode])]
        if not seeds:
            break
        out.rounds += 1
        out.asked += len(seeds)
        out.seeds.update(mode for _, mode in seeds)
        requests = [
            # the instruction text alone, as the authors send it: an Alpaca input is data for one
            # task, not part of the kind of task the generator should vary
            GenRequest.chat(prompts.generator_messages(by_id[i].text, mode),
                            **(params | {"seed": slot_seed(cfg.seed, cfg.generator.seed, iteration, round_, slot)}))
            for slot, (i, mode) in enumerate(seeds)
        ]
        results = run_async(_ask(generator, requests, iteration, progress,
                                 f"iteration {iteration}: generator round {round_ + 1}"), generator)
        candidates: dict[str, list[Instruction]] = {"hard": [], "easy": []}
        for (seed_id, mode), result in zip(seeds, results, strict=True):
            text = clean_instruction(result.text)
            reason = reject_reason(text, result.choices[0].finish_reason, lion.min_instruction_words)
            if reason:
                out.filter_rejections[reason] += 1
                examples = out.rejected.setdefault(reason, [])
                if len(examples) < FIRST_BATCH:
                    examples.append(result.text)
                continue
            parent = by_id[seed_id]
            candidates[mode].append(Instruction(
                text=text, domain=parent.domain, task=parent.task if mode == "hard" else None, origin="generated",
                parent_id=seed_id, mode=mode, iteration=iteration, meta={"round": round_},
            ))
        for mode in pools:
            _keep_novel(out, novelty, known, candidates[mode], target[mode] - out.kept[mode], choice.threshold)
        if round_ == 0:  # the first round is the first batch: stop before paying for more rounds
            check_kept(cfg, generator.model, out)
    check_kept(cfg, generator.model, out)
    return out


def check_kept(cfg: RunConfig, model: str, out: GenerationOutcome) -> None:
    """Stop when almost no generator reply passes the filters (`lion.min_kept_generations`)."""
    reasons = out.filter_rejections + Counter({"not_novel": out.novelty_rejections})
    if not out.asked or not reasons:
        return
    leading, count = reasons.most_common(1)[0]
    check_share(role="generator", model=model, good=out.asked - sum(reasons.values()), total=out.asked,
                floor=cfg.lion.min_kept_generations, what="replies passed the filters",
                failing=out.rejected.get(leading, []), key="lion.min_kept_generations",
                advice=f"the leading reject reason is {leading} ({count} replies); check the generator's model, "
                       "max_tokens and lion.prompts")


@dataclass
class SeedChoice:
    """How this iteration draws its seeds and judges novelty: the paper's way, or from what was measured
    (see `lionkd.lion.targeting`)."""

    hard_fraction: float
    weights: dict[str, list[float] | None]
    grouping: Grouping | None = None
    thresholds: dict[str, float] | None = None  # per group (novelty_scope: group)
    floor: float = 0.7

    @classmethod
    def measure(cls, cfg: RunConfig, store: Store, iteration: int, cache: Sequence[Instruction],
                pools: dict[str, Sequence[str]], judgements: dict[str, Judgement]) -> SeedChoice:
        lion = cfg.lion
        by_id = {ins.id: ins for ins in cache}
        seeds = {mode: [by_id[i] for i in ids] for mode, ids in pools.items()}
        choice = cls(lion.hard_fraction, {"hard": None, "easy": None}, floor=lion.rouge_l_max)
        adaptive = lion.hard_easy_ratio == "adaptive"
        if lion.seed_weighting == "uniform" and not adaptive and lion.novelty_scope == "pool":
            return choice  # the paper's Lion: no grouping needed
        grouping = Grouping(cache, lion.grouping, lion.clusters, seed=f"{cfg.seed}-{iteration}")
        choice.grouping = grouping
        group = grouping.of
        if lion.seed_weighting == "learnable":
            choice.weights = {mode: learnable_weights(s, cache, judgements, lion.tau, group) for mode, s in seeds.items()}
        if (lion.seed_weighting == "progress" or adaptive) and iteration > 1:
            progress = gap_progress(cache, store.judgements(iteration - 1), judgements, group)
            if lion.seed_weighting == "progress":
                choice.weights["hard"] = progress_weights(seeds["hard"], progress, group)
            if adaptive:
                bandit = Bandit(store.instructions(store.pool(iteration, "train")), by_id, progress, group)
                choice.hard_fraction = bandit.hard_fraction(choice.hard_fraction)
                for mode, s in seeds.items():
                    choice.weights[mode] = _times(choice.weights[mode], bandit.weights(s, mode, group))
        if lion.novelty_scope == "group":
            choice.thresholds = group_thresholds(cache, group, floor=lion.rouge_l_max, ceiling=lion.near_copy_rouge_l,
                                                 tokenizer=lion.novelty_tokenizer, seed=f"{cfg.seed}-{iteration}")
        return choice

    def threshold(self, texts: Sequence[str]) -> list[float] | None:
        """Each text's novelty threshold: its group's (None: the filter's own, for every text)."""
        if self.thresholds is None or self.grouping is None:
            return None
        return [self.thresholds.get(g, self.floor) for g in self.grouping.of_texts(texts)]


def _times(a: list[float] | None, b: list[float] | None) -> list[float] | None:
    if a is None or b is None:
        return a if b is None else b
    return [x * y for x, y in zip(a, b, strict=True)]


def _seeds_to_ask(out: GenerationOutcome, mode: str, target: int, rounds: int) -> int:
    """Seeds of `mode` to ask for this round: the remaining need over the side's yield so far, within budget."""
    need = target - out.kept[mode]
    budget = rounds * target - out.seeds[mode]
    if need <= 0 or budget <= 0:
        return 0
    asked, kept = out.seeds[mode], out.kept[mode]
    want = need if asked == 0 else math.ceil(need * asked / kept) if kept else budget
    return min(want, budget)


def _keep_novel(out: GenerationOutcome, novelty: NoveltyFilter, known: set[str], candidates: list[Instruction],
                need: int, threshold: Callable[[Sequence[str]], list[float] | None] = lambda texts: None) -> None:
    """Keep novel candidates in order until `need` are kept; the rest are surplus, never compared."""
    pos = 0
    while need > 0 and pos < len(candidates):
        # at most `need` per batch, so a batch never keeps (and adds to the pool) more than is wanted
        batch = candidates[pos:pos + need]
        pos += len(batch)
        texts = [c.text for c in batch]
        for ins, (novel, _) in zip(batch, novelty.add_many(texts, threshold(texts)), strict=True):
            if not novel:
                out.novelty_rejections += 1
            elif ins.id in known:
                out.filter_rejections["duplicate"] += 1
            else:
                known.add(ins.id)
                out.new.append(ins)
                out.kept[ins.mode or "hard"] += 1
                need -= 1
    out.surplus += len(candidates) - pos
