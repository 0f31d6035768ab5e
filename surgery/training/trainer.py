"""A small, seeded LoRA training loop for refusal data (the one trainer behind
``surgery lora-sft`` and ``surgery sails``).

Loss per batch = cross-entropy on the reply tokens of ``imitate`` examples (refusals)
+ ``kl_weight`` x a divergence between the original and the adapted model over
the reply positions of ``keep`` examples (symmetric KL by default: see
:func:`divergence` for why forward KL alone lets refusal openings creep in).  The original is the same model with its adapters switched off
(``disable_adapter``), so no second copy is held.  Distilling distributions
rather than greedy text is what keeps first-token KL low.

Validation: every ``eval_every`` steps (default: twice per epoch) the adapted model
answers the validation prompts (greedy, judged by the refusal judge) and its
first-token KL on harmless validation prompts is measured.  The kept adapter
state is the best validation point: the highest harmful refusal among points
within the over-refusal and KL budgets (the same rule as strength sweeps,
:func:`surgery.tuning.choose`); training stops early once harmful refusal
reaches ``target_refusal`` within budget, or after ``patience`` validations
without a better point.  Deterministic on CPU for a given seed.

Dropout: the base model trains with its dropout off (:func:`train_mode`), and
the original's logits are always computed without it (:func:`_dropout_off`).
Safety fine-tuning distils the original's distributions on kept replies; with
base-model dropout on (GPT-2: 0.1) the adapted model at ``B = 0`` would already
differ from the original, so the KL would train against dropout noise rather
than against the adapters' change.  PEFT's own adapter dropout (``lora_dropout``,
0 in :func:`surgery.training.lora.attach`) is left in training mode.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..defaults import REFUSAL_TOLERANCE
from ..errors import SurgeryError, check_count
from ..evaluation.judges import Judge, MarkerJudge
from ..evaluation.metrics import first_token_kl, first_token_logprobs, refusal_rate
from ..model import LoadedModel
from ..tuning import better_point
from .data import Example, RefusalData


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    kl_weight: float = 3.0
    first_token_weight: float = 10.0  # the reply's first token decides refusal: it counts this many tokens
    divergence: str = "symmetric"  # forward | reverse | symmetric KL on kept replies (see ``divergence``)
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = None  # steps; None = twice per epoch
    eval_tokens: int = 24
    max_over_refusal: float = 0.10
    max_kl: float = 0.3
    target_refusal: float = 1.0
    patience: int = 2
    # 0: keep the validation point with the most harmful refusal within the budgets.  > 0: a point
    # whose harmful refusal is within this much of the kept one's replaces it when it over-refuses
    # less (harmless + borderline); one prompt of 40 is 0.025, so the default forgives two prompts
    refusal_tolerance: float = REFUSAL_TOLERANCE
    # stop after this many steps (validating there); the learning-rate schedule still spans every epoch,
    # so a run stopped at step n is the same as an unstopped run up to step n
    max_steps: int | None = None

    def describe(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Refuse values that cannot train (before any work); errors name the CLI option."""
        def bad(name: str, want: str) -> SurgeryError:
            return SurgeryError(f"{name} (--{name.replace('_', '-')}) must be {want}, got {getattr(self, name)!r}")

        for name in ("epochs", "batch_size", "patience", "eval_tokens", "max_steps", "eval_every"):
            v = getattr(self, name)
            if v is not None or name not in ("max_steps", "eval_every"):  # those two may be None (no limit)
                check_count(v, f"{name} (--{name.replace('_', '-')})")
        for name in ("lr", "first_token_weight", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise bad(name, "> 0")
        for name in ("kl_weight", "weight_decay", "max_kl", "refusal_tolerance"):
            if not getattr(self, name) >= 0:
                raise bad(name, ">= 0")
        for name in ("warmup", "max_over_refusal", "target_refusal"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "between 0 and 1")
        if self.divergence not in DIVERGENCES:
            raise bad("divergence", f"one of {', '.join(DIVERGENCES)}")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # validation points
    losses: list[float] = field(default_factory=list)  # per step
    best: dict | None = None
    stopped: str = ""

    def describe(self) -> dict:
        tail = self.losses[-20:]
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "validation": self.history, "best": self.best,
                "stopped": self.stopped, "final_loss": (sum(tail) / len(tail)) if tail else None}


