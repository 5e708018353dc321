"""The task data of a distill run: labeled, unlabeled and evaluation examples read from the files the
config names (`kd.labeled`, `kd.unlabeled`, `kd.eval`), with a seeded held-out slice when `kd.eval`
is null. Read again on every rerun and export; the run store keeps only their fingerprint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import DataConfig, RunConfig
from ..data import load_table
from ..errors import UserError
from ..kd.examples import TrainExample
from ..records import content_id


@dataclass
class TaskData:
    """The examples of one run. Unlabeled inputs (and PT inputs) carry an empty target."""

    labeled: list[TrainExample]
    unlabeled: list[TrainExample]
    eval: list[TrainExample]
    eval_source: str  # "kd.eval" or "held out from kd.labeled"

    @property
    def fingerprint(self) -> str:
        return content_id(*(e.id for e in self.labeled), "|", *(e.id for e in self.unlabeled), "|",
                          *(e.id for e in self.eval))

    def pt_inputs(self) -> list[TrainExample]:
        """Every distinct input of labeled and unlabeled rows, without its target."""
        seen: dict[str, TrainExample] = {}
        for e in (*self.labeled, *self.unlabeled):
            x = as_input(e)
            seen.setdefault(x.id, x)
        return list(seen.values())



def as_input(example: TrainExample) -> TrainExample:
    return TrainExample(target="", messages=example.messages, prompt=example.prompt, source="input")


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def read_examples(data: DataConfig, key: str, *, need_target: bool) -> list[TrainExample]:
    """Rows of `data` as examples; errors name the config key (`kd.labeled`, ...)."""
    if not data.path:
        raise UserError(f"{key}.path: lionkd distill needs a data file or dataset name here")
    columns = {"input": data.input_column}
    if need_target:
        columns["target"] = data.target_column
    try:
        rows = load_table(data.path, data.split, columns)
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    rows = rows[: data.limit] if data.limit else rows
    if not rows:
        raise UserError(f"{key}: {data.path}: no rows")
    out = []
    for number, row in enumerate(rows, start=1):
        text = row["input"]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{key}: {data.path}: row {number}: column '{data.input_column}' is empty or not text")
        target = row.get("target") if need_target else ""
        if need_target and (target is None or not str(target).strip()):
            raise UserError(f"{key}: {data.path}: row {number}: column '{data.target_column}' is empty")
        out.append(TrainExample(target=str(target).strip(), messages=_messages(text.strip())))
    return out


def load_task_data(cfg: RunConfig) -> TaskData:
    kd = cfg.kd
    labeled = read_examples(kd.labeled, "kd.labeled", need_target=True)
    unlabeled = read_examples(kd.unlabeled, "kd.unlabeled", need_target=False) if kd.unlabeled else []
    if kd.eval is not None:
        return TaskData(labeled, unlabeled, read_examples(kd.eval, "kd.eval", need_target=True), "kd.eval")
    held = round(kd.eval_holdout * len(labeled))
    if held == 0 or held >= len(labeled):
        return TaskData(labeled, unlabeled, [], "none")
    order = list(range(len(labeled)))
    random.Random(f"{cfg.seed}-holdout").shuffle(order)
    chosen = set(order[:held])
    train = [e for i, e in enumerate(labeled) if i not in chosen]
    return TaskData(train, unlabeled, [e for i, e in enumerate(labeled) if i in chosen], "held out from kd.labeled")
