"""The unit map: both scores and the class of every unit of every write matrix,
saved as one safetensors file (plus a JSON summary and a PNG).

File layout (``format: surgery.units/1``): per matrix key ``layers.L.attn`` /
``layers.L.mlp`` three tensors, ``<key>.safety`` and ``<key>.utility``
(float64 importances) and ``<key>.class`` (uint8 codes of
:data:`surgery.units.classify.CLASSES`); the header metadata ``meta`` holds a
JSON object: the model it was measured on, the rules, the datasets, the token
counts and each matrix's live module path, producer modules and (attention)
``head_dim``/``group``.  Matrices are keyed by layer and kind, not tensor name,
so a map measured on a live model applies to a checkpoint whose tensor names
differ (gemma3 stores ``language_model.model.*``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch

from ..checkpoint.files import save_tensors
from ..errors import SurgeryError
from .classify import CLASSES, CODE, NAMED, Rules, classify, proportions

FORMAT = "surgery.units/1"
COLOURS = {"other": "#d9d9d9", "safety-critical": "#d62728", "utility-critical": "#1f77b4", "complex": "#9467bd",
           "redundant": "#2ca02c"}


@dataclass
class MatrixUnits:
    key: str
    kind: str  # attn | mlp
    layer: int
    module: str  # live module path of the write matrix, e.g. model.layers.3.mlp.down_proj
    producers: tuple[str, ...]  # live module paths of the producers
    safety: torch.Tensor  # (n,) float64
    utility: torch.Tensor  # (n,) float64
    classes: torch.Tensor  # (n,) uint8
    head_dim: int | None = None
    group: int | None = None

    @property
    def n_units(self) -> int:
        return len(self.classes)

    def indices(self, classes: Iterable[str]) -> list[int]:
        codes = [CODE[c] for c in classes]
        hit = torch.isin(self.classes, torch.tensor(codes, dtype=torch.uint8))
        return [int(i) for i in torch.nonzero(hit).flatten()]

    def describe(self) -> dict:
        return {"key": self.key, "kind": self.kind, "layer": self.layer, "module": self.module,
                "producers": list(self.producers), "head_dim": self.head_dim, "group": self.group,
                "units": self.n_units}


@dataclass
class UnitMap:
    matrices: dict[str, MatrixUnits]
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ summary
    def layers(self) -> list[int]:
        return sorted({m.layer for m in self.matrices.values()})

    def summary(self) -> dict:
        """Class shares per layer and kind, overall per kind and in all."""
        per_layer = []
        for l in self.layers():
            row: dict = {"layer": l}
            for m in self.matrices.values():
                if m.layer == l:
                    row[m.kind] = proportions(m.classes)
            per_layer.append(row)
        overall = {}
        for kind in ("attn", "mlp"):
            cs = [m.classes for m in self.matrices.values() if m.kind == kind]
            if cs:
                overall[kind] = proportions(torch.cat(cs))
        allc = torch.cat([m.classes for m in self.matrices.values()])
        overall["all"] = proportions(allc)
        counts = {c: int((allc == i).sum()) for i, c in enumerate(CLASSES)}
        return {"classes": list(CLASSES), "layers": per_layer, "overall": overall, "counts": counts,
                "units": int(len(allc))}

    def format_table(self) -> str:
        """Per-layer shares of the four classes (other = the rest), attention | MLP."""
        short = {"safety-critical": "safety", "utility-critical": "utility", "complex": "complex",
                 "redundant": "redund."}
        head = " ".join(f"{short[c]:>8}" for c in NAMED)
        lines = [f"{'layer':>7} | attn {head} | mlp  {head}"]
        s = self.summary()

        def cells(p: dict | None) -> str:
            return " ".join(f"{'-':>8}" if p is None else f"{100 * p[c]:7.1f}%" for c in NAMED)

        for row in s["layers"]:
            lines.append(f"{row['layer']:>7} |      {cells(row.get('attn'))} |      {cells(row.get('mlp'))}")
        o = s["overall"]
        lines.append(f"{'overall':>7} |      {cells(o.get('attn'))} |      {cells(o.get('mlp'))}")
        lines.append("units: " + ", ".join(f"{c} {s['counts'][c]}" for c in CLASSES) + f" (of {s['units']})")
        return "\n".join(lines)

    def rules(self) -> Rules | None:
        """The rules the map's classes were made with (None if it does not record them)."""
        r = self.meta.get("rules")
        try:
            return Rules(**{k: r[k] for k in ("top", "below", "redundant")}) if isinstance(r, dict) else None
        except (KeyError, TypeError, SurgeryError):
            return None

    def reclassified(self, rules: Rules) -> "UnitMap":
        """The same scores classified with ``rules`` (the meta records the rules it replaced)."""
        mats = {k: replace(m, classes=classify(m.safety, m.utility, rules)) for k, m in self.matrices.items()}
        meta = {**self.meta, "rules": rules.describe(), "reclassified_from": self.meta.get("rules")}
        return UnitMap(mats, meta)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> Path:
        """Write the map atomically (temporary file + rename)."""
        path = Path(path)
        tensors = {}
        for k, m in self.matrices.items():
            tensors[f"{k}.safety"] = m.safety.to(torch.float64).contiguous()
            tensors[f"{k}.utility"] = m.utility.to(torch.float64).contiguous()
            tensors[f"{k}.class"] = m.classes.to(torch.uint8).contiguous()
        meta = {**self.meta, "matrices": [m.describe() for m in self.matrices.values()]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(tensors, path, {"format": FORMAT, "meta": json.dumps(meta)})
        except OSError as e:
            raise SurgeryError(f"cannot write unit map {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "UnitMap":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SurgeryError(f"unit map {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                if md.get("format") != FORMAT:
                    raise SurgeryError(f"{path}: not a unit map (format {FORMAT!r} expected, got {md.get('format')!r})")
                meta = json.loads(md.get("meta", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SurgeryError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors / JSON errors, reported in one line
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SurgeryError(f"{path}: cannot read unit map ({why})") from None
        matrices = {}
        for d in meta.pop("matrices", []):
            k = d.get("key")
            parts = [tensors.get(f"{k}.{s}") for s in ("safety", "utility", "class")]
            if any(p is None for p in parts):
                raise SurgeryError(f"{path}: matrix {k} lacks its safety/utility/class tensors")
            s, u, c = parts
            n = d.get("units")
            if not (s.ndim == u.ndim == c.ndim == 1 and len(s) == len(u) == len(c) == n) or c.dtype != torch.uint8:
                raise SurgeryError(f"{path}: tensors of matrix {k} do not have {n} entries (uint8 classes)")
            if len(c) and int(c.max()) >= len(CLASSES):
                raise SurgeryError(f"{path}: matrix {k} has an unknown class code {int(c.max())}")
            matrices[k] = MatrixUnits(k, d["kind"], int(d["layer"]), d["module"], tuple(d["producers"]), s, u, c,
                                      d.get("head_dim"), d.get("group"))
        if not matrices:
            raise SurgeryError(f"{path}: the unit map lists no matrix")
        return cls(matrices, meta)

    # ------------------------------------------------------------------ plot
    def plot(self, path: str | Path) -> Path:
        """PNG: one row per layer, stacked bars of the class shares, attention
        and MLP side by side (matplotlib Agg canvas, no pyplot)."""
        from ..plotting import figure, save_png

        path = Path(path)
        layers = self.layers()
        s = {row["layer"]: row for row in self.summary()["layers"]}
        fig = figure((10, max(3.0, 1.2 + 0.25 * len(layers))))
        axes = fig.subplots(1, 2, sharey=True)
        order = ["safety-critical", "complex", "utility-critical", "redundant", "other"]
        for ax, kind, title in zip(axes, ("attn", "mlp"), ("attention (o_proj input channels)",
                                                           "MLP (down_proj input channels / neurons)")):
            left = [0.0] * len(layers)
            for c in order:
                vals = [s[l].get(kind, {}).get(c, 0.0) for l in layers]
                ax.barh(range(len(layers)), vals, left=left, color=COLOURS[c], label=c, height=0.85)
                left = [a + b for a, b in zip(left, vals)]
            ax.set_title(title, fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_xlabel("share of units")
        step = max(1, len(layers) // 32)
        axes[0].set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=7)
        axes[0].set_ylabel("layer")
        axes[0].invert_yaxis()  # shared y axis: layer 0 on top in both panels
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(order), fontsize=8, frameon=False)
        fig.suptitle(f"unit classes: {self.meta.get('model', {}).get('source', '')}", fontsize=10)
        return save_png(fig, path)
