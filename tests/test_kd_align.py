"""Token alignment across tokenizers: spans, minimum-edit pairing, alternative mapping, local teacher."""

from __future__ import annotations

import math
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lionkd.kd.align import (
    AlignedTargets,
    align_local_teacher,
    align_teacher_tokens,
    api_token_bytes,
    api_token_string,
    collate_aligned_targets,
    local_teacher_logprobs,
    token_scheme,
)
from lionkd.llm.base import TokenLogprob
from llm_fakes import tiny_llama

CORPUS = [
    "Hello world, this is a test. Hello there!",
    "Hi world, hello again and again.",
    "The year 2024 was long! The year 2023 was short.",
    "Café crème brûlée über alles, naïve façade.",
    "中文 文本 很 好, 中文 很 好",
    "Emoji 😀 fun 🎉 party 😀",
    "multiple   spaces\nand newlines\n\nhere",
    "playing played plays play player",
    "numbers 1 2 3 42 100 2024 3.14",
] * 10

TEXT = "Hello world, 2024!\nCafé 中文  😀 über"


def _byte_level(vocab_size: int, *, nfc_and_trimmed_offsets: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    if (
        nfc_and_trimmed_offsets
    ):  # like tokenizers whose offsets skip spaces and whose normaliser rewrites text
        tok.normalizer = normalizers.NFC()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[UNK]", "[SEP]"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")


def _unigram() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=250, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", bos_token="</s>"
    )


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "bpe": _byte_level(420),
        "bpe_small": _byte_level(300),
        "wordpiece": _wordpiece(),
        "unigram": _unigram(),
    }


def _tokens(tok: PreTrainedTokenizerFast, ids: torch.Tensor) -> list[str]:
    return tok.convert_ids_to_tokens(ids.tolist())


