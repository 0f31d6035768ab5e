"""The LoRA trainer, lora-sft and SAILS end to end on the tiny chat model:
the streamed merge against PEFT's own merge, the subspace constraint of
SAILS, determinism, and bad inputs refused before training."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import CheckpointReader
from surgery.errors import SurgeryError
from surgery.manifest import read_manifest, verify
from surgery.model import load_model
from surgery.pipeline import PromptConfig
from surgery.prompts import builtin
from surgery.training import LoraSpec, TrainConfig, attach, build_refusal_data, train
from surgery.training.harden import LoraSFT, train_harden
from surgery.training.sails import Sails
from surgery.training.trainer import _batch, _loss, _weights


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(prompts=PromptConfig(n_train=6, n_val=3), reply_tokens=6, run_eval=False, progress=False)


def _cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "lr": 1e-2, "eval_tokens": 4, "max_over_refusal": 1.0,
                          "max_kl": 1e9, **kw})


def _data(lm, n=6):
    return build_refusal_data(lm, builtin("harmful", "train").subset(n), [builtin("harmless", "train").subset(n)],
                              reply_tokens=6, own_refusals=False)


def test_batch_marks_exactly_the_reply_predicting_logits(tiny_chat):
    lm = load_model(tiny_chat)
    data = _data(lm, 3)
    ex = data.examples[:4]
    b = _batch(ex, 0, lm.device)
    for i, e in enumerate(ex):
        row = b["tgt"][i]
        idx = row.nonzero().flatten().tolist()
        p, r = len(e.prompt_ids), len(e.reply_ids)
        assert idx == list(range(p - 1, p + r - 1))  # logit t predicts token t+1: the reply tokens
        assert b["input_ids"][i, p:p + r].tolist() == e.reply_ids
    w = _weights(b["tgt"], 5.0)
    assert float(w.sum()) == sum(len(e.reply_ids) - 1 + 5.0 for e in ex)


def test_refusal_data_kinds(tiny_chat):
    lm = load_model(tiny_chat)
    data = _data(lm, 4)
    assert data.counts() == {"refusal-text": 4, "own-reply": 4, "refusal-trajectory": 4}
    eos = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for e in data.examples:
        if e.origin == "refusal-text":
            assert e.kind == "imitate" and e.reply_ids[-1] == eos  # a refusal is a whole turn
        if e.origin == "refusal-trajectory":
            # a refusal's opening after a harmless prompt, kept as the original would continue it
            assert e.kind == "keep" and len(e.reply_ids) == 2  # the default: "I" + "'m"
            assert e.prompt in builtin("harmless", "train").prompts


def test_refusal_data_refuses_empty_sets(tiny_chat):
    lm = load_model(tiny_chat)
    with pytest.raises(SurgeryError, match="no harmless"):
        build_refusal_data(lm, builtin("harmful", "train").subset(2), [], own_refusals=False)


def test_kl_term_is_zero_before_training_and_ce_is_cross_entropy(tiny_chat):
    lm = load_model(tiny_chat)
    data = _data(lm, 3)
    pm, _ = attach(lm, LoraSpec(rank=2), seed=0)
    b = _batch(data.examples, lm.tokenizer.pad_token_id, lm.device)
    with torch.no_grad():
        _, parts = _loss(pm, b, 1.0, 1.0)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-6)  # B = 0: the adapted model is the original
    # ce equals a direct recomputation over the refusal rows' reply tokens
    with torch.no_grad():
        logits = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    nll, n = 0.0, 0
    for i, e in enumerate(data.examples):
        if e.kind != "imitate":
            continue
        p = len(e.prompt_ids)
        lp = torch.log_softmax(logits[i], -1)
        for j, t in enumerate(e.reply_ids):
            nll -= float(lp[p - 1 + j, t])
            n += 1
    assert parts["ce"] == pytest.approx(nll / n, rel=1e-4)
    pm.unload()


def test_training_runs_without_base_model_dropout(tiny_gpt2):
    """At step 0 (LoRA B = 0) the adapted model is the original, so the KL on kept
    replies is exactly 0: neither the student nor the reference sees dropout noise."""
    from surgery.training.data import RefusalData

    lm = load_model(tiny_gpt2)
    assert lm.model.config.resid_pdrop > 0 and lm.model.config.attn_pdrop > 0
    data = _data(lm, 3)
    keep = RefusalData([e for e in data.examples if e.kind == "keep"])  # loss = kl_weight x KL only
    val = {"harmful": list(builtin("harmful", "val").subset(1).prompts),
           "harmless": list(builtin("harmless", "val").subset(1).prompts)}
    pm, _ = attach(lm, LoraSpec(rank=2), seed=0)
    res = train(lm, pm, keep, val, _cfg(max_steps=1, eval_every=100), progress=False)
    assert res.losses == [0.0]
    pm.unload()


def _train_once(tiny_chat, seed):
    lm = load_model(tiny_chat)
    data = _data(lm)
    pm, _ = attach(lm, LoraSpec(rank=2), seed=seed)
    val = {"harmful": list(builtin("harmful", "val").subset(2).prompts),
           "harmless": list(builtin("harmless", "val").subset(2).prompts)}
    res = train(lm, pm, data, val, _cfg(seed=seed, patience=99), progress=False)
    return {k: v.detach().clone() for k, v in pm.named_parameters() if "lora_" in k}, res


def test_training_is_deterministic_and_moves_the_adapters(tiny_chat):
    a, ra = _train_once(tiny_chat, 0)
    b, _ = _train_once(tiny_chat, 0)
    c, _ = _train_once(tiny_chat, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    # 6 refusals + 6 kept replies + 6 refusal trajectories on kept prompts = 18 examples: 5 steps of 4, 2 epochs
    assert ra.steps == 2 * 5 and [p["step"] for p in ra.history] == [2, 4, 6, 8, 10]  # validated twice per epoch
    assert ra.best is not None


def test_lora_sft_streamed_merge_equals_peft_merge(tmp_path, tiny_chat):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = train_harden(str(tiny_chat), out, LoraSFT(rank=2, targets=("writers", "up_proj")), config=_cfg(), **SMALL)
    assert verify(out) == []
    m = read_manifest(out)
    assert m["method"]["name"] == "lora-sft"
    p = m["method"]["parameters"]
    assert p["training"]["seed"] == 0 and p["trainable_parameters"] == res.trainable_parameters
    assert m["datasets"]["refusal_data"]["sha256"] == res.data["sha256"]
    # reference: PEFT's own merge of the emitted adapter into the original
    base = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        changed = 0
        for name in a.names:
            x, y = a.get(name), b.get(name)
            if any(k in name for k in ("o_proj", "down_proj", "up_proj")) and name.endswith(".weight"):
                torch.testing.assert_close(y, ref[name], rtol=1e-5, atol=1e-6)
                changed += int(not torch.equal(x, y))
            else:
                assert torch.equal(x, y), name  # untouched tensors byte-identical
        assert changed == 3 * 4  # three module kinds in four layers
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 4


def test_sails_updates_lie_in_the_safety_subspace(tmp_path, tiny_chat):
    out = tmp_path / "sails"
    m = Sails(sae_layers=(1, 3), d_sae=64, sae_k=4, sae_epochs=2, k_features=8)
    train_harden(str(tiny_chat), out, m, config=_cfg(), **SMALL)
    assert verify(out) == []
    man = read_manifest(out)
    rec = man["sails"]
    assert set(rec["subspace"]) == {"1", "3"}
    assert all(len(v["features"]) >= 1 and "top_texts" in v["features"][0] for v in rec["subspace"].values())
    U = {l: load_file(str(out / "subspace" / f"layer_{l}.safetensors"))["U"].double() for l in (1, 3)}
    assert (out / "sae" / "layer_1" / "cfg.json").is_file()
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        n = 0
        for name in a.names:
            if not any(k in name for k in ("o_proj.weight", "down_proj.weight")):
                assert torch.equal(a.get(name), b.get(name)), name
                continue
            layer = int(name.split(".")[2])
            u = U[1] if layer < 1 else U[3]  # a writer in layer i uses the first subspace layer after i
            d = (b.get(name) - a.get(name)).double()
            assert float(d.norm()) > 0
            resid = d - u @ (u.T @ d)
            assert float(resid.norm()) <= 1e-5 * float(d.norm()) + 1e-7, name
            n += 1
        assert n == 8


def test_sails_refuses_an_sae_of_another_width_before_training(tmp_path, tiny_chat):
    from surgery.sae import random_sae

    sae = random_sae(d_in=48, d_sae=16, k=4, hook_name="blocks.1.hook_resid_pre")
    sae.save(tmp_path / "saes" / "layer_1")
    with pytest.raises(SurgeryError, match="width"):
        train_harden(str(tiny_chat), tmp_path / "o", Sails(sae=str(tmp_path / "saes"), sae_layers=(1,)),
                     config=_cfg(), **SMALL)
    assert not (tmp_path / "o").exists()


def test_sails_refuses_k_larger_than_the_sae(tmp_path, tiny_chat):
    with pytest.raises(SurgeryError):
        train_harden(str(tiny_chat), tmp_path / "o", Sails(sae_layers=(1,), d_sae=8, sae_k=16), config=_cfg(), **SMALL)
    assert not (tmp_path / "o").exists()


def test_no_harmful_examples_fails_before_training(tmp_path, tiny_chat):
    empty = tmp_path / "harmful.txt"
    empty.write_text("")
    with pytest.raises(SurgeryError, match="harmful.txt"):
        train_harden(str(tiny_chat), tmp_path / "o", LoraSFT(rank=2), config=_cfg(),
                     prompts=PromptConfig(harmful=str(empty), n_train=6, n_val=3), reply_tokens=6, run_eval=False,
                     progress=False)
    assert not (tmp_path / "o").exists()


def test_divergences_against_float64_reference():
    from surgery.training.trainer import divergence

    g = torch.Generator().manual_seed(0)
    t = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    fwd = (t.exp() * (t - s)).sum(-1)
    rev = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(divergence(t, s, "forward"), torch.nn.functional.kl_div(s, t, log_target=True,
                                                                                          reduction="none").sum(-1))
    torch.testing.assert_close(divergence(t, s, "reverse"), rev)
    torch.testing.assert_close(divergence(t, s, "symmetric"), fwd + rev)
    # the case the reverse term is for: the adapted model raises a token the original gave 1% to 40%
    t1 = torch.log(torch.tensor([[0.99, 0.01]], dtype=torch.float64))
    s1 = torch.log(torch.tensor([[0.60, 0.40]], dtype=torch.float64))
    assert float(divergence(t1, s1, "reverse")) > 2 * float(divergence(t1, s1, "forward"))


def test_early_stopping_keeps_the_best_validation_point(tiny_chat):
    lm = load_model(tiny_chat)
    data = _data(lm)
    pm, _ = attach(lm, LoraSpec(rank=2), seed=0)
    val = {"harmful": list(builtin("harmful", "val").subset(2).prompts),
           "harmless": list(builtin("harmless", "val").subset(2).prompts)}
    res = train(lm, pm, data, val, _cfg(epochs=4, patience=1), progress=False)
    # the tiny random model never refuses, so no later point beats the first in-budget one: it stops after one more
    assert res.best == res.history[0] and len(res.history) == 2 and res.steps == 4 < 4 * 5
    assert "no better validation point" in res.stopped


def test_unit_mask_keeps_updates_in_the_allowed_units(tmp_path, tiny_chat):
    """lora-sft with a `surgery units` map: the merged change of every write
    matrix is zero outside the redundant units' input channels."""
    from surgery.units import units
    from surgery.units.classify import CODE
    from surgery.units.unitmap import UnitMap

    umap_path = tmp_path / "units.safetensors"
    units(str(tiny_chat), umap_path, limit=4, max_new_tokens=4)
    umap = UnitMap.load(umap_path)
    out = tmp_path / "masked"
    train_harden(str(tiny_chat), out, LoraSFT(rank=2), config=_cfg(), unit_mask=umap_path, **SMALL)
    assert read_manifest(out)["method"]["parameters"]["unit_mask"]["masked_modules"] == 8
    by_module = {m.module: m for m in umap.matrices.values()}
    n_allowed = n_total = 0
    with CheckpointReader(tiny_chat) as a, CheckpointReader(out) as b:
        for module, mu in by_module.items():
            d = b.get(module + ".weight") - a.get(module + ".weight")
            allowed = mu.classes == CODE["redundant"]
            assert float(d[:, ~allowed].abs().sum()) == 0.0, module
            assert float(d[:, allowed].abs().sum()) > 0 or not allowed.any(), module
            n_allowed += int(allowed.sum())
            n_total += allowed.numel()
    assert 0 < n_allowed < n_total  # the mask is neither empty nor everything


