"""``surgery reproduce DIR``: run again what made DIR and compare the outputs, file by file.

What is rerun comes from ``DIR/surgery.json`` (see :mod:`surgery.manifest`):

* ``recipe`` (written by ``surgery run``): the recipe text is read again with the
  recorded ``--var`` overrides and checked against today's CLI.  Every output of
  every step (each option :attr:`surgery.recipes.Key.is_output` names, given or
  left at its default) is moved into a fresh work folder (``step<N>/<name>``), and
  any value of a later step that names such an output, or a path inside it,
  follows it there.  Only the step that wrote DIR and the steps it reads from
  (transitively, through those paths) run, in order; ``push`` never runs.  The
  rerun happens in the recorded working folder when it still exists, so relative
  input paths mean what they meant.
* else ``invocation`` (any plain CLI run): the recorded argv with every output
  option redirected the same way (``<work>/<name>``); options redacted as secrets
  are dropped (a token comes from the environment again).

In both, a ``--direction`` file of the step that wrote DIR that is gone (a copied
or downloaded folder) is replaced by DIR's own ``direction.safetensors`` when its
sha256 is the recorded one.  The rerun writes only inside its work folder, which
is refused inside DIR or any path the recorded run named.  The folder compared
with DIR is the rerun of the output recorded at DIR's path, else the one output
the rerun wrote a manifest in (DIR may be a copy; ``tune -o T --write W`` writes
it in W only).

Evaluations only write into ``surgery.json``, which is not compared, so steps
that have ``--no-eval`` get it unless ``run_eval``.  Then every file listed in
the manifest's ``outputs`` (``README.md`` excepted: the card is written by a later
step) is hashed in DIR and in the rerun.  Identical means DIR's file, the
manifest's hash and the rerun's file agree for every file and neither the rerun
nor DIR holds a file the manifest does not list; a JSON or text artifact whose
rerun differs only in fields that record where an input was read
(:data:`NOT_COMPARED_FIELDS`: the direction sidecar's ``model.folder``, a PEFT
adapter's ``base_model_name_or_path``, ...) is identical too, and those fields
are named.  For a differing ``.safetensors`` file the largest absolute
difference of every differing tensor is computed, one tensor pair in memory at a
time (through the checkpoint module's validated header parser: artifacts such as
``direction.safetensors`` or an adapter are not checkpoint folders).  Bitwise
equality is only to be expected on CPU with the same library versions, so the
versions that differ from the manifest's are reported too, and so is a change of
the input's weight files.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shlex
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click
import torch

from . import __version__
from .checkpoint import read_safetensors_header, sha256_file
from .checkpoint.files import check_folder_inputs
from .errors import CheckpointError, ManifestError, SurgeryError
from .manifest import (MANIFEST, REDACTED, hash_folder, invocation_record, library_versions, provenance, read_manifest,
                       redact_argv)
from .recipes import NOT_STEPS, RecipeError, _schema, build_argv, invoke, parse_recipe, run_step

NOT_COMPARED = (MANIFEST, "README.md")
NEVER_RERUN = ("push",)
# Fields of output files that record where an input was read, not what was made: provenance, which the
# manifest's `input` records too.  A rerun reads its inputs from elsewhere (an earlier recipe step's output
# in the work folder, a moved work folder, the `smollm2` alias resolved to another cache folder), so a file
# that differs only there counts as identical and the fields are named; tune.json's `seconds` (how long the
# search took) likewise.  Keys: output paths (fnmatch); values: JSON fields (dotted), or for text files the
# prefixes of the lines that hold them; for safetensors files, fields of the header metadata (JSON values
# decoded), the tensors being byte-identical.
NOT_COMPARED_FIELDS: dict[str, tuple[str, ...]] = {
    "direction.safetensors.json": ("model.folder",),             # the direction's sidecar
    "tune.json": ("model.source", "model.input.folder", "model.input.source", "seconds"),
    "adapter_config.json": ("base_model_name_or_path",),          # a PEFT adapter (safe-lora); PEFT loads it
    "adapter/adapter_config.json": ("base_model_name_or_path",),  # the trained adapter (lora-sft, sails)
    "adapter/README.md": ("base_model:", "- base_model:adapter:"),  # PEFT's card of it (front matter)
    "sae/*/cfg.json": ("model_name",),                           # SAEs sails trained
    "subspace/*.safetensors.json": ("sae",),                     # sails' subspaces: the --sae source
    "units.safetensors": ("meta.model.folder", "meta.model.source"),  # protect's unit map (header metadata)
}


@dataclass
class FileCheck:
    path: str
    status: str  # identical | differs | missing-here | missing-in-rerun | extra-in-rerun | extra-here
    manifest: str | None = None     # sha256 in DIR/surgery.json
    here: str | None = None         # sha256 of DIR's file now
    rerun: str | None = None        # sha256 of the rerun's file
    max_abs_diff: float | None = None
    tensors: dict[str, float] = field(default_factory=dict)  # differing tensors -> max |a - b|
    problems: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)  # NOT_COMPARED_FIELDS that differ (the rest is identical)


@dataclass
class ReproduceResult:
    identical: bool
    how: str
    rerun_dir: str | None
    files: list[FileCheck]
    versions: dict[str, list]       # library -> [in the manifest, now], differing ones only
    input_changed: list[str]
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def summary(self) -> str:
        lines = [f"reproduce: {self.how}"]
        same = [f.path for f in self.files if f.status == "identical"]
        bad = [f for f in self.files if f.status != "identical"]
        apart = [f for f in self.files if f.status == "identical" and f.not_compared]
        if self.identical and not apart:
            lines.append(f"IDENTICAL: all {len(same)} output files match bit for bit")
        elif self.identical:
            lines.append(f"IDENTICAL: all {len(same)} output files match, {len(same) - len(apart)} bit for bit and "
                         f"{len(apart)} apart from fields that record where an input was read or how long the run took "
                         "(not compared)")
        else:
            lines.append(f"DIFFERENT: {len(bad)} of {len(self.files)} files differ ({len(same)} identical)")
        lines += [f"  {f.path}: identical apart from {', '.join(f.not_compared)} (not compared)" for f in apart]
        for f in bad:
            lines.append(f"  {f.path}: {f.status}" + (f" ({'; '.join(f.problems)})" if f.problems else ""))
            if f.tensors:
                worst = sorted(f.tensors.items(), key=lambda kv: -_key(kv[1]))
                lines.append(f"    largest |difference| {worst[0][1]:.6g} in {worst[0][0]}; "
                             f"{len(worst)} tensor{'s differ' if len(worst) > 1 else ' differs'}")
                lines += [f"      {n}: {d:.6g}" for n, d in worst[1:10]]
        for what in self.input_changed:
            lines.append(f"input changed: {what}")
        if self.versions:
            lines.append("versions differ from the manifest's (bitwise equality is only expected on CPU with the same "
                         "versions): " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.versions.items()))
        lines += [f"note: {n}" for n in self.notes]
        if self.rerun_dir:
            lines.append(f"rerun kept in {self.rerun_dir}")
        return "\n".join(lines)


def _key(x: float) -> float:
    return float("inf") if x != x else x  # NaN first


# -- rerunning -----------------------------------------------------------------
@contextlib.contextmanager
def _in_dir(cwd: str | None, notes: list[str]):
    here = os.getcwd()
    if cwd and Path(cwd).is_dir() and Path(cwd).resolve() != Path(here).resolve():
        os.chdir(cwd)
    elif cwd and not Path(cwd).is_dir():
        notes.append(f"the recorded working folder {cwd} does not exist; relative paths were read from {here}")
    try:
        yield Path(os.getcwd())
    finally:
        os.chdir(here)


def _abs(base: Path, value: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _under(path: str, root: str) -> str | None:
    if path == root:
        return ""
    return path[len(root) + 1:] if path.startswith(root + os.sep) else None


def _place(folder: Path, value: str, taken) -> str:
    """Where the rerun writes an output recorded as ``value``: ``folder/<its name>``, distinct from ``taken``."""
    name = Path(value).name
    new = folder / (name if name not in ("", ".", "..") else "out")
    while str(new) in taken:
        new = new.with_name(new.name + "_")
    return str(new)


def _with_output_defaults(schema, values: dict) -> dict:
    """``values`` plus every output option left at its default (``units -o``): the step writes there all the same."""
    return {**{k.param.name: str(k.default) for k in schema.params if k.is_output and k.default is not None}, **values}


def _redirect(recipe, base: Path, rundir: Path) -> tuple[dict[int, dict], dict[int, set[int]], dict[int, dict]]:
    """Each step's values with all its outputs moved under ``rundir/step<N>/`` and every value naming an
    earlier step's output (or a path inside it) following it; which earlier steps each step reads; and
    each step's moves (``{recorded absolute path: rerun path}``)."""
    given = {st.index: _with_output_defaults(st.schema, st.values) for st in recipe.steps}
    outs: dict[int, dict[str, str]] = {}  # step -> {original absolute path: rerun path}
    for st in recipe.steps:
        moved: dict[str, str] = {}
        for k in st.schema.params:
            if k.is_output and k.param.name in given[st.index]:
                for v in (given[st.index][k.param.name] if k.multiple else [given[st.index][k.param.name]]):
                    if isinstance(v, str) and v != "-":
                        moved[_abs(base, v)] = _place(rundir / f"step{st.index}", v, moved.values())
        outs[st.index] = moved
    values: dict[int, dict] = {}
    reads: dict[int, set[int]] = {}
    for st in recipe.steps:
        needs: set[int] = set()

        def move(k, v, st=st, needs=needs):
            if not isinstance(v, str) or isinstance(k.param.type, click.Choice) or v == "-":
                return v
            if k.is_output:
                return outs[st.index][_abs(base, v)]
            p = _abs(base, v)
            for j in range(st.index - 1, 0, -1):  # the latest earlier step that wrote there
                for orig, new in outs[j].items():
                    rel = _under(p, orig)
                    if rel is not None:
                        needs.add(j)
                        return os.path.join(new, rel) if rel else new
            return v

        vals = given[st.index]
        values[st.index] = {k.param.name: ([move(k, x) for x in vals[k.param.name]] if k.multiple
                                           else move(k, vals[k.param.name]))
                            for k in st.schema.params if k.param.name in vals}
        reads[st.index] = needs
    return values, reads, outs


