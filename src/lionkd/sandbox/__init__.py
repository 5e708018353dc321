"""The offline sandbox world: exact teacher, referee and generator programs, and a tiny student.

- `world`: task types with phrasings, exact answers, partial credit, seed pools and held-out tests.
- `oracle` / `SandboxBackend`: the world as "teacher", "referee" and "generator" models.
- `student`: a tokenizer and a tiny Llama student from scratch, and the shipped base student.

This package is the lowest layer: it imports nothing from lionkd but `lionkd.llm.base` types.
The student helpers (torch, transformers) load only when `lionkd.sandbox.student` is imported.
"""

from .backend import MODELS, SandboxBackend
from .world import DOMAINS, TASKS, Instance, Task, parse, sample, score, seed_pool, test_set

__all__ = [
    "DOMAINS",
    "MODELS",
    "TASKS",
    "Instance",
    "SandboxBackend",
    "Task",
    "parse",
    "sample",
    "score",
    "seed_pool",
    "test_set",
]
