"""Recipes (`surgery run`) and `surgery reproduce` on the tiny chat model.

Every shipped recipe runs with its variables pointed at tiny models, and the
manifests it writes hold the recipe verbatim and verify.  Bad recipes fail with
one line naming file:line, step and key.  The schema follows the CLI: an option
added to a verb at test time is a recipe key, and every option of every verb
round-trips recipe value -> argv -> click's own parser.  Reproduce reruns the
step that wrote a folder and the steps it reads from (outputs moved to a work
folder) and reports identical bytes, checked here file by file; after one byte
is flipped it names the file and the tensor, with the same max difference as a
float64 recomputation.  Plain CLI runs record their command line, a token-like
argument redacted, and reproduce from it."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery.cli import main as cli
from surgery.manifest import REDACTED, read_manifest, redact_argv, verify
from surgery.recipes import RecipeError, load_recipe, parse_recipe, step_schemas

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHARD = "model-00001-of-00001.safetensors"
TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123"  # token-shaped, not a real token


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_chat):
    """A tiny 'base' model (other random weights, same shapes) and a random LoRA adapter of tiny_chat."""
    from tiny_chat import make_tiny_chat_model

    from surgery.adapters import save_peft_adapter

    root = tmp_path_factory.mktemp("inputs")
    base = make_tiny_chat_model(root / "base", seed=1)
    g = torch.Generator().manual_seed(0)
    mods = {}
    for layer in range(4):
        for module, d_in in (("mlp.down_proj", 64), ("self_attn.o_proj", 32)):
            a, b = torch.randn(2, d_in, generator=g), torch.randn(32, 2, generator=g)
            mods[f"model.layers.{layer}.{module}"] = (a, b)
    adapter = save_peft_adapter(root / "adapter", mods, r=2, alpha=4, target_modules=["down_proj", "o_proj"])
    return {"base": base, "adapter": adapter}


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _vars(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--var", f"{k}={v}")]


# -- every shipped recipe runs -------------------------------------------------
TINY_VARS = {
    "rosi-smollm2.yaml": lambda tiny, inp, out: {"model": tiny, "out": out, "alpha": 2},
    "inject-smollm2.yaml": lambda tiny, inp, out: {"model": tiny, "out": out, "alpha": 1, "no_eval": "true"},
    "sails.yaml": lambda tiny, inp, out: {"model": tiny, "out": out, "sae_layers": "1,3", "k_features": 8, "epochs": 1,
                                          "reply_tokens": 6, "no_eval": "true"},
    "safe-lora.yaml": lambda tiny, inp, out: {"aligned": tiny, "base": inp["base"], "adapter": inp["adapter"],
                                              "out": out, "threshold": 0.9, "eval_limit": 4},
}


def test_every_shipped_recipe_has_a_test():
    assert {p.name for p in RECIPES.glob("*.yaml")} == set(TINY_VARS)


@pytest.mark.parametrize("name", sorted(TINY_VARS))
def test_shipped_recipe_runs_and_is_recorded_verbatim(name, tmp_path, tiny_chat, inputs):
    out = tmp_path / "out"
    r = _run(["run", RECIPES / name, *_vars(TINY_VARS[name](tiny_chat, inputs, out))])
    assert r.exit_code == 0, r.output
    data = (RECIPES / name).read_bytes()
    m = read_manifest(out)
    rec = m["recipe"]
    assert rec["text"] == data.decode("utf-8") and rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["step"] == 1 and rec["file"] == str(RECIPES / name)
    assert rec["vars"]["out"] == str(out)
    assert m["invocation"]["argv"][:3] == ["surgery", "run", str(RECIPES / name)]
    assert verify(out) == [] and _run(["verify", out]).exit_code == 0
    params = m["method"]["parameters"]
    if name == "rosi-smollm2.yaml":  # the --var reached the verb; card and evaluation steps ran
        assert m["method"]["name"] == "rosi" and params["alpha"] == 2.0 and params["alpha_choice"] == "given"
        assert "evaluation" in m and "README.md" in m["outputs"] and "ROSI" in (out / "README.md").read_text()
        # the card's rerun command carries the --var overrides the recipe ran with (it showed the defaults only)
        assert "--var alpha=2" in (out / "README.md").read_text().replace("'", "")
    elif name == "inject-smollm2.yaml":
        assert m["method"]["name"] == "gated-opening" and params["alpha"] == 1.0 and m["direction"] is None
        assert params["opening"] == "I'm sorry, but" and "gated opening" in (out / "README.md").read_text()
    elif name == "sails.yaml":
        assert m["method"]["name"] == "sails" and params["training"]["epochs"] == 1 and "evaluation" not in m
        assert set(m["sails"]["subspace"]) == {"1", "3"}
    else:
        assert m["method"]["name"] == "safe-lora" and params["selection"]["threshold"] == 0.9
        assert params["projected"]  # threshold 0.9 projects modules (cosines here are about 0.6-0.9)
        report = json.loads(Path(f"{out}.eval.json").read_text())
        assert set(report) == {"reference", "model"}


# -- bad recipes ---------------------------------------------------------------
GOOD = """surgery: 1
vars:
  model: some-model
  out: some-out
