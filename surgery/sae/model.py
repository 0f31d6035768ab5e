"""Sparse autoencoders in the SAELens layout: the model, loading, saving.

An :class:`SAE` is a plain dataclass of tensors, named and shaped as SAELens
names them, so a folder we write loads in SAELens and one SAELens (or Gemma
Scope converted by SAELens) wrote loads here::

    W_enc (d_in, d_sae)   b_enc (d_sae)   W_dec (d_sae, d_in)   b_dec (d_in)
    threshold (d_sae)     JumpReLU only

    encode(x) = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    decode(a) = a @ W_dec + b_dec

with ``act`` one of ``relu`` (SAELens architecture "standard"), ``jumprelu``
(``relu(h) * (h > threshold)``) and ``topk`` (the ``k`` largest
pre-activations, passed through ReLU, the rest zero).  Tensors are float32 in
memory whatever the file stores.

On disk a folder holds ``cfg.json`` and ``sae_weights.safetensors``.  Two cfg
dialects exist: SAELens < 6 writes flat fields (``hook_name``, ``hook_layer``,
``model_name``, ``activation_fn_str``, ``activation_fn_kwargs: {k}``), SAELens
>= 6 writes ``architecture`` + ``k`` at the top and ``hook_name``/``model_name``
under ``metadata``.  We read both.  We write the flat dialect plus ``k`` at the
top and no ``sae_lens_version``: SAELens 6 then takes its pre-6 conversion path,
which reads exactly those fields, and SAELens 5 reads them natively.  Our own
provenance (corpus hashes, metrics) goes under a ``surgery`` key, which SAELens
ignores.  Writes are atomic (temporary sibling folder, then rename).

Not supported, refused with a one-line error: activation normalisation other
than ``none`` (fold it into the weights first), gated SAEs, a non-trivial
``finetuning_scaling_factor``, ``hook_z`` reshaping, decoder-norm rescaling.

Layers: our layer ``l`` is the residual stream at the input of decoder layer
``l``, which is TransformerLens/SAELens ``blocks.l.hook_resid_pre``;
``blocks.l.hook_resid_post`` is the same stream as ``blocks.(l+1).hook_resid_pre``
and is read as our layer ``l + 1``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoint.files import _one_line, read_json_object
from ..errors import SurgeryError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ACTIVATIONS = ("relu", "jumprelu", "topk")
_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
# owner/name, optionally followed by a subfolder path inside the repository
_HUB = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*)(?:/(?P<sub>[^\s]+?))?/?$")


class SAEError(SurgeryError):
    """An SAE folder, Hub id or training request is malformed or does not fit the model."""


def hook_name_for_layer(layer: int) -> str:
    """SAELens hook name of our layer ``layer`` (the input of decoder layer ``layer``)."""
    return f"blocks.{int(layer)}.hook_resid_pre"


def layer_of_hook(hook_name: str | None) -> int | None:
    """Our layer for a SAELens residual-stream hook name, None for any other hook."""
    if not hook_name:
        return None
    m = _RESID_PRE.match(hook_name)
    if m:
        return int(m.group(1))
    m = _RESID_POST.match(hook_name)
    if m:
        return int(m.group(1)) + 1
    return None


@dataclass(eq=False)
class SAE:
    W_enc: torch.Tensor  # (d_in, d_sae)
    b_enc: torch.Tensor  # (d_sae,)
    W_dec: torch.Tensor  # (d_sae, d_in)
    b_dec: torch.Tensor  # (d_in,)
    activation: str = "relu"
    k: int | None = None
    threshold: torch.Tensor | None = None  # (d_sae,), jumprelu only
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    model_name: str | None = None
    info: dict = field(default_factory=dict)  # written under cfg.json "surgery"
    source: str = ""  # where it was loaded from (for messages)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SAEError(f"unknown SAE activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        d_in, d_sae = self.W_enc.shape if self.W_enc.dim() == 2 else (None, None)
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.activation == "jumprelu":
            if self.threshold is None:
                raise SAEError(f"JumpReLU SAE {self._name()} has no threshold tensor")
            shapes["threshold"] = (d_sae,)
        for name, want in shapes.items():
            t = getattr(self, name)
            if d_in is None or tuple(t.shape) != want:
                raise SAEError(f"SAE {self._name()}: tensor {name} has shape {tuple(t.shape)}, expected {want} "
                               f"(W_enc is {tuple(self.W_enc.shape)})")
        if self.activation == "topk":
            if self.k is None or int(self.k) < 1 or int(self.k) > d_sae:
                raise SAEError(f"TopK SAE {self._name()}: k={self.k} must be between 1 and d_sae={d_sae}")
            self.k = int(self.k)

    def _name(self) -> str:
        return self.source or self.hook_name or "(in memory)"

    # ------------------------------------------------------------------ shape
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def architecture(self) -> str:
        return _ARCHITECTURE[self.activation]

    @property
    def layer(self) -> int | None:
        return layer_of_hook(self.hook_name)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SAE":
        """A copy on ``device`` / in ``dtype`` (tensors are shared when nothing changes)."""
        kw = {n: t.to(device=device, dtype=dtype) for n, t in self.tensors().items()}
        return replace(self, **kw)

    # ------------------------------------------------------------------ maths
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The activation function applied to pre-activations ``h``."""
        if self.activation == "relu":
            return torch.relu(h)
        if self.activation == "jumprelu":
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        top = torch.topk(h, self.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., d_sae)`` of residual-stream vectors ``x`` ``(..., d_in)``."""
        return self.activate(self.pre_activations(x))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    __call__ = forward

    # ------------------------------------------------------------------ checks
    def check_against(self, hidden_size: int, num_layers: int, layer: int) -> None:
        """Raise SAEError unless this SAE reads the residual stream of width
        ``hidden_size`` at our layer ``layer`` (0 <= layer < num_layers)."""
        if self.d_in != hidden_size:
            raise SAEError(f"SAE {self._name()} has width d_in={self.d_in} but the model has hidden size {hidden_size}")
        if not 0 <= layer < num_layers:
            raise SAEError(f"layer {layer} is out of range: the model has {num_layers} layers (0-{num_layers - 1})")
        mine = self.layer
        if mine is None:
            raise SAEError(f"SAE {self._name()} is hooked at {self.hook_name!r}, not a residual-stream input "
                           f"(blocks.L.hook_resid_pre); layer {layer} was requested")
        if mine != layer:
            raise SAEError(f"SAE {self._name()} is hooked at layer {mine} ({self.hook_name}) but layer {layer} "
                           f"({hook_name_for_layer(layer)}) was requested")

    # ------------------------------------------------------------------ disk
    def cfg(self) -> dict:
        """cfg.json contents (SAELens pre-6 flat fields, plus ``k`` and ``surgery``)."""
        layer = self.layer
        cfg = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "activation_fn_str": "topk" if self.activation == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.activation == "topk" else {},
            "apply_b_dec_to_input": bool(self.apply_b_dec_to_input),
            "normalize_activations": "none",
            "finetuning_scaling_factor": False,
            "dtype": "float32",
            "device": "cpu",
            "model_name": self.model_name,
            "hook_name": self.hook_name,
            "hook_layer": layer - 1 if self.hook_name and _RESID_POST.match(self.hook_name) else layer,
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": None,
            "dataset_path": "",
            "dataset_trust_remote_code": False,
            "model_from_pretrained_kwargs": {},
            "seqpos_slice": [None],
            "sae_lens_training_version": None,
            "neuronpedia_id": None,
        }
        if self.activation == "topk":
            cfg["k"] = self.k
        if self.info:
            cfg["surgery"] = self.info
        return cfg

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``folder/cfg.json`` and ``folder/sae_weights.safetensors``
        atomically (a temporary sibling renamed into place)."""
        from ..checkpoint.files import write_safetensors

        out = Path(folder)
        if out.exists() and not overwrite:
            raise SAEError(f"output folder exists: {out} (use overwrite)")
        if out.exists() and not out.is_dir():
            raise SAEError(f"output path exists and is not a folder: {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        old = None
        try:
            tmp.mkdir()
            tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.tensors().items()}
            write_safetensors(tmp / WEIGHTS_FILE, tensors)
            (tmp / CFG_FILE).write_text(json.dumps(self.cfg(), indent=2) + "\n", encoding="utf-8")
            if out.exists():
                old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(out, old)
            os.rename(tmp, out)
        except OSError as e:
            if old is not None and not out.exists():
                os.rename(old, out)
                old = None
            raise SAEError(f"cannot write SAE to {out}: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return out


# ---------------------------------------------------------------------------- loading
def _parse_cfg(cfg: dict, where: str) -> dict:
    """The fields we need, from either cfg dialect."""
    meta = cfg.get("metadata") or cfg.get("meta") or {}
    meta = meta if isinstance(meta, dict) else {}
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise SAEError(f"{where}: field {key} is missing or not a positive integer")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise SAEError(f"{where}: normalize_activations={norm!r} is not supported (only 'none'); fold the scaling "
                       "into the weights first (SAELens: sae.fold_activation_norm_scaling_factor)")
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise SAEError(f"{where}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEError(f"{where}: rescale_acts_by_decoder_norm is not supported")
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")) or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = None
    if arch == "topk" or fn == "topk":
        activation = "topk"
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int) and not (isinstance(k, float) and k.is_integer()):
            raise SAEError(f"{where}: TopK SAE without an integer k (field k or activation_fn_kwargs.k)")
        k = int(k)
    elif arch == "jumprelu" and fn == "relu":
        activation = "jumprelu"
    elif arch == "standard" and fn == "relu":
        activation = "relu"
    else:
        raise SAEError(f"{where}: architecture {arch!r} with activation {fn!r} is not supported "
                       "(standard/relu, jumprelu, topk)")
    return {
        "activation": activation,
        "k": k,
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True)),
        "hook_name": cfg.get("hook_name") or cfg.get("hook_point") or meta.get("hook_name"),
        "model_name": cfg.get("model_name") or meta.get("model_name"),
        "finetuning_scaling_factor": bool(cfg.get("finetuning_scaling_factor", False)),
        "info": cfg.get("surgery") if isinstance(cfg.get("surgery"), dict) else {},
    }


