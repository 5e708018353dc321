"""What keeps a run directory a transaction: one writer at a time, and a configuration fixed at the start.

The lock: `run.lock` in the run directory, held with `flock` for as long as a command writes the run
(`run`, `distill`, `demo`), the holder's pid written inside. The kernel drops the lock when its
process dies however it dies, so a lock left by a crashed or killed run is simply taken over; the
file itself stays (deleting it could let two processes lock two different files of the same name).

The configuration: a command that writes a run stores its config (secrets masked) in the run store
and in `config.yaml`; once a stage has finished, both stay as they were on every rerun. A rerun whose config differs in a
key that affects results stops with one line naming each change, unless the user asks for it
(`--allow-config-change`), which applies it from the next unfinished stage and records it in the
store. Only the keys listed in `NON_RESULT_KEYS` may change freely: a new key affects results until
someone decides it does not.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .budget import Budget
from .config import RunConfig, masked_dump
from .errors import UserError
from .store import STORE_NAME, Store

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.yaml"
CONFIG_META = "config"  # the run store's meta key holding the config the run is bound to

_ENDPOINT_ROLES = ("teacher", "referee", "generator")
# How fast and how patiently a model is reached, and where: none of it changes an answer. `base_url`
# and `api_key_env` say where the model is and which variable holds its key, not which model it is
# (that is `model`); the demo serves its world on a fresh port every time it runs.
# A budget says how far a run may go, not what it finds: a rerun with a larger one continues the run.
_ENDPOINT_OPERATIONAL = ("concurrency", "requests_per_minute", "tokens_per_minute", "max_retries", "timeout_s",
                         "base_url", "api_key_env", "vllm", "budget")
NON_RESULT_KEYS = frozenset({
    "run_dir",  # the run's own address: a rerun reaches the same store only through it
    "budget",
    *(f"{role}.{key}" for role in _ENDPOINT_ROLES for key in _ENDPOINT_OPERATIONAL),
    # where the student's answers are computed, not what they are
    "student.generation.server_command", "student.generation.vllm",
    # when to stop on a role that cannot do its job: a run that passed them is the same run
    "lion.min_readable_verdicts", "lion.min_kept_generations", "lion.min_teacher_answers",
    # how a training stage is spread over processes: `batch_size` is global, so the model is the same
    *(f"{train}.{key}" for train in ("student.train", "kd.teacher_train")
      for key in ("logging_steps", "processes", "accelerate_config")),
})


def affects_results(key: str) -> bool:
    """False only for a key listed in NON_RESULT_KEYS (or inside a listed section)."""
    return not any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


# --------------------------------------------------------------------------- one writer per run


_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth (demo locks, then run_lion)
_held_guard = threading.Lock()


@contextmanager
def hold_run(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory's lock, or raise UserError naming the lock and its holder's pid at once."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK_NAME).resolve()
    with _held_guard:
        if path in _held:  # this process already holds it: nested commands share it
            _held[path] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield path
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            raise UserError(f"{path}: another lionkd process ({_holder(fd)}) is writing this run; "
                            "wait for it to finish or stop it, then run this command again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        with _held_guard:
            _held[path] = 1
        try:
            yield path
        finally:
            with _held_guard:
                del _held[path]
            os.ftruncate(fd, 0)  # still locked here: nobody reads a stale pid from a free lock
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid not yet written"


# --------------------------------------------------------------------------- the config a run is bound to


@dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted, e.g. "lion.tau"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT: Any = _Absent()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"lion": {"tau": 1.0}} -> {"lion.tau": 1.0}; a list is one value."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[ConfigChange]:
    """Every key whose value differs, in the new config's order.

    A key the old config lacks counts only when its new value is not the default (a newer lionkd
    added it, and the run behaved as its default); a key the new config lacks counts when it is an
    entry of a mapping the user writes (`kd.objective`), not an option lionkd no longer has.
    """
    before, after = flatten(old), flatten(new)
    defaults = flatten(RunConfig().model_dump(mode="json"))
    changes = []
    for key, value in after.items():
        previous = before.get(key, _ABSENT)
        if previous is _ABSENT:
            inner = {k[len(key) + 1:]: v for k, v in before.items() if k.startswith(key + ".")}
            if inner:  # a section that was set is now null
                previous = inner
            elif key in defaults and defaults[key] == value:
                continue
        if previous != value:
            changes.append(ConfigChange(key, previous, value))
    for key, value in before.items():
        covered = any(key.startswith(k + ".") for k in after)  # its section became a single value
        if key not in after and not covered and _user_mapping_entry(key):
            changes.append(ConfigChange(key, value, _ABSENT))
    return changes


def _user_mapping_entry(key: str) -> bool:
    """True when `key` leads through the config's models into a plain mapping (so the user named it)."""
    from pydantic import BaseModel

    from .config import _nested_model

    model: Any = RunConfig
    for part in key.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return True  # below a field that is not a model: an entry of the user's own mapping
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = _nested_model(field.annotation)
    return False


def write_config_file(data: dict[str, Any], run_dir: Path) -> None:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    tmp = run_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(run_dir / CONFIG_NAME)  # whole or not at all


