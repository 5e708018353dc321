"""API-teacher KD (black-box logit KD): pseudo-targets with top-k log-probabilities, aligned to the
student's tokenizer.

An API teacher (any OpenAI-compatible endpoint) cannot be run on the student's targets, but it can say,
for every token it generates, how likely that token and its top alternatives were. So each pseudo-target
(PT) is asked for with `logprobs` and `top_logprobs` (at most 20, the OpenAI limit), through the run's
call cache, and stored with its tokens. Training then aligns each PT's teacher tokens to the student's
tokenisation (`align.py`) and trains on the sparse targets: word-level KD where a student position has a
teacher counterpart, cross-entropy on the PT token where it has none (a one-hot row).

The same sparse targets serve a local teacher whose tokenizer differs from the student's
(`cross_tokenizer_examples`): its top-k are computed per its own positions and aligned the same way.

Prompts to the teacher are an instruction (a system message) and `fewshot` labeled demonstrations as
earlier user/assistant turns, then the input; the student itself is trained on the bare input.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from typing import Any

from ..llm.base import GenRequest, Message, TokenLogprob
from ..llm.cache import CachedLLM
from ..records import PseudoTarget, content_id, stable_json
from ..store import Store
from .align import AlignedTargets, align_teacher_tokens, api_token_bytes, local_teacher_logprobs
from .examples import PromptTemplate, TopK, TrainExample, prompt_text, target_ids
from .pseudo_targets import pt_schedule

MAX_TOP_LOGPROBS = 20  # what OpenAI-compatible APIs allow
ABSENT_LOGPROB = -1e4  # padding slots of a sparse row: no teacher mass (finite, so no 0 * inf anywhere)
DEFAULT_INSTRUCTION = "Complete the task in the user's message. Reply with the answer only."


# --------------------------------------------------------------------------- teacher prompts and calls


@dataclass
class APIPTConfig:
    """How PTs are asked of an API teacher."""

    k: int = 4  # PTs per input (one request with n = k; the call cache keeps each sample)
    top_logprobs: int = 5  # alternatives per token, capped at MAX_TOP_LOGPROBS; 0: chosen tokens only
    fewshot: int = 0  # labeled demonstrations in each prompt (0: the instruction alone)
    instruction: str = DEFAULT_INSTRUCTION
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 128
    seed: int = 0
    method: str = "sample"  # recorded with each PT (the decoding, as for local PTs)

    def request_params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "logprobs": min(self.top_logprobs, MAX_TOP_LOGPROBS)}


def pick_demonstrations(labeled: Sequence[TrainExample], count: int, seed: int = 0) -> list[TrainExample]:
    """`count` labeled examples, one fixed draw per run (the same prefix for every prompt)."""
    if count <= 0 or not labeled:
        return []
    pool = list(labeled)
    random.Random(f"{seed}-fewshot").shuffle(pool)
    return pool[: count + 1]  # one spare replaces a demonstration that is the input itself


def teacher_messages(x: TrainExample, demos: Sequence[TrainExample], instruction: str, count: int) -> list[Message]:
    """The instruction, `count` demonstrations (never `x` itself) as earlier turns, then the input."""
    messages: list[Message] = [{"role": "system", "content": instruction}] if instruction else []
    shown = [d for d in demos if d.source_text() != x.source_text()][:count]
    for d in shown:
        messages += [{"role": "user", "content": d.source_text()}, {"role": "assistant", "content": d.target}]
    return [*messages, {"role": "user", "content": x.source_text()}]


def token_records(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens as stored with a PT: {"token", "logprob", "bytes", "top": [[token, logprob], ...]}."""
    return [{"token": t.token, "logprob": t.logprob,
             "bytes": list(getattr(t, "bytes", None) or api_token_bytes(t.token)),
             "top": [[a, lp] for a, lp in t.top]} for t in tokens]