def _compared(moved: dict[str, str], folder: Path, what: str) -> Path:
    """Of the rerun's outputs (``{recorded path: rerun path}``), the folder to compare with ``folder``:
    the output recorded at ``folder``'s own path, else the only one the rerun wrote a manifest in
    (``tune -o T --write W``: W holds the manifest, T the search)."""
    here = os.path.realpath(folder)
    for orig, new in moved.items():
        if os.path.realpath(orig) == here:
            return Path(new)
    made = [Path(new) for new in moved.values() if (Path(new) / MANIFEST).is_file()]
    if len(made) == 1:
        return made[0]
    raise ManifestError(f"{what} wrote {'several' if made else 'no'} output folders with a {MANIFEST}"
                        + (f" ({', '.join(map(str, made))})" if made else "") + f"; none recorded at {folder}")


def _closure(reads: dict[int, set[int]], target: int) -> set[int]:
    needed, stack = set(), [target]
    while stack:
        i = stack.pop()
        if i not in needed:
            needed.add(i)
            stack.extend(reads[i])
    return needed


def _read_recipe(rec: dict):
    overrides = rec.get("vars") or {}
    if any(v == REDACTED for v in overrides.values()):
        raise RecipeError("the recorded --var values include a redacted secret; the recipe cannot be rerun as recorded")
    return parse_recipe(rec.get("text") or "", rec.get("file") or "recipe.yaml", overrides)


