"""Reading and writing data files: instruction pools (Alpaca JSON/JSONL, chat-messages JSONL),
Hugging Face `datasets`, and tables of examples (JSON/JSONL/CSV/Parquet or a hub dataset name).

A malformed line is an error naming the file and line number; with `skip_bad=True` it is skipped
and counted instead. Nothing is written anywhere until a whole file has been read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .records import Instruction


@dataclass
class ReadReport:
    """What a read kept and what it skipped (only with skip_bad=True)."""

    read: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def read_utf8(path: str | Path) -> str:
    """A text file's content; one that is not UTF-8 is an error naming the line of the first bad byte.
    A UTF-8 byte order mark (which some editors write) is dropped."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                        "save the file as UTF-8") from None


def _json_lines(path: Path, text: str, skip_bad: bool, report: ReadReport) -> Iterator[tuple[int, Any]]:
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and other characters splitlines breaks at
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            if not skip_bad:
                raise UserError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
            report.skipped.append((number, f"not valid JSON ({exc.msg})"))


def read_json_records(path: str | Path, skip_bad: bool = False, report: ReadReport | None = None
                      ) -> list[tuple[int, Any]]:
    """(line number, value) for each record of a JSON array file or a JSONL file."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = read_utf8(path)
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        lines = _array_item_lines(text, len(values))
        return list(zip(lines, values, strict=True))
    if text.lstrip().startswith("{") and "\n" in text.strip():
        # One object spread over several lines is a JSON document, not JSONL: say what is wrong with it.
        try:
            single = json.loads(text)
        except json.JSONDecodeError:
            single = None
        if isinstance(single, dict):
            raise UserError(f"{path}: expected a list of records (a JSON array, or JSONL: one object per line), "
                            "got a single JSON object")
    return list(_json_lines(path, text, skip_bad, report))


def _array_item_lines(text: str, count: int) -> list[int]:
    """The line where each top-level item of a JSON array starts (for error messages)."""
    decoder = json.JSONDecoder()
    lines, pos = [], text.index("[") + 1
    line, counted = 1 + text.count("\n", 0, pos), pos  # newlines are counted once, from where the last count ended
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def _instruction_from(value: Any, where: str) -> Instruction:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected an object, got {type(value).__name__}")
    if "messages" in value:
        return _instruction_from_chat(value["messages"], value, where)
    text = value.get("instruction")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: missing key 'instruction' (or 'messages')")
    input_text = value.get("input") or ""
    if not isinstance(input_text, str):
        raise UserError(f"{where}: key 'input' must be a string")
    output = value.get("output")
    return Instruction(
        text=text.strip(), input=input_text.strip(), domain=value.get("domain"), task=value.get("task"),
        reference=output if isinstance(output, str) else None,
    )


def _instruction_from_chat(messages: Any, value: dict[str, Any], where: str) -> Instruction:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise UserError(f"{where}: key 'messages' must be a list of {{role, content}} objects")
    users = [m for m in messages if m["role"] == "user"]
    if not users or not isinstance(users[0].get("content"), str):
        raise UserError(f"{where}: 'messages' has no user message")
    answers = [m for m in messages if m["role"] == "assistant"]
    return Instruction(
        text=users[0]["content"].strip(), domain=value.get("domain"), task=value.get("task"),
        reference=answers[0].get("content") if answers else None,
    )


def read_instructions(path: str | Path, skip_bad: bool = False, report: ReadReport | None = None
                      ) -> list[Instruction]:
    """Instructions from Alpaca JSON/JSONL ({instruction, input, output}) or chat JSONL ({messages})."""
    path = Path(path)
    report = report if report is not None else ReadReport()
    out: list[Instruction] = []
    for number, value in read_json_records(path, skip_bad, report):
        try:
            out.append(_instruction_from(value, f"{path}: line {number}"))
        except UserError as exc:
            if not skip_bad:
                raise
            report.skipped.append((number, str(exc).split(": ", 2)[-1]))
    report.read = len(out)
    return out


def alpaca_record(ins: Instruction, output: str | None = None) -> dict[str, Any]:
    answer = output if output is not None else ins.reference or ""
    rec: dict[str, Any] = {"instruction": ins.text, "input": ins.input, "output": answer}
    for key in ("domain", "task"):
        if getattr(ins, key):
            rec[key] = getattr(ins, key)
    return rec


def chat_record(ins: Instruction, output: str | None = None) -> dict[str, Any]:
    messages = [{"role": "user", "content": ins.prompt}]
    answer = output if output is not None else ins.reference
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write atomically: the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def write_json(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    items = list(records)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(path)
    return len(items)


def to_hf_dataset(records: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(records)


# --------------------------------------------------------------------------- tables of examples


def load_table(source: str, split: str = "train", columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/CSV/Parquet file, or of a Hugging Face dataset by name.

    `columns` maps our names to the file's (e.g. {"input": "document", "target": "summary"}); every
    mapped column must exist, and rows come back under our names.
    """
    path = Path(source)
    if path.exists():
        rows = _local_rows(path)
    elif source.endswith((".json", ".jsonl", ".csv", ".parquet")) or "/" in source and source.startswith((".", "/")):
        raise UserError(f"{source}: file not found")
    else:
        rows = _hub_rows(source, split)
    if not columns:
        return rows
    for number, row in enumerate(rows, start=1):
        missing = [src for src in columns.values() if src not in row]
        if missing:
            raise UserError(f"{source}: row {number}: missing column '{missing[0]}' (columns: {', '.join(row)})")
        break
    return [{ours: row.get(theirs) for ours, theirs in columns.items()} for row in rows]


def _local_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows = []
        for number, value in read_json_records(path):
            if not isinstance(value, dict):
                raise UserError(f"{path}: line {number}: expected an object")
            rows.append(value)
        return rows
    if suffix == ".csv":
        import io

        return list(csv.DictReader(io.StringIO(read_utf8(path), newline="")))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl, .csv or .parquet)")


def _hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        return list(load_dataset(name, split=split))
    except Exception as exc:  # the hub may be unreachable, or the name wrong
        raise UserError(f"{name}: not a local file and could not be loaded as a dataset ({type(exc).__name__})") from None
