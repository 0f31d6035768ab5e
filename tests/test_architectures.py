"""surgery.architectures: every tensor of a tiny checkpoint (as transformers
writes it) is placed, the residual-stream writers are the right ones, and each
writer's layout is proved against the live module."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import EXPERTS, HIDDEN, LAYERS, TINY_MODEL_TYPES, make_tiny_checkpoint  # noqa: E402

from surgery.architectures import (  # noqa: E402
    LAYOUTS,
    WRITER_ROLES,
    Architecture,
    TensorInfo,
    WriterTensor,
    get_architecture,
    supported_model_types,
)
from surgery.errors import ArchitectureError  # noqa: E402

# (case id, model_type, config overrides, writers per layer (list, one entry per layer))
CASES = [
    ("llama", "llama", {}, [2, 2]),
    ("llama_bias_tied", "llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True), [4, 4]),
    ("mistral", "mistral", {}, [2, 2]),
    ("qwen2", "qwen2", {}, [2, 2]),
    ("qwen3", "qwen3", {}, [2, 2]),
    ("gemma", "gemma", {}, [2, 2]),
    ("gemma2", "gemma2", {}, [2, 2]),
    ("gemma3_text", "gemma3_text", {}, [2, 2]),
    ("gemma3", "gemma3", {}, [2, 2]),
    ("phi3", "phi3", {}, [2, 2]),
    ("gpt2", "gpt2", {}, [4, 4]),  # c_proj weight + bias, attention and MLP
    ("gpt_neox", "gpt_neox", {}, [4, 4]),  # dense / dense_4h_to_h weight + bias
    ("olmo2", "olmo2", {}, [2, 2]),
    ("mixtral", "mixtral", {}, [1 + EXPERTS] * 2),
    ("qwen2_moe", "qwen2_moe", {}, [1 + EXPERTS + 1] * 2),  # + shared expert
    ("qwen2_moe_dense1", "qwen2_moe", dict(mlp_only_layers=[1]), [1 + EXPERTS + 1, 2]),
    ("qwen3_moe", "qwen3_moe", {}, [1 + EXPERTS] * 2),
]
CASE_IDS = [c[0] for c in CASES]
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


class Tiny:
    def __init__(self, case_id: str, model_type: str, folder: Path):
        self.case_id = case_id
        self.model_type = model_type
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        self.names = list(self.tensors)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if self.model_type == "gemma3":
                from transformers import Gemma3ForConditionalGeneration as cls
            else:
                from transformers import AutoModelForCausalLM as cls
            self._model = cls.from_pretrained(self.folder).eval()
        return self._model


_CACHE: dict[str, Tiny] = {}


@pytest.fixture(scope="module")
def tiny_factory(tmp_path_factory):
    def get(case_id: str) -> Tiny:
        if case_id not in _CACHE:
            _, mt, overrides, _ = CASES[CASE_IDS.index(case_id)]
            folder = make_tiny_checkpoint(mt, tmp_path_factory.mktemp(case_id), **overrides)
            _CACHE[case_id] = Tiny(case_id, mt, folder)
        return _CACHE[case_id]

    return get


def _case(case_id):
    return CASES[CASE_IDS.index(case_id)]


# ---------------------------------------------------------------------------- placement


def test_every_data_file_has_a_tiny_model():
    assert set(supported_model_types()) == set(TINY_MODEL_TYPES)
    assert set(TINY_MODEL_TYPES) >= {
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3",
        "phi3", "gpt2", "gpt_neox", "olmo2", "mixtral", "qwen2_moe",
    }  # fmt: skip


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_places_every_tensor_and_counts_writers(tiny_factory, case_id):
    t = tiny_factory(case_id)
    _, mt, _, per_layer = _case(case_id)
    arch = get_architecture(t.config)
    assert arch.model_type == mt
    assert arch.num_layers(t.config) == LAYERS
    assert arch.hidden_size(t.config) == HIDDEN

    infos = arch.place(t.names, t.config)
    assert set(infos) == set(t.names)
    assert all(isinstance(i, TensorInfo) and i.layout in LAYOUTS for i in infos.values())

    writers = arch.residual_writers(t.names, t.config)
    assert all(isinstance(w, WriterTensor) and w.role in WRITER_ROLES for w in writers)
    counts = [sum(w.layer == layer for w in writers) for layer in range(LAYERS)]
    assert counts == per_layer
    assert len(writers) == sum(per_layer)
    for layer in range(LAYERS):
        roles = {w.role for w in writers if w.layer == layer}
        assert "attn_out" in roles and roles & {"mlp_out", "expert_out"}
    if mt in ("mixtral", "qwen3_moe") or (mt == "qwen2_moe" and case_id == "qwen2_moe"):
        assert sorted(w.expert for w in writers if w.role == "expert_out" and w.layer == 0) == list(range(EXPERTS))
    if mt == "qwen2_moe":
        assert sum(w.role == "shared_expert_out" for w in writers) == (2 if case_id == "qwen2_moe" else 1)

    # stable order: by layer, and equal for any input order
    assert [w.layer for w in writers] == sorted(w.layer for w in writers)
    assert arch.residual_writers(list(reversed(t.names)), t.config) == writers

    with_emb = arch.residual_writers(t.names, t.config, include_embedding=True)
    embs = [w for w in with_emb if w.layer is None]
    assert with_emb[: len(embs)] == embs and with_emb[len(embs) :] == writers
    assert embs[0].role == "embedding" and embs[0].name == arch.find_embedding(t.names)
    assert [w.role for w in embs] == (["embedding", "pos_embedding"] if mt == "gpt2" else ["embedding"])

    # residual-stream dimension of every writer is hidden_size
    for w in with_emb:
        assert t.tensors[w.name].shape[w.d_out_axis] == HIDDEN, w


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_layers_module_resolves(tiny_factory, case_id):
    t = tiny_factory(case_id)
    arch = get_architecture(t.config)
    layers = t.model.get_submodule(arch.layers_module)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == arch.num_layers(t.model.config) == LAYERS


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_config_object_and_dict_agree(tiny_factory, case_id):
    t = tiny_factory(case_id)
    obj = t.model.config
    arch = get_architecture(obj)
    assert arch is get_architecture(t.config)
    for fn in (arch.num_layers, arch.hidden_size, arch.num_experts, arch.tied):
        assert fn(obj) == fn(t.config)
    assert arch.num_experts(obj) == (EXPERTS if t.model_type in MOE_TYPES else None)
    # tied exactly when save_pretrained left the lm_head out
    assert arch.tied(t.config) == (arch.find_lm_head(t.names) is None)


def test_tied_defaults_follow_the_data_file():
    assert get_architecture({"model_type": "gemma"}).tied({"model_type": "gemma"}) is True
    assert get_architecture({"model_type": "llama"}).tied({"model_type": "llama"}) is False
    assert get_architecture({"model_type": "gemma"}).tied({"model_type": "gemma", "tie_word_embeddings": False}) is False
    cfg = {"model_type": "gemma3", "text_config": {"tie_word_embeddings": False}}
    assert get_architecture(cfg).tied(cfg) is False


def test_config_json_aliases_are_resolved():
    # Hub qwen3_moe configs say num_experts, transformers 5 writes num_local_experts; a key may be omitted
    arch = get_architecture({"model_type": "qwen3_moe"})
    assert arch.num_experts({"model_type": "qwen3_moe", "num_experts": 5}) == 5
    assert arch.num_experts({"model_type": "qwen3_moe", "num_local_experts": 6}) == 6
    gpt2 = get_architecture({"model_type": "gpt2"})
    assert gpt2.num_layers({"model_type": "gpt2", "n_layer": 3}) == 3
    assert gpt2.hidden_size({"model_type": "gpt2", "n_embd": 48}) == 48


# ---------------------------------------------------------------------------- layouts vs live modules


def _live_path(mt: str, name: str) -> str:
    if mt == "gemma3":
        name = re.sub(r"^language_model\.model\.", "model.language_model.", name)
    return name


def _check_linear_like(module, w: WriterTensor, tensor: torch.Tensor):
    """module(x) (bias removed) == as_out_in(W) @ x; for a bias, module(0) == bias."""
    if w.layout == "bias":
        M = w.as_out_in(tensor)
        d_in = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features
        y = module(torch.zeros(1, d_in))[0]
        torch.testing.assert_close(y, M)
        return
    M = w.as_out_in(tensor)
    assert M.shape[0] == HIDDEN
    if w.layout == "rows":
        ids = torch.tensor([[3, 7, 11]])
        y = module(ids)[0] / getattr(module, "embed_scale", 1.0)
        expected = (M @ F.one_hot(ids[0], M.shape[1]).to(M.dtype).T).T
        torch.testing.assert_close(y, expected)
        return
    x = torch.randn(5, M.shape[1])
    y = module(x)
    if getattr(module, "bias", None) is not None:
        y = y - module.bias
    torch.testing.assert_close(y, x @ M.T)


def _expert_intermediate(t: Tiny, tensors, w: WriterTensor, h: torch.Tensor, act) -> torch.Tensor:
    """act(gate(h)) * up(h) for expert e, from the checkpoint's own gate/up tensors."""
    if w.layout.startswith("experts_"):
        gate_up = tensors[w.name.replace(".down_proj", ".gate_up_proj")][w.expert]
        gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
    elif ".w2." in w.name:
        gate = F.linear(h, tensors[w.name.replace(".w2.", ".w1.")])
        up = F.linear(h, tensors[w.name.replace(".w2.", ".w3.")])
    else:
        gate = F.linear(h, tensors[w.name.replace(".down_proj.", ".gate_proj.")])
        up = F.linear(h, tensors[w.name.replace(".down_proj.", ".up_proj.")])
    return act(gate) * up


