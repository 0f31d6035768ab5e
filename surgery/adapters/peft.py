"""PEFT LoRA adapters in their own on-disk format: read, check against a model,
merge by streaming, write.

Format (what ``PeftModel.save_pretrained`` writes)
---------------------------------------------------
``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``fan_in_fan_out``,
``target_modules``, ``modules_to_save``, ...) and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` (r, in) /
``.lora_B.weight`` (out, r), ``<module>.lora_embedding_A`` (r, vocab) /
``.lora_embedding_B`` (d, r) for embeddings, and whole tensors that replace the
model's (``modules_to_save`` such as ``lm_head.weight``, biases trained with
``bias="all"`` saved as ``<module>.base_layer.bias``, the embedding PEFT saves
next to an embedding LoRA).

Design
------
* :func:`load_adapter` reads a folder or a Hub id (pinned revision, downloaded
  with ``snapshot_download`` as :mod:`surgery.checkpoint.resolve` does).  A and B
  are kept in memory as float32 (they are small); whole replacement tensors are
  read lazily, one at a time, when the merge needs them.
* Per-module rank and alpha follow PEFT exactly: a ``rank_pattern`` /
  ``alpha_pattern`` key applies to a module when ``re.match(rf"(.*\\.)?({key})$",
  module)`` (``peft.utils.other.get_pattern_key``; the first matching key wins),
  and the scaling is ``alpha / r`` or ``alpha / sqrt(r)`` with ``use_rslora``.
  The rank stored in the tensors must equal the configured rank (PEFT would fail
  to load it otherwise).
* Only plain LoRA, whose merge is ``W + s * B A``, is accepted.  DoRA, every other
  LoRA variant (aLoRA, KaSA, BD-LoRA, ...), ``lora_bias``, ``target_parameters``,
  ``layer_replication``, trainable tokens, initialisations that change the base
  weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) and unknown ``lora_*`` tensors are
  refused with one line naming the field or key.
* :meth:`LoraAdapter.check_against` maps every module ``X`` to the model tensor
  ``X.weight`` (else, for checkpoints saved without the top-level prefix, e.g.
  gpt2 on the Hub, with the first name component dropped, else under another
  spelling the architecture data lists: gemma3's in-memory
  ``model.language_model.*`` is stored as ``language_model.model.*``) and checks shapes --
  before any work.  As PEFT does at load time, the stored orientation comes from
  the tensor itself: a GPT-2 ``Conv1D`` (layout ``in_out``) is always merged
  transposed, an ``nn.Linear`` never, whatever ``fan_in_fan_out`` says.
* Tied embeddings are never edited silently (docs/architecture.md): when the
  adapter touches the embedding or the tied ``lm_head``, the output is untied
  (``tie_word_embeddings: false``) and ``lm_head.weight`` is written explicitly
  (the original embedding, or the adapter's own lm_head).  PEFT's own
  ``merge_and_unload`` edits the shared tensor instead.
* :func:`merge_adapter` streams the model through
  :func:`surgery.pipeline.write_edited` (float32 arithmetic, stored dtype kept,
  untouched tensors byte-identical, manifest method ``lora-merge``).
* :func:`save_peft_adapter` writes an adapter PEFT loads, atomically (temporary
  sibling folder + rename).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..checkpoint.files import read_json_object
from ..errors import CheckpointError, SurgeryError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

_PARTS = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
          ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
# segments PEFT puts inside a wrapped module's name; the model tensor is the name without them
_WRAPPER_SEGMENTS = (".base_layer", ".modules_to_save.default", ".modules_to_save")
# config fields whose presence means the merge is not W + s * B A (or needs another base)
_VARIANT_FIELDS = ("alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config", "use_bdlora",
                   "velora_config", "lora_ga_config", "layer_replication", "target_parameters",
                   "trainable_token_indices")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


class AdapterError(SurgeryError):
    """An adapter cannot be read, is not plain LoRA, or does not fit the model."""


def pattern_key(keys, module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching ``module`` as a suffix
    at a name boundary (keys are regular expressions), or None."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraModule:
    """One adapted module: ``delta = scaling * B @ A`` in (out, in) orientation."""
    name: str  # module path in the model, e.g. model.layers.0.mlp.down_proj
    A: torch.Tensor  # (r, in) float32
    B: torch.Tensor  # (out, r) float32
    r: int
    alpha: float
    scaling: float
    kind: str = "linear"  # "linear" or "embedding" (lora_embedding_A/B; stored as (vocab, d))
    fan_in_fan_out: bool = False  # stored weight is (in, out): GPT-2 Conv1D
    tensor: str | None = None  # the model tensor it updates (set by check_against)

    @property
    def transposed(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def stored_shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.transposed else (out, inp)

    def delta_out_in(self) -> torch.Tensor:
        """``scaling * B @ A``, (out, in), float32."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update in the stored layout of the weight (what is added to it)."""
        d = self.delta_out_in()
        return d.t().contiguous() if self.transposed else d

    def added_to(self, w: torch.Tensor) -> torch.Tensor:
        """``w + delta()`` for a float32 ``w`` in the stored layout, in one allocation."""
        A, B = self.A.float(), self.B.float()
        if self.transposed:
            return torch.addmm(w, A.T, B.T, alpha=self.scaling)
        return torch.addmm(w, B, A, alpha=self.scaling)

    def with_B(self, B: torch.Tensor) -> "LoraModule":
        return replace(self, B=B.to(torch.float32).contiguous())


