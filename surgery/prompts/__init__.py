"""Prompt sets: the project's own built-in sets, loaders for user files and Hub
datasets, refusal texts, and chat formatting.

Every loader returns a :class:`PromptSet`, an immutable tuple of prompt strings
with its provenance (``source``) and a content hash (``sha256``) that manifests
record.  The hash covers only the prompt texts, so the same prompts read from a
``.jsonl``, ``.csv`` or ``.txt`` file hash the same.

Sources understood by :func:`load_prompts`::

    builtin:harmful            builtin:harmless:val       builtin:borderline[test]
    prompts.jsonl              prompts.json               prompts.csv   prompts.txt
    owner/name                 owner/name:test            hf://datasets/owner/name[:split]

The built-in sets live in ``surgery/prompts/data`` (see its README.md).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from surgery.errors import PromptError, check_count

__all__ = [
    "PromptSet",
    "load_prompts",
    "builtin",
    "builtin_split",
    "refusal_texts",
    "format_chat",
    "BUILTIN_SETS",
    "SPLITS",
    "PROMPT_COLUMNS",
]

log = logging.getLogger(__name__)

BUILTIN_SETS = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")
# Default column, first one present wins.
PROMPT_COLUMNS = ("prompt", "instruction", "goal", "text", "question")
FILE_TYPES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
# When a Hub dataset ships the same split in several formats, read only one.
_FORMAT_PREFERENCE = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_HUB_PATTERNS = ["*.jsonl", "*.json", "*.csv", "*.txt", "*.parquet"]
_HUB_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+)(?::(?P<split>[A-Za-z0-9._-]+))?$")
_BUILTIN = re.compile(r"^builtin:(?P<name>[A-Za-z0-9_-]*)(?:(?::(?P<s1>[A-Za-z0-9_-]+))|(?:\[(?P<s2>[A-Za-z0-9_-]+)\]))?$")
_BRACKET_SPLIT = re.compile(r"^(?P<path>.+)\[(?P<split>[A-Za-z0-9._-]+)\]$")


def _sha256(prompts: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- PromptSet


@dataclass(frozen=True)
class PromptSet:
    """An immutable, hashed list of prompts.

    ``sha256`` is the SHA-256 of ``"\\n".join(prompts)`` (UTF-8).  Pass ``""`` to
    have it computed; a wrong hash raises ``ValueError``.  ``categories``, when
    known, has one entry per prompt.
    """

    prompts: tuple[str, ...]
    source: str
    sha256: str
    categories: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        prompts = tuple(self.prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("PromptSet.prompts must be strings")
        object.__setattr__(self, "prompts", prompts)
        digest = _sha256(prompts)
        if not self.sha256:
            object.__setattr__(self, "sha256", digest)
        elif self.sha256 != digest:
            raise ValueError(f"PromptSet sha256 {self.sha256} does not match its prompts ({digest})")
        if self.categories is not None:
            cats = tuple(self.categories)
            if len(cats) != len(prompts):
                raise ValueError(f"PromptSet has {len(prompts)} prompts but {len(cats)} categories")
            object.__setattr__(self, "categories", cats)

    @classmethod
    def from_prompts(
        cls, prompts: Iterable[str], source: str, categories: Iterable[str | None] | None = None
    ) -> "PromptSet":
        prompts = tuple(prompts)
        cats = tuple(categories) if categories is not None else None
        if cats is not None and all(c is None for c in cats):
            cats = None
        return cls(prompts, source, _sha256(prompts), cats)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]

    def subset(self, n: int, seed: int = 0) -> "PromptSet":
        """``n`` prompts chosen deterministically by ``seed``, kept in their original
        order.  The choice depends only on the prompt texts and the seed (not on the
        Python version), and subset(n) is contained in subset(n + 1).  ``n >= len``
        returns ``self``."""
        check_count(n, f"subset size (source {self.source})", error=PromptError)
        if n >= len(self.prompts):
            return self

        def key(i: int) -> tuple[str, int]:
            return hashlib.sha256(f"{seed}\n{self.prompts[i]}".encode("utf-8")).hexdigest(), i

        chosen = sorted(sorted(range(len(self.prompts)), key=key)[:n])
        cats = None if self.categories is None else [self.categories[i] for i in chosen]
        return PromptSet.from_prompts(
            [self.prompts[i] for i in chosen], f"{self.source}|subset(n={n},seed={seed})", cats
        )

    def describe(self) -> dict:
        """What a manifest records about the prompts."""
        return {"source": self.source, "count": len(self.prompts), "sha256": self.sha256}


# --------------------------------------------------------------------------- built-in sets


def _data_file(name: str):
    return resources.files(__name__).joinpath("data", name)


@functools.lru_cache(maxsize=None)
def _builtin_rows(name: str) -> tuple[tuple[str, str, str], ...]:
    """(prompt, category, split) for each row of a built-in set."""
    rows = []
    text = _data_file(f"{name}.jsonl").read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            obj = json.loads(line)
            rows.append((obj["prompt"], obj["category"], obj["split"]))
    return tuple(rows)


def builtin(name: str, split: str | None = None) -> PromptSet:
    """One of the project's own prompt sets: ``harmful``, ``harmless`` or
    ``borderline``; ``split`` is ``train``, ``val``, ``test`` or None for all.
   """
    if name not in BUILTIN_SETS:
        raise PromptError(f"unknown built-in prompt set {name!r}; choose one of: {', '.join(BUILTIN_SETS)}")
    if split is not None and split not in SPLITS:
        raise PromptError(f"unknown split {split!r} for builtin:{name}; choose one of: {', '.join(SPLITS)}")
    rows = _builtin_rows(name)
    if split is not None:
        rows = tuple(r for r in rows if r[2] == split)
        if not rows:
            have = sorted({r[2] for r in _builtin_rows(name)})
            raise PromptError(f"builtin:{name} has no {split!r} split; it has: {', '.join(have)}")
    source = f"builtin:{name}" if split is None else f"builtin:{name}[{split}]"
    return PromptSet.from_prompts([r[0] for r in rows], source, [r[1] for r in rows])


@functools.lru_cache(maxsize=None)
def _refusals() -> tuple[str, ...]:
    text = _data_file("refusals.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def refusal_texts() -> list[str]:
    """The project's refusal replies; the first is the canonical one."""
    return list(_refusals())


