"""The hard set, browsable: what the referee judged in each iteration and what the generator made of it.

Rows come from the run store: one per judged Cache Pool instruction (teacher and student answers,
both referee replies, both score pairs, the gap and the verdict) and one per kept generated
instruction (its parent seed and the mode it was generated in). The report embeds a capped
sample of them as plain HTML rows that a small inline script filters and sorts; the full lists go
to JSONL files beside the report.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..records import Judgement, Response
from ..store import Store

JUDGED_JSONL = "hard-set.jsonl"
GENERATED_JSONL = "generated.jsonl"
CAP_PER_ITERATION = 500  # rows of each kind embedded per iteration; the JSONL files hold them all
CLIP = 2000  # characters of one text shown in the page


def _answers_up_to(store: Store, role: str, iteration: int) -> dict[str, Response]:
    """Each instruction's latest answer by `role` given in iterations up to `iteration` (answers are reused)."""
    answers: dict[str, Response] = {}
    for it in range(iteration + 1):
        answers.update(store.responses(role, it))
    return answers


def verdict(judgement: Judgement | None, tau: float) -> str:
    """hard / easy / excluded, as the discrimination stage splits the Cache Pool (`Judgement.is_hard`)."""
    if judgement is None or not judgement.ok:
        return "excluded"
    return "hard" if judgement.is_hard(tau) else "easy"


def judged_rows(store: Store, tau: float) -> list[dict[str, Any]]:
    """One record per instruction of each iteration's Cache Pool that reached the referee."""
    rows: list[dict[str, Any]] = []
    for it in store.pool_iterations():
        judgements = store.judgements(it)
        if not judgements:
            continue
        teacher, student = _answers_up_to(store, "teacher", it), _answers_up_to(store, "student", it)
        instructions = {ins.id: ins for ins in store.instructions(list(judgements))}
        for iid, j in judgements.items():
            ins = instructions.get(iid)
            t, s = teacher.get(iid), student.get(iid)
            rows.append({
                "iteration": it, "id": iid, "verdict": verdict(j, tau),
                "domain": (ins.domain if ins else None) or "-", "task": ins.task if ins else None,
                "origin": ins.origin if ins else None,
                "instruction": ins.prompt if ins else iid,
                "gap": j.gap if j.ok else None,
                "teacher_score": j.teacher_score if j.ok else None,
                "student_score": j.student_score if j.ok else None,
                # (teacher, student) as scored with the teacher's answer shown first, then second
                "scores_teacher_first": [j.teacher_scores[0], j.student_scores[0]] if j.ok else None,  # type: ignore[index]
                "scores_student_first": [j.teacher_scores[1], j.student_scores[1]] if j.ok else None,  # type: ignore[index]
                "referee_teacher_first": j.raw_teacher_first, "referee_student_first": j.raw_student_first,
                "teacher_answer": t.text if t else None, "teacher_finish": t.finish_reason if t else None,
                "student_answer": s.text if s else None, "student_finish": s.finish_reason if s else None,
                "parse_failures": j.parse_failures, "error": j.error,
            })
    return rows


