"""`lionkd report RUN_DIR`: a self-contained HTML page (and Markdown beside it) about one run.

It reads only what the run left behind: the run store (pools, verdicts, per-iteration metrics,
stages, the call ledger), the training folders' train_metrics.json, the saved `config.yaml`, and
any evaluation results (`eval*.json`). The page opens anywhere, offline: plots are PNGs embedded as
data URIs, the hard-set table is filtered by a small inline script. Reading order: the headline,
the plots, the hard set (Lion) or pseudo-targets, training and student vs teacher (distill), then
the ledger, stages, evaluations, configuration and, last, every recorded metric.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import SECRET_MASK, LionConfig
from ..errors import UserError
from ..store import STORE_NAME, Store
from . import distill_sections, lion_sections
from .blocks import (
    Figure,
    Ledger,
    Section,
    Table,
    anchor,
    fmt,
    html_table,
    ledger,
    markdown_table,
    metric_label,
)
from .distill_run import is_distill_run
from .eval_tables import eval_tables
from .hard_set import SCRIPT

REPORT_HTML = "report.html"
REPORT_MD = "report.md"
ASSETS_DIR = "report_assets"


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


# --------------------------------------------------------------------------- sections


def _usage_section(led: Ledger) -> Section:
    section = Section("Calls, tokens and cost", "usage")
    if not led.per_role:
        section.text = "No model calls were recorded in this run's ledger."
        return section
    section.tables.append(lion_sections.usage_table(led, "Per role"))
    rows = [[it, role, v["calls"], v["failures"], v["prompt_tokens"], v["completion_tokens"],
             v["cost"] if role in led.priced else None]
            for it, roles in sorted(led.per_iteration.items()) for role, v in sorted(roles.items())]
    section.tables.append(Table("Per iteration", ["iteration", "role", "calls", "failures", "tokens in", "tokens out",
                                                  "cost $"], rows))
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


def metrics_section(metrics: dict[int, dict[str, Any]]) -> Section | None:
    """Every metric the pipelines recorded, one row each with a readable label, mappings one key per row."""
    if not metrics:
        return None
    flat: dict[int, dict[str, Any]] = defaultdict(dict)
    for it, values in metrics.items():
        for name, value in values.items():
            if isinstance(value, dict):
                if not value:
                    flat[it][name] = "none"
                for k, v in value.items():
                    flat[it][f"{name}[{k}]"] = v
            else:
                flat[it][name] = value
    names = sorted({name for values in flat.values() for name in values}, key=lambda n: metric_label(n))
    iterations = sorted(metrics)
    rows = [[metric_label(name), *(flat[it].get(name) for it in iterations)] for name in names]
    section = Section("All recorded metrics", "metrics")
    section.tables.append(Table("Metrics per iteration", ["metric", *(f"iteration {it}" for it in iterations)], rows,
                                "As the run store holds them (rates as fractions of 1); the report's plots draw "
                                "the main ones."))
    return section


def eval_files(run_dir: Path) -> list[Path]:
    """Evaluation results of a run: eval*.json in it or in one of its eval* folders."""
    found = {*run_dir.glob("eval*.json"), *run_dir.glob("eval*/eval*.json")}
    return sorted(p for p in found if p.is_file())


def load_evaluations(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in eval_files(run_dir):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(results, dict):
            out.append((str(path.relative_to(run_dir)), results))
    return out


def _eval_sections(evaluations: list[tuple[str, dict[str, Any]]]) -> list[Section]:
    from .plots import grouped_bars

    sections = []
    for name, results in evaluations:
        section = Section(f"Evaluation: {name}", "eval-" + anchor(name), tables=eval_tables(results))
        judge = results.get("judge") or {}
        per_category = {c: v["relative_score"] for c, v in (judge.get("per_category") or {}).items()
                        if v.get("relative_score") is not None}
        if per_category:
            png = grouped_bars("Judge score per category", {c: {"student": v} for c, v in per_category.items()},
                               "% of the reference")
            if png is not None:
                section.figures.append(Figure(section.anchor + "-judge", "Where is the student weakest? Judge score "
                                              "per category, relative to the reference answers (%).", png))
        sections.append(section)
    return sections


def _config_section(config: dict[str, Any], store: Store) -> Section:
    changes = store.config_changes()
    section = Section("Configuration", "config", text="The run's saved config.yaml (secrets masked).",
                      code=yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if changes:
        section.text += " The run started with other values of the keys below, changed by a rerun with " \
                        "--allow-config-change; config.yaml shows the values after the last change."
        rows = [[c["key"], json.dumps(c["old"]), json.dumps(c["new"]), c["after"]] for c in changes]
        section.tables.append(Table("Config changes applied to this run", ["key", "was", "became", "applied"], rows))
    return section


def collect_sections(run_dir: Path, out_dir: Path | None = None) -> tuple[str, list[Section]]:
    """The report's kind of run and its sections, in reading order.

    A Lion run's full hard-set lists are written to `out_dir` (default: the run directory).
    """
    config = load_masked_config(run_dir)
    evaluations = load_evaluations(run_dir)
    tau = float(((config or {}).get("lion") or {}).get("tau", LionConfig.model_fields["tau"].default))
    with Store.open_existing(run_dir) as store:
        led = ledger(store.usage(), config)
        distill = is_distill_run(store, config)
        sections: list[Section | None]
        if distill:
            kind = "task-specific KD (lionkd distill)"
            sections = [distill_sections.headline(run_dir, store, led, evaluations, config),
                        *distill_sections.sections(run_dir, store, evaluations, config), _usage_section(led)]
        else:
            kind = "Lion adversarial distillation" if store.pool_iterations() else "run"
            head = lion_sections.headline(run_dir, store, led, evaluations, tau)
            plots = Section("At a glance", "plots", figures=lion_sections.figures(store, run_dir, led))
            sections = [head, plots if plots.figures else None,
                        lion_sections.hard_set_section(store, out_dir or run_dir, tau),
                        lion_sections.pool_section(store), _usage_section(led), _stage_section(store)]
        sections += _eval_sections(evaluations)
        if config is not None:
            sections.append(_config_section(config, store))
        sections.append(metrics_section(store.metrics()))
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
.headline { border: 1px solid var(--line); border-left: 4px solid var(--accent); border-radius: 6px; padding: 8px 16px;
            background: #fbfcfe; }
.headline dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 8px 0; }
.headline dt { font-weight: 600; color: var(--muted); }
.headline dd { margin: 0; }
.warnings { border: 1px solid #e5c07b; background: #fff8e6; border-radius: 6px; padding: 8px 16px; margin: 12px 0; }
.warnings ul { margin: 4px 0; padding-left: 20px; }
.alerts { border: 1px solid #c0392b; background: #fdecea; color: #8e1b10; border-radius: 6px; padding: 8px 16px; margin: 12px 0; }
.ok { color: #1a7f37; }
.controls { display: flex; flex-wrap: wrap; gap: 8px 18px; align-items: center; margin: 8px 0; font-size: 13.5px;
            background: var(--alt); border: 1px solid var(--line); border-radius: 6px; padding: 6px 10px; }
.controls .count { color: var(--muted); margin-left: auto; }
.browse { max-height: 760px; overflow: auto; }
table.browse { font-size: 12.5px; }
table.browse td { max-width: 340px; }
table.browse thead th { position: sticky; top: 0; z-index: 1; }
th.sortable { cursor: pointer; text-decoration: underline dotted; }
.txt { white-space: pre-wrap; max-height: 11em; overflow: auto; word-break: break-word; }
.tag { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #eee; }
.tag.hard { background: #fde2e1; color: #8a1c1c; } .tag.easy { background: #dcf3e0; color: #1d5b2a; }
.tag.excluded { background: #eee; color: #555; }
.flag { color: #9a6700; font-size: 12px; }
.muted { color: var(--muted); }
details summary { cursor: pointer; color: var(--accent); }
.label { font-weight: 600; color: var(--muted); font-size: 11.5px; text-transform: uppercase; margin-top: 4px; }
footer { color: var(--muted); font-size: 12px; text-align: center; padding: 24px; }
"""



