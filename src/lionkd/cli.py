"""The `lionkd` command. Argument parsing, progress display and exit codes only: no logic here.

User errors print one line and exit 2; internal errors exit 1; `--debug` shows tracebacks.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import BudgetExceeded, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil large language models into small ones.")
config_app = typer.Typer(no_args_is_help=True, help="Work with run configuration files.")
app.add_typer(config_app, name="config")
# Soft wrap: paths and one-line errors stay whole, so they can be copied and parsed.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
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
    quiet_libraries()


def quiet_libraries() -> None:
    """lionkd draws its own progress bars; the libraries' weight-loading bars and notices are noise here."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def library_bars(enabled: bool) -> None:
    """`--no-progress` also silences the bars libraries draw with plain tqdm (transformers' GGUF
    dequantisation). tqdm reads TQDM_DISABLE once, when first imported: call before any model import."""
    if not enabled:
        os.environ.setdefault("TQDM_DISABLE", "1")


# --------------------------------------------------------------------------- configuration

PRESETS = ("demo", "api", "kd", "on-policy")


@app.command()
def init(preset: Annotated[str, typer.Option(help="demo | api | kd | on-policy")] = "api") -> None:
    """Print a commented config template."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    sys.stdout.write(resources.files("lionkd.templates").joinpath(f"{preset}.yaml").read_text(encoding="utf-8"))


@config_app.command("check")
def config_check(path: Path) -> None:
    """Validate a config file and print it resolved, secrets masked."""
    from .config import load_config, masked_dump
    from .lion.loop import check_config

    cfg = load_config(path)
    check_config(cfg)
    console.print(yaml.safe_dump(masked_dump(cfg), sort_keys=False), end="", markup=False, highlight=False)
    for role in ("teacher", "referee", "generator"):
        endpoint = getattr(cfg, role)
        try:
            missing = endpoint.backend == "openai" and endpoint.api_key_env and endpoint.api_key() is None
        except UserError as exc:  # set but empty
            raise UserError(f"{role}.{exc}") from None
        if missing:
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


# Status tables stay readable in an 80-column terminal: short headers, numbers never cut, a long model
# path shortened to its last two parts (a student checkpoint is `students/iter-2`).
STATUS_ITERATION_COLUMNS = 6  # a dynamics table shows at most this many iterations side by side


def _model_name(model: str) -> str:
    parts = Path(model).parts
    return "/".join(parts[-2:]) if model.startswith(("/", ".", "~")) and len(parts) > 2 else model


def usage_table(rows: list[dict[str, Any]], prices: dict[str, Any]) -> Table:
    from rich import box

    table = Table(title="Calls, tokens and cost", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for col in ("iter", "role", "model", "calls", "failed", "tok in", "tok out", "cost $"):
        numeric = col not in ("role", "model")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=col != "model",
                         overflow="fold", min_width=len(col) if numeric else None)
    total = 0.0
    for r in rows:
        price = prices.get(r["role"] or "")
        cost = ((r["prompt_tokens"] * price["input"] + r["completion_tokens"] * price["output"]) / 1e6) if price else 0.0
        total += cost
        table.add_row(str(r["iteration"]), str(r["role"]), _model_name(r["model"]), str(r["calls"]), str(r["failures"]),
                      str(r["prompt_tokens"]), str(r["completion_tokens"]), f"{cost:.4f}" if price else "-")
    table.caption = f"total cost: ${total:.4f} (calls actually sent; a cached reuse costs nothing)"
    return table


@app.command()
def status(run_dir: Path) -> None:
    """Show what each stage of each iteration has done: counts, dynamics, tokens and cost."""
    from .report.distill_run import is_distill_run
    from .store import Store

    with Store.open_existing(run_dir) as store:
        if is_distill_run(store):
            distill_status(run_dir, store)
            return
        stages, metrics = store.stages(), store.metrics()
        iterations = sorted({*store.pool_iterations(), *(s["iteration"] for s in stages), *metrics})
        table = Table(title=f"Run {run_dir}: {store.count_instructions()} instructions")
        for col in ("iteration", "train pool", "cache pool", "stages done"):
            table.add_column(col)
        for it in iterations:
            done = ", ".join(s["stage"] for s in stages if s["iteration"] == it) or "-"
            table.add_row(str(it), str(len(store.pool(it, "train"))), str(len(store.pool(it, "cache"))), done)
        console.print(table)
        print_dynamics(metrics, iterations)
        console.print(usage_table(store.usage(), _run_prices(run_dir)))


def distill_status(run_dir: Path, store: Any) -> None:
    """A distill run: its stages in order with what each recorded, its pseudo-targets, metrics and calls."""
    from .report.distill_run import pt_statistics, stage_rows

    table = Table(title=f"Distill run {run_dir}: {len(store.pseudo_targets())} pseudo-targets")
    for col in ("stage", "state", "recorded"):
        table.add_column(col)
    for row in stage_rows(store):
        table.add_row(*row)
    console.print(table)
    pts = pt_statistics(store)
    if pts:
        kinds = Table(title="Pseudo-targets")
        for col in ("method", "teacher", "count", "inputs", "per input", "mean words", "cut off"):
            kinds.add_column(col, justify="left" if col in ("method", "teacher") else "right")
        for p in pts:
            kinds.add_row(p["method"], p["teacher"], str(p["pseudo_targets"]), str(p["inputs"]), str(p["per_input"]),
                          f"{p['mean_words']:.1f}", _fmt(p["cut_off"]))
        console.print(kinds)
    metrics = store.metrics()
    print_dynamics(metrics, sorted(metrics))
    if store.usage():
        console.print(usage_table(store.usage(), _run_prices(run_dir)))


def print_dynamics(metrics: dict[int, dict[str, Any]], iterations: list[int]) -> None:
    """The learning-dynamics table, in parts of at most STATUS_ITERATION_COLUMNS iterations."""
    for part in range(0, len(iterations), STATUS_ITERATION_COLUMNS):
        console.print(dynamics_table(metrics, iterations[part:part + STATUS_ITERATION_COLUMNS]))


def dynamics_table(metrics: dict[int, dict[str, Any]], iterations: list[int]) -> Table:
    """One row per metric, one column per iteration; mappings show their overall value if they have one."""
    table = Table(title="Learning dynamics")
    table.add_column("metric", overflow="fold")
    for it in iterations:
        table.add_column(str(it), justify="right", no_wrap=True, min_width=5)
    names = sorted({k for m in metrics.values() for k, v in m.items() if _scalar(v) is not None})
    for name in names:
        table.add_row(name, *(_fmt(_scalar(metrics.get(it, {}).get(name))) for it in iterations))
    return table


def _scalar(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("overall")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


@app.command()
def export(
    run_dir: Path,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.json or .jsonl) or folder (hf).")],
    fmt: Annotated[str, typer.Option("--format", help="alpaca | chat | hf")] = "alpaca",
    role: Annotated[str, typer.Option(help="Whose answers to export as outputs.")] = "teacher",
) -> None:
    """Export a run's instructions with their answers (Alpaca JSON/JSONL, chat JSONL, or a HF dataset)."""
    from .data import alpaca_record, chat_record, to_hf_dataset, write_json, write_jsonl
    from .distill.export import export_records
    from .report.distill_run import is_distill_run
    from .run_guard import check_export_target
    from .store import Store

    if fmt not in ("alpaca", "chat", "hf"):
        raise UserError(f"--format: unknown format '{fmt}' (alpaca, chat or hf)")
    check_export_target(run_dir, out)
    with Store.open_existing(run_dir) as store:
        if is_distill_run(store):
            if role != "teacher":
                raise UserError(f"--role: a distill run holds the teacher's pseudo-targets only; use --role teacher "
                                f"(the student's predictions are in {run_dir / 'predictions-student.jsonl'})")
            records = export_records(run_dir, store, chat=fmt == "chat")
        else:
            roles = store.response_roles()
            if role not in roles:
                raise UserError(f"--role: no answers by '{role}' in {run_dir} "
                                f"(roles with answers: {', '.join(roles) or 'none yet'})")
            answers = store.latest_responses(role)
            make = chat_record if fmt == "chat" else alpaca_record
            # Only what this role answered, never a seed file's `output` in its place; an empty answer is none.
            records = [make(ins, answers[ins.id]) for ins in store.instructions() if answers.get(ins.id)]
            empty = sum(1 for text in answers.values() if not text)
            if empty:
                err_console.print(f"note: {empty} empty answer(s) by {role} left out", markup=False, highlight=False)
    if fmt == "hf":
        to_hf_dataset(records).save_to_disk(str(out))
    elif out.suffix == ".json":
        write_json(out, records)
    else:
        write_jsonl(out, records)
    console.print(f"wrote {len(records)} records to {out}")