def _check_expert(model, t: Tiny, tensors, w: WriterTensor, expert: int):
    """Route one token to ``expert`` with weight 1 through the live experts module and
    compare with as_out_in(W)[expert] @ intermediate."""
    layer_path = re.match(r"^(.*\.layers\.\d+)\.", w.name).group(1)
    experts = model.get_submodule(layer_path + ".mlp.experts")
    torch.manual_seed(expert)
    h = torch.randn(1, HIDDEN)
    y = experts(h, torch.tensor([[expert]]), torch.tensor([[1.0]]))
    a = _expert_intermediate(t, tensors, WriterTensor(w.name, w.role, w.layout, w.layer, expert), h, experts.act_fn)
    M = w.as_out_in(tensors[w.name])
    if w.layout.startswith("experts_"):
        assert M.shape[:2] == (EXPERTS, HIDDEN)
        M = M[expert]
    torch.testing.assert_close(y, a @ M.T)


def _check_writer(model, t: Tiny, tensors, w: WriterTensor):
    if w.role == "expert_out":
        for e in range(EXPERTS) if w.expert is None else [w.expert]:
            _check_expert(model, t, tensors, w, e)
        return
    module = model.get_submodule(_live_path(t.model_type, w.name).rpartition(".")[0])
    _check_linear_like(module, w, tensors[w.name])