def _headline_html(s: Section) -> str:
    facts = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in s.facts)
    if s.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in s.warnings)
        warn = f'<div class="warnings" id="warnings"><strong>Warnings</strong><ul>{items}</ul></div>'
    else:
        warn = '<p class="ok" id="warnings">No warnings: every verdict was readable, no answer was cut off.</p>' \
            if s.anchor == "headline" else ""
    alerts = "".join(f"<li>{html.escape(a)}</li>" for a in s.alerts)
    alert = f'<div class="alerts" id="alerts"><strong>Results rest on too little</strong><ul>{alerts}</ul></div>' \
        if alerts else ""
    return f'<div class="headline"><dl>{facts}</dl></div>{alert}{warn}'


def render_html(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    parts = []
    for s in sections:
        body = [f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>']
        if s.facts or s.warnings or s.alerts:
            body.append(_headline_html(s))
        if s.text:
            body.append(f"<p>{html.escape(s.text)}</p>")
        if s.figures:
            body.append('<div class="figures">')
            for f in s.figures:
                uri = "data:image/png;base64," + base64.b64encode(f.png).decode("ascii")
                body.append(f'<figure id="fig-{f.name}"><img src="{uri}" alt="{html.escape(f.caption)}">'
                            f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
            body.append("</div>")
        body += [html_table(t) for t in s.tables]
        if s.html:
            body.append(s.html)
        if s.code is not None:
            body.append(f"<pre>{html.escape(s.code)}</pre>")
        body.append("</section>")
        parts.append("".join(body))
    script = f"<script>{SCRIPT}</script>" if any(s.html for s in sections) else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main>"
        f"<footer>Generated by lionkd report.</footer>{script}</body></html>\n"
    )


def render_markdown(title: str, subtitle: str, sections: Sequence[Section], assets: str) -> str:
    lines = [f"# {title}", "", subtitle, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        lines += [f"- **{k}**: {v}" for k, v in s.facts]
        if s.facts:
            lines.append("")
        if s.alerts:
            lines += ["**Results rest on too little**", "", *(f"- {a}" for a in s.alerts), ""]
        if s.warnings:
            lines += ["**Warnings**", "", *(f"- {w}" for w in s.warnings), ""]
        if s.text:
            lines += [s.text, ""]
        for f in s.figures:
            lines += [f"![{f.caption}]({assets}/{f.name}.png)", ""]
        for t in s.tables:
            lines += [markdown_table(t), ""]
        if s.markdown:
            lines += [s.markdown, ""]
        if s.code is not None:
            lines += ["```yaml", s.code.rstrip(), "```", ""]
    return "\n".join(lines)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md (with its PNGs in report_assets/) for a run.

    A Lion run also gets hard-set.jsonl and generated.jsonl beside them, which the page links.
    Returns (html_path, md_path).
    """
    run_dir = Path(run_dir)
    if not (run_dir / STORE_NAME).is_file():
        raise UserError(f"{run_dir}: not a run directory (no {STORE_NAME})")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    kind, sections = collect_sections(run_dir, out)
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
