"""The SAE safety subspace (SAILS, methods.md §4).

:func:`safety_subspace` turns an SAE and two sets of residual-stream
activations (harmful / harmless, same layer and positions) into an orthonormal
basis ``U`` (d, r) of the directions along which the SAE's features separate
them, and records which features define it and what they fire on:

1. feature means ``E_harmful[a_i]`` and ``E_harmless[a_i]`` over the rows given
   (float64 sums), score ``|E_harmful[a_i] - E_harmless[a_i]|``; the
   ``k_features`` best-scoring features are kept (ties broken by feature id;
   features with score 0 are never kept);
2. their decoder rows, normalised to unit length (SAELens does not force unit
   decoder rows), are stacked into ``D`` (k, d);
3. "PCA keeping 80% of variance": methods.md does not say whether to centre,
   so this is an *uncentred* SVD of ``D`` (centring would remove the mean of the
   directions, which is itself a safety direction when the features agree);
   ``r`` is the smallest count of singular values whose squared sum reaches
   ``variance`` of the total energy ``||D||_F^2 = k``;
4. ``U`` = the Q of a QR decomposition of the top ``r`` right singular vectors,
   signs fixed so that R has a positive diagonal (deterministic output).

The features are weighted equally (each unit row counts once); scores only
choose them.  For each kept feature, ``top_texts`` lists the ``top_n`` texts
that activate it most (the interpretability the method promises): ``texts``
has one entry per row of ``cat(harmful_acts, harmless_acts)``, or, with
``text_index`` (from ``collect_activations(..., return_index=True)``), one entry
per text and each row says which text it came from (a text's value is then
its maximum over its rows).

:class:`SafetySubspace` saves as ``path.safetensors`` (tensors) + ``path.json``
(features, scores, top texts, settings), the style of
:class:`surgery.directions.Directions`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint.files import _one_line, save_tensors, write_text_atomic
from ..errors import check_count
from .model import SAE, SAEError

FORMAT = "surgery.sae_subspace/1"


@dataclass(eq=False)
class SafetySubspace:
    U: torch.Tensor  # (d, r) orthonormal columns
    feature_ids: torch.Tensor  # (k,) long, best first
    scores: torch.Tensor  # (k,) |E_harmful - E_harmless|
    diffs: torch.Tensor  # (k,) E_harmful - E_harmless (sign: which side the feature fires on)
    directions: torch.Tensor  # (k, d) unit decoder rows
    singular_values: torch.Tensor  # of the stacked directions
    variance: float  # the energy fraction asked for
    top_texts: dict[int, list[dict]] = field(default_factory=dict)  # feature id -> [{text, activation}]
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def d(self) -> int:
        return int(self.U.shape[0])

    @property
    def explained(self) -> float:
        """Energy fraction of the stacked directions that the kept r components hold."""
        e = self.singular_values.double() ** 2
        return float(e[: self.rank].sum() / e.sum())

    def projector(self) -> torch.Tensor:
        U = self.U.double()
        return U @ U.T

    def check_width(self, d: int, what: str = "model") -> None:
        if self.d != d:
            raise SAEError(f"safety subspace has width {self.d} but the {what} has hidden size {d}")

    def describe(self) -> dict:
        feats = []
        for i, fid in enumerate(self.feature_ids.tolist()):
            feats.append({"id": fid, "score": float(self.scores[i]), "diff": float(self.diffs[i]),
                          "top_texts": self.top_texts.get(fid, [])})
        return {"format": FORMAT, "rank": self.rank, "width": self.d, "variance": self.variance,
                "explained": self.explained, "centered": False, "features": feats, **self.meta}

    def save(self, path: str | Path) -> Path:
        """``path`` (.safetensors) holds the tensors, ``path`` + ``.json`` the rest."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"U": self.U.float(), "directions": self.directions.float(), "scores": self.scores.float(),
                   "diffs": self.diffs.float(), "singular_values": self.singular_values.float(),
                   "feature_ids": self.feature_ids.long()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_tensors(tensors, path, {"format": FORMAT})
        write_text_atomic(Path(str(path) + ".json"), json.dumps(self.describe(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SafetySubspace":
        from safetensors import safe_open

        path = Path(path)
        meta_path = Path(str(path) + ".json")
        if not path.is_file():
            raise SAEError(f"safety subspace file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                t = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise SAEError(f"cannot read safety subspace file {path}: {type(e).__name__}: {_one_line(e)}"[:300]) from None
        for n in ("U", "directions", "scores", "diffs", "singular_values", "feature_ids"):
            if n not in t:
                raise SAEError(f"{path}: tensor {n} is missing")
        k = t["feature_ids"].shape[0]
        if t["U"].dim() != 2 or t["directions"].shape != (k, t["U"].shape[0]):
            raise SAEError(f"{path}: U {tuple(t['U'].shape)} and directions {tuple(t['directions'].shape)} do not fit "
                           f"{k} features")
        meta = {}
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise SAEError(f"cannot read {meta_path}: {_one_line(e)}"[:300]) from None
        top = {int(f["id"]): f.get("top_texts", []) for f in meta.get("features", [])}
        rest = {k_: v for k_, v in meta.items() if k_ not in ("format", "rank", "width", "variance", "explained",
                                                              "centered", "features")}
        return cls(U=t["U"].double(), feature_ids=t["feature_ids"].long(), scores=t["scores"].double(),
                   diffs=t["diffs"].double(), directions=t["directions"].double(),
                   singular_values=t["singular_values"].double(), variance=float(meta.get("variance", float("nan"))),
                   top_texts=top, meta=rest)


# ---------------------------------------------------------------------------- construction
@torch.no_grad()
def feature_means(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Mean SAE activation of every feature over the rows of ``acts`` (float64)."""
    total = torch.zeros(sae.d_sae, dtype=torch.float64)
    for i in range(0, acts.shape[0], batch_size):
        total += sae.encode(acts[i:i + batch_size]).double().sum(dim=0).cpu()
    return total / acts.shape[0]


def _check(sae: SAE, acts, what: str) -> None:
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise SAEError(f"{what} activations must be an (N, d) tensor")
    if acts.shape[0] == 0:
        raise SAEError(f"no {what} activations")
    if acts.shape[1] != sae.d_in:
        raise SAEError(f"{what} activations have width {acts.shape[1]} but the SAE {sae.source or ''} has d_in={sae.d_in}")


def subspace_rank(singular_values: torch.Tensor, variance: float) -> int:
    """Smallest r whose top-r squared singular values reach ``variance`` of the total."""
    e = singular_values.double() ** 2
    frac = torch.cumsum(e, 0) / e.sum()
    return int((frac < variance - 1e-12).sum()) + 1


@torch.no_grad()
def safety_subspace(sae: SAE, harmful_acts: torch.Tensor, harmless_acts: torch.Tensor, k_features: int = 64,
                    variance: float = 0.80, texts: Sequence[str] | None = None, top_n: int = 5,
                    text_index: torch.Tensor | None = None, batch_size: int = 4096) -> SafetySubspace:
    """The SAILS safety subspace of ``sae`` from harmful vs harmless activations (see the module docstring)."""
    _check(sae, harmful_acts, "harmful")
    _check(sae, harmless_acts, "harmless")
    check_count(k_features, "k_features", error=SAEError)
    if not 0 < variance <= 1:
        raise SAEError(f"variance must be in (0, 1], got {variance!r}")
    diff = feature_means(sae, harmful_acts, batch_size) - feature_means(sae, harmless_acts, batch_size)
    score = diff.abs()
    order = torch.sort(-score, stable=True).indices  # best first, ties by feature id
    keep = order[:k_features]
    keep = keep[score[keep] > 0]
    if keep.numel() == 0:
        raise SAEError(f"no SAE feature ({sae.source or 'SAE'}) differs between harmful and harmless activations")
    D = sae.W_dec[keep].double().cpu()
    norms = D.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise SAEError(f"SAE feature {int(keep[(norms[:, 0] == 0).nonzero()[0]])} has a zero decoder row")
    D = D / norms
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    r = subspace_rank(S, variance)
    Q, R = torch.linalg.qr(Vh[:r].T)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    U = Q * signs

    top: dict[int, list[dict]] = {}
    if texts is not None:
        rows = torch.cat([harmful_acts, harmless_acts])
        if text_index is None and len(texts) != rows.shape[0]:
            raise SAEError(f"{len(texts)} texts for {rows.shape[0]} activation rows (give one text per row, "
                           "or text_index)")
        if text_index is not None and text_index.shape != (rows.shape[0],):
            raise SAEError(f"text_index has shape {tuple(text_index.shape)}, expected ({rows.shape[0]},)")
        A = torch.cat([sae.encode(rows[i:i + batch_size])[:, keep.to(sae.W_enc.device)].double().cpu()
                       for i in range(0, rows.shape[0], batch_size)])
        if text_index is not None:
            per = torch.full((len(texts), A.shape[1]), float("-inf"), dtype=torch.float64)
            per = per.scatter_reduce(0, text_index.long()[:, None].expand_as(A), A, reduce="amax")
        else:
            per = A
        for j, fid in enumerate(keep.tolist()):
            vals, idx = torch.sort(per[:, j], descending=True, stable=True)
            top[fid] = [{"text": texts[int(i)], "activation": float(v)}
                        for v, i in zip(vals[:top_n].tolist(), idx[:top_n].tolist()) if v > 0]
    meta = {"layer": sae.layer, "hook_name": sae.hook_name, "sae": sae.source, "d_sae": sae.d_sae,
            "k_features": k_features, "harmful_rows": int(harmful_acts.shape[0]),
            "harmless_rows": int(harmless_acts.shape[0])}
    return SafetySubspace(U=U, feature_ids=keep.cpu(), scores=score[keep.cpu()], diffs=diff[keep.cpu()], directions=D,
                          singular_values=S, variance=float(variance), top_texts=top, meta=meta)


__all__ = ["SafetySubspace", "safety_subspace", "feature_means", "subspace_rank"]
