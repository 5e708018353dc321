"""The `lionkd` command. Argument parsing, progress display and exit codes only: no logic here.

User errors print one line and exit 2; internal errors exit 1; `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil large language models into small ones.")
config_app = typer.Typer(no_args_is_help=True, help="Work with run configuration files.")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)
_debug = False


def _version(value: bool) -> None:
    if value:
        console.print(f"lionkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


# --------------------------------------------------------------------------- configuration

PRESETS = ("demo", "api", "kd")


@app.command()
def init(preset: Annotated[str, typer.Option(help="demo | api | kd")] = "api") -> None:
    """Print a commented config template."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    sys.stdout.write(resources.files("lionkd.templates").joinpath(f"{preset}.yaml").read_text(encoding="utf-8"))


@config_app.command("check")
def config_check(path: Path) -> None:
    """Validate a config file and print it resolved, secrets masked."""
    from .config import load_config, masked_dump

    cfg = load_config(path)
    console.print(yaml.safe_dump(masked_dump(cfg), sort_keys=False), end="", markup=False, highlight=False)
    for role in ("teacher", "referee", "generator"):
        endpoint = getattr(cfg, role)
        if endpoint.backend == "openai" and endpoint.api_key_env and endpoint.api_key() is None:
            err_console.print(f"note: {role}.api_key_env: ${endpoint.api_key_env} is not set")
    err_console.print(f"{path}: ok")


# --------------------------------------------------------------------------- run state


def _run_prices(run_dir: Path) -> dict[str, Any]:
    """Prices per role from the config a run saved, for costing the ledger."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return {}
    data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    return {role: (data.get(role) or {}).get("price") for role in ("teacher", "referee", "generator")}


def usage_table(rows: list[dict[str, Any]], prices: dict[str, Any]) -> Table:
    table = Table(title="Calls, tokens and cost (calls actually sent; cached reuses cost nothing)")
    for col in ("iteration", "role", "model", "calls", "failures", "tokens in", "tokens out", "cost $"):
        table.add_column(col, justify="right" if col not in ("role", "model") else "left")
    total = 0.0
    for r in rows:
        price = prices.get(r["role"] or "")
        cost = ((r["prompt_tokens"] * price["input"] + r["completion_tokens"] * price["output"]) / 1e6) if price else 0.0
        total += cost
        table.add_row(str(r["iteration"]), str(r["role"]), r["model"], str(r["calls"]), str(r["failures"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), f"{cost:.4f}" if price else "-")
    table.caption = f"total cost: ${total:.4f}"
    return table


@app.command()
def status(run_dir: Path) -> None:
    """Show what each stage of each iteration has done: counts, dynamics, tokens and cost."""
    from .store import Store

    with Store.open_existing(run_dir) as store:
        iterations = sorted({*store.pool_iterations(), *(s["iteration"] for s in store.stages())})
        stages = store.stages()
        metrics = store.metrics()
        table = Table(title=f"Run {run_dir}")
        for col in ("iteration", "train pool", "cache pool", "stages done", "dynamics"):
            table.add_column(col)
        for it in iterations:
            done = ", ".join(s["stage"] for s in stages if s["iteration"] == it) or "-"
            dyn = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.get(it, {}).items())) or "-"
            table.add_row(str(it), str(len(store.pool(it, "train"))), str(len(store.pool(it, "cache"))), done, dyn)
        console.print(f"instructions: {store.count_instructions()}")
        console.print(table)
        console.print(usage_table(store.usage(), _run_prices(run_dir)))


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)


@app.command()
def export(
    run_dir: Path,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.json or .jsonl) or folder (hf).")],
    fmt: Annotated[str, typer.Option("--format", help="alpaca | chat | hf")] = "alpaca",
    role: Annotated[str, typer.Option(help="Whose answers to export as outputs.")] = "teacher",
) -> None:
    """Export a run's instructions with their answers (Alpaca JSON/JSONL, chat JSONL, or a HF dataset)."""
    from .data import alpaca_record, chat_record, to_hf_dataset, write_json, write_jsonl
    from .store import Store

    if fmt not in ("alpaca", "chat", "hf"):
        raise UserError(f"--format: unknown format '{fmt}' (alpaca, chat or hf)")
    with Store.open_existing(run_dir) as store:
        answers = store.latest_responses(role)
        instructions = store.instructions()
    make = chat_record if fmt == "chat" else alpaca_record
    records = [make(ins, answers.get(ins.id)) for ins in instructions]
    if fmt == "hf":
        to_hf_dataset(records).save_to_disk(str(out))
    elif out.suffix == ".json":
        write_json(out, records)
    else:
        write_jsonl(out, records)
    console.print(f"wrote {len(records)} records to {out}")


# --------------------------------------------------------------------------- entry point


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        if _debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted: finished work is saved; run the same command again to resume")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _debug:
            raise
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                          markup=False, highlight=False)
        sys.exit(1)
