"""YAML recipes: a pipeline of ``surgery`` verbs, checked against the CLI itself.

A recipe (format in ``docs/recipes.md``)::

    surgery: 1                      # format version
    vars: {model: smollm2, out: hardened-smollm2}
    steps:
      - rosi: {model: ${model}, out: ${out}, max-over-refusal: 0.15}
      - card: {folder: ${out}}

One definition.  The click commands of :mod:`surgery.cli` *are* the schema:
:func:`step_schemas` walks ``main.commands`` (a group's sub-commands become
``"sae train"``) every time a recipe is read and turns each click parameter into
a :class:`Key`: the spellings a recipe may use (the long flag without dashes,
``max-over-refusal``, and the Python name, ``max_over_refusal``, each with ``-``
or ``_``), the YAML type the click type asks for (``multiple`` -> a list), and
whether it is required.  Adding an option to a verb adds it to recipes; nothing
here names an option.  A validated step becomes an argv (``positionals
--long=value``) and runs as ``command.main(argv, standalone_mode=False)``, the
code path of typing it, so click applies defaults, ranges and callbacks itself.

Values are typed strictly from the YAML (``alpha: strong`` is refused, not
passed to click); ``1e-3`` reads as a number (YAML 1.2's rule, which PyYAML's
1.1 resolver lacks); ``null`` means "the default".  ``${name}`` is replaced by a
variable from ``vars`` (a whole-value reference keeps the variable's type; a
variable may use earlier ones; ``--var name=value`` overrides one, typed like
YAML).  Every message is one line naming the file, the line (from the nodes of
``yaml.compose``), the step and the key.  All steps are checked before the
first runs.  Paths are relative to the working folder, as on the command line.

Provenance.  Around each step, :func:`surgery.manifest.provenance` holds the
recipe text verbatim (and its sha256, the step, its argv, the ``--var``
overrides and the working folder), so every manifest the step writes records
it and ``surgery reproduce`` (:mod:`surgery.reproduce`) can run it again.
Recipes must not hold secrets: a token-shaped string is refused.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import yaml

from .errors import SurgeryError
from .manifest import REDACTED, is_secret_name, provenance, redact_argv, redact_value

FORMAT_VERSION = 1
NOT_STEPS = ("run", "reproduce")  # verbs that run recipes are not steps of one
TOP_KEYS = ("surgery", "description", "vars", "steps")
_VAR_REF = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RecipeError(SurgeryError):
    """A recipe cannot be read, does not fit the CLI, or one of its steps failed."""


# -- YAML ----------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E4`` as floats (YAML 1.2; PyYAML wants a dot)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _line(node) -> int:
    return node.start_mark.line + 1


def _construct(node) -> Any:
    return _Loader("").construct_object(node, deep=True)


def yaml_scalar(text: str) -> Any:
    """``--var`` values: typed as a YAML scalar (``5`` int, ``true`` bool, ``null``), else the string."""
    try:
        v = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text
    return v if v is None or isinstance(v, (str, int, float, bool)) else text


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return repr(v)


# -- the schema, derived from click ---------------------------------------------
@dataclass(frozen=True)
class Key:
    """One click parameter as a recipe key."""
    param: click.Parameter
    name: str                   # canonical spelling: the long flag without dashes, or the argument's name
    spellings: tuple[str, ...]  # every accepted spelling

    @property
    def is_argument(self) -> bool:
        return isinstance(self.param, click.Argument)

    @property
    def is_flag(self) -> bool:
        return isinstance(self.param, click.Option) and self.param.is_flag and not self.param.count

    @property
    def multiple(self) -> bool:
        return bool(getattr(self.param, "multiple", False)) or self.param.nargs == -1

    @property
    def required(self) -> bool:
        return bool(self.param.required)

    @property
    def default(self) -> Any:
        d = self.param.default
        return None if d is None or type(d).__name__ == "Sentinel" or callable(d) else d

    @property
    def is_output(self) -> bool:
        """Where the step writes: ``-o/--out`` and the options whose Python name ends in ``_out`` (eval's
        and diff's ``--json``, ``--plot``, tune's ``--write``); a new output option must follow that naming,
        or ``surgery reproduce`` would rerun it onto the user's path."""
        p = self.param
        return isinstance(p, click.Option) and (p.name == "out" or (p.name or "").endswith("_out")
                                                or "-o" in p.opts or "--out" in p.opts)

    @property
    def expects(self) -> str:
        one = _expects(self.param.type, self.is_flag)
        return f"a list of {_plural(one)}" if self.multiple else one