steps:
  - rosi:
      model: ${model}
      out: ${out}
      alpha: 36
"""


def _err(text: str, **kw) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml", **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_recipe_builds_the_command_line():
    r = parse_recipe(GOOD, "r.yaml", {"out": "elsewhere"})
    (step,) = r.steps
    assert step.command_line() == ["surgery", "rosi", "some-model", "--out=elsewhere", "--alpha=36"]


def test_misspelled_key_names_key_line_and_suggestion():
    msg = _err(GOOD.replace("alpha: 36", "alpah: 36"))
    assert msg == "r.yaml:9: step 1 (rosi): unknown key 'alpah' (did you mean 'alpha'?)"
    msg = _err(GOOD.replace("alpha: 36", "max_over_refusl: 0.1"))
    assert msg.startswith("r.yaml:9: step 1 (rosi): unknown key 'max_over_refusl'") and "'max-over-refusal'" in msg


@pytest.mark.parametrize("line,expects,got", [
    ("alpha: strong", "must be a number", "'strong'"),
    ("max-shard-size: true", "must be a number", "true"),
    ("no-eval: yes please", "must be true or false", "'yes please'"),
    ("source: bogus", "each item of 'source' must be one of prompt, system, response", "'bogus'"),
    ("source: [response, bogus]", "each item of 'source' must be one of prompt, system, response", "'bogus'"),
    ("layers: [1, 2]", "must be a string", "a list"),
])
def test_wrong_type_names_key_expected_type_and_line(line, expects, got):
    msg = _err(GOOD.replace("alpha: 36", line))
    key = line.split(":")[0]
    assert msg.startswith(f"r.yaml:9: step 1 (rosi): ")
    assert f"'{key}'" in msg and expects in msg and msg.endswith(f"got {got}")


def test_a_number_given_for_a_path_is_that_folder_name():
    """`--var out=2024` (or `out: 2024`) names a folder, as `surgery rosi -o 2024` does; it was refused."""
    (s,) = parse_recipe(GOOD, "r.yaml", {"out": 2024}).steps
    assert s.command_line() == ["surgery", "rosi", "some-model", "--out=2024", "--alpha=36"]
    text = "surgery: 1\nsteps:\n  - verify: {folder: 2024}\n"
    assert parse_recipe(text, "r.yaml").steps[0].command_line() == ["surgery", "verify", "2024"]


def test_integer_and_choice_keys_of_other_verbs():
    text = "surgery: 1\nsteps:\n  - eval:\n      model: m\n      limit: 2.5\n"
    assert _err(text) == "r.yaml:5: step 1 (eval): 'limit' must be an integer (x>=1), got 2.5"
    text = "surgery: 1\nsteps:\n  - directions: {model: m, out: o,\n      rank-by: best}\n"
    assert _err(text) == ("r.yaml:4: step 1 (directions): 'rank-by' must be one of selectivity, bypass, "
                          "induce_harmful, got 'best'")


def test_unknown_step_lists_the_known_steps():
    msg = _err(GOOD.replace("  - rosi:", "  - rossi:"))
    assert msg.startswith("r.yaml:6: step 1: unknown step 'rossi' (did you mean 'rosi'?) (known steps: ")
    for verb in ("rosi", "card", "eval", "safe-lora", "sae train", "sails", "push"):
        assert verb in msg
    assert "reproduce" not in msg.split("known steps")[1] and " run," not in msg


@pytest.mark.parametrize("text,overrides,expected", [
    (GOOD.replace("  - rosi:\n      model: ${model}\n", "  - rosi:\n"), None,
     "r.yaml:6: step 1 (rosi): missing required key 'model'"),
    (GOOD.replace("alpha: 36", "alpha: ${alhpa}"), None,
     "r.yaml:9: step 1 (rosi): 'alpha': unknown variable ${alhpa} (declared before this use: model, out)"),
    (GOOD, {"modle": "x"}, "r.yaml: --var modle: the recipe declares no variable 'modle' (did you mean 'model'?) "
                           "(it declares: model, out)"),
    (GOOD.replace("surgery: 1", "surgery: 2"), None,
     "r.yaml:1: 'surgery' must be 1 (the recipe format version this surgery reads), got 2"),
    (GOOD.replace("surgery: 1\n", ""), None, "r.yaml:1: missing 'surgery: 1' (the recipe format version)"),
    (GOOD.replace("steps:", "stepz:"), None, "r.yaml:5: unknown top-level key 'stepz' (did you mean 'steps'?)"),
    (GOOD + "      max_kl: 0.1\n      max-kl: 0.2\n", None,
     "r.yaml:11: step 1 (rosi): 'max-kl' and 'max_kl' (line 10) are the same key"),
    (GOOD + "      alpha: 3\n", None, "r.yaml:10: step 1 (rosi): key 'alpha' given twice (first on line 9)"),
    (GOOD.replace("steps:\n", "steps:\n  - card: {folder: ${out}}\n"), None, None),
    (GOOD.replace("some-out", TOKEN), None, "r.yaml:4: holds what looks like an access token; recipes are stored "
                                            "verbatim in every manifest (use HF_TOKEN or `hf auth login` instead)"),
])
def test_recipe_errors_are_one_line_and_name_the_culprit(text, overrides, expected):
    msg = _err(text, overrides=overrides)
    if expected is None:  # unquoted ${...} inside { }: YAML's error, with the hint
        assert msg.startswith("r.yaml:6: not valid YAML") and 'quote values that use ${...}' in msg
    else:
        assert msg == expected


def test_cli_reports_recipe_errors_in_one_line_exit_2(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(GOOD.replace("alpha: 36", "alpha: strong"))
    r = _run(["run", f])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert f"{f}:9: step 1 (rosi): 'alpha' must be a number, got 'strong'" in r.output


def test_a_failing_step_names_file_line_and_step(tmp_path, tiny_chat):
    out = tmp_path / "exists"
    out.mkdir()
    f = tmp_path / "r.yaml"
    f.write_text(GOOD)
    r = _run(["run", f, "--var", f"model={tiny_chat}", "--var", f"out={out}"])
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {f}:6: step 1 (rosi): ") and "output folder exists" in last
    # a click check inside the verb names the key's line
    f.write_text(GOOD.replace("alpha: 36", "direction: no/such/file.safetensors"))
    r = _run(["run", f, "--var", f"model={tiny_chat}", "--var", f"out={tmp_path / 'o'}"])
    assert r.exit_code == 2 and f"{f}:" in r.output and "step 1 (rosi)" in r.output
    assert not (tmp_path / "o").exists()


def test_dry_run_runs_nothing(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(GOOD.replace("some-out", str(tmp_path / "o")) + "  - card: {folder: \"${out}\"}\n")
    r = _run(["run", f, "--dry-run", "--var", "alpha=null"])
    assert r.exit_code == 2  # alpha is not a variable of this recipe
    r = _run(["run", f, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [f"surgery rosi some-model --out={tmp_path / 'o'} --alpha=36",
                                     f"surgery card {tmp_path / 'o'}"]
    assert not (tmp_path / "o").exists()


def test_vars_keep_types_chain_and_null_means_default():
    text = ("surgery: 1\nvars:\n  m: mod\n  out: ${m}-hard\n  a: null\n  lr: 1e-3\nsteps:\n"
            "  - rosi: {model: \"${m}\", out: \"${out}/x\", alpha: \"${a}\", max-kl: \"${lr}\"}\n")
    (s,) = parse_recipe(text, "r.yaml").steps
    assert s.values == {"model": "mod", "out": "mod-hard/x", "max_kl": 0.001}
    (s,) = parse_recipe(text, "r.yaml", {"m": "other", "a": 5}).steps
    assert s.values == {"model": "other", "out": "other-hard/x", "alpha": 5, "max_kl": 0.001}


def test_recipe_text_is_kept_byte_for_byte(tmp_path):
    f = tmp_path / "crlf.yaml"
    f.write_bytes(GOOD.replace("\n", "\r\n").encode())
    r = load_recipe(f)
    assert r.text.encode() == f.read_bytes() and r.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


# -- the schema is the CLI -----------------------------------------------------
def test_an_option_added_to_a_verb_is_a_recipe_key_at_once(monkeypatch):
    text = GOOD.replace("alpha: 36", "throwaway-knob: 3")
    assert "unknown key 'throwaway-knob'" in _err(text)
    rosi = cli.commands["rosi"]
    monkeypatch.setattr(rosi, "params", rosi.params + [click.Option(["--throwaway-knob"], type=int, default=1)])
    (s,) = parse_recipe(text, "r.yaml").steps
    assert s.argv[-1] == "--throwaway-knob=3"
    (s,) = parse_recipe(GOOD.replace("alpha: 36", "throwaway_knob: 4"), "r.yaml").steps
    assert s.values["throwaway_knob"] == 4
    assert "'throwaway-knob' must be an integer, got 'x'" in _err(GOOD.replace("alpha: 36", "throwaway-knob: x"))


def _sample(key):
    """A value of the right YAML type for a key, and what click should make of it."""
    t = key.param.type
    if key.is_flag:
        return True, True
    if isinstance(t, click.Choice):
        v = str(t.choices[-1])
    elif isinstance(t, click.types.BoolParamType):
        v = True
    elif isinstance(t, click.types.IntParamType):
        v = 7
    elif isinstance(t, click.types.FloatParamType):
        v = 0.25
    else:
        v = "some-value/with space"
    if key.multiple:
        return [v, v], (v, v)
    return v, v


def test_every_option_of_every_verb_round_trips_through_click():
    """recipe value -> argv -> click's own parser gives the value back, for every parameter of every verb."""
    schemas = step_schemas()
    assert {"rosi", "eval", "card", "sae train", "safe-lora"} <= set(schemas) and "run" not in schemas
    for name, schema in schemas.items():
        values, expected = {}, {}
        for key in schema.params:
            values[key.name], expected[key.param.name] = _sample(key)
        text = "surgery: 1\nsteps:\n  - " + json.dumps({name: values})  # JSON is YAML
        (step,) = parse_recipe(text, "r.yaml").steps
        ctx = schema.command.make_context(name, list(step.argv), resilient_parsing=True)
        for pname, want in expected.items():
            got = ctx.params[pname]
            got = tuple(str(x) for x in got) if isinstance(got, tuple) else got
            want = tuple(str(x) for x in want) if isinstance(want, tuple) else want
            assert (str(got) if isinstance(got, Path) else got) == want, (name, pname)


