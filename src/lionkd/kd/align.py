"""Align a teacher's top-k log-probabilities to a student tokenizer, for logit KD across tokenizers.

A black-box teacher (an OpenAI-compatible API) returns its generated text as token strings, each with
its log-probability and its top-k alternatives. The student tokenizes the same text its own way. For
every student position we build a sparse target: the teacher's alternatives at the corresponding
teacher position, written as student token ids.

Correspondence is found in two passes:
1. Spans. Both tokenizations are laid over the UTF-8 bytes of the text. A student token whose span
   equals a teacher token's span is aligned. Spans are compared with surrounding whitespace set aside,
   because schemes disagree on which token owns a space: byte-level BPE glues it to the next word,
   SentencePiece prepends a marker even at the start of the text, WordPiece drops it.
2. Minimum edit distance. Between two span-aligned pairs, a Levenshtein alignment of the token strings
   pairs tokens with equal normalised strings that overlap in the text (whitespace tokens such as
   newlines, tokens whose offsets are unreliable).

An alternative string maps to a student id only when it is one student token in the student's own
form (word-initial or continuation). Student positions with no teacher counterpart get a one-hot row on
their own token, so a sparse KL on them is plain cross-entropy; `aligned` marks which is which.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lionkd.llm.base import TokenLogprob
from lionkd.llm.templates import answer_end_id

Scheme = Literal["byte_level", "metaspace", "wordpiece", "plain"]
Span = tuple[int, int]

_METASPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BYTE_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")
_MAX_EDIT_CELLS = 4_000_000  # beyond this a gap is left unaligned rather than stalling the loader


# ---------------------------------------------------------------------------------------------------
# Token strings <-> bytes


def _gpt2_byte_alphabet() -> dict[int, str]:
    """Byte-level BPE writes each byte as a printable character: this is that table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _gpt2_byte_alphabet().items()}


