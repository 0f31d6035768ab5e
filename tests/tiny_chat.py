"""A tiny chat model (random weights + an offline word-level tokenizer with a
ChatML template), so pipeline tests run without the Hub or the real model."""
from __future__ import annotations

from pathlib import Path

import torch

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    from surgery.prompts import builtin, refusal_texts

    words: dict[str, None] = {}
    corpus = [p for n in ("harmful", "harmless", "borderline") for p in builtin(n).prompts] + refusal_texts()
    corpus += ["system user assistant You are a helpful assistant"]
    pre = pre_tokenizers.Whitespace()
    for text in corpus:
        for w, _ in pre.pre_tokenize_str(text):
            words.setdefault(w)
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "\n"]
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def make_tiny_chat_model(folder: Path, model_type: str = "llama", layers: int = 4, hidden: int = 32,
                         seed: int = 0, tie: bool = True) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, vocab_size=len(tok),
                               max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder
