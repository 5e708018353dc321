"""`lionkd eval`: evaluate one model on one data set, and write the results beside a run store.

The model is a local checkpoint (HFBackend) or any OpenAI-compatible endpoint. It answers every
input through the call cache of the output folder's run store, so an interrupted evaluation resumes
and a repeated one costs nothing. On the answers:

- task metrics against the target column (BLEU, ROUGE, exact match; BERTScore when asked), overall
  and per category, and the targets' perplexity under a local model;
- the judge evaluation of the Lion paper against reference answers (the target column, or the
  teacher's answers generated now);
- size and speed of a local model, and its ratio to a local teacher's;
- lm-evaluation-harness tasks on a local model.

Output folder: eval.json, eval.md, predictions.jsonl, judgements.jsonl, run.sqlite.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import EndpointConfig, RunConfig, load_config
from ..data import load_table, write_jsonl
from ..errors import UserError
from ..kd.examples import TrainExample
from ..llm.base import Backend, GenRequest
from ..llm.cache import CachedLLM
from ..llm.factory import open_llm, request_defaults
from ..llm.models import resolve_model_path
from ..llm.registry import backend_class, make_backend
from ..llm.templates import Template
from ..report.eval_tables import eval_markdown
from ..store import Store
from . import metrics
from .judge import JudgeItem, judge_answers, verdict_record
from .speed import measure_speed, speed_ratios

Progress = Callable[[str, int, int], None]  # (stage, done, total)
RESULTS_JSON = "eval.json"
RESULTS_MD = "eval.md"


@dataclass
class EvalConfig:
    """Everything `lionkd eval` was asked to do."""

    data: str
    out_dir: Path
    model: str  # a local model folder, "sandbox:<name>", or the model name at `base_url`
    base_url: str | None = None
    api_key_env: str | None = None
    split: str = "test"
    input_column: str = "input"
    target_column: str | None = None  # None: "target" when the data has it
    category_column: str | None = None
    limit: int | None = None
    # how the model answers
    template: Template = "chat"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int = 0
    batch_size: int = 16
    dtype: str = "auto"
    device: str = "auto"
    # task metrics: "bleu", "rouge", "exact_match", "perplexity", "bertscore"
    metrics: Sequence[str] = ("bleu", "rouge", "exact_match", "perplexity")
    bertscore_model: str | None = None
    # judge evaluation
    judge: bool = False
    config: Path | None = None  # a run config: its referee (and teacher) endpoints and prompts
    referee_model: str | None = None
    referee_base_url: str | None = None
    referee_api_key_env: str | None = None
    reference: Literal["target", "teacher"] = "target"
    # speed and size
    speed: bool = False
    teacher: str | None = None  # a local teacher folder: speed ratios, and reference answers
    speed_new_tokens: int = 64
    speed_runs: int = 5
    memory_budget_gb: float | None = None
    max_batch: int = 256
    # lm-evaluation-harness
    harness_tasks: Sequence[str] = field(default_factory=tuple)
    harness_limit: int | None = None
    harness_fewshot: int | None = None
    harness_include: Path | None = None  # a folder of the user's own task YAMLs

    @property
    def remote(self) -> bool:
        return self.base_url is not None


@dataclass
class Example:
    input: str
    target: str | None
    category: str | None


# --------------------------------------------------------------------------- data


def read_examples(s: EvalConfig) -> list[Example]:
    rows = load_table(s.data, s.split)
    if not rows:
        raise UserError(f"{s.data}: no rows")
    columns = list(rows[0])
    target = s.target_column or ("target" if "target" in rows[0] else None)
    for flag, name in (("--input-column", s.input_column), ("--target-column", target),
                       ("--category-column", s.category_column)):
        if name is not None and name not in rows[0]:
            raise UserError(f"{s.data}: {flag}: no column '{name}' (columns: {', '.join(columns)})")
    chosen = rows[: s.limit] if s.limit else rows
    out = []
    for number, row in enumerate(chosen, start=1):
        text = row.get(s.input_column)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{s.data}: row {number}: column '{s.input_column}' is empty or not text")
        out.append(Example(
            input=text,
            target=None if target is None or row.get(target) is None else str(row[target]),
            category=None if s.category_column is None or row.get(s.category_column) is None
            else str(row[s.category_column]),
        ))
    return out


# --------------------------------------------------------------------------- models


def _local_path(model: str) -> Path | None:
    """A local folder, or a name or GGUF file lionkd turns into one; None otherwise."""
    path = Path(model)
    if path.is_dir():
        return path
    resolved = Path(resolve_model_path(model))  # sandbox:, named models, .gguf files
    return resolved if resolved.is_dir() else None


def open_model(s: EvalConfig) -> Backend:
    """The model under evaluation: an endpoint when a base URL is given, else a local folder."""
    if s.remote:
        endpoint = EndpointConfig(backend="openai", model=s.model, base_url=s.base_url, api_key_env=s.api_key_env)
        return make_backend(endpoint)
    path = _local_path(s.model)
    if path is None:
        raise UserError(f"--model: {s.model}: no such model folder (for an endpoint, give --base-url too)")
    return backend_class("hf")(str(path), template=s.template, dtype=s.dtype, device=s.device,
                               batch_size=s.batch_size)


def _run_config(s: EvalConfig) -> RunConfig | None:
    return load_config(s.config, check_paths=False) if s.config is not None else None


def referee_endpoint(s: EvalConfig, cfg: RunConfig | None) -> EndpointConfig:
    if s.referee_model is not None:
        base = (cfg or RunConfig()).referee.model_dump()  # the referee's settings, its defaults without a config
        base.update(backend="openai", model=s.referee_model, base_url=s.referee_base_url,
                    api_key_env=s.referee_api_key_env)
        return EndpointConfig.model_validate(base)
    if cfg is not None:
        return cfg.referee
    raise UserError("--judge needs a referee: --referee-model (with --referee-base-url) or --config RUN_CONFIG")


async def _answers(llm: CachedLLM, requests: list[GenRequest], stage: str, progress: Progress | None
                   ) -> tuple[list[str], int]:
    """Texts in request order ('' where a call failed) and the number of failures."""
    texts = [""] * len(requests)
    failed, done = 0, 0
    async for i, result in llm.stream(requests):
        done += 1
        if result.ok:
            texts[i] = result.text
        else:
            failed += 1
        if progress is not None:
            progress(stage, done, len(requests))
    return texts, failed


# --------------------------------------------------------------------------- the pipeline


def run_eval(s: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run every evaluation asked for; write the output folder; return the results."""
    unknown = sorted(set(s.metrics) - set(metrics.ALL_METRICS))
    if unknown:
        raise UserError(f"--metrics: unknown metric '{unknown[0]}' (choose from {', '.join(metrics.ALL_METRICS)})")
    if s.remote and (s.speed or s.harness_tasks):
        raise UserError("--speed and --harness-tasks need a local model folder, not an endpoint")
    examples = read_examples(s)
    cfg = _run_config(s)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    backend = open_model(s)
    results: dict[str, Any] = {
        "model": s.model if s.remote else str(_local_path(s.model)),
        "endpoint": s.base_url,
        "data": s.data,
        "split": s.split,
        "examples": len(examples),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"template": s.template, "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                     "top_p": s.top_p, "num_beams": s.num_beams, "seed": s.seed},
    }
    with Store.open_run(s.out_dir) as store:
        llm = CachedLLM(backend, store, role="candidate")
        requests = [GenRequest.chat([{"role": "user", "content": ex.input}], temperature=s.temperature,
                                    top_p=s.top_p, max_tokens=s.max_new_tokens, num_beams=s.num_beams, seed=s.seed)
                    for ex in examples]
        predictions, failed = asyncio.run(_answers(llm, requests, "answers", progress))
        results["failed_generations"] = failed
        references: list[str | None] = [ex.target for ex in examples]
        if s.judge:
            if s.reference == "teacher":
                references = _teacher_answers(s, cfg, store, examples, progress)
            results["judge"] = _judge(s, cfg, store, examples, predictions, references, progress)
        write_jsonl(s.out_dir / "predictions.jsonl", (
            {"input": ex.input, "category": ex.category, "target": ex.target, "prediction": p}
            | ({"reference": r} if s.judge and s.reference == "teacher" else {})
            for ex, p, r in zip(examples, predictions, references, strict=True)
        ))
    task = _task_metrics(s, backend, examples, predictions, progress)
    if task:
        results["task_metrics"] = task
    if s.speed:
        results["speed"] = _speed(s, backend, examples, progress)
    if s.harness_tasks:
        from .harness import run_harness

        if progress is not None:
            progress("harness", 0, 1)
        results["harness"] = run_harness(backend.net, backend.tokenizer, s.harness_tasks,  # type: ignore[attr-defined]
                                         batch_size=s.batch_size, limit=s.harness_limit,
                                         num_fewshot=s.harness_fewshot, seed=s.seed,
                                         include_path=s.harness_include)
    (s.out_dir / RESULTS_JSON).write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    (s.out_dir / RESULTS_MD).write_text(eval_markdown(results, f"Evaluation of {results['model']}"),
                                        encoding="utf-8")
    return results


