"""Defaults that both the command line and the functions use, kept free of heavy
imports so ``surgery --help`` stays fast (the CLI imports torch only inside verbs)."""

# `surgery inject`, chosen on SmolLM2's validation split (docs/rosi-on-smollm2.md): at the strength
# each sweep keeps, the cascade with the harmful-weighted ridge fit refuses 65% of harmful prompts
# (5% harmless, KL 0.23) where the one-shot fits reach 45-50% and the cascade with the plain fit 40%.
# The cascade is rank one only: rank k stays one-shot.
INJECT_DEFAULTS = {"post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "cascade": True}