def generate_api_pseudo_targets(
    llm: CachedLLM,
    inputs: Sequence[TrainExample],
    demos: Sequence[TrainExample],
    settings: APIPTConfig,
    *,
    store: Store | None = None,
    teacher_name: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[PseudoTarget]:
    """K PTs with token log-probabilities per input, committed to `store` as each reply arrives.

    Calls go through `llm`'s call cache, so a rerun (or a resumed run) sends nothing it sent before.
    Inputs whose request finally failed get no PTs (the failure is in the store's ledger).
    """
    name = teacher_name or llm.model
    params = settings.request_params()
    recorded = params | {"n": settings.k, "fewshot": settings.fewshot, "instruction": settings.instruction}
    by_input: dict[int, list[PseudoTarget]] = {}  # returned in input order, not in order of arrival

    # One stream for the whole stage: the endpoint's concurrency is used to the end, and a budget stop
    # counts what the whole stage has left.
    async def run() -> None:
        requests = [GenRequest.chat(teacher_messages(x, demos, settings.instruction, settings.fewshot),
                                    n=settings.k, **params) for x in inputs]
        async for i, result in llm.stream(requests):
            x = inputs[i]
            pts = [
                PseudoTarget(input_id=x.id, index=j, text=c.text.strip(), method=settings.method, teacher=name,
                             params=recorded, logprobs=token_records(c.logprobs) if c.logprobs is not None else None,
                             id=content_id(x.id, settings.method, stable_json(recorded), name, str(j)))
                for j, c in enumerate(result.choices)
            ]
            if store is not None and pts:
                store.add_pseudo_targets(pts)
            by_input[i] = pts
            if on_progress is not None:
                on_progress(1)

    asyncio.run(run())
    return [pt for i in sorted(by_input) for pt in by_input[i]]


# --------------------------------------------------------------------------- sparse targets


@dataclass
class AlignmentStats:
    """How much of the teacher's signal reached the student's tokens (aggregated over examples)."""

    examples: int = 0
    positions: int = 0  # student target positions (EOS excluded)
    aligned: int = 0  # of which have a teacher counterpart
    by_span: int = 0  # of which by identical text spans
    mass_kept_sum: float = 0.0  # per aligned position: teacher top-k mass that maps to student tokens
    skipped: int = 0  # PTs without log-probabilities or without text
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, a: AlignedTargets) -> None:
        rows = a.aligned[:-1] if len(a) else a.aligned  # the appended EOS row is never aligned
        n_aligned = int(rows.sum())
        self.examples += 1
        self.positions += rows.numel()
        self.aligned += n_aligned
        self.by_span += int(a.by_span[:-1].sum()) if len(a) else 0
        self.mass_kept_sum += a.mass_kept * n_aligned

    @property
    def aligned_fraction(self) -> float:
        return self.aligned / self.positions if self.positions else 0.0

    @property
    def mass_kept(self) -> float:
        return self.mass_kept_sum / self.aligned if self.aligned else 0.0

    def metrics(self, prefix: str = "align_") -> dict[str, Any]:
        return {f"{prefix}examples": self.examples, f"{prefix}positions": self.positions,
                f"{prefix}aligned_fraction": self.aligned_fraction, f"{prefix}mass_kept": self.mass_kept,
                f"{prefix}by_span_fraction": self.by_span / self.positions if self.positions else 0.0,
                f"{prefix}skipped": self.skipped}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"aligned_fraction": self.aligned_fraction, "mass_kept": self.mass_kept}


def _fillers(tokenizer: Any, width: int) -> list[int]:
    """Ids for the empty slots of a sparse row: special tokens a target never holds, then the last merges.

    A row needs distinct ids (the sparse loss sums the student's mass over them), so empty slots get ids
    whose student probability should be near zero anyway; their teacher mass is zero.
    """
    eos = tokenizer.eos_token_id
    ids = [i for i in tokenizer.all_special_ids if i != eos]
    last = (i for i in range(len(tokenizer) - 1, -1, -1) if i != eos and i not in ids)
    return ids + list(islice(last, width + 1))


