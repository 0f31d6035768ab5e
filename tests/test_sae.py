"""Sparse autoencoders: SAELens-layout I/O (ours and hand-written SAELens
folders, both cfg dialects, the Hub with subfolders), TopK training against an
independent float64 recomputation, the SAILS safety subspace against numpy SVD
on planted features, activation collection against HF hidden states, the CLI
on the tiny chat model, and bad inputs."""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from surgery.cli import main as cli
from surgery.sae import (SAE, SAEError, SafetySubspace, collect_activations, evaluate_sae, load_sae, random_sae,
                         safety_subspace, train_sae)
from surgery.sae.model import layer_of_hook
from surgery.sae.subspace import subspace_rank


pytestmark = pytest.mark.usefixtures("one_thread")


def _sae(activation: str, d_in=8, d_sae=12, seed=0, hook="blocks.3.hook_resid_pre") -> SAE:
    g = torch.Generator().manual_seed(seed)
    thr = torch.rand(d_sae, generator=g) * 0.3 if activation == "jumprelu" else None
    return SAE(torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, generator=g) * 0.1,
               torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g) * 0.1, activation=activation,
               k=3 if activation == "topk" else None, threshold=thr, hook_name=hook, model_name="tiny")


def np_encode(x, W_enc, b_enc, b_dec, apply_b_dec, act, k=None, thr=None):
    """Independent numpy formulas (float64)."""
    x = np.asarray(x, np.float64)
    h = (x - (b_dec if apply_b_dec else 0)) @ W_enc + b_enc
    if act == "relu":
        return np.maximum(h, 0)
    if act == "jumprelu":
        return np.where(h > thr, np.maximum(h, 0), 0.0)
    out = np.zeros_like(h)
    idx = np.argsort(-h, axis=-1, kind="stable")[:, :k]
    rows = np.arange(h.shape[0])[:, None]
    out[rows, idx] = np.maximum(h[rows, idx], 0)
    return out


# ---------------------------------------------------------------------------- SAE I/O
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_save_load_round_trip(tmp_path, activation):
    sae = _sae(activation)
    sae.info = {"note": "x"}
    out = sae.save(tmp_path / "s")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = load_sae(out)
    for name, t in sae.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    assert (back.activation, back.k, back.hook_name, back.model_name, back.apply_b_dec_to_input, back.info) == \
        (activation, sae.k, "blocks.3.hook_resid_pre", "tiny", True, {"note": "x"})
    x = torch.randn(5, 8)
    assert torch.equal(back.encode(x), sae.encode(x))
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 12 and cfg["hook_layer"] == 3
    assert cfg["architecture"] == {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[activation]
    if activation == "topk":
        assert cfg["k"] == 3 and cfg["activation_fn_kwargs"] == {"k": 3}
    with pytest.raises(SAEError, match="exists"):
        sae.save(out)
    _sae(activation, seed=1).save(out, overwrite=True)
    assert not torch.equal(load_sae(out).W_enc, sae.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary leftovers


def _write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _weights(d_in, d_sae, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g).to(dtype), "b_enc": (torch.randn(d_sae, generator=g) * .2).to(dtype),
            "W_dec": torch.randn(d_sae, d_in, generator=g).to(dtype), "b_dec": (torch.randn(d_in, generator=g) * .2).to(dtype)}


def _check_formula(sae: SAE, w: dict, apply_b_dec, act, k=None, thr=None):
    x = torch.randn(7, w["W_enc"].shape[0], generator=torch.Generator().manual_seed(9))
    n = {key: v.double().numpy() for key, v in w.items()}
    a = np_encode(x.numpy(), n["W_enc"], n["b_enc"], n["b_dec"], apply_b_dec, act, k, thr)
    np.testing.assert_allclose(sae.encode(x).double().numpy(), a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x).double().numpy(), a @ n["W_dec"] + n["b_dec"], rtol=1e-4, atol=1e-4)