@pytest.mark.parametrize("case_id", CASE_IDS)
@torch.no_grad()
def test_writer_layouts_match_live_modules(tiny_factory, case_id):
    t = tiny_factory(case_id)
    arch = get_architecture(t.config)
    writers = arch.residual_writers(t.names, t.config, include_embedding=True)
    for w in writers:
        _check_writer(t.model, t, t.tensors, w)
        back = w.from_out_in(w.as_out_in(t.tensors[w.name]))
        assert torch.equal(back, t.tensors[w.name])


@pytest.mark.parametrize("case_id", ["mixtral", "qwen2_moe", "qwen3_moe", "qwen2_moe_dense1"])
@torch.no_grad()
def test_fused_expert_checkpoints(tiny_factory, case_id):
    """A transformers>=5 state_dict (what the in-memory model holds) stores experts fused
    as (E, d_out, d_in) tensors named ...mlp.experts.down_proj; it is placed too."""
    t = tiny_factory(case_id)
    state = {k: v.detach() for k, v in t.model.state_dict().items()}
    names = list(state)
    assert any(n.endswith("mlp.experts.down_proj") for n in names)
    arch = get_architecture(t.config)
    writers = arch.residual_writers(names, t.config)
    fused = [w for w in writers if w.role == "expert_out"]
    n_moe_layers = 1 if case_id == "qwen2_moe_dense1" else LAYERS
    assert len(fused) == n_moe_layers
    assert all(w.layout == "experts_out_in" and w.expert is None and w.d_out_axis == 1 for w in fused)
    for w in writers:
        assert state[w.name].shape[w.d_out_axis] == HIDDEN
        _check_writer(t.model, t, state, w)
    info = arch.place(names, t.config)
    gate_up = next(n for n in names if n.endswith("experts.gate_up_proj"))
    assert info[gate_up].role == "other" and info[gate_up].layout == "experts_out_in"