def _recorded_paths(m: dict) -> list[str]:
    """The paths the recorded run named (every value of the recipe's steps, else every argument of the
    command line; those that exist are its inputs and outputs), absolute against its working folder."""
    if m.get("recipe"):
        cwd = m["recipe"].get("cwd")
        values = [v for st in _read_recipe(m["recipe"]).steps for x in st.values.values()
                  for v in (x if isinstance(x, list) else [x])]
    else:
        cwd = m["invocation"].get("cwd")
        argv = [str(a) for a in (m["invocation"].get("argv") or [])[1:]]
        values = [a.split("=", 1)[-1] if a.startswith("--") else a for a in argv]
    base = Path(cwd) if cwd and Path(cwd).is_dir() else Path.cwd()
    return [_abs(base, v) for v in values if isinstance(v, str) and v and not v.startswith("-")]


def _rerun_recipe(rec: dict, rundir: Path, run_eval: bool, say, notes: list[str], folder: Path,
                  manifest: dict) -> tuple[Path, str]:
    recipe = _read_recipe(rec)
    t = rec.get("step")
    if not isinstance(t, int) or not 1 <= t <= len(recipe.steps):
        raise ManifestError(f"the manifest's recipe names step {t!r}, but the recipe has {len(recipe.steps)} steps")
    target = recipe.steps[t - 1]
    if rec.get("command") and rec["command"] != redact_argv(target.command_line()):
        notes.append(f"step {t} now expands to `{shlex.join(target.command_line())}`, "
                     f"recorded as `{shlex.join(rec['command'])}` (the CLI changed?)")
    with _in_dir(rec.get("cwd"), notes) as base:
        values, reads, outs = _redirect(recipe, base, rundir)
        run = [s for s in recipe.steps if s.index in _closure(reads, t) and s.name not in NEVER_RERUN]
        how = f"reran step {t} ({target.name}) of {recipe.file}"
        if len(run) > 1:
            how += f", after step{'s' if len(run) > 2 else ''} " + ", ".join(str(s.index) for s in run[:-1])
        how += f", in {rundir}"
        skipped = [f"{s.index} ({s.name})" for s in recipe.steps if s not in run]
        if skipped:
            how += f" (not rerun: {', '.join(skipped)})"
        say(how)
        for st in run:
            vals = values[st.index]
            if not run_eval and st.schema.key("no_eval") is not None:
                vals["no_eval"] = True
            argv = build_argv(st.schema, vals)
            if st.index == t:  # the manifest records this step's direction
                argv = _shipped_direction(argv, folder, manifest, notes)
            run_step(recipe, st, argv, say=say)
    return _compared(outs[t], folder, f"step {t} ({target.name}) of {recipe.file}"), how