def test_loads_handwritten_saelens_folders(tmp_path):
    # SAELens < 6, Gemma Scope style: JumpReLU, no b_dec on the input, bf16 weights, resid_post hook.
    w = _weights(8, 16, 1, torch.bfloat16)
    thr = (torch.rand(16, generator=torch.Generator().manual_seed(2)) * 0.5).to(torch.bfloat16)
    cfg = {"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "dtype": "bfloat16", "model_name": "gemma-2-2b",
           "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "hook_head_index": None, "activation_fn_str": "relu",
           "apply_b_dec_to_input": False, "finetuning_scaling_factor": False, "normalize_activations": None,
           "prepend_bos": True, "context_size": 1024, "device": "cpu"}
    sae = load_sae(_write_saelens(tmp_path / "jr", cfg, {**w, "threshold": thr}))
    assert sae.activation == "jumprelu" and not sae.apply_b_dec_to_input and sae.layer == 4
    _check_formula(sae, w, False, "jumprelu", thr=thr.double().numpy())
    # SAELens >= 6: architecture topk, k at the top, hook under metadata.
    w = _weights(8, 16, 3)
    cfg = {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 4, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "m", "hook_name": "blocks.2.hook_resid_pre", "sae_lens_version": "6.5.0"}}
    sae = load_sae(_write_saelens(tmp_path / "tk", cfg, w))
    assert (sae.activation, sae.k, sae.layer, sae.model_name) == ("topk", 4, 2, "m")
    _check_formula(sae, w, True, "topk", k=4)
    # SAELens < 6 standard ReLU, and TopK expressed as an activation function.
    w = _weights(8, 16, 4)
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "activation_fn_str": "relu",
           "hook_name": "blocks.1.hook_resid_pre", "hook_layer": 1, "normalize_activations": False}
    _check_formula(load_sae(_write_saelens(tmp_path / "std", cfg, w)), w, True, "relu")
    cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 2})
    _check_formula(load_sae(_write_saelens(tmp_path / "std_topk", cfg, w)), w, True, "topk", k=2)


@pytest.mark.parametrize("change,match", [
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"architecture": "gated"}, "not supported"),
    ({"d_sae": 17}, "W_enc has shape"),
    ({"architecture": "topk"}, "integer k"),
])
def test_bad_saelens_cfg(tmp_path, change, match):
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": "blocks.1.hook_resid_pre", **change}
    with pytest.raises(SAEError, match=match):
        load_sae(_write_saelens(tmp_path / "bad", cfg, _weights(8, 16, 0)))


def test_bad_folders(tmp_path):
    w = _weights(8, 16, 0)
    del w["W_dec"]
    with pytest.raises(SAEError, match="tensor W_dec is missing"):
        load_sae(_write_saelens(tmp_path / "a", {"d_in": 8, "d_sae": 16}, w))
    with pytest.raises(SAEError, match="neither a folder nor a Hub id"):
        load_sae(str(tmp_path / "nothing" / "here"))
    _sae("relu").save(tmp_path / "many" / "l1")
    _sae("relu").save(tmp_path / "many" / "l2")
    with pytest.raises(SAEError, match=r"several SAEs \(l1, l2\)"):
        load_sae(tmp_path / "many")
    assert load_sae(tmp_path / "many", subfolder="l2").d_sae == 12


def test_hub_repo_with_subfolders(tmp_path, monkeypatch):
    import huggingface_hub

    repo = tmp_path / "remote"
    _sae("topk", hook="blocks.3.hook_resid_pre").save(repo / "res" / "layer_3")
    _sae("relu", hook="blocks.5.hook_resid_pre").save(repo / "res" / "layer_5")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, tuple(allow_patterns)))
        assert repo_id == "owner/saes"
        local = tmp_path / f"snap{len(calls)}"
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, local / rel)
        local.mkdir(exist_ok=True)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_sae("owner/saes/res/layer_3").layer == 3
    assert load_sae("owner/saes", subfolder="res/layer_5").activation == "relu"
    with pytest.raises(SAEError, match=r"several SAEs \(layer_3, layer_5\); choose one as"):
        load_sae("owner/saes/res")
    # only small cfg files are listed before the one chosen SAE's weights are fetched
    assert all("safetensors" not in p for p in calls[0][1])

    def offline(**kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SAEError, match="cannot fetch SAE owner/saes/x from the Hub"):
        load_sae("owner/saes/x")


def test_check_against():
    sae = _sae("topk", d_in=8, hook="blocks.3.hook_resid_pre")
    sae.check_against(8, 6, 3)
    with pytest.raises(SAEError, match="d_in=8 but the model has hidden size 16"):
        sae.check_against(16, 6, 3)
    with pytest.raises(SAEError, match=r"hooked at layer 3 .* but layer 4"):
        sae.check_against(8, 6, 4)
    with pytest.raises(SAEError, match="out of range"):
        sae.check_against(8, 3, 3)
    with pytest.raises(SAEError, match="not a residual-stream input"):
        _sae("relu", hook="blocks.3.hook_mlp_out").check_against(8, 6, 3)
    assert layer_of_hook("blocks.3.hook_resid_post") == 4 and layer_of_hook("blocks.0.hook_resid_pre") == 0


