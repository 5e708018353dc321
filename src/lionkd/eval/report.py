"""`lionkd report RUN_DIR`: a self-contained HTML page (and Markdown beside it) about one run.

It reads only what the run left behind: the run store (pools, verdicts, per-iteration metrics,
stages, the call ledger), the saved `config.yaml`, and any evaluation results (`eval*.json`). Every
metric the pipelines recorded is shown, whatever its name; plots are PNGs embedded as data URIs so
the page opens anywhere, offline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SECRET_MASK, Price
from ..errors import UserError
from ..store import STORE_NAME, Store

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
ASSETS_DIR = "report_assets"


# --------------------------------------------------------------------------- building blocks


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    name: str  # file stem, for the Markdown copy
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    anchor: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: str | None = None  # a preformatted block (the configuration)
    examples: list[dict[str, str]] = field(default_factory=list)  # labelled texts, shown side by side


def fmt(value: Any) -> str:
    """A cell: numbers with a sensible number of digits, lists and mappings as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if value == int(value) and abs(value) < 1e12:
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _cell_md(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    lines = [f"**{table.title}**", ""] if table.title else []
    lines.append("| " + " | ".join(table.headers) + " |")
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{html.escape(fmt(c))}</td>' if _is_number(c) else f"<td>{html.escape(fmt(c))}</td>"
            for c in row
        ) + "</tr>"
        for row in table.rows
    )
    caption = f"<caption>{html.escape(table.title)}</caption>" if table.title else ""
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>{note}'


# --------------------------------------------------------------------------- evaluation results


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


# --------------------------------------------------------------------------- configuration


def load_masked_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's saved config.yaml, with any secret value the environment holds masked."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        return None
    env_names: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "api_key_env" and isinstance(v, str):
                    env_names.add(v)
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(data)
    secrets = [s for s in (os.environ.get(name) for name in env_names) if s]

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            if re.fullmatch(r"(api_)?key|secret|token|password", key, re.IGNORECASE):
                return SECRET_MASK
            for s in secrets:
                node = node.replace(s, SECRET_MASK)
        return node

    return scrub(data)


# --------------------------------------------------------------------------- plots


# Families of per-iteration metrics, drawn one figure each (first match wins).
FAMILIES: list[tuple[str, str, str]] = [
    ("accuracy", "Accuracy and task scores per iteration", r"acc|exact|rouge|bleu|correct"),
    ("loss", "Training loss per iteration", r"loss|perplexity|ppl"),
    ("scores", "Referee scores and gap per iteration", r"score|gap|mean"),
    ("rates", "Ratios and rates per iteration", r"ratio|rate|agree|fraction|share|frac"),
    ("counts", "Counts per iteration", r""),
]


