"""The hard budget: a run never starts a call that could pass it, stops with exit code 3 and one line,
and a rerun with a larger budget goes on without sending anything twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import one_line, run_cli
from lionkd.budget import Budget, Tally, worst_prompt_tokens
from lionkd.config import RunConfig
from lionkd.errors import BudgetExceeded, UserError
from lionkd.llm.base import Backend, Choice, GenRequest, GenResult
from lionkd.llm.cache import CachedLLM
from lionkd.llm.sandbox_backend import SandboxBackend
from lionkd.llm.server import ServerThread, create_app
from lionkd.store import Store

ROLES = ("teacher", "referee", "generator")
PRICE = {"input": 1.0, "output": 2.0}  # US dollars per 1M tokens


def ask(content: str, **params: Any) -> GenRequest:
    return GenRequest.chat([{"role": "user", "content": content}], **params)


def config(**data: Any) -> RunConfig:
    roles = {role: {"backend": "openai", "model": role, "base_url": "http://127.0.0.1:9/v1", "api_key_env": None,
                    "max_tokens": 100} for role in ROLES}
    for role in ROLES:
        roles[role] |= data.pop(role, {})
    return RunConfig.model_validate(roles | data)


# --------------------------------------------------------------------------- the arithmetic


def test_worst_case_is_one_token_per_byte_plus_max_tokens_per_sample() -> None:
    budget = Budget(config(teacher={"price": PRICE}, budget={"max_cost": 1.0}), {})
    request = ask("héllo", max_tokens=100, n=3)
    assert worst_prompt_tokens(request) >= len("héllo".encode())
    worst = budget.worst_case("teacher", request)
    assert worst.calls == 3
    assert worst.cost == pytest.approx((worst_prompt_tokens(request) * 1.0 + 300 * 2.0) / 1e6)


def test_calls_in_flight_count_at_their_worst_case_until_settled() -> None:
    budget = Budget(config(budget={"max_calls": 5}, teacher={"budget": {"max_calls": 3}}), {})
    requests = [ask(f"q{i}") for i in range(10)]
    assert len(budget.admit("teacher", requests)) == 3  # the teacher's own limit
    assert budget.admit("teacher", requests) == []  # three in flight: no room, nothing sent yet
    assert len(budget.admit("referee", requests)) == 2  # the run's limit counts the teacher's calls in flight
    assert budget.in_flight() == 5
    budget.settle("referee", Tally(1), None)  # never answered: the room comes back
    assert len(budget.admit("generator", requests)) == 1
    budget.settle("teacher", Tally(1), Tally(1))  # answered: spent
    assert budget.admit("referee", requests) == []
    assert budget.spent["teacher"].calls == 1


def test_cost_limit_admits_by_worst_case_and_books_the_actual_cost() -> None:
    cfg = config(teacher={"price": PRICE}, budget={"max_cost": 0.001})
    budget = Budget(cfg, {})
    request = ask("q", max_tokens=100)
    worst = budget.worst_case("teacher", request).cost
    admitted = budget.admit("teacher", [request] * 100)
    assert len(admitted) == int(0.001 // worst)
    for reserved in admitted:  # each really used a tenth of its worst case
        budget.settle("teacher", reserved, Tally(1, worst / 10))
    assert len(budget.admit("teacher", [request] * 100)) > 0  # the difference is room again


def test_a_cost_limit_needs_the_price_of_an_api_role() -> None:
    budget = Budget(config(budget={"max_cost": 1.0}), {})
    with pytest.raises(UserError, match=r"budget.max_cost: referee.price is not set"):
        budget.admit("referee", [ask("q")])
    free = Budget(config(referee={"backend": "sandbox"}, budget={"max_cost": 1.0}), {})
    assert len(free.admit("referee", [ask("q")])) == 1  # a local model costs nothing


def test_spent_is_read_from_the_ledger(tmp_path: Path) -> None:
    with Store(tmp_path / "run.sqlite") as store:
        for i in range(4):
            store.put_call(f"k{i}", backend="openai", model="teacher", request={}, result={}, prompt_tokens=1000,
                           completion_tokens=500, role="teacher")
        store.put_failure("k9", backend="openai", model="referee", error="boom", role="referee")
        store.put_call("s", backend="hf", model="student", request={}, result={}, prompt_tokens=1,
                       completion_tokens=1, role="student")  # the student is outside the budget
        assert Budget.for_run(config(), store) is None  # no limit: no budget
        budget = Budget.for_run(config(teacher={"price": PRICE}, budget={"max_calls": 10}), store)
    assert budget is not None
    assert budget.spent["teacher"] == Tally(4, pytest.approx(4 * (1000 + 1000) / 1e6))
    assert budget.spent["referee"].calls == 1 and budget.spent["generator"].calls == 0
    assert len(budget.admit("generator", [ask(str(i)) for i in range(10)])) == 5


# --------------------------------------------------------------------------- through the call cache


class Echo(Backend):
    kind = "echo"

    def __init__(self) -> None:
        super().__init__("echo")
        self.sent: list[str] = []

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        for i, r in enumerate(requests):
            self.sent.append(r.messages[0][1])  # type: ignore[index]
            await asyncio.sleep(0)
            yield i, GenResult([Choice(f"answer {r.messages[0][1]}")] * r.n, prompt_tokens=5,  # type: ignore[index]
                               completion_tokens=7 * r.n)


def test_the_cache_stops_at_the_budget_and_a_larger_one_goes_on(tmp_path: Path) -> None:
    backend = Echo()
    requests = [ask(f"q{i}") for i in range(8)]
    with Store(tmp_path / "run.sqlite") as store:
        store.budget = Budget.for_run(config(teacher={"budget": {"max_calls": 5}}), store)
        llm = CachedLLM(backend, store, role="teacher")
        got: list[int] = []

        async def collect() -> None:
            async for i, _ in llm.stream(requests):
                got.append(i)

        with pytest.raises(BudgetExceeded, match=r"teacher.budget reached: spent 5 calls .*3 teacher calls"):
            asyncio.run(collect())
        assert backend.sent == [f"q{i}" for i in range(5)] and got == [0, 1, 2, 3, 4]
        assert sum(u["calls"] for u in store.usage()) == 5  # every answer that came back is stored

        store.budget = Budget.for_run(config(teacher={"budget": {"max_calls": 8}}), store)
        results = llm.generate(requests)
        assert backend.sent == [f"q{i}" for i in range(8)]  # nothing sent twice
        assert [r.cached for r in results] == [True] * 5 + [False] * 3

        student = CachedLLM(backend, store, role="student")  # outside the budget
        assert len(student.generate([ask(f"s{i}") for i in range(20)])) == 20


# --------------------------------------------------------------------------- through the command


class CountingSandbox(SandboxBackend):
    def __init__(self, model: str, log: list[tuple]) -> None:
        super().__init__(model)
        self.log = log

    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        self.log.extend((self.model, r.messages, r.seed, r.n) for r in requests)
        async for item in super().stream(requests):
            yield item


@pytest.fixture
def world() -> Iterator[tuple[str, list[tuple]]]:
    log: list[tuple] = []
    with ServerThread(create_app({role: CountingSandbox(role, log) for role in ROLES})) as server:
        yield server.base_url, log


def write_config(folder: Path, base_url: str, **top: Any) -> Path:
    from lionkd.sandbox import world

    (folder / "seeds.jsonl").write_text("\n".join(json.dumps(r) for r in world.seed_pool(20, seed=0)))
    endpoint = {"backend": "openai", "base_url": base_url, "api_key_env": None, "max_tokens": 64, "price": PRICE}
    cfg = {
        "run_dir": "run", "seed": 0, **{role: endpoint | {"model": role} for role in ROLES},
        "student": {
            "model": "sandbox:base-student",
            "train": {"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3, "max_length": 64, "warmup_ratio": 0.0,
                      "lr_scheduler": "constant", "save_steps": 1000},
            "generation": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": 64},
        },
        "lion": {"seed_pool": "seeds.jsonl", "iterations": 1, "new_per_iteration": 8, "generation_rounds": 2},
    }
    for key, value in top.items():
        cfg[key] = cfg[key] | value if key in ROLES else value
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_a_budget_of_n_calls_sends_at_most_n_exits_3_and_a_rerun_sends_nothing_twice(tmp_path: Path, world) -> None:
    base_url, log = world
    alone = tmp_path / "alone"
    alone.mkdir()
    assert run_cli("run", str(write_config(alone, base_url)), "--no-progress", "--no-report").returncode == 0
    one_run = list(log)
    log.clear()

    limit = len(one_run) // 2
    config = write_config(tmp_path, base_url, budget={"max_calls": limit})
    dry = run_cli("run", str(config), "--dry-run")
    assert dry.returncode == 0 and f"budget max_calls {limit}: the estimate is up to" in dry.stdout
    assert "the run may stop there" in dry.stdout

    stopped = run_cli("run", str(config), "--no-progress", "--no-report")
    assert stopped.returncode == 3, stopped.stderr
    line = one_line(stopped.stderr)
    assert line.startswith("stopped: budget reached: spent ") and f"of max_calls {limit}" in line
    assert "the unfinished stages may need up to" in line and "run the same command again" in line
    assert sum(entry[3] for entry in log) <= limit  # requests (and their samples) sent
    first = list(log)

    more = write_config(tmp_path, base_url, budget={"max_calls": 10 * len(one_run)})
    done = run_cli("run", str(more), "--no-progress", "--no-report")  # the budget may change on a rerun
    assert done.returncode == 0, done.stderr
    # the rerun says where it picks up, and says it finished although it writes no report
    assert "resuming iteration 1, discrimination: 40 of 40 answers stored, " in done.stderr, done.stderr
    assert "finished: final student in " in done.stdout
    assert not set(first) & set(log[len(first):]), "a call was sent again"
    assert sorted(log, key=repr) == sorted(one_run, key=repr)  # together: exactly one run's requests


def test_a_cost_budget_is_never_passed(tmp_path: Path, world) -> None:
    base_url, _ = world
    config = write_config(tmp_path, base_url, budget={"max_cost": 0.002}, referee={"budget": {"max_calls": 10}})
    result = run_cli("run", str(config), "--no-progress", "--no-report")
    assert result.returncode == 3, result.stderr
    assert one_line(result.stderr).startswith("stopped: ")
    with Store.open_existing(tmp_path / "run") as store:
        usage = store.usage()
    cost = sum((u["prompt_tokens"] * PRICE["input"] + u["completion_tokens"] * PRICE["output"]) / 1e6
               for u in usage if u["role"] in ROLES)
    assert 0 < cost <= 0.002
    assert sum(u["calls"] for u in usage if u["role"] == "referee") <= 10
