"""`lionkd distill`: task-specific KD with pseudo-targets, as one resumable pipeline.

Stages, in order, each recorded in the run store (iteration 0) and skipped by a rerun once done:

  data              read labeled, unlabeled and evaluation rows (a held-out slice when kd.eval is null)
  teacher_finetune  cross-entropy fine-tuning of the teacher on the labeled data (kd.teacher_finetune)
  student_init      the starting student: pretrained, pruned from the teacher, or a fresh config
  pseudo_targets    K teacher outputs per labeled and unlabeled input, stored with their provenance;
                    committed batch by batch, so an interrupted stage generates only what is missing
  kd_train          word-level KD on gold targets plus PT number e mod K in epoch e, with optional
                    Joint-Teaching and cached teacher top-k (checkpoints let it resume)
  final_ce          a short cross-entropy fine-tuning on the labeled data (kd.final_ce_epochs)
  eval_student, eval_teacher
                    beam-search answers on the evaluation rows, scored by BLEU, ROUGE, exact match
                    and target perplexity; eval.json / eval.md are written from the stored results

Layout of the run directory: run.sqlite, config.yaml, teacher/ (when fine-tuned), student-init/,
student-kd/, student/, predictions-*.jsonl, eval.json, eval.md.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig, TrainConfig
from ..data import write_jsonl
from ..errors import BudgetExceeded, UserError
from ..eval.local_model import evaluate_model
from ..kd.examples import TrainExample
from ..kd.job import TrainJob
from ..kd.joint_teaching import JointTeaching
from ..kd.on_policy_vllm import check_sampler
from ..kd.pseudo_targets import PTConfig, cache_teacher_topk, generate_pseudo_targets, pt_schedule
from ..progress import progress_bars
from ..records import PseudoTarget
from ..store import Store
from .task_data import TaskData, load_task_data

ITERATION = 0  # a distill run has one iteration in the store
SUMMARY_METRICS = ("bleu", "rouge_mean", "exact_match", "perplexity")


@dataclass
class DistillSummary:
    run_dir: Path
    teacher: str
    student: Path
    eval_path: Path | None
    student_metrics: dict[str, Any] = field(default_factory=dict)
    teacher_metrics: dict[str, Any] | None = None
    ran: list[str] = field(default_factory=list)  # stages this invocation ran
    skipped: list[str] = field(default_factory=list)  # stages found done and skipped

    def line(self) -> str:
        """One line: the student's (and teacher's) key metrics and where things are."""
        def fmt(metrics: dict[str, Any]) -> str:
            return ", ".join(f"{k} {metrics[k]:.2f}" for k in SUMMARY_METRICS if isinstance(metrics.get(k), float))

        parts = [f"student: {fmt(self.student_metrics) or 'not evaluated'}"]
        if self.teacher_metrics:
            parts.append(f"teacher: {fmt(self.teacher_metrics)}")
        parts.append(f"model: {self.student}")
        if self.eval_path is not None:
            parts.append(f"eval: {self.eval_path}")
        return "distilled | " + " | ".join(parts)


# --------------------------------------------------------------------------- checks and paths


# A name that is not a local folder is loaded from the Hugging Face hub when it looks like an id.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_config(cfg: RunConfig) -> None:
    """Mistakes found before any work, each a one-line error naming its key."""
    from ..kd.objectives import resolve_objective

    if cfg.teacher.backend not in ("hf", "openai"):
        raise UserError(f"teacher.backend: lionkd distill needs a local teacher (backend: hf) or an "
                        f"OpenAI-compatible API (backend: openai), not '{cfg.teacher.backend}'")
    if not cfg.kd.labeled.path:
        raise UserError("kd.labeled.path: lionkd distill needs labeled data (a file or dataset name)")
    resolve_objective(cfg.kd.objective, has_teacher=True)
    if api_teacher(cfg):
        from .api_teacher_stages import check_api_teacher

        check_api_teacher(cfg)
    else:
        model_path(cfg.teacher.model, "teacher.model")
    if cfg.kd.student_init in ("pretrained", "config"):
        model_path(cfg.student.model, "student.model")
    if "on_policy" in cfg.kd.objective:
        if not api_teacher(cfg):
            raise UserError("kd.objective: 'on_policy' needs a served teacher (teacher.backend: openai, with "
                            "base_url) that scores the student's samples")
        if isinstance(cfg.student.train.processes, int) and cfg.student.train.processes > 1:
            raise UserError("student.train.processes: the 'on_policy' objective trains in one process; set 1")
        check_sampler(cfg.kd.on_policy, cfg.student.lora)


def model_path(name: str, key: str) -> str:
    from ..llm.models import model_not_found, resolve_model_path

    path = resolve_model_path(name)
    if not Path(path).exists() and not HUB_ID.fullmatch(name):
        raise model_not_found(path, key, hub=True)
    return path


def api_teacher(cfg: RunConfig) -> bool:
    """A teacher reached through an API: PTs with top-k log-probabilities (see `lionkd.kd.api_teacher`)."""
    return cfg.teacher.backend == "openai"


def teacher_path(cfg: RunConfig) -> str:
    if api_teacher(cfg):
        return cfg.teacher.model  # a model name at the endpoint, not a folder
    if cfg.kd.teacher_finetune:
        return str(cfg.run_dir / "teacher")
    return model_path(cfg.teacher.model, "teacher.model")


def teacher_name(cfg: RunConfig) -> str:
    """The teacher as recorded in PT provenance (stable when the run folder moves)."""
    return cfg.teacher.model + (" (fine-tuned)" if cfg.kd.teacher_finetune else "")


def student_init_path(cfg: RunConfig) -> str:
    if cfg.kd.student_init == "pretrained":
        return model_path(cfg.student.model, "student.model")
    return str(cfg.run_dir / "student-init")


def final_student_path(cfg: RunConfig) -> Path:
    return cfg.run_dir / ("student" if cfg.kd.final_ce_epochs > 0 else "student-kd")


# --------------------------------------------------------------------------- the stages


class Stages:
    """Runs each stage once: a stage found in the store is skipped and its recorded detail returned."""

    def __init__(self, store: Store, say: Callable[[str], None]) -> None:
        self.store = store
        self.say = say
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def detail(self, name: str) -> dict[str, Any] | None:
        for s in self.store.stages():
            if s["iteration"] == ITERATION and s["stage"] == name:
                return s["detail"]
        return None

    def run(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.detail(name)
        if done is not None:
            self.skipped.append(name)
            self.say(f"{name}: done earlier, skipped")
            return done
        self.say(f"{name}: running")
        detail = work()
        self.store.finish_stage(ITERATION, name, detail)
        self.ran.append(name)
        return detail


def finetune_teacher(cfg: RunConfig, data: TaskData, progress: bool) -> dict[str, Any]:
    from ..kd.train import train_student

    settings = cfg.kd.teacher_train or cfg.student.train
    job = TrainJob(model_path(cfg.teacher.model, "teacher.model"), data.labeled, cfg.run_dir / "teacher",
                   settings=settings, objective="ce", template=cfg.student.template, progress=progress)
    metrics = train_student(job)
    return {"path": str(cfg.run_dir / "teacher"), "examples": len(data.labeled), "loss": metrics.get("loss"),
            "steps": metrics.get("steps")}


def init_student(cfg: RunConfig) -> dict[str, Any]:
    """The starting student: a pretrained folder, the teacher with layers dropped, or a fresh model."""
    kd = cfg.kd
    if kd.student_init == "pretrained":
        return {"init": "pretrained", "path": student_init_path(cfg)}
    out = cfg.run_dir / "student-init"
    shutil.rmtree(out, ignore_errors=True)  # left by an interrupted try of this stage
    if kd.student_init == "pruned":
        from ..kd.prune import prune_layers

        info = prune_layers(teacher_path(cfg), out, kd.prune_keep, encoder_keep=kd.prune_encoder_keep)
        return {"init": "pruned", "path": str(out), "kept": info["kept"], "encoder_kept": info["encoder_kept"]}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    source = model_path(cfg.student.model, "student.model")
    config = AutoConfig.from_pretrained(source)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    torch.manual_seed(cfg.seed)
    model = cls.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return {"init": "config", "path": str(out), "from": cfg.student.model,
            "parameters": sum(p.numel() for p in model.parameters())}


def check_vocabularies(cfg: RunConfig) -> None:
    """Logit KD compares distributions token by token: one vocabulary for teacher and student."""
    from ..kd.loading import check_same_vocab, load_tokenizer
    from .api_teacher_stages import cross_tokenizer_allowed

    if set(cfg.kd.objective) <= {"ce"} or api_teacher(cfg) or cross_tokenizer_allowed(cfg):
        return  # other vocabularies then teach through aligned sparse targets
    check_same_vocab(load_tokenizer(student_init_path(cfg)), load_tokenizer(teacher_path(cfg)))


def pt_settings(cfg: RunConfig) -> PTConfig:
    settings = PTConfig.from_config(cfg.kd)
    return replace(settings, batch_size=cfg.teacher.batch_size, seed=cfg.seed)


def _matching(store: Store, cfg: RunConfig) -> dict[str, list[PseudoTarget]]:
    """Stored PTs of this run's teacher and method, by input id, ordered by k."""
    settings = pt_settings(cfg)
    name = teacher_name(cfg)
    by_input: dict[str, list[PseudoTarget]] = {}
    for p in store.pseudo_targets():
        if p.method == settings.method and p.teacher == name and p.index < settings.k:
            by_input.setdefault(p.input_id, []).append(p)
    return by_input


def generate_pts(cfg: RunConfig, store: Store, inputs: Sequence[TrainExample], progress: bool) -> dict[str, Any]:
    """K PTs per input, generated by the teacher and committed batch by batch; stored batches are reused.

    Batches are cut from the full input list and seeded by their position, so a resumed stage makes
    the same batches and the same samples as an uninterrupted one.
    """
    from ..llm.hf import load_model

    settings = pt_settings(cfg)
    name = teacher_name(cfg)
    have = _matching(store, cfg)
    done = {i for i, ps in have.items() if len(ps) >= settings.k}
    generated = reused = unfinished = 0
    model = tokenizer = None
    with progress_bars(progress) as bars:
        task = bars.add_task(f"pseudo-targets ({settings.method}, K={settings.k})", total=len(inputs))
        for start in range(0, len(inputs), settings.batch_size):
            chunk = list(inputs[start : start + settings.batch_size])
            if all(x.id in done for x in chunk):
                reused += len(chunk) * settings.k
                bars.advance(task, len(chunk))
                continue
            if model is None:
                model, tokenizer = load_model(teacher_path(cfg), cfg.teacher.dtype, cfg.teacher.device)
            records = generate_pseudo_targets(model, tokenizer, chunk, replace(settings, seed=settings.seed + start),
                                              template=cfg.student.template, teacher_name=name)
            store.add_pseudo_targets(
                PseudoTarget(id=r["id"], input_id=r["input_id"], index=r["k"], text=r["target"], method=r["method"],
                             teacher=r["teacher"], params=r["params"])
                for r in records
            )
            generated += len(records)
            unfinished += sum(not r["finished"] for r in records)
            bars.advance(task, len(chunk))
    return {"method": settings.method, "k": settings.k, "inputs": len(inputs), "teacher": name,
            "params": settings.generation_params() | {"max_new_tokens": settings.max_new_tokens},
            "generated": generated, "reused": reused, "unfinished": unfinished}


