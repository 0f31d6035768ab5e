"""PEFT LoRA adapters: the streamed merge against PEFT's own ``merge_and_unload``
(rank/alpha patterns, rsLoRA, embeddings, modules_to_save, GPT-2 Conv1D),
untouched tensors byte-identical, tied embeddings untied, adapters we write
loading in PEFT, and bad adapters refused before anything is written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery.adapters import LoraModule, load_adapter, merge_adapter, pattern_key, save_peft_adapter
from surgery.checkpoint import CheckpointReader
from surgery.cli import main as cli
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from tiny_models import make_tiny_checkpoint, make_tiny_model

peft = pytest.importorskip("peft")


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def make_peft_adapter(model_type: str, folder: Path, mts_noise: bool = False, **cfg) -> Path:
    """Random (non-zero) LoRA weights on the tiny model, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(model_type)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg))
    if mts_noise:  # a modules_to_save copy that differs from the base
        from peft.utils.other import ModulesToSaveWrapper

        for mod in pm.modules():
            if isinstance(mod, ModulesToSaveWrapper):
                mod.modules_to_save["default"].weight.data.normal_()
    pm.save_pretrained(folder)
    return folder


def peft_merged(model_or_type, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = make_tiny_model(model_or_type) if isinstance(model_or_type, str) else model_or_type
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


def check_merge(src: Path, out: Path, ref: dict[str, torch.Tensor], touched: set[str]) -> None:
    with CheckpointReader(src) as a, CheckpointReader(out) as b:
        assert set(b.names) >= set(a.names)
        changed = set()
        for name in a.names:
            x, y = a.get(name), b.get(name)
            assert y.dtype == x.dtype
            torch.testing.assert_close(y, ref[name].to(y.dtype), rtol=1e-5, atol=1e-6, msg=name)
            if _bytes(x) != _bytes(y):
                changed.add(name)
        assert changed == touched


LLAMA_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns_rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj", "up_proj"],
                            rank_pattern={"down_proj": 2, "layers.1.self_attn.o_proj": 6},
                            alpha_pattern={"o_proj": 3, "model.layers.0.mlp.up_proj": 20}, use_rslora=True),
    "embedding_modules_to_save": dict(r=3, lora_alpha=5, target_modules=["embed_tokens", "o_proj"],
                                      modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_streamed_merge_equals_peft_merge_and_unload(tmp_path, case):
    cfg = LLAMA_CASES[case]
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    ad_dir = make_peft_adapter("llama", tmp_path / "adapter", mts_noise=True, **cfg)
    ad = load_adapter(ad_dir)
    # scaling per module as PEFT computes it
    from peft import PeftModel

    pm = PeftModel.from_pretrained(make_tiny_model("llama"), ad_dir)
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            assert ad.modules[name].scaling == pytest.approx(mod.scaling["default"], rel=1e-12), name
            assert ad.modules[name].r == mod.r["default"]
    edited = merge_adapter(str(src), ad, tmp_path / "out")
    ref = peft_merged("llama", ad_dir)
    touched = {m.tensor for m in ad.modules.values()} | ({"lm_head.weight"} if "modules_to_save" in cfg else set())
    check_merge(src, tmp_path / "out", ref, touched)
    assert set(edited) >= touched
    m = read_manifest(tmp_path / "out")
    assert m["method"]["name"] == "lora-merge"
    assert m["adapter"]["files"]["adapter_model.safetensors"] == __import__("surgery.checkpoint", fromlist=["x"]).sha256_file(
        ad_dir / "adapter_model.safetensors")
    assert m["adapter"]["config"]["r"] == cfg["r"] and verify(tmp_path / "out") == []


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    src = make_tiny_checkpoint("gpt2", tmp_path / "src")
    ad_dir = make_peft_adapter("gpt2", tmp_path / "adapter", r=4, lora_alpha=6, fan_in_fan_out=True,
                               target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={"c_fc": 2})
    ad = load_adapter(ad_dir)
    merge_adapter(str(src), ad, tmp_path / "out")
    assert all(m.fan_in_fan_out for m in ad.modules.values())
    d = ad.delta("transformer.h.0.attn.c_attn")
    assert d.shape == (32, 96)  # Conv1D stores (in, out)
    mod = ad.modules["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(d, (mod.B.double() @ mod.A.double()).T.float() * mod.scaling)
    ref = peft_merged("gpt2", ad_dir)
    check_merge(src, tmp_path / "out", ref, {m.tensor for m in ad.modules.values()})
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings", True) is True


def test_bfloat16_model_computes_in_float32(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_tiny_checkpoint("llama", tmp_path / "f32")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ad = load_adapter(make_peft_adapter("llama", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["o_proj"]))
    merge_adapter(str(tmp_path / "bf16"), ad, tmp_path / "out")
    with CheckpointReader(tmp_path / "bf16") as a, CheckpointReader(tmp_path / "out") as b:
        for name, mod in ad.modules.items():
            w = a.get(mod.tensor)
            want = (w.double() + mod.B.double() @ mod.A.double() * mod.scaling).to(torch.bfloat16)
            got = b.get(mod.tensor)
            assert got.dtype == torch.bfloat16
            assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()
        for name in a.names:
            if name not in {m.tensor for m in ad.modules.values()}:
                assert _bytes(a.get(name)) == _bytes(b.get(name))


def test_tied_embedding_is_untied_explicitly(tmp_path, tiny_chat):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_chat)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "down_proj"],
                                     init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    ad = load_adapter(tmp_path / "adapter")
    merge_adapter(str(tiny_chat), ad, tmp_path / "out")
    ref = peft_merged(AutoModelForCausalLM.from_pretrained(tiny_chat), tmp_path / "adapter")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with CheckpointReader(tiny_chat) as a, CheckpointReader(tmp_path / "out") as b:
        original = a.get("model.embed_tokens.weight")
        assert "lm_head.weight" not in a.names
        assert torch.equal(b.get("lm_head.weight"), original)  # the unembedding keeps the original weights
        torch.testing.assert_close(b.get("model.embed_tokens.weight"), ref["model.embed_tokens.weight"])
        assert not torch.equal(b.get("model.embed_tokens.weight"), original)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(loaded.lm_head.weight, original)
    assert read_manifest(tmp_path / "out")["edited"]["untied_lm_head"] is True


def test_pattern_key_mirrors_peft():
    from peft.utils.other import get_pattern_key

    keys = ["down_proj", "layers.1.self_attn.o_proj", r"layers\.[0-3]\.mlp\.up_proj", "o_proj", "proj"]
    for mod in ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.11.self_attn.o_proj",
                "model.layers.2.mlp.up_proj", "model.layers.7.mlp.up_proj", "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.xo_proj", "lm_head"]:
        want = get_pattern_key(keys, mod)
        assert (pattern_key(keys, mod) or mod) == want, mod


