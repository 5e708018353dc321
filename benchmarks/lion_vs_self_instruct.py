"""The decisive Lion benchmark: the paper's Lion and our own against self-instruct, at equal teacher budget.

The comparison a user faces: given a teacher budget of (seed pool + N new instructions per iteration)
answers, which way of choosing what the generator writes gives the best student? Five arms on the
offline sandbox world, each run with several seeds, on a real pretrained student (SmolLM2-135M-Instruct):

- `base`           SmolLM2-135M-Instruct as it ships;
- `imitation`      fine-tuned on the teacher's answers to the seed pool alone (iteration 1 of every
                   other arm: the same training on the same pool, their common starting point);
- `self-instruct`  the Lion loop with `lion.selection: uniform`: no referee, generation seeds drawn
                   uniformly from the whole Cache Pool for both generator prompts (what Alpaca did),
                   the same generator, novelty filter, N and training;
- `lion`           the paper's Lion: seeds drawn uniformly from what the referee called hard
                   (teacher - student >= tau 1.0) and from the rest, hard:easy 1:1, ROUGE-L <= 0.7;
- `ours`           our Lion: `lion.seed_weighting: progress` (hard seeds in proportion to how much
                   their group's gap shrank), `lion.hard_easy_ratio: adaptive` (a bandit over group x
                   prompt), `lion.novelty_scope: group`, with `lion.grouping: text` (groups found from
                   the instruction text alone, as on real data; the world's task labels are not used).

Every loop arm gets the same teacher budget: its seed pool plus N new instructions per iteration
(fewer if its filters kept fewer); the referee's and the student's calls, which only the Lion arms
make, are counted beside it. The seed pool is long-tailed like real instruction sets (task types
Zipf over the world's own commonness), and the test set is balanced over types and levels; accuracy is
reported balanced and weighted by the seed pool's type distribution (what a user's traffic looks
like). Differences are paired by seed (the same seed pool, test set and iteration-1 student), with
a 95% t-interval.

    python benchmarks/lion_vs_self_instruct.py                  (the decisive run: 5 seeds, 3 iterations)
    python benchmarks/lion_vs_self_instruct.py --seeds 7        (two more seeds; finished ones are reused)
    python benchmarks/lion_vs_self_instruct.py --student tiny --seeds 1 --iterations 1 --seed-pool 40 \\
        --new 10 --test-per-task 4 --work /tmp/lvsi --out /tmp/lvsi   (a check of the plumbing, a minute or two)

Runs live in <work>/<settings hash>/seed-<s>/<arm>/ (default work: runs/bench/lion_vs_self_instruct).
An interrupted benchmark resumes: a finished arm is never trained again, and a scored student is
not scored again. Results go to <out>/lion_vs_self_instruct.json and .md (default out:
benchmarks/results). Results from the earlier template world are in
benchmarks/results/lion_vs_self_instruct*_template_world.*.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shlex
import shutil
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import RESULTS, fmt, interval, md_table, write_results
from lionkd.config import (
    AnsweringConfig,
    EndpointConfig,
    LionConfig,
    RunConfig,
    SandboxOptions,
    StudentConfig,
    TrainConfig,
)
from lionkd.data import write_jsonl
from lionkd.lion import loop
from lionkd.lion.demo import SMOLLM2, TINY, StudentPreset
from lionkd.lion.students import student_dir
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import DOMAINS, parse, seed_pool, test_set
from lionkd.sandbox.world import TASKS, balanced_accuracy, pool_shares, weighted_accuracy, zipf_shares
from lionkd.store import STORE_NAME, Store

WORK = Path("runs/bench/lion_vs_self_instruct")
NAME = "lion_vs_self_instruct"
STUDENTS = {"smollm2": SMOLLM2, "tiny": TINY}
LOOP_ARMS = ("lion", "ours", "self-instruct")  # run in this order: the first makes the shared prefixes
GEN_ARMS = ("self-instruct", "lion", "ours")
ARMS = ("base", "imitation", "self-instruct", "lion", "ours")
PAIRS = (("ours", "self-instruct"), ("ours", "lion"), ("lion", "self-instruct"), ("self-instruct", "imitation"),
         ("lion", "imitation"), ("ours", "imitation"))
OURS = {"seed_weighting": "progress", "hard_easy_ratio": "adaptive", "novelty_scope": "group", "grouping": "text"}
CALL_ROLES = ("teacher", "referee", "generator", "student")
TEST_SEED = 1000  # one test set for every arm and seed: the comparison is paired
# Training examples' token limit: the world's longest seeds (a context sentence, a format clause, a
# level-5 list) reach ~95 SmolLM2 tokens with the system prompt and the answer; nothing is cut at 128.
MAX_LENGTH = 128
TAU = 1.0


@dataclass(frozen=True)
class Settings:
    seeds: int = 5
    iterations: int = 3  # the paper's
    seed_pool: int = SMOLLM2.seeds
    new_per_iteration: int = SMOLLM2.new_per_iteration
    epochs: float = SMOLLM2.train_epochs
    learning_rate: float = SMOLLM2.learning_rate
    zipf: float = 1.0  # seed share of the task type of rank r is proportional to 1 / r**zipf
    test_per_task: int = 50
    student: str = "smollm2"

    def key(self) -> str:
        """The runs' folder: every setting but the number of seeds and the test size (they do not
        change the runs), so --seeds 7 reuses the finished seeds of --seeds 5."""
        values = asdict(self)
        del values["seeds"], values["test_per_task"]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def preset(self) -> StudentPreset:
        return STUDENTS[self.student]


# Each option's valid range: (lowest, highest); a value outside is one line naming it, exit code 2.
LIMITS: dict[str, tuple[float, float]] = {
    "seeds": (1, 50), "iterations": (1, 10), "seed_pool": (2, 100_000), "new_per_iteration": (2, 100_000),
    "epochs": (0.01, 50), "learning_rate": (1e-8, 1.0), "zipf": (0.0, 5.0), "test_per_task": (1, 10_000),
}


def check(s: Settings) -> None:
    for name, (lo, hi) in LIMITS.items():
        value = getattr(s, name)
        if not (lo <= value <= hi) or isinstance(value, float) and math.isnan(value):
            raise BadOption(f"--{name.replace('_per_iteration', '').replace('_', '-')} must be between {lo:g} and "
                            f"{hi:g}, not {value:g}")


class BadOption(Exception):
    """An option out of range: one line naming it, exit code 2."""


# --------------------------------------------------------------------------- the long-tailed seed pool


def task_shares(s: Settings) -> dict[str, float]:
    """Seed share per task type: ranked by the world's commonness, Zipf over rank."""
    return zipf_shares(s.zipf)


