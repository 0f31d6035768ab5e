"""What changed between a base checkpoint A and a patched checkpoint B, tensor by tensor.

``diff_checkpoints(a, b)`` -> :class:`DiffReport` (``records``, ``summary()``,
``to_json()``, ``plot(path)``); the CLI verb ``surgery diff`` is a shell over it.

Design
------
* **Streaming.**  Both sides go through :func:`resolve_model` (folder, ``.gguf``,
  Hub id, alias) and :class:`CheckpointReader`; one pair of tensors is loaded at a
  time, so memory is about two tensors (plus the float delta), never a model.
* **Bytes first.**  Equal raw bytes -> ``unchanged``, no arithmetic.  Tensors
  present on one side only, or with a different shape, get their own status
  (``only_a``, ``only_b``, ``shape_mismatch``) and no numbers; nothing about them
  is an error.  Two floating-point dtypes (a checkpoint cast to bfloat16) are
  compared by value like any pair (``changed`` with numbers, or ``unchanged`` for
  an exact cast) and the dtype change is reported next to them; other dtype
  pairs (integer vs float) are ``dtype_mismatch``, without numbers.
* **Numbers of a changed tensor** (delta ``dW = B - A``): ``fro`` = ||dW||_F,
  ``rel`` = ||dW||_F / ||A||_F, ``max_abs`` = max|dW|.  The delta is formed in
  float64 (float32 for tensors above ``_F64_MAX_NUMEL`` elements); squared norms
  are always accumulated in float64.  Non-float tensors are compared as float64.
* **Numerical rank.**  ``dW`` is read in the architecture's ``(d_out, d_in)`` form
  (``TensorInfo.as_out_in``: GPT-2 Conv1D and embeddings are transposed) and its
  top ``q`` (``rank_q``) singular values come from ``torch.svd_lowrank`` (two
  power iterations, a fixed seed so reports are reproducible), or from an exact
  SVD when ``min(d_out, d_in) <= q``.  The rank is the smallest ``k`` whose top-k
  energy reaches ``energy`` (default 0.99) of the *exact* ||dW||_F^2.  When even
  the top q values fall short, the rank is not known and is reported as ``> q``
  (``rank`` None, ``rank_above`` = q), never as a falsely low number.  Fused
  expert tensors ``(E, d_out, d_in)`` are treated per expert: the reported rank
  is the largest over the changed experts.  1-D tensors have no rank (None).
* **Direction.**  With a direction (a :class:`~surgery.directions.Directions`
  artifact -- its chosen vector -- or a safetensors file holding one 1-D tensor),
  ``cosine`` = |cos(u1, r)| where u1 is dW's leading left singular vector, i.e.
  in output space; only for tensors whose output dimension equals the
  direction's width (for a 1-D delta, u1 is the delta itself; for fused experts,
  the smallest cosine over the changed experts).  A ROSI edit gives rank 1 and
  |cos| = 1 on every edited matrix.
* **Grouping.**  ``layer`` and module ``kind`` (the name after the layer prefix,
  e.g. ``self_attn.o_proj.weight``; an expert index becomes ``*``) come from
  ``Architecture.place`` when the model type is known; a name it cannot place,
  or a model of unknown type, falls back to the regex ``(layers|h|blocks).N.``
  and is assumed to be stored ``(d_out, d_in)`` like ``nn.Linear`` (the
  record's ``layout`` says ``"out_in?"``).  Tensors outside any layer (embedding,
  final norm, lm_head) form the layer-less group ``-``.  A side that lacks a
  tensor its architecture requires (e.g. the lm_head of an untied model, which
  transformers would initialise at random) is compared all the same, with a note
  naming the tensor: diff reads files and refuses none, but never passes such a
  checkpoint off as whole.
* **Output.**  ``summary()`` is a text table of the changed tensors grouped by
  layer, one line per changed module kind, the one-sided / mismatched tensors
  and the totals.  ``to_json()`` holds every record.  ``plot(path)`` draws, with
  matplotlib's Agg canvas (no pyplot, no global backend switch), a heatmap of
  the relative change (rows = layers, columns = module kinds) and beside it the
  rank per module; :meth:`DiffReport.heatmap_data` returns the matrices it draws.
"""
from __future__ import annotations

