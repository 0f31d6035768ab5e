"""ROSI: the per-tensor formula against float64, the streamed output against the
input (edited tensors = formula, the rest byte-identical), tied embeddings,
every covered architecture, manifest + verify, and bad input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from surgery.architectures import WriterTensor, get_architecture
from surgery.checkpoint import CheckpointReader, sha256_file
from surgery.cli import main as cli
from surgery.directions import Candidate, Directions
from surgery.edits.rosi import rosi_update
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from surgery.pipeline import PromptConfig, rosi, write_rosi
from tiny_models import TINY_MODEL_TYPES, make_tiny_checkpoint


def rosi64(m_out_in: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Independent float64 recomputation on a (d, d_in) matrix."""
    m = m_out_in.double()
    r = r.double() / r.double().norm()
    return m + alpha * torch.outer(r, m.mean(dim=0))


@pytest.mark.parametrize("layout,shape", [("out_in", (8, 5)), ("in_out", (5, 8)), ("rows", (11, 8)),
                                          ("experts_out_in", (3, 8, 5)), ("experts_in_out", (3, 5, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rosi_update_matches_float64(layout, shape, dtype):
    torch.manual_seed(0)
    w = WriterTensor("x", "mlp_out", layout, 0, None)
    t = torch.randn(shape).to(dtype)
    r = torch.randn(8)
    new = rosi_update(w, t, r / r.norm(), 3.0)
    assert new.dtype == dtype and new.shape == t.shape
    m = w.as_out_in(t.double())
    if m.dim() == 2:
        ref = rosi64(m, r, 3.0)
    else:
        ref = torch.stack([rosi64(m[e], r, 3.0) for e in range(m.shape[0])])
    got = w.as_out_in(new.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref.to(dtype).double(), rtol=tol, atol=tol)
    # rank one per matrix
    delta = (got - m).reshape(-1, *got.shape[-2:]) if got.dim() == 3 else (got - m)[None]
    for dm in delta:
        s = torch.linalg.svdvals(dm.double())
        assert s[1] <= 1e-2 * s[0] + (5e-2 if dtype == torch.bfloat16 else 1e-5)


def _direction_file(folder: Path, d: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    dirs = Directions([Candidate("response", 1, "reply[0:4]", torch.randn(d, dtype=torch.float64))], 0, "test")
    return dirs.save(folder / "dir.safetensors")


def _check_output(src: Path, out: Path, r: torch.Tensor, alpha: float, tied_untie: bool = False):
    with CheckpointReader(src) as a, CheckpointReader(out) as b:
        arch = get_architecture(a.config)
        targets = {w.name: w for w in arch.residual_writers(a.names, a.config) if w.layout != "bias"}
        edited = 0
        for name in a.names:
            x, y = a.get(name), b.get(name)
            if name in targets:
                w = targets[name]
                mx = w.as_out_in(x.double())
                ref = rosi64(mx, r, alpha) if mx.dim() == 2 else torch.stack([rosi64(mx[e], r, alpha) for e in range(mx.shape[0])])
                torch.testing.assert_close(w.as_out_in(y.double()), ref.to(x.dtype).double(), rtol=1e-5, atol=1e-5)
                edited += 1
            else:
                assert x.dtype == y.dtype
                assert x.contiguous().view(torch.uint8).numpy().tobytes() == y.contiguous().view(torch.uint8).numpy().tobytes(), name
        assert edited == len(targets) > 0
        return a.names, b.names


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_rosi_stream_every_architecture(tmp_path, model_type):
    src = make_tiny_checkpoint(model_type, tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with CheckpointReader(src) as reader:
        arch = get_architecture(reader.config)
        d = arch.hidden_size(reader.config)
        r = torch.randn(d)
        edited = write_rosi(reader, arch, tmp_path / "out", r / r.norm(), 2.5, None, False, False)
    assert edited
    _check_output(src, tmp_path / "out", r, 2.5)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # input untouched


def test_rosi_pipeline_outputs_loadable_verified_checkpoint(tmp_path, tiny_chat):
    from transformers import AutoModelForCausalLM

    dfile = _direction_file(tmp_path, 32)
    out = tmp_path / "out"
    res = rosi(str(tiny_chat), out, alpha=4.0, direction_file=dfile, run_eval=False,
               prompts=PromptConfig(n_train=8, n_val=4))
    assert res.alpha == 4.0
    r = Directions.load(dfile).best.vector.float()
    _check_output(tiny_chat, out, r, 4.0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    m = read_manifest(out)
    assert m["method"]["name"] == "rosi" and m["method"]["parameters"]["alpha"] == 4.0
    assert m["direction"]["layer"] == 1 and m["input"]["weight_files"]
    assert set(m["outputs"]) >= {"model.safetensors.index.json", "config.json", "direction.safetensors"}
    assert m["edited"]["count"] == 8  # 4 layers x (o_proj, down_proj)
    assert verify(out) == []
    # one byte changed in any output file -> verify names it
    for rel in ("model-00001-of-00001.safetensors", "tokenizer.json", "direction.safetensors"):
        p = out / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        probs = verify(out)
        assert len(probs) == 1 and rel in probs[0]
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    assert verify(out) == []
    runner = CliRunner()
    r1 = runner.invoke(cli, ["verify", str(out)])
    assert r1.exit_code == 0 and f"its sha256 {sha256_file(out / 'surgery.json')}" in r1.output
    # the manifest edited by hand (an evaluation figure, a parameter): verify names it; a re-indent does not count
    text = (out / "surgery.json").read_text()
    (out / "surgery.json").write_text(text.replace('"alpha": 4.0', '"alpha": 5.0'))
    probs = verify(out)
    assert len(probs) == 1 and probs[0].startswith("changed: surgery.json"), probs
    import json

    (out / "surgery.json").write_text(json.dumps(json.loads(text), indent=4))
    assert verify(out) == []
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    r2 = runner.invoke(cli, ["verify", str(out)])
    assert r2.exit_code == 1 and "config.json" in r2.output


def test_tied_embedding_is_untied_explicitly(tmp_path, tiny_chat):
    from transformers import AutoModelForCausalLM

    dfile = _direction_file(tmp_path, 32)
    out = tmp_path / "out"
    rosi(str(tiny_chat), out, alpha=2.0, direction_file=dfile, include_embedding=True, run_eval=False,
         prompts=PromptConfig(n_train=8, n_val=4))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        assert "lm_head.weight" not in a.names
        original = a.get("model.embed_tokens.weight")
        assert torch.equal(b.get("lm_head.weight"), original)
        assert not torch.equal(b.get("model.embed_tokens.weight"), original)
    model = AutoModelForCausalLM.from_pretrained(out)
    # loaded untied: the unembedding keeps the original weights, the embedding is edited
    assert torch.equal(model.lm_head.weight, original)
    assert not torch.equal(model.model.embed_tokens.weight, original)
    assert read_manifest(out)["edited"]["untied_lm_head"] is True
    # the sweep's in-memory edit is the model written (it left the embedding alone), and the tie survives it
    from surgery.edits.rosi import unit
    from surgery.model import load_model
    from surgery.pipeline import Rosi

    lm = load_model(tiny_chat)
    ids = torch.arange(3, 13).reshape(1, -1)
    with torch.no_grad(), Rosi(include_embedding=True).in_memory(lm, unit(Directions.load(dfile).best.vector), 2.0):
        swept = lm.model(input_ids=ids).logits
    with torch.no_grad():
        written = model.eval()(input_ids=ids).logits
    assert torch.allclose(swept, written, atol=1e-5, rtol=0)
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert torch.equal(lm.model.get_input_embeddings().weight, original)
    # a tied checkpoint that also stores lm_head.weight keeps it (it failed: 'extra tensor already exists')
    from safetensors.torch import load_file, save_file

    both = tmp_path / "both"
    shutil.copytree(tiny_chat, both)
    shard = next(both.glob("*.safetensors"))
    sd = load_file(str(shard))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(shard), metadata={"format": "pt"})
    rosi(str(both), tmp_path / "out2", alpha=2.0, direction_file=dfile, include_embedding=True, run_eval=False,
         prompts=PromptConfig(n_train=8, n_val=4))
    with CheckpointReader(tmp_path / "out2") as b:
        assert torch.equal(b.get("lm_head.weight"), original)
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["tie_word_embeddings"] is False


def test_include_embedding_covers_position_embeddings_whatever_the_layers(tmp_path):
    """gpt2's wpe was edited without --layers and left alone with --layers 0-1 (all layers)."""
    src = make_tiny_checkpoint("gpt2", tmp_path / "src")
    dfile = _direction_file(tmp_path, 32)
    edited = {}
    for tag, layers in (("all", None), ("0-1", [0, 1])):
        rosi(str(src), tmp_path / tag, alpha=2.0, direction_file=dfile, include_embedding=True, layers=layers,
             run_eval=False, prompts=PromptConfig(n_train=8, n_val=4))
        edited[tag] = set(read_manifest(tmp_path / tag)["edited"]["tensors"])
    assert edited["all"] == edited["0-1"] and {"transformer.wte.weight", "transformer.wpe.weight"} <= edited["all"]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_clean_failure(tmp_path, src, fn, match):
    before = _snapshot(src)
    listing = set(os.listdir(tmp_path))
    with pytest.raises(SurgeryError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)
    assert _snapshot(src) == before
    assert set(os.listdir(tmp_path)) == listing  # no output, no temp folder left behind


def test_bad_inputs_fail_cleanly(tmp_path, tiny_chat):
    import shutil

    pc = PromptConfig(n_train=8, n_val=4)
    src = tmp_path / "src"
    shutil.copytree(tiny_chat, src)
    dfile = _direction_file(tmp_path, 32)
    out = tmp_path / "out"
    # direction of the wrong width
    bad_dir = _direction_file(tmp_path / "w", 48)
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=1.0, direction_file=bad_dir, run_eval=False, prompts=pc),
                          "width 48")
    # empty prompt file
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=1.0, direction_file=dfile, run_eval=False,
                                                      prompts=PromptConfig(harmful=str(empty))), "empty")
    # layers the model does not have (tiny_chat has 2): refused, not silently edited fewer
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, layers=[0, 1, 5], alpha=1.0, direction_file=dfile,
                                                      run_eval=False, prompts=pc), r"--layers \[5\] out of range")
    # a strength that is not a finite number > 0 (NaN weights were written; 0 wrote an unchanged model), a zero
    # direction; a swept strength may be 0 (the unedited row) but not negative
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=bad, direction_file=dfile, run_eval=False,
                                                          prompts=pc), "finite number > 0")
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alphas=[1.0, -2.0], direction_file=dfile,
                                                      run_eval=False, prompts=pc), "finite number >= 0")
    zero = Directions([Candidate("response", 1, "reply[0:4]", torch.zeros(32, dtype=torch.float64))], 0, "test")
    zfile = zero.save(tmp_path / "z" / "zero.safetensors")
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=1.0, direction_file=zfile, run_eval=False,
                                                      prompts=pc), "norm 0.0")
    # what only the evaluation after the write used to read: a missing borderline file, no chat template
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=1.0, direction_file=dfile, prompts=PromptConfig(
        n_train=8, n_val=4, borderline=str(tmp_path / "nosuch.jsonl"))), "nosuch.jsonl")
    plain = tmp_path / "plain"
    shutil.copytree(src, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((plain / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tc))
    _assert_clean_failure(tmp_path, plain, lambda: rosi(str(plain), out, alpha=1.0, direction_file=dfile, prompts=pc),
                          "no chat template")
    # a sweep that keeps the unedited row (the random model never refuses): nothing written
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alphas=[1.0, 2.0], direction_file=dfile,
                                                      run_eval=False, prompts=pc), "kept alpha 0")
    # output folder exists
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), out, alpha=1.0, direction_file=dfile, run_eval=False, prompts=pc),
                          "output folder exists")
    assert (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
    # unknown architecture
    weird = tmp_path / "weird"
    shutil.copytree(src, weird)
    cfg = json.loads((weird / "config.json").read_text())
    cfg["model_type"] = "frobnicator"
    (weird / "config.json").write_text(json.dumps(cfg))
    _assert_clean_failure(tmp_path, weird, lambda: rosi(str(weird), out, alpha=1.0, direction_file=dfile, run_eval=False, prompts=pc),
                          r"frobnicator.*cannot place its \d+ tensor pattern\(s\): .*model\.layers\.\{layer\}\.self_attn\.o_proj\.weight")
    # truncated safetensors header
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    shard = next(trunc.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:20])
    _assert_clean_failure(tmp_path, trunc, lambda: rosi(str(trunc), out, alpha=1.0, direction_file=dfile, run_eval=False, prompts=pc),
                          shard.name)


