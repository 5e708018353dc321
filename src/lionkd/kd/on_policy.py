"""On-policy KD: the student samples answers, a served teacher scores every token of them.

Each optimiser step, about `lmbda` of a batch's examples (a fixed draw per example and step, so a
resumed run draws the same) get as target the CURRENT student's own sample for their prompt, made
in eval mode with per-row seeded sampling (the seed is the run's, the example's and the step's: a
resumed run samples the same completions, whose scores the call cache then already holds). A sample
is reused for `refresh_every` steps. The teacher scores each sample through `llm/scoring.py` (cached
and budgeted like every call), its tokens are aligned to the student's (`align.py`: identical
tokenizers align one to one) and the student is trained on the reverse KL at every aligned position
(`losses.on_policy_loss`): on the sampled token ("k1"), or on buckets made of the teacher's top-k,
the sampled token and the tail ("topk"). The rest of the batch keeps its off-policy target (teacher text or
pseudo-targets) and the run's other objectives, as GKD mixes its on- and off-policy batches.

The student trains on its sample as its own tokenizer writes the sample's text (the text the teacher
scored), and on the end of its turn; that last position has no teacher counterpart and so no
on-policy loss. Positions without a teacher counterpart count in the aligned share; a run whose share
falls below `min_aligned` stops with one line.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import OnPolicyConfig
from ..errors import UserError
from ..llm.base import TokenLogprob
from .align import AlignedTargets, align_teacher_tokens
from .decoding import generate_token_ids
from .examples import fit_length, target_ids

FIELDS = ("op_mask", "op_token_logprob", "op_ids", "op_logprobs")


def _seed(*parts: object) -> int:
    key = "|".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def sampling_processors(seeds: Sequence[int], temperature: float) -> Any:
    """Greedy decoding over these samples from the model, each row from its own seed (see `llm/hf.py`)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from ..llm.hf import RowSeededGumbel

    return LogitsProcessorList([TemperatureLogitsWarper(temperature), RowSeededGumbel(list(seeds))])


class HFSampler:
    """`(model, prompts, seeds, step) -> token ids`: the training model's own `generate`, each row from its seed."""

    def __init__(self, tokenizer: Any, max_new_tokens: int, temperature: float) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def __call__(self, model: Any, prompts: Sequence[Sequence[int]], seeds: Sequence[int], step: int) -> list[list[int]]:
        samples = generate_token_ids(model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                     do_sample=False, batch_size=len(prompts),
                                     logits_processor=sampling_processors(seeds, self.temperature))
        return [ids[0] for ids in samples]


def student_sampler(settings: OnPolicyConfig, model: Any, tokenizer: Any, student: Any) -> Any:
    """The sampler `kd.on_policy.sampler` names, for this student (its folder, for vLLM's engine)."""
    if settings.sampler == "hf":
        return HFSampler(tokenizer, settings.max_new_tokens, settings.temperature)
    from ..llm.templates import stop_token_ids
    from .on_policy_vllm import VLLMSampler

    return VLLMSampler(student, settings.vllm, max_new_tokens=settings.max_new_tokens,
                       temperature=settings.temperature, stop_ids=stop_token_ids(model, tokenizer))


@dataclass
class OnPolicyStats:
    """What the on-policy objective did: samples, aligned share, and per optimiser step its losses."""

    samples: int = 0  # student samples made (and scored)
    reused: int = 0  # examples trained on a sample made at an earlier step
    positions: int = 0  # sampled positions (the end of turn excluded)
    aligned: int = 0  # of which have a teacher counterpart
    unscored: int = 0  # samples whose scoring call finally failed (trained on their off-policy target)
    history: dict[int, list[float]] = field(default_factory=dict)  # step -> [loss, reverse KL (k1)]

    @property
    def aligned_fraction(self) -> float:
        return self.aligned / self.positions if self.positions else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "reused": self.reused, "positions": self.positions,
                "aligned": self.aligned, "aligned_fraction": self.aligned_fraction, "unscored": self.unscored,
                "history": [[step, *values] for step, values in sorted(self.history.items())]}


