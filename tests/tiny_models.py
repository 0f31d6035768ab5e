"""Tiny random checkpoints for tests (no Hub access).

``make_tiny_checkpoint(model_type, folder, **overrides)`` builds a model from a
small transformers config (hidden 32, 2 layers, vocab 128, MoE with 3 experts),
seeded with ``torch.manual_seed(0)``, and writes it with
``save_pretrained(folder, safe_serialization=True)`` -- i.e. exactly what
transformers writes on disk (per-expert MoE tensors, gpt_neox ``embed_out``,
gemma3's ``language_model.model.*`` names, ...).  ``overrides`` are config
keyword arguments (for ``gemma3`` they go to its ``text_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
    "olmo2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)

HIDDEN = 32
LAYERS = 2
VOCAB = 128
EXPERTS = 3

_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config_kwargs(model_type: str) -> dict[str, Any]:
    """Config keyword arguments of the tiny model of ``model_type``."""
    kw = dict(_COMMON)
    if model_type == "gpt2":
        return dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=64,
                    bos_token_id=1, eos_token_id=2)
    if model_type == "gpt_neox":
        for k in ("num_key_value_heads", "head_dim"):
            kw.pop(k)
    if model_type == "mixtral":
        kw.update(num_local_experts=EXPERTS, num_experts_per_tok=2)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=16)
    if model_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=24)
    return kw


def make_config(model_type: str, **overrides: Any):
    """The tiny transformers config of ``model_type`` (``overrides`` applied)."""
    from transformers import CONFIG_MAPPING

    if model_type == "gemma3":
        from transformers import Gemma3Config

        text = tiny_config_kwargs("gemma3_text")
        text.update(overrides)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14, vision_use_head=False)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                            boi_token_index=3, eoi_token_index=4, image_token_index=5)
    kw = tiny_config_kwargs(model_type)
    kw.update(overrides)
    return CONFIG_MAPPING[model_type](**kw)


def make_tiny_model(model_type: str, **overrides: Any):
    """A tiny randomly initialised model (seeded), in eval mode."""
    import torch

    config = make_config(model_type, **overrides)
    torch.manual_seed(0)
    if model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration(config)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def make_tiny_checkpoint(model_type: str, folder: str | Path, **overrides: Any) -> Path:
    """Build the tiny model of ``model_type`` and save it to ``folder``
    (safetensors, as transformers writes it).  Returns the folder."""
    folder = Path(folder)
    make_tiny_model(model_type, **overrides).save_pretrained(folder, safe_serialization=True)
    return folder
