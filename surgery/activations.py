"""Residual-stream activations: batched collection at chosen positions, and
scoped hooks (always removed in a ``finally``: hooks are global state).

Layer convention: ``hidden[l]`` is the residual stream at the *input* of decoder
layer ``l`` (``l = 0`` is the embedding output), as in HF's ``hidden_states``;
there are ``num_layers`` of them (the final normed state is not used).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

from .model import LoadedModel


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode(lm: LoadedModel, texts: Sequence[str], suffixes: Sequence[Sequence[int]] | None = None) -> dict:
    """Left-padded batch.  ``suffixes`` (token ids) are appended after each
    text's own tokens, so a reply's tokens sit at the last positions.

    ``position_ids`` count each row's own tokens from 0, as ``generate`` does: without
    them a model with absolute position embeddings (gpt2) saw a padded prompt shifted
    by its padding, and every forward-pass figure depended on the batch."""
    tok = lm.tokenizer
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if suffixes is not None:
        ids = [a + list(b) for a, b in zip(ids, suffixes)]
    n = max(len(x) for x in ids)
    pad = tok.pad_token_id
    input_ids = torch.full((len(ids), n), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, n - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, n - len(x):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids.to(lm.device), "attention_mask": mask.to(lm.device),
            "position_ids": positions.to(lm.device)}


@torch.no_grad()
def mean_residuals(lm: LoadedModel, texts: Sequence[str], positions: Sequence[int] = (-1,),
                   suffixes: Sequence[Sequence[int]] | None = None, batch_size: int = 16,
                   average_positions: bool = False) -> torch.Tensor:
    """Mean residual stream over ``texts`` at each layer input and each of
    ``positions`` (negative indices from the end), accumulated in float64.

    Returns ``(len(positions), num_layers, d)`` float64, or ``(1, num_layers, d)``
    when ``average_positions`` (mean over the positions too)."""
    L = lm.num_layers
    total = None
    count = 0
    for idx in batches(range(len(texts)), batch_size):
        batch = encode(lm, [texts[i] for i in idx], None if suffixes is None else [suffixes[i] for i in idx])
        out = lm.model(**batch, output_hidden_states=True, use_cache=False)
        hs = torch.stack(out.hidden_states[:L], dim=0)  # (L, b, n, d)
        sel = hs[:, :, list(positions), :].double()  # (L, b, P, d)
        s = sel.sum(dim=1).permute(1, 0, 2)  # (P, L, d)
        total = s if total is None else total + s
        count += len(idx)
    mean = total / count
    if average_positions:
        mean = mean.mean(dim=0, keepdim=True)
    return mean


@contextlib.contextmanager
def layer_input_hook(lm: LoadedModel, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Apply ``fn`` to the hidden state entering decoder layer ``layer``."""
    module = lm.layers()[layer]

    def pre_hook(mod, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        key = "hidden_states"
        kwargs[key] = fn(kwargs[key])
        return args, kwargs

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def add_vector(lm: LoadedModel, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` to the residual stream at the input of ``layer``, all positions."""
    v = vector.to(device=lm.device)
    with layer_input_hook(lm, layer, lambda h: h + v.to(h.dtype)):
        yield