def rare_tasks(s: Settings) -> list[str]:
    """Rare: less than half the share a uniform pool would give the type."""
    return [t for t, share in task_shares(s).items() if share < 0.5 / len(TASKS)]


def long_tailed_pool(s: Settings, seed: int) -> list[dict[str, Any]]:
    """`s.seed_pool` distinct training-split instructions, task types Zipf-distributed, low levels common."""
    return seed_pool(s.seed_pool, task_weights=task_shares(s), rng=random.Random(f"long-tailed-pool:{seed}"))


# --------------------------------------------------------------------------- configs


def sandbox_endpoint(model: str, **options: Any) -> EndpointConfig:
    return EndpointConfig(backend="sandbox", model=model, api_key_env=None, concurrency=32, **options)


def arm_config(s: Settings, seed: int, arm: str, seeds_file: Path, run_dir: Path) -> RunConfig:
    """One arm's Lion-loop run; the arms differ only in the `lion` options that choose the seeds."""
    p = s.preset
    options: dict[str, Any] = {"selection": "uniform"} if arm == "self-instruct" else OURS if arm == "ours" else {}
    return RunConfig(
        run_dir=run_dir,
        seed=seed,
        teacher=sandbox_endpoint("teacher", temperature=0.7, max_tokens=64),
        # position bias and malformed replies as in the demo: the swap and the parser do their work
        referee=sandbox_endpoint("referee", temperature=0.2, max_tokens=128,
                                 sandbox=SandboxOptions(position_bias=0.5, malformed_rate=0.03)),
        generator=sandbox_endpoint("generator", temperature=1.0, max_tokens=64),
        student=StudentConfig(
            model=p.model,
            template="chat",
            system_prompt=p.system_prompt,
            # the demo's settings on a CPU: continue from the previous student at a constant rate and
            # replay half of the earlier data (a fresh warmup each round costs what was learned)
            train=TrainConfig(epochs=s.epochs, learning_rate=s.learning_rate, lr_scheduler="constant",
                              warmup_ratio=0.0, batch_size=p.batch_size, max_length=max(p.max_length, MAX_LENGTH),
                              replay_fraction=0.5, logging_steps=100000, save_steps=100000,
                              precision=p.precision, seed=seed),
            generation=AnsweringConfig(temperature=0.0, max_new_tokens=p.max_new_tokens,
                                       batch_size=p.generation_batch),
        ),
        lion=LionConfig(seed_pool=seeds_file, iterations=s.iterations, new_per_iteration=s.new_per_iteration,
                        tau=TAU, generation_rounds=6, **({"hard_easy_ratio": "1:1"} | options)),
    )


# --------------------------------------------------------------------------- the shared prefix
# Iteration 1 imitation (the seed pool) is the same for every arm, and iteration 1 discrimination the
# same for both Lion arms (our options act from generation on). Each costs minutes on 2 cores, so the
# first arm's run directory is copied when it reaches each point, and the later arms start from the
# copy (`allow_config_change` records the changed keys in their stores). A copy is made only while
# the run stands exactly there, so a resumed benchmark whose first arm had already passed that point
# simply runs the later arms in full.

AFTER_IMITATION, AFTER_DISCRIMINATION = "prefix-after-imitation-1", "prefix-after-discrimination-1"


def snapshot(run_dir: Path, dest: Path) -> None:
    if dest.exists():
        return
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns(STORE_NAME + "*", "run.lock"))
    with sqlite3.connect(run_dir / STORE_NAME) as src, sqlite3.connect(tmp / STORE_NAME) as dst:
        src.backup(dst)  # a consistent copy of the open store
    tmp.rename(dest)


def with_prefix_snapshots(seed_dir: Path) -> Callable[..., Any]:
    original = loop.discrimination_stage

    def stage(cfg: RunConfig, store: Store, llms: Any, prompts: Any, k: int, progress: bool) -> Any:
        fresh = k == 1 and not store.stage_done(1, "discrimination")
        if fresh:
            snapshot(Path(cfg.run_dir), seed_dir / AFTER_IMITATION)
        out = original(cfg, store, llms, prompts, k, progress)
        if fresh:
            snapshot(Path(cfg.run_dir), seed_dir / AFTER_DISCRIMINATION)
        return out

    return stage


def run_arm(cfg: RunConfig, arm: str, seed_dir: Path, first: bool) -> Any:
    """Run one arm (a finished one returns at once), from a copied prefix when there is one."""
    run_dir = Path(cfg.run_dir)
    prefix = seed_dir / (AFTER_IMITATION if arm == "self-instruct" else AFTER_DISCRIMINATION)
    if not (run_dir / STORE_NAME).is_file() and prefix.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(prefix, run_dir)
        (run_dir / "prefix.json").write_text(json.dumps({"copied_from": prefix.name}) + "\n")
    original = loop.discrimination_stage
    if first:
        loop.discrimination_stage = with_prefix_snapshots(seed_dir)
    try:
        # a copied prefix is bound to the first arm's config: the arm's own keys apply from the next stage
        return loop.run_lion(cfg, progress=False, allow_config_change=(run_dir / "prefix.json").is_file())
    finally:
        loop.discrimination_stage = original


# --------------------------------------------------------------------------- what each arm did


def calls(run_dir: Path) -> dict[str, int]:
    """Calls really sent per role over the whole run (the student's are its Cache Pool answers)."""
    out = dict.fromkeys(CALL_ROLES, 0)
    with Store.open_existing(run_dir) as store:
        for row in store.usage():
            if row["role"] in out:
                out[row["role"]] += row["calls"]
    return out


def task_of(text: str) -> str | None:
    inst = parse(text)
    return inst.task if inst else None


def novelty_check(cfg: RunConfig, k: int, cache: list[Any]) -> Callable[[str], bool]:
    """The arm's own novelty rule against the Cache Pool of iteration `k`: the paper's single threshold,
    or its group's (rebuilt exactly as the generation stage built it: the same grouping and seed)."""
    from lionkd.lion.groups import Grouping
    from lionkd.lion.novelty import NoveltyFilter
    from lionkd.lion.targeting import group_thresholds

    lion = cfg.lion
    novelty = NoveltyFilter([ins.text for ins in cache], threshold=lion.rouge_l_max, tokenizer=lion.novelty_tokenizer)
    if lion.novelty_scope == "pool":
        return lambda text: bool(text) and float(novelty.scores(text).max()) <= lion.rouge_l_max
    grouping = Grouping(cache, lion.grouping, lion.clusters, seed=f"{cfg.seed}-{k}")
    limits = group_thresholds(cache, grouping.of, floor=lion.rouge_l_max, ceiling=lion.near_copy_rouge_l,
                              tokenizer=lion.novelty_tokenizer, seed=f"{cfg.seed}-{k}")
    return lambda text: bool(text) and float(novelty.scores(text).max()) <= limits.get(
        grouping.of_texts([text])[0], lion.rouge_l_max)


def generator_requests(cfg: RunConfig, k: int, cache: list[Any]) -> dict[str, Any]:
    """Every generator call of iteration `k`, read back from the call ledger: the seed's task type, and
    for each reply its task type and whether it passes the arm's novelty rule against the Cache Pool
    alone (the stage also compares it with what it kept earlier, so this is what the pool removes)."""
    from lionkd.lion.generation import clean_instruction
    from lionkd.sandbox.oracle import parse_generator_seed, wants_rare

    novel_enough = novelty_check(cfg, k, cache)
    asked: Counter[str] = Counter()
    replies: Counter[str] = Counter()
    novel: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    with sqlite3.connect(Path(cfg.run_dir) / STORE_NAME) as db:
        rows = db.execute("SELECT request, result FROM calls WHERE role = 'generator' AND iteration = ?", (k,))
        for request, result in rows:
            prompt = json.loads(request)["messages"][-1]["content"]
            asked[str(task_of(parse_generator_seed(prompt) or ""))] += 1
            modes["rarer" if wants_rare(prompt) else "same-type"] += 1
            text = clean_instruction(json.loads(result)["choice"]["text"])
            t = str(task_of(text))
            replies[t] += 1
            novel[t] += novel_enough(text)
    return {"asked_seed_tasks": dict(asked), "reply_tasks": dict(replies), "reply_novel_vs_pool": dict(novel),
            "prompt_modes": dict(modes)}


def dynamics(cfg: RunConfig) -> dict[str, Any]:
    """Per iteration: what the referee called hard (per task type), which seeds were drawn, what passed
    novelty and what was kept (per task type), the hard share aimed at and what the filters removed."""
    out: dict[str, Any] = {"iterations": []}
    with Store.open_existing(cfg.run_dir) as store:
        metrics = store.metrics()
        for k in range(1, cfg.lion.iterations + 1):
            m = metrics.get(k, {})
            cache = store.instructions(store.pool(k, "cache"))
            by_id = {ins.id: ins for ins in cache}
            judged, hard = Counter(), Counter()
            for i, j in store.judgements(k).items():
                if j.ok and i in by_id:
                    t = task_of(by_id[i].text)
                    judged[t] += 1
                    hard[t] += j.gap >= cfg.lion.tau
            new = [parse(ins.text) for ins in store.instructions(store.pool(k + 1, "train"))]
            out["iterations"].append({
                "iteration": k,
                "cache": len(cache),
                "hard_ratio": m.get("hard_ratio"),
                "hard_fraction": m.get("hard_fraction"),
                "groups": m.get("groups"),
                "hard_share_by_task": {t: hard[t] / judged[t] for t in sorted(judged, key=str)},
                "judged_by_task": dict(judged),
                **generator_requests(cfg, k, cache),
                "new_tasks": dict(Counter(inst.task if inst else None for inst in new)),
                "new_levels": dict(Counter(str(inst.level if inst else None) for inst in new)),
                "new": len(new),
                "new_same_type_prompt": m.get("new_hard"), "new_rarer_prompt": m.get("new_easy"),
                "generator_calls": m.get("generator_calls"),
                "novelty_rejections": m.get("novelty_rejections"),
                "filter_rejections": m.get("filter_rejections"),
                "train_examples": metrics.get(k + 1, {}).get("train_examples"),
            })
    return out