# -- provenance of plain CLI runs ---------------------------------------------
def test_redact_argv():
    argv = ["surgery", "x", "--token", "abc", "--hf-token=zz", "--max-new-tokens", "48", "--api-key", "k",
            f"path/{TOKEN}/x", "--author", "me"]
    assert redact_argv(argv) == ["surgery", "x", "--token", REDACTED, f"--hf-token={REDACTED}", "--max-new-tokens",
                                 "48", "--api-key", REDACTED, f"path/{REDACTED}/x", "--author", "me"]
    # recipe variables: a secret-looking NAME hides its value, in both spellings; other NAME=VALUE stay
    argv = ["surgery", "run", "r.yaml", "--var", "api_key=s3cret", "--var=hf_token=s3cret", "--var", "out=a=b",
            "--var=tokenizer=x"]
    assert redact_argv(argv) == ["surgery", "run", "r.yaml", "--var", f"api_key={REDACTED}", f"--var=hf_token={REDACTED}",
                                 "--var", "out=a=b", "--var=tokenizer=x"]


@pytest.fixture(scope="module")
def direction(tmp_path_factory):
    from surgery.directions import Candidate, Directions

    torch.manual_seed(0)
    d = Directions([Candidate("response", 1, "reply[0:4]", torch.randn(32, dtype=torch.float64))], 0, "test")
    return d.save(tmp_path_factory.mktemp("dir") / "dir.safetensors")