def _expects(t: click.ParamType, flag: bool) -> str:
    if flag or isinstance(t, click.types.BoolParamType):
        return "true or false"
    if isinstance(t, click.Choice):
        return "one of " + ", ".join(map(str, t.choices))
    bounds = f" ({t._describe_range()})" if isinstance(t, click.types._NumberRangeBase) else ""
    if isinstance(t, click.types.IntParamType):
        return "an integer" + bounds
    if isinstance(t, click.types.FloatParamType):
        return "a number" + bounds
    if isinstance(t, click.Path):
        return "a path"
    return "a string"


def _plural(s: str) -> str:
    return {"true or false": "true/false values", "an integer": "integers", "a number": "numbers", "a path": "paths",
            "a string": "strings"}.get(s, f"values ({s})")


@dataclass
class StepSchema:
    name: str                       # "rosi", "sae train"
    path: tuple[str, ...]           # ("sae", "train"): the argv words after ``surgery``
    command: click.Command
    params: list[Key]               # declaration order (positional order for arguments)
    lookup: dict[str, Key] = field(default_factory=dict)  # every accepted spelling -> Key

    def key(self, spelling: str) -> Key | None:
        return self.lookup.get(str(spelling))

    def names(self) -> list[str]:
        return [k.name for k in self.params]


def _schema(path: tuple[str, ...], cmd: click.Command) -> StepSchema:
    keys: list[Key] = []
    for p in cmd.params:
        if not p.name or not p.expose_value or getattr(p, "hidden", False):
            continue
        longs = [o.lstrip("-") for o in getattr(p, "opts", []) if o.startswith("--")]
        canonical = longs[0] if longs else p.name
        words = longs + [p.name]
        spellings = tuple(dict.fromkeys(s for w in words for s in (w, w.replace("_", "-"), w.replace("-", "_"))))
        keys.append(Key(p, canonical, spellings))
    lookup: dict[str, Key] = {}
    for k in keys:  # long flags first, so a flag's spelling never loses to another option's Python name
        for s in k.spellings[:2]:
            lookup.setdefault(s, k)
    for k in keys:
        for s in k.spellings:
            lookup.setdefault(s, k)
    return StepSchema(" ".join(path), path, cmd, keys, lookup)


def step_schemas(group: click.Group | None = None) -> dict[str, StepSchema]:
    """Every verb of the CLI as a recipe step, read from the click objects now."""
    if group is None:
        from .cli import main as group
    out: dict[str, StepSchema] = {}

    def walk(g: click.Group, prefix: tuple[str, ...]) -> None:
        for name, cmd in g.commands.items():
            if not prefix and name in NOT_STEPS:
                continue
            if isinstance(cmd, click.Group):
                walk(cmd, prefix + (name,))
            else:
                s = _schema(prefix + (name,), cmd)
                out[s.name] = s

    walk(group, ())
    return out


def _norm_step(name: str) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


def find_step(name: str, schemas: dict[str, StepSchema]) -> StepSchema | None:
    by = {_norm_step(k): v for k, v in schemas.items()}
    return by.get(_norm_step(name))


# -- values --------------------------------------------------------------------
def _convert_one(key: Key, v: Any) -> tuple[bool, Any]:
    t = key.param.type
    if key.is_flag or isinstance(t, click.types.BoolParamType):
        return isinstance(v, bool), v
    if isinstance(v, bool):  # true/false is never a number, a path or a string here
        return False, v
    if isinstance(t, click.types.IntParamType):
        ok = isinstance(v, int)
    elif isinstance(t, click.types.FloatParamType):
        ok = isinstance(v, (int, float))
    elif isinstance(t, click.Choice):
        ok = isinstance(v, (str, int, float)) and str(v) in [str(c) for c in t.choices]
        return ok, str(v)
    elif isinstance(t, click.Path):  # a folder named 2024 reaches YAML as a number, as for string keys
        return isinstance(v, (str, int, float)), v if isinstance(v, str) else _render(v)
    else:
        return isinstance(v, (str, int, float)), v if isinstance(v, str) else _render(v)
    if ok and isinstance(t, click.types._NumberRangeBase):
        try:
            t.convert(v, key.param, None)
        except click.BadParameter:
            return False, v
    return ok, v


