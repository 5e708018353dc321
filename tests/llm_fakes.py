"""A scripted OpenAI-compatible server for tests: real HTTP on 127.0.0.1 that counts every request.

    plan = {"q1": ["429", "500"], "q2": ["401"]}          # per request content, one fault per attempt
    with FakeOpenAI(plan) as fake:
        backend = OpenAIBackend("fake", base_url=fake.base_url, timeout_s=0.5, backoff_base_s=0.01)
        results = backend.generate([GenRequest.chat([{"role": "user", "content": "q1"}])])
        assert fake.hits["q1"] == 3                          # two faults, then the reply

A request's *content* is its last user message (chat) or its prompt (completions). For the n-th
arrival of a content, `plan[content][n-1]` (or `plan(content, n)` when `plan` is a function) names what
happens; None or a missing entry means a normal reply. Faults:

    "429"        rate limited, with a `Retry-After` header (`retry_after`)
    "500", "503" server errors
    "400", "401", "403", "404"  client errors (not worth retrying)
    "stall"      no answer for `stall_s` seconds (past the client's timeout)
    "malformed"  200 with a body that is not JSON
    "wrong"      200 with JSON that is not a completion

A normal reply to sample j of content c is `reply(c, j)` ("reply j: c" by default) after `delay_s`
seconds (a number, or a function of the content), with usage (words as tokens) and word-level
logprobs when asked. `hold_after=k` holds every reply after the k-th until `release()` (to crash a
client mid-batch at a known point). Counters: `hits` (per content), `total`, `answered`, `faults`,
`arrivals` (times), `max_in_flight`, `bodies` (the JSON sent), `auth` (Authorization headers).

Also here: `tiny_tokenizer`, `tiny_model` and `tiny_model_dir` build a byte-level BPE tokenizer with a
chat template and a tiny Llama or T5 (hidden 32, 2 layers) for tests of local models.

Import it as `from llm_fakes import FakeOpenAI` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from lionkd.llm.server import ServerThread

Plan = Mapping[str, Sequence[str | None]] | Callable[[str, int], str | None]


def default_reply(content: str, sample: int) -> str:
    return f"reply {sample}: {content}"


class FakeOpenAI:
    def __init__(
        self,
        plan: Plan | None = None,
        *,
        delay_s: float | Callable[[str], float] = 0.0,
        stall_s: float = 3.0,
        retry_after: str = "0.01",
        reply: Callable[[str, int], str] = default_reply,
        hold_after: int | None = None,
    ) -> None:
        self.plan = plan or {}
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.retry_after = retry_after
        self.reply = reply
        self.hold_after = hold_after
        self.hits: Counter[str] = Counter()  # arrivals per content
        self.faults: Counter[str] = Counter()  # faults served, by kind
        self.answered = 0  # normal replies sent
        self.arrivals: dict[str, list[float]] = {}  # monotonic arrival times per content
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str] = []  # Authorization headers seen
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._closing = threading.Event()  # ends stalls and holds so the server stops at once
        self._thread = ServerThread(self._app())

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    @property
    def base_url(self) -> str:
        return self._thread.base_url

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> FakeOpenAI:
        self._thread.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._thread.__exit__(*exc)

    def _fault(self, content: str, attempt: int) -> str | None:
        if callable(self.plan):
            return self.plan(content, attempt)
        steps = self.plan.get(content, ())
        return steps[attempt - 1] if attempt <= len(steps) else None

    def _app(self) -> FastAPI:
        app = FastAPI()

        async def handle(request: Request, chat: bool) -> Response:
            body = await request.json()
            content = _content(body, chat)
            with self._lock:
                self.hits[content] += 1
                attempt = self.hits[content]
                self.arrivals.setdefault(content, []).append(time.monotonic())
                self.bodies.append(body)
                self.auth.append(request.headers.get("authorization", ""))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await answer(body, content, attempt, chat)
            finally:
                with self._lock:
                    self.in_flight -= 1

        async def answer(body: dict[str, Any], content: str, attempt: int, chat: bool) -> Response:
            fault = self._fault(content, attempt)
            if fault is not None:
                self.faults[fault] += 1
                return await self._faulty(fault)
            delay = self.delay_s(content) if callable(self.delay_s) else self.delay_s
            if delay:
                await asyncio.sleep(delay)
            with self._lock:
                self.answered += 1
                held = self.hold_after is not None and self.answered > self.hold_after
            while held and not self._released.is_set() and not self._closing.is_set():
                await asyncio.sleep(0.01)
            return JSONResponse(self._completion(body, content, chat))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await handle(request, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await handle(request, chat=False)

        return app

    async def _sleep_unless_closing(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self._closing.is_set():
            await asyncio.sleep(0.01)

    async def _faulty(self, fault: str) -> Response:
        if fault == "stall":
            await self._sleep_unless_closing(self.stall_s)
            return JSONResponse({"error": {"message": "too late"}}, status_code=504)
        if fault == "malformed":
            return Response('{"choices": [{"mess', media_type="application/json")
        if fault == "wrong":
            return JSONResponse({"unexpected": True})
        status = int(fault)
        headers = {"retry-after": self.retry_after} if status == 429 else {}
        message = {401: "Incorrect API key provided", 404: "The model does not exist"}.get(status, f"fault {fault}")
        return JSONResponse({"error": {"message": message, "type": "fake", "code": None}}, status_code=status,
                            headers=headers)

    def _completion(self, body: dict[str, Any], content: str, chat: bool) -> dict[str, Any]:
        n = body.get("n") or 1
        want_logprobs = body.get("logprobs") not in (None, False)
        top = (body.get("top_logprobs") or 0) if chat else (body.get("logprobs") or 0)
        choices = []
        for j in range(n):
            text = self.reply(content, j)
            tokens = re.findall(r"\s*\S+", text)
            choice: dict[str, Any] = {"index": j, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if want_logprobs:
                    choice["logprobs"] = {"content": [
                        {"token": t, "logprob": -0.1 * (k + 1), "bytes": list(t.encode()),
                         "top_logprobs": [{"token": t if a == 0 else f"alt{a}", "logprob": -0.1 * (k + 1) - a,
                                           "bytes": None} for a in range(top)]}
                        for k, t in enumerate(tokens)
                    ]}
            else:
                choice["text"] = text
                if want_logprobs:
                    choice["logprobs"] = {
                        "tokens": tokens, "token_logprobs": [-0.1 * (k + 1) for k in range(len(tokens))],
                        "top_logprobs": [{t: -0.1 * (k + 1)} for k, t in enumerate(tokens)], "text_offset": None,
                    }
            choices.append(choice)
        completion = sum(len(self.reply(content, j).split()) for j in range(n))
        return {
            "id": f"fake-{time.monotonic_ns()}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", "fake"), "choices": choices,
            "usage": {"prompt_tokens": len(content.split()), "completion_tokens": completion,
                      "total_tokens": len(content.split()) + completion},
        }


def _content(body: dict[str, Any], chat: bool) -> str:
    if not chat:
        return str(body.get("prompt", ""))
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    return str(users[-1]) if users else ""


# --------------------------------------------------------------------------- tiny local models

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "add 12 and 30", "sort the list 3 1 2",
    "what is the capital of france", "reverse the word lion", "a teacher answers, a student learns",
] * 20


WORD_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, *, words: Sequence[str] | None = None,
                   pad_is_eos: bool = False) -> Any:
    """A tokenizer trained on the spot, with pad/bos/eos and `chat_template`.

    By default a byte-level BPE (vocab ~300) with the roles' special tokens; with `words`, a word-level
    tokenizer of exactly those words (ids 0-3: <pad> <s> </s> <unk>), padding with EOS if `pad_is_eos`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if words is not None:
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=WORD_SPECIALS))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>" if pad_is_eos else "<pad>", unk_token="<unk>",
                                       chat_template=chat_template)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[3:], chat_template=chat_template)


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2, kv_heads: int = 2,
               max_positions: int = 256, **token_ids: Any) -> Any:
    """A randomly initialised Llama (seeded): `hidden` wide, `layers` deep, 4 attention heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions, **token_ids,
    ))


def tiny_t5(vocab_size: int, *, seed: int = 0, d_model: int = 32, layers: int = 2, **options: Any) -> Any:
    """A randomly initialised T5 (seeded), `layers` deep on both sides; `options` go to its config."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
        num_heads=4, **options,
    ))


def tiny_model(tokenizer: Any, *, encoder_decoder: bool = False, seed: int = 0) -> Any:
    """A tiny Llama (or T5) sized to `tokenizer`, with its special token ids, in eval mode."""
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    if encoder_decoder:
        return tiny_t5(len(tokenizer), seed=seed, decoder_start_token_id=tokenizer.pad_token_id, **ids).eval()
    return tiny_llama(len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id, **ids).eval()


def tiny_model_dir(path: Any, *, encoder_decoder: bool = False) -> Any:
    """Save a tiny model and its tokenizer as a normal Hugging Face directory; returns the path."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer, encoder_decoder=encoder_decoder).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
