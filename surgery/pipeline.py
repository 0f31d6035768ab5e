"""The Python API behind the CLI: each verb is one function here.

``compute_directions`` measures and saves refusal directions; ``rosi`` plans and
streams a ROSI edit into a new checkpoint with its manifest; ``evaluate_models``
compares a patched model with its original.  Everything a function needs is
checked before any expensive work: the output target, the model's architecture
(every tensor placed), the prompt sets and the direction's width.
"""
from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .architectures import check_layers, get_architecture
from .checkpoint import (CheckpointReader, CheckpointWriter, copy_aux_files, resolve_model, sha256_file,
                         stream_rewrite)
from .checkpoint.files import _one_line, save_tensors
from .directions import Directions, compute_directions as _compute_directions
from .edits.rosi import rosi_in_memory, rosi_targets, rosi_update, unit
from .defaults import INJECT_DEFAULTS, OPENING_DEFAULTS, REFUSAL_TOLERANCE
from .errors import CheckpointError, PromptError, SurgeryError
from .evaluation.metrics import evaluate, format_intervals, format_table, summary_row
from .manifest import build_manifest, write_manifest
from .model import LoadedModel, load_model
from .prompts import PromptSet, builtin_split, format_chat, load_prompts
from . import tuning

log = logging.getLogger(__name__)
Say = Callable[[str], None]

DEFAULT_ALPHAS = (15.0, 20.0, 25.0, 30.0, 33.0, 36.0, 40.0, 45.0)


def hash_split(prompt: str) -> str:
    import hashlib

    b = hashlib.sha256(prompt.encode("utf-8")).digest()[0] % 5
    return "train" if b < 3 else ("val" if b == 3 else "test")


@dataclass
class PromptConfig:
    """Where prompts come from (any ``load_prompts`` source) and how many to use.

    ``n_train``: at most this many prompts of each training split (a seeded
    subset, :meth:`PromptSet.subset`); None, the default, uses them all.  More
    calibration data is what generalises: gates fitted on 120+200 prompts leaked a
    quarter of their harmful response onto held-out harmless prompts
    (docs/rosi-on-smollm2.md).  ``n_val`` caps the validation splits the same way."""
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    borderline: str | None = "builtin:borderline"
    column: str | None = None
    n_train: int | None = None
    n_val: int = 40

    def load(self, which: str, split: str) -> PromptSet:
        """Built-in sets have fixed splits; a user source (file or Hub dataset)
        is split deterministically by prompt hash: 60% train, 20% val, 20% test
        (records carrying a ``split`` field are not needed)."""
        src = getattr(self, which)
        if src.startswith("builtin:"):
            if builtin_split(src) is not None:  # "builtin:harmful:val[train]" would be malformed
                raise PromptError(f"--{which} {src}: a built-in set that names its split is for `surgery eval`; here "
                                  f"the {which} prompts' train/val/test splits are each used for their role: give "
                                  f"builtin:{src.split(':')[1]}")
            return load_prompts(f"{src}[{split}]")
        ps = load_prompts(src, column=self.column)
        keep = [i for i, p in enumerate(ps.prompts) if hash_split(p) == split]
        if not keep:
            raise PromptError(f"{src}: no prompts fall in the {split} split (too few prompts?)")
        cats = tuple(ps.categories[i] for i in keep) if ps.categories else None
        return PromptSet.from_prompts([ps.prompts[i] for i in keep], f"{ps.source}|split={split}", cats)

    def sources(self) -> list[str]:
        """The prompt sources (built-in names, files, dataset ids)."""
        return [s for s in (self.harmful, self.harmless, self.borderline) if s]

    def train(self, which: str) -> PromptSet:
        """The training split of ``which``, capped at ``n_train``."""
        ps = self.load(which, "train")
        return ps if self.n_train is None else ps.subset(self.n_train)

    def val(self, which: str) -> PromptSet:
        """The validation split of ``which``, capped at ``n_val``."""
        return self.load(which, "val").subset(self.n_val)

    def train_val(self) -> tuple[PromptSet, PromptSet, PromptSet, PromptSet]:
        return self.train("harmful"), self.train("harmless"), self.val("harmful"), self.val("harmless")


def _say(say: Say | None) -> Say:
    return say or (lambda msg: log.info(msg))


def input_info(resolved, reader: CheckpointReader) -> dict:
    info = resolved.to_dict()
    info["weight_files"] = {p.name: sha256_file(p) for p in reader.weight_files}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}


def open_model(source: str, revision: str | None = None, allow_pickle: bool = False, say: Say | None = None):
    """Resolve ``source`` and check that every tensor of it can be placed."""
    say = _say(say)
    resolved = resolve_model(source, revision=revision, allow_pickle=allow_pickle)
    reader = CheckpointReader(resolved.folder, allow_pickle=allow_pickle)
    arch = get_architecture(reader.config, reader.names)
    arch.residual_writers(reader.names, reader.config)  # raises, naming unplaced tensors
    say(f"model: {source} -> {resolved.folder} ({arch.model_type}, {arch.num_layers(reader.config)} layers, "
        f"width {arch.hidden_size(reader.config)})")
    return resolved, reader, arch


def compute_directions(lm: LoadedModel, prompts: PromptConfig, sources: Sequence[str] = ("response",),
                       rank_by: str = "selectivity", say: Say | None = None, **kw) -> Directions:
    say = _say(say)
    ht, bt, hv, bv = prompts.train_val()
    say(f"directions: sources {', '.join(sources)}; {len(ht)}+{len(bt)} train, {len(hv)}+{len(bv)} validation prompts")
    def progress(i, n, c):
        sc = c.scores
        extra = f", bypass {sc['bypass']:+.2f}, kl {sc['kl']:.3f}" if "bypass" in sc else ""
        say(f"  [{i + 1}/{n}] {c.source} layer {c.layer}: refusal score with r added: harmful "
            f"{sc['induce_harmful']:+.2f}, harmless {sc['induce']:+.2f}{extra}")

    kw.setdefault("progress", progress)
    dirs = _compute_directions(lm, ht.prompts, bt.prompts, hv.prompts, bv.prompts, sources=sources, rank_by=rank_by, **kw)
    dirs.meta["datasets"] = {"harmful_train": ht.describe(), "harmless_train": bt.describe(),
                             "harmful_val": hv.describe(), "harmless_val": bv.describe()}
    dirs.meta["model"] = {"folder": str(lm.folder), "model_type": lm.arch.model_type,
                          "num_layers": lm.num_layers, "hidden_size": lm.hidden_size}
    b = dirs.best
    say(f"direction: {b.source} layer {b.layer} position {b.position} norm {b.norm:.2f} ({dirs.reason})")
    return dirs


def direction_record(path: Path, dirs: Directions) -> dict:
    b = dirs.best
    return {"file": path.name, "sha256": sha256_file(path), "source": b.source, "layer": b.layer,
            "position": b.position, "norm": b.norm, "selection": dirs.reason,
            "scores": {k: v for k, v in b.scores.items() if isinstance(v, (int, float, str))}}