def _api_tokens(tok: PreTrainedTokenizerFast, text: str, n_alts: int = 3) -> list[TokenLogprob]:
    """What an API serving a model with tokenizer `tok` returns for `text`: the chosen tokens as
    surface strings, each with alternatives that are single tokens of the same form."""
    scheme = token_scheme(tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    spans = scheme.spans(text, tok.convert_ids_to_tokens(ids), enc["offset_mapping"])
    data = text.encode()
    cuts = [0, *(sp[1] for sp in spans[:-1]), len(data)]
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    ordinary = [t for i, t in enumerate(vocab) if i not in tok.all_special_ids]
    out = []
    for n, tid in enumerate(ids):
        piece = api_token_string(data[cuts[n] : cuts[n + 1]])
        own = vocab[tid]
        if scheme.kind == "wordpiece":
            lead = piece[: len(piece) - len(piece.lstrip())]
            if own.startswith("##"):
                pool = [t[2:] for t in ordinary if t.startswith("##")]
            elif lead or n == 0:
                pool = [lead + t for t in ordinary if not t.startswith("##") and t.isalnum()]
            else:  # with no space before it, only punctuation starts a word of its own
                pool = [t for t in ordinary if len(t) == 1 and t in string.punctuation]
        else:
            pool = [scheme.surface(t) for t in ordinary if not scheme.surface(t).startswith("bytes:")]
            if scheme.surface(own).startswith(" ") and not piece.startswith(" "):  # the first-word marker
                pool = [s[1:] for s in pool if s.startswith(" ") and s[1:].strip() == s[1:] != ""]
        alts = [s for s in pool if s != piece][n % 7 :: 11][:n_alts]
        top = [(piece, math.log(0.5))] + [(s, math.log(0.4 / (2 ** (a + 1)))) for a, s in enumerate(alts)]
        out.append(TokenLogprob(piece, math.log(0.5), top))
    return out


def test_api_token_strings_round_trip_bytes():
    assert api_token_bytes("bytes:\\xe2\\x80") == b"\xe2\x80"
    assert api_token_bytes("<0xE2>") == b"\xe2"
    assert api_token_bytes(" über") == " über".encode()
    assert api_token_string(b"\xe2\x80") == "bytes:\\xe2\\x80"
    assert api_token_string("中".encode()) == "中"
    assert api_token_bytes(api_token_string(b"\xf0\x9f")) == b"\xf0\x9f"


@pytest.mark.parametrize("name", ["bpe", "unigram", "wordpiece"])
def test_identical_tokenizers_align_everything_and_keep_all_mass(toks, name):
    tok = toks[name]
    teacher = _api_tokens(tok, TEXT)
    res = align_teacher_tokens(teacher, tok)
    expected = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert res.input_ids.tolist() == expected
    unk = {tok.unk_token_id}
    usable = torch.tensor([i not in unk for i in expected])
    assert bool(res.aligned[usable].all())
    assert res.teacher_index[usable].tolist() == [n for n, i in enumerate(expected) if i not in unk]
    assert res.mass_kept == pytest.approx(1.0)
    # the teacher's chosen token is the student's own token and the most likely one
    assert res.topk_ids[usable, 0].tolist() == [i for i in expected if i not in unk]
    assert torch.allclose(res.topk_logprobs[usable, 0], torch.full((int(usable.sum()),), math.log(0.5)))
    # every alternative became a student token of its own
    widths = (res.topk_ids >= 0).sum(-1)
    assert [int(widths[j]) for j in range(len(res)) if usable[j]] == [len(t.top) for t in teacher]
    assert max(len(t.top) for t in teacher) == 4


def test_bytelevel_teacher_to_wordpiece_hand_count(toks):
    wp = toks["wordpiece"]
    text_tokens = [
        ("Hello", [("Hello", 0.5), ("Hi", 0.2), ("Zzqx", 0.1)]),
        (" world", [(" world", 0.6), (" there", 0.3)]),
        (",", [(",", 0.9), ("!", 0.05), (" and", 0.01)]),
        (" 20", [(" 20", 0.8), (" 19", 0.1)]),
        ("24", [("24", 0.7), ("23", 0.2)]),
        ("!", [("!", 0.7), (".", 0.2), ("?", 0.05)]),
        ("\n", [("\n", 0.9)]),
        ("Caf", [("Caf", 0.9)]),
        ("é", [("é", 0.9)]),
    ]
    teacher = [
        TokenLogprob(t, math.log(top[0][1]), [(s, math.log(p)) for s, p in top]) for t, top in text_tokens
    ]
    res = align_teacher_tokens(teacher, wp)
    assert res.text == "Hello world, 2024!\nCafé"
    assert _tokens(wp, res.input_ids) == ["hello", "world", ",", "2024", "!", "cafe"]
    assert res.teacher_index.tolist() == [0, 1, 2, -1, 5, -1]
    assert res.by_span.tolist() == [True, True, True, False, True, False]
    assert res.aligned_fraction == pytest.approx(4 / 6)
    # "Zzqx" and "?" are not student tokens; everything else maps
    assert res.mass_kept == pytest.approx((0.7 / 0.8 + 1 + 1 + 0.9 / 0.95) / 4)

    vocab = wp.get_vocab()
    assert res.topk_ids[0, :2].tolist() == [vocab["hello"], vocab["hi"]]
    assert res.topk_logprobs[0, :2].tolist() == pytest.approx([math.log(0.5), math.log(0.2)])
    assert res.topk_ids[0, 2:].eq(-1).all() and res.topk_logprobs[0, 2:].eq(float("-inf")).all()
    assert res.topk_ids[1, :2].tolist() == [vocab["world"], vocab["there"]]
    # after "world" a "," and a "!" are words of their own; " and" is a new word too
    assert res.topk_ids[2, :3].tolist() == [vocab[","], vocab["!"], vocab["and"]]
    assert res.topk_ids[4, :2].tolist() == [vocab["!"], vocab["."]]
    # unaligned rows: the student's own token with log-probability 0, i.e. cross-entropy
    for row in (3, 5):
        assert res.topk_ids[row, 0] == res.input_ids[row] and res.topk_logprobs[row, 0] == 0
        assert res.topk_ids[row, 1:].eq(-1).all()


def test_wordpiece_continuations_take_the_hash_form(toks):
    wp = toks["wordpiece"]
    vocab = wp.get_vocab()
    scheme = token_scheme(wp)
    cont = next(t for t in vocab if t.startswith("##") and t[2:].isalpha() and t[2:] in vocab)
    core = cont[2:]
    assert scheme.lookup(core.encode(), lead_from="", lead_to="", prev_char="y") == vocab[cont]
    assert scheme.lookup(core.encode(), lead_from="", lead_to="", prev_char=",") == vocab[core]
    assert scheme.lookup((" " + core).encode(), lead_from="", lead_to="", prev_char="y") == vocab[core]
    assert scheme.lookup(core.upper().encode(), lead_from="", lead_to="", prev_char=None) == vocab[core]
    assert scheme.lookup(b"two words", lead_from="", lead_to="", prev_char=None) is None


def test_bytelevel_teacher_to_unigram_positions_and_marker(toks):
    sp = toks["unigram"]
    teacher = _api_tokens(toks["bpe"], TEXT)
    res = align_teacher_tokens(teacher, sp)
    t_strings = [t.token for t in teacher]
    s_strings = _tokens(sp, res.input_ids)
    assert t_strings == ["Hello", " world", ",", " 2024", "!", "\n", "Café", " 中文", " ", " 😀", " über"]
    assert s_strings[8:13] == [",", "▁202", "4", "!", "\n"] and s_strings[17:23] == [
        "▁",
        "中",
        "文",
        "▁",
        "▁",
        "😀",
    ]
    # where both cut the text at the same places the tokens pair up, whitespace set aside
    expected = {8: 2, 11: 4, 12: 5, 20: 8, 22: 9}  # ",", "!", "\n", the first of two spaces, the emoji
    assert {j: i for j, i in enumerate(res.teacher_index.tolist()) if i >= 0} == expected
    assert res.by_span.sum() == len(expected)
    assert res.aligned_fraction == pytest.approx(len(expected) / len(s_strings))

    # SentencePiece marks the first word with a space the text does not have: a teacher alternative
    # without a space ("again") is written the student's way ("▁again")
    vocab = sp.get_vocab()
    teacher = [
        TokenLogprob("play", math.log(0.6), [("play", math.log(0.6)), ("again", math.log(0.3))]),
        TokenLogprob(" again", math.log(0.9), [(" again", math.log(0.9)), (" play", math.log(0.05))]),
    ]
    res = align_teacher_tokens(teacher, sp)
    assert _tokens(sp, res.input_ids) == ["▁play", "▁again"]
    assert res.topk_ids.tolist() == [[vocab["▁play"], vocab["▁again"]], [vocab["▁again"], vocab["▁play"]]]
    assert res.mass_kept == pytest.approx(1.0)


TRICKY = [
    TEXT,
    "The year 2024 was long! Hello there, naïve façade.\n\nmultiple   spaces 😀🎉 中文 很 好",
    "  leading spaces, 3.14 and 100%\ttabs\n",
]


@pytest.mark.parametrize("teacher_name", ["bpe", "bpe_small", "unigram", "wordpiece"])
def test_every_scheme_pair_keeps_its_invariants(toks, teacher_name):
    for text in TRICKY:
        teacher = _api_tokens(toks[teacher_name], text)
        for name, tok in toks.items():
            res = align_teacher_tokens(teacher, tok, k=3)
            assert res.text == text
            assert res.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
            assert res.topk_ids.shape == (len(res), 3) and res.topk_logprobs.shape == (len(res), 3)
            valid = res.topk_ids >= 0
            assert res.topk_ids[valid].max() < len(tok)
            assert torch.isfinite(res.topk_logprobs[valid]).all() and (res.topk_logprobs[valid] <= 0).all()
            assert res.topk_logprobs[~valid].eq(float("-inf")).all()
            assert 0 < res.mass_kept <= 1 + 1e-9 and 0 < res.aligned_fraction <= 1
            # a teacher position feeds one student position at most, in order
            used = res.teacher_index[res.aligned].tolist()
            assert used == sorted(set(used))
            # span-aligned tokens write the same text, whitespace and the student's normaliser aside
            normalize = tok.backend_tokenizer.normalizer
            for j in res.by_span.nonzero().flatten().tolist():
                t_text = teacher[res.teacher_index[j]].token.strip()
                s_text = token_scheme(tok).surface(_tokens(tok, res.input_ids[j : j + 1])[0]).strip()
                t_text = (
                    normalize.normalize_str(t_text).strip() if normalize and name == "wordpiece" else t_text
                )
                assert s_text == t_text, (teacher_name, name, j)
            un = ~res.aligned
            assert (res.topk_ids[un, 0] == res.input_ids[un]).all() and (res.topk_logprobs[un, 0] == 0).all()
        same = align_teacher_tokens(teacher, toks[teacher_name])
        unk = same.input_ids == toks[teacher_name].unk_token_id
        assert same.aligned[~unk].all()
        if teacher_name != "wordpiece":  # WordPiece alternatives depend on their neighbours
            assert same.mass_kept == pytest.approx(1.0)


def test_non_ascii_digits_spaces_and_partial_bytes(toks):
    bpe = toks["bpe_small"]
    # 😀 is F0 9F 98 80; an API returns the pieces of a split character in 'bytes:' form
    teacher = [
        TokenLogprob("Emoji", -0.1, [("Emoji", -0.1)]),
        TokenLogprob("bytes:\\x20\\xf0\\x9f", -0.2, [("bytes:\\x20\\xf0\\x9f", -0.2), (" fun", -2.0)]),
        TokenLogprob("bytes:\\x98", -0.3, []),
        TokenLogprob("<0x80>", -0.3, []),
        TokenLogprob("  42", -0.4, [("  42", -0.4)]),
        TokenLogprob(" 中", -0.5, [(" 中", -0.5)]),
        TokenLogprob("bytes:\\xe6", -0.5, []),  # cut mid-character at max_tokens: dropped
    ]
    res = align_teacher_tokens(teacher, bpe)
    assert res.text == "Emoji 😀  42 中"
    assert len(res) == len(bpe(res.text, add_special_tokens=False)["input_ids"])
    assert res.topk_ids.shape[0] == len(res) and res.aligned.dtype == torch.bool
    # positions stay in range and unaligned rows are one-hot
    assert res.teacher_index.max() < 6
    un = ~res.aligned
    assert (res.topk_ids[un, 0] == res.input_ids[un]).all() and (res.topk_logprobs[un, 0] == 0).all()

    # digits and accents against every scheme
    for name, tok in toks.items():
        text = "naïve 3.14 über 2024 façade"
        teacher = _api_tokens(toks["bpe"], text)
        res = align_teacher_tokens(teacher, tok)
        assert res.aligned.any(), name
        if name == "wordpiece":
            idx = _tokens(tok, res.input_ids).index("2024")
            assert res.aligned[idx]


def test_minimum_edit_pairs_tokens_whose_offsets_are_off(toks):
    # An NFC normaliser makes the student's token bytes differ from the text, and trimmed offsets make
    # whitespace tokens zero-width: spans cannot pair them, the edit alignment can.
    student = _byte_level(420, nfc_and_trimmed_offsets=True)
    teacher = [TokenLogprob(t, -0.1, []) for t in ["Cafe", "\u0301", " is", "  ", " good", "\n\n", "yes"]]
    res = align_teacher_tokens(teacher, student)
    s_strings = _tokens(student, res.input_ids)
    j = s_strings.index("ĠĠ")
    assert res.teacher_index[j] == 3 and not res.by_span[j] and res.aligned[j]
    assert res.by_span[s_strings.index("Ġis")] and res.teacher_index[s_strings.index("Ġis")] == 2


def test_openai_dicts_and_eos(toks):
    content = [
        {
            "token": "Hello",
            "logprob": -0.1,
            "bytes": list(b"Hello"),
            "top_logprobs": [
                {"token": "Hello", "logprob": -0.1, "bytes": list(b"Hello")},
                {"token": "Hi", "logprob": -2.5, "bytes": list(b"Hi")},
            ],
        },
        {"token": " world", "logprob": -0.2, "top_logprobs": [{"token": " there", "logprob": -1.9}]},
    ]
    bpe = toks["bpe"]
    res = align_teacher_tokens(content, bpe, append_eos=True)
    assert res.text == "Hello world"
    assert res.input_ids[-1] == bpe.eos_token_id and not res.aligned[-1]
    assert res.aligned[:-1].all()
    # the chosen " world" was missing from top_logprobs: it is added with its own logprob
    vocab = bpe.get_vocab()
    assert res.topk_ids[1, :2].tolist() == [vocab["Ġworld"], vocab["Ġthere"]]
    assert res.topk_logprobs[1, :2].tolist() == pytest.approx([-0.2, -1.9])


def test_collate_pads_rows_and_positions(toks):
    bpe = toks["bpe"]
    a = align_teacher_tokens(_api_tokens(bpe, "Hello world"), bpe)
    b = align_teacher_tokens(_api_tokens(bpe, TEXT, n_alts=1), bpe)
    batch = collate_aligned_targets([a, b], pad_token_id=7)
    n, m = len(a), len(b)
    assert batch["input_ids"].shape == (2, max(n, m))
    assert batch["topk_ids"].shape == (2, max(n, m), 4)
    assert batch["input_ids"][0, n:].eq(7).all() and batch["attention_mask"][0].sum() == n
    assert batch["topk_ids"][0, n:].eq(-1).all() and batch["topk_logprobs"][0, n:].eq(float("-inf")).all()
    assert batch["topk_ids"][1, :, 2:].eq(-1).all()
    assert not batch["aligned"][0, n:].any() and batch["aligned"][1, :m].equal(b.aligned)
    assert collate_aligned_targets([a, b], k=2)["topk_ids"].shape[-1] == 2


def test_local_teacher_logprobs_are_the_models(toks):
    teacher_tok = toks["bpe"]
    model = tiny_llama(len(teacher_tok), max_positions=128).eval()
    prompt, target = "Question: greet.\nAnswer:", " Hello world, 2024! Café 😀"
    tokens = local_teacher_logprobs(model, teacher_tok, prompt, target, k=5)
    assert "".join(t.token for t in tokens) == target
    assert all(len(t.top) == 5 for t in tokens)

    p_ids = teacher_tok(prompt)["input_ids"]
    t_ids = teacher_tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].log_softmax(-1)
    for n, tid in enumerate(t_ids):
        assert tokens[n].logprob == pytest.approx(float(logp[len(p_ids) - 1 + n, tid]), abs=1e-5)
        assert tokens[n].top[0][1] == pytest.approx(float(logp[len(p_ids) - 1 + n].max()), abs=1e-5)

    # the same tokenizer on both sides: every position aligned, every alternative a student token
    same = align_local_teacher(model, teacher_tok, prompt, target, teacher_tok, k=5)
    assert same.input_ids.tolist() == t_ids
    assert same.aligned.all() and same.mass_kept == pytest.approx(1.0)
    assert torch.allclose(same.topk_logprobs[:, 0], torch.tensor([t.top[0][1] for t in tokens]), atol=1e-5)


