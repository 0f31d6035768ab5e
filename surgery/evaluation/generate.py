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
def greedy_ids(lm: LoadedModel, texts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
               prefill: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, cut at the first end-of-sequence token) of
    already formatted ``texts``; ``prefill``: token ids appended to every text
    first (a reply opening the model is made to continue)."""
    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out: list[list[int]] = []
    for chunk in batches(list(texts), batch_size):
        batch = encode(lm, chunk, None if prefill is None else [list(prefill)] * len(chunk))
        gen = lm.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        for row in gen[:, batch["input_ids"].shape[1]:].tolist():
            out.append(row[:next((j for j, t in enumerate(row) if t in eos_ids), len(row))])
    return out


def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 48, batch_size: int = 32,
             system: str | None = None, return_ids: bool = False):
    """Greedy replies to ``prompts`` (chat-formatted).  Returns decoded texts
    (and the generated token ids when ``return_ids``)."""
    ids = greedy_ids(lm, chat_texts(lm, prompts, system), max_new_tokens, batch_size)
    texts = [lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    return (texts, ids) if return_ids else texts