def pt_records(cfg: RunConfig, store: Store, inputs: Sequence[TrainExample]) -> list[dict[str, Any]]:
    """The stored PTs of `inputs` as records `pt_schedule` takes."""
    if cfg.kd.pt_method == "none":
        return []
    have = _matching(store, cfg)
    records = []
    for x in inputs:
        for p in have.get(x.id, []):
            records.append({"input_id": x.id, "k": p.index, "target": p.text, "prompt": x.prompt,
                            "messages": x.messages})
    return records


def generate_api_pts(cfg: RunConfig, store: Store, inputs: Sequence[TrainExample],
                     labeled: Sequence[TrainExample], progress: bool) -> dict[str, Any]:
    """K PTs with top-k log-probabilities per input from an API teacher, through the run's call cache."""
    from .api_teacher_stages import api_pseudo_targets_stage

    with progress_bars(progress) as bars:
        task = bars.add_task(f"pseudo-targets (API, K={cfg.kd.pt_count})", total=len(inputs))
        try:
            return api_pseudo_targets_stage(cfg, store, inputs, labeled, teacher_name(cfg),
                                            on_progress=lambda n: bars.advance(task, n))
        except BudgetExceeded as exc:  # what this stage has left is all the run has left
            raise BudgetExceeded(f"{exc}; no later stage calls an API", role=exc.role, calls_left=exc.calls_left,
                                 cost_left=exc.cost_left) from None


