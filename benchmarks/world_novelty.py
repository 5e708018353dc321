"""Does the paper's novelty filter mean in the sandbox world what it means with a real generator?

A generator LLM rewords every instruction it writes, so Lion's ROUGE-L <= 0.7 filter removes near
copies, not whole task types. Per task type, this measures the share of the sandbox generator's
same-type instructions (its replies to Lion's own "hard" prompt, seeds drawn from the pool) that pass
the project's `NoveltyFilter` against N same-type seed-pool items. Beside it, the same share when the
new instruction keeps its seed's wording and changes only the arguments (what a one-template world
does), the type's surface forms and its levels.

    python -m benchmarks world_novelty                       (or: python benchmarks/world_novelty.py)
    python benchmarks/world_novelty.py --pool 50 --candidates 300 --seeds 3 --levels 1 2 3 4 5

Writes benchmarks/results/world_novelty.json. An option out of range is one line naming it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lionkd.lion.novelty import NoveltyFilter
from lionkd.lion.prompts import LionPrompts
from lionkd.sandbox import world
from lionkd.sandbox.oracle import generator_reply

RESULTS = Path(__file__).parent / "results" / "world_novelty.json"
THRESHOLD = 0.7  # the paper's filter
REQUIRED = 0.5  # the least pass share every type must reach


def pass_shares(task: str, pool_size: int, candidates: int, seed: int, levels: tuple[int, ...],
                threshold: float = THRESHOLD) -> dict[str, float]:
    """Pass shares of one type's generated instructions against `pool_size` same-type pool items."""
    pool = world.seed_pool(pool_size, seed=seed, task_weights={task: 1.0}, levels=levels)
    novelty = NoveltyFilter([r["instruction"] for r in pool], threshold=threshold)
    prompts = LionPrompts()
    rng = random.Random(f"world-novelty:{task}:{seed}")
    reworded = same_wording = 0
    tokens = []
    for _ in range(candidates):
        seed_text = rng.choice(pool)["instruction"]
        prompt = prompts.generator_messages(seed_text, "hard")[0]["content"]
        new = generator_reply(prompt, rng)
        reworded += float(novelty.scores(new).max()) <= threshold
        tokens.append(len(new.split()))
        # the one-template control: a new problem of the seed's level in the seed's own wording
        parent = world.parse(seed_text)
        assert parent is not None
        copy = world.sample(rng, task=task, level=parent.level, phrasing=parent.phrasing).instruction
        same_wording += float(novelty.scores(copy).max()) <= threshold
    return {"reworded": reworded / candidates, "same_wording": same_wording / candidates,
            "words": statistics.fmean(tokens)}


def run(pool_size: int, candidates: int, seeds: int, levels: tuple[int, ...]) -> dict[str, Any]:
    started = time.perf_counter()
    rows = {}
    for task, spec in world.TASKS.items():
        per_seed = [pass_shares(task, pool_size, candidates, s, levels) for s in range(seeds)]
        rows[task] = {
            "pass_reworded": round(statistics.fmean(r["reworded"] for r in per_seed), 3),
            "pass_reworded_min": round(min(r["reworded"] for r in per_seed), 3),
            "pass_same_wording": round(statistics.fmean(r["same_wording"] for r in per_seed), 3),
            "words": round(statistics.fmean(r["words"] for r in per_seed), 1),
            "surface_forms": spec.surface_forms(),
            "levels": len([lv for lv in spec.levels if lv in levels]),
        }
    return {"pool": pool_size, "candidates_per_seed": candidates, "seeds": seeds, "levels": list(levels),
            "threshold": THRESHOLD, "required": REQUIRED, "types": rows,
            "all_pass": all(r["pass_reworded_min"] >= REQUIRED for r in rows.values()),
            "wall_s": round(time.perf_counter() - started, 1)}


def print_table(result: dict[str, Any]) -> None:
    print(f"Share of generated same-type instructions passing ROUGE-L <= {result['threshold']} against "
          f"{result['pool']} same-type pool items ({result['candidates_per_seed']} per type and seed, "
          f"{result['seeds']} seed(s); levels {', '.join(map(str, result['levels']))})")
    print(f"{'type':<15}{'reworded':>10}{'min':>7}{'same wording':>14}{'words':>7}{'forms':>8}{'levels':>8}")
    for task, r in result["types"].items():
        print(f"{task:<15}{r['pass_reworded']:>10.2f}{r['pass_reworded_min']:>7.2f}{r['pass_same_wording']:>14.2f}"
              f"{r['words']:>7.1f}{r['surface_forms']:>8}{r['levels']:>8}")
    verdict = "every type" if result["all_pass"] else "NOT every type"
    print(f"{verdict} passes at >= {result['required']} (reworded, worst seed); {result['wall_s']} s")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as every lionkd command does
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _Parser(prog="world_novelty", description=__doc__.split("\n")[0])
    parser.add_argument("--pool", type=int, default=50, help="same-type pool items per type (N)")
    parser.add_argument("--candidates", type=int, default=300, help="generated instructions per type and seed")
    parser.add_argument("--seeds", type=int, default=3, help="independent pools per type")
    parser.add_argument("--levels", type=int, nargs="+", default=list(world.LEVELS), help="levels drawn")
    args = parser.parse_args(argv)
    try:
        for option, value in (("--pool", args.pool), ("--candidates", args.candidates), ("--seeds", args.seeds)):
            world.check_count(option, value)
        levels = world.check_levels(args.levels, "--levels")
    except world.WorldOptionError as exc:
        parser.error(str(exc))
    result = run(args.pool, args.candidates, args.seeds, levels)
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not result["all_pass"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
