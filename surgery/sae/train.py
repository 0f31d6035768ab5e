"""Training TopK sparse autoencoders on residual-stream activations, and the
``surgery sae train`` flow (corpus -> activations -> one SAE per layer).

:func:`train_sae` follows Gao et al. 2024 ("Scaling and evaluating sparse
autoencoders"), the recipe SAELens's TopK trainer also uses:

* decoder rows initialised as random unit vectors, ``W_enc = W_dec^T``,
  ``b_enc = 0``, ``b_dec`` = the geometric median of the data (Weiszfeld, on at
  most 8192 rows) or its mean;
* the data are scaled by one scalar ``s`` so that the mean squared distance to
  ``b_dec`` is ``d`` (unit variance per dimension); Adam hyper-parameters then
  mean the same for every model.  The scale is folded back at the end
  (``b_enc, b_dec /= s``; TopK and ReLU commute with a positive scale), so the
  saved SAE reads raw activations and its cfg says ``normalize_activations: none``;
* loss ``mean ||x - x_hat||^2`` plus ``aux_coef`` x AuxK: the ``aux_k``
  largest pre-activations among *dead* latents (no firing over the last
  ``dead_samples`` training rows, default one epoch) must reconstruct the
  residual ``x - x_hat`` (no ``b_dec``), which revives them;
* before each Adam step the gradient component parallel to each decoder row is
  removed, after it the rows are renormalised to unit norm;
* Adam (0.9, 0.999), constant learning rate (default ``2e-4 * sqrt(16384 /
  d_sae)``, Gao's 1/sqrt(n) scaling), decayed linearly to zero over the last
  20% of steps;
* every random choice (init, shuffling) comes from one ``torch.Generator``
  seeded with ``seed``: the same seed on CPU gives identical weights.

:func:`evaluate_sae` computes, in float64, explained variance
``1 - sum ||x - x_hat||^2 / sum ||x - mean||^2``, mean L0 and the fraction of
dead latents (never active over the data).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..architectures import check_layers
from ..checkpoint.files import check_folder_inputs
from ..errors import SurgeryError, check_count
from .collect import build_corpus, collect_activations, load_corpus_files
from .model import SAE, SAEError, hook_name_for_layer

log = logging.getLogger(__name__)
Say = Callable[[str], None]


# ---------------------------------------------------------------------------- helpers
def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm, float64.  ``x`` is (N, d)."""
    x = x.double()
    y = x.mean(dim=0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / dist
        new = (w[:, None] * x).sum(dim=0) / w.sum()
        moved = float((new - y).norm())
        y = new
        if moved <= tol * (1.0 + float(y.norm())):
            break
    return y


def _check_acts(acts: torch.Tensor) -> None:
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise SAEError(f"activations must be an (N, d) tensor, got {getattr(acts, 'shape', type(acts).__name__)}")
    if acts.shape[0] == 0:
        raise SAEError("no activations to train on (empty corpus)")
    if acts.shape[1] == 0:
        raise SAEError("activations have width 0")
    if not torch.isfinite(acts).all():
        raise SAEError("activations contain non-finite values")


def check_sizes(d_sae: int, k: int) -> None:
    """The checks on SAE sizes that can be made before any work."""
    check_count(d_sae, "d_sae", error=SAEError)
    check_count(k, "k", error=SAEError)
    if k > d_sae:
        raise SAEError(f"k={k} is larger than d_sae={d_sae}: a TopK SAE keeps k of its d_sae latents")


def check_schedule(steps: int | None, epochs: float | None, batch_size: int, lr: float | None) -> None:
    """The checks on the training length and step that can be made before any work."""
    if steps is not None and epochs is not None:
        raise SAEError("give steps or epochs, not both (--steps, --epochs)")
    if steps is not None:
        check_count(steps, "steps (--steps)", error=SAEError)
    if epochs is not None and not epochs > 0:
        raise SAEError(f"epochs (--epochs) must be positive, got {epochs!r}")
    check_count(batch_size, "batch_size (--batch-size)", error=SAEError)
    if lr is not None and not lr > 0:
        raise SAEError(f"lr (--lr) must be positive, got {lr!r}")


def default_lr(d_sae: int) -> float:
    return 2e-4 * math.sqrt(16384 / d_sae)


# ---------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate_sae(sae: SAE, acts: torch.Tensor, batch_size: int = 4096) -> dict:
    """Explained variance, mean L0, dead latents and MSE of ``sae`` on ``acts`` (float64 sums)."""
    _check_acts(acts)
    dev = sae.W_enc.device
    n, d = acts.shape
    total = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, batch_size):
        total += acts[i:i + batch_size].double().sum(dim=0)
    mean = total / n
    sse = sst = l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
    for i in range(0, n, batch_size):
        x = acts[i:i + batch_size]
        a = sae.encode(x.to(dev))
        xh = sae.decode(a).double().cpu()
        xd = x.double()
        sse += float(((xd - xh) ** 2).sum())
        sst += float(((xd - mean) ** 2).sum())
        active = a != 0
        l0 += float(active.sum())
        fired |= active.any(dim=0)
    ev = 1.0 - sse / sst if sst > 0 else float(sse == 0.0)
    dead = int((~fired).sum())
    return {"explained_variance": ev, "mean_l0": l0 / n, "dead_fraction": dead / sae.d_sae, "dead_latents": dead,
            "mse": sse / (n * d), "samples": n}


