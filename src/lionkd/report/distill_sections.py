"""The report's sections about a `lionkd distill` run: headline, pseudo-targets, training, student vs teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import Store
from . import plots
from .blocks import Figure, Ledger, Section, Table, fmt
from .distill_run import model_size, pt_statistics, stage_rows
from .lion_sections import usage_table, wall_time
from .on_policy_sections import on_policy_section
from .training_curves import distill_trainings

TASK_METRICS = (("bleu", "BLEU"), ("rouge_mean", "ROUGE (mean F1)"), ("exact_match", "exact match %"))


def _teacher_folder(run_dir: Path, config: dict[str, Any] | None) -> Path | None:
    if (run_dir / "teacher").is_dir():
        return run_dir / "teacher"
    name = ((config or {}).get("teacher") or {}).get("model")
    return Path(name) if isinstance(name, str) and Path(name).is_dir() else None


def final_student(run_dir: Path, store: Store) -> Path | None:
    done = {s["stage"] for s in store.stages()}
    return run_dir / "student" if "final_ce" in done else run_dir / "student-kd" if "kd_train" in done else None


def _main_eval(evaluations: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    """The distill pipeline's own eval.json (student metrics with the teacher's beside them)."""
    for name, results in evaluations:
        if name == "eval.json":
            return results
    return evaluations[0][1] if evaluations else None


def headline(run_dir: Path, store: Store, led: Ledger, evaluations: list[tuple[str, dict[str, Any]]],
             config: dict[str, Any] | None) -> Section:
    section = Section("Headline", "headline")
    student = final_student(run_dir, store)
    rows = stage_rows(store)
    missing = [stage for stage, done, _ in rows if done != "done"]
    section.facts.append(("final student", str(student) if student else "none yet: training has not finished"))
    results = _main_eval(evaluations)
    if results:
        overall = (results.get("task_metrics") or {}).get("overall") or {}
        teacher = results.get("teacher") or {}
        share = results.get("student_over_teacher_pct") or {}
        parts = []
        for key, label in TASK_METRICS:
            if isinstance(overall.get(key), (int, float)):
                versus = (f" (teacher {fmt(teacher[key])}; {share[key]:.0f}% of it)" if key in share
                          else f" (teacher {fmt(teacher[key])})" if key in teacher else "")
                parts.append(f"{label} {fmt(overall[key])}{versus}")
        section.facts.append(("evaluation", "; ".join(parts) + f" on {fmt(results.get('examples'))} examples"
                              if parts else "no task metrics"))
    else:
        section.facts.append(("evaluation", "none ran (no evaluation rows: set kd.eval or kd.eval_holdout)"))
    sizes = size_rows(run_dir, store, config)
    if sizes and len(sizes[0]) > 2 and sizes[0][2] is not None:
        section.facts.append(("size", f"{fmt(sizes[0][1])} parameters vs the teacher's {fmt(sizes[0][2])} "
                                      f"({fmt(sizes[0][3])} x)"))
    pts = pt_statistics(store)
    if pts:
        section.facts.append(("pseudo-targets", ", ".join(f"{p['pseudo_targets']} {p['method']} ({p['per_input']} per "
                                                          f"input)" for p in pts)))
    trainings = distill_trainings(run_dir)
    if trainings:
        section.facts.append(("training", ", ".join(f"{t.label}: loss {fmt(t.metrics.get('loss'))} over "
                                                    f"{fmt(t.metrics.get('steps'))} steps" for t in trainings)))
    if led.per_role:
        total = led.total
        cost = f", ${total['cost']:.4f}" if led.priced else ""
        section.facts.append(("calls", f"{fmt(total['calls'])} calls, {fmt(total['prompt_tokens'])} tokens in, "
                                       f"{fmt(total['completion_tokens'])} out{cost}"))
        section.tables.append(usage_table(led))
    section.facts.append(("wall time", wall_time(store, run_dir)))
    skippable = {"teacher_finetune", "final_ce", "eval_teacher", "pseudo_targets", "eval_student"}
    if [m for m in missing if m not in skippable]:
        section.warnings.append("stages not finished: " + ", ".join(missing) + " (rerun `lionkd distill` to go on)")
    for p in pts:
        if p["cut_off"]:
            section.warnings.append(f"{p['cut_off']} {p['method']} pseudo-targets cut off by kd.pt_max_new_tokens")
        if p["empty"]:
            section.warnings.append(f"{p['empty']} {p['method']} pseudo-targets are empty")
    failed = {role: int(v["failures"]) for role, v in led.per_role.items() if v.get("failures")}
    if failed:
        section.warnings.append("failed calls (after retries): " + ", ".join(f"{r} {n}" for r, n in failed.items()))
    return section


def size_rows(run_dir: Path, store: Store, config: dict[str, Any] | None) -> list[list[Any]]:
    student = final_student(run_dir, store)
    teacher_dir = _teacher_folder(run_dir, config)
    s = model_size(student) if student else None
    t = model_size(teacher_dir) if teacher_dir else None
    if s is None:
        return []
    rows = []
    for key, label in (("parameters", "parameters"), ("weights_mb", "weights MB")):
        ratio = s[key] / t[key] if t and t[key] else None
        rows.append([label, s[key], t[key] if t else None, ratio])
    return rows


def sections(run_dir: Path, store: Store, evaluations: list[tuple[str, dict[str, Any]]],
             config: dict[str, Any] | None) -> list[Section]:
    out = []
    pts = pt_statistics(store)
    if pts:
        rows = [[p["method"], p["teacher"], p["pseudo_targets"], p["inputs"], p["per_input"], p["mean_words"],
                 p["all_distinct"], p["empty"], p["cut_off"]] for p in pts]
        out.append(Section("Pseudo-targets", "pseudo-targets", tables=[Table(
            "Pseudo-targets per kind", ["method", "teacher", "count", "inputs", "per input", "mean words",
                                        "inputs with all distinct", "empty", "cut off"], rows,
            "'inputs with all distinct': share of inputs with several PTs whose PTs all differ (K PTs are worth "
            "their cost only when they do); 'cut off': stopped by kd.pt_max_new_tokens.")]))
    trainings = distill_trainings(run_dir)
    if trainings:
        section = Section("Training", "training")
        section.tables.append(Table("Trainings", ["stage", "steps", "epochs", "mean loss", "last logged loss",
                                                  "tokens / s", "runtime s", "objective"],
                                    [[t.label, t.metrics.get("steps"), t.metrics.get("epochs"), t.metrics.get("loss"),
                                      t.metrics.get("final_logged_loss"), t.metrics.get("tokens_per_s"),
                                      t.metrics.get("runtime_s"), t.metrics.get("objective")] for t in trainings]))
        png = plots.loss_curve("Training loss per step, per stage", [(t.label, t.curve) for t in trainings])
        if png is not None:
            section.figures.append(Figure("training-loss", "Does each stage learn? Training loss per logged step, "
                                          "stages one after another (dotted lines: where each begins).", png))
        out.append(section)
        on_policy = on_policy_section(trainings)
        if on_policy is not None:
            out.append(on_policy)
    results = _main_eval(evaluations)
    sizes = size_rows(run_dir, store, config)
    if results or sizes:
        section = Section("Student vs teacher", "versus")
        if results and results.get("teacher"):
            overall = (results.get("task_metrics") or {}).get("overall") or {}
            teacher = results["teacher"]
            groups = {label: {m: float(v[key]) for m, v in (("student", overall), ("teacher", teacher))
                              if isinstance(v.get(key), (int, float))} for key, label in TASK_METRICS}
            png = plots.grouped_bars("Task metrics on the evaluation rows", groups, "score (0-100)")
            if png is not None:
                section.figures.append(Figure("versus", "How close is the student? Task metrics of student and "
                                              "teacher on the same rows (0-100).", png))
            section.tables.append(Table("Task metrics", ["metric", "student", "teacher"],
                                        [[k, overall.get(k), teacher.get(k)] for k in
                                         ("bleu", "rouge1", "rouge2", "rougeL", "rouge_mean", "exact_match",
                                          "perplexity") if k in overall]))
        if sizes:
            section.tables.append(Table("Size", ["", "student", "teacher", "student / teacher"], sizes,
                                        "Read from the saved safetensors files."))
        speed = next((r["speed"] for _, r in evaluations if r.get("speed")), None)
        if not speed:
            section.text = "Speed was not measured: `lionkd eval MODEL --speed --teacher TEACHER -o RUN_DIR/eval-speed`" \
                           " adds it here."
        out.append(section)
    out.append(Section("Stages", "stages", tables=[Table("Distill stages", ["stage", "state", "recorded"],
                                                         [list(r) for r in stage_rows(store)])]))
    return out
