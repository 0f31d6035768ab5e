"""What limits the gated injection: how well its read vectors separate held-out
harmful from harmless prompts, against the same fit on the residual stream
(docs/rosi-on-smollm2.md, "What the gate reads", session 7).

1. ``surgery inject``'s default gate (cascade, inject's fit defaults) is fitted at
   ``--alpha`` on every training prompt.  On the validation split, with the edit in
   place, each prompt's response of every matrix (``v . x``, mean over the
   post-instruction positions) is measured; ``S`` is the mean over the matrices.
   Printed: S per set (mean, 10th/90th percentiles), ROC AUC harmful vs harmless +
   borderline for S and for the matrices one by one, and the *threshold ceiling*:
   the largest share of harmful prompts above a threshold on S with at most
   ``--harmless-budget`` of harmless and ``--borderline-budget`` of borderline prompts
   above it, what the edit could refuse at those budgets if every prompt the gate
   fires on refused and no other did.  ``--generate`` also judges the edited model's
   replies and counts the harmful prompts above that threshold that were not refused.
2. The same ridge fit (inject's ``post_weight``, ``ridge``, ``harmful_weight``) on the
   residual stream entering each decoder layer of the unedited model, with the same
   AUC and ceiling on validation.

``--one-shot``: part 1 with read vectors fitted on the unedited model's inputs and
responses measured without the edit (what the fit separates before the edit moves
the later matrices' inputs); ``--harmful-weight``, ``--ridge``, ``--post-weight``
change the fit.

    python benchmarks/gate_separability.py --direction hardened-smollm2/direction.safetensors \\
        --alpha 1.75 --generate

About 6 minutes on 2 idle CPU cores (the cascade fit is most of it).
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch

from surgery.activations import batches, encode
from surgery.defaults import INJECT_DEFAULTS
from surgery.directions import Directions
from surgery.edits.gated import (_accumulate, _empty_stats, _finish, _writer_modules, collect_stats, fit_gates,
                                 fit_gates_cascade, fit_read_vector_ridge, gated_in_memory)
from surgery.edits.rosi import unit
from surgery.evaluation.judges import MarkerJudge
from surgery.evaluation.metrics import refusal_rate, roc_auc, threshold_ceiling
from surgery.model import get_submodule, load_model
from surgery.pipeline import PromptConfig, open_model
from surgery.prompts import format_chat

POST = 5  # post-instruction positions, as the gate fit uses


@torch.no_grad()
def gate_responses(lm, vs: dict, prompts) -> torch.Tensor:
    """(n_prompts, n_matrices): each matrix's ``v . x`` averaged over the post-instruction positions."""
    ws = [w for w in _writer_modules(lm) if w.name in vs]
    out = {w.name: [] for w in ws}
    handles = []
    for w in ws:
        v = vs[w.name].float()

        def hook(mod, args, v=v, name=w.name):
            out[name].append((args[0][:, -POST:, :].float() @ v).mean(1))
        handles.append(get_submodule(lm.model, w.name.rsplit(".", 1)[0]).register_forward_pre_hook(hook))
    try:
        for chunk in batches([format_chat(lm.tokenizer, p) for p in prompts], 40):
            lm.model(**encode(lm, chunk), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.cat(out[w.name]) for w in ws], 1)


@torch.no_grad()
def residual_stats(lm, harmful, harmless):
    """Gate statistics (as :func:`surgery.edits.gated.collect_stats` keeps them) of the
    residual stream entering every decoder layer."""
    stats = None
    for mode, prompts in (("harmful", harmful), ("harmless", harmless)):
        for chunk in batches([format_chat(lm.tokenizer, p) for p in prompts], 32):
            batch = encode(lm, chunk)
            hs = lm.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[:-1]
            stats = stats or [_empty_stats(True) for _ in hs]
            for s, h in zip(stats, hs):
                _accumulate(s, mode, h.double(), batch["attention_mask"], POST)
    return [_finish(s) for s in stats]


@torch.no_grad()
def residual_means(lm, prompts) -> torch.Tensor:
    """(n_prompts, n_layers, d): residual stream entering each layer, mean over the post-instruction positions."""
    out = []
    for chunk in batches([format_chat(lm.tokenizer, p) for p in prompts], 32):
        hs = lm.model(**encode(lm, chunk), output_hidden_states=True, use_cache=False).hidden_states[:-1]
        out.append(torch.stack([h[:, -POST:, :].double().mean(1) for h in hs], 1))
    return torch.cat(out)


