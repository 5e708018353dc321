"""The report's on-policy section: what the student's own samples and the served teacher's scores did.

Read from the `on_policy` block a training writes into its `train_metrics.json` (`kd/on_policy.py`):
per optimiser step the on-policy loss and the reverse KL (the k1 estimate on the sampled tokens), the
share of sampled positions with a teacher counterpart, and the teacher scoring calls this training
sent and found in the call cache, with their tokens. The calls are also booked to the teacher's role
in the usage table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import plots
from .blocks import Figure, Section, Table

MAX_ROWS = 40  # steps listed in the table; the figure shows them all


def on_policy_section(trainings: Sequence[Any]) -> Section | None:
    """The section for every training (label, metrics) that used the on-policy objective; None if none did."""
    used = [(t.label, t.metrics["on_policy"]) for t in trainings if isinstance(t.metrics.get("on_policy"), dict)]
    if not used:
        return None
    section = Section("On-policy KD", "on-policy")
    rows = []
    for label, op in used:
        scoring = op.get("scoring") or {}
        rows.append([label, op.get("sampler", "hf"), op.get("samples"), op.get("reused"), op.get("aligned_fraction"),
                     scoring.get("calls_sent"), scoring.get("calls_cached"), scoring.get("failed"),
                     scoring.get("prompt_tokens")])
    section.tables.append(Table(
        "Student samples and teacher scoring", ["stage", "sampler", "samples", "reused", "aligned share",
                                                "scoring calls sent", "found cached", "failed", "tokens scored"], rows,
        "'sampler': what wrote the student's samples (hf: the training model; vllm: an engine beside it); "
        "'aligned share': sampled positions with a teacher counterpart (1 for one tokenizer); 'found cached': "
        "scores a rerun or a resumed run did not pay for again; 'tokens scored': prompt tokens the server read."))
    for label, op in used:
        history = op.get("history") or []
        shown = history if len(history) <= MAX_ROWS else history[:: max(1, len(history) // MAX_ROWS)]
        section.tables.append(Table(f"{label}: per optimiser step", ["step", "on-policy loss", "reverse KL (k1)"],
                                    [[int(s) + 1, loss, rkl] for s, loss, rkl in shown]))
        png = plots.loss_curve(f"{label}: on-policy loss and reverse KL per step",
                               [("on-policy loss", [(int(s) + 1, loss) for s, loss, _ in history]),
                                ("reverse KL (k1)", [(int(s) + 1, rkl) for s, _, rkl in history])])
        if png is not None:
            section.figures.append(Figure(f"on-policy-{label}".replace(" ", "-"), "Does the student move toward "
                                          "the teacher on its own samples? On-policy loss, then the reverse KL "
                                          "estimate, per step.", png))
    return section
