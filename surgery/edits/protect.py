"""Restore a fine-tuned model's safety-critical units from its aligned parent
(SSAH, methods.md §7): a weight-level alternative to Safe-LoRA that needs no
base model.

For every selected unit ``j`` of a write matrix (classes from a unit map, see
:mod:`surgery.units`): column ``j`` of the write matrix and the producer rows
that compute it (MLP: rows ``j`` of gate/up and their biases; attention: the
value row, under the GQA "all" rule of :mod:`surgery.units.producers`) are
copied from the aligned model *exactly* (same dtype, same bytes); nothing else
changes.  :func:`plan_restore` lists the slices per tensor and every restored
unit with its scores (for the manifest); :func:`restore_slice` is the
per-tensor edit used by the stream (``surgery.units.pipeline.protect`` runs it
through :func:`surgery.pipeline.write_edited`).  There is no in-memory variant:
protect has no strength to sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import SurgeryError
from ..units.classify import CLASSES
from ..units.producers import UnitMatrix
from ..units.unitmap import UnitMap


@dataclass(frozen=True)
class Slice:
    axis: int  # 1: columns of a (d_out, d_in) matrix; 0: rows (or entries of a bias)
    index: tuple[int, ...]


@dataclass
class RestorePlan:
    slices: dict[str, Slice] = field(default_factory=dict)  # tensor name -> what to copy from the aligned model
    units: list[dict] = field(default_factory=list)  # every restored unit, with its scores

    def counts(self) -> dict:
        out: dict = {}
        for u in self.units:
            k = f"{u['kind']}:{u['class']}"
            out[k] = out.get(k, 0) + 1
        return out


def check_map(matrices: Sequence[UnitMatrix], unit_map: UnitMap, where: str) -> None:
    """The map must describe exactly these matrices (keys, unit counts, heads)."""
    have = {m.key: m for m in matrices}
    missing = [k for k in have if k not in unit_map.matrices]
    extra = [k for k in unit_map.matrices if k not in have]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model lacks"
        raise SurgeryError(f"unit map does not fit {where}: it {what} ({len(unit_map.matrices)} matrices in the map, "
                           f"{len(have)} in the model)")
    for k, m in have.items():
        mu = unit_map.matrices[k]
        if mu.n_units != m.n_units:
            raise SurgeryError(f"unit map does not fit {where}: {k} has {mu.n_units} units in the map but "
                               f"{m.n_units} input channels in {m.writer}")
        if m.kind == "attn" and (mu.head_dim, mu.group) != (m.head_dim, m.group):
            raise SurgeryError(f"unit map does not fit {where}: {k} has head_dim {mu.head_dim}, group {mu.group} "
                               f"in the map but {m.head_dim}, {m.group} in the model")


def plan_restore(matrices: Sequence[UnitMatrix], unit_map: UnitMap, classes: Sequence[str]) -> RestorePlan:
    """What to copy from the aligned model for the units of ``classes``.
    ``matrices`` carry the checkpoint's tensor names."""
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes:
        raise SurgeryError(f"unknown unit class {bad[0] if bad else '(none given)'}; choose from {', '.join(CLASSES[1:])}")
    plan = RestorePlan()
    for m in matrices:
        mu = unit_map.matrices[m.key]
        units = mu.indices(classes)
        if not units:
            continue
        plan.slices[m.writer] = Slice(1, tuple(units))
        rows = m.producer_rows(units)
        if rows:
            for p in m.producers + m.producer_biases:
                plan.slices[p] = Slice(0, tuple(rows))
        taken = set(rows)
        for j in units:
            r = m.producer_row(j)
            plan.units.append({"matrix": m.writer, "key": m.key, "kind": m.kind, "layer": m.layer, "index": j,
                               "class": CLASSES[int(mu.classes[j])], "safety": float(mu.safety[j]),
                               "utility": float(mu.utility[j]), "producer_row": r,
                               "producer_row_restored": r in taken})
    return plan


def restore_slice(tensor: torch.Tensor, aligned: torch.Tensor, sl: Slice) -> torch.Tensor:
    """``tensor`` with the slice ``sl`` replaced by the aligned model's values
    (no arithmetic, no cast: the bytes are the aligned model's)."""
    if aligned.shape != tensor.shape or aligned.dtype != tensor.dtype:
        raise SurgeryError(f"aligned tensor has shape {tuple(aligned.shape)} {aligned.dtype}, fine-tuned "
                           f"{tuple(tensor.shape)} {tensor.dtype}")
    out = tensor.clone()
    idx = torch.tensor(sl.index, dtype=torch.long)
    if sl.axis == 1:
        out[:, idx] = aligned[:, idx]
    else:
        out[idx] = aligned[idx]
    return out
