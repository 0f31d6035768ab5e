"""Rank-k gated injection and `surgery tune` (issue 6).

Rank k: the written delta is ``alpha * R_hat V^T`` recomputed in float64 and has
rank <= k; rank 1 is byte for byte the rank-one edit; each fit keeps ``v . x`` on
the harmless calibration inputs within the bound its closed form promises
(null space: the discarded energy; ridge: what the regression leaves).
Tune: the Pareto front against a brute-force reference, the rule grammar (good
rules and one-line errors naming the bad part), an end-to-end run on the tiny
chat model (JSON + PNG, --rule picks the point a reference picks) and the
written checkpoint equal to the in-memory edit of that point."""
from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from surgery.architectures import WriterTensor
from surgery.checkpoint import CheckpointReader
from surgery.cli import main as cli
from surgery.directions import Candidate, Directions
from surgery.edits.gated import (GateStats, GateTargets, collect_stats, fit_read_vector, fit_read_vector_ridge,
                                 fit_read_vectors_null, fit_read_vectors_ridge, gated_in_memory_k, gated_update,
                                 gated_update_k, harmless_energy_bound, null_basis, prompt_contrasts, refusal_basis,
                                 ridge_gram)
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from surgery.model import get_submodule, load_model
from surgery.pipeline import PromptConfig, inject
from surgery.prompts import format_chat
from surgery.tuning import OBJECTIVES, choose_point, pareto_front, parse_rule, select_for_confirmation

SMALL = PromptConfig(n_train=8, n_val=4)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- Pareto front
def brute_front(points, objectives=OBJECTIVES):
    """Reference: i is on the front iff no j is >= in every objective and > in one."""
    def better_eq(a, b, how):
        return a >= b if how == "max" else a <= b

    def strictly(a, b, how):
        return a > b if how == "max" else a < b

    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if j != i and all(better_eq(q[k], p[k], h) for k, h in objectives) and any(
                    strictly(q[k], p[k], h) for k, h in objectives):
                dominated = True
                break
        if not dominated:
            out.append(i)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    coarse = seed % 2 == 0  # coarse values: many ties and duplicates, as 40-prompt rates give
    def val():
        return rng.randint(0, 5) / 5 if coarse else rng.random()
    pts = [{"harmful_refusal": val(), "harmless_refusal": val(), "kl": val()} for _ in range(n)]
    assert pareto_front(pts) == brute_front(pts)
    two = (("harmful_refusal", "max"), ("kl", "min"))
    assert pareto_front(pts, two) == brute_front(pts, two)


def test_pareto_front_small_cases():
    pts = [{"harmful_refusal": 0.5, "harmless_refusal": 0.1, "kl": 0.2},
           {"harmful_refusal": 0.5, "harmless_refusal": 0.1, "kl": 0.2},   # duplicate: both kept
           {"harmful_refusal": 0.5, "harmless_refusal": 0.1, "kl": 0.3},   # dominated by 0 (worse KL)
           {"harmful_refusal": 0.9, "harmless_refusal": 0.4, "kl": 0.5},   # a trade-off: kept
           {"harmful_refusal": 0.1, "harmless_refusal": 0.0, "kl": float("nan")}]  # NaN KL counts as the worst KL
    assert pareto_front(pts) == [0, 1, 3, 4]  # 4 is alone at harmless 0.0, so nothing dominates it
    pts[4]["harmless_refusal"] = 0.1
    assert pareto_front(pts) == [0, 1, 3]  # now 0 beats it everywhere (its NaN KL included)


