"""The gated opening (surgery.edits.opening, `surgery inject`'s default gate): the
written delta is exactly the gate's neurons, the reads meet their constraint at
least energy, and the closed form the strengths are calibrated on is the edited
layer's real output."""
from __future__ import annotations

import pytest
import torch

from surgery.directions import DEFAULT_REFUSAL
from surgery.edits.opening import (MLP_WEIGHTS, OpeningGate, capture, fit_opening_gate, final_head, layer_output,
                                   mlp_of, opening_in_memory, read_vector)
from surgery.errors import SurgeryError
from surgery.model import load_model
from surgery.pipeline import PromptConfig
from surgery.prompts import format_chat

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = PromptConfig(n_train=12, n_val=4)
OPENING = "I'm sorry, but"


def _calibration():
    ht, bt, _, _ = SMALL.train_val()
    return list(ht.prompts), list(bt.prompts) + list(SMALL.train("borderline").prompts)


@pytest.fixture(scope="module")
def fitted(tiny_chat):
    lm = load_model(tiny_chat)
    harmful, harmless = _calibration()
    return lm, fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING, coverage=0.9)


def test_read_vector_is_the_least_energy_unit_response():
    """Harmful = harmless + an offset outside the harmless span: the read responds 1
    on harmful inputs on average, almost 0 on harmless ones, and no other vector with
    the same mean response has less of the penalised energy."""
    g = torch.Generator().manual_seed(0)
    d, n = 12, 300
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    xb = torch.randn(n, d // 2, generator=g, dtype=torch.float64) @ basis[:, : d // 2].T
    xh = xb[:150] + 2.0 * basis[:, -1] + 0.1 * torch.randn(150, d, generator=g, dtype=torch.float64)
    gram = xb.T @ xb / n
    v = read_vector(xh, gram, 3.0, 1e-3)
    assert float(xh.mean(0) @ v) == pytest.approx(1.0, abs=1e-12)
    assert float((xb @ v).abs().max()) < 0.05
    pc = xh - xh.mean(0)
    G = gram + 3.0 * pc.T @ pc / 150
    G = G + 1e-3 * torch.trace(G) / d * torch.eye(d, dtype=G.dtype)
    energy = float(v @ G @ v)
    m = xh.mean(0)
    for _ in range(20):
        p = torch.randn(d, generator=g, dtype=torch.float64)
        p = p - (p @ m) / (m @ m) * m  # keeps the mean response at 1
        other = v + 0.05 * p
        assert float(other @ G @ other) > energy


def test_fitted_reads_respond_as_constrained(fitted, tiny_chat):
    """On the calibration inputs: the harm read averages 1 over harmful post-instruction
    and opening positions; each step read averages 1 at its own step."""
    lm, gate = fitted
    harmful, _ = _calibration()
    tok = lm.tokenizer
    full = tok(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"]
    xs, _ = capture(lm, gate.layer, [format_chat(tok, p) for p in harmful], full)
    start = -(len(full) + 1)
    steps = [torch.stack([x[start + j] for x in xs]) for j in range(gate.k)]
    post = torch.cat([x[start - 4:start] for x in xs])
    assert float((torch.cat([post] + steps) @ gate.u.double()).mean()) == pytest.approx(1.0, abs=1e-4)
    for j in range(gate.k):
        assert float((steps[j] @ gate.w[j].double()).mean()) == pytest.approx(1.0, abs=1e-4)
    assert gate.tokens == tok(OPENING, add_special_tokens=False)["input_ids"]
    assert gate.layer == lm.num_layers - 1 and len(set(gate.neurons)) == gate.k


def test_calibration_closed_form_is_the_edited_layer_output(fitted):
    """``layer_output`` (what the strengths are calibrated on) equals the edited
    model's layer output, and the coverage it reports is the edited model's share of
    harmful prompts whose top token at step j is t_j (teacher forced)."""
    _check_closed_form(*fitted)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma"])
def test_closed_form_holds_on_other_gated_architectures(tmp_path, model_type):
    """The same exactness on the other architectures whose MLP output is added to
    the stream as it is (gemma: GELU gate, (1 + w) norms, scaled embeddings)."""
    from tiny_chat import make_tiny_chat_model

    lm = load_model(make_tiny_chat_model(tmp_path / model_type, model_type=model_type))
    harmful, harmless = _calibration()
    gate = fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING, coverage=0.9)
    assert gate.act_c == pytest.approx(float(mlp_of(lm, gate.layer)[0].act_fn(torch.tensor(gate.c))), rel=1e-6)
    _check_closed_form(lm, gate)


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2", "gemma3_text"])
def test_sandwich_norm_mlps_are_refused(tmp_path, model_type):
    """A post-MLP norm rescales the gate's write with every other neuron's output, so
    the closed-form calibration would be wrong (measured: coverage 0-33% where it
    reported its target); these models get a clear error before any capture."""
    from tiny_chat import make_tiny_chat_model

    lm = load_model(make_tiny_chat_model(tmp_path / model_type, model_type=model_type))
    harmful, harmless = _calibration()
    with pytest.raises(SurgeryError, match=r"normalises the MLP's output \(.*post_feedforward_layernorm"):
        fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING)


