"""Choosing an edit's strength, and the Pareto search of ``surgery tune``,
always on the validation split (never the test split).

A sweep evaluates each candidate strength in memory (the live model's weights
patched and restored), measuring harmful refusal, harmless over-refusal (greedy
generation judged by the refusal judge) and first-token KL on harmless prompts.
The chosen point is the one with the highest harmful refusal among those within
the over-refusal and KL budgets (ties: the smaller strength); if none is within
budget, the smallest strength is chosen and the report says so.

``surgery tune`` (:func:`tune`, :func:`apply_tune`) searches the gated
injection's strength, edited layer range, constraint strength (ridge
``post_weight`` or ``null_ratio``) and rank (:class:`SearchSpace`):

1. every point (grid, or Optuna TPE when installed) is measured with the cheap
   proxies only: the mean first-token refusal score on harmful / harmless /
   borderline validation prompts and first-token KL (one forward pass per set);
   the thresholded first-token rate is recorded but not used: on SmolLM2 it is
   0% at edits that refuse 70% of harmful prompts by generation (replies that
   open with something else and refuse a few tokens later);
2. the proxy Pareto front (max harmful score, min harmless score, min KL) is
   pruned to ``confirm`` points spread along it, which are confirmed by greedy
   generation (harmful, harmless and borderline refusal, judged) plus KL;
3. the Pareto front of the confirmed points (max harmful refusal, min harmless
   over-refusal, min KL) is the result: ``tune.json`` (every point, its
   parameters, proxies, metrics and front flags), ``tune.png``, the read
   vectors of every fit (``fits/``) and the direction;
4. the user picks a point by id or by a rule (:func:`parse_rule`), and
   :func:`apply_tune` streams that point's edit through ``Gated.write`` (the
   same fitted read vectors, so the checkpoint is the edit that was measured)
   with a manifest that records the search and the choice.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Sequence

import torch

from .errors import SurgeryError
from .evaluation.judges import Judge, MarkerJudge
from .evaluation.metrics import first_token_kl, first_token_logprobs, last_logprobs, refusal_rate
from .model import LoadedModel

log = logging.getLogger(__name__)


def measure(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], ref_logp, judge: Judge,
            max_new_tokens: int = 32, batch_size: int = 40, borderline: Sequence[str] | None = None) -> dict:
    """Generation metrics of the model as it is now: harmful refusal, harmless
    (and borderline) over-refusal, first-token KL on harmless prompts against ``ref_logp``."""
    h, _, _ = refusal_rate(lm, harmful, judge, max_new_tokens, batch_size)
    b, _, _ = refusal_rate(lm, harmless, judge, max_new_tokens, batch_size)
    kl = first_token_kl(ref_logp, first_token_logprobs(lm, harmless))
    out = {"harmful_refusal": h, "harmless_refusal": b, "kl": kl}
    if borderline:
        out["borderline_refusal"], _, _ = refusal_rate(lm, borderline, judge, max_new_tokens, batch_size)
    return out


def sweep(lm: LoadedModel, edit: Callable[[float], ContextManager], values: Sequence[float],
          harmful: Sequence[str], harmless: Sequence[str], judge: Judge | None = None,
          max_new_tokens: int = 32, batch_size: int = 40, progress: Callable[[dict], None] | None = None,
          stop_kl: float | None = None, borderline: Sequence[str] | None = None) -> list[dict]:
    """Measure every strength in ``values`` (in order).  ``stop_kl``: end the sweep
    after the first strength whose first-token KL exceeds it; first-token KL rose
    with strength in every sweep measured on SmolLM2 (ROSI, one-shot and cascade
    gates), so the strengths after it cannot be chosen under that budget, and each
    costs a generation pass (a cascade refit too).  ``borderline``: also measure
    over-refusal on these prompts (reported; no budget)."""
    judge = judge or MarkerJudge()
    ref = first_token_logprobs(lm, harmless)
    points = []
    for v in values:
        with edit(v):
            pt = {"value": float(v), **measure(lm, harmful, harmless, ref, judge, max_new_tokens, batch_size,
                                               borderline=borderline)}
        points.append(pt)
        if progress:
            progress(pt)
        if stop_kl is not None and pt["kl"] > stop_kl:
            break
    return points


RATE_EPS = 1e-9


def better_point(p: dict, best: dict | None, max_over_refusal: float, max_kl: float,
                 refusal_tolerance: float = 0.0) -> bool:
    """The kept-point rule of every sweep and every trainer's validation: is ``p``
    (harmful/harmless[/borderline] refusal, KL) better than ``best``?  Only points
    within the over-refusal and KL budgets count.  More harmful refusal wins, except
    that within ``refusal_tolerance`` of each other the one that over-refuses less
    (harmless + borderline) wins; then more refusal, less over-refusal.  Applied in
    order (each point against the one kept so far), so with chained points the kept one
    can be more than the tolerance above a less over-refusing point that was dropped
    earlier (tests/test_eval.py pins such a case)."""
    ok = p["harmless_refusal"] <= max_over_refusal and p["kl"] <= max_kl
    if not ok:
        return False
    if best is None:
        return True
    if refusal_tolerance > 0:
        # rates are k/n, so differences carry float rounding (0.75 - 0.8 = -0.050000000000000044,
        # 0.05 + 0.1 != 0.075 + 0.075): compare them to within RATE_EPS
        gain = p["harmful_refusal"] - best["harmful_refusal"]
        if abs(gain) > refusal_tolerance + RATE_EPS:
            return gain > 0
        over = p["harmless_refusal"] + p.get("borderline_refusal", 0.0)
        best_over = best["harmless_refusal"] + best.get("borderline_refusal", 0.0)
        if abs(over - best_over) > RATE_EPS:
            return over < best_over
    return (p["harmful_refusal"], -p["harmless_refusal"], -p.get("borderline_refusal", 0.0)) > \
        (best["harmful_refusal"], -best["harmless_refusal"], -best.get("borderline_refusal", 0.0))


def choose(points: list[dict], max_over_refusal: float = 0.15, max_kl: float = 0.3,
           refusal_tolerance: float = 0.0) -> tuple[dict, str]:
    """The kept strength of a sweep (points in sweep order).  ``refusal_tolerance``
    0: the most harmful refusal within the budgets (ties: the smaller strength);
    > 0: :func:`better_point`'s rule, the trainers', applied in sweep order (a point
    within the tolerance of the kept one that over-refuses less replaces it)."""
    ok = [p for p in points if p["harmless_refusal"] <= max_over_refusal and p["kl"] <= max_kl]
    if ok and refusal_tolerance > 0:
        best = None
        for p in points:
            if better_point(p, best, max_over_refusal, max_kl, refusal_tolerance):
                best = p
        return best, (f"highest harmful refusal on the validation split with over-refusal <= {max_over_refusal:.0%} "
                      f"and first-token KL <= {max_kl}, or within {refusal_tolerance:.0%} of it with less harmless + "
                      "borderline over-refusal")
    if ok:
        best = max(ok, key=lambda p: (p["harmful_refusal"], -p["value"]))
        return best, (f"highest harmful refusal on the validation split with over-refusal <= {max_over_refusal:.0%} "
                      f"and first-token KL <= {max_kl}")
    best = min(points, key=lambda p: p["value"])
    msg = (f"no strength kept over-refusal <= {max_over_refusal:.0%} and KL <= {max_kl} on the validation split; "
           f"chose the smallest ({best['value']:g})")
    log.warning(msg)
    return best, msg


# ============================================================================= Pareto search (surgery tune)
#: objectives of the front: (metric, "max" | "min")
OBJECTIVES: tuple[tuple[str, str], ...] = (("harmful_refusal", "max"), ("harmless_refusal", "min"), ("kl", "min"))
#: the cheap proxies' objectives (first-token refusal scores, no generation)
PROXY_OBJECTIVES: tuple[tuple[str, str], ...] = (("harmful_score", "max"), ("harmless_score", "min"), ("kl", "min"))
DEFAULT_TUNE_ALPHAS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
DEFAULT_STRENGTHS = {"ridge": (3.0, 10.0, 30.0), "null": (0.3, 0.5, 0.7)}
STRENGTH_NAMES = {"ridge": "post_weight", "null": "null_ratio"}
TUNE_FORMAT = "surgery.tune/1"


def _objective_key(p: Mapping, objectives) -> tuple[float, ...]:
    """Every objective as 'larger is better'; a missing or NaN value is the worst."""
    key = []
    for name, how in objectives:
        v = p.get(name)
        v = float("nan") if v is None else float(v)
        v = v if how == "max" else -v
        key.append(-math.inf if v != v else v)
    return tuple(key)


def pareto_front(points: Sequence[Mapping], objectives: Sequence[tuple[str, str]] = OBJECTIVES) -> list[int]:
    """Indices (ascending) of the points that no other point dominates (as good in
    every objective and better in one).  Sorted best-first lexicographically, a
    point can only be dominated by an earlier one, and if by any then by one
    already on the front (domination is transitive): each point is compared with
    the front only.  Points with identical objectives are all kept."""
    keys = [_objective_key(p, objectives) for p in points]
    front: list[int] = []
    for i in sorted(range(len(points)), key=lambda i: keys[i], reverse=True):
        ki = keys[i]
        if not any(keys[j] != ki and all(a >= b for a, b in zip(keys[j], ki)) for j in front):
            front.append(i)
    return sorted(front)


# ----------------------------------------------------------------------------- rules
#: rule condition names -> metric keys
RULE_METRICS = {"over-refusal": "harmless_refusal", "borderline": "borderline_refusal", "kl": "kl"}
_RATE_NAMES = ("over-refusal", "borderline")
RULE_GRAMMAR = ("max refusal [with COND [and COND]...], COND = over-refusal|borderline|kl <= NUMBER "
                "(rates as fractions or percentages: 0.05 or 5%)")


@dataclass(frozen=True)
class Rule:
    """``max refusal with over-refusal <= 0.05 and kl <= 0.2``: among the
    confirmed points (generation metrics) meeting every bound, the highest harmful
    refusal; ties go to the lower KL, then the lower over-refusal, then the
    lower id."""
    text: str
    conditions: tuple[tuple[str, float], ...]  # (metric key, upper bound)

    def admits(self, metrics: Mapping) -> bool:
        return all(metrics.get(k) is not None and metrics[k] <= bound for k, bound in self.conditions)

    def pick(self, points: Sequence[Mapping]) -> dict | None:
        ok = [p for p in points if p.get("metrics") and self.admits(p["metrics"])]
        if not ok:
            return None
        def num(v):  # a missing metric (non-finite, stored as null) sorts last
            return math.inf if v is None else v

        return min(ok, key=lambda p: (-num(p["metrics"]["harmful_refusal"]) if p["metrics"]["harmful_refusal"] is not None
                                      else math.inf, num(p["metrics"]["kl"]), num(p["metrics"]["harmless_refusal"]), p["id"]))


def parse_rule(text: str) -> Rule:
    """Parse a rule (grammar: ``RULE_GRAMMAR``); errors are one line naming the bad part."""
    toks = re.findall(r"<=|>=|[<>=!]+|[A-Za-z][A-Za-z_-]*|[0-9.]+(?:[eE][-+]?[0-9]+)?%?|\S+", text.strip())
    low = [t.lower() for t in toks]

    def fail(msg: str):
        raise SurgeryError(f"rule {text!r}: {msg} (grammar: {RULE_GRAMMAR})")

    if low[:2] != ["max", "refusal"]:
        fail(f"must start with 'max refusal', not {' '.join(toks[:2]) or 'nothing'!r}")
    conds: dict[str, float] = {}
    i = 2
    if i < len(low):
        if low[i] != "with":
            fail(f"expected 'with' after 'max refusal', got {toks[i]!r}")
        i += 1
        while True:
            if i >= len(low):
                fail(f"expected a condition after {toks[i - 1]!r}")
            name = low[i]
            if name not in RULE_METRICS:
                fail(f"unknown metric {toks[i]!r} (use over-refusal, borderline or kl)")
            if i + 1 >= len(low) or low[i + 1] != "<=":
                fail(f"expected '<=' after {toks[i]!r}, got {toks[i + 1] if i + 1 < len(toks) else 'nothing'!r}")
            if i + 2 >= len(low):
                fail(f"expected a number after '{toks[i]} <='")
            num = toks[i + 2]
            pct = num.endswith("%")
            try:
                value = float(num[:-1] if pct else num)
            except ValueError:
                fail(f"cannot read the bound {num!r} of {toks[i]}")
            if not math.isfinite(value) or value < 0:
                fail(f"the bound of {toks[i]} must be a non-negative number, got {num!r}")
            if name in _RATE_NAMES:
                value = value / 100 if pct else value
                if value > 1:
                    fail(f"'{toks[i]} <= {num}': a rate is a fraction in [0, 1] (write {num}% for a percentage)")
            elif pct:
                fail(f"'{toks[i]} <= {num}': kl is not a rate, write a number such as 0.2")
            if RULE_METRICS[name] in conds:
                fail(f"{toks[i]} is bounded twice")
            conds[RULE_METRICS[name]] = value
            i += 3
            if i >= len(low):
                break
            if low[i] != "and":
                fail(f"expected 'and' or the end after '{toks[i - 3]} <= {num}', got {toks[i]!r}")
            i += 1
    return Rule(text.strip(), tuple(conds.items()))


def choose_point(data: Mapping, pick: int | None = None, rule: str | None = None) -> tuple[dict, dict]:
    """The point of a tune result (``tune.json``) chosen by id or by rule, and a
    record of the choice for the manifest."""
    points = data["points"]
    if (pick is None) == (rule is None):
        raise SurgeryError("choose a point with exactly one of --pick N or --rule RULE")
    if pick is not None:
        byid = {p["id"]: p for p in points}
        if pick not in byid:
            raise SurgeryError(f"--pick {pick}: no such point (ids 0-{len(points) - 1}; the front: "
                               f"{', '.join(map(str, data.get('front', []))) or 'none'})")
        p = byid[pick]
        why = f"picked point {pick}" + ("" if p.get("confirmed") else " (not confirmed by generation: proxy metrics only)")
        return p, {"pick": pick, "reason": why}
    r = parse_rule(rule)
    p = r.pick(points)
    if p is None:
        n = sum(1 for q in points if q.get("metrics"))
        raise SurgeryError(f"rule {rule!r}: none of the {n} confirmed points meets "
                           + " and ".join(f"{k} <= {v:g}" for k, v in r.conditions))
    return p, {"rule": r.text, "conditions": dict(r.conditions),
               "reason": f"rule {r.text!r}: point {p['id']} (highest harmful refusal among confirmed points meeting it)"}


# ----------------------------------------------------------------------------- search space
def default_layer_ranges(num_layers: int) -> list[tuple[int, int]]:
    """All layers, from a quarter of the depth on, up to three quarters, and both."""
    q, e = num_layers // 4, max(0, (3 * num_layers) // 4 - 1)
    out: list[tuple[int, int]] = []
    for r in ((0, num_layers - 1), (q, num_layers - 1), (0, e), (q, e)):
        if r[0] <= r[1] and r not in out:
            out.append(r)
    return out


@dataclass
class SearchSpace:
    """What ``surgery tune`` searches: gate strength ``alpha``, the edited layer
    range ``[first, last]``, the gate's constraint ``strength`` (``post_weight`` of
    the ridge fit, or ``null_ratio`` of the null-space fit; ``ridge`` fixed) and
    the rank.  The grid is their product; TPE samples alpha continuously in
    ``[min, max]`` and the rest from the same lists."""
    alphas: tuple[float, ...]
    layer_ranges: tuple[tuple[int, int], ...]
    fit: str = "ridge"
    strengths: tuple[float, ...] = ()
    ranks: tuple[int, ...] = (1,)
    ridge: float = 0.1

    @classmethod
    def default(cls, num_layers: int, fit: str = "ridge", alphas=None, layer_ranges=None, strengths=None,
                ranks=None, ridge: float = 0.1) -> "SearchSpace":
        if fit not in DEFAULT_STRENGTHS:
            raise SurgeryError(f"fit must be one of {', '.join(DEFAULT_STRENGTHS)}, got {fit!r}")
        return cls(tuple(alphas or DEFAULT_TUNE_ALPHAS), tuple(tuple(r) for r in (layer_ranges or default_layer_ranges(num_layers))),
                   fit, tuple(strengths or DEFAULT_STRENGTHS[fit]), tuple(ranks or (1,)), ridge)

    def check(self, num_layers: int) -> None:
        if not self.alphas or any(not (a > 0 and math.isfinite(a)) for a in self.alphas):
            raise SurgeryError(f"alphas must be positive numbers, got {list(self.alphas)}")
        if not self.layer_ranges:
            raise SurgeryError("no layer range to search")
        for a, b in self.layer_ranges:
            if not 0 <= a <= b < num_layers:
                raise SurgeryError(f"layer range {a}-{b} is not within the model's layers 0-{num_layers - 1}")
        name = STRENGTH_NAMES.get(self.fit)
        if name is None:
            raise SurgeryError(f"fit must be one of {', '.join(STRENGTH_NAMES)}, got {self.fit!r}")
        if not self.strengths:
            raise SurgeryError(f"no {name} to search")
        for s in self.strengths:
            if self.fit == "null" and not 0 < s < 1:
                raise SurgeryError(f"null_ratio must be in (0, 1), got {s}")
            if self.fit == "ridge" and not s >= 0:
                raise SurgeryError(f"post_weight must be >= 0, got {s}")
        if not self.ranks or any(k < 1 for k in self.ranks):
            raise SurgeryError(f"ranks must be at least 1, got {list(self.ranks)}")
        if not self.ridge > 0:
            raise SurgeryError(f"ridge must be > 0, got {self.ridge}")

    def grid(self) -> list[dict]:
        """Every combination, the fit-defining ones outermost (rank, strength, layers, alpha)."""
        return [self.params(a, r, s, k) for k in self.ranks for s in self.strengths
                for r in self.layer_ranges for a in self.alphas]

    def params(self, alpha: float, layers: Sequence[int], strength: float, rank: int) -> dict:
        return {"alpha": float(alpha), "layers": [int(layers[0]), int(layers[1])], "fit": self.fit,
                "strength": float(strength), "rank": int(rank)}

    def to_dict(self) -> dict:
        return {"alphas": list(self.alphas), "layer_ranges": [list(r) for r in self.layer_ranges], "fit": self.fit,
                "strength": STRENGTH_NAMES[self.fit], "strengths": list(self.strengths), "ranks": list(self.ranks),
                "ridge": self.ridge}


def search(space: SearchSpace, evaluate: Callable[[dict], dict], sampler: str = "grid", trials: int | None = None,
           seed: int = 0, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Proxy metrics of the points of ``space``: every grid point, or ``trials``
    points sampled by Optuna's multi-objective TPE (if installed; steered by the
    proxy objectives).  Returns ``[{"id", "params", "proxy"}]``."""
    points: list[dict] = []

    def run(params: dict) -> dict:
        pt = {"id": len(points), "params": params, "proxy": evaluate(params)}
        points.append(pt)
        if progress:
            progress(pt)
        return pt

    if sampler == "grid":
        for params in space.grid():
            run(params)
        return points
    if sampler != "tpe":
        raise SurgeryError(f"sampler must be grid or tpe, got {sampler!r}")
    try:
        import optuna
    except ImportError:
        raise SurgeryError("the tpe sampler needs Optuna, which is not installed (pip install optuna), "
                           "or use the grid sampler") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if how == "max" else "minimize" for _, how in PROXY_OBJECTIVES],
                                sampler=optuna.samplers.TPESampler(seed=seed))
    lo, hi = min(space.alphas), max(space.alphas)

    def objective(trial):
        alpha = trial.suggest_float("alpha", lo, hi) if hi > lo else lo
        r = space.layer_ranges[trial.suggest_categorical("layer_range", list(range(len(space.layer_ranges))))]
        strength = trial.suggest_categorical("strength", list(space.strengths))
        rank = trial.suggest_categorical("rank", list(space.ranks))
        pt = run(space.params(alpha, r, strength, rank))
        return tuple(float(pt["proxy"][k]) for k, _ in PROXY_OBJECTIVES)

    study.optimize(objective, n_trials=trials or len(space.grid()))
    return points