def _same_vocabulary(cfg: RunConfig) -> bool:
    from ..kd.loading import load_tokenizer

    return load_tokenizer(student_init_path(cfg)).get_vocab() == load_tokenizer(teacher_path(cfg)).get_vocab()


def with_teacher_topk(cfg: RunConfig, schedule: list[list[TrainExample]]) -> list[list[TrainExample]]:
    """Every example with the teacher's top-k cached (one teacher forward per distinct example)."""
    from ..llm.hf import load_model

    model, tokenizer = load_model(teacher_path(cfg), cfg.teacher.dtype, cfg.teacher.device)
    distinct = list({e.id: e for epoch in schedule for e in epoch}.values())
    cached = cache_teacher_topk(model, tokenizer, distinct, cfg.kd.teacher_topk, template=cfg.student.template,
                                max_length=cfg.student.train.max_length, temperature=cfg.kd.temperature,
                                batch_size=cfg.teacher.batch_size)
    by_id = {e.id: e for e in cached}
    return [[by_id[e.id] for e in epoch] for epoch in schedule]


def kd_train(cfg: RunConfig, store: Store, data: TaskData, progress: bool) -> dict[str, Any]:
    from ..kd.train import train_student

    kd = cfg.kd
    records = pt_records(cfg, store, data.pt_inputs())
    if kd.pt_method != "none" and not records:
        raise UserError(f"kd.pt_method: no stored pseudo-targets match method '{kd.pt_method}' and teacher "
                        f"'{teacher_name(cfg)}' (the run began with other settings); use a new run_dir")
    schedule = pt_schedule(data.labeled, records)
    objective, alignment = kd.objective, None
    if api_teacher(cfg):
        from .api_teacher_stages import api_schedule

        pts = [p for ps in _matching(store, cfg).values() for p in ps]
        schedule, objective, alignment = api_schedule(cfg, data.labeled, pts, data.pt_inputs(), schedule,
                                                      student_init_path(cfg))
    elif "logits" in kd.objective and not _same_vocabulary(cfg):
        from .api_teacher_stages import cross_tokenizer_schedule

        schedule, alignment = cross_tokenizer_schedule(cfg, schedule, teacher_path(cfg), student_init_path(cfg))
    elif kd.teacher_topk > 0 and "logits" in kd.objective:
        schedule = with_teacher_topk(cfg, schedule)
    on_policy = None
    if "on_policy" in kd.objective:
        from ..kd.api_teacher import DEFAULT_INSTRUCTION
        from ..kd.on_policy import on_policy_setup

        # the off-policy share keeps what the schedule gives (teacher text, aligned top-k), at the configured weights
        off = {k: kd.objective.get(k, v) for k, v in objective.items() if k != "on_policy"}
        objective = (off if set(kd.objective) - {"on_policy"} else {}) | {"on_policy": kd.objective["on_policy"]}
        instruction = kd.teacher_instruction if kd.teacher_instruction is not None else DEFAULT_INSTRUCTION
        on_policy = on_policy_setup(cfg, store, schedule, student_init_path(cfg), instruction)
    joint = None
    if kd.joint_alpha > 0:
        joint = JointTeaching(alpha=kd.joint_alpha, refresh_every=kd.joint_refresh_every,
                              max_new_tokens=kd.pt_max_new_tokens, top_p=kd.pt_top_p, seed=cfg.seed)
    # with every target's top-k cached, only Joint-Teaching samples and other objectives need the live teacher
    live_teacher = kd.teacher_topk == 0 or joint is not None or bool(set(kd.objective) - {"ce", "logits"})
    live_teacher = live_teacher and alignment is None and not api_teacher(cfg)
    metrics = train_student(TrainJob(
        student_init_path(cfg), schedule, cfg.run_dir / "student-kd", settings=cfg.student.train,
        teacher=teacher_path(cfg) if live_teacher else None, objective=objective, kd=kd,
        template=cfg.student.template, lora=cfg.student.lora, joint=joint, progress=progress, on_policy=on_policy,
    ))
    sources = Counter(e.source for epoch in schedule for e in epoch)
    return {"path": str(cfg.run_dir / "student-kd"), "epoch_lists": len(schedule), "examples_per_epoch":
            len(schedule[0]), "gold": sources.get("gold", 0) // len(schedule), "pseudo_targets": len(records),
            "loss": metrics.get("loss"), "steps": metrics.get("steps"), "objective": metrics.get("objective"),
            "joint_alpha": kd.joint_alpha, "teacher_topk": kd.teacher_topk,
            "student_samples": metrics.get("student_samples"), "pseudo_targets_read": metrics.get("pseudo_targets_read"),
            **({"on_policy": metrics["on_policy"]} if "on_policy" in metrics else {}),
            **({"alignment": alignment.as_dict(), "alignment_metrics": alignment.metrics()} if alignment else {})}


