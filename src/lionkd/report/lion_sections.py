"""The report's sections about a Lion run: the headline, the plots, the hard set, the pools."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..config import LionConfig
from ..store import Store
from . import hard_set, plots
from .blocks import Figure, Ledger, Section, Table, fmt
from .training_curves import lion_trainings


def pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _overall(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("overall")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _series(metrics: dict[int, dict[str, Any]], name: str) -> dict[int, float]:
    return {it: float(v[name]) for it, v in metrics.items()
            if isinstance(v.get(name), (int, float)) and not isinstance(v.get(name), bool)}


def wall_time(store: Store, run_dir: Path) -> str:
    """The demo's own measure where it wrote one, else first to last finished stage."""
    try:
        wall = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("wall_s")
    except (OSError, ValueError, AttributeError):
        wall = None
    stages = store.stages()
    if isinstance(wall, (int, float)):
        return f"{wall / 60:.1f} min"
    if len(stages) < 2:
        return "-"
    span = max(s["finished_at"] for s in stages) - min(s["finished_at"] for s in stages)
    return f"{span / 60:.1f} min (first to last finished stage)"


def usage_table(led: Ledger, title: str = "Calls, tokens and cost per role") -> Table:
    rows = [[role, v["calls"], v["failures"], v["prompt_tokens"], v["completion_tokens"],
             v["cost"] if role in led.priced else None] for role, v in sorted(led.per_role.items())]
    total = led.total
    rows.append(["total", total["calls"], total["failures"], total["prompt_tokens"], total["completion_tokens"],
                 total["cost"] if led.priced else None])
    return Table(title, ["role", "calls", "failures", "tokens in", "tokens out", "cost $"], rows,
                 "Calls actually sent (a cached reuse costs nothing); cost from config.yaml prices, '-' where the "
                 "role has none.")


# --------------------------------------------------------------------------- headline


def headline(run_dir: Path, store: Store, led: Ledger, evaluations: list[tuple[str, dict[str, Any]]],
             tau: float) -> Section:
    metrics = store.metrics()
    stages = store.stages()
    imitations = sorted(s["iteration"] for s in stages if s["stage"] == "imitation")
    judged_its = sorted(it for it, m in metrics.items() if "hard_ratio" in m)
    last_train = judged_its[-1] + 1 if judged_its else None
    section = Section("Headline", "headline")
    if imitations:
        final = imitations[-1]
        done = last_train is not None and final >= last_train
        state = "" if done else " (the run has not finished: more iterations follow)"
        section.facts.append(("final student", f"{run_dir / 'students' / f'iter-{final}'}{state}"))
    else:
        section.facts.append(("final student", "none yet: no imitation stage has finished"))
    accuracy = {it: _overall(m["accuracy"]) for it, m in metrics.items() if "accuracy" in m}
    accuracy = {it: v for it, v in accuracy.items() if v is not None}
    if accuracy:
        first, last = min(accuracy), max(accuracy)
        base = f" (base student {pct(accuracy[first])})" if first == 0 and last != 0 else ""
        teacher = _overall(metrics.get(last, {}).get("teacher_accuracy"))
        versus = f", teacher {pct(teacher)}" if teacher is not None else ""
        section.facts.append(("held-out accuracy", f"{pct(accuracy[last])} after iteration {last}{base}{versus}"))
    for name, results in evaluations:
        judge = results.get("judge") or {}
        if isinstance(judge.get("relative_score"), (int, float)):
            section.facts.append((f"judge score ({name})", f"{judge['relative_score']:.1f}% of the reference "
                                  f"({fmt(judge.get('judged'))} questions judged)"))
    if judged_its:
        a, b = judged_its[0], judged_its[-1]
        ratio = pct(metrics[a]["hard_ratio"]) + (f" -> {pct(metrics[b]['hard_ratio'])}" if b != a else "")
        section.facts.append(("hard ratio", f"{ratio} (iteration {a}{f' -> {b}' if b != a else ''}; "
                                            f"hard: teacher - student >= {fmt(tau)})"))
        s, t = metrics[b].get("student_score"), metrics[b].get("teacher_score")
        if s is not None and t is not None:
            section.facts.append(("referee scores", f"student {fmt(s)} vs teacher {fmt(t)} in iteration {b} "
                                                    f"(1-10, mean of both answer orders)"))
    total = led.total
    cost = f", ${total['cost']:.4f}" if led.priced else ""
    section.facts.append(("calls", f"{fmt(total['calls'])} calls, {fmt(total['prompt_tokens'])} tokens in, "
                                   f"{fmt(total['completion_tokens'])} out{cost}"))
    section.facts.append(("wall time", wall_time(store, run_dir)))
    section.warnings = lion_warnings(store, metrics, led)
    section.alerts = lion_alerts(metrics)
    if led.per_role:
        section.tables.append(usage_table(led))
    return section