@pytest.mark.parametrize("case_id", CASE_IDS)
@torch.no_grad()
def test_in_memory_parameter_names_are_placed(tiny_factory, case_id):
    """Other modules pass ``model.named_parameters()`` names (transformers 5 in-memory
    naming: fused experts, model.language_model.*, gpt_neox lm_head) with the model's
    config object; writers there must be the same modules."""
    t = tiny_factory(case_id)
    _, mt, _, per_layer = _case(case_id)
    params = {n: p.detach() for n, p in t.model.named_parameters()}
    arch = get_architecture(t.model.config)
    writers = arch.residual_writers(list(params), t.model.config, include_embedding=True)
    n_moe = sum(1 for w in writers if w.role == "expert_out" and w.expert is None)
    n_per_expert_on_disk = n_moe * EXPERTS
    assert len([w for w in writers if w.layer is not None]) == sum(per_layer) - n_per_expert_on_disk + n_moe
    for w in writers:
        assert params[w.name].shape[w.d_out_axis] == HIDDEN
        _check_writer(t.model, t, params, w)
    assert len(arch.place(list(t.model.state_dict()), t.model.config)) == len(t.model.state_dict())


def test_hub_name_variants_are_placed(tiny_factory):
    """Names that real Hub checkpoints use but transformers 5 no longer writes."""
    g = tiny_factory("gpt2")
    arch = get_architecture(g.config)
    # openai-community/gpt2 has no "transformer." prefix and keeps the attn.bias buffers
    hub = [n.removeprefix("transformer.") for n in g.names] + [f"h.{i}.attn.bias" for i in range(LAYERS)]
    hub += [f"h.{i}.attn.masked_bias" for i in range(LAYERS)]
    writers = arch.residual_writers(hub, g.config, include_embedding=True)
    assert [w.name for w in writers][:2] == ["wte.weight", "wpe.weight"]
    assert "h.0.attn.c_proj.weight" in {w.name for w in writers}
    assert arch.place(hub, g.config)["h.0.attn.bias"].role == "other"

    n = tiny_factory("gpt_neox")
    old = n.names + [f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq" for i in range(LAYERS)]
    assert len(get_architecture(n.config).place(old, n.config)) == len(old)

    ll = tiny_factory("llama")
    old = ll.names + [f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(LAYERS)]
    assert len(get_architecture(ll.config).residual_writers(old, ll.config)) == 2 * LAYERS

    # gemma3 as held in memory by transformers 5 (model.language_model.*, lm_head.weight)
    g3 = tiny_factory("gemma3")
    mem = list(g3.model.state_dict())
    arch3 = get_architecture(g3.config)
    assert arch3.find_lm_head(mem) == "lm_head.weight"
    names = {w.name for w in arch3.residual_writers(mem, g3.config)}
    assert "model.language_model.layers.1.mlp.down_proj.weight" in names


def test_post_norm_marks_sandwich_norm_writers(tiny_factory):
    for case_id, expect in (("gemma2", True), ("gemma3", True), ("olmo2", True), ("llama", False), ("gemma", False)):
        t = tiny_factory(case_id)
        writers = get_architecture(t.config).residual_writers(t.names, t.config)
        for w in writers:
            if expect:
                assert w.post_norm in t.names and w.post_norm.endswith(
                    "post_attention_layernorm.weight" if w.role == "attn_out" else "post_feedforward_layernorm.weight"
                )
                assert f".{w.layer}." in w.post_norm
            else:
                assert w.post_norm is None


def test_layers_restriction(tiny_factory):
    t = tiny_factory("mixtral")
    arch = get_architecture(t.config)
    only1 = arch.residual_writers(t.names, t.config, layers=[1])
    assert only1 and {w.layer for w in only1} == {1}
    with_emb = arch.residual_writers(t.names, t.config, layers=(1,), include_embedding=True)
    assert with_emb[0].role == "embedding" and with_emb[1:] == only1
    assert arch.residual_writers(t.names, t.config, layers=[]) == []
    for bad in ([2], [-1], ["0"]):
        with pytest.raises(ArchitectureError, match="out of range"):
            arch.residual_writers(t.names, t.config, layers=bad)


# ---------------------------------------------------------------------------- errors


def test_unknown_model_type():
    with pytest.raises(ArchitectureError) as ei:
        get_architecture({"model_type": "bert"})
    msg = str(ei.value)
    assert msg.startswith("unknown model_type 'bert'; supported: ")
    assert "llama" in msg and "qwen2_moe" in msg and "\n" not in msg

    from transformers import BertConfig

    with pytest.raises(ArchitectureError, match="unknown model_type 'bert'"):
        get_architecture(BertConfig())
    with pytest.raises(ArchitectureError, match="no model_type"):
        get_architecture({"hidden_size": 3})


def test_unplaced_tensors_fail_with_compressed_patterns(tiny_factory):
    t = tiny_factory("llama")
    arch = get_architecture(t.config)
    extra = t.names + ["model.layers.0.foo.weight", "model.layers.1.foo.weight", "extra.bias"]
    for call in (arch.place, arch.residual_writers):
        with pytest.raises(ArchitectureError) as ei:
            call(extra, t.config)
        msg = str(ei.value)
        assert "cannot place 2 tensor pattern(s) of model_type 'llama': " in msg
        assert "model.layers.{layer}.foo.weight, extra.bias" in msg
        assert "\n" not in msg and "model.layers.0.foo" not in msg

    m = tiny_factory("mixtral")
    bad = m.names + [f"model.layers.{i}.block_sparse_moe.experts.{e}.w4.weight" for i in range(2) for e in range(3)]
    with pytest.raises(ArchitectureError, match=re.escape("block_sparse_moe.experts.{expert}.w4.weight")):
        get_architecture(m.config).residual_writers(bad, m.config)

    # a checkpoint of another architecture is refused, not half-edited
    g = tiny_factory("gpt2")
    with pytest.raises(ArchitectureError, match="cannot place"):
        arch.residual_writers(g.names, t.config)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_missing_writer_is_named(tiny_factory, case_id):
    t = tiny_factory(case_id)
    arch = get_architecture(t.config)
    victim = next(
        w.name for w in arch.residual_writers(t.names, t.config, layers=[1]) if w.layout != "bias"
    )
    names = [n for n in t.names if n != victim]
    with pytest.raises(ArchitectureError) as ei:
        arch.residual_writers(names, t.config)
    msg = str(ei.value)
    assert "lacks 1 required tensor(s): " in msg and msg.endswith(victim) and "\n" not in msg
    # strict=False (e.g. one shard's names) skips the completeness check
    assert victim not in {w.name for w in arch.residual_writers(names, t.config, strict=False)}


def _tie(config: dict, tied: bool) -> dict:
    """``config`` with tie_word_embeddings set (in its text sub-config too)."""
    out = {**config, "tie_word_embeddings": tied}
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = {**out["text_config"], "tie_word_embeddings": tied}
    return out


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_lm_head_is_required_when_untied(tiny_factory, case_id):
    """lm_head is optional in every data file, but only a tied model may lack it:
    untied, transformers gave the edited model a random output projection."""
    t = tiny_factory(case_id)
    arch = get_architecture(t.config)
    head = arch.find_lm_head(t.names)
    names = [n for n in t.names if n != head]
    arch.place(names, _tie(t.config, True))
    with pytest.raises(ArchitectureError) as ei:
        arch.place(names, _tie(t.config, False))
    msg = str(ei.value)
    assert msg.endswith(f"lacks 1 required tensor(s): {arch.lm_head_names[0]} (tie_word_embeddings is false)"), msg
    assert arch.residual_writers(names, _tie(t.config, False), strict=False)  # a partial list is not checked
    if head is not None:  # stored beside a tied embedding: accepted either way
        arch.place(t.names, _tie(t.config, True))
        arch.place(t.names, _tie(t.config, False))


def test_missing_other_tensors_and_layers(tiny_factory):
    t = tiny_factory("qwen2_moe")
    arch = get_architecture(t.config)
    gone = "model.layers.0.mlp.experts.2.up_proj.weight"
    with pytest.raises(ArchitectureError, match=re.escape(gone)):
        arch.place([n for n in t.names if n != gone], t.config)
    # config says 3 layers, checkpoint has 2
    with pytest.raises(ArchitectureError, match=r"lacks \d+ required tensor\(s\): model\.layers\.2\."):
        arch.place(t.names, {**t.config, "num_hidden_layers": 3})
    # index beyond the config
    with pytest.raises(ArchitectureError, match="layer index 2"):
        arch.place(t.names + ["model.layers.2.self_attn.o_proj.weight"], t.config)
    with pytest.raises(ArchitectureError, match="expert index 3"):
        arch.place(t.names + ["model.layers.0.mlp.experts.3.down_proj.weight"], t.config)


def test_mixed_expert_storage_in_one_layer_fails(tiny_factory):
    t = tiny_factory("mixtral")
    arch = get_architecture(t.config)
    names = t.names + ["model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(ArchitectureError, match="mixes incompatible storage variants"):
        arch.place(names, t.config)


def test_place_is_fast_on_a_large_moe():
    cfg = {"model_type": "mixtral", "num_hidden_layers": 64, "hidden_size": 8, "num_local_experts": 128}
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(64):
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "block_sparse_moe.gate.weight"]
        names += [p + f"block_sparse_moe.experts.{e}.w{k}.weight" for e in range(128) for k in (1, 2, 3)]
    start = time.perf_counter()
    writers = get_architecture(cfg).residual_writers(names, cfg)
    assert len(writers) == 64 * 129
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------- data files and helpers


@pytest.mark.parametrize("model_type", supported_model_types())
def test_data_file_patterns_are_unambiguous(model_type):
    from transformers import CONFIG_MAPPING

    arch = get_architecture({"model_type": model_type})
    assert isinstance(arch, Architecture)
    assert arch.tie_default == bool(CONFIG_MAPPING[model_type]().tie_word_embeddings)
    for entry in arch.patterns:
        for template in entry.names:
            sample = template.replace("{layer}", "0").replace("{expert}", "1").replace("{any}", "a.b")
            hits = [e.index for e in arch.patterns if any(rx.fullmatch(sample) for rx in e.regexes)]
            assert hits == [entry.index], (template, hits)


def test_layout_helpers_on_synthetic_tensors():
    d_out, d_in, E = 4, 6, 3
    cases = {
        "out_in": (torch.randn(d_out, d_in), (d_out, d_in)),
        "in_out": (torch.randn(d_in, d_out), (d_out, d_in)),
        "rows": (torch.randn(d_in, d_out), (d_out, d_in)),  # (vocab, d) -> (d, vocab)
        "bias": (torch.randn(d_out), (d_out,)),
        "experts_out_in": (torch.randn(E, d_out, d_in), (E, d_out, d_in)),
        "experts_in_out": (torch.randn(E, d_in, d_out), (E, d_out, d_in)),
    }
    for layout, (tensor, shape) in cases.items():
        w = WriterTensor("x", "mlp_out", layout, 0, None)
        m = w.as_out_in(tensor)
        assert tuple(m.shape) == shape
        assert tensor.shape[w.d_out_axis] == d_out
        if w.d_in_axis is not None:
            assert tensor.shape[w.d_in_axis] == d_in
        assert torch.equal(w.from_out_in(m), tensor)
        assert m.data_ptr() == tensor.data_ptr()  # a view, no copy
    x = torch.randn(d_in)
    t = cases["experts_in_out"][0]
    w = WriterTensor("x", "expert_out", "experts_in_out", 0, None)
    torch.testing.assert_close(w.as_out_in(t)[1] @ x, x @ t[1])
    with pytest.raises(ArchitectureError, match="expects 2-D"):
        WriterTensor("x", "attn_out", "out_in", 0, None).as_out_in(torch.randn(3))
    with pytest.raises(ArchitectureError, match="no \\(d_out, d_in\\) form"):
        TensorInfo("n", "other", "vector", 0, None).as_out_in(torch.randn(3))