def test_refusal_tolerance_rule_on_the_smollm2_validation_history():
    """The kept-point rule on the validation history of `surgery sails smollm2`
    with defaults (docs/training.md): with no tolerance most refusal wins (step
    162); with the default tolerance of 0.05 the later point one prompt lower but
    over-refusing less replaces it (step 324), and steps 405/486, one prompt
    higher but over-refusing more, do not; points outside the budgets never count."""
    from surgery.training.trainer import _better

    real = [dict(step=81, harmful_refusal=0.8, harmless_refusal=0.05, borderline_refusal=0.15, kl=0.134),
            dict(step=162, harmful_refusal=0.975, harmless_refusal=0.075, borderline_refusal=0.225, kl=0.120),
            dict(step=243, harmful_refusal=0.85, harmless_refusal=0.05, borderline_refusal=0.125, kl=0.102),
            dict(step=324, harmful_refusal=0.95, harmless_refusal=0.05, borderline_refusal=0.10, kl=0.050),
            dict(step=405, harmful_refusal=0.975, harmless_refusal=0.075, borderline_refusal=0.125, kl=0.042),
            dict(step=486, harmful_refusal=0.975, harmless_refusal=0.075, borderline_refusal=0.125, kl=0.042)]
    over_budget = dict(step=567, harmful_refusal=1.0, harmless_refusal=0.15, borderline_refusal=0.0, kl=0.05)

    def kept(hist, **kw):
        cfg, best = TrainConfig(**kw), None
        for p in hist:
            if _better(p, best, cfg):
                best = p
        return best["step"]

    assert TrainConfig().refusal_tolerance == 0.05
    assert kept(real) == 324
    assert kept(real[:4], refusal_tolerance=0.0) == 162  # where the run without tolerance stopped (patience 2)
    assert kept(real, refusal_tolerance=0.0) == 405  # same refusal as 162, less borderline
    assert kept(real[:4], refusal_tolerance=0.01) == 162  # one prompt of 40 is outside a 0.01 tolerance
    assert kept(real + [over_budget]) == 324  # harmless 15% is over the 10% budget
    assert kept(real[:4] + [over_budget], refusal_tolerance=0.04, max_over_refusal=0.2) == 567  # outside the tolerance more refusal wins
    # the tolerance is inclusive despite float rounding: 0.75 - 0.8 is -0.050000000000000044
    lora = [dict(step=81, harmful_refusal=0.8, harmless_refusal=0.075, borderline_refusal=0.2, kl=0.051),
            dict(step=162, harmful_refusal=0.75, harmless_refusal=0.025, borderline_refusal=0.025, kl=0.024)]
    assert kept(lora) == 162
    assert kept(lora, refusal_tolerance=0.049) == 81
    # equal over-refusal counts compare equal (0.05 + 0.1 != 0.075 + 0.075 in floats): the tie goes to
    # less harmless refusal
    tie = [dict(step=1, harmful_refusal=0.9, harmless_refusal=0.075, borderline_refusal=0.075, kl=0.1),
           dict(step=2, harmful_refusal=0.9, harmless_refusal=0.05, borderline_refusal=0.1, kl=0.1)]
    assert kept(tie) == 2


