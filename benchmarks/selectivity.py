"""Selectivity at matched harmful refusal: ROSI vs gated injection (the opening
gate, `surgery inject`'s default; the linear gate at rank 1 and rank k, one-shot and
cascade fits) vs trained outputs (SAILS, lora-sft) if present, in one run (issue 6).

Comparing over-refusal at different refusal levels says little, so every
strength-swept edit is matched first: its strength is swept on the
*validation* split and the one whose validation harmful refusal is closest to
the target is kept (ties: lower harmless over-refusal, then lower KL, then the
smaller strength).  The target is ``--target``, else the first trained
output's validation harmful refusal (measured here with the same judge and
reply length), else 0.9 (issue 6's acceptance bar).  Then every row is
evaluated once on the held-out *test* split with the same judge, reply length
and reference: harmful refusal, harmless and borderline over-refusal,
first-token KL on harmless prompts, perplexity ratio on the original's replies.

The swept edits are evaluated in memory (the live model's weights patched and
restored; ``tests/test_tune.py`` checks that the streamed checkpoint of a point
equals its in-memory edit), so nothing is written but the JSON report.  Both
one-shot gated rows share one calibration (``Gated.calibrate`` at rank k; the rank-1
read vectors come from the same statistics); the cascade row refits per strength, as
``surgery inject --cascade`` does.

    python benchmarks/selectivity.py [--model smollm2] [--direction hardened-smollm2/direction.safetensors]
        [--trained sails=runs/bench/sails,lora-sft=runs/bench/lora-sft] [--target 0.8] [--rank-k 4]
        [--out runs/selectivity.json] [--dry-run]

On SmolLM2 on 2 CPU cores expect about 30 minutes (4 more without --direction).
``--n-train/--n-val/--limit`` shrink the prompt sets (smoke runs on tiny models).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _floats(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read number list {spec!r}") from None


def _trained(spec: str) -> dict[str, Path]:
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, path = part.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise argparse.ArgumentTypeError(f"--trained wants NAME=PATH[,NAME=PATH...], got {part!r}")
        out[name.strip()] = Path(path.strip())
    return out


METHODS = ("rosi", "opening", "gated", "gated-k", "gated-cascade")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="The original model (folder, .gguf, Hub id, alias).")
    ap.add_argument("--direction", type=Path, default=None,
                    help="Direction file (default: hardened-smollm2/direction.safetensors if present, else computed).")
    ap.add_argument("--trained", type=_trained, default=_trained("sails=runs/bench/sails,lora-sft=runs/bench/lora-sft"),
                    help="Trained outputs NAME=PATH,... (missing paths are skipped) [default: runs/bench/{sails,lora-sft}].")
    ap.add_argument("--target", type=float, default=None,
                    help="Validation harmful refusal to match (default: the first trained output's, else 0.9).")
    ap.add_argument("--rank-k", type=int, default=4, help="Rank of the rank-k gated row.")
    ap.add_argument("--rosi-alphas", type=_floats, default=None, help="ROSI strengths to sweep (default: ROSI's).")
    ap.add_argument("--gated-alphas", type=_floats, default=_floats("0.5,0.75,1,1.25,1.5,1.75,2,2.25,2.5"),
                    help="Gated strengths to sweep.")
    ap.add_argument("--opening-alphas", type=_floats, default=None,
                    help="Opening gate scales to sweep (default: inject's).")
    ap.add_argument("--methods", default="rosi,opening,gated,gated-cascade,gated-k",
                    help="Swept edits to include (gated-cascade refits per strength: about 100 s each on SmolLM2).")
    ap.add_argument("--eval-tokens", type=int, default=48)
    ap.add_argument("--n-train", type=int, default=None, help="At most N training prompts a set (default: all, as the commands use).")
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--limit", type=int, default=None, help="At most N test prompts per set.")
    ap.add_argument("--out", type=Path, default=Path("runs/selectivity.json"))
    ap.add_argument("--dry-run", action="store_true", help="Check the arguments and print the plan; load nothing.")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method {bad[0]!r} in --methods (use {', '.join(METHODS)})")
    args.methods = methods
    if args.rank_k < 2:
        ap.error("--rank-k must be at least 2 (rank 1 is the gated row)")
    if args.target is not None and not 0 <= args.target <= 1:
        ap.error("--target is a refusal rate in [0, 1]")
    if args.direction is None and Path("hardened-smollm2/direction.safetensors").is_file() and args.model == "smollm2":
        args.direction = Path("hardened-smollm2/direction.safetensors")
    if args.direction is not None and not args.direction.is_file():
        ap.error(f"--direction {args.direction}: no such file")
    return args


def matched(points: list[dict], target: float) -> dict:
    """The sweep point whose validation harmful refusal is closest to ``target``."""
    return min(points, key=lambda p: (abs(p["harmful_refusal"] - target), p["harmless_refusal"], p["kl"], p["value"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    present = {n: p for n, p in args.trained.items() if (p / "config.json").is_file()}
    for n, p in args.trained.items():
        if n not in present:
            print(f"note: trained output {n} not found at {p}; skipped")
    print(f"model {args.model}; direction {args.direction or '(computed now)'}; swept: {', '.join(args.methods)} "
          f"(rank k = {args.rank_k}); trained: {', '.join(present) or 'none'}; target: "
          f"{args.target if args.target is not None else ('validation refusal of ' + next(iter(present))) if present else 0.9}")
    if args.dry_run:
        return

    from surgery.checkpoint import resolve_model
    from surgery.defaults import INJECT_DEFAULTS
    from surgery.directions import Directions
    from surgery.edits.gated import fit_gates
    from surgery.edits.rosi import unit
    from surgery.evaluation.judges import MarkerJudge
    from surgery.evaluation.metrics import evaluate, first_token_logprobs, format_table, summary_row
    from surgery.model import load_model
    from surgery.pipeline import Gated, Opening, PromptConfig, Rosi, compute_directions, test_sets
    from surgery.tuning import measure, sweep

    t0 = time.time()
    prompts = PromptConfig(n_train=args.n_train, n_val=args.n_val)
    _, _, hv, bv = prompts.train_val()
    harmful_val, harmless_val = list(hv.prompts), list(bv.prompts)
    base = load_model(resolve_model(args.model).folder)
    dirs = Directions.load(args.direction) if args.direction else compute_directions(base, prompts, say=print)
    r_hat = unit(dirs.best.vector)
    judge = MarkerJudge()
    ref_val = first_token_logprobs(base, harmless_val)
    report: dict = {"model": args.model, "direction": str(args.direction) if args.direction else "computed",
                    "eval_tokens": args.eval_tokens, "sweeps": {}, "matched": {}, "rows": {}}

    # the target: the first trained output's validation harmful refusal, unless given
    target = args.target
    val_trained = {}
    for name, path in present.items():
        lm = load_model(path)
        val_trained[name] = measure(lm, harmful_val, harmless_val, ref_val, judge, args.eval_tokens)
        print(f"{name} (validation): harmful {val_trained[name]['harmful_refusal']:.0%}, harmless "
              f"{val_trained[name]['harmless_refusal']:.0%}, KL {val_trained[name]['kl']:.3f}", flush=True)
        del lm
    if target is None:
        target = val_trained[next(iter(present))]["harmful_refusal"] if present else 0.9
    report["target"] = target
    report["validation_trained"] = val_trained
    print(f"matching validation harmful refusal {target:.0%}", flush=True)

    # the swept edits
    edits: dict[str, tuple] = {}
    if "rosi" in args.methods:
        m = Rosi()
        edits["rosi"] = (m, args.rosi_alphas or list(m.default_alphas))
    if "opening" in args.methods:
        m = Opening()  # `surgery inject`'s default gate
        m.prepare(base, prompts, print)
        edits["opening"] = (m, args.opening_alphas or list(m.default_alphas))
    if "gated" in args.methods or "gated-k" in args.methods:
        gk = Gated(rank=args.rank_k)
        gk.use_direction(dirs)
        stats, targets = gk.calibrate(base, prompts, print)
        if "gated" in args.methods:
            g1 = Gated()
            g1.vs, g1.calibration = fit_gates(stats, "ridge", post_weight=g1.post_weight, ridge=g1.ridge), gk.calibration
            edits["gated"] = (g1, args.gated_alphas)
        if "gated-k" in args.methods:
            gk.vs = fit_gates(stats, "ridge", post_weight=gk.post_weight, ridge=gk.ridge, targets=targets)
            gk.basis = targets.basis.float()
            edits[f"gated-rank{args.rank_k}"] = (gk, args.gated_alphas)
        del stats
    if "gated-cascade" in args.methods:
        gc = Gated(post_weight=INJECT_DEFAULTS["post_weight"], ridge=INJECT_DEFAULTS["ridge"],
                   harmful_weight=INJECT_DEFAULTS["harmful_weight"], cascade=True)  # `surgery inject`'s defaults
        gc.use_direction(dirs)
        gc.prepare(base, prompts, print)
        edits["gated-cascade"] = (gc, args.gated_alphas)
    chosen = {}
    for name, (m, alphas) in edits.items():
        print(f"== {name}: sweep on validation {list(alphas)}", flush=True)
        pts = sweep(base, lambda a, m=m: m.in_memory(base, r_hat, a), alphas, harmful_val, harmless_val, judge,
                    max_new_tokens=args.eval_tokens, progress=lambda p: print(
                        f"  alpha {p['value']:g}: harmful {p['harmful_refusal']:.0%}, harmless "
                        f"{p['harmless_refusal']:.0%}, KL {p['kl']:.3f}", flush=True))
        chosen[name] = matched(pts, target)
        report["sweeps"][name] = pts
        report["matched"][name] = chosen[name]
        print(f"  matched: alpha {chosen[name]['value']:g} (validation harmful {chosen[name]['harmful_refusal']:.0%})",
              flush=True)

    # one evaluation of every row on the test split, against the same reference
    sets = test_sets(prompts)
    if args.limit:
        sets = {k: v.subset(args.limit) for k, v in sets.items()}
    cache: dict = {}
    rows = {}
    print("== test split: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()), flush=True)
    rows["original"] = summary_row(evaluate(base, sets, reference=base, max_new_tokens=args.eval_tokens,
                                            reference_cache=cache))
    for name, (m, _) in edits.items():
        with m.in_memory(base, r_hat, chosen[name]["value"]):
            rows[name] = summary_row(evaluate(base, sets, reference=base, max_new_tokens=args.eval_tokens,
                                              reference_cache=cache))
        rows[name]["alpha"] = chosen[name]["value"]
        rows[name]["val_harmful_refusal"] = chosen[name]["harmful_refusal"]
        print(f"  {name} done", flush=True)
    for name, path in present.items():
        lm = load_model(path)
        rows[name] = summary_row(evaluate(lm, sets, reference=base, max_new_tokens=args.eval_tokens,
                                          reference_cache=cache))
        rows[name]["val_harmful_refusal"] = val_trained[name]["harmful_refusal"]
        del lm
    report["rows"] = rows
    report["seconds"] = round(time.time() - t0, 1)
    print(f"\nat matched validation harmful refusal {target:.0%} (val_harmful_refusal: what each row reached on validation; "
          "the rest: test split)\n" + format_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"results: {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
