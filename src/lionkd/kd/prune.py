"""Students made by dropping layers of a pretrained (or teacher) model.

The paper's choice for encoder-decoders: prune the decoder (its depth drives generation latency)
and keep its first and last layers. Kept layers keep their weights; the config, the per-layer
`layer_idx` used by KV caches and any per-layer `layer_types` list follow the new numbering, so the
result loads with `from_pretrained` and generates.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ..errors import UserError

Keep = str | Sequence[int]

# where the layer stack lives, by family (the first path that exists wins)
DECODER_ONLY_STACKS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
ENCODER_STACKS = ("encoder.block", "model.encoder.layers")
DECODER_STACKS = ("decoder.block", "model.decoder.layers")


def parse_keep(keep: Keep, n_layers: int) -> list[int]:
    """Layer indices to keep, ascending: "first_last", "even:N", "all", "0,2,-1" or a list of ints."""
    if isinstance(keep, str):
        spec = keep.strip()
        if spec == "first_last":
            indices = [0, n_layers - 1]
        elif spec == "all":
            indices = list(range(n_layers))
        elif spec.startswith("even:"):
            try:
                count = int(spec.split(":", 1)[1])
            except ValueError:
                raise UserError(f"prune keep '{keep}': expected even:N with an integer N") from None
            if not 1 <= count <= n_layers:
                raise UserError(f"prune keep '{keep}': N must be between 1 and {n_layers}")
            indices = [round(i * (n_layers - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
        else:
            try:
                indices = [int(p) for p in spec.split(",") if p.strip()]
            except ValueError:
                raise UserError(f"prune keep '{keep}': use first_last, even:N, all or a list like 0,2,-1") from None
    else:
        indices = [int(i) for i in keep]
    resolved = []
    for i in indices:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise UserError(f"prune keep: layer {i} does not exist (the stack has {n_layers} layers)")
        resolved.append(j)
    if not resolved:
        raise UserError("prune keep: no layer left")
    return sorted(set(resolved))


def _find(model: nn.Module, paths: Sequence[str]) -> tuple[nn.Module, str, nn.ModuleList]:
    for path in paths:
        owner: Any = model
        *parents, leaf = path.split(".")
        try:
            for p in parents:
                owner = getattr(owner, p)
            stack = getattr(owner, leaf)
        except AttributeError:
            continue
        if isinstance(stack, nn.ModuleList):
            return owner, leaf, stack
    raise UserError(f"pruning: no layer stack found in {type(model).__name__} (looked for {', '.join(paths)})")


def _keep_layers(model: nn.Module, paths: Sequence[str], keep: Keep) -> list[int]:
    owner, leaf, stack = _find(model, paths)
    kept = parse_keep(keep, len(stack))
    layers = [stack[i] for i in kept]
    if hasattr(layers[0], "layer") and kept[0] != 0:
        _move_t5_position_bias(stack[0], layers[0])
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(owner, leaf, nn.ModuleList(layers))
    return kept


def _move_t5_position_bias(old_first: nn.Module, new_first: nn.Module) -> None:
    """T5 keeps its relative position bias in the first block only: hand it to the new first block."""
    for old_layer, new_layer in zip(old_first.layer, new_first.layer, strict=False):
        old_attn = getattr(old_layer, "SelfAttention", None)
        new_attn = getattr(new_layer, "SelfAttention", None)
        if old_attn is not None and new_attn is not None and old_attn.has_relative_attention_bias:
            new_attn.has_relative_attention_bias = True
            new_attn.relative_attention_bias = old_attn.relative_attention_bias


def _subset_layer_types(config: Any, kept: list[int], attr: str = "layer_types") -> None:
    types = getattr(config, attr, None)
    if isinstance(types, list) and types:
        setattr(config, attr, [types[i] for i in kept])


def prune_layers(
    model_dir: str | Path,
    out_dir: str | Path,
    keep: Keep = "first_last",
    *,
    encoder_keep: Keep | None = None,
) -> dict[str, Any]:
    """Save to `out_dir` a copy of the model with only the chosen layers (and its tokenizer).

    Decoder-only models (Llama, Qwen2, Mistral, GPT-2, OPT, ...): `keep` picks layers of the stack.
    Encoder-decoder models (T5, BART): `keep` picks decoder layers and `encoder_keep` encoder layers
    (None: the encoder stays whole). Returns {"kept": [...], "encoder_kept": [...] or None, "layers": n}.
    """
    from ..llm.models import model_not_found, resolve_model_path

    model_dir, out_dir = Path(resolve_model_path(str(model_dir))), Path(out_dir)
    if not model_dir.exists():
        raise model_not_found(str(model_dir), "prune")
    if out_dir.resolve() == model_dir.resolve():
        raise UserError(f"prune: {out_dir} is the model being pruned; give another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"prune: {out_dir} is not empty; give a new or empty output folder")
    config = AutoConfig.from_pretrained(model_dir)
    encdec = bool(getattr(config, "is_encoder_decoder", False))
    model = (AutoModelForSeq2SeqLM if encdec else AutoModelForCausalLM).from_pretrained(model_dir)
    config = model.config
    encoder_kept = None
    if not encdec:
        kept = _keep_layers(model, DECODER_ONLY_STACKS, keep)
        config.num_hidden_layers = len(kept)  # n_layer for GPT-2 through its attribute map
        _subset_layer_types(config, kept)
    else:
        kept = _keep_layers(model, DECODER_STACKS, keep)
        if encoder_keep is not None:
            encoder_kept = _keep_layers(model, ENCODER_STACKS, encoder_keep)
        if hasattr(config, "num_decoder_layers"):  # T5 family
            if len(kept) > (len(encoder_kept) if encoder_kept is not None else config.num_layers):
                # transformers sizes T5's generation cache by the encoder depth
                raise UserError("prune: a T5 decoder cannot keep more layers than the encoder")
            config.num_decoder_layers = len(kept)
            if encoder_kept is not None:
                config.num_layers = len(encoder_kept)
        else:  # BART family
            config.decoder_layers = len(kept)
            if encoder_kept is not None:
                config.encoder_layers = len(encoder_kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _copy_tokenizer(model_dir, out_dir)
    return {"kept": kept, "encoder_kept": encoder_kept, "layers": len(kept)}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError, TypeError):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
            if (src / name).exists():
                shutil.copy(src / name, dst / name)