class OnPolicyTeacher:
    """Replaces examples of a batch by student samples with the teacher's scores (see the module doc)."""

    def __init__(
        self,
        settings: OnPolicyConfig,
        scorer: Any,  # llm.scoring.TeacherScorer
        tokenizer: Any,
        teacher_prompt: Callable[[str], str],  # example id -> the prompt text the teacher reads
        *,
        max_length: int,
        end_id: int,
        seed: int = 0,
        sampler: Any = None,  # HFSampler (the default) or on_policy_vllm.VLLMSampler
    ) -> None:
        self.settings = settings
        self.sampler = sampler or HFSampler(tokenizer, settings.max_new_tokens, settings.temperature)
        self.end_id = end_id  # the token that ends a trained answer (the template's end of turn, else EOS)
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.teacher_prompt = teacher_prompt
        self.max_length = max_length
        self.seed = seed
        self.cache: dict[str, tuple[int, dict[str, Any] | None]] = {}  # example id -> (step sampled, sample)
        self.stats = OnPolicyStats()

    def chosen(self, example_id: str, step: int) -> bool:
        if self.settings.lmbda >= 1.0:
            return True
        return random.Random(_seed(self.seed, "lmbda", example_id, step)).random() < self.settings.lmbda

    def mix(self, model: Any, features: Sequence[Mapping[str, Any]], step: int) -> list[dict[str, Any]]:
        """The batch's features, the chosen ones with the student's sample as target and `op_*` fields."""
        chosen = [i for i, f in enumerate(features) if self.chosen(f["id"], step)]
        refresh = self.settings.refresh_every
        stale = [i for i in chosen if features[i]["id"] not in self.cache
                 or step - self.cache[features[i]["id"]][0] >= refresh]
        self.stats.reused += len(chosen) - len(stale)
        if stale:
            self._sample([features[i] for i in stale], model, step - step % refresh)
        out = []
        width = len(features[0]["topk_ids"][0]) if "topk_ids" in features[0] and features[0]["topk_ids"] else 0
        for i, f in enumerate(features):
            f = dict(f)
            sample = self.cache[f["id"]][1] if i in chosen else None
            if sample is not None:
                prompt, target = fit_length(f["prompt"], sample["target"], self.max_length)
                n = len(target)
                # weight 0: the off-policy objectives skip the row; the on-policy one reads op_mask
                f.update(prompt=prompt, target=target, weight=0.0, source="on_policy",
                         **{k: sample[k][:n] for k in FIELDS})
                if width:  # a batch of cached top-k rows: this row's are never read (weight 0)
                    f.update(topk_ids=[[t] * width for t in target], topk_logprobs=[[0.0] * width for _ in target])
            out.append(f)
        return out

    def _sample(self, features: Sequence[Mapping[str, Any]], model: Any, step: int) -> None:
        s = self.settings
        seeds = [_seed(self.seed, "sample", f["id"], step) for f in features]
        samples = self.sampler(model, [f["prompt"] for f in features], seeds, step)
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in samples]
        scored = self.scorer.score([(self.teacher_prompt(f["id"]), text) for f, text in zip(features, texts,
                                                                                            strict=True)])
        self.stats.samples += len(features)
        for f, tokens in zip(features, scored, strict=True):
            if tokens is None:  # the call failed (in the ledger): this step trains the example off-policy
                self.stats.unscored += 1
                self.cache[f["id"]] = (step, None)
                continue
            self.cache[f["id"]] = (step, self._targets(tokens))
        if self.stats.positions and self.stats.aligned_fraction < s.min_aligned:
            raise UserError(
                f"kd.on_policy.min_aligned: only {self.stats.aligned_fraction:.0%} of the student's sampled "
                f"positions have a teacher counterpart (at least {s.min_aligned:.0%} asked); the teacher's "
                "tokenizer cannot be aligned to the student's well enough")

    def _targets(self, tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The student's tokens of the scored text (and its end of turn) with the teacher's view of each."""
        k = self.settings.top_k + 1
        a: AlignedTargets = align_teacher_tokens(list(tokens), self.tokenizer, k=k)
        self.stats.positions += len(a)
        self.stats.aligned += int(a.aligned.sum())
        # the end of turn closes the answer; the teacher did not score it, so it carries no on-policy loss
        input_ids = torch.cat([a.input_ids, torch.tensor([self.end_id])])
        ids = torch.cat([a.topk_ids, torch.full((1, k), -1, dtype=torch.long)])
        logprobs = torch.cat([a.topk_logprobs, torch.full((1, k), -math.inf)])
        rows = torch.cat([a.aligned, torch.tensor([False])])
        own = ids == input_ids.unsqueeze(-1)
        token_logprob = torch.where(own, logprobs, torch.full_like(logprobs, -math.inf)).amax(-1)
        mask = rows & own.any(-1) & torch.isfinite(token_logprob)
        return {"target": input_ids.tolist(), "op_mask": mask.float().tolist(),
                "op_token_logprob": torch.where(mask, token_logprob, 0.0).tolist(),
                "op_ids": ids.tolist(), "op_logprobs": torch.where(ids >= 0, logprobs, 0.0).tolist()}

    def record(self, step: int, loss: float, reverse_kl: float) -> None:
        """Add a micro-batch's share of the step's on-policy loss and reverse KL (each already / the step's tokens)."""
        now = self.stats.history.setdefault(step, [0.0, 0.0])
        now[0] += loss
        now[1] += reverse_kl


def collate_on_policy(features: Sequence[Mapping[str, Any]], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`op_*` tensors aligned with the logits positions that predict each target token (decoder-only)."""
    b, width = batch["input_ids"].shape
    k = max((len(f["op_ids"][0]) for f in features if f.get("op_ids")), default=1)
    out = {"op_mask": torch.zeros(b, width), "op_token_logprob": torch.zeros(b, width),
           "op_ids": torch.full((b, width, k), -1, dtype=torch.long), "op_logprobs": torch.zeros(b, width, k)}
    for i, f in enumerate(features):
        if "op_mask" not in f or not f["target"]:
            continue
        start, n = len(f["prompt"]) - 1, len(f["target"])
        rows = slice(max(start, 0), start + n)
        skip = -start if start < 0 else 0  # no prompt: nothing predicts the first target token
        out["op_mask"][i, rows] = torch.tensor(f["op_mask"][skip:n])
        out["op_token_logprob"][i, rows] = torch.tensor(f["op_token_logprob"][skip:n])
        ids = torch.tensor(f["op_ids"][skip:n], dtype=torch.long)
        out["op_ids"][i, rows, : ids.shape[1]] = ids
        out["op_logprobs"][i, rows, : ids.shape[1]] = torch.tensor(f["op_logprobs"][skip:n])
    return out


@dataclass
class OnPolicySetup:
    """What a training run needs for the on-policy objective: the settings, the teacher's scorer, and the
    prompt text the teacher reads for each example id (rendered with the teacher's chat template)."""

    settings: OnPolicyConfig
    scorer: Any  # llm.scoring.TeacherScorer
    teacher_prompts: dict[str, str]
    seed: int = 0

    def teacher(self, tokenizer: Any, max_length: int, template: str, sampler: Any = None) -> OnPolicyTeacher:
        end_id = target_ids(tokenizer, "", template)[-1]  # type: ignore[arg-type]
        return OnPolicyTeacher(self.settings, self.scorer, tokenizer, self.teacher_prompts.__getitem__,
                               max_length=max_length, end_id=end_id, seed=self.seed, sampler=sampler)


def check_student_samples(model: Any, tokenizer: Any) -> None:
    """A student that cannot sample its own answers is refused before any call (one line)."""
    from ..llm.templates import stop_token_ids

    if getattr(model.config, "is_encoder_decoder", False):
        raise UserError("kd.objective: 'on_policy' supports decoder-only students")
    can = getattr(model, "can_generate", None)
    if getattr(model, "generation_config", None) is None or (can is not None and not can()):
        raise UserError("student.model: the student cannot sample (it has no generation config); the "
                        "'on_policy' objective needs a student that can generate")
    if not stop_token_ids(model, tokenizer):
        raise UserError("student.model: the student cannot sample (no EOS or end-of-turn token in its generation "
                        "config or tokenizer); the 'on_policy' objective needs answers that end")


def aligned_share(teacher_tokenizer: Any, student_tokenizer: Any, texts: Sequence[str]) -> float:
    """The share of the student's positions of `texts` that have a teacher counterpart, from the two
    tokenizers alone (no call): what the on-policy objective will see on text like this."""
    positions = aligned = 0
    for text in texts:
        if not text:
            continue
        enc = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in enc["offset_mapping"]]
        cuts = [0, *[max(e, 0) for e in ends[:-1]], len(text)]
        cuts = [max(cuts[: i + 1]) for i in range(len(cuts))]  # offsets never run backwards here
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        a = align_teacher_tokens([TokenLogprob(p, 0.0, []) for p in pieces if p], student_tokenizer)
        positions += len(a)
        aligned += int(a.aligned.sum())
    return aligned / positions if positions else 1.0


def check_alignment(teacher_tokenizer: Any, student_tokenizer: Any, texts: Sequence[str], min_aligned: float,
                    where: str) -> float:
    """`aligned_share`, or one line naming the key when it is below `min_aligned`."""
    share = aligned_share(teacher_tokenizer, student_tokenizer, texts)
    if share < min_aligned:
        raise UserError(f"{where}: the teacher's tokenizer aligns only {share:.0%} of the student's positions "
                        f"(kd.on_policy.min_aligned asks {min_aligned:.0%}); the tokenizers cannot be aligned")
    return share


def teacher_tokenizer(cfg: Any, student_tok: Any) -> Any:
    """The tokenizer whose chat template writes the teacher's prompts: `teacher.tokenizer`, else the student's."""
    if not cfg.teacher.tokenizer:
        return student_tok
    from ..llm.models import resolve_model_path
    from .loading import load_tokenizer

    try:
        return load_tokenizer(resolve_model_path(cfg.teacher.tokenizer))
    except (UserError, OSError, ValueError) as exc:
        raise UserError(f"teacher.tokenizer: {exc}") from None


def check_teacher_tokenizer(cfg: Any, student_dir: str, texts: Sequence[str]) -> float:
    """`check_alignment` of `teacher.tokenizer` against the student's on up to 32 of `texts` (no call)."""
    from .loading import load_tokenizer

    student_tok = load_tokenizer(student_dir)
    return check_alignment(teacher_tokenizer(cfg, student_tok), student_tok, [t for t in texts if t][:32],
                           cfg.kd.on_policy.min_aligned, "teacher.tokenizer")


def on_policy_setup(
    cfg: Any,  # RunConfig
    store: Any,
    examples: Sequence[Any],  # TrainExample, one list or a list of lists
    student_dir: str,
    instruction: str | None = None,
) -> OnPolicySetup:
    """The on-policy objective of a run: the served teacher's scorer, and the prompt the teacher reads
    for every example (its instruction as a system message, then the example's turns, in the teacher's
    chat template). An unalignable teacher tokenizer is refused here, before any call."""
    from ..llm.scoring import open_scorer
    from ..llm.templates import render_prompt
    from .loading import load_tokenizer

    op = cfg.kd.on_policy
    student_tok = load_tokenizer(student_dir)
    teacher_tok = teacher_tokenizer(cfg, student_tok)
    flat = [e for group in examples for e in (group if isinstance(group, list) else [group])]
    if teacher_tok is not student_tok:
        check_alignment(teacher_tok, student_tok, [e.target for e in flat[:32]], op.min_aligned, "teacher.tokenizer")
    # the teacher's instruction stands where the student's own system prompt (if any) stood
    system = [{"role": "system", "content": instruction}] if instruction else []
    template = "chat" if teacher_tok is not student_tok else cfg.student.template
    prompts = {e.id: render_prompt(teacher_tok, [*system, *(m for m in e.prompt_messages() if m["role"] != "system")],
                                   template) for e in flat}
    return OnPolicySetup(op, open_scorer(cfg.teacher, store, op.top_k), prompts, seed=cfg.seed)