# ---------------------------------------------------------------------------- training
def _sparse_data(n=4096, d=32, m=48, active=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(m, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    idx = torch.argsort(torch.rand(n, m, generator=g), dim=1)[:, :active]
    codes = torch.zeros(n, m).scatter(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ dic + 0.5


@pytest.fixture(scope="module")
def trained():
    x = _sparse_data()
    sae, metrics = train_sae(x, 96, 4, steps=400, batch_size=256, seed=0)
    return x, sae, metrics


def test_train_sae_reconstructs_sparse_data(trained):
    x, sae, m = trained
    assert m["explained_variance"] > 0.9
    assert sae.activation == "topk" and sae.k == 4 and sae.d_sae == 96 and sae.d_in == 32
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96), rtol=0, atol=1e-5)
    # independent float64 recomputation of the metrics from the weights
    n = {k: v.double().numpy() for k, v in sae.tensors().items()}
    X = x.double().numpy()
    a = np_encode(X, n["W_enc"], n["b_enc"], n["b_dec"], True, "topk", k=4)
    xh = a @ n["W_dec"] + n["b_dec"]
    ev = 1 - ((X - xh) ** 2).sum() / ((X - X.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert m["mean_l0"] == pytest.approx((a != 0).sum(1).mean(), abs=1e-3)
    assert m["dead_fraction"] == pytest.approx(((a != 0).sum(0) == 0).mean())
    assert m["samples"] == 4096 and m["training"]["steps"] == 400


def test_train_sae_is_deterministic(trained):
    x, sae, _ = trained
    x = x[:1024]
    a, _ = train_sae(x, 96, 4, steps=40, seed=3)
    b, _ = train_sae(x, 96, 4, steps=40, seed=3)
    c, _ = train_sae(x, 96, 4, steps=40, seed=4)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.W_dec, c.W_dec)


def test_evaluate_counts_dead_latents():
    sae = random_sae(4, 6, "relu")
    sae.b_enc = torch.tensor([0, 0, 0, 0, -1e6, -1e6], dtype=torch.float32)  # two latents can never fire
    assert evaluate_sae(sae, torch.randn(64, 4))["dead_latents"] == 2


@pytest.mark.parametrize("acts,d_sae,k,match", [
    (torch.zeros(0, 8), 16, 4, "empty corpus"),
    (torch.zeros(10, 8), 16, 17, "k=17 is larger than d_sae=16"),
    (torch.zeros(8), 16, 4, r"\(N, d\)"),
    (torch.full((4, 8), float("nan")), 16, 4, "non-finite"),
])
def test_train_sae_bad_inputs(acts, d_sae, k, match):
    with pytest.raises(SAEError, match=match):
        train_sae(acts, d_sae, k, steps=1)


# ---------------------------------------------------------------------------- subspace
def _orthonormal_sae(d=24, d_sae=16, seed=0) -> SAE:
    q, _ = torch.linalg.qr(torch.randn(d, d_sae, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    w_dec = q.T.float().contiguous()  # orthonormal unit rows: feature i reads and writes direction i
    return SAE(w_dec.T.contiguous(), torch.zeros(d_sae), w_dec, torch.zeros(d), activation="relu",
               hook_name="blocks.2.hook_resid_pre")


def test_subspace_spans_planted_features():
    sae = _orthonormal_sae()
    g = torch.Generator().manual_seed(5)
    codes = torch.rand(60, 16, generator=g)
    harmless = codes[:30] @ sae.W_dec
    planted = [3, 7, 11]
    boost = torch.zeros(30, 16)
    boost[:, planted] = torch.tensor([3.0, 2.0, 1.0])  # distinct scores: 3 > 7 > 11
    boost[4, 7] = 9.0  # harmful prompt 4 fires feature 7 the most
    harmful = (codes[30:] + boost) @ sae.W_dec
    texts = [f"harmful {i}" for i in range(30)] + [f"harmless {i}" for i in range(30)]
    sub = safety_subspace(sae, harmful, harmless, k_features=3, variance=0.8, texts=texts, top_n=2)
    assert sub.feature_ids.tolist() == planted
    ref = (codes[30:] + boost).double().mean(0) - codes[:30].double().mean(0)
    torch.testing.assert_close(sub.scores, ref[planted].abs(), rtol=1e-5, atol=1e-5)
    # three orthogonal unit directions of equal energy: 2/3 < 0.8, so r = 3 and U spans exactly them
    assert sub.rank == 3
    torch.testing.assert_close(sub.U.T @ sub.U, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-10)
    P = sub.projector()
    D = sae.W_dec[planted].double()
    torch.testing.assert_close(D @ P, D, rtol=0, atol=1e-5)
    assert sub.top_texts[7][0]["text"] == "harmful 4"
    assert len(sub.top_texts[3]) == 2 and all(t["activation"] > 0 for t in sub.top_texts[3])


def test_subspace_rank_and_basis_match_numpy_svd(tmp_path):
    sae = random_sae(16, 40, "relu", seed=2)
    g = torch.Generator().manual_seed(6)
    sae.b_enc = torch.rand(40, generator=g) * 0.1
    harmful, harmless = torch.randn(50, 16, generator=g) + 0.5, torch.randn(50, 16, generator=g)
    sub = safety_subspace(sae, harmful, harmless, k_features=12, variance=0.8)
    # independent: scores, top-12 features, uncentred SVD of unit rows, smallest r reaching 80%
    a_h = np.maximum(harmful.double().numpy() @ sae.W_enc.double().numpy() + sae.b_enc.double().numpy(), 0)
    a_b = np.maximum(harmless.double().numpy() @ sae.W_enc.double().numpy() + sae.b_enc.double().numpy(), 0)
    score = np.abs(a_h.mean(0) - a_b.mean(0))
    ids = np.argsort(-score, kind="stable")[:12]
    assert sub.feature_ids.tolist() == ids.tolist()
    D = sae.W_dec.double().numpy()[ids]
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    _, s, vt = np.linalg.svd(D, full_matrices=False)
    r = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.8)) + 1
    assert sub.rank == r and 1 < r < 12 and sub.explained >= 0.8
    U = sub.U.numpy()
    np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(U @ U.T, vt[:r].T @ vt[:r], atol=1e-8)
    assert subspace_rank(torch.tensor([1.0, 1.0]), 0.5) == 1 and subspace_rank(torch.tensor([1.0, 1.0]), 0.51) == 2
    # save -> load round trip
    path = sub.save(tmp_path / "sub")
    back = SafetySubspace.load(path)
    assert back.feature_ids.tolist() == sub.feature_ids.tolist() and back.rank == r and back.variance == 0.8
    torch.testing.assert_close(back.U, sub.U, rtol=0, atol=1e-6)
    torch.testing.assert_close(back.scores, sub.scores, rtol=1e-6, atol=1e-7)
    assert back.meta["k_features"] == 12
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["rank"] == r and meta["centered"] is False and len(meta["features"]) == 12


def test_subspace_bad_inputs():
    sae = random_sae(16, 40, "relu")
    x = torch.randn(5, 16)
    with pytest.raises(SAEError, match="width 8 but the SAE"):
        safety_subspace(sae, torch.randn(5, 8), x)
    with pytest.raises(SAEError, match="no harmless activations"):
        safety_subspace(sae, x, torch.randn(0, 16))
    with pytest.raises(SAEError, match="no SAE feature"):
        safety_subspace(sae, x, x)
    with pytest.raises(SAEError, match="3 texts for 10"):
        safety_subspace(sae, x, x + 1, texts=["a", "b", "c"])


# ---------------------------------------------------------------------------- model: collection and CLI
@pytest.fixture(scope="module")
def tiny_lm(tiny_chat):
    from surgery.model import load_model

    return load_model(tiny_chat, device="cpu")


def test_collect_activations_matches_hidden_states(tiny_lm):
    lm = tiny_lm
    texts = ["How do I bake bread ?", "Tell me a story", "Write a poem about the sea please now"]
    acts, index = collect_activations(lm, texts, [2, 0], positions="all", batch_size=2, return_index=True)
    last = collect_activations(lm, texts, [2], positions="last", batch_size=3)
    picked = collect_activations(lm, texts, [2], positions=[0, -2], batch_size=3)
    skipped, skipped_index = collect_activations(lm, texts, [2], batch_size=2, skip_first=2, return_index=True)
    refs = []
    with torch.no_grad():
        for t in texts:  # each text alone, no padding: HF's own hidden_states[l] = input of layer l
            ids = lm.tokenizer(t, add_special_tokens=False, return_tensors="pt")
            refs.append(lm.model(**ids, output_hidden_states=True).hidden_states)
    for layer in (0, 2):
        ref = torch.cat([h[layer][0] for h in refs])
        assert acts[layer].shape == ref.shape and acts[layer].dtype == torch.float32
        torch.testing.assert_close(acts[layer], ref, rtol=1e-4, atol=1e-4)
    assert index.tolist() == [i for i, h in enumerate(refs) for _ in range(h[0].shape[1])]
    torch.testing.assert_close(last[2], torch.stack([h[2][0, -1] for h in refs]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(picked[2], torch.cat([h[2][0, [0, -2]] for h in refs]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(skipped[2], torch.cat([h[2][0, 2:] for h in refs]), rtol=1e-4, atol=1e-4)
    assert skipped_index.tolist() == [i for i, h in enumerate(refs) for _ in range(h[0].shape[1] - 2)]
    with pytest.raises(SAEError, match="out of range"):
        collect_activations(lm, texts, [4])
    with pytest.raises(SAEError, match="too few for position -9"):
        collect_activations(lm, texts, [1], positions=[-9])
    with pytest.raises(SAEError, match="empty corpus"):
        collect_activations(lm, [], [1])


def test_cli_sae_train_end_to_end(tiny_chat, tmp_path):
    out = tmp_path / "saes"
    args = ["sae", "train", str(tiny_chat), "--layers", "1,3", "-o", str(out), "--d-sae", "64", "--k", "4",
            "--steps", "30", "--limit", "4", "--max-new-tokens", "3", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "explained variance" in res.output
    for layer in (1, 3):
        sae = load_sae(out / f"layer_{layer}")
        sae.check_against(32, 4, layer)
        assert (sae.activation, sae.k, sae.d_sae, sae.hook_name) == ("topk", 4, 64, f"blocks.{layer}.hook_resid_pre")
        cfg = json.loads((out / f"layer_{layer}" / "cfg.json").read_text())
        corpus = cfg["surgery"]["corpus"]
        assert corpus["texts"] == 8 and len(corpus["sha256"]) == 64 and cfg["surgery"]["skip_first"] == 1
        assert [s["source"] for s in corpus["sources"]] == ["builtin:harmful[train]|subset(n=4,seed=0)",
                                                             "builtin:harmless[train]|subset(n=4,seed=0)"]
        m = cfg["surgery"]["metrics"]
        assert 0 <= m["dead_fraction"] <= 1 and 0 < m["mean_l0"] <= 4 and m["explained_variance"] <= 1
    # the same folder again: refused before any work, unless --overwrite
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "output folder exists" in res.output
    # bad inputs fail with one line, exit 2, before training
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "1", "-o", str(tmp_path / "x"),
                                   "--d-sae", "16", "--k", "32"])
    assert res.exit_code == 2 and "k=32 is larger than d_sae=16" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "1", "-o", str(tmp_path / "y"),
                                   "--corpus", str(empty)])
    assert res.exit_code == 2 and "empty" in res.output
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "7", "-o", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--layers [7] out of range" in res.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
    # never into an input folder, and --overwrite replaces only an earlier SAE (it deleted a user's folder)
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "1", "-o", str(tiny_chat)])
    assert res.exit_code == 2 and "is inside the input" in res.output and not (Path(tiny_chat) / "layer_1").exists()
    mine = tmp_path / "mine" / "layer_1"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "1", "-o", str(tmp_path / "mine"),
                                   "--overwrite"])
    assert res.exit_code == 2 and "is not an SAE folder" in res.output and (mine / "notes.txt").read_text() == "precious"