def _saes_below(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(str(p.parent.relative_to(folder)) for p in folder.rglob(CFG_FILE) if p.parent != folder)


def load_sae_folder(folder: str | Path, label: str | None = None) -> SAE:
    """Load one SAE from a local folder holding cfg.json + sae_weights.safetensors."""
    from safetensors import safe_open

    folder = Path(folder)
    label = label or str(folder)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        below = _saes_below(folder)
        if below:
            shown = ", ".join(below[:8]) + (f" (and {len(below) - 8} more)" if len(below) > 8 else "")
            raise SAEError(f"{label} holds several SAEs ({shown}); choose one as {label}/<subfolder>")
        raise SAEError(f"{label} is not an SAE folder: {cfg_path} not found")
    if not w_path.is_file():
        raise SAEError(f"SAE weights not found: {w_path}")
    cfg = read_json_object(cfg_path, SAEError)
    p = _parse_cfg(cfg, str(cfg_path))
    try:
        with safe_open(str(w_path), framework="pt") as f:
            raw = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise SAEError(f"cannot read {w_path}: {type(e).__name__}: {_one_line(e)}") from None
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if n not in raw:
            raise SAEError(f"{w_path}: tensor {n} is missing (has: {', '.join(sorted(raw))})")
    t = {n: v.to(torch.float32) for n, v in raw.items()}
    if "scaling_factor" in t:
        if p["finetuning_scaling_factor"] or not torch.allclose(t["scaling_factor"], torch.ones_like(t["scaling_factor"])):
            raise SAEError(f"{w_path}: a finetuning scaling_factor is not supported")
    threshold = None
    if p["activation"] == "jumprelu":
        if "threshold" in t:
            threshold = t["threshold"]
        elif "log_threshold" in t:
            threshold = t["log_threshold"].exp()
        else:
            raise SAEError(f"{w_path}: JumpReLU SAE without a threshold (or log_threshold) tensor")
    for n, v in t.items():
        if not torch.isfinite(v).all():
            raise SAEError(f"{w_path}: tensor {n} has non-finite values")
    if tuple(t["W_enc"].shape) != (p["d_in"], p["d_sae"]):
        raise SAEError(f"{w_path}: tensor W_enc has shape {tuple(t['W_enc'].shape)} but cfg.json says "
                       f"d_in={p['d_in']}, d_sae={p['d_sae']}")
    return SAE(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], activation=p["activation"], k=p["k"],
               threshold=threshold, apply_b_dec_to_input=p["apply_b_dec_to_input"], hook_name=p["hook_name"],
               model_name=p["model_name"], info=p["info"], source=label)


