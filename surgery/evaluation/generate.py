"""Batched greedy generation with KV cache, left padding, chat template."""
from __future__ import annotations

from typing import Sequence

import torch

from ..activations import batches, encode
from ..model import LoadedModel
from ..prompts import format_chat


def chat_texts(lm: LoadedModel, prompts: Sequence[str], system: str | None = None) -> list[str]:
    return [format_chat(lm.tokenizer, p, system=system) for p in prompts]


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
             system: str | None = None, return_ids: bool = False):
    """Greedy replies to ``prompts`` (chat-formatted).  Returns decoded texts
    (and the generated token ids when ``return_ids``)."""
    texts = chat_texts(lm, prompts, system)
    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out_texts, out_ids = [], []
    for chunk in batches(texts, batch_size):
        batch = encode(lm, chunk)
        gen = lm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        new = gen[:, batch["input_ids"].shape[1]:]
        for row in new:
            ids = row.tolist()
            # cut at the first end-of-sequence token
            for j, t in enumerate(ids):
                if t in eos_ids:
                    ids = ids[:j]
                    break
            out_ids.append(ids)
            out_texts.append(tok.decode(ids, skip_special_tokens=True))
    return (out_texts, out_ids) if return_ids else out_texts
