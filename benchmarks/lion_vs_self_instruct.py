"""Lion against self-instruct at equal teacher budget, on a real pretrained student (SmolLM2-135M-Instruct).

The comparison a user faces: given a teacher budget of (seed pool + N new instructions per iteration)
answers, does choosing the generator's seeds with a referee (Lion) beat drawing them uniformly from
the Cache Pool (self-instruct, what Alpaca did)? Five arms on the offline sandbox world, each run with
several seeds:

- `base`            SmolLM2-135M-Instruct as it ships;
- `imitation`       fine-tuned on the teacher's answers to the seed pool alone (iteration 1 of every
                    other arm: the same training on the same pool, so it is their common starting point);
- `self-instruct`   the Lion loop with `lion.selection: uniform`: no discrimination, generation seeds
                    drawn uniformly from the whole Cache Pool, the same generator, both of Lion's
                    generator prompts (same task type / rarer task of the same domain, 1:1), the same
                    novelty filter, N new instructions per iteration and the same training;
- `lion`            the paper's rule: seeds drawn uniformly from what the referee called hard
                    (teacher - student >= tau 1.0), hard:easy 1:1;
- `lion-learnable`  the same with `lion.seed_weighting: learnable` (seeds weighted towards task types
                    the student has partly learned).

The seed pool is long-tailed like real instruction sets: task types ranked by the world's own
commonness, drawn with Zipf weights 1/rank, so the rarest types have a handful of seeds. The test set
is balanced (`--test-per-task` held-out items per task type, arguments from the world's test split).
Every teacher, referee and generator call is counted from the runs' stores (cached reuses are free).

    python benchmarks/lion_vs_self_instruct.py               (about an hour on 2 cores)
    python benchmarks/lion_vs_self_instruct.py --seeds 1     (one seed, to measure)
    python benchmarks/lion_vs_self_instruct.py --rouge-l-max 0.9 --no-learnable
                                          (the looser novelty filter, from the same iteration-1 prefixes)

Runs live in runs/bench/lion_vs_self_instruct/<settings hash>/seed-<s>/<arm>/ (an interrupted
benchmark resumes; a larger --seeds reuses the finished seeds); results go to
benchmarks/results/lion_vs_self_instruct.json and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shlex
import shutil
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from _common import write_results
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
from lionkd.lion.demo import REAL_STUDENT, SMOLLM2
from lionkd.lion.students import student_dir
from lionkd.llm.models import resolve_model_path
from lionkd.sandbox import DOMAINS, parse, seed_pool, test_set
from lionkd.sandbox.world import TASKS
from lionkd.store import STORE_NAME, Store

WORK = Path("runs/bench/lion_vs_self_instruct")
LOOP_ARMS = ("lion", "lion-learnable", "self-instruct")  # run in this order: the first makes the shared prefix
ARMS = ("base", "imitation", "self-instruct", "lion", "lion-learnable")
PAIRS = (("lion", "self-instruct"), ("lion-learnable", "self-instruct"), ("self-instruct", "imitation"),
         ("lion", "imitation"), ("lion-learnable", "lion"))
CALL_ROLES = ("teacher", "referee", "generator", "student")
TEST_SEED = 1000  # one test set for every arm and seed: the comparison is paired
TAU = 1.0


@dataclass(frozen=True)
class Settings:
    seeds: int = 3
    iterations: int = SMOLLM2.iterations
    seed_pool: int = SMOLLM2.seeds
    new_per_iteration: int = SMOLLM2.new_per_iteration
    epochs: float = SMOLLM2.train_epochs
    learning_rate: float = SMOLLM2.learning_rate
    zipf: float = 1.0  # seed share of the task type of rank r is proportional to 1 / r**zipf
    test_per_task: int = 50
    rouge_l_max: float = 0.7  # the paper's novelty filter; a looser one is a variant (its own results file)
    learnable: bool = True  # run the lion-learnable arm

    def key(self) -> str:
        """The runs' folder: every setting but the number of seeds, so --seeds 3 reuses --seeds 1."""
        fields = asdict(self)
        del fields["seeds"], fields["test_per_task"], fields["learnable"]  # these do not change the runs
        if self.rouge_l_max == Settings.rouge_l_max:
            del fields["rouge_l_max"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    def prefix_key(self) -> str:
        """The folder whose seed pools and iteration-1 prefixes every variant shares: the novelty filter
        acts only in generation, after the prefix."""
        return replace(self, rouge_l_max=Settings.rouge_l_max).key()

    def arms(self) -> tuple[str, ...]:
        return tuple(a for a in ARMS if self.learnable or a != "lion-learnable")

    def loop_arms(self) -> tuple[str, ...]:
        return tuple(a for a in LOOP_ARMS if a in self.arms())

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((a, b) for a, b in PAIRS if a in self.arms() and b in self.arms())

    def results_name(self) -> str:
        name = "lion_vs_self_instruct"
        if self.rouge_l_max != Settings.rouge_l_max:
            name += f"_rouge{self.rouge_l_max:g}"
        return name


# --------------------------------------------------------------------------- the long-tailed seed pool


def task_shares(s: Settings) -> dict[str, float]:
    """Seed share per task type: ranked by the world's weights (its notion of common), Zipf over rank."""
    ranked = sorted(TASKS, key=lambda t: -TASKS[t].weight)  # stable: ties keep the world's order
    raw = {t: 1.0 / (r + 1) ** s.zipf for r, t in enumerate(ranked)}
    total = sum(raw.values())
    return {t: w / total for t, w in raw.items()}


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
    """One arm's Lion-loop run; the arms differ only in `lion.selection` and `lion.seed_weighting`."""
    p = SMOLLM2
    return RunConfig(
        run_dir=run_dir,
        seed=seed,
        teacher=sandbox_endpoint("teacher", temperature=0.7, max_tokens=64),
        # position bias and malformed replies as in the demo: the swap and the parser do their work
        referee=sandbox_endpoint("referee", temperature=0.2, max_tokens=128,
                                 sandbox=SandboxOptions(position_bias=0.5, malformed_rate=0.03)),
        generator=sandbox_endpoint("generator", temperature=1.0, max_tokens=64),
        student=StudentConfig(
            model=REAL_STUDENT,
            template="chat",
            system_prompt=p.system_prompt,
            # the demo's settings for SmolLM2 on a CPU: continue from the previous student at a constant
            # rate and replay half of the earlier data (a fresh warmup each round costs what was learned)
            train=TrainConfig(epochs=s.epochs, learning_rate=s.learning_rate, lr_scheduler="constant",
                              warmup_ratio=0.0, batch_size=p.batch_size, max_length=p.max_length,
                              replay_fraction=0.5, logging_steps=100000, save_steps=100000,
                              precision=p.precision, seed=seed),
            generation=AnsweringConfig(temperature=0.0, max_new_tokens=p.max_new_tokens,
                                        batch_size=p.generation_batch),
        ),
        lion=LionConfig(seed_pool=seeds_file, iterations=s.iterations, new_per_iteration=s.new_per_iteration,
                        tau=TAU, hard_easy_ratio="1:1", generation_rounds=6,
                        seed_weighting="learnable" if arm == "lion-learnable" else "uniform", rouge_l_max=s.rouge_l_max,
                        selection="uniform" if arm == "self-instruct" else "referee"),
    )


# --------------------------------------------------------------------------- the shared prefix
# Iteration 1 imitation (the seed pool) is the same for every arm, and iteration 1 discrimination the
# same for both Lion arms. On 2 cores each costs minutes, so the first arm's run directory is copied
# when it reaches each point, and the later arms start from the copy (`allow_config_change` records
# the one changed key in their stores). A copy is made only while the run stands exactly there, so a
# resumed benchmark whose first arm had already passed that point simply runs the later arms in full.

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
    """Run one arm, from a copied prefix when there is one (`seed_dir` holds the prefixes)."""
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


def generator_requests(cfg: RunConfig, k: int, cache_texts: list[str]) -> dict[str, Any]:
    """Every generator call of iteration `k`, read back from the call ledger: the seed's task type, and
    for each reply its task type and whether it passes the novelty filter against the Cache Pool alone
    (the stage also compares it with what it kept earlier, so this is what the pool itself removes)."""
    from lionkd.lion.generation import clean_instruction
    from lionkd.lion.novelty import NoveltyFilter
    from lionkd.sandbox.oracle import parse_generator_seed, wants_rare

    novelty = NoveltyFilter(cache_texts, threshold=cfg.lion.rouge_l_max, tokenizer=cfg.lion.novelty_tokenizer)
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
            novel[t] += bool(text) and float(novelty.scores(text).max()) <= novelty.threshold
    return {"asked_seed_tasks": dict(asked), "reply_tasks": dict(replies), "reply_novel_vs_pool": dict(novel),
            "prompt_modes": dict(modes)}


def dynamics(cfg: RunConfig) -> dict[str, Any]:
    """Per iteration: what the referee called hard (per task type), which seeds were drawn, what was kept
    (per task type of the kept instruction) and what the filters removed."""
    out: dict[str, Any] = {"iterations": []}
    with Store.open_existing(cfg.run_dir) as store:
        metrics = store.metrics()
        for k in range(1, cfg.lion.iterations + 1):
            m = metrics.get(k, {})
            cache = {ins.id: ins for ins in store.instructions(store.pool(k, "cache"))}
            judged, hard = Counter(), Counter()
            for i, j in store.judgements(k).items():
                if j.ok and i in cache:
                    t = task_of(cache[i].text)
                    judged[t] += 1
                    hard[t] += j.gap >= cfg.lion.tau
            new = store.instructions(store.pool(k + 1, "train"))
            out["iterations"].append({
                "iteration": k,
                "cache": len(cache),
                "hard_ratio": m.get("hard_ratio"),
                "hard_share_by_task": {t: hard[t] / judged[t] for t in sorted(judged, key=str)},
                "judged_by_task": dict(judged),
                **generator_requests(cfg, k, [ins.text for ins in cache.values()]),
                "kept_parent_tasks": dict(Counter(task_of(store.instructions([ins.parent_id])[0].text)
                                                  for ins in new)),
                "new_tasks": dict(Counter(task_of(ins.text) for ins in new)),
                "new": len(new),
                "new_same_type_prompt": m.get("new_hard"), "new_rarer_prompt": m.get("new_easy"),
                "generator_calls": m.get("generator_calls"),
                "novelty_rejections": m.get("novelty_rejections"),
                "filter_rejections": m.get("filter_rejections"),
                "train_examples": metrics.get(k + 1, {}).get("train_examples"),
                "train_replayed": metrics.get(k + 1, {}).get("train_replayed"),
            })
    return out


def trained_tasks(d: dict[str, Any]) -> Counter[str]:
    """Task types of every generated instruction the arm trained on."""
    total: Counter[str] = Counter()
    for it in d["iterations"]:
        total.update(it["new_tasks"])
    return total


# --------------------------------------------------------------------------- scoring


def evaluate(path: str | Path, items: list[Any], cache_file: Path | None) -> dict[str, Any]:
    """Greedy exact match with the demo's settings; kept beside the run, so a resumed benchmark reuses it."""
    if cache_file is not None and cache_file.is_file():
        return json.loads(cache_file.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lionkd.sandbox.student import evaluate_student

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    r = evaluate_student(model, tokenizer, items, batch_size=SMOLLM2.generation_batch,
                         max_new_tokens=SMOLLM2.max_new_tokens, system_prompt=SMOLLM2.system_prompt)
    result = {"overall": r["overall"], "by_domain": r["by_domain"], "by_task": r["by_task"]}
    if cache_file is not None:
        cache_file.write_text(json.dumps(result) + "\n")
    return result


def columns_of(acc: dict[str, Any], rare: list[str]) -> dict[str, float]:
    """Accuracy per domain, on the rare and the common task types (balanced test set: a plain mean), overall."""
    common = [t for t in acc["by_task"] if t not in rare]
    return ({d: acc["by_domain"][d] for d in DOMAINS}
            | {"rare types": statistics.fmean(acc["by_task"][t] for t in rare),
               "common types": statistics.fmean(acc["by_task"][t] for t in common),
               "overall": acc["overall"]})


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(stat: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{stat['mean']:{sign}.3f} ± {stat['std']:.3f}"


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- main


def run_seed(s: Settings, seed: int, items: list[Any], log: Callable[[str], None], reused: list[bool]
             ) -> dict[str, Any]:
    seed_dir = WORK / s.key() / f"seed-{seed}"
    prefix_dir = WORK / s.prefix_key() / f"seed-{seed}"  # the same folder unless this is a variant
    seed_dir.mkdir(parents=True, exist_ok=True)
    prefix_dir.mkdir(parents=True, exist_ok=True)
    seeds_file = prefix_dir / "seeds.jsonl"
    if not seeds_file.is_file():  # written once: a resumed run must see the same seeds
        write_jsonl(seeds_file, long_tailed_pool(s, seed))
    pool_tasks = Counter(json.loads(line)["task"] for line in seeds_file.read_text().splitlines() if line)
    test_key = f"eval-test{s.test_per_task}-{TEST_SEED}.json"
    out: dict[str, Any] = {"seed_pool_tasks": dict(pool_tasks)}
    for arm in s.loop_arms():
        cfg = arm_config(s, seed, arm, seeds_file, seed_dir / arm)
        record = seed_dir / arm / "bench_seconds.json"
        reused.append(record.is_file())
        t0 = time.time()
        summary = run_arm(cfg, arm, prefix_dir, first=arm == s.loop_arms()[0])
        if not record.is_file():
            record.write_text(json.dumps({"seconds": round(time.time() - t0, 1)}) + "\n")
        acc = evaluate(summary.final_student, items, seed_dir / arm / test_key)
        out[arm] = {"accuracy": acc, "calls": calls(cfg.run_dir), "dynamics": dynamics(cfg),
                    "seconds": json.loads(record.read_text())["seconds"],
                    "prefix": json.loads((seed_dir / arm / "prefix.json").read_text())["copied_from"]
                    if (seed_dir / arm / "prefix.json").is_file() else None}
        log(f"seed {seed} {arm}: {acc['overall']:.3f} ({out[arm]['seconds']:.0f} s)")
    # imitation of the seed pool alone: iteration 1's student, the common start of every loop arm
    first = arm_config(s, seed, s.loop_arms()[0], seeds_file, seed_dir / s.loop_arms()[0])
    acc = evaluate(student_dir(first, 1), items, prefix_dir / f"imitation-{test_key}")
    with Store.open_existing(first.run_dir) as store:
        teacher_1 = sum(r["calls"] for r in store.usage() if r["role"] == "teacher" and r["iteration"] == 1)
    out["imitation"] = {"accuracy": acc, "calls": dict.fromkeys(CALL_ROLES, 0) | {"teacher": teacher_1}}
    log(f"seed {seed} imitation: {acc['overall']:.3f}")
    return out


SHORT = {"self-instruct": "SI", "lion": "lion", "lion-learnable": "L"}


def markdown(result: dict[str, Any], cols: list[str]) -> str:
    s, runs, rare = result["settings"], result["runs"], result["rare_tasks"]
    n, arms = len(runs), result["arm_names"]
    gen_arms = [a for a in ("self-instruct", "lion", "lion-learnable") if a in arms]
    rouge = s["rouge_l_max"]
    lines = [
        "# Lion vs self-instruct at equal teacher budget (SmolLM2-135M-Instruct, sandbox world)",
        "",
        f"Command: `{result['command']}`  ",
        f"Wall time: {sum(i['wall_s'] for i in result['computing_invocations']) / 60:.1f} min in all ("
        + ", ".join(f"{i['wall_s'] / 60:.1f} min from {i['started']} with --seeds {i['seeds']} "
                    f"({i.get('seeds_done', i['seeds'])} done)"
                    for i in result["computing_invocations"])
        + f"; this invocation {result['wall_s'] / 60:.1f} min{', reusing finished runs' if result['reused'] else ''}); "
        f"the loop arms took {result['arm_seconds_total'] / 60:.1f} min of it, on {result['machine']}  ",
        f"Scale: {n} seeds, {s['iterations']} iterations + a last imitation, long-tailed seed pool of "
        f"{s['seed_pool']} (task types Zipf 1/rank^{s['zipf']:g}; rare = {', '.join(rare)}), N = "
        f"{s['new_per_iteration']} new instructions per iteration, {s['epochs']:g} epoch per iteration, full "
        f"fine-tuning, lr {s['learning_rate']:g} constant, batch {SMOLLM2.batch_size}, max length "
        f"{SMOLLM2.max_length}, bf16 autocast, replay 0.5, student answers <= {SMOLLM2.max_new_tokens} tokens, "
        f"system prompt \"{SMOLLM2.system_prompt}\", tau {TAU:g}, hard:easy 1:1, novelty ROUGE-L <= {rouge:g}; "
        f"test set {s['test_per_task']} held-out items per task type ({result['test_items']} items).",
        "",
        "Greedy exact-match accuracy of the final students, mean ± sample std over seeds; differences are "
        "paired by seed (the same seed pool, test set and iteration-1 student).",
        "",
    ]
    rows = []
    for arm in arms:
        rows.append([arm, *(fmt(result["arms"][arm][c]) for c in cols)])
    for name, diff in result["differences"].items():
        rows.append([name, *(fmt(diff[c], signed=True) for c in cols)])
        rows.append(["  per seed", *(" ".join(f"{v:+.3f}" for v in diff[c]["per_seed"]) for c in cols)])
    lines += md_table(["arm", *cols], rows)
    lines += ["", "Model calls per arm, mean per seed (calls really sent; cached reuses are free; the student's "
              "are its Cache Pool answers for the referee):", ""]
    lines += md_table(["arm", *CALL_ROLES], [[arm, *(f"{result['calls'][arm][r]:.0f}" for r in CALL_ROLES)]
                                             for arm in arms])
    lines += ["", "Per task type, mean over seeds. *seed share*: of the seed pool; *hard*: share of the judged items "
              "the referee called hard in iteration 1 (`lion`); *asked*: share of the generator's seeds (all calls, "
              "both prompts); *novel*: share of the generator's replies of this type (all arms) that pass ROUGE-L "
              f"<= {rouge:g} against the Cache Pool; *kept*: share of the new instructions trained on; accuracy of the final "
              "students (SI = self-instruct, L = lion-learnable).", ""]
    head = ["task", "seed share", "rare", "hard", *(f"asked {SHORT[a]}" for a in gen_arms), "novel",
            *(f"kept {SHORT[a]}" for a in gen_arms), "acc imitation", *(f"acc {SHORT[a]}" for a in gen_arms)]
    rows = []
    for t, v in result["per_task"].items():
        rows.append([t, f"{v['seed_share']:.3f}", "yes" if v["rare"] else "",
                     "-" if v["referee_hard_it1"] is None else f"{v['referee_hard_it1']:.2f}",
                     *(f"{v['asked'][a]:.3f}" for a in gen_arms),
                     "-" if v["novel_vs_pool"] is None else f"{v['novel_vs_pool']:.2f}",
                     *(f"{v['kept'][a]:.3f}" for a in gen_arms),
                     *(f"{v['accuracy'][a]:.3f}" for a in ("imitation", *gen_arms))])
    lines += md_table(head, rows)
    lines += ["", "What the generation stage did, summed over iterations, mean per seed:", ""]
    lines += md_table(["arm", "generator calls", "kept", "novelty rejections", "other filter rejections",
                       "kept from same-type prompt", "kept from rarer prompt", "referee hard ratio by iteration"],
                      result["generation"])
    lines += ["", *result["notes"], ""]
    return "\n".join(lines)


def summarise(s: Settings, runs: dict[int, dict[str, Any]], base: dict[str, Any], rare: list[str]
              ) -> dict[str, Any]:
    cols = [*DOMAINS, "rare types", "common types", "overall"]
    scores = {arm: [columns_of(base, rare) if arm == "base" else columns_of(r[arm]["accuracy"], rare)
                    for r in runs.values()] for arm in s.arms()}
    out: dict[str, Any] = {"columns": cols, "arms": {}, "differences": {}}
    for arm, per_seed in scores.items():
        out["arms"][arm] = {c: mean_std([x[c] for x in per_seed]) for c in cols}
    for a, b in s.pairs():
        diffs = {c: [x[c] - y[c] for x, y in zip(scores[a], scores[b], strict=True)] for c in cols}
        out["differences"][f"{a} - {b}"] = {c: mean_std(v) | {"per_seed": v} for c, v in diffs.items()}
    out["calls"] = {arm: dict.fromkeys(CALL_ROLES, 0.0) if arm == "base" else
                    {r: statistics.fmean(run[arm]["calls"][r] for run in runs.values()) for r in CALL_ROLES}
                    for arm in s.arms()}

    def m(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.fmean(get(r) for r in runs.values())

    gen_arms = [a for a in ("self-instruct", "lion", "lion-learnable") if a in s.arms()]

    def share_of(counts: dict[str, int], t: str) -> float:
        return counts.get(t, 0) / max(1, sum(counts.values()))

    def summed(r: dict[str, Any], arm: str, key: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for it in r[arm]["dynamics"]["iterations"]:
            total.update(it[key])
        return total

    per_task: dict[str, dict[str, Any]] = {}
    for t in TASKS:
        hard = [r["lion"]["dynamics"]["iterations"][0]["hard_share_by_task"].get(t) for r in runs.values()]
        hard = [h for h in hard if h is not None]
        replies = sum(summed(r, a, "reply_tasks")[t] for r in runs.values() for a in gen_arms)
        novel = sum(summed(r, a, "reply_novel_vs_pool")[t] for r in runs.values() for a in gen_arms)
        per_task[t] = {
            "seed_share": m(lambda r, t=t: share_of(r["seed_pool_tasks"], t)),
            "rare": t in rare,
            "referee_hard_it1": statistics.fmean(hard) if hard else None,  # lion's iteration 1
            "asked": {a: m(lambda r, a=a, t=t: share_of(summed(r, a, "asked_seed_tasks"), t)) for a in gen_arms},
            "replies": replies,
            "novel_vs_pool": novel / replies if replies else None,
            "kept": {a: m(lambda r, a=a, t=t: share_of(trained_tasks(r[a]["dynamics"]), t)) for a in gen_arms},
            "accuracy": {a: m(lambda r, a=a, t=t: r[a]["accuracy"]["by_task"][t]) for a in ("imitation", *gen_arms)},
        }
    out["per_task"] = per_task
    hard_counts = Counter()
    for r in runs.values():
        it = r["lion"]["dynamics"]["iterations"][0]
        hard_counts.update({t: it["judged_by_task"][t] * h for t, h in it["hard_share_by_task"].items()})
    out["rare_share_of_hard"] = sum(hard_counts[t] for t in rare) / max(1, sum(hard_counts.values()))
    generation = []
    for arm in gen_arms:
        def tot(key: str, arm: str = arm) -> float:
            return statistics.fmean(sum((it[key] or 0) for it in r[arm]["dynamics"]["iterations"])
                                    for r in runs.values())

        def other(r: dict[str, Any], arm: str = arm) -> float:
            return sum(sum((it["filter_rejections"] or {}).values()) for it in r[arm]["dynamics"]["iterations"])
        ratios = [" / ".join(f"{it['hard_ratio']:.2f}" for it in r[arm]["dynamics"]["iterations"]
                             if it["hard_ratio"] is not None) for r in runs.values()]
        generation.append([arm, f"{tot('generator_calls'):.0f}", f"{tot('new'):.0f}", f"{tot('novelty_rejections'):.0f}",
                           f"{m(other):.0f}", f"{tot('new_same_type_prompt'):.0f}", f"{tot('new_rarer_prompt'):.0f}",
                           "; ".join(x for x in ratios if x) or "- (no referee)"])
    out["generation"] = generation
    return out


def notes(s: Settings, summary: dict[str, Any], rare: list[str]) -> list[str]:
    """What the figures say, read off them (no stored numbers): the gaps, and where Lion's targeting went."""
    d, per_task = summary["differences"], summary["per_task"]
    out = []
    for name in ("lion - self-instruct", "lion-learnable - self-instruct", "self-instruct - imitation"):
        if name not in d:
            continue
        o = d[name]["overall"]
        wins = sum(v > 0 for v in o["per_seed"])
        out.append(f"- `{name}`: {fmt(o, signed=True)} overall, positive in {wins} of {len(o['per_seed'])} seeds; "
                   f"rare types {fmt(d[name]['rare types'], signed=True)}, common types "
                   f"{fmt(d[name]['common types'], signed=True)}.")
    judged = {t: v["referee_hard_it1"] for t, v in per_task.items() if v["referee_hard_it1"] is not None}
    hardest = sorted(judged, key=lambda t: -judged[t])[: max(1, len(judged) // 3)]
    blocked = sorted((t for t, v in per_task.items() if v["novel_vs_pool"] is not None and v["novel_vs_pool"] < 0.1),
                     key=lambda t: per_task[t]["novel_vs_pool"])
    out.append("- What the referee called hard (share of judged items in iteration 1, `lion`), the hardest third: "
               + ", ".join(f"{t} {judged[t]:.2f}" for t in hardest) + "; of `lion`'s iteration-1 hard set, "
               f"{summary['rare_share_of_hard']:.2f} came from the rare types, which are "
               f"{sum(per_task[t]['seed_share'] for t in rare):.2f} of the seed pool: in a long-tailed pool most hard "
               "items are still common types.")
    if blocked:
        out.append("- What the novelty filter removed: of the generator's replies of " + ", ".join(
            f"{t} ({per_task[t]['novel_vs_pool']:.2f})" for t in blocked) + f" under 10% pass ROUGE-L <= {s.rouge_l_max:g} "
            "against the Cache Pool (the world's instructions of these types are short templates that differ in one "
            "or two tokens), so the arms add (almost) none of them; of the referee's hardest third, "
            f"{', '.join(t for t in hardest if t in blocked) or 'none'} are among them. Every arm's new "
            "instructions come from the remaining types.")

    def rare_share(arm: str, key: str) -> float:
        return sum(per_task[t][key][arm] for t in rare)

    arms = [a for a in ("self-instruct", "lion", "lion-learnable") if a in s.arms()]
    out.append("- Where the generator's seeds went: the rare types got "
               + ", ".join(f"{rare_share(a, 'asked'):.2f} ({a})" for a in arms) + " of the seeds asked and "
               + ", ".join(f"{rare_share(a, 'kept'):.2f} ({a})" for a in arms) + " of the instructions kept. Half "
               "of every arm's seeds use the rarer-task prompt, and Lion draws those from its easy set.")
    return out


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int)
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed-pool", type=int)
    p.add_argument("--new", type=int, dest="new_per_iteration")
    p.add_argument("--epochs", type=float)
    p.add_argument("--test-per-task", type=int)
    p.add_argument("--rouge-l-max", type=float, help="a looser novelty filter (a variant: results in "
                   "lion_vs_self_instruct_rouge<X>.*, the seed pools and iteration-1 prefixes shared)")
    p.add_argument("--no-learnable", dest="learnable", action="store_false", default=None,
                   help="leave out the lion-learnable arm")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return Settings(**(asdict(Settings()) | args))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    s = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    console = Console(stderr=True)

    def log(msg: str) -> None:
        console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", markup=False, highlight=False)

    started = time.time()
    items = test_set(per_task=s.test_per_task, seed=TEST_SEED)
    rare = rare_tasks(s)
    (WORK / s.key()).mkdir(parents=True, exist_ok=True)
    base = evaluate(resolve_model_path(REAL_STUDENT), items,
                    WORK / s.key() / f"base-eval-test{s.test_per_task}-{TEST_SEED}.json")
    log(f"base: {base['overall']:.3f}")
    # The wall time of every invocation that computed something, written after each seed, so that an
    # interrupted one still counts and a re-report of finished runs still says what the whole took.
    ledger = WORK / s.key() / "invocations.json"
    invocations = json.loads(ledger.read_text()) if ledger.is_file() else []
    mine = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)), "seeds": s.seeds}
    reused: list[bool] = []
    runs = {}
    for seed in range(s.seeds):
        runs[seed] = run_seed(s, seed, items, log, reused)
        if not all(reused):
            mine |= {"seeds_done": seed + 1, "wall_s": round(time.time() - started, 1)}
            ledger.write_text(json.dumps([*invocations, mine], indent=2) + "\n")
    if not all(reused):
        invocations.append(mine)
    summary = summarise(s, runs, base, rare)
    seconds = [r[arm]["seconds"] for r in runs.values() for arm in s.loop_arms()]
    result = {
        "benchmark": "lion_vs_self_instruct",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/lion_vs_self_instruct.py",
                                                                  *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(time.time() - started, 1),
        "arm_seconds_total": round(sum(seconds), 1),
        "reused": any(reused),
        "computing_invocations": invocations,
        "machine": "CPU (2 cores), torch default threads",
        "student": REAL_STUDENT,
        "settings": asdict(s),
        "arm_names": list(s.arms()),
        "task_shares": task_shares(s),
        "rare_tasks": rare,
        "test_items": len(items),
        "test_set": {"per_task": s.test_per_task, "seed": TEST_SEED},
        "base": base,
        **summary,
        "notes": notes(s, summary, rare),
        "runs": runs,
    }
    md = markdown(result, summary["columns"])
    print(md)
    log(f"wall time {result['wall_s'] / 60:.1f} min")
    write_results(s.results_name(), result, md)
    return result


if __name__ == "__main__":
    main()
