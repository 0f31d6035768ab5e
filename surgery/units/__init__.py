"""Safety-critical units (SSAH, Li & Kim 2024; methods.md §7).

A *unit* is input channel ``j`` of a residual-stream write matrix: an MLP
neuron (``down_proj``) or an attention channel (``o_proj``).  Its importance on
a dataset is ``I_j = Var_n(x_{n,j}) * ||W[:, j]||^2``; measured on a safety set
(harmful prompts + refusals) and a utility set (harmless prompts + the model's
own replies), every unit is classified safety-critical, utility-critical,
complex, redundant or other.  Uses: restore a fine-tuned model's
safety-critical units from the aligned model (``surgery protect``, a weight-level
alternative to Safe-LoRA that needs no base model), and restrict LoRA updates to
redundant units (the mask for our trainers).

Modules
-------
* :mod:`.producers`: which tensors make up a unit (write column + producer rows,
  the GQA value-row rule), per supported architecture; unsupported ones raise.
* :mod:`.attribution`: streaming float64 attribution by forward pre-hooks, the
  two datasets.
* :mod:`.classify`: the percentile rules (documented there) and class codes.
* :mod:`.unitmap`: :class:`UnitMap` (safetensors + JSON summary + PNG, per-layer
  shares).
* :mod:`.mask`: :func:`unit_mask`, :func:`apply_mask` for PEFT LoRA models.
* :mod:`.pipeline`: ``compute_units``, ``units`` and ``protect`` (the streamed
  restore itself is :mod:`surgery.edits.protect`).
"""
from .attribution import Attribution, Example, RunningMoments, attribute, live_matrices, unit_datasets
from .classify import CLASSES, Rules, classify, proportions
from .mask import MaskEntry, MaskHandle, apply_mask, unit_mask
from .pipeline import ProtectResult, compute_units, protect, units
from .producers import UnitMatrix, check_supported, unit_matrices
from .unitmap import MatrixUnits, UnitMap

__all__ = ["Attribution", "CLASSES", "Example", "MaskEntry", "MaskHandle", "MatrixUnits", "ProtectResult", "Rules",
           "RunningMoments", "UnitMap", "UnitMatrix", "apply_mask", "attribute", "check_supported", "classify",
           "compute_units", "live_matrices", "proportions", "protect", "unit_datasets", "unit_mask", "unit_matrices",
           "units"]