import json
import math
from collections import Counter
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .checkpoint import CheckpointReader, resolve_model
from .errors import ArchitectureError, DirectionError, SurgeryError, check_count

Say = Callable[[str], None]

STATUSES = ("changed", "unchanged", "only_a", "only_b", "shape_mismatch", "dtype_mismatch")
POWER_ITERATIONS = 2
_F64_MAX_NUMEL = 1 << 24  # larger deltas are formed in float32 (norms still accumulate in float64)
_SEED = 0
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.(.+)$")
_MAX_LISTED = 20


# ----------------------------------------------------------------------------- records
@dataclass
class TensorDiff:
    """One tensor's comparison (see the module docstring for each field)."""

    name: str
    status: str
    layer: int | None = None
    kind: str = ""
    layout: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    norm_a: float | None = None
    fro: float | None = None
    rel: float | None = None
    max_abs: float | None = None
    rank: int | None = None
    rank_above: int | None = None  # set to q when the top q singular values hold less than `energy`
    singular_values: list[float] | None = None  # top singular values (first expert for fused experts)
    cosine: float | None = None
    finite: bool = True

    @property
    def rank_text(self) -> str:
        if self.rank_above is not None:
            return f">{self.rank_above}"
        return "-" if self.rank is None else str(self.rank)


@dataclass
class _Place:
    layer: int | None
    kind: str
    layout: str | None  # architecture layout; None = not placed (regex fallback)
    info: object | None  # architectures.TensorInfo, for as_out_in


