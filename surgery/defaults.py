"""Defaults that both the command line and the functions use, kept free of heavy
imports so ``surgery --help`` stays fast (the CLI imports torch only inside verbs)."""

# `surgery inject`, chosen on SmolLM2's validation split (docs/rosi-on-smollm2.md): at the strength
# each sweep keeps, the cascade with the harmful-weighted ridge fit refuses 65% of harmful prompts
# (5% harmless, KL 0.23) where the one-shot fits reach 45-50% and the cascade with the plain fit 40%.
# The cascade is rank one only: rank k stays one-shot.
INJECT_DEFAULTS = {"post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "cascade": True}

# `surgery inject`'s default gate (surgery.edits.opening): gated neurons in the last MLP that write the
# refusal's opening on harmful prompts.  On SmolLM2's validation split (docs/rosi-on-smollm2.md, session 8)
# it refuses 92.5% of harmful prompts with 2.5% harmless / 10% borderline over-refusal and first-token
# KL 0.03, where the linear cascade gate tops out near 80% at KL 0.15-0.3.
# continuation: the model's own next 32 tokens after the opening are negatives of the step reads (without
# them 12 of 40 harmful validation replies repeat the opening, "I'm sorry, but I'm sorry, but…"; with: 3).
OPENING_DEFAULTS = {"gate": "opening", "opening": "I'm sorry, but", "coverage": 0.97, "c": 4.0, "continuation": 32}

# Every kept-point rule (strength sweeps of rosi/inject, the trainers' validation; tuning.better_point):
# walking the points in order, a point replaces the kept one when it refuses more than this much more,
# or, within this much, when it over-refuses less (harmless + borderline).  SAILS' epoch-2 point and inject's opening gate at scale 1 are such points on SmolLM2.
REFUSAL_TOLERANCE = 0.05
