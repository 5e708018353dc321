"""Teacher scoring: the log-probability a served model gives every token of a given completion.

On-policy distillation needs the teacher's opinion of text it did not write (the student's samples).
OpenAI-compatible servers give it by scoring a prompt: the completion is appended to the context and
the server returns the log-probability of every prompt token and its top-k alternatives. Three wire
formats exist, chosen by `scoring`:

- "vllm": vLLM's `prompt_logprobs: k` (with `echo`): `choices[i].prompt_logprobs` is a list with one
  entry per prompt token, `null` for the first, else `{"<token id>": {"logprob", "rank",
  "decoded_token"}}` holding the prompt's own token (first) and the top-k. `lionkd serve` answers the
  same, and adds `prompt_token_ids` (vLLM's `return_token_ids`), which picks the prompt's own token
  without relying on the order.
- "sglang": SGLang's native `POST /generate` (beside its `/v1`) with `return_logprob`,
  `logprob_start_len: 0`, `top_logprobs_num: k` and `max_new_tokens: 0`: `meta_info.input_token_logprobs`
  holds `[logprob, token id, text]` per prompt token (`null` logprob for the first) and
  `meta_info.input_top_logprobs` the top-k in the same form. (SGLang's `/v1/completions` does not score
  the prompt even with `echo`.)
- "echo": the legacy completions scoring (`POST /v1/completions` with `echo: true, logprobs: k,
  max_tokens: 1`) that several hosted APIs still answer: `choices[i].logprobs` in the legacy lists
  (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) cover the prompt too, `null` first.
- "auto" tries vLLM's form, then SGLang's, then the legacy one, on the first call, and keeps what worked.

A `ScoreRequest` travels through the same machinery as a generation request: `CachedLLM` keys, stores,
budgets and charges it to its role (the prompt is what is charged), so a rerun never pays twice. The
tokens of the completion come back as a `GenResult` with one choice whose `logprobs` are the
completion's tokens (surface strings, as `kd/align.py` reads them). A server that cannot score prompts
is named in one `UserError` on the first call.

The server side (`score_prompt` and `scored_choice`) computes the same for a local transformers model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import openai
import torch

from ..errors import UserError
from .base import Choice, GenResult, TokenLogprob
from .openai_backend import MalformedResponse, OpenAIBackend

Scoring = Literal["auto", "vllm", "sglang", "echo"]
SCORINGS: tuple[str, ...] = ("auto", "vllm", "sglang", "echo")
MAX_SCORE_TOP_K = 20  # what vLLM allows by default (--max-logprobs) and OpenAI's legacy API allowed
PROBE_CONTEXT, PROBE_COMPLETION = "The capital of France is", " Paris."


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """Score `completion` after `context`: the log-probability of each completion token and its top-k.

    It quacks like a `GenRequest` where the call cache and the budget look (`n`, `max_tokens`,
    `messages`, `prompt`, `to_dict`): the whole text is the prompt a server reads, and at most one
    token is generated.
    """

    context: str
    completion: str
    top_k: int = 5
    n: int = 1
    max_tokens: int = 1
    messages: None = None

    @property
    def prompt(self) -> str:
        return self.context + self.completion

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"score": True}


# --------------------------------------------------------------------------- the client


class ScoringBackend(OpenAIBackend):
    """An OpenAI-compatible endpoint asked to score prompts (`ScoreRequest`s) instead of generating."""

    def __init__(self, model: str, *, scoring: Scoring = "auto", **options: Any) -> None:
        super().__init__(model, **options)
        if scoring not in SCORINGS:
            raise UserError(f"teacher.scoring: '{scoring}' is not one of {', '.join(SCORINGS)}")
        self.scoring: Scoring = scoring
        self._dialect_lock: asyncio.Lock | None = None

    async def _send(self, req: Any) -> GenResult:
        if not isinstance(req, ScoreRequest):
            return await super()._send(req)
        if self.scoring != "auto":
            return await self._score(req, self.scoring)
        # The first call finds the dialect; the calls behind it wait rather than try both forms too.
        if self._dialect_lock is None:
            self._dialect_lock = asyncio.Lock()
        async with self._dialect_lock:
            if self.scoring != "auto":
                return await self._score(req, self.scoring)
            for dialect in ("vllm", "sglang"):
                try:
                    result = await self._score(req, dialect)
                    self.scoring = dialect
                    return result
                except UserError:
                    pass
                except openai.APIStatusError as exc:  # 400 (unknown parameter), 404 (no such route): try the next
                    if exc.status_code >= 500 or exc.status_code in (401, 408, 409, 429):
                        raise
            result = await self._score(req, "echo")
            self.scoring = "echo"
            return result

    async def _score(self, req: ScoreRequest, dialect: str) -> GenResult:
        try:
            return await self._score_as(req, dialect)
        except _NoPromptScores as exc:  # not worth a retry: the server answered, without what is needed
            raise scoring_error(f"{self.where}, scoring '{dialect}'", str(exc)) from None

    async def _score_as(self, req: ScoreRequest, dialect: str) -> GenResult:
        assert self._client is not None
        if dialect == "sglang":
            return await self._score_sglang(req)
        body: dict[str, Any] = {"model": self.model, "prompt": req.prompt, "max_tokens": 1, "temperature": 0.0,
                                "echo": True}
        if dialect == "vllm":
            body |= {"prompt_logprobs": req.top_k, "return_token_ids": True}
        else:
            body |= {"logprobs": req.top_k}
        data = await self._client.post("/completions", body=body, cast_to=dict)
        try:
            choice = (data.get("choices") or [None])[0]
            if not isinstance(choice, dict):
                raise MalformedResponse("no choices in the response body")
            generated = int((data.get("usage") or {}).get("completion_tokens") or 0)
            tokens = (parse_vllm_scores(choice, req) if dialect == "vllm"
                      else parse_echo_scores(choice, req, generated))
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            raise MalformedResponse(f"{type(exc).__name__}: {exc}") from exc
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        return GenResult(choices=[Choice(req.completion, "length", tokens)], prompt_tokens=prompt_tokens,
                         completion_tokens=int(usage.get("completion_tokens") or 0))


    async def _score_sglang(self, req: ScoreRequest) -> GenResult:
        assert self._client is not None
        root = str(self._client.base_url).rstrip("/")
        root = root[: -len("/v1")] if root.endswith("/v1") else root  # the native API sits beside /v1
        body = {"text": req.prompt, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": req.top_k,
                "return_text_in_logprobs": True}
        data = await self._client.post(f"{root}/generate", body=body, cast_to=dict)
        try:
            data = data[0] if isinstance(data, list) else data
            meta = data.get("meta_info") or {}
            tokens = parse_sglang_scores(meta, req)
        except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise MalformedResponse(f"{type(exc).__name__}: {exc}") from exc
        return GenResult(choices=[Choice(req.completion, "length", tokens)],
                         prompt_tokens=int(meta.get("prompt_tokens") or 0), completion_tokens=0)


class _NoPromptScores(Exception):
    """The server answered, but with no log-probabilities of the prompt's tokens."""


