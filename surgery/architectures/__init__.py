"""Architectures as data: where each checkpoint tensor sits and which ones write
into the residual stream.

A *residual-stream writer* is a tensor whose module output is added into the
residual stream: the token embedding (and a learned position embedding), each
layer's attention output projection, each layer's MLP output projection, every
MoE expert's output projection, a shared expert's output projection, and the
biases of those modules.  Edits (ROSI, directional ablation, ...) are applied to
these tensors *as stored in the checkpoint files*, so everything here is about
checkpoint tensor names on disk, not module paths.

Knowledge lives in ``surgery/architectures/data/<model_type>.json`` (one file per
``config.model_type``, read with :mod:`importlib.resources`).  There is no generic
fallback: an unknown ``model_type`` or a tensor that no pattern matches is an
:class:`~surgery.errors.ArchitectureError`.

Data file schema
----------------
::

    {
      "model_type":      "llama",
      "config_path":     null,              # sub-config holding the text-model keys, e.g. "text_config" (gemma3)
      "layers_module":   "model.layers",    # dotted path of the decoder-layer ModuleList in the loaded HF model
      "num_layers_key":  "num_hidden_layers",   # config key or list of alternative keys (*)
      "hidden_size_key": "hidden_size",         # (*)
      "num_experts_key": null,                  # (*) MoE only: number of routed experts
      "tie_default":     false,             # tie_word_embeddings when the config does not say
      "embedding":       "model.embed_tokens.weight",   # name, or list of alternative names
      "lm_head":         "lm_head.weight",              # name or list; may be absent (tied)
      "tensors": [                          # EVERY tensor of a checkpoint must match exactly one entry
        {"name": "model.layers.{layer}.self_attn.o_proj.weight",  # or a list of alternative spellings
         "role": "attn_out", "layout": "out_in", "optional": false,
         "variants": ["per_expert"],        # optional, see below
         "post_norm": "model.layers.{layer}.post_attention_layernorm.weight"},  # optional, see below
        ...
      ]
    }

(*) read from the sub-config ``config_path`` if set; a config.json dict that
lacks every listed key is read through its transformers config class (aliases
such as qwen3_moe ``num_experts`` / ``num_local_experts`` and class defaults).

Names are matched in full (anchored).  Placeholders: ``{layer}`` and ``{expert}``
match ``\\d+`` and give the tensor its layer / expert index; ``{any}`` matches
anything (only for whole sub-models that are never edited, e.g. a vision tower).

``role``: ``embedding`` (token embedding, rows written), ``pos_embedding``
(learned position embedding, rows written), ``attn_out``, ``mlp_out``,
``expert_out`` (a routed expert's output projection), ``shared_expert_out``,
``lm_head`` (reads the stream), ``other`` (everything else: q/k/v, gate/up,
norms, routers, buffers).  All roles but ``lm_head`` and ``other`` are writers;
a writer's bias has the writer's role and layout ``bias``.

``layout`` (how the tensor is stored):

============== ================= ========================================
layout         stored shape      residual (output) axis / input axis
============== ================= ========================================
out_in         (d_out, d_in)     0 / 1   nn.Linear
in_out         (d_in, d_out)     1 / 0   GPT-2 Conv1D
rows           (vocab, d)        1 / 0   nn.Embedding
bias           (d_out,)          0 / -   1-D bias
experts_out_in (E, d_out, d_in)  1 / 2   fused experts, nn.Linear per expert
experts_in_out (E, d_in, d_out)  2 / 1   fused experts, transposed
vector         (n,)              0 / -   norm weights, buffers (not writers)
other          anything          - / -   not writers
============== ================= ========================================

``optional``: the tensor may be absent (config-dependent biases, tied lm_head,
buffers saved by old transformers versions).  The ``lm_head`` role is optional
only while the config ties it (:meth:`Architecture.tied`): an untied checkpoint
without it is incomplete (transformers would initialise it at random).  Non-optional ``{layer}`` entries
are required in every layer, non-optional ``{expert}`` entries for every expert
``0..E-1``.

``variants``: alternative ways a layer can be stored.  Per layer the variant is
the one shared by all present variant-tagged tensors (e.g. a MoE layer is
``per_expert`` as on the Hub, or ``fused`` as in a transformers>=5 state_dict; a
qwen2_moe layer listed in ``mlp_only_layers`` is ``dense``); only the required
entries of that variant are required there, and mixing variants in one layer is
an error.

``post_norm``: for sandwich-norm models (gemma2, gemma3, olmo2) the writer's
output passes through this norm before it is added to the stream, so an edit of
the writer alone is not an exact edit of what reaches the stream.  Carried on
:class:`WriterTensor` as ``post_norm`` (resolved name).

What transformers 5 writes (``save_pretrained``) and the Hub holds: MoE experts
per expert (``...experts.{e}.w2.weight`` for mixtral, ``...experts.{e}.down_proj.weight``
for qwen2_moe/qwen3_moe), although the in-memory model holds them fused
(``...mlp.experts.down_proj`` of shape ``(E, d, d_ff)``); both are covered.
gpt_neox's lm_head is saved as ``embed_out.weight``; gemma3 (multimodal) text
tensors as ``language_model.model.*`` (``model.language_model.*`` in memory);
gpt2 on the Hub lacks the ``transformer.`` prefix.  All are listed as alternatives.

Python API
----------
``get_architecture(config)`` -> :class:`Architecture`;
``Architecture.residual_writers(names, config)`` -> ``list[WriterTensor]``
(pass ALL tensor names of the checkpoint, e.g. from the shard index; ``strict=False``
skips the required-tensor check for a partial list);
``Architecture.place(names, config)`` -> ``dict[name, TensorInfo]``;
``WriterTensor.as_out_in(t)`` / ``from_out_in(t)`` convert between the stored
layout and ``(d_out=residual, d_in)`` (``(E, d_out, d_in)`` for fused experts).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping

from surgery.errors import ArchitectureError

__all__ = [
    "Architecture",
    "TensorInfo",
    "TensorPattern",
    "WriterTensor",
    "get_architecture",
    "supported_model_types",
    "ROLES",
    "WRITER_ROLES",
    "LAYOUTS",
]

ROLES = ("embedding", "pos_embedding", "attn_out", "mlp_out", "expert_out", "shared_expert_out", "lm_head", "other")
WRITER_ROLES = frozenset({"embedding", "pos_embedding", "attn_out", "mlp_out", "expert_out", "shared_expert_out"})
EMBEDDING_ROLES = frozenset({"embedding", "pos_embedding"})

# layout -> (ndim, residual/output axis, input axis)
_AXES: dict[str, tuple[int | None, int | None, int | None]] = {
    "out_in": (2, 0, 1),
    "in_out": (2, 1, 0),
    "rows": (2, 1, 0),
    "bias": (1, 0, None),
    "experts_out_in": (3, 1, 2),
    "experts_in_out": (3, 2, 1),
    "vector": (1, 0, None),
    "other": (None, None, None),
}
LAYOUTS = tuple(_AXES)
_WRITER_LAYOUTS = frozenset({"out_in", "in_out", "rows", "bias", "experts_out_in", "experts_in_out"})
# layouts whose stored form is the transpose of (d_out, d_in) in the last two axes
_TRANSPOSED = frozenset({"in_out", "rows", "experts_in_out"})

_MAX_LISTED = 20


# --------------------------------------------------------------------------- tensors


class _LayoutMixin:
    name: str
    layout: str

    @property
    def d_out_axis(self) -> int | None:
        """Axis of the stored tensor that is the module's output dimension (the
        residual-stream dimension for a writer)."""
        return _AXES[self.layout][1]

    @property
    def d_in_axis(self) -> int | None:
        """Axis of the stored tensor that is the module's input dimension (vocab
        for ``rows``; None for 1-D tensors)."""
        return _AXES[self.layout][2]

    def _check_ndim(self, tensor: Any) -> None:
        ndim = _AXES[self.layout][0]
        if ndim is None or self.layout == "vector":
            raise ArchitectureError(f"tensor {self.name} has layout '{self.layout}', which has no (d_out, d_in) form")
        if tensor.ndim != ndim:
            raise ArchitectureError(
                f"tensor {self.name} has layout '{self.layout}' (expects {ndim}-D) but got shape {tuple(tensor.shape)}"
            )

    def as_out_in(self, tensor: Any) -> Any:
        """The stored tensor as ``(d_out, d_in)`` (a view): nn.Linear weights as
        they are, Conv1D and embeddings transposed (an embedding gives
        ``(d, vocab)``), fused experts as ``(E, d_out, d_in)``, a bias unchanged."""
        self._check_ndim(tensor)
        return tensor.transpose(-2, -1) if self.layout in _TRANSPOSED else tensor

    def from_out_in(self, tensor: Any) -> Any:
        """Inverse of :meth:`as_out_in` (a view: call ``.contiguous()`` before saving)."""
        self._check_ndim(tensor)
        return tensor.transpose(-2, -1) if self.layout in _TRANSPOSED else tensor


@dataclass(frozen=True)
class WriterTensor(_LayoutMixin):
    """A checkpoint tensor that writes into the residual stream."""

    name: str
    role: str
    layout: str
    layer: int | None
    expert: int | None
    post_norm: str | None = None  # norm applied to the output before the residual add (gemma2/3, olmo2)


@dataclass(frozen=True)
class TensorInfo(_LayoutMixin):
    """Where a checkpoint tensor sits (see :meth:`Architecture.place`)."""

    name: str
    role: str
    layout: str
    layer: int | None
    expert: int | None
    post_norm: str | None = None
    pattern: str = ""  # the data-file pattern it matched

    @property
    def writes_residual(self) -> bool:
        return self.role in WRITER_ROLES

    def to_writer(self) -> WriterTensor:
        if not self.writes_residual:
            raise ArchitectureError(f"tensor {self.name} (role '{self.role}') does not write the residual stream")
        return WriterTensor(self.name, self.role, self.layout, self.layer, self.expert, self.post_norm)


# --------------------------------------------------------------------------- patterns

_PLACEHOLDER = re.compile(r"\{([a-z_]*)\}")
_PLACEHOLDER_RE = {"layer": r"(?P<layer>\d+)", "expert": r"(?P<expert>\d+)", "any": r"(?P<any>.+)"}


def _compile(template: str) -> re.Pattern[str]:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(_PLACEHOLDER_RE[m.group(1)])
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class TensorPattern:
    """One entry of a data file's ``tensors`` list."""

    names: tuple[str, ...]  # alternative templates
    role: str
    layout: str
    optional: bool
    variants: tuple[str, ...] | None
    post_norm: tuple[str, ...] | None
    index: int

    @property
    def has_layer(self) -> bool:
        return "{layer}" in self.names[0]

    @property
    def has_expert(self) -> bool:
        return "{expert}" in self.names[0]

    @functools.cached_property
    def regexes(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile(n) for n in self.names)

    def render(self, layer: int | None = None, expert: int | None = None) -> str:
        out = self.names[0]
        if layer is not None:
            out = out.replace("{layer}", str(layer))
        if expert is not None:
            out = out.replace("{expert}", str(expert))
        return out.replace("{any}", "*")