def select_for_confirmation(points: Sequence[Mapping], n: int, max_kl: float | None = None) -> list[int]:
    """Ids of up to ``n`` points of the proxy front, spread evenly along the
    harmful refusal score (the front's ends included).  First-token KL is exact
    at proxy time, so with ``max_kl`` (a rule's KL bound) the front is taken over
    the points within it: otherwise generation is spent on points the rule must
    reject, and the strongest admissible ones go unconfirmed (SmolLM2, 72 points:
    5 of the 8 confirmed had KL <= 0.05 and one 0.50; the highest refusal score
    within KL 0.3, -1.43 at KL 0.28, went unconfirmed while the best admissible
    confirmed point scored -1.54).  No point within the bound: the whole front."""
    pool = list(points)
    if max_kl is not None:
        within = [p for p in points if p["proxy"].get("kl") is not None and p["proxy"]["kl"] <= max_kl]
        if not within:
            log.warning("no searched point has first-token KL <= %g: confirming the whole proxy front instead", max_kl)
        pool = within or pool
    front = pareto_front([p["proxy"] for p in pool], PROXY_OBJECTIVES)
    ids = [pool[i]["id"] for i in front]
    if len(ids) <= n or n <= 0:
        return ids if n > 0 else []
    byid = {p["id"]: p for p in points}
    order = sorted(ids, key=lambda i: (byid[i]["proxy"]["harmful_score"], -byid[i]["proxy"]["kl"], i))
    if n == 1:
        return [order[-1]]
    return sorted({order[round(j * (len(order) - 1) / (n - 1))] for j in range(n)})


