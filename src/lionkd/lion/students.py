"""The students of a Lion run: where iteration k's student is saved, what its training starts from, and
the trained student opened as a backend to answer the Cache Pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..config import EndpointConfig, RunConfig
from ..llm.registry import make_backend


def student_init(cfg: RunConfig, iteration: int) -> str:
    """Where iteration `iteration` starts training from: the base student, then the previous iteration's."""
    if iteration == 1:
        from ..llm.models import resolve_model_path

        return str(resolve_model_path(cfg.student.model))
    return str(student_dir(cfg, iteration - 1))


def student_dir(cfg: RunConfig, iteration: int) -> Path:
    return Path(cfg.run_dir) / "students" / f"iter-{iteration}"


@contextmanager
def open_student(cfg: RunConfig, iteration: int) -> Iterator[Any]:
    """The student trained in `iteration` as a backend (`student.generation.backend`), released on exit.

    Released means its memory is free for the referee's turn and the next training stage: the
    transformers model is dropped, the vLLM engine shut down, a served model's process stopped.
    """
    gen = cfg.student.generation
    path = str(student_dir(cfg, iteration).resolve())  # also the model's name: unique per iteration
    if gen.backend == "server":
        from ..llm.server_command import ServedModel

        with ServedModel(gen.server_command, path) as served:
            endpoint = EndpointConfig(backend="openai", model=path, base_url=served.base_url, api_key_env=None,
                                      concurrency=gen.batch_size)
            yield make_backend(endpoint, api_key="unused")
        return
    endpoint = EndpointConfig(backend=gen.backend, model=path, dtype=gen.dtype, device=gen.device,
                              batch_size=gen.batch_size, batch_tokens=gen.batch_tokens, vllm=gen.vllm)
    backend = make_backend(endpoint, template=cfg.student.template)
    try:
        yield backend
    finally:
        backend.release()