def write_rosi(reader: CheckpointReader, arch, out: Path, r_hat: torch.Tensor, alpha: float,
               layers: Sequence[int] | None, include_embedding: bool, overwrite: bool = False,
               files: dict[str, bytes | Path] | None = None, manifest: dict | None = None,
               max_shard_bytes: int = 5_000_000_000, say: Say | None = None,
               evaluate: Callable[[Path], dict] | None = None) -> list[str]:
    """Stream ``reader`` through ROSI into ``out`` (atomic); returns edited tensor names."""
    say = _say(say)
    config = reader.config
    writers = arch.residual_writers(reader.names, config, include_embedding=include_embedding)
    targets = {w.name: w for w in rosi_targets(writers, layers, include_embedding)}
    if not targets:
        raise SurgeryError("ROSI has no matrix to edit (check --layers)")
    extra = []
    config_updates = None
    emb = arch.find_embedding(reader.names)
    if include_embedding and emb in targets and arch.tied(config):
        # The unembedding keeps the original weights: untie explicitly (a checkpoint that stores
        # lm_head beside a tied embedding already has the tensor: only the config changes).
        lm_head = arch.find_lm_head(reader.names) or arch.lm_head_names[0]
        if lm_head not in reader.names:
            extra.append((lm_head, lambda: reader.get(emb)))
        config_updates = {"tie_word_embeddings": False}
        say(f"note: {emb} is tied to the unembedding; the output is untied ({lm_head} keeps the original weights)")
    r = r_hat.to(torch.float32)

    def edit(name, tensor):
        w = targets.get(name)
        return None if w is None else rosi_update(w, tensor, r, alpha)

    return write_edited(reader, out, edit, overwrite=overwrite, extra=extra, config_updates=config_updates,
                        files=files, manifest=manifest, max_shard_bytes=max_shard_bytes, say=say, evaluate=evaluate)


def write_edited(reader: CheckpointReader, out: Path, edit, *, overwrite: bool = False, extra=None,
                 config_updates: dict | None = None, files: dict[str, bytes | Path] | None = None,
                 manifest: dict | None = None, max_shard_bytes: int = 5_000_000_000, say: Say | None = None,
                 extra_edited: Sequence[str] = (), evaluate: Callable[[Path], dict] | None = None) -> list[str]:
    """Stream ``reader`` through ``edit(name, tensor) -> tensor | None`` into ``out``
    (atomic), with the aux files, extra ``files`` and the manifest (written last,
    hashing every output file).  Every weight edit method writes through here.
    ``extra_edited``: names of ``extra`` tensors that carry an edit (e.g. an untied
    lm_head with an adapter's update), counted and recorded with the edited ones.
    ``evaluate(folder) -> dict``: run on the complete temporary folder before it is
    committed, recorded as the manifest's ``evaluation``: a run stopped during the
    evaluation commits nothing (an earlier output it replaces is kept)."""
    say = _say(say)
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as wr:
        edited = stream_rewrite(reader, wr, edit, extra=extra or None) + list(extra_edited)
        copy_aux_files(reader.folder, wr.tmp_dir, config_updates)
        for rel, content in (files or {}).items():
            dst = wr.tmp_dir / rel
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, dst)
                else:
                    dst.write_bytes(content)
            except OSError as e:  # a full disk, say: one line naming the file, like the shard writes
                what = f"copy {content} to {dst}" if isinstance(content, Path) else f"write {dst}"
                raise CheckpointError(f"cannot {what}: {_one_line(e)}") from None
        if manifest is not None:
            m = dict(manifest)
            m["edited"] = {"count": len(edited), "tensors": edited, "untied_lm_head": bool(config_updates)}

            def finish(tmp: Path) -> None:
                if evaluate is not None:
                    m["evaluation"] = evaluate(tmp)
                write_manifest(tmp, m)

            wr.finalizers.append(finish)
        elif evaluate is not None:
            raise ValueError("write_edited: evaluate needs a manifest to record it in")
    say(f"wrote {out} ({len(edited)} tensors edited)")
    return edited


@dataclass
class HardenResult:
    """What :func:`harden` produced (any method)."""
    out: Path
    alpha: float
    direction: dict
    sweep: list[dict] = field(default_factory=list)
    evaluation: dict | None = None


class EditMethod:
    """What differs between strength-swept edits (ROSI, gated injection): the
    in-memory edit used by the sweep, the per-tensor edit used by the stream,
    and the manifest parameters.  ``harden`` does everything else."""
    name = "edit"
    default_alphas: Sequence[float] = ()
    needs_direction = True  # False: harden neither computes nor records a refusal direction
    calibrates = True  # prepare() runs the model on prompts (so it needs the chat template)

    def use_direction(self, dirs: Directions) -> None:
        """Receive the direction artifact before ``prepare`` (for methods that need more than ``r_hat``)."""

    def prepare(self, lm: LoadedModel, prompts: "PromptConfig", say: Say) -> None:
        """Measure whatever the edit needs beyond the direction (after the direction is known)."""

    def in_memory(self, lm: LoadedModel, r_hat: torch.Tensor, alpha: float):
        raise NotImplementedError

    def finalize(self, lm: LoadedModel, r_hat: torch.Tensor, alpha: float, say: Say) -> None:
        """The strength is chosen: fix whatever depends on it before ``files`` and ``write``."""

    def write(self, reader: CheckpointReader, arch, out: Path, r_hat: torch.Tensor, alpha: float, **kw) -> list[str]:
        raise NotImplementedError

    def parameters(self) -> dict:
        return {}

    def files(self, work: Path) -> dict[str, Path]:
        """Artifacts saved next to the checkpoint (hashed into the manifest)."""
        return {}


class Rosi(EditMethod):
    name = "rosi"
    default_alphas = DEFAULT_ALPHAS
    calibrates = False

    def __init__(self, layers: Sequence[int] | None = None, include_embedding: bool = False):
        self.layers, self.include_embedding = layers, include_embedding

    def in_memory(self, lm, r_hat, alpha):
        return rosi_in_memory(lm, r_hat, alpha, self.layers, self.include_embedding)

    def write(self, reader, arch, out, r_hat, alpha, **kw):
        return write_rosi(reader, arch, out, r_hat, alpha, self.layers, self.include_embedding, **kw)

    def parameters(self) -> dict:
        return {"layers": list(self.layers) if self.layers is not None else "all",
                "include_embedding": self.include_embedding,
                "matrices": "attention and MLP output projections (every expert); biases untouched",
                "formula": "W' = W + alpha * r_hat * W.mean(dim=0)^T", "compute_dtype": "float32"}


def gate_calibration(prompts: "PromptConfig", borderline: bool = True):
    """A gate's calibration prompts: the harmful and harmless training sets, the
    harmless prompts gates must stay shut on (plus the borderline training set when
    ``borderline``: prompts that only sound dangerous must not open a gate either)
    and their manifest record.  Returns ``(harmful, harmless, shut, record)``."""
    ht, bt, _, _ = prompts.train_val()
    shut = list(bt.prompts)
    record = {"harmful_train": ht.describe(), "harmless_train": bt.describe()}
    if borderline and prompts.borderline:
        bl = prompts.train("borderline")
        shut += list(bl.prompts)
        record["borderline_train"] = bl.describe()
    return ht, bt, shut, record