# --------------------------------------------------------------------------- the Lion loop


@app.command()
def run(
    config: Path,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the most calls, tokens and cost; spend nothing.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write report.html at the end.")] = True,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="Apply a changed setting to a started run from its next unfinished stage.")
    ] = False,
) -> None:
    """Run (or resume) the Lion loop of a config: imitation, discrimination, generation per iteration."""
    library_bars(progress)
    from .config import load_config
    from .lion.loop import budget_lines, plan_run, plan_table, run_lion

    cfg = load_config(config)
    if dry_run:
        rows = plan_run(cfg)
        console.print(plan_table(rows))
        for line in budget_lines(cfg, rows):
            console.print(line, markup=False, highlight=False)
        return
    _on_interrupt(cfg.run_dir, f"run `lionkd run {config}` again to resume")
    summary = run_lion(cfg, progress=progress, allow_config_change=allow_config_change)
    if summary.already_finished:
        console.print(f"{summary.run_dir}: the run is already finished; final student: {summary.final_student}")
        return
    console.print(f"finished: final student in {summary.final_student}", markup=False, highlight=False)
    if report:
        from .report.build import build_report

        html, _ = build_report(summary.run_dir)
        console.print(f"report: {html}")


# --------------------------------------------------------------------------- task-specific KD


@app.command()
def distill(
    config: Path,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    allow_config_change: Annotated[bool, typer.Option(
        "--allow-config-change", help="Apply a changed setting to a started run from its next unfinished stage.")
    ] = False,
) -> None:
    """Run (or resume) task-specific KD: teacher PTs, KD training, final fine-tuning, evaluation."""
    library_bars(progress)
    from .config import load_config
    from .distill.pipeline import distill as run_distill

    cfg = load_config(config)
    _on_interrupt(cfg.run_dir, f"run `lionkd distill {config}` again to resume")
    summary = run_distill(cfg, progress=progress, allow_config_change=allow_config_change)
    console.print(summary.line(), markup=False, highlight=False, soft_wrap=True)