def _started_with(store: Store, run_dir: Path) -> dict[str, Any] | None:
    stored = store.get_meta(CONFIG_META)
    if stored is not None:
        return json.loads(stored)
    # A run begun before the config was kept in the store: its config.yaml is what it started with.
    saved = run_dir / CONFIG_NAME
    if store.stages() and saved.is_file():
        data = yaml.safe_load(saved.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    return None


CHANGE_HINT = "rerun with --allow-config-change to apply it from the next unfinished stage, or use a new run_dir"


def bind_config(store: Store, cfg: RunConfig, *, allow_change: bool = False, change_hint: str = CHANGE_HINT
                ) -> list[ConfigChange]:
    """Bind the run to its config at the start; on a rerun, refuse (or, if allowed, record) result changes.

    Returns the changes applied now. Call with the run's lock held. The budget is the one setting taken
    from this invocation's config whatever the run started with: every call made through `store` from
    now on keeps to it.
    """
    changes = _bind(store, cfg, allow_change, change_hint)
    store.budget = Budget.for_run(cfg, store)
    return changes


def _bind(store: Store, cfg: RunConfig, allow_change: bool, change_hint: str) -> list[ConfigChange]:
    run_dir = Path(cfg.run_dir)
    current = masked_dump(cfg)
    started = _started_with(store, run_dir)
    # A run is fixed once a stage has finished; before that nothing depends on its config, and a start
    # that failed (a missing seed file, a dead endpoint, a student that could not be trained) is simply
    # started again with the corrected one. Reading the seed instructions (setup) fixes only the keys
    # it read: the rest of the run has not used the config yet.
    changes = [c for c in config_changes(started, current) if affects_results(c.key)] if started else []
    if started is None or not bound_by_stages(store):
        fixed = [c for c in changes if c.key in SETUP_KEYS] if store.stage_done(0, "setup") else []
        if not fixed:
            store.set_meta(CONFIG_META, json.dumps(current))
            write_config_file(current, run_dir)
            return []
        changes = fixed
    if not changes:
        if store.get_meta(CONFIG_META) is None:  # adopt a legacy run's config.yaml as its bound config
            store.set_meta(CONFIG_META, json.dumps(started))
        return []
    listed = "; ".join(str(c) for c in changes)
    if not allow_change:
        raise UserError(f"{run_dir}: the config differs from the one this run started with ({listed}); "
                        f"{change_hint}")
    store.add_config_changes([(c.key, _json(c.old), _json(c.new)) for c in changes], after=_last_stage(store))
    store.set_meta(CONFIG_META, json.dumps(current))
    write_config_file(current, run_dir)
    return changes


# What the setup stage (iteration 0: the seed instructions) reads from the config.
SETUP_KEYS = frozenset({"seed", "lion.seed_pool", "lion.seed_pool_size", "teacher.backend"})


def bound_by_stages(store: Store) -> bool:
    """Whether a stage that used the whole config has finished (reading the seeds does not count)."""
    return any((s["iteration"], s["stage"]) != (0, "setup") for s in store.stages())


def _json(value: Any) -> str:
    return json.dumps(None if value is _ABSENT else value)


def _last_stage(store: Store) -> str:
    stages = store.stages()
    if not stages:
        return "before the first stage"
    last = max(stages, key=lambda s: s["finished_at"])
    return f"after iteration {last['iteration']} {last['stage']}"


def check_export_target(run_dir: str | Path, out: str | Path) -> None:
    """Refuse an export that would overwrite anything: an existing file or folder, the run's own files, or a
    place inside one of the run's model folders (a student's `config.json` would stop it loading)."""
    run_dir, given = Path(run_dir).resolve(), Path(out)
    out = given.resolve()
    own = {run_dir / name for name in (STORE_NAME, f"{STORE_NAME}-wal", f"{STORE_NAME}-shm", CONFIG_NAME, LOCK_NAME)}
    if out == run_dir or out in own or run_dir.is_relative_to(out):
        raise UserError(f"--out: {out} would overwrite the run's own files; choose another path")
    if out.exists() or out.is_symlink():
        raise UserError(f"--out: {given} exists already; choose a new path (an export never overwrites)")
    if out.is_relative_to(run_dir):
        for folder in out.parents:
            if folder == run_dir:
                break
            if (folder / "config.json").is_file() or folder.name in ("students", "checkpoints"):
                raise UserError(f"--out: {given} is inside the model folder {folder}; choose a path outside it")


# --------------------------------------------------------------------------- what an interrupted run kept


def saved_summary(run_dir: str | Path) -> str:
    """What a run directory holds, in a few words (for the line printed after Ctrl-C)."""
    path = Path(run_dir) / STORE_NAME
    if not path.is_file():
        return f"nothing was saved yet in {run_dir}"
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            stages = db.execute("SELECT COUNT(*) FROM stages").fetchone()[0]
            calls = db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return f"finished work is saved in {path}"
    return (f"{stages} finished stage{'s' * (stages != 1)} and {calls} model "
            f"call{'s' * (calls != 1)} are saved in {path}")