def _completion_positions(strings: Sequence[str], context: str, completion: str,
                          offsets: Sequence[int] | None = None) -> list[tuple[int, str]]:
    """(position, the part of its string inside the completion) for each token that spells the completion.

    With `offsets` (legacy `text_offset`) a token belongs to the completion when it ends after the
    context; without, tokens are taken from the end until they cover the completion's length (the
    context's first token, scored by no one, then never matters).
    """
    end = len(context) + len(completion)
    out: list[tuple[int, str]] = []
    if offsets is not None:
        for i, (s, at) in enumerate(zip(strings, offsets, strict=True)):
            if at + len(s) > len(context) and at < end:
                out.append((i, s[max(0, len(context) - at):]))
        return out
    covered = 0
    for i in range(len(strings) - 1, -1, -1):
        if covered >= len(completion):
            break
        s = strings[i]
        keep = min(len(s), len(completion) - covered)
        out.append((i, s[len(s) - keep:]))
        covered += len(s)
    return out[::-1]


def parse_vllm_scores(choice: dict[str, Any], req: ScoreRequest) -> list[TokenLogprob]:
    """The completion's tokens from vLLM's `prompt_logprobs` (see the module doc)."""
    entries = choice.get("prompt_logprobs")
    if not entries:
        raise _NoPromptScores("the response has no prompt_logprobs")
    ids = choice.get("prompt_token_ids")
    chosen: list[tuple[str, float] | None] = []
    tops: list[list[tuple[str, float]]] = []
    for t, entry in enumerate(entries):
        if not entry:
            chosen.append(None)
            tops.append([])
            continue
        items = list(entry.items())
        own = str(ids[t]) if ids is not None and t < len(ids) and str(ids[t]) in entry else items[0][0]
        info = entry[own]
        chosen.append((info.get("decoded_token") or "", float(info["logprob"])))
        ranked = sorted(items, key=lambda kv: -float(kv[1]["logprob"]))[: req.top_k]
        tops.append([(v.get("decoded_token") or "", float(v["logprob"])) for _, v in ranked])
    strings = [c[0] if c is not None else "" for c in chosen]
    out = []
    for i, piece in _completion_positions(strings, req.context, req.completion):
        if chosen[i] is None:
            raise _NoPromptScores("the completion's first token was not scored")
        out.append(TokenLogprob(piece, chosen[i][1], tops[i]))  # type: ignore[index]
    return out