@app.command()
def prune(
    model_dir: Path,
    out_dir: Path,
    keep: Annotated[str, typer.Option(help="Decoder layers to keep: first_last, even:N, all or 0,2,-1.")] = "first_last",
    encoder_keep: Annotated[str | None, typer.Option(help="Encoder layers to keep (encoder-decoder; default all).")] = None,
) -> None:
    """Save a copy of a model with only some of its layers (a student to distil into)."""
    from .kd.prune import prune_layers

    info = prune_layers(model_dir, out_dir, keep, encoder_keep=encoder_keep)
    encoder = f"; encoder layers kept: {info['encoder_kept']}" if info["encoder_kept"] is not None else ""
    console.print(f"layers kept: {info['kept']}{encoder}; saved to {out_dir}", markup=False, highlight=False)


# --------------------------------------------------------------------------- evaluation and reports


def _stage_progress() -> tuple[Any, Any]:
    """A rich progress display and a `(stage, done, total)` callback that feeds it."""
    from .progress import stage_bars

    bars = stage_bars(console=err_console)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    return bars, update


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="A local model folder, or the model name at --base-url.")],
    data: Annotated[str, typer.Option(help="JSON/JSONL/CSV/Parquet file or a Hugging Face dataset name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (results, predictions, call cache).")] = Path("runs/eval"),
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint serving --model.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the endpoint's key.")] = None,
    split: Annotated[str, typer.Option(help="Split of a hub dataset.")] = "test",
    input_column: Annotated[str, typer.Option(help="Column with the inputs.")] = "input",
    target_column: Annotated[str | None, typer.Option(help="Column with the targets (default: target, if present).")] = None,
    category_column: Annotated[str | None, typer.Option(help="Column with categories (per-category results).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows.")] = None,
    metrics: Annotated[str, typer.Option(help="Comma list: bleu, rouge, exact_match, perplexity, bertscore.")] = "bleu,rouge,exact_match,perplexity",
    template: Annotated[str, typer.Option(help="Prompt format of a local model: chat | alpaca.")] = "chat",
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    num_beams: Annotated[int, typer.Option(help="Beam search width (local models).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Batch size of a local model.")] = 16,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    judge: Annotated[bool, typer.Option("--judge", help="Judge evaluation by a referee, as in the Lion paper.")] = False,
    config: Annotated[Path | None, typer.Option(help="A run config: its referee/teacher endpoints and prompts.")] = None,
    referee_model: Annotated[str | None, typer.Option(help="Referee model name (OpenAI-compatible).")] = None,
    referee_base_url: Annotated[str | None, typer.Option(help="Referee endpoint.")] = None,
    referee_api_key_env: Annotated[str | None, typer.Option(help="Environment variable with the referee's key.")] = None,
    reference: Annotated[str, typer.Option(help="Reference answers for the judge: target | teacher.")] = "target",
    speed: Annotated[bool, typer.Option("--speed", help="Measure size, latency, throughput and memory.")] = False,
    teacher: Annotated[str | None, typer.Option(help="A local teacher folder (speed ratios, reference answers).")] = None,
    speed_new_tokens: Annotated[int, typer.Option(help="Tokens generated per timed call.")] = 64,
    memory_budget_gb: Annotated[float | None, typer.Option(help="Memory budget for the throughput batch.")] = None,
    max_batch: Annotated[int, typer.Option(help="Largest batch tried for throughput.")] = 256,
    harness_tasks: Annotated[str | None, typer.Option(help="lm-evaluation-harness tasks, e.g. bbh_zeroshot.")] = None,
    harness_limit: Annotated[int | None, typer.Option(help="Examples per harness task (a quick check).")] = None,
    harness_include: Annotated[Path | None, typer.Option(
        help="A folder of your own harness task YAMLs (e.g. over a local JSONL file).")] = None,
) -> None:
    """Evaluate a model on a data set: task metrics, judge evaluation, speed, harness benchmarks."""
    from rich.markdown import Markdown

    from .eval.evaluate import RESULTS_JSON, EvalConfig, run_eval
    from .report.eval_tables import eval_markdown

    if template not in ("chat", "alpaca"):
        raise UserError(f"--template: must be chat or alpaca, not '{template}'")
    if reference not in ("target", "teacher"):
        raise UserError(f"--reference: must be target or teacher, not '{reference}'")
    settings = EvalConfig(
        data=data, out_dir=out, model=model, base_url=base_url, api_key_env=api_key_env, split=split,
        input_column=input_column, target_column=target_column, category_column=category_column, limit=limit,
        template=template, max_new_tokens=max_new_tokens, temperature=temperature,  # type: ignore[arg-type]
        num_beams=num_beams, seed=seed, batch_size=batch_size,
        metrics=[m.strip() for m in metrics.split(",") if m.strip()], judge=judge, config=config,
        referee_model=referee_model, referee_base_url=referee_base_url, referee_api_key_env=referee_api_key_env,
        reference=reference, speed=speed, teacher=teacher, speed_new_tokens=speed_new_tokens,  # type: ignore[arg-type]
        memory_budget_gb=memory_budget_gb, max_batch=max_batch,
        harness_tasks=[t for t in (harness_tasks or "").split(",") if t.strip()], harness_limit=harness_limit,
        harness_include=harness_include,
    )
    from .run_guard import hold_run

    bars, update = _stage_progress()
    with hold_run(out), bars:  # its call cache is a run store: one writer, even when --out is a run's folder
        results = run_eval(settings, progress=update)
    console.print(Markdown(eval_markdown(results, f"Evaluation of {results['model']}")))
    console.print(f"wrote {out / RESULTS_JSON}")