class Gated(EditMethod):
    """Gated injection (surgery.edits.gated): ROSI's form with read vectors per
    matrix fitted so the injection fires on harmful inputs and stays near zero on
    harmless ones.  Rank 1 (default): ``W + alpha r_hat v^T``; rank k:
    ``W + alpha R_hat V^T`` with ``R_hat``'s first column ``r_hat`` and the rest
    from the per-prompt contrasts (needs the direction artifact, see
    ``use_direction``).  ``fit``: ``ridge`` (least harmless energy, ``post_weight``,
    ``ridge``) or ``null`` (AlphaSteer's null-space projector, ``null_ratio``)."""
    name = "gated-injection"
    # the sweep ends past the KL budget (tuning.sweep), so the strong end costs nothing once it is out of reach
    default_alphas = (1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0)

    def __init__(self, layers: Sequence[int] | None = None, post_weight: float = 10.0, ridge: float = 0.1,
                 borderline_calibration: bool = True, rank: int = 1, fit: str = "ridge", null_ratio: float = 0.5,
                 harmful_weight: float = 0.0, cascade: bool = False):
        from .edits.gated import FITS

        if rank < 1:
            raise SurgeryError(f"gated injection: rank must be at least 1, got {rank}")
        if fit not in FITS:
            raise SurgeryError(f"gated injection: fit must be one of {', '.join(FITS)}, got {fit!r}")
        if not 0.0 < null_ratio < 1.0:
            raise SurgeryError(f"gated injection: null ratio must be in (0, 1), got {null_ratio}")
        if not harmful_weight >= 0.0:
            raise SurgeryError(f"gated injection: harmful weight must be >= 0, got {harmful_weight}")
        if cascade and rank > 1:
            raise SurgeryError("gated injection: the cascade fit is rank one only")
        self.harmful_weight, self.cascade = harmful_weight, cascade
        self._calibration_prompts: tuple[list[str], list[str]] | None = None
        self._cascade_fits: dict[float, dict[str, torch.Tensor]] = {}
        self._names: list[str] | None = None
        self.layers, self.post_weight, self.ridge = layers, post_weight, ridge
        self.borderline_calibration = borderline_calibration
        self.rank, self.fit, self.null_ratio = rank, fit, null_ratio
        self.vs: dict[str, torch.Tensor] = {}
        self.basis: torch.Tensor | None = None  # (d, k) float32 for rank > 1
        self.calibration: dict = {}
        self.dirs: Directions | None = None

    def use_direction(self, dirs):
        self.dirs = dirs

    def calibrate(self, lm, prompts, say, rank: int | None = None):
        """Gate statistics of every matrix on the training split (harmful vs harmless
        + borderline) and, for rank > 1, the targets; returns ``(stats, targets)``."""
        from .edits.gated import collect_stats, prompt_contrasts, refusal_basis

        rank = self.rank if rank is None else rank
        ht, bt, harmless, self.calibration = gate_calibration(prompts, self.borderline_calibration)
        if self.cascade:
            self._calibration_prompts = (list(ht.prompts), harmless)
            say(f"read vectors will be fitted in cascade, per strength, on {len(ht)} harmful + {len(harmless)} "
                "harmless training prompts")
            return None, None
        say(f"fitting read vectors on {len(ht)} harmful + {len(harmless)} harmless training prompts")
        stats = collect_stats(lm, list(ht.prompts), harmless, per_prompt=rank > 1 or (self.fit == "ridge" and self.harmful_weight > 0))
        targets = None
        if rank > 1:
            if self.dirs is None:
                raise SurgeryError("gated injection: rank > 1 needs the direction artifact (use_direction)")
            keep, contrasts = prompt_contrasts(lm, list(ht.prompts), list(bt.prompts), self.dirs.best)
            targets = refusal_basis(self.dirs.best.vector, contrasts, rank, keep)
            say(f"rank {rank}: r_hat + {rank - 1} principal directions of {len(keep)} per-prompt contrasts "
                f"(layer {self.dirs.best.layer})")
        return stats, targets

    def prepare(self, lm, prompts, say):
        from .edits.gated import _writer_modules, fit_gates

        stats, targets = self.calibrate(lm, prompts, say)
        keep = None if self.layers is None else set(self.layers)
        names = [w.name for w in _writer_modules(lm) if keep is None or w.layer in keep]
        if self.cascade:
            self._names, self._cascade_fits, self.vs = names, {}, {}
            return
        self.vs = fit_gates(stats, self.fit, post_weight=self.post_weight, ridge=self.ridge, null_ratio=self.null_ratio,
                            harmful_weight=self.harmful_weight, targets=targets, names=names)
        self.basis = None if targets is None else targets.basis.float()

    def _cascade_vs(self, lm, r_hat, alpha) -> dict[str, torch.Tensor]:
        from .edits.gated import fit_gates_cascade

        key = float(alpha)
        if key not in self._cascade_fits:
            harmful, harmless = self._calibration_prompts
            self._cascade_fits[key] = fit_gates_cascade(
                lm, harmful, harmless, r_hat, alpha, self.fit, names=self._names, post_weight=self.post_weight,
                ridge=self.ridge, null_ratio=self.null_ratio, harmful_weight=self.harmful_weight)
        return self._cascade_fits[key]

    def finalize(self, lm, r_hat, alpha, say):
        if self.cascade:
            self.vs = self._cascade_vs(lm, r_hat, alpha)
            self._cascade_fits = {float(alpha): self.vs}

    def in_memory(self, lm, r_hat, alpha):
        from .edits.gated import gated_in_memory, gated_in_memory_k

        if self.cascade:
            return gated_in_memory(lm, r_hat, self._cascade_vs(lm, r_hat, alpha), alpha)
        if self.basis is None:
            return gated_in_memory(lm, r_hat, self.vs, alpha)
        return gated_in_memory_k(lm, self.basis, self.vs, alpha)

    def write(self, reader, arch, out, r_hat, alpha, **kw):
        from .edits.gated import gated_update, gated_update_k

        # in-memory names equal checkpoint names for the dense models this supports
        targets = {w.name: w for w in arch.residual_writers(reader.names, reader.config) if w.name in self.vs}
        if len(targets) != len(self.vs):
            missing = sorted(set(self.vs) - set(targets))
            raise SurgeryError(f"gated injection: {len(missing)} fitted matrices not found in the checkpoint, e.g. {missing[0]}")
        r = r_hat.float()

        def edit(name, tensor):
            w = targets.get(name)
            if w is None:
                return None
            if self.basis is None:
                return gated_update(w, tensor, r, self.vs[name], alpha)
            return gated_update_k(w, tensor, self.basis, self.vs[name], alpha)

        return write_edited(reader, out, edit, **kw)

    def parameters(self) -> dict:
        if self.fit == "ridge":
            formula = ("W' = W + alpha * r_hat * v^T, v = G^-1 m_h / (m_h^T G^-1 m_h) per matrix "
                       "(G: harmless input second moment, post-instruction positions weighted; m_h: harmful mean)")
            fit = {"fit": "ridge", "post_weight": self.post_weight, "ridge": self.ridge,
                   "harmful_weight": self.harmful_weight}
        else:
            formula = ("W' = W + alpha * r_hat * v^T, v = P mu / (m_h^T P mu) per matrix (P: projector onto the bottom "
                       "null_ratio * d_in eigenvectors of the harmless second moment; mu = m_h - m_b)")
            fit = {"fit": "null", "null_ratio": self.null_ratio, **({"ridge": self.ridge} if self.rank > 1 else {})}
        if self.rank > 1:
            formula = ("W' = W + alpha * R_hat V^T per matrix, R_hat = [r_hat, top principal directions of the "
                       "per-prompt contrasts without r_hat], V = [the rank-one v, ridge regressions of the per-prompt "
                       "coefficients penalised by harmless energy" + (" in the null space" if self.fit == "null" else "") +
                       "] (surgery.edits.gated)")
        if self.cascade:
            formula += ("; fitted in cascade: each matrix's v on its inputs with every earlier matrix already "
                        "edited at this alpha (surgery.edits.gated.fit_gates_cascade)")
        return {"layers": list(self.layers) if self.layers is not None else "all", "formula": formula, **fit,
                "rank": self.rank, "cascade": self.cascade, "read_vectors": "gates.safetensors",
                "borderline_calibration": self.borderline_calibration,
                "calibration": self.calibration, "compute_dtype": "float32"}

    def files(self, work: Path) -> dict[str, Path]:
        path = work / "gates.safetensors"
        tensors = {k: v.contiguous() for k, v in self.vs.items()}
        meta = {"format": "surgery.gates/1"}
        if self.basis is not None:
            # rank k: V per matrix (d_in, k) and the shared R_hat under a name no checkpoint tensor has
            tensors["refusal_basis"] = self.basis.contiguous()
            meta = {"format": "surgery.gates/2", "rank": str(self.rank)}
        save_tensors(tensors, path, meta)
        return {"gates.safetensors": path}