def parse_sglang_scores(meta: dict[str, Any], req: ScoreRequest) -> list[TokenLogprob]:
    """The completion's tokens from SGLang's `meta_info` (see the module doc)."""
    entries = meta.get("input_token_logprobs")
    if not entries:
        raise _NoPromptScores("the response has no input_token_logprobs")
    tops = meta.get("input_top_logprobs") or [None] * len(entries)
    strings = [str(e[2]) if len(e) > 2 and e[2] is not None else "" for e in entries]
    if not any(strings):
        raise _NoPromptScores("the input token logprobs carry no text (return_text_in_logprobs)")
    out = []
    for i, piece in _completion_positions(strings, req.context, req.completion):
        if entries[i][0] is None:
            raise _NoPromptScores("the completion's first token was not scored")
        top = [(str(t[2]) if len(t) > 2 and t[2] is not None else "", float(t[0])) for t in tops[i] or ()
               if t[0] is not None]
        out.append(TokenLogprob(piece, float(entries[i][0]), sorted(top, key=lambda kv: -kv[1])[: req.top_k]))
    return out


def parse_echo_scores(choice: dict[str, Any], req: ScoreRequest, generated: int = 0) -> list[TokenLogprob]:
    """The completion's tokens from legacy echoed `logprobs` (see the module doc).

    Without `text_offset` (some servers leave it empty) the `generated` tokens after the prompt are
    dropped and the completion is found from the end, as for vLLM's form.
    """
    lp = choice.get("logprobs")
    if not lp or not lp.get("tokens") or not lp.get("token_logprobs"):
        raise _NoPromptScores("the response has no echoed token logprobs")
    tokens, values = lp["tokens"], lp["token_logprobs"]
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    offsets = lp.get("text_offset")
    if not offsets or len(offsets) != len(tokens):
        tokens = tokens[: len(tokens) - generated] if generated else tokens
        offsets = None
    if sum(len(t) for t in tokens) < len(req.prompt) * 0.5:  # decoded pieces may differ a little, not halve
        raise _NoPromptScores("the echoed tokens do not cover the prompt")
    out = []
    for i, piece in _completion_positions(tokens, req.context, req.completion, offsets):
        if values[i] is None:
            raise _NoPromptScores("the completion's first token was not scored")
        top = sorted(((k, float(v)) for k, v in (tops[i] or {}).items()), key=lambda kv: -kv[1])
        out.append(TokenLogprob(piece, float(values[i]), top[: req.top_k]))
    return out


def scoring_error(where: str, error: str) -> UserError:
    return UserError(
        f"teacher ({where}) cannot score prompts: {error}; the on-policy objective needs a server that "
        "returns prompt log-probabilities (vLLM's prompt_logprobs, SGLang's /generate, the legacy echo + "
        "logprobs, or lionkd serve); set teacher.scoring to match it")


# --------------------------------------------------------------------------- the server side


@dataclasses.dataclass
class ScoredToken:
    """One token of a scored text: its id, surface string, log-probability (None: the first) and top-k."""

    id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]]


@torch.inference_mode()
def score_prompt(backend: Any, text: str, top_k: int) -> list[ScoredToken]:
    """Every token of `text` as a local transformers model (`HFBackend`) scores it, from one forward pass.

    The text is tokenized as a plain completions prompt is (special tokens added), so it is scored as
    vLLM scores the same request.
    """
    from .hf import _api_string

    if backend.encoder_decoder:
        raise ValueError("an encoder-decoder model does not score prompts")
    ids = backend.tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids:
        return []
    with backend._lock:  # one forward at a time on this model, as generation
        logits = backend.net(input_ids=torch.tensor([ids], device=backend.device)).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1) if top_k > 0 else None
    out = [ScoredToken(ids[0], backend.piece(ids[0]), None, [])]

    def alternative(a: int) -> str:  # part of a character in the API's "bytes:\xe4" form, as generation writes it
        return _api_string(backend.token_bytes(a) or backend.piece(a).encode())

    for t in range(1, len(ids)):
        alts = [] if top is None else [
            (a, alternative(a), v) for a, v in zip(top.indices[t - 1].tolist(), top.values[t - 1].tolist(), strict=True)]
        out.append(ScoredToken(ids[t], backend.piece(ids[t]), float(logprobs[t - 1, ids[t]]), alts))
    return out