@app.command()
def report(
    run_dir: Path,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for report.html/.md (default: RUN_DIR).")] = None,
) -> None:
    """Write a self-contained HTML report (and Markdown) of a Lion or distill run."""
    from .report.build import build_report

    html_path, md_path = build_report(run_dir, out)
    console.print(f"wrote {html_path} and {md_path}")


# --------------------------------------------------------------------------- serving models


@app.command()
def serve(
    model_dir: Annotated[str | None, typer.Argument(help="A model directory (or sandbox:base-student).")] = None,
    sandbox: Annotated[bool, typer.Option("--sandbox", help="Serve the sandbox teacher, referee and generator.")] = False,
    name: Annotated[str | None, typer.Option(help="Model name clients ask for (default: the folder name).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(help="Require this env variable's value as bearer key.")] = None,
    template: Annotated[str, typer.Option(help="chat | alpaca")] = "chat",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Largest generation batch.")] = 16,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (chat, completions, streaming, logprobs)."""
    from .llm.server import serve as run_server

    run_server(model_dir, sandbox=sandbox, name=name, host=host, port=port, api_key_env=api_key_env,
               template=template, dtype=dtype, device=device, batch_size=batch_size)


@app.command()
def demo(
    run_dir: Annotated[Path, typer.Option(help="Where the run goes (resumes if it exists).")] = Path("runs/demo"),
    student: Annotated[str, typer.Option(
        help="smollm2-135m-instruct (a real pretrained chat model), tiny (the shipped 0.5M student, "
             "quick), or any model name or path.")] = "smollm2-135m-instruct",
    iterations: Annotated[int | None, typer.Option(min=1, help="Lion iterations [default: the student's preset].")] = None,
    seeds: Annotated[int | None, typer.Option(min=2, help="Seed instructions drawn from the world.")] = None,
    new: Annotated[int | None, typer.Option("--new", min=1, help="New instructions per iteration.")] = None,
    epochs: Annotated[float | None, typer.Option(min=0.01, help="Training epochs per imitation stage.")] = None,
    test_per_task: Annotated[int | None, typer.Option(min=1, help="Held-out test items per task type.")] = None,
    seed: int = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """A whole Lion run on the offline sandbox world, served over HTTP on 127.0.0.1 (no API key)."""
    library_bars(progress)
    from .lion.demo import DemoConfig, results_table, run_demo
    from .report.build import build_report
    from .run_guard import hold_run

    _on_interrupt(run_dir, "run the same `lionkd demo` command again to resume")
    with hold_run(run_dir):  # the demo writes its seeds and scores around the run: all of it under one lock
        summary, scores = run_demo(DemoConfig(run_dir, student, iterations, seeds, new, epochs, test_per_task,
                                                seed, progress))
        html, _ = build_report(summary.run_dir)
    console.print(results_table(summary, scores))
    console.print(f"run directory: {summary.run_dir}")
    console.print(f"report: {html}")


# --------------------------------------------------------------------------- entry point


_interrupt_note: tuple[Path, str] | None = None  # (run directory, how to resume it) of a writing command


def _on_interrupt(run_dir: Path, resume: str) -> None:
    """Name the run a Ctrl-C would interrupt, so the line printed then says what was kept and how to go on."""
    global _interrupt_note
    _interrupt_note = (run_dir, resume)


def _interrupted() -> None:
    if _interrupt_note is None:
        err_console.print("interrupted", markup=False, highlight=False)
    else:
        from .run_guard import saved_summary

        run_dir, resume = _interrupt_note
        err_console.print(f"interrupted: {saved_summary(run_dir)}; {resume}",
                          markup=False, highlight=False, soft_wrap=True)
    sys.exit(130)


_DISK_ERRNOS = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the disk",
                errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied"}
_DISK_SQLITE = {"readonly database": "read-only file system (the run store cannot be written)",
                "disk is full": "no space left on the disk (the run store cannot grow)",
                "unable to open database file": "the run store cannot be opened for writing"}


def _disk_problem(exc: BaseException) -> str | None:
    """One line for a disk the user must fix (read-only, full, not theirs), or None for anything else."""
    if isinstance(exc, sqlite3.OperationalError):
        return next((why for text, why in _DISK_SQLITE.items() if text in str(exc)), None)
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{_DISK_ERRNOS[exc.errno]}"
    return None


def main() -> None:
    from pydantic import ValidationError

    from .config import describe_error

    # A Ctrl-C that lands inside asyncio.run's own clean-up leaves this coroutine unstarted; Python
    # would warn about it on top of the one line that says what was saved.
    warnings.filterwarnings("ignore", r"coroutine 'BaseEventLoop\.shutdown_default_executor' was never awaited",
                            RuntimeWarning)
    try:
        # Without standalone mode typer turns Ctrl-C (and typer.Exit) into a returned exit code.
        code = app(standalone_mode=False)
    except UserError as exc:
        if _debug:
            raise
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except BudgetExceeded as exc:
        if _debug:
            raise
        err_console.print(f"stopped: {exc}; finished calls are stored: raise the budget and run the same command "
                          "again to go on (nothing is sent twice)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(3)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except ValidationError as exc:  # settings a command built from its options (`demo --iterations 0`)
        if _debug:
            raise
        err_console.print(f"error: {describe_error(exc, 'an option value')}", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        # Usage errors (typer's own click) know how to show themselves and carry exit code 2.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if _debug:
            raise
        reason = _disk_problem(exc)
        if reason is not None:
            err_console.print(f"error: {reason}; what was finished is kept: make room or choose a writable place "
                              "(run_dir, --out), then run the same command again", markup=False, highlight=False,
                              soft_wrap=True)
            sys.exit(2)
        err_console.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                          markup=False, highlight=False)
        sys.exit(1)
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)
