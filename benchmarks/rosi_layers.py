"""ROSI with each layer's direction candidate, on the validation split
(docs/rosi-on-smollm2.md, "ROSI's direction by ROSI's own proxy", session 7).

Without ``--generate``: every candidate of the direction file that the selection scored
(the first 80% of layers) under ROSI at each of ``--alphas``, scored
without generation (``tuning.proxy_metrics``: mean first-token refusal score on
harmful and harmless prompts, the share whose first token is a refusal, first-token
KL on harmless).  With ``--generate L``: the usual generation sweep (harmful,
harmless, borderline refusal; KL) of layer L's candidate at those strengths;
``--layers`` restricts the edit to some layers (the session-9 layer-range table).

    python benchmarks/rosi_layers.py --direction hardened-smollm2/direction.safetensors --alphas 30,40
    python benchmarks/rosi_layers.py --direction hardened-smollm2/direction.safetensors --alphas 30,36,40 --generate 8
    python benchmarks/rosi_layers.py --direction hardened-smollm2/direction.safetensors --alphas 30,36,42 --generate 5 --layers 0-24

The scan takes about 4 minutes on 2 idle CPU cores; a generation point about a minute.
"""
from __future__ import annotations

import argparse
import json

from surgery import tuning
from surgery.architectures import parse_layers
from surgery.directions import Directions
from surgery.edits.rosi import rosi_in_memory
from surgery.evaluation.judges import MarkerJudge
from surgery.model import load_model
from surgery.pipeline import PromptConfig, open_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--direction", required=True, help="a direction file from `surgery directions`")
    ap.add_argument("--alphas", default="30,40")
    ap.add_argument("--generate", type=int, default=None, metavar="LAYER",
                    help="generation sweep of this layer's candidate instead of the proxy scan")
    ap.add_argument("--layers", default=None, help="with --generate: edit only these layers, e.g. 0-24 (default: all)")
    args = ap.parse_args()
    layers = parse_layers(args.layers)
    if layers is not None and args.generate is None:
        ap.error("--layers goes with --generate")
    alphas = [float(a) for a in args.alphas.split(",")]
    resolved, _, _ = open_model(args.model)
    lm = load_model(resolved.folder)
    prompts = PromptConfig()
    _, _, hv, bv = prompts.train_val()
    harmful, harmless = list(hv.prompts), list(bv.prompts)
    dirs = Directions.load(args.direction)
    if args.generate is not None:
        cand = next((c for c in dirs.candidates if c.layer == args.generate), None)
        if cand is None:
            raise SystemExit(f"{args.direction}: no candidate at layer {args.generate}")
        tuning.sweep(lm, lambda a: rosi_in_memory(lm, cand.vector, a, layers), alphas, harmful, harmless, MarkerJudge(), 48,
                     40, progress=lambda p: print(json.dumps({"layer": cand.layer, "edited": args.layers or "all", **p}),
                                                 flush=True),
                     borderline=list(prompts.val("borderline").prompts))
        return
    data = tuning.proxy_sets(lm, harmful, harmless)
    for cand in dirs.candidates:
        if "skipped" in cand.scores:  # past the selection's layer cut-off (methods.md §1)
            continue
        for a in alphas:
            with rosi_in_memory(lm, cand.vector, a):
                m = tuning.proxy_metrics(lm, data)
            gap = m["harmful_score"] - m["harmless_score"]
            print(json.dumps({"layer": cand.layer, "alpha": a, "gap": round(gap, 3),
                              **{k: round(v, 3) for k, v in m.items()}}), flush=True)


if __name__ == "__main__":
    main()
