"""Unit attribution (SSAH, methods.md §7): ``I_j = Var_n(x_{n,j}) * ||W[:, j]||^2``.

``x`` is the input of a write matrix ``W`` (the concatenated attention heads
entering ``o_proj``; ``act(gate) * up`` entering ``down_proj``), captured by
forward pre-hooks on the live modules (found through the architecture data:
:func:`surgery.units.producers.unit_matrices`), and ``n`` runs over the
dataset's selected tokens.  The hooks are scoped (removed in a ``finally``).

Streaming: per matrix a :class:`RunningMoments` keeps the token count, the
mean and the sum of squared deviations in float64, merged batch by batch with
Chan et al.'s parallel update, so memory does not grow with the dataset.  The
variance is the population variance (``ddof = 0``).  The forward pass is cut
short after the last write matrix's input is seen (the final norm and
lm_head are not needed).

Datasets (:func:`unit_datasets`):

* ``safety``: the built-in harmful *train* prompts, each with a refusal reply
  from the project's refusal texts, drawn by ``random.Random(seed)``.
* ``utility``: the built-in harmless *train* prompts with the model's own greedy
  replies (:func:`surgery.evaluation.generate.generate`).

Each example is the prompt rendered by :func:`surgery.prompts.format_chat`
followed by the reply's token ids (the text ``format_chat(..., response=reply)``
renders, with the reply tokens fixed rather than re-tokenised across the
boundary, so exactly the reply's tokens are selected).  ``positions``:
``"all"`` = every reply token (default), ``"last"`` = the last prompt token
(the end of the assistant header; the reply is then not run at all).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..activations import batches, encode
from ..errors import SurgeryError
from ..model import LoadedModel, get_submodule
from .producers import UnitMatrix, unit_matrices

POSITIONS = ("all", "last")


class _Stop(Exception):
    """Raised after the last write matrix's input: nothing later is needed."""


class RunningMoments:
    """Running per-channel mean and variance in float64 (Chan et al. merge)."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.m2 = torch.zeros(d, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` (m, d)."""
        m = int(x.shape[0])
        if m == 0:
            return
        x = x.detach().to(device="cpu", dtype=torch.float64)
        mb = x.mean(dim=0)
        m2b = ((x - mb) ** 2).sum(dim=0)
        n = self.n + m
        delta = mb - self.mean
        self.mean += delta * (m / n)
        self.m2 += m2b + delta ** 2 * (self.n * m / n)
        self.n = n

    @property
    def var(self) -> torch.Tensor:
        """Population variance (ddof 0)."""
        if self.n == 0:
            raise SurgeryError("no tokens were seen: cannot compute a variance")
        return self.m2 / self.n


@dataclass
class Example:
    prompt_text: str  # chat-formatted prompt, ending with the assistant header
    reply_ids: list[int]


@dataclass
class Attribution:
    """One matrix's attribution on one dataset."""
    var: torch.Tensor  # (d_in,) float64
    col_norm2: torch.Tensor  # (d_in,) float64: ||W[:, j]||^2
    n_tokens: int

    @property
    def importance(self) -> torch.Tensor:
        return self.var * self.col_norm2


def live_matrices(lm: LoadedModel) -> list[UnitMatrix]:
    """The unit matrices of the live model (live parameter names)."""
    params = dict(lm.model.named_parameters())
    return unit_matrices(lm.arch, list(params), lm.config, lambda n: tuple(params[n].shape), strict=False)


@torch.no_grad()
def attribute(lm: LoadedModel, examples: Sequence[Example], positions: str = "all", batch_size: int = 16,
              matrices: Sequence[UnitMatrix] | None = None) -> dict[str, Attribution]:
    """Attribution of every unit matrix (key ``layers.L.attn|mlp``) over ``examples``."""
    if positions not in POSITIONS:
        raise SurgeryError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if not examples:
        raise SurgeryError("unit attribution: the dataset is empty")
    matrices = list(matrices) if matrices is not None else live_matrices(lm)
    moments = {m.key: RunningMoments(m.n_units) for m in matrices}
    modules = {m.key: get_submodule(lm.model, m.module) for m in matrices}
    last_key = matrices[-1].key  # the last layer's MLP: the deepest input needed
    state: dict = {}

    def hook(key: str):
        def fn(mod, args):
            x = args[0]
            moments[key].update(x[state["select"]])
            if key == last_key:
                raise _Stop
        return fn

    with contextlib.ExitStack() as stack:
        for key, mod in modules.items():
            stack.callback(mod.register_forward_pre_hook(hook(key)).remove)
        for chunk in batches(list(examples), batch_size):
            texts = [e.prompt_text for e in chunk]
            if positions == "all":
                batch = encode(lm, texts, suffixes=[e.reply_ids for e in chunk])
                n = batch["input_ids"].shape[1]
                lengths = torch.tensor([len(e.reply_ids) for e in chunk], device=lm.device)
                select = torch.arange(n, device=lm.device)[None, :] >= (n - lengths)[:, None]
            else:
                batch = encode(lm, texts)
                n = batch["input_ids"].shape[1]
                select = torch.zeros((len(chunk), n), dtype=torch.bool, device=lm.device)
                select[:, -1] = True
            state["select"] = select
            try:
                lm.model(**batch, use_cache=False)
            except _Stop:
                pass
    params = dict(lm.model.named_parameters())
    out = {}
    for m in matrices:
        mom = moments[m.key]
        if mom.n < 2:
            raise SurgeryError(f"unit attribution: only {mom.n} token(s) selected ({positions} positions); "
                               "need at least 2 (give more prompts or longer replies)")
        w = params[m.writer].detach().to(device="cpu", dtype=torch.float64)
        out[m.key] = Attribution(mom.var, (w ** 2).sum(dim=0), mom.n)
    return out


def unit_datasets(lm: LoadedModel, limit: int | None = None, max_new_tokens: int = 48, seed: int = 0,
                  batch_size: int = 16) -> dict[str, tuple[list[Example], dict]]:
    """``{"safety": (examples, description), "utility": (...)}`` (module docstring)."""
    from ..evaluation.generate import generate
    from ..prompts import builtin, format_chat, refusal_texts
    from ..sae.collect import texts_sha256

    if limit is not None and limit < 1:
        raise SurgeryError(f"limit must be a positive number of prompts, got {limit}")
    tok = lm.tokenizer
    harmful, harmless = builtin("harmful", "train"), builtin("harmless", "train")
    if limit:
        harmful, harmless = harmful.subset(limit), harmless.subset(limit)
    rng = random.Random(seed)
    refusals = refusal_texts()
    chosen = [rng.choice(refusals) for _ in harmful.prompts]
    safety = [Example(format_chat(tok, p), tok(r, add_special_tokens=False)["input_ids"])
              for p, r in zip(harmful.prompts, chosen)]
    replies, ids = generate(lm, list(harmless.prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                            return_ids=True)
    utility = [Example(format_chat(tok, p), list(r)) for p, r in zip(harmless.prompts, ids)]
    return {"safety": (safety, {**harmful.describe(), "replies": "refusal texts", "seed": seed,
                                "replies_sha256": texts_sha256(chosen)}),
            "utility": (utility, {**harmless.describe(), "replies": "own greedy", "max_new_tokens": max_new_tokens,
                                  "replies_sha256": texts_sha256(replies)})}