def test_confirmation_takes_spread_front_points():
    pts = [{"id": i, "proxy": {"harmful_score": float(i), "harmless_score": 0.0, "kl": float(i)}} for i in range(10)]
    pts.append({"id": 10, "proxy": {"harmful_score": 3.0, "harmless_score": 1.0, "kl": 5.0}})  # dominated by 3
    assert select_for_confirmation(pts, 20) == list(range(10))
    sel = select_for_confirmation(pts, 4)
    assert sel == [0, 3, 6, 9]  # both ends of the front, evenly between
    assert select_for_confirmation(pts, 1) == [9]
    # a KL bound (exact at proxy time) confines the front: 0..5 are within KL 5, so the ends are 0 and 5
    assert select_for_confirmation(pts, 3, max_kl=5.0) == [0, 2, 5]  # round(2.5) == 2
    assert select_for_confirmation(pts, 1, max_kl=5.0) == [5]
    assert select_for_confirmation(pts, 2, max_kl=-1.0) == [0, 9]  # none within: the whole front


# ----------------------------------------------------------------------------- rules
@pytest.mark.parametrize("text,conds", [
    ("max refusal", {}),
    ("max refusal with over-refusal <= 0.05 and kl <= 0.2", {"harmless_refusal": 0.05, "kl": 0.2}),
    ("MAX Refusal WITH over-refusal<=5% AND borderline <= 20%", {"harmless_refusal": 0.05, "borderline_refusal": 0.2}),
    ("  max refusal with kl <= 1e-1 ", {"kl": 0.1}),
])
def test_rule_parses(text, conds):
    r = parse_rule(text)
    assert dict(r.conditions) == pytest.approx(conds)


@pytest.mark.parametrize("text,fragment", [
    ("min kl", "must start with 'max refusal'"),
    ("", "must start with 'max refusal'"),
    ("max refusal over-refusal <= 0.1", "expected 'with' after 'max refusal', got 'over-refusal'"),
    ("max refusal with overrefusal <= 0.1", "unknown metric 'overrefusal'"),
    ("max refusal with kl < 0.2", "expected '<=' after 'kl', got '<'"),
    ("max refusal with kl >= 0.2", "expected '<=' after 'kl', got '>='"),
    ("max refusal with kl <= abc", "cannot read the bound 'abc' of kl"),
    ("max refusal with kl <=", "expected a number after 'kl <='"),
    ("max refusal with over-refusal <= 5", "'over-refusal <= 5': a rate is a fraction"),
    ("max refusal with kl <= 20%", "'kl <= 20%': kl is not a rate"),
    ("max refusal with kl <= 0.2 or over-refusal <= 0.1", "expected 'and' or the end after 'kl <= 0.2', got 'or'"),
    ("max refusal with kl <= 0.2 and", "expected a condition after 'and'"),
    ("max refusal with kl <= 0.1 and kl <= 0.2", "kl is bounded twice"),
    ("max refusal with", "expected a condition after 'with'"),
])
def test_bad_rules_fail_in_one_line_naming_the_part(text, fragment):
    with pytest.raises(SurgeryError) as e:
        parse_rule(text)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def brute_rule(points, conds):
    """Reference: confirmed points meeting every bound; max harmful, then min kl, min harmless, min id."""
    ok = [p for p in points if p["metrics"] and all(p["metrics"][k] <= v for k, v in conds.items())]
    if not ok:
        return None
    best = max(p["metrics"]["harmful_refusal"] for p in ok)
    ok = [p for p in ok if p["metrics"]["harmful_refusal"] == best]
    ok.sort(key=lambda p: (p["metrics"]["kl"], p["metrics"]["harmless_refusal"], p["id"]))
    return ok[0]


