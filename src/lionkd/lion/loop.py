"""The Lion loop: one command runs every iteration, and every stage resumes after a crash.

    setup        seed instructions -> Train Pool 1 = Cache Pool 1
    iteration k  imitation       the teacher answers Train Pool k; the student (from iteration k-1)
                                 is fine-tuned on the answers -> students/iter-k
                 discrimination  teacher and student answer Cache Pool k; the referee splits it into
                                 hard (teacher - student >= tau) and easy
                 generation      new instructions from hard and easy seeds, filtered for novelty
                                 -> Train Pool k+1 := new; Cache Pool k+1 := Cache Pool k + new
    finally      one last imitation on the last generated set, so every generated instruction is
                 trained on (students/iter-{K+1} is the final student)

Resuming: every model call is in the store's call cache and every answer and judgement is stored as
it arrives; a stage record marks a finished stage. A rerun skips finished stages and, inside an
unfinished one, asks only for what is missing. Every random choice comes from an RNG seeded by
(seed, iteration, stage), so a resumed run ends with the same store as an uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..config import EndpointConfig, RunConfig
from ..errors import BudgetExceeded, UserError
from ..llm.factory import RoleModels
from ..llm.precision import pin_precision
from ..progress import progress_bars
from ..records import Instruction
from ..referee import PairVerdict, parse_scores, summarise
from ..run_guard import bind_config, hold_run
from ..store import Store
from .discrimination import Split, discriminate, split_hard_easy, student_max_tokens
from .generation import GenerationOutcome, generate
from .imitation import answer_train_pool, train
from .prompts import LionPrompts
from .students import student_dir, student_init

ROLES = ("teacher", "referee", "generator")
# Fewer seeds cannot split into hard and easy, and the generator would only ever rewrite one instruction.
MIN_SEEDS = 2


@dataclass
class RunSummary:
    run_dir: Path
    iterations: int
    final_student: Path
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    already_finished: bool = False


# --------------------------------------------------------------------------- the loop


def run_lion(cfg: RunConfig, *, progress: bool = True, allow_config_change: bool = False,
             change_hint: str | None = None) -> RunSummary:
    """Run (or resume) every iteration of the Lion loop described by `cfg`.

    One process at a time writes a run (a second one stops at once), and a rerun keeps the config the
    run started with unless `allow_config_change` (see `lionkd.run_guard`).
    """
    run_dir = Path(cfg.run_dir)
    console = Console(stderr=True, quiet=not progress)
    last = cfg.lion.iterations + 1
    with hold_run(run_dir), Store.open_run(run_dir) as store:
        # a mistake the config shows fails before any work, and before the run is bound to the config
        prompts = check_config(cfg)
        changes = bind_config(store, cfg, allow_change=allow_config_change,
                              **({"change_hint": change_hint} if change_hint else {}))
        for change in changes:
            Console(stderr=True).print(f"config change applied from the next unfinished stage: {change}",
                                       markup=False, highlight=False, soft_wrap=True)
        # one numeric format for every training process of every stage and rerun of this run
        cfg = cfg.model_copy(deep=True)  # the caller's config stays as it was given
        cfg.student.train.precision = pin_precision(store, cfg.student.train.precision)
        if store.stage_done(last, "imitation"):
            return RunSummary(run_dir, cfg.lion.iterations, student_dir(cfg, last), store.metrics(),
                              already_finished=True)
        if store.stages():  # say where a rerun picks up, before its first call
            Console(stderr=True).print(resume_line(cfg, store), markup=False, highlight=False, soft_wrap=True)
        setup(cfg, store)
        llms = open_roles(cfg, store)
        try:
            for k in range(1, last + 1):
                imitation_stage(cfg, store, llms, prompts, k, progress)
                if k == last:
                    break
                if cfg.lion.selection == "uniform":  # self-instruct: no referee, every Cache Pool item is a seed
                    cache = store.pool(k, "cache")
                    split, judgements = Split(hard=list(cache), easy=list(cache), excluded=[]), {}
                else:
                    split, judgements = discrimination_stage(cfg, store, llms, prompts, k, progress)
                generation_stage(cfg, store, llms, prompts, k, split, judgements, progress)
                console.print(iteration_line(k, store.metrics().get(k, {})))
        except BudgetExceeded as exc:
            raise BudgetExceeded(f"{exc}; {rest_of_run(cfg, store)}", role=exc.role, calls_left=exc.calls_left,
                                 cost_left=exc.cost_left) from None
        store.put_metrics(last, usage_metrics(cfg, store, last))
        return RunSummary(run_dir, cfg.lion.iterations, student_dir(cfg, last), store.metrics())


def check_config(cfg: RunConfig) -> LionPrompts:
    """Mistakes found before the first paid call, each one line naming its key (also `lionkd config
    check`): the prompts' placeholders, an on-policy imitation without a served teacher, the student model,
    a precision this machine has not."""
    from ..llm.models import check_model_name
    from ..llm.precision import training_precision

    prompts = LionPrompts.from_config(cfg.lion.prompts, cfg.lion.referee_order)
    if cfg.lion.imitation == "on_policy" and cfg.teacher.backend != "openai":
        raise UserError("lion.imitation: 'on_policy' needs a served teacher (teacher.backend: openai, with base_url) "
                        "that scores the student's answers")
    if cfg.lion.imitation == "on_policy":
        from ..kd.on_policy_vllm import check_sampler

        check_sampler(cfg.kd.on_policy, cfg.student.lora)
    check_model_name(cfg.student.model, "student.model")
    if cfg.student.train.precision != "auto":  # auto is always available (and measured only when training)
        training_precision(cfg.student.train.precision)
    return prompts


def resume_line(cfg: RunConfig, store: Store) -> str:
    """Where a started run goes on: its first unfinished stage and what that stage has stored already."""
    last = cfg.lion.iterations + 1
    for k in range(1, last + 1):
        if not store.stage_done(k, "imitation"):
            train = store.pool(k, "train")
            answered = len(set(train) & set(store.responses("teacher", k)))
            return (f"resuming iteration {k}, imitation: {answered:,} of {len(train):,} teacher answers stored"
                    + (", the student is trained next" if train and answered == len(train) else ""))
        if k == last:
            break
        if cfg.lion.selection != "uniform" and not store.stage_done(k, "discrimination"):
            cache = store.pool(k, "cache")
            answers = sum(len(set(cache) & set(store.responses(role, k))) for role in ("teacher", "student"))
            judged = len(set(cache) & set(store.judgements(k)))
            return (f"resuming iteration {k}, discrimination: {answers:,} of {2 * len(cache):,} answers stored, "
                    f"{judged:,} of {len(cache):,} judged")
        if not store.stage_done(k, "generation"):
            calls = sum(r["calls"] for r in store.usage() if r["iteration"] == k and r["role"] == "generator")
            return f"resuming iteration {k}, generation: {calls:,} generator calls stored (asked again for free)"
    return "resuming: every stage is done; writing the final records"


def setup(cfg: RunConfig, store: Store) -> None:
    """Iteration 0: the seed instructions become Train Pool 1 and Cache Pool 1."""
    if store.stage_done(0, "setup"):
        return
    seeds = load_seed_pool(cfg)
    unique: dict[str, Instruction] = {}
    for ins in seeds:
        unique.setdefault(ins.id, ins)  # a repeated instruction: the first one wins
    store.add_instructions(unique.values())
    ids = list(unique)
    store.set_pool(1, "train", ids)
    store.set_pool(1, "cache", ids)
    store.finish_stage(0, "setup", {"seeds": len(ids), "duplicates_dropped": len(seeds) - len(ids)})


def load_seed_pool(cfg: RunConfig) -> list[Instruction]:
    if cfg.lion.seed_pool is not None:
        from ..data import read_instructions

        seeds = read_instructions(cfg.lion.seed_pool)
    elif cfg.teacher.backend == "sandbox":
        from ..sandbox import seed_pool

        seeds = [Instruction(text=r["instruction"], domain=r.get("domain"), task=r.get("task"),
                             meta={"level": r["level"]} if "level" in r else {})
                 for r in seed_pool(cfg.lion.seed_pool_size, seed=cfg.seed)]
    else:
        raise UserError("lion.seed_pool: a seed instruction file is required unless the teacher is the sandbox world")
    if not seeds:
        raise UserError(f"lion.seed_pool: no instructions in {cfg.lion.seed_pool}")
    distinct = len({ins.id for ins in seeds})
    if distinct < MIN_SEEDS:
        where = cfg.lion.seed_pool or "lion.seed_pool_size"
        raise UserError(f"lion.seed_pool: {distinct} distinct instruction(s) in {where}; Lion needs at least "
                        f"{MIN_SEEDS}, so that the referee can find some hard and some easy")
    return seeds


def open_roles(cfg: RunConfig, store: Store) -> RoleModels:
    return RoleModels({role: getattr(cfg, role) for role in ROLES}, store)


def imitation_stage(cfg: RunConfig, store: Store, llms: RoleModels, prompts: LionPrompts, k: int,
                    progress: bool) -> None:
    if store.stage_done(k, "imitation") and student_dir(cfg, k).is_dir():
        return
    with progress_bars(progress) as p:
        instructions, answers = answer_train_pool(cfg, store, llms["teacher"], prompts, k, p)
    if any(r.text for r in answers.values()):
        llms.release_local()  # the GPU is the training stage's now: local role models load again when used
        info = train(cfg, store, instructions, answers, k, show_progress=progress,
                     teacher_system=prompts.teacher_system)
    else:  # nothing new survived the filters: the student stays as it was
        shutil.copytree(student_init(cfg, k), student_dir(cfg, k), dirs_exist_ok=True)
        info = {"examples": 0, "replayed": 0, "skipped": True}
    store.put_metrics(k, {"train_examples": info["examples"], "train_replayed": info["replayed"],
                          "train_loss": info.get("train_loss")})
    store.finish_stage(k, "imitation", info)


def discrimination_stage(cfg: RunConfig, store: Store, llms: RoleModels, prompts: LionPrompts, k: int,
                         progress: bool) -> tuple[Split, dict[str, Any]]:
    if store.stage_done(k, "discrimination"):
        judgements = store.judgements(k)
        return split_hard_easy(store.pool(k, "cache"), judgements, cfg.lion.tau), judgements
    with progress_bars(progress) as p:
        split, judgements = discriminate(cfg, store, llms["teacher"], llms["referee"], prompts, k, p)
    store.put_metrics(k, discrimination_metrics(split, judgements) | truncation_metrics(store, k, split))
    store.finish_stage(k, "discrimination", {"hard": len(split.hard), "easy": len(split.easy),
                                             "excluded": len(split.excluded)})
    return split, judgements


def generation_stage(cfg: RunConfig, store: Store, llms: RoleModels, prompts: LionPrompts, k: int,
                     split: Split, judgements: dict[str, Any], progress: bool) -> None:
    if store.stage_done(k, "generation"):
        return
    with progress_bars(progress) as p:
        outcome = generate(cfg, store, llms["generator"], prompts, k, hard=split.hard, easy=split.easy,
                           judgements=judgements, progress=p)
    new_ids = [ins.id for ins in outcome.new]
    store.add_instructions(outcome.new)
    store.set_pool(k + 1, "train", new_ids)
    store.set_pool(k + 1, "cache", store.pool(k, "cache") + new_ids)
    store.put_metrics(k, generation_metrics(outcome) | usage_metrics(cfg, store, k))
    store.finish_stage(k, "generation", {"new": len(new_ids), "rounds": outcome.rounds})


# --------------------------------------------------------------------------- learning dynamics


def discrimination_metrics(split: Split, judgements: dict[str, Any]) -> dict[str, Any]:
    s = summarise([PairVerdict.from_judgement(j) for j in judgements.values()])
    judged = len(split.hard) + len(split.easy)
    gap = s.mean_a - s.mean_b if s.mean_a is not None and s.mean_b is not None else None
    return {
        "hard": len(split.hard), "easy": len(split.easy), "excluded": len(split.excluded),
        "hard_ratio": len(split.hard) / judged if judged else None,
        "teacher_score": s.mean_a, "student_score": s.mean_b, "score_gap": gap,
        "order_agreement": s.order_agreement, "first_position_advantage": s.first_position_advantage,
        "parse_failures": s.parse_failures, "parse_rate": parse_rate(judgements.values()),
    }


def parse_rate(judgements: Any) -> float | None:
    """Share of the referee's replies that were read (each unreadable one is a parse failure; the last
    reply of each order is stored, and read unless the item was excluded for it)."""
    read = 0
    failures = 0
    for j in judgements:
        failures += j.parse_failures
        read += 2 if j.ok else sum(parse_scores(r) is not None for r in (j.raw_teacher_first, j.raw_student_first) if r)
    return read / (read + failures) if read + failures else None


def truncation_metrics(store: Store, k: int, split: Split) -> dict[str, Any]:
    """Cache Pool answers cut off at the length limit (finish reason "length"). A cut student answer
    is judged as it is, so it can make an instruction "hard" for want of tokens rather than skill."""
    out: dict[str, Any] = {}
    cache = set(store.pool(k, "cache"))
    for role in ("student", "teacher"):
        answers = {i: r for i, r in store.responses(role, k).items() if i in cache}
        cut = {i for i, r in answers.items() if r.finish_reason == "length"}
        out[f"{role}_truncated"] = len(cut)
        out[f"{role}_truncated_ratio"] = len(cut) / len(answers) if answers else None
        if role == "student":
            out["hard_with_truncated_student"] = len(cut.intersection(split.hard))
    return out


def generation_metrics(outcome: GenerationOutcome) -> dict[str, Any]:
    return {
        "new_instructions": len(outcome.new), "generator_calls": outcome.asked, "generation_rounds": outcome.rounds,
        "seeds_hard": outcome.seeds["hard"], "seeds_easy": outcome.seeds["easy"],
        # the hard:easy split of what was kept, against what each side should have kept
        "new_hard": outcome.kept["hard"], "new_easy": outcome.kept["easy"],
        "target_hard": outcome.target["hard"], "target_easy": outcome.target["easy"],
        "hard_fraction": outcome.hard_fraction, "groups": outcome.groups,
        "novelty_rejections": outcome.novelty_rejections, "surplus": outcome.surplus,
        "filter_rejections": dict(sorted(outcome.filter_rejections.items())),
    }


def usage_metrics(cfg: RunConfig, store: Store, k: int) -> dict[str, Any]:
    """Calls, tokens and cost per role actually spent in iteration `k` (cached reuses are free)."""
    out: dict[str, Any] = {}
    for row in store.usage():
        if row["iteration"] != k or not row["role"]:
            continue
        price = getattr(cfg, row["role"]).price if row["role"] in ROLES else None
        entry = out.setdefault(f"usage_{row['role']}", {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                         "failures": 0, "cost": 0.0})
        for key in ("calls", "prompt_tokens", "completion_tokens", "failures"):
            entry[key] += row[key] or 0
        if price is not None:
            entry["cost"] += price.cost(row["prompt_tokens"] or 0, row["completion_tokens"] or 0)
    return out


def iteration_line(k: int, m: dict[str, Any]) -> str:
    def f(key: str, fmt: str = "{:.3g}") -> str:
        v = m.get(key)
        return "-" if v is None else str(v) if isinstance(v, int) else fmt.format(v)

    return (f"iteration {k}: hard {f('hard')} / easy {f('easy')} (ratio {f('hard_ratio', '{:.2f}')}), "
            f"excluded {f('excluded')}, teacher {f('teacher_score')} vs student {f('student_score')}, "
            f"order agreement {f('order_agreement', '{:.2f}')}, new {f('new_instructions')} "
            f"({f('new_hard')} hard + {f('new_easy')} easy; novelty rejections {f('novelty_rejections')})")


# --------------------------------------------------------------------------- progress display


# --------------------------------------------------------------------------- dry run


@dataclass
class PlanRow:
    iteration: int
    role: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None


def _tokens(chars: float) -> int:
    return math.ceil(chars / 4)  # ~4 characters per token


def _cost(endpoint: EndpointConfig, prompt_tokens: int, completion_tokens: int) -> float | None:
    return endpoint.price.cost(prompt_tokens, completion_tokens) if endpoint.price is not None else None


def plan_run(cfg: RunConfig) -> list[PlanRow]:
    """Upper bounds of calls, tokens and cost per role and iteration, before anything is spent.

    Cached calls are free, so the teacher pays only for each new Train Pool (Cache Pool answers were
    given when those instructions were trained on); the referee bound counts every retry.
    """
    prompts = LionPrompts.from_config(cfg.lion.prompts, cfg.lion.referee_order)
    seeds = load_seed_pool(cfg)
    s, n, K = len(seeds), cfg.lion.new_per_iteration, cfg.lion.iterations
    instruction = sum(len(ins.prompt) for ins in seeds) / len(seeds)
    per_call = {
        "teacher": (_tokens(len(prompts.teacher_system) + instruction) + 4, cfg.teacher.max_tokens),
        "student": (_tokens(instruction) + 8, student_max_tokens(cfg)),
        "referee": (_tokens(len(prompts.referee) + instruction) + cfg.teacher.max_tokens + student_max_tokens(cfg),
                    cfg.referee.max_tokens),
        "generator": (_tokens(max(len(prompts.generator_hard), len(prompts.generator_easy)) + instruction),
                      cfg.generator.max_tokens),
    }
    rows = []
    for k in range(1, K + 2):
        cache = s + (k - 1) * n
        calls = {"teacher": s if k == 1 else n}
        if k <= K and cfg.lion.selection == "referee":
            calls |= {"student": cache, "referee": 2 * cache * (1 + cfg.lion.referee_retries)}
        if k <= K:
            calls |= {"generator": n * cfg.lion.generation_rounds}
        for role, count in calls.items():
            prompt, completion = per_call[role][0] * count, per_call[role][1] * count
            endpoint = getattr(cfg, role) if role in ROLES else None
            rows.append(PlanRow(k, role, count, prompt, completion,
                                _cost(endpoint, prompt, completion) if endpoint else None))
    return rows


STAGE_OF_ROLE = {"teacher": "imitation", "student": "discrimination", "referee": "discrimination",
                 "generator": "generation"}


def rest_of_run(cfg: RunConfig, store: Store) -> str:
    """What the stages not yet finished may still spend, by the --dry-run bound (budgeted roles only)."""
    rows = [r for r in plan_run(cfg) if r.role in ROLES and not store.stage_done(r.iteration, STAGE_OF_ROLE[r.role])]
    costs = [r.cost for r in rows if r.cost is not None]
    cost = f", ${sum(costs):.4f}" if costs else ""
    return f"the unfinished stages may need up to {sum(r.calls for r in rows):,} calls{cost} (the --dry-run bound)"


def budget_lines(cfg: RunConfig, rows: list[PlanRow]) -> list[str]:
    """The dry run's estimate against each limit of the budget: within it, or where the run would stop."""
    out = []
    limits = [("budget", cfg.budget, [r for r in rows if r.role in ROLES])]
    limits += [(f"{role}.budget", getattr(cfg, role).budget, [r for r in rows if r.role == role]) for role in ROLES]
    for name, limit, mine in limits:
        calls = sum(r.calls for r in mine)
        costs = [r.cost for r in mine if r.cost is not None]
        checks = []
        if limit.max_calls is not None:
            checks.append((f"max_calls {limit.max_calls:,}", f"{calls:,} calls", calls > limit.max_calls))
        if limit.max_cost is not None:
            cost = sum(costs) if costs else None
            checks.append((f"max_cost ${limit.max_cost:g}", f"${cost:.2f}" if cost is not None else "an unknown cost "
                           "(no price)", cost is None or cost > limit.max_cost))
        for what, need, over in checks:
            verdict = ("the run may stop there (exit code 3; a rerun with a larger budget goes on)" if over
                       else "within it")
            out.append(f"{name} {what}: the estimate is up to {need}; {verdict}")
    return out


def plan_table(rows: list[PlanRow]) -> Table:
    table = Table(title="Dry run: the most this run can spend (cached calls are free)")
    for col in ("iteration", "role", "max calls", "max tokens in", "max tokens out", "max cost $"):
        table.add_column(col, justify="left" if col == "role" else "right")
    for r in rows:
        table.add_row(str(r.iteration), r.role, f"{r.calls:,}", f"{r.prompt_tokens:,}", f"{r.completion_tokens:,}",
                      f"{r.cost:.2f}" if r.cost is not None else "-")
    for role in dict.fromkeys(r.role for r in rows):
        mine = [r for r in rows if r.role == role]
        costs = [r.cost for r in mine if r.cost is not None]
        table.add_row("total", role, f"{sum(r.calls for r in mine):,}", f"{sum(r.prompt_tokens for r in mine):,}",
                      f"{sum(r.completion_tokens for r in mine):,}", f"{sum(costs):.2f}" if costs else "-")
    costs = [r.cost for r in rows if r.cost is not None]
    total = f"${sum(costs):.2f}" if costs else "- (no prices configured)"
    table.caption = (f"total max cost: {total}; prompt tokens estimated at ~4 characters per token; "
                     f"iteration {rows[-1].iteration} is the final imitation")
    return table