def _hub_download(repo: str, sub: str, revision: str | None) -> Path:
    import huggingface_hub

    prefix = f"{sub}/" if sub else ""
    label = f"{repo}/{sub}" if sub else repo

    def fetch(patterns):
        try:
            return Path(huggingface_hub.snapshot_download(repo_id=repo, revision=revision, allow_patterns=patterns))
        except Exception as e:  # noqa: BLE001 - network, missing repo, gated: all one-line user errors
            rev = f"@{revision}" if revision else ""
            raise SAEError(f"cannot fetch SAE {label}{rev} from the Hub: {type(e).__name__}: {_one_line(e)}"[:500]) from None

    root = fetch([prefix + CFG_FILE, prefix + "*/" + CFG_FILE])
    if not (root / prefix / CFG_FILE).is_file():
        return root / prefix  # load_sae_folder lists the SAEs below it, or says none is there
    return fetch([prefix + CFG_FILE, prefix + WEIGHTS_FILE]) / prefix


def load_sae(source: str | Path, subfolder: str | None = None, revision: str | None = None) -> SAE:
    """Load an SAE from a local folder or the Hub.

    ``source`` is a folder, or ``owner/name`` optionally followed by
    ``/subfolder`` (a repository may hold several SAEs, one per subfolder);
    ``subfolder`` appends to either.  A folder holding several SAEs and no
    choice of one is an error that lists them."""
    text = str(source)
    local = Path(text).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        return load_sae_folder(folder, str(folder))
    m = _HUB.match(text)
    if not m or text.startswith((".", "/", "~")):
        raise SAEError(f"SAE not found: {text} is neither a folder nor a Hub id (owner/name[/subfolder])")
    sub = "/".join(s for s in ((m.group("sub") or "").strip("/"), (subfolder or "").strip("/")) if s)
    if ".." in sub.split("/"):
        raise SAEError(f"bad SAE subfolder {sub!r}")
    folder = _hub_download(m.group("repo"), sub, revision)
    return load_sae_folder(folder, f"{m.group('repo')}/{sub}" if sub else m.group("repo"))


def random_sae(d_in: int, d_sae: int, activation: str = "topk", k: int | None = None, seed: int = 0,
               hook_name: str | None = None) -> SAE:
    """An SAE with unit-norm random decoder rows and ``W_enc = W_dec^T`` (the
    usual training initialisation; also handy in tests)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).float()
    thr = torch.zeros(d_sae) if activation == "jumprelu" else None
    return SAE(w_dec.T.contiguous(), torch.zeros(d_sae), w_dec, torch.zeros(d_in), activation=activation,
               k=k if activation == "topk" else None, threshold=thr, hook_name=hook_name)


__all__ = ["SAE", "SAEError", "load_sae", "load_sae_folder", "random_sae", "hook_name_for_layer", "layer_of_hook",
           "CFG_FILE", "WEIGHTS_FILE", "ACTIVATIONS"]