def test_trainer_cli_defaults_are_the_train_config_defaults():
    """The command line and ``TrainConfig`` name the same defaults (the CLI keeps its
    own copy so ``surgery --help`` does not import torch); the learning rate is per method."""
    from dataclasses import fields

    from surgery.cli import main as cli

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for verb in ("lora-sft", "sails"):
        shared = [p for p in cli.commands[verb].params if p.name in defaults and p.name != "lr"]
        assert len(shared) >= 10, verb
        for p in shared:
            assert p.default == defaults[p.name], (verb, p.name, p.default, defaults[p.name])


def test_max_steps_stops_on_the_same_trajectory(tiny_chat):
    """A run stopped by --max-steps validates at its last step and follows the
    unstopped run's trajectory (same losses: the schedule still spans every epoch)."""
    lm = load_model(tiny_chat)
    data = _data(lm)
    val = {"harmful": list(builtin("harmful", "val").subset(2).prompts),
           "harmless": list(builtin("harmless", "val").subset(2).prompts)}
    runs = []
    for max_steps in (None, 3):
        pm, _ = attach(lm, LoraSpec(rank=2), seed=0)
        runs.append(train(lm, pm, data, val, _cfg(epochs=2, patience=99, eval_every=100, max_steps=max_steps),
                          progress=False))
        pm.unload()
    full, cut = runs
    assert full.steps > 3 and cut.steps == 3 and "step budget 3" in cut.stopped
    assert [p["step"] for p in cut.history] == [3]
    assert cut.losses == full.losses[:3]