def test_plain_cli_run_records_redacted_invocation_and_reproduces(tmp_path, tiny_chat, direction, monkeypatch):
    rosi = cli.commands["rosi"]  # a throwaway secret option: there is none today
    monkeypatch.setattr(rosi, "params", rosi.params + [click.Option(["--hf-token"], default=None)])
    out = tmp_path / "out"
    args = ["-v", "rosi", str(tiny_chat), "-o", str(out), "--alpha", "2", "--no-eval", "--direction", str(direction),
            "--hf-token", TOKEN]
    r = _run(args)
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m["invocation"]["argv"] == ["surgery", *args[:-1], REDACTED]
    assert "recipe" not in m and TOKEN not in (out / "surgery.json").read_text()
    r = _run(["reproduce", out])
    assert r.exit_code == 0, r.output
    assert "IDENTICAL" in r.output and "reran `surgery -v rosi" in r.output


# -- reproduce -----------------------------------------------------------------
TWO_STEPS = """surgery: 1
vars:
  model: tiny
  work: work
steps:
  - directions:
      model: ${model}
      out: ${work}/dir.safetensors
  - rosi:
      model: ${model}
      out: ${work}/hardened
      direction: ${work}/dir.safetensors
      alpha: 3
      no-eval: true
  - verify:
      folder: ${work}/hardened
"""


