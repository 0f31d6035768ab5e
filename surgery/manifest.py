"""Provenance manifest (``surgery.json``) and ``verify``.

Every output folder carries a manifest: tool and library versions, the input
(source, kind, pinned revision, sha256 of every weight file), the datasets
(source, count, sha256), the direction (file hash, layer, position, norm), the
method and every parameter, the evaluation if run, and the sha256 of every
output file.  ``verify`` recomputes the output hashes and names any file that
differs, is missing, or is not listed.  The manifest never holds tokens.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path

from . import __version__
from .checkpoint import sha256_file
from .errors import ManifestError

MANIFEST = "surgery.json"
FORMAT = "surgery.manifest/1"


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "huggingface-hub", "numpy", "gguf", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hash_folder(folder: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), sorted."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
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
        **(extra or {}),
    }


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Hash every file of ``folder`` into ``manifest['outputs']`` and write it atomically."""
    folder = Path(folder)
    manifest = dict(manifest)
    manifest["outputs"] = hash_folder(folder)
    path = folder / MANIFEST
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
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
    folder = Path(folder)
    m = read_manifest(folder)
    m.update(fields)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return m


def verify(folder: str | Path) -> list[str]:
    """Problems found (empty when the folder matches its manifest)."""
    folder = Path(folder)
    m = read_manifest(folder)
    expected: dict = m["outputs"]
    actual = hash_folder(folder)
    problems = []
    for rel, sha in expected.items():
        if rel not in actual:
            problems.append(f"missing: {rel}")
        elif actual[rel] != sha:
            problems.append(f"changed: {rel} (sha256 {actual[rel][:12]}..., manifest says {sha[:12]}...)")
    for rel in actual:
        if rel not in expected:
            problems.append(f"not in manifest: {rel}")
    return problems