def _render(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def build_argv(schema: StepSchema, values: dict[str, Any]) -> list[str]:
    """The step's command line (after ``surgery <verb>``) from checked values keyed by parameter name."""
    pos: list[str] = []
    opts: list[str] = []
    for k in schema.params:
        if k.param.name not in values:
            continue
        v = values[k.param.name]
        if k.is_argument:
            pos.extend(_render(x) for x in (v if k.multiple else [v]))
            continue
        p: click.Option = k.param  # type: ignore[assignment]
        long = [o for o in p.opts if o.startswith("--")]
        if k.is_flag:
            if v:
                opts.append(long[0] if long else p.opts[0])
            elif p.secondary_opts:
                opts.append(p.secondary_opts[0])
            continue
        for x in (v if k.multiple else [v]):
            opts += [f"{long[0]}={_render(x)}"] if long else [p.opts[0], _render(x)]
    if any(a.startswith("-") for a in pos):
        return opts + ["--"] + pos
    return pos + opts


# -- the recipe ----------------------------------------------------------------
@dataclass
class Step:
    index: int                      # 1-based
    schema: StepSchema
    line: int
    values: dict[str, Any]          # parameter name -> checked value (only keys the recipe gives)
    lines: dict[str, int]           # parameter name -> line

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def argv(self) -> list[str]:
        return build_argv(self.schema, self.values)

    def command_line(self, argv: list[str] | None = None) -> list[str]:
        return ["surgery", *self.schema.path, *(self.argv if argv is None else argv)]


@dataclass
class Recipe:
    file: str
    text: str
    sha256: str
    vars: dict[str, Any]
    overrides: dict[str, Any]
    steps: list[Step]
    description: str | None = None

    def where(self, step: Step, line: int | None = None) -> str:
        return f"{self.file}:{line or step.line}: step {step.index} ({step.name})"

    def record(self, step: Step, argv: list[str] | None = None) -> dict:
        """What a manifest written by ``step`` stores under ``recipe``."""
        return {"file": self.file, "step": step.index, "name": step.name,
                "command": redact_argv(step.command_line(argv)),
                "vars": {k: (REDACTED if is_secret_name(k) else redact_value(v) if isinstance(v, str) else v)
                         for k, v in self.overrides.items()},
                "cwd": os.getcwd(), "sha256": self.sha256, "text": self.text}


class _Reader:
    """Turns composed YAML nodes into a :class:`Recipe`, naming file and line in every error."""

    def __init__(self, text: str, file: str, overrides: dict[str, Any]):
        self.text, self.file, self.overrides = text, file, dict(overrides)

    def fail(self, line: int | None, msg: str):
        raise RecipeError(f"{self.file}:{line}: {msg}" if line else f"{self.file}: {msg}")

    def pairs(self, node, what: str) -> list[tuple[str, Any, Any]]:
        """(key, key node, value node) of a mapping node; duplicate and non-string keys refused."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(_line(node), f"{what} must be a mapping (key: value lines)")
        seen: dict[str, int] = {}
        out = []
        for kn, vn in node.value:
            if not isinstance(kn, yaml.ScalarNode):
                self.fail(_line(kn), f"{what}: keys must be plain names")
            k = str(kn.value)
            if k in seen:
                self.fail(_line(kn), f"{what}: key {k!r} given twice (first on line {seen[k]})")
            seen[k] = _line(kn)
            out.append((k, kn, vn))
        return out

    def read(self) -> Recipe:
        m = _SECRET_IN_TEXT.search(self.text)
        if m:
            self.fail(self.text.count("\n", 0, m.start()) + 1, "holds what looks like an access token; recipes are "
                      "stored verbatim in every manifest (use HF_TOKEN or `hf auth login` instead)")
        try:
            root = yaml.compose(self.text, Loader=_Loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            hint = ""
            if mark is not None and "${" in "".join(self.text.splitlines()[max(0, mark.line - 1):mark.line + 1]):
                hint = " (inside { } or [ ], quote values that use ${...}: \"${out}\")"
            self.fail(mark.line + 1 if mark else None, f"not valid YAML: {e.problem or e.context}{hint}")
        except yaml.YAMLError as e:
            self.fail(None, f"not valid YAML: {e}")
        if root is None:
            self.fail(None, "empty recipe (expected 'surgery: 1' and 'steps:')")
        top = {k: (kn, vn) for k, kn, vn in self.pairs(root, "the recipe")}
        for k, (kn, _) in top.items():
            if k not in TOP_KEYS:
                self.fail(_line(kn), f"unknown top-level key {k!r}{_suggest(k, TOP_KEYS)}")
        if "surgery" not in top:
            self.fail(1, f"missing 'surgery: {FORMAT_VERSION}' (the recipe format version)")
        kn, vn = top["surgery"]
        version = _construct(vn)
        if version != FORMAT_VERSION or isinstance(version, bool):
            self.fail(_line(vn), f"'surgery' must be {FORMAT_VERSION} (the recipe format version this surgery "
                                 f"reads), got {_show(version)}")
        description = None
        if "description" in top:
            description = _construct(top["description"][1])
            if not isinstance(description, str):
                self.fail(_line(top["description"][1]), "'description' must be a string")
        variables = self.variables(top["vars"][1] if "vars" in top else None)
        if "steps" not in top:
            self.fail(None, "missing 'steps' (a list of steps such as '- rosi: {...}')")
        steps_node = top["steps"][1]
        if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
            self.fail(_line(steps_node), "'steps' must be a non-empty list (each item '- verb: {key: value}')")
        schemas = step_schemas()
        steps = [self.step(i, node, schemas, variables) for i, node in enumerate(steps_node.value, 1)]
        data = self.text.encode("utf-8")
        return Recipe(self.file, self.text, hashlib.sha256(data).hexdigest(), variables, self.overrides, steps,
                      description)

    def variables(self, node) -> dict[str, Any]:
        declared: dict[str, tuple[Any, int]] = {}
        if node is not None and not (isinstance(node, yaml.ScalarNode) and _construct(node) is None):
            for k, kn, vn in self.pairs(node, "'vars'"):
                if not _NAME.match(k):
                    self.fail(_line(kn), f"variable name {k!r} must be letters, digits and _")
                if not isinstance(vn, yaml.ScalarNode):
                    self.fail(_line(vn), f"variable {k!r} must be one value (string, number, true/false or null)")
                declared[k] = (_construct(vn), _line(vn))
        for k in self.overrides:
            if k not in declared:
                known = ", ".join(declared) or "none"
                self.fail(None, f"--var {k}: the recipe declares no variable {k!r}{_suggest(k, declared)} "
                                f"(it declares: {known})")
        resolved: dict[str, Any] = {}
        for k, (v, line) in declared.items():
            if k in self.overrides:
                v, line = self.overrides[k], None
            resolved[k] = self.substitute(v, resolved, line, f"variable {k!r}")
        return resolved

    def substitute(self, v: Any, variables: dict[str, Any], line: int | None, what: str) -> Any:
        if isinstance(v, list):
            return [self.substitute(x, variables, line, what) for x in v]
        if not isinstance(v, str) or "${" not in v:
            return v

        def value(name: str) -> Any:
            if name not in variables:
                known = ", ".join(variables) or "none"
                self.fail(line, f"{what}: unknown variable ${{{name}}}{_suggest(name, variables)} "
                                f"(declared before this use: {known})")
            return variables[name]

        whole = _VAR_REF.fullmatch(v)
        if whole:
            return value(whole.group(1))

        def piece(m: re.Match) -> str:
            x = value(m.group(1))
            if x is None:
                self.fail(line, f"{what}: variable ${{{m.group(1)}}} is null, so it cannot be part of {v!r}")
            return _render(x)

        return _VAR_REF.sub(piece, v)

    def step(self, index: int, node, schemas: dict[str, StepSchema], variables: dict[str, Any]) -> Step:
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            self.fail(_line(node), f"step {index}: each step is one 'verb: {{key: value, ...}}' mapping")
        kn, vn = node.value[0]
        name = str(kn.value) if isinstance(kn, yaml.ScalarNode) else "?"
        schema = find_step(name, schemas)
        if schema is None:
            self.fail(_line(kn), f"step {index}: unknown step {name!r}{_suggest(name, schemas)} "
                                 f"(known steps: {', '.join(sorted(schemas))})")
        where = f"step {index} ({schema.name})"
        values: dict[str, Any] = {}
        lines: dict[str, int] = {}
        given: dict[str, str] = {}
        empty = isinstance(vn, yaml.ScalarNode) and _construct(vn) is None
        for k, kkn, kvn in ([] if empty else self.pairs(vn, where)):
            key = schema.key(k)
            if key is None:
                hint = _suggest(k, schema.lookup, schema) or f" ({schema.name} takes: {', '.join(schema.names())})"
                self.fail(_line(kkn), f"{where}: unknown key {k!r}{hint}")
            pname = key.param.name
            if pname in given:
                self.fail(_line(kkn), f"{where}: {k!r} and {given[pname]!r} (line {lines[pname]}) are the same key")
            given[pname], lines[pname] = k, _line(kkn)
            if not isinstance(kvn, yaml.ScalarNode) and not (key.multiple and isinstance(kvn, yaml.SequenceNode)):
                self.fail(_line(kvn), f"{where}: {k!r} must be {key.expects}, got {_show(_construct(kvn))}")
            raw = self.substitute(_construct(kvn), variables, _line(kvn), f"{where}: {k!r}")
            if raw is None:
                continue  # null: the verb's default
            items = raw if key.multiple and isinstance(raw, list) else [raw]
            if isinstance(raw, list) and not key.multiple:
                self.fail(_line(kvn), f"{where}: {k!r} must be {key.expects}, got a list")
            checked = []
            for x in items:
                ok, cx = _convert_one(key, x)
                if not ok and key.multiple:
                    self.fail(_line(kvn), f"{where}: each item of {k!r} must be "
                                          f"{_expects(key.param.type, key.is_flag)}, got {_show(x)}")
                if not ok:
                    self.fail(_line(kvn), f"{where}: {k!r} must be {key.expects}, got {_show(x)}")
                checked.append(cx)
            if key.is_flag and checked[0] is False and not key.param.secondary_opts and key.default:
                self.fail(_line(kvn), f"{where}: {k!r} cannot be turned off")
            values[pname] = checked if key.multiple else checked[0]
        missing = [k.name for k in schema.params if k.required and k.param.name not in values]
        if missing:
            self.fail(_line(kn), f"{where}: missing required key{'s' if len(missing) > 1 else ''} "
                                 + ", ".join(repr(m) for m in missing))
        return Step(index, schema, _line(kn), values, lines)


_SECRET_IN_TEXT = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,})\b")


def _suggest(word: str, options: Iterable[str], schema: StepSchema | None = None) -> str:
    opts = list(options)
    m = difflib.get_close_matches(str(word), opts, n=1, cutoff=0.6)
    if not m:
        return ""
    best = schema.lookup[m[0]].name if schema is not None else m[0]
    return f" (did you mean {best!r}?)"


def parse_recipe(text: str, file: str = "recipe.yaml", overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and check a recipe (every step against the CLI) without running anything."""
    return _Reader(text, file, overrides or {}).read()


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    return parse_recipe(text, str(path), overrides)


def parse_var_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["model=tiny", "alpha=5"]`` -> ``{"model": "tiny", "alpha": 5}`` (values typed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not _NAME.match(name.strip()):
            raise RecipeError(f"--var {item!r}: expected NAME=VALUE")
        out[name.strip()] = yaml_scalar(value)
    return out


# -- running -------------------------------------------------------------------
def invoke(command: click.Command, argv: list[str], prog: str, where: Callable[[str | None], str]) -> None:
    """Run a click command as if typed.  Its errors become one-line RecipeErrors prefixed by
    ``where(parameter name or None)`` (a recipe names the line of the key click complains about)."""
    try:
        command.main(list(argv), prog_name=prog, standalone_mode=False)
    except SurgeryError as e:
        raise RecipeError(f"{where(None)}: {e}") from None
    except click.ClickException as e:
        param = getattr(e, "param", None)
        raise RecipeError(f"{where(param.name if param is not None else None)}: "
                          f"{' '.join(e.format_message().split())}") from None
    except click.exceptions.Abort:
        raise RecipeError(f"{where(None)}: aborted") from None
    except SystemExit as e:
        if e.code not in (0, None):
            raise RecipeError(f"{where(None)}: exited with status {e.code}") from None


def run_step(recipe: Recipe, step: Step, argv: list[str] | None = None, say: Callable[[str], None] = print) -> None:
    """Run one step (``argv`` replaces the step's own, e.g. with outputs redirected) with the recipe recorded."""
    argv = step.argv if argv is None else argv
    say(f"step {step.index}/{len(recipe.steps)}: {shlex.join(redact_argv(step.command_line(argv)))}")
    with provenance(recipe=recipe.record(step, argv)):
        invoke(step.schema.command, argv, " ".join(step.command_line([])),
               lambda pname: recipe.where(step, step.lines.get(pname or "")))


def run_recipe(recipe: Recipe, say: Callable[[str], None] = print, dry_run: bool = False) -> None:
    """Run every step in order (all were checked when the recipe was read)."""
    for step in recipe.steps:
        if dry_run:
            say(shlex.join(redact_argv(step.command_line())))
        else:
            run_step(recipe, step, say=say)
    if not dry_run:
        say(f"recipe {recipe.file}: {len(recipe.steps)} step{'s' if len(recipe.steps) > 1 else ''} done")
