import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lionkd.sandbox import student, world


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from a second thread, and lose a lot on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return student.train_tokenizer(world.corpus(n_per_phrasing=5), vocab_size=400)


def test_tokenizer_splits_digits_and_has_specials_and_chat_template(tokenizer):
    ids = tokenizer("Add 375 and 5.", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]).strip() for i in ids]
    assert {"3", "7", "5"} <= set(pieces)
    assert not any(p.isdigit() and len(p) > 1 for p in pieces)
    assert tokenizer.decode(ids) == "Add 375 and 5."
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    }
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add 3 and 4."}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\nAdd 3 and 4.\n<|assistant|>\n"


def test_student_trains_saves_reloads_and_generates(tokenizer, tmp_path):
    model = student.build_student(tokenizer, size="micro", seed=0)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    losses = student.train_on_world(model, tokenizer, steps=30, seed=0, batch_size=16, lr=1e-2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    out = student.save_student(model, tokenizer, tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tokenizer.chat_template
    assert student.prompt_text(tok, "Add 3 and 4.") == student.prompt_text(tokenizer, "Add 3 and 4.")
    batch = student.encode_examples(
        tok, [("Add 3 and 4.", "7"), ("Sort 3, 1, 2 in ascending order.", "1, 2, 3")]
    )
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-5)

    items = world.test_set(per_task=2, seed=0)
    answers = student.generate_answers(again, tok, [x.instruction for x in items], max_new_tokens=8)
    assert len(answers) == len(items) and all(isinstance(a, str) for a in answers)
    report = student.evaluate_student(again, tok, [x.to_record() for x in items], batch_size=8)
    assert report["n"] == len(items)
    assert set(report["by_task"]) == set(world.TASKS)
    assert 0.0 <= report["overall"] <= 1.0


def test_batched_left_padded_generation_matches_one_by_one(tokenizer):
    model = student.build_student(tokenizer, size="micro", seed=1)
    student.train_on_world(model, tokenizer, steps=10, seed=1, batch_size=16, lr=1e-2)
    questions = ["Add 3 and 4.", "Sort 30, 1, 22, 9 in ascending order.", "Evaluate: true and false."]
    together = student.generate_answers(model, tokenizer, questions, max_new_tokens=6)
    alone = [student.generate_answers(model, tokenizer, [q], max_new_tokens=6)[0] for q in questions]
    assert together == alone


def test_prepare_base_student_is_reproducible(tmp_path):
    a = student.prepare_base_student(tmp_path / "a", steps=6, seed=3, size="micro")
    b = student.prepare_base_student(tmp_path / "b", steps=6, seed=3, size="micro")
    assert a["final_loss"] == b["final_loss"]
    assert json.loads((tmp_path / "a" / "lionkd_base.json").read_text())["steps"] == 6
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_shipped_base_student_loads_and_beats_chance():
    path = student.base_student_dir()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert student.prompt_text(tok, "Add 3 and 4.") == "<|user|>\nAdd 3 and 4.\n<|assistant|>\n"
    easy = ("boolean", "count_letters", "repeat")
    items = [x for x in world.test_set(per_task=30, seed=0) if x.task in easy]
    report = student.evaluate_student(model, tok, items)
    assert report["by_task"]["boolean"] > 0.7  # chance is 0.5
    assert report["by_task"]["count_letters"] > 0.3  # chance is about 0.1
    assert report["by_task"]["repeat"] > 0.3  # chance is about 0