# ----------------------------------------------------------------------------- direction
def load_direction(path) -> torch.Tensor:
    """The direction vector (float64, 1-D) in ``path``: a ``Directions`` artifact
    (its chosen candidate) or a safetensors file holding exactly one 1-D tensor."""
    from safetensors import safe_open

    from .directions import Directions

    path = Path(path).expanduser()
    if not path.is_file():
        raise DirectionError(f"direction file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if "directions" in keys:
                if not Path(str(path) + ".json").is_file() and "chosen" in keys:
                    vec = f.get_tensor("chosen")  # no metadata sidecar: the stored chosen vector
                else:
                    vec = None
            elif len(keys) == 1:
                vec = f.get_tensor(keys[0])
            else:
                raise DirectionError(
                    f"{path} is neither a surgery direction file nor a file with a single tensor "
                    f"(it holds {len(keys)}: {', '.join(keys[:5])})")
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DirectionError(f"cannot read direction file {path}: {why}") from None
    if vec is None:
        vec = Directions.load(path).best.vector
    if vec.dim() != 1 or vec.numel() == 0 or not vec.is_floating_point():
        raise DirectionError(f"direction in {path} must be a non-empty 1-D float tensor, "
                             f"got shape {tuple(vec.shape)} {vec.dtype}")
    vec = vec.double()
    n = float(vec.norm())
    if not math.isfinite(n) or n == 0.0:
        raise DirectionError(f"direction in {path} has norm {n}; cannot take cosines with it")
    return vec / n


# ----------------------------------------------------------------------------- placement
def _kind_after_layer(name: str, layer: int, expert: int | None) -> str:
    parts = name.split(".")
    try:
        i = parts.index(str(layer), 1)
    except ValueError:
        return name
    rest = parts[i + 1:]
    if expert is not None and str(expert) in rest:
        rest[rest.index(str(expert))] = "*"
    return ".".join(rest) or name


def _fallback_place(name: str) -> _Place:
    m = _LAYER_RE.search(name)
    if m is None:
        return _Place(None, name, None, None)
    return _Place(int(m.group(1)), m.group(2), None, None)


def _place_all(reader: CheckpointReader) -> tuple[dict[str, _Place], str | None, str | None]:
    """Layer, module kind and layout of every tensor of ``reader`` (architecture
    data where it can place a name, the regex fallback elsewhere), the model type,
    and why the checkpoint is incomplete (a required tensor it lacks, e.g. an
    untied lm_head) or None."""
    from .architectures import get_architecture

    names = reader.names
    incomplete = None
    try:
        arch = get_architecture(reader.config, reader.names)
    except ArchitectureError:
        return {n: _fallback_place(n) for n in names}, None, None
    try:
        infos = arch.place(names, reader.config, strict=False)
    except ArchitectureError:  # some names cannot be placed: place the rest one by one
        infos = {}
        for n in names:
            try:
                infos.update(arch.place([n], reader.config, strict=False))
            except ArchitectureError:
                pass
    try:  # are the tensors the architecture requires all there?
        arch.place(list(infos), reader.config)
    except ArchitectureError as e:
        incomplete = str(e)
    out: dict[str, _Place] = {}
    for n in names:
        info = infos.get(n)
        if info is None:
            out[n] = _fallback_place(n)
        elif info.layer is None:
            out[n] = _Place(None, n, info.layout, info)
        else:
            out[n] = _Place(info.layer, _kind_after_layer(n, info.layer, info.expert), info.layout, info)
    return out, arch.model_type, incomplete


def _as_out_in(place: _Place, t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``(..., d_out, d_in)``; None when it has no matrix form."""
    if t.dim() < 2:
        return None
    if place.info is not None:
        if place.layout in ("vector", "bias", "other"):
            return t if place.layout == "other" and t.dim() == 2 else None
        try:
            return place.info.as_out_in(t)
        except ArchitectureError:
            return None
    return t if t.dim() in (2, 3) else None  # unplaced: assume nn.Linear storage


# ----------------------------------------------------------------------------- maths
def _sumsq64(t: torch.Tensor) -> float:
    flat = t.reshape(-1)
    return float(sum(c.double().pow(2).sum() for c in flat.split(1 << 22))) if flat.numel() else 0.0


def _same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def spectrum(m: torch.Tensor, q: int, niter: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top singular values of a matrix ``m`` (d_out, d_in) and its leading left
    singular vector: ``(s[:k], u1, exact)`` with ``k = min(q, d_out, d_in)``;
    exact SVD when ``min(d_out, d_in) <= q``, else ``torch.svd_lowrank`` with
    ``niter`` power iterations under a fixed seed."""
    k = min(q, *m.shape)
    if min(m.shape) <= q:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        return s[:k], u[:, 0], True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        u, s, _ = torch.svd_lowrank(m, q=k, niter=niter)
    order = torch.argsort(s, descending=True)
    return s[order], u[:, order[0]], False


def numerical_rank(s: torch.Tensor, total_sq: float, energy: float, exact_full: bool) -> tuple[int | None, int | None]:
    """``(rank, None)`` = smallest k with sum(s[:k]^2) >= energy * total_sq, or
    ``(None, len(s))`` when the given values fall short (rank > len(s)) --
    unless they are the complete spectrum (``exact_full``), then ``len(s)``."""
    if total_sq <= 0.0:
        return 0, None
    cum = torch.cumsum(s.double().pow(2), 0)
    need = energy * total_sq * (1.0 - 1e-9)
    hit = torch.nonzero(cum >= need)
    if len(hit):
        return int(hit[0]) + 1, None
    if exact_full:
        return len(s), None
    return None, len(s)


def _float_delta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dt = torch.float64 if (x.numel() <= _F64_MAX_NUMEL or x.dtype == torch.float64) else torch.float32
    if x.is_complex():
        raise TypeError
    if x.dtype == torch.bool:
        x, y = x.to(torch.int8), y.to(torch.int8)
    return y.to(dt) - x.to(dt)


def _compare(rec: TensorDiff, place: _Place, x: torch.Tensor, y: torch.Tensor, r_hat: torch.Tensor | None,
             energy: float, q: int) -> None:
    if x.dtype == y.dtype and _same_bytes(x, y):
        rec.status = "unchanged"
        return
    rec.status = "changed"
    try:
        delta = _float_delta(x, y)
    except TypeError:  # complex: changed, no numbers
        return
    fro_sq, norm_a_sq = _sumsq64(delta), _sumsq64(x if x.dtype != torch.bool else x.to(torch.int8))
    if x.dtype != y.dtype and fro_sq == 0.0:
        rec.status = "unchanged"  # an exact cast: the same values in another dtype
        return
    rec.fro, rec.norm_a = math.sqrt(fro_sq), math.sqrt(norm_a_sq)
    rec.max_abs = float(delta.abs().max()) if delta.numel() else 0.0
    rec.rel = rec.fro / rec.norm_a if rec.norm_a > 0 else (0.0 if rec.fro == 0 else math.inf)
    rec.finite = all(math.isfinite(v) for v in (rec.fro, rec.max_abs, rec.norm_a))
    if not rec.finite or rec.fro == 0.0:
        return
    width = r_hat.numel() if r_hat is not None else None
    m = _as_out_in(place, delta)
    if m is None:
        if delta.dim() == 1 and width == delta.numel():
            rec.cosine = abs(float(delta.double() @ r_hat)) / rec.fro
        return
    mats = m.reshape(-1, *m.shape[-2:])
    ranks, above, cosines = [], None, []
    for i, mat in enumerate(mats):
        sq = _sumsq64(mat) if len(mats) > 1 else fro_sq
        if sq == 0.0:
            continue
        s, u1, exact = spectrum(mat, q)
        if not rec.singular_values:
            rec.singular_values = [float(v) for v in s]
        rk, ab = numerical_rank(s, sq, energy, exact and len(s) == min(mat.shape))
        if ab is not None:
            above = ab
        else:
            ranks.append(rk)
        if width is not None and mat.shape[0] == width:
            cosines.append(abs(float(u1.double() @ r_hat)))
    rec.rank_above = above
    rec.rank = None if above is not None else (max(ranks) if ranks else 0)
    if cosines:
        rec.cosine = min(cosines)


# ----------------------------------------------------------------------------- report
def _json_num(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _ranges(layers: Iterable[int]) -> str:
    ls = sorted(set(layers))
    out, i = [], 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        out.append(str(ls[i]) if i == j else f"{ls[i]}-{ls[j]}")
        i = j + 1
    return ",".join(out)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


@dataclass
class DiffReport:
    """The result of :func:`diff_checkpoints`."""

    a: dict
    b: dict
    records: list[TensorDiff]
    energy: float
    rank_q: int
    direction: dict | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    # -- queries -----------------------------------------------------------------
    def by_status(self, status: str) -> list[TensorDiff]:
        return [r for r in self.records if r.status == status]

    def totals(self) -> dict[str, int]:
        t = {s: 0 for s in STATUSES}
        for r in self.records:
            t[r.status] += 1
        return {"changed": t["changed"], "unchanged": t["unchanged"], "only_a": t["only_a"], "only_b": t["only_b"],
                "mismatched": t["shape_mismatch"] + t["dtype_mismatch"]}

    def heatmap_data(self) -> tuple[list[int], list[str], torch.Tensor, torch.Tensor]:
        """``(layers, kinds, rel, rank)``: one row per layer (every layer any tensor
        of A or B sits in), one column per module kind found in layers.  ``rel`` is
        the relative change of the cell's tensors together
        (sqrt(sum ||dW||^2) / sqrt(sum ||A||^2)), 0 for unchanged cells, NaN where no
        comparable tensor is; ``rank`` the largest rank in the cell (``rank_q + 1``
        stands for "> q"), NaN for 1-D or incomparable tensors."""
        layers = sorted({r.layer for r in self.records if r.layer is not None})
        kinds = list(dict.fromkeys(r.kind for r in self.records if r.layer is not None))
        li = {l: i for i, l in enumerate(layers)}
        ki = {k: j for j, k in enumerate(kinds)}
        num = torch.zeros(len(layers), len(kinds), dtype=torch.float64)
        den = torch.zeros_like(num)
        seen = torch.zeros_like(num, dtype=torch.bool)
        rank = torch.full_like(num, math.nan)
        for r in self.records:
            if r.layer is None or r.status not in ("changed", "unchanged"):
                continue
            i, j = li[r.layer], ki[r.kind]
            seen[i, j] = True
            if r.status == "changed" and r.fro is not None:
                num[i, j] += r.fro ** 2
                den[i, j] += (r.norm_a or 0.0) ** 2
            matrix = r.shape_a is not None and len(r.shape_a) >= 2
            if not matrix:
                continue
            rk = 0 if r.status == "unchanged" else (self.rank_q + 1 if r.rank_above is not None else r.rank)
            if rk is not None:
                rank[i, j] = rk if math.isnan(rank[i, j]) else max(float(rank[i, j]), rk)
        rel = torch.where(den > 0, num.sqrt() / den.sqrt(), torch.where(num > 0, math.inf, 0.0))
        rel[~seen] = math.nan
        return layers, kinds, rel, rank

    # -- text --------------------------------------------------------------------
    def summary(self) -> str:
        t = self.totals()
        lines = [f"A: {self.a['source']} -> {self.a['folder']} ({self.a.get('model_type') or 'unknown type'})",
                 f"B: {self.b['source']} -> {self.b['folder']} ({self.b.get('model_type') or 'unknown type'})"]
        if self.direction:
            lines.append(f"direction: {self.direction['path']} (width {self.direction['width']})")
        lines.append(f"rank: singular values reaching {self.energy:g} of ||dW||_F^2 (top {self.rank_q}, "
                     f"randomized SVD with {POWER_ITERATIONS} power iterations; '>{self.rank_q}' = more)")
        lines += self.notes
        changed = self.by_status("changed")
        if changed:
            head = f"{'layer':>5}  {'module':<36} {'||dW||_F':>9} {'rel':>9} {'max|dW|':>9} {'rank':>5} {'|cos|':>7}"
            lines += ["", "changed tensors, by layer", head]
            order = sorted(changed, key=lambda r: (r.layer is not None, -1 if r.layer is None else r.layer))
            prev = object()
            for r in order:
                lab = ("-" if r.layer is None else str(r.layer)) if r.layer != prev else ""
                prev = r.layer
                kind = r.kind if "*" not in r.kind or r.layer is None else _kind_after_layer(r.name, r.layer, None)
                kind = kind if len(kind) <= 36 else "..." + kind[-33:]  # a row names its expert; kinds use '*'
                cos = _fmt(r.cosine, ".4f")
                cast = f"  {r.dtype_a} -> {r.dtype_b}" if r.dtype_a != r.dtype_b else ""
                lines.append(f"{lab:>5}  {kind:<36} {_fmt(r.fro):>9} {_fmt(r.rel):>9} {_fmt(r.max_abs):>9} "
                             f"{r.rank_text:>5} {cos:>7}{cast}")
            lines += ["", "changed module kinds",
                      f"{'module':<36} {'changed':>9} {'layers':<12} {'rel min..max':<19} {'rank':<7} {'min|cos|':>8}"]
            kinds: dict[str, list[TensorDiff]] = {}
            for r in self.records:
                if r.status in ("changed", "unchanged"):
                    kinds.setdefault(r.kind, []).append(r)
            for kind, rs in kinds.items():
                ch = [r for r in rs if r.status == "changed"]
                if not ch:
                    continue
                rels = [r.rel for r in ch if r.rel is not None]
                rel = f"{_fmt(min(rels))}..{_fmt(max(rels))}" if rels else "-"
                known = sorted({r.rank for r in ch if r.rank is not None and r.rank_above is None})
                above = [r.rank_above for r in ch if r.rank_above is not None]
                rank = f">{max(above)}" if above else ("-" if not known else
                                                       (str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"))
                coss = [r.cosine for r in ch if r.cosine is not None]
                lay = _ranges(r.layer for r in ch if r.layer is not None) or "-"
                lines.append(f"{kind[-36:]:<36} {f'{len(ch)}/{len(rs)}':>9} {lay:<12} {rel:<19} {rank:<7} "
                             f"{_fmt(min(coss) if coss else None, '.4f'):>8}")
        for status, title in (("only_a", "only in A"), ("only_b", "only in B"),
                              ("shape_mismatch", "different shape"), ("dtype_mismatch", "different dtype")):
            rs = self.by_status(status)
            if not rs:
                continue
            lines += ["", f"{title} ({len(rs)})"]
            for r in rs[:_MAX_LISTED]:
                if status == "only_a":
                    what = f"{r.dtype_a} {r.shape_a}"
                elif status == "only_b":
                    what = f"{r.dtype_b} {r.shape_b}"
                else:
                    what = f"A {r.dtype_a} {r.shape_a}  B {r.dtype_b} {r.shape_b}"
                lines.append(f"  {r.name}  {what}")
            if len(rs) > _MAX_LISTED:
                lines.append(f"  ... (+{len(rs) - _MAX_LISTED} more)")
        casts = Counter(f"{r.dtype_a} -> {r.dtype_b}" for r in self.records
                        if r.status in ("changed", "unchanged") and r.dtype_a != r.dtype_b)
        if casts:
            lines += ["", "dtype changed (compared by value): " + ", ".join(f"{k}: {v} tensors" for k, v in casts.items())]
        lines += ["", f"tensors: {t['changed']} changed, {t['unchanged']} unchanged, {t['only_a']} only in A, "
                      f"{t['only_b']} only in B, {t['mismatched']} mismatched ({self.seconds:.1f} s)"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        recs = [{k: _json_num(v) for k, v in asdict(r).items()} for r in self.records]
        for rec, r in zip(recs, self.records):
            rec["rank_text"] = r.rank_text
        return {"format": "surgery.diff/1", "a": self.a, "b": self.b, "direction": self.direction,
                "energy": self.energy, "rank_q": self.rank_q, "power_iterations": POWER_ITERATIONS,
                "totals": self.totals(), "seconds": round(self.seconds, 3), "records": recs}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    # -- plot --------------------------------------------------------------------
    def plot(self, path) -> Path:
        """Write the two-panel PNG (relative change, rank) to ``path``."""
        import matplotlib
        import numpy
        from .plotting import figure, save_png

        layers, kinds, rel, rank = self.heatmap_data()
        if not layers:
            raise SurgeryError("nothing to plot: no tensor of A or B sits in a numbered layer")
        path = Path(path)
        short = [k.replace(".weight", "") for k in kinds]
        w = max(8.0, 2 * (1.5 + 0.35 * len(kinds)))
        h = max(3.0, 1.5 + 0.22 * len(layers))
        fig = figure((w, h))
        axes = fig.subplots(1, 2)
        panels = ((rel, "relative change ||dW||_F / ||W_A||_F", "viridis"),
                  (rank, f"rank of dW ({self.energy:g} energy; {self.rank_q + 1} = >{self.rank_q})", "magma"))
        for ax, (data, title, cmap) in zip(axes, panels):
            arr = data.numpy().copy()
            finite = arr[~(torch.isnan(data) | torch.isinf(data)).numpy()]
            vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            cm = matplotlib.colormaps[cmap].with_extremes(bad="0.85")  # no comparable tensor: grey
            im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cm, vmin=0.0, vmax=vmax)
            if data is rank and arr.size <= 600:  # small grids: write the rank in each cell
                for (i, j), v in numpy.ndenumerate(arr):
                    if v == v:
                        txt = f">{self.rank_q}" if v > self.rank_q else str(int(v))
                        ax.text(j, i, txt, ha="center", va="center", fontsize=6,
                                color="white" if v < 0.5 * vmax else "black")
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(len(kinds)), short, rotation=60, ha="right", fontsize=7)
            step = max(1, len(layers) // 32)
            ax.set_yticks(range(0, len(layers), step), [str(l) for l in layers[::step]], fontsize=7)
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{self.a['source']}  ->  {self.b['source']}", fontsize=10)
        return save_png(fig, path)


# ----------------------------------------------------------------------------- entry point
def _side(source, revision, allow_pickle) -> tuple[dict, CheckpointReader]:
    res = resolve_model(str(source), revision=revision, allow_pickle=allow_pickle)
    reader = CheckpointReader(res.folder, allow_pickle=allow_pickle)
    return {"source": str(source), "folder": str(res.folder), "kind": res.kind, "revision": res.revision}, reader


def diff_checkpoints(a, b, *, direction=None, energy: float = 0.99, rank_q: int = 16, say: Say | None = None,
                     revision_a: str | None = None, revision_b: str | None = None,
                     allow_pickle: bool = False) -> DiffReport:
    """Compare checkpoint ``b`` (patched) with ``a`` (base), one tensor pair at a
    time.  ``a``/``b``: folder, ``.gguf``, Hub id or alias; ``direction``: path of
    a direction file (see :func:`load_direction`)."""
    if not 0.0 < energy <= 1.0:
        raise SurgeryError(f"energy must be in (0, 1], got {energy}")
    check_count(rank_q, "rank_q")
    say = say or (lambda msg: None)
    r_hat = load_direction(direction) if direction is not None else None
    t0 = time.perf_counter()
    info_a, ra = _side(a, revision_a, allow_pickle)
    try:
        info_b, rb = _side(b, revision_b, allow_pickle)
    except BaseException:
        ra.close()
        raise
    with ra, rb:
        place_a, info_a["model_type"], incomplete_a = _place_all(ra)
        place_b, info_b["model_type"], incomplete_b = _place_all(rb)
        notes = [f"note: {side} ({r.folder}) is incomplete: {why}"
                 for side, r, why in (("A", ra, incomplete_a), ("B", rb, incomplete_b)) if why]
        if info_a["model_type"] is None or info_b["model_type"] is None:
            notes.append("note: unknown model type; layers found by the regex (layers|h|blocks).N. and 2-D tensors "
                         "read as (d_out, d_in)")
        names = list(ra.names) + [n for n in rb.names if n not in ra]
        records: list[TensorDiff] = []
        say(f"diff: {len(names)} tensors ({a} -> {b})")
        for k, name in enumerate(names, 1):
            in_a, in_b = name in ra, name in rb
            pl = place_a[name] if in_a else place_b[name]
            rec = TensorDiff(name, "", pl.layer, pl.kind,
                             pl.layout if pl.info is not None else ("out_in?" if pl.layer is not None else None))
            if in_a:
                rec.shape_a, rec.dtype_a = list(ra.shape(name)), str(ra.dtype(name)).replace("torch.", "")
            if in_b:
                rec.shape_b, rec.dtype_b = list(rb.shape(name)), str(rb.dtype(name)).replace("torch.", "")
            if not in_b:
                rec.status = "only_a"
            elif not in_a:
                rec.status = "only_b"
            elif rec.shape_a != rec.shape_b:
                rec.status = "shape_mismatch"
            elif rec.dtype_a != rec.dtype_b and not (ra.dtype(name).is_floating_point and
                                                     rb.dtype(name).is_floating_point):
                rec.status = "dtype_mismatch"  # e.g. integer vs float: not comparable as values
            else:
                _compare(rec, pl, ra.get(name), rb.get(name), r_hat, energy, rank_q)
            records.append(rec)
            if k % 100 == 0:
                say(f"  {k}/{len(names)} tensors compared")
    dinfo = None
    if r_hat is not None:
        dinfo = {"path": str(direction), "width": int(r_hat.numel())}
        if not any(r.cosine is not None for r in records if r.status == "changed"):
            notes.append(f"note: no changed tensor has output dimension {r_hat.numel()} (the direction's width); "
                         "no cosines")
    return DiffReport(info_a, info_b, records, energy, rank_q, dinfo, time.perf_counter() - t0, notes)


__all__ = ["DiffReport", "TensorDiff", "diff_checkpoints", "load_direction", "numerical_rank", "spectrum", "STATUSES"]