class Opening(EditMethod):
    """Gated opening (surgery.edits.opening), ``surgery inject``'s default gate: K
    gated neurons in the last MLP write the refusal's first K tokens on harmful
    prompts only.  The swept strength is a ``scale`` on the calibrated per-token
    strengths (1 = each opening token is the top token at its step for
    ``coverage`` of the harmful training prompts).  Needs no refusal direction."""
    name = "gated-opening"
    default_alphas = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    needs_direction = False

    def __init__(self, opening: str = OPENING_DEFAULTS["opening"], refusal: str | None = None,
                 layer: int | None = None, coverage: float = OPENING_DEFAULTS["coverage"],
                 c: float = OPENING_DEFAULTS["c"], post_weight: float = INJECT_DEFAULTS["post_weight"],
                 ridge: float = INJECT_DEFAULTS["ridge"], harmful_weight: float = INJECT_DEFAULTS["harmful_weight"],
                 borderline_calibration: bool = True, continuation: int = OPENING_DEFAULTS["continuation"]):
        from .directions import DEFAULT_REFUSAL

        if not 0.0 < coverage <= 1.0:
            raise SurgeryError(f"gated opening: coverage must be in (0, 1], got {coverage}")
        if not c > 0:
            raise SurgeryError(f"gated opening: c must be > 0, got {c}")
        if not harmful_weight >= 0.0 or not ridge > 0.0 or not post_weight >= 0.0:
            raise SurgeryError("gated opening: harmful weight and post weight must be >= 0 and ridge > 0")
        if continuation < 0:
            raise SurgeryError(f"gated opening: continuation must be >= 0 tokens, got {continuation}")
        self.continuation = continuation
        self.opening, self.refusal = opening, refusal if refusal is not None else DEFAULT_REFUSAL
        self.layer, self.coverage, self.c = layer, coverage, c
        self.post_weight, self.ridge, self.harmful_weight = post_weight, ridge, harmful_weight
        self.borderline_calibration = borderline_calibration
        self.gate = None
        self.calibration: dict = {}

    def prepare(self, lm, prompts, say):
        from .edits.opening import fit_opening_gate

        ht, _, harmless, self.calibration = gate_calibration(prompts, self.borderline_calibration)
        self.gate = fit_opening_gate(lm, list(ht.prompts), harmless, self.refusal, self.opening, layer=self.layer,
                                     c=self.c, coverage=self.coverage, post_weight=self.post_weight,
                                     harmful_weight=self.harmful_weight, ridge=self.ridge,
                                     continuation=self.continuation, say=say)

    def in_memory(self, lm, r_hat, alpha):
        from .edits.opening import opening_in_memory

        return opening_in_memory(lm, self.gate, alpha)

    def write(self, reader, arch, out, r_hat, alpha, **kw):
        from .edits.opening import MLP_WEIGHTS, opening_tensor

        # the live model's parameter names are the checkpoint's for the dense models this supports
        prefix = f"{arch.layers_module}.{self.gate.layer}.mlp"
        targets = {f"{prefix}.{k}.weight": k for k in MLP_WEIGHTS}
        missing = sorted(set(targets) - set(reader.names))
        if missing:
            raise SurgeryError(f"gated opening: {missing[0]} is not in the checkpoint")

        def edit(name, tensor):
            kind = targets.get(name)
            return None if kind is None else opening_tensor(self.gate, kind, tensor, alpha)

        return write_edited(reader, out, edit, **kw)

    def parameters(self) -> dict:
        g = self.gate
        return {"formula": ("K gated neurons in one MLP: neuron n_j gets gate row c*u, up row w_j, down column "
                            "alpha * a_j * d_j / act(c), so the layer adds act(c u.x) (w_j.x) / act(c) * alpha * a_j * d_j "
                            "(u: harm read, w_j: read of opening step j, d_j: direction raising opening token t_j, "
                            "a_j: calibrated strength; surgery.edits.opening)"),
                "layer": g.layer, "neurons": g.neurons, "opening": self.opening, "refusal": self.refusal,
                "opening_tokens": g.tokens, "strengths": [round(float(a), 4) for a in g.alphas],
                "coverage": self.coverage, "coverage_reached": [round(x, 4) for x in g.coverage], "c": g.c,
                "post_weight": self.post_weight, "ridge": self.ridge, "harmful_weight": self.harmful_weight,
                "continuation": self.continuation,
                "borderline_calibration": self.borderline_calibration, "calibration": self.calibration,
                "gate": "opening_gate.safetensors", "compute_dtype": "float32"}

    def files(self, work: Path) -> dict[str, Path]:
        from .edits.opening import gate_tensors

        path = work / "opening_gate.safetensors"
        tensors, meta = gate_tensors(self.gate)
        save_tensors(tensors, path, meta)
        return {"opening_gate.safetensors": path}