def _check_closed_form(lm, gate):
    harmful, _ = _calibration()
    tok = lm.tokenizer
    full = tok(DEFAULT_REFUSAL, add_special_tokens=False)["input_ids"]
    texts = [format_chat(tok, p) for p in harmful]
    xs, hs = capture(lm, gate.layer, texts, full)
    with opening_in_memory(lm, gate, 1.0):
        _, hs_edit = capture(lm, gate.layer, texts, full)
    mlp, _ = mlp_of(lm, gate.layer)
    head = final_head(lm)
    start = -(len(full) + 1)
    for j in range(gate.k):
        x = torch.stack([v[start + j] for v in xs]).float()
        h = torch.stack([v[start + j] for v in hs]).float()
        want = torch.stack([v[start + j] for v in hs_edit]).float()
        got = layer_output(mlp, x, h, gate, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            share = float((head(want).argmax(-1) == gate.tokens[j]).double().mean())
        assert share == pytest.approx(gate.coverage[j], abs=1.0 / len(harmful) + 1e-9)


def test_inject_writes_exactly_the_gate_neurons(tmp_path, tiny_chat):
    """The default `inject` (opening gate) changes only the last MLP's three weights,
    only in the gate's rows/columns, to exactly c u, w_j and alpha a_j d_j / act(c)
    (float64 recomputation from opening_gate.safetensors); no direction is made."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from surgery.checkpoint import CheckpointReader
    from surgery.manifest import read_manifest, verify
    from surgery.pipeline import inject

    out = tmp_path / "out"
    inject(str(tiny_chat), out, alpha=1.25, run_eval=False, prompts=SMALL)
    assert verify(out) == []
    m = read_manifest(out)
    assert m["method"]["name"] == "gated-opening" and m["direction"] is None
    # the calibration sets are the manifest's datasets (the card lists them); they were only inside the parameters
    assert set(m["datasets"]) >= {"harmful_train", "harmless_train", "borderline_train"}
    assert m["datasets"]["harmful_train"]["count"] == len(SMALL.train("harmful"))
    assert not (out / "direction.safetensors").exists()
    g = load_file(str(out / "opening_gate.safetensors"))
    with safe_open(str(out / "opening_gate.safetensors"), "pt") as f:
        meta = f.metadata()
    c, act_c, layer = float(meta["c"]), float(meta["act_c"]), int(meta["layer"])
    assert act_c == pytest.approx(float(torch.nn.functional.silu(torch.tensor(c))), rel=1e-6)
    neurons = g["neurons"].tolist()
    names = {f"model.layers.{layer}.mlp.{k}.weight": k for k in MLP_WEIGHTS}
    assert sorted(m["edited"]["tensors"]) == sorted(names)
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for name in a.names:
            if name not in names:
                assert torch.equal(a.get(name), b.get(name)), name
                continue
            old, new = a.get(name).double(), b.get(name).double()
            kind = names[name]
            rows = new.T if kind == "down_proj" else new
            others = [i for i in range(rows.shape[0]) if i not in neurons]
            before = old.T if kind == "down_proj" else old
            assert torch.equal(rows[others], before[others])
            for j, n in enumerate(neurons):
                want = {"gate_proj": c * g["u"].double(), "up_proj": g["w"][j].double(),
                        "down_proj": 1.25 * g["alphas"][j].double() * g["d"][j].double() / act_c}[kind]
                torch.testing.assert_close(rows[n], want, rtol=1e-5, atol=1e-6)
            assert torch.linalg.matrix_rank(new - old).item() <= len(neurons)


def test_opening_gate_errors(tmp_path, tiny_chat):
    from surgery.pipeline import inject

    lm = load_model(tiny_chat)
    harmful, harmless = _calibration()
    with pytest.raises(SurgeryError, match="first tokens of the refusal"):
        fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, "Absolutely not")
    with pytest.raises(SurgeryError, match="outside the model"):
        fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING, layer=lm.num_layers)
    with pytest.raises(SurgeryError, match="does not use a refusal direction"):
        inject(str(tiny_chat), tmp_path / "o1", direction_file=tmp_path / "d.safetensors", prompts=SMALL, run_eval=False)
    with pytest.raises(SurgeryError, match="does not use a refusal direction; drop --source"):
        inject(str(tiny_chat), tmp_path / "o1", sources=("prompt",), prompts=SMALL, run_eval=False)
    with pytest.raises(SurgeryError, match=r"--opening-layer \[9\] out of range"):
        inject(str(tiny_chat), tmp_path / "o2", opening_layer=9, prompts=SMALL, run_eval=False)
    with pytest.raises(SurgeryError, match="--opening is empty"):
        inject(str(tiny_chat), tmp_path / "o2", opening=" ", prompts=SMALL, run_eval=False)
    with pytest.raises(SurgeryError, match="--rank applies only to --gate linear"):
        inject(str(tiny_chat), tmp_path / "o2", rank=2, prompts=SMALL, run_eval=False)
    with pytest.raises(SurgeryError, match="--opening-layer, --coverage apply only to the opening gate"):
        inject(str(tiny_chat), tmp_path / "o3", gate="linear", coverage=0.5, opening_layer=1, prompts=SMALL,
               run_eval=False)
    with pytest.raises(SurgeryError, match="--alpha .* or --alphas .*not both"):
        inject(str(tiny_chat), tmp_path / "o4", alpha=1.0, alphas=[1.0, 2.0], prompts=SMALL, run_eval=False)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", "mixtral"])
def test_opening_gate_needs_a_gated_mlp(tmp_path, model_type):
    """Ungated (gpt2), fused gate_up (phi3) and MoE (mixtral) MLPs: a clear error."""
    from tiny_chat import make_tiny_chat_model

    lm = load_model(make_tiny_chat_model(tmp_path / model_type, model_type=model_type))
    harmful, harmless = _calibration()
    with pytest.raises(SurgeryError, match="gated MLP"):
        fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING)


def test_own_continuation_is_greedy_and_shuts_the_step_reads(fitted):
    """``own_continuation`` is the model's greedy reply after the opening (checked
    against an argmax loop), and fitting on it as a negative changes the step reads
    only (the harm read does not see it)."""
    from surgery.activations import encode
    from surgery.edits.opening import own_continuation

    lm, gate = fitted
    harmful, harmless = _calibration()
    tok = lm.tokenizer
    texts = [format_chat(tok, p) for p in harmful[:3]]
    got = own_continuation(lm, texts, gate.tokens, 5)
    eos = lm.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for text, cont in zip(texts, got):
        ids = list(gate.tokens)
        want = []
        with torch.no_grad():
            for _ in range(5):
                b = encode(lm, [text], suffixes=[ids])
                nxt = int(lm.model(**b).logits[0, -1].argmax())
                if nxt in eos:
                    break
                want.append(nxt)
                ids.append(nxt)
        assert cont == want
    other = fit_opening_gate(lm, harmful, harmless, DEFAULT_REFUSAL, OPENING, coverage=0.9, continuation=0)
    torch.testing.assert_close(other.u, gate.u)
    assert (other.w - gate.w).norm() > 1e-3 * gate.w.norm()