def test_local_teacher_across_schemes(toks):
    teacher_tok, student_tok = toks["bpe"], toks["unigram"]
    model = tiny_llama(len(teacher_tok), max_positions=128).eval()
    target = "Hello world, this is a test.\nThe year 2024!"
    res = align_local_teacher(model, teacher_tok, "Say hi:", target, student_tok, k=4)
    assert isinstance(res, AlignedTargets)
    assert res.text == target
    assert res.input_ids.tolist() == student_tok(target, add_special_tokens=False)["input_ids"]
    s_strings = _tokens(student_tok, res.input_ids)
    for word in (",", "!", "\n"):
        assert res.aligned[s_strings.index(word)], word
    assert 0 < res.aligned_fraction < 1 and 0 < res.mass_kept <= 1
    assert res.topk_ids.shape[1] <= 5
    ok = res.topk_ids >= 0
    assert res.topk_ids[ok].max() < len(student_tok)
    # a WordPiece teacher (spaces dropped by its tokenizer) still spells the text exactly
    wp = toks["wordpiece"]
    wp_model = tiny_llama(len(wp), max_positions=128).eval()
    tokens = local_teacher_logprobs(wp_model, wp, "[SEP]", "hello world, this is a test.", k=3)
    assert "".join(t.token for t in tokens) == "hello world, this is a test."
    res = align_teacher_tokens(tokens, teacher_tok)
    assert res.aligned.sum() >= 4