def test_rule_picks_like_reference_on_synthetic_points():
    rng = random.Random(1)
    pts = []
    for i in range(80):
        m = None if i % 3 == 0 else {"harmful_refusal": rng.randint(0, 10) / 10, "harmless_refusal": rng.randint(0, 10) / 20,
                                     "borderline_refusal": rng.randint(0, 10) / 20, "kl": rng.random()}
        pts.append({"id": i, "metrics": m})
    data = {"points": pts, "front": []}
    for text, conds in [("max refusal", {}), ("max refusal with over-refusal <= 10%", {"harmless_refusal": 0.1}),
                        ("max refusal with over-refusal <= 0.1 and kl <= 0.3 and borderline <= 0.15",
                         {"harmless_refusal": 0.1, "kl": 0.3, "borderline_refusal": 0.15})]:
        p, choice = choose_point(data, rule=text)
        assert p is brute_rule(pts, conds) and choice["rule"] == text
    with pytest.raises(SurgeryError, match="none of the 53 confirmed points meets kl <= 0"):
        choose_point(data, rule="max refusal with kl <= 0")
    with pytest.raises(SurgeryError, match="--pick 999: no such point"):
        choose_point(data, pick=999)
    assert "not confirmed" in choose_point(data, pick=0)[1]["reason"]


# ----------------------------------------------------------------------------- rank k: synthetic
def _synthetic(d=16, n=200, k=3, seed=0):
    """Harmless inputs in half the space; harmful = harmless + an offset outside it
    whose per-prompt part predicts the targets of columns 1..k-1 exactly."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    benign = basis[:, : d // 2]
    xb = torch.randn(n, d // 2, generator=g, dtype=torch.float64) @ benign.T
    z = torch.randn(n // 2, k - 1, generator=g, dtype=torch.float64)
    xh = xb[: n // 2] + 3.0 * basis[:, -1] + z @ basis[:, d // 2: d // 2 + k - 1].T
    post = xb[: n // 4]
    s = GateStats(sum_h=xh.sum(0), n_h=xh.shape[0], sum_b_post=post.sum(0), n_b_post=post.shape[0],
                  gram_b=xb.T @ xb, n_b=n, gram_b_post=post.T @ post, x_h=xh)
    coeffs = torch.cat([torch.ones(n // 2, 1, dtype=torch.float64), 0.5 * z], dim=1)
    t = GateTargets(torch.eye(8, k, dtype=torch.float64), coeffs, list(range(n // 2)))
    return s, t, xh, xb


@pytest.mark.parametrize("fit", ["null", "ridge"])
def test_rank_k_read_vectors_fire_on_harmful_only(fit):
    s, t, xh, xb = _synthetic()
    V = fit_read_vectors_null(s, t, 0.5, 1e-9) if fit == "null" else fit_read_vectors_ridge(s, t, 10.0, 1e-9)
    v0 = fit_read_vector(s, 0.5) if fit == "null" else fit_read_vector_ridge(s, 10.0, 1e-9)
    torch.testing.assert_close(V[:, 0], v0, rtol=0, atol=1e-12)  # column 0 is the rank-one read vector
    assert (xh @ V[:, 0]).mean().item() == pytest.approx(1.0, abs=1e-9)
    # columns 1..k-1 follow the per-prompt targets on harmful inputs (they are predictable here) ...
    torch.testing.assert_close(xh @ V[:, 1:], t.coeffs[:, 1:], rtol=0, atol=1e-3)
    # ... and all stay ~0 on the harmless inputs, which have no energy where the fit reads
    assert (xb @ V).abs().max().item() < 1e-5
    assert (xh @ V[:, 1:]).abs().mean().item() > 0.2


# ----------------------------------------------------------------------------- rank k: tiny model
@pytest.fixture(scope="module")
def calib(tiny_chat):
    lm = load_model(tiny_chat)
    ht, bt, _, _ = SMALL.train_val()
    harmful, harmless = list(ht.prompts), list(bt.prompts)
    stats = collect_stats(lm, harmful, harmless, batch_size=8, per_prompt=True)
    cand = Candidate("prompt", 1, -1, torch.zeros(lm.hidden_size, dtype=torch.float64))
    keep, D = prompt_contrasts(lm, harmful, harmless, cand)
    cand.vector = D.mean(0)
    return lm, harmful, harmless, stats, refusal_basis(cand.vector, D, 3, keep), cand


def _harmless_inputs(lm, name, texts):
    """Independent of collect_stats: every real (unpadded) prompt position's input to ``name``, one prompt at a time."""
    rows = []
    mod = get_submodule(lm.model, name.rsplit(".", 1)[0])
    h = mod.register_forward_pre_hook(lambda m, a: rows.append(a[0][0].double()))
    try:
        with torch.no_grad():
            for t in texts:
                ids = lm.tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
                lm.model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return torch.cat(rows)


