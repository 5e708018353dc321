"""A local transformers model behind the common interface: the student, or a white-box teacher.

Requests with the same generation settings are batched, sorted by prompt length so little padding is
wasted, left-padded (decoder-only) and decoded with the KV cache. temperature 0 is greedy, otherwise
sampling with temperature/top_p (no top-k cut, as OpenAI-style APIs do); `num_beams > 1` is beam search
returning the `n` best beams. Chat messages are rendered with `render_prompt`, exactly as the KD
trainer renders them, so the student is asked in the form it was trained on; an encoder-decoder model
reads the system and user turns joined by blank lines, as in training.

Logprobs are the model's own distribution (log-softmax of the raw logits, before temperature or
top_p). The generated tokens' strings are surface strings (" the", not "Ġthe") that join to exactly the
reply text: a character split over several tokens is written by the token that starts it, the others
get "". Each token also carries its raw bytes (`SpelledToken`), which the server sends in OpenAI's
`bytes` field. An alternative that is part of a character is written in the API's "bytes:\\xe4" form.
Generation runs in a worker thread, one batch at a time, so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import dataclasses
import re
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from .base import Backend, Choice, GenRequest, GenResult, TokenLogprob
from .precision import DTYPES
from .templates import Template, has_chat_template, render_prompt, stop_token_ids

if TYPE_CHECKING:
    from ..config import EndpointConfig

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


@dataclasses.dataclass
class SpelledToken(TokenLogprob):
    """A generated token with its raw bytes and those of its alternatives (OpenAI's `bytes` field)."""

    bytes: list[int] = dataclasses.field(default_factory=list)
    top_bytes: list[list[int]] = dataclasses.field(default_factory=list)


@cache
def _byte_of_char() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: the way back."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _api_string(data: bytes) -> str:
    """Text when `data` is whole UTF-8, else the API's 'bytes:\\xe4\\xb8' form."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on a GPU that has it, else fp16."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(path: str, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a local directory or hub id, seq2seq when the config says so."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    spread = device == "map"  # over every visible GPU (then CPU): a model larger than one device
    where = pick_device("auto" if spread else device)
    try:
        config = AutoConfig.from_pretrained(path)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=pick_dtype(dtype, where), **({"device_map": "auto"} if spread else {}))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        from .models import known_names

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot load a model from here ({first[:200]}); a model is a folder, a .gguf "
                        f"file, a hub id or one of: {known_names()}") from None
    return (model if spread else model.to(where)), tokenizer


def batch_key(r: GenRequest) -> tuple:
    """What requests must share to be generated in one batch (every setting but the prompt)."""
    return (r.temperature, r.top_p, r.max_tokens, r.n, r.stop, r.seed, r.logprobs, r.num_beams)


class HFBackend(Backend):
    kind = "hf"

    def __init__(
        self,
        model_path_or_model: str | Path | Any,
        *,
        tokenizer: Any = None,
        template: Template = "chat",
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        batch_tokens: int | None = None,
    ) -> None:
        if isinstance(model_path_or_model, (str, Path)):
            name = str(model_path_or_model)
            model, loaded_tokenizer = load_model(name, dtype, device)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = model_path_or_model
            if tokenizer is None:
                raise ValueError("HFBackend: pass the tokenizer along with an already-loaded model")
            name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
            if device not in ("auto", "map"):
                model = model.to(pick_device(device))
            if dtype != "auto":
                model = model.to(DTYPES[dtype])
        super().__init__(name)
        self.net = model.eval()  # the torch module (`model` is the name, as for every backend)
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.eos_ids = stop_token_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("HFBackend: the model and tokenizer define no EOS token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # one generate at a time on this model
        self._pieces: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}
        self._anchor = (tokenizer.encode("a", add_special_tokens=False) or [0])[-1]

    @classmethod
    def from_endpoint(cls, endpoint: EndpointConfig, **overrides: Any) -> HFBackend:
        """The endpoint's model loaded in this process (`overrides`: e.g. the prompt template)."""
        from .models import resolve_model_path

        options: dict[str, Any] = {"dtype": endpoint.dtype, "device": endpoint.device,
                                   "batch_size": endpoint.batch_size, "batch_tokens": endpoint.batch_tokens}
        return cls(resolve_model_path(endpoint.model), **(options | overrides))

    def release(self) -> None:
        import gc

        self.net = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------ the batch
    async def stream(self, requests: Sequence[GenRequest]) -> AsyncIterator[tuple[int, GenResult]]:
        prompts = [self.encode(r) for r in requests]
        for batch in self._plan(requests, prompts):
            results = await asyncio.to_thread(self._run, [requests[i] for i in batch], [prompts[i] for i in batch])
            for i, result in zip(batch, results, strict=True):
                yield i, result

    def encode(self, req: GenRequest) -> list[int]:
        """The prompt's token ids, rendered and tokenized the way the KD trainer does it."""
        tok = self.tokenizer
        if self.encoder_decoder:
            text = req.prompt if req.prompt is not None else "\n\n".join(
                c for r, c in req.messages or () if r in ("system", "user"))
            return tok(text, add_special_tokens=True)["input_ids"]
        if req.prompt is not None:
            ids = tok(req.prompt, add_special_tokens=True)["input_ids"]
        else:
            text = render_prompt(tok, req.message_dicts(), self.template)
            by_chat_template = self.template == "chat" and has_chat_template(tok)  # it writes its own BOS
            ids = tok(text, add_special_tokens=not by_chat_template)["input_ids"]
        if self.max_positions and len(ids) + req.max_tokens > self.max_positions:  # keep the end of the prompt
            ids = ids[-max(1, self.max_positions - req.max_tokens):]
        return ids

    def _plan(self, requests: Sequence[GenRequest], prompts: list[list[int]]) -> list[list[int]]:
        """Batches of request indices: same settings, similar lengths, at most batch_size rows each and, with
        `batch_tokens`, at most that many padded tokens (rows x (longest prompt + max_tokens))."""
        by_settings: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_settings[batch_key(r)].append(i)
        batches = []
        for (temperature, _top_p, max_tokens, n, _stop, _seed, _lp, beams), indices in by_settings.items():
            per_request = beams if beams > 1 else (n if temperature > 0 else 1)  # rows one request takes
            size = max(1, self.batch_size // per_request)
            indices.sort(key=lambda i: len(prompts[i]))
            batch: list[int] = []
            for i in indices:  # ascending length: i is the longest of its batch so far
                tokens = (len(batch) + 1) * per_request * (len(prompts[i]) + max_tokens)
                if batch and (len(batch) >= size or (self.batch_tokens and tokens > self.batch_tokens)):
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        return batches

    # ------------------------------------------------------------------ one batch (worker thread)
    @torch.inference_mode()
    def _run(self, reqs: list[GenRequest], prompts: list[list[int]], streamer: Any = None) -> list[GenResult]:
        """One batch of same-settings requests; a `streamer` (one plain request) sees the tokens as they come."""
        req = reqs[0]  # every request in the batch has the same settings
        greedy = req.temperature == 0 and req.num_beams == 1
        beams = max(req.num_beams, req.n) if req.num_beams > 1 else 1
        sampling = not greedy and beams == 1
        rows = 1 if greedy else req.n  # greedy decoding gives n identical copies of one answer
        # a sample's rows are rows of the batch (greedy decoding returns one sequence per input row)
        inputs = self._pad([p for p in prompts for _ in range(rows)] if sampling else prompts)
        config = copy.deepcopy(self.net.generation_config)
        # Sampling is greedy decoding over Gumbel-perturbed logits (the Gumbel-max trick), with noise drawn
        # per row from a generator seeded by the request: a sample does not depend on which other
        # requests share its batch, so a resumed run asks the same questions an uninterrupted one did.
        config.update(
            max_new_tokens=req.max_tokens, min_new_tokens=0, do_sample=False, temperature=1.0, top_p=1.0,
            top_k=None, num_beams=beams, num_return_sequences=1 if sampling else rows, early_stopping=beams > 1,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), stop_strings=list(req.stop) or None,
            output_logits=req.logprobs is not None, return_dict_in_generate=True,
        )
        processors = sampling_processors(req, prompts, rows) if sampling else None
        with self._lock:
            out = self.net.generate(**inputs, generation_config=config, logits_processor=processors,
                                    tokenizer=self.tokenizer if req.stop else None, streamer=streamer)
        start = 1 if self.encoder_decoder else inputs["input_ids"].shape[1]
        generated = out.sequences[:, start:].cpu()
        logprobs = self._logprobs(out, generated, req.logprobs) if req.logprobs is not None else None
        results = []
        for b, prompt in enumerate(prompts):
            choices = [self._choice(generated[b * rows + j], req, logprobs[b * rows + j] if logprobs else None)
                       for j in range(rows)]
            if greedy:
                choices = [copy.deepcopy(choices[0]) for _ in range(req.n)]
            results.append(GenResult(
                choices=[c for c, _ in choices], prompt_tokens=len(prompt),
                completion_tokens=sum(count for _, count in choices),
            ))
        return results

    def _pad(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left padding for decoder-only models (generation continues on the right), right for encoders."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            cols = slice(0, len(p)) if self.encoder_decoder else slice(width - len(p), width)
            ids[i, cols] = torch.tensor(p, dtype=torch.long)
            mask[i, cols] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _choice(
        self, tokens: torch.Tensor, req: GenRequest, logprobs: list[TokenLogprob] | None
    ) -> tuple[Choice, int]:
        """The reply text cut at EOS or a stop string, its finish reason and its token count."""
        ids = tokens.tolist()
        end = len(ids)
        if self.pad_id not in self.eos_ids:  # padding follows a sequence that finished early
            while end and ids[end - 1] == self.pad_id:
                end -= 1
        eos_at = next((t for t in range(end) if ids[t] in self.eos_ids), None)
        if eos_at is not None:
            end, count, finish = eos_at, eos_at + 1, "stop"
        else:
            count, finish = end, "length" if end >= req.max_tokens else "stop"
        full = text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if logprobs is not None:
            logprobs = self._spelled(logprobs[:end], ids[:end], full)
            if cut >= 0:  # keep the tokens that spell the kept text
                kept, length = [], 0
                for lp in logprobs:
                    if length >= len(text):
                        break
                    kept.append(lp)
                    length += len(lp.token)
                logprobs = kept
        return Choice(text, finish, logprobs), count

    def _logprobs(self, out: Any, generated: torch.Tensor, top: int) -> list[list[TokenLogprob]]:
        """Per returned sequence: each generated token's logprob and the top-k alternatives."""
        steps = len(out.logits)
        beam_rows = getattr(out, "beam_indices", None)
        table: list[list[TokenLogprob]] = [[] for _ in range(generated.shape[0])]
        for t in range(min(steps, generated.shape[1])):
            rows = beam_rows[:, t].clamp(min=0) if beam_rows is not None else torch.arange(generated.shape[0])
            lp = torch.log_softmax(out.logits[t].float(), dim=-1)[rows.to(out.logits[t].device)].cpu()
            chosen = lp.gather(1, generated[:, t : t + 1]).squeeze(1).tolist()
            alts = lp.topk(top, dim=-1) if top > 0 else None
            for r, token in enumerate(generated[:, t].tolist()):
                alternatives, alt_bytes = [], []
                if alts is not None:
                    for a, v in zip(alts.indices[r].tolist(), alts.values[r].tolist(), strict=True):
                        data = self.token_bytes(a) or self.piece(a).encode()  # a special token: its name
                        alternatives.append((_api_string(data), v))
                        alt_bytes.append(list(data))
                table[r].append(SpelledToken(self.piece(token), chosen[r], alternatives, top_bytes=alt_bytes))
        return table

    def _spelled(self, tokens: list[TokenLogprob], ids: list[int], text: str) -> list[TokenLogprob]:
        """The tokens with strings that join to `text` and with their raw bytes."""
        raw = [self.token_bytes(i) for i in ids[: len(tokens)]]
        strings = _cut_at_characters(raw, text) or self._decoded_pieces(ids[: len(tokens)], text)
        return [dataclasses.replace(t, token=s, bytes=list(b)) if isinstance(t, SpelledToken)
                else dataclasses.replace(t, token=s) for t, s, b in zip(tokens, strings, raw, strict=True)]

    def _decoded_pieces(self, ids: list[int], text: str) -> list[str]:
        """Strings by decoding ever longer prefixes (tokenizers whose bytes do not give the text back)."""
        pieces, done = [], ""
        for t in range(len(ids)):
            now = self.tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
            if now.startswith(done) and text.startswith(now) and not now.endswith("\ufffd"):
                pieces.append(now[len(done):])
                done = now
            else:
                pieces.append("")
        if pieces:
            pieces[-1] += text[len(done):]
        return pieces

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text (empty for special tokens, which the text leaves out)."""
        data = self._bytes.get(token_id)
        if data is None:
            tok = self.tokenizer
            piece = self.piece(token_id)
            if token_id in tok.all_special_ids:
                data = b""
            elif "\ufffd" not in piece:
                data = piece.encode()
            else:  # part of a character: decoding cannot say which bytes, the token string can
                token = tok.convert_ids_to_tokens(token_id)
                byte = _BYTE_FALLBACK.fullmatch(token)
                table = _byte_of_char()
                if byte:
                    data = bytes([int(byte.group(1), 16)])
                elif all(c in table for c in token):
                    data = bytes(table[c] for c in token)
                else:
                    data = piece.encode()
            self._bytes[token_id] = data
        return data

    def piece(self, token_id: int) -> str:
        """The text a token adds after other text (keeps the leading space SentencePiece drops at the start)."""
        text = self._pieces.get(token_id)
        if text is None:
            tok = self.tokenizer
            if token_id in tok.all_special_ids:
                text = tok.convert_ids_to_tokens(token_id)
            else:
                text = tok.decode([self._anchor, token_id])[len(tok.decode([self._anchor])):]
            self._pieces[token_id] = text
        return text


class RowSeededGumbel:
    """Adds Gumbel noise to each row's scores from that row's own generator (see `sampling_processors`)."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                               for g in self.generators]).clamp_(1e-300, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        return scores.float() + gumbel.to(device=scores.device, dtype=torch.float32)


def sampling_processors(req: GenRequest, prompts: list[list[int]], rows: int) -> Any:
    """Temperature, top-p and per-row Gumbel noise: greedy decoding over them samples from the model.

    Row j of prompt p is seeded by (request seed, p, j), so its sample is the same in any batch; a
    request without a seed gets fresh randomness, as before.
    """
    import hashlib
    import random

    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    def seed_of(prompt: list[int], j: int) -> int:
        if req.seed is None:
            return random.getrandbits(63)
        key = f"{req.seed}|{j}|{','.join(map(str, prompt))}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    chain = [TemperatureLogitsWarper(req.temperature)]
    if req.top_p < 1.0:
        chain.append(TopPLogitsWarper(req.top_p))
    chain.append(RowSeededGumbel([seed_of(p, j) for p in prompts for j in range(rows)]))
    return LogitsProcessorList(chain)


def _cut_at_characters(raw: list[bytes], text: str) -> list[str] | None:
    """Token strings from raw token bytes: each character goes to the token holding its first byte.

    Bytes that never make a character become U+FFFD, as in decoding. None when the bytes do not spell
    `text` (a leading space that the decoder drops is allowed).
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    out = [""] * len(raw)
    holder: int | None = None  # the token where a character still being read began
    for t, piece in enumerate(raw):
        chunk = decoder.decode(piece)
        if holder is not None and chunk:
            out[holder] += chunk[0]
            chunk, holder = chunk[1:], None
        out[t] += chunk
        if holder is None and decoder.getstate()[0]:
            holder = t
    if out:
        out[holder if holder is not None else -1] += decoder.decode(b"", final=True)
    extra = sum(map(len, out)) - len(text)
    joined = "".join(out)
    if extra < 0 or not joined.endswith(text) or joined[:extra].strip():
        return None
    for t in range(len(out)):  # drop the leading space the text does not have
        drop = min(extra, len(out[t]))
        out[t], extra = out[t][drop:], extra - drop
    return out