def _shipped_direction(args: list[str], folder: Path | None, manifest: dict | None, notes: list[str]) -> list[str]:
    """A ``--direction`` file that is gone (a copied or downloaded folder) is replaced
    by the folder's own ``direction.safetensors`` when its sha256 is the recorded one."""
    if folder is None or manifest is None:
        return args
    rec = manifest.get("direction") or {}
    own = folder / str(rec.get("file") or "direction.safetensors")
    out = list(args)
    for i, a in enumerate(out):
        value = out[i + 1] if a == "--direction" and i + 1 < len(out) else (a[12:] if a.startswith("--direction=") else None)
        if value is None or Path(value).exists() or not own.is_file() or sha256_file(own) != rec.get("sha256"):
            continue
        notes.append(f"--direction {value} is gone; used the copy this folder ships, {own} (same sha256)")
        if a == "--direction":
            out[i + 1] = str(own.resolve())
        else:
            out[i] = f"--direction={own.resolve()}"
    return out


def _rerun_invocation(inv: dict, rundir: Path, run_eval: bool, say, notes: list[str], folder: Path,
                      manifest: dict) -> tuple[Path, str]:
    from .cli import main

    argv = [str(a) for a in (inv.get("argv") or [])][1:]
    while argv and argv[0].startswith("-"):  # the group's own options (-v)
        argv.pop(0)
    cmd: click.Command = main
    path: list[str] = []
    while isinstance(cmd, click.Group):
        if not argv or argv[0] not in cmd.commands:
            raise ManifestError(f"the recorded command line {inv.get('argv')} names no known command")
        path.append(argv[0])
        cmd = cmd.commands[argv.pop(0)]
    if path[0] in NOT_STEPS:
        raise ManifestError(f"the recorded command is `surgery {path[0]}` but no recipe was recorded")
    # options redacted as secrets are dropped (the token comes from the environment again)
    clean: list[str] = []
    for a in argv:
        if a == REDACTED:
            if clean and clean[-1].startswith("-"):
                clean.pop()
            continue
        if not a.endswith("=" + REDACTED):
            clean.append(a)
    schema = _schema(tuple(path), cmd)
    outputs = {o: k for k in schema.params if k.is_output for o in k.param.opts}
    if not outputs:
        raise ManifestError(f"`surgery {' '.join(path)}` writes no output to redirect")
    line = ["surgery", *path]
    how = f"reran `{shlex.join(inv.get('argv') or [])}` with its outputs in {rundir}"
    say(how)
    with _in_dir(inv.get("cwd"), notes) as base:
        moved: dict[str, str] = {}  # recorded absolute path -> rerun path

        def place(value: str) -> str:
            if value == "-":
                return value
            return moved.setdefault(_abs(base, value), _place(rundir, value, moved.values()))

        redirected, given, i = [], set(), 0
        while i < len(clean):  # every output option, in each spelling: -o X, --out X, --out=X, -oX
            a = clean[i]
            if a == "--":
                break
            eq = next((o for o in outputs if o.startswith("--") and a.startswith(o + "=")), None)
            short = next((o for o in outputs if not o.startswith("--") and a.startswith(o) and len(a) > len(o)
                          and not a.startswith("--")), None)
            if a in outputs and i + 1 < len(clean):
                redirected += [a, place(clean[i + 1])]
                given.add(outputs[a].param.name)
                i += 2
                continue
            if eq or short:
                opt = eq or short
                redirected.append(f"{opt}={place(a[len(opt) + 1:])}" if eq else opt + place(a[len(opt):]))
                given.add(outputs[opt].param.name)
            else:
                redirected.append(a)
            i += 1
        tail = clean[i:]
        for k in schema.params:  # an output left at its default (units -o) is written there all the same
            if k.is_output and k.default is not None and k.param.name not in given:
                redirected.append(f"{max(k.param.opts, key=len)}={place(str(k.default))}")
        if not moved:
            raise ManifestError(f"no output option ({', '.join(outputs)}) in the recorded command line "
                                f"{inv.get('argv')}")
        if not run_eval and schema.key("no_eval") is not None and "--no-eval" not in redirected:
            redirected.append("--no-eval")
        redirected += tail
        line += redirected
        with provenance(invocation=invocation_record(line)):
            redirected = _shipped_direction(redirected, folder, manifest, notes)
            invoke(cmd, redirected, f"surgery {' '.join(path)}", lambda _: f"rerun of `{shlex.join(line)}`")
    return _compared(moved, folder, f"`{shlex.join(line)}`"), how