def sparse_rows(a: AlignedTargets, fillers: Sequence[int]) -> TopK:
    """`AlignedTargets` rows as a fixed-width `TopK` the KD trainer takes (no -1 ids, no -inf)."""
    ids, logprobs = [], []
    for row_ids, row_lps in zip(a.topk_ids.tolist(), a.topk_logprobs.tolist(), strict=True):
        real = [(i, lp) for i, lp in zip(row_ids, row_lps, strict=True) if i >= 0]
        taken = {i for i, _ in real}
        pad = [f for f in fillers if f not in taken][: len(row_ids) - len(real)]
        ids.append([i for i, _ in real] + pad)
        logprobs.append([lp for _, lp in real] + [ABSENT_LOGPROB] * len(pad))
    return TopK(ids=ids, logprobs=logprobs)


def one_hot_targets(examples: Iterable[TrainExample], tokenizer: Any, k: int) -> list[TrainExample]:
    """Examples whose every row is their own token (sparse KL = cross-entropy), rows as wide as those of
    `aligned_examples(..., k)`: gold targets in a run whose other examples carry sparse teacher targets
    (a batch cannot mix the two)."""
    width = k + 1
    fillers = _fillers(tokenizer, width)
    out = []
    for e in examples:
        ids = target_ids(tokenizer, e.target)
        rows = [[t, *[f for f in fillers if f != t][: width - 1]] for t in ids]
        logprobs = [[0.0] + [ABSENT_LOGPROB] * (width - 1) for _ in ids]
        out.append(replace(e, teacher_topk=TopK(ids=rows, logprobs=logprobs)))
    return out


def _raw(t: Mapping[str, Any]) -> bytes:
    return bytes(t["bytes"]) if t.get("bytes") is not None else api_token_bytes(t["token"])


def _trimmed(tokens: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored tokens without leading and trailing whitespace (as the PT text is stripped)."""
    out = [dict(t) for t in tokens]
    while out and not _raw(out[-1]).strip():
        out.pop()
    while out and not _raw(out[0]).strip():
        out.pop(0)
    if out:
        first = _raw(out[0])
        stripped = first.lstrip()
        if stripped != first:
            out[0] = out[0] | {"bytes": list(stripped), "token": stripped.decode(errors="replace")}
    return out


def _as_api_tokens(stored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored PT tokens in the OpenAI `logprobs.content` shape `align_teacher_tokens` reads."""
    return [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes"),
             "top_logprobs": [{"token": a, "logprob": lp} for a, lp in t.get("top") or ()]} for t in stored]


def _aligned_one(
    pt: PseudoTarget, x: TrainExample, tokenizer: Any, k: int, fillers: Sequence[int], stats: AlignmentStats
) -> TrainExample | None:
    tokens = _trimmed(pt.logprobs or [])
    if not tokens:
        stats.skipped += 1
        plain = TrainExample(target=pt.text, prompt=x.prompt, messages=x.messages, source="pt")
        return one_hot_targets([plain], tokenizer, k)[0] if pt.text else None
    a = align_teacher_tokens(_as_api_tokens(tokens), tokenizer, k=k + 1, append_eos=True)
    if not a.text.strip():
        stats.skipped += 1
        return None
    if len(target_ids(tokenizer, a.text)) != len(a):
        raise RuntimeError(f"PT {pt.id}: aligned rows do not match the student's tokens of its text")
    stats.add(a)
    return TrainExample(target=a.text, prompt=x.prompt, messages=x.messages, source="pt",
                        teacher_topk=sparse_rows(a, fillers))