def test_saved_adapter_loads_in_peft_and_merges_the_same(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    torch.manual_seed(3)
    mods = {
        "model.layers.0.self_attn.o_proj": LoraModule("model.layers.0.self_attn.o_proj", torch.randn(4, 32), torch.randn(32, 4), 4, 8.0, 2.0),
        "model.layers.1.mlp.down_proj": LoraModule("model.layers.1.mlp.down_proj", torch.randn(2, 64), torch.randn(32, 2), 2, 3.0, 1.5),
        "model.layers.1.self_attn.q_proj": (torch.randn(4, 32), torch.randn(32, 4)),
        "model.embed_tokens": LoraModule("model.embed_tokens", torch.randn(4, 128), torch.randn(32, 4), 4, 8.0, 2.0, kind="embedding"),
    }
    out = save_peft_adapter(tmp_path / "adapter", mods, r=4, alpha=8, base_model_name_or_path=str(src))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    ad = load_adapter(out)
    for name, m in mods.items():
        A, B = (m.A, m.B) if isinstance(m, LoraModule) else m
        assert torch.equal(ad.modules[name].A, A) and torch.equal(ad.modules[name].B, B)
    assert ad.modules["model.layers.1.mlp.down_proj"].scaling == 1.5
    merge_adapter(str(src), ad, tmp_path / "merged")
    ref = peft_merged("llama", out)
    check_merge(src, tmp_path / "merged", ref, {m.tensor for m in ad.modules.values()})
    with pytest.raises(SurgeryError, match="output folder exists"):
        save_peft_adapter(tmp_path / "adapter", mods, r=4, alpha=8)


def _assert_clean_failure(tmp_path, fn, match):
    listing = set(os.listdir(tmp_path))
    with pytest.raises(SurgeryError, match=match) as ei:
        fn()
    assert "\n" not in str(ei.value)
    assert set(os.listdir(tmp_path)) == listing  # no output, no temporary folder


def test_bad_adapters_fail_before_writing(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    good = make_peft_adapter("llama", tmp_path / "good", r=4, lora_alpha=8, target_modules=["o_proj"])
    out = tmp_path / "out"

    def variant(name: str, edit_cfg=None, drop=None) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_cfg:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(edit_cfg)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if drop:
            (d / drop).unlink()
        return d

    cases = [
        (variant("nocfg", drop="adapter_config.json"), "no adapter_config.json"),
        (variant("noweights", drop="adapter_model.safetensors"), "no adapter weights"),
        (variant("dora", {"use_dora": True}), "DoRA"),
        (variant("ia3", {"peft_type": "IA3"}), "peft_type 'IA3'"),
        (variant("pissa", {"init_lora_weights": "pissa"}), "init_lora_weights 'pissa'"),
        (variant("rank", {"r": 8}), "rank 4 but adapter_config.json gives r=8"),
    ]
    # a DoRA magnitude vector even though the config says otherwise
    from safetensors.torch import load_file, save_file

    mag = variant("mag")
    sd = load_file(mag / "adapter_model.safetensors")
    sd["base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(sd, str(mag / "adapter_model.safetensors"))
    cases.append((mag, "lora_magnitude_vector"))
    # pickled weights
    pick = variant("pickled", drop="adapter_model.safetensors")
    torch.save(load_file(good / "adapter_model.safetensors"), pick / "adapter_model.bin")
    cases.append((pick, "pickled adapter"))
    # an adapter for another model: wrong width, and an unknown module
    wide = make_tiny_checkpoint("llama", tmp_path / "wide_src", hidden_size=48)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(wide), LoraConfig(r=2, target_modules=["o_proj"])).save_pretrained(
        tmp_path / "wide")
    cases.append((tmp_path / "wide", r"model.layers.0.self_attn.o_proj.*\(48, 32\).*\(32, 32\)"))
    unk = variant("unknown")
    sd = load_file(unk / "adapter_model.safetensors")
    sd = {k.replace("layers.1.self_attn.o_proj", "layers.1.self_attn.out_proj"): v for k, v in sd.items()}
    save_file(sd, str(unk / "adapter_model.safetensors"))
    cases.append((unk, "model.layers.1.self_attn.out_proj.weight"))
    for folder, match in cases:
        _assert_clean_failure(tmp_path, lambda: merge_adapter(str(src), str(folder), out), match)
    # with allow_pickle the pickled adapter is read (weights_only) and merges like the original
    merge_adapter(str(src), str(pick), out, allow_pickle=True)
    merge_adapter(str(src), str(good), tmp_path / "out2")
    with CheckpointReader(out) as a, CheckpointReader(tmp_path / "out2") as b:
        assert all(torch.equal(a.get(n), b.get(n)) for n in a.names)


def test_cli_merge_lora(tmp_path):
    src = make_tiny_checkpoint("llama", tmp_path / "src")
    ad = make_peft_adapter("llama", tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["down_proj"])
    runner = CliRunner()
    r = runner.invoke(cli, ["merge-lora", str(src), "--adapter", str(ad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "2 tensors edited" in r.output
    check_merge(src, tmp_path / "out", peft_merged("llama", ad), {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)})
    r = runner.invoke(cli, ["merge-lora", str(src), "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and "nope" in r.output


def test_merge_into_an_untied_model_without_lm_head_is_refused(tmp_path):
    """merge-lora never loads the model, so nothing noticed that an untied model
    without lm_head.weight would load with a random one: refused before writing."""
    from safetensors.torch import load_file, save_file

    src = make_tiny_checkpoint("llama", tmp_path / "src")  # tiny llamas are untied
    sd = load_file(src / "model.safetensors")
    sd.pop("lm_head.weight")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    ad = make_peft_adapter("llama", tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["down_proj"])
    r = CliRunner().invoke(cli, ["merge-lora", str(src), "--adapter", str(ad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0, r.output
    assert "lm_head.weight (tie_word_embeddings is false)" in r.output
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_merge_peak_memory_flat_in_layers():
    """Merging into 4x more layers must not grow peak RSS by more than a quarter of the extra checkpoint bytes."""
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        from merge_memory import run_benchmark
    finally:
        sys.path.remove(bench)
    small, big = run_benchmark((4, 16), dim=384, rank=8)
    grow = big["peak_bytes"] - small["peak_bytes"]
    extra = big["checkpoint_bytes"] - small["checkpoint_bytes"]
    assert extra > 40 * 2**20 and big["edited"] == 16 * 7
    assert grow < 0.25 * extra, (grow, extra)


def test_hub_adapter_is_pinned_and_downloaded_with_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub

    ad_dir = make_peft_adapter("llama", tmp_path / "snap", r=2, lora_alpha=4, target_modules=["o_proj"])
    calls = []

    class Info:
        sha = "a" * 40

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, revision=None, token=None: Info())

    def fake_download(**kw):
        calls.append(kw)
        return str(ad_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    ad = load_adapter("someone/some-lora", revision="main")
    assert ad.kind == "hub" and ad.revision == "a" * 40 and len(ad.modules) == 2
    assert calls[0]["repo_id"] == "someone/some-lora" and calls[0]["revision"] == "a" * 40
    assert "adapter_model.bin" not in calls[0]["allow_patterns"]
    assert ad.describe()["revision"] == "a" * 40


def test_overwrite_never_deletes_an_input(tmp_path):
    """`-o` naming the input, or a folder holding it, is refused even with
    --overwrite (it used to replace the folder, deleting the base and the adapter)."""
    work = tmp_path / "w"
    src = make_tiny_checkpoint("llama", work / "model")
    ad = make_peft_adapter("llama", work / "adapter", r=2, lora_alpha=4, target_modules=["down_proj"])
    (work / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    runner = CliRunner()
    for out, culprit in ((work, "holds the input"), (src, "is the input"), (ad, "is the input")):
        r = runner.invoke(cli, ["merge-lora", str(src), "--adapter", str(ad), "-o", str(out), "--overwrite"])
        assert r.exit_code == 2 and culprit in r.output and r.output.strip().count("\n") == 0, r.output
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    r = runner.invoke(cli, ["rosi", str(src), "-o", str(work), "--overwrite", "--alpha", "1"])
    assert r.exit_code == 2 and "holds the input" in r.output
    # nor is an output written inside an input folder (the input's own verify would fail)
    r = runner.invoke(cli, ["merge-lora", str(src), "--adapter", str(ad), "-o", str(src / "v2")])
    assert r.exit_code == 2 and "is inside the input" in r.output and not (src / "v2").exists()
    # a sibling folder is still replaced with --overwrite
    (tmp_path / "out").mkdir()
    r = runner.invoke(cli, ["merge-lora", str(src), "--adapter", str(ad), "-o", str(tmp_path / "out"), "--overwrite"])
    assert r.exit_code == 0, r.output


def test_gemma3_multimodal_adapter_merges_like_peft(tmp_path):
    """PEFT names gemma3's text modules as the in-memory model does (model.language_model.*);
    the checkpoint stores language_model.model.*: the architecture's alternative spellings map them."""
    src = make_tiny_checkpoint("gemma3", tmp_path / "src")
    ad_dir = make_peft_adapter("gemma3", tmp_path / "adapter", r=4, lora_alpha=8,
                               target_modules=r".*language_model.*\.(q_proj|down_proj)")
    ad = load_adapter(ad_dir)
    assert all(m.startswith("model.language_model.") for m in ad.modules)
    merge_adapter(str(src), ad, tmp_path / "out")
    ref = peft_merged("gemma3", ad_dir)
    touched = {m.tensor for m in ad.modules.values()}
    assert len(touched) == 4 and all(t.startswith("language_model.model.layers.") for t in touched)
    with CheckpointReader(src) as a, CheckpointReader(tmp_path / "out") as b:
        for t in a.names:
            mem = t.replace("language_model.model.", "model.language_model.", 1)
            if t in touched:
                torch.testing.assert_close(b.get(t), ref[mem], rtol=1e-5, atol=1e-6, msg=t)
                assert not torch.equal(b.get(t), a.get(t))
            else:
                assert _bytes(a.get(t)) == _bytes(b.get(t)), t


def test_tied_lm_head_lora_counts_the_new_lm_head_as_edited(tmp_path, tiny_chat):
    """A LoRA on the tied lm_head is written as a new lm_head.weight carrying the update: it is an
    edited tensor (the merge said "0 tensors edited" and the manifest edited.count 0)."""
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat),
                   LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    said = []
    edited = merge_adapter(str(tiny_chat), str(tmp_path / "adapter"), tmp_path / "out", say=said.append)
    assert edited == ["lm_head.weight"]
    assert any("(1 tensors edited)" in s for s in said)
    m = read_manifest(tmp_path / "out")
    assert m["edited"]["count"] == 1 and m["edited"]["tensors"] == ["lm_head.weight"]
    ref = peft_merged(AutoModelForCausalLM.from_pretrained(tiny_chat), tmp_path / "adapter")
    with CheckpointReader(tiny_chat) as a, CheckpointReader(tmp_path / "out") as b:
        torch.testing.assert_close(b.get("lm_head.weight"), ref["lm_head.weight"], rtol=1e-5, atol=1e-6)
        assert not torch.equal(b.get("lm_head.weight"), a.get("model.embed_tokens.weight"))
        assert _bytes(b.get("model.embed_tokens.weight")) == _bytes(a.get("model.embed_tokens.weight"))
