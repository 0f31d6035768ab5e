"""Refusal rates, first-token KL and perplexity, and the before/after report.

Conventions (methods.md, "Evaluation conventions"): greedy decoding with the
chat template; harm refusal = share of harmful prompts refused; over-refusal =
share of harmless (and, separately, borderline) prompts refused; drift = mean
first-token KL(reference || model) on harmless prompts, and perplexity of the
model on the reference model's own greedy replies to harmless prompts.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from ..activations import batches, encode
from ..model import LoadedModel
from ..prompts import PromptSet, format_chat
from .generate import generate
from .judges import Judge, MarkerJudge


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default):
    what a refusal rate measured on a few dozen prompts can be trusted to."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def format_intervals(reports: dict[str, dict]) -> str:
    """One line per report: each set's refused count and its 95% Wilson interval."""
    lines = []
    for name, rep in reports.items():
        parts = []
        for k, v in rep.get("sets", {}).items():
            if "refused" in v:
                lo, hi = v.get("refusal_ci95") or wilson_interval(v["refused"], v["count"])
                parts.append(f"{k} {v['refused']}/{v['count']} ({100 * lo:.0f}-{100 * hi:.0f}%)")
        if parts:
            lines.append(f"  {name}: " + ", ".join(parts))
    return "\n".join(["prompts refused, with 95% Wilson intervals:", *lines]) if lines else ""


@torch.no_grad()
def last_logprobs(lm: LoadedModel, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """Log-softmax of the next-token distribution at the last position, (n, V) float32."""
    out = []
    for chunk in batches(list(texts), batch_size):
        batch = encode(lm, chunk)
        logits = lm.model(**batch, use_cache=False).logits[:, -1, :].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out)


def kl_div(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || new) per row, from log-probabilities."""
    return (logp_ref.exp() * (logp_ref - logp)).sum(dim=-1)


def first_token_logprobs(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    return last_logprobs(lm, [format_chat(lm.tokenizer, p) for p in prompts], batch_size)


def first_token_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean first-token KL(reference || model)."""
    return float(kl_div(ref_logp, logp).mean())


def roc_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Probability that a random ``pos`` score exceeds a random ``neg`` score
    (ties count one half): how well a score separates two sets of prompts, e.g.
    a gate's response on held-out harmful vs harmless prompts."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one score in each set")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def threshold_ceiling(pos: torch.Tensor, negs: dict[str, torch.Tensor], budgets: dict[str, float]) -> dict:
    """The most a threshold on a score can do: the largest share of ``pos`` strictly
    above some threshold while each ``negs[name]``'s share above it stays within
    ``budgets[name]``.  For a gate this bounds harmful refusal at those over-refusal
    budgets if every prompt the gate fires on refused and no other did
    (docs/rosi-on-smollm2.md, session 7).  Returns the share, the threshold and each
    set's share above it."""
    pos = pos.double().flatten()
    cands = torch.cat([pos, *[n.double().flatten() for n in negs.values()]]).unique()
    best = {"share": 0.0, "threshold": float(cands.max()) if len(cands) else 0.0,
            **{name: 0.0 for name in negs}}
    for t in [float("-inf")] + cands.tolist():
        over = {name: float((n.double() > t).double().mean()) for name, n in negs.items()}
        if all(over[name] <= budgets[name] + 1e-12 for name in negs):
            share = float((pos > t).double().mean())
            if share > best["share"]:
                best = {"share": share, "threshold": t, **over}
    return best