def metric_series(metrics: dict[int, dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Numeric series by name over iterations; a mapping of numbers becomes one series per key."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for iteration, values in metrics.items():
        for name, value in values.items():
            if _is_number(value):
                series[name][iteration] = float(value)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if _is_number(v):
                        series[f"{name}[{sub}]"][iteration] = float(v)
    return dict(series)


def _family(name: str) -> str:
    base = name.split("[")[0].lower()
    return next(key for key, _, pattern in FAMILIES if re.search(pattern, base))


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def line_plot(title: str, series: dict[str, dict[int, float]], xlabel: str = "iteration") -> bytes:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    for name, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", linewidth=1.6, markersize=4, label=name)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    all_x = sorted({x for points in series.values() for x in points})
    if all_x:
        ax.set_xticks(all_x)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best", ncol=2 if len(series) > 6 else 1)
    return _png(fig)


def bar_plot(title: str, values: dict[str, float], ylabel: str = "") -> bytes:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    names = list(values)
    ax.bar(range(len(names)), [values[n] for n in names], color="#4c78a8")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                       fontsize=8)
    ax.set_title(title, fontsize=11)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def dynamics_figures(metrics: dict[int, dict[str, Any]]) -> list[Figure]:
    grouped: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
    for name, points in metric_series(metrics).items():
        grouped[_family(name)][name] = points
    figures = []
    for key, title, _ in FAMILIES:
        if grouped.get(key):
            figures.append(Figure(f"dynamics-{key}", title, line_plot(title, grouped[key])))
    return figures


# --------------------------------------------------------------------------- sections


def _usage_sections(store: Store, config: dict[str, Any] | None) -> Section:
    prices: dict[str, Price] = {}
    for role, endpoint in (config or {}).items():
        if isinstance(endpoint, dict) and isinstance(endpoint.get("price"), dict):
            try:
                prices[role] = Price(**endpoint["price"])
            except (TypeError, ValueError):
                continue
    rows = store.usage()
    per_role: dict[str, Counter[str]] = defaultdict(Counter)
    detail = []
    total_cost = 0.0
    for r in rows:
        role = r["role"] or "-"
        price = prices.get(role)
        cost = price.cost(r["prompt_tokens"] or 0, r["completion_tokens"] or 0) if price else None
        total_cost += cost or 0.0
        for key in ("calls", "failures", "prompt_tokens", "completion_tokens"):
            per_role[role][key] += r[key] or 0
        per_role[role]["cost"] += cost or 0.0
        per_role[role]["priced"] += int(price is not None)
        detail.append([r["iteration"], role, r["model"], r["calls"], r["failures"], r["prompt_tokens"],
                       r["completion_tokens"], cost])
    section = Section("Calls, tokens and cost", "usage")
    if not rows:
        section.text = "No model calls were recorded in this run's ledger."
        return section
    role_rows = [[role, c["calls"], c["failures"], c["prompt_tokens"], c["completion_tokens"],
                  c["cost"] if c["priced"] else None] for role, c in sorted(per_role.items())]
    role_rows.append(["total", *(sum(r[i] for r in role_rows) for i in range(1, 5)),
                      total_cost if prices else None])
    headers = ["role", "calls", "failures", "tokens in", "tokens out", "cost $"]
    section.tables.append(Table("Per role", headers, role_rows,
                                "Only calls actually sent; a cached reuse costs nothing. Prices from config.yaml "
                                "(US$ per 1M tokens); '-' where the role has no price."))
    section.tables.append(Table("Per iteration", ["iteration", "role", "model", *headers[1:]], detail))
    tokens = {role: float(c["prompt_tokens"] + c["completion_tokens"]) for role, c in sorted(per_role.items())}
    if any(tokens.values()):
        section.figures.append(Figure("tokens-per-role", "Tokens per role", bar_plot("Tokens per role", tokens, "tokens")))
    return section


def _pool_section(store: Store) -> Section | None:
    iterations = store.pool_iterations()
    instructions = store.instructions()
    if not iterations and not instructions:
        return None
    made: Counter[tuple[int, str]] = Counter()
    for ins in instructions:
        if ins.origin == "generated":
            made[(ins.iteration, ins.mode or "-")] += 1
    rows = []
    for it in sorted({*iterations, *(k[0] for k in made)}):
        rows.append([it, len(store.pool(it, "train")), len(store.pool(it, "cache")),
                     made[(it, "hard")], made[(it, "easy")]])
    origins = Counter(ins.origin for ins in instructions)
    domains = Counter(ins.domain or "-" for ins in instructions)
    section = Section("Instruction pools", "pools",
                      text=f"{len(instructions)} instructions: {origins['seed']} seeds, "
                           f"{origins['generated']} generated.")
    section.tables.append(Table("Pools per iteration", ["iteration", "train pool", "cache pool",
                                                         "generated from hard seeds", "generated from easy seeds"],
                                rows, "Generated instructions are counted at the iteration recorded on them."))
    if len(domains) > 1:
        section.tables.append(Table("Instructions per domain", ["domain", "instructions"],
                                    [[d, n] for d, n in domains.most_common()]))
    return section


def _verdict_section(store: Store) -> Section | None:
    rows = []
    examples: list[dict[str, str]] = []
    last = None
    for it in store.pool_iterations():
        verdicts = store.judgements(it)
        if not verdicts:
            continue
        ok = [j for j in verdicts.values() if j.ok]
        agree = [j.orders_agree for j in ok]
        rows.append([
            it, len(verdicts), len(ok), sum(j.parse_failures for j in verdicts.values()),
            sum(j.teacher_score for j in ok) / len(ok) if ok else None,
            sum(j.student_score for j in ok) / len(ok) if ok else None,
            sum(j.gap for j in ok) / len(ok) if ok else None,
            sum(agree) / len(agree) if agree else None,
        ])
        last = (it, ok)
    if not rows:
        return None
    section = Section("Referee verdicts", "verdicts")
    section.tables.append(Table("Discrimination per iteration", [
        "iteration", "instructions", "judged", "unreadable replies", "teacher mean", "student mean", "mean gap",
        "order agreement"], rows, "Scores 1-10, each the mean of both answer orders."))
    if last and last[1]:
        it, ok = last
        hardest = sorted(ok, key=lambda j: j.gap, reverse=True)[:3]
        teacher = store.responses("teacher", it)
        student = store.responses("student", it)
        texts = {ins.id: ins.prompt for ins in store.instructions([j.instruction_id for j in hardest])}
        for j in hardest:
            examples.append({
                "title": f"iteration {it}: gap {fmt(j.gap)} (teacher {fmt(j.teacher_score)}, "
                         f"student {fmt(j.student_score)})",
                "instruction": texts.get(j.instruction_id, j.instruction_id),
                "teacher": teacher[j.instruction_id].text if j.instruction_id in teacher else "-",
                "student": student[j.instruction_id].text if j.instruction_id in student else "-",
            })
        section.examples = examples
    return section


def _dynamics_section(store: Store) -> Section | None:
    metrics = store.metrics()
    if not metrics:
        return None
    # a mapping (e.g. accuracy per domain) is shown one key per row, as in the plots
    flat: dict[int, dict[str, Any]] = defaultdict(dict)
    for it, values in metrics.items():
        for name, value in values.items():
            if isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
                flat[it].update({f"{name}[{k}]": v for k, v in value.items()})
            else:
                flat[it][name] = value
    names = sorted({name for values in flat.values() for name in values})
    iterations = sorted(metrics)
    rows = [[name, *(flat[it].get(name) for it in iterations)] for name in names]
    section = Section("Learning dynamics", "dynamics")
    section.tables.append(Table("Metrics per iteration", ["metric", *(f"iteration {it}" for it in iterations)], rows))
    section.figures = dynamics_figures(metrics)
    return section


def _stage_section(store: Store) -> Section | None:
    stages = store.stages()
    if not stages:
        return None
    rows = []
    for s in stages:
        when = dt.datetime.fromtimestamp(s["finished_at"], tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        detail = ", ".join(f"{k}={fmt(v)}" for k, v in s["detail"].items())
        rows.append([s["iteration"], s["stage"], when, detail[:300]])
    return Section("Stages", "stages", tables=[Table("Finished stages", ["iteration", "stage", "finished (UTC)",
                                                                          "detail"], rows)])


def _pseudo_target_section(store: Store) -> Section | None:
    targets = store.pseudo_targets()
    if not targets:
        return None
    per_method = Counter((p.method, p.teacher) for p in targets)
    inputs = len({p.input_id for p in targets})
    rows = [[method, teacher, n] for (method, teacher), n in sorted(per_method.items())]
    return Section("Pseudo-targets", "pseudo-targets", text=f"{len(targets)} pseudo-targets for {inputs} inputs.",
                   tables=[Table("Pseudo-targets per method", ["method", "teacher", "count"], rows)])


def eval_files(run_dir: Path) -> list[Path]:
    """Evaluation results of a run: eval*.json in it or in one of its eval* folders."""
    found = {*run_dir.glob("eval*.json"), *run_dir.glob("eval*/eval*.json")}
    return sorted(p for p in found if p.is_file())


def _eval_sections(run_dir: Path) -> list[Section]:
    sections = []
    for path in eval_files(run_dir):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(results, dict):
            continue
        name = str(path.relative_to(run_dir))
        section = Section(f"Evaluation: {name}", "eval-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
                          tables=eval_tables(results))
        judge = results.get("judge") or {}
        per_category = {c: v["relative_score"] for c, v in (judge.get("per_category") or {}).items()
                        if v.get("relative_score") is not None}
        if per_category:
            section.figures.append(Figure(section.anchor + "-judge", "Relative score per category (%)",
                                          bar_plot("Relative score per category (%)", per_category, "%")))
        sections.append(section)
    return sections


def _run_kind(store: Store, config: dict[str, Any] | None) -> str:
    if store.pool_iterations():
        return "Lion adversarial distillation"
    kd = (config or {}).get("kd") or {}
    if store.pseudo_targets() or (kd.get("labeled") or {}).get("path"):
        return "task-specific KD"
    return "run"


def collect_sections(run_dir: Path) -> tuple[str, list[Section]]:
    """The report's kind of run and its sections, in reading order."""
    config = load_masked_config(run_dir)
    with Store.open_existing(run_dir) as store:
        kind = _run_kind(store, config)
        sections: list[Section | None] = [
            _dynamics_section(store),
            _verdict_section(store),
            _pool_section(store),
            _pseudo_target_section(store),
            _usage_sections(store, config),
            _stage_section(store),
        ]
        changes = store.config_changes()
    sections += _eval_sections(run_dir)
    if config is not None:
        section = Section("Configuration", "config", text="The run's saved config.yaml (secrets masked).",
                          code=yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        if changes:
            section.text += " The run started with other values of the keys below, changed by a rerun with " \
                            "--allow-config-change; config.yaml shows the values after the last change."
            rows = [[c["key"], json.dumps(c["old"]), json.dumps(c["new"]), c["after"]] for c in changes]
            section.tables.append(Table("Config changes applied to this run", ["key", "was", "became", "applied"],
                                        rows))
        sections.append(section)
    return kind, [s for s in sections if s is not None]


# --------------------------------------------------------------------------- rendering

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #ffffff; --alt: #f6f8fa; --accent: #2f6fb5; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #14324f; color: #fff; padding: 28px 40px 20px; }
header h1 { margin: 0 0 4px; font-size: 24px; }
header p { margin: 0; color: #c9d6e3; }
nav { padding: 10px 40px; border-bottom: 1px solid var(--line); background: var(--alt); font-size: 14px; }
nav a { color: var(--accent); margin-right: 16px; text-decoration: none; white-space: nowrap; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 40px 48px; }
section { margin-top: 32px; }
h2 { font-size: 20px; border-bottom: 2px solid var(--line); padding-bottom: 6px; }
.table-wrap { overflow-x: auto; margin: 12px 0; }
table { border-collapse: collapse; font-size: 13.5px; min-width: 40%; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
th { background: var(--alt); font-weight: 600; }
tbody tr:nth-child(even) { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: var(--muted); font-size: 13px; margin: 2px 0 12px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
pre { background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 12px; overflow-x: auto;
      font-size: 12.5px; }
.example { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; }
.example h3 { margin: 0; padding: 6px 12px; font-size: 14px; background: var(--alt); border-bottom: 1px solid var(--line); }
.example .body { display: grid; grid-template-columns: 1fr 1fr; gap: 0; }
.example .cell { padding: 8px 12px; white-space: pre-wrap; font-size: 13px; }
.example .full { grid-column: 1 / span 2; border-bottom: 1px solid var(--line); }
.example .label { display: block; font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 24px; }
"""


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def render_html(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    parts = []
    for s in sections:
        body = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>']
        if s.text:
            body.append(f"<p>{html.escape(s.text)}</p>")
        body += [html_table(t) for t in s.tables]
        if s.figures:
            body.append('<div class="figures">')
            for f in s.figures:
                uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
                body.append(f'<figure><img src="{uri}" alt="{html.escape(f.caption)}">'
                            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
            body.append("</div>")
        for ex in s.examples:
            body.append(
                f'<div class="example"><h3>{html.escape(ex["title"])}</h3><div class="body">'
                f'<div class="cell full"><span class="label">instruction</span>{html.escape(_clip(ex["instruction"]))}</div>'
                f'<div class="cell"><span class="label">teacher</span>{html.escape(_clip(ex["teacher"]))}</div>'
                f'<div class="cell"><span class="label">student</span>{html.escape(_clip(ex["student"]))}</div>'
                "</div></div>"
            )
        if s.code is not None:
            body.append(f"<pre>{html.escape(s.code)}</pre>")
        body.append("</section>")
        parts.append("".join(body))
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main>"
        "<footer>Generated by lionkd report.</footer></body></html>\n"
    )


def render_markdown(title: str, subtitle: str, sections: Sequence[Section], assets: str) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        for t in s.tables:
            lines += [markdown_table(t), ""]
        for f in s.figures:
            lines += [f"![{f.caption}]({assets}/{f.name}.png)", ""]
        for ex in s.examples:
            lines += [f"**{ex['title']}**", "", f"- instruction: {_clip(ex['instruction'], 300)}",
                      f"- teacher: {_clip(ex['teacher'], 300)}", f"- student: {_clip(ex['student'], 300)}", ""]
        if s.code is not None:
            lines += ["```yaml", s.code.rstrip(), "```", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md (with its PNGs in report_assets/) for a run.

    Returns (html_path, md_path).
    """
    run_dir = Path(run_dir)
    if not (run_dir / STORE_NAME).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {STORE_NAME})")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    kind, sections = collect_sections(run_dir)
    title = f"lionkd report: {run_dir.resolve().name}"
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{kind} - {run_dir.resolve()} - generated {now}"
    html_path, md_path = out / REPORT_HTML, out / REPORT_MD
    html_path.write_text(render_html(title, subtitle, sections), encoding="utf-8")
    figures = [f for s in sections for f in s.figures]
    if figures:
        assets = out / ASSETS_DIR
        assets.mkdir(exist_ok=True)
        for f in figures:
            (assets / f"{f.name}.png").write_bytes(f.png)
    md_path.write_text(render_markdown(title, subtitle, sections, ASSETS_DIR), encoding="utf-8")
    return html_path, md_path