# --------------------------------------------------------------------------- file readers

# A record is (where, value): where is "line 3" / "item 3" / "row 3", value a str or dict.
_Record = tuple[str, object]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PromptError(f"{path}: cannot read ({_one_line(exc)})") from None


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (``read_text`` already turned CRLF / CR into
    ``\n``): ``str.splitlines`` also splits at U+2028, form feeds and the like,
    which may sit inside a prompt (JSON writes U+2028 unescaped)."""
    return text.split("\n")


def _read_jsonl(path: Path) -> list[_Record]:
    records = []
    for n, line in enumerate(_lines(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    return records


def _read_json(path: Path) -> list[_Record]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, list):
        raise PromptError(f"{path}: expected a JSON list of strings or objects, got {type(data).__name__}")
    return [(f"item {i}", v) for i, v in enumerate(data)]


def _read_csv(path: Path) -> list[_Record]:
    text = _read_text(path)
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            return []
        records = [(f"line {reader.line_num}", dict(row)) for row in reader]
    except csv.Error as exc:
        raise PromptError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    if not records:
        raise PromptError(f"{path}: only a header row ({', '.join(reader.fieldnames)}), no prompts")
    return records


def _read_txt(path: Path) -> list[_Record]:
    return [(f"line {n}", line) for n, line in enumerate(_lines(_read_text(path)), 1) if line.strip()]


def _read_parquet(path: Path) -> list[_Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types
        raise PromptError(f"{path}: cannot read parquet ({_one_line(exc)})") from None
    return [(f"row {i}", r) for i, r in enumerate(rows)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt, ".parquet": _read_parquet}


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _read_file(
    path: Path, column: str | None, split: str | None
) -> tuple[list[str], list[str | None]]:
    """Prompts (stripped, empties skipped) and their categories from one file.
    ``split`` filters on a ``split`` field of object records."""
    reader = _READERS.get(_suffix(path))
    if reader is None:
        raise PromptError(f"{path}: unsupported prompt file type {path.suffix or '(none)'!r}; use one of {', '.join(FILE_TYPES)}")
    records = reader(path)
    if not records:
        raise PromptError(f"{path}: empty file, no prompts found")

    objects = [v for _, v in records if isinstance(v, dict)]
    available: list[str] = []
    for obj in objects:
        available.extend(k for k in obj if isinstance(k, str) and k not in available)
    if column is not None and not objects:
        column = None  # bare strings (a TXT file) have no columns: --column is for the other sources given with it
    if column is not None:
        if column not in available:
            raise PromptError(f"{path}: column {column!r} not found; available columns: {', '.join(available) or '(none)'}")
    elif objects:
        column = next((c for c in PROMPT_COLUMNS if c in available), None)
        if column is None:
            raise PromptError(
                f"{path}: no prompt column found (looked for {', '.join(PROMPT_COLUMNS)}); "
                f"available columns: {', '.join(available) or '(none)'}; name one with --column (column= in Python)"
            )

    if split is not None:
        if "split" not in available:
            raise PromptError(f"{path}: cannot select split {split!r}: the records have no 'split' field")
        values = sorted({str(o.get("split")) for o in objects})
        records = [(w, v) for w, v in records if isinstance(v, dict) and v.get("split") == split]
        if not records:
            raise PromptError(f"{path}: no records with split {split!r}; splits present: {', '.join(values)}")

    prompts: list[str] = []
    categories: list[str | None] = []
    for where, value in records:
        if isinstance(value, dict):
            if column not in value:
                raise PromptError(f"{path} {where}: field {column!r} is missing")
            text = value[column]
            category = value.get("category")
        elif isinstance(value, str):
            text, category = value, None
        else:
            raise PromptError(f"{path} {where}: expected a string or an object, got {type(value).__name__}")
        if text is None:
            continue
        if not isinstance(text, str):
            raise PromptError(f"{path} {where}: field {column!r} is {type(text).__name__}, not a string")
        text = text.strip()
        if not text:
            continue
        prompts.append(text)
        categories.append(category if isinstance(category, str) else None)
    if not prompts:
        raise PromptError(f"{path}: all {len(records)} prompts are empty" + (f" (column {column!r})" if column else ""))
    repeated = len(prompts) - len(set(prompts))
    if repeated:  # kept as given (the file is the user's), but a rate counts each copy
        log.warning("%s: %d prompt%s repeat an earlier one (each copy counts in rates and training)", path,
                    repeated, "s" if repeated > 1 else "")
    return prompts, categories


def _dataset_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if _suffix(p) in FILE_TYPES and p.name not in _HUB_METADATA:
            files.append(p)
    return files


def _read_folder(root: Path, label: str, column: str | None, split: str | None):
    """Read a dataset folder (a Hub snapshot or a local directory): the files whose
    path contains ``split`` (default: those containing "train" if any, else all)."""
    files = _dataset_files(root)
    if not files:
        raise PromptError(f"{label}: no {', '.join(FILE_TYPES)} files found")
    names = {f: f.relative_to(root).as_posix().lower() for f in files}
    used = split
    if split is not None:
        chosen = [f for f in files if split.lower() in names[f]]
        if not chosen:
            listing = ", ".join(f.relative_to(root).as_posix() for f in files[:20])
            raise PromptError(f"{label}: no file name contains split {split!r}; files: {listing}")
    else:
        chosen = [f for f in files if "train" in names[f]]
        used = "train" if chosen else None
        chosen = chosen or files
    for ext in _FORMAT_PREFERENCE:
        same = [f for f in chosen if _suffix(f) == ext]
        if same:
            chosen = same
            break
    prompts: list[str] = []
    categories: list[str | None] = []
    for f in chosen:
        p, c = _read_file(f, column, None)
        prompts += p
        categories += c
    return prompts, categories, used


# --------------------------------------------------------------------------- load_prompts


def snapshot_download(*args, **kwargs):
    """huggingface_hub.snapshot_download, looked up at call time (tests patch either)."""
    import huggingface_hub

    return huggingface_hub.snapshot_download(*args, **kwargs)


def _load_hub(repo_id: str, column: str | None, split: str | None):
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=list(_HUB_PATTERNS))
    except PromptError:
        raise
    except Exception as exc:
        raise PromptError(f"cannot download Hub dataset {repo_id!r}: {_one_line(exc)}") from None
    prompts, categories, used = _read_folder(Path(folder), f"Hub dataset {repo_id}", column, split)
    source = f"hf://datasets/{repo_id}" + (f":{used}" if used else "")
    return prompts, categories, source


def builtin_split(source: str) -> str | None:
    """The split a built-in source names (``builtin:harmful:val`` -> ``"val"``), else None."""
    m = _BUILTIN.match(str(source).strip())
    return (m["s1"] or m["s2"]) if m else None


def _merge_split(source: str, a: str | None, b: str | None) -> str | None:
    if a is not None and b is not None and a != b:
        raise PromptError(f"prompt source {source!r} names split {a!r} but split={b!r} was also given")
    return a if a is not None else b


def load_prompts(
    source: str | os.PathLike,
    column: str | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Load prompts from a built-in set, a local file or folder, or a Hub dataset.

    * ``builtin:NAME``, ``builtin:NAME:SPLIT`` or ``builtin:NAME[SPLIT]``;
    * a local ``.jsonl`` (one object or string per line), ``.json`` (a list of
      objects or strings), ``.csv`` (header row) or ``.txt`` (one prompt per
      non-empty line).  For objects the prompt comes from ``column``, default the
      first of ``prompt, instruction, goal, text, question`` present; ``split``
      keeps the records whose ``split`` field equals it;
    * a local folder, or a Hub dataset ``owner/name[:split]`` /
      ``hf://datasets/owner/name[:split]``: the data files whose path contains
      the split (default "train" if any file mentions it, else all files).

    Prompts are stripped and empty ones skipped; ``limit`` keeps the first N.
    User errors raise :class:`PromptError` naming the file and line or field.
    """
    if limit is not None:
        check_count(limit, "limit", error=PromptError)
    src = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else None
    if not src:
        raise PromptError(f"prompt source must be a non-empty string or path, got {source!r}")

    m = _BUILTIN.match(src)
    if src.startswith("builtin:"):
        if not m:
            raise PromptError(f"malformed built-in source {src!r}; use builtin:NAME or builtin:NAME:SPLIT with NAME in {', '.join(BUILTIN_SETS)}")
        ps = builtin(m["name"], _merge_split(src, m["s1"] or m["s2"], split))
        if column is not None and column != "prompt":
            raise PromptError(f"{src}: built-in sets have only the 'prompt' column, not {column!r}")
        return _limit(ps, limit)

    if src.startswith("hf://"):
        rest = src[len("hf://"):]
        if not rest.startswith("datasets/") or not _HUB_ID.match(rest[len("datasets/"):]):
            raise PromptError(f"malformed Hub source {src!r}; use hf://datasets/OWNER/NAME or hf://datasets/OWNER/NAME:SPLIT")
        hm = _HUB_ID.match(rest[len("datasets/"):])
        prompts, cats, label = _load_hub(hm["repo"], column, _merge_split(src, hm["split"], split))
        return _limit(PromptSet.from_prompts(prompts, label, cats), limit)

    path = Path(src).expanduser()
    if not path.exists():
        bm = _BRACKET_SPLIT.match(src)
        if bm and Path(bm["path"]).expanduser().is_file():  # "file.jsonl[val]", as PromptSet.source writes it
            path, split = Path(bm["path"]).expanduser(), _merge_split(src, bm["split"], split)
            src = bm["path"]
    if path.is_dir():
        prompts, cats, used = _read_folder(path, str(path), column, split)
        label = src + (f"[{used}]" if used else "")
        return _limit(PromptSet.from_prompts(prompts, label, cats), limit)
    if path.exists():
        prompts, cats = _read_file(path, column, split)
        label = src + (f"[{split}]" if split else "")
        return _limit(PromptSet.from_prompts(prompts, label, cats), limit)
    if _suffix(path) in FILE_TYPES or os.sep in src and not _HUB_ID.match(src):
        raise PromptError(f"prompt file not found: {src}")
    hm = _HUB_ID.match(src)
    if hm:
        prompts, cats, label = _load_hub(hm["repo"], column, _merge_split(src, hm["split"], split))
        return _limit(PromptSet.from_prompts(prompts, label, cats), limit)
    raise PromptError(
        f"prompt source {src!r} not found: not a file, builtin:NAME ({', '.join(BUILTIN_SETS)}), or a Hub dataset id owner/name"
    )