# -- comparing -----------------------------------------------------------------
def _read(f, info) -> bytes:
    f.seek(info.start)
    return f.read(info.nbytes)


def _as_tensor(raw: bytes, info) -> torch.Tensor:
    if not raw:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(info.dtype).reshape(info.shape)


def tensor_differences(a: Path, b: Path) -> tuple[dict[str, float], list[str]]:
    """Max |a - b| (float64) of every tensor whose bytes differ between two safetensors files, and
    structural problems (a tensor in one file only, another shape or dtype).  One pair in memory at a time."""
    ia, _, _ = read_safetensors_header(a)
    ib, _, _ = read_safetensors_header(b)
    diffs: dict[str, float] = {}
    problems = [f"tensor {n} only in the rerun" for n in ib if n not in ia]
    problems += [f"tensor {n} missing from the rerun" for n in ia if n not in ib]
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for name, x in ia.items():
            y = ib.get(name)
            if y is None:
                continue
            if (x.shape, x.dtype) != (y.shape, y.dtype):
                problems.append(f"tensor {name}: {tuple(x.shape)} {x.dtype} here, {tuple(y.shape)} {y.dtype} rerun")
                continue
            ra, rb = _read(fa, x), _read(fb, y)
            if ra == rb:
                continue
            ta, tb = _as_tensor(ra, x), _as_tensor(rb, y)
            diffs[name] = float((ta.double() - tb.double()).abs().max()) if ta.numel() else 0.0
    return diffs, problems


