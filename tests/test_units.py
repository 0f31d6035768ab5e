"""SSAH units: the GQA value-row mapping against transformers' own attention,
attribution against a float64 recomputation from captured inputs, the
classification rules on a constructed score table, the protect restore on a
tiny (aligned, fine-tuned) pair (only whole units change, copied byte for byte,
the GQA "all" rule), the LoRA unit mask after optimiser steps, the CLI, and bad
inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.checkpoint import CheckpointReader
from surgery.cli import main as cli
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from surgery.model import load_model
from surgery.units import (CLASSES, Example, MatrixUnits, Rules, RunningMoments, UnitMap, apply_mask, attribute,
                           check_supported, classify, live_matrices, protect, unit_mask)
from surgery.units.classify import CODE
from tiny_models import make_tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def perturbed_copy(src: Path, dst: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """A 'fine-tune': every tensor of ``src`` moved by noise (aux files copied)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for f in dst.glob("*.safetensors"):
        sd = load_file(str(f))
        save_file({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()},
                  str(f), metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------- GQA value rows
SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "olmo2"]


def _fake_lm(model):
    from surgery.architectures import get_architecture

    lm = type("LM", (), {})()
    lm.model, lm.arch, lm.config = model, get_architecture(model.config), model.config
    return lm


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_value_rows_match_transformers_attention(model_type):
    """Perturbing value row r changes exactly the o_proj input channels ``readers(r)``
    (4 query heads, 2 kv heads, head_dim 8: each row is read by 2 channels), in
    transformers' own implementation of every supported architecture."""
    from tiny_models import make_tiny_model

    model = make_tiny_model(model_type)
    mats = {m.key: m for m in live_matrices(_fake_lm(model))}
    m = mats["layers.1.attn"]
    assert (m.n_units, m.head_dim, m.group, m.n_rows) == (32, 8, 2, 16)
    o_proj, v_proj = model.get_submodule(m.module), model.get_submodule(m.producer_modules[0])
    assert m.producer_modules[0].endswith("self_attn.v_proj")
    seen = {}
    h = o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].clone()))
    ids = torch.tensor([[5, 9, 17, 3, 44, 2]])
    try:
        with torch.no_grad():
            model(input_ids=ids)
            base = seen["x"][0]
            for r in range(16):
                v_proj.weight[r] += 1.0
                model(input_ids=ids)
                v_proj.weight[r] -= 1.0
                changed = sorted(int(j) for j in torch.nonzero((seen["x"][0] - base).abs().amax(dim=0) > 1e-6).flatten())
                assert changed == m.readers(r), r
                assert all(m.producer_row(j) == r for j in changed)
    finally:
        h.remove()
    # the "all" rule: a shared row comes along only with every channel that reads it
    assert m.producer_rows([0, 8, 17]) == [0]
    assert m.producer_rows([0, 8, 17, 25]) == [0, 9]
    assert m.producer_rows([17]) == []
    mlp = mats["layers.1.mlp"]
    assert mlp.producer_rows([3, 7]) == [3, 7] and mlp.readers(5) == [5]


@pytest.mark.parametrize("model_type", ["phi3", "gpt2", "gpt_neox", "mixtral", "qwen2_moe"])
def test_unsupported_architectures_raise(model_type):
    with pytest.raises(SurgeryError, match=f"model_type '{model_type}' is not supported") as e:
        check_supported(model_type)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- attribution