@torch.no_grad()
def reply_perplexity(lm: LoadedModel, prompts: Sequence[str], replies_ids: Sequence[Sequence[int]],
                     batch_size: int = 16) -> float:
    """Perplexity of ``lm`` on the given reply tokens (after each chat-formatted prompt)."""
    texts = [format_chat(lm.tokenizer, p) for p in prompts]
    nll, count = 0.0, 0
    pairs = [(t, r) for t, r in zip(texts, replies_ids) if len(r) > 0]
    for chunk in batches(pairs, batch_size):
        batch = encode(lm, [t for t, _ in chunk], suffixes=[r for _, r in chunk])
        logits = lm.model(**batch, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["input_ids"][:, 1:]
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for i, (_, r) in enumerate(chunk):
            n = len(r)
            nll -= float(tok_lp[i, -n:].sum())
            count += n
    return math.exp(nll / max(count, 1))


def refusal_rate(lm: LoadedModel, prompts: Sequence[str], judge: Judge, max_new_tokens: int = 48,
                 batch_size: int = 32) -> tuple[float, list[str], list[bool]]:
    replies = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    verdicts = judge.judge(prompts, replies)
    return (sum(verdicts) / max(len(verdicts), 1)), replies, verdicts


def evaluate(lm: LoadedModel, sets: dict[str, PromptSet], reference: LoadedModel | None = None,
             judge: Judge | None = None, max_new_tokens: int = 48, batch_size: int = 32,
             reference_cache: dict | None = None, examples: int | None = 3) -> dict:
    """Evaluate ``lm`` on named prompt sets (``harmful``, ``harmless``, optional
    ``borderline``).  With a ``reference`` model, also first-token KL and
    perplexity on the reference's harmless replies (``reference_cache`` lets a
    before/after pair share the reference's work).  ``examples``: how many
    prompts keep their reply and verdict in the report (None: every one)."""
    judge = judge or MarkerJudge()
    t0 = time.time()
    report: dict = {"judge": getattr(judge, "name", type(judge).__name__), "max_new_tokens": max_new_tokens, "sets": {}}
    if hasattr(judge, "describe"):
        report["judge_description"] = judge.describe()
    for name, ps in sets.items():
        rate, replies, verdicts = refusal_rate(lm, list(ps.prompts), judge, max_new_tokens, batch_size)
        refused = int(sum(verdicts))
        report["sets"][name] = {**ps.describe(), "refusal_rate": rate, "refused": refused,
                                "refusal_ci95": list(wilson_interval(refused, len(verdicts))),
                                "examples": [{"prompt": p, "reply": r, "refused": v}
                                             for p, r, v in list(zip(ps.prompts, replies, verdicts))[:examples]]}
    if reference is not None and "harmless" in sets:
        harmless = list(sets["harmless"].prompts)
        cache = reference_cache if reference_cache is not None else {}
        if "logp" not in cache:
            cache["logp"] = first_token_logprobs(reference, harmless, batch_size)
            _, cache["reply_ids"] = generate(reference, harmless, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, return_ids=True)
            cache["ppl"] = reply_perplexity(reference, harmless, cache["reply_ids"], batch_size=batch_size)
        report["kl_first_token_harmless"] = first_token_kl(cache["logp"], first_token_logprobs(lm, harmless, batch_size))
        ppl = reply_perplexity(lm, harmless, cache["reply_ids"], batch_size=batch_size)
        report["perplexity_on_reference_replies"] = ppl
        report["perplexity_ratio"] = ppl / cache["ppl"]
    report["seconds"] = round(time.time() - t0, 1)
    return report


def summary_row(report: dict) -> dict:
    row = {f"{k}_refusal": v["refusal_rate"] for k, v in report["sets"].items()}
    for k in ("kl_first_token_harmless", "perplexity_ratio"):
        if k in report:
            row[k] = report[k]
    return row


def format_table(rows: dict[str, dict]) -> str:
    """A readable table: one row per model/setting, one column per metric."""
    cols: list[str] = []
    for r in rows.values():
        for k in r:
            if k not in cols:
                cols.append(k)
    head = ["", *cols]
    lines = [head]
    for name, r in rows.items():
        cells = [name]
        for c in cols:
            v = r.get(c)
            if v is None:
                cells.append("-")
            elif c.endswith("_refusal"):
                cells.append(f"{100 * v:.1f}%")
            elif isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
                cells.append(f"{int(v):,}")
            else:
                cells.append(f"{v:.3f}")
        lines.append(cells)
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    out = []
    for j, l in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
