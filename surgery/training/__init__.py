"""Training hardening adapters: refusal data (``data``), LoRA adapters on a
live model (``lora``), the loop (``trainer``).  ``surgery lora-sft`` and
``surgery sails`` (in :mod:`surgery.pipeline`) differ only in how the adapters
are initialised."""
from .data import Example, RefusalData, build_refusal_data
from .lora import LoraSpec, attach, find_targets, trainable_parameters
from .trainer import TrainConfig, TrainResult, train

__all__ = ["Example", "RefusalData", "build_refusal_data", "LoraSpec", "attach", "find_targets",
           "trainable_parameters", "TrainConfig", "TrainResult", "train"]
