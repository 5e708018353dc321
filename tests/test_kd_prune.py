"""Layer pruning: the right layers survive with their weights, and the result loads and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lionkd.errors import UserError
from lionkd.kd.prune import parse_keep, prune_layers


def build(name: str, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    small = {"vocab_size": 64, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, num_key_value_heads=2, **small))
    if name == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=2,
                          **small)
        return Qwen2ForCausalLM(cfg)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, **small))
    if name == "t5":
        return T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                                                   num_decoder_layers=layers, num_heads=4, decoder_start_token_id=0,
                                                   **small))
    return BartForConditionalGeneration(BartConfig(d_model=32, encoder_layers=layers, decoder_layers=layers,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                   decoder_start_token_id=2, forced_bos_token_id=None, **small))


def decoder_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    for path in ("model.layers", "transformer.h", "decoder.block", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError("no stack")


def test_parse_keep() -> None:
    assert parse_keep("first_last", 12) == [0, 11]
    assert parse_keep("even:4", 10) == [0, 3, 6, 9]
    assert parse_keep("0, 2, -1", 6) == [0, 2, 5]
    assert parse_keep([-1, 0, 0], 3) == [0, 2]
    assert parse_keep("all", 3) == [0, 1, 2]
    for bad in ("even:0", "7", "zero"):
        with pytest.raises(UserError):
            parse_keep(bad, 6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "t5", "bart"])
def test_prune_loads_and_generates(tmp_path: Path, family: str) -> None:
    model = build(family)
    model.save_pretrained(tmp_path / "full")
    keep = "first_last" if family != "llama" else [1, -1]
    info = prune_layers(tmp_path / "full", tmp_path / "pruned", keep)
    assert info["layers"] == 2
    loader = AutoModelForSeq2SeqLM if family in ("t5", "bart") else AutoModelForCausalLM
    pruned = loader.from_pretrained(tmp_path / "pruned")
    stack = decoder_stack(pruned)
    assert len(stack) == 2
    originals = decoder_stack(model)
    for new_i, old_i in enumerate(info["kept"]):
        old_state, new_state = originals[old_i].state_dict(), stack[new_i].state_dict()
        for key, value in new_state.items():
            if key in old_state:
                torch.testing.assert_close(value, old_state[key])
        for module in stack[new_i].modules():
            if getattr(module, "layer_idx", None) is not None:
                assert module.layer_idx == new_i
    if family == "qwen2":
        assert pruned.config.layer_types == [model.config.layer_types[i] for i in info["kept"]]
    ids = torch.tensor([[1, 5, 6, 7]])
    out = pruned.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] > (1 if family in ("t5", "bart") else 4)
    # the pruned copy computes: the same forward as the kept layers would give, without error
    assert torch.isfinite(pruned(ids, **({"decoder_input_ids": ids} if family in ("t5", "bart") else {})).logits).all()


def test_encoder_decoder_prunes_encoder_and_decoder_separately(tmp_path: Path) -> None:
    model = build("t5", layers=4)
    model.save_pretrained(tmp_path / "full")
    # (transformers sizes T5's generation cache by the encoder depth: keep the decoder no deeper)
    info = prune_layers(tmp_path / "full", tmp_path / "pruned", "even:2", encoder_keep="1,2,3")
    assert info == {"kept": [0, 3], "encoder_kept": [1, 2, 3], "layers": 2}
    pruned = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "pruned")
    assert len(pruned.encoder.block) == 3 and len(pruned.decoder.block) == 2
    assert pruned.config.num_layers == 3 and pruned.config.num_decoder_layers == 2
    # the relative position bias moved to the new first encoder block
    torch.testing.assert_close(
        pruned.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
    )
    ids = torch.tensor([[5, 6, 7, 2]])
    assert pruned.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > 1