def test_missing_shard_fails_naming_it(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    # split into an index pointing at a shard that is not there
    shard = next(src.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    shard.unlink()
    dfile = _direction_file(tmp_path, 32)
    _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), tmp_path / "out", alpha=1.0, direction_file=dfile,
                                                      run_eval=False, prompts=PromptConfig(n_train=8, n_val=4)),
                          "model-00001-of-00002.safetensors")


def test_cli_error_is_one_line_exit_2(tmp_path, tiny_chat):
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(cli, ["rosi", str(tiny_chat), "-o", str(out), "--alpha", "1"])
    assert r.exit_code == 2
    assert r.output.strip().count("\n") == 0 and "output folder exists" in r.output


def test_layer_list_parsing():
    from surgery.architectures import parse_layers

    assert parse_layers("0-2,5") == [0, 1, 2, 5] and parse_layers("") is None and parse_layers(None) is None
    r = CliRunner().invoke(cli, ["rosi", "smollm2", "-o", "x", "--layers", "0-x"])
    assert r.exit_code == 2 and "cannot read layer list '0-x'" in r.output


def test_rosi_peak_memory_flat_in_layers():
    """Hardening 4x more layers must not grow peak RSS by more than a quarter of the extra checkpoint bytes."""
    sys_path = str(Path(__file__).resolve().parents[1] / "benchmarks")
    import sys

    sys.path.insert(0, sys_path)
    try:
        from rosi_memory import run_benchmark
    finally:
        sys.path.remove(sys_path)
    small, big = run_benchmark((4, 16), dim=384)
    grow = big["peak_bytes"] - small["peak_bytes"]
    extra = big["checkpoint_bytes"] - small["checkpoint_bytes"]
    assert extra > 40 * 2**20
    assert grow < 0.25 * extra, (grow, extra)


