"""The offline sandbox world: exact teacher, referee and generator programs, and a tiny student.

- `world`: task types written in many phrasings, five difficulty levels each, exact answers, partial
  credit, seed pools, held-out tests, and accuracy balanced or weighted by a pool's type distribution.
- `oracle`: the world as "teacher", "referee" and "generator" programs (served as models by
  `lionkd.llm.sandbox_backend`).
- `student`: a tokenizer and a tiny Llama student from scratch, and the shipped base student.

This package is the lowest layer: it imports nothing from lionkd.
The student helpers (torch, transformers) load only when `lionkd.sandbox.student` is imported.
"""

from .world import (
    DOMAINS,
    LEVELS,
    TASKS,
    Instance,
    Phrasing,
    Task,
    WorldOptionError,
    balanced_accuracy,
    parse,
    pool_shares,
    sample,
    score,
    seed_pool,
    test_set,
    weighted_accuracy,
    zipf_shares,
)

__all__ = [
    "DOMAINS",
    "LEVELS",
    "TASKS",
    "Instance",
    "Phrasing",
    "Task",
    "WorldOptionError",
    "balanced_accuracy",
    "parse",
    "pool_shares",
    "sample",
    "score",
    "seed_pool",
    "test_set",
    "weighted_accuracy",
    "zipf_shares",
]