def harden(source: str, out: str | Path, method: EditMethod, *, alpha: float | None = None,
           alphas: Sequence[float] | None = None, direction_file: str | Path | None = None,
           sources: Sequence[str] = ("response",), rank_by: str = "selectivity", prompts: PromptConfig | None = None,
           max_over_refusal: float = 0.15, max_kl: float = 0.3, refusal_tolerance: float = REFUSAL_TOLERANCE,
           run_eval: bool = True, eval_tokens: int = 48,
           overwrite: bool = False, revision: str | None = None, allow_pickle: bool = False, device: str | None = None,
           max_shard_bytes: int = 5_000_000_000, say: Say | None = None) -> HardenResult:
    """Direction -> method-specific measurement -> strength sweep -> streamed write
    with manifest -> before/after evaluation.  Everything checkable is checked
    before the model is loaded."""
    say = _say(say)
    out = Path(out)
    prompts = prompts or PromptConfig()
    CheckpointWriter.check_target(out, overwrite, [source, direction_file, *prompts.sources()],
                                  max_shard_bytes=max_shard_bytes)
    if alpha is not None and alphas is not None:
        raise SurgeryError("give --alpha (a fixed strength) or --alphas (strengths to sweep), not both")
    alphas = method.default_alphas if alphas is None else alphas
    if alpha is not None and not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise SurgeryError(f"{method.name}: --alpha {alpha!r} must be a finite number > 0 (0 leaves the model "
                           "unchanged, a negative one pushes away from refusal)")
    for a in alphas or []:
        if not (isinstance(a, (int, float)) and math.isfinite(a) and a >= 0):
            raise SurgeryError(f"{method.name}: strength {a!r} must be a finite number >= 0 "
                               "(a negative one pushes away from refusal)")
    if direction_file and not method.needs_direction:
        raise SurgeryError(f"{method.name} does not use a refusal direction; drop --direction")
    if not method.needs_direction and tuple(sources) != ("response",):
        raise SurgeryError(f"{method.name} does not use a refusal direction; drop --source")
    resolved, reader, arch = open_model(source, revision, allow_pickle, say)
    with reader:
        d = arch.hidden_size(reader.config)
        check_layers(getattr(method, "layers", None), arch.num_layers(reader.config), "--layers")
        if isinstance(method, Opening) and method.layer is not None:
            check_layers([method.layer], arch.num_layers(reader.config), "--opening-layer")
        dirs = Directions.load(direction_file) if direction_file else None
        if dirs is not None:
            dirs.check_width(d, f"model {source}")
            unit(dirs.best.vector)  # a zero or non-finite direction is refused before the model is loaded
        ht, bt, hv, bv = prompts.train_val()  # validates prompt sources before loading the model
        if run_eval:
            test_sets(prompts)  # the evaluation's sets too: a bad one must not fail after the write
        lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
        if run_eval or alpha is None or dirs is None or method.calibrates:  # prompts will be formatted
            format_chat(lm.tokenizer, "Hello")  # no chat template: refused now, not after the write
        # artifacts (direction, gates) are made here, then copied into the checkpoint's own temporary folder
        with tempfile.TemporaryDirectory(prefix="surgery-") as work:
            tmp_dir = Path(work)
            if dirs is None and method.needs_direction:
                dirs = compute_directions(lm, prompts, sources, rank_by, say)
            dir_path = dirs.save(tmp_dir / "direction.safetensors") if dirs is not None else None
            r_hat = unit(dirs.best.vector) if dirs is not None else None
            if dirs is not None:
                method.use_direction(dirs)
            method.prepare(lm, prompts, say)
            points: list[dict] = []
            if alpha is None:
                blv = prompts.val("borderline") if prompts.borderline else None
                say(f"alpha sweep on the validation split ({len(hv)} harmful, {len(bv)} harmless"
                    f"{f', {len(blv)} borderline' if blv else ''}): {list(alphas)}; it ends past KL {max_kl}")
                values = [0.0] + [a for a in alphas if a != 0]  # the unedited model is the sweep's first row
                # judged on replies as long as the final evaluation's, so the budgets mean the same thing
                points = tuning.sweep(lm, lambda a: method.in_memory(lm, r_hat, a), values, list(hv.prompts),
                                      list(bv.prompts), max_new_tokens=eval_tokens, stop_kl=max_kl,
                                      borderline=list(blv.prompts) if blv else None, progress=lambda p: say(
                                          f"  alpha {p['value']:g}: harmful {p['harmful_refusal']:.0%}, "
                                          f"harmless {p['harmless_refusal']:.0%}"
                                          + (f", borderline {p['borderline_refusal']:.0%}" if 'borderline_refusal' in p
                                             else "") + f", KL {p['kl']:.3f}"))
                best, why = tuning.choose(points, max_over_refusal, max_kl, refusal_tolerance)
                alpha = best["value"]
                say(f"alpha = {alpha:g}: {why}")
                if alpha == 0:  # the unedited model's row: writing it would label an unchanged model hardened
                    raise SurgeryError(
                        f"the sweep kept alpha 0, the unedited model (no strength of {list(alphas)} refused more harmful "
                        f"validation prompts within over-refusal <= {max_over_refusal:.0%} and KL <= {max_kl}); nothing "
                        "written: try other --alphas, looser budgets, or give --alpha")
            else:
                why = "given"
            method.finalize(lm, r_hat, alpha, say)
            params = {"alpha": alpha, "alpha_choice": why, **method.parameters(), "max_over_refusal": max_over_refusal,
                      "max_kl": max_kl, "refusal_tolerance": refusal_tolerance, "sweep": points}
            datasets = dict(dirs.meta.get("datasets", {})) if dirs is not None else {}
            for k, v in (getattr(method, "calibration", None) or {}).items():  # a gate's own calibration sets
                datasets.setdefault(k, v)
            if points:
                datasets.update({"sweep_harmful_val": hv.describe(), "sweep_harmless_val": bv.describe()})
                if blv:
                    datasets["sweep_borderline_val"] = blv.describe()
            manifest = build_manifest(input_info=input_info(resolved, reader), method=method.name, parameters=params,
                                      datasets=datasets,
                                      direction=direction_record(dir_path, dirs) if dirs is not None else None)
            files = ({"direction.safetensors": dir_path, "direction.safetensors.json": Path(str(dir_path) + ".json")}
                     if dirs is not None else {})
            files.update(method.files(tmp_dir))
            evaluation = CommittedEvaluation(lm, prompts, eval_tokens, device, say) if run_eval else None
            method.write(reader, arch, out, r_hat, alpha, overwrite=overwrite, files=files, manifest=manifest,
                         max_shard_bytes=max_shard_bytes, say=say, evaluate=evaluation)
        result = HardenResult(out, alpha, manifest["direction"], points)
        if evaluation is not None:
            result.evaluation = evaluation.report
            say(evaluation_text(result.evaluation))
        return result


def rosi(source: str, out: str | Path, *, layers: Sequence[int] | None = None, include_embedding: bool = False,
         alphas: Sequence[float] | None = None, **kw) -> HardenResult:
    """ROSI (methods.md §2) through :func:`harden`."""
    return harden(source, out, Rosi(layers, include_embedding), alphas=alphas, **kw)