def on_policy_metrics(detail: dict[str, Any]) -> dict[str, Any]:
    """The run store's summary of an on-policy training: samples, aligned share, the last step's losses."""
    op = detail.get("on_policy")
    if not op:
        return {}
    last = op["history"][-1] if op.get("history") else [None, None, None]
    return {"on_policy_samples": op["samples"], "on_policy_aligned_fraction": op["aligned_fraction"],
            "on_policy_loss": last[1], "on_policy_reverse_kl": last[2],
            "on_policy_scoring_calls": (op.get("scoring") or {}).get("calls_sent")}


def final_ce(cfg: RunConfig, data: TaskData, progress: bool) -> dict[str, Any]:
    from ..kd.train import train_student

    settings: TrainConfig = cfg.student.train.model_copy(update={"epochs": cfg.kd.final_ce_epochs, "max_steps": -1})
    job = TrainJob(cfg.run_dir / "student-kd", data.labeled, cfg.run_dir / "student", settings=settings,
                   objective="ce", template=cfg.student.template, lora=cfg.student.lora, progress=progress)
    metrics = train_student(job)
    return {"path": str(cfg.run_dir / "student"), "epochs": cfg.kd.final_ce_epochs, "loss": metrics.get("loss"),
            "steps": metrics.get("steps")}


# --------------------------------------------------------------------------- evaluation


def eval_stage(cfg: RunConfig, who: str, path: str, data: TaskData, progress: bool) -> dict[str, Any]:
    endpoint = cfg.teacher if who == "teacher" else None
    with progress_bars(progress) as bars:
        metrics, predictions = evaluate_model(
            cfg, path, data.eval, dtype=endpoint.dtype if endpoint else "auto",
            device=endpoint.device if endpoint else "auto", bars=bars, label=f"evaluate {who}",
        )
    write_jsonl(cfg.run_dir / f"predictions-{who}.jsonl", (
        {"input": e.source_text(), "target": e.target, "prediction": p}
        for e, p in zip(data.eval, predictions, strict=True)
    ))
    return {"model": path, "metrics": metrics}


def write_eval(cfg: RunConfig, data: TaskData, student: dict[str, Any], teacher: dict[str, Any] | None,
               alignment: dict[str, Any] | None = None) -> Path:
    """eval.json in the `lionkd eval` layout (the student's task metrics) with the teacher's beside them."""
    import json

    from ..report.eval_tables import eval_markdown

    results: dict[str, Any] = {
        "model": student["model"],
        "data": cfg.kd.eval.path if cfg.kd.eval else cfg.kd.labeled.path,
        "eval_source": data.eval_source,
        "examples": len(data.eval),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"template": cfg.student.template, "num_beams": cfg.kd.eval_num_beams,
                     "max_new_tokens": cfg.kd.eval_max_new_tokens},
        "task_metrics": {"overall": student["metrics"]},
    }
    if alignment is not None:  # sparse targets aligned across tokenizers: how much of the teacher got through
        results["alignment"] = alignment
    if teacher is not None:
        results["teacher"] = {"model": teacher["model"], **teacher["metrics"]}
        gap = {}
        for name in ("bleu", "rouge_mean", "exact_match"):
            s, t = student["metrics"].get(name), teacher["metrics"].get(name)
            if isinstance(s, (int, float)) and isinstance(t, (int, float)) and t:
                gap[name] = 100 * s / t
        results["student_over_teacher_pct"] = gap
    path = cfg.run_dir / "eval.json"
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    (cfg.run_dir / "eval.md").write_text(eval_markdown(results, f"Evaluation of {student['model']}"),
                                         encoding="utf-8")
    return path


def _store_metrics(store: Store, detail: dict[str, Any], who: str) -> None:
    values = {f"{who}_{k}": v for k, v in detail["metrics"].items() if k != "examples"}
    store.put_metrics(ITERATION, values)


