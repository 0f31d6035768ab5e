"""Unit classes from a safety and a utility score, by explicit percentile rules.

The rules are applied per write matrix (one attention or MLP output matrix of
one layer: scores of different matrices are not comparable).  With ``n`` units
in the matrix, each score is turned into an ascending rank ``0..n-1`` (a stable
sort: ties are broken by unit index, so the result is deterministic):

* ``high(s)``: among the ``ceil(top * n)`` highest (rank >= n - ceil(top * n)).
* ``below_median(s)``: in the lower ``below`` share (rank < floor(below * n)).
* ``low(s)``: in the lower ``redundant`` share (rank < floor(redundant * n)).

Classes (each unit gets exactly one; codes are the indices of :data:`CLASSES`):

1. ``safety-critical``: high(safety) and below_median(utility).
2. ``utility-critical``: high(utility) and below_median(safety).
3. ``complex``: high in either score but not 1 or 2 (i.e. high in one and at
   or above the median in the other: important to both).
4. ``redundant``: low(safety) and low(utility) (free budget for edits).
0. ``other``: everything else (moderately important to one or both).

Defaults ``top=0.02, below=0.5, redundant=0.3``, in the spirit of SSAH
(methods.md §7; it reports ~1.3% safety-critical and ~20% redundant units).
The two scores share the factor ``||W[:, j]||^2`` and so are strongly
correlated: with independent scores ``redundant=0.3`` would give 9%, with
identical ones 30%.  Requires ``top + below <= 1`` and ``top + redundant <= 1``
so no unit is both high and low in one score.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import SurgeryError

CLASSES = ("other", "safety-critical", "utility-critical", "complex", "redundant")
CODE = {c: i for i, c in enumerate(CLASSES)}
NAMED = CLASSES[1:]  # the four classes of SSAH


@dataclass(frozen=True)
class Rules:
    top: float = 0.02
    below: float = 0.5
    redundant: float = 0.3

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
                raise SurgeryError(f"unit rule {k} must be a fraction in (0, 1), got {v!r}")
        for other in ("below", "redundant"):
            if self.top + getattr(self, other) > 1.0:
                raise SurgeryError(f"unit rules: top ({self.top}) + {other} ({getattr(self, other)}) must not exceed 1")

    def describe(self) -> dict:
        return {**asdict(self), "ranks": "ascending, stable (ties broken by unit index), per matrix of n units",
                "classes": {
                    "safety-critical": "safety in the top ceil(top*n) AND utility rank < floor(below*n)",
                    "utility-critical": "utility in the top ceil(top*n) AND safety rank < floor(below*n)",
                    "complex": "safety or utility in the top ceil(top*n), not safety- or utility-critical",
                    "redundant": "safety rank < floor(redundant*n) AND utility rank < floor(redundant*n)",
                    "other": "everything else"}}


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry (0 = smallest; ties by index)."""
    order = torch.sort(scores, stable=True).indices
    r = torch.empty_like(order)
    r[order] = torch.arange(len(scores))
    return r


def classify(safety: torch.Tensor, utility: torch.Tensor, rules: Rules = Rules()) -> torch.Tensor:
    """Class codes (uint8, indices of :data:`CLASSES`) of one matrix's units."""
    if safety.shape != utility.shape or safety.ndim != 1 or len(safety) == 0:
        raise SurgeryError(f"unit scores must be two equal non-empty vectors, got {tuple(safety.shape)} "
                           f"and {tuple(utility.shape)}")
    n = len(safety)
    rs, ru = ranks(safety), ranks(utility)
    k_top = math.ceil(rules.top * n)
    hs, hu = rs >= n - k_top, ru >= n - k_top
    n_below, n_low = math.floor(rules.below * n), math.floor(rules.redundant * n)
    bs, bu = rs < n_below, ru < n_below
    out = torch.zeros(n, dtype=torch.uint8)
    out[(rs < n_low) & (ru < n_low)] = CODE["redundant"]
    out[hs | hu] = CODE["complex"]
    out[hs & bu] = CODE["safety-critical"]
    out[hu & bs] = CODE["utility-critical"]
    return out


def proportions(codes: torch.Tensor) -> dict[str, float]:
    """Share of each class (all five, summing to 1)."""
    n = max(len(codes), 1)
    counts = torch.bincount(codes.long(), minlength=len(CLASSES))
    return {c: float(counts[i]) / n for i, c in enumerate(CLASSES)}