def _flag(name: str) -> str:
    """A parameter as the CLI spells it (``opening_layer`` -> ``--opening-layer``)."""
    return {"cascade": "--cascade/--no-cascade"}.get(name, "--" + name.replace("_", "-"))


def inject(source: str, out: str | Path, *, gate: str = OPENING_DEFAULTS["gate"],
           layers: Sequence[int] | None = None,
           post_weight: float = INJECT_DEFAULTS["post_weight"], ridge: float = INJECT_DEFAULTS["ridge"],
           borderline_calibration: bool = True, rank: int = 1, fit: str = "ridge", null_ratio: float = 0.5,
           harmful_weight: float = INJECT_DEFAULTS["harmful_weight"], cascade: bool | None = None,
           opening: str = OPENING_DEFAULTS["opening"], refusal: str | None = None, opening_layer: int | None = None,
           coverage: float = OPENING_DEFAULTS["coverage"], c: float = OPENING_DEFAULTS["c"],
           continuation: int = OPENING_DEFAULTS["continuation"], **kw) -> HardenResult:
    """Gated injection through :func:`harden`.  ``gate="opening"`` (the default):
    gated neurons writing the refusal's opening (:class:`Opening`); ``"linear"``:
    rank-one (or rank-k) read vectors per residual writer (:class:`Gated`;
    ``cascade`` None means the default for the rank, on for rank one)."""
    if gate == "opening":
        if not opening.strip():
            raise SurgeryError("gated injection: --opening is empty; give the refusal's first words, e.g. \"I'm sorry, but\"")
        linear_only = [n for n, set_ in (("layers", layers is not None), ("rank", rank != 1), ("fit", fit != "ridge"),
                                         ("null_ratio", null_ratio != 0.5), ("cascade", cascade is not None)) if set_]
        if linear_only:
            raise SurgeryError(f"gated injection: {', '.join(_flag(n) for n in linear_only)} "
                               f"{'applies' if len(linear_only) == 1 else 'apply'} only to --gate linear")
        return harden(source, out, Opening(opening, refusal, opening_layer, coverage, c, post_weight, ridge,
                                           harmful_weight, borderline_calibration, continuation), **kw)
    if gate != "linear":
        raise SurgeryError(f"gated injection: gate must be opening or linear, got {gate!r}")
    opening_only = [n for n, set_ in (("opening", opening != OPENING_DEFAULTS["opening"]), ("refusal", refusal is not None),
                                      ("opening_layer", opening_layer is not None),
                                      ("coverage", coverage != OPENING_DEFAULTS["coverage"]),
                                      ("c", c != OPENING_DEFAULTS["c"]),
                                      ("continuation", continuation != OPENING_DEFAULTS["continuation"])) if set_]
    if opening_only:
        raise SurgeryError(f"gated injection: {', '.join(_flag(n) for n in opening_only)} "
                           f"{'applies' if len(opening_only) == 1 else 'apply'} only to the opening gate (--gate opening)")
    if cascade is None:
        cascade = INJECT_DEFAULTS["cascade"] and rank == 1
    return harden(source, out, Gated(layers, post_weight, ridge, borderline_calibration, rank, fit, null_ratio,
                                     harmful_weight, cascade), **kw)


def test_sets(prompts: PromptConfig, whole_user_files: bool = False) -> dict[str, PromptSet]:
    """The held-out sets: the built-in sets' test split; for user sources their
    hash-split test part, or the whole source with ``whole_user_files`` (what
    ``surgery eval`` does: a file given only for evaluation is used entirely, and
    a built-in source that names its split, ``builtin:harmful:val``, gets it)."""
    names = ["harmful", "harmless"] + (["borderline"] if prompts.borderline else [])
    sets = {}
    for name in names:
        src = getattr(prompts, name)
        if whole_user_files and (not src.startswith("builtin:") or builtin_split(src) is not None):
            # --column is for user files: a built-in set has only its prompts (as for TXT files)
            sets[name] = load_prompts(src, column=None if src.startswith("builtin:") else prompts.column)
        else:
            sets[name] = prompts.load(name, "test")
    return sets