def _names(value: Any, what: str, file: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ArchitectureError(f"bad architecture data {file}: {what} must be a name or a non-empty list of names")
    for v in value:
        for ph in _PLACEHOLDER.findall(v):
            if ph not in _PLACEHOLDER_RE:
                raise ArchitectureError(f"bad architecture data {file}: unknown placeholder {{{ph}}} in {v}")
    return tuple(value)


def _keys(value: Any, what: str, file: str, optional: bool = False) -> tuple[str, ...]:
    if value is None and optional:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ArchitectureError(f"bad architecture data {file}: {what} must be a config key or a list of keys")
    return tuple(value)


# --------------------------------------------------------------------------- config access


def _cfg_get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _model_type(config: Any) -> str:
    mt = _cfg_get(config, "model_type")
    if not isinstance(mt, str) or not mt:
        raise ArchitectureError("config has no model_type; cannot choose an architecture")
    return mt


def _config_object(config: Mapping[str, Any]) -> Any:
    """A config.json dict as transformers would load it (aliases such as
    ``num_experts`` -> ``num_local_experts`` and class defaults applied), or None."""
    try:
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    except Exception:  # noqa: BLE001 - a convenience for keys the dict omits
        return None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _compress(name: str) -> str:
    """model.layers.3.mlp.experts.7.x -> model.layers.{layer}.mlp.experts.{expert}.x"""
    parts, seen = name.split("."), 0
    for i, p in enumerate(parts):
        if p.isdigit():
            parts[i] = ("{layer}", "{expert}")[seen] if seen < 2 else "{index}"
            seen += 1
    return ".".join(parts)


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------- architecture


class Architecture:
    """One data file, loaded.  Obtain with :func:`get_architecture`."""

    def __init__(self, data: Mapping[str, Any], file: str) -> None:
        self._file = file

        def need(key: str, kind: type | tuple) -> Any:
            if key not in data or not isinstance(data[key], kind):
                raise ArchitectureError(f"bad architecture data {file}: missing or malformed '{key}'")
            return data[key]

        self.model_type: str = need("model_type", str)
        self.layers_module: str = need("layers_module", str)
        self._num_layers_keys = _keys(data.get("num_layers_key"), "num_layers_key", file)
        self._hidden_size_keys = _keys(data.get("hidden_size_key"), "hidden_size_key", file)
        self._num_experts_keys = _keys(data.get("num_experts_key"), "num_experts_key", file, optional=True)
        self.num_layers_key: str = self._num_layers_keys[0]
        self.hidden_size_key: str = self._hidden_size_keys[0]
        self.num_experts_key: str | None = self._num_experts_keys[0] if self._num_experts_keys else None
        self.config_path: str | None = data.get("config_path")
        self.tie_default: bool = bool(data.get("tie_default", False))
        self.embedding_names: tuple[str, ...] = _names(data.get("embedding"), "embedding", file)
        self.lm_head_names: tuple[str, ...] = _names(data.get("lm_head"), "lm_head", file)
        raw = need("tensors", list)
        entries: list[TensorPattern] = []
        for i, item in enumerate(raw):
            if not isinstance(item, Mapping):
                raise ArchitectureError(f"bad architecture data {file}: tensors[{i}] is not an object")
            unknown = set(item) - {"name", "role", "layout", "optional", "variants", "post_norm"}
            if unknown:
                raise ArchitectureError(f"bad architecture data {file}: tensors[{i}] has unknown keys {sorted(unknown)}")
            names = _names(item.get("name"), f"tensors[{i}].name", file)
            role, layout = item.get("role"), item.get("layout")
            if role not in ROLES or layout not in LAYOUTS:
                raise ArchitectureError(f"bad architecture data {file}: {names[0]} has role {role!r} / layout {layout!r}")
            if role in WRITER_ROLES and layout not in _WRITER_LAYOUTS:
                raise ArchitectureError(f"bad architecture data {file}: writer {names[0]} has layout {layout!r}")
            has = {ph for n in names for ph in _PLACEHOLDER.findall(n)}
            if any({ph for ph in _PLACEHOLDER.findall(n)} != {ph for ph in _PLACEHOLDER.findall(names[0])} for n in names):
                raise ArchitectureError(f"bad architecture data {file}: alternatives of {names[0]} differ in placeholders")
            if any(n.count("{any}") > 1 for n in names):
                raise ArchitectureError(f"bad architecture data {file}: {names[0]} has more than one {{any}}")
            if "expert" in has and "layer" not in has:
                raise ArchitectureError(f"bad architecture data {file}: {names[0]} has {{expert}} without {{layer}}")
            if "expert" in has and not self.num_experts_key:
                raise ArchitectureError(f"bad architecture data {file}: {names[0]} has {{expert}} but no num_experts_key")
            variants = item.get("variants")
            if variants is not None:
                if not (isinstance(variants, list) and variants and all(isinstance(v, str) for v in variants)):
                    raise ArchitectureError(f"bad architecture data {file}: {names[0]} has malformed variants")
                if "layer" not in has:
                    raise ArchitectureError(f"bad architecture data {file}: {names[0]} has variants but no {{layer}}")
                variants = tuple(variants)
            post_norm = item.get("post_norm")
            if post_norm is not None:
                post_norm = _names(post_norm, f"{names[0]} post_norm", file)
            entries.append(
                TensorPattern(names, role, layout, bool(item.get("optional", False)), variants, post_norm, i)
            )
        self.patterns: tuple[TensorPattern, ...] = tuple(entries)
        declared = [n for e in entries for n in e.names]
        for what, alts in (("embedding", self.embedding_names), ("lm_head", self.lm_head_names)):
            if not set(alts) <= set(declared):
                raise ArchitectureError(f"bad architecture data {file}: {what} {alts[0]} is not in tensors")
        order: list[str] = []
        for e in entries:
            for v in e.variants or ():
                if v not in order:
                    order.append(v)
        self._variant_order = tuple(order)
        self._shape_cache: dict[str, TensorPattern] = {}

    def __repr__(self) -> str:
        return f"Architecture({self.model_type!r})"

    # ---------------------------------------------------------------- config

    def text_config(self, config: Any) -> Any:
        """The (sub-)config that holds the text model's keys."""
        if not self.config_path:
            return config
        sub = _cfg_get(config, self.config_path)
        if sub is None and isinstance(config, Mapping):
            obj = _config_object(config)
            sub = _cfg_get(obj, self.config_path) if obj is not None else None
        if sub is None:
            raise ArchitectureError(f"config of model_type '{self.model_type}' has no '{self.config_path}'")
        return sub

    def _value(self, config: Any, keys: tuple[str, ...]) -> Any:
        sub = self.text_config(config)
        value = next((v for v in (_cfg_get(sub, k) for k in keys) if v is not None), None)
        if value is None and isinstance(config, Mapping):  # config.json may use an alias or omit a default
            obj = _config_object(config)
            if obj is not None:
                sub = self.text_config(obj)
                value = next((v for v in (_cfg_get(sub, k) for k in keys) if v is not None), None)
        if value is None:
            raise ArchitectureError(f"config of model_type '{self.model_type}' has no '{keys[0]}'")
        return value

    def num_layers(self, config: Any) -> int:
        return int(self._value(config, self._num_layers_keys))

    def hidden_size(self, config: Any) -> int:
        return int(self._value(config, self._hidden_size_keys))

    def num_experts(self, config: Any) -> int | None:
        """Routed experts per MoE layer, or None for a dense architecture."""
        return int(self._value(config, self._num_experts_keys)) if self._num_experts_keys else None

    def tied(self, config: Any) -> bool:
        """tie_word_embeddings: the config's value (top level, then text sub-config),
        else this architecture's default (e.g. gemma ties, llama does not)."""
        value = _cfg_get(config, "tie_word_embeddings")
        if value is None and self.config_path:
            sub = _cfg_get(config, self.config_path)
            value = _cfg_get(sub, "tie_word_embeddings") if sub is not None else None
        return self.tie_default if value is None else bool(value)

    def find_embedding(self, tensor_names: Iterable[str]) -> str | None:
        names = set(tensor_names)
        return next((n for n in self.embedding_names if n in names), None)

    def find_lm_head(self, tensor_names: Iterable[str]) -> str | None:
        """The stored lm_head tensor, or None when it is tied/absent."""
        names = set(tensor_names)
        return next((n for n in self.lm_head_names if n in names), None)

    # ---------------------------------------------------------------- matching

    def _match(self, name: str) -> tuple[TensorPattern, int | None, int | None] | None:
        shape = re.sub(r"\d+", "#", name)
        cached = self._shape_cache.get(shape)
        candidates = ([cached] if cached is not None else []) + list(self.patterns)
        for entry in candidates:
            for rx in entry.regexes:
                m = rx.fullmatch(name)
                if m is not None:
                    self._shape_cache[shape] = entry
                    g = m.groupdict()
                    layer = int(g["layer"]) if g.get("layer") is not None else None
                    expert = int(g["expert"]) if g.get("expert") is not None else None
                    return entry, layer, expert
        return None

    def spellings(self, name: str) -> tuple[str, ...]:
        """``name`` first, then the same tensor under the data file's alternative
        spellings (gemma3's ``model.language_model.*`` in memory and in PEFT
        adapters vs ``language_model.model.*`` on disk); ``(name,)`` if it matches
        no pattern."""
        hit = self._match(name)
        if hit is None:
            return (name,)
        groups = next(m.groupdict() for rx in hit[0].regexes if (m := rx.fullmatch(name)) is not None)
        alts = (_PLACEHOLDER.sub(lambda p: groups[p.group(1)], t) for t in hit[0].names)
        return tuple(dict.fromkeys([name, *alts]))

    def place(self, tensor_names: Iterable[str], config: Any, *, strict: bool = True) -> dict[str, TensorInfo]:
        """Every tensor's role/layer/expert/layout, in a stable order (embeddings,
        then by layer and name, then the rest).  Raises ArchitectureError if a name
        matches no pattern, an index is out of range, or (``strict``, the default:
        pass ALL names of the checkpoint) a required tensor is missing."""
        names = list(dict.fromkeys(tensor_names))
        matched: dict[str, tuple[TensorPattern, int | None, int | None]] = {}
        unplaced: list[str] = []
        for name in names:
            hit = self._match(name)
            if hit is None:
                unplaced.append(name)
            else:
                matched[name] = hit
        if unplaced:
            pats = list(dict.fromkeys(_compress(n) for n in unplaced))  # first-seen order
            raise ArchitectureError(
                f"cannot place {len(pats)} tensor pattern(s) of model_type '{self.model_type}': {_listing(pats)}"
                f" (add them to surgery/architectures/data/{self.model_type}.json if they belong to this architecture)"
            )

        n_layers = self.num_layers(config)
        n_experts = self.num_experts(config)
        for name, (entry, layer, expert) in matched.items():
            if layer is not None and layer >= n_layers:
                raise ArchitectureError(
                    f"tensor {name} has layer index {layer} but the config of model_type '{self.model_type}'"
                    f" says {self.num_layers_key}={n_layers}"
                )
            if expert is not None and n_experts is not None and expert >= n_experts:
                raise ArchitectureError(
                    f"tensor {name} has expert index {expert} but the config of model_type '{self.model_type}'"
                    f" says {self.num_experts_key}={n_experts}"
                )
        if strict:
            self._check_complete(matched, n_layers, n_experts, self.tied(config))

        present = set(names)
        infos: dict[str, TensorInfo] = {}
        for name, (entry, layer, expert) in matched.items():
            post = None
            if entry.post_norm is not None:
                cands = [p.replace("{layer}", str(layer)) for p in entry.post_norm]
                post = next((c for c in cands if c in present), cands[0])
            infos[name] = TensorInfo(name, entry.role, entry.layout, layer, expert, post, entry.names[0])
        return dict(sorted(infos.items(), key=lambda kv: _order_key(kv[1])))

    def _check_complete(
        self,
        matched: Mapping[str, tuple[TensorPattern, int | None, int | None]],
        n_layers: int,
        n_experts: int | None,
        tied: bool,
    ) -> None:
        top: set[int] = set()
        # layer -> entry index -> set of expert indices (None for non-expert)
        per_layer: dict[int, dict[int, set[int | None]]] = {}
        example: dict[tuple[int, int], str] = {}
        for name, (entry, layer, expert) in matched.items():
            if layer is None:
                top.add(entry.index)
            else:
                per_layer.setdefault(layer, {}).setdefault(entry.index, set()).add(expert)
                example.setdefault((layer, entry.index), name)
        missing: list[str] = []
        for e in self.patterns:
            # an lm_head is optional only when tied: untied, transformers would initialise a missing one at random
            required = not e.optional or (e.role == "lm_head" and not tied)
            if not e.has_layer and required and e.index not in top:
                missing.append(e.render() + (" (tie_word_embeddings is false)" if e.role == "lm_head" else ""))
        for layer in range(n_layers):
            here = per_layer.get(layer, {})
            cands: set[str] | None = None
            for idx in here:
                e = self.patterns[idx]
                if e.variants is None:
                    continue
                new = set(e.variants) if cands is None else cands & set(e.variants)
                if not new:
                    other = next(
                        (j for j in here if self.patterns[j].variants and not set(self.patterns[j].variants) & set(e.variants)),
                        next(j for j in here if self.patterns[j].variants),
                    )
                    raise ArchitectureError(
                        f"layer {layer} of model_type '{self.model_type}' mixes incompatible storage variants: "
                        f"{example[(layer, idx)]} ({'/'.join(e.variants)}) and {example[(layer, other)]} "
                        f"({'/'.join(self.patterns[other].variants or ())})"
                    )
                cands = new
            chosen = next((v for v in self._variant_order if cands is None or v in cands), None)
            for e in self.patterns:
                if not e.has_layer or e.optional:
                    continue
                if e.variants is not None and chosen not in e.variants:
                    continue
                got = here.get(e.index)
                if not got:
                    if e.has_expert and n_experts:
                        missing.extend(e.render(layer, x) for x in range(n_experts))
                    else:
                        missing.append(e.render(layer))
                elif e.has_expert and n_experts:
                    missing.extend(e.render(layer, x) for x in range(n_experts) if x not in got)
        if missing:
            raise ArchitectureError(
                f"checkpoint of model_type '{self.model_type}' lacks {len(missing)} required tensor(s): "
                f"{_listing(missing, 10)}"
            )

    def residual_writers(
        self,
        tensor_names: Iterable[str],
        config: Any,
        include_embedding: bool = False,
        layers: Iterable[int] | None = None,
        *,
        strict: bool = True,
    ) -> list[WriterTensor]:
        """The residual-stream writers among ``tensor_names`` (all names of the
        checkpoint), by layer then name.  ``include_embedding`` adds the token (and
        learned position) embedding, which belong to no layer and are not filtered
        by ``layers``.  All names are placed first: an unplaced name raises before
        anything is returned."""
        infos = self.place(tensor_names, config, strict=strict)
        keep: set[int] | None = None
        if layers is not None:
            n_layers = self.num_layers(config)
            keep = set()
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
                    raise ArchitectureError(
                        f"layer {layer!r} is out of range for model_type '{self.model_type}' with {n_layers} layers"
                    )
                keep.add(layer)
        out: list[WriterTensor] = []
        for info in infos.values():
            if not info.writes_residual:
                continue
            if info.role in EMBEDDING_ROLES:
                if include_embedding:
                    out.append(info.to_writer())
                continue
            if keep is not None and info.layer not in keep:
                continue
            out.append(info.to_writer())
        return out


def _order_key(info: TensorInfo) -> tuple:
    if info.layer is not None:
        group = 1
    elif info.role in EMBEDDING_ROLES:
        group = 0
    else:
        group = 2
    rank = ROLES.index(info.role) if group == 0 else 0  # token embedding before position embedding
    return (group, info.layer if info.layer is not None else -1, rank, _natural_key(info.name))


# --------------------------------------------------------------------------- registry


def _data_dir():
    return resources.files("surgery.architectures").joinpath("data")


@functools.lru_cache(maxsize=1)
def supported_model_types() -> tuple[str, ...]:
    """The model_types that have a data file, sorted."""
    return tuple(sorted(p.name[: -len(".json")] for p in _data_dir().iterdir() if p.name.endswith(".json")))


@functools.lru_cache(maxsize=None)
def _load(model_type: str) -> Architecture:
    file = f"{model_type}.json"
    try:
        data = json.loads(_data_dir().joinpath(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArchitectureError(f"cannot read architecture data {file}: {exc}") from None
    arch = Architecture(data, file)
    if arch.model_type != model_type:
        raise ArchitectureError(f"bad architecture data {file}: model_type is {arch.model_type!r}")
    return arch


def parse_layers(spec: str | None) -> list[int] | None:
    """A layer list as users type it: ``'10-20'``, ``'3,5,7'``, ``'0-4,9'``; None or '' is all layers."""
    if spec is None or not str(spec).strip():
        return None
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ArchitectureError(f"cannot read layer list {spec!r} (use e.g. 0-12 or 3,5,7)") from None
    return out


def check_layers(layers: Iterable[int] | None, num_layers: int, what: str = "layers") -> None:
    """Refuse layer numbers the model does not have (instead of editing fewer layers than asked)."""
    if layers is None:
        return
    bad = sorted({x for x in layers if not 0 <= x < num_layers})
    if bad:
        raise ArchitectureError(f"{what} {bad} out of range (the model has {num_layers} layers, 0-{num_layers - 1})")


def get_architecture(config: Any, tensor_names: Iterable[str] | None = None) -> Architecture:
    """The architecture of a transformers config (PretrainedConfig or config.json dict);
    with the checkpoint's ``tensor_names``, an unknown model_type's error lists the
    tensor patterns it cannot place (all of them)."""
    model_type = _model_type(config)
    supported = supported_model_types()
    if model_type not in supported:
        pats = list(dict.fromkeys(_compress(n) for n in tensor_names or ()))
        unplaced = f"; cannot place its {len(pats)} tensor pattern(s): {_listing(pats)}" if pats else ""
        raise ArchitectureError(
            f"unknown model_type {model_type!r}{unplaced}; supported: {', '.join(supported)}"
            f" (there is no generic fallback: describe its tensors in surgery/architectures/data/{model_type}.json)"
        )
    return _load(model_type)