@pytest.fixture(scope="module")
def hardened(tmp_path_factory, tiny_chat):
    """A ROSI output made by a recipe whose rosi step reads the direction an earlier step wrote."""
    root = tmp_path_factory.mktemp("two_steps")
    f = root / "two.yaml"
    f.write_text(TWO_STEPS)
    r = _run(["run", f, "--var", f"model={tiny_chat}", "--var", f"work={root / 'w'}"])
    assert r.exit_code == 0, r.output
    (root / "w" / "dir.safetensors").unlink()  # the rerun must make it again, in its own folder
    return root / "w" / "hardened"


def test_reproduce_reruns_the_step_and_its_inputs_bit_for_bit(hardened, tmp_path):
    m = read_manifest(hardened)
    assert m["recipe"]["step"] == 2 and m["recipe"]["name"] == "rosi"
    work = tmp_path / "work"
    r = _run(["reproduce", hardened, "--work", work, "--keep"])
    assert r.exit_code == 0, r.output
    assert "IDENTICAL: all 9 output files match bit for bit" in r.output
    assert "reran step 2 (rosi)" in r.output and "after step 1," in r.output and "not rerun: 3 (verify)" in r.output
    (run,) = list(work.iterdir())
    assert (run / "step1" / "dir.safetensors").is_file()  # step 1 rerun into the work folder
    assert not (hardened.parent / "dir.safetensors").exists()
    new = run / "step2" / "hardened"
    files = sorted(p.relative_to(hardened).as_posix() for p in hardened.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(new).as_posix() for p in new.rglob("*") if p.is_file())
    for rel in files:  # independent check: byte equality, the manifest's creation time aside
        if rel != "surgery.json":
            assert (hardened / rel).read_bytes() == (new / rel).read_bytes(), rel
    rerun = read_manifest(new)
    assert rerun["recipe"]["text"] == m["recipe"]["text"] and rerun["outputs"] == m["outputs"]