def evaluate_models(base: LoadedModel, patched: LoadedModel, prompts: PromptConfig | None = None,
                    max_new_tokens: int = 48, say: Say | None = None) -> dict:
    """Before/after evaluation on the held-out test split (:func:`evaluation_text` prints it)."""
    say = _say(say)
    prompts = prompts or PromptConfig()
    sets = test_sets(prompts)
    say("evaluating on the test split: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    cache: dict = {}
    before = evaluate(base, sets, reference=base, max_new_tokens=max_new_tokens, reference_cache=cache)
    after = evaluate(patched, sets, reference=base, max_new_tokens=max_new_tokens, reference_cache=cache)
    table = format_table({"original": summary_row(before), "patched": summary_row(after)})
    return {"before": before, "after": after, "table": table}


def evaluation_text(evaluation: dict) -> str:
    """The before/after table and its intervals, as the commands print them last."""
    return "\n" + evaluation["table"] + "\n" + format_intervals({"original": evaluation["before"],
                                                                 "patched": evaluation["after"]})


class CommittedEvaluation:
    """``write_edited``'s ``evaluate``: the before/after evaluation of the written
    checkpoint, loaded from the temporary folder before it is committed; ``report``
    holds the result for the caller."""

    def __init__(self, base: LoadedModel | Callable[[], LoadedModel], prompts: PromptConfig | None,
                 max_new_tokens: int, device: str | None, say: Say | None):
        self.base, self.prompts, self.max_new_tokens, self.device, self.say = base, prompts, max_new_tokens, device, say
        self.report: dict | None = None

    def __call__(self, folder: Path) -> dict:
        base = self.base if isinstance(self.base, LoadedModel) else self.base()
        patched = load_model(folder, device=self.device)
        self.report = evaluate_models(base, patched, self.prompts, self.max_new_tokens, self.say)
        return self.report


# ----------------------------------------------------------------------------- Safe-LoRA (methods.md §3)
@dataclass
class SafeLoraResult:
    """What :func:`safe_lora` produced: the table rows (``ModuleRow``) and the projected modules."""
    out: Path
    rows: list
    projected: list[str]
    subspace: str  # "base" | "directions"
    update: str  # "adapter" | "finetuned"
    emitted_adapter: bool = False


def _out_in(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.T if layout in ("in_out", "rows") else t


def _weight(reader: CheckpointReader, arch, name: str, shape_only: bool = False):
    """Tensor ``name`` of ``reader`` (a tied model's lm_head is its embedding); None if absent."""
    if name not in reader and name in arch.lm_head_names and arch.tied(reader.config):
        name = arch.find_embedding(reader.names) or name
    if name not in reader:
        return None
    return tuple(reader.shape(name)) if shape_only else reader.get(name)


_MATRIX_LAYOUTS = ("out_in", "in_out", "rows")  # weight matrices Safe-LoRA can project


def _same_architecture(a: CheckpointReader, arch_a, b: CheckpointReader, arch_b, a_what: str, b_what: str) -> None:
    """Refuse model ``b`` unless its model_type, layer count and width are ``a``'s."""
    def key(r, arch):
        return {"model_type": arch.model_type, "layers": arch.num_layers(r.config), "width": arch.hidden_size(r.config)}

    ka, kb = key(a, arch_a), key(b, arch_b)
    diff = [f"{k} {ka[k]} vs {kb[k]}" for k in ka if ka[k] != kb[k]]
    if diff:
        raise SurgeryError(f"the {b_what} model in {b.folder} does not have the {a_what} model's architecture: "
                           f"{', '.join(diff)} ({a_what} vs {b_what})")


def _same_shape(a: CheckpointReader, arch_a, b: CheckpointReader, arch_b, name: str, a_what: str, b_what: str) -> None:
    sa, sb = _weight(a, arch_a, name, True), _weight(b, arch_b, name, True)
    if sb is None:
        raise SurgeryError(f"the {b_what} model in {b.folder} has no tensor {name}")
    if sa != sb:
        raise SurgeryError(f"tensor {name}: shape {sa} in the {a_what} model but {sb} in the {b_what} model ({b.folder})")


def safe_lora(aligned: str, out: str | Path, *, base: str | None = None, directions: str | Path | None = None,
              adapter=None, finetuned: str | None = None, projector: str = "fast", energy: float = 0.99,
              threshold: float | None = 0.5, top_k: int | None = None, emit_adapter: bool = False,
              direction_span: str = "best", overwrite: bool = False, revision: str | None = None,
              allow_pickle: bool = False, max_shard_bytes: int = 5_000_000_000, say: Say | None = None) -> SafeLoraResult:
    """Safe-LoRA (surgery.edits.safe_lora): measure every target module's cosine
    against the alignment subspace (``base`` model, or refusal ``directions``),
    project the poorly aligned updates (``adapter``, or ``finetuned`` - aligned),
    then merge into the aligned model by streaming (or, with ``emit_adapter``,
    write the projected adapter).  Everything is checked before the first tensor
    is read; the per-module table is printed, saved as ``safe_lora.json`` and put
    in the manifest."""
    import contextlib
    import json

    from .adapters.peft import LoraAdapter, load_adapter, merge_edit, save_peft_adapter
    from .edits import safe_lora as sl

    say = _say(say)
    out = Path(out)
    if (base is None) == (directions is None):
        raise SurgeryError("safe-lora needs exactly one alignment subspace: a base model (--base) or refusal directions (--directions)")
    if (adapter is None) == (finetuned is None):
        raise SurgeryError("safe-lora needs exactly one update: a LoRA adapter (--adapter) or a fine-tuned model (--finetuned)")
    if emit_adapter and adapter is None:
        raise SurgeryError("--emit-adapter needs --adapter (a fine-tuned model has no low-rank form to emit)")
    if projector not in sl.PROJECTORS:
        raise SurgeryError(f"projector must be one of {', '.join(sl.PROJECTORS)}, got {projector!r}")
    if not 0.0 < energy <= 1.0:
        raise SurgeryError(f"energy must be in (0, 1], got {energy}")
    if top_k is not None and top_k < 1:
        raise SurgeryError(f"top-k must be at least 1, got {top_k}")
    if direction_span not in ("best", "all"):
        raise SurgeryError(f"direction span must be 'best' or 'all', got {direction_span!r}")
    threshold = None if top_k is not None else (sl.DEFAULT_THRESHOLD if threshold is None else float(threshold))
    CheckpointWriter.check_target(out, overwrite, [aligned, base, directions, adapter, finetuned],
                                  max_shard_bytes=max_shard_bytes)

    with contextlib.ExitStack() as stack:
        res_al, r_al, arch = open_model(aligned, revision, allow_pickle, say)
        stack.callback(r_al.close)
        infos = arch.place(r_al.names, r_al.config)
        extra: dict = {}
        r_base = dirs = dir_proj = None
        if base is not None:
            res_b, r_base, arch_b = open_model(base, None, allow_pickle, say)
            stack.callback(r_base.close)
            _same_architecture(r_al, arch, r_base, arch_b, "aligned", "base")
            extra["base"] = input_info(res_b, r_base)
        else:
            dirs = Directions.load(directions)
            dirs.check_width(arch.hidden_size(r_al.config), f"aligned model {aligned}")
            vecs = [dirs.best.vector] if direction_span == "best" else [c.vector for c in dirs.candidates]
            dir_proj = sl.Projector(sl.direction_matrix(vecs), projector, energy)
            say(f"alignment subspace: {len(vecs)} refusal direction(s) from {directions}")

        # targets: (row name, model tensor, layout, key): key None for a LoRA module (dW = s B A), else the
        # whole tensor that replaces the model's (adapter key; the fine-tuned tensor itself): dW = it - W_aligned
        if adapter is not None:
            ad = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter, None, allow_pickle)
            plan = ad.check_against(r_al)
            for n in plan.notes:
                say(n)
            targets = [(m, t, plan.layouts[t], None) for t, m in plan.deltas.items()]
            targets += [(t, t, plan.layouts[t], key) for t, key in plan.replacements.items()]
            extra["adapter"] = ad.describe()
            r_ft = None
        else:
            res_ft, r_ft, arch_ft = open_model(finetuned, None, allow_pickle, say)
            stack.callback(r_ft.close)
            extra["finetuned"] = input_info(res_ft, r_ft)
            targets = [(n, n, i.layout, n) for n, i in arch_ft.place(r_ft.names, r_ft.config).items()]
            for _, t, _, _ in targets:
                _same_shape(r_ft, arch_ft, r_al, arch, t, "fine-tuned", "aligned")
        if r_base is not None:
            for _, t, _, _ in targets:
                _same_shape(r_al, arch, r_base, arch_b, t, "aligned", "base")

        def projectable(t: str, layout: str, ndim: int) -> bool:
            """Whether the subspace can project an update of ``t``: a weight matrix, whose output is the
            residual stream when the subspace is spanned by refusal directions."""
            info = infos.get(t)
            return ndim == 2 and layout in _MATRIX_LAYOUTS and (
                dir_proj is None or (info is not None and info.writes_residual))

        if adapter is not None and not any(projectable(t, lay, 2 if k is None else len(_weight(r_al, arch, t, True)))
                                           for _, t, lay, k in targets):
            raise SurgeryError(f"safe-lora: the update has no module to project: the adapter changes only "
                               f"{', '.join(t for _, t, _, _ in targets[:8])}, which the "
                               f"{'base model' if dir_proj is None else 'refusal-direction'} subspace cannot project")

        def projector_for(t: str, layout: str, w_al: torch.Tensor):
            """The projector of a projectable tensor ``t`` (``w_al``: its aligned weight as (out, in)); None
            where V = W_aligned - W_base is zero (alignment did not touch ``t``: nothing to project onto)."""
            if dir_proj is not None:
                return dir_proj
            v = w_al - _out_in(_weight(r_base, arch_b, t), layout).float()
            return sl.Projector(v, projector, energy) if bool(v.any()) else None

        def aligned_out_in(t: str, layout: str) -> torch.Tensor:
            return _out_in(_weight(r_al, arch, t), layout).float()

        def projected_whole(t: str, layout: str, cur: torch.Tensor) -> torch.Tensor:
            """``cur`` (stored layout) with its update projected: W_aligned + P (cur - W_aligned), in cur's dtype."""
            w_al = aligned_out_in(t, layout)
            new = w_al + projector_for(t, layout, w_al).apply(_out_in(cur, layout).float() - w_al)
            return _out_in(new, layout).contiguous().to(cur.dtype)

        say(f"measuring {len(targets)} tensors ({projector} projector)")
        rows, new_B = [], {}
        for m, t, layout, key in targets:
            if key is None:
                lm = ad.modules[m]
                ndim = 2
            else:
                cur = ad.read(key) if r_ft is None else r_ft.get(t)
                diff = cur.float() - _weight(r_al, arch, t).float()
                ndim = cur.dim()
                if not bool(diff.any()):
                    if r_ft is None:  # a replacement equal to the model's tensor: listed, nothing to do
                        rows.append(sl.ModuleRow(m, t, float("nan")))
                    continue  # unchanged by the fine-tuning: not part of the update
            def kept(why: str) -> None:
                """A row for an update kept as is (its real norm, before = after)."""
                nb = (sl.lora_cosine(lm.A, lm.B, lm.B, lm.scaling)[1] if key is None
                      else float(torch.linalg.vector_norm(diff, dtype=torch.float64)))
                rows.append(sl.ModuleRow(m, t, None, norm_before=nb, norm_after=nb, note=why))

            if not projectable(t, layout, ndim):
                kept("output is not the residual stream: kept" if ndim == 2 and layout in _MATRIX_LAYOUTS
                     else "not a weight matrix: kept" if ndim != 2 else f"layout '{layout}' is not a known matrix: kept")
                continue
            w_al = aligned_out_in(t, layout) if dir_proj is None or key is not None else None
            P = projector_for(t, layout, w_al)
            if P is None:  # the base equals the aligned model here: kept, like the other unprojectable rows
                kept("V = W_aligned - W_base is zero here (the base equals the aligned model): kept")
                continue
            if key is None:
                new_B[m] = P.apply(lm.B)
                cos, nb, npj = sl.lora_cosine(lm.A, lm.B, new_B[m], lm.scaling)
            else:
                dw = _out_in(diff, layout)
                cos, nb, npj = sl.cosine(P.apply(dw), dw)
            rows.append(sl.ModuleRow(m, t, cos, norm_before=nb, norm_after=nb, norm_projected=npj, rank=P.rank))
            del P, w_al
        if not any(r.cosine is not None and not math.isnan(r.cosine) for r in rows):
            what = ("the fine-tuned model equals the aligned model" if not rows else
                    "it changes only " + ", ".join(r.tensor for r in rows[:8]) + (" ..." if len(rows) > 8 else ""))
            if rows and all((r.note or "").startswith("V = W_aligned") for r in rows if r.cosine is None):
                what += f"; the base model {base} equals the aligned model on every one of them"
            raise SurgeryError(f"safe-lora: the update has no module to project ({what}; see --help)")
        projected = sl.select(rows, threshold, top_k)
        say(sl.format_table(rows))
        n_mod = sum(r.cosine is not None and not math.isnan(r.cosine) for r in rows)
        say(f"projected {len(projected)} of {n_mod} modules")
        kept = [r.tensor for r in rows if r.cosine is None]
        if kept:
            say(f"warning: {len(kept)} changed tensor(s) kept as is, unprojected (Safe-LoRA cannot project them onto "
                f"this subspace; see the table): {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}")

        selection = {"top_k": top_k} if top_k is not None else {"threshold": threshold, "rule": "cos <= threshold"}
        subspace = "base" if base is not None else "directions"
        params = {"subspace": "base model: V = W_aligned - W_base" if base is not None else
                  f"refusal directions ({direction_span}): V = unit direction(s) as columns, output (residual) space",
                  "update": "adapter" if adapter is not None else "finetuned: dW = W_finetuned - W_aligned",
                  "projector": projector, "formula": ("C X = V (V^T X) / ||V||_F" if projector == "fast" else
                                                      "P X = U_k (U_k^T X), k: energy of sum sigma^2"),
                  "energy": energy if projector == "exact" else None, "selection": selection,
                  "projected": projected, "compute_dtype": "float32"}
        report = {"subspace": subspace, "update": params["update"], "projector": projector, "selection": selection,
                  "rows": [r.to_dict() for r in rows]}
        extra["safe_lora"] = report
        manifest = build_manifest(input_info=input_info(res_al, r_al), method="safe-lora", parameters=params,
                                  direction=direction_record(Path(directions), dirs) if dirs is not None else None,
                                  extra=extra)
        files = {"safe_lora.json": (json.dumps(report, indent=2) + "\n").encode()}

        if r_ft is None:
            whole = {r.tensor: r for r in rows if r.projected and r.module not in new_B}
            pad = ad.with_modules({m: ad.modules[m].with_B(new_B[m]) for m in projected if m in new_B},
                                  {plan.replacements[t]: projected_whole(t, plan.layouts[t], ad.read(plan.replacements[t]))
                                   for t in whole})
            if emit_adapter:
                cfg = ad.config
                manifest["edited"] = {"count": len(projected), "modules": projected}
                save_peft_adapter(out, pad.modules, use_rslora=bool(cfg.get("use_rslora")),
                                  fan_in_fan_out=bool(cfg.get("fan_in_fan_out")), target_modules=cfg.get("target_modules"),
                                  base_model_name_or_path=cfg.get("base_model_name_or_path") or aligned,
                                  modules_to_save=cfg.get("modules_to_save"), bias=cfg.get("bias") or "none",
                                  extra_tensors={k: pad.read(k) for k in pad.replacements.values()},
                                  files=files, manifest=manifest, overwrite=overwrite)
                say(f"wrote the projected adapter {out}")
            else:
                plan = pad.check_against(r_al)
                edit, more = merge_edit(r_al, pad, plan)
                write_edited(r_al, out, edit, overwrite=overwrite, extra=more, config_updates=plan.config_updates,
                             extra_edited=plan.new_edited,
                             files=files, manifest=manifest, max_shard_bytes=max_shard_bytes, say=say)
        else:
            chosen = {r.tensor for r in rows if r.projected}
            layouts = {t: layout for _, t, layout, _ in targets}

            def edit(name, tensor):
                return projected_whole(name, layouts[name], tensor) if name in chosen else None

            write_edited(r_ft, out, edit, overwrite=overwrite, files=files, manifest=manifest,
                         max_shard_bytes=max_shard_bytes, say=say)
    return SafeLoraResult(out, rows, projected, subspace, "adapter" if adapter is not None else "finetuned",
                          emit_adapter)
