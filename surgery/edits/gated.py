"""Gated injection (``surgery inject``, ``surgery tune``): ROSI's low-rank form
with fitted read vectors (AlphaSteer's null-space constraint, baked into the
weights).

For every residual-stream write matrix ``W`` (input ``x``, width ``d_in``)::

    W' = W + alpha * r_hat * v^T

where ``v`` is fitted on that matrix's own inputs so that ``v . x`` is about 1
on harmful prompts (post-instruction positions) and about 0 on harmless ones
(every prompt position), by one of two fits:

``ridge`` (default) least harmless energy with a unit mean harmful response,
    ``v = G^-1 m_h / (m_h^T G^-1 m_h)``, ``G`` = harmless second moment (every
    position, post-instruction positions weighted by ``post_weight``) + a ridge;
``null``  AlphaSteer's projector:
    mu = mean(x | harmful, post-instruction) - mean(x | harmless, post-instruction)
    P  = projector onto the null space of the harmless inputs: the bottom
         ``null_ratio * d_in`` eigenvectors of the harmless Gram matrix X_b^T X_b
    v  = P mu / mean(x_h . P mu)

Rank one per matrix, exactly representable in the checkpoint.

``harmful_weight`` (ridge fit) adds the harmful prompts' covariance to ``G``: the
unit mean harmful response is then reached evenly across prompts instead of by a
few.  Held-out separation of the summed gate response on SmolLM2 improves (AUC
harmful vs harmless 0.969 -> 0.991 at weight 3, ridge 0.01), but in generation it
made no measurable difference on its own (docs/rosi-on-smollm2.md).

**Cascade** (:func:`fit_gates_cascade`, ``surgery inject --cascade``): the one-shot
fit sees the unedited model's inputs, but once earlier layers inject, later
matrices' inputs move and their gates stop responding as fitted.  The cascade fits
each matrix, in forward order, on the inputs it gets with every earlier matrix
already edited at the same ``alpha`` (one batched forward pass, the edit applied in
a pre-hook), so the read vectors depend on ``alpha``.

Rank k (``surgery inject --rank K``)::

    W' = W + alpha * R_hat V^T,   R_hat (d x k) orthonormal,  V (d_in x k)

One direction pushes every harmful prompt the same way; the push each prompt
needs to reach its refusal differs.  ``prompt_contrasts`` measures it per
harmful calibration prompt: for the default ``response`` direction, the residual
stream at the direction's layer over the first reply tokens with a refusal minus
with the model's own reply (the per-prompt terms whose mean *is* the direction;
for ``prompt``/``system`` directions: the prompt minus the harmless mean).
``refusal_basis`` makes ``R_hat``: column 0 is the chosen direction ``r_hat``
(so rank 1 is today's edit), columns 1..k-1 the top principal directions of what
``r_hat`` leaves of those contrasts (uncentred SVD after projecting ``r_hat``
out).  Each prompt's push coefficients ``c_i = R_hat^T delta_i / (r_hat . mean
delta)`` are the targets (``mean c_i0 = 1``: alpha means what it means at rank one).

Column 0 of ``V`` is the rank-one read vector (so rank k contains rank k-1 and
rank 1 is exactly the edit above).  Columns j >= 1 regress the per-prompt
targets on the harmful inputs ``x_i`` (per-prompt means over the
post-instruction positions), penalised by the same harmless energy::

    v_j = argmin  mean_i (x_i . v - c_ij)^2 + v^T G v  =  (S_h + G)^-1 X^T c_j / n

(ridge fit: ``G`` as in the rank-one fit, ``S_h = X^T X / n``; null-space fit: the same
regression restricted to the null space, ``G`` = harmless second moment + ridge,
no post weight).  Optimality bounds the harmless energy by what the closed form
leaves of the targets: ``v_j^T G v_j <= mean c_j^2 - b_j . v_j`` (``b_j = X^T c_j / n``);
in the null space also ``<= lambda_max(null block) * |v_j|^2``.  A first design
that forced each column's covariance with the targets exactly (k hard
constraints, least energy) needed read vectors so large that first-token KL
reached 1.9-3.4 at alpha 1.25-1.75 on SmolLM2 (rank 1: 0.10-0.31); the
regression shrinks what the inputs cannot predict instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..activations import batches, encode, mean_residuals
from ..errors import SurgeryError
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
    x_h: torch.Tensor | None = None  # (n_prompts, d_in) per-prompt harmful means (rank k), or None


def _writer_modules(lm: LoadedModel):
    params = dict(lm.model.named_parameters())
    ws = [w for w in lm.arch.residual_writers(list(params), lm.model.config) if w.layout in ("out_in", "in_out")]
    return ws


def _accumulate(s: dict, mode: str, x: torch.Tensor, mask: torch.Tensor, post_positions: int) -> None:
    """Add a batch of one matrix's inputs ``x`` (b, n, d_in), float64, left-padded
    with ``mask``, to its running sums: ``harmful`` rows at their post-instruction
    positions, ``harmless`` rows at those and at every prompt position, ``replies``
    rows at every position."""
    post = x[:, -post_positions:, :].reshape(-1, x.shape[-1])
    if mode == "harmful":
        s["sum_h"] = s["sum_h"] + post.sum(0)
        s["n_h"] += post.shape[0]
        if s["x_h"] is not None:
            s["x_h"].append(x[:, -post_positions:, :].mean(1))
        return
    if mode == "harmless":
        s["sum_b_post"] = s["sum_b_post"] + post.sum(0)
        s["n_b_post"] += post.shape[0]
        s["gram_b_post"] = s["gram_b_post"] + post.T @ post
    flat = x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()]
    s["gram_b"] = s["gram_b"] + flat.T @ flat
    s["n_b"] += flat.shape[0]


def _empty_stats(per_prompt: bool) -> dict:
    return {"sum_h": 0, "n_h": 0, "sum_b_post": 0, "n_b_post": 0, "gram_b": 0, "n_b": 0, "gram_b_post": 0,
            "x_h": [] if per_prompt else None}


def _finish(s: dict) -> GateStats:
    if s["x_h"] is not None:
        s["x_h"] = torch.cat(s["x_h"])
    return GateStats(**s)


def batch_stats(x: torch.Tensor, mask: torch.Tensor, n_harmful: int, post_positions: int = 5,
                per_prompt: bool = False) -> GateStats:
    """Gate statistics of one matrix's inputs ``x`` (b, n, d_in) for a batch whose
    first ``n_harmful`` rows are harmful prompts and the rest harmless (float64)."""
    acc = _empty_stats(per_prompt)
    _accumulate(acc, "harmful", x[:n_harmful].double(), mask[:n_harmful], post_positions)
    _accumulate(acc, "harmless", x[n_harmful:].double(), mask[n_harmful:], post_positions)
    return _finish(acc)


@torch.no_grad()
def collect_stats(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], post_positions: int = 5,
                  batch_size: int = 16, harmless_replies: Sequence[str] | None = None,
                  per_prompt: bool = False) -> dict[str, GateStats]:
    """Input statistics of every 2-D residual writer.  ``harmless_replies`` (the
    model's own replies to ``harmless``) add the reply positions to the harmless
    second moment, so the gate also stays shut while a harmless answer is generated.
    ``per_prompt`` also keeps each harmful prompt's mean post-instruction input
    (``GateStats.x_h``, what a rank-k fit needs); the sums are the same either way."""
    ws = _writer_modules(lm)
    stats: dict[str, dict] = {w.name: _empty_stats(per_prompt) for w in ws}
    state = {"mode": None, "mask": None}

    def hook_for(name):
        def hook(mod, args):
            _accumulate(stats[name], state["mode"], args[0].double(), state["mask"], post_positions)
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
    return {k: _finish(v) for k, v in stats.items()}


def null_basis(s: GateStats, null_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom ``null_ratio * d_in`` eigenvectors of the harmless second moment
    (every position), as columns, and their eigenvalues (ascending)."""
    d = s.gram_b.shape[0]
    k = max(1, int(round(null_ratio * d)))
    evals, evecs = torch.linalg.eigh(s.gram_b / s.n_b)  # ascending
    return evecs[:, :k], evals[:k]


def fit_read_vector(s: GateStats, null_ratio: float = 0.5) -> torch.Tensor:
    mu = s.sum_h / s.n_h - s.sum_b_post / s.n_b_post
    null, _ = null_basis(s, null_ratio)
    v = null @ (null.T @ mu)
    gain = (s.sum_h / s.n_h) @ v
    return v / gain


def harmful_covariance(s: GateStats) -> torch.Tensor:
    """Covariance of the per-prompt harmful inputs (each prompt's mean over its
    post-instruction positions): how much the harmful response varies from prompt
    to prompt."""
    if s.x_h is None:
        raise SurgeryError("a harmful weight needs per-prompt harmful inputs (collect_stats(..., per_prompt=True))")
    xc = s.x_h - s.x_h.mean(0)
    return xc.T @ xc / xc.shape[0]


def ridge_gram(s: GateStats, post_weight: float = 1.0, ridge: float = 1e-2, harmful_weight: float = 0.0) -> torch.Tensor:
    """``G`` of the ridge fit: harmless second moment (every position, plus the
    post-instruction positions weighted by ``post_weight``), plus the harmful
    prompts' covariance weighted by ``harmful_weight``, + ``ridge * trace / d``."""
    g = s.gram_b / s.n_b + post_weight * s.gram_b_post / s.n_b_post
    return penalised_gram(g, harmful_covariance(s) if harmful_weight else None, harmful_weight, ridge)


def penalised_gram(g: torch.Tensor, harmful_cov: torch.Tensor | None, harmful_weight: float, ridge: float) -> torch.Tensor:
    """``g + harmful_weight * harmful_cov + ridge * trace / d * I`` (the trace after
    the covariance is added): the energy every ridge-type read fit minimises."""
    if harmful_weight:
        g = g + harmful_weight * harmful_cov
    d = g.shape[0]
    return g + ridge * torch.trace(g) / d * torch.eye(d, dtype=g.dtype)


def unit_response_read(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``v = G^-1 m / (m^T G^-1 m)``: the least ``v^T G v`` with ``m . v = 1``."""
    v = torch.linalg.solve(g, m)
    return v / (m @ v)


def fit_read_vector_ridge(s: GateStats, post_weight: float = 1.0, ridge: float = 1e-2,
                          harmful_weight: float = 0.0) -> torch.Tensor:
    """Least benign energy subject to a unit mean response on harmful inputs:
    ``v = G^-1 m_h / (m_h^T G^-1 m_h)``, ``G`` the harmless second moment (every
    position, plus the post-instruction positions weighted by ``post_weight``)
    with a ridge of ``ridge * trace(G) / d``.  ``harmful_weight`` > 0 also charges
    the spread of the harmful response across prompts (``G += w * Cov(x_h)``): the
    same unit mean, reached evenly rather than by a few prompts, which is what
    generalises to held-out prompts (docs/rosi-on-smollm2.md)."""
    return unit_response_read(s.sum_h / s.n_h, ridge_gram(s, post_weight, ridge, harmful_weight))


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


# ----------------------------------------------------------------------------- rank k
@dataclass
class GateTargets:
    """What every matrix's k read vectors must reproduce (the same for all matrices).

    ``basis`` (d, k) float64, orthonormal, column 0 = the chosen direction;
    ``coeffs`` (n, k) float64, prompt i's push along each column, scaled so that
    ``coeffs[:, 0].mean() == 1``; ``prompts``: the harmful calibration prompts
    (indices) the n rows belong to."""
    basis: torch.Tensor
    coeffs: torch.Tensor
    prompts: list[int]

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def truncate(self, k: int) -> "GateTargets":
        """The rank-``k`` targets (columns are nested: rank k is a prefix of rank k + 1)."""
        if not 1 <= k <= self.rank:
            raise SurgeryError(f"rank {k} asked of gate targets of rank {self.rank}")
        return GateTargets(self.basis[:, :k], self.coeffs[:, :k], self.prompts)


def _reply_window(position) -> int:
    """``k`` of a response candidate's position ``reply[0:k]``."""
    try:
        return int(str(position).split(":")[1].rstrip("]"))
    except (IndexError, ValueError):
        raise SurgeryError(f"cannot read the reply window of direction position {position!r} (expected reply[0:k])") from None


@torch.no_grad()
def prompt_contrasts(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], candidate) -> tuple[list[int], torch.Tensor]:
    """Per-harmful-prompt contrasts at ``candidate``'s layer (a ``directions.Candidate``),
    the terms whose mean is the candidate for the project's default refusal text:
    ``response``: refusal-reply minus own-reply residual over the reply window;
    ``prompt``/``system``: the prompt's residual at the candidate's position minus
    the harmless mean.  Returns the indices kept (a response candidate drops
    prompts whose own reply is shorter than the window) and ``(n, d)`` float64."""
    from ..directions import DEFAULT_REFUSAL, SAFETY_SYSTEM_PROMPT
    from ..evaluation.generate import generate

    tok, layer = lm.tokenizer, candidate.layer
    if not 0 <= layer < lm.num_layers:
        raise SurgeryError(f"direction layer {layer} is outside the model's {lm.num_layers} layers")

    def resid(text, pos, suffix=None):
        return mean_residuals(lm, [text], pos, suffixes=None if suffix is None else [suffix], batch_size=1,
                              average_positions=True)[0, layer]

    if candidate.source == "response":
        k = _reply_window(candidate.position)
        _, own = generate(lm, list(harmful), max_new_tokens=k, return_ids=True)
        ref = tok(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"][:k]
        keep = [i for i, ids in enumerate(own) if len(ids) >= k]
        if not keep:
            raise SurgeryError("the model's replies to the harmful calibration prompts are all shorter than the "
                               f"direction's reply window ({k} tokens)")
        pos = list(range(-k, 0))
        rows = [resid(format_chat(tok, harmful[i]), pos, ref) - resid(format_chat(tok, harmful[i]), pos, own[i][:k])
                for i in keep]
        return keep, torch.stack(rows)
    if candidate.source not in ("prompt", "system"):
        raise SurgeryError(f"rank-k gates need a response, prompt or system direction, not {candidate.source!r}")
    system = SAFETY_SYSTEM_PROMPT if candidate.source == "system" else None
    pos = [int(candidate.position)]
    b = mean_residuals(lm, [format_chat(tok, p, system=system) for p in harmless], pos)[0, layer]
    rows = [resid(format_chat(tok, p, system=system), pos) - b for p in harmful]
    return list(range(len(harmful))), torch.stack(rows)


def refusal_basis(direction: torch.Tensor, contrasts: torch.Tensor, k: int, prompts: Sequence[int] | None = None) -> GateTargets:
    """``R_hat`` and the per-prompt targets (module docstring).  Column 0 is
    ``direction / |direction|``; columns 1..k-1 the top right singular vectors of
    the contrasts with that direction projected out (sign: largest entry positive)."""
    if k < 1:
        raise SurgeryError(f"rank must be at least 1, got {k}")
    r = direction.double().reshape(-1)
    r = r / r.norm()
    D = contrasts.double()
    if D.shape[1] != r.shape[0]:
        raise SurgeryError(f"contrasts have width {D.shape[1]} but the direction has {r.shape[0]}")
    scale = float(D.mean(0) @ r)
    if not scale > 0:
        raise SurgeryError("the direction does not point along the mean per-prompt contrast "
                           f"(r_hat . mean = {scale:.3g}); was it measured on another model?")
    cols = [r]
    if k > 1:
        perp = D - torch.outer(D @ r, r)
        _, sv, vh = torch.linalg.svd(perp, full_matrices=False)
        tol = 1e-9 * float(sv[0]) if sv.numel() else 0.0
        avail = int((sv > tol).sum()) if sv.numel() and sv[0] > 0 else 0
        if avail < k - 1:
            raise SurgeryError(f"rank {k} needs {k - 1} contrast directions besides r_hat but the {D.shape[0]} "
                               f"calibration prompts span only {avail}")
        for row in vh[: k - 1]:
            cols.append(row if row[row.abs().argmax()] > 0 else -row)
    basis = torch.stack(cols, dim=1)
    return GateTargets(basis, D @ basis / scale, list(prompts) if prompts is not None else list(range(D.shape[0])))


def gate_regression(s: GateStats, t: GateTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``S_h = X^T X / n`` (d_in x d_in), ``B = X^T C / n`` (d_in x (k-1)) and
    ``mean c_j^2`` of columns 1..k-1, over the target prompts' harmful inputs."""
    if s.x_h is None:
        raise SurgeryError("a rank-k gate needs per-prompt harmful inputs (collect_stats(..., per_prompt=True))")
    X = s.x_h[t.prompts]
    C = t.coeffs[:, 1:].to(X.dtype)
    n = X.shape[0]
    return X.T @ X / n, X.T @ C / n, (C * C).mean(0)


def fit_read_vectors_ridge(s: GateStats, t: GateTargets, post_weight: float = 1.0, ridge: float = 1e-2,
                           harmful_weight: float = 0.0) -> torch.Tensor:
    """Rank-k ridge fit (d_in x k): column 0 = :func:`fit_read_vector_ridge`,
    columns j >= 1 = ``(S_h + G)^-1 X^T c_j / n`` (``G`` harmless only: the
    regression already weighs the harmful inputs)."""
    v0 = fit_read_vector_ridge(s, post_weight, ridge, harmful_weight)
    if t.rank == 1:
        return v0[:, None]
    S, B, _ = gate_regression(s, t)
    return torch.cat([v0[:, None], torch.linalg.solve(S + ridge_gram(s, post_weight, ridge), B)], dim=1)


def fit_read_vectors_null(s: GateStats, t: GateTargets, null_ratio: float = 0.5, ridge: float = 1e-2) -> torch.Tensor:
    """Rank-k null-space fit (d_in x k): column 0 = :func:`fit_read_vector`,
    columns j >= 1 = ``N (N^T (S_h + G) N)^-1 N^T X^T c_j / n`` with ``N`` the null
    basis and ``G = ridge_gram(s, 0, ridge)``."""
    v0 = fit_read_vector(s, null_ratio)
    if t.rank == 1:
        return v0[:, None]
    null, _ = null_basis(s, null_ratio)
    S, B, _ = gate_regression(s, t)
    a = torch.linalg.solve(null.T @ (S + ridge_gram(s, 0.0, ridge)) @ null, null.T @ B)
    return torch.cat([v0[:, None], null @ a], dim=1)


def harmless_energy_bound(s: GateStats, t: GateTargets, V: torch.Tensor) -> torch.Tensor:
    """Per column of a rank-k fit ``V``: what the closed form bounds ``v_j^T G v_j``
    by.  Column 0 (constrained fit): its value ``v^T G v`` itself is the minimum
    (ridge: ``1 / (m_h^T G^-1 m_h)``), reported as NaN here; columns j >= 1:
    ``mean c_j^2 - b_j . v_j`` (the objective at the optimum)."""
    out = torch.full((V.shape[1],), float("nan"), dtype=torch.float64)
    if V.shape[1] > 1:
        _, B, c2 = gate_regression(s, t)
        out[1:] = c2 - (B * V[:, 1:].to(B.dtype)).sum(0)
    return out


FITS = ("ridge", "null")


def fit_gates(stats: dict[str, GateStats], fit: str = "ridge", *, post_weight: float = 10.0, ridge: float = 0.1,
              null_ratio: float = 0.5, harmful_weight: float = 0.0, targets: GateTargets | None = None,
              names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """float32 read vectors for ``names`` (default: every matrix of ``stats``):
    1-D, exactly the rank-one fit, when ``targets`` is None; else ``(d_in, k)``."""
    if fit not in FITS:
        raise SurgeryError(f"gate fit must be one of {', '.join(FITS)}, got {fit!r}")
    out = {}
    for name in (stats if names is None else names):
        s = stats[name]
        try:
            if targets is None:
                v = (fit_read_vector_ridge(s, post_weight, ridge, harmful_weight) if fit == "ridge"
                     else fit_read_vector(s, null_ratio))
            elif fit == "ridge":
                v = fit_read_vectors_ridge(s, targets, post_weight, ridge, harmful_weight)
            else:
                v = fit_read_vectors_null(s, targets, null_ratio, ridge)
        except torch.linalg.LinAlgError:
            raise SurgeryError(f"gate fit ({fit}) is singular for {name}: too few calibration prompts for the rank?") from None
        if not torch.isfinite(v).all():
            raise SurgeryError(f"gate fit ({fit}) of {name} is not finite (degenerate calibration inputs?)")
        out[name] = v.float()
    return out


class _Stop(Exception):
    """Ends a calibration forward pass after the last layer that needs it."""


def forward_until(lm: LoadedModel, batch: dict, last: int, handles: Sequence) -> None:
    """One forward pass of ``batch`` that ends after decoder layer ``last``, with the
    hooks of ``handles`` in place; they are removed afterwards, whatever happens."""
    def stop(mod, args, out):
        raise _Stop

    handles = list(handles) + [lm.layers()[last].register_forward_hook(stop)]
    try:
        lm.model(**batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fit_gates_cascade(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], direction: torch.Tensor,
                      alpha: float, fit: str = "ridge", *, names: Sequence[str] | None = None, post_positions: int = 5,
                      **fit_kw) -> dict[str, torch.Tensor]:
    """Read vectors fitted in order, each on the inputs its matrix receives once
    every earlier matrix is already edited at strength ``alpha`` (rank one).

    A one-shot fit (:func:`collect_stats` + :func:`fit_gates`) sees the unedited
    model's inputs; once the earlier layers inject, later matrices' inputs move and
    their gates no longer respond as fitted (on SmolLM2 at alpha 1.5 some later
    gates' mean harmful response fell from 1 to about 0: docs/rosi-on-smollm2.md).
    Here all calibration prompts (harmful rows, then harmless rows) go through the
    model as one batch; a pre-hook on each matrix gathers that matrix's input
    statistics, fits its read vector and edits its weight in place before the matrix
    runs, so everything downstream sees the edited model.  One forward pass (up to
    the last fitted layer); the weights are restored on exit.  The read vectors
    depend on ``alpha``: a sweep refits per strength.  ``fit_kw`` go to
    :func:`fit_gates` (``post_weight``, ``ridge``, ``null_ratio``, ``harmful_weight``)."""
    if fit not in FITS:
        raise SurgeryError(f"gate fit must be one of {', '.join(FITS)}, got {fit!r}")
    wanted = None if names is None else set(names)
    ws = [w for w in _writer_modules(lm) if wanted is None or w.name in wanted]
    if not ws:
        raise SurgeryError("cascade gate fit: no matrix to fit")
    if not harmful or not harmless:
        raise SurgeryError("cascade gate fit needs harmful and harmless calibration prompts")
    params = dict(lm.model.named_parameters())
    r = unit(direction).to(lm.device)
    per_prompt = fit == "ridge" and fit_kw.get("harmful_weight", 0.0) > 0  # the null fit has no harmful weight
    texts = [format_chat(lm.tokenizer, p) for p in list(harmful) + list(harmless)]
    batch = encode(lm, texts)
    nh = len(harmful)
    mask = batch["attention_mask"]
    vs: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}

    def hook_for(w):
        def hook(mod, args):
            stats = batch_stats(args[0], mask, nh, post_positions, per_prompt)
            v = fit_gates({w.name: stats}, fit, **fit_kw)[w.name]
            p = params[w.name]
            saved[w.name] = p.data.clone()
            p.data.copy_(gated_update(w, p.data, r, v.to(p.device), alpha))
            vs[w.name] = v.cpu()
        return hook

    handles = [get_submodule(lm.model, w.name.rsplit(".", 1)[0]).register_forward_pre_hook(hook_for(w)) for w in ws]
    try:
        forward_until(lm, batch, max(w.layer for w in ws), handles)
    finally:
        for name, t in saved.items():
            params[name].data.copy_(t)
    missing = [w.name for w in ws if w.name not in vs]
    if missing:
        raise SurgeryError(f"cascade gate fit: {len(missing)} matrices were never reached, e.g. {missing[0]}")
    return {w.name: vs[w.name] for w in ws}


def gated_update_k(w, tensor: torch.Tensor, basis: torch.Tensor, V: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W + alpha * R_hat V^T`` in float32, stored in the tensor's dtype; a 1-D
    ``V`` (or k = 1) is exactly :func:`gated_update`."""
    if V.dim() == 1 or V.shape[1] == 1:
        r = basis.reshape(-1) if basis.dim() == 1 else basis[:, 0]
        return gated_update(w, tensor, r, V.reshape(-1), alpha)
    m = w.as_out_in(tensor.to(torch.float32))
    new = m + alpha * (basis.float() @ V.float().T)
    return w.from_out_in(new).to(tensor.dtype).contiguous()


@contextlib.contextmanager
def gated_in_memory_k(lm: LoadedModel, basis: torch.Tensor, vs: dict[str, torch.Tensor], alpha: float,
                      layers: Sequence[int] | None = None) -> Iterator[None]:
    """The rank-k edit patched into the live model (restored on exit)."""
    params = dict(lm.model.named_parameters())
    keep = None if layers is None else set(layers)
    b = basis.float().to(lm.device)
    new = {}
    for w in _writer_modules(lm):
        if w.name in vs and (keep is None or w.layer in keep):
            new[w.name] = gated_update_k(w, params[w.name].data, b, vs[w.name].to(lm.device), alpha)
    with patched_weights(lm.model, new):
        yield
