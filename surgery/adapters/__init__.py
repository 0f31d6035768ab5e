"""Adapters in other tools' formats.  :mod:`.peft`: PEFT LoRA adapters (read,
check against a model, streaming merge, write); Safe-LoRA projects them
(:mod:`surgery.edits.safe_lora`)."""
from .peft import (AdapterError, LoraAdapter, LoraModule, MergePlan, load_adapter, merge_adapter, merge_edit,
                   pattern_key, save_peft_adapter)

__all__ = ["AdapterError", "LoraAdapter", "LoraModule", "MergePlan", "load_adapter", "merge_adapter", "merge_edit",
           "pattern_key", "save_peft_adapter"]