def summary(h: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, budgets: dict) -> dict:
    ceil = threshold_ceiling(h, {"harmless": b, "borderline": bl}, budgets)
    q = lambda x, p: round(float(torch.quantile(x.double(), p)), 3)  # noqa: E731
    return {"auc": round(roc_auc(h, torch.cat([b, bl])), 4),
            "harmful": [round(float(h.mean()), 3), q(h, 0.1), q(h, 0.9)],
            "harmless": [round(float(b.mean()), 3), q(b, 0.1), q(b, 0.9)],
            "borderline": [round(float(bl.mean()), 3), q(bl, 0.1), q(bl, 0.9)],
            "ceiling": {k: round(v, 4) for k, v in ceil.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--direction", required=True, help="a direction file from `surgery directions`")
    ap.add_argument("--alpha", type=float, default=1.75)
    ap.add_argument("--harmless-budget", type=float, default=0.10)
    ap.add_argument("--borderline-budget", type=float, default=0.20)
    ap.add_argument("--generate", action="store_true", help="also judge the edited model's replies")
    ap.add_argument("--one-shot", action="store_true",
                    help="fit on the unedited model's inputs and measure the responses without the edit")
    for k in ("post_weight", "ridge", "harmful_weight"):
        ap.add_argument("--" + k.replace("_", "-"), type=float, default=INJECT_DEFAULTS[k], help="gate fit (inject's default)")
    args = ap.parse_args()
    if args.one_shot and args.generate:
        ap.error("--generate judges the edited model; --one-shot measures without the edit")
    budgets = {"harmless": args.harmless_budget, "borderline": args.borderline_budget}
    resolved, _, _ = open_model(args.model)
    lm = load_model(resolved.folder)
    r = unit(Directions.load(args.direction).best.vector).float()
    prompts = PromptConfig()
    ht, bt, hv, bv = prompts.train_val()
    harmful, harmless = list(ht.prompts), list(bt.prompts) + list(prompts.train("borderline").prompts)
    val = {"harmful": list(hv.prompts), "harmless": list(bv.prompts), "borderline": list(prompts.val("borderline").prompts)}
    fit = {k: getattr(args, k) for k in ("post_weight", "ridge", "harmful_weight")}

    if args.one_shot:
        vs = fit_gates(collect_stats(lm, harmful, harmless, POST, per_prompt=True), "ridge", **fit)
    else:
        vs = fit_gates_cascade(lm, harmful, harmless, r, args.alpha, "ridge", **fit)
    with contextlib.nullcontext() if args.one_shot else gated_in_memory(lm, r, vs, args.alpha):
        resp = {name: gate_responses(lm, vs, ps) for name, ps in val.items()}
        S = {name: x.mean(1) for name, x in resp.items()}
        gate = summary(S["harmful"], S["harmless"], S["borderline"], budgets)
        per_matrix = [roc_auc(resp["harmful"][:, m], torch.cat([resp["harmless"][:, m], resp["borderline"][:, m]]))
                      for m in range(resp["harmful"].shape[1])]
        gate["matrix_auc"] = [round(min(per_matrix), 3), round(float(torch.tensor(per_matrix).median()), 3),
                              round(max(per_matrix), 3)]
        if args.generate:
            judged = {name: refusal_rate(lm, ps, MarkerJudge(), 48, 40)[2] for name, ps in val.items()}
            fires = S["harmful"] > gate["ceiling"]["threshold"]
            refused = torch.tensor(judged["harmful"])
            gate["refused"] = {name: round(sum(v) / len(v), 3) for name, v in judged.items()}
            gate["harmful_above_threshold_not_refused"] = int((fires & ~refused).sum())
            gate["harmful_below_threshold_refused"] = int((~fires & refused).sum())
    print(json.dumps({"gate": "one-shot, unedited" if args.one_shot else "cascade", "alpha": args.alpha, **fit, **gate}),
          flush=True)

    stats = residual_stats(lm, harmful, harmless)
    means = {name: residual_means(lm, ps) for name, ps in val.items()}
    for layer, s in enumerate(stats):
        if layer == 0:
            continue  # the embeddings of the template tokens: the same for every prompt
        v = fit_read_vector_ridge(s, fit["post_weight"], fit["ridge"], fit["harmful_weight"])
        x = {name: m[:, layer] @ v for name, m in means.items()}
        print(json.dumps({"residual_layer": layer, **summary(x["harmful"], x["harmless"], x["borderline"], budgets)}),
              flush=True)


if __name__ == "__main__":
    main()
