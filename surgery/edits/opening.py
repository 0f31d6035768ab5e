"""Gated opening (``surgery inject``, the default gate): a few gated neurons in the
last MLP that write the opening of a refusal, token by token, on harmful prompts only.

Why.  The linear gate (:mod:`surgery.edits.gated`) pushes the refusal direction into
the first layers, where a push converts into refusal but the inputs separate harmful
from harmless prompts only so well; on SmolLM2 it tops out near 80% harmful refusal
at first-token KL 0.15-0.3 (docs/rosi-on-smollm2.md).  The last layer's input
separates the two best, and a push there acts on the next token directly.  A fixed
push cannot write a whole refusal (every position would get the same tokens), but a
SwiGLU neuron multiplies two read vectors, so it can fire on "this is a harmful
request" *and* "the reply is at step j of the opening":

    neuron j:  act(c * u . x) * (w_j . x) / act(c) * alpha_j * d_j

``x`` the MLP's input (the normalised residual), ``u`` the harm read (about 1 on
harmful prompts, at their post-instruction positions and while the opening is being
written; about 0 on harmless prompts), ``w_j`` the step read (about 1 at the position
that predicts opening token ``t_j``: the last prompt token for ``j = 0``, else the
position of ``t_{j-1}``; about 0 at the other steps, at the rest of the refusal and
on harmless prompts), ``d_j`` the residual direction that raises ``t_j`` against what
the model would say there (mean gradient, over the harmful calibration prompts, of
``logit(t_j)`` minus the model's own expected logit without ``t_j``, through the
final norm and the unembedding), and ``alpha_j`` the smallest strength on a grid
that makes ``t_j`` the top token at step ``j`` for ``coverage`` of the harmful
calibration prompts, computed exactly from the layer's output (the last layer:
nothing runs between it and the unembedding).  Once the opening is written
("I'm sorry, but") the model goes on refusing by itself; the step reads are fitted
to stay shut over the rest of the refusal, so nothing more is forced.

Written into the weights: neuron ``n_j`` (the K least-used neurons of that MLP on
harmless prompts: mean |activation| x |down column|) gets gate row ``c u``, up row
``w_j`` and down column ``scale * alpha_j d_j / act(c)``; ``gate_proj``, ``up_proj``
and ``down_proj`` each change in K rows or columns (rank <= K), nothing else
changes, and the checkpoint keeps its architecture.  ``scale`` is what
``surgery inject`` sweeps (1 = the calibrated strengths).

Reads are fitted in closed form, as the linear gate's ridge fit: least energy on
the negative inputs (second moment, plus ``harmful_weight`` times the positives'
covariance, plus a ridge of ``ridge * trace / d``) subject to a unit mean response
on the positive ones.  Needs a gated MLP with separate ``gate_proj``/``up_proj``, no
MLP biases, and an output added to the residual stream as it is: the calibration's closed form
(:func:`layer_output`) is exact there (tested on tiny llama, mistral, qwen2, qwen3 and
gemma models, and on SmolLM2).  Sandwich-norm models (gemma2, gemma3, olmo2) normalise
the MLP's output before the add, so a neuron's write depends on every other neuron's:
they get a clear error, as do fused or ungated MLPs (phi3, gpt2, gpt_neox) and MoE.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..activations import encode
from ..defaults import INJECT_DEFAULTS, OPENING_DEFAULTS
from ..errors import SurgeryError
from ..evaluation.generate import greedy_ids
from ..model import LoadedModel, patched_weights
from ..prompts import format_chat
from .gated import penalised_gram, unit_response_read

log = logging.getLogger(__name__)

MLP_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
# strengths tried by the calibration, as multiples of the mean residual norm at the step positions
STRENGTH_GRID = tuple(round(0.02 * 1.25 ** i, 4) for i in range(27))  # 0.02 ... about 4.5


@dataclass
class OpeningGate:
    """A fitted gated opening (everything in float32 except ``tokens``/``neurons``)."""
    layer: int
    tokens: list[int]          # opening tokens t_0 .. t_{K-1}
    neurons: list[int]         # the MLP neurons that carry them
    u: torch.Tensor            # (d,) harm read
    w: torch.Tensor            # (K, d) step reads
    d: torch.Tensor            # (K, d) unit push directions
    alphas: torch.Tensor       # (K,) calibrated strengths (residual units)
    c: float                   # gate sharpness
    act_c: float               # the MLP activation at c (a neuron's output is divided by it)
    coverage: list[float]      # per step: share of harmful calibration prompts whose top token is t_j

    @property
    def k(self) -> int:
        return len(self.tokens)


def mlp_of(lm: LoadedModel, layer: int):
    """The gated MLP of ``layer`` and its parameter-name prefix; a clear error otherwise."""
    if not 0 <= layer < lm.num_layers:
        raise SurgeryError(f"gated opening: layer {layer} is outside the model's {lm.num_layers} layers")
    block = lm.layers()[layer]
    mlp = getattr(block, "mlp", None)
    parts = [getattr(mlp, n, None) for n in MLP_WEIGHTS]
    if mlp is None or any(p is None for p in parts) or not hasattr(mlp, "act_fn"):
        raise SurgeryError(f"gated opening needs a gated MLP with gate_proj/up_proj/down_proj; layer {layer} of "
                           f"{lm.model.config.model_type} has {type(mlp).__name__}")
    if any(getattr(p, "bias", None) is not None for p in parts):
        raise SurgeryError("gated opening: MLP biases are not supported (a replaced neuron's bias would leak)")
    writers = lm.arch.residual_writers([n for n, _ in lm.model.named_parameters()], lm.model.config)
    post = next((w.post_norm for w in writers if w.role == "mlp_out" and w.layer == layer and w.post_norm), None)
    if post is not None:
        raise SurgeryError(f"gated opening: {lm.model.config.model_type} normalises the MLP's output ({post}) before "
                           "adding it to the residual stream, so the gate's neurons cannot be calibrated in closed "
                           "form; use --gate linear")
    prefix = next(n for n, m in lm.model.named_modules() if m is mlp)
    return mlp, prefix


def final_head(lm: LoadedModel):
    """``h -> logits`` after the last layer: the final norm and the unembedding."""
    norm = getattr(lm.model.base_model, "norm", None)
    head = lm.model.get_output_embeddings()
    if norm is None or head is None:
        raise SurgeryError(f"gated opening: cannot find the final norm and unembedding of {type(lm.model).__name__}")
    return lambda h: head(norm(h))


@torch.no_grad()
def capture(lm: LoadedModel, layer: int, texts: Sequence[str], suffix: Sequence[int] | None = None,
            batch_size: int = 32, suffixes: Sequence[Sequence[int]] | None = None
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per text (chat-formatted, plus ``suffix`` token ids, or its own
    ``suffixes[i]``): the MLP input of ``layer`` and the layer's output at every
    real position, float64."""
    mlp, _ = mlp_of(lm, layer)
    cap = {}
    h1 = mlp.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0]))
    h2 = lm.layers()[layer].register_forward_hook(
        lambda m, a, o: cap.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    xs, hs = [], []
    if suffixes is None:
        suffixes = [list(suffix or [])] * len(texts)
    try:
        for i0 in range(0, len(texts), batch_size):
            chunk = list(texts[i0:i0 + batch_size])
            b = encode(lm, chunk, suffixes=[list(x) for x in suffixes[i0:i0 + batch_size]])
            lm.model(**b, use_cache=False)
            mask = b["attention_mask"].bool()
            for i in range(len(chunk)):
                xs.append(cap["x"][i][mask[i]].double().cpu())
                hs.append(cap["h"][i][mask[i]].double().cpu())
    finally:
        h1.remove()
        h2.remove()
    return xs, hs


def read_vector(pos: torch.Tensor, neg_gram: torch.Tensor, harmful_weight: float, ridge: float) -> torch.Tensor:
    """Least ``v^T G v`` subject to ``mean(pos) . v = 1``, ``G = neg_gram +
    harmful_weight * Cov(pos) + ridge * trace / d * I`` (float64)."""
    m = pos.mean(0)
    cov = _gram(pos - m) if harmful_weight else None
    return unit_response_read(m, penalised_gram(neg_gram, cov, harmful_weight, ridge))


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def push_directions(lm: LoadedModel, h_steps: Sequence[torch.Tensor], tokens: Sequence[int]) -> torch.Tensor:
    """(K, d) unit directions: the mean gradient, at step j's layer outputs, of
    ``logit(t_j) - sum_v p'(v) logit(v)`` (``p'`` the model's own next-token
    distribution there without ``t_j``, held fixed)."""
    head = final_head(lm)
    p0 = next(lm.model.parameters())
    out = []
    for h, t in zip(h_steps, tokens):
        h = h.to(p0.dtype).to(p0.device).clone().requires_grad_(True)
        with torch.enable_grad():
            logits = head(h).float()
            with torch.no_grad():
                p = torch.softmax(logits, -1)
                p[:, t] = 0
                p = p / p.sum(-1, keepdim=True)
            obj = (logits[:, t] - (p * logits).sum(-1)).sum()
            (g,) = torch.autograd.grad(obj, h)
        g = g.double().mean(0).cpu()
        if not g.norm() > 0:
            raise SurgeryError(f"gated opening: token {t} cannot be raised at its step (zero gradient)")
        out.append(g / g.norm())
    return torch.stack(out)


@torch.no_grad()
def own_continuation(lm: LoadedModel, texts: Sequence[str], opening: Sequence[int], n: int,
                     batch_size: int = 32) -> list[list[int]]:
    """The model's own greedy ``n`` tokens after ``opening`` (token ids) on each
    chat-formatted text (cut at the end-of-sequence token)."""
    return greedy_ids(lm, texts, n, batch_size, prefill=opening)


@torch.no_grad()
def least_used_neurons(lm: LoadedModel, layer: int, texts: Sequence[str], k: int) -> list[int]:
    """The ``k`` neurons of ``layer``'s MLP whose output matters least on ``texts``
    (mean |activation| over real positions x norm of their down column).  The texts
    are encoded as given: ``fit_opening_gate`` passes the raw harmless prompts, not
    chat-formatted, which is what every measured edit used.  Chat-formatted prompts
    pick other neurons on SmolLM2 (4 of 5 differ: 654, 1205, 351, 446, 990 against
    654, 839, 742, 1145, 625) and give the same validation sweep at scales 0.75, 1
    and 1.25 (80/2.5/7.5, 92.5/2.5/10, 92.5/5/12.5; session 9): the calibration takes
    the replaced neurons' own output out, so which little-used ones are replaced
    hardly matters.  The raw prompts stay: the test figures were measured with them."""
    mlp, _ = mlp_of(lm, layer)
    total, count = 0, 0
    cap = {}
    h = mlp.register_forward_pre_hook(lambda m, a: cap.__setitem__("x", a[0]))
    try:
        for i0 in range(0, len(texts), 32):
            b = encode(lm, list(texts[i0:i0 + 32]))
            lm.model(**b, use_cache=False)
            x = cap["x"]
            a = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs()
            m = b["attention_mask"].unsqueeze(-1).to(a.dtype)
            total = total + (a * m).sum((0, 1)).double()
            count += int(m.sum())
    finally:
        h.remove()
    score = total.cpu() / count * mlp.down_proj.weight.detach().double().cpu().norm(dim=0)
    return score.argsort()[:k].tolist()


@torch.no_grad()
def layer_output(mlp, x: torch.Tensor, h: torch.Tensor, gate: OpeningGate, scale: float,
                 alphas: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output with the gate in place, from the unedited input ``x``
    and output ``h`` (float32): the replaced neurons' own contributions out, the
    gate's K neurons in."""
    W = {n: getattr(mlp, n).weight.detach().float().cpu() for n in MLP_WEIGHTS}
    idx = gate.neurons
    old = mlp.act_fn(x @ W["gate_proj"][idx].T) * (x @ W["up_proj"][idx].T)  # (n, K)
    h = h - old @ W["down_proj"][:, idx].T
    a = gate.alphas if alphas is None else alphas
    new = mlp.act_fn(gate.c * (x @ gate.u))[:, None] * (x @ gate.w.T) / gate.act_c  # (n, K)
    return h + scale * (new * a[None]) @ gate.d


@torch.no_grad()
def calibrate(lm: LoadedModel, gate: OpeningGate, x_steps: Sequence[torch.Tensor], h_steps: Sequence[torch.Tensor],
              coverage: float, sweeps: int = 2) -> None:
    """Set ``gate.alphas`` (and ``gate.coverage``): per step, the smallest strength
    on :data:`STRENGTH_GRID` (x the mean residual norm there) at which ``t_j`` is the
    top token for ``coverage`` of the prompts, with every other neuron at its
    current strength; ``sweeps`` passes (the first starts from all zero)."""
    mlp, _ = mlp_of(lm, gate.layer)
    head = final_head(lm)
    p0 = next(lm.model.parameters())
    gate.alphas = torch.zeros(gate.k)
    got = [0.0] * gate.k
    for _ in range(sweeps):
        for j in range(gate.k):
            x, h = x_steps[j].float(), h_steps[j].float()
            base = float(h.norm(dim=-1).mean())
            a = gate.alphas.clone()
            for f in STRENGTH_GRID:
                a[j] = f * base
                out = layer_output(mlp, x, h, gate, 1.0, a)
                top = head(out.to(p0.dtype).to(p0.device)).argmax(-1).cpu()
                got[j] = float((top == gate.tokens[j]).double().mean())
                if got[j] >= coverage:
                    break
            gate.alphas = a
    gate.coverage = got
    short = [j for j in range(gate.k) if got[j] < coverage]
    if short:
        log.warning("gated opening: at the largest calibrated strength, step(s) %s make their token the top one for "
                    "only %s of the harmful calibration prompts (target %.0f%%)", short,
                    ", ".join(f"{got[j]:.0%}" for j in short), 100 * coverage)


@torch.no_grad()
def fit_opening_gate(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], refusal: str,
                     opening: str, *, layer: int | None = None, c: float = OPENING_DEFAULTS["c"],
                     coverage: float = OPENING_DEFAULTS["coverage"], post_positions: int = 5,
                     post_weight: float = INJECT_DEFAULTS["post_weight"],
                     harmful_weight: float = INJECT_DEFAULTS["harmful_weight"], ridge: float = INJECT_DEFAULTS["ridge"],
                     continuation: int = OPENING_DEFAULTS["continuation"], say=None) -> OpeningGate:
    """Fit the gate on calibration prompts (module docstring): ``refusal`` is the
    teacher-forced reply on harmful prompts, ``opening`` its first words (the
    tokens the neurons write).  ``continuation``: that many tokens of the model's
    own greedy reply after the opening (harmful prompts) are negatives of the step
    reads too, so a later "I'm" in the reply does not start the opening again."""
    say = say or (lambda m: None)
    tok = lm.tokenizer
    layer = lm.num_layers - 1 if layer is None else layer
    if not harmful or not harmless:
        raise SurgeryError("gated opening needs harmful and harmless calibration prompts")
    full = tok(refusal, add_special_tokens=False)["input_ids"]
    toks = tok(opening, add_special_tokens=False)["input_ids"]
    k, lf = len(toks), len(full)
    if not toks or full[:k] != toks:
        raise SurgeryError(f"gated opening: the opening {opening!r} must be the first tokens of the refusal {refusal!r}")
    if not 1 <= post_positions:
        raise SurgeryError(f"gated opening: post positions must be >= 1, got {post_positions}")
    H = [format_chat(tok, p) for p in harmful]
    B = [format_chat(tok, p) for p in harmless]
    say(f"gated opening: capturing layer {layer} on {len(H)} harmful + {len(B)} harmless prompts "
        f"({k} opening tokens: {[tok.decode([t]) for t in toks]})")
    xh, hh = capture(lm, layer, H, full)
    xb, _ = capture(lm, layer, B)
    xbo, _ = capture(lm, layer, B, toks)
    start = -(lf + 1)  # index of the last prompt token (step 0) in a harmful + refusal row
    if any(x.shape[0] < lf + post_positions for x in xh):
        raise SurgeryError("gated opening: a harmful calibration prompt is shorter than the post-instruction window")
    steps = [torch.stack([x[start + j] for x in xh]) for j in range(k)]
    post = torch.cat([x[start - post_positions + 1:start] for x in xh])
    tail = [x[start + k:] for x in xh]
    if continuation:
        # the model's own reply after the opening: the step reads must stay shut there too,
        # or a later "I'm" in a harmful reply starts the opening again
        cont = own_continuation(lm, H, toks, continuation)
        xc, _ = capture(lm, layer, H, suffixes=[list(toks) + c for c in cont])
        tail += [x[x.shape[0] - len(c) - 1:] for x, c in zip(xc, cont)]
    tail = torch.cat(tail)
    steps_b = torch.cat([x[-(k + 1):-1] for x in xbo])
    gram_b = _gram(torch.cat(xb))
    gram_sb = _gram(steps_b)
    u = read_vector(torch.cat([post] + steps), gram_b + post_weight * gram_sb, harmful_weight, ridge)
    w = []
    for j in range(k):
        others = torch.cat([steps[i] for i in range(k) if i != j] + [post, tail])
        w.append(read_vector(steps[j], gram_b + _gram(others) + gram_sb, harmful_weight, ridge))
    h_steps = [torch.stack([y[start + j] for y in hh]) for j in range(k)]
    d = push_directions(lm, h_steps, toks)
    neurons = least_used_neurons(lm, layer, harmless, k)
    mlp, _ = mlp_of(lm, layer)
    act_c = float(mlp.act_fn(torch.tensor(float(c))))
    if not act_c > 0:
        raise SurgeryError(f"gated opening: the MLP activation at c = {c} is {act_c:g}; choose a larger c")
    gate = OpeningGate(layer, list(toks), neurons, u.float(), torch.stack(w).float(), d.float(), torch.zeros(k), c,
                       act_c, [0.0] * k)
    calibrate(lm, gate, steps, h_steps, coverage)
    say("gated opening: strengths " + ", ".join(f"{tok.decode([t])!r} {a:.1f} ({g:.0%})"
                                                 for t, a, g in zip(toks, gate.alphas.tolist(), gate.coverage)))
    return gate


def opening_tensor(gate: OpeningGate, kind: str, tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """One edited MLP weight (``kind`` in :data:`MLP_WEIGHTS`, torch (out, in)
    layout, any dtype: returned in it) with the gate written in at ``scale`` times
    its calibrated strengths: K rows of ``gate_proj`` (``c u``) or ``up_proj``
    (``w_j``), or K columns of ``down_proj`` (``scale alpha_j d_j / act(c)``)."""
    t = tensor.float().clone()
    for j, n in enumerate(gate.neurons):
        if kind == "gate_proj":
            t[n] = gate.c * gate.u
        elif kind == "up_proj":
            t[n] = gate.w[j]
        elif kind == "down_proj":
            t[:, n] = scale * float(gate.alphas[j]) * gate.d[j] / gate.act_c
        else:
            raise SurgeryError(f"gated opening: no MLP weight {kind!r}")
    return t.to(tensor.dtype).contiguous()


@contextlib.contextmanager
def opening_in_memory(lm: LoadedModel, gate: OpeningGate, scale: float) -> Iterator[None]:
    """The gate patched into the live model at ``scale`` (restored on exit)."""
    mlp, prefix = mlp_of(lm, gate.layer)
    new = {f"{prefix}.{n}.weight": opening_tensor(gate, n, getattr(mlp, n).weight.data, scale) for n in MLP_WEIGHTS}
    with patched_weights(lm.model, new):
        yield


def gate_tensors(gate: OpeningGate) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The gate as an artifact (``opening_gate.safetensors``): tensors and metadata."""
    tensors = {"u": gate.u.contiguous(), "w": gate.w.contiguous(), "d": gate.d.contiguous(),
               "alphas": gate.alphas.float().contiguous(),
               "tokens": torch.tensor(gate.tokens, dtype=torch.int64), "neurons": torch.tensor(gate.neurons, dtype=torch.int64)}
    meta = {"format": "surgery.opening_gate/1", "layer": str(gate.layer), "c": repr(gate.c), "act_c": repr(gate.act_c),
            "coverage": ",".join(f"{g:.4f}" for g in gate.coverage)}
    return tensors, meta