@dataclass
class MergePlan:
    """What a merge does to a model, from :meth:`LoraAdapter.check_against`."""
    deltas: dict[str, str]  # model tensor -> module name
    replacements: dict[str, str]  # model tensor -> adapter key of the whole tensor that replaces it
    layouts: dict[str, str]  # model tensor -> architecture layout
    virtual: dict[str, str] = field(default_factory=dict)  # untied lm_head written anew -> tensor it starts from
    config_updates: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def new_edited(self) -> list[str]:
        """Tensors written anew (untied lm_head) that carry the adapter's update."""
        return [t for t in self.virtual if t in self.deltas or t in self.replacements]

    def source_tensor(self, tensor: str) -> str:
        """The model tensor holding the current value of ``tensor`` (the embedding for a tied lm_head)."""
        return self.virtual.get(tensor, tensor)


class LoraAdapter:
    """A plain PEFT LoRA adapter (see module docstring); use :func:`load_adapter`."""

    def __init__(self, config: dict, modules: dict[str, LoraModule], replacements: dict[str, str], *,
                 weights: Path, source: str, kind: str = "folder", revision: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, overrides: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.modules = modules
        self.replacements = replacements  # model tensor name -> adapter key (full key in the weights file)
        self.weights = weights
        self.source, self.kind, self.revision = source, kind, revision
        self._tensors = tensors  # pickled adapters: everything already in memory
        self._overrides = dict(overrides or {})  # whole tensors replaced in memory (e.g. projected by Safe-LoRA)

    # -- reading ---------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.weights.parent

    def read(self, key: str) -> torch.Tensor:
        """One tensor of the weights file by its full key (e.g. a whole replacement tensor)."""
        if key in self._overrides:
            return self._overrides[key].clone()
        if self._tensors is not None:
            return self._tensors[key].clone()
        from safetensors import safe_open

        with safe_open(str(self.weights), framework="pt") as f:
            return f.get_tensor(key)

    def delta(self, module: str | LoraModule) -> torch.Tensor:
        """``scaling * B @ A`` in the stored layout of the module's weight: (out, in),
        transposed to (in, out) for ``fan_in_fan_out`` (Conv1D) and to (vocab, d)
        for an embedding.  float32."""
        m = module if isinstance(module, LoraModule) else self.modules[module]
        return m.delta()

    def with_modules(self, modules: Mapping[str, LoraModule],
                     tensors: Mapping[str, torch.Tensor] | None = None) -> "LoraAdapter":
        """The same adapter with some modules replaced, and some whole tensors (by full
        key) given new values (e.g. projected by Safe-LoRA)."""
        new = dict(self.modules)
        new.update(modules)
        return LoraAdapter(self.config, new, dict(self.replacements), weights=self.weights, source=self.source,
                           kind=self.kind, revision=self.revision, tensors=self._tensors,
                           overrides={**self._overrides, **(tensors or {})})

    # -- checking against a model ------------------------------------------------
    def check_against(self, reader) -> MergePlan:
        """Map every module and replacement to a tensor of ``reader``'s model and check
        shapes; binds each module to its tensor.  Raises AdapterError naming the first
        module that does not fit (unknown module, wrong shape).  Run before any work."""
        from ..architectures import get_architecture

        arch = get_architecture(reader.config, reader.names)
        names = list(reader.names)
        present = set(names)
        infos = arch.place(names, reader.config)
        emb = arch.find_embedding(names)
        tied_cfg = arch.tied(reader.config)
        lm_head = arch.find_lm_head(names) or arch.lm_head_names[0]
        tied = tied_cfg and lm_head not in present  # lm_head exists only as the embedding
        where = reader.folder

        def shape_of(t: str) -> tuple[int, ...]:
            return tuple(reader.shape(emb if t == lm_head and t not in present else t))

        def resolve(base: str, what: str) -> str:
            # PEFT names modules as the in-memory model does: the stored name may lack the top-level
            # prefix (gpt2 on the Hub) or be another spelling the architecture data lists (gemma3)
            cands = (base, base.split(".", 1)[1] if "." in base else None, *arch.spellings(base))
            for cand in cands:
                if cand and cand in present:
                    return cand
            if tied and emb is not None and lm_head in cands:
                return lm_head  # tied: written anew below
            raise AdapterError(f"adapter {what}: the model in {where} has no tensor {base} (adapter for another model?)")

        deltas, layouts, repl = {}, {}, {}
        notes: list[str] = []
        cfg_fifo = bool(self.config.get("fan_in_fan_out", False))
        for mname, m in self.modules.items():
            t = resolve(f"{mname}.weight", f"module {mname}")
            layout = infos[t].layout if t in infos else "out_in"
            if m.kind == "linear" and layout in ("out_in", "in_out"):
                m.fan_in_fan_out = layout == "in_out"  # PEFT decides by the module type, not the config
                if m.fan_in_fan_out != cfg_fifo and not any("fan_in_fan_out" in n for n in notes):
                    notes.append(f"note: fan_in_fan_out={cfg_fifo} in {CONFIG_FILE} is overridden by the layout of "
                                 f"{t} ({layout}), as PEFT does")
            if m.stored_shape != shape_of(t):
                raise AdapterError(f"adapter module {mname}: its update has shape {m.stored_shape} but {t} in {where} "
                                   f"has shape {shape_of(t)} (adapter for another model?)")
            m.tensor = t
            deltas[t], layouts[t] = mname, layout
        for t0, key in self.replacements.items():
            t = resolve(t0, f"tensor {key}")
            shape = self._replacement_shape(key)
            if shape != shape_of(t):
                raise AdapterError(f"adapter tensor {key} has shape {shape} but {t} in {where} has shape {shape_of(t)}")
            repl[t] = key
            layouts.setdefault(t, infos[t].layout if t in infos else "out_in")
        plan = MergePlan(deltas, repl, layouts, notes=notes)
        touched = set(deltas) | set(repl)
        if tied_cfg and emb is not None and (emb in touched or lm_head in touched):
            plan.config_updates = {"tie_word_embeddings": False}
            if lm_head not in present:
                plan.virtual[lm_head] = emb
                layouts.setdefault(lm_head, "out_in")
            what = "the embedding" if emb in touched else "the tied lm_head"
            plan.notes.append(f"note: the adapter changes {what} of a tied model; the output is untied "
                              f"({lm_head} {'keeps the original weights' if lm_head not in touched else 'gets its own'})")
        return plan

    def _replacement_shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        from safetensors import safe_open

        with safe_open(str(self.weights), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    # -- provenance ------------------------------------------------------------
    def describe(self) -> dict:
        from ..checkpoint import sha256_file

        files = {p.name: sha256_file(p) for p in (self.folder / CONFIG_FILE, self.weights) if p.is_file()}
        keep = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                "target_modules", "modules_to_save", "bias", "base_model_name_or_path", "peft_version")
        return {"source": self.source, "kind": self.kind, "revision": self.revision, "files": files,
                "config": {k: self.config.get(k) for k in keep if k in self.config},
                "modules": len(self.modules), "replaced_tensors": sorted(self.replacements)}

    def __repr__(self) -> str:
        return f"LoraAdapter({self.source!r}, {len(self.modules)} modules, {len(self.replacements)} whole tensors)"


# ----------------------------------------------------------------------------- loading
def _adapter_folder(source: str, revision: str | None, allow_pickle: bool, token=None) -> tuple[Path, str, str | None]:
    from ..checkpoint.resolve import _HUB_ID, _hub_error, _looks_local

    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), "folder", None
    if path.exists():
        raise AdapterError(f"not an adapter folder: {path}")
    if _looks_local(source) or not _HUB_ID.match(source):
        raise AdapterError(f"no such adapter folder: {source}")
    import huggingface_hub

    sha = None
    try:
        sha = getattr(huggingface_hub.HfApi().model_info(source, revision=revision, token=token), "sha", None)
    except Exception:  # offline: whatever snapshot_download resolves (cache)
        sha = None
    patterns = [CONFIG_FILE, WEIGHTS_FILE] + ([PICKLE_WEIGHTS_FILE] if allow_pickle else [])
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id=source, revision=sha or revision,
                                                        allow_patterns=patterns, token=token))
    except Exception as e:
        raise _hub_error(source, revision, e, token) from None
    return folder, "hub", sha or revision