@pytest.mark.parametrize("args,name", [(["--max-steps", "0"], "--max-steps"), (["--patience", "0"], "--patience"),
                                       (["--refusal-tolerance", "-0.1"], "--refusal-tolerance")])
def test_trainer_options_refuse_bad_values_before_loading(tmp_path, args, name):
    from click.testing import CliRunner

    from surgery.cli import main as cli

    res = CliRunner().invoke(cli, ["lora-sft", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and name in res.output and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- CLI: options, presets, early checks
def _cli(args):
    from click.testing import CliRunner

    from surgery.cli import main as cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a training command gets as far as loading the model (refusal data comes after)."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("surgery.training.harden.load_model", boom)


@pytest.fixture
def captured(monkeypatch):
    """lora-sft's method and learning rate as the CLI resolves them, without training."""
    seen = {}

    def fake(method, model, o, default_lr):
        seen.update(spec=method.spec, preset=method.preset, lr=o["lr"] if o["lr"] is not None else default_lr)

    monkeypatch.setattr("surgery.cli._run_train", fake)
    return seen


@pytest.mark.parametrize("args,want", [
    ([], dict(rank=8, targets=("writers",), layers=None, lr=5e-4, preset=None)),
    (["--preset", "paper"], dict(rank=1, targets=("up_proj",), layers=[1, 2, 3], lr=5e-5, preset="paper")),
    (["--preset", "paper", "--rank", "4", "--targets", "down_proj", "--layers", "0-1", "--lr", "1e-3"],
     dict(rank=4, targets=("down_proj",), layers=[0, 1], lr=1e-3, preset="paper")),
    (["--preset", "paper", "--rank", "8"], dict(rank=8, targets=("up_proj",), layers=[1, 2, 3], lr=5e-5, preset="paper")),
])
def test_lora_sft_explicit_options_win_over_the_preset(tmp_path, tiny_chat, captured, args, want):
    res = _cli(["lora-sft", tiny_chat, "-o", tmp_path / "o", *args])
    assert res.exit_code == 0, res.output
    spec = captured["spec"]
    got = dict(rank=spec.rank, targets=spec.targets, layers=spec.layers, lr=captured["lr"], preset=captured["preset"])
    assert got == want


@pytest.mark.parametrize("args,name", [
    (["--lr", "0"], "--lr"), (["--batch-size", "0"], "--batch-size"), (["--rank", "0"], "--rank"),
    (["--epochs", "0"], "--epochs"), (["--reply-tokens", "0"], "--reply-tokens"),
    (["--trajectory-tokens", "-1"], "--trajectory-tokens"), (["--first-token-weight", "0"], "--first-token-weight"),
    (["--kl-weight", "-1"], "--kl-weight"), (["--max-over-refusal", "1.5"], "--max-over-refusal"),
])
def test_lora_sft_refuses_non_positive_numbers(tmp_path, tiny_chat, no_model_load, args, name):
    res = _cli(["lora-sft", tiny_chat, "-o", tmp_path / "o", *args])
    assert res.exit_code == 2 and name in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,name", [
    (["--k-features", "0"], "--k-features"), (["--variance", "0"], "--variance"), (["--variance", "1.2"], "--variance"),
    (["--epochs", "0"], "--epochs"),
])
def test_sails_refuses_bad_numbers(tmp_path, tiny_chat, no_model_load, args, name):
    res = _cli(["sails", tiny_chat, "-o", tmp_path / "o", *args])
    assert res.exit_code == 2 and name in res.output, res.output