def _limit(ps: PromptSet, limit: int | None) -> PromptSet:
    if limit is None or limit >= len(ps):
        return ps
    cats = None if ps.categories is None else ps.categories[:limit]
    return PromptSet.from_prompts(ps.prompts[:limit], ps.source, cats)


# --------------------------------------------------------------------------- chat formatting


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _render(tokenizer, messages: Sequence[dict]) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise PromptError(f"chat template of {_tokenizer_name(tokenizer)!r} returned {type(text).__name__}, not text")
    return text


def format_chat(tokenizer, prompt: str, system: str | None = None, response: str | None = None) -> str:
    """Render one user turn with the tokenizer's chat template, ending with the
    generation prompt (the assistant header).  With ``response`` the response text
    is appended right after it, with no end-of-turn token, so a model can be scored
    on continuing it.  If the template rejects a system message, the system text
    is put before the user message, separated by a blank line."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"model {_tokenizer_name(tokenizer)!r} has no chat template (tokenizer.chat_template is not set); "
            "use an instruction-tuned model or set a chat template"
        )
    user = {"role": "user", "content": prompt}
    try:
        if system is None:
            text = _render(tokenizer, [user])
        else:
            try:
                text = _render(tokenizer, [{"role": "system", "content": system}, user])
            except PromptError:
                raise
            except Exception:
                merged = f"{system}\n\n{prompt}" if system else prompt
                text = _render(tokenizer, [{"role": "user", "content": merged}])
    except PromptError:
        raise
    except Exception as exc:
        raise PromptError(f"chat template of {_tokenizer_name(tokenizer)!r} failed: {_one_line(exc)}") from None
    return text if response is None else text + response