def _check_config(config: dict, path: Path) -> None:
    def bad(msg: str) -> AdapterError:
        return AdapterError(f"{path}: {msg}")

    ptype = config.get("peft_type")
    if ptype != "LORA":
        raise bad(f"peft_type {ptype!r} is not LORA; only plain LoRA (W + s*B*A) can be merged")
    if config.get("use_dora"):
        raise bad("use_dora is true: DoRA rescales each column and cannot be merged as W + s*B*A")
    for key in _VARIANT_FIELDS:
        if config.get(key):
            raise bad(f"{key} is set: this LoRA variant is not a plain W + s*B*A merge")
    if config.get("lora_bias"):
        raise bad("lora_bias is true: the lora_B bias is not a plain W + s*B*A merge")
    if config.get("use_qalora"):
        raise bad("use_qalora is true: QA-LoRA pools its inputs and is not a plain W + s*B*A merge")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise bad(f"init_lora_weights {init!r} trains against a modified base weight (or is a LoRA variant); "
                  "convert it to plain LoRA with PEFT first")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise bad(f"r must be a positive integer, got {r!r}")
    if isinstance(config.get("lora_alpha"), bool) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise bad(f"lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise bad(f"{key} must be an object")


def _read_weights(folder: Path, allow_pickle: bool) -> tuple[Path, dict[str, tuple] | None, dict | None]:
    """(weights file, {key: shape} or None, in-memory tensors for pickled files)."""
    st, binf = folder / WEIGHTS_FILE, folder / PICKLE_WEIGHTS_FILE
    if st.is_file():
        from ..checkpoint import read_safetensors_header

        try:
            header, _, _ = read_safetensors_header(st)
        except CheckpointError as e:
            raise AdapterError(str(e)) from None
        return st, {k: v.shape for k, v in header.items()}, None
    if binf.is_file():
        if not allow_pickle:
            raise AdapterError(f"{binf} is a pickled adapter, which can run code when loaded; pass allow_pickle=True "
                               "(CLI: --allow-pickle) to read it anyway")
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterError(f"cannot load pickled adapter {binf}: {' '.join(str(e).split())}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AdapterError(f"{binf} does not hold a state dict of tensors")
        return binf, None, sd
    raise AdapterError(f"no adapter weights in {folder} (expected {WEIGHTS_FILE})")


def load_adapter(source: str | Path, revision: str | None = None, allow_pickle: bool = False,
                 token=None) -> LoraAdapter:
    """Read a PEFT LoRA adapter from a folder or a Hub id (see module docstring)."""
    folder, kind, rev = _adapter_folder(str(source), revision, allow_pickle, token)
    cpath = folder / CONFIG_FILE
    if not cpath.is_file():
        raise AdapterError(f"no {CONFIG_FILE} in {folder} (not a PEFT adapter folder?)")
    config = read_json_object(cpath, AdapterError)
    _check_config(config, cpath)
    wpath, shapes, mem = _read_weights(folder, allow_pickle)
    keys = list(shapes if shapes is not None else mem)

    parts: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    replacements: dict[str, str] = {}
    for key in keys:
        rel = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, (kind_, ab) in _PARTS.items():
            if rel.endswith(suffix):
                mod = rel[: -len(suffix)]
                if kinds.setdefault(mod, kind_) != kind_:
                    raise AdapterError(f"{wpath}: module {mod} mixes linear and embedding LoRA tensors")
                parts.setdefault(mod, {})[ab] = key
                break
        else:
            if "lora_magnitude_vector" in rel:
                raise AdapterError(f"{wpath}: {key} is a DoRA magnitude vector; DoRA cannot be merged as W + s*B*A")
            if ".lora_" in rel or rel.startswith("lora_"):
                raise AdapterError(f"{wpath}: unrecognised LoRA tensor {key} (not plain LoRA A/B)")
            target = rel
            for seg in _WRAPPER_SEGMENTS:
                target = target.replace(seg + ".", ".")
            if target in replacements:
                raise AdapterError(f"{wpath}: {key} and {replacements[target]} both replace {target}")
            replacements[target] = key
    if not parts and not replacements:
        raise AdapterError(f"{wpath} holds no LoRA tensors")

    r0, a0 = config["r"], float(config["lora_alpha"])
    rpat, apat = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    fifo = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    # one handle for every A and B: re-opening the file per tensor costs ~4x the adapter in RSS
    with (contextlib.nullcontext(mem) if mem is not None else _safe_open(wpath)) as f:
        get = f.__getitem__ if mem is not None else f.get_tensor
        for mod in sorted(parts, key=_natural):
            p = parts[mod]
            for ab in ("A", "B"):
                if ab not in p:
                    raise AdapterError(f"{wpath}: module {mod} has no lora_{ab} tensor")
            A, B = get(p["A"]), get(p["B"])
            if A.dim() != 2 or B.dim() != 2:
                raise AdapterError(f"{wpath}: module {mod} has {A.dim()}-D/{B.dim()}-D LoRA tensors (only 2-D LoRA is supported)")
            if A.shape[0] != B.shape[1]:
                raise AdapterError(f"{wpath}: module {mod} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                   "of different ranks")
            rk, ak = pattern_key(rpat, mod), pattern_key(apat, mod)
            r = int(rpat[rk]) if rk is not None else r0
            alpha = float(apat[ak]) if ak is not None else a0
            if A.shape[0] != r:
                src = f"rank_pattern[{rk!r}]" if rk is not None else "r"
                raise AdapterError(f"{wpath}: module {mod} has rank {A.shape[0]} but {CONFIG_FILE} gives {src}={r}")
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            modules[mod] = LoraModule(mod, A.to(torch.float32).contiguous(), B.to(torch.float32).contiguous(), r,
                                      alpha, scaling, kinds[mod], fifo)
    return LoraAdapter(config, modules, replacements, weights=wpath, source=str(source), kind=kind, revision=rev,
                       tensors=mem)


def _safe_open(path: Path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _natural(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


# ----------------------------------------------------------------------------- merging
def merged_tensor(adapter: LoraAdapter, plan: MergePlan, tensor: str, current: torch.Tensor) -> torch.Tensor:
    """The merged value of model tensor ``tensor`` whose current value is ``current``:
    ``(replacement or current) + scaling * B A`` in float32, cast to ``current``'s dtype."""
    base = adapter.read(plan.replacements[tensor]) if tensor in plan.replacements else current
    mod = plan.deltas.get(tensor)
    if mod is None:
        return base.to(current.dtype)
    return adapter.modules[mod].added_to(base.to(torch.float32)).to(current.dtype)


def merge_edit(reader, adapter: LoraAdapter, plan: MergePlan) -> tuple[Callable, list]:
    """``(edit, extra)`` for :func:`surgery.checkpoint.stream_rewrite` / ``write_edited``."""
    touched = (set(plan.deltas) | set(plan.replacements)) - set(plan.virtual)

    def edit(name: str, tensor: torch.Tensor):
        return merged_tensor(adapter, plan, name, tensor) if name in touched else None

    extra = []
    for name, src in plan.virtual.items():
        def make(name=name, src=src):
            cur = reader.get(src)
            return merged_tensor(adapter, plan, name, cur) if name in plan.deltas or name in plan.replacements else cur
        extra.append((name, make, reader.dtype(src), tuple(reader.shape(src))))
    return edit, extra


def merge_adapter(source_or_reader, adapter, out, *, overwrite: bool = False, revision: str | None = None,
                  adapter_revision: str | None = None, allow_pickle: bool = False,
                  max_shard_bytes: int = 5_000_000_000, say=None) -> list[str]:
    """Stream model ``source_or_reader`` (a source for :func:`surgery.pipeline.open_model`
    or an open ``CheckpointReader``) with ``adapter`` (a :class:`LoraAdapter` or its
    source) merged into ``out`` (atomic, manifest method ``lora-merge``).  Returns the
    edited tensor names.  Everything is checked before the first tensor is read."""
    from ..checkpoint import CheckpointWriter, CheckpointReader, sha256_file
    from ..manifest import build_manifest
    from ..pipeline import _say, input_info, open_model, write_edited

    say = _say(say)
    out = Path(out)
    model_src = source_or_reader.folder if isinstance(source_or_reader, CheckpointReader) else source_or_reader
    CheckpointWriter.check_target(out, overwrite, [model_src, adapter if not isinstance(adapter, LoraAdapter)
                                                   else getattr(adapter, "folder", None)],
                                  max_shard_bytes=max_shard_bytes)
    if not isinstance(adapter, LoraAdapter):
        adapter = load_adapter(adapter, adapter_revision, allow_pickle)
    own = not isinstance(source_or_reader, CheckpointReader)
    if own:
        resolved, reader, _ = open_model(str(source_or_reader), revision, allow_pickle, say)
        info = input_info(resolved, reader)
    else:
        reader = source_or_reader
        info = {"folder": str(reader.folder), "source": str(reader.folder), "kind": "folder",
                "weight_files": {p.name: sha256_file(p) for p in reader.weight_files}}
    try:
        plan = adapter.check_against(reader)
        for n in plan.notes:
            say(n)
        say(f"adapter: {adapter.source} ({len(adapter.modules)} LoRA modules, {len(adapter.replacements)} whole tensors)")
        params = {"formula": "W' = W + scaling * B @ A (scaling = lora_alpha / r, or / sqrt(r) with use_rslora); "
                             "modules_to_save tensors replace the model's", "compute_dtype": "float32"}
        manifest = build_manifest(input_info=info, method="lora-merge", parameters=params,
                                  extra={"adapter": adapter.describe()})
        edit, extra = merge_edit(reader, adapter, plan)
        return write_edited(reader, out, edit, overwrite=overwrite, extra=extra, config_updates=plan.config_updates,
                            extra_edited=plan.new_edited,
                            manifest=manifest, max_shard_bytes=max_shard_bytes, say=say)
    finally:
        if own:
            reader.close()


# ----------------------------------------------------------------------------- writing
def save_peft_adapter(folder, modules, r: int | None = None, alpha: float | None = None, target_modules=None,
                      base_model_name_or_path: str | None = None, *, use_rslora: bool = False,
                      fan_in_fan_out: bool | None = None, modules_to_save=None, bias: str = "none",
                      extra_tensors: Mapping[str, torch.Tensor] | None = None,
                      files: Mapping[str, bytes | Path] | None = None, manifest: dict | None = None,
                      task_type: str | None = "CAUSAL_LM", overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter folder atomically (temporary sibling + rename).

    ``modules`` maps module names (``model.layers.0.mlp.down_proj``) to
    :class:`LoraModule` s or ``(A, B)`` pairs (A (r, in), B (out, r); pairs use
    ``r`` and ``alpha``).  ``r`` / ``alpha`` default to the most common values;
    modules that differ get exact ``rank_pattern`` / ``alpha_pattern`` entries.
    ``target_modules`` defaults to the module names themselves.  ``extra_tensors``
    are written as ``base_model.model.<key>`` (e.g. ``lm_head.weight`` with
    ``modules_to_save=["lm_head"]``); ``files`` are extra files; ``manifest`` (if
    given) is written last as ``surgery.json``, hashing the other files."""
    from ..checkpoint.files import write_safetensors

    from ..checkpoint import CheckpointWriter

    folder = Path(os.path.abspath(Path(folder).expanduser()))
    CheckpointWriter.check_target(folder, overwrite)
    if not modules and not extra_tensors:
        raise AdapterError(f"nothing to write to {folder}: no modules")
    mods: dict[str, LoraModule] = {}
    for name, m in modules.items():
        if isinstance(m, LoraModule):
            mods[name] = m
            continue
        A, B = m
        rr = int(A.shape[0]) if r is None else int(r)
        if A.shape[0] != rr or B.shape[1] != rr:
            raise AdapterError(f"module {name}: A {tuple(A.shape)} and B {tuple(B.shape)} do not have rank r={rr}")
        aa = float(rr if alpha is None else alpha)
        mods[name] = LoraModule(name, A, B, rr, aa, aa / (math.sqrt(rr) if use_rslora else rr),
                                fan_in_fan_out=bool(fan_in_fan_out))
    ranks = Counter(m.r for m in mods.values())
    alphas = Counter(m.alpha for m in mods.values())
    r0 = int(r) if r is not None else (ranks.most_common(1)[0][0] if ranks else 8)
    a0 = float(alpha) if alpha is not None else (alphas.most_common(1)[0][0] if alphas else float(r0))
    for name, m in mods.items():
        want = m.alpha / (math.sqrt(m.r) if use_rslora else m.r)
        if not math.isclose(want, m.scaling, rel_tol=1e-6):
            raise AdapterError(f"module {name}: scaling {m.scaling} does not follow from r={m.r}, alpha={m.alpha}"
                               f"{' (rsLoRA)' if use_rslora else ''}")
    rank_pattern = {re.escape(n): m.r for n, m in mods.items() if m.r != r0}
    alpha_pattern = {re.escape(n): _num(m.alpha) for n, m in mods.items() if m.alpha != a0}
    if fan_in_fan_out is None:
        fan_in_fan_out = any(m.fan_in_fan_out for m in mods.values())
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": _num(a0), "use_rslora": bool(use_rslora), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": bool(fan_in_fan_out),
        "target_modules": (target_modules if isinstance(target_modules, str)  # a regex, as PEFT allows
                           else sorted(target_modules if target_modules is not None else mods, key=_natural)),
        "modules_to_save": list(modules_to_save) if modules_to_save else None, "bias": bias,
        "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mods.items():
        a, b = (".lora_embedding_A", ".lora_embedding_B") if m.kind == "embedding" else (".lora_A.weight", ".lora_B.weight")
        tensors[PREFIX + name + a] = m.A.detach().cpu().contiguous()
        tensors[PREFIX + name + b] = m.B.detach().cpu().contiguous()
    for key, t in (extra_tensors or {}).items():
        tensors[(key if key.startswith(PREFIX) else PREFIX + key)] = t.detach().cpu().contiguous()

    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    except OSError as e:
        raise AdapterError(f"cannot create a temporary folder next to {folder}: {' '.join(str(e).split())}") from None
    try:
        os.chmod(tmp, 0o755)
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for rel, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / rel)
            else:
                (tmp / rel).write_bytes(content)
        if manifest is not None:
            from ..manifest import write_manifest

            write_manifest(tmp, manifest)
        old = None
        if folder.exists():
            CheckpointWriter.check_target(folder, overwrite)
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


__all__ = ["AdapterError", "LoraAdapter", "LoraModule", "MergePlan", "load_adapter", "merge_adapter", "merge_edit",
           "merged_tensor", "pattern_key", "save_peft_adapter"]
