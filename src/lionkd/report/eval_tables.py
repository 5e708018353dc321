"""The tables of one evaluation result (the `eval.json` of `lionkd eval` and `lionkd distill`): in the run
report, and as the `eval.md` written beside the results.
"""

from __future__ import annotations

from typing import Any

from .blocks import Table, fmt, markdown_table


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def eval_tables(results: dict[str, Any]) -> list[Table]:
    """The tables of one evaluation result (the `lionkd eval` JSON); unknown sections are listed flat."""
    tables: list[Table] = []
    task = results.get("task_metrics") or {}
    if task.get("overall"):
        names = [n for n in task["overall"] if n != "examples"]
        overall = task["overall"]
        rows = [["all", overall.get("examples", results.get("examples")), *(overall.get(n) for n in names)]]
        for category, values in sorted((task.get("per_category") or {}).items()):
            rows.append([category, values.get("examples"), *(values.get(n) for n in names)])
        tables.append(Table("Task metrics", ["category", "examples", *names], rows,
                            "BLEU: sacreBLEU corpus score; ROUGE: mean F1 x 100; exact match in %; "
                            "perplexity of the targets under the model (teacher-forced)."))
    judge = results.get("judge")
    if judge:
        cols = ["questions", "judged", "unparseable", "relative_score", "candidate_mean", "reference_mean",
                "wins", "ties", "losses", "order_agreement"]
        rows = [["all", *(judge.get(c) for c in cols)]]
        for category, values in sorted((judge.get("per_category") or {}).items()):
            rows.append([category, *(values.get(c) for c in cols)])
        tables.append(Table("Judge evaluation (candidate vs reference)", ["category", *cols], rows,
                            "relative score = 100 x sum of candidate scores / sum of reference scores, "
                            "each the mean of both answer orders; unreadable verdicts are left out "
                            f"({judge.get('parse_failures', 0)} unreadable replies in all, retries included)."))
    speed = results.get("speed")
    if speed:
        keys = ["parameters", "weights_mb", "latency_s", "peak_memory_mb", "max_batch", "throughput_per_min",
                "peak_memory_mb_at_max_batch"]
        models = [name for name in ("student", "teacher") if speed.get(name)]
        rows = [[k, *(speed[m].get(k) for m in models)] for k in keys]
        if speed.get("ratios"):
            ratio_keys = {"parameters": "parameters", "latency_s": "latency", "peak_memory_mb": "peak_memory",
                          "throughput_per_min": "throughput"}
            for row in rows:
                row.append(speed["ratios"].get(ratio_keys.get(row[0], ""), None))
        first = speed[models[0]] if models else {}
        note = (f"{first.get('new_tokens')} new tokens, greedy, on {first.get('device')}; latency is the median "
                f"at batch 1; throughput at the largest batch within {fmt(first.get('budget_gb'))} GB.")
        headers = ["", *models, *(["student / teacher"] if speed.get("ratios") else [])]
        tables.append(Table("Size and speed", headers, rows, note))
    harness = results.get("harness")
    if harness:
        flat: dict[str, Any] = {}
        _flat("", harness.get("results", harness), flat)
        tables.append(Table("lm-evaluation-harness", ["task.metric", "value"], [[k, v] for k, v in flat.items()]))
    known = {"task_metrics", "judge", "speed", "harness", "settings"}
    rest: dict[str, Any] = {}
    for key, value in results.items():
        if key not in known:
            _flat(key, value, rest)
    if rest:
        tables.append(Table("Run", ["key", "value"], [[k, v] for k, v in rest.items()]))
    return tables


def eval_markdown(results: dict[str, Any], title: str = "Evaluation") -> str:
    return "\n\n".join([f"# {title}", *(markdown_table(t) for t in eval_tables(results))]) + "\n"
