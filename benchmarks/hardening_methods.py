"""SAILS vs plain LoRA vs ROSI on the real model, in one run (issue 3's benchmark).

Each method hardens SmolLM2-135M-Instruct with its defaults (same refusal data,
same seed) into ``--work/<method>``; then every output is evaluated against the
original on the project's held-out test split with the same judge and reply
length: harmful refusal, harmless and borderline over-refusal, first-token KL,
perplexity ratio on the original's replies, trainable parameters, training seconds (what the
trainer recorded in the manifest, so reused and rebuilt outputs compare alike) and the wall time of
the outputs built in this run.

    python benchmarks/hardening_methods.py [--work runs/bench] [--methods sails,lora-sft,rosi]
        [--lora-rank R] [--reuse]

``--lora-rank`` defaults to the rank giving plain LoRA about as many trainable
parameters as SAILS had (read from its manifest) when SAILS ran first;
``--reuse`` evaluates existing outputs instead of rebuilding them;
``--from-manifests`` takes each output's own before/after evaluation from its
``surgery.json`` (the same test split, judge and reply length as here) instead
of evaluating again.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _times(info: dict) -> dict:
    """Training seconds (from the manifest) and this run's wall time, when there are any."""
    return {k: int(round(info[k])) if info[k] else None for k in ("train_s", "wall_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--work", default="runs/bench", type=Path)
    ap.add_argument("--methods", default="sails,lora-sft,rosi")
    ap.add_argument("--lora-rank", type=int, default=None)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--eval-tokens", type=int, default=48)
    ap.add_argument("--from-manifests", action="store_true")
    args = ap.parse_args()

    from surgery.checkpoint import resolve_model
    from surgery.evaluation.metrics import evaluate, format_table, summary_row
    from surgery.manifest import read_manifest
    from surgery.model import load_model
    from surgery.pipeline import PromptConfig, rosi, test_sets
    from surgery.training.harden import LoraSFT, train_harden
    from surgery.training.sails import Sails

    args.work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    info: dict[str, dict] = {}
    for m in methods:
        out = args.work / m
        t0 = time.time()
        if not (args.reuse and (out / "surgery.json").is_file()):
            print(f"== {m}", flush=True)
            if m == "sails":
                train_harden(args.model, out, Sails(), run_eval=False, overwrite=True, say=print, progress=False)
            elif m == "lora-sft":
                rank = args.lora_rank
                if rank is None and "sails" in info:
                    # match SAILS' trainable parameters: rank r on every writer costs r * (d_in + d_out) per matrix
                    rank = max(1, round(info["sails"]["trainable"] / info["sails"]["per_rank"]))
                train_harden(args.model, out, LoraSFT(rank=rank or 8), run_eval=False, overwrite=True, say=print,
                             progress=False)
            elif m == "rosi":
                rosi(args.model, out, run_eval=False, overwrite=True, say=print)
            else:
                raise SystemExit(f"unknown method {m}")
            wall = time.time() - t0
        else:
            wall = None
        man = read_manifest(out)
        p = man["method"]["parameters"]
        trainable = p.get("trainable_parameters", 0)
        per_rank = None
        if m in ("sails", "lora-sft") and p.get("modules"):
            # parameters one unit of LoRA rank costs on these modules (for matching plain LoRA to SAILS)
            from surgery.checkpoint import CheckpointReader

            with CheckpointReader(out) as r:
                per_rank = sum(sum(r.shape(mod + ".weight")) for mod in p["modules"])
        info[m] = {"out": out, "wall_s": wall, "train_s": (p.get("result") or {}).get("seconds"),
                   "trainable": trainable,
                   "per_rank": per_rank}

    if args.from_manifests:
        rows = {}
        for m in methods:
            ev = read_manifest(info[m]["out"]).get("evaluation")
            if not ev:
                raise SystemExit(f"{info[m]['out']}: no evaluation in surgery.json (run without --from-manifests)")
            rows.setdefault("original", summary_row(ev["before"]))
            row = summary_row(ev["after"])
            row["trainable_params"] = info[m]["trainable"]
            row.update(_times(info[m]))
            rows[m] = row
        print("\n" + format_table(rows))
        (args.work / "results.json").write_text(json.dumps(rows, indent=2))
        return

    base = load_model(resolve_model(args.model).folder)
    sets = test_sets(PromptConfig())
    cache: dict = {}
    rows = {"original": summary_row(evaluate(base, sets, reference=base, max_new_tokens=args.eval_tokens,
                                             reference_cache=cache))}
    for m in methods:
        lm = load_model(info[m]["out"])
        row = summary_row(evaluate(lm, sets, reference=base, max_new_tokens=args.eval_tokens, reference_cache=cache))
        row["trainable_params"] = info[m]["trainable"]
        row.update(_times(info[m]))
        rows[m] = row
        del lm
    print("\n" + format_table(rows))
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"results: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