def test_reproduce_names_a_flipped_byte_and_the_tensor_difference(hardened, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(hardened, copy)
    shard = copy / SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the high byte of the last float32: its value doubles or halves
    shard.write_bytes(bytes(data))
    r = _run(["reproduce", copy, "--json"])
    assert r.exit_code == 1, r.output
    res = json.loads(r.stdout)
    assert res["identical"] is False
    bad = [f for f in res["files"] if f["status"] != "identical"]
    assert [f["path"] for f in bad] == [SHARD] and len(res["files"]) == 9
    assert "this folder's copy no longer matches surgery.json; the rerun does" in bad[0]["problems"]
    a, b = load_file(str(hardened / SHARD)), load_file(str(shard))
    ref = {n: float((a[n].double() - b[n].double()).abs().max()) for n in a if not torch.equal(a[n], b[n])}
    assert len(ref) == 1 and list(ref.values())[0] > 0
    assert bad[0]["tensors"] == ref
    assert bad[0]["max_abs_diff"] == max(ref.values())
    r = _run(["reproduce", copy])
    assert r.exit_code == 1 and f"{SHARD}: differs" in r.output and "largest |difference|" in r.output


def test_reproduce_without_provenance_is_an_error(tmp_path, hardened):
    copy = tmp_path / "copy"
    shutil.copytree(hardened, copy)
    m = json.loads((copy / "surgery.json").read_text())
    del m["recipe"], m["invocation"]
    (copy / "surgery.json").write_text(json.dumps(m))
    r = _run(["reproduce", copy])
    assert r.exit_code == 2 and "records neither a recipe nor a command line" in r.output


def test_reproduce_names_a_changed_direction_or_prompt_file(tmp_path, tiny_chat, direction):
    """After the run, the --direction file changes: reproduce says which input
    changed (it only compared the model's weight files); prompt sets likewise."""
    import shutil

    from surgery.directions import Directions

    dfile = tmp_path / "d.safetensors"
    shutil.copy(direction, dfile)
    shutil.copy(f"{direction}.json", f"{dfile}.json")
    out = tmp_path / "out"
    r = _run(["rosi", str(tiny_chat), "-o", str(out), "--alpha", "2", "--no-eval", "--direction", str(dfile)])
    assert r.exit_code == 0, r.output
    d = Directions.load(dfile)
    d.candidates[d.chosen].vector = -d.candidates[d.chosen].vector
    d.save(dfile)
    r = _run(["reproduce", out])
    assert "DIFFERENT" in r.output and "input changed: direction: sha256" in r.output, r.output
    # a prompt set whose hash differs between the manifest and the rerun's is named too
    from surgery.reproduce import _input_changes

    m = read_manifest(out)
    old = {**m, "datasets": {**m["datasets"], "harmless_train": {"source": "h.txt", "sha256": "0" * 64}}}
    assert "prompt set harmless_train (h.txt): sha256 000000000000 in the manifest, None now" in _input_changes(old, out)
    assert not any(c.startswith("prompt set") for c in _input_changes(m, out))


def _reproduce_without_the_direction_file(out: Path, dfile: Path, tmp_path: Path) -> None:
    """The direction file is gone and OUT was copied elsewhere (a download): reproduce uses the copy it ships."""
    dfile.unlink()
    Path(f"{dfile}.json").unlink()
    copy = tmp_path / "downloaded"
    shutil.copytree(out, copy)
    r = _run(["reproduce", copy])
    assert r.exit_code == 0 and "IDENTICAL" in r.output and "used the copy this folder ships" in r.output, r.output


def test_reproduce_of_a_copied_folder_uses_its_own_direction(tmp_path, tiny_chat, direction):
    """A downloaded or copied output whose --direction file is gone reruns with the
    direction.safetensors it ships (same sha256): it failed 'direction file not found'."""
    import shutil

    dfile = tmp_path / "d.safetensors"
    shutil.copy(direction, dfile)
    shutil.copy(f"{direction}.json", f"{dfile}.json")
    out = tmp_path / "out"
    assert _run(["rosi", str(tiny_chat), "-o", str(out), "--alpha", "2", "--no-eval", "--direction", str(dfile)]).exit_code == 0
    _reproduce_without_the_direction_file(out, dfile, tmp_path)


STACKED = """surgery: 1
vars:
  model: tiny
  work: work
  direction: dir.safetensors
steps:
  - rosi:
      model: ${model}
      out: ${work}/s1
      direction: ${direction}
      alpha: 2
      no-eval: true
  - rosi:
      model: ${work}/s1
      out: ${work}/s2
      alpha: 3
      no-eval: true
"""


def test_reproduce_of_a_step_reading_an_earlier_output_ignores_where_it_was_read(tmp_path, tiny_chat, direction):
    """Step 2 computes its direction on step 1's output, so its sidecar records that folder
    (model.folder), which the rerun reads from the work folder: reproduce said DIFFERENT."""
    f = tmp_path / "stack.yaml"
    f.write_text(STACKED)
    work = tmp_path / "w"
    r = _run(["run", f, *_vars({"model": tiny_chat, "work": work, "direction": direction})])
    assert r.exit_code == 0, r.output
    assert json.loads((work / "s2" / "direction.safetensors.json").read_text())["model"]["folder"] == str(work / "s1")
    r = _run(["reproduce", work / "s2", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    apart = {f["path"]: f["not_compared"] for f in res["files"] if f["not_compared"]}
    assert res["identical"] and apart == {"direction.safetensors.json": ["model.folder"]}
    r = _run(["reproduce", work / "s2"])
    assert r.exit_code == 0 and "1 apart from fields that record where an input was read" in r.output
    assert "direction.safetensors.json: identical apart from model.folder (not compared)" in r.output


def test_reproduce_compares_input_location_fields_apart(tmp_path):
    """Where an input was read (adapter_config.json's base_model_name_or_path, PEFT's card, the
    direction sidecar's model.folder, protect's unit map metadata) and tune.json's seconds are not
    compared; any other change is."""
    from surgery.checkpoint.files import save_tensors
    from surgery.manifest import hash_folder
    from surgery.reproduce import compare_outputs

    def make(root, base, seconds=1.5, rank=8):
        (root / "adapter").mkdir(parents=True)
        (root / "adapter" / "adapter_config.json").write_text(json.dumps(
            {"base_model_name_or_path": base, "peft_type": "LORA", "r": rank}, indent=2))
        (root / "adapter" / "README.md").write_text(
            f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- base_model:adapter:{base}\n- lora\n---\n\n# Card\n")
        (root / "tune.json").write_text(json.dumps({"format": "surgery.tune/1", "seconds": seconds, "model": {
            "source": base, "input": {"folder": base, "weight_files": {"model.safetensors": "ab"}}}}))
        (root / "direction.safetensors.json").write_text(json.dumps({"model": {"folder": base, "num_layers": 4}}))
        meta = {"format": "surgery.units/1", "meta": json.dumps({"model": {"folder": base, "source": base,
                                                                           "weight_files": {"a": "1"}}})}
        save_tensors({"x.class": torch.tensor([rank % 3], dtype=torch.uint8)}, root / "units.safetensors", meta)
        return root

    here = make(tmp_path / "here", "/old/place/model")
    m = {"outputs": hash_folder(here)}
    checks = compare_outputs(here, m, make(tmp_path / "rerun", "/tmp/rerun/step1/model", seconds=2.5))
    assert {c.path: (c.status, c.not_compared) for c in checks} == {
        "adapter/adapter_config.json": ("identical", ["base_model_name_or_path"]),
        "adapter/README.md": ("identical", ["base_model", "base_model:adapter"]),
        "tune.json": ("identical", ["model.source", "model.input.folder", "seconds"]),
        "direction.safetensors.json": ("identical", ["model.folder"]),
        "units.safetensors": ("identical", ["meta.model.folder", "meta.model.source"])}
    checks = compare_outputs(here, m, make(tmp_path / "other", "/elsewhere", rank=4))
    status = {c.path: c.status for c in checks}
    assert status["adapter/adapter_config.json"] == status["units.safetensors"] == "differs"
    # only DIR's own copy, as the manifest has it, is compared apart from those fields
    (here / "tune.json").write_text((here / "tune.json").read_text().replace("1.5", "3.5"))
    checks = compare_outputs(here, m, tmp_path / "rerun")
    assert {c.path: c.status for c in checks}["tune.json"] == "differs"


TUNE_ARGS = ["--alphas", "1", "--layer-ranges", "0-3", "--strengths", "3", "--confirm", "1", "--eval-tokens", "2",
             "--pick", "0"]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reproduce_of_tune_write_redirects_every_output_and_compares_the_written_folder(tmp_path, tiny_chat, direction):
    """`tune -o T --write W`: the rerun moved only -o, so it wrote over W (or failed 'output folder
    exists') and compared W with the rerun's search folder.  Now both go to the work folder, W and T
    are left untouched, and W is compared with the rerun's W (tune.json apart from its seconds)."""
    t, w = tmp_path / "T", tmp_path / "W"
    r = _run(["tune", tiny_chat, "-o", t, "--write", w, "--direction", direction, *TUNE_ARGS])
    assert r.exit_code == 0, r.output
    before = _snapshot(w), _snapshot(t)
    work = tmp_path / "work"
    r = _run(["reproduce", w, "--work", work, "--keep", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["identical"] and {f["path"] for f in res["files"]} == set(read_manifest(w)["outputs"]) - {"README.md"}
    apart = [(f["path"], f["not_compared"]) for f in res["files"] if f["not_compared"]]
    assert apart in ([], [("tune.json", ["seconds"])])
    assert (_snapshot(w), _snapshot(t)) == before
    (run,) = list(work.iterdir())
    assert sorted(p.name for p in run.iterdir()) == ["T", "W"] and (run / "T" / "tune.json").is_file()


def test_reproduce_of_a_recipe_tune_step_compares_its_write_folder(tmp_path, tiny_chat, direction, monkeypatch):
    f = tmp_path / "tune.yaml"
    f.write_text("""surgery: 1
vars: {model: tiny, direction: d.safetensors}
steps:
  - tune: {model: "${model}", out: T, write: W, direction: "${direction}", alphas: "1", layer-ranges: 0-3,
           strengths: "3", confirm: 1, eval-tokens: 2, pick: 0}
""")
    monkeypatch.chdir(tmp_path)  # T and W relative to the recorded working folder
    r = _run(["run", f, *_vars({"model": tiny_chat, "direction": direction})])
    assert r.exit_code == 0, r.output
    before = _snapshot(tmp_path / "W")
    r = _run(["reproduce", "W"])
    assert r.exit_code == 0 and "IDENTICAL" in r.output, r.output
    assert _snapshot(tmp_path / "W") == before


def test_reproduce_moves_every_output_of_a_recipe_step(tmp_path):
    """--plot is an output (units, diff) and so is units' default -o: both go to the work folder, and
    a later step reading the default map follows it there."""
    from surgery.reproduce import _redirect

    recipe = parse_recipe("""surgery: 1
steps:
  - units: {model: m, plot: p.png}
  - protect: {aligned: m, finetuned: f, units: units.safetensors, out: o}
  - diff: {a: m, b: o, plot: d.png, json: d.json}
""")
    values, reads, outs = _redirect(recipe, tmp_path, tmp_path / "run")
    assert values[1] == {"model": "m", "out": str(tmp_path / "run/step1/units.safetensors"),
                         "plot_out": str(tmp_path / "run/step1/p.png")}
    assert values[2]["units_file"] == values[1]["out"] and reads[2] == {1}
    assert values[3]["plot_out"] == str(tmp_path / "run/step3/d.png")
    assert values[3]["json_out"] == str(tmp_path / "run/step3/d.json") and values[3]["b"] == values[2]["out"]
    assert all(new.startswith(str(tmp_path / "run")) for moved in outs.values() for new in moved.values())


def test_reproduce_names_a_file_added_to_the_folder(hardened, tmp_path):
    """A file in DIR that the manifest does not list and the rerun did not make: reproduce said
    IDENTICAL while verify failed."""
    copy = tmp_path / "copy"
    shutil.copytree(hardened, copy)
    (copy / "added_tokens.json").write_text("{}")
    assert verify(copy) == ["not in manifest: added_tokens.json"]
    r = _run(["reproduce", copy, "--json"])
    assert r.exit_code == 1, r.output
    bad = [f for f in json.loads(r.stdout)["files"] if f["status"] != "identical"]
    assert [(f["path"], f["status"]) for f in bad] == [("added_tokens.json", "extra-here")]
    r = _run(["reproduce", copy])
    assert r.exit_code == 1
    assert "added_tokens.json: extra-here (not in surgery.json; the rerun did not make it)" in r.output


def test_reproduce_refuses_a_work_folder_inside_the_folder_or_an_input(hardened, tiny_chat, tmp_path):
    """`reproduce r1 --work r1/w --keep` wrote the rerun inside r1, whose verify then failed."""
    copy = tmp_path / "copy"
    shutil.copytree(hardened, copy)
    for work, culprit in ((copy / "w", copy), (copy, copy), (tiny_chat / "sub", tiny_chat)):
        r = _run(["reproduce", copy, "--work", work, "--keep"])
        assert r.exit_code == 2, r.output
        assert r.output.startswith(f"error: --work {work}: output folder {work}/surgery-reproduce-")
        assert f"is inside the input {culprit}" in r.output and len(r.output.strip().splitlines()) == 1
        assert not (copy / "w").exists() and not (tiny_chat / "sub").exists() and verify(copy) == []


def test_reproduce_refuses_a_work_folder_inside_an_input_the_command_line_named(tmp_path, tiny_chat, inputs):
    out = tmp_path / "merged"
    r = _run(["merge-lora", tiny_chat, "--adapter", inputs["adapter"], "-o", out])
    assert r.exit_code == 0, r.output
    work = Path(inputs["adapter"]) / "w"
    r = _run(["reproduce", out, "--work", work])
    assert r.exit_code == 2 and f"is inside the input {inputs['adapter']}" in r.output, r.output
    assert not work.exists()
    r = _run(["reproduce", out, "--work", tmp_path / "w"])
    assert r.exit_code == 0 and "IDENTICAL" in r.output, r.output


def test_reproduce_of_a_copied_recipe_output_uses_its_own_direction(tmp_path, tiny_chat, direction):
    """As for command lines: a recipe step whose direction file is gone reruns with the
    direction.safetensors the folder ships (same sha256); it failed 'direction file not found'."""
    dfile = tmp_path / "d.safetensors"
    shutil.copy(direction, dfile)
    shutil.copy(f"{direction}.json", f"{dfile}.json")
    f = tmp_path / "r.yaml"
    f.write_text("""surgery: 1
vars: {model: tiny, direction: d.safetensors, out: out}
steps:
  - rosi: {model: "${model}", out: "${out}", direction: "${direction}", alpha: 2, no-eval: true}
""")
    out = tmp_path / "out"
    r = _run(["run", f, *_vars({"model": tiny_chat, "direction": dfile, "out": out})])
    assert r.exit_code == 0, r.output
    _reproduce_without_the_direction_file(out, dfile, tmp_path)
