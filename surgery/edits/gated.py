"""Gated rank-one injection: ROSI's rank-one form with a fitted read vector
(AlphaSteer's null-space constraint, baked into the weights).  Work toward
issue 6; not yet wired into the CLI.

For every residual-stream write matrix ``W`` (input ``x``, width ``d_in``)::

    W' = W + alpha * r_hat * v^T

where ``v`` is fitted on that matrix's own inputs so that ``v . x`` is about 1
on harmful prompts (post-instruction positions) and about 0 on harmless ones
(every prompt position):

    mu = mean(x | harmful, post-instruction) - mean(x | harmless, post-instruction)
    P  = projector onto the null space of the harmless inputs: the bottom
         ``null_ratio * d_in`` eigenvectors of the harmless Gram matrix X_b^T X_b
    v  = P mu / mean(x_h . P mu)

Rank one per matrix, exactly representable in the checkpoint.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..activations import batches, encode
from ..model import LoadedModel, get_submodule, patched_weights
from ..prompts import format_chat
from .rosi import unit


@dataclass
class GateStats:
    """Per-matrix input statistics (float64)."""
    sum_h: torch.Tensor      # harmful, post-instruction positions
    n_h: int
    sum_b_post: torch.Tensor  # harmless, post-instruction positions
    n_b_post: int
    gram_b: torch.Tensor     # harmless, every prompt position
    n_b: int
    gram_b_post: torch.Tensor = None  # harmless, post-instruction positions


def _writer_modules(lm: LoadedModel):
    params = dict(lm.model.named_parameters())
    ws = [w for w in lm.arch.residual_writers(list(params), lm.model.config) if w.layout in ("out_in", "in_out")]
    return ws


@torch.no_grad()
def collect_stats(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], post_positions: int = 5,
                  batch_size: int = 16, harmless_replies: Sequence[str] | None = None) -> dict[str, GateStats]:
    """Input statistics of every 2-D residual writer.  ``harmless_replies`` (the
    model's own replies to ``harmless``) add the reply positions to the harmless
    second moment, so the gate also stays shut while a harmless answer is generated."""
    ws = _writer_modules(lm)
    stats: dict[str, dict] = {w.name: {"sum_h": 0, "n_h": 0, "sum_b_post": 0, "n_b_post": 0, "gram_b": 0, "n_b": 0,
                                       "gram_b_post": 0}
                              for w in ws}
    state = {"mode": None, "mask": None}

    def hook_for(name):
        def hook(mod, args):
            x = args[0].double()  # (b, n, d_in)
            s = stats[name]
            post = x[:, -post_positions:, :].reshape(-1, x.shape[-1])
            if state["mode"] == "harmful":
                s["sum_h"] = s["sum_h"] + post.sum(0)
                s["n_h"] += post.shape[0]
            elif state["mode"] == "replies":
                m = state["mask"].reshape(-1).bool()
                flat = x.reshape(-1, x.shape[-1])[m]
                s["gram_b"] = s["gram_b"] + flat.T @ flat
                s["n_b"] += flat.shape[0]
            else:
                s["sum_b_post"] = s["sum_b_post"] + post.sum(0)
                s["n_b_post"] += post.shape[0]
                s["gram_b_post"] = s["gram_b_post"] + post.T @ post
                m = state["mask"].reshape(-1).bool()
                flat = x.reshape(-1, x.shape[-1])[m]
                s["gram_b"] = s["gram_b"] + flat.T @ flat
                s["n_b"] += flat.shape[0]
        return hook

    handles = [get_submodule(lm.model, w.name.rsplit(".", 1)[0]).register_forward_pre_hook(hook_for(w.name)) for w in ws]
    try:
        passes = [("harmful", [format_chat(lm.tokenizer, p) for p in harmful]),
                  ("harmless", [format_chat(lm.tokenizer, p) for p in harmless])]
        if harmless_replies is not None:
            passes.append(("replies", [format_chat(lm.tokenizer, p) + r for p, r in zip(harmless, harmless_replies)]))
        for mode, texts in passes:
            state["mode"] = mode
            for chunk in batches(texts, batch_size):
                batch = encode(lm, chunk)
                state["mask"] = batch["attention_mask"]
                lm.model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: GateStats(**v) for k, v in stats.items()}


def fit_read_vector(s: GateStats, null_ratio: float = 0.5) -> torch.Tensor:
    mu = s.sum_h / s.n_h - s.sum_b_post / s.n_b_post
    d = mu.shape[0]
    k = max(1, int(round(null_ratio * d)))
    evals, evecs = torch.linalg.eigh(s.gram_b / s.n_b)  # ascending
    null = evecs[:, :k]
    v = null @ (null.T @ mu)
    gain = (s.sum_h / s.n_h) @ v
    return v / gain


def fit_read_vector_ridge(s: GateStats, post_weight: float = 1.0, ridge: float = 1e-2) -> torch.Tensor:
    """Least benign energy subject to a unit mean response on harmful inputs:
    ``v = G^-1 m_h / (m_h^T G^-1 m_h)``, ``G`` the harmless second moment (every
    position, plus the post-instruction positions weighted by ``post_weight``)
    with a ridge of ``ridge * trace(G) / d``."""
    m_h = s.sum_h / s.n_h
    g = s.gram_b / s.n_b + post_weight * s.gram_b_post / s.n_b_post
    d = g.shape[0]
    g = g + ridge * torch.trace(g) / d * torch.eye(d, dtype=g.dtype)
    v = torch.linalg.solve(g, m_h)
    return v / (m_h @ v)


def gated_update(w, tensor: torch.Tensor, r_hat: torch.Tensor, v: torch.Tensor, alpha: float) -> torch.Tensor:
    m = w.as_out_in(tensor.to(torch.float32))
    new = m + alpha * torch.outer(r_hat.float(), v.float())
    return w.from_out_in(new).to(tensor.dtype).contiguous()


@contextlib.contextmanager
def gated_in_memory(lm: LoadedModel, direction: torch.Tensor, vs: dict[str, torch.Tensor], alpha: float,
                    layers: Sequence[int] | None = None) -> Iterator[None]:
    params = dict(lm.model.named_parameters())
    keep = None if layers is None else set(layers)
    r = unit(direction).to(lm.device)
    new = {}
    for w in _writer_modules(lm):
        if w.name in vs and (keep is None or w.layer in keep):
            new[w.name] = gated_update(w, params[w.name].data, r, vs[w.name].to(lm.device), alpha)
    with patched_weights(lm.model, new):
        yield
