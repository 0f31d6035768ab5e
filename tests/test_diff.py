"""surgery diff: ranks and singular values against float64 SVDs, a ROSI output
(rank 1, |cos| = 1 with the direction, nothing else changed, gpt2 Conv1D axis),
a LoRA merge (rank r), a full-rank change reported as "> q", one-sided /
reshaped / recast tensors, unknown model types, the heatmap data and PNG, the
CLI, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.architectures import get_architecture
from surgery.checkpoint import CheckpointReader
from surgery.cli import main as cli
from surgery.diff import diff_checkpoints, numerical_rank, spectrum
from surgery.directions import Candidate, Directions
from surgery.errors import SurgeryError
from surgery.pipeline import write_edited, write_rosi
from tiny_models import make_tiny_checkpoint


# ----------------------------------------------------------------------------- helpers
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _save(folder: Path, tensors: dict, config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _rank64(m: torch.Tensor, energy: float = 0.99) -> int:
    """Reference numerical rank from the full float64 spectrum."""
    s2 = torch.linalg.svdvals(m.double()).pow(2)
    cum = torch.cumsum(s2, 0) / s2.sum()
    return int(torch.nonzero(cum >= energy * (1 - 1e-9))[0]) + 1


def _direction(tmp: Path, d: int, seed: int = 1) -> tuple[Path, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    # two candidates, the chosen one second: the diff must use the chosen one
    dirs = Directions([Candidate("prompt", 0, -1, torch.randn(d, generator=g, dtype=torch.float64)),
                       Candidate("response", 1, -1, v)], 1, "test")
    return dirs.save(tmp / "dir.safetensors"), v / v.norm()


def _rosi_pair(src: Path, out: Path, r_hat: torch.Tensor, alpha: float = 3.0) -> set[str]:
    with CheckpointReader(src) as rd:
        arch = get_architecture(rd.config)
        return set(write_rosi(rd, arch, out, r_hat.float(), alpha, None, False, False, say=lambda m: None))


# ----------------------------------------------------------------------------- maths
def test_spectrum_and_rank_match_float64():
    g = torch.Generator().manual_seed(0)
    for r in (1, 4, 7):
        m = (torch.randn(96, r, generator=g, dtype=torch.float64) @ torch.randn(r, 64, generator=g, dtype=torch.float64))
        s, u1, exact = spectrum(m, 16)
        assert not exact and len(s) == 16
        ref_u, ref_s, _ = torch.linalg.svd(m)
        torch.testing.assert_close(s[:r], ref_s[:r], rtol=1e-9, atol=0)
        assert abs(float(u1 @ ref_u[:, 0])) == pytest.approx(1.0, abs=1e-9)
        assert numerical_rank(s, float(m.pow(2).sum()), 0.99, False) == (_rank64(m), None)
        assert _rank64(m) <= r
    # full rank: the top 16 hold far less than 99%, so "> 16", never a falsely low number
    m = torch.randn(96, 64, generator=g, dtype=torch.float64)
    s, _, _ = spectrum(m, 16)
    assert _rank64(m) > 16
    assert numerical_rank(s, float(m.pow(2).sum()), 0.99, False) == (None, 16)
    # min dimension <= q: exact SVD, exact rank
    m = torch.randn(12, 40, generator=g, dtype=torch.float64)
    s, _, exact = spectrum(m, 16)
    assert exact and len(s) == 12
    torch.testing.assert_close(s, torch.linalg.svdvals(m))
    assert numerical_rank(s, float(m.pow(2).sum()), 0.99, True) == (_rank64(m), None)
    assert numerical_rank(s, float(m.pow(2).sum()), 1.0, True) == (12, None)


# ----------------------------------------------------------------------------- ROSI
@pytest.fixture(scope="module")
def rosi_pair(tiny_chat, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diff_rosi")
    dfile, r_hat = _direction(tmp, 32)
    edited = _rosi_pair(tiny_chat, tmp / "out", r_hat)
    return tiny_chat, tmp / "out", dfile, r_hat, edited


def _check_numbers(rec, a: torch.Tensor, b: torch.Tensor):
    d = b.double() - a.double()
    assert rec.fro == pytest.approx(float(d.norm()), rel=1e-9)
    assert rec.norm_a == pytest.approx(float(a.double().norm()), rel=1e-9)
    assert rec.rel == pytest.approx(float(d.norm() / a.double().norm()), rel=1e-9)
    assert rec.max_abs == pytest.approx(float(d.abs().max()), rel=1e-12)


def test_rosi_output_is_rank_one_along_the_direction(rosi_pair):
    src, out, dfile, r_hat, edited = rosi_pair
    rep = diff_checkpoints(src, out, direction=dfile)
    A, B = _tensors(src), _tensors(out)
    assert len(edited) == 8  # 4 layers x (o_proj, down_proj)
    assert [r.name for r in rep.records] == list(CheckpointReader(src).names)
    for rec in rep.records:
        if rec.name in edited:
            assert rec.status == "changed", rec.name
            assert rec.rank == 1 and rec.rank_above is None, rec.name
            assert rec.cosine >= 0.99, rec.name
            _check_numbers(rec, A[rec.name], B[rec.name])
            assert rec.kind in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
        else:
            assert rec.status == "unchanged", rec.name
            assert rec.fro is None and rec.rank is None and rec.cosine is None
    assert rep.totals() == {"changed": 8, "unchanged": len(A) - 8, "only_a": 0, "only_b": 0, "mismatched": 0}
    # the chosen candidate was used: against the other candidate the cosines are low
    other = Directions.load(dfile).candidates[0].vector
    other_file = dfile.parent / "other.safetensors"
    save_file({"v": other.float()}, str(other_file))
    rep2 = diff_checkpoints(src, out, direction=other_file)
    assert max(r.cosine for r in rep2.records if r.status == "changed") < 0.9


def test_rosi_gpt2_conv1d_output_axis(tmp_path):
    """GPT-2 stores Conv1D weights (d_in, d_out): the output axis comes from the layout."""
    src = make_tiny_checkpoint("gpt2", tmp_path / "src")
    dfile, r_hat = _direction(tmp_path, 32, seed=3)
    edited = _rosi_pair(src, tmp_path / "out", r_hat)
    rep = diff_checkpoints(src, tmp_path / "out", direction=dfile)
    A, B = _tensors(src), _tensors(tmp_path / "out")
    changed = {r.name: r for r in rep.records if r.status == "changed"}
    assert set(changed) == edited and len(edited) == 4
    for name, rec in changed.items():
        assert rec.rank == 1 and rec.cosine >= 0.99 and rec.layout == "in_out"
        d = B[name].double() - A[name].double()
        if d.shape[0] == d.shape[1]:  # reading the stored axis 0 as output would give a low cosine
            u, _, _ = torch.linalg.svd(d)
            assert abs(float(u[:, 0] @ r_hat)) < 0.9
    assert {r.kind for r in changed.values()} == {"attn.c_proj.weight", "mlp.c_proj.weight"}


def test_per_tensor_rows_name_their_expert(tmp_path):
    """MoE rows showed three identical 'mlp.experts.*.down_proj.weight' lines per layer."""
    src = make_tiny_checkpoint("qwen2_moe", tmp_path / "src")
    dfile, r_hat = _direction(tmp_path, 32, seed=4)
    _rosi_pair(src, tmp_path / "out", r_hat)
    text = diff_checkpoints(src, tmp_path / "out", direction=dfile).summary()
    rows = text.split("changed tensors, by layer")[1].split("changed module kinds")[0]
    assert "experts.0." in rows and "experts.1." in rows and "experts.*." not in rows
    assert "experts.*." in text.split("changed module kinds")[1]


# ----------------------------------------------------------------------------- LoRA merge
def test_lora_merge_rank_and_full_rank_change(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    g = torch.Generator().manual_seed(7)
    lora = {"model.layers.0.self_attn.q_proj.weight": 4, "model.layers.1.self_attn.o_proj.weight": 4,
            "model.layers.0.mlp.down_proj.weight": 4, "model.layers.1.mlp.gate_proj.weight": 2}
    noisy = "model.layers.1.mlp.up_proj.weight"  # (64, 32): a full-rank change

    def edit(name, t):
        if name in lora:
            r = lora[name]
            b, a = torch.randn(t.shape[0], r, generator=g), torch.randn(r, t.shape[1], generator=g)
            return (t + 0.05 * b @ a).to(t.dtype)
        if name == noisy:
            return (t + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype)
        return None

    with CheckpointReader(src) as rd:
        write_edited(rd, tmp_path / "out", edit, say=lambda m: None)
    A, B = _tensors(src), _tensors(tmp_path / "out")
    rep = diff_checkpoints(src, tmp_path / "out")
    recs = {r.name: r for r in rep.records}
    for name, r in lora.items():
        rec = recs[name]
        d = B[name].double() - A[name].double()
        assert rec.status == "changed" and rec.rank == r == _rank64(d), name
        torch.testing.assert_close(torch.tensor(rec.singular_values[:r], dtype=torch.float64),
                                   torch.linalg.svdvals(d)[:r], rtol=1e-6, atol=0)
        _check_numbers(rec, A[name], B[name])
    assert recs[noisy].rank is None and recs[noisy].rank_above == 16 and recs[noisy].rank_text == ">16"
    assert _rank64(B[noisy].double() - A[noisy].double()) > 16
    assert {r.name for r in rep.records if r.status == "changed"} == set(lora) | {noisy}
    assert rep.totals()["unchanged"] == len(A) - 5
    # q = 32 covers the whole spectrum of the (64, 32) change: the exact rank
    rep32 = diff_checkpoints(src, tmp_path / "out", rank_q=32)
    rec = next(r for r in rep32.records if r.name == noisy)
    assert rec.rank == _rank64(B[noisy].double() - A[noisy].double()) and rec.rank_above is None
    assert "'>16' = more" in rep.summary() and ">16" in rep.summary()


# ----------------------------------------------------------------------------- odd tensors
def test_one_sided_reshaped_and_recast_tensors_are_listed(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    t = _tensors(src)
    r = torch.randn(32, generator=torch.Generator().manual_seed(5))
    plain = tmp_path / "r.safetensors"
    save_file({"whatever": r}, str(plain))  # a plain direction file with one 1-D tensor
    del t["model.layers.0.mlp.up_proj.weight"]
    t["model.layers.1.mlp.extra.weight"] = torch.zeros(4, 4)
    t["extra.bias"] = torch.zeros(3)
    t["model.layers.1.self_attn.q_proj.weight"] = t["model.layers.1.self_attn.q_proj.weight"].reshape(16, -1)
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].to(torch.bfloat16)
    t["model.layers.1.input_layernorm.weight"] = t["model.layers.1.input_layernorm.weight"] + 0.5 * r
    out = _save(tmp_path / "b", t, config)
    rep = diff_checkpoints(src, out, direction=plain)
    st = {x.name: x for x in rep.records}
    assert st["model.layers.0.mlp.up_proj.weight"].status == "only_a"
    assert st["model.layers.1.mlp.extra.weight"].status == "only_b"
    assert (st["model.layers.1.mlp.extra.weight"].layer, st["model.layers.1.mlp.extra.weight"].kind) == (1, "mlp.extra.weight")
    assert st["extra.bias"].status == "only_b" and st["extra.bias"].layer is None
    assert st["model.layers.1.self_attn.q_proj.weight"].status == "shape_mismatch"
    # recast to bfloat16: compared by value (float32 reference below), the dtype change reported with the numbers
    k = st["model.layers.0.self_attn.k_proj.weight"]
    k_a = _tensors(src)["model.layers.0.self_attn.k_proj.weight"]
    k_delta = k_a.to(torch.bfloat16).double() - k_a.double()
    assert k.status == "changed" and (k.dtype_a, k.dtype_b) == ("float32", "bfloat16")
    assert k.fro == pytest.approx(float(k_delta.norm()), rel=1e-6) and k.max_abs == pytest.approx(float(k_delta.abs().max()))
    assert k.rel == pytest.approx(float(k_delta.norm() / k_a.double().norm()), rel=1e-6) and 0 < k.rel < 1e-2
    norm = st["model.layers.1.input_layernorm.weight"]
    assert norm.status == "changed" and norm.rank is None and norm.cosine == pytest.approx(1.0, abs=1e-6)
    assert norm.fro == pytest.approx(0.5 * float(r.double().norm()), rel=1e-6)
    assert rep.totals() == {"changed": 2, "unchanged": len(st) - 6, "only_a": 1, "only_b": 2, "mismatched": 1}
    text = rep.summary()
    for section, name in (("only in A (1)", "model.layers.0.mlp.up_proj.weight"), ("only in B (2)", "extra.bias"),
                          ("different shape (1)", "model.layers.1.self_attn.q_proj.weight")):
        assert section in text and name in text
    assert "different dtype" not in text
    k_line = next(line for line in text.splitlines() if "self_attn.k_proj.weight" in line)
    assert k_line.rstrip().endswith("float32 -> bfloat16") and f"{k.fro:.3g}"[:4] in k_line
    assert "dtype changed (compared by value): float32 -> bfloat16: 1 tensors" in text


def test_whole_checkpoint_cast_is_compared_by_value(tmp_path):
    """The same weights cast to bfloat16 (every tensor used to be "different dtype", no numbers), and
    cast back to float32: exact casts are unchanged, the rest changed by rounding only."""
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    t = _tensors(src)
    bf = _save(tmp_path / "bf16", {k: v.to(torch.bfloat16) for k, v in t.items()}, {**config, "dtype": "bfloat16"})
    rep = diff_checkpoints(src, bf)
    assert rep.totals()["mismatched"] == 0 and rep.by_status("dtype_mismatch") == []
    for r in rep.records:
        d = t[r.name].to(torch.bfloat16).float() - t[r.name]  # float32 reference
        if float(d.abs().max()) == 0.0:
            assert r.status == "unchanged", r.name  # e.g. norms of ones
        else:
            assert r.status == "changed" and r.fro == pytest.approx(float(d.double().norm()), rel=1e-6), r.name
            assert r.max_abs == pytest.approx(float(d.abs().max()), rel=1e-6)
            assert r.rel < 2 ** -8
    back = _save(tmp_path / "back", {k: v.to(torch.bfloat16).float() for k, v in t.items()}, config)
    rep2 = diff_checkpoints(bf, back)  # bfloat16 -> float32 is exact: values unchanged, only the dtype
    assert rep2.totals()["changed"] == 0 and rep2.totals()["unchanged"] == len(t)
    assert f"bfloat16 -> float32: {len(t)} tensors" in rep2.summary()


def test_a_side_without_a_required_tensor_gets_a_note(tmp_path):
    """diff never loads the model: an untied checkpoint without lm_head.weight (which
    transformers would fill at random) was compared as if whole, without a word."""
    src = make_tiny_checkpoint("llama", tmp_path / "src")  # untied
    t = _tensors(src)
    del t["lm_head.weight"]
    b = _save(tmp_path / "b", t, json.loads((src / "config.json").read_text()))
    rep = diff_checkpoints(src, b)
    assert rep.notes == [f"note: B ({b}) is incomplete: checkpoint of model_type 'llama' lacks 1 required tensor(s): "
                         "lm_head.weight (tie_word_embeddings is false)"]
    assert rep.notes[0] in rep.summary()
    assert diff_checkpoints(src, src).notes == []
    r = CliRunner().invoke(cli, ["diff", str(b), str(b)])
    assert r.exit_code == 0 and r.output.count("is incomplete") == 2, r.output


def test_unknown_model_type_falls_back_to_layer_regex(tmp_path):
    g = torch.Generator().manual_seed(2)
    a = {f"net.layers.{i}.{k}": torch.randn(24, 40, generator=g) for i in range(3) for k in ("mix.weight", "out.weight")}
    a["net.embed.weight"] = torch.randn(10, 24, generator=g)
    r = torch.randn(24, generator=g, dtype=torch.float64)
    r_hat = r / r.norm()
    b = dict(a)
    for i in range(3):
        w = a[f"net.layers.{i}.out.weight"]
        b[f"net.layers.{i}.out.weight"] = w + 2.0 * torch.outer(r_hat.float(), w.mean(0))
    A = _save(tmp_path / "a", a, {"model_type": "mystery"})
    B = _save(tmp_path / "b", b, {"model_type": "mystery"})
    save_file({"r": r.float()}, str(tmp_path / "r.safetensors"))
    rep = diff_checkpoints(A, B, direction=tmp_path / "r.safetensors")
    ch = [x for x in rep.records if x.status == "changed"]
    assert [(x.layer, x.kind) for x in ch] == [(i, "out.weight") for i in range(3)]
    assert all(x.rank == 1 and x.cosine >= 0.99 and x.layout == "out_in?" for x in ch)
    emb = next(x for x in rep.records if x.name == "net.embed.weight")
    assert emb.layer is None and emb.status == "unchanged"
    assert "unknown model type" in rep.summary()
    layers, kinds, rel, _ = rep.heatmap_data()
    assert layers == [0, 1, 2] and kinds == ["mix.weight", "out.weight"]


# ----------------------------------------------------------------------------- plot, JSON, CLI
def test_heatmap_data_and_png(rosi_pair, tmp_path):
    import matplotlib.image

    src, out, dfile, _, edited = rosi_pair
    rep = diff_checkpoints(src, out, direction=dfile)
    layers, kinds, rel, rank = rep.heatmap_data()
    n_layers = get_architecture(CheckpointReader(src).config).num_layers(CheckpointReader(src).config)
    assert layers == list(range(n_layers)) and rel.shape == rank.shape == (n_layers, len(kinds))
    for rec in rep.records:
        if rec.layer is None:
            continue
        i, j = layers.index(rec.layer), kinds.index(rec.kind)
        if rec.name in edited:
            assert float(rel[i, j]) == pytest.approx(rec.rel, rel=1e-12) and float(rank[i, j]) == 1
        else:
            assert float(rel[i, j]) == 0.0
            assert float(rank[i, j]) == 0 if len(rec.shape_a) == 2 else torch.isnan(rank[i, j])
    png = rep.plot(tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_cli_summary_json_plot(rosi_pair, tmp_path):
    src, out, dfile, _, edited = rosi_pair
    runner = CliRunner()
    res = runner.invoke(cli, ["diff", str(src), str(out), "--direction", str(dfile), "--json", str(tmp_path / "d.json"),
                              "--plot", str(tmp_path / "d.png")])
    assert res.exit_code == 0, res.output
    assert "changed tensors, by layer" in res.output and "changed module kinds" in res.output
    assert "self_attn.o_proj.weight" in res.output
    n = len(CheckpointReader(src).names)
    assert f"tensors: 8 changed, {n - 8} unchanged, 0 only in A, 0 only in B, 0 mismatched" in res.output
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["format"] == "surgery.diff/1" and len(data["records"]) == n
    assert {r["name"] for r in data["records"] if r["status"] == "changed"} == edited
    assert all(r["rank"] == 1 and r["cosine"] >= 0.99 for r in data["records"] if r["status"] == "changed")
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    # --json -: stdout is exactly the JSON, the summary goes to stderr
    res = runner.invoke(cli, ["diff", str(src), str(out), "--json", "-"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["totals"]["changed"] == 8
    assert "changed tensors, by layer" in res.stderr


def test_bad_input_one_line_errors(rosi_pair, tmp_path):
    src, out, dfile, _, _ = rosi_pair
    runner = CliRunner()
    bad2d = tmp_path / "bad.safetensors"
    save_file({"m": torch.zeros(3, 3)}, str(bad2d))
    cases = [
        (["diff", str(tmp_path / "missing"), str(out)], "missing"),
        (["diff", str(src), str(tmp_path / "nope")], "nope"),
        (["diff", str(src), str(out), "--direction", str(tmp_path / "none.safetensors")], "none.safetensors"),
        (["diff", str(src), str(out), "--direction", str(bad2d)], "bad.safetensors"),
        (["diff", str(src), str(out), "--energy", "1.5"], "energy"),
        (["diff", str(src), str(out), "--rank-q", "0"], "rank_q"),
    ]
    for args, culprit in cases:
        res = runner.invoke(cli, args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], res.stderr
    with pytest.raises(SurgeryError):
        diff_checkpoints(src, tmp_path / "missing")