def test_train_config_is_checked_before_any_work(tmp_path, tiny_chat, no_model_load):
    """API callers get the CLI's checks: epochs 0 would otherwise merge untrained (B = 0) adapters."""
    for bad, name in ((dict(epochs=0), "--epochs"), (dict(lr=0.0), "--lr"), (dict(batch_size=0), "--batch-size")):
        with pytest.raises(SurgeryError, match=name):
            train_harden(str(tiny_chat), tmp_path / "o", LoraSFT(rank=2), config=_cfg(**bad), **SMALL)
    with pytest.raises(SurgeryError, match="--rank"):
        LoraSFT(rank=0)
    assert not (tmp_path / "o").exists()


def _saes(folder, layers, d_in=32, d_sae=64):
    from surgery.sae import random_sae

    for layer in layers:
        random_sae(d_in=d_in, d_sae=d_sae, k=4, seed=layer, hook_name=f"blocks.{layer}.hook_resid_pre").save(
            folder / f"layer_{layer}")
    return folder


@pytest.mark.parametrize("case,match", [
    ("lora_layers", r"LoRA layers \(--layers\) \[4, 5, 6, 7, 8, 9\] out of range \(the model has 4 layers"),
    ("lora_targets", r"\['bogus'\] not found .*--targets"),
    ("gpt2_up_proj", r"\['up_proj'\] not found in model_type 'gpt2'"),
    ("sails_sae_layers", r"SAE layers \(--sae-layers\) \[5\] out of range"),
    ("sails_layers", r"LoRA layers \(--layers\) \[7\] out of range"),
    ("sails_missing_sae", "SAE not found: nonexistent_dir"),
    ("sails_sae_mismatch", r"is one SAE, at layer 1 \(blocks.1.hook_resid_pre\), but --sae-layers asks for 2"),
    ("sails_folder_missing_layers", r"has no SAE for --sae-layers 3 \(no layer_3/\); it holds layers 1,2"),
    ("sails_sae_width", "width d_in=48"),
])
def test_plan_is_checked_before_the_model_is_loaded(tmp_path, tiny_chat, tiny_gpt2, no_model_load, case, match):
    saes = _saes(tmp_path / "saes", (1, 2))
    wide = _saes(tmp_path / "wide", (1,), d_in=48)
    args = {"lora_layers": ["lora-sft", tiny_chat, "--layers", "2-9"],
            "lora_targets": ["lora-sft", tiny_chat, "--targets", "bogus"],
            "gpt2_up_proj": ["lora-sft", tiny_gpt2, "--targets", "up_proj"],
            "sails_sae_layers": ["sails", tiny_chat, "--sae-layers", "1,5"],
            "sails_layers": ["sails", tiny_chat, "--sae-layers", "1", "--layers", "7"],
            "sails_missing_sae": ["sails", tiny_chat, "--sae", "nonexistent_dir"],
            "sails_sae_mismatch": ["sails", tiny_chat, "--sae", saes / "layer_1", "--sae-layers", "2"],
            "sails_folder_missing_layers": ["sails", tiny_chat, "--sae", saes, "--sae-layers", "1,3"],
            "sails_sae_width": ["sails", tiny_chat, "--sae", wide],
            }[case]
    res = _cli([*args, "-o", tmp_path / "o"])
    assert res.exit_code == 2, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in res.output, res.output  # one line, after the model line
    import re

    assert re.search(match, last), res.output
    assert not (tmp_path / "o").exists()


