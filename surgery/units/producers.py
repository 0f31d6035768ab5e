"""Which weights make up a unit: the write matrix's input channel and the rows
that produce it.

A *unit* is input channel ``j`` of a residual-stream write matrix ``W`` (stored
``(d_out, d_in)``, nn.Linear): column ``W[:, j]`` reads the channel, and the
*producer rows* compute it.

* MLP neuron ``j`` (``mlp.down_proj``): rows ``j`` of ``mlp.gate_proj`` and
  ``mlp.up_proj`` (and their biases when present).  ``x_j = act(gate_j . h) *
  (up_j . h)``, so those rows are the whole neuron.
* Attention channel ``j`` (``self_attn.o_proj``): the channel is dimension
  ``j % head_dim`` of query head ``h = j // head_dim``, which reads value head
  ``g = h // group`` (``group = n_heads / n_kv_heads``), i.e. row
  ``g * head_dim + j % head_dim`` of ``self_attn.v_proj`` (and of its bias).
  The attention pattern (q/k) is shared by the head's channels and is not part
  of a unit.

**GQA rule ("all").**  With grouped-query attention a value row is read by
``group`` o_proj channels (one per query head of the group).  A value row is
restored (or, for a mask, allowed) only when *every* channel reading it is;
otherwise only the o_proj columns of the selected channels change and the
shared value row keeps the model's own values.  Restoring a shared row for one
channel would change what the other, unselected, channels read, i.e. edit
units that were not chosen; the manifest says for every restored attention
unit whether its value row was restored too.  Without GQA (``group == 1``)
every channel owns its value row.

Supported: the llama-style layouts with separate projections (llama, mistral,
qwen2, qwen3, gemma, gemma2, gemma3_text, gemma3, olmo2).  Fused projections
(phi3 ``qkv_proj``/``gate_up_proj``, gpt2 ``c_attn``, gpt_neox
``query_key_value``) need row offsets that are not described yet, and MoE
experts are units of their own; those model types raise a SurgeryError before
any work rather than guessing.  The table is small and specific to this
feature, so it lives here rather than in the architecture JSONs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..architectures import Architecture
from ..errors import SurgeryError

# writer module suffix -> producer module suffixes (relative to the layer prefix)
_LLAMA_STYLE = {"attn": ("self_attn.o_proj", ("self_attn.v_proj",)),
                "mlp": ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))}
PRODUCERS: dict[str, dict[str, tuple[str, tuple[str, ...]]]] = {
    mt: _LLAMA_STYLE for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2")}
KINDS = ("attn", "mlp")
_ROLE_KIND = {"attn_out": "attn", "mlp_out": "mlp"}


def check_supported(model_type: str) -> None:
    if model_type not in PRODUCERS:
        raise SurgeryError(
            f"units: model_type {model_type!r} is not supported yet (supported: {', '.join(sorted(PRODUCERS))}); "
            "fused projections (qkv_proj, gate_up_proj, c_attn, query_key_value) and MoE experts need their unit "
            "rows described in surgery/units/producers.py first")


@dataclass(frozen=True)
class UnitMatrix:
    """One write matrix and the tensors of its units (names as given: checkpoint
    tensor names or live parameter names)."""
    key: str  # "layers.3.attn" / "layers.3.mlp": the same for checkpoint and live names
    kind: str  # "attn" | "mlp"
    layer: int
    writer: str  # the write matrix's weight, (d_out, d_in): units are its columns
    producers: tuple[str, ...]  # weights whose rows produce the units
    producer_biases: tuple[str, ...]  # their biases, when present
    n_units: int
    head_dim: int | None = None  # attention only
    group: int | None = None  # attention only: query heads per key/value head

    @property
    def module(self) -> str:
        return self.writer[: -len(".weight")]

    @property
    def producer_modules(self) -> tuple[str, ...]:
        return tuple(p[: -len(".weight")] for p in self.producers)

    @property
    def n_rows(self) -> int:
        """Rows of each producer."""
        return self.n_units if self.kind == "mlp" else self.n_units // self.group

    def producer_row(self, j: int) -> int:
        """The producer row that computes unit ``j``."""
        if self.kind == "mlp":
            return j
        h = j // self.head_dim
        return (h // self.group) * self.head_dim + j % self.head_dim

    def readers(self, row: int) -> list[int]:
        """The units that read producer row ``row`` (one for MLP; ``group`` for GQA)."""
        if self.kind == "mlp":
            return [row]
        g, d = divmod(row, self.head_dim)
        return [(g * self.group + k) * self.head_dim + d for k in range(self.group)]

    def producer_rows(self, units: Iterable[int]) -> list[int]:
        """Producer rows to take along with ``units``: a row is included only when
        ALL units reading it are in ``units`` (the GQA rule, module docstring)."""
        chosen = set(int(j) for j in units)
        rows = sorted({self.producer_row(j) for j in chosen})
        return [r for r in rows if all(u in chosen for u in self.readers(r))]


def _num_heads(arch: Architecture, config: Any) -> int:
    sub = arch.text_config(config)
    n = sub.get("num_attention_heads") if isinstance(sub, dict) else getattr(sub, "num_attention_heads", None)
    if not isinstance(n, int) or n < 1:
        raise SurgeryError(f"units: the config of model_type '{arch.model_type}' has no num_attention_heads")
    return n


def unit_matrices(arch: Architecture, names: Sequence[str], config: Any, shape: Callable[[str], Sequence[int]],
                  *, strict: bool = True) -> list[UnitMatrix]:
    """Every attention and MLP write matrix of a model with its producers, in
    forward order (by layer; attention before MLP).  ``names``: all tensor (or live parameter) names; ``shape(name)`` gives
    a stored shape.  Raises SurgeryError for an unsupported model_type, a missing
    producer or inconsistent shapes, naming the tensor."""
    check_supported(arch.model_type)
    table = PRODUCERS[arch.model_type]
    present = set(names)
    n_heads = _num_heads(arch, config)
    out: list[UnitMatrix] = []
    for w in arch.residual_writers(names, config, strict=strict):
        kind = _ROLE_KIND.get(w.role)
        if kind is None or w.layout == "bias":
            continue
        suffix, prods = table[kind]
        if w.layout != "out_in" or not w.name.endswith(f"{suffix}.weight"):
            raise SurgeryError(f"units: write matrix {w.name} is not a {suffix} nn.Linear weight")
        prefix = w.name[: -len(f"{suffix}.weight")]
        d_out, d_in = (int(x) for x in shape(w.name))
        producers, biases = [], []
        for p in prods:
            name = f"{prefix}{p}.weight"
            if name not in present:
                raise SurgeryError(f"units: {w.name} has no producer {name}")
            producers.append(name)
            if f"{prefix}{p}.bias" in present:
                biases.append(f"{prefix}{p}.bias")
        rows = {int(shape(p)[0]) for p in producers}
        if len(rows) != 1:
            raise SurgeryError(f"units: producers of {w.name} have different row counts {sorted(rows)}")
        n_rows = rows.pop()
        head_dim = group = None
        if kind == "mlp":
            if n_rows != d_in:
                raise SurgeryError(f"units: {producers[0]} has {n_rows} rows but {w.name} has {d_in} input channels")
        else:
            if d_in % n_heads:
                raise SurgeryError(f"units: {w.name} has {d_in} input channels, not a multiple of {n_heads} heads")
            head_dim = d_in // n_heads
            if n_rows % head_dim or n_heads % (n_rows // head_dim or 1) or n_rows == 0:
                raise SurgeryError(f"units: {producers[0]} has {n_rows} rows, which is not a whole number of "
                                   f"key/value heads of size {head_dim} dividing {n_heads} heads")
            group = n_heads // (n_rows // head_dim)
        for b in biases:
            if tuple(shape(b)) != (n_rows,):
                raise SurgeryError(f"units: bias {b} has shape {tuple(shape(b))}, expected ({n_rows},)")
        out.append(UnitMatrix(f"layers.{w.layer}.{kind}", kind, int(w.layer), w.name, tuple(producers),
                              tuple(biases), d_in, head_dim, group))
    if not out:
        raise SurgeryError(f"units: no attention or MLP write matrix found in model_type '{arch.model_type}'")
    return sorted(out, key=lambda m: (m.layer, KINDS.index(m.kind)))  # forward order: attention, then MLP
