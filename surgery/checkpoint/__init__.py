"""Checkpoint I/O that streams: read one tensor at a time, write straight to shard positions.

* :mod:`.reader`  -- :class:`CheckpointReader`: lazy, validated at open, ~one tensor in memory.
* :mod:`.writer`  -- :class:`CheckpointWriter` (planned headers, atomic temp-folder commit)
  and :func:`stream_rewrite` (reader -> edit -> writer, one tensor at a time).
* :mod:`.resolve` -- :func:`resolve_model`: local folder, GGUF (converted once, cached), Hub id.
* :mod:`.files`   -- :func:`weight_files`, :func:`sha256_file`, :func:`copy_aux_files`.

Peak memory of a rewrite is about one tensor (plus the edit's own temporaries),
independent of the number of layers; ``benchmarks/stream_memory.py`` measures it.
"""

from .files import copy_aux_files, load_config, sha256_file, weight_files
from .reader import CheckpointReader, TensorInfo, read_safetensors_header
from .resolve import ResolvedModel, resolve_model
from .writer import CheckpointWriter, stream_rewrite

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "ResolvedModel",
    "TensorInfo",
    "copy_aux_files",
    "load_config",
    "read_safetensors_header",
    "resolve_model",
    "sha256_file",
    "stream_rewrite",
    "weight_files",
]
