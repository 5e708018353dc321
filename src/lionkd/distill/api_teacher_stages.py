"""The `lionkd distill` stages with a teacher whose logits are not at hand: an API teacher (pseudo-targets
with top-k log-probabilities through the run's call cache, see `lionkd.kd.api_teacher`) and a local
teacher with another vocabulary (its top-k aligned to the student's tokens). Each reads the config
sections it needs and calls the KD engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from ..kd.api_teacher import (
    DEFAULT_INSTRUCTION,
    MAX_TOP_LOGPROBS,
    AlignmentStats,
    APIPTConfig,
    aligned_schedule,
    generate_api_pseudo_targets,
    pick_demonstrations,
    with_cross_tokenizer_targets,
)
from ..kd.examples import TrainExample
from ..records import PseudoTarget
from ..store import Store


def check_api_teacher(cfg: RunConfig) -> None:
    """What `lionkd distill` cannot do with a teacher it reaches only through an API, as one-line errors."""
    kd = cfg.kd
    if kd.teacher_finetune:
        raise UserError("kd.teacher_finetune: an API teacher (teacher.backend: openai) cannot be fine-tuned here")
    if kd.student_init == "pruned":
        raise UserError("kd.student_init: 'pruned' needs the teacher's weights, which an API teacher "
                        "(teacher.backend: openai) does not give; use 'pretrained' or 'config'")
    if kd.pt_method == "beam":
        raise UserError("kd.pt_method: an API teacher cannot beam-search; use 'sample' or 'high_temp'")
    if kd.joint_alpha > 0 or kd.teacher_topk > 0:
        key = "kd.joint_alpha" if kd.joint_alpha > 0 else "kd.teacher_topk"
        raise UserError(f"{key}: needs a local teacher; with an API teacher set teacher.logprobs instead")
    live = sorted(set(kd.objective) - {"ce", "logits", "on_policy"})
    if live:
        raise UserError(f"kd.objective: '{live[0]}' needs the teacher's weights; an API teacher gives "
                        "'logits' (with teacher.logprobs) and 'ce'")
    if cfg.teacher.logprobs and kd.temperature != 1.0:
        raise UserError("kd.temperature: an API teacher's log-probabilities are at temperature 1; set 1.0")


def api_pt_settings(cfg: RunConfig) -> APIPTConfig:
    kd = cfg.kd
    temperature = kd.pt_temperature if kd.pt_temperature is not None else (1.5 if kd.pt_method == "high_temp" else 1.0)
    return APIPTConfig(
        k=kd.pt_count, top_logprobs=cfg.teacher.logprobs or 0, fewshot=kd.fewshot,
        instruction=kd.teacher_instruction if kd.teacher_instruction is not None else DEFAULT_INSTRUCTION,
        temperature=temperature, top_p=kd.pt_top_p, max_tokens=kd.pt_max_new_tokens, seed=cfg.seed,
        method=kd.pt_method,
    )


def api_pseudo_targets_stage(
    cfg: RunConfig, store: Store, inputs: Sequence[TrainExample], labeled: Sequence[TrainExample],
    teacher_name: str, on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The pseudo_targets stage of `lionkd distill` with an API teacher; returns the stage's detail."""
    from ..llm.factory import open_llm

    settings = api_pt_settings(cfg)
    llm = open_llm(cfg.teacher, store, "teacher")
    demos = pick_demonstrations(labeled, settings.fewshot, cfg.seed)
    pts = generate_api_pseudo_targets(llm, inputs, demos, settings, store=store, teacher_name=teacher_name,
                                      on_progress=on_progress)
    with_logprobs = sum(p.logprobs is not None for p in pts)
    return {"method": settings.method, "k": settings.k, "inputs": len(inputs), "teacher": teacher_name,
            "params": settings.request_params() | {"n": settings.k, "fewshot": settings.fewshot},
            "generated": len(pts), "with_logprobs": with_logprobs, "missing": len(inputs) * settings.k - len(pts)}


def api_schedule(
    cfg: RunConfig, gold: Sequence[TrainExample], pts: Sequence[PseudoTarget], inputs: Sequence[TrainExample],
    schedule: list[list[TrainExample]], student_dir: str,
) -> tuple[list[list[TrainExample]], dict[str, float], AlignmentStats | None]:
    """(schedule, objective, alignment) for training on an API teacher's PTs.

    With `teacher.logprobs` > 0 and 'logits' in the objective: aligned sparse targets (word-level KD
    where aligned, cross-entropy elsewhere). Otherwise: sequence-level KD, cross-entropy on the PTs.
    """
    from ..kd.loading import load_tokenizer

    k = min(cfg.teacher.logprobs or 0, MAX_TOP_LOGPROBS)
    if k == 0 or "logits" not in cfg.kd.objective:
        return schedule, {"ce": 1.0}, None
    tokenizer = load_tokenizer(student_dir)
    aligned, stats = aligned_schedule(gold, pts, tokenizer, inputs, k)
    return aligned, dict(cfg.kd.objective), stats


def cross_tokenizer_schedule(
    cfg: RunConfig, schedule: list[list[TrainExample]], teacher_dir: str, student_dir: str,
) -> tuple[list[list[TrainExample]], AlignmentStats]:
    """A schedule with aligned sparse targets from a local teacher with another vocabulary."""
    from ..kd.loading import load_tokenizer
    from ..llm.hf import load_model

    model, teacher_tok = load_model(teacher_dir, cfg.teacher.dtype, cfg.teacher.device)
    k = cfg.kd.teacher_topk or 20
    return with_cross_tokenizer_targets(model, teacher_tok, load_tokenizer(student_dir), schedule, k,
                                        template=cfg.student.template)


def cross_tokenizer_allowed(cfg: RunConfig) -> bool:
    """Whether a local teacher with another vocabulary can teach through aligned sparse targets."""
    kd = cfg.kd
    return set(kd.objective) <= {"ce", "logits"} and kd.joint_alpha == 0 and kd.temperature == 1.0