# ----------------------------------------------------------------------------- proxies
@dataclass
class ProxySets:
    """Chat-formatted validation prompts, the refusal first tokens and the
    unedited model's first-token log-probabilities on the harmless ones."""
    texts: dict[str, list[str]]
    refusal_ids: list[int]
    ref_harmless: torch.Tensor


def proxy_sets(lm: LoadedModel, harmful: Sequence[str], harmless: Sequence[str],
               borderline: Sequence[str] | None = None, batch_size: int = 16) -> ProxySets:
    from .directions import refusal_token_ids
    from .prompts import format_chat

    texts = {"harmful": [format_chat(lm.tokenizer, p) for p in harmful],
             "harmless": [format_chat(lm.tokenizer, p) for p in harmless]}
    if borderline:
        texts["borderline"] = [format_chat(lm.tokenizer, p) for p in borderline]
    return ProxySets(texts, refusal_token_ids(lm.tokenizer), last_logprobs(lm, texts["harmless"], batch_size))


def proxy_metrics(lm: LoadedModel, data: ProxySets, batch_size: int = 16) -> dict:
    """No generation: the mean first-token refusal score ``log p(R) - log(1 - p(R))``
    per set (``*_score``; the share with ``p(R) > 1/2`` as ``*_refusal_first_token``)
    and the first-token KL on the harmless prompts."""
    from .directions import refusal_score_from_logprobs

    out: dict = {}
    for name, texts in data.texts.items():
        lp = last_logprobs(lm, texts, batch_size)
        sc = refusal_score_from_logprobs(lp, data.refusal_ids)
        out[f"{name}_score"] = float(sc.mean())
        out[f"{name}_refusal_first_token"] = float((sc > 0).double().mean())
        if name == "harmless":
            out["kl"] = first_token_kl(data.ref_harmless, lp)
    return out