def aligned_examples(
    pts: Sequence[PseudoTarget],
    student_tokenizer: Any,
    prompts: Mapping[str, TrainExample],
    k: int,
) -> tuple[list[TrainExample], AlignmentStats]:
    """One training example per PT, with the teacher's top-k alternatives aligned to the student's tokens.

    `prompts` maps a PT's `input_id` to the input (the student sees its bare prompt, no demonstrations).
    Rows are k + 1 wide (the chosen token and k alternatives). A student position with no teacher
    counterpart, and the final EOS, is a one-hot row on its own token, which the sparse loss turns
    into cross-entropy; so is every row of a PT stored without log-probabilities. The target is the
    text the teacher's tokens spell, stripped, so targets and rows always line up.
    """
    stats = AlignmentStats()
    fillers = _fillers(student_tokenizer, k + 1)
    out = [_aligned_one(p, prompts[p.input_id], student_tokenizer, k, fillers, stats) for p in pts]
    return [e for e in out if e is not None], stats


def aligned_schedule(
    gold: Sequence[TrainExample],
    pts: Sequence[PseudoTarget],
    student_tokenizer: Any,
    inputs: Sequence[TrainExample],
    k: int,
) -> tuple[list[list[TrainExample]], AlignmentStats]:
    """Per-epoch lists (gold plus PT number e mod K of each input, as `pt_schedule`), all with sparse rows."""
    prompts = {x.id: x for x in inputs}
    stats = AlignmentStats()
    fillers = _fillers(student_tokenizer, k + 1)
    by_id: dict[str, TrainExample] = {e.id: e for e in one_hot_targets(gold, student_tokenizer, k)}
    records = []
    for p in pts:
        if p.input_id not in prompts:
            continue
        e = _aligned_one(p, prompts[p.input_id], student_tokenizer, k, fillers, stats)
        if e is not None:
            by_id[e.id] = e
            records.append({"input_id": p.input_id, "k": p.index, "target": e.target, "prompt": e.prompt,
                            "messages": e.messages})
    schedule = pt_schedule(gold, records)
    return [[by_id[e.id] for e in epoch] for epoch in schedule], stats


# --------------------------------------------------------------------------- a local teacher, another tokenizer


def cross_tokenizer_examples(
    teacher_model: Any,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    examples: Sequence[TrainExample],
    k: int,
    *,
    template: PromptTemplate = "chat",
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[TrainExample], AlignmentStats]:
    """The examples with sparse targets from a local teacher whose vocabulary differs from the student's.

    The teacher reads each prompt rendered with its own tokenizer's template and is teacher-forced on
    the target; its top-k per own position are aligned to the student's tokens of the same text.
    """
    stats = AlignmentStats()
    fillers = _fillers(student_tokenizer, k + 1)
    out = []
    for e in examples:
        prompt = prompt_text(teacher_tokenizer, e, template)
        tokens = local_teacher_logprobs(teacher_model, teacher_tokenizer, prompt, e.target, k=k)
        a = align_teacher_tokens(tokens, student_tokenizer, k=k + 1, append_eos=True)
        if a.input_ids.tolist() != target_ids(student_tokenizer, e.target):
            raise RuntimeError(f"example {e.id}: aligned rows do not match the student's tokens of its target")
        stats.add(a)
        out.append(replace(e, teacher_topk=sparse_rows(a, fillers)))
        if on_progress is not None:
            on_progress(1)
    return out, stats


def with_cross_tokenizer_targets(
    teacher_model: Any,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    schedule: Sequence[Sequence[TrainExample]],
    k: int,
    *,
    template: PromptTemplate = "chat",
) -> tuple[list[list[TrainExample]], AlignmentStats]:
    """Every example of a per-epoch schedule with aligned sparse targets (one teacher pass per distinct one)."""
    distinct = list({e.id: e for epoch in schedule for e in epoch}.values())
    done, stats = cross_tokenizer_examples(teacher_model, teacher_tokenizer, student_tokenizer, distinct, k,
                                           template=template)
    by_id = {e.id: d for e, d in zip(distinct, done, strict=True)}
    return [[by_id[e.id] for e in epoch] for epoch in schedule], stats


def same_vocabulary(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab()