def api_token_bytes(token: str) -> bytes:
    """The bytes an API token string stands for: 'bytes:\\xe2\\x80' and '<0xE2>' forms included."""
    if token.startswith("bytes:"):
        parts = _BYTE_ESCAPE.split(token[len("bytes:") :])
        # split() alternates literal text and captured hex pairs
        return b"".join(bytes([int(p, 16)]) if i % 2 else p.encode() for i, p in enumerate(parts))
    m = _BYTE_TOKEN.fullmatch(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.encode()


def api_token_string(data: bytes) -> str:
    """The inverse of `api_token_bytes`: text when the bytes are whole UTF-8, else the 'bytes:' form."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _decoded(data: bytes) -> str | None:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def _logaddexp(a: float, b: float) -> float:
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi)) if hi > float("-inf") else hi


def _leading_ws(s: str) -> str:
    return s[: len(s) - len(s.lstrip())]


def _content_span(data: bytes, span: Span) -> Span | None:
    """`span` without leading and trailing whitespace; None when nothing but whitespace is left."""
    s, e = span
    text = _decoded(data[s:e])
    if text is None:  # part of a multibyte character: nothing to trim
        return span if e > s else None
    core = text.strip()
    if not core:
        return None
    start = s + len(_leading_ws(text).encode())
    return start, start + len(core.encode())


# ---------------------------------------------------------------------------------------------------
# The student's scheme and its reverse vocabulary


class TokenScheme:
    """How a tokenizer writes text as token strings, and the way back from a surface string to one id.

    Built once per tokenizer (see `token_scheme`): the reverse tables cost a pass over the vocabulary.
    """

    def __init__(self, tokenizer: Any) -> None:
        backend = tokenizer.backend_tokenizer
        spec = json.loads(backend.to_str())
        vocab: dict[str, int] = backend.get_vocab(with_added_tokens=False)
        self.backend = backend  # not the tokenizer itself: the cache must not keep it alive
        self.unk_id: int | None = tokenizer.unk_token_id
        self.special_ids: set[int] = set(tokenizer.all_special_ids)
        self.prefix = ""
        pieces = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        if spec["model"]["type"] == "WordPiece":
            self.kind: Scheme = "wordpiece"
            self.prefix = spec["model"].get("continuing_subword_prefix") or "##"
        elif '"ByteLevel"' in pieces:
            self.kind = "byte_level"
        elif '"Metaspace"' in pieces or sum(t.startswith(_METASPACE) for t in vocab) * 50 > len(vocab):
            self.kind = "metaspace"
        else:
            self.kind = "plain"

        self.by_key: dict[bytes, int] = {}
        for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            if idx in self.special_ids:
                continue
            key = self.token_bytes(token) if self.kind != "wordpiece" else token.encode()
            if key is not None:
                self.by_key.setdefault(key, idx)

    # -- one vocabulary token -------------------------------------------------------------------------
    def token_bytes(self, token: str) -> bytes | None:
        """The bytes a token string adds to the text (WordPiece: its core, without '##')."""
        if self.kind == "byte_level":
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                return None
        if self.kind == "metaspace":
            m = _BYTE_TOKEN.fullmatch(token)
            return bytes([int(m.group(1), 16)]) if m else token.replace(_METASPACE, " ").encode()
        if self.kind == "wordpiece" and token.startswith(self.prefix):
            return token[len(self.prefix) :].encode()
        return token.encode()

    def is_word_initial(self, token: str) -> bool:
        return not (self.kind == "wordpiece" and token.startswith(self.prefix))

    def surface(self, token: str) -> str:
        """The token as an API would print it (spaces as spaces, partial bytes in 'bytes:' form)."""
        data = self.token_bytes(token)
        return token if data is None else api_token_string(data)

    # -- the way back -----------------------------------------------------------------------------------
    def lookup(self, alt: bytes, *, lead_from: str | None, lead_to: str, prev_char: str | None) -> int | None:
        """The id of the single student token that writes `alt` at a position, or None.

        `lead_from` / `lead_to` are the leading whitespace of the teacher's chosen token and of the
        student's token at this position: an alternative that starts like the teacher's token is given
        the student's start instead (a SentencePiece student marks the first word with a space the text
        does not have). `prev_char` is the text just before the position (WordPiece needs it to know
        whether a continuation is '##'-form).
        """
        text = _decoded(alt)
        if text is None:  # a piece of a multibyte character
            if self.kind in ("byte_level", "metaspace"):
                return self._id(alt)
            return None
        if self.kind == "wordpiece":
            return self._wordpiece_lookup(text, prev_char)
        if lead_from is not None and lead_from != lead_to and _leading_ws(text) == lead_from:
            text = lead_to + text[len(lead_from) :]
        return self._id(text.encode())

    def _wordpiece_lookup(self, text: str, prev_char: str | None) -> int | None:
        normalizer, pre_tokenizer = self.backend.normalizer, self.backend.pre_tokenizer
        normalize = normalizer.normalize_str if normalizer is not None else (lambda s: s)
        core = normalize(text)
        starts_word = core[:1].isspace() or prev_char is None
        core = core.strip()
        if not core or any(c.isspace() for c in core):
            return None
        if not starts_word:
            prev = normalize(prev_char)  # type: ignore[arg-type]
            if not prev or prev[-1:].isspace() or pre_tokenizer is None:
                starts_word = not prev or prev[-1:].isspace()
            else:
                pieces = pre_tokenizer.pre_tokenize_str(prev + core)
                starts_word = any(start == len(prev) for _, (start, _) in pieces)
        return self._id((core if starts_word else self.prefix + core).encode())

    def _id(self, key: bytes) -> int | None:
        idx = self.by_key.get(key)
        return None if idx is None or idx == self.unk_id else idx

    # -- spans of an encoded text ---------------------------------------------------------------------
    def spans(self, text: str, tokens: Sequence[str], offsets: Sequence[Span]) -> list[Span | None]:
        """Byte span of each token of `text` (None where the tokenizer does not say it exactly)."""
        data = text.encode()
        if self.kind == "byte_level":
            # Offsets of byte-level tokenizers are trimmed and shared between pieces of one character;
            # the token bytes themselves are exact.
            pieces = [self.token_bytes(t) for t in tokens]
            if all(p is not None for p in pieces):
                joined = b"".join(pieces)  # type: ignore[arg-type]
                extra = len(joined) - len(data)  # a prefix space some tokenizers add
                if joined.endswith(data) and not joined[:extra].strip():
                    out: list[Span | None] = []
                    pos = -extra
                    for p in pieces:
                        out.append((max(pos, 0), max(pos + len(p), 0)))  # type: ignore[arg-type]
                        pos += len(p)  # type: ignore[arg-type]
                    return out

        char_to_byte = [0]
        for c in text:
            char_to_byte.append(char_to_byte[-1] + len(c.encode()))
        spans: list[Span | None] = [(char_to_byte[s], char_to_byte[e]) for s, e in offsets]
        # Byte-fallback tokens ('<0xE4>' x3 for one character) share the character's span: share it out.
        i = 0
        while i < len(spans):
            j = i
            while j + 1 < len(spans) and spans[j + 1] == spans[i]:
                j += 1
            run = tokens[i : j + 1]
            if j > i:
                s, e = spans[i]  # type: ignore[misc]
                if all(_BYTE_TOKEN.fullmatch(t) for t in run) and e - s == len(run):
                    spans[i : j + 1] = [(s + n, s + n + 1) for n in range(len(run))]
            i = j + 1
        if self.kind == "metaspace":
            # The marker SentencePiece prepends to the first word has no character of its own.
            for n, (tok, sp) in enumerate(zip(tokens, spans, strict=True)):
                if sp is not None and self.is_blank(tok) and data[sp[0] : sp[1]].strip():
                    spans[n] = (sp[0], sp[0])
        return spans

    def is_blank(self, token: str) -> bool:
        """True for tokens that write only whitespace (or nothing) into the text."""
        data = self.token_bytes(token)
        text = _decoded(data) if data is not None else None
        return text is not None and not text.strip()


_SCHEMES: weakref.WeakKeyDictionary[Any, TokenScheme] = weakref.WeakKeyDictionary()


def token_scheme(tokenizer: Any) -> TokenScheme:
    """The (cached) `TokenScheme` of a Hugging Face fast tokenizer."""
    scheme = _SCHEMES.get(tokenizer)
    if scheme is None:
        scheme = _SCHEMES[tokenizer] = TokenScheme(tokenizer)
    return scheme


# ---------------------------------------------------------------------------------------------------
# Result


@dataclass
class AlignedTargets:
    """Sparse teacher targets for one student target sequence.

    Row t of `topk_ids` / `topk_logprobs` is the target distribution for predicting `input_ids[t]`
    (the trainer shifts logits as usual). Log-probabilities are the teacher's, not renormalised.
    Padding is id -1 with log-probability -inf. Unaligned rows hold the student's own token with
    log-probability 0, which makes a sparse KL on them equal to cross-entropy.
    """

    text: str
    input_ids: torch.Tensor  # [T] long
    topk_ids: torch.Tensor  # [T, k] long
    topk_logprobs: torch.Tensor  # [T, k] float32
    aligned: torch.Tensor  # [T] bool
    teacher_index: torch.Tensor  # [T] long: the teacher position each row came from, -1 if none
    by_span: torch.Tensor  # [T] bool: aligned by identical spans (else by edit distance, or not at all)
    mass_kept: float  # teacher top-k mass that mapped into the student vocabulary, mean over aligned rows

    @property
    def aligned_fraction(self) -> float:
        n = self.aligned.numel()
        return float(self.aligned.float().mean()) if n else 0.0

    def __len__(self) -> int:
        return self.input_ids.numel()


# ---------------------------------------------------------------------------------------------------
# Teacher tokens


def _as_token_logprob(item: Any) -> tuple[bytes, float, list[tuple[bytes, float]]]:
    """(chosen bytes, logprob, alternatives) from a `TokenLogprob` or an OpenAI `logprobs.content` dict."""
    if isinstance(item, Mapping):
        chosen = bytes(item["bytes"]) if item.get("bytes") is not None else api_token_bytes(item["token"])
        top = [
            (
                bytes(a["bytes"]) if a.get("bytes") is not None else api_token_bytes(a["token"]),
                float(a["logprob"]),
            )
            for a in item.get("top_logprobs") or ()
        ]
        return chosen, float(item["logprob"]), top
    return (
        api_token_bytes(item.token),
        float(item.logprob),
        [(api_token_bytes(t), float(lp)) for t, lp in item.top],
    )


def _alternatives(chosen: bytes, logprob: float, top: list[tuple[bytes, float]]) -> list[tuple[bytes, float]]:
    """The teacher's alternatives, chosen token first, each string once."""
    out = {chosen: logprob}
    for alt, lp in top:
        out.setdefault(alt, lp)
    return list(out.items())