def test_untying_a_multimodal_config_unties_its_text_config(tmp_path):
    """gemma3 (multimodal) carries tie_word_embeddings in text_config too: both say false."""
    src = make_tiny_checkpoint("gemma3", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    if not (cfg.get("tie_word_embeddings", True) and "text_config" in cfg):
        pytest.skip("this transformers' tiny gemma3 is not a tied multimodal config")
    (src / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "tie_word_embeddings": True}}))
    rosi(str(src), tmp_path / "out", alpha=2.0, direction_file=_direction_file(tmp_path, 32), include_embedding=True,
         run_eval=False, prompts=PromptConfig(n_train=8, n_val=4))
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["tie_word_embeddings"] is False and out["text_config"]["tie_word_embeddings"] is False


def test_paths_written_with_a_tilde_mean_the_home_folder(tmp_path, tiny_chat, monkeypatch):
    """Recipes have no shell and `--json=~/x` is not expanded by bash: every verb reads `~` as the home
    folder (verify, card, --direction and single-file outputs used to take it literally)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    _direction_file(home, 32)
    r = CliRunner().invoke(cli, ["rosi", str(tiny_chat), "-o", "~/out", "--alpha", "1", "--direction", "~/dir.safetensors",
                                 "--no-eval"])
    assert r.exit_code == 0, r.output
    assert (home / "out" / "surgery.json").is_file() and not (tmp_path / "~").exists()
    for args in (["verify", "~/out"], ["card", "~/out", "--base-model", "someone/base"], ["verify", "~/out"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
    assert (home / "out" / "README.md").is_file()
    from surgery.checkpoint.files import write_text_atomic

    write_text_atomic("~/report.json", "{}")
    assert (home / "report.json").read_text() == "{}" and not (tmp_path / "~").exists()


def test_a_run_stopped_during_the_evaluation_commits_nothing(tmp_path, tiny_chat, monkeypatch):
    """The before/after evaluation runs on the written checkpoint before it is committed: a run
    stopped there leaves no output (it used to leave one that verified, without its evaluation) and
    an earlier output it was replacing with --overwrite stays; a finished run records and prints it."""
    import surgery.pipeline as P

    dfile = _direction_file(tmp_path, 32)
    pc = PromptConfig(n_train=8, n_val=4, borderline=None)
    out = tmp_path / "out"
    seen = []

    def stop(base, patched, *a, **k):
        seen.append(patched)
        raise KeyboardInterrupt

    real = P.evaluate_models
    monkeypatch.setattr(P, "evaluate_models", stop)
    with pytest.raises(KeyboardInterrupt):
        rosi(str(tiny_chat), out, alpha=1.0, direction_file=dfile, prompts=pc, eval_tokens=2)
    assert seen and not out.exists() and not list(tmp_path.glob(".out*"))
    monkeypatch.setattr(P, "evaluate_models", real)
    said = []
    res = rosi(str(tiny_chat), out, alpha=1.0, direction_file=dfile, prompts=pc, eval_tokens=2, say=said.append)
    m = read_manifest(out)
    assert m["evaluation"]["table"] == res.evaluation["table"] and verify(out) == []
    assert said[-1].startswith("\n") and res.evaluation["table"] in said[-1]  # the table comes last
    before = (out / "surgery.json").read_bytes()
    monkeypatch.setattr(P, "evaluate_models", stop)
    with pytest.raises(KeyboardInterrupt):
        rosi(str(tiny_chat), out, alpha=2.0, direction_file=dfile, prompts=pc, eval_tokens=2, overwrite=True)
    assert (out / "surgery.json").read_bytes() == before and verify(out) == []


def test_untied_model_without_lm_head_is_refused_before_any_work(tmp_path, tiny_chat_untied, monkeypatch):
    """An untied model (tie_word_embeddings false) without lm_head.weight was edited:
    transformers gave the output a random lm_head.  Directly, or through a shard index
    that leaves out the lm_head its shard holds (the output lacked it, verify said OK)."""
    from safetensors.torch import load_file, save_file

    import surgery.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    pc = PromptConfig(n_train=8, n_val=4)
    dfile = _direction_file(tmp_path, 32)
    nohead = tmp_path / "nohead"
    shutil.copytree(tiny_chat_untied, nohead)
    sd = load_file(nohead / "model.safetensors")
    sd.pop("lm_head.weight")
    save_file(sd, str(nohead / "model.safetensors"), metadata={"format": "pt"})
    indexed = tmp_path / "indexed"
    shutil.copytree(tiny_chat_untied, indexed)
    (indexed / "model.safetensors").rename(indexed / "model-00001-of-00001.safetensors")
    (indexed / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in sd}}))
    for src in (nohead, indexed):
        _assert_clean_failure(tmp_path, src, lambda: rosi(str(src), tmp_path / "out", alpha=1.0, direction_file=dfile,
                                                          run_eval=False, prompts=pc),
                              r"lacks 1 required tensor\(s\): lm_head\.weight \(tie_word_embeddings is false\)")


def test_impossible_targets_fail_before_the_model_loads(tmp_path, tiny_chat, monkeypatch):
    """-o under a file and a shard budget under one byte failed only at the write,
    after the directions and the sweep."""
    import surgery.pipeline as pipeline_mod

    monkeypatch.setattr(pipeline_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    pc = PromptConfig(n_train=8, n_val=4)
    dfile = _direction_file(tmp_path, 32)
    (tmp_path / "afile").write_text("x")
    _assert_clean_failure(tmp_path, tiny_chat, lambda: rosi(str(tiny_chat), tmp_path / "afile" / "out", alpha=1.0,
                                                            direction_file=dfile, run_eval=False, prompts=pc),
                          "cannot write in .*afile")
    _assert_clean_failure(tmp_path, tiny_chat, lambda: rosi(str(tiny_chat), tmp_path / "out", alpha=1.0,
                                                            direction_file=dfile, run_eval=False, prompts=pc,
                                                            max_shard_bytes=0), "at least one byte")
    r = CliRunner().invoke(cli, ["rosi", str(tiny_chat), "-o", str(tmp_path / "out"), "--alpha", "1",
                                 "--max-shard-size", "1e-12"])
    assert r.exit_code == 2 and "--max-shard-size" in r.output
    assert sorted(os.listdir(tmp_path)) == ["afile", "dir.safetensors", "dir.safetensors.json"]


@pytest.mark.parametrize("artifact", ["a copied file", "bytes"])
def test_a_full_disk_while_writing_artifacts_is_one_line(tmp_path, monkeypatch, artifact):
    """write_edited copies artifacts (direction.safetensors, ...) into the checkpoint:
    a full disk there was a raw OSError traceback."""
    import errno
    import pathlib

    import surgery.pipeline as pipeline_mod
    from surgery.errors import CheckpointError
    from surgery.pipeline import write_edited

    src = make_tiny_checkpoint("llama", tmp_path / "src")
    dfile = _direction_file(tmp_path, 32)

    name = "extra.bin" if artifact == "bytes" else "direction.safetensors"
    files = {"notes/extra.bin": b"x"} if artifact == "bytes" else {"direction.safetensors": dfile}

    def failing(real, dst_of):
        def write(*a, **k):
            if Path(dst_of(*a)).name == name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **k)
        return write

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing(pathlib.Path.write_bytes, lambda self, data: self))
    monkeypatch.setattr(pipeline_mod.shutil, "copyfile", failing(shutil.copyfile, lambda src, dst: dst))
    listing = set(os.listdir(tmp_path))
    with CheckpointReader(src) as reader, pytest.raises(CheckpointError, match=f"{name}: .*No space left") as ei:
        write_edited(reader, tmp_path / "out", lambda n, t: None, files=files)
    assert "\n" not in str(ei.value)
    assert set(os.listdir(tmp_path)) == listing