# ---------------------------------------------------------------------------- training
def train_sae(acts: torch.Tensor, d_sae: int, k: int, *, steps: int | None = None, epochs: float | None = None,
              lr: float | None = None, batch_size: int = 256, seed: int = 0, b_dec_init: str = "median",
              aux_k: int | None = None, aux_coef: float = 1 / 32, dead_samples: int | None = None,
              device: str | torch.device | None = None, hook_name: str | None = None, model_name: str | None = None,
              progress: Callable[[int, int, float], None] | None = None) -> tuple[SAE, dict]:
    """Train a TopK SAE on ``acts`` (N, d).  ``steps`` or ``epochs`` (default 20
    epochs) sets the length.  Returns the SAE (float32, on CPU) and metrics
    (:func:`evaluate_sae` on ``acts`` plus the training settings)."""
    _check_acts(acts)
    check_sizes(d_sae, k)
    check_schedule(steps, epochs, batch_size, lr)
    if b_dec_init not in ("median", "mean"):
        raise SAEError(f"b_dec_init must be 'median' or 'mean', got {b_dec_init!r}")
    n, d = acts.shape
    batch_size = min(batch_size, n)
    total_steps = steps if steps is not None else max(1, math.ceil((epochs or 20) * n / batch_size))
    lr = lr if lr is not None else default_lr(d_sae)
    aux_k = aux_k if aux_k is not None else max(1, d // 2)
    dead_samples = dead_samples if dead_samples is not None else n
    dev = torch.device(device) if device is not None else torch.device("cpu")

    g = torch.Generator().manual_seed(int(seed))
    sample = acts if n <= 8192 else acts[torch.randperm(n, generator=g)[:8192]]
    center = geometric_median(sample) if b_dec_init == "median" else sample.double().mean(dim=0)
    msd = 0.0
    for i in range(0, n, 8192):
        msd += float(((acts[i:i + 8192].double() - center) ** 2).sum())
    msd /= n
    scale = math.sqrt(d / msd) if msd > 0 else 1.0

    w_dec = torch.randn(d_sae, d, generator=g, dtype=torch.float64)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    W_dec = w_dec.float().to(dev).requires_grad_(True)
    W_enc = w_dec.T.contiguous().float().to(dev).requires_grad_(True)
    b_enc = torch.zeros(d_sae, device=dev, requires_grad=True)
    b_dec = (center * scale).float().to(dev).requires_grad_(True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    decay_from = int(0.8 * total_steps)

    last_fired = torch.zeros(d_sae, dtype=torch.long, device=dev)  # rows seen when each latent last fired
    seen = 0
    perm, cursor = torch.randperm(n, generator=g), 0
    loss_value = float("nan")
    for step in range(total_steps):
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=g), 0
        idx = perm[cursor:cursor + batch_size]
        cursor += batch_size
        x = acts[idx].to(dev, torch.float32) * scale
        h = (x - b_dec) @ W_enc + b_enc
        top = torch.topk(h, k, dim=-1)
        vals = torch.relu(top.values)
        a = torch.zeros_like(h).scatter(-1, top.indices, vals)
        err = x - (a @ W_dec + b_dec)
        loss = err.pow(2).sum(dim=-1).mean()
        seen += len(idx)
        with torch.no_grad():
            fired = torch.zeros(d_sae, dtype=torch.bool, device=dev)
            fired[top.indices[vals > 0]] = True
            last_fired[fired] = seen
            dead = (seen - last_fired) >= dead_samples
            n_dead = int(dead.sum())
        if aux_coef > 0 and n_dead > 0:
            ka = min(aux_k, n_dead)
            top_aux = torch.topk(h.masked_fill(~dead, float("-inf")), ka, dim=-1)
            a_aux = torch.zeros_like(h).scatter(-1, top_aux.indices, top_aux.values)
            aux = (err.detach() - a_aux @ W_dec).pow(2).sum(dim=-1).mean()
            loss = loss + aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec
            if step >= decay_from:
                for group in opt.param_groups:
                    group["lr"] = lr * (total_steps - step) / max(1, total_steps - decay_from)
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step, total_steps, loss_value)

    sae = SAE(W_enc.detach().cpu().contiguous(), (b_enc.detach() / scale).cpu(), W_dec.detach().cpu().contiguous(),
              (b_dec.detach() / scale).cpu(), activation="topk", k=k, apply_b_dec_to_input=True,
              hook_name=hook_name, model_name=model_name)
    metrics = evaluate_sae(sae.to(dev), acts)
    metrics["training"] = {"steps": total_steps, "epochs": total_steps * batch_size / n, "lr": lr,
                           "batch_size": batch_size, "seed": int(seed), "b_dec_init": b_dec_init, "aux_k": aux_k,
                           "aux_coef": aux_coef, "dead_samples": dead_samples, "input_scale": scale,
                           "final_loss_scaled": loss_value}
    return sae, metrics


