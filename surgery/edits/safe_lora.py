"""Safe-LoRA (Hsu et al., NeurIPS 2024), methods.md §3: project fine-tuning
updates that are poorly aligned with the alignment subspace onto it.

Per target module, in (out, in) orientation (``TensorInfo.as_out_in``)::

    V   = W_aligned - W_base                 (or refusal directions as columns, below)
    C X = V (V^T X) / ||V||_F                "fast": the paper's approximation of the projector
    P X = U_k (U_k^T X)                      "exact": projector onto the top-k left singular
                                             vectors of V, k keeping ``energy`` of sum sigma^2
    cos = <C dW, dW> / (||C dW|| ||dW||)     Frobenius inner product

Modules with ``cos <= threshold`` (default 0.5, "at or below" as in methods.md),
or the ``top_k`` lowest, get ``dW <- C dW``; the rest keep their update.  For a
LoRA update ``dW = s B A`` only B is projected (``C dW = s (C B) A``), and the
cosine and norms come from r x r Gram matrices, so no (out, in) product is formed.
A ``d_out x d_out`` matrix is never materialised: C and P are applied as two thin
products, over column chunks of X for a full ``dW``.

Conventions (choices the paper leaves open):

* ``dW = 0``: cosine undefined (NaN), never projected.  ``C dW = 0`` (update
  orthogonal to V): cosine 0, so it is projected -- to zero.  ``V = 0`` (the
  "base" equals the aligned model there) is refused: it would zero every update.
* Every tensor of the update is a row of the table: LoRA modules, whole tensors
  an adapter replaces (``modules_to_save``, ``bias="all"``: ``dW = R - W_aligned``)
  and, for a fine-tuned model, every changed tensor.  Weight matrices are
  projected as above; the rest (biases, norms; with refusal directions, matrices
  whose output is not the residual stream) are kept as is, with the reason in
  the row and a warning.  An update with no projectable matrix is refused.
* Refusal directions instead of a base model: V holds the unit direction(s) as
  columns, so both projectors are the orthogonal projector onto their span (the
  fast one exactly so for a single direction).  Only modules whose output is the
  residual stream (architecture role of a writer) can be projected onto it; the
  others are reported as not applicable and keep their update.
* Arithmetic in float32 (Gram matrices and sums in float64); tests compare against
  explicit float64 projection matrices.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

DEFAULT_THRESHOLD = 0.5
DEFAULT_ENERGY = 0.99
DEFAULT_TOP_K = 10  # the official implementation's default when selecting by count
PROJECTORS = ("fast", "exact")
_CHUNK_ELEMS = 1 << 24  # columns of X per chunk so that V^T X[:, chunk] stays ~64 MB


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k squared singular values hold ``energy`` of the total
    (0 for a zero matrix; ``energy >= 1`` keeps every non-negligible value)."""
    s = s.double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    if energy >= 1.0:
        tol = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float32).eps
        return int((s > tol).sum())
    e = torch.cumsum(s * s, 0)
    return int(torch.searchsorted(e / e[-1], torch.tensor([energy], dtype=e.dtype), right=False)[0]) + 1


class Projector:
    """The alignment projector of one module (or of a direction span)."""

    def __init__(self, V: torch.Tensor, kind: str = "fast", energy: float = DEFAULT_ENERGY,
                 compute_dtype: torch.dtype = torch.float32):
        if kind not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
        self.kind, self.energy, self.dtype = kind, energy, compute_dtype
        V = V.to(compute_dtype)
        self.d_out = V.shape[0]
        if kind == "fast":
            self.V = V
            self.norm = float(torch.linalg.vector_norm(V, dtype=torch.float64))
            self.rank = None
        else:
            U, S, _ = torch.linalg.svd(V, full_matrices=False)
            self.rank = energy_rank(S, energy)
            self.U = U[:, : self.rank].contiguous()
            self.norm = float(S.double().norm())

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """C X (fast) or P X (exact) for X of shape (d_out, m)."""
        X = X.to(self.dtype)
        if self.kind == "exact":
            if self.rank == 0:
                return torch.zeros_like(X)
            return self.U @ (self.U.T @ X)
        if self.norm == 0.0:
            return torch.zeros_like(X)
        step = max(1, _CHUNK_ELEMS // max(1, self.V.shape[1]))
        if X.shape[1] <= step:
            return self.V @ (self.V.T @ X) / self.norm
        out = torch.empty_like(X)
        for j in range(0, X.shape[1], step):
            out[:, j: j + step] = self.V @ (self.V.T @ X[:, j: j + step]) / self.norm
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "energy": self.energy if self.kind == "exact" else None}