def vllm_prompt_logprobs(tokens: Sequence[ScoredToken]) -> list[dict[str, dict[str, Any]] | None]:
    """`prompt_logprobs` in vLLM's shape: the token's own entry first, then its top-k."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for t in tokens:
        if t.logprob is None:
            out.append(None)
            continue
        entry = {str(t.id): {"logprob": t.logprob, "rank": _rank(t), "decoded_token": t.token}}
        for r, (a, s, v) in enumerate(t.top, start=1):
            entry.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": s})
        out.append(entry)
    return out


def _rank(t: ScoredToken) -> int:
    better = [v for _, _, v in t.top if v > (t.logprob or -math.inf)]
    return len(better) + 1


def echo_logprobs(tokens: Sequence[ScoredToken]) -> dict[str, Any]:
    """The legacy `logprobs` lists over a scored prompt (the first token's values are null)."""
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {s: v for _, s, v in t.top} for t in tokens],
            "text_offset": offsets}


# --------------------------------------------------------------------------- scoring many completions


class TeacherScorer:
    """Scores (context, completion) pairs through the call cache; counts what was sent and what was cached."""

    def __init__(self, llm: Any, top_k: int) -> None:  # llm: a CachedLLM over a ScoringBackend
        if not 0 <= top_k <= MAX_SCORE_TOP_K:
            raise UserError(f"kd.on_policy.top_k: {top_k} is outside [0, {MAX_SCORE_TOP_K}]")
        self.llm = llm
        self.top_k = top_k
        self.stats = {"calls_sent": 0, "calls_cached": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}

    @property
    def where(self) -> str:
        return getattr(self.llm.backend, "where", self.llm.model)

    def check(self) -> None:
        """One small scoring call (cached like any other): a server that cannot score prompts stops here."""
        (result,) = self._send([ScoreRequest(PROBE_CONTEXT, PROBE_COMPLETION, self.top_k)])
        if not result.ok:
            raise scoring_error(self.where, result.error or "the call failed")
        if not result.choices or not result.choices[0].logprobs:
            raise scoring_error(self.where, "no log-probabilities came back for the completion's tokens")

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[list[TokenLogprob] | None]:
        """The teacher's tokens of each completion (None where the call finally failed)."""
        results = self._send([ScoreRequest(c, x, self.top_k) for c, x in pairs])
        out: list[list[TokenLogprob] | None] = []
        for r in results:
            out.append(r.choices[0].logprobs or [] if r.ok and r.choices else None)
        return out

    def _send(self, requests: list[ScoreRequest]) -> list[GenResult]:
        results = self.llm.generate(requests)
        for r in results:
            if not r.ok:
                self.stats["failed"] += 1
                continue
            self.stats["calls_cached" if r.cached else "calls_sent"] += 1
            if not r.cached:
                self.stats["prompt_tokens"] += r.prompt_tokens
                self.stats["completion_tokens"] += r.completion_tokens
        return results


class NotScorable(Exception):
    """The served model cannot score prompts (the server answers 400)."""


async def scored_completions(backend: Any, prompts: Sequence[str], *, top_k: int, vllm_form: bool, echo: bool,
                             with_ids: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The choices and usage of `POST /v1/completions` that asks for prompt scores, nothing generated.

    `vllm_form`: `prompt_logprobs` (vLLM's shape); else the legacy echoed `logprobs`.
    """
    if getattr(backend, "net", None) is None or not hasattr(backend, "piece"):
        raise NotScorable(f"the model '{backend.model}' cannot score prompts (no prompt_logprobs or echo with "
                          "logprobs here)")
    choices, total = [], 0
    for i, text in enumerate(prompts):
        tokens = await asyncio.to_thread(score_prompt, backend, text, top_k)
        total += len(tokens)
        choice: dict[str, Any] = {"index": i, "text": text if echo else "", "finish_reason": "length",
                                  "logprobs": None}
        if vllm_form:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(tokens)
            if with_ids:
                choice["prompt_token_ids"] = [t.id for t in tokens]
        else:
            choice["logprobs"] = echo_logprobs(tokens)
        choices.append(choice)
    return choices, {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}


def open_scorer(endpoint: Any, store: Any, top_k: int, role: str = "teacher") -> TeacherScorer:
    """The scorer of an `EndpointConfig` (backend: openai) behind the run's call cache, booked to `role`."""
    from .cache import CachedLLM

    if endpoint.backend != "openai":
        raise UserError(f"{role}.backend: the 'on_policy' objective scores through a served teacher "
                        f"(backend: openai with base_url), not '{endpoint.backend}'")
    key = endpoint.api_key()
    if key is None and endpoint.base_url is None and endpoint.api_key_env:
        raise UserError(f"{role}.api_key_env: the environment variable ${endpoint.api_key_env} is not set")
    backend = ScoringBackend(endpoint.model, scoring=endpoint.scoring, base_url=endpoint.base_url, api_key=key,
                             concurrency=endpoint.concurrency, requests_per_minute=endpoint.requests_per_minute,
                             tokens_per_minute=endpoint.tokens_per_minute, max_retries=endpoint.max_retries,
                             timeout_s=endpoint.timeout_s)
    return TeacherScorer(CachedLLM(backend, store, role=role), top_k)
