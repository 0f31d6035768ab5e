"""Loading a checkpoint folder as a live model for measurement (forward passes,
generation), and small in-memory weight edits used while measuring.

Editing for output never goes through here: that is streamed tensor by tensor
(surgery.checkpoint).  Here the whole model is in memory, which is fine for the
forward passes that directions, sweeps and evaluation need.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .architectures import Architecture, get_architecture


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    folder: Path

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers(self.model.config)

    @property
    def hidden_size(self) -> int:
        return self.arch.hidden_size(self.model.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def layers(self) -> torch.nn.ModuleList:
        return get_submodule(self.model, self.arch.layers_module)


def get_submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = model
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(folder: str | Path, device: str | None = None, dtype: torch.dtype | None = torch.float32,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load an HF checkpoint folder for measurement.  float32 by default (this
    is a CPU-first tool and measurements should not be rounded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(pick_device(device))
    model.eval()
    model.requires_grad_(False)
    arch = get_architecture(model.config)
    return LoadedModel(model=model, tokenizer=tok, arch=arch, folder=folder)


@contextlib.contextmanager
def patched_weights(model: torch.nn.Module, new: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace parameters (by state-dict name) with new values; the
    originals are always restored, even on error."""
    params = dict(model.named_parameters())
    saved = {}
    try:
        for name, value in new.items():
            if name not in params:
                raise KeyError(f"model has no parameter {name}")
            p = params[name]
            saved[name] = p.data.clone()
            p.data.copy_(value.to(p.dtype))
        yield
    finally:
        for name, value in saved.items():
            params[name].data.copy_(value)