def test_sails_uses_the_layers_of_a_sae_train_folder_and_records_its_parameters(tmp_path, tiny_chat):
    """--sae FOLDER (layer_1/, layer_2/ as `surgery sae train` writes them) without --sae-layers uses
    both; every SAILS parameter is in the manifest's method parameters and on the card."""
    saes = _saes(tmp_path / "saes", (1, 2))
    out = tmp_path / "sails"
    train_harden(str(tiny_chat), out, Sails(sae=str(saes), k_features=8, variance=0.7, contrast="prompt"),
                 config=_cfg(epochs=1), **SMALL)
    man = read_manifest(out)
    assert set(man["sails"]["subspace"]) == {"1", "2"}
    p = man["method"]["parameters"]
    assert {k: p[k] for k in ("sae", "sae_layers", "k_features", "variance", "contrast", "train_b", "response_tokens",
                              "targets", "layers", "sae_training")} == {
        "sae": str(saes), "sae_layers": [1, 2], "k_features": 8, "variance": 0.7, "contrast": "prompt",
        "train_b": False, "response_tokens": 4, "targets": ["writers"], "layers": None, "sae_training": None}
    assert verify(out) == []
    res = _cli(["card", out])
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text()
    for key in ("variance", "k_features", "sae_layers", "contrast"):
        assert f"`{key}`" in card, key
    # a single SAE folder: its own layer is the default
    one = Sails(sae=str(saes / "layer_2"))
    from surgery.checkpoint import CheckpointReader
    from surgery.architectures import get_architecture

    with CheckpointReader(tiny_chat) as r:
        one.check(r, get_architecture(r.config))
    assert one.sae_layers == [2] and set(one.saes) == {2}


