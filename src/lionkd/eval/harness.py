"""Benchmarks of EleutherAI's lm-evaluation-harness (BIG-Bench Hard, AGIEval, ...) on a local model.

The harness is an optional extra (`pip install 'lionkd[eval]'`). The model already loaded for the
rest of the evaluation is handed to the harness's own Hugging Face wrapper, so it is neither loaded
twice nor scored by a second implementation of log-likelihoods. Tasks of the user's own (task YAML
files over local data) are found in `include_path`, beside the harness's built-in ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'lionkd[eval]'"


def _import_harness() -> tuple[Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError(f"--harness-tasks: {INSTALL_HINT}") from None
    return lm_eval, HFLM


def clean_metrics(values: dict[str, Any]) -> dict[str, float]:
    """{"acc,none": 0.3, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.3, "acc_stderr": 0.1}."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # aliases, "N/A" standard errors
        name, _, filter_name = key.partition(",")
        out[name if filter_name in ("", "none") else f"{name}[{filter_name}]"] = float(value)
    return out


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    seed: int = 0,
    include_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run harness tasks (zero-shot unless `num_fewshot`) and return {"tasks", "settings", "results"}.

    `results` maps each task and group to its metrics; `limit` caps the examples per task (a quick
    check, not a comparable score); `include_path` is a folder (or file) of the user's task YAMLs.
    """
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise UserError("--harness-tasks: no task names given")
    if include_path is not None and not Path(include_path).exists():
        raise UserError(f"--harness-include {include_path}: no such folder or file")
    lm_eval, hflm = _import_harness()
    task_manager = None
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=str(include_path))
    wrapped = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(
            model=wrapped, tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
            apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False, task_manager=task_manager,
        )
    except (OSError, ConnectionError, ValueError, KeyError) as exc:
        # unknown task names, or task data the hub could not deliver
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--harness-tasks {','.join(tasks)}: lm-evaluation-harness failed ({first[:300]})") from None
    if output is None:  # non-zero ranks in distributed runs
        return {"tasks": tasks, "results": {}}
    results = {name: clean_metrics(values) for name, values in (output.get("results") or {}).items()}
    return {
        "tasks": tasks,
        "settings": {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                     "apply_chat_template": apply_chat_template},
        "versions": dict(output.get("versions") or {}),
        "samples": {name: dict(n) for name, n in (output.get("n-samples") or {}).items()},  # items scored per task
        "results": results,
    }
