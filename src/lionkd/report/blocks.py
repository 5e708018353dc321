"""The pieces a report is made of (tables, figures, sections) and how a cell and a metric name read."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from typing import Any


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
    facts: list[tuple[str, str]] = field(default_factory=list)  # the headline: label, value
    warnings: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)  # results that rest on too little: shown first, in red
    html: str = ""  # a ready block (the browsable hard set), after the tables
    markdown: str = ""  # its stand-in in report.md


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


# How a recorded metric reads in the report; names not listed read with spaces for underscores.
METRIC_LABELS = {
    "hard_ratio": "hard share of judged", "score_gap": "referee gap (teacher - student)",
    "teacher_score": "teacher referee score", "student_score": "student referee score",
    "order_agreement": "referee order agreement", "first_position_advantage": "referee first-position advantage",
    "parse_failures": "unreadable referee replies", "excluded": "excluded from the split",
    "new_instructions": "new instructions kept", "novelty_rejections": "rejected as not novel",
    "filter_rejections": "rejected by filters", "generator_calls": "generator replies asked",
    "generation_rounds": "generation rounds", "seeds_hard": "hard seeds used", "seeds_easy": "easy seeds used",
    "hard_fraction": "hard share of seeds aimed at", "groups": "groups of instructions",
    "train_examples": "training examples", "train_replayed": "replayed examples", "train_loss": "mean training loss",
    "kd_train_loss": "KD mean training loss", "kd_train_steps": "KD training steps",
}
USAGE_PARTS = {"calls": "calls", "prompt_tokens": "tokens in", "completion_tokens": "tokens out",
               "failures": "failed calls", "cost": "cost $"}


def metric_label(name: str) -> str:
    """`usage_referee[prompt_tokens]` -> `referee: tokens in`; `accuracy[words]` -> `accuracy: words`."""
    base, _, sub = name.partition("[")
    sub = sub.rstrip("]")
    if base.startswith("usage_"):
        return f"{base[6:]}: {USAGE_PARTS.get(sub, sub.replace('_', ' '))}"
    label = METRIC_LABELS.get(base, base.replace("_", " "))
    return f"{label}: {sub.replace('_', ' ')}" if sub else label


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class Ledger:
    """The calls a run paid for, per role and per (iteration, role), with cost where config.yaml prices the role."""

    per_role: dict[str, dict[str, float]]
    per_iteration: dict[int, dict[str, dict[str, float]]]  # iteration -> role -> totals
    priced: set[str]

    @property
    def total(self) -> dict[str, float]:
        keys = ("calls", "failures", "prompt_tokens", "completion_tokens", "cost")
        return {k: sum(v.get(k, 0.0) for v in self.per_role.values()) for k in keys}


def ledger(usage_rows: list[dict[str, Any]], config: dict[str, Any] | None) -> Ledger:
    from ..config import Price

    prices: dict[str, Price] = {}
    for role, endpoint in (config or {}).items():
        if isinstance(endpoint, dict) and isinstance(endpoint.get("price"), dict):
            try:
                prices[role] = Price(**endpoint["price"])
            except (TypeError, ValueError):
                continue
    per_role: dict[str, dict[str, float]] = {}
    per_iteration: dict[int, dict[str, dict[str, float]]] = {}
    for r in usage_rows:
        role = r["role"] or "-"
        price = prices.get(role)
        values = {k: float(r[k] or 0) for k in ("calls", "failures", "prompt_tokens", "completion_tokens")}
        values["cost"] = price.cost(r["prompt_tokens"] or 0, r["completion_tokens"] or 0) if price else 0.0
        for target in (per_role.setdefault(role, {}), per_iteration.setdefault(r["iteration"], {}).setdefault(role, {})):
            for k, v in values.items():
                target[k] = target.get(k, 0.0) + v
    return Ledger(per_role, per_iteration, {role for role in per_role if role in prices})