_ABSENT = object()


def _pop_field(obj, dotted: str):
    *path, last = dotted.split(".")
    for k in path:
        obj = obj.get(k) if isinstance(obj, dict) else None
    return obj.pop(last, _ABSENT) if isinstance(obj, dict) else _ABSENT


def _as_data(rel: str, path: Path):
    """A JSON file, or a safetensors file's header metadata (values holding a JSON object decoded), as data."""
    if not rel.endswith(".safetensors"):
        return json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for k, v in read_safetensors_header(path)[1].items():
        try:
            out[k] = json.loads(v) if v.lstrip().startswith("{") else v
        except ValueError:
            out[k] = v
    return out


def fields_apart(rel: str, a: Path, b: Path) -> list[str]:
    """The NOT_COMPARED_FIELDS of output ``rel`` in which files ``a`` and ``b`` differ, when they are all
    that differs (JSON and safetensors metadata compared as data, other text line by line); else []."""
    fields = next((f for pat, f in NOT_COMPARED_FIELDS.items() if fnmatch.fnmatchcase(rel, pat)), ())
    if not fields:
        return []
    try:
        if rel.endswith((".json", ".safetensors")):
            if rel.endswith(".safetensors") and tensor_differences(a, b) != ({}, []):
                return []
            ja, jb = _as_data(rel, a), _as_data(rel, b)
            differ = [f for f in fields if _pop_field(ja, f) != _pop_field(jb, f)]
            return differ if ja == jb else []
        ta, tb = a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError, CheckpointError):
        return []

    def split(text):
        lines = text.splitlines()
        return ([x for x in lines if not x.startswith(fields)],
                {f: [x for x in lines if x.startswith(f)] for f in fields})

    (ra, fa), (rb, fb) = split(ta), split(tb)
    return [f.strip("- :") for f in fields if fa[f] != fb[f]] if ra == rb else []


def compare_outputs(folder: Path, manifest: dict, rerun: Path) -> list[FileCheck]:
    stored: dict = {k: v for k, v in manifest["outputs"].items() if k not in NOT_COMPARED}
    new = {k: v for k, v in hash_folder(rerun).items() if k not in NOT_COMPARED}
    checks = []
    for rel, sha in stored.items():
        p = folder / rel
        c = FileCheck(rel, "identical", sha, sha256_file(p) if p.is_file() else None, new.get(rel))
        if c.here is None:
            c.status = "missing-here"
        elif c.rerun is None:
            c.status = "missing-in-rerun"
        elif c.here == sha and c.rerun != sha and (apart := fields_apart(rel, p, rerun / rel)):
            c.not_compared = apart
        elif not (c.here == c.rerun == sha):
            c.status = "differs"
            if c.here != sha:
                c.problems.append("this folder's copy no longer matches surgery.json" +
                                  ("; the rerun does" if c.rerun == sha else ""))
            elif c.rerun != sha:
                c.problems.append("the rerun differs from surgery.json")
            if rel.endswith(".safetensors"):
                try:
                    c.tensors, probs = tensor_differences(p, rerun / rel)
                    c.problems += probs
                    c.max_abs_diff = max(c.tensors.values(), key=_key) if c.tensors else None
                except CheckpointError as e:
                    c.problems.append(f"cannot compare tensors: {e}")
        checks.append(c)
    checks += [FileCheck(rel, "extra-in-rerun", rerun=sha) for rel, sha in new.items() if rel not in stored]
    checks += [FileCheck(rel, "extra-here", here=sha, problems=["not in surgery.json; the rerun did not make it"])
               for rel, sha in hash_folder(folder).items() if rel not in manifest["outputs"] and rel not in new]
    return checks