def _batch(examples: Sequence[Example], pad_id: int, device) -> dict:
    """Right-padded (positions stay 0..n-1 for every row); ``tgt`` marks the
    logits that predict reply tokens."""
    seqs = [e.prompt_ids + e.reply_ids for e in examples]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    tgt = torch.zeros((len(seqs), n), dtype=torch.bool)  # logit at t predicts token t+1
    for i, (e, s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        p = len(e.prompt_ids)
        tgt[i, p - 1 : len(s) - 1] = True
    imitate = torch.tensor([e.kind == "imitate" for e in examples])
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "tgt": tgt.to(device),
            "imitate": imitate.to(device)}


def _length_batches(examples: Sequence[Example], size: int, rng: random.Random, pool: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding, same examples per
    epoch): shuffle, sort each pool of ``pool`` batches by length, cut into
    batches, shuffle the batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    out: list[list[int]] = []
    for i in range(0, len(order), size * pool):
        chunk = sorted(order[i : i + size * pool], key=lambda j: len(examples[j].prompt_ids) + len(examples[j].reply_ids))
        out.extend(chunk[k : k + size] for k in range(0, len(chunk), size))
    rng.shuffle(out)
    return out


def _weights(tgt: torch.Tensor, first: float) -> torch.Tensor:
    """Per-position weights of the selected (reply-predicting) logits: the
    first of each row counts ``first``, the rest 1."""
    w = tgt.float()
    first_pos = tgt.float().argmax(dim=1)
    w[torch.arange(tgt.shape[0], device=tgt.device), first_pos] = first
    return w[tgt]


DIVERGENCES = ("forward", "reverse", "symmetric")


def divergence(t_lp: torch.Tensor, s_lp: torch.Tensor, kind: str = "symmetric") -> torch.Tensor:
    """Per-position divergence between the original's (``t_lp``) and the
    adapted model's (``s_lp``) next-token log-probabilities.

    Forward KL(original || adapted) weighs every token by the original's
    probability, so it charges the adapted model little for raising a token
    the original gave 1% (a refusal opening on a harmless prompt) to 40%;
    reverse KL(adapted || original) charges exactly that.  ``symmetric`` (the
    default) is their sum (Jeffreys divergence)."""
    fwd = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    if kind == "forward":
        return fwd
    rev = (s_lp.exp() * (s_lp - t_lp)).sum(-1)
    if kind == "reverse":
        return rev
    return fwd + rev


def train_mode(pm) -> None:
    """Training mode for the adapters only: every base-model module in eval
    mode (no dropout), PEFT's ``lora_dropout`` modules in train mode."""
    pm.eval()
    for m in pm.modules():
        drop = getattr(m, "lora_dropout", None)
        if isinstance(drop, torch.nn.Module):
            drop.train()


