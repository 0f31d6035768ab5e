"""LoRA adapters on a live model, through PEFT (its adapter format is the one
users expect, and its layers are the reference our streamed merge is tested
against).

Which modules: ``targets`` names module kinds (the last part of the module
path: ``o_proj``, ``down_proj``, ``up_proj``...) or the aliases ``writers``
(every residual-stream write matrix, from the architecture data) and
``attn_out`` / ``mlp_out``; ``layers`` restricts them.  Placement goes through
the architecture data, so a module that is not in the checkpoint is an error
before any training.

Initialisation:

* ``default``: PEFT's (A Kaiming-uniform, B = 0), both trainable: plain LoRA.
* ``subspace`` (SAILS, methods.md §4): a residual-stream *writer* in layer ``i``
  gets ``B = U`` (``d x r``, orthonormal, from the safety subspace assigned to
  that layer) and ``A = 0``; B is frozen unless ``train_b``, so every update
  ``B A`` lies in span(U).  A *reader* (e.g. ``up_proj``) gets ``A = U^T`` and
  ``B = 0``, both trainable: the update reads only the subspace at the start.  Rank per module = the
  subspace's rank; scaling 1 (``lora_alpha = r``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..architectures import check_layers
from ..errors import SurgeryError
from ..model import LoadedModel

WRITER_ALIASES = {"writers": ("attn_out", "mlp_out"), "attn_out": ("attn_out",), "mlp_out": ("mlp_out",)}


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float | None = None  # default: rank (scaling 1)
    targets: tuple[str, ...] = ("writers",)
    layers: Sequence[int] | None = None
    init: str = "default"  # or "subspace"
    subspace: Mapping[int, torch.Tensor] | None = None  # layer -> U (d, r), for init="subspace"
    train_b: bool = False
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        out = {"rank": self.rank, "alpha": self.alpha if self.alpha is not None else self.rank,
               "targets": list(self.targets), "layers": None if self.layers is None else list(self.layers),
               "init": self.init}
        if self.init == "subspace":
            out["train_b"] = self.train_b
            out["subspace_rank"] = {int(k): int(v.shape[1]) for k, v in (self.subspace or {}).items()}
        return {**out, **self.extra}


@dataclass
class Target:
    module: str  # module path, e.g. model.layers.3.mlp.down_proj
    layer: int
    writer: bool


def find_targets(lm: LoadedModel, spec: LoraSpec) -> list[Target]:
    return select_targets([n for n, _ in lm.model.named_parameters()], lm.arch, lm.config, spec)


def select_targets(names: Sequence[str], arch, config, spec: LoraSpec) -> list[Target]:
    """The modules ``spec`` adapts among tensor ``names`` (a live model's parameters,
    or a checkpoint's tensors: the cheap check before any work, see
    :meth:`surgery.training.harden.TrainMethod.check`)."""
    infos = arch.place(names, config, strict=False)
    roles: set[str] = set()
    kinds: set[str] = set()
    for t in spec.targets:
        if t in WRITER_ALIASES:
            roles.update(WRITER_ALIASES[t])
        else:
            kinds.add(t)
    n_layers = arch.num_layers(config)
    layers = set(range(n_layers)) if spec.layers is None else set(spec.layers)
    check_layers(layers, n_layers, "LoRA layers (--layers)")
    out: list[Target] = []
    found_kinds: set[str] = set()
    kinds_there: set[str] = set()
    for name, info in infos.items():
        if info.layer is None or info.layer not in layers or not name.endswith(".weight") or info.expert is not None:
            continue
        module = name[: -len(".weight")]
        kind = module.rsplit(".", 1)[-1]
        if info.layout in ("in_out", "out_in"):
            kinds_there.add(kind)  # the matrices (norms and biases are no LoRA targets)
        if info.role in roles or kind in kinds:
            out.append(Target(module, info.layer, info.writes_residual))
            found_kinds.add(kind)
    missing = sorted(k for k in kinds if k not in found_kinds)
    if missing:
        raise SurgeryError(f"LoRA target module kind(s) {missing} not found in model_type '{arch.model_type}' "
                           f"(--targets; it has {', '.join(sorted(kinds_there)) or 'none'} in the chosen layers, "
                           f"or the aliases {', '.join(WRITER_ALIASES)})")
    if not out:
        raise SurgeryError("LoRA has no module to adapt (check the targets and --layers)")
    out.sort(key=lambda t: (t.layer, t.module))
    return out


def nearest_subspace(subspace: Mapping[int, torch.Tensor], layer: int, writer: bool) -> torch.Tensor:
    """The subspace a module uses: a writer in layer i writes the stream first
    read at layer i+1, so it takes the first subspace layer > i (else the last
    one); a reader in layer i reads the stream at layer i, so it takes the last
    subspace layer <= i (else the first one)."""
    keys = sorted(subspace)
    if writer:
        after = [k for k in keys if k > layer]
        return subspace[after[0] if after else keys[-1]]
    before = [k for k in keys if k <= layer]
    return subspace[before[-1] if before else keys[0]]


def attach(lm: LoadedModel, spec: LoraSpec, seed: int = 0):
    """Wrap ``lm.model`` in a PEFT LoRA model per ``spec``; returns
    ``(peft_model, targets)``.  Only the adapters' parameters are trainable."""
    from peft import LoraConfig, get_peft_model

    targets = find_targets(lm, spec)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if spec.init == "subspace":
        if not spec.subspace:
            raise SurgeryError("subspace initialisation needs a safety subspace (none given)")
        d = lm.hidden_size
        for k, u in spec.subspace.items():
            if u.ndim != 2 or u.shape[0] != d:
                raise SurgeryError(f"safety subspace of layer {k} has shape {tuple(u.shape)}, model width is {d}")
        for t in targets:
            r = int(nearest_subspace(spec.subspace, t.layer, t.writer).shape[1])
            rank_pattern[f"^{t.module}$"] = r
            alpha_pattern[f"^{t.module}$"] = r
    elif spec.init != "default":
        raise SurgeryError(f"unknown LoRA initialisation {spec.init!r} (default, subspace)")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
                     target_modules=[t.module for t in targets], lora_dropout=0.0, bias="none",
                     rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    pm = get_peft_model(lm.model, cfg)
    if spec.init == "subspace":
        with torch.no_grad():
            for t in targets:
                mod = pm.base_model.model.get_submodule(t.module)
                u = nearest_subspace(spec.subspace, t.layer, t.writer).to(torch.float32)
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # (r, in), (out, r)
                if t.writer:
                    b.copy_(u)
                    a.zero_()
                    b.requires_grad_(spec.train_b)
                else:
                    a.copy_(u.T)
                    b.zero_()
    return pm, targets


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