def test_sails_default_sae_layers_follow_the_depth(tiny_chat):
    """SAEs trained now sit at layers 8 and 16 of a 30-layer model and at the same depths elsewhere
    (the fixed 8,16 refused every model under 17 layers)."""
    from surgery.architectures import get_architecture
    from surgery.checkpoint import CheckpointReader
    from surgery.training.sails import default_sae_layers

    assert default_sae_layers(30) == [8, 16]
    assert default_sae_layers(24) == [6, 13] and default_sae_layers(4) == [1, 2]
    assert default_sae_layers(2) == [1] and default_sae_layers(1) == [0]
    m = Sails()
    with CheckpointReader(tiny_chat) as r:
        m.check(r, get_architecture(r.config))
    assert m.sae_layers == [1, 2]


def test_sigterm_removes_the_temporary_folder(tmp_path, tiny_chat):
    """A lora-sft run killed with SIGTERM during training exits 143 and leaves no /tmp/surgery-* folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    prompts = {n: tmp_path / f"{n}.txt" for n in ("harmful", "harmless")}
    for n, f in prompts.items():
        f.write_text("\n".join(builtin(n, "train").prompts[:20]))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-c", "from surgery.cli import main; main()", "lora-sft", str(tiny_chat),
           "-o", str(tmp_path / "o"), "--harmful", str(prompts["harmful"]), "--harmless", str(prompts["harmless"]),
           "--borderline", "", "--reply-tokens", "2", "--epochs", "1000", "--patience", "1000", "--no-eval"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(tmp.glob("surgery-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert list(tmp.glob("surgery-*")), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timeout"
        time.sleep(1.0)  # well inside training
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp.glob("surgery-*")) == [] and not (tmp_path / "o").exists()