# --------------------------------------------------------------------------- the pipeline


def distill(cfg: RunConfig, *, progress: bool = True, allow_config_change: bool = False) -> DistillSummary:
    """Run (or resume) the whole task-specific KD pipeline of `cfg`; see the module docstring.

    One process at a time writes a run, and a rerun keeps the config the run started with unless
    `allow_config_change` (see `lionkd.run_guard`).
    """
    from rich.console import Console

    from ..run_guard import bind_config, hold_run

    check_config(cfg)
    console = Console(stderr=True, quiet=not progress)
    data = load_task_data(cfg)
    if "on_policy" in cfg.kd.objective and cfg.teacher.tokenizer and cfg.kd.student_init != "pruned":
        from ..kd.on_policy import check_teacher_tokenizer

        # before any call: a teacher whose tokens cannot be laid over the student's stops the run here
        check_teacher_tokenizer(cfg, model_path(cfg.student.model, "student.model"), [e.target for e in data.labeled])
    with hold_run(cfg.run_dir), Store.open_run(cfg.run_dir) as store:
        for change in bind_config(store, cfg, allow_change=allow_config_change):
            Console(stderr=True).print(f"config change applied from the next unfinished stage: {change}",
                                       markup=False, highlight=False, soft_wrap=True)
        # one numeric format for every training process of every stage and rerun of this run
        from ..llm.precision import pin_precision

        cfg = cfg.model_copy(deep=True)  # the caller's config stays as it was given
        cfg.student.train.precision = pin_precision(store, cfg.student.train.precision)
        if cfg.kd.teacher_train is not None:
            cfg.kd.teacher_train.precision = pin_precision(store, cfg.kd.teacher_train.precision,
                                                           "kd.teacher_train.precision")
        stages = Stages(store, lambda text: console.print(text, markup=False, highlight=False))
        recorded = stages.detail("data")
        if recorded is not None and recorded.get("fingerprint") != data.fingerprint:
            raise UserError(f"kd: the data differ from those this run started with ({cfg.run_dir}); "
                            "use a new run_dir")
        stages.run("data", lambda: {"labeled": len(data.labeled), "unlabeled": len(data.unlabeled),
                                    "eval": len(data.eval), "eval_source": data.eval_source,
                                    "fingerprint": data.fingerprint})
        if cfg.kd.teacher_finetune:
            stages.run("teacher_finetune", lambda: finetune_teacher(cfg, data, progress))
        stages.run("student_init", lambda: init_student(cfg))
        check_vocabularies(cfg)
        if cfg.kd.pt_method != "none":
            inputs = data.pt_inputs()
            detail = stages.run("pseudo_targets", lambda: generate_api_pts(cfg, store, inputs, data.labeled, progress)
                                if api_teacher(cfg) else generate_pts(cfg, store, inputs, progress))
            store.put_metrics(ITERATION, {"pseudo_targets": detail["inputs"] * detail["k"]})
        detail = stages.run("kd_train", lambda: kd_train(cfg, store, data, progress))
        store.put_metrics(ITERATION, {"kd_train_loss": detail.get("loss"), "kd_train_steps": detail.get("steps"),
                                      **detail.get("alignment_metrics", {}), **on_policy_metrics(detail)})
        alignment = detail.get("alignment")
        if cfg.kd.final_ce_epochs > 0:
            stages.run("final_ce", lambda: final_ce(cfg, data, progress))
        student_dir = final_student_path(cfg)
        summary = DistillSummary(cfg.run_dir, teacher_path(cfg), student_dir, None)
        if data.eval:
            student = stages.run("eval_student", lambda: eval_stage(cfg, "student", str(student_dir), data, progress))
            _store_metrics(store, student, "student")
            teacher = None
            if cfg.kd.eval_teacher and not api_teacher(cfg):
                teacher = stages.run("eval_teacher", lambda: eval_stage(cfg, "teacher", teacher_path(cfg), data,
                                                                        progress))
                _store_metrics(store, teacher, "teacher")
            summary.eval_path = write_eval(cfg, data, student, teacher, alignment)
            summary.student_metrics = student["metrics"]
            summary.teacher_metrics = teacher["metrics"] if teacher else None
        summary.ran, summary.skipped = stages.ran, stages.skipped
    return summary