def _version_changes(manifest: dict) -> dict[str, list]:
    then = dict(manifest.get("libraries") or {})
    then["surgery"] = (manifest.get("tool") or {}).get("version")
    now = {**library_versions(), "surgery": __version__}
    return {k: [then.get(k), now.get(k)] for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}


def _input_changes(old: dict, rerun: Path) -> list[str]:
    try:
        new = read_manifest(rerun)
    except ManifestError:
        return []
    a = (old.get("input") or {}).get("weight_files") or {}
    b = (new.get("input") or {}).get("weight_files") or {}
    out = [f"weight file {n}: sha256 {str(a.get(n))[:12]} in the manifest, {str(b.get(n))[:12]} now"
           for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
    # the other inputs the manifest hashes: prompt sets and the direction (a --direction file)
    da, db = old.get("datasets") or {}, new.get("datasets") or {}
    for k in sorted(set(da) | set(db)):
        x, y = da.get(k) or {}, db.get(k) or {}
        if x.get("sha256") != y.get("sha256"):
            out.append(f"prompt set {k} ({x.get('source') or y.get('source')}): sha256 {str(x.get('sha256'))[:12]} "
                       f"in the manifest, {str(y.get('sha256'))[:12]} now")
    ra, rb = (old.get("direction") or {}).get("sha256"), (new.get("direction") or {}).get("sha256")
    if ra != rb:
        out.append(f"direction: sha256 {str(ra)[:12]} in the manifest, {str(rb)[:12]} now")
    return out


def reproduce(folder: str | Path, *, work: str | Path | None = None, keep: bool = False, run_eval: bool = False,
              say: Callable[[str], None] | None = None) -> ReproduceResult:
    """Rerun what made ``folder`` (see the module docstring) and compare its outputs."""
    say = say or (lambda m: None)
    folder = Path(folder).expanduser()
    m = read_manifest(folder)
    if not m.get("recipe") and not m.get("invocation"):
        raise ManifestError(f"{folder / MANIFEST} records neither a recipe nor a command line: nothing to rerun")
    rundir = Path(work or tempfile.gettempdir()).expanduser() / f"surgery-reproduce-{uuid.uuid4().hex[:8]}"
    try:  # never inside DIR, an input or another output of the run (their verify would fail)
        check_folder_inputs(rundir, [folder, (m.get("input") or {}).get("folder"), *_recorded_paths(m)])
    except CheckpointError as e:
        raise SurgeryError(f"--work {work}: {e}" if work is not None else str(e)) from None
    rundir.mkdir(parents=True)
    rundir = rundir.resolve()
    notes: list[str] = []
    try:
        if m.get("recipe"):
            out, how = _rerun_recipe(m["recipe"], rundir, run_eval, say, notes, folder.resolve(), m)
        else:
            out, how = _rerun_invocation(m["invocation"], rundir, run_eval, say, notes, folder.resolve(), m)
        if not out.is_dir():
            raise SurgeryError(f"the rerun wrote no folder {out}")
        files = compare_outputs(folder, m, out)
        res = ReproduceResult(all(f.status == "identical" for f in files), how, str(rundir) if keep else None, files,
                              _version_changes(m), _input_changes(m, out), notes)
    finally:
        if not keep:
            shutil.rmtree(rundir, ignore_errors=True)
    return res
