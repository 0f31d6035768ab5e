"""ROSI: rank-one safety injection (Abu Shairah et al. 2025), methods.md §2.

For every residual-stream write matrix ``W`` (nn.Linear layout ``(d, d_in)``)::

    W' = W + alpha * r_hat * w_bar^T,   w_bar = W.mean(dim=0)      (shape d_in)

so ``W' x = W x + alpha * (w_bar . x) * r_hat``.  Choices the paper leaves open,
and ours:

* **Which matrices**: attention and MLP output projections of every layer, every
  MoE expert's output projection (the paper names attention and MLP outputs).
  Biases are left alone (the formula has no rows to average).  The token
  embedding (and a learned position embedding, gpt2's ``wpe``) is excluded by
  default; ``include_embedding`` adds them, whatever ``layers`` says (their rows
  are what is written, so ``W`` is read as ``(d, vocab)``), and if the embedding
  is tied to the unembedding the output is untied explicitly so the unembedding
  is not silently edited -- in memory too, so a sweep scores the model written.
* **Layers**: all by default; ``layers`` restricts to a subset (e.g. a range).
* **Alpha**: given, or chosen by ``surgery.tuning.sweep_alpha`` on the validation
  split (the whole sweep is reported).
* Arithmetic in float32 (float64 in tests), result cast to the stored dtype.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from ..architectures import EMBEDDING_ROLES, WriterTensor
from ..errors import DirectionError
from ..model import LoadedModel, patched_weights


def rosi_update(w: WriterTensor, tensor: torch.Tensor, r_hat: torch.Tensor, alpha: float,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The edited tensor (same dtype and layout as ``tensor``)."""
    m = w.as_out_in(tensor.to(compute_dtype))  # (..., d, d_in)
    r = r_hat.to(compute_dtype)
    w_bar = m.mean(dim=-2)  # (..., d_in)
    new = m + alpha * r.view(*([1] * (m.dim() - 2)), -1, 1) * w_bar.unsqueeze(-2)
    return w.from_out_in(new).to(tensor.dtype).contiguous()


def rosi_targets(writers: Iterable[WriterTensor], layers: Iterable[int] | None = None,
                 include_embedding: bool = False) -> list[WriterTensor]:
    keep = None if layers is None else set(layers)
    out = []
    for w in writers:
        if w.layout == "bias":
            continue
        if w.role in EMBEDDING_ROLES:  # token and position embeddings: with include_embedding, whatever --layers says
            if include_embedding:
                out.append(w)
            continue
        if keep is not None and w.layer not in keep:
            continue
        out.append(w)
    return out


def unit(direction: torch.Tensor) -> torch.Tensor:
    """``direction / |direction|``; a zero or non-finite direction is refused (it
    would write NaN weights)."""
    d = direction.double()
    n = d.norm()
    if not (torch.isfinite(n) and n > 0):
        raise DirectionError(f"the refusal direction has norm {float(n)}: it needs a finite, non-zero vector")
    return (d / n).float()


@contextlib.contextmanager
def rosi_in_memory(lm: LoadedModel, direction: torch.Tensor, alpha: float, layers: Iterable[int] | None = None,
                   include_embedding: bool = False) -> Iterator[None]:
    """Apply ROSI to the live model for the duration of the block (sweeps, tuning):
    the same tensors as the written checkpoint, a tied unembedding untied meanwhile."""
    params = dict(lm.model.named_parameters())
    writers = lm.arch.residual_writers(list(params), lm.model.config, include_embedding=include_embedding)
    r_hat = unit(direction).to(lm.device)
    targets = rosi_targets(writers, layers, include_embedding)
    new = {w.name: rosi_update(w, params[w.name].data, r_hat, alpha) for w in targets}
    inp, outp = lm.model.get_input_embeddings(), lm.model.get_output_embeddings()
    untie = (any(w.role == "embedding" for w in targets) and outp is not None and inp is not None
             and outp.weight is inp.weight)
    shared = outp.weight if untie else None
    try:
        if untie:  # the written output keeps the original unembedding (write_rosi unties it)
            outp.weight = torch.nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
        with patched_weights(lm.model, new):
            yield
    finally:
        if untie:
            outp.weight = shared
