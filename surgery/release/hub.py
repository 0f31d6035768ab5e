"""``surgery push DIR REPO_ID``: publish a verified output folder to the Hugging Face Hub.

Order of work: ``verify(DIR)`` (a folder that does not match its manifest is
refused, naming the first failing file, before any request is made), a token
check, ``HfApi.create_repo(exist_ok=True)``, ``HfApi.create_branch`` when a
branch is named, then ``HfApi.upload_folder`` with a commit message naming the
method, the input and the sha256 of ``surgery.json`` -- so the Hub commit points
at exactly one provenance record.

Large folders.  huggingface_hub 2.x has no ``upload_large_folder``: its
``upload_folder`` took that job over (with ``hf_xet`` installed it streams, splits
a big folder into several commits and resumes when re-run; follow-up commits
get " (part N)" appended to the message).  ``--large`` (or a folder over
``LARGE_FOLDER_BYTES``) therefore only checks that this resumable path is there
and fails early when it is not.  The old ``upload_large_folder`` is not used even
where it exists: it writes ``.cache/huggingface/`` into the folder, which
``surgery verify`` would then report as files not in the manifest.

Token.  ``token=None`` everywhere: huggingface_hub finds ``HF_TOKEN`` or the
login itself.  The token is read here only to fail early when there is none and
to scrub it from error messages; it is never printed, logged or written.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..checkpoint import sha256_file
from ..errors import ManifestError, SurgeryError
from ..manifest import MANIFEST, read_manifest, verify
from .card import HUB_ID

LARGE_FOLDER_BYTES = 20 * 1024**3
_HUB_ERROR_MODULES = ("huggingface_hub", "httpx", "httpx2", "requests", "urllib3", "hf_xet")


@dataclass
class PushResult:
    repo_url: str
    revision: str | None
    commit_url: str | None
    commit_oid: str | None
    commit_message: str
    files: list[str] = field(default_factory=list)


def commit_message(manifest: dict, manifest_sha256: str) -> str:
    method = (manifest.get("method") or {}).get("name", "edit")
    source = (manifest.get("input") or {}).get("source", "?")
    return f"surgery {method} of {source} (surgery.json sha256 {manifest_sha256})"


def resumable_upload_available() -> bool:
    """huggingface_hub 2.x's streamed, multi-commit, resumable ``upload_folder`` (needs hf_xet)."""
    if importlib.util.find_spec("huggingface_hub._upload_pipeline") is None:
        return False
    from huggingface_hub import hf_api

    return bool(hf_api.is_xet_available())


def _hub_error(e: Exception, what: str, token: str | None) -> SurgeryError:
    text = " ".join(str(e).split()) or type(e).__name__
    if token:
        text = text.replace(token, "***")
    return SurgeryError(f"{what}: {text}")


def _is_hub_error(e: Exception) -> bool:
    return isinstance(e, (OSError, ValueError)) or type(e).__module__.split(".")[0] in _HUB_ERROR_MODULES


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         large: bool = False, say: Callable[[str], None] | None = None) -> PushResult:
    """Verify ``folder`` and upload it to the model repo ``repo_id`` (created if needed)."""
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    say = say or (lambda msg: None)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SurgeryError(f"not a folder: {folder}")
    problems = verify(folder)  # raises ManifestError naming surgery.json when it is missing or malformed
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"refusing to push {folder}: it does not match its {MANIFEST}: {problems[0]}{more}")
    m = read_manifest(folder)
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise SurgeryError(f"bad repo id {repo_id!r}: {' '.join(str(e).split())}") from None
    files = sorted([*m["outputs"], MANIFEST])
    base = (m.get("card") or {}).get("base_model") if "README.md" in m["outputs"] else None
    if base and not HUB_ID.match(str(base)):  # the Hub rejects the card's metadata, after the repo is created
        raise SurgeryError(f"the model card's base_model {base!r} is not a Hub id (OWNER/NAME); the Hub would refuse "
                           f"it: rewrite the card with `surgery card {folder} --base-model OWNER/NAME`")
    if "README.md" not in m["outputs"]:
        say(f"note: {folder} has no model card; `surgery card {folder}` writes one")
    size = sum((folder / f).stat().st_size for f in files)
    if (large or size > LARGE_FOLDER_BYTES) and not resumable_upload_available():
        if large:
            raise SurgeryError("--large needs huggingface_hub >= 2 with hf_xet installed (pip install hf_xet): "
                               "its upload_folder commits big folders in resumable parts")
        say(f"note: {size / 1e9:.1f} GB will go in a single commit (install hf_xet for resumable multi-part uploads)")
    token = huggingface_hub.get_token()
    if not token:
        raise SurgeryError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")

    manifest_sha = sha256_file(folder / MANIFEST)
    message = commit_message(m, manifest_sha)
    api = HfApi()
    step = f"creating {repo_id}"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            step = f"creating branch {revision} of {repo_id}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        step = f"uploading {folder} to {repo_id}"
        say(f"uploading {len(files)} files ({size / 1e6:.1f} MB) to {repo_id}" + (f" @ {revision}" if revision else ""))
        # exactly the verified files, and the commit deletes whatever else the repo (or the branch,
        # made from main) holds: an earlier version's shards must not sit beside this manifest
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, allow_patterns=files, delete_patterns="*")
    except Exception as e:
        if not _is_hub_error(e):
            raise
        raise _hub_error(e, step, token) from None
    # the upload read the files after the verify above: verify again, so that what was
    # committed is what was verified unless a file changed and changed back meanwhile
    after = verify(folder)
    if after:
        raise ManifestError(f"{folder} changed while it was being uploaded ({after[0]}); the commit "
                            f"{getattr(info, 'commit_url', None) or repo_id} may not match its {MANIFEST}: push again")
    repo_url = str(url).rstrip("/")
    return PushResult(repo_url=repo_url, revision=revision, commit_url=getattr(info, "commit_url", None),
                      commit_oid=getattr(info, "oid", None), commit_message=message, files=files)