def _task_metrics(s: EvalConfig, backend: Backend, examples: list[Example], predictions: list[str],
                  progress: Progress | None) -> dict[str, Any] | None:
    scored = [i for i, ex in enumerate(examples) if ex.target is not None]
    if not scored or not s.metrics:
        return None
    text_names = [m for m in s.metrics if m != "perplexity"]
    options = {"model_type": s.bertscore_model} if s.bertscore_model else {}

    def score(indices: list[int]) -> dict[str, Any]:
        preds = [predictions[i] for i in indices]
        refs = [examples[i].target or "" for i in indices]
        return {"examples": len(indices), **metrics.text_metrics(preds, refs, text_names, **options)}

    out: dict[str, Any] = {"overall": score(scored)}
    if "perplexity" in s.metrics and not s.remote:
        if progress is not None:
            progress("perplexity", 0, 1)
        chosen = [TrainExample(target=examples[i].target or "", messages=[{"role": "user", "content": examples[i].input}])
                  for i in scored]
        out["overall"]["perplexity"] = metrics.target_perplexity(
            backend.net, backend.tokenizer, chosen, template=s.template, batch_size=s.batch_size,  # type: ignore[attr-defined]
        )
    by_category: dict[str, list[int]] = defaultdict(list)
    for i in scored:
        if examples[i].category is not None:
            by_category[examples[i].category].append(i)
    if by_category:
        out["per_category"] = {c: score(idx) for c, idx in sorted(by_category.items())}
    return out


