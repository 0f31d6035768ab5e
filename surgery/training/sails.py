"""SAILS (methods.md §4): LoRA adapters whose updates lie in an interpretable
safety subspace built from sparse-autoencoder features.

1. SAEs: loaded (``sae``: a folder with ``layer_{l}/`` SAEs as ``surgery sae
   train`` writes them, one SAELens folder, or a Hub id), or trained now on
   the model's own activations over the refusal training texts (prompt +
   reply, both refusals and the model's replies, so refusal features exist).
2. Feature scores ``|E_A[a_i] - E_B[a_i]|`` for a contrast:
   * ``prompt``: harmful vs harmless train prompts at the post-instruction
     positions (the template tokens after the instruction);
   * ``response``: the first reply tokens when the reply is a refusal (harmful
     prompts) vs when it is the model's own answer (harmless prompts);
   * ``both`` (default): the two pooled (A = harmful prompts and refusals,
     B = harmless prompts and answers).
   Top ``k_features`` kept, their decoder rows stacked, uncentred PCA to
   ``variance``, QR → ``U`` (d × r) per SAE layer.
3. Adapters: every residual-stream writer gets ``B = U`` (frozen unless
   ``train_b``) and ``A = 0`` (trainable); a writer in layer i uses the subspace
   of the first SAE layer after i (see :func:`surgery.training.lora.nearest_subspace`).

The manifest records the SAE sources (hash of the weights), the features kept
with their scores and top-activating prompts, and the subspace rank per layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..checkpoint import sha256_file
from ..errors import SurgeryError, check_count
from ..model import LoadedModel
from .data import RefusalData
from .harden import TrainMethod
from .lora import LoraSpec

CONTRASTS = ("prompt", "response", "both")
REFUSALS = ("own-refusal", "refusal-text")  # harmful prompts with their refusal
ANSWERS = ("own-reply",)  # harmless / borderline prompts with the model's own answer


def _texts(lm: LoadedModel, data: RefusalData, origins: tuple[str, ...], reply_tokens: int | None) -> list[str]:
    tok = lm.tokenizer
    out = []
    for e in data.examples:
        if e.origin not in origins:
            continue
        reply = e.reply_ids if reply_tokens is None else e.reply_ids[:reply_tokens]
        out.append(tok.decode(e.prompt_ids + reply))
    return out


SAE_DEPTHS = (8 / 30, 16 / 30)  # SAEs trained now: layers 8 and 16 of SmolLM2-135M's 30, at the same depth elsewhere


def default_sae_layers(n_layers: int) -> list[int]:
    """The layers of the SAEs trained when neither ``--sae`` nor ``--sae-layers``
    is given: the same relative depths as layers 8 and 16 of a 30-layer model
    (rounded, distinct; a 4-layer model gets 1 and 2)."""
    return sorted({min(n_layers - 1, int(f * n_layers + 0.5)) for f in SAE_DEPTHS})


class Sails(TrainMethod):
    name = "sails"

    def __init__(self, sae: str | None = None, sae_layers: Sequence[int] | None = None,
                 layers: Sequence[int] | None = None, targets: Sequence[str] = ("writers",), k_features: int = 64,
                 variance: float = 0.80, contrast: str = "both", train_b: bool = False, d_sae: int | None = None,
                 sae_k: int = 32, sae_epochs: float = 5.0, response_tokens: int = 4, seed: int = 0):
        if contrast not in CONTRASTS:
            raise SurgeryError(f"SAILS contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
        if sae_layers is not None and not sae_layers:
            raise SurgeryError("SAILS needs at least one SAE layer (--sae-layers)")
        check_count(k_features, "--k-features")
        if not 0 < variance <= 1:
            raise SurgeryError(f"--variance must be in (0, 1], got {variance!r}")
        if not sae_epochs > 0:
            raise SurgeryError(f"SAILS needs sae_epochs > 0, got {sae_epochs!r}")
        check_count(response_tokens, "SAILS response_tokens")
        self.sae_source = sae
        self.sae_layers = None if sae_layers is None else sorted(set(int(x) for x in sae_layers))
        self.layers, self.targets = layers, tuple(targets)
        self.k_features, self.variance, self.contrast, self.train_b = k_features, variance, contrast, train_b
        self.d_sae, self.sae_k, self.sae_epochs, self.response_tokens, self.seed = d_sae, sae_k, sae_epochs, \
            response_tokens, seed
        self.saes: dict = {}  # layer -> SAE, loaded by check() (or trained in build_spec)
        self.subspaces: dict = {}
        self.record: dict = {}

    # ------------------------------------------------------------------ plan
    def check(self, reader, arch) -> None:
        """Before any work: the adapted modules, the SAE layers, and the SAEs given
        (loaded here: width and layer checked) or the sizes of those to train."""
        from ..architectures import check_layers
        from ..sae.train import check_sizes
        from .lora import select_targets

        select_targets(reader.names, arch, reader.config, LoraSpec(targets=self.targets, layers=self.layers))
        hidden, n_layers = arch.hidden_size(reader.config), arch.num_layers(reader.config)
        if self.sae_source:
            self.saes = self._load_saes(hidden, n_layers)
            self.sae_layers = sorted(self.saes)
            return
        given = self.sae_layers is not None
        self.sae_layers = self.sae_layers if given else default_sae_layers(n_layers)
        check_layers(self.sae_layers, n_layers, "SAE layers (--sae-layers)")
        self.d_sae = self.d_sae or 4 * hidden
        check_sizes(self.d_sae, self.sae_k)

    # ------------------------------------------------------------------ SAEs
    def _load_saes(self, hidden: int, n_layers: int) -> dict:
        """The SAEs of ``--sae``: a ``surgery sae train`` folder (``layer_L/``
        subfolders; default: all its layers), or one SAE (folder or Hub id;
        default: its own layer).  ``--sae-layers`` picks among them."""
        import re

        from ..sae import load_sae
        from ..sae.model import CFG_FILE

        src = self.sae_source
        root = Path(src).expanduser()
        folders = {}
        if root.is_dir() and not (root / CFG_FILE).is_file():
            folders = {int(m.group(1)): p for p in root.iterdir()
                       if (m := re.fullmatch(r"layer_(\d+)", p.name)) and (p / CFG_FILE).is_file()}
        if folders:
            layers = self.sae_layers if self.sae_layers is not None else sorted(folders)
            missing = [l for l in layers if l not in folders]
            if missing:
                raise SurgeryError(f"--sae {src} has no SAE for --sae-layers {','.join(map(str, missing))} "
                                   f"(no layer_{missing[0]}/); it holds layers {','.join(map(str, sorted(folders)))}")
            saes = {l: load_sae(folders[l]) for l in layers}
        else:
            sae = load_sae(src)
            if sae.layer is None:
                raise SurgeryError(f"--sae {src} is hooked at {sae.hook_name!r}, not a residual-stream input "
                                   "(blocks.L.hook_resid_pre)")
            layers = self.sae_layers if self.sae_layers is not None else [sae.layer]
            wrong = [l for l in layers if l != sae.layer]
            if wrong:
                raise SurgeryError(f"--sae {src} is one SAE, at layer {sae.layer} ({sae.hook_name}), but --sae-layers "
                                   f"asks for {','.join(map(str, wrong))}")
            saes = {l: sae for l in layers}
        for layer, sae in saes.items():
            sae.check_against(hidden, n_layers, layer)
        return saes

    def _train_saes(self, lm: LoadedModel, data: RefusalData, work: Path, say) -> dict:
        from ..sae import collect_activations, train_sae
        from ..sae.model import hook_name_for_layer
        from ..sae.train import check_sizes, layer_folder

        d_sae = self.d_sae = self.d_sae or 4 * lm.hidden_size
        check_sizes(d_sae, self.sae_k)
        texts = _texts(lm, data, REFUSALS, None) + _texts(lm, data, ANSWERS, None)
        say(f"training SAEs at layers {self.sae_layers} (d_sae {d_sae}, k {self.sae_k}) on {len(texts)} texts "
            "(refusal training prompts with their replies)")
        acts = collect_activations(lm, texts, self.sae_layers, positions="all", skip_first=1)
        saes = {}
        for layer in self.sae_layers:
            sae, metrics = train_sae(acts[layer], d_sae, self.sae_k, epochs=self.sae_epochs, seed=self.seed,
                                     hook_name=hook_name_for_layer(layer), model_name=str(lm.folder))
            say(f"  layer {layer}: explained variance {metrics['explained_variance']:.3f}, "
                f"L0 {metrics['mean_l0']:.1f}, dead {metrics['dead_fraction']:.1%}")
            sae.save(layer_folder(work / "sae", layer))
            sae.info = {**(sae.info or {}), "metrics": metrics}
            saes[layer] = sae
        return saes

    # ------------------------------------------------------------------ spec
    def build_spec(self, lm, prompts, data, work, say) -> LoraSpec:
        from ..directions import post_instruction_positions
        from ..sae import collect_activations, safety_subspace

        if not self.saes and self.sae_source:
            self.saes = self._load_saes(lm.hidden_size, lm.num_layers)
        if self.sae_layers is None:
            self.sae_layers = default_sae_layers(lm.num_layers)
        saes = self.saes or self._train_saes(lm, data, work, say)
        pos = post_instruction_positions(lm.tokenizer)
        harm_p = [e.prompt for e in data.examples if e.origin in REFUSALS]
        safe_p = [e.prompt for e in data.examples if e.origin in ANSWERS]
        from ..evaluation.generate import chat_texts

        sides_a, sides_b, text_a, text_b = [], [], [], []
        if self.contrast in ("prompt", "both"):
            sides_a.append(collect_activations(lm, chat_texts(lm, harm_p), self.sae_layers, positions=pos,
                                               return_index=True))
            sides_b.append(collect_activations(lm, chat_texts(lm, safe_p), self.sae_layers, positions=pos,
                                               return_index=True))
            text_a.append(harm_p)
            text_b.append(safe_p)
        if self.contrast in ("response", "both"):
            n = self.response_tokens
            rt = list(range(-n, 0))
            sides_a.append(collect_activations(lm, _texts(lm, data, REFUSALS, n), self.sae_layers, positions=rt,
                                               return_index=True))
            sides_b.append(collect_activations(lm, _texts(lm, data, ANSWERS, n), self.sae_layers, positions=rt,
                                               return_index=True))
            text_a.append([p + "  [refusal]" for p in harm_p])
            text_b.append([p + "  [own answer]" for p in safe_p])
        texts = [t for ts in text_a for t in ts] + [t for ts in text_b for t in ts]
        self.subspaces = {}
        for layer, sae in saes.items():
            a_rows, b_rows, a_idx, b_idx, off = [], [], [], [], 0
            for (acts, idx), ts in zip(sides_a, text_a):
                a_rows.append(acts[layer]); a_idx.append(idx + off); off += len(ts)
            for (acts, idx), ts in zip(sides_b, text_b):
                b_rows.append(acts[layer]); b_idx.append(idx + off); off += len(ts)
            sub = safety_subspace(sae, torch.cat(a_rows), torch.cat(b_rows), k_features=self.k_features,
                                  variance=self.variance, texts=texts, text_index=torch.cat(a_idx + b_idx), top_n=3)
            sub.save(work / "subspace" / f"layer_{layer}.safetensors")
            self.subspaces[layer] = sub
            say(f"  safety subspace at layer {layer}: rank {sub.rank} from {len(sub.feature_ids)} features "
                f"({sub.explained:.0%} of their energy)")
        self.record = {
            "sae": {str(l): {"source": s.source or "trained now", "hook_name": s.hook_name, "d_sae": s.d_sae,
                             "activation": s.architecture,
                             "sha256": sha256_file(Path(s.source) / "sae_weights.safetensors")
                             if s.source and (Path(s.source) / "sae_weights.safetensors").is_file() else None,
                             "metrics": (s.info or {}).get("metrics")} for l, s in saes.items()},
            "contrast": self.contrast,
            "subspace": {str(l): {"rank": s.rank, "explained": s.explained,
                                  "features": [{"id": int(f), "score": float(sc), "diff": float(df),
                                                "top_texts": s.top_texts.get(int(f), [])}
                                               for f, sc, df in zip(s.feature_ids, s.scores, s.diffs)]}
                         for l, s in self.subspaces.items()},
        }
        return LoraSpec(rank=max(s.rank for s in self.subspaces.values()), targets=self.targets, layers=self.layers,
                        init="subspace", subspace={l: s.U.float() for l, s in self.subspaces.items()},
                        train_b=self.train_b, extra={"method": "sails"})

    def parameters(self) -> dict:
        trained_now = not self.sae_source
        return {"sae": self.sae_source or "trained now", "sae_layers": self.sae_layers, "targets": list(self.targets),
                "layers": None if self.layers is None else list(self.layers), "k_features": self.k_features,
                "variance": self.variance, "contrast": self.contrast, "response_tokens": self.response_tokens,
                "train_b": self.train_b,
                "sae_training": {"d_sae": self.d_sae, "k": self.sae_k, "epochs": self.sae_epochs, "seed": self.seed}
                if trained_now else None}

    def manifest_extra(self) -> dict:
        return {"sails": self.record}

    def files(self, work: Path) -> dict[str, Path]:
        out = {}
        for sub in ("subspace", "sae"):
            d = work / sub
            if d.is_dir():
                out.update({str(p.relative_to(work)): p for p in sorted(d.rglob("*")) if p.is_file()})
        return out
