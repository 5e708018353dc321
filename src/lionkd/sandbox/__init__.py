"""The offline sandbox world: exact teacher, referee and generator programs, and a tiny student.

- `world`: task types with phrasings, exact answers, partial credit, seed pools and held-out tests.
- `oracle`: the world as "teacher", "referee" and "generator" programs (served as models by
  `lionkd.llm.sandbox_backend`).
- `student`: a tokenizer and a tiny Llama student from scratch, and the shipped base student.

This package is the lowest layer: it imports nothing from lionkd.
The student helpers (torch, transformers) load only when `lionkd.sandbox.student` is imported.
"""

from .world import DOMAINS, TASKS, Instance, Task, parse, sample, score, seed_pool, test_set

__all__ = [
    "DOMAINS",
    "TASKS",
    "Instance",
    "Task",
    "parse",
    "sample",
    "score",
    "seed_pool",
    "test_set",
]
