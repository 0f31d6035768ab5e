"""Files of a checkpoint folder: which ones hold weights, hashing, aux-file copy.

A Hugging Face checkpoint folder is "weights + everything else".  This module
knows which is which:

* :func:`weight_files` lists the tensor files (safetensors shards, or pickled
  ``pytorch_model*.bin`` as a fallback) in a stable order; the reader and the
  manifest code both use it, so "the weights" means the same thing everywhere.
* :func:`copy_aux_files` copies the non-weight files a checkpoint needs to load
  (config, generation config, tokenizer files, chat templates, custom code,
  licence files) -- an allow-list, so stray files (README.md model cards,
  ``.gitattributes``, ONNX exports, our own ``surgery.json``) are never carried
  over.  ``config_updates`` are merged into ``config.json`` on the way.
* :func:`sha256_file` hashes in chunks (constant memory).
* :func:`write_atomic` / :func:`write_text_atomic`: every single file the package
  writes (artifacts, sidecar JSON, manifests, the copied config) goes through a
  temporary sibling renamed into place, so no reader sees a half-written file.
* :func:`save_tensors`: the package's small safetensors artifacts (directions,
  gates, unit maps, subspaces, adapters), byte-identical for identical content
  (``safetensors`` writes metadata keys in a per-process random order, which made
  ``surgery reproduce`` report a gate file as different), written atomically.

Every failure is a :class:`~surgery.errors.CheckpointError` with a one-line
message naming the file; nothing is only logged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from surgery.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# Non-weight files a checkpoint needs (fnmatch patterns, matched on the file name
# of top-level files only).  README.md is deliberately absent: model cards are
# written by the card module.
AUX_PATTERNS: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "tokenizer.model.v*",
    "*.tiktoken",
    "preprocessor_config.json",
    "processor_config.json",
    # custom code referenced by config.json "auto_map" (trust_remote_code models)
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
    # licence terms travel with derivatives
    "LICENSE",
    "LICENSE.*",
    "LICENCE",
    "LICENCE.*",
    "NOTICE",
    "NOTICE.*",
    "USE_POLICY.md",
)

# Folders copied whole (transformers saves extra chat templates here).
AUX_FOLDERS: tuple[str, ...] = ("additional_chat_templates",)

# Never copied even if a pattern above would match.
_NEVER_COPY = {SAFETENSORS_INDEX, PICKLE_INDEX, "surgery.json", "README.md"}


def _is_weight_name(name: str) -> bool:
    return name.endswith(".safetensors") or (name.startswith("pytorch_model") and name.endswith(".bin"))


def read_json_object(path: str | Path, error: type[Exception] = CheckpointError) -> dict:
    """A JSON file that must hold an object (configs, sidecars); any failure is a
    one-line ``error`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(path: Path) -> dict[str, str]:
    """weight_map of a ``*.index.json`` (tensor name -> shard file name)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read index {path}: {_one_line(e)}") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()
    ):
        raise CheckpointError(f"index {path} has no valid 'weight_map'")
    for shard in set(wmap.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"index {path} names a shard outside its folder: {shard!r}")
    return wmap


def _shards_in_index_order(wmap: dict[str, str]) -> list[str]:
    return sorted(set(wmap.values()))


def weight_files(folder) -> list[Path]:
    """Tensor files of checkpoint ``folder``, in reading order.

    Preference (as transformers): ``model.safetensors``, then
    ``model.safetensors.index.json`` (its shards, sorted by name), then
    un-indexed ``model-*.safetensors``, then the pickled equivalents
    (``pytorch_model.bin``, its index, ``pytorch_model-*.bin``).
    Raises CheckpointError if the folder is missing, holds no weights, or its
    index names a shard that does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"not a checkpoint folder: {folder}")
    index = folder / SAFETENSORS_INDEX
    if (folder / SAFETENSORS_SINGLE).is_file():
        files = [folder / SAFETENSORS_SINGLE]
    elif index.is_file():
        files = [folder / s for s in _shards_in_index_order(_read_index(index))]
    elif sorted(folder.glob("model-*.safetensors")):
        files = sorted(folder.glob("model-*.safetensors"))
    elif (folder / PICKLE_SINGLE).is_file():
        files = [folder / PICKLE_SINGLE]
    elif (folder / PICKLE_INDEX).is_file():
        files = [folder / s for s in _shards_in_index_order(_read_index(folder / PICKLE_INDEX))]
    elif sorted(folder.glob("pytorch_model-*.bin")):
        files = sorted(folder.glob("pytorch_model-*.bin"))
    else:
        raise CheckpointError(
            f"no weights in {folder} (expected model.safetensors, sharded model-*.safetensors "
            "with model.safetensors.index.json, or pytorch_model*.bin)"
        )
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"shard named in the index is missing: {f}")
    return files


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces (constant memory)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
    except OSError as e:
        raise CheckpointError(f"cannot hash {path}: {_one_line(e)}") from None
    return h.hexdigest()


def is_aux_file(name: str) -> bool:
    """True if a top-level file called ``name`` is a non-weight file worth copying."""
    if name in _NEVER_COPY or _is_weight_name(name) or name.endswith(".index.json"):
        return False
    return any(fnmatch.fnmatchcase(name, pat) for pat in AUX_PATTERNS)


def copy_aux_files(src_folder, dst_folder, config_updates: dict | None = None) -> list[str]:
    """Copy the non-weight files of checkpoint ``src_folder`` into ``dst_folder``.

    ``config.json`` is required; ``config_updates`` (e.g. ``{"tie_word_embeddings":
    False}``) are merged into it (top-level keys; ``tie_word_embeddings`` also in
    sub-configs that carry it, so an untied multimodal config does not contradict
    itself).  Symlinks (as in the HF cache) are followed: the copy holds the content.  Returns the copied file names,
    sorted.  Any failure raises CheckpointError naming the file.
    """
    src, dst = Path(src_folder), Path(dst_folder)
    if not src.is_dir():
        raise CheckpointError(f"not a checkpoint folder: {src}")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"no config.json in {src}")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {dst}: {_one_line(e)}") from None

    copied: list[str] = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        target = dst / name
        if entry.is_dir() and name in AUX_FOLDERS:
            try:
                shutil.copytree(entry, target, dirs_exist_ok=True)
            except (OSError, shutil.Error) as e:
                raise CheckpointError(f"cannot copy {entry} to {dst}: {_one_line(e)}") from None
            copied.append(name)
            continue
        if not entry.is_file() or not is_aux_file(name):
            continue
        try:
            if name == "config.json":
                config = load_config(entry)
                if config_updates:
                    config.update(config_updates)
                    if "tie_word_embeddings" in config_updates:  # a sub-config's copy too (gemma3's text_config)
                        for sub in config.values():
                            if isinstance(sub, dict) and "tie_word_embeddings" in sub:
                                sub["tie_word_embeddings"] = config_updates["tie_word_embeddings"]
                write_text_atomic(target, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
            else:
                shutil.copyfile(entry, target)
        except CheckpointError:
            raise
        except (OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"cannot copy {entry} to {dst}: {_one_line(e)}") from None
        copied.append(name)
    return copied


def load_config(path) -> dict:
    """Parse a ``config.json``; CheckpointError if missing or not a JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {path.parent}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON in {path}: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``write`` on a temporary sibling, then rename it
    into place (``os.replace``: atomic on one filesystem).  If ``write`` fails the
    temporary file is removed and ``path`` is left as it was."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # check_file_targets allows a folder still to be made
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_SPLIT_SUFFIX = re.compile(r"(?:\[[A-Za-z0-9_-]+\]|:(?:train|val|test))$")


def local_inputs(inputs) -> dict[Path, str]:
    """The inputs that are local paths, as ``{real path: as given}``: ``~`` expanded,
    a prompt source's ``[split]`` / ``:split`` suffix taken off; other sources
    (Hub ids, aliases, ``builtin:...``, readers) are skipped."""
    out: dict[Path, str] = {}
    for src in inputs:
        if src is None or not isinstance(src, (str, os.PathLike)):
            continue
        text = os.fspath(src)
        for cand in (text, _SPLIT_SUFFIX.sub("", text)):
            p = Path(cand).expanduser()
            if cand and p.exists():
                out.setdefault(Path(os.path.realpath(p)), text)
                break
    return out


def check_folder_inputs(out_dir: str | Path, inputs, overwrite: bool = False) -> None:
    """Raise CheckpointError if writing the folder ``out_dir`` would change an input:
    ``out_dir`` inside an input folder (the input's own verify would then fail), or,
    with ``overwrite``, ``out_dir`` being or holding an input (replacing it deletes it)."""
    real_out = Path(os.path.realpath(Path(out_dir).expanduser()))
    for real, src in local_inputs(inputs).items():
        if overwrite and (real == real_out or real_out in real.parents):
            raise CheckpointError(f"output folder {out_dir} {'is' if real == real_out else 'holds'} the input "
                                  f"{src}: --overwrite would delete it; write to another folder")
        if real != real_out and real in real_out.parents:
            raise CheckpointError(f"output folder {out_dir} is inside the input {src}: inputs are never modified; "
                                  "write to another folder")


def check_file_targets(targets, overwrite: bool = False, inputs=()) -> None:
    """Raise CheckpointError now if writing single files is bound to fail or would
    destroy something, before any work: ``targets`` is ``[(what, path)]`` (``what``
    names the option, e.g. ``--plot``).  Refused: two targets at one path, a target
    that is an input or lies inside an input folder (``inputs``: paths or other
    sources; non-paths skipped: inputs are never modified), an
    existing path without ``overwrite`` or that is not a file, a parent folder
    that cannot be created or written."""
    seen: dict[Path, str] = {}
    real_inputs = local_inputs(inputs)
    for what, path in targets:
        path = Path(path).expanduser()
        real = Path(os.path.realpath(path))
        if real in seen:
            raise CheckpointError(f"{what} {path} is the same file as {seen[real]}: give distinct output paths")
        seen[real] = f"{what} {path}"
        if real in real_inputs:
            raise CheckpointError(f"{what} {path} is the input {real_inputs[real]}: writing it would destroy it")
        inside = next((src for r, src in real_inputs.items() if r in real.parents), None)
        if inside is not None:
            raise CheckpointError(f"{what} {path} is inside the input {inside}: write it elsewhere")
        if path.exists() or path.is_symlink():
            if not path.is_file():
                raise CheckpointError(f"{what} {path} exists and is not a file")
            if not overwrite:
                raise CheckpointError(f"{what} {path} exists (pass --overwrite to replace it)")
        check_parent(what, path)


def check_parent(what: str, path: str | Path) -> None:
    """Raise CheckpointError if ``path`` (a file or a folder) cannot be created:
    its nearest existing ancestor must be a folder this process can write in
    (``what`` names the option)."""
    parent = Path(os.path.abspath(Path(path).expanduser())).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {path}: cannot write in {parent}")


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save`` written to ``path`` with a canonical header (keys
    sorted, compact), so the same tensors and metadata always give the same bytes;
    the data section is written from the serialised buffer, not copied."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(raw)[8 + n:])
    return Path(path)


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file deterministically (:func:`write_safetensors`) and atomically."""
    return write_atomic(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for a UTF-8 text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__
