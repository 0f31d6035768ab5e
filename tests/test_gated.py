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
    inject(str(tiny_chat), out, alpha=1.5, direction_file=dfile, run_eval=False, prompts=PromptConfig(n_train=8, n_val=4))
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