def test_running_moments_match_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64) * 3 + 10
    mom = RunningMoments(7)
    for a, b in [(0, 1), (1, 1), (1, 50), (50, 51), (51, 300)]:  # includes empty and single-row chunks
        mom.update(x[a:b])
    assert mom.n == 300
    torch.testing.assert_close(mom.mean, x.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(mom.var, x.var(0, unbiased=False), rtol=1e-12, atol=0)


@pytest.fixture(scope="module")
def chat_lm(tiny_chat):
    return load_model(tiny_chat)


def _examples(lm) -> list[Example]:
    from surgery.prompts import format_chat

    tok = lm.tokenizer
    prompts = ["How do I bake bread?", "Tell me about the moon", "Write a poem about cats and dogs"]
    replies = [[31, 16, 61, 2317], [2365, 40, 41], [100, 101, 102, 103, 104, 105]]
    return [Example(format_chat(tok, p), r) for p, r in zip(prompts, replies)]


def _reference(lm, examples, positions):
    """Float64 recomputation: each example alone (no padding), every write
    matrix's input captured whole, the selected rows' population variance
    times the column norms squared."""
    mats = live_matrices(lm)
    rows = {m.key: [] for m in mats}
    for e in examples:
        ids = lm.tokenizer(e.prompt_text, add_special_tokens=False)["input_ids"]
        full = ids + (list(e.reply_ids) if positions == "all" else [])
        caught = {}
        hs = [lm.model.get_submodule(m.module).register_forward_pre_hook(
            lambda mod, args, k=m.key: caught.__setitem__(k, args[0][0].double())) for m in mats]
        try:
            with torch.no_grad():
                lm.model(torch.tensor([full]))
        finally:
            for h in hs:
                h.remove()
        for k, x in caught.items():
            rows[k].append(x[len(ids):] if positions == "all" else x[-1:])
    params = dict(lm.model.named_parameters())
    out = {}
    for m in mats:
        x = torch.cat(rows[m.key])
        w = params[m.writer].double()
        out[m.key] = (x.var(dim=0, unbiased=False) * (w ** 2).sum(dim=0), x.shape[0])
    return out


@pytest.mark.parametrize("positions", ["all", "last"])
def test_attribution_matches_float64_reference(chat_lm, positions):
    ex = _examples(chat_lm)
    got = attribute(chat_lm, ex, positions, batch_size=2)  # left padding inside a batch
    ref = _reference(chat_lm, ex, positions)
    assert set(got) == set(ref) == {f"layers.{l}.{k}" for l in range(4) for k in ("attn", "mlp")}
    for k, (imp, n) in ref.items():
        assert got[k].n_tokens == n == (13 if positions == "all" else 3)
        assert got[k].importance.dtype == torch.float64
        torch.testing.assert_close(got[k].importance, imp, rtol=2e-4, atol=1e-9)
    # a different batching gives the same numbers (streaming merge)
    one = attribute(chat_lm, ex, positions, batch_size=16)
    for k in ref:
        torch.testing.assert_close(one[k].importance, got[k].importance, rtol=2e-4, atol=1e-9)


def test_attribution_needs_tokens(chat_lm):
    ex = [Example(e.prompt_text, []) for e in _examples(chat_lm)]
    with pytest.raises(SurgeryError, match="only 0 token"):
        attribute(chat_lm, ex, "all")
    with pytest.raises(SurgeryError, match="positions must be"):
        attribute(chat_lm, ex, "first")


# ----------------------------------------------------------------------------- classification
def test_classification_rules_on_a_constructed_table():
    # n = 10, top 0.2 -> the 2 highest; below 0.5 -> ranks 0-4; redundant 0.3 -> ranks 0-2 in both
    S = torch.tensor([9, 8, 0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float64)
    U = torch.tensor([0, 7, 9, 8, 1, 2, 3, 4, 5, 6], dtype=torch.float64)
    got = [CLASSES[c] for c in classify(S, U, Rules(top=0.2, below=0.5, redundant=0.3))]
    assert got == ["safety-critical",  # S top, U lowest
                   "complex",  # S top, U at rank 7 (>= median)
                   "utility-critical", "utility-critical",  # U top, S ranks 0 and 1
                   "redundant",  # S rank 2, U rank 1
                   "other", "other", "other", "other", "other"]  # S rank 3.. not low enough
    # ties are ranked by index: S ranks [2, 3, 0, 1], U ranks [3, 0, 1, 2]; top 1, below/redundant ranks < 2
    S2 = torch.tensor([5.0, 5.0, 1.0, 1.0])
    U2 = torch.tensor([5.0, 0.0, 1.0, 1.0])
    assert [CLASSES[c] for c in classify(S2, U2, Rules(top=0.25, below=0.5, redundant=0.5))] == \
        ["complex",  # U top, S at the median: important to both
         "safety-critical",  # wins the S tie by index, U lowest
         "redundant", "other"]  # U rank 2 is not below 2
    # high in both -> complex
    assert CLASSES[classify(torch.tensor([1.0, 2, 3, 9]), torch.tensor([3.0, 2, 1, 9]), Rules(top=0.25))[3]] == "complex"
    # top=0.02 of 64 units -> ceil(1.28) = 2 high units per score
    g = torch.Generator().manual_seed(0)
    c = classify(torch.rand(64, generator=g), torch.rand(64, generator=g))
    high = int(((c == CODE["safety-critical"]) | (c == CODE["utility-critical"]) | (c == CODE["complex"])).sum())
    assert 2 <= high <= 4


@pytest.mark.parametrize("kw,match", [(dict(top=0.0), "top must be a fraction"), (dict(below=1.0), "below must"),
                                      (dict(top=0.6, below=0.5), "must not exceed 1"),
                                      (dict(top=0.5, redundant=0.6), "must not exceed 1")])
def test_bad_rules(kw, match):
    with pytest.raises(SurgeryError, match=match):
        Rules(**kw)


# ----------------------------------------------------------------------------- protect
def _map_for(lm_like_matrices, classes: dict[str, dict[int, str]], seed: int = 0) -> UnitMap:
    """A unit map with random scores and the given classes (other elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    mats = {}
    for m in lm_like_matrices:
        c = torch.zeros(m.n_units, dtype=torch.uint8)
        for j, name in classes.get(m.key, {}).items():
            c[j] = CODE[name]
        mats[m.key] = MatrixUnits(m.key, m.kind, m.layer, m.module, m.producer_modules,
                                  torch.rand(m.n_units, generator=g, dtype=torch.float64),
                                  torch.rand(m.n_units, generator=g, dtype=torch.float64), c, m.head_dim, m.group)
    return UnitMap(mats, {"model_type": "llama"})


def _checkpoint_matrices(folder):
    from surgery.architectures import get_architecture
    from surgery.units import unit_matrices

    with CheckpointReader(folder) as r:
        return unit_matrices(get_architecture(r.config), r.names, r.config, r.shape)


PAIR_KW = {"llama": dict(attention_bias=True, mlp_bias=True), "qwen2": {}, "gemma3": {}}


@pytest.fixture(scope="module", params=list(PAIR_KW))
def pair(request, tmp_path_factory):
    """A tiny model (GQA 4 heads / 2 kv heads, head_dim 8, 64 neurons) and its 'fine-tune':
    llama with every bias, qwen2 (value bias), gemma3 (``language_model.model.*`` names)."""
    root = tmp_path_factory.mktemp(f"pair_{request.param}")
    al = make_tiny_checkpoint(request.param, root / "aligned", **PAIR_KW[request.param])
    return al, perturbed_copy(al, root / "finetuned")


CHOICE = {"layers.0.attn": {0: "safety-critical", 8: "safety-critical", 17: "safety-critical", 25: "complex",
                            3: "redundant"},
          "layers.0.mlp": {3: "safety-critical", 10: "safety-critical", 5: "complex", 7: "utility-critical"},
          "layers.1.attn": {31: "safety-critical"}}


def _expected(folder: Path, include_complex: bool) -> dict[str, tuple[int, list[int]]]:
    """Worked out by hand: (axis, indices) per tensor.  Channel j of o_proj reads
    value row (j // 8 // 2) * 8 + j % 8: 0 and 8 -> row 0 (both restored -> row 0 comes
    along), 17 -> row 9 (shared with 25: only with --include-complex), 31 -> row 15
    (shared with 23, never).  Biases only where the checkpoint has them."""
    with CheckpointReader(folder) as r:
        names = set(r.names)
    o0 = next(n for n in names if n.endswith("layers.0.self_attn.o_proj.weight"))
    L0, L1 = o0[: -len("self_attn.o_proj.weight")], o0[: -len("0.self_attn.o_proj.weight")] + "1."
    vrows = [0] + ([9] if include_complex else [])
    neurons = sorted([3, 10] + ([5] if include_complex else []))
    exp = {L0 + "self_attn.o_proj.weight": (1, [0, 8, 17] + ([25] if include_complex else [])),
           L0 + "self_attn.v_proj.weight": (0, vrows), L0 + "self_attn.v_proj.bias": (0, vrows),
           L1 + "self_attn.o_proj.weight": (1, [31]), L0 + "mlp.down_proj.weight": (1, neurons)}
    for p in ("gate_proj", "up_proj"):
        exp[L0 + f"mlp.{p}.weight"] = exp[L0 + f"mlp.{p}.bias"] = (0, neurons)
    return {k: v for k, v in exp.items() if k in names}


def check_restored(aligned: Path, finetuned: Path, out: Path, expected: dict[str, tuple[int, list[int]]]):
    """Changed elements = exactly the expected slices, equal to the aligned bytes;
    everything else byte-identical to the fine-tuned input."""
    with CheckpointReader(aligned) as a, CheckpointReader(finetuned) as f, CheckpointReader(out) as o:
        assert sorted(o.names) == sorted(f.names)
        for name in f.names:
            ta, tf, to = a.get(name), f.get(name), o.get(name)
            assert to.dtype == tf.dtype and to.shape == tf.shape
            if name not in expected:
                assert raw(to) == raw(tf), name
                continue
            axis, idx = expected[name]
            mask = torch.zeros(tf.shape, dtype=torch.bool)
            if axis == 1:
                mask[:, idx] = True
            else:
                mask[idx] = True
            assert raw(to[mask]) == raw(ta[mask]), name
            assert raw(to[~mask]) == raw(tf[~mask]), name
            assert bool((tf[mask] != ta[mask]).all()), name  # the fine-tune moved every restored value


@pytest.mark.parametrize("include_complex", [False, True])
def test_protect_restores_whole_units_exactly(pair, tmp_path, include_complex):
    al, ft = pair
    umap = _map_for(_checkpoint_matrices(al), CHOICE)
    mp = umap.save(tmp_path / "units.safetensors")
    out = tmp_path / "out"
    res = protect(str(al), str(ft), out, units=mp, include_complex=include_complex)
    exp = _expected(al, include_complex)
    assert len(exp) == {"llama": 9, "qwen2": 7, "gemma3": 6}[json.loads((al / "config.json").read_text())["model_type"]]
    check_restored(al, ft, out, exp)
    assert sorted(res.edited) == sorted(exp)
    assert verify(out) == []
    m = read_manifest(out)
    assert m["method"]["name"] == "protect"
    assert m["method"]["parameters"]["classes"] == ["safety-critical"] + (["complex"] if include_complex else [])
    units = m["restored"]["units"]
    want = sorted((k, j) for k, d in CHOICE.items() for j, c in d.items()
                  if c == "safety-critical" or (include_complex and c == "complex"))
    assert sorted((u["key"], u["index"]) for u in units) == want
    for u in units:
        mu = umap.matrices[u["key"]]
        assert u["class"] == CHOICE[u["key"]][u["index"]]
        assert u["safety"] == float(mu.safety[u["index"]]) and u["utility"] == float(mu.utility[u["index"]])
    rows = {(u["key"], u["index"]): u["producer_row_restored"] for u in units}
    assert rows[("layers.0.attn", 0)] and rows[("layers.0.attn", 8)] and not rows[("layers.1.attn", 31)]
    assert rows[("layers.0.attn", 17)] == include_complex
    assert (out / "units.safetensors").is_file() and m["outputs"]["units.safetensors"]


def test_protect_bad_inputs(tmp_path):
    al = make_tiny_checkpoint("llama", tmp_path / "aligned", attention_bias=True, mlp_bias=True)
    ft = perturbed_copy(al, tmp_path / "finetuned")
    mats = _checkpoint_matrices(al)
    mp = _map_for(mats, CHOICE).save(tmp_path / "units.safetensors")
    # mismatched shapes: a fine-tune with a different MLP width
    other = make_tiny_checkpoint("llama", tmp_path / "wide", attention_bias=True, mlp_bias=True, intermediate_size=48)
    with pytest.raises(SurgeryError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: shape") as e:
        protect(str(al), str(other), tmp_path / "o1", units=mp)
    assert "\n" not in str(e.value) and not (tmp_path / "o1").exists()
    # a tensor missing on one side
    nob = make_tiny_checkpoint("llama", tmp_path / "nobias", attention_bias=True)
    with pytest.raises(SurgeryError, match=r"has no tensor model\.layers\.0\.mlp\.down_proj\.bias"):
        protect(str(al), str(nob), tmp_path / "o2", units=mp)
    assert not (tmp_path / "o2").exists()
    # unsupported architecture, before any work
    phi = make_tiny_checkpoint("phi3", tmp_path / "phi3")
    with pytest.raises(SurgeryError, match="model_type 'phi3' is not supported") as e:
        protect(str(phi), str(phi), tmp_path / "o3", units=mp)
    assert "\n" not in str(e.value) and not (tmp_path / "o3").exists()
    # a map of another model
    small = _map_for(mats[:2], {}).save(tmp_path / "small.safetensors")
    with pytest.raises(SurgeryError, match="unit map does not fit .* lacks layers.1.attn"):
        protect(str(al), str(ft), tmp_path / "o4", units=small)
    assert not (tmp_path / "o4").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SurgeryError, match="cannot read unit map"):
        protect(str(al), str(ft), tmp_path / "o5", units=tmp_path / "junk.safetensors")
    # output exists
    (tmp_path / "o6").mkdir()
    with pytest.raises(SurgeryError, match="output folder exists"):
        protect(str(al), str(ft), tmp_path / "o6", units=mp)
    # CLI: one line, exit 2
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(al), "--finetuned", str(other), "-o",
                                   str(tmp_path / "o7"), "--units", str(mp)])
    last = res.output.splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: tensor model.layers.0.mlp.down_proj.weight: shape")
    assert not (tmp_path / "o7").exists()


# ----------------------------------------------------------------------------- mask
def test_lora_mask_keeps_disallowed_units_exactly_zero(tiny_chat):
    from surgery.training.lora import LoraSpec, attach

    lm = load_model(tiny_chat)
    mats = live_matrices(lm)
    g = torch.Generator().manual_seed(3)
    classes = {m.key: {j: ("redundant" if bool(torch.rand(1, generator=g) < 0.3) else "other")
                       for j in range(m.n_units)} for m in mats}
    umap = _map_for(mats, classes)
    mask = unit_mask(umap, ("redundant",))
    pm, targets = attach(lm, LoraSpec(rank=4, targets=("writers", "v_proj", "gate_proj", "up_proj"), layers=[1, 2]))
    for mod in pm.modules():  # default init has B = 0: start from a random B so every slice is live at once
        if hasattr(mod, "lora_B") and isinstance(mod.lora_B, torch.nn.ModuleDict):
            with torch.no_grad():
                mod.lora_B["default"].weight.normal_(0, 0.1, generator=g)
    handle = apply_mask(pm, mask)
    assert sorted(handle.masked) == sorted(t.module for t in targets) and handle.unmasked == []
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(5, 200, (2, 12), generator=g)
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    checked = 0
    for t in targets:
        mod = pm.base_model.model.get_submodule(t.module)
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        delta = (b @ a).detach() * mod.scaling["default"]  # what merging adds to the weight
        entry = mask[t.module]
        if entry.axis == "in":
            assert bool((delta[:, ~entry.allowed] == 0).all()), t.module
            assert bool((delta[:, entry.allowed].abs().sum(0) > 0).all()), t.module
        else:
            assert bool((delta[~entry.allowed] == 0).all()), t.module
            assert bool((delta[entry.allowed].abs().sum(1) > 0).all()), t.module
        checked += 1
    assert checked == len(targets) == 2 * 5
    # a shared value row is allowed only when both channels reading it are
    m = next(x for x in mats if x.key == "layers.1.attn")
    rows = mask[m.producer_modules[0]].allowed
    ok = mask[m.module].allowed
    assert [bool(rows[r]) for r in range(m.n_rows)] == [all(bool(ok[j]) for j in m.readers(r)) for r in range(m.n_rows)]
    handle.remove()
    with pytest.raises(SurgeryError, match="none of the"):
        apply_mask(pm, {"model.layers.0.nothing": mask[m.module]})


# ----------------------------------------------------------------------------- CLI end to end
def test_cli_units_then_protect(tiny_chat, tmp_path):
    mp = tmp_path / "map" / "units.safetensors"
    res = CliRunner().invoke(cli, ["units", str(tiny_chat), "-o", str(mp), "--limit", "3", "--max-new-tokens", "4",
                                   "--top", "0.05", "--plot", str(tmp_path / "u.png")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, l in enumerate(lines) if l.strip().startswith("layer"))
    for col in ("safety", "utility", "complex", "redund."):
        assert col in lines[head]
    assert [l.split("|")[0].strip() for l in lines[head + 1: head + 6]] == ["0", "1", "2", "3", "overall"]
    png = (tmp_path / "u.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads(mp.with_suffix(".json").read_text())
    umap = UnitMap.load(mp)
    for row in summary["summary"]["layers"]:
        for kind in ("attn", "mlp"):
            p = row[kind]
            assert abs(sum(p.values()) - 1) < 1e-9
            mu = umap.matrices[f"layers.{row['layer']}.{kind}"]
            assert p["safety-critical"] == pytest.approx(float((mu.classes == 1).float().mean()))
            # the saved classes follow from the saved scores
            assert torch.equal(mu.classes, classify(mu.safety, mu.utility, Rules(top=0.05)))
            # the printed row carries the same share
            printed = lines[head + 1 + row["layer"]].split("|")[1 if kind == "attn" else 2].split()
            assert float(printed[0].rstrip("%")) == pytest.approx(100 * p["safety-critical"], abs=0.05)
    assert summary["tokens"]["safety"] > 10 and summary["datasets"]["utility"]["count"] == 3
    assert sum((m.classes == 1).sum() for m in umap.matrices.values()) > 0

    ft = perturbed_copy(tiny_chat, tmp_path / "ft")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(tiny_chat), "--finetuned", str(ft), "-o", str(out),
                                   "--units", str(mp)])
    assert res.exit_code == 0, res.output
    # expected slices from the map, with the GQA rule written out independently
    with CheckpointReader(tiny_chat) as r:
        heads = r.config["num_attention_heads"]
        kv = r.config["num_key_value_heads"]
    expected = {}
    for key, mu in umap.matrices.items():
        sel = [int(j) for j in torch.nonzero(mu.classes == CODE["safety-critical"]).flatten()]
        if not sel:
            continue
        prefix = f"model.layers.{mu.layer}."
        if mu.kind == "mlp":
            expected[prefix + "mlp.down_proj.weight"] = (1, sel)
            expected[prefix + "mlp.gate_proj.weight"] = expected[prefix + "mlp.up_proj.weight"] = (0, sel)
        else:
            hd, grp = mu.n_units // heads, heads // kv
            expected[prefix + "self_attn.o_proj.weight"] = (1, sel)
            vrows = sorted({(j // hd // grp) * hd + j % hd for j in sel})
            full = [v for v in vrows if all(((v // hd) * grp + q) * hd + v % hd in sel for q in range(grp))]
            if full:
                expected[prefix + "self_attn.v_proj.weight"] = (0, full)
    check_restored(tiny_chat, ft, out, expected)
    assert verify(out) == []
    assert read_manifest(out)["restored"]["count"] == sum(int((m.classes == 1).sum()) for m in umap.matrices.values())
    # measured on the fly (no --units) with the same settings: the same map, the same weights
    res2 = protect(str(tiny_chat), str(ft), tmp_path / "out2", limit=3, max_new_tokens=4, rules=Rules(top=0.05))
    for k, mu in umap.matrices.items():
        assert torch.equal(res2.unit_map.matrices[k].classes, mu.classes), k
    with CheckpointReader(out) as a, CheckpointReader(tmp_path / "out2") as b:
        assert all(raw(a.get(n)) == raw(b.get(n)) for n in a.names)
    assert verify(tmp_path / "out2") == []


def test_protect_accepts_an_untied_fine_tune_of_a_tied_model(tiny_chat, tmp_path):
    """merge-lora unties a tied model (adds lm_head.weight): the pair check takes the aligned
    model's tied lm_head as its embedding instead of refusing surgery's own output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from surgery.adapters import merge_adapter

    torch.manual_seed(5)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], modules_to_save=["lm_head"],
                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    ft = tmp_path / "ft"
    merge_adapter(str(tiny_chat), str(tmp_path / "adapter"), ft)
    with CheckpointReader(tiny_chat) as a, CheckpointReader(ft) as f:
        assert "lm_head.weight" not in a.names and "lm_head.weight" in f.names
    mats = _checkpoint_matrices(tiny_chat)
    choice = {"layers.0.mlp": {3: "safety-critical", 10: "safety-critical"}, "layers.1.attn": {5: "safety-critical"}}
    mp = _map_for(mats, choice).save(tmp_path / "units.safetensors")
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(tiny_chat), "--finetuned", str(ft), "-o",
                                   str(tmp_path / "out"), "--units", str(mp)])
    assert res.exit_code == 0, res.output
    with CheckpointReader(tiny_chat) as a, CheckpointReader(ft) as f, CheckpointReader(tmp_path / "out") as o:
        assert sorted(o.names) == sorted(f.names)
        assert raw(o.get("lm_head.weight")) == raw(f.get("lm_head.weight"))
        down = "model.layers.0.mlp.down_proj.weight"
        assert raw(o.get(down)[:, [3, 10]]) == raw(a.get(down)[:, [3, 10]])
        assert raw(o.get(down)[:, :3]) == raw(f.get(down)[:, :3])
        o1 = "model.layers.1.self_attn.o_proj.weight"
        assert raw(o.get(o1)[:, 5]) == raw(a.get(o1)[:, 5]) != raw(f.get(o1)[:, 5])
    # a fine-tune whose lm_head has another shape is still refused
    bad = tmp_path / "bad"
    shutil.copytree(ft, bad)
    f = next(bad.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["lm_head.weight"] = sd["lm_head.weight"][:-1].contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(SurgeryError, match=r"tensor lm_head.weight: shape"):
        protect(str(tiny_chat), str(bad), tmp_path / "o2", units=mp)


def test_protect_with_a_map_reclassifies_or_refuses_measurement_options(tmp_path):
    """--top/--below/--redundant with --units re-classify the map's stored scores (they were silently
    ignored); measurement settings (--positions/--limit/--max-new-tokens/--batch-size) are refused."""
    al = make_tiny_checkpoint("llama", tmp_path / "aligned")
    ft = perturbed_copy(al, tmp_path / "finetuned")
    mats = _checkpoint_matrices(al)
    umap = _map_for(mats, {})
    stored = Rules(top=0.02, below=0.5, redundant=0.3)
    umap = UnitMap({k: MatrixUnits(m.key, m.kind, m.layer, m.module, m.producers, m.safety, m.utility,
                                   classify(m.safety, m.utility, stored), m.head_dim, m.group)
                    for k, m in umap.matrices.items()}, {**umap.meta, "rules": stored.describe()})
    mp = umap.save(tmp_path / "units.safetensors")
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(al), "--finetuned", str(ft), "-o", str(tmp_path / "out"),
                                   "--units", str(mp), "--top", "0.3", "--below", "0.6"])
    assert res.exit_code == 0, res.output
    want = Rules(top=0.3, below=0.6, redundant=0.3)  # redundant: the map's own
    m = read_manifest(tmp_path / "out")
    rec = m["method"]["parameters"]["units_map"]
    assert {k: rec["rules"][k] for k in ("top", "below", "redundant")} == {"top": 0.3, "below": 0.6, "redundant": 0.3}
    assert rec["reclassified_from"]["rules"]["top"] == 0.02
    from surgery.checkpoint import sha256_file
    assert rec["reclassified_from"]["sha256"] == sha256_file(mp)
    saved = UnitMap.load(tmp_path / "out" / "units.safetensors")
    n = 0
    with CheckpointReader(al) as a, CheckpointReader(tmp_path / "out") as o:
        for k, mu in umap.matrices.items():
            codes = classify(mu.safety, mu.utility, want)
            assert torch.equal(saved.matrices[k].classes, codes)
            sel = [int(j) for j in torch.nonzero(codes == CODE["safety-critical"]).flatten()]
            n += len(sel)
            name = f"model.layers.{mu.layer}." + ("mlp.down_proj.weight" if mu.kind == "mlp" else "self_attn.o_proj.weight")
            assert raw(o.get(name)[:, sel]) == raw(a.get(name)[:, sel])
    assert m["restored"]["count"] == n and n > sum(int((mu.classes == 1).sum()) for mu in umap.matrices.values())
    # no rule given: the map's classes as stored
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(al), "--finetuned", str(ft), "-o", str(tmp_path / "o2"),
                                   "--units", str(mp)])
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "o2")["restored"]["count"] == sum(int((mu.classes == 1).sum())
                                                                        for mu in umap.matrices.values())
    # measurement settings with a map: one-line error naming them, nothing written
    res = CliRunner().invoke(cli, ["protect", "--aligned", str(al), "--finetuned", str(ft), "-o", str(tmp_path / "o3"),
                                   "--units", str(mp), "--limit", "3", "--positions", "last"])
    assert res.exit_code == 2 and "--positions, --limit" in res.output and "--units" in res.output
    assert not (tmp_path / "o3").exists()


