"""Provenance manifest (``surgery.json``) and ``verify``.

Every output folder carries a manifest: tool and library versions, the input
(source, kind, pinned revision, sha256 of every weight file), the datasets
(source, count, sha256), the direction (file hash, layer, position, norm), the
method and every parameter, the evaluation if run, and the sha256 of every
output file.  ``verify`` recomputes the output hashes and names any file that
differs, is missing, or is not listed, and any link to a folder (whose files no
hash covers).  The manifest never holds tokens.

How a run is recorded: ``build_manifest`` adds whatever the *provenance
context* holds (a ``contextvars.ContextVar``), so the many places that build
manifests need no extra argument.  The CLI's group sets ``invocation`` (the
command line, redacted, and the working folder) around every command; ``surgery
run`` sets ``recipe`` (the YAML text verbatim, its sha256, the step and its
command line) around each step.  ``surgery reproduce`` reads them back.
Environment variables are never recorded; an argument that looks like a secret
(``--token X``, ``--api-key=X``, a value shaped like a Hub token) is replaced by
``<redacted>``.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import os
import platform
import re
from pathlib import Path

from . import __version__
from .checkpoint import sha256_file
from .checkpoint.files import write_text_atomic
from .errors import ManifestError

MANIFEST = "surgery.json"
FORMAT = "surgery.manifest/1"
REDACTED = "<redacted>"
# whole words of an option name: --token, --hf-token, --api-key, --password (not --max-new-tokens, --author)
_SECRET_NAME = re.compile(r"(^|[-_])(token|secret|password|passwd|credentials?|auth|api[-_]?key)($|[-_])",
                          re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,})\b")
_PROVENANCE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("surgery_provenance", default=None)


@contextlib.contextmanager
def provenance(**fields):
    """Within the block, every manifest built records ``fields`` (e.g. ``recipe=...``,
    ``invocation=...``) as top-level entries; nested blocks add to the outer ones."""
    token = _PROVENANCE.set({**(_PROVENANCE.get() or {}), **fields})
    try:
        yield
    finally:
        _PROVENANCE.reset(token)


def current_provenance() -> dict:
    return dict(_PROVENANCE.get() or {})


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name.lstrip("-")))


def redact_value(value: str) -> str:
    return _SECRET_VALUE.sub(REDACTED, value)


def _redact_assignment(arg: str) -> str | None:
    """``NAME=VALUE`` (a recipe's ``--var``, also as ``--var=NAME=VALUE``) with a
    secret-looking NAME, redacted; None for anything else."""
    head, body = "", arg
    if arg.startswith("-") and "=" in arg:
        head, body = arg.split("=", 1)
        head += "="
    name = body.split("=", 1)[0]
    if "=" in body and name and not name.startswith("-") and is_secret_name(name):
        return f"{head}{name}={REDACTED}"
    return None


def redact_argv(argv) -> list[str]:
    """A command line safe to store: the value of any secret-looking option
    (``--token X``, ``--hf-token=X``) or assignment (``--var api_key=X``) and any
    token-shaped string become ``<redacted>``."""
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg.startswith("-") and arg != "--" and is_secret_name(arg.split("=", 1)[0]):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
        else:
            out.append(_redact_assignment(arg) or redact_value(arg))
    return out


def invocation_record(argv) -> dict:
    """``{"argv": [...], "cwd": ...}`` for a command line (``argv[0]`` is the program)."""
    return {"argv": redact_argv(argv), "cwd": os.getcwd()}


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "huggingface-hub", "numpy", "gguf", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


#: what :func:`hash_folder` gives a link to a folder instead of a hash (no manifest holds it)
LINKED_FOLDER = "<link to a folder>"


def hash_folder(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), sorted.  A
    link to a file is hashed by its content (what a loader reads; the Hugging Face
    cache is made of such links).  A link to a folder is not followed (neither
    ``Path.rglob`` nor the Hub upload of ``surgery push`` descends into one), so
    the files a loader would read through it are covered by no hash: it maps to
    :data:`LINKED_FOLDER`, which ``verify`` reports."""
    folder = Path(folder).expanduser()
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() and p.is_dir():
            out[p.relative_to(folder).as_posix()] = LINKED_FOLDER
        elif p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel in exclude:
                continue
            out[rel] = sha256_file(p)
    return out


def build_manifest(*, input_info: dict, method: str, parameters: dict, datasets: dict | None = None,
                   direction: dict | None = None, edited: dict | None = None, extra: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "tool": {"name": "surgery", "version": __version__},
        "libraries": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": input_info,
        "datasets": datasets or {},
        "direction": direction,
        "method": {"name": method, "parameters": parameters},
        "edited": edited or {},
        **current_provenance(),
        **(extra or {}),
    }


SELF_DIGEST = "content_sha256"


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (canonical JSON, its own digest left out).
    Stored in the manifest, so `verify` notices a manifest edited by hand (the
    evaluation figures, the parameters); it is not a signature: whoever rewrites the
    file on purpose can recompute it."""
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write(folder: Path, manifest: dict) -> Path:
    manifest = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    manifest[SELF_DIGEST] = content_digest(manifest)
    return write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Hash every file of ``folder`` into ``manifest['outputs']`` and write it atomically."""
    folder = Path(folder).expanduser()
    manifest = dict(manifest)
    manifest["outputs"] = hash_folder(folder)
    return _write(folder, manifest)


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no manifest: {path} does not exist")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("outputs"), dict):
        raise ManifestError(f"{path}: not a surgery manifest (format {FORMAT!r} with an 'outputs' table expected)")
    return m


def update_manifest(folder: str | Path, **fields) -> dict:
    """Add fields (e.g. ``evaluation``) without touching the output hashes."""
    folder = Path(folder).expanduser()
    m = read_manifest(folder)
    m.update(fields)
    _write(folder, m)
    return read_manifest(folder)


def verify(folder: str | Path) -> list[str]:
    """Problems found (empty when the folder matches its manifest)."""
    folder = Path(folder).expanduser()
    m = read_manifest(folder)
    expected: dict = m["outputs"]
    actual = hash_folder(folder)
    problems = []
    if SELF_DIGEST in m and m[SELF_DIGEST] != content_digest(m):
        problems.append(f"changed: {MANIFEST} (its content no longer matches its {SELF_DIGEST}: edited after it was "
                        "written)")
    for rel, sha in expected.items():
        if rel not in actual:
            problems.append(f"missing: {rel}")
        elif actual[rel] != sha and actual[rel] != LINKED_FOLDER:
            problems.append(f"changed: {rel} (sha256 {actual[rel][:12]}..., manifest says {sha[:12]}...)")
    for rel, sha in actual.items():
        if sha == LINKED_FOLDER:
            problems.append(f"linked folder: {rel} (a symlink to {os.readlink(folder / rel)}: no hash covers the files "
                            "read through it)")
        elif rel not in expected:
            problems.append(f"not in manifest: {rel}")
    return problems