def trained_tasks(d: dict[str, Any]) -> Counter[str]:
    """Task types of every generated instruction the arm trained on."""
    total: Counter[str] = Counter()
    for it in d["iterations"]:
        total.update(it["new_tasks"])
    return total


# --------------------------------------------------------------------------- scoring


def evaluate(s: Settings, path: str | Path, items: list[Any], cache_file: Path | None) -> dict[str, Any]:
    """Greedy exact match with the demo's settings; kept beside the run, so a resumed benchmark reuses it."""
    if cache_file is not None and cache_file.is_file():
        return json.loads(cache_file.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.sandbox.student import evaluate_student

    p = s.preset
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    r = evaluate_student(model, tokenizer, items, batch_size=p.generation_batch, max_new_tokens=p.max_new_tokens,
                         system_prompt=p.system_prompt)
    result = {"overall": r["overall"], "by_domain": r["by_domain"], "by_task": r["by_task"]}
    if cache_file is not None:
        cache_file.write_text(json.dumps(result) + "\n")
    return result


def columns_of(acc: dict[str, Any], rare: list[str], shares: dict[str, float]) -> dict[str, float]:
    """Per domain and over all types: balanced (every type counts alike, as in the balanced test set)
    and seed-weighted (types weighted by their share of the seed pool, what a user's traffic looks
    like); and the rare and the common types, balanced."""
    by_task = acc["by_task"]

    def balanced(types: list[str]) -> float:
        return balanced_accuracy({t: by_task[t] for t in types}) if types else float("nan")

    def weighted(types: list[str]) -> float:
        mine = {t: shares[t] for t in types if shares.get(t, 0.0) > 0}
        return weighted_accuracy(by_task, mine) if mine else float("nan")  # no seed of the domain: no traffic

    out: dict[str, float] = {}
    for d in DOMAINS:
        types = [t for t in DOMAINS[d] if t in by_task]
        out[d] = balanced(types)
        out[f"{d} (seed-weighted)"] = weighted(types)
    everything = list(by_task)
    out["rare types"] = balanced([t for t in everything if t in rare])
    out["common types"] = balanced([t for t in everything if t not in rare])
    out["overall"] = balanced(everything)
    out["overall (seed-weighted)"] = weighted(everything)
    return out


# --------------------------------------------------------------------------- main


def run_seed(s: Settings, seed: int, items: list[Any], work: Path, log: Callable[[str], None], reused: list[bool]
             ) -> dict[str, Any]:
    seed_dir = work / s.key() / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    seeds_file = seed_dir / "seeds.jsonl"
    if not seeds_file.is_file():  # written once: a resumed run must see the same seeds
        write_jsonl(seeds_file, long_tailed_pool(s, seed))
    pool_tasks = Counter(json.loads(line)["task"] for line in seeds_file.read_text().splitlines() if line)
    test_key = f"eval-test{s.test_per_task}-{TEST_SEED}.json"
    out: dict[str, Any] = {"seed_pool_tasks": dict(pool_tasks)}
    for arm in LOOP_ARMS:
        cfg = arm_config(s, seed, arm, seeds_file, seed_dir / arm)
        record = seed_dir / arm / "bench_seconds.json"
        reused.append(record.is_file())
        t0 = time.time()
        summary = run_arm(cfg, arm, seed_dir, first=arm == LOOP_ARMS[0])
        if not record.is_file():
            record.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}) + "\n")
        acc = evaluate(s, summary.final_student, items, seed_dir / arm / test_key)
        out[arm] = {"accuracy": acc, "calls": calls(cfg.run_dir), "dynamics": dynamics(cfg),
                    "seconds": json.loads(record.read_text())["seconds"],
                    "prefix": json.loads((seed_dir / arm / "prefix.json").read_text())["copied_from"]
                    if (seed_dir / arm / "prefix.json").is_file() else None}
        log(f"seed {seed} {arm}: {acc['overall']:.3f} ({out[arm]['seconds']:.0f} s)")
    # imitation of the seed pool alone: iteration 1's student, the common start of every loop arm
    first = arm_config(s, seed, LOOP_ARMS[0], seeds_file, seed_dir / LOOP_ARMS[0])
    acc = evaluate(s, student_dir(first, 1), items, seed_dir / f"imitation-{test_key}")
    with Store.open_existing(first.run_dir) as store:
        teacher_1 = sum(r["calls"] for r in store.usage() if r["role"] == "teacher" and r["iteration"] == 1)
    out["imitation"] = {"accuracy": acc, "calls": dict.fromkeys(CALL_ROLES, 0) | {"teacher": teacher_1}}
    log(f"seed {seed} imitation: {acc['overall']:.3f}")
    return out