@contextlib.contextmanager
def _dropout_off(model):
    """Every module in eval mode inside, each module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)


def _loss(pm, b: dict, kl_weight: float, first: float = 1.0, kind: str = "symmetric") -> tuple[torch.Tensor, dict]:
    out = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    logits = out.logits.float()
    parts: dict = {}
    total = logits.new_zeros(())
    ref_rows = b["imitate"]
    if ref_rows.any():
        lg = logits[ref_rows][:, :-1]
        labels = b["input_ids"][ref_rows][:, 1:]
        sel = b["tgt"][ref_rows][:, :-1]
        w = _weights(sel, first)
        ce = (F.cross_entropy(lg[sel], labels[sel], reduction="none") * w).sum() / w.sum()
        total = total + ce
        parts["ce"] = float(ce.detach())
    keep_rows = ~ref_rows
    if keep_rows.any() and kl_weight > 0:
        with torch.no_grad(), pm.disable_adapter(), _dropout_off(pm):  # the original: no adapters, no dropout
            t_logits = pm(input_ids=b["input_ids"][keep_rows], attention_mask=b["attention_mask"][keep_rows],
                          use_cache=False).logits.float()
        sel = b["tgt"][keep_rows]
        t_lp = F.log_softmax(t_logits[sel], dim=-1)
        s_lp = F.log_softmax(logits[keep_rows][sel], dim=-1)
        w = _weights(sel, first)
        kl = (divergence(t_lp, s_lp, kind) * w).sum() / w.sum()
        total = total + kl_weight * kl
        parts["kl"] = float(kl.detach())
    return total, parts


def _better(p: dict, best: dict | None, cfg: TrainConfig) -> bool:
    return better_point(p, best, cfg.max_over_refusal, cfg.max_kl, cfg.refusal_tolerance)


def train(lm: LoadedModel, pm, data: RefusalData, val: dict[str, Sequence[str]], cfg: TrainConfig,
          judge: Judge | None = None, say: Callable[[str], None] | None = None, progress: bool = True) -> TrainResult:
    """Train the adapters of ``pm`` (a PEFT model wrapping ``lm.model``) in place;
    on return ``pm`` holds the best validation point's adapter weights.
    ``val`` maps ``harmful``/``harmless`` (and optionally ``borderline``) to prompts."""
    say = say or (lambda m: None)
    judge = judge or MarkerJudge()
    cfg.check()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n, chunk = len(data.examples), cfg.batch_size * 16
    steps_per_epoch = sum(math.ceil(min(chunk, n - i) / cfg.batch_size) for i in range(0, n, chunk))  # _length_batches
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ref_logp = first_token_logprobs(lm, list(val["harmless"]))  # adapters start at zero delta: the original
    eval_every = cfg.eval_every or max(1, steps_per_epoch // 2)
    res = TrainResult(0, 0.0)
    best_state = None
    since_best = 0
    t0 = time.time()

    def validate(step: int) -> bool:
        nonlocal best_state, since_best
        pm.eval()
        p = {"step": step, "epoch": round(step / steps_per_epoch, 2)}
        for name, prompts in val.items():
            p[f"{name}_refusal"] = refusal_rate(lm, list(prompts), judge, cfg.eval_tokens)[0]
        p["kl"] = first_token_kl(ref_logp, first_token_logprobs(lm, list(val["harmless"])))
        res.history.append(p)
        good = _better(p, res.best, cfg)
        say(f"  step {step} (epoch {p['epoch']:g}): harmful {p['harmful_refusal']:.0%}, harmless "
            f"{p['harmless_refusal']:.0%}" + (f", borderline {p['borderline_refusal']:.0%}" if "borderline_refusal" in p
                                              else "") + f", KL {p['kl']:.3f}" + ("  *" if good else ""))
        if good:
            res.best = p
            best_state = {k: v.detach().clone() for k, v in pm.named_parameters() if v.requires_grad}
            since_best = 0
        else:
            since_best += 1
        train_mode(pm)
        if res.best is not None and res.best["harmful_refusal"] >= cfg.target_refusal:
            res.stopped = f"target refusal {cfg.target_refusal:.0%} reached within budget"
            return True
        if since_best >= cfg.patience and res.best is not None:
            res.stopped = f"no better validation point in {cfg.patience} validations"
            return True
        return False

    train_mode(pm)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="training", unit="step", leave=False)
    step = 0
    stop = False
    try:
        for epoch in range(cfg.epochs):
            for idx in _length_batches(data.examples, cfg.batch_size, rng):
                b = _batch([data.examples[j] for j in idx], pad, lm.device)
                loss, parts = _loss(pm, b, cfg.kl_weight, cfg.first_token_weight, cfg.divergence)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                step += 1
                res.losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items()})
                budget = cfg.max_steps is not None and step >= cfg.max_steps
                if step % eval_every == 0 or step == total or budget:
                    if validate(step):
                        stop = True
                        break
                if budget:
                    res.stopped = f"step budget {cfg.max_steps} reached"
                    stop = True
                    break
            if stop:
                break
        if not res.stopped:
            res.stopped = "all epochs done"
    finally:
        if bar is not None:
            bar.close()
    pm.eval()
    if best_state is not None:
        with torch.no_grad():
            named = dict(pm.named_parameters())
            for k, v in best_state.items():
                named[k].copy_(v)
    else:
        res.stopped += "; no validation point within budget: the last state is kept"
    res.steps = step
    res.seconds = time.time() - t0
    return res