# The default of `lion.min_readable_verdicts`: a run below it went on only because the user chose so.
READABLE_FLOOR = LionConfig.model_fields["min_readable_verdicts"].default


def lion_alerts(metrics: dict[int, dict[str, Any]]) -> list[str]:
    """What makes a run's results rest on almost nothing: a referee that could mostly not be read."""
    out = []
    for it, m in sorted(metrics.items()):
        rate = m.get("parse_rate")
        if isinstance(rate, (int, float)) and rate < READABLE_FLOOR:
            out.append(f"iteration {it}: only {rate:.0%} of the referee's replies could be read; the hard/easy split "
                       f"and what was generated from it rest on {m.get('hard', 0) + m.get('easy', 0)} verdicts "
                       "(lion.min_readable_verdicts was lowered to let the run go on)")
    return out


def lion_warnings(store: Store, metrics: dict[int, dict[str, Any]], led: Ledger) -> list[str]:
    out = []
    verdicts = [j for it in store.pool_iterations() for j in store.judgements(it).values()]
    failures = sum(j.parse_failures for j in verdicts)
    excluded = sum(not j.ok for j in verdicts)
    if failures or excluded:
        out.append(f"{failures} unreadable referee replies (retried); {excluded} instructions left out of the "
                   "hard/easy split because no readable verdict came back")
    for role in ("teacher", "student"):
        cut = Counter(r.iteration for it in store.pool_iterations() for r in store.responses(role, it).values()
                      if r.finish_reason == "length")
        if cut:
            out.append(f"{sum(cut.values())} {role} answers cut off by max_tokens "
                       f"({', '.join(f'iteration {k}: {n}' for k, n in sorted(cut.items()))})")
    for it, m in sorted(metrics.items()):
        asked, novel = m.get("generator_calls"), m.get("novelty_rejections")
        if isinstance(asked, (int, float)) and isinstance(novel, (int, float)) and asked and novel / asked > 0.5:
            out.append(f"iteration {it}: {novel} of {asked} generated instructions rejected as too close to the "
                       "Cache Pool (ROUGE-L > threshold): the generator repeats itself")
        kept, target = m.get("new_instructions"), (m.get("target_hard") or 0) + (m.get("target_easy") or 0)
        if isinstance(kept, int) and target and kept < target:
            out.append(f"iteration {it}: {kept} new instructions kept of the {target} asked for")
    budget = [f"iteration {s['iteration']} {s['stage']}" for s in store.stages()
              if any("budget" in k and v for k, v in s["detail"].items())]
    if budget:
        out.append(f"stopped by the budget at {', '.join(budget)}")
    failed = {role: int(v["failures"]) for role, v in led.per_role.items() if v.get("failures")}
    if failed:
        out.append("failed calls (after retries): " + ", ".join(f"{r} {n}" for r, n in sorted(failed.items())))
    return out


# --------------------------------------------------------------------------- plots