def _teacher_answers(s: EvalConfig, cfg: RunConfig | None, store: Store, examples: list[Example],
                     progress: Progress | None) -> list[str | None]:
    from ..lion.prompts import LionPrompts

    prompts = LionPrompts.from_config(cfg.lion.prompts, cfg.lion.referee_order) if cfg is not None else LionPrompts()
    if s.teacher is not None:
        path = _local_path(s.teacher)
        if path is None:
            raise UserError(f"--teacher: {s.teacher}: no such model folder")
        backend = backend_class("hf")(str(path), template=s.template, dtype=s.dtype, device=s.device,
                                      batch_size=s.batch_size)
        params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_new_tokens, "seed": s.seed}
        llm = CachedLLM(backend, store, role="teacher")
    elif cfg is not None:
        llm, params = open_llm(cfg.teacher, store, "teacher"), request_defaults(cfg.teacher)
    else:
        raise UserError("--reference teacher needs a teacher: --teacher PATH or --config RUN_CONFIG")
    requests = [GenRequest.chat(prompts.teacher_messages(ex.input), **params) for ex in examples]
    texts, failed = asyncio.run(_answers(llm, requests, "teacher answers", progress))
    if failed:
        raise UserError(f"teacher: {failed} of {len(requests)} answers failed; run the same command again to retry")
    return list(texts)


def _judge(s: EvalConfig, cfg: RunConfig | None, store: Store, examples: list[Example], predictions: list[str],
           references: list[str | None], progress: Progress | None) -> dict[str, Any]:
    from ..lion.prompts import LionPrompts
    from ..referee import RefereeCallError

    chosen = [i for i, r in enumerate(references) if r is not None]
    if not chosen:
        raise UserError("--judge: no reference answers (the data has no target column; try --reference teacher)")
    endpoint = referee_endpoint(s, cfg)
    referee = open_llm(endpoint, store, "referee")
    prompts = LionPrompts.from_config(cfg.lion.prompts, cfg.lion.referee_order) if cfg is not None else LionPrompts()
    prompt = prompts.referee
    retries = (cfg or RunConfig()).lion.referee_retries
    items = [JudgeItem(examples[i].input, predictions[i], references[i] or "", examples[i].category) for i in chosen]
    done = [0]

    def seen(_: int, __: Any) -> None:
        done[0] += 1
        if progress is not None:
            progress("judge", done[0], len(items))

    try:
        scores, verdicts = asyncio.run(judge_answers(referee, items, prompt=prompt, params=request_defaults(endpoint),
                                                     retries=retries, on_verdict=seen))
    except RefereeCallError as exc:
        raise UserError(f"referee: {exc}; finished calls are cached, run the same command again to retry") from None
    write_jsonl(s.out_dir / "judgements.jsonl", (verdict_record(it, v) for it, v in zip(items, verdicts, strict=True)))
    return {"referee": endpoint.model, "reference": s.reference, **scores.to_dict()}


def _speed(s: EvalConfig, backend: Backend, examples: list[Example], progress: Progress | None) -> dict[str, Any]:
    from ..llm.hf import load_model

    options = {"prompt": examples[0].input, "new_tokens": s.speed_new_tokens, "runs": s.speed_runs,
               "budget_gb": s.memory_budget_gb, "max_batch": s.max_batch, "template": s.template}
    if progress is not None:
        progress("speed", 0, 2 if s.teacher else 1)
    student = measure_speed(backend.net, backend.tokenizer, **options)  # type: ignore[attr-defined]
    out: dict[str, Any] = {"student": student.to_dict()}
    if s.teacher is not None:
        path = _local_path(s.teacher)
        if path is None:
            raise UserError(f"--teacher: {s.teacher}: no such model folder")
        if progress is not None:
            progress("speed", 1, 2)
        model, tokenizer = load_model(str(path), s.dtype, s.device)
        teacher = measure_speed(model.eval(), tokenizer, **options)
        del model
        out["teacher"] = teacher.to_dict()
        out["ratios"] = speed_ratios(student, teacher)
    return out
