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
from .errors import CheckpointError


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
               trust_remote_code: bool = False, allow_pickle: bool = False) -> LoadedModel:
    """Load an HF checkpoint folder for measurement.  float32 by default (this
    is a CPU-first tool and measurements should not be rounded).

    The weights are the tensors :class:`~surgery.checkpoint.CheckpointReader`
    reads, the ones every edit streams into its output: transformers' own class for
    the ``model_type`` loads them from the files where it reads the same ones (one
    ``model.safetensors``, indexed shards: shard by shard, no second copy in memory),
    else from the reader's tensors (un-indexed shards, a pickled ``{"state_dict":
    ...}``; pickles only with ``allow_pickle``); its key renames and expert fusing apply.  All of them must be used and the model must get a value
    for every weight: a weight the checkpoint lacks (transformers would initialise
    it at random; a tied lm_head is not one) or a tensor the model has no place for
    is a CheckpointError naming the folder and the tensors."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, GenerationConfig

    from .checkpoint import CheckpointReader

    folder = Path(folder).expanduser()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    arch = get_architecture(config)
    gen = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() else None
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    kw = dict(config=config, dtype=dtype, generation_config=gen, output_loading_info=True,
              ignore_mismatched_sizes=True)  # reported in the loading info, refused below with the names
    with CheckpointReader(folder, allow_pickle=allow_pickle) as reader:
        if reader.format == "safetensors" and _transformers_reads_the_same(reader):
            weights = None  # transformers reads these files shard by shard (no second copy of the weights)
        else:
            weights = {name: reader.get(name) for name in reader.names}
    if weights is None:
        model, info = cls.from_pretrained(folder, use_safetensors=True, **kw)
    else:
        model, info = cls.from_pretrained(None, state_dict=weights, **kw)
        del weights
    _check_loaded(folder, info)
    model.config.name_or_path = str(folder)
    model.to(pick_device(device))
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, arch=arch, folder=folder)


def _transformers_reads_the_same(reader) -> bool:
    """Whether ``from_pretrained(folder)`` reads exactly the reader's tensors: one
    ``model.safetensors``, or shards with their index (which both follow).  Un-indexed
    shards and pickles (a ``{"state_dict": ...}`` wrapper) are handed over as tensors."""
    from .checkpoint.files import SAFETENSORS_INDEX

    files = [p.name for p in reader.weight_files]
    return files == ["model.safetensors"] or (reader.folder / SAFETENSORS_INDEX).is_file()


def _check_loaded(folder: Path, info: Mapping) -> None:
    """Refuse a model that transformers filled only in part (``output_loading_info``)."""
    def some(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = []
    if info.get("missing_keys"):
        parts.append(f"it lacks {len(info['missing_keys'])} weight(s) of the model, which transformers would "
                     f"initialise at random: {some(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        parts.append(f"the model has no place for {len(info['unexpected_keys'])} of its tensor(s): "
                     f"{some(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        parts.append(f"{len(info['mismatched_keys'])} tensor(s) have the wrong shape: "
                     f"{some(str(k[0]) if isinstance(k, tuple) else str(k) for k in info['mismatched_keys'])}")
    if parts:
        raise CheckpointError(f"cannot load {folder} as a model: {'; '.join(parts)}")


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