def summarise(s: Settings, runs: dict[int, dict[str, Any]], base: dict[str, Any], rare: list[str]) -> dict[str, Any]:
    def shares(r: dict[str, Any]) -> dict[str, float]:
        return pool_shares({"task": t} for t, c in r["seed_pool_tasks"].items() for _ in range(c))

    scores = {arm: [columns_of(base if arm == "base" else r[arm]["accuracy"], rare, shares(r)) for r in runs.values()]
              for arm in ARMS}
    cols = list(scores["base"][0])
    out: dict[str, Any] = {"columns": cols, "arms": {}, "differences": {}}
    for arm, per_seed in scores.items():
        out["arms"][arm] = {c: interval([x[c] for x in per_seed]) for c in cols}
    for a, b in PAIRS:
        out["differences"][f"{a} - {b}"] = {
            c: interval([x[c] - y[c] for x, y in zip(scores[a], scores[b], strict=True)]) for c in cols}
    out["calls"] = {arm: dict.fromkeys(CALL_ROLES, 0.0) if arm == "base" else
                    {r: statistics.fmean(run[arm]["calls"][r] for run in runs.values()) for r in CALL_ROLES}
                    for arm in ARMS}

    def m(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.fmean(get(r) for r in runs.values())

    def summed(r: dict[str, Any], arm: str, key: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for it in r[arm]["dynamics"]["iterations"]:
            total.update(it[key])
        return total

    per_task: dict[str, dict[str, Any]] = {}
    for t in TASKS:
        hard = [r["lion"]["dynamics"]["iterations"][0]["hard_share_by_task"].get(t) for r in runs.values()]
        hard = [h for h in hard if h is not None]
        row: dict[str, Any] = {"seed_share": m(lambda r, t=t: shares(r).get(t, 0.0)), "rare": t in rare,
                               "referee_hard_it1": statistics.fmean(hard) if hard else None}
        for a in GEN_ARMS:
            replies = sum(summed(r, a, "reply_tasks")[t] for r in runs.values())
            row[a] = {
                "asked": m(lambda r, a=a, t=t: summed(r, a, "asked_seed_tasks")[t]),  # generator calls per seed
                "replies": m(lambda r, a=a, t=t: summed(r, a, "reply_tasks")[t]),
                "passed_novelty": sum(summed(r, a, "reply_novel_vs_pool")[t] for r in runs.values()) / replies
                if replies else None,
                "kept": m(lambda r, a=a, t=t: trained_tasks(r[a]["dynamics"])[t]),
            }
        row["accuracy"] = {a: m(lambda r, a=a, t=t: r[a]["accuracy"]["by_task"][t]) for a in ("imitation", *GEN_ARMS)}
        per_task[t] = row
    out["per_task"] = per_task
    out["bands"] = bands(per_task)
    out["referee_hard_ratio"] = interval([it["hard_ratio"] for r in runs.values()
                                          for it in r["lion"]["dynamics"]["iterations"] if it["hard_ratio"] is not None])
    out["kept_levels"] = {a: {"mean": interval([mean_level(summed(r, a, "new_levels")) for r in runs.values()]),
                              "4-5": interval([share_at_least(summed(r, a, "new_levels"), 4) for r in runs.values()])}
                          for a in GEN_ARMS}
    # How far apart two arms' choices are, per seed: the task types of the seeds they asked the
    # generator about, and of the new instructions they kept (total variation distance, 0 to 1).
    out["choice_distance"] = {
        f"{a} vs {b}": {key: interval([total_variation(summed(r, a, key), summed(r, b, key)) for r in runs.values()])
                        for key in ("asked_seed_tasks", "new_tasks")}
        | {"chance": interval([chance_variation(summed(r, a, "asked_seed_tasks"), summed(r, b, "asked_seed_tasks"))
                               for r in runs.values()])}
        for a, b in (("lion", "self-instruct"), ("ours", "self-instruct"), ("ours", "lion"))}
    generation = []
    for arm in GEN_ARMS:
        def tot(key: str, arm: str = arm) -> float:
            return statistics.fmean(sum((it[key] or 0) for it in r[arm]["dynamics"]["iterations"]) for r in runs.values())

        def other(r: dict[str, Any], arm: str = arm) -> float:
            return sum(sum((it["filter_rejections"] or {}).values()) for it in r[arm]["dynamics"]["iterations"])

        def per_iteration(key: str, arm: str = arm) -> str:
            return "; ".join(" / ".join("-" if it[key] is None else f"{it[key]:.2f}" for it in r[arm]["dynamics"]["iterations"])
                             for r in runs.values())
        generation.append([arm, f"{tot('generator_calls'):.0f}", f"{tot('new'):.0f}", f"{tot('novelty_rejections'):.0f}",
                           f"{m(other):.0f}", f"{tot('new_same_type_prompt'):.0f}", f"{tot('new_rarer_prompt'):.0f}",
                           per_iteration("hard_ratio") if arm != "self-instruct" else "- (no referee)",
                           per_iteration("hard_fraction")])
    out["generation"] = generation
    return out


# What the imitation student already gets right of a task type: a type in the "low" band is one the
# student cannot do yet, "high" one it hardly needs more of; the loop arms differ in how they spend
# their new instructions across these bands, and in what each band gains.
BANDS = (("low", 0.0, 0.2), ("mid", 0.2, 0.8), ("high", 0.8, 1.01))


def bands(per_task: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per band of the imitation student's accuracy: its task types, and per loop arm the share of the
    new instructions it trained on that fell in the band and the band's mean gain over imitation."""
    out = {}
    for name, lo, hi in BANDS:
        types = [t for t, v in per_task.items() if lo <= v["accuracy"]["imitation"] < hi]
        row: dict[str, Any] = {"types": types}
        for a in GEN_ARMS:
            kept = sum(v[a]["kept"] for v in per_task.values())
            row[a] = {"kept_share": sum(per_task[t][a]["kept"] for t in types) / kept if kept else 0.0,
                      "gain": statistics.fmean(per_task[t]["accuracy"][a] - per_task[t]["accuracy"]["imitation"]
                                               for t in types) if types else None}
        out[name] = row
    return out


def _known_levels(levels: Counter[str]) -> dict[int, int]:
    """Counts by level, without the instructions the world could not read ("None")."""
    return {int(k): n for k, n in levels.items() if k.isdigit()}


def mean_level(levels: Counter[str]) -> float:
    known = _known_levels(levels)
    return sum(k * n for k, n in known.items()) / max(1, sum(known.values()))


def share_at_least(levels: Counter[str], lowest: int) -> float:
    known = _known_levels(levels)
    return sum(n for k, n in known.items() if k >= lowest) / max(1, sum(known.values()))


def total_variation(a: Counter[str], b: Counter[str]) -> float:
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[t] / na - b[t] / nb) for t in set(a) | set(b))


def chance_variation(a: Counter[str], b: Counter[str], draws: int = 200) -> float:
    """The distance two draws of these sizes from one and the same mix (the two pooled) have by chance."""
    rng = random.Random(0)
    types, weights = zip(*(a + b).items(), strict=True) if a + b else ((), ())
    if not types:
        return 0.0
    return statistics.fmean(total_variation(Counter(rng.choices(types, weights, k=sum(a.values()))),
                                            Counter(rng.choices(types, weights, k=sum(b.values()))))
                            for _ in range(draws))


def budget_line(s: Settings, summary: dict[str, Any]) -> str:
    planned = s.seed_pool + s.new_per_iteration * s.iterations
    spent = ", ".join(f"{arm} {summary['calls'][arm]['teacher']:.0f}" for arm in GEN_ARMS)
    return (f"Teacher budget per loop arm: the seed pool plus N new instructions per iteration, {s.seed_pool} + "
            f"{s.iterations} x {s.new_per_iteration} = {planned} answers (spent, mean per seed: {spent}; an arm whose "
            f"filters kept fewer than N spends less); imitation spends the seed pool's {s.seed_pool}. Referee calls "
            "and the student's Cache Pool answers, which only the Lion arms make, are counted beside it below.")


AIM = 0.03  # our Lion's aim: this much over self-instruct overall, with the paired interval above zero


def notes(summary: dict[str, Any]) -> list[str]:
    """What the figures say, read off them: each paired difference and whether its interval clears zero,
    whether our Lion met its aim, and what the arms' choices were when it did not."""
    d = summary["differences"]
    out = []
    for name in ("ours - self-instruct", "ours - lion", "lion - self-instruct", "self-instruct - imitation"):
        for col in ("overall", "overall (seed-weighted)", "rare types"):
            o = d[name][col]
            wins = sum(v > 0 for v in o["per_seed"])
            verdict = ("one seed: no interval" if o["ci95"] is None else "the 95% interval is above zero"
                       if o["ci95"][0] > 0 else "the 95% interval is below zero" if o["ci95"][1] < 0
                       else "the 95% interval holds zero")
            out.append(f"- `{name}`, {col}: {o['mean']:+.3f}, positive in {wins} of {len(o['per_seed'])} seeds; "
                       f"{verdict}.")
    ours = d["ours - self-instruct"]["overall"]
    met = ours["mean"] >= AIM and ours["ci95"] is not None and ours["ci95"][0] > 0
    out += ["", f"**The aim** (our Lion at least {AIM:+.2f} over self-instruct overall, the 95% interval above "
            f"zero) **is {'met' if met else 'not met'}**: {fmt(ours, signed=True)}."]
    if met:
        return out
    hard, dist, levels = summary["referee_hard_ratio"], summary["choice_distance"], summary["kept_levels"]
    per_type = [v["referee_hard_it1"] for v in summary["per_task"].values() if v["referee_hard_it1"] is not None]
    lion_si = dist["lion vs self-instruct"]
    out += [
        "",
        "Why, from the tables above:",
        f"- The referee called {hard['mean']:.2f} of the Cache Pool hard on average (from {min(hard['per_seed']):.2f} "
        f"to {max(hard['per_seed']):.2f} over seeds and iterations), and at least {min(per_type):.2f} of every task "
        "type's items in iteration 1, so drawing half the seeds from the hard set and half from the rest is close "
        "to drawing them uniformly.",
        f"- The task types of the seeds the paper's Lion gave the generator differ from self-instruct's by a total "
        f"variation of {lion_si['asked_seed_tasks']['mean']:.3f}; two random draws of the same sizes from one mix "
        f"differ by {lion_si['chance']['mean']:.3f}. Ours: {dist['ours vs self-instruct']['asked_seed_tasks']['mean']:.3f}.",
        f"- The new instructions kept are no harder: mean level {levels['lion']['mean']['mean']:.2f} (Lion), "
        f"{levels['ours']['mean']['mean']:.2f} (ours), {levels['self-instruct']['mean']['mean']:.2f} (self-instruct).",
        "- Every loop arm shares the generator's two prompts (a similar instruction, a rarer one), which already give "
        "the long tail its share; what the referee changes is the seed, and it hardly changes it. The gain over "
        f"imitation is the generator's: self-instruct {fmt(d['self-instruct - imitation']['overall'], signed=True)}.",
        f"- Ours trades rather than gains: rare types {fmt(d['ours - self-instruct']['rare types'], signed=True)}, "
        f"common types {fmt(d['ours - self-instruct']['common types'], signed=True)}.",
    ]
    return out


def markdown(result: dict[str, Any]) -> str:
    s, runs, rare, summary = result["settings"], result["runs"], result["rare_tasks"], result
    cols = summary["columns"]
    shown = [c for c in cols if "(seed-weighted)" not in c or c == "overall (seed-weighted)"]
    lines = [
        f"# Lion vs self-instruct at equal teacher budget ({result['student']}, sandbox world)",
        "",
        f"Command: `{result['command']}`  ",
        f"Wall time: {sum(i['wall_s'] for i in result['computing_invocations']) / 60:.1f} min in all ("
        + ", ".join(f"{i['wall_s'] / 60:.1f} min from {i['started']} with --seeds {i['seeds']} "
                    f"({i.get('seeds_done', i['seeds'])} done)" for i in result["computing_invocations"])
        + f"; this invocation {result['wall_s'] / 60:.1f} min{', reusing finished runs' if result['reused'] else ''}); "
        f"the loop arms took {result['arm_seconds_total'] / 60:.1f} min of it, on {result['machine']}  ",
        f"Scale: {len(runs)} seed(s), {s['iterations']} iteration(s) + a last imitation, long-tailed seed pool of "
        f"{s['seed_pool']} (task types Zipf 1/rank^{s['zipf']:g}; rare = {', '.join(rare)}), N = "
        f"{s['new_per_iteration']} new instructions per iteration, {s['epochs']:g} epoch(s) per iteration, lr "
        f"{s['learning_rate']:g} constant, max length {MAX_LENGTH}, replay 0.5, tau {TAU:g}; `lion` hard:easy 1:1, ROUGE-L <= 0.7; `ours` "
        + ", ".join(f"`lion.{k}: {v}`" for k, v in OURS.items())
        + f"; test set {s['test_per_task']} held-out items per task type ({result['test_items']} items).",
        "",
        result["budget"],
        "",
        "Greedy exact-match accuracy of the final students: mean over seeds [95% t-interval of the mean]. Domain "
        "and overall columns are balanced over task types; *seed-weighted* weights the types by their share of "
        "the seed pool.",
        "",
    ]
    rows = [[arm, *(fmt(summary["arms"][arm][c]) for c in shown)] for arm in result["arm_names"]]
    lines += md_table(["arm", *shown], rows)
    lines += ["", "Paired differences (same seed pool, test set and iteration-1 student per seed): mean "
              "[95% t-interval], then per seed.", ""]
    rows = []
    for name, diff in summary["differences"].items():
        rows.append([name, *(fmt(diff[c], signed=True) for c in shown)])
        rows.append(["  per seed", *(" ".join(f"{v:+.3f}" for v in diff[c]["per_seed"]) for c in shown)])
    lines += md_table(["difference", *shown], rows)
    weighted = [c for c in cols if c.endswith("(seed-weighted)")]
    lines += ["", "Seed-weighted, per domain (paired differences):", ""]
    lines += md_table(["difference", *weighted], [[name, *(fmt(diff[c], signed=True) for c in weighted)]
                                                  for name, diff in summary["differences"].items()])
    lines += ["", "Model calls per arm, mean per seed (calls really sent; cached reuses are free; the student's "
              "are its Cache Pool answers for the referee):", ""]
    lines += md_table(["arm", *CALL_ROLES], [[arm, *(f"{summary['calls'][arm][r]:.0f}" for r in CALL_ROLES)]
                                             for arm in result["arm_names"]])
    lines += ["", "Per task type, per arm, mean per seed over all iterations: *asked* generator calls whose seed "
              "is of this type; *passed* the share of the generator's replies of this type that pass the arm's "
              "own novelty rule against the Cache Pool; *kept* new instructions of this type trained on. *hard*: "
              "the share the referee called hard in iteration 1 (`lion`). Accuracy of the final students.", ""]
    head = ["task", "seed share", "rare", "hard"]
    for a in GEN_ARMS:
        head += [f"asked {a}", f"passed {a}", f"kept {a}"]
    head += [f"acc {a}" for a in ("imitation", *GEN_ARMS)]
    rows = []
    for t, v in summary["per_task"].items():
        row = [t, f"{v['seed_share']:.3f}", "yes" if v["rare"] else "",
               "-" if v["referee_hard_it1"] is None else f"{v['referee_hard_it1']:.2f}"]
        for a in GEN_ARMS:
            passed = v[a]["passed_novelty"]
            row += [f"{v[a]['asked']:.1f}", "-" if passed is None else f"{passed:.2f}", f"{v[a]['kept']:.1f}"]
        row += [f"{v['accuracy'][a]:.3f}" for a in ("imitation", *GEN_ARMS)]
        rows.append(row)
    lines += md_table(head, rows)
    lines += ["", "Where the new instructions went, by what the imitation student already got right of a task "
              "type (low: under 0.2, mid: 0.2-0.8, high: over 0.8): the share of each arm's kept new "
              "instructions in the band, and the band's mean accuracy gain over imitation (balanced over its "
              "types).", ""]
    lines += md_table(["band", "task types", *(f"kept {a}" for a in GEN_ARMS), *(f"gain {a}" for a in GEN_ARMS)],
                      [[name, ", ".join(b["types"]) or "-", *(f"{b[a]['kept_share']:.2f}" for a in GEN_ARMS),
                        *("-" if b[a]["gain"] is None else f"{b[a]['gain']:+.3f}" for a in GEN_ARMS)]
                       for name, b in summary["bands"].items()])
    lines += ["", "How far apart the arms' choices were, per seed: the total variation distance (0: the same mix, 1: "
              "disjoint) between the task types of the seeds they gave the generator, and of the new instructions "
              "they kept; *by chance*: the distance two random draws of the same sizes from one mix have.", ""]
    lines += md_table(["arms", "seeds given to the generator", "by chance", "new instructions kept"],
                      [[name, fmt(d["asked_seed_tasks"]), fmt(d["chance"]), fmt(d["new_tasks"])]
                       for name, d in summary["choice_distance"].items()])
    lines += ["", "Difficulty of the new instructions kept (the world's levels 1-5 within each type), per seed:", ""]
    lines += md_table(["arm", "mean level", "share at level 4-5"],
                      [[a, fmt(v["mean"]), fmt(v["4-5"])] for a, v in summary["kept_levels"].items()])
    lines += ["", "What the generation stage did, summed over iterations, mean per seed (hard ratio: the share "
              "of the Cache Pool the referee called hard; hard share aimed at: of the seeds, per iteration, per "
              "seed):", ""]
    lines += md_table(["arm", "generator calls", "kept", "novelty rejections", "other filter rejections",
                       "kept from same-type prompt", "kept from rarer prompt", "referee hard ratio",
                       "hard share aimed at"], summary["generation"])
    lines += ["", *result["notes"], ""]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadOption(message)


def parse_args(argv: list[str] | None) -> tuple[Settings, Path, Path]:
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, help="seeds (paired runs of every arm); default 5")
    p.add_argument("--iterations", type=int, help="Lion iterations; default 3, the paper's")
    p.add_argument("--seed-pool", type=int, help="seed instructions per seed")
    p.add_argument("--new", type=int, dest="new_per_iteration", help="N, new instructions per iteration")
    p.add_argument("--epochs", type=float)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--zipf", type=float, help="the seed pool's long tail: type share ~ 1 / rank**zipf")
    p.add_argument("--test-per-task", type=int)
    p.add_argument("--student", choices=sorted(STUDENTS), help="smollm2 (the real student, default) or tiny "
                   "(the shipped sandbox student, to check the benchmark itself in a minute or two)")
    p.add_argument("--work", type=Path, default=WORK, help="where the runs live")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = vars(p.parse_args(argv))
    work, out = args.pop("work"), args.pop("out")
    chosen = {k: v for k, v in args.items() if v is not None}
    defaults = asdict(Settings())
    if chosen.get("student") == "tiny":  # the tiny student's own training settings, unless given
        defaults |= {"epochs": TINY.train_epochs, "learning_rate": TINY.learning_rate}
    s = Settings(**(defaults | chosen))
    check(s)
    return s, work, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        s, work, out_dir = parse_args(argv)
    except BadOption as exc:
        print(f"lion_vs_self_instruct: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    import torch
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if s.preset.threads:
        torch.set_num_threads(s.preset.threads)
    console = Console(stderr=True)

    def log(msg: str) -> None:
        console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", markup=False, highlight=False)

    started = time.time()
    items = test_set(per_task=s.test_per_task, seed=TEST_SEED)
    rare = rare_tasks(s)
    (work / s.key()).mkdir(parents=True, exist_ok=True)
    base = evaluate(s, resolve_model_path(s.preset.model), items,
                    work / s.key() / f"base-eval-test{s.test_per_task}-{TEST_SEED}.json")
    log(f"base: {base['overall']:.3f}")
    # The wall time of every invocation that computed something, written after each seed, so that an
    # interrupted one still counts and a re-report of finished runs still says what the whole took.
    ledger = work / s.key() / "invocations.json"
    invocations = json.loads(ledger.read_text()) if ledger.is_file() else []
    mine = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "seeds": s.seeds}
    reused: list[bool] = []
    runs = {}
    for seed in range(s.seeds):
        runs[seed] = run_seed(s, seed, items, work, log, reused)
        if not all(reused):
            mine |= {"seeds_done": seed + 1, "wall_s": round(time.time() - started, 1)}
            ledger.write_text(json.dumps([*invocations, mine], indent=2) + "\n")
    if not all(reused):
        invocations.append(mine)
    summary = summarise(s, runs, base, rare)
    seconds = [r[arm]["seconds"] for r in runs.values() for arm in LOOP_ARMS]
    result = {
        "benchmark": NAME,
        "command": "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{NAME}.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(time.time() - started, 1),
        "arm_seconds_total": round(sum(seconds), 1),
        "reused": any(reused),
        "computing_invocations": invocations,
        "machine": f"CPU ({torch.get_num_threads()} threads)",
        "student": s.preset.model,
        "settings": asdict(s),
        "arm_names": list(ARMS),
        "ours": OURS,
        "task_shares": task_shares(s),
        "rare_tasks": rare,
        "test_items": len(items),
        "test_set": {"per_task": s.test_per_task, "seed": TEST_SEED},
        "base": base,
        **summary,
        "budget": budget_line(s, summary),
        "notes": notes(summary),
        "runs": runs,
    }
    md = markdown(result)
    print(md)
    log(f"wall time {result['wall_s'] / 60:.1f} min")
    write_results(NAME, result, md, path=out_dir / f"{NAME}.json")
    return result


if __name__ == "__main__":
    main()