def generated_rows(store: Store, judged: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per kept generated instruction, with the seed it was made from and that seed's verdict."""
    generated = [ins for ins in store.instructions() if ins.origin == "generated"]
    parents = {ins.id: ins for ins in store.instructions(list({g.parent_id for g in generated if g.parent_id}))}
    seed_verdicts = {(r["iteration"], r["id"]): r for r in judged}
    rows = []
    for g in sorted(generated, key=lambda ins: (ins.iteration, ins.mode or "", ins.id)):
        parent = parents.get(g.parent_id or "")
        seen = seed_verdicts.get((g.iteration, g.parent_id))
        rows.append({
            "iteration": g.iteration, "id": g.id, "mode": g.mode or "-", "domain": g.domain or "-",
            "task": g.task, "instruction": g.prompt, "parent_id": g.parent_id,
            "parent": parent.prompt if parent else None, "parent_domain": parent.domain if parent else None,
            "parent_gap": seen["gap"] if seen else None,
        })
    return rows


def write_jsonl_exports(out_dir: Path, judged: Sequence[dict[str, Any]],
                        generated: Sequence[dict[str, Any]]) -> None:
    """Every row, untruncated, beside the report (which links them)."""
    from ..data import write_jsonl

    write_jsonl(out_dir / JUDGED_JSONL, judged)
    write_jsonl(out_dir / GENERATED_JSONL, generated)


def sample(rows: Sequence[dict[str, Any]], cap: int | None = None) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """At most `cap` (default CAP_PER_ITERATION) rows per iteration, chosen by id (a content hash: an even,
    stable sample). Returns the rows kept and, per iteration that was cut, how many it had.
    """
    cap = CAP_PER_ITERATION if cap is None else cap
    by_iteration: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_iteration.setdefault(r["iteration"], []).append(r)
    kept: list[dict[str, Any]] = []
    cut: dict[int, int] = {}
    for it, items in sorted(by_iteration.items()):
        if len(items) > cap:
            cut[it] = len(items)
            items = sorted(items, key=lambda r: r["id"])[:cap]
        kept += items
    return kept, cut


# --------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _text(value: str | None, finish: str | None = None) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    clipped = value if len(value) <= CLIP else value[:CLIP] + " ..."
    cut = '<span class="flag">cut off by max_tokens</span> ' if finish == "length" else ""
    return f'{cut}<div class="txt">{html.escape(clipped)}</div>'


def _pair(pair: list[float] | None) -> str:
    return "-" if pair is None else f"{_num(pair[0])} / {_num(pair[1])}"


def _options(values: Sequence[str]) -> str:
    return "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)


def _controls(kind: str, iterations: Sequence[int], groups: Sequence[str], group_name: str,
              domains: Sequence[str]) -> str:
    boxes = "".join(f'<label><input type="checkbox" class="f-group" value="{_e(g)}" checked> {_e(g)}</label>'
                    for g in groups)
    return (f'<div class="controls" data-for="{kind}">'
            f'<label>iteration <select class="f-iteration"><option value="">all</option>'
            f'{_options([str(i) for i in iterations])}</select></label>'
            f'<span class="group">{group_name}: {boxes}</span>'
            f'<label>domain <select class="f-domain"><option value="">all</option>{_options(domains)}</select></label>'
            f'<label>search <input type="search" class="f-text" placeholder="words in the instruction"></label>'
            f'<span class="count" aria-live="polite"></span></div>')


def judged_table_html(rows: Sequence[dict[str, Any]]) -> str:
    iterations = sorted({r["iteration"] for r in rows})
    domains = sorted({r["domain"] for r in rows})
    head = ("<tr><th>it.</th><th>verdict</th><th>domain</th>"
            '<th class="sortable" data-key="gap" title="click to sort">gap &#x21C5;</th>'
            "<th>teacher score<br><small>T first / S first</small></th>"
            "<th>student score<br><small>T first / S first</small></th>"
            "<th>instruction</th><th>teacher answer</th><th>student answer</th><th>referee replies</th></tr>")
    body = []
    for r in rows:
        t_pair = [r["scores_teacher_first"][0], r["scores_student_first"][0]] if r["scores_teacher_first"] else None
        s_pair = [r["scores_teacher_first"][1], r["scores_student_first"][1]] if r["scores_teacher_first"] else None
        referee = (f'<details><summary>both orders</summary><div class="label">teacher first</div>'
                   f'{_text(r["referee_teacher_first"])}<div class="label">student first</div>'
                   f'{_text(r["referee_student_first"])}</details>')
        if r["error"]:
            referee = f'<span class="flag">{_e(r["error"])}</span>' + referee
        gap = "" if r["gap"] is None else f"{r['gap']:g}"
        body.append(
            f'<tr data-iteration="{r["iteration"]}" data-group="{_e(r["verdict"])}" data-domain="{_e(r["domain"])}" '
            f'data-gap="{gap}"><td class="num">{r["iteration"]}</td>'
            f'<td><span class="tag {_e(r["verdict"])}">{_e(r["verdict"])}</span></td><td>{_e(r["domain"])}</td>'
            f'<td class="num">{_num(r["gap"])}</td><td class="num">{_pair(t_pair)}</td>'
            f'<td class="num">{_pair(s_pair)}</td><td class="instr">{_text(r["instruction"])}</td>'
            f'<td>{_text(r["teacher_answer"], r["teacher_finish"])}</td>'
            f'<td>{_text(r["student_answer"], r["student_finish"])}</td><td>{referee}</td></tr>')
    return (_controls("judged", iterations, ["hard", "easy", "excluded"], "verdict", domains)
            + f'<div class="table-wrap browse"><table id="judged" class="browse"><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def generated_table_html(rows: Sequence[dict[str, Any]]) -> str:
    iterations = sorted({r["iteration"] for r in rows})
    domains = sorted({r["domain"] for r in rows})
    head = ("<tr><th>it.</th><th>mode</th><th>domain</th><th>new instruction</th><th>parent seed</th>"
            '<th class="sortable" data-key="gap" title="click to sort">seed gap &#x21C5;</th></tr>')
    body = []
    for r in rows:
        gap = "" if r["parent_gap"] is None else f"{r['parent_gap']:g}"
        body.append(
            f'<tr data-iteration="{r["iteration"]}" data-group="{_e(r["mode"])}" data-domain="{_e(r["domain"])}" '
            f'data-gap="{gap}"><td class="num">{r["iteration"]}</td>'
            f'<td><span class="tag {_e(r["mode"])}">{_e(r["mode"])}</span></td><td>{_e(r["domain"])}</td>'
            f'<td class="instr">{_text(r["instruction"])}</td><td class="instr">{_text(r["parent"])}</td>'
            f'<td class="num">{_num(r["parent_gap"])}</td></tr>')
    return (_controls("generated", iterations, ["hard", "easy"], "mode", domains)
            + f'<div class="table-wrap browse"><table id="generated" class="browse"><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


# Filters rows by their data-* attributes and sorts by gap; no library, no network.
SCRIPT = """
(function () {
  function apply(box) {
    var table = document.getElementById(box.dataset.for);
    var it = box.querySelector('.f-iteration').value, dom = box.querySelector('.f-domain').value;
    var text = box.querySelector('.f-text').value.toLowerCase();
    var groups = {};
    box.querySelectorAll('.f-group').forEach(function (c) { groups[c.value] = c.checked; });
    var shown = 0, rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i], d = r.dataset;
      var instr = r.querySelector('.instr');
      var ok = (!it || d.iteration === it) && (!dom || d.domain === dom) && groups[d.group] !== false &&
               (!text || (instr && instr.textContent.toLowerCase().indexOf(text) >= 0));
      r.hidden = !ok;
      if (ok) shown++;
    }
    box.querySelector('.count').textContent = shown + ' of ' + rows.length + ' rows';
  }
  document.querySelectorAll('.controls').forEach(function (box) {
    box.addEventListener('input', function () { apply(box); });
    box.addEventListener('change', function () { apply(box); });
    apply(box);
  });
  document.querySelectorAll('th.sortable').forEach(function (th) {
    th.addEventListener('click', function () {
      var body = th.closest('table').tBodies[0];
      var down = th.dataset.dir !== 'desc';
      th.dataset.dir = down ? 'desc' : 'asc';
      var key = function (r) { var v = parseFloat(r.dataset.gap); return isNaN(v) ? -Infinity : v; };
      Array.prototype.slice.call(body.rows)
        .sort(function (a, b) { return down ? key(b) - key(a) : key(a) - key(b); })
        .forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""


def cut_note(kind: str, cut: dict[int, int], shown_per_iteration: int, export: str) -> str:
    if not cut:
        return f"All {kind} are shown; the same rows, untruncated, are in {export}."
    where = ", ".join(f"iteration {it}: {n}" for it, n in sorted(cut.items()))
    return (f"Big run: {shown_per_iteration} {kind} per iteration are shown, an even sample by id ({where} in all); "
            f"every row is in {export}.")