# ---------------------------------------------------------------------------- the CLI flow
def layer_folder(out: str | Path, layer: int) -> Path:
    return Path(out) / f"layer_{int(layer)}"


def train_model_saes(source: str, out: str | Path, layers: Sequence[int], *, d_sae: int | None = None,
                     expansion: int = 8, k: int = 32, steps: int | None = None, epochs: float | None = None,
                     lr: float | None = None, batch_size: int = 256, seed: int = 0, corpus_files: Sequence[str] = (),
                     column: str | None = None, limit: int | None = None, max_new_tokens: int = 48,
                     positions="all", skip_first: int = 1, overwrite: bool = False, revision: str | None = None, allow_pickle: bool = False,
                     device: str | None = None, forward_batch_size: int = 16, say: Say | None = None) -> dict[int, dict]:
    """Train one TopK SAE per layer of ``source`` on its own activations and
    save each under ``out/layer_{l}/`` (SAELens layout).  Every check that
    needs no model (layers, sizes, output folders, corpus files) runs first.
    With ``positions="all"`` the first ``skip_first`` tokens of every text
    (default 1: the attention sink) are left out.
    Returns ``{layer: metrics}``."""
    from ..model import load_model
    from ..pipeline import input_info, open_model

    say = say or (lambda m: log.info(m))
    if not layers:
        raise SAEError("no layers given (e.g. --layers 5,10)")
    check_schedule(steps, epochs, batch_size, lr)
    resolved, reader, arch = open_model(source, revision, allow_pickle, say)
    try:
        hidden, num_layers = arch.hidden_size(reader.config), arch.num_layers(reader.config)
        info = input_info(resolved, reader)
    finally:
        reader.close()
    layers = sorted({int(l) for l in layers})
    try:
        check_layers(layers, num_layers, "--layers")
    except SurgeryError as e:
        raise SAEError(f"{source}: {e}") from None
    d_sae = d_sae if d_sae is not None else expansion * hidden
    check_sizes(d_sae, k)
    for l in layers:
        target = layer_folder(out, l)
        # inputs are never modified (an existing target without --overwrite is refused just below)
        check_folder_inputs(target, [source, resolved.folder, *(corpus_files or ())], overwrite)
        if target.exists() and not overwrite:
            raise SAEError(f"output folder exists: {target} (use --overwrite)")
        if target.exists() and not (target / "cfg.json").is_file():  # --overwrite replaces only an earlier SAE
            raise SAEError(f"{target} is not an SAE folder (no cfg.json): --overwrite replaces only those; "
                           "empty it yourself or write to another folder")
    # user files are read (and an empty one refused) before the model is loaded
    corpus = load_corpus_files(corpus_files, column, limit) if corpus_files else None

    lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
    dev = lm.device
    if corpus is None:
        corpus = build_corpus(lm, (), column, limit, max_new_tokens, forward_batch_size)
    say(f"corpus: {len(corpus.texts)} texts (sha256 {corpus.sha256[:12]})")
    skip = skip_first if positions == "all" else 0
    acts = collect_activations(lm, corpus.texts, layers, positions, forward_batch_size, skip_first=skip)
    del lm
    results = {}
    for l in layers:
        x = acts.pop(l)
        say(f"layer {l}: training on {x.shape[0]} activations of width {x.shape[1]} (d_sae {d_sae}, k {k})")
        sae, metrics = train_sae(x, d_sae, k, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                 device=dev, hook_name=hook_name_for_layer(l), model_name=source)
        sae.info = {"format": "surgery.sae/1", "layer": l, "positions": positions, "skip_first": skip, "model": info,
                    "corpus": corpus.describe(), "metrics": metrics}
        path = sae.save(layer_folder(out, l), overwrite=overwrite)
        say(f"layer {l}: explained variance {metrics['explained_variance']:.4f}, mean L0 {metrics['mean_l0']:.1f}, "
            f"dead latents {metrics['dead_fraction']:.1%} -> {path}")
        results[l] = metrics
    return results


__all__ = ["train_sae", "evaluate_sae", "geometric_median", "train_model_saes", "check_sizes", "check_schedule",
           "default_lr", "layer_folder"]
