"""The unit mask ("alignment budget"): LoRA updates allowed only in chosen units
(default: the redundant ones), so hardening does not spend utility-critical
capacity.

:func:`unit_mask` turns a unit map into ``{module path: MaskEntry}``:

* a write matrix (``o_proj``/``down_proj``) gets ``axis="in"``: its allowed
  input channels (the units of the allowed classes);
* a producer (``gate_proj``/``up_proj``, ``v_proj``) gets ``axis="out"``: its
  allowed rows, i.e. the rows of allowed units (for a shared GQA value row: only
  when every channel reading it is allowed, the rule of
  :mod:`surgery.units.producers`).

:func:`apply_mask` makes a PEFT LoRA model (e.g. from
:func:`surgery.training.lora.attach`) respect it: for an ``in`` entry the
masked columns of ``lora_A`` (r, in) are zeroed and a gradient hook zeroes
their gradient; for an ``out`` entry the same is done to the rows of
``lora_B`` (out, r).  ``B @ A`` then has exact zeros outside the allowed
channels after any number of optimiser steps (Adam's moments of a parameter
entry whose gradient is always zero stay zero, decoupled weight decay keeps a
zero at zero).  LoRA modules the mask does not name are left alone and
listed in :attr:`MaskHandle.unmasked`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from ..errors import SurgeryError
from .classify import CLASSES
from .unitmap import UnitMap


@dataclass(frozen=True)
class MaskEntry:
    axis: str  # "in": input channels (columns of lora_A); "out": output rows (rows of lora_B)
    allowed: torch.Tensor  # bool, one entry per channel / row


def _producer_allowed(mu, allowed: torch.Tensor) -> torch.Tensor:
    if mu.kind == "mlp":
        return allowed.clone()
    hd, g = mu.head_dim, mu.group
    n_rows = mu.n_units // g
    rows = torch.arange(n_rows)
    kv, d = rows // hd, rows % hd
    readers = ((kv * g)[:, None] + torch.arange(g)[None, :]) * hd + d[:, None]  # (rows, group) channels
    return allowed[readers].all(dim=1)


def unit_mask(units_map: UnitMap, allowed: Iterable[str] = ("redundant",), producers: bool = True
              ) -> dict[str, MaskEntry]:
    """``{module path: MaskEntry}`` for every write matrix of the map (and its
    producers unless ``producers=False``)."""
    allowed = tuple(allowed)
    bad = [c for c in allowed if c not in CLASSES]
    if bad or not allowed:
        raise SurgeryError(f"unknown unit class {bad[0] if bad else '(none given)'}; choose from {', '.join(CLASSES)}")
    out: dict[str, MaskEntry] = {}
    for mu in units_map.matrices.values():
        ok = torch.zeros(mu.n_units, dtype=torch.bool)
        idx = mu.indices(allowed)
        ok[idx] = True
        out[mu.module] = MaskEntry("in", ok)
        if producers:
            rows = _producer_allowed(mu, ok)
            for p in mu.producers:
                out[p] = MaskEntry("out", rows)
    return out


@dataclass
class MaskHandle:
    masked: list[str] = field(default_factory=list)
    unmasked: list[str] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _strip(name: str) -> str:
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def apply_mask(peft_model: torch.nn.Module, mask: Mapping[str, MaskEntry]) -> MaskHandle:
    """Zero the disallowed LoRA slices now and keep their gradients zero
    (module docstring).  Returns a handle listing what was masked; raises when
    no LoRA module is named by the mask or a width does not match."""
    handle = MaskHandle()
    for name, mod in peft_model.named_modules():
        if not hasattr(mod, "lora_A") or not isinstance(getattr(mod, "lora_A"), torch.nn.ModuleDict):
            continue
        path = _strip(name)
        entry = mask.get(path)
        if entry is None:
            handle.unmasked.append(path)
            continue
        for adapter in mod.lora_A.keys():
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight  # (r, in), (out, r)
            p, dim = (a, 1) if entry.axis == "in" else (b, 0)
            if p.shape[dim] != len(entry.allowed):
                raise SurgeryError(f"unit mask for {path} has {len(entry.allowed)} channels but its LoRA "
                                   f"{'lora_A' if dim else 'lora_B'} has {p.shape[dim]}")
            keep = entry.allowed.to(device=p.device, dtype=p.dtype)
            keep = keep[None, :] if dim == 1 else keep[:, None]
            with torch.no_grad():
                p.mul_(keep)
            if p.requires_grad:  # a frozen factor only needs the zeros
                handle.handles.append(p.register_hook(lambda g, k=keep: g * k))
        handle.masked.append(path)
    if not handle.masked:
        raise SurgeryError(f"unit mask: none of the {len(handle.unmasked)} LoRA modules is a write matrix or "
                           f"producer in the unit map (e.g. {handle.unmasked[0] if handle.unmasked else 'none'})")
    return handle