# ----------------------------------------------------------------------------- the verb: tune, apply
@dataclass
class TuneResult:
    """What :func:`tune` produced: the folder, the content of its ``tune.json``,
    and the checkpoint written for the chosen point (``--write``), if any."""
    out: Path
    data: dict
    written: object | None = None  # pipeline.HardenResult


def _finite(x):
    """JSON-safe copy: non-finite floats become None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _gated_for(params: Mapping, ridge: float, vs_all: Mapping[str, torch.Tensor], basis: torch.Tensor | None,
               layer_of: Mapping[str, int], borderline_calibration: bool, calibration: dict):
    """The ``Gated`` edit of one search point, from the read vectors of its fit."""
    from .pipeline import Gated

    first, last = params["layers"]
    layers = list(range(first, last + 1))
    kw = {"post_weight": params["strength"]} if params["fit"] == "ridge" else {"null_ratio": params["strength"]}
    g = Gated(layers=layers, ridge=ridge, borderline_calibration=borderline_calibration, rank=params["rank"],
              fit=params["fit"], **kw)
    keep = set(layers)
    g.vs = {n: v for n, v in vs_all.items() if layer_of.get(n) in keep}
    g.basis = basis if params["rank"] > 1 else None
    g.calibration = dict(calibration)
    return g


class _AtomicFolder:
    """A temporary sibling folder renamed to ``out`` on success (an existing
    ``out`` is replaced only with ``overwrite``, and only at the end)."""

    def __init__(self, out: Path, overwrite: bool, inputs=()):
        from .checkpoint import CheckpointWriter

        CheckpointWriter.check_target(out, overwrite, inputs)
        self.out, self.overwrite = out, overwrite

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        from .checkpoint.writer import move_into_place

        try:
            if exc_type is None:
                move_into_place(self.tmp, self.out, self.overwrite)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already once moved
        return False


def tune(source: str, out: str | Path, *, fit: str = "ridge", alphas: Sequence[float] | None = None,
         layer_ranges: Sequence[Sequence[int]] | None = None, strengths: Sequence[float] | None = None,
         ranks: Sequence[int] | None = None, ridge: float = 0.1, sampler: str = "grid", trials: int | None = None,
         seed: int = 0, confirm: int = 8, confirm_max_kl: float | None = None, eval_tokens: int = 48,
         direction_file: str | Path | None = None, sources: Sequence[str] = ("response",), rank_by: str = "selectivity", prompts=None,
         borderline_calibration: bool = True, overwrite: bool = False, revision: str | None = None,
         allow_pickle: bool = False, device: str | None = None, batch_size: int = 40, say=None) -> TuneResult:
    """Pareto search of gated injection on the validation split (module
    docstring); writes ``out/`` = ``tune.json``, ``tune.png``, ``fits/``, the direction."""
    import time

    from .directions import Directions
    from .edits.gated import fit_gates
    from .edits.rosi import unit
    from .model import load_model
    from .pipeline import (Gated, PromptConfig, _say, compute_directions, direction_record, input_info,
                           open_model)

    say = _say(say)
    t0 = time.time()
    out = Path(out)
    if sampler == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SurgeryError("the tpe sampler needs Optuna, which is not installed (pip install optuna), "
                               "or use the grid sampler") from None
    elif sampler != "grid":
        raise SurgeryError(f"sampler must be grid or tpe, got {sampler!r}")
    if confirm < 1:
        raise SurgeryError(f"confirm must be at least 1, got {confirm}")
    prompts = prompts or PromptConfig()
    folder = _AtomicFolder(out, overwrite, [source, direction_file, *prompts.sources()])  # checks the target now
    resolved, reader, arch = open_model(source, revision, allow_pickle, say)
    with reader:
        num_layers = arch.num_layers(reader.config)
        space = SearchSpace.default(num_layers, fit, alphas, layer_ranges, strengths, ranks, ridge)
        space.check(num_layers)
        dirs = Directions.load(direction_file) if direction_file else None
        if dirs is not None:
            dirs.check_width(arch.hidden_size(reader.config), f"model {source}")
        ht, bt, hv, bv = prompts.train_val()  # validates the prompt sources before the model loads
        blv = prompts.val("borderline") if prompts.borderline else None
        info = input_info(resolved, reader)
    n_grid = len(space.grid())
    say(f"search space: {len(space.alphas)} alphas x {len(space.layer_ranges)} layer ranges x "
        f"{len(space.strengths)} {STRENGTH_NAMES[space.fit]} x {len(space.ranks)} ranks = {n_grid} points"
        + (f"; TPE, {trials or n_grid} trials" if sampler == "tpe" else ""))
    lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
    with folder as tmp:
        if dirs is None:
            dirs = compute_directions(lm, prompts, sources, rank_by, say)
        dir_path = dirs.save(tmp / "direction.safetensors")
        r_hat = unit(dirs.best.vector)
        gate = Gated(borderline_calibration=borderline_calibration)
        gate.use_direction(dirs)
        stats, targets = gate.calibrate(lm, prompts, say, rank=max(space.ranks))
        layer_of = {w.name: w.layer for w in lm.arch.residual_writers([n for n, _ in lm.model.named_parameters()],
                                                                     lm.model.config)}
        (tmp / "fits").mkdir()
        fits: dict[tuple, tuple] = {}
        fit_records: dict[str, dict] = {}

        def get_fit(strength: float, rank: int):
            key = (strength, rank)
            if key not in fits:
                from .checkpoint.files import save_tensors, sha256_file

                kw = {"post_weight": strength} if space.fit == "ridge" else {"null_ratio": strength}
                tg = targets.truncate(rank) if rank > 1 else None
                vs = fit_gates(stats, space.fit, ridge=space.ridge, targets=tg, **kw)
                basis = None if tg is None else tg.basis.float()
                fid = f"fit-{len(fits):02d}"
                path = tmp / "fits" / f"{fid}.safetensors"
                tensors = {k: v.contiguous() for k, v in vs.items()}
                if basis is not None:
                    tensors["refusal_basis"] = basis.contiguous()
                save_tensors(tensors, path, {"format": "surgery.gates/2", "fit": space.fit, "strength": repr(strength),
                                             "rank": str(rank)})
                fit_records[fid] = {"fit": space.fit, STRENGTH_NAMES[space.fit]: strength, "rank": rank,
                                    "ridge": space.ridge, "file": f"fits/{fid}.safetensors", "sha256": sha256_file(path)}
                fits[key] = (fid, vs, basis)
            return fits[key]

        def edit_for(params: Mapping):
            _, vs, basis = get_fit(params["strength"], params["rank"])
            g = _gated_for(params, space.ridge, vs, basis, layer_of, borderline_calibration, gate.calibration)
            return g.in_memory(lm, r_hat, params["alpha"])

        pdata = proxy_sets(lm, list(hv.prompts), list(bv.prompts), list(blv.prompts) if blv else None)
        baseline = {"proxy": proxy_metrics(lm, pdata)}

        def evaluate(params: dict) -> dict:
            with edit_for(params):
                return proxy_metrics(lm, pdata)

        def progress(pt):
            p, q = pt["params"], pt["proxy"]
            say(f"  [{pt['id']}] alpha {p['alpha']:.3g}, layers {p['layers'][0]}-{p['layers'][1]}, "
                f"{STRENGTH_NAMES[p['fit']]} {p['strength']:g}, rank {p['rank']}: refusal score harmful "
                f"{q['harmful_score']:+.2f}, harmless {q['harmless_score']:+.2f}, KL {q['kl']:.3f}")

        say(f"proxies (first-token refusal score, KL) on the validation split: {len(hv)} harmful, {len(bv)} harmless"
            + (f", {len(blv)} borderline" if blv else ""))
        points = search(space, evaluate, sampler, trials, seed, progress)
        for p in points:
            p["fit_id"] = get_fit(p["params"]["strength"], p["params"]["rank"])[0]
        chosen = select_for_confirmation(points, confirm, confirm_max_kl)
        proxy_front = {points[i]["id"] for i in pareto_front([p["proxy"] for p in points], PROXY_OBJECTIVES)}
        say(f"proxy front: {len(proxy_front)} points; confirming {len(chosen)} by generation ({eval_tokens} tokens)")
        judge = MarkerJudge()
        gen = dict(judge=judge, max_new_tokens=eval_tokens, batch_size=batch_size,
                   borderline=list(blv.prompts) if blv else None)
        baseline["metrics"] = measure(lm, list(hv.prompts), list(bv.prompts), pdata.ref_harmless, **gen)
        byid = {p["id"]: p for p in points}
        for i in chosen:
            p = byid[i]
            with edit_for(p["params"]):
                p["metrics"] = measure(lm, list(hv.prompts), list(bv.prompts), pdata.ref_harmless, **gen)
            m = p["metrics"]
            say(f"  [{i}] harmful {m['harmful_refusal']:.0%}, harmless {m['harmless_refusal']:.0%}"
                + (f", borderline {m['borderline_refusal']:.0%}" if "borderline_refusal" in m else "")
                + f", KL {m['kl']:.3f}")
        confirmed = [p for p in points if p.get("metrics")]
        front = {confirmed[j]["id"] for j in pareto_front([p["metrics"] for p in confirmed])}
        for p in points:
            p.setdefault("metrics", None)
            p["confirmed"] = p["metrics"] is not None
            p["proxy_front"] = p["id"] in proxy_front
            p["front"] = p["id"] in front
        data = {
            "format": TUNE_FORMAT,
            "model": {"source": source, "revision": revision, "input": info},
            "direction": direction_record(dir_path, dirs),
            "prompts": {"harmful": prompts.harmful, "harmless": prompts.harmless, "borderline": prompts.borderline,
                        "column": prompts.column, "n_train": prompts.n_train, "n_val": prompts.n_val},
            "calibration": gate.calibration,
            "borderline_calibration": borderline_calibration,
            "datasets": {**dirs.meta.get("datasets", {}), **gate.calibration, "tune_harmful_val": hv.describe(),
                         "tune_harmless_val": bv.describe(), **({"tune_borderline_val": blv.describe()} if blv else {})},
            "space": space.to_dict(),
            "search": {"sampler": sampler, "trials": len(points), "seed": seed, "confirm": confirm,
                       "confirm_max_kl": confirm_max_kl,
                       "eval_tokens": eval_tokens, "judge": getattr(judge, "name", type(judge).__name__),
                       "proxy": "mean first-token refusal score log p(R) - log(1 - p(R)) (surgery.directions), "
                                "first-token KL on harmless prompts",
                       "proxy_objectives": [list(o) for o in PROXY_OBJECTIVES],
                       "objectives": [list(o) for o in OBJECTIVES], "split": "validation"},
            "fits": fit_records,
            "baseline": baseline,
            "points": points,
            "proxy_front": sorted(proxy_front),
            "front": sorted(front),
            "seconds": round(time.time() - t0, 1),
        }
        data = _finite(data)
        (tmp / "tune.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        plot_tune(data, tmp / "tune.png")
    say(format_front(data))
    say(f"wrote {out} (tune.json, tune.png); write a point with: surgery tune-apply {out} -o OUT --pick N "
        f"(or --rule \"max refusal with over-refusal <= 0.05 and kl <= 0.2\")")
    return TuneResult(out, data)


def read_tune(tune_dir: str | Path) -> dict:
    path = Path(tune_dir) / "tune.json"
    if not path.is_file():
        raise SurgeryError(f"{path} not found (not a surgery tune folder?)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SurgeryError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != TUNE_FORMAT:
        raise SurgeryError(f"{path}: not a {TUNE_FORMAT} file")
    return data


def apply_tune(tune_dir: str | Path, out: str | Path, *, pick: int | None = None, rule: str | None = None,
               model: str | None = None, run_eval: bool = False, eval_tokens: int = 48, overwrite: bool = False,
               allow_pickle: bool = False, device: str | None = None, max_shard_bytes: int = 5_000_000_000, say=None):
    """Write the checkpoint of one point of a tune result (chosen by id or rule)
    through ``Gated.write`` with the fitted read vectors saved by the search;
    the manifest records the search and the choice.  Returns a ``HardenResult``."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointWriter, sha256_file
    from .directions import Directions
    from .edits.rosi import unit
    from .manifest import build_manifest
    from .model import load_model
    from .pipeline import HardenResult, PromptConfig, _say, CommittedEvaluation, evaluation_text, input_info, open_model

    say = _say(say)
    tune_dir, out = Path(tune_dir), Path(out)
    data = read_tune(tune_dir)
    point, choice = choose_point(data, pick, rule)
    CheckpointWriter.check_target(out, overwrite, [tune_dir, model or (data.get("model") or {}).get("source")],
                                  max_shard_bytes=max_shard_bytes)
    params = point["params"]
    fit_rec = data["fits"].get(point["fit_id"])
    if fit_rec is None:
        raise SurgeryError(f"{tune_dir / 'tune.json'}: point {point['id']} names a fit {point['fit_id']!r} it does not record")
    for rel, want in ((fit_rec["file"], fit_rec["sha256"]), ("direction.safetensors", data["direction"]["sha256"])):
        f = tune_dir / rel
        if not f.is_file():
            raise SurgeryError(f"{f} is missing from the tune folder")
        if sha256_file(f) != want:
            raise SurgeryError(f"{f} does not match the sha256 recorded in {tune_dir / 'tune.json'}")
    src = model or data["model"]["source"]
    resolved, reader, arch = open_model(src, data["model"].get("revision") if model is None else None, allow_pickle, say)
    with reader:
        info = input_info(resolved, reader)
        want = data["model"]["input"].get("weight_files", {})
        if info["weight_files"] != want:
            diff = sorted(set(want) ^ set(info["weight_files"])) or sorted(
                k for k in want if want[k] != info["weight_files"].get(k))
            raise SurgeryError(f"model {src}: weight file {diff[0]} differs from the model tuned in {tune_dir}")
        tensors = load_file(str(tune_dir / fit_rec["file"]))
        basis = tensors.pop("refusal_basis", None)
        dir_path = tune_dir / "direction.safetensors"
        dirs = Directions.load(dir_path)
        r_hat = unit(dirs.best.vector)
        layer_of = {w.name: w.layer for w in arch.residual_writers(reader.names, reader.config)}
        g = _gated_for(params, data["space"]["ridge"], tensors, basis, layer_of,
                       data.get("borderline_calibration", True), data.get("calibration", {}))
        alpha = params["alpha"]
        say(f"point {point['id']}: alpha {alpha:g}, layers {params['layers'][0]}-{params['layers'][1]}, "
            f"{STRENGTH_NAMES[params['fit']]} {params['strength']:g}, rank {params['rank']} ({choice['reason']})")
        parameters = {"alpha": alpha, "alpha_choice": choice["reason"], **g.parameters(),
                      "tune": {"folder": str(tune_dir), "tune_json_sha256": sha256_file(tune_dir / "tune.json"),
                               "space": data["space"], "search": data["search"], "points": len(data["points"]),
                               "confirmed": sum(1 for p in data["points"] if p.get("confirmed")),
                               "front": data["front"], "choice": choice, "point": point}}
        manifest = build_manifest(input_info=info, method=g.name, parameters=parameters, datasets=data["datasets"],
                                  direction=data["direction"])
        with tempfile.TemporaryDirectory(prefix="surgery-") as work:
            files = {"direction.safetensors": dir_path,
                     "direction.safetensors.json": Path(str(dir_path) + ".json"),
                     "tune.json": tune_dir / "tune.json", **g.files(Path(work))}
            evaluation = (CommittedEvaluation(lambda: load_model(resolved.folder, device=device, allow_pickle=allow_pickle),
                                               PromptConfig(**data["prompts"]), eval_tokens, device, say)
                          if run_eval else None)
            g.write(reader, arch, out, r_hat, alpha, overwrite=overwrite, files=files, manifest=manifest,
                    max_shard_bytes=max_shard_bytes, say=say, evaluate=evaluation)
    result = HardenResult(out, alpha, data["direction"], [])
    if evaluation is not None:
        result.evaluation = evaluation.report
        say(evaluation_text(result.evaluation))
    return result


