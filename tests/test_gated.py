"""Gated injection groundwork (issue 6): the written delta is exactly rank one
and equal to alpha * r_hat * v^T in float64, and the fitted read vector
responds ~1 on harmful calibration inputs and ~0 on harmless ones."""
from __future__ import annotations

import pytest
import torch

from surgery.edits.gated import (GateStats, collect_stats, fit_read_vector, fit_read_vector_ridge,
                                 gated_in_memory, gated_update)
from surgery.architectures import WriterTensor
from surgery.model import load_model
from surgery.prompts import builtin


def _synthetic_stats(d=16, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    benign_dims = basis[:, : d // 2]          # harmless inputs live in half the space
    xb = torch.randn(n, d // 2, generator=g, dtype=torch.float64) @ benign_dims.T
    xh = xb[: n // 2] + 3.0 * basis[:, -1]    # harmful = benign + an offset outside that span
    post = xb[: n // 4]
    s = GateStats(sum_h=xh.sum(0), n_h=xh.shape[0], sum_b_post=post.sum(0), n_b_post=post.shape[0],
                  gram_b=xb.T @ xb, n_b=n, gram_b_post=post.T @ post)
    return s, xh, xb


@pytest.mark.parametrize("fit", ["null", "ridge"])
def test_read_vector_gates_harmful_from_harmless(fit):
    s, xh, xb = _synthetic_stats()
    v = fit_read_vector(s, 0.5) if fit == "null" else fit_read_vector_ridge(s, 10.0, 1e-6)
    assert (xh @ v).mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (xb @ v).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout,shape", [("out_in", (8, 5)), ("in_out", (5, 8))])
def test_gated_delta_is_rank_one_alpha_r_v(layout, shape):
    torch.manual_seed(0)
    w = WriterTensor("x", "attn_out", layout, 0, None)
    t = torch.randn(shape)
    r = torch.randn(8)
    r = r / r.norm()
    v = torch.randn(5)
    new = gated_update(w, t, r, v, 1.7)
    delta = w.as_out_in(new.double()) - w.as_out_in(t.double())
    torch.testing.assert_close(delta, 1.7 * torch.outer(r.double(), v.double()), rtol=1e-5, atol=1e-5)
    assert torch.linalg.matrix_rank(delta, atol=1e-4).item() == 1


def test_gate_on_tiny_model_calibration_inputs(tiny_chat):
    lm = load_model(tiny_chat)
    harmful = list(builtin("harmful", "train").prompts[:12])
    harmless = list(builtin("harmless", "train").prompts[:12])
    stats = collect_stats(lm, harmful, harmless, batch_size=6)
    assert len(stats) == 2 * lm.num_layers
    for name, s in stats.items():
        v = fit_read_vector_ridge(s, 10.0, 1e-3)
        m_h = s.sum_h / s.n_h
        assert m_h @ v == pytest.approx(1.0, abs=1e-6)
        # the fit minimises the harmless energy among read vectors with unit harmful response:
        # it beats the naive choice along the harmful mean (a random model separates little)
        g = s.gram_b / s.n_b + 10.0 * s.gram_b_post / s.n_b_post
        naive = m_h / (m_h @ m_h)
        assert (v @ g @ v).item() <= (naive @ g @ naive).item() * (1 + 1e-6), name
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    vs = {k: fit_read_vector_ridge(s) for k, s in stats.items()}
    with gated_in_memory(lm, torch.randn(lm.hidden_size), vs, 1.0):
        changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == sorted(stats)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_inject_pipeline_writes_exact_rank_one_deltas(tmp_path, tiny_chat):
    from safetensors.torch import load_file

    from surgery.checkpoint import CheckpointReader
    from surgery.directions import Candidate, Directions
    from surgery.manifest import read_manifest, verify
    from surgery.pipeline import PromptConfig, inject

    torch.manual_seed(0)
    dfile = Directions([Candidate("response", 1, "reply[0:4]", torch.randn(32, dtype=torch.float64))], 0, "t").save(
        tmp_path / "d.safetensors")
    out = tmp_path / "out"
    inject(str(tiny_chat), out, gate="linear", alpha=1.5, direction_file=dfile, run_eval=False, prompts=PromptConfig(n_train=8, n_val=4))
    assert verify(out) == []
    m = read_manifest(out)
    assert m["method"]["name"] == "gated-injection" and m["edited"]["count"] == 8
    vs = load_file(str(out / "gates.safetensors"))
    r = Directions.load(dfile).best.vector
    r = r / r.norm()
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for name, v in vs.items():
            delta = b.get(name).double() - a.get(name).double()
            torch.testing.assert_close(delta, 1.5 * torch.outer(r, v.double()), rtol=1e-4, atol=1e-5)
        for name in a.names:
            if name not in vs:
                assert torch.equal(a.get(name), b.get(name))


def test_harmless_replies_extend_only_the_harmless_second_moment(tiny_chat):
    lm = load_model(tiny_chat)
    harmful = list(builtin("harmful", "train").prompts[:4])
    harmless = list(builtin("harmless", "train").prompts[:4])
    a = collect_stats(lm, harmful, harmless, batch_size=4)
    b = collect_stats(lm, harmful, harmless, batch_size=4, harmless_replies=["Sure , here is how"] * 4)
    for k in a:
        assert b[k].n_h == a[k].n_h and torch.allclose(b[k].sum_h, a[k].sum_h)
        assert b[k].n_b_post == a[k].n_b_post and torch.allclose(b[k].sum_b_post, a[k].sum_b_post)
        assert b[k].n_b > a[k].n_b


def test_harmful_weight_trades_harmless_energy_for_an_even_harmful_response(tiny_chat):
    """``harmful_weight`` adds the harmful prompts' covariance to the ridge fit's
    G: the read vector is ``(G + w C_h)^-1 m_h`` normalised (float64 recomputation),
    keeps a unit harmful mean, and raising w can only lower the prompt-to-prompt
    spread of the harmful response (and only raise the harmless energy)."""
    from surgery.edits.gated import fit_gates

    lm = load_model(tiny_chat)
    harmful = list(builtin("harmful", "train").prompts[:16])
    harmless = list(builtin("harmless", "train").prompts[:16])
    stats = collect_stats(lm, harmful, harmless, batch_size=8, per_prompt=True)
    vs0 = fit_gates(stats, post_weight=10.0, ridge=0.05)
    vs3 = fit_gates(stats, post_weight=10.0, ridge=0.05, harmful_weight=3.0)
    for name, s in stats.items():
        m_h = s.sum_h / s.n_h
        xc = s.x_h - s.x_h.mean(0)
        c = xc.T @ xc / xc.shape[0]
        g = s.gram_b / s.n_b + 10.0 * s.gram_b_post / s.n_b_post
        g_w = g + 3.0 * c
        g_w = g_w + 0.05 * torch.trace(g_w) / g_w.shape[0] * torch.eye(g_w.shape[0], dtype=torch.float64)
        ref = torch.linalg.solve(g_w, m_h)
        ref = ref / (m_h @ ref)
        torch.testing.assert_close(vs3[name].double(), ref, rtol=1e-4, atol=1e-6)
        v0, v3 = vs0[name].double(), vs3[name].double()
        assert (m_h @ v3).item() == pytest.approx(1.0, abs=1e-4)
        assert (v3 @ c @ v3).item() <= (v0 @ c @ v0).item() * (1 + 1e-3), name
    with pytest.raises(Exception, match="per-prompt"):
        fit_gates(collect_stats(lm, harmful[:4], harmless[:4], batch_size=4), harmful_weight=1.0)


@pytest.mark.parametrize("harmful_weight", [0.0, 2.0])
def test_cascade_fit_is_the_one_shot_fit_of_the_edited_model(tiny_chat, harmful_weight):
    """The cascade fits each matrix on the inputs it gets once every earlier matrix
    is edited.  A matrix's input never depends on itself or on later matrices, so
    refitting every gate one-shot on the *edited* model must give the same read
    vectors back; and the first matrix (nothing before it) equals the plain fit."""
    from surgery.edits.gated import _writer_modules, fit_gates, fit_gates_cascade

    lm = load_model(tiny_chat)
    harmful = list(builtin("harmful", "train").prompts[:10])
    harmless = list(builtin("harmless", "train").prompts[:14])
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    torch.manual_seed(0)
    r = torch.randn(lm.hidden_size)
    kw = dict(post_weight=10.0, ridge=0.05, harmful_weight=harmful_weight)
    per_prompt = harmful_weight > 0
    vs = fit_gates_cascade(lm, harmful, harmless, r, 2.0, **kw)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())  # restored
    names = [w.name for w in _writer_modules(lm)]
    assert list(vs) == names
    plain = fit_gates(collect_stats(lm, harmful, harmless, batch_size=32, per_prompt=per_prompt), **kw)
    first = next(n for n in names if ".0.self_attn." in n)  # runs before every other writer
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(vs[first], plain[first]) < 1e-4
    assert rel(vs[names[-1]], plain[names[-1]]) > 1e-2  # the edits did move the later inputs
    with gated_in_memory(lm, r, vs, 2.0):
        refit = fit_gates(collect_stats(lm, harmful, harmless, batch_size=32, per_prompt=per_prompt), **kw)
    for n in names:
        assert rel(refit[n], vs[n]) < 1e-4, n


def test_cascade_inject_writes_the_chosen_strengths_fit(tmp_path, tiny_chat):
    from safetensors.torch import load_file

    from surgery.checkpoint import CheckpointReader
    from surgery.directions import Candidate, Directions
    from surgery.manifest import read_manifest
    from surgery.pipeline import PromptConfig, inject

    torch.manual_seed(0)
    dfile = Directions([Candidate("response", 1, "reply[0:4]", torch.randn(32, dtype=torch.float64))], 0, "t").save(
        tmp_path / "d.safetensors")
    out = tmp_path / "out"
    prompts = PromptConfig(n_train=8, n_val=4)
    inject(str(tiny_chat), out, gate="linear", alpha=1.5, direction_file=dfile, run_eval=False, cascade=True, prompts=prompts)
    m = read_manifest(out)
    assert m["method"]["parameters"]["cascade"] is True and m["edited"]["count"] == 8
    vs = load_file(str(out / "gates.safetensors"))
    r = Directions.load(dfile).best.vector
    r = r / r.norm()
    # the written read vectors are the cascade fit at the chosen strength (inject's defaults), all 8 of them
    from surgery.defaults import INJECT_DEFAULTS
    from surgery.edits.gated import fit_gates_cascade

    ht, bt, _, _ = prompts.train_val()
    harmless = list(bt.prompts) + list(prompts.train("borderline").prompts)
    ref = fit_gates_cascade(load_model(tiny_chat), list(ht.prompts), harmless, r, 1.5,
                            **{k: v for k, v in INJECT_DEFAULTS.items() if k != "cascade"})
    assert sorted(vs) == sorted(ref) and len(vs) == 8
    for name, v in ref.items():
        assert ((vs[name] - v).norm() / v.norm()).item() < 1e-5, name
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for name, v in vs.items():
            torch.testing.assert_close(b.get(name).double() - a.get(name).double(), 1.5 * torch.outer(r, v.double()),
                                       rtol=1e-4, atol=1e-5)
