"""`lionkd export` of a distill run: one training record per stored pseudo-target.

A distill run's inputs are not in its store: they are read again from the data files named in the
run's config.yaml, and matched to the stored pseudo-targets by their ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import UserError
from ..store import Store
from .task_data import load_task_data


def export_records(run_dir: Path, store: Store, chat: bool = False) -> list[dict[str, Any]]:
    """One training record per stored pseudo-target: its input (read again from the run's data files) as the
    instruction or user turn, the pseudo-target as the output or assistant turn, and its provenance.

    Errors (no pseudo-targets, data files changed or gone) are one line naming the file or key.
    """
    pts = store.pseudo_targets()
    if not pts:
        raise UserError(f"{run_dir}: this distill run has no pseudo-targets to export (kd.pt_method: none, or the "
                        "pseudo_targets stage has not run)")
    cfg = load_config(run_dir / "config.yaml")
    inputs = {x.id: x for x in load_task_data(cfg).pt_inputs()}
    missing = {p.input_id for p in pts} - set(inputs)
    if missing:
        raise UserError(f"{run_dir / 'config.yaml'}: kd.labeled / kd.unlabeled: {len(missing)} inputs of the stored "
                        "pseudo-targets are no longer in the data files")
    out = []
    for p in sorted(pts, key=lambda p: (p.input_id, p.method, p.index)):
        x = inputs[p.input_id]
        messages = x.messages or [{"role": "user", "content": x.source_text()}]
        where = {"input_id": p.input_id, "k": p.index, "method": p.method, "teacher": p.teacher}
        if chat:
            out.append({"messages": [*messages, {"role": "assistant", "content": p.text}], **where})
        else:
            out.append({"instruction": x.source_text(), "input": "", "output": p.text, **where})
    return out