# ----------------------------------------------------------------------------- report
def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_front(data: Mapping) -> str:
    """The unedited model and the front's points, one line each (validation split)."""
    name = STRENGTH_NAMES.get(data["space"]["fit"], "strength")
    head = ["id", "alpha", "layers", name, "rank", "harmful", "harmless", "borderline", "KL"]
    rows = []
    b = data["baseline"].get("metrics") or {}
    rows.append(["unedited", "0", "-", "-", "-", _pct(b.get("harmful_refusal")), _pct(b.get("harmless_refusal")),
                 _pct(b.get("borderline_refusal")), f"{b.get('kl', 0.0):.3f}"])
    byid = {p["id"]: p for p in data["points"]}
    for i in data["front"]:
        p, m = byid[i]["params"], byid[i]["metrics"]
        rows.append([str(i), f"{p['alpha']:.3g}", f"{p['layers'][0]}-{p['layers'][1]}", f"{p['strength']:g}",
                     str(p["rank"]), _pct(m.get("harmful_refusal")), _pct(m.get("harmless_refusal")),
                     _pct(m.get("borderline_refusal")),
                     "-" if m.get("kl") is None else f"{m['kl']:.3f}"])
    widths = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    lines = [f"Pareto front on the validation split ({len(data['points'])} points searched, "
             f"{sum(1 for p in data['points'] if p.get('confirmed'))} confirmed by generation):",
             "  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot_tune(data: Mapping, path: str | Path) -> Path:
    """Two panels (matplotlib Agg canvas, no pyplot): the confirmed points'
    over-refusal against harmful refusal (generation, colour = KL, the front
    ringed and numbered, the unedited model as a cross), and every point's
    proxies (first-token refusal scores, colour = KL, the proxy front ringed)."""
    import matplotlib
    from .plotting import figure, save_png
    from matplotlib.colors import Normalize

    path = Path(path)
    pts = data["points"]
    kls = [v for p in pts for v in (p["proxy"].get("kl"), (p.get("metrics") or {}).get("kl")) if v is not None]
    norm = Normalize(vmin=0.0, vmax=max(kls + [1e-3]))
    cmap = matplotlib.colormaps["viridis"]
    fig = figure((12, 5))
    ax, ax2 = fig.subplots(1, 2)
    conf = [p for p in pts if p.get("metrics")]
    sc = None
    if conf:
        x = [p["metrics"]["harmful_refusal"] for p in conf]
        y = [p["metrics"]["harmless_refusal"] for p in conf]
        c = [p["metrics"]["kl"] if p["metrics"].get("kl") is not None else float("nan") for p in conf]
        sc = ax.scatter(x, y, c=c, cmap=cmap, norm=norm, s=45, zorder=2)
        for p in conf:
            if p.get("front"):
                m = p["metrics"]
                ax.scatter([m["harmful_refusal"]], [m["harmless_refusal"]], s=170, facecolors="none",
                           edgecolors="red", linewidths=1.5, zorder=3)
                ax.annotate(str(p["id"]), (m["harmful_refusal"], m["harmless_refusal"]), textcoords="offset points",
                            xytext=(6, 5), fontsize=8, color="red")
    b = data["baseline"].get("metrics")
    if b:
        ax.scatter([b["harmful_refusal"]], [b["harmless_refusal"]], marker="x", c="black", s=50, zorder=3,
                   label="unedited")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("harmful refusal (validation, generation)")
    ax.set_ylabel("harmless over-refusal (validation, generation)")
    ax.set_title("confirmed points; Pareto front ringed (id = --pick)", fontsize=9)
    ax.grid(alpha=0.3)
    x = [p["proxy"]["harmful_score"] for p in pts]
    y = [p["proxy"]["harmless_score"] for p in pts]
    c = [p["proxy"]["kl"] if p["proxy"].get("kl") is not None else float("nan") for p in pts]
    sc2 = ax2.scatter(x, y, c=c, cmap=cmap, norm=norm, s=18, zorder=2)
    fx = [p["proxy"]["harmful_score"] for p in pts if p.get("proxy_front")]
    fy = [p["proxy"]["harmless_score"] for p in pts if p.get("proxy_front")]
    ax2.scatter(fx, fy, s=70, facecolors="none", edgecolors="orange", linewidths=1.2, zorder=3, label="proxy front")
    cx = [p["proxy"]["harmful_score"] for p in conf]
    cy = [p["proxy"]["harmless_score"] for p in conf]
    ax2.scatter(cx, cy, s=8, c="black", zorder=4, label="confirmed")
    ax2.legend(loc="upper left", fontsize=8)
    ax2.set_xlabel("harmful first-token refusal score (higher: refuses more)")
    ax2.set_ylabel("harmless first-token refusal score")
    ax2.set_title(f"proxies, all {len(pts)} points", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.colorbar(sc if sc is not None else sc2, ax=[ax, ax2], shrink=0.85, label="first-token KL (harmless)")
    fig.suptitle(f"surgery tune: gated injection on {data['model']['source']}", fontsize=10)
    return save_png(fig, path)
