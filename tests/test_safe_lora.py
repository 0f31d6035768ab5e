"""Safe-LoRA: projected updates against float64 references built with explicit
projection matrices (fast and exact), cosine selection on a constructed example
(one update inside span(V), one orthogonal to it), top-k, the fine-tuned-model
path, refusal directions as the subspace, the emitted adapter in PEFT, and bad
inputs refused before anything is written."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from surgery.adapters import load_adapter, merge_adapter, save_peft_adapter
from surgery.checkpoint import CheckpointReader
from surgery.cli import main as cli
from surgery.directions import Candidate, Directions
from surgery.edits import safe_lora as sl
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from surgery.pipeline import safe_lora
from tiny_models import make_tiny_checkpoint, make_tiny_model

D = 32
IN_SPAN = "model.layers.0.self_attn.o_proj"  # update inside span(V): cosine 1, kept
ORTHO = "model.layers.0.mlp.down_proj"  # update orthogonal to V: cosine 0, projected (to zero)
SPECTRUM = "model.layers.1.self_attn.o_proj"  # V with a known spectrum, random update
QPROJ = "model.layers.1.self_attn.q_proj"  # not a residual writer (directions path: n/a)
MODULES = (IN_SPAN, ORTHO, SPECTRUM, QPROJ)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base, aligned = base + V per module, an adapter with known geometry, a refusal direction."""
    root = tmp_path_factory.mktemp("safe_lora")
    g = torch.Generator().manual_seed(7)
    base = make_tiny_checkpoint("llama", root / "base")
    model = make_tiny_model("llama")
    params = dict(model.named_parameters())
    u = _unit(torch.randn(D, generator=g, dtype=torch.float64))
    u2 = _unit(torch.randn(D, generator=g, dtype=torch.float64))
    u2 = _unit(u2 - (u2 @ u) * u)  # orthogonal to u
    Vs = {IN_SPAN: 0.3 * torch.outer(u, _unit(torch.randn(D, generator=g, dtype=torch.float64))),
          ORTHO: 0.2 * torch.outer(u2, _unit(torch.randn(64, generator=g, dtype=torch.float64)))}
    q1, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    sigma = torch.tensor([1.0, 0.6, 0.05] + [0.005] * (D - 3), dtype=torch.float64)  # energy 0.99 -> rank 2, clear margin
    Vs[SPECTRUM] = q1 @ torch.diag(sigma) @ q2.T
    Vs[QPROJ] = 0.1 * torch.randn(D, D, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for m, v in Vs.items():
            params[m + ".weight"].add_(v.float())
    model.save_pretrained(root / "aligned")
    # adapter: B of IN_SPAN in span(u), B of ORTHO orthogonal to u2, others random
    r = 3
    A = {m: torch.randn(r, params[m + ".weight"].shape[1], generator=g) for m in MODULES}
    B = {m: torch.randn(params[m + ".weight"].shape[0], r, generator=g) for m in MODULES}
    B[IN_SPAN] = torch.outer(u.float(), torch.randn(r, generator=g))
    B[ORTHO] = B[ORTHO] - torch.outer(u2.float(), u2.float() @ B[ORTHO])
    ad = save_peft_adapter(root / "adapter", {m: (A[m], B[m]) for m in MODULES}, r=r, alpha=6,
                           target_modules=["o_proj", "down_proj", "q_proj"])
    direction = Directions([Candidate("response", 1, "reply[0:4]", (3.0 * u).clone())], 0, "test").save(root / "dir.safetensors")
    return {"root": root, "base": base, "aligned": root / "aligned", "adapter": ad, "V": Vs, "u": u, "u2": u2,
            "direction": direction}


def ref_projector(V: torch.Tensor, kind: str, energy: float = 0.99) -> torch.Tensor:
    """Explicit (d_out x d_out) float64 projection matrix."""
    V = V.double()
    if kind == "fast":
        return V @ V.T / torch.linalg.norm(V)
    U, S, _ = np.linalg.svd(V.numpy(), full_matrices=False)
    e = np.cumsum(S ** 2) / np.sum(S ** 2)
    k = next(i + 1 for i in range(len(e)) if e[i] >= energy)
    Uk = torch.from_numpy(U[:, :k])
    return Uk @ Uk.T


def ref_cos(C: torch.Tensor, dW: torch.Tensor) -> float:
    cdw = C @ dW
    if cdw.norm() == 0:
        return 0.0
    return float((cdw * dW).sum() / (cdw.norm() * dW.norm()))


def expected(world, kind: str, threshold: float = 0.5, projector_for=None):
    """{module: (cosine, projected?, expected merged (out, in) float64)} from float64 arithmetic."""
    ad = load_adapter(world["adapter"])
    res = {}
    with CheckpointReader(world["aligned"]) as al:
        for m, lm in ad.modules.items():
            C = projector_for(m) if projector_for else ref_projector(world["V"][m], kind)
            dW = lm.scaling * lm.B.double() @ lm.A.double()
            if C is None:
                res[m] = (None, False, al.get(m + ".weight").double() + dW)
                continue
            cos = ref_cos(C, dW)
            proj = cos <= threshold
            res[m] = (cos, proj, al.get(m + ".weight").double() + (C @ dW if proj else dW))
    return res


def check_output(world, out: Path, exp: dict, rows) -> None:
    by = {r.module: r for r in rows}
    for m, (cos, proj, w) in exp.items():
        if cos is None:
            assert by[m].cosine is None
        else:
            assert by[m].cosine == pytest.approx(cos, abs=1e-5), m
        assert by[m].projected == proj, m
    with CheckpointReader(world["aligned"]) as a, CheckpointReader(out) as b:
        for name in a.names:
            mod = name[: -len(".weight")]
            if mod in exp:
                torch.testing.assert_close(b.get(name).double(), exp[mod][2], rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert a.get(name).numpy().tobytes() == b.get(name).numpy().tobytes(), name


@pytest.mark.parametrize("kind", ["fast", "exact"])
def test_adapter_projection_matches_float64(world, tmp_path, kind):
    out = tmp_path / "out"
    res = safe_lora(str(world["aligned"]), out, base=str(world["base"]), adapter=str(world["adapter"]), projector=kind)
    exp = expected(world, kind)
    check_output(world, out, exp, res.rows)
    by = {r.module: r for r in res.rows}
    # the constructed example: inside span(V) kept, orthogonal projected to nothing
    assert by[IN_SPAN].cosine == pytest.approx(1.0, abs=1e-5) and not by[IN_SPAN].projected
    assert by[ORTHO].cosine == pytest.approx(0.0, abs=1e-4) and by[ORTHO].projected  # B orthogonalised in float32
    assert by[ORTHO].norm_after < 1e-4 * by[ORTHO].norm_before and by[ORTHO].norm_before > 0.1
    if kind == "exact":
        assert by[SPECTRUM].rank == 2 and by[IN_SPAN].rank == 1
    for r in res.rows:
        mod = load_adapter(world["adapter"]).modules[r.module]
        assert r.norm_before == pytest.approx(float((mod.scaling * mod.B.double() @ mod.A.double()).norm()), rel=1e-5)
    m = read_manifest(out)
    assert m["method"]["name"] == "safe-lora" and m["method"]["parameters"]["projector"] == kind
    assert m["safe_lora"]["subspace"] == "base" and "base" in m and "adapter" in m
    assert sorted(m["method"]["parameters"]["projected"]) == sorted(res.projected)
    saved = json.loads((out / "safe_lora.json").read_text())
    assert [r["module"] for r in saved["rows"]] == [r.module for r in res.rows]
    assert verify(out) == []


def test_top_k_projects_the_least_aligned(world, tmp_path):
    res = safe_lora(str(world["aligned"]), tmp_path / "out", base=str(world["base"]), adapter=str(world["adapter"]),
                    top_k=1)
    assert res.projected == [ORTHO]
    cos = sorted((r.cosine, r.module) for r in res.rows)
    assert cos[0][1] == ORTHO


def test_finetuned_model_path_equals_adapter_path(world, tmp_path):
    ft = tmp_path / "ft"
    merge_adapter(str(world["aligned"]), str(world["adapter"]), ft)
    a = safe_lora(str(world["aligned"]), tmp_path / "via_adapter", base=str(world["base"]), adapter=str(world["adapter"]),
                  projector="exact")
    f = safe_lora(str(world["aligned"]), tmp_path / "via_ft", base=str(world["base"]), finetuned=str(ft), projector="exact")
    assert {r.module for r in f.rows} == {m + ".weight" for m in MODULES}  # only changed matrices
    ca = {r.module + ".weight": r for r in a.rows}
    for r in f.rows:
        assert r.cosine == pytest.approx(ca[r.module].cosine, abs=1e-4), r.module
        assert r.projected == ca[r.module].projected
    with CheckpointReader(tmp_path / "via_adapter") as x, CheckpointReader(tmp_path / "via_ft") as y, \
            CheckpointReader(ft) as z:
        for name in x.names:
            torch.testing.assert_close(y.get(name), x.get(name), rtol=1e-5, atol=2e-6, msg=name)
            if name not in {r.tensor for r in f.rows if r.projected}:
                assert y.get(name).numpy().tobytes() == z.get(name).numpy().tobytes()  # kept: the fine-tuned bytes
    assert read_manifest(tmp_path / "via_ft")["finetuned"]["weight_files"]


@pytest.mark.parametrize("kind", ["fast", "exact"])
def test_refusal_directions_as_subspace(world, tmp_path, kind):
    u = world["u"]
    P = torch.outer(u, u)  # unit direction: both projectors are u u^T
    res = safe_lora(str(world["aligned"]), tmp_path / "out", directions=world["direction"], adapter=str(world["adapter"]),
                    projector=kind)
    exp = expected(world, kind, projector_for=lambda m: None if m == QPROJ else P)
    check_output(world, tmp_path / "out", exp, res.rows)
    by = {r.module: r for r in res.rows}
    assert by[IN_SPAN].cosine == pytest.approx(1.0, abs=1e-5) and not by[IN_SPAN].projected
    assert by[QPROJ].cosine is None and "residual" in by[QPROJ].note
    # kept, not projected: the row reports the update's true norm, before and after
    q = load_adapter(world["adapter"]).modules[QPROJ]
    true_norm = float((q.scaling * q.B.double() @ q.A.double()).norm())
    assert true_norm > 0.1 and by[QPROJ].norm_before == pytest.approx(true_norm, rel=1e-5)
    assert by[QPROJ].norm_after == by[QPROJ].norm_before
    saved = {r["module"]: r for r in json.loads((tmp_path / "out" / "safe_lora.json").read_text())["rows"]}
    assert saved[QPROJ]["norm_before"] == pytest.approx(true_norm, rel=1e-5) == saved[QPROJ]["norm_after"]
    m = read_manifest(tmp_path / "out")
    assert m["safe_lora"]["subspace"] == "directions" and "refusal directions" in m["method"]["parameters"]["subspace"]
    assert m["direction"]["layer"] == 1 and "base" not in m


def test_emitted_adapter_loads_in_peft(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    safe_lora(str(world["aligned"]), merged, base=str(world["base"]), adapter=str(world["adapter"]))
    emitted = tmp_path / "emitted"
    res = safe_lora(str(world["aligned"]), emitted, base=str(world["base"]), adapter=str(world["adapter"]),
                    emit_adapter=True)
    assert res.emitted_adapter and (emitted / "safe_lora.json").is_file() and verify(emitted) == []
    ad = load_adapter(emitted)
    assert torch.count_nonzero(ad.modules[ORTHO].B @ ad.modules[ORTHO].A) == 0 or \
        float((ad.modules[ORTHO].B @ ad.modules[ORTHO].A).abs().max()) < 1e-6
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["aligned"]), emitted).merge_and_unload()
    sd = model.state_dict()
    with CheckpointReader(merged) as r:
        for name in r.names:
            torch.testing.assert_close(sd[name], r.get(name), rtol=1e-5, atol=1e-6, msg=name)


def test_projector_pieces():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(16, 40, generator=g, dtype=torch.float64)
    X = torch.randn(16, 7, generator=g, dtype=torch.float64)
    fast = sl.Projector(V, "fast", compute_dtype=torch.float64)
    torch.testing.assert_close(fast.apply(X), ref_projector(V, "fast") @ X)
    old = sl._CHUNK_ELEMS
    try:  # the column-chunked path gives the same product
        sl._CHUNK_ELEMS = 40 * 2
        torch.testing.assert_close(fast.apply(X), ref_projector(V, "fast") @ X)
    finally:
        sl._CHUNK_ELEMS = old
    for energy in (0.5, 0.9, 0.99):
        ex = sl.Projector(V, "exact", energy, compute_dtype=torch.float64)
        torch.testing.assert_close(ex.apply(X), ref_projector(V, "exact", energy) @ X)
    assert sl.Projector(torch.zeros(8, 3), "exact").apply(torch.ones(8, 2)).abs().sum() == 0
    A, B = torch.randn(3, 9, generator=g), torch.randn(16, 3, generator=g)
    CB = fast.apply(B.double()).float()
    c1 = sl.lora_cosine(A, B, CB, 0.7)
    c2 = sl.cosine(0.7 * CB.double() @ A.double(), 0.7 * B.double() @ A.double())
    assert c1 == pytest.approx(c2, rel=1e-6)
    assert math.isnan(sl.cosine(torch.zeros(4, 4), torch.zeros(4, 4))[0])


def _assert_clean_failure(tmp_path, fn, match):
    listing = set(os.listdir(tmp_path))
    with pytest.raises(SurgeryError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)
    assert set(os.listdir(tmp_path)) == listing


def test_bad_inputs_fail_before_writing(world, tmp_path):
    al, base, ad = str(world["aligned"]), str(world["base"]), str(world["adapter"])
    out = tmp_path / "out"
    wide = make_tiny_checkpoint("llama", tmp_path / "wide", hidden_size=48)
    narrow_ffn = make_tiny_checkpoint("llama", tmp_path / "ffn", intermediate_size=48)
    dora = tmp_path / "dora"
    shutil.copytree(world["adapter"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    nocfg = tmp_path / "nocfg"
    shutil.copytree(world["adapter"], nocfg)
    (nocfg / "adapter_config.json").unlink()
    cases = [
        (lambda: safe_lora(al, out, base=str(narrow_ffn), adapter=ad), r"model.layers.0.mlp.down_proj.weight.*\(32, 64\).*\(32, 48\)"),
        (lambda: safe_lora(al, out, base=str(wide), adapter=ad), r"base model in .*wide does not have the aligned model's "
                                                                  r"architecture: width 32 vs 48 \(aligned vs base\)"),
        (lambda: safe_lora(al, out, base=base, adapter=str(dora)), "DoRA"),
        (lambda: safe_lora(al, out, base=base, adapter=str(nocfg)), "no adapter_config.json"),
        (lambda: safe_lora(str(wide), out, base=str(wide), adapter=ad), r"mlp.down_proj: its update has shape \(32, 64\).*\(48, 64\)"),
        (lambda: safe_lora(al, out, base=base, directions=world["direction"], adapter=ad), "exactly one alignment subspace"),
        (lambda: safe_lora(al, out, base=base, adapter=ad, finetuned=al), "exactly one update"),
        (lambda: safe_lora(al, out, base=base, finetuned=base, emit_adapter=True), "--emit-adapter needs --adapter"),
        (lambda: safe_lora(al, out, base=base, finetuned=str(wide)), "shape"),
        (lambda: safe_lora(str(wide), out, directions=world["direction"], adapter=ad), "width 32"),
    ]
    for fn, match in cases:
        _assert_clean_failure(tmp_path, fn, match)


def test_cli_safe_lora(world, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["safe-lora", "--aligned", str(world["aligned"]), "--base", str(world["base"]), "--adapter",
                            str(world["adapter"]), "-o", str(tmp_path / "out"), "--projector", "exact", "--threshold", "0.3"])
    assert r.exit_code == 0, r.output
    assert ORTHO in r.output and "cosine" in r.output and "projected" in r.output
    assert read_manifest(tmp_path / "out")["method"]["parameters"]["selection"]["threshold"] == 0.3
    r = runner.invoke(cli, ["safe-lora", "--aligned", str(world["aligned"]), "--adapter", str(world["adapter"]),
                            "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "alignment subspace" in r.output
    assert not (tmp_path / "o2").exists()


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """llama with attention biases; aligned = base + noise on every tensor (V != 0 everywhere); a PEFT
    adapter with an o_proj LoRA, modules_to_save=["lm_head"] and bias="all" (whole tensors it replaces)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("safe_lora_whole")
    base = make_tiny_checkpoint("llama", root / "base", attention_bias=True)
    model = make_tiny_model("llama", attention_bias=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "aligned")
    torch.manual_seed(4)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "aligned"),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head"], bias="all",
                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and ("modules_to_save" in n or n.endswith("bias")):
                p.add_(0.3 * torch.randn(p.shape))
    pm.save_pretrained(root / "adapter")
    return {"root": root, "base": base, "aligned": root / "aligned", "adapter": root / "adapter"}


def test_whole_tensor_updates_are_listed_and_projected_or_kept(biased, tmp_path):
    """modules_to_save and bias="all" tensors are part of the update: the lm_head matrix is projected
    like any module (dW = R - W_aligned), the biases are kept with a warning; all are rows of the table."""
    said = []
    res = safe_lora(str(biased["aligned"]), tmp_path / "out", base=str(biased["base"]), adapter=str(biased["adapter"]),
                    say=said.append)
    ad = load_adapter(biased["adapter"])
    with CheckpointReader(biased["aligned"]) as al, CheckpointReader(biased["base"]) as bs, \
            CheckpointReader(tmp_path / "out") as out:
        want = {}
        for m, lm in ad.modules.items():
            want[m + ".weight"] = (lm.scaling * lm.B.double() @ lm.A.double(), True)
        for t, key in ad.replacements.items():
            want[t] = (ad.read(key).double() - al.get(t).double(), ad.read(key).dim() == 2)
        assert any(t.endswith(".bias") for t in want) and "lm_head.weight" in want and len(want) > len(ad.modules) + 1
        by = {r.tensor: r for r in res.rows}
        assert set(by) == set(want)  # every tensor of the update is a row
        for t, (dW, matrix) in want.items():
            w = al.get(t).double()
            if matrix:
                C = ref_projector(w - bs.get(t).double(), "fast")
                cos = ref_cos(C, dW)
                assert by[t].cosine == pytest.approx(cos, abs=1e-5), t
                assert by[t].projected == (cos <= 0.5)
                exp = w + (C @ dW if cos <= 0.5 else dW)
            else:
                assert by[t].cosine is None and not by[t].projected and "not a weight matrix" in by[t].note
                exp = w + dW
            assert by[t].norm_before == pytest.approx(float(dW.norm()), rel=1e-5), t
            torch.testing.assert_close(out.get(t).double(), exp, rtol=1e-5, atol=1e-6, msg=t)
        assert by["lm_head.weight"].projected  # a random replacement is poorly aligned
        for t in al.names:
            if t not in want:
                assert torch.equal(out.get(t), al.get(t)), t
    warning = next(x for x in said if x.startswith("warning:"))
    assert all(t in warning or "..." in warning for t in want if t.endswith(".bias"))
    saved = json.loads((tmp_path / "out" / "safe_lora.json").read_text())["rows"]
    assert {r["tensor"] for r in saved} == set(want)
    # the same update as a fine-tuned model: the same rows and the same result
    ft = merge_adapter(str(biased["aligned"]), str(biased["adapter"]), tmp_path / "ft") and tmp_path / "ft"
    f = safe_lora(str(biased["aligned"]), tmp_path / "via_ft", base=str(biased["base"]), finetuned=str(ft))
    assert {r.tensor for r in f.rows} == set(want)
    assert {r.tensor for r in f.rows if r.projected} == {r.tensor for r in res.rows if r.projected}
    with CheckpointReader(tmp_path / "out") as x, CheckpointReader(tmp_path / "via_ft") as y:
        for t in x.names:
            torch.testing.assert_close(y.get(t), x.get(t), rtol=1e-5, atol=2e-6, msg=t)
    # the emitted adapter carries the projected lm_head
    em = safe_lora(str(biased["aligned"]), tmp_path / "em", base=str(biased["base"]), adapter=str(biased["adapter"]),
                   emit_adapter=True)
    assert em.emitted_adapter
    merge_adapter(str(biased["aligned"]), str(tmp_path / "em"), tmp_path / "em_merged")
    with CheckpointReader(tmp_path / "out") as x, CheckpointReader(tmp_path / "em_merged") as y:
        for t in x.names:
            torch.testing.assert_close(y.get(t), x.get(t), rtol=1e-5, atol=2e-6, msg=t)


def test_no_projectable_module_is_refused_in_both_modes(biased, tmp_path):
    """Only biases changed: nothing Safe-LoRA can project.  Both modes refuse (the fine-tuned one
    used to report "projected 0 of 0 modules" and keep the whole update)."""
    ad = load_adapter(biased["adapter"])
    biases = {t: ad.read(k) for t, k in ad.replacements.items() if t.endswith(".bias")}
    only = save_peft_adapter(tmp_path / "only_bias", {}, r=2, alpha=4, target_modules=["o_proj"], bias="all",
                             extra_tensors=biases)
    ft = tmp_path / "ft"
    merge_adapter(str(biased["aligned"]), str(only), ft)
    al, base = str(biased["aligned"]), str(biased["base"])
    for kw in (dict(adapter=str(only)), dict(finetuned=str(ft)), dict(finetuned=al)):
        _assert_clean_failure(tmp_path, lambda: safe_lora(al, tmp_path / "out", base=base, **kw),
                              "the update has no module to project")


def test_zero_alignment_matrix_and_other_architectures_are_refused(world, tmp_path):
    al, ad = str(world["aligned"]), str(world["adapter"])
    deep = make_tiny_checkpoint("llama", tmp_path / "deep", num_hidden_layers=3)
    qwen = make_tiny_checkpoint("qwen2", tmp_path / "qwen")
    for base, match in ((al, r"no module to project .*the base model \S+ equals the aligned model on every one"),
                        (str(deep), r"architecture: layers 2 vs 3"),
                        (str(qwen), r"architecture: model_type llama vs qwen2")):
        _assert_clean_failure(tmp_path, lambda: safe_lora(al, tmp_path / "out", base=base, adapter=ad), match)
        _assert_clean_failure(tmp_path, lambda: safe_lora(al, tmp_path / "out", base=base, finetuned=al), "")


def test_a_tensor_alignment_did_not_touch_is_kept_not_fatal(tmp_path):
    """Base and aligned differ on layer 0's o_proj only; the fine-tune also changed
    layer 1's: that row is kept with its reason (the whole run used to stop)."""
    from safetensors.torch import load_file, save_file

    def variant(name: str, bumps: dict[str, float]) -> Path:
        folder = shutil.copytree(tmp_path / "aligned", tmp_path / name)
        shard = next(Path(folder).glob("*.safetensors"))
        sd = load_file(str(shard))
        g = torch.Generator().manual_seed(len(name))
        for t, scale in bumps.items():
            sd[t] = sd[t] + scale * torch.randn(sd[t].shape, generator=g)
        save_file(sd, str(shard), metadata={"format": "pt"})
        return Path(folder)

    make_tiny_checkpoint("llama", tmp_path / "aligned")
    o0, o1 = "model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    base = variant("base", {o0: 0.1})
    ft = variant("ft", {o0: 0.05, o1: 0.05})
    res = safe_lora(str(tmp_path / "aligned"), tmp_path / "out", base=str(base), finetuned=str(ft), threshold=1.0)
    rows = {r.tensor: r for r in res.rows}
    assert rows[o0].cosine is not None and not math.isnan(rows[o0].cosine) and o0 in res.projected
    assert rows[o1].cosine is None and rows[o1].note.startswith("V = W_aligned - W_base is zero")
    with CheckpointReader(tmp_path / "out") as out, CheckpointReader(ft) as f:
        assert torch.equal(out.get(o1), f.get(o1))  # kept as the fine-tune made it
