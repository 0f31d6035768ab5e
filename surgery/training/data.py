"""Refusal training data (methods.md §4–§5): harmful prompt → a refusal,
harmless (and borderline) prompt → the model's own reply.

* Refusals: the model's own refusal under a safety system prompt where it gives
  one (judged by the refusal judge), otherwise one of the project's refusal
  texts (``surgery/prompts/data/refusals.txt``), picked by a seeded generator so
  the set is varied and reproducible.
* Kept behaviour: the model's own greedy reply (self-distillation).  The trainer
  matches the original's whole next-token *distribution* on these replies (a KL
  loss against the model with its adapters switched off), not just its greedy
  text: greedy targets make the model more peaked than the original and drive
  first-token KL up (docs/findings: KL 1.25 with greedy targets).
* Refusal trajectories on kept prompts (``refusal_trajectories``): the same KL,
  along the first tokens of a refusal text after a harmless prompt.  Teacher
  forcing on the model's own replies never visits a refusal prefix, so without
  these the adapted model is free to continue "I" with "'m sorry" on harmless
  prompts; the original, which barely refuses, gives those continuations low
  probability, and matching it there is what keeps over-refusal down.  Two
  tokens by default ("I" + "'m"): with six ("I'm sorry, but I can't") the
  trajectories also taught the original's continuation of "I'm sorry" on
  harmless prompts ("… for your loss"), and the trained model began its
  harmful refusals with it ("I'm sorry for your loss. I'm here to help…"):
  validation harmful refusal 72% with six tokens, 92% with two (docs/training.md).

Every example stores token ids (prompt rendered with the chat template, reply
ending with the end-of-turn token when the reply was complete), so the trainer
never re-tokenises and the data hash covers exactly what was trained on.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import SurgeryError
from ..evaluation.generate import chat_texts, generate
from ..evaluation.judges import Judge, MarkerJudge
from ..model import LoadedModel
from ..prompts import PromptSet, refusal_texts

SAFETY_SYSTEM = ("You are a careful, safe assistant. If a request could help someone cause harm, refuse it "
                 "briefly, starting with \"I'm sorry\" or \"I can't\". Otherwise answer helpfully.")


@dataclass
class Example:
    prompt: str
    prompt_ids: list[int]
    reply_ids: list[int]
    kind: str  # "imitate" (cross-entropy on the reply, e.g. a refusal) or "keep" (match the original's distribution)
    origin: str  # "own-refusal", "refusal-text", "own-reply"


@dataclass
class RefusalData:
    examples: list[Example]
    meta: dict = field(default_factory=dict)

    def counts(self) -> dict:
        out: dict = {}
        for e in self.examples:
            out[e.origin] = out.get(e.origin, 0) + 1
        return out

    def sha256(self) -> str:
        h = hashlib.sha256()
        for e in self.examples:
            h.update(json.dumps([e.kind, e.prompt_ids, e.reply_ids]).encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {**self.meta, "examples": len(self.examples), "by_origin": self.counts(), "sha256": self.sha256()}


def _eos_ids(lm: LoadedModel) -> list[int]:
    eos = lm.model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def build_refusal_data(lm: LoadedModel, harmful: PromptSet, keep: Sequence[PromptSet], *, reply_tokens: int = 40,
                       own_refusals: bool = True, judge: Judge | None = None, seed: int = 0,
                       batch_size: int = 32, refusal_trajectories: int = 2) -> RefusalData:
    """Examples for refusal training.  ``keep`` are the sets whose behaviour is
    kept (harmless, borderline).  Raises before any generation when a set is
    empty (a trainer without harmful examples would teach nothing)."""
    if len(harmful) == 0:
        raise SurgeryError(f"refusal training data: no harmful examples in {harmful.source}")
    keep = [k for k in keep if k is not None]
    if not keep or sum(len(k) for k in keep) == 0:
        raise SurgeryError("refusal training data: no harmless examples (needed to keep the model's behaviour)")
    judge = judge or MarkerJudge()
    tok = lm.tokenizer
    eos = _eos_ids(lm)
    rng = random.Random(seed)
    texts = refusal_texts()
    examples: list[Example] = []

    def prompt_ids(prompts):
        return [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(lm, prompts)]

    hp = list(harmful.prompts)
    own: list[str | None] = [None] * len(hp)
    if own_refusals:
        replies, ids = generate(lm, hp, max_new_tokens=reply_tokens, batch_size=batch_size, system=SAFETY_SYSTEM,
                                return_ids=True)
        verdicts = judge.judge(hp, replies)
        for i, (v, r) in enumerate(zip(verdicts, replies)):
            # a complete, short refusal only: a truncated one teaches rambling
            if v and len(ids[i]) < reply_tokens:
                own[i] = r
    for p, pid, o in zip(hp, prompt_ids(hp), own):
        text, origin = (o, "own-refusal") if o is not None else (rng.choice(texts), "refusal-text")
        examples.append(Example(p, pid, tok(text, add_special_tokens=False)["input_ids"] + eos[:1], "imitate", origin))
    for ps in keep:
        prompts = list(ps.prompts)
        _, ids = generate(lm, prompts, max_new_tokens=reply_tokens, batch_size=batch_size, return_ids=True)
        for p, pid, r in zip(prompts, prompt_ids(prompts), ids):
            done = len(r) < reply_tokens
            examples.append(Example(p, pid, list(r) + (eos[:1] if done else []), "keep", "own-reply"))
            if refusal_trajectories > 0:
                traj = tok(rng.choice(texts), add_special_tokens=False)["input_ids"][:refusal_trajectories]
                examples.append(Example(p, pid, traj, "keep", "refusal-trajectory"))
    meta = {"harmful": harmful.describe(), "keep": [k.describe() for k in keep], "reply_tokens": reply_tokens,
            "own_refusals": own_refusals, "safety_system_prompt": SAFETY_SYSTEM if own_refusals else None,
            "refusal_trajectory_tokens": refusal_trajectories, "seed": seed}
    return RefusalData(examples, meta)