@pytest.mark.parametrize("opt,val", [("--batch-size", "0"), ("--max-new-tokens", "0"), ("--batch-size", "-3"),
                                     ("--limit", "0")])
@pytest.mark.parametrize("cmd", ["units", "protect"])
def test_count_options_must_be_positive(tmp_path, cmd, opt, val):
    args = (["units", str(tmp_path / "m"), "-o", str(tmp_path / "u.safetensors")] if cmd == "units" else
            ["protect", "--aligned", str(tmp_path), "--finetuned", str(tmp_path), "-o", str(tmp_path / "o")])
    res = CliRunner().invoke(cli, args + [opt, val])
    assert res.exit_code == 2 and f"Invalid value for '{opt}'" in res.output and ">=1" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_units_checks_every_output_path_before_any_work(tiny_chat, tmp_path, monkeypatch):
    import surgery.units.pipeline as up

    def no_work(*a, **k):
        raise AssertionError("measured before checking the outputs")

    monkeypatch.setattr(up, "compute_units", no_work)
    mp = tmp_path / "m.safetensors"
    mp.write_bytes(b"an earlier map")
    (tmp_path / "m.json").write_text("{}")
    cases = [
        (["-o", str(tmp_path / "n.safetensors"), "--plot", str(tmp_path / "n.safetensors")], "same file as -o"),
        (["-o", str(tmp_path / "n.safetensors"), "--plot", str(tmp_path / "n.json")], "same file as the summary"),
        (["-o", str(mp)], r"-o .*m.safetensors exists \(pass --overwrite"),
        (["-o", str(tmp_path / "n.safetensors"), "--plot", str(mp)], r"--plot .*m.safetensors exists"),
        (["-o", str(tmp_path / "n.safetensors"), "--plot", str(tmp_path)], "exists and is not a file"),
        (["-o", str(tmp_path / "n.safetensors"), "--plot", str(tmp_path / "m.json" / "sub" / "p.png")],
         "--plot .*cannot write in"),
    ]
    for args, match in cases:
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        res = CliRunner().invoke(cli, ["units", str(tiny_chat), *args])
        assert res.exit_code == 2, (args, res.output)
        last = res.output.strip().splitlines()[-1]
        assert last.startswith("error:") and __import__("re").search(match, last), (args, last)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # --overwrite replaces an earlier map (measured for real here)
    monkeypatch.undo()
    res = CliRunner().invoke(cli, ["units", str(tiny_chat), "-o", str(mp), "--limit", "2", "--max-new-tokens", "2",
                                   "--overwrite"])
    assert res.exit_code == 0, res.output
    assert UnitMap.load(mp).matrices and json.loads((tmp_path / "m.json").read_text())["summary"]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