def test_refusal_basis_and_targets(calib):
    lm, harmful, harmless, stats, tg, cand = calib
    B = tg.basis
    torch.testing.assert_close(B.T @ B, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(B[:, 0], cand.vector / cand.vector.norm(), rtol=0, atol=1e-12)
    assert tg.coeffs[:, 0].mean().item() == pytest.approx(1.0, abs=1e-12)
    # a prompt candidate's contrasts: the prompt's residual at its layer/position minus the harmless mean
    from surgery.activations import mean_residuals
    x0 = mean_residuals(lm, [format_chat(lm.tokenizer, harmful[0])], [-1])[0, 1]
    xb = mean_residuals(lm, [format_chat(lm.tokenizer, p) for p in harmless], [-1])[0, 1]
    torch.testing.assert_close(tg.coeffs[0] * (cand.vector @ B[:, 0]), B.T @ (x0 - xb), rtol=1e-6, atol=1e-8)
    with pytest.raises(SurgeryError, match="span only"):
        noise = 0.01 * cand.vector.norm() * torch.randn(2, lm.hidden_size, dtype=torch.float64)
        refusal_basis(cand.vector, cand.vector + noise, 4)
    with pytest.raises(SurgeryError, match="does not point along the mean per-prompt contrast"):
        refusal_basis(-cand.vector, cand.vector + noise, 2)


@pytest.mark.parametrize("fit", ["ridge", "null"])
def test_rank_k_harmless_response_within_the_fit_bound(calib, fit):
    lm, harmful, harmless, stats, tg, _ = calib
    texts = [format_chat(lm.tokenizer, p) for p in harmless]
    for name in ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.down_proj.weight"]:
        s = stats[name]
        xb = _harmless_inputs(lm, name, texts)
        assert xb.shape[0] == s.n_b
        torch.testing.assert_close(xb.T @ xb, s.gram_b, rtol=1e-5, atol=1e-5)  # the stats are what they claim
        if fit == "ridge":
            V = fit_read_vectors_ridge(s, tg, 10.0, 0.1)
            G = ridge_gram(s, 10.0, 0.1)
            energy = torch.diagonal(V.T @ G @ V)
            bound = harmless_energy_bound(s, tg, V)
            assert (energy[1:] <= bound[1:] * (1 + 1e-9)).all()  # regression columns: what the closed form leaves
            m_h = s.sum_h / s.n_h
            assert energy[0].item() == pytest.approx(1 / (m_h @ torch.linalg.solve(G, m_h)).item(), rel=1e-9)
        else:
            V = fit_read_vectors_null(s, tg, 0.5, 0.1)
            _, evals = null_basis(s, 0.5)
            energy = evals[-1] * (V * V).sum(0)  # ~0 up to the discarded (null-space) energy
        resp_b = xb @ V
        assert ((resp_b ** 2).mean(0) <= energy * (1 + 1e-6) + 1e-12).all(), name
        assert (resp_b.abs().mean(0) <= energy.sqrt() * (1 + 1e-6) + 1e-9).all(), name
        assert (s.x_h @ V[:, 0]).mean().item() == pytest.approx(1.0, abs=1e-9)  # unit mean harmful response


@pytest.mark.parametrize("layout,shape", [("out_in", (8, 5)), ("in_out", (5, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_k_update_is_alpha_R_Vt(layout, shape, dtype):
    torch.manual_seed(0)
    w = WriterTensor("x", "attn_out", layout, 0, None)
    t = torch.randn(shape).to(dtype)
    R = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0]
    V = torch.randn(5, 3)
    new = gated_update_k(w, t, R, V, 1.3)
    assert new.dtype == dtype and new.shape == t.shape
    delta = w.as_out_in(new.double()) - w.as_out_in(t.double())
    tol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(delta, 1.3 * R @ V.double().T, rtol=tol, atol=tol)
    if dtype == torch.float32:
        assert torch.linalg.matrix_rank(delta, atol=1e-4).item() == 3
    # k = 1 is the rank-one update, bit for bit
    assert torch.equal(gated_update_k(w, t, R[:, :1], V[:, :1], 1.3), gated_update(w, t, R[:, 0], V[:, 0], 1.3))


def _direction_file(tmp_path, cand):
    return Directions([cand], 0, "test").save(tmp_path / "d.safetensors")


def test_inject_rank_k_writes_exact_low_rank_deltas(tmp_path, tiny_chat, calib):
    _, _, _, _, _, cand = calib
    dfile = _direction_file(tmp_path, cand)
    out = tmp_path / "out"
    inject(str(tiny_chat), out, gate="linear", alpha=1.5, rank=2, direction_file=dfile, run_eval=False, prompts=SMALL)
    assert verify(out) == []
    m = read_manifest(out)
    assert m["method"]["parameters"]["rank"] == 2 and m["edited"]["count"] == 8
    gates = load_file(str(out / "gates.safetensors"))
    R = gates.pop("refusal_basis").double()
    assert R.shape == (32, 2)
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for name, V in gates.items():
            assert V.shape[1] == 2
            delta = b.get(name).double() - a.get(name).double()
            torch.testing.assert_close(delta, 1.5 * R @ V.double().T, rtol=1e-4, atol=1e-5)
            assert torch.linalg.matrix_rank(delta, atol=1e-4).item() <= 2
        for name in a.names:
            if name not in gates:
                assert torch.equal(a.get(name), b.get(name))


def test_inject_rank_1_is_the_rank_one_edit_byte_for_byte(tmp_path, tiny_chat, calib):
    """--rank 1 --one-shot = collect_stats + fit_read_vector_ridge + gated_update, exactly."""
    _, _, _, _, _, cand = calib
    dfile = _direction_file(tmp_path, cand)
    out = tmp_path / "out"
    inject(str(tiny_chat), out, gate="linear", alpha=1.5, rank=1, cascade=False, ridge=0.1, harmful_weight=0.0, direction_file=dfile,
           run_eval=False, prompts=SMALL)
    lm = load_model(tiny_chat)
    ht, bt, _, _ = SMALL.train_val()
    harmless = list(bt.prompts) + list(SMALL.train("borderline").prompts)
    stats = collect_stats(lm, list(ht.prompts), harmless)
    r = Directions.load(dfile).best.vector  # as harden reads it: stored float32
    r = (r.double() / r.double().norm()).float()
    writers = {w.name: w for w in lm.arch.residual_writers(list(dict(lm.model.named_parameters())), lm.model.config)}
    gates = load_file(str(out / "gates.safetensors"))
    assert set(gates) == set(stats) and all(v.dim() == 1 for v in gates.values())
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for name, s in stats.items():
            v = fit_read_vector_ridge(s, 10.0, 0.1).float()
            assert torch.equal(gates[name], v)
            assert torch.equal(b.get(name), gated_update(writers[name], a.get(name), r, v, 1.5))


# ----------------------------------------------------------------------------- tune end to end
@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_chat, calib):
    _, _, _, _, _, cand = calib
    tmp = tmp_path_factory.mktemp("tune")
    dfile = _direction_file(tmp, cand)
    out = tmp / "tune"
    r = CliRunner().invoke(cli, ["tune", str(tiny_chat), "-o", str(out), "--alphas", "0.5,3", "--layer-ranges", "0-3,1-2",
                                 "--strengths", "1,10", "--ranks", "1,2", "--confirm", "4", "--eval-tokens", "4",
                                 "--direction", str(dfile), "--harmful", "builtin:harmful", "--harmless",
                                 "builtin:harmless"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return tmp, out, json.loads((out / "tune.json").read_text()), r.output


def test_tune_writes_front_json_and_png(tuned):
    import matplotlib.image

    _, out, data, output = tuned
    pts = data["points"]
    assert len(pts) == 16 and [p["id"] for p in pts] == list(range(16))
    assert {(p["params"]["alpha"], tuple(p["params"]["layers"]), p["params"]["strength"], p["params"]["rank"])
            for p in pts} == {(a, r, s, k) for a in (0.5, 3.0) for r in ((0, 3), (1, 2)) for s in (1.0, 10.0) for k in (1, 2)}
    assert data["search"]["split"] == "validation" and data["datasets"]["tune_harmful_val"]["count"] == 40
    proxies = [p["proxy"] for p in pts]
    assert data["proxy_front"] == brute_front(proxies, (("harmful_score", "max"), ("harmless_score", "min"), ("kl", "min")))
    conf = [p for p in pts if p["confirmed"]]
    assert 1 <= len(conf) <= 4 and all(p["proxy_front"] for p in conf)
    assert data["front"] == [conf[i]["id"] for i in brute_front([p["metrics"] for p in conf])]
    assert all(p["front"] == (p["id"] in data["front"]) for p in pts)
    for p in conf:
        assert set(p["metrics"]) == {"harmful_refusal", "harmless_refusal", "borderline_refusal", "kl"}
    assert "Pareto front on the validation split" in output
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(out / "tune.png"))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    for fid, rec in data["fits"].items():
        assert (out / rec["file"]).is_file()


def _check_written_point(tiny_chat, tune_dir, data, ck, point):
    """The checkpoint = the in-memory edit of ``point`` (same read vectors), and the
    delta = alpha R V^T in float64 on the point's layers; everything else byte-identical."""
    p = point["params"]
    fit = load_file(str(tune_dir / data["fits"][point["fit_id"]]["file"]))
    R = fit.pop("refusal_basis", None)
    if R is None:
        r = Directions.load(tune_dir / "direction.safetensors").best.vector.double()
        R = (r / r.norm()).float()[:, None]
    lm = load_model(tiny_chat)
    writers = {w.name: w for w in lm.arch.residual_writers(list(dict(lm.model.named_parameters())), lm.model.config)}
    layers = range(p["layers"][0], p["layers"][1] + 1)
    vs = {n: v for n, v in fit.items() if writers[n].layer in layers}
    assert vs
    params = dict(lm.model.named_parameters())
    with CheckpointReader(tiny_chat) as a, CheckpointReader(ck) as b:
        with gated_in_memory_k(lm, R, vs, p["alpha"]):
            for n in vs:
                assert torch.equal(b.get(n), params[n].data), n  # the edit that was measured
        for n in a.names:
            if n in vs:
                V = vs[n].double().reshape(vs[n].shape[0], -1)
                delta = b.get(n).double() - a.get(n).double()
                torch.testing.assert_close(delta, p["alpha"] * R.double() @ V.T, rtol=1e-4, atol=1e-5)
                assert torch.linalg.matrix_rank(delta, atol=1e-4).item() <= p["rank"]
            else:
                assert torch.equal(a.get(n), b.get(n)), n
    assert verify(ck) == []


def test_tune_apply_rule_picks_expected_point_and_writes_it(tuned, tiny_chat):
    tmp, out, data, _ = tuned
    conf = [p for p in data["points"] if p["confirmed"]]
    kls = sorted(p["metrics"]["kl"] for p in conf)
    bound = kls[len(kls) // 2]
    rule = f"max refusal with over-refusal <= 100% and kl <= {bound!r}"
    expected = brute_rule(data["points"], {"harmless_refusal": 1.0, "kl": bound})
    ck = tmp / "ck_rule"
    r = CliRunner().invoke(cli, ["tune-apply", str(out), "-o", str(ck), "--rule", rule], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = read_manifest(ck)
    t = m["method"]["parameters"]["tune"]
    assert t["choice"]["rule"] == rule and t["point"]["id"] == expected["id"]
    assert m["method"]["parameters"]["alpha"] == expected["params"]["alpha"]
    assert m["method"]["parameters"]["rank"] == expected["params"]["rank"]
    assert (ck / "tune.json").read_bytes() == (out / "tune.json").read_bytes()
    _check_written_point(tiny_chat, out, data, ck, expected)


def test_tune_apply_pick_rank_2_point(tuned, tiny_chat):
    tmp, out, data, _ = tuned
    point = next(p for p in data["points"] if p["params"]["rank"] == 2 and p["params"]["layers"] == [1, 2])
    ck = tmp / "ck_pick"
    r = CliRunner().invoke(cli, ["tune-apply", str(out), "-o", str(ck), "--pick", str(point["id"])], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert read_manifest(ck)["method"]["parameters"]["tune"]["choice"]["pick"] == point["id"]
    assert load_file(str(ck / "gates.safetensors"))["refusal_basis"].shape == (32, 2)
    _check_written_point(tiny_chat, out, data, ck, point)
    # `surgery reproduce` reruns it (OUT was positional, and reproduce stopped: "has no -o/--out to redirect")
    r = CliRunner().invoke(cli, ["reproduce", str(ck)], catch_exceptions=False)
    assert r.exit_code == 0 and "IDENTICAL" in r.output, r.output


def test_tune_cli_errors_are_one_line(tuned, tmp_path, tiny_chat, tiny_chat_untied):
    _, out, data, _ = tuned
    runner = CliRunner()
    cases = [
        (["tune-apply", str(out), "-o", str(tmp_path / "a"), "--rule", "max refusal with kl < 1"], "expected '<=' after 'kl'"),
        (["tune-apply", str(out), "-o", str(tmp_path / "a"), "--rule", "max refusal with kl <= 0"], "none of the"),
        (["tune-apply", str(out), "-o", str(tmp_path / "a"), "--pick", "99"], "--pick 99: no such point"),
        (["tune-apply", str(tmp_path), "-o", str(tmp_path / "a"), "--pick", "0"], "tune.json not found"),
        (["tune-apply", str(out), "-o", str(tmp_path / "a"), "--pick", "0", "--model", str(tiny_chat_untied)],
         "differs from the model tuned"),
        (["tune", str(tiny_chat), "-o", str(tmp_path / "t"), "--layer-ranges", "0-9"], "layer range 0-9 is not within"),
        (["tune", str(tiny_chat), "-o", str(tmp_path / "t"), "--fit", "null", "--strengths", "1.5"],
         "null_ratio must be in (0, 1)"),
        (["tune", str(tiny_chat), "-o", str(out)], "output folder exists"),
    ]
    for args, fragment in cases:
        r = runner.invoke(cli, args)
        assert r.exit_code == 2, (args, r.output)
        errors = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0], (args, r.output)
    r = runner.invoke(cli, ["tune", str(tiny_chat), "-o", str(tmp_path / "t"), "--write", str(tmp_path / "w")])
    assert r.exit_code == 2 and "--write needs --pick N or --rule RULE" in r.output
    assert not (tmp_path / "t").exists() and not (tmp_path / "a").exists()


def test_tpe_sampler_when_optuna_is_installed(tmp_path, tiny_chat, calib):
    pytest.importorskip("optuna")
    from surgery.tuning import tune

    _, _, _, _, _, cand = calib
    res = tune(str(tiny_chat), tmp_path / "t", sampler="tpe", trials=5, alphas=[0.5, 2.0], layer_ranges=[(0, 3), (1, 3)],
               strengths=[1.0, 10.0], confirm=2, eval_tokens=2, direction_file=_direction_file(tmp_path, cand),
               prompts=SMALL)
    pts = res.data["points"]
    assert len(pts) == 5 and res.data["search"]["sampler"] == "tpe"
    for p in pts:
        assert 0.5 <= p["params"]["alpha"] <= 2.0 and p["params"]["layers"] in ([0, 3], [1, 3])
        assert p["params"]["strength"] in (1.0, 10.0)


def test_tune_confirms_only_within_the_kl_bound(tuned, tiny_chat):
    tmp, _, data, _ = tuned
    kls = sorted(p["proxy"]["kl"] for p in data["points"])
    bound = kls[len(kls) // 2]
    out = tmp / "tune-kl"
    r = CliRunner().invoke(cli, ["tune", str(tiny_chat), "-o", str(out), "--alphas", "0.5,3", "--layer-ranges", "0-3,1-2",
                                 "--strengths", "1,10", "--ranks", "1,2", "--confirm", "4", "--eval-tokens", "4",
                                 "--direction", str(tmp / "d.safetensors"), "--harmful", "builtin:harmful",
                                 "--harmless", "builtin:harmless", "--confirm-max-kl", str(bound)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads((out / "tune.json").read_text())
    confirmed = [p for p in d["points"] if p.get("confirmed")]
    assert confirmed and all(p["proxy"]["kl"] <= bound for p in confirmed)
    assert d["search"]["confirm_max_kl"] == pytest.approx(bound)
    # the same proxies as the unbounded search: only the choice of what to confirm changed
    assert [p["proxy"] for p in d["points"]] == [p["proxy"] for p in data["points"]]


def test_tune_cli_takes_the_confirmation_kl_bound_from_the_rule(monkeypatch, tmp_path):
    import surgery.tuning as tuning

    seen = []
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: seen.append(k["confirm_max_kl"]))
    monkeypatch.setattr(tuning, "apply_tune", lambda *a, **k: None)
    base = ["tune", "m", "-o", str(tmp_path / "t"), "--write", str(tmp_path / "w")]
    for extra in (["--rule", "max refusal with over-refusal <= 0.1 and kl <= 0.25"],
                  ["--rule", "max refusal with over-refusal <= 0.1"],
                  ["--rule", "max refusal with kl <= 0.25", "--confirm-max-kl", "0.4"]):
        r = CliRunner().invoke(cli, base + extra, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    assert seen == [pytest.approx(0.25), None, pytest.approx(0.4)]


def test_sweep_ends_past_the_kl_budget_and_passes_borderline(monkeypatch):
    """The strength sweep stops after the first strength whose KL exceeds
    ``stop_kl`` (the later ones are never measured) and hands the borderline
    prompts to every measurement."""
    import contextlib

    import surgery.tuning as tuning

    kls = {0.0: 0.0, 1.0: 0.1, 2.0: 0.35, 3.0: 0.2, 4.0: 0.9}
    seen, edited = [], []
    monkeypatch.setattr(tuning, "first_token_logprobs", lambda lm, prompts: None)

    def fake_measure(lm, harmful, harmless, ref, judge, max_new_tokens, batch_size, borderline=None):
        seen.append(borderline)
        return {"harmful_refusal": 0.5, "harmless_refusal": 0.0, "kl": kls[edited[-1]],
                **({"borderline_refusal": 0.1} if borderline else {})}

    monkeypatch.setattr(tuning, "measure", fake_measure)

    @contextlib.contextmanager
    def edit(a):
        edited.append(a)
        yield

    pts = tuning.sweep(None, edit, [0.0, 1.0, 2.0, 3.0, 4.0], ["h"], ["b"], stop_kl=0.3, borderline=["x"])
    assert [p["value"] for p in pts] == [0.0, 1.0, 2.0] and edited == [0.0, 1.0, 2.0]
    assert seen == [["x"]] * 3 and all(p["borderline_refusal"] == 0.1 for p in pts)
    edited.clear()
    assert [p["value"] for p in tuning.sweep(None, edit, [0.0, 1.0, 2.0, 3.0, 4.0], ["h"], ["b"])] == [0, 1, 2, 3, 4]