def figures(store: Store, run_dir: Path, led: Ledger) -> list[Figure]:
    metrics = store.metrics()
    made: list[Figure] = []

    def add(name: str, caption: str, png: bytes | None) -> None:
        if png is not None:
            made.append(Figure(name, caption, png))

    scores = {"teacher": _series(metrics, "teacher_score"), "student": _series(metrics, "student_score"),
              "gap (teacher - student)": _series(metrics, "score_gap")}
    add("referee-scores", "Does the student close in on the teacher? Mean referee score per iteration (1-10, "
        "mean of both answer orders) and the gap.",
        plots.lines("Referee score per iteration", scores, "referee score (1-10)", dashed=["gap (teacher - student)"]))
    hard = {it: 100 * v for it, v in _series(metrics, "hard_ratio").items()}
    add("hard-ratio", "How much of the Cache Pool is still hard? Share of judged instructions with teacher - student "
        ">= tau.", plots.lines("Hard instructions per iteration", {"hard": hard}, "% of judged", ylim=(0, 100)))
    per_domain: dict[str, dict[int, float]] = {}
    for it, m in metrics.items():
        acc = m.get("accuracy")
        values = acc if isinstance(acc, dict) else {"overall": acc} if isinstance(acc, (int, float)) else {}
        for domain, v in values.items():
            if isinstance(v, (int, float)):
                per_domain.setdefault(domain, {})[it] = 100 * v
    if per_domain:
        ordered = dict(sorted(per_domain.items(), key=lambda kv: (kv[0] != "overall", kv[0])))
        add("accuracy", "Does the student get better where it matters? Held-out accuracy per domain (iteration 0: "
            "the base student).", plots.lines("Accuracy per domain per iteration", ordered, "accuracy (%)",
                                              ylim=(0, 100), bold=["overall"]))
    kept_hard, kept_easy = _series(metrics, "new_hard"), _series(metrics, "new_easy")
    stacks = {"kept (hard seed)": kept_hard, "kept (easy seed)": kept_easy} if kept_hard or kept_easy else {
        "kept": _series(metrics, "new_instructions")}
    stacks["rejected: not novel"] = _series(metrics, "novelty_rejections")
    for it, m in metrics.items():
        for reason, n in (m.get("filter_rejections") or {}).items():
            stacks.setdefault(f"rejected: {reason.replace('_', ' ')}", {})[it] = float(n)
    colours = {"kept (hard seed)": "#e45756", "kept (easy seed)": "#54a24b", "kept": "#54a24b",
               "rejected: not novel": "#bab0ac"}
    add("generation", "What did the generator's replies become? Kept vs rejected per iteration.",
        plots.stacked_bars("New instructions per iteration", stacks, "generator replies", colours=colours))
    priced = bool(led.priced)
    unit = "cost $" if priced else "tokens (in + out)"
    per_role: dict[str, dict[int, float]] = {}
    for it, roles in led.per_iteration.items():
        for role, v in roles.items():  # calls outside the loop's iterations (e.g. an evaluation) go to 0
            spent = v["cost"] if priced else v["prompt_tokens"] + v["completion_tokens"]
            bucket = per_role.setdefault(role, {})
            bucket[it or 0] = bucket.get(it or 0, 0.0) + spent
    add("usage", f"Where does the spend go? {unit.capitalize()} per role per iteration.",
        plots.stacked_bars(f"{'Cost' if priced else 'Tokens'} per role per iteration",
                           dict(sorted(per_role.items())), unit))
    trainings = lion_trainings(run_dir)
    add("training-loss", "Does each imitation stage learn? Training loss per logged step, iterations one after "
        "another (dotted lines: where each begins).",
        plots.loss_curve("Training loss per step", [(t.label, t.curve) for t in trainings]))
    return made


# --------------------------------------------------------------------------- the hard set and the pools


