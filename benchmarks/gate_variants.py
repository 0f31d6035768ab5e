"""Gate variants on the validation split, one in-memory edit each (docs/rosi-on-smollm2.md,
"More calibration data, and a gated neuron tried").

``lin``: the linear cascade gate, ``surgery inject``'s fit defaults (``fit_gates_cascade``).
``neuron``: a gated neuron written into every SwiGLU MLP without changing its shape: the
MLP neuron whose output matters least (mean |activation| x ||down column|| on the
calibration prompts) gets gate row ``c u``, up row ``u`` and down column
``alpha r_hat / silu(c)``, ``u`` the ridge read vector fitted on the MLP's input, in
cascade (each MLP fitted with the earlier ones already edited), so the layer adds
``alpha silu(c u.x)(u.x)/silu(c) r_hat``.  Llama-style MLPs (``gate_proj``/``up_proj``/
``down_proj``) only; measured on SmolLM2 it over-refused far more than the linear gate
at matched KL, so it is not a method of the package.  ``neuron:ALPHA:C:FIRST`` puts it
in the MLPs of layers FIRST onwards only, where the residual stream it reads separates
harmful from harmless prompts best (session 7: weaker, not more selective).

Calibration: every training prompt (harmful vs harmless + borderline); measured on the
validation split (harmful, harmless, borderline refusal; first-token KL on harmless).

    python benchmarks/gate_variants.py --direction hardened-smollm2/direction.safetensors \\
        --run lin:1.75 --run lin:2.25 --run neuron:3:4 --run neuron:4:4 [--layer L]

About 4 minutes a run on 2 idle CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from surgery import tuning
from surgery.activations import encode
from surgery.defaults import INJECT_DEFAULTS
from surgery.directions import Directions
from surgery.edits.gated import batch_stats, fit_gates_cascade, fit_read_vector_ridge, forward_until, gated_in_memory
from surgery.edits.rosi import unit
from surgery.evaluation.judges import MarkerJudge
from surgery.evaluation.metrics import first_token_logprobs
from surgery.model import load_model
from surgery.pipeline import PromptConfig, open_model
from surgery.prompts import format_chat


@contextlib.contextmanager
def neuron_gates(lm, batch, nh: int, r: torch.Tensor, alpha: float, c: float, fit: dict, post_positions: int = 5,
                 first_layer: int = 0):
    """Implant the gated neurons in the MLPs of layers ``first_layer`` onwards (cascade
    fit in one forward pass), restore on exit."""
    mask = batch["attention_mask"]
    saved = []

    def hook(mod, args):
        x = args[0]
        stats = batch_stats(x, mask, nh, post_positions, per_prompt=fit["harmful_weight"] > 0)
        u = fit_read_vector_ridge(stats, fit["post_weight"], fit["ridge"], fit["harmful_weight"]).float()
        a = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
        m = mask.unsqueeze(-1).to(a.dtype)
        j = int((((a.abs() * m).sum((0, 1)) / m.sum()) * mod.down_proj.weight.norm(dim=0)).argmin())
        g, up, dn = mod.gate_proj.weight, mod.up_proj.weight, mod.down_proj.weight
        saved.extend([(g, j, g[j].clone(), 0), (up, j, up[j].clone(), 0), (dn, j, dn[:, j].clone(), 1)])
        g[j] = c * u
        up[j] = u
        dn[:, j] = alpha * r / F.silu(torch.tensor(c)).item()

    layers = lm.layers()
    with torch.no_grad():
        hooks = [layer.mlp.register_forward_pre_hook(hook) for layer in layers[first_layer:]]
        forward_until(lm, batch, len(layers) - 1, hooks)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, j, old, col in reversed(saved):
                if col:
                    t[:, j] = old
                else:
                    t[j] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--direction", required=True, help="a direction file from `surgery directions`")
    ap.add_argument("--layer", type=int, default=None, help="use this layer's candidate instead of the chosen one")
    ap.add_argument("--run", action="append", required=True, help="lin:ALPHA or neuron:ALPHA:C[:FIRST_LAYER] (repeatable)")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    resolved, _, _ = open_model(args.model)
    lm = load_model(resolved.folder)
    dirs = Directions.load(args.direction)
    cand = dirs.best if args.layer is None else next(c for c in dirs.candidates if c.layer == args.layer)
    r = unit(cand.vector).float()
    prompts = PromptConfig()
    ht, bt, hv, bv = prompts.train_val()
    harmful, harmless = list(ht.prompts), list(bt.prompts) + list(prompts.train("borderline").prompts)
    blv = list(prompts.val("borderline").prompts)
    fit = {k: v for k, v in INJECT_DEFAULTS.items() if k != "cascade"}
    batch = encode(lm, [format_chat(lm.tokenizer, p) for p in harmful + harmless])
    ref = first_token_logprobs(lm, list(bv.prompts))
    for spec in args.run:
        kind, *vals = spec.split(":")
        t0 = time.time()
        if kind == "lin":
            alpha = float(vals[0])
            ctx = gated_in_memory(lm, r, fit_gates_cascade(lm, harmful, harmless, r, alpha, "ridge", **fit), alpha)
        elif kind == "neuron":
            first = int(vals[2]) if len(vals) > 2 else 0
            ctx = neuron_gates(lm, batch, len(harmful), r, float(vals[0]), float(vals[1]), fit, first_layer=first)
        else:
            raise SystemExit(f"--run {spec!r}: expected lin:ALPHA or neuron:ALPHA:C[:FIRST_LAYER]")
        with ctx:
            m = tuning.measure(lm, list(hv.prompts), list(bv.prompts), ref, MarkerJudge(), args.tokens, 40,
                               borderline=blv)
        print(json.dumps({"run": spec, "direction_layer": cand.layer, **{k: round(v, 3) for k, v in m.items()},
                          "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