def cosine(cx: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float]:
    """(cos(C dW, dW), ||dW||, ||C dW||) with Frobenius products in float64."""
    a, b = cx.double().reshape(-1), x.double().reshape(-1)
    return _cos(float(a @ b), float(b @ b), float(a @ a))


def lora_cosine(A: torch.Tensor, B: torch.Tensor, CB: torch.Tensor, scaling: float) -> tuple[float, float, float]:
    """The same for ``dW = s B A``, ``C dW = s (C B) A``, from r x r Gram matrices."""
    G = A.double() @ A.double().T  # (r, r)
    B64, CB64 = B.double(), CB.double()
    s2 = float(scaling) ** 2
    inner = s2 * float(((CB64.T @ B64) * G).sum())
    nx = s2 * float(((B64.T @ B64) * G).sum())
    ncx = s2 * float(((CB64.T @ CB64) * G).sum())
    return _cos(inner, nx, ncx)


def _cos(inner: float, nx2: float, ncx2: float) -> tuple[float, float, float]:
    nx, ncx = math.sqrt(max(nx2, 0.0)), math.sqrt(max(ncx2, 0.0))
    if nx == 0.0:
        return float("nan"), 0.0, ncx
    if ncx == 0.0:
        return 0.0, nx, 0.0
    return max(-1.0, min(1.0, inner / (nx * ncx))), nx, ncx


@dataclass
class ModuleRow:
    """One line of the Safe-LoRA table."""
    module: str
    tensor: str
    cosine: float | None  # None: not applicable (output not in the projector's space)
    projected: bool = False
    norm_before: float = 0.0  # ||dW||_F
    norm_after: float = 0.0
    norm_projected: float = 0.0  # ||C dW||_F (what norm_after becomes if projected)
    rank: int | None = None  # exact projector: rank kept
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["cosine"] is not None and math.isnan(d["cosine"]):
            d["cosine"] = None
            d["note"] = d["note"] or "no update"
        return d


def select(rows: Iterable[ModuleRow], threshold: float | None = DEFAULT_THRESHOLD, top_k: int | None = None) -> list[str]:
    """Mark the rows to project (``cos <= threshold``, or the ``top_k`` lowest
    cosines); returns their module names.  Rows without a finite cosine never are."""
    rows = list(rows)
    ok = [r for r in rows if r.cosine is not None and not math.isnan(r.cosine)]
    if top_k is not None:
        chosen = {r.module for r in sorted(ok, key=lambda r: (r.cosine, r.module))[: max(0, int(top_k))]}
    else:
        chosen = {r.module for r in ok if r.cosine <= threshold}
    for r in rows:
        r.projected = r.module in chosen
        r.norm_after = r.norm_projected if r.projected else r.norm_before
    return [r.module for r in rows if r.projected]


def format_table(rows: Iterable[ModuleRow]) -> str:
    rows = list(rows)
    w = max([len("module")] + [len(r.module) for r in rows])
    lines = [f"{'module':<{w}}  {'cosine':>7}  {'projected':>9}  {'|dW| before':>11}  {'|dW| after':>11}"]
    for r in rows:
        c = "n/a" if r.cosine is None else ("-" if math.isnan(r.cosine) else f"{r.cosine:.4f}")
        extra = f"  {r.note}" if r.note else ""
        lines.append(f"{r.module:<{w}}  {c:>7}  {'yes' if r.projected else 'no':>9}  {r.norm_before:11.4g}  "
                     f"{r.norm_after:11.4g}{extra}")
    return "\n".join(lines)


def direction_matrix(vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Refusal directions as unit columns, (d, k), float64."""
    cols = [v.double() / v.double().norm() for v in vectors]
    return torch.stack(cols, dim=1)


__all__ = ["DEFAULT_ENERGY", "DEFAULT_THRESHOLD", "DEFAULT_TOP_K", "ModuleRow", "PROJECTORS", "Projector", "cosine",
           "direction_matrix", "energy_rank", "format_table", "lora_cosine", "select"]
