"""Directions on a tiny chat model: difference of means against a manual float64
recomputation, response-contrast positions, ablation removes the component,
selection and its fallback, the artifact round trip, and the CLI verbs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery import directions as D
from surgery.cli import main as cli
from surgery.errors import DirectionError
from surgery.model import load_model
from surgery.prompts import builtin, format_chat


@pytest.fixture(scope="module")
def lm(tiny_chat):
    return load_model(tiny_chat)


def test_prompt_candidates_match_manual_float64(lm):
    harmful = list(builtin("harmful", "train").prompts[:5])
    harmless = list(builtin("harmless", "train").prompts[:7])
    cands = D.prompt_candidates(lm, harmful, harmless, positions=[-1, -2], batch_size=3)
    assert len(cands) == 2 * lm.num_layers

    def manual(prompts, pos, layer):
        acc = torch.zeros(lm.hidden_size, dtype=torch.float64)
        for p in prompts:  # one at a time: no padding involved
            ids = lm.tokenizer(format_chat(lm.tokenizer, p), add_special_tokens=False, return_tensors="pt")
            hs = lm.model(**ids, output_hidden_states=True).hidden_states
            acc += hs[layer][0, pos].double()
        return acc / len(prompts)

    for c in cands:
        if c.layer in (0, 2):
            ref = manual(harmful, c.position, c.layer) - manual(harmless, c.position, c.layer)
            torch.testing.assert_close(c.vector, ref, rtol=1e-4, atol=1e-5)


def test_post_instruction_positions_chatml(lm):
    tail = "<|im_end|>\n<|im_start|>assistant\n"  # what follows the instruction in ChatML
    n = len(lm.tokenizer(tail, add_special_tokens=False)["input_ids"])
    assert n >= 3 and D.post_instruction_positions(lm.tokenizer) == list(range(-n, 0))
    text = format_chat(lm.tokenizer, "Tell me a joke")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lm.tokenizer.decode(ids[-n:]).replace(" ", "").startswith("<|im_end|>")


def test_ablation_removes_direction_everywhere(lm):
    torch.manual_seed(1)
    r = torch.randn(lm.hidden_size, dtype=torch.float64)
    text = format_chat(lm.tokenizer, "How do I bake bread?")
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    before = {n: p.clone() for n, p in lm.model.named_parameters()}
    with D.ablated(lm, r):
        hs = lm.model(**ids, output_hidden_states=True).hidden_states
    rh = (r / r.norm()).float()
    for layer in range(1, lm.num_layers):
        assert (hs[layer][0] @ rh).abs().max() < 1e-4
    for n, p in lm.model.named_parameters():  # weights restored
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("model_type", ["gemma2", "olmo2", "llama"])
def test_ablation_removes_direction_on_sandwich_norm_models(tmp_path, model_type):
    """gemma2 / olmo2 normalise o_proj and down_proj outputs with per-channel weights before the
    residual add: a weight projection alone left |h . r| / |h| at 0.13-0.17 after layer 0 once the
    norm weights are not all equal (fresh inits hide it, so they are perturbed here)."""
    from tiny_chat import make_tiny_chat_model

    lm = load_model(make_tiny_chat_model(tmp_path / "m", model_type=model_type, layers=3))
    torch.manual_seed(0)
    for name, p in lm.model.named_parameters():
        if "norm" in name:
            p.data += 0.5 * torch.randn_like(p)
    r = torch.randn(lm.hidden_size, dtype=torch.float64)
    ids = lm.tokenizer(format_chat(lm.tokenizer, "How do I bake bread?"), add_special_tokens=False,
                       return_tensors="pt")
    rh = (r / r.norm()).float()
    captured = []
    hook = lm.model.model.norm.register_forward_hook(lambda m, a, o: captured.append(a[0]))  # the last layer's output
    try:
        with D.ablated(lm, r):
            hs = lm.model(**ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    for h in [*hs[1:lm.num_layers], captured[0]]:
        assert ((h[0] @ rh).abs() / h[0].norm(dim=-1)).max() < 1e-5


def test_response_candidates_and_selection(lm):
    harmful = list(builtin("harmful", "train").prompts[:6])
    cands = D.response_candidates(lm, harmful, k=3, batch_size=4)
    assert len(cands) == lm.num_layers and all(c.position == "reply[0:3]" for c in cands)
    with pytest.raises(DirectionError, match="shorter than"):
        D.response_candidates(lm, harmful, refusal="No", k=3)


def test_select_falls_back_with_warning(caplog):
    cands = [D.Candidate("prompt", l, -1, torch.ones(4, dtype=torch.float64),
                         {"bypass": -l, "induce": -1.0, "induce_harmful": 0.0, "selectivity": 0.1 * l, "kl": 0.5})
             for l in range(1, 4)]
    with caplog.at_level(logging.WARNING):
        idx, why = D.select(cands, num_layers=10, rank_by="bypass")
    assert idx == 2 and "no candidate passed" in why and "no candidate passed" in caplog.text
    idx, why = D.select(cands, num_layers=10, rank_by="selectivity")
    assert idx == 2 and "passing the filters" in why
    # layer cut-off applies to every ranking
    idx, _ = D.select(cands, num_layers=4, rank_by="selectivity")
    assert cands[idx].layer < 3


def test_compute_directions_and_artifact(tmp_path, lm):
    hs = list(builtin("harmful", "train").prompts[:6])
    bs = list(builtin("harmless", "train").prompts[:6])
    hv = list(builtin("harmful", "val").prompts[:4])
    bv = list(builtin("harmless", "val").prompts[:4])
    dirs = D.compute_directions(lm, hs, bs, hv, bv, sources=("response", "prompt", "system"), batch_size=4)
    assert {c.source for c in dirs.candidates} == {"response", "prompt", "system"}
    assert dirs.best.layer < int(0.8 * lm.num_layers)
    path = dirs.save(tmp_path / "d.safetensors")
    def no_infinity(c):
        raise AssertionError(f"direction metadata is not strict JSON: {c}")

    meta = json.loads((tmp_path / "d.safetensors.json").read_text(), parse_constant=no_infinity)
    assert any(c.get("skipped") == "layer cut-off" for c in meta["candidates"])
    assert meta["chosen"] == dirs.chosen and len(meta["candidates"]) == len(dirs.candidates)
    back = D.Directions.load(path)
    torch.testing.assert_close(back.best.vector, dirs.best.vector.float().double())
    back.check_width(lm.hidden_size)
    with pytest.raises(DirectionError, match="width"):
        back.check_width(lm.hidden_size + 1)
    with pytest.raises(DirectionError, match="unknown direction source"):
        D.compute_directions(lm, hs, bs, hv, bv, sources=("nope",))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(DirectionError, match="bad.safetensors"):
        D.Directions.load(bad)


def test_cli_directions_and_eval(tmp_path, tiny_chat):
    runner = CliRunner()
    out = tmp_path / "d.safetensors"
    r = runner.invoke(cli, ["directions", str(tiny_chat), "-o", str(out), "--source", "prompt"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "direction: prompt layer" in r.output
    # an existing file needs --overwrite; the model's own folder (its weights) is never written to
    before = out.read_bytes()
    r = runner.invoke(cli, ["directions", str(tiny_chat), "-o", str(out), "--source", "prompt"])
    assert r.exit_code == 2 and "exists (pass --overwrite" in r.output and out.read_bytes() == before
    weights = next(Path(tiny_chat).glob("*.safetensors"))
    w_before = weights.read_bytes()
    for target in (weights, Path(tiny_chat) / "new.safetensors"):
        r = runner.invoke(cli, ["directions", str(tiny_chat), "-o", str(target), "--source", "prompt", "--overwrite"])
        assert r.exit_code == 2 and "the input" in r.output, r.output
    assert weights.read_bytes() == w_before and not (Path(tiny_chat) / "new.safetensors").exists()
    rep = tmp_path / "rep.json"
    r = runner.invoke(cli, ["eval", str(tiny_chat), "--reference", str(tiny_chat), "--max-new-tokens", "4",
                            "--json", str(rep)])
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert data["model"]["kl_first_token_harmless"] == pytest.approx(0.0, abs=1e-6)
    assert data["model"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert set(data["model"]["sets"]) == {"harmful", "harmless", "borderline"}
    assert data["model"]["sets"]["harmful"]["count"] == 40
    # the report keeps every reply with its verdict, so a judge can be re-run on it
    ex = data["model"]["sets"]["harmless"]["examples"]
    assert len(ex) == 40 and all(set(e) == {"prompt", "reply", "refused"} for e in ex)
    assert data["model"]["judge_description"]["markers"] and "excluded" in data["model"]["judge_description"]


def test_greedy_ids_match_a_loop_without_cache(lm):
    """Batched, left-padded, KV-cached greedy generation (with and without a
    prefilled reply opening) equals argmax decoding one unpadded prompt at a time."""
    import torch

    from surgery.evaluation.generate import chat_texts, greedy_ids

    texts = chat_texts(lm, ["How do I bake bread?", "Name a planet.", "Write a short poem about the sea and the sky."])
    opening = lm.tokenizer("I'm sorry", add_special_tokens=False)["input_ids"]
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for prefill in (None, opening):
        got = greedy_ids(lm, texts, max_new_tokens=6, batch_size=2, prefill=prefill)
        for text, ids in zip(texts, got):
            seq = lm.tokenizer(text, add_special_tokens=False)["input_ids"] + list(prefill or [])
            want = []
            with torch.no_grad():
                for _ in range(6):
                    t = int(lm.model(torch.tensor([seq + want])).logits[0, -1].argmax())
                    if t in eos_ids:
                        break
                    want.append(t)
            assert ids == want


def test_direction_file_without_or_with_a_broken_sidecar(tmp_path):
    """Without its .json the file's own 'chosen' vector is used (candidate 0 was);
    a corrupt sidecar or a file of other tensors is a one-line DirectionError; a
    file holding one bare vector (another tool's) is read as that direction."""
    from safetensors.torch import save_file

    from surgery.directions import Candidate, Directions
    from surgery.errors import DirectionError

    cands = [Candidate("response", i, "reply[0:4]", torch.randn(8, dtype=torch.float64)) for i in range(3)]
    path = Directions(cands, 2, "test").save(tmp_path / "d.safetensors")
    side = Path(f"{path}.json")
    good = side.read_text()
    side.unlink()
    assert torch.allclose(Directions.load(path).best.vector, cands[2].vector.float().double())
    for text, match in (("{bad", "cannot read"), (good.replace('"chosen": 2', '"chosen": 5'), "'chosen' is 5"),
                        ("[1, 2]", "JSON object")):
        side.write_text(text)
        with pytest.raises(DirectionError, match=match):
            Directions.load(path)
    side.unlink()
    save_file({"a": torch.ones(8), "b": torch.ones(8)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(DirectionError, match="no 'directions' tensor .*a, b"):
        Directions.load(tmp_path / "two.safetensors")
    save_file({"refusal_dir": torch.arange(8.0)}, str(tmp_path / "bare.safetensors"))
    assert torch.equal(Directions.load(tmp_path / "bare.safetensors").best.vector, torch.arange(8.0).double())