def test_cli_sae_train_on_corpus_file(tiny_chat, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["How do I bake bread ?", "Tell me a story", "Write a poem"] * 4))
    res = CliRunner().invoke(cli, ["sae", "train", str(tiny_chat), "--layers", "2", "-o", str(tmp_path / "o"),
                                   "--d-sae", "32", "--k", "2", "--steps", "10", "--corpus", str(corpus), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)["2"]
    cfg = json.loads((tmp_path / "o" / "layer_2" / "cfg.json").read_text())
    assert cfg["surgery"]["corpus"]["texts"] == 12 and cfg["surgery"]["metrics"] == metrics


@pytest.mark.parametrize("args,match", [
    (["--steps", "5", "--epochs", "2"], "give steps or epochs, not both (--steps, --epochs)"),
    (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"), (["--k", "0"], "--k"), (["--d-sae", "0"], "--d-sae"), (["--expansion", "0"], "--expansion"),
    (["--limit", "0"], "--limit"), (["--max-new-tokens", "0"], "--max-new-tokens"), (["--skip-first", "-1"], "--skip-first"),
])
def test_cli_sae_train_checks_options_before_any_work(tmp_path, args, match):
    """Refused before the model is even resolved (it does not exist here), with one line and exit 2."""
    res = CliRunner().invoke(cli, ["sae", "train", str(tmp_path / "no-model"), "--layers", "1",
                                   "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and match in res.output and "no-model" not in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()