def _usable_prefix(pieces: list[bytes]) -> int:
    """How many teacher tokens spell valid UTF-8 (an API cut at max_tokens can end mid-character)."""
    data = b"".join(pieces)
    try:
        data.decode()
        return len(pieces)
    except UnicodeDecodeError as err:
        bad, end, n = err.start, 0, 0
        for n, p in enumerate(pieces):  # noqa: B007 - n is used after the loop
            if end + len(p) > bad:
                break
            end += len(p)
        return n


# ---------------------------------------------------------------------------------------------------
# Alignment


def _edit_pairs(
    t_keys: list[bytes | None], s_keys: list[bytes | None], overlap: list[list[bool]]
) -> list[tuple[int, int]]:
    """Levenshtein alignment of two key sequences; pairs where equal keys sit on the diagonal."""
    n, m = len(t_keys), len(s_keys)
    if not n or not m or n * m > _MAX_EDIT_CELLS:
        return []

    def same(i: int, j: int) -> bool:
        return t_keys[i] is not None and t_keys[i] == s_keys[j] and overlap[i][j]

    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        row, prev = cost[i], cost[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j - 1] + (0 if same(i - 1, j - 1) else 1), prev[j] + 1, row[j - 1] + 1)
    pairs = []
    i, j = n, m
    while i and j:
        if cost[i][j] == cost[i - 1][j - 1] + (0 if same(i - 1, j - 1) else 1):
            if same(i - 1, j - 1):
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i][j] == cost[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _unique_positions(spans: Sequence[Span | None]) -> dict[Span, int]:
    """Each span held by exactly one token, with that token's position (a shared span is nobody's)."""
    seen: dict[Span, int] = {}
    for n, sp in enumerate(spans):
        if sp is not None:
            seen[sp] = -1 if sp in seen else n
    return {sp: n for sp, n in seen.items() if n >= 0}


def _key(surface: bytes, normalize: Any) -> bytes | None:
    """What two tokens must share to be paired by the edit alignment."""
    text = _decoded(surface)
    if text is None:
        return surface
    if not text.strip():
        return surface or None
    return normalize(text.strip()).strip().encode() or None


@dataclass
class _Sides:
    """One text as the teacher's tokens and as the student's tokenisation of it, each token with its byte span."""

    scheme: TokenScheme
    parsed: list[tuple[bytes, float, list[tuple[bytes, float]]]]  # the teacher's (chosen, logprob, alternatives)
    data: bytes
    t_spans: list[Span]
    s_ids: list[int]
    s_tokens: list[str]
    s_spans: list[Span | None]

    @property
    def unusable(self) -> set[int | None]:
        """Student ids that never pair with a teacher token (special tokens, unknown)."""
        return {*self.scheme.special_ids, self.scheme.unk_id}


def _both_sides(teacher_tokens: Sequence[TokenLogprob | Mapping[str, Any]], student_tokenizer: Any) -> _Sides:
    """The teacher's tokens (cut to the prefix that spells whole characters) and the student's tokens of
    the text they spell, each with its byte span."""
    scheme = token_scheme(student_tokenizer)
    parsed = [_as_token_logprob(t) for t in teacher_tokens]
    parsed = parsed[: _usable_prefix([p[0] for p in parsed])]
    data = b"".join(p[0] for p in parsed)
    text = data.decode()
    t_spans: list[Span] = []
    pos = 0
    for chosen, _, _ in parsed:
        t_spans.append((pos, pos + len(chosen)))
        pos += len(chosen)
    enc = student_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    s_ids: list[int] = list(enc["input_ids"])
    s_tokens: list[str] = student_tokenizer.convert_ids_to_tokens(s_ids)
    return _Sides(scheme, parsed, data, t_spans, s_ids, s_tokens, scheme.spans(text, s_tokens, enc["offset_mapping"]))


def _match_by_span(sides: _Sides) -> dict[int, int]:
    """Student position -> teacher position for tokens with identical spans, whole or without their whitespace."""
    unusable, data = sides.unusable, sides.data
    s_full = [None if idx in unusable else sp for sp, idx in zip(sides.s_spans, sides.s_ids, strict=True)]
    s_content = [
        None if sp is None or sides.scheme.is_blank(tok) else _content_span(data, sp)
        for sp, tok in zip(s_full, sides.s_tokens, strict=True)
    ]
    match: dict[int, int] = {}
    t_content = [_content_span(data, sp) for sp in sides.t_spans]
    for t_side, s_side in ((sides.t_spans, s_full), (t_content, s_content)):
        teacher_at = _unique_positions(t_side)
        taken = set(match.values())
        for sp, j in _unique_positions(s_side).items():
            i = teacher_at.get(sp)
            if i is not None and j not in match and i not in taken:
                match[j] = i
                taken.add(i)
    return match


def _match_by_edits(sides: _Sides, anchored: dict[int, int]) -> dict[int, int]:
    """More student -> teacher pairs: a minimum-edit alignment inside each gap between anchored pairs."""
    scheme = sides.scheme
    normalize = (
        scheme.backend.normalizer.normalize_str
        if scheme.kind == "wordpiece" and scheme.backend.normalizer is not None
        else (lambda s: s)
    )
    t_keys = [_key(c, normalize) for c, _, _ in sides.parsed]
    s_keys = [
        None if idx in sides.unusable else _key(scheme.token_bytes(tok) or b"", lambda s: s)
        for tok, idx in zip(sides.s_tokens, sides.s_ids, strict=True)
    ]

    def overlaps(i: int, j: int) -> bool:
        if sides.s_spans[j] is None:
            return True
        (a, b), (c, d) = sides.t_spans[i], sides.s_spans[j]
        # A zero-width span (trimmed offsets) overlaps what it touches.
        return (a < d and c < b) if a < b and c < d else (a <= d and c <= b)

    found: dict[int, int] = {}
    anchors = [(-1, -1), *sorted((i, j) for j, i in anchored.items()), (len(sides.parsed), len(sides.s_ids))]
    for (ti, sj), (tn, sn) in zip(anchors, anchors[1:], strict=False):
        t_gap, s_gap = range(ti + 1, tn), range(sj + 1, sn)
        grid = [[overlaps(i, j) for j in s_gap] for i in t_gap]
        for a, b in _edit_pairs([t_keys[i] for i in t_gap], [s_keys[j] for j in s_gap], grid):
            found[s_gap[b]] = t_gap[a]
    return found


def _target_row(sides: _Sides, j: int, i: int) -> tuple[list[tuple[int, float]], float]:
    """Student position j's sparse target from teacher position i: the teacher's alternatives mapped into
    the student's vocabulary (best first), and the share of their probability mass that mapped."""
    scheme, data = sides.scheme, sides.data
    s_id = sides.s_ids[j]
    chosen, logprob, top = sides.parsed[i]
    # An empty chosen token (a SentencePiece marker with no text of its own) says nothing about form.
    lead_from = _leading_ws(_decoded(chosen) or "") if chosen else None
    lead_to = (
        ""
        if scheme.kind == "wordpiece"
        else _leading_ws(_decoded(scheme.token_bytes(sides.s_tokens[j]) or b"") or "")
    )
    start = sides.t_spans[i][0]
    prev_char = data[max(0, start - 4) : start].decode(errors="ignore")[-1:] or None
    merged: dict[int, float] = {}
    total = mapped = 0.0
    for alt, lp in _alternatives(chosen, logprob, top):
        p = math.exp(lp)
        total += p
        idx = s_id if alt == chosen else scheme.lookup(alt, lead_from=lead_from, lead_to=lead_to, prev_char=prev_char)
        if idx is None:
            continue
        mapped += p
        merged[idx] = _logaddexp(merged[idx], lp) if idx in merged else lp
    return sorted(merged.items(), key=lambda kv: -kv[1]), (mapped / total if total > 0 else 0.0)


def _padded(rows: Sequence[Sequence[tuple[int, float]]], k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (id, logprob) as [T, k] tensors, padded with id -1 and log-probability -inf."""
    width = k or max((len(r) for r in rows), default=1)
    topk_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    topk_logprobs = torch.full((len(rows), width), float("-inf"), dtype=torch.float32)
    for r, row in enumerate(rows):
        for c, (idx, lp) in enumerate(row[:width]):
            topk_ids[r, c] = idx
            topk_logprobs[r, c] = lp
    return topk_ids, topk_logprobs


def align_teacher_tokens(
    teacher_tokens: Sequence[TokenLogprob | Mapping[str, Any]],
    student_tokenizer: Any,
    *,
    k: int | None = None,
    append_eos: bool = False,
) -> AlignedTargets:
    """Student tokens and sparse teacher targets for the text the teacher generated.

    `teacher_tokens` are the teacher's tokens in order: `TokenLogprob`s, or the dicts of an OpenAI
    `logprobs.content` list. `k` fixes the row width (default: as wide as the widest row). With
    `append_eos`, the token that ends a student's answer (its chat template's end of turn, else EOS)
    ends the sequence as an unaligned (cross-entropy) row.

    Steps: both sides' tokens with their byte spans; pairs of identical spans; pairs by minimum edit
    distance between them; a target row per student token (its own token, as cross-entropy, where
    it has no teacher counterpart).
    """
    sides = _both_sides(teacher_tokens, student_tokenizer)
    match = _match_by_span(sides)
    span_matched = set(match)
    match |= _match_by_edits(sides, match)

    rows: list[list[tuple[int, float]]] = []
    kept: list[float] = []
    for j, s_id in enumerate(sides.s_ids):
        if j not in match:
            rows.append([(s_id, 0.0)])
            continue
        row, mass = _target_row(sides, j, match[j])
        rows.append(row)
        kept.append(mass)
    s_ids = list(sides.s_ids)
    if append_eos:
        eos = answer_end_id(student_tokenizer, "chat")
        s_ids.append(eos)
        rows.append([(eos, 0.0)])

    topk_ids, topk_logprobs = _padded(rows, k)
    n = len(rows)
    teacher_index = torch.full((n,), -1, dtype=torch.long)
    for j, i in match.items():
        teacher_index[j] = i
    return AlignedTargets(
        text=sides.data.decode(),
        input_ids=torch.tensor(s_ids, dtype=torch.long),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        aligned=teacher_index >= 0,
        teacher_index=teacher_index,
        by_span=torch.tensor([j in span_matched for j in range(n)], dtype=torch.bool),
        mass_kept=sum(kept) / len(kept) if kept else 0.0,
    )


def collate_aligned_targets(
    items: Sequence[AlignedTargets], *, pad_token_id: int = 0, k: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack several `AlignedTargets` into right-padded batch tensors.

    Returns input_ids [B, T] (pad_token_id), attention_mask [B, T], topk_ids [B, T, k] (-1),
    topk_logprobs [B, T, k] (-inf) and aligned [B, T] (False on padding).
    """
    if not items:
        raise ValueError("collate_aligned_targets needs at least one item")
    length = max(len(it) for it in items)
    width = k or max(it.topk_ids.shape[1] for it in items)
    b = len(items)
    out = {
        "input_ids": torch.full((b, length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, length), dtype=torch.long),
        "topk_ids": torch.full((b, length, width), -1, dtype=torch.long),
        "topk_logprobs": torch.full((b, length, width), float("-inf"), dtype=torch.float32),
        "aligned": torch.zeros((b, length), dtype=torch.bool),
    }
    for r, it in enumerate(items):
        t, w = len(it), min(width, it.topk_ids.shape[1])
        out["input_ids"][r, :t] = it.input_ids
        out["attention_mask"][r, :t] = 1
        out["topk_ids"][r, :t, :w] = it.topk_ids[:, :w]
        out["topk_logprobs"][r, :t, :w] = it.topk_logprobs[:, :w]
        out["aligned"][r, :t] = it.aligned
    return out


# ---------------------------------------------------------------------------------------------------
# A local (white-box) teacher with its own tokenizer


def _tile(data: bytes, spans: Sequence[Span | None]) -> list[bytes]:
    """Cut `data` at each token's end, so the pieces spell the text exactly (a gap joins the next token)."""
    cuts = [0]
    for sp in spans[:-1]:
        cuts.append(max(cuts[-1], sp[1]) if sp is not None else cuts[-1])
    cuts.append(len(data))
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


@torch.no_grad()
def local_teacher_logprobs(
    model: Any, tokenizer: Any, prompt: str, target: str, *, k: int = 5
) -> list[TokenLogprob]:
    """Teacher-forced top-k log-probabilities of a local model over `target`, as an API would give them.

    One forward pass over prompt + target. Token strings are surface strings (spaces as spaces,
    partial characters in 'bytes:' form), so `align_teacher_tokens` treats them like API tokens.
    """
    scheme = token_scheme(tokenizer)
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    target_ids: list[int] = list(enc["input_ids"])
    if not target_ids:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if getattr(model.config, "is_encoder_decoder", False):
            prompt_ids = tokenizer(prompt)["input_ids"]
            start = model.config.decoder_start_token_id
            decoder_ids = torch.tensor([[start, *target_ids[:-1]]], device=device)
            logits = model(
                input_ids=torch.tensor([prompt_ids], device=device), decoder_input_ids=decoder_ids
            ).logits[0]
        else:
            prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
            if not prompt_ids and tokenizer.bos_token_id is not None:
                prompt_ids = [tokenizer.bos_token_id]
            if not prompt_ids:
                raise ValueError("local_teacher_logprobs needs a prompt, or a tokenizer with a BOS token")
            ids = torch.tensor([prompt_ids + target_ids], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    finally:
        model.train(was_training)

    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tokens = tokenizer.convert_ids_to_tokens(target_ids)
    chosen = _tile(target.encode(), scheme.spans(target, tokens, enc["offset_mapping"]))
    out = []
    for t, (tid, piece) in enumerate(zip(target_ids, chosen, strict=True)):
        lead = _leading_ws(_decoded(piece) or "")
        alts = []
        for aid, alp in zip(top_ids[t].tolist(), top_lp[t].tolist(), strict=True):
            if aid in scheme.special_ids:
                continue
            token = tokenizer.convert_ids_to_tokens(aid)
            surface = scheme.surface(token)
            if scheme.kind == "wordpiece" and scheme.is_word_initial(token):
                # WordPiece drops spaces: a word-initial alternative starts like the chosen word does.
                surface = (lead if scheme.is_word_initial(tokens[t]) else " ") + surface
            alts.append((surface, alp))
        out.append(TokenLogprob(api_token_string(piece), float(logprobs[t, tid]), alts))
    return out


def align_local_teacher(
    model: Any,
    teacher_tokenizer: Any,
    prompt: str,
    target: str,
    student_tokenizer: Any,
    *,
    k: int = 5,
    append_eos: bool = False,
) -> AlignedTargets:
    """Word-level KD targets from a local teacher whose tokenizer differs from the student's."""
    tokens = local_teacher_logprobs(model, teacher_tokenizer, prompt, target, k=k)
    return align_teacher_tokens(tokens, student_tokenizer, k=k, append_eos=append_eos)
