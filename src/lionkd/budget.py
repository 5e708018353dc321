"""A run's hard budget: the most calls and US dollars it may spend, over the whole run and per role.

`budget: {max_calls, max_cost}` limits the run (teacher, referee and generator together) and
`<role>.budget` one role within it. What was spent is what the run store's ledger holds - calls really
sent, at the configured prices, and failed calls (counted, at no cost) - so a rerun starts from what
earlier invocations spent. A call is admitted only if everything spent, plus every call in flight at
its worst case, plus its own worst case stays within every limit that applies: a run never starts a
call that could take it past its budget, however many calls are in flight at once.

The worst case of a call: one token per byte of its prompt (no tokenizer makes fewer bytes into more
tokens) plus a few per message for the chat template, and `max_tokens` for each sample asked for.
The student (a local model the run trains) is outside the budget.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .errors import BudgetExceeded, UserError

if TYPE_CHECKING:
    from .config import EndpointConfig, RunConfig
    from .store import Store

BUDGETED_ROLES = ("teacher", "referee", "generator")


class GenRequest(Protocol):
    """What the budget reads of a model call (`lionkd.llm.base.GenRequest`, a layer above this one)."""

    prompt: str | None
    messages: Sequence[tuple[str, str]] | None
    max_tokens: int
    n: int
FREE_BACKENDS = ("hf", "vllm", "sandbox")  # local models: a call costs no money even without a price
# chat-template tokens a message can add around its text (role markers, separators), and a request's own
_PER_MESSAGE, _PER_REQUEST = 16, 64


@dataclass
class Tally:
    calls: int = 0
    cost: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.calls + other.calls, self.cost + other.cost)

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.calls - other.calls, self.cost - other.cost)


def worst_prompt_tokens(request: GenRequest) -> int:
    texts = [request.prompt] if request.prompt is not None else [c for _, c in request.messages or ()]
    return sum(len(t.encode("utf-8")) + _PER_MESSAGE for t in texts) + _PER_REQUEST


class Budget:
    """Limits, what was spent and what is in flight, per role; shared by every call of one run (thread-safe)."""

    def __init__(self, cfg: RunConfig, spent: dict[str, Tally]) -> None:
        self.endpoints: dict[str, EndpointConfig] = {role: getattr(cfg, role) for role in BUDGETED_ROLES}
        self.run_limit = cfg.budget
        self.spent = {role: spent.get(role, Tally()) for role in BUDGETED_ROLES}
        self.reserved = {role: Tally() for role in BUDGETED_ROLES}
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, cfg: RunConfig, store: Store) -> Budget | None:
        """The budget of `cfg` over what `store`'s ledger says was spent; None when nothing is limited."""
        limits = [cfg.budget, *(getattr(cfg, role).budget for role in BUDGETED_ROLES)]
        if all(b.max_calls is None and b.max_cost is None for b in limits):
            return None
        spent: dict[str, Tally] = {}
        for row in store.usage():
            role = row["role"]
            if role not in BUDGETED_ROLES:
                continue
            price = getattr(cfg, role).price
            cost = price.cost(row["prompt_tokens"] or 0, row["completion_tokens"] or 0) if price else 0.0
            spent[role] = spent.get(role, Tally()) + Tally((row["calls"] or 0) + (row["failures"] or 0), cost)
        return cls(cfg, spent)

    def applies(self, role: str | None) -> bool:
        return role in BUDGETED_ROLES

    # ------------------------------------------------------------------ costing
    def _cost(self, role: str, prompt_tokens: int, completion_tokens: int) -> float:
        endpoint = self.endpoints[role]
        if endpoint.price is not None:
            return endpoint.price.cost(prompt_tokens, completion_tokens)
        if endpoint.backend in FREE_BACKENDS:
            return 0.0
        if self.run_limit.max_cost is None and endpoint.budget.max_cost is None:
            return 0.0  # no cost limit over this role: its calls are only counted
        limited = "budget.max_cost" if self.run_limit.max_cost is not None else f"{role}.budget.max_cost"
        raise UserError(f"{limited}: {role}.price is not set, so what its calls cost is unknown; "
                        f"set {role}.price (US dollars per 1M tokens) or drop the cost limit")

    def worst_case(self, role: str, request: GenRequest) -> Tally:
        return Tally(request.n, self._cost(role, worst_prompt_tokens(request), request.n * request.max_tokens))

    def actual(self, role: str, calls: int, prompt_tokens: int, completion_tokens: int) -> Tally:
        """What a finished call spent, as the ledger books it (a failure: one call, no tokens)."""
        return Tally(calls, self._cost(role, prompt_tokens, completion_tokens))

    # ------------------------------------------------------------------ admitting and settling calls
    def _limits(self, role: str) -> list[tuple[str, int | None, float | None, Tally]]:
        """(name, max calls, max cost, what counts against it now) for each limit over `role`."""
        total = sum((self.spent[r] + self.reserved[r] for r in BUDGETED_ROLES), Tally())
        mine = self.spent[role] + self.reserved[role]
        own = self.endpoints[role].budget
        return [("budget", self.run_limit.max_calls, self.run_limit.max_cost, total),
                (f"{role}.budget", own.max_calls, own.max_cost, mine)]

    def _passed(self, role: str, extra: Tally) -> str | None:
        """The name of the first limit over `role` that `extra` more would pass; None if it fits them all."""
        for name, max_calls, max_cost, used in self._limits(role):
            if ((max_calls is not None and used.calls + extra.calls > max_calls)
                    or (max_cost is not None and used.cost + extra.cost > max_cost + 1e-12)):
                return name
        return None

    def admit(self, role: str, requests: Sequence[GenRequest]) -> list[Tally]:
        """Reserve the worst case of as many leading `requests` as fit; their reservations, in order."""
        worst = [self.worst_case(role, r) for r in requests]
        admitted: list[Tally] = []
        with self._lock:
            for w in worst:
                if self._passed(role, w) is not None:
                    break
                self.reserved[role] = self.reserved[role] + w
                admitted.append(w)
        return admitted

    def settle(self, role: str, reserved: Tally, spent: Tally | None) -> None:
        """A call in flight is over: its reservation becomes what it spent (None: it was never answered)."""
        with self._lock:
            self.reserved[role] = self.reserved[role] - reserved
            if spent is not None:
                self.spent[role] = self.spent[role] + spent

    def in_flight(self) -> int:
        with self._lock:
            return sum(t.calls for t in self.reserved.values())

    # ------------------------------------------------------------------ saying where it stands
    def exceeded(self, role: str, rest: Sequence[GenRequest]) -> BudgetExceeded:
        """The stop: which limit the next call of `role` would pass, what was spent, what `rest` would cost."""
        with self._lock:
            name = self._passed(role, self.worst_case(role, rest[0])) or "budget"
        left = sum((self.worst_case(role, r) for r in rest), Tally())
        cost = f" and would cost up to ${left.cost:.4f}" if self.priced else ""
        return BudgetExceeded(
            f"{name} reached: spent {self.spent_line()}; the next {role} call could pass it; {left.calls} "
            f"{role} call{'s' * (left.calls != 1)} of this stage are left{cost}",
            role=role, calls_left=left.calls, cost_left=left.cost)

    @property
    def priced(self) -> bool:
        return any(e.price is not None for e in self.endpoints.values())

    def spent_line(self) -> str:
        total = sum((self.spent[r] for r in BUDGETED_ROLES), Tally())
        limits = [f"max_calls {self.run_limit.max_calls}" if self.run_limit.max_calls is not None else "",
                  f"max_cost ${self.run_limit.max_cost:g}" if self.run_limit.max_cost is not None else ""]
        within = f" of {' and '.join(x for x in limits if x)}" if any(limits) else ""
        roles = ", ".join(f"{r} {self.spent[r].calls}" for r in BUDGETED_ROLES if self.spent[r].calls)
        cost = f" and ${total.cost:.4f}" if self.priced else ""
        return f"{total.calls} calls{cost}{within} ({roles or 'none yet'})"
