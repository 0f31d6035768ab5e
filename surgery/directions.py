"""Refusal directions: difference of means of residual-stream activations,
candidate scoring and selection, and the direction artifact.

Three sources of candidates (methods.md §1, findings.md):

``prompt``    harmful minus harmless prompts at the post-instruction positions
              (Arditi et al.).  On a model that refuses, this is the refusal
              direction; on one that does not, it encodes "harmful topic" and
              adding it back does not cause refusals.
``system``    the same, with a safety system prompt prepended to both sets (ROSI's
              remedy for uncensored models).
``response``  (default) on harmful prompts, the residual stream over the first
              ``k`` reply tokens when the reply is a refusal minus when it is the
              model's own greedy reply.  This is what "about to refuse" looks like
              inside the model, and it exists even in models that never refuse.

Every candidate (source, layer, position) is scored with cheap refusal-score
proxies (no generation):
``bypass``    mean refusal score on harmful validation prompts with the direction
              ablated everywhere (lower: the direction matters more for refusals
              the model already makes);
``induce``    mean refusal score on harmless validation prompts with ``r`` added at
              its layer (Arditi: must be > 0);
``induce_harmful`` the same on harmful validation prompts;
``kl``        first-token KL on harmless prompts under ablation (must be < 0.1);
and candidates from the last 20% of layers are dropped.  The ablation scores
(bypass, kl) cost two of the four passes and are computed only for the
``bypass`` ranking (or with ``full_scores``); ``kl_induce`` is the first-token KL
on harmless prompts with ``r`` added.  Survivors are ranked by
``rank_by``: ``bypass`` (Arditi's default, for models that refuse) or
``selectivity`` = ``induce_harmful - induce`` (our default for hardening: we
want a direction that pushes harmful requests towards refusal more than harmless
ones; Arditi's kl and induce filters guard an *ablation* and are not applied to it).  When no candidate survives the filters, the best-ranked one overall is
chosen with a warning instead of failing.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .activations import add_vector, layer_input_hook, mean_residuals
from .checkpoint.files import read_json_object, save_tensors, write_text_atomic
from .evaluation.metrics import kl_div, last_logprobs
from .errors import DirectionError
from .model import LoadedModel, patched_weights
from .prompts import format_chat, refusal_texts

log = logging.getLogger(__name__)

SAFETY_SYSTEM_PROMPT = (
    "You are a helpful assistant that strictly refuses any request that is unsafe, harmful, unethical "
    "or illegal. When you refuse, begin your reply with \"I'm sorry\" or \"I can't\"."
)
SOURCES = ("prompt", "system", "response")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


# ----------------------------------------------------------------------------- scores
def refusal_token_ids(tokenizer) -> list[int]:
    """First tokens of refusal replies ("I", "Sorry", "As", ...) for this tokenizer."""
    starts = {"I", "Sorry", "As", "I'm", "Unfortunately"}
    for t in refusal_texts():
        starts.add(t.split()[0])
    ids = set()
    for s in starts:
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(toks[0])
    return sorted(ids)


def refusal_score_from_logprobs(logp: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """``log p(R) - log(1 - p(R))`` per row, R = the refusal first tokens."""
    lp = torch.logsumexp(logp[:, list(ids)], dim=-1)
    p = lp.exp().clamp(max=1 - 1e-7)
    return lp - torch.log1p(-p)


# ----------------------------------------------------------------------------- edits used while measuring
def _writer_params(lm: LoadedModel):
    names = [n for n, _ in lm.model.named_parameters()]
    return lm.arch.residual_writers(names, lm.model.config, include_embedding=False)


@contextlib.contextmanager
def ablated(lm: LoadedModel, direction: torch.Tensor) -> Iterator[None]:
    """Directional ablation everywhere: every residual write (and the embedding
    output, via a hook at layer 0) has its component along ``direction`` removed.

    A write that passes through a norm before the residual add (gemma2/3, olmo2:
    ``WriterTensor.post_norm``) is ablated at that norm's output by a forward hook:
    the norm's per-channel weights would put a component along ``direction`` back
    into a weight-projected write."""
    r = (direction / direction.norm()).to(torch.float32).to(lm.device)
    params = dict(lm.model.named_parameters())
    modules = dict(lm.model.named_modules())
    new, norms = {}, set()
    for w in _writer_params(lm):
        if w.post_norm is not None:
            norms.add(w.post_norm.rsplit(".", 1)[0])
            continue
        p = params[w.name].data.float()
        if w.layout == "bias":
            new[w.name] = p - r * (r @ p)
            continue
        m = w.as_out_in(p)  # (..., d, d_in)
        m = m - torch.einsum("d,...di->...i", r, m).unsqueeze(-2) * r.view(*([1] * (m.dim() - 2)), -1, 1)
        new[w.name] = w.from_out_in(m)
    def project(h: torch.Tensor) -> torch.Tensor:
        rr = r.to(h.dtype)
        return h - (h @ rr).unsqueeze(-1) * rr

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched_weights(lm.model, new))
        stack.enter_context(layer_input_hook(lm, 0, project))
        for name in sorted(norms):
            handle = modules[name].register_forward_hook(lambda mod, args, out: project(out))
            stack.callback(handle.remove)
        yield


# ----------------------------------------------------------------------------- candidates
def post_instruction_positions(tokenizer, system: str | None = None, max_positions: int = 5) -> list[int]:
    """Negative positions of the template tokens that follow the instruction text."""
    marker = "XQZJ instruction"
    text = format_chat(tokenizer, marker, system=system)
    tail = text[text.index(marker) + len(marker):]
    n = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    n = max(1, min(n, max_positions))
    return list(range(-n, 0))


@dataclass
class Candidate:
    source: str
    layer: int
    position: int | str  # negative index, or "reply[0:k]"
    vector: torch.Tensor  # float64 (d,), raw difference of means
    scores: dict = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def describe(self) -> dict:
        return {"source": self.source, "layer": self.layer, "position": self.position, "norm": self.norm, **self.scores}


def prompt_candidates(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], system: str | None = None,
                      source: str = "prompt", positions: Sequence[int] | None = None, batch_size: int = 16) -> list[Candidate]:
    tok = lm.tokenizer
    pos = list(positions) if positions is not None else post_instruction_positions(tok, system)
    h = mean_residuals(lm, [format_chat(tok, p, system=system) for p in harmful], pos, batch_size=batch_size)
    b = mean_residuals(lm, [format_chat(tok, p, system=system) for p in harmless], pos, batch_size=batch_size)
    diff = h - b  # (P, L, d)
    return [Candidate(source, layer, p, diff[i, layer].clone()) for i, p in enumerate(pos) for layer in range(lm.num_layers)]


@torch.no_grad()
def response_candidates(lm: LoadedModel, harmful: Sequence[str], refusal: str | Sequence[str] = DEFAULT_REFUSAL,
                        k: int = 4, batch_size: int = 16) -> list[Candidate]:
    """Refusal-reply minus own-reply activations over the first ``k`` reply
    tokens.  ``refusal`` may be several texts: prompt ``i`` gets text ``i mod n``."""
    from .evaluation.generate import generate

    tok = lm.tokenizer
    refusals = [refusal] if isinstance(refusal, str) else list(refusal)
    texts = [format_chat(tok, p) for p in harmful]
    _, own = generate(lm, harmful, max_new_tokens=k, batch_size=batch_size, return_ids=True)
    ref_ids = [tok(r, add_special_tokens=False)["input_ids"][:k] for r in refusals]
    for r, ids in zip(refusals, ref_ids):
        if len(ids) < k:
            raise DirectionError(f"refusal text is shorter than {k} tokens: {r!r}")
    # Prompts whose own reply is shorter than k tokens (immediate EOS) are dropped.
    keep = [i for i, ids in enumerate(own) if len(ids) >= k]
    if not keep:
        raise DirectionError("the model's replies to the harmful prompts are all shorter than the reply window")
    pos = list(range(-k, 0))
    sub = [texts[i] for i in keep]
    refu = mean_residuals(lm, sub, pos, suffixes=[ref_ids[i % len(ref_ids)] for i in keep], batch_size=batch_size,
                          average_positions=True)
    comp = mean_residuals(lm, sub, pos, suffixes=[own[i][:k] for i in keep], batch_size=batch_size, average_positions=True)
    diff = (refu - comp)[0]
    return [Candidate("response", layer, f"reply[0:{k}]", diff[layer].clone()) for layer in range(lm.num_layers)]


# ----------------------------------------------------------------------------- scoring & selection
@dataclass
class ScoringData:
    harmful_texts: list[str]
    harmless_texts: list[str]
    refusal_ids: list[int]
    base_harmful: torch.Tensor  # refusal scores without intervention
    base_harmless: torch.Tensor
    base_harmless_logp: torch.Tensor


def scoring_data(lm: LoadedModel, harmful_val: Sequence[str], harmless_val: Sequence[str], batch_size: int = 16) -> ScoringData:
    tok = lm.tokenizer
    ht = [format_chat(tok, p) for p in harmful_val]
    bt = [format_chat(tok, p) for p in harmless_val]
    ids = refusal_token_ids(tok)
    lh = last_logprobs(lm, ht, batch_size)
    lb = last_logprobs(lm, bt, batch_size)
    return ScoringData(ht, bt, ids, refusal_score_from_logprobs(lh, ids), refusal_score_from_logprobs(lb, ids), lb)


def score_candidate(lm: LoadedModel, c: Candidate, data: ScoringData, batch_size: int = 16,
                    ablation: bool = True) -> dict:
    """Refusal-score proxies for one candidate.  ``ablation=False`` skips the
    two ablation passes (bypass, kl), which only the ``bypass`` ranking needs."""
    out = {}
    if ablation:
        with ablated(lm, c.vector):
            lh = last_logprobs(lm, data.harmful_texts, batch_size)
            lb = last_logprobs(lm, data.harmless_texts, batch_size)
        out["bypass"] = refusal_score_from_logprobs(lh, data.refusal_ids).mean().item()
        out["kl"] = kl_div(data.base_harmless_logp, lb).mean().item()
    v = c.vector.to(torch.float32)
    with add_vector(lm, c.layer, v):
        lb = last_logprobs(lm, data.harmless_texts, batch_size)
        ib = refusal_score_from_logprobs(lb, data.refusal_ids).mean().item()
        ih = refusal_score_from_logprobs(last_logprobs(lm, data.harmful_texts, batch_size), data.refusal_ids).mean().item()
    out.update({"induce": ib, "induce_harmful": ih, "selectivity": ih - ib,
                "kl_induce": kl_div(data.base_harmless_logp, lb).mean().item()})
    return out


def select(candidates: list[Candidate], num_layers: int, rank_by: str = "selectivity", kl_max: float = 0.1,
           max_layer_frac: float = 0.8) -> tuple[int, str]:
    """Index of the chosen candidate and a sentence saying why."""
    def key(c: Candidate) -> float:
        if rank_by == "bypass":
            return c.scores["bypass"]
        if rank_by == "selectivity":
            return -c.scores["selectivity"]
        if rank_by == "induce_harmful":
            return -c.scores["induce_harmful"]
        raise DirectionError(f"unknown rank_by {rank_by!r}; use bypass, selectivity or induce_harmful")

    cutoff = int(math.floor(num_layers * max_layer_frac))
    reasons = {}
    for i, c in enumerate(candidates):
        why = []
        if c.layer >= cutoff:
            why.append(f"layer >= {cutoff}")
        if c.scores.get("induce", 1.0) <= 0 and rank_by == "bypass":
            why.append("induce <= 0")
        if rank_by == "bypass" and c.scores.get("kl", 0.0) >= kl_max:
            why.append(f"kl >= {kl_max}")
        c.scores["filtered"] = "; ".join(why)
        reasons[i] = why
    filters = f"layer < {cutoff}" + (f", kl < {kl_max}, induce > 0" if rank_by == "bypass" else "")
    alive = [i for i in range(len(candidates)) if not reasons[i]]
    if alive:
        best = min(alive, key=lambda i: key(candidates[i]))
        return best, f"best {rank_by} among {len(alive)} of {len(candidates)} candidates passing the filters ({filters})"
    scored = [i for i, c in enumerate(candidates) if rank_by in c.scores]
    if not scored:
        raise DirectionError(f"no candidate has a {rank_by} score (the model has too few layers below the cut-off)")
    best = min(scored, key=lambda i: key(candidates[i]))
    msg = (f"no candidate passed the filters ({filters}); falling back to the best "
           f"{rank_by} overall: {candidates[best].source} layer {candidates[best].layer}")
    log.warning(msg)
    return best, msg


# ----------------------------------------------------------------------------- artifact
@dataclass
class Directions:
    candidates: list[Candidate]
    chosen: int
    reason: str
    meta: dict = field(default_factory=dict)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    @staticmethod
    def path_for(path: str | Path) -> Path:
        """The file :meth:`save` writes for ``path`` (a ``.safetensors`` suffix enforced)."""
        path = Path(path)
        return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")

    def save(self, path: str | Path) -> Path:
        """``path`` (.safetensors) holds the vectors; ``path`` + ``.json`` the metadata."""
        path = self.path_for(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        vecs = torch.stack([c.vector.to(torch.float32) for c in self.candidates])
        tensors = {"directions": vecs.contiguous(), "chosen": self.best.vector.to(torch.float32).contiguous()}
        save_tensors(tensors, path, {"format": "surgery.directions/1"})
        meta = {"format": "surgery.directions/1", "chosen": self.chosen, "reason": self.reason,
                "candidates": [c.describe() for c in self.candidates], **self.meta}
        write_text_atomic(Path(str(path) + ".json"), json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        from safetensors import safe_open

        path = Path(path).expanduser()
        meta_path = Path(str(path) + ".json")
        if not path.is_file():
            raise DirectionError(f"direction file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                if "directions" in names:
                    vecs = f.get_tensor("directions")
                    chosen_vec = f.get_tensor("chosen") if "chosen" in names else None
                elif len(names) == 1:  # a bare vector (or stack of them) saved by another tool
                    vecs, chosen_vec = f.get_tensor(names[0]), None
                else:
                    raise DirectionError(f"direction file {path} has no 'directions' tensor (it holds "
                                         f"{', '.join(names) or 'no tensors'})")
        except DirectionError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise DirectionError(f"cannot read direction file {path}: {e}") from None
        vecs = vecs.reshape(1, -1) if vecs.dim() == 1 else vecs
        if vecs.dim() != 2 or vecs.shape[0] == 0:
            raise DirectionError(f"direction file {path}: expected vectors (n, d), got shape {tuple(vecs.shape)}")
        if meta_path.is_file():
            meta = read_json_object(meta_path, DirectionError)
        else:
            # no sidecar: the file's own 'chosen' vector is the direction (it was candidate 0 before)
            idx = next((i for i, v in enumerate(vecs) if chosen_vec is not None and torch.equal(v, chosen_vec)), None)
            if chosen_vec is not None and idx is None:
                vecs, idx = torch.cat([chosen_vec.reshape(1, -1).to(vecs.dtype), vecs]), 0
            meta = {"chosen": idx or 0, "reason": "", "candidates": []}
            log.warning("%s has no %s: using its chosen vector, with no record of its layer or source",
                        path, meta_path.name)
        descs = meta.get("candidates") or [{} for _ in range(vecs.shape[0])]
        if len(descs) != vecs.shape[0]:
            raise DirectionError(f"{meta_path}: {len(descs)} candidates described but {vecs.shape[0]} vectors stored")
        chosen = meta.get("chosen", 0)
        if not isinstance(chosen, int) or not 0 <= chosen < vecs.shape[0]:
            raise DirectionError(f"{meta_path}: 'chosen' is {chosen!r}, not a candidate index 0-{vecs.shape[0] - 1}")
        cands = []
        try:
            for v, d in zip(vecs, descs):
                scores = {k: d[k] for k in d if k not in ("source", "layer", "position", "norm")}
                cands.append(Candidate(d.get("source", "unknown"), int(d.get("layer", -1)), d.get("position", -1),
                                       v.double(), scores))
        except (AttributeError, TypeError, ValueError) as e:
            raise DirectionError(f"{meta_path}: malformed candidate record ({e})") from None
        extra = {k: v for k, v in meta.items() if k not in ("chosen", "reason", "candidates", "format")}
        return cls(cands, chosen, meta.get("reason", ""), extra)

    def check_width(self, d: int, what: str = "model") -> None:
        if self.best.vector.shape[-1] != d:
            raise DirectionError(f"direction has width {self.best.vector.shape[-1]} but the {what} has hidden size {d}")


def compute_directions(lm: LoadedModel, harmful_train: Sequence[str], harmless_train: Sequence[str],
                       harmful_val: Sequence[str], harmless_val: Sequence[str], sources: Sequence[str] = ("response",),
                       rank_by: str = "selectivity", system_prompt: str = SAFETY_SYSTEM_PROMPT,
                       refusal: str | Sequence[str] = DEFAULT_REFUSAL, reply_tokens: int = 4, positions: Sequence[int] | None = None,
                       layers: Sequence[int] | None = None, batch_size: int = 16, progress=None,
                       full_scores: bool = False) -> Directions:
    sources = tuple(dict.fromkeys(sources))  # a repeated --source is computed once
    for s in sources:
        if s not in SOURCES:
            raise DirectionError(f"unknown direction source {s!r}; choose from {', '.join(SOURCES)}")
    cands: list[Candidate] = []
    for s in sources:
        if s == "prompt":
            cands += prompt_candidates(lm, harmful_train, harmless_train, None, "prompt", positions, batch_size)
        elif s == "system":
            cands += prompt_candidates(lm, harmful_train, harmless_train, system_prompt, "system", positions, batch_size)
        else:
            cands += response_candidates(lm, harmful_train, refusal, reply_tokens, batch_size)
    cutoff = int(math.floor(lm.num_layers * 0.8))
    if layers is not None:
        cands = [c for c in cands if c.layer in set(layers)]
    # Layer 0 input is the embedding alone: ablating or adding there is not a residual-stream direction.
    cands = [c for c in cands if c.layer >= 1]
    data = scoring_data(lm, harmful_val, harmless_val, batch_size)
    for i, c in enumerate(cands):
        if c.layer >= cutoff:
            c.scores = {"skipped": "layer cut-off"}  # never scored, never chosen
            continue
        c.scores = score_candidate(lm, c, data, batch_size, ablation=full_scores or rank_by == "bypass")
        if progress:
            progress(i, len(cands), c)
    chosen, reason = select(cands, lm.num_layers, rank_by)
    meta = {"rank_by": rank_by, "sources": list(sources), "reply_tokens": reply_tokens, "refusal_text": refusal,
            "system_prompt": system_prompt if "system" in sources else None,
            "baseline": {"refusal_score_harmful": data.base_harmful.mean().item(),
                         "refusal_score_harmless": data.base_harmless.mean().item()},
            "refusal_token_ids": data.refusal_ids, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size}
    return Directions(cands, chosen, reason, meta)
