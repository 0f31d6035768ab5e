"""surgery: harden the safety of open-weight LLMs by editing their weights.

Data flows one way: load -> measure (activations, directions) -> plan the edit
-> stream tensors through it -> write -> manifest -> verify.  See docs/architecture.md.
"""

__version__ = "0.1.0"
