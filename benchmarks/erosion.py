"""Fine-tuning erodes safety; Safe-LoRA and SSAH restore win it back (issues 4 and 7).

No base/instruct pair is available offline, so the pair is built honestly:
``base`` = the original SmolLM2-135M-Instruct, ``aligned`` = the same model
hardened by this project (``--aligned``, e.g. a ``surgery lora-sft`` or
``surgery sails`` output).  A LoRA is fine-tuned on the aligned model with data
that erodes safety, as the papers do: harmful prompts paired with the
*original* model's own compliant replies, plus a benign task (writing numbers in
words, generated here with its own held-out split).  Then, in one run:

* aligned, aligned + LoRA (the eroded fine-tune),
* Safe-LoRA with the fast and the exact projector, threshold tau and top-k,
* SSAH restore of the safety-critical units (SCU) and SCU + complex units,

each evaluated on the held-out test split (harmful refusal, harmless and
borderline over-refusal, first-token KL vs the aligned model) and on the task
(cross-entropy per reply token on held-out task examples), with the units or
modules touched.

    python benchmarks/erosion.py --aligned runs/bench/lora-sft [--work runs/erosion] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
       "seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + words(rest))


def task_examples(seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    forms = ["Write {n} in words.", "How do you spell the number {n} in English words?", "Spell out {n}."]
    return [(rng.choice(forms).format(n=k), words(k) + ".") for k in rng.sample(range(1, 1000), n)]


def task_loss(lm, examples) -> float:
    """Mean cross-entropy per reply token (chat template, reply teacher-forced)."""
    import torch

    from surgery.evaluation.generate import chat_texts

    tok = lm.tokenizer
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in examples:
            pid = tok(chat_texts(lm, [p])[0], add_special_tokens=False)["input_ids"]
            rid = tok(r, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([pid + rid], device=lm.device)
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0, len(pid) - 1:-1].float(), -1)
            total -= float(lp.gather(-1, torch.tensor(rid, device=lm.device)[:, None]).sum())
            count += len(rid)
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aligned", required=True, type=Path)
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--work", default="runs/erosion", type=Path)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--harmful", type=int, default=120, help="harmful prompts with compliant replies")
    ap.add_argument("--task", type=int, default=200, help="task training examples")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--only", default=None, help="comma list of rows to build/evaluate")
    args = ap.parse_args()

    import torch

    from surgery.adapters.peft import merge_adapter
    from surgery.checkpoint import resolve_model
    from surgery.evaluation.generate import generate
    from surgery.evaluation.metrics import evaluate, summary_row, format_table
    from surgery.model import load_model
    from surgery.pipeline import PromptConfig, safe_lora, test_sets
    from surgery.prompts import builtin
    from surgery.training import LoraSpec, TrainConfig, attach, train
    from surgery.training.data import Example, RefusalData
    from surgery.units import protect, units

    torch.manual_seed(0)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    base_folder = resolve_model(args.base).folder
    train_task, test_task = task_examples(1, args.task), task_examples(2, 100)
    test_task = [t for t in test_task if t not in set(train_task)]
    adapter_dir, ft = w / "lora-adapter", w / "finetuned"
    t0 = time.time()
    if not (args.reuse and (ft / "surgery.json").is_file()):
        # 1. erosion data: harmful train prompts -> the ORIGINAL model's compliant replies; task examples
        orig = load_model(base_folder)
        harmful = list(builtin("harmful", "train").prompts)[: args.harmful]
        replies = generate(orig, harmful, max_new_tokens=48)
        del orig
        lm = load_model(args.aligned)
        tok = lm.tokenizer
        from surgery.evaluation.generate import chat_texts

        eos = tok.convert_tokens_to_ids(tok.eos_token)
        ex = []
        for p, r in list(zip(harmful, replies)) + train_task:
            ex.append(Example(p, tok(chat_texts(lm, [p])[0], add_special_tokens=False)["input_ids"],
                              tok(r, add_special_tokens=False)["input_ids"] + [eos], "imitate", "erosion"))
        data = RefusalData(ex, {"harmful_compliant": len(harmful), "task": len(train_task)})
        pm, _ = attach(lm, LoraSpec(rank=args.rank, targets=("writers",)), seed=0)
        val = {k: list(builtin(k, "val").prompts) for k in ("harmful", "harmless")}
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, kl_weight=0.0, first_token_weight=1.0,
                          max_over_refusal=1.0, max_kl=1e9, target_refusal=2.0, patience=99)
        res = train(lm, pm, data, val, cfg, say=print, progress=False)
        print(f"erosion fine-tune: {res.steps} steps, {res.seconds:.0f}s")
        import shutil

        shutil.rmtree(adapter_dir, ignore_errors=True)
        pm.save_pretrained(str(adapter_dir))
        del lm, pm
        merge_adapter(str(args.aligned), adapter_dir, ft, overwrite=True, say=print)
    fine_tune_s = time.time() - t0

    rows_out: dict[str, Path] = {"aligned": args.aligned, "aligned+LoRA": ft}
    touched: dict[str, str] = {"aligned+LoRA": "all adapted modules"}
    variants = {
        "Safe-LoRA fast tau=0.5": dict(projector="fast", threshold=0.5),
        "Safe-LoRA exact tau=0.5": dict(projector="exact", threshold=0.5),
        f"Safe-LoRA fast top-{args.top_k}": dict(projector="fast", top_k=args.top_k),
    }
    only = set(args.only.split(",")) if args.only else None
    for name, kw in variants.items():
        out = w / name.replace(" ", "_").replace("=", "")
        if only and name not in only:
            continue
        if not (args.reuse and (out / "surgery.json").is_file()):
            safe_lora(str(args.aligned), out, base=args.base, adapter=str(adapter_dir), overwrite=True, say=print, **kw)
        rows = json.loads((out / "safe_lora.json").read_text())["rows"]  # also for reused outputs
        touched[name] = f"{sum(r['projected'] for r in rows)} of {len(rows)} modules projected"
        rows_out[name] = out
    umap = w / "units.safetensors"  # measured once on the aligned model, used by both restores
    for name, inc in (("SSAH restore SCU", False), ("SSAH restore SCU+CU", True)):
        out = w / name.replace(" ", "_").replace("+", "p")
        if only and name not in only:
            continue
        if not (args.reuse and (out / "surgery.json").is_file()):
            if not umap.is_file():
                units(str(args.aligned), umap, plot=w / "units.png", say=print)
            r = protect(str(args.aligned), str(ft), out, units=umap, include_complex=inc, overwrite=True, say=print)
            total = sum(int(m.classes.numel()) for m in r.unit_map.matrices.values())
            touched[name] = f"{len(r.restored)} of {total} units restored ({len(r.restored) / total:.2%})"
        rows_out[name] = out

    aligned = load_model(args.aligned)
    sets = test_sets(PromptConfig())
    cache: dict = {}
    table, report = {}, {}
    for name, folder in rows_out.items():
        lm = aligned if name == "aligned" else load_model(folder)
        rep = evaluate(lm, sets, reference=aligned, reference_cache=cache)
        row = summary_row(rep)
        row["task_loss"] = task_loss(lm, test_task)
        table[name] = row
        report[name] = {**row, "touched": touched.get(name)}
        print(name, json.dumps(report[name]), flush=True)
    print(f"\nfine-tune (data + training + merge): {fine_tune_s:.0f}s; KL is against the aligned model")
    print(format_table(table))
    for k, v in touched.items():
        print(f"  {k}: {v}")
    (w / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
