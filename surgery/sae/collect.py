"""Residual-stream activations and text corpora for training and scoring SAEs.

:func:`collect_activations` runs the model over texts (left-padded batches from
:func:`surgery.activations.encode`) and records, with scoped pre-hooks
(:func:`surgery.activations.layer_input_hook`), the hidden state entering each
requested decoder layer: our layer ``l`` = SAELens ``blocks.l.hook_resid_pre``.
The forward pass is cut short (a private exception raised by the deepest hook)
once the last requested layer has been seen.  Positions:

``"all"``   every real token (padding dropped), rows in text order; ``skip_first``
            drops each text's first tokens too (the first token is an attention
            sink in most models: in SmolLM2-135M its residual norm at layer 5 is
            ~800 against ~100 for the others, and would dominate an SAE's loss);
``"last"``  the last token of each text (one row per text);
``[p, ...]`` those positions of every text: negative from the end, non-negative
            from the start of the text's own tokens; a text too short for one
            of them is an error.

:func:`build_corpus` makes the default training corpus: the project's harmful
and harmless *train* prompts in the model's chat template, each followed by the
model's own greedy reply (so the SAE sees prompt and reply tokens), or the texts
of user files used as they are.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..activations import batches, encode, layer_input_hook
from ..model import LoadedModel
from .model import SAEError


class _Stop(Exception):
    """Raised by the deepest capture hook: nothing after it is needed."""


def _check_positions(positions) -> str | list[int]:
    if positions in ("all", "last"):
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return [positions]
    try:
        pos = [int(p) for p in positions]
    except (TypeError, ValueError):
        raise SAEError(f"positions must be 'all', 'last' or a list of integers, got {positions!r}") from None
    if not pos:
        raise SAEError("positions is an empty list")
    return pos


@torch.no_grad()
def collect_activations(lm: LoadedModel, texts: Sequence[str], layers: Sequence[int], positions="all",
                        batch_size: int = 16, return_index: bool = False, skip_first: int = 0):
    """Residual-stream inputs of decoder ``layers`` over ``texts``.

    Returns ``{layer: (N, d) float32 CPU tensor}``; with ``return_index`` also a
    ``(N,)`` long tensor giving the text each row came from.  ``skip_first``
    (positions ``"all"`` only) leaves out the first tokens of every text."""
    pos = _check_positions(positions)
    if skip_first < 0 or (skip_first and pos != "all"):
        raise SAEError(f"skip_first={skip_first} needs positions='all' and a non-negative count")
    if not texts:
        raise SAEError("no texts to collect activations from (empty corpus)")
    layers = sorted({int(l) for l in layers})
    if not layers:
        raise SAEError("no layers requested")
    L = lm.num_layers
    for l in layers:
        if not 0 <= l < L:
            raise SAEError(f"layer {l} is out of range: the model has {L} layers (0-{L - 1})")
    deepest = layers[-1]
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    index: list[torch.Tensor] = []
    for idx in batches(list(range(len(texts))), batch_size):
        batch = encode(lm, [texts[i] for i in idx])
        mask = batch["attention_mask"].bool().cpu()
        lengths = mask.sum(dim=1)
        n = mask.shape[1]
        ids = torch.tensor(list(idx), dtype=torch.long)
        if pos == "all":
            rows = None
            own = torch.arange(n)[None, :] - (n - lengths)[:, None]  # position inside each text
            mask &= own >= skip_first
            index.append(torch.repeat_interleave(ids, mask.sum(dim=1)))
        else:
            wanted = [-1] if pos == "last" else pos
            cols = []
            for p in wanted:
                bad = (lengths < -p) if p < 0 else (lengths <= p)
                if bad.any():
                    i = int(idx[int(bad.nonzero()[0])])
                    raise SAEError(f"text {i} has {int(lengths[bad][0])} tokens, too few for position {p}")
                cols.append(torch.full_like(lengths, n + p) if p < 0 else n - lengths + p)
            rows = torch.stack(cols, dim=1)  # (b, P) column of each wanted position
            index.append(ids.repeat_interleave(len(wanted)))
        captured: dict[int, torch.Tensor] = {}

        def grab(layer):
            def fn(h):
                captured[layer] = h.detach()
                if layer == deepest:
                    raise _Stop
                return h
            return fn

        with contextlib.ExitStack() as stack:
            for l in layers:
                stack.enter_context(layer_input_hook(lm, l, grab(l)))
            try:
                lm.model(**batch, use_cache=False)
            except _Stop:
                pass
        for l in layers:
            h = captured[l].float().cpu()
            if rows is None:
                out[l].append(h[mask])
            else:
                out[l].append(h.gather(1, rows.unsqueeze(-1).expand(-1, -1, h.shape[-1])).reshape(-1, h.shape[-1]))
    acts = {l: torch.cat(v, dim=0).contiguous() for l, v in out.items()}
    return (acts, torch.cat(index)) if return_index else acts


# ---------------------------------------------------------------------------- corpus
def texts_sha256(texts: Sequence[str]) -> str:
    """SHA-256 of the texts as a JSON list (unambiguous for texts with newlines)."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    texts: list[str]
    sources: list[dict] = field(default_factory=list)  # what each part is, with its hash

    @property
    def sha256(self) -> str:
        return texts_sha256(self.texts)

    def describe(self) -> dict:
        return {"texts": len(self.texts), "sha256": self.sha256, "sources": self.sources}


def load_corpus_files(files: Sequence[str], column: str | None = None, limit: int | None = None) -> Corpus:
    """User corpus files (TXT: one text per line; JSONL/JSON/CSV: a text column),
    texts used as they are.  An empty result is an error."""
    from ..prompts import load_prompts

    texts, sources = [], []
    for f in files:
        ps = load_prompts(f, column=column, limit=limit)
        texts += list(ps.prompts)
        sources.append({"kind": "file", **ps.describe()})
    if not texts:
        raise SAEError(f"empty corpus: no text in {', '.join(map(str, files)) or '(no files)'}")
    return Corpus(texts, sources)


def build_corpus(lm: LoadedModel, files: Sequence[str] = (), column: str | None = None, limit: int | None = None,
                 max_new_tokens: int = 48, batch_size: int = 16) -> Corpus:
    """``files`` when given, else the built-in harmful and harmless train prompts
    (at most ``limit`` of each) in the chat template followed by the model's own
    greedy replies (``max_new_tokens``)."""
    if files:
        return load_corpus_files(files, column, limit)
    from ..evaluation.generate import generate
    from ..prompts import builtin, format_chat

    texts, sources = [], []
    for name in ("harmful", "harmless"):
        ps = builtin(name, "train")
        if limit:
            ps = ps.subset(limit)
        replies = generate(lm, list(ps.prompts), max_new_tokens=max_new_tokens, batch_size=batch_size) \
            if max_new_tokens > 0 else ["" for _ in ps.prompts]
        texts += [format_chat(lm.tokenizer, p, response=r) for p, r in zip(ps.prompts, replies)]
        sources.append({"kind": "builtin+replies", **ps.describe(), "max_new_tokens": max_new_tokens,
                        "replies_sha256": texts_sha256(replies)})
    if not texts:
        raise SAEError("empty corpus: the built-in prompt sets gave no text")
    return Corpus(texts, sources)


__all__ = ["collect_activations", "build_corpus", "load_corpus_files", "Corpus", "texts_sha256"]