def hard_set_section(store: Store, out_dir: Path, tau: float) -> Section | None:
    judged = hard_set.judged_rows(store, tau)
    if not judged:
        return None
    generated = hard_set.generated_rows(store, judged)
    hard_set.write_jsonl_exports(out_dir, judged, generated)
    shown, cut = hard_set.sample(judged)
    shown_gen, cut_gen = hard_set.sample(generated)
    section = Section("The hard set", "hard-set", text=(
        "Every instruction the referee judged, per iteration: both answers, both referee replies, the score pairs "
        "in each answer order and the gap. Filter by verdict, domain and iteration; click 'gap' to sort."))
    rows = []
    for it in sorted({r["iteration"] for r in judged}):
        items = [r for r in judged if r["iteration"] == it]
        ok = [r for r in items if r["gap"] is not None]
        count = Counter(r["verdict"] for r in items)
        rows.append([it, len(items), count["hard"], count["easy"], count["excluded"],
                     sum(r["teacher_score"] for r in ok) / len(ok) if ok else None,
                     sum(r["student_score"] for r in ok) / len(ok) if ok else None,
                     sum(r["gap"] for r in ok) / len(ok) if ok else None,
                     sum(r["parse_failures"] for r in items)])
    section.tables.append(Table("Discrimination per iteration", [
        "iteration", "judged", "hard", "easy", "excluded", "teacher mean", "student mean", "mean gap",
        "unreadable replies"], rows, "Scores 1-10, each the mean of both answer orders."))
    link = f'<a href="{hard_set.JUDGED_JSONL}">{hard_set.JUDGED_JSONL}</a>'
    link_gen = f'<a href="{hard_set.GENERATED_JSONL}">{hard_set.GENERATED_JSONL}</a>'
    note = hard_set.cut_note("judged instructions", cut, hard_set.CAP_PER_ITERATION, link)
    note_gen = hard_set.cut_note("generated instructions", cut_gen, hard_set.CAP_PER_ITERATION, link_gen)
    section.html = (
        f'<p class="note">{note}</p>{hard_set.judged_table_html(shown)}'
        '<h3 id="generated-instructions">What the generator made of the seeds</h3>'
        "<p>Each kept new instruction with the seed it was written from: from a hard seed the generator is asked "
        "for the same domain and task type, from an easy one for the same domain but a rarer task.</p>"
        f'<p class="note">{note_gen}</p>{hard_set.generated_table_html(shown_gen)}'
        if generated else f'<p class="note">{note}</p>{hard_set.judged_table_html(shown)}'
    )
    last = max(r["iteration"] for r in judged)
    top = sorted((r for r in judged if r["iteration"] == last and r["gap"] is not None), key=lambda r: -r["gap"])[:5]
    lines = [f"The five hardest of iteration {last} (all rows: [{hard_set.JUDGED_JSONL}]({hard_set.JUDGED_JSONL}), "
             f"generated instructions: [{hard_set.GENERATED_JSONL}]({hard_set.GENERATED_JSONL})):", ""]
    for r in top:
        lines += [f"- gap {fmt(r['gap'])} ({r['domain']}): {_one_line(r['instruction'])}",
                  f"  - teacher: {_one_line(r['teacher_answer'])}", f"  - student: {_one_line(r['student_answer'])}"]
    section.markdown = "\n".join(lines)
    return section


def _one_line(text: str | None, limit: int = 200) -> str:
    flat = " ".join((text or "-").split())
    return flat if len(flat) <= limit else flat[:limit] + " ..."


def pool_section(store: Store) -> Section | None:
    iterations = store.pool_iterations()
    instructions = store.instructions()
    if not iterations and not instructions:
        return None
    made = Counter((ins.iteration, ins.mode) for ins in instructions if ins.origin == "generated")
    rows = [[it, len(store.pool(it, "train")), len(store.pool(it, "cache")), made[(it, "hard")], made[(it, "easy")]]
            for it in sorted({*iterations, *(it for it, _ in made)})]
    origins = Counter(ins.origin for ins in instructions)
    domains = Counter(ins.domain or "-" for ins in instructions)
    section = Section("Instruction pools", "pools", text=f"{len(instructions)} instructions: {origins['seed']} seeds, "
                                                          f"{origins['generated']} generated.")
    section.tables.append(Table("Pools per iteration", ["iteration", "train pool", "cache pool",
                                                         "generated from hard seeds", "generated from easy seeds"],
                                rows, "Generated instructions are counted at the iteration that made them."))
    if len(domains) > 1:
        section.tables.append(Table("Instructions per domain", ["domain", "instructions"],
                                    [[d, n] for d, n in domains.most_common()]))
    return section

