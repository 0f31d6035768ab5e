"""Hardening by training adapters, end to end: ``surgery lora-sft`` and
``surgery sails``.

Flow (:func:`train_harden`): check the output target and prompt sets → load
the model → build refusal data (train splits) → the method builds its
``LoraSpec`` (SAILS: SAE + safety subspace) → attach PEFT adapters → train with
validation-based early stopping (val splits) → save the adapter in PEFT format
→ switch the live model back to the original → stream the merge into the new
checkpoint (``surgery.adapters`` merge, the same code as ``surgery merge-lora``)
with the manifest → before/after evaluation on the test split.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..checkpoint import CheckpointWriter, sha256_file
from ..errors import SurgeryError, check_count
from ..manifest import build_manifest
from ..model import LoadedModel, load_model
from .data import RefusalData, build_refusal_data
from .lora import LoraSpec, attach, select_targets, trainable_parameters
from .trainer import TrainConfig, TrainResult, train

Say = Callable[[str], None]


@dataclass
class TrainedResult:
    out: Path
    method: str
    spec: dict
    training: dict
    data: dict
    trainable_parameters: int
    extra: dict = field(default_factory=dict)
    evaluation: dict | None = None


class TrainMethod:
    """What differs between training methods: the adapter spec (and the
    artifacts it was built from)."""
    name = "train"

    def check(self, reader, arch) -> None:
        """The plan checked on the checkpoint alone (tensor names and config), before
        the model is loaded and any refusal data is generated: targets that exist,
        layers in range, SAE sources that fit.  Raises SurgeryError."""

    def build_spec(self, lm: LoadedModel, prompts, data: RefusalData, work: Path, say: Say) -> LoraSpec:
        raise NotImplementedError

    def parameters(self) -> dict:
        """The method's own parameters, recorded in the manifest's method parameters."""
        return {}

    def manifest_extra(self) -> dict:
        return {}

    def files(self, work: Path) -> dict[str, Path]:
        return {}


class LoraSFT(TrainMethod):
    """Plain LoRA refusal fine-tuning (methods.md §5), PEFT's default init."""
    name = "lora-sft"

    def __init__(self, rank: int = 8, targets: Sequence[str] = ("writers",), layers: Sequence[int] | None = None,
                 alpha: float | None = None, preset: str | None = None):
        check_count(rank, "LoRA rank (--rank)")
        self.spec = LoraSpec(rank=rank, alpha=alpha, targets=tuple(targets), layers=layers)
        self.preset = preset

    def check(self, reader, arch) -> None:
        select_targets(reader.names, arch, reader.config, self.spec)

    def build_spec(self, lm, prompts, data, work, say):
        return self.spec

    def parameters(self) -> dict:
        return {"preset": self.preset} if self.preset else {}


def _stable_adapter_config(path: Path) -> None:
    """PEFT writes ``target_modules`` from a set (its order changes between
    processes); sorted, the file is byte-reproducible."""
    import json

    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _adapter_files(folder: Path) -> dict[str, Path]:
    return {f"adapter/{p.name}": p for p in sorted(folder.iterdir()) if p.is_file()}


def train_harden(source: str, out: str | Path, method: TrainMethod, *, config: TrainConfig | None = None,
                 prompts=None, reply_tokens: int = 40, own_refusals: bool = True, refusal_trajectories: int = 2,
                 save_adapter: bool = True,
                 run_eval: bool = True, eval_tokens: int = 48, overwrite: bool = False, revision: str | None = None,
                 allow_pickle: bool = False, device: str | None = None, max_shard_bytes: int = 5_000_000_000,
                 say: Say | None = None, progress: bool = True, unit_mask: str | Path | None = None,
                 unit_classes: Sequence[str] = ("redundant",)) -> TrainedResult:
    from ..adapters.peft import load_adapter, merge_edit
    from ..pipeline import (PromptConfig, _say, CommittedEvaluation, evaluation_text, input_info, open_model, test_sets,
                            write_edited)
    from ..prompts import format_chat

    say = _say(say)
    out = Path(out)
    prompts = prompts or PromptConfig()
    CheckpointWriter.check_target(out, overwrite, [source, unit_mask, *prompts.sources()],
                                  max_shard_bytes=max_shard_bytes)
    config = config or TrainConfig()
    config.check()
    check_count(reply_tokens, "reply_tokens (--reply-tokens)")
    check_count(refusal_trajectories, "refusal_trajectories (--trajectory-tokens)", minimum=0)
    umap = None
    if unit_mask is not None:  # the SSAH "alignment budget": updates only in these units' channels
        from ..units.unitmap import UnitMap

        umap = UnitMap.load(unit_mask)
    resolved, reader, arch = open_model(source, revision, allow_pickle, say)
    with reader:
        method.check(reader, arch)  # before the model is loaded and the refusal data generated
        sets = ["harmful", "harmless"] + (["borderline"] if prompts.borderline else [])
        train_sets = {k: prompts.train(k) for k in sets}
        val = {k: prompts.val(k) for k in sets}
        harmful, keep = train_sets["harmful"], [train_sets[k] for k in sets[1:]]
        if run_eval:
            test_sets(prompts)  # the evaluation's sets too: a bad one must not fail after the write
        lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
        format_chat(lm.tokenizer, "Hello")  # no chat template: refused now, not after training
        say(f"refusal data: {len(harmful)} harmful -> refusals, "
            + " + ".join(f"{len(k)} {k.source}" for k in keep) + " -> the model's own replies")
        data = build_refusal_data(lm, harmful, keep, reply_tokens=reply_tokens, own_refusals=own_refusals,
                                  seed=config.seed, refusal_trajectories=refusal_trajectories)
        say(f"  {data.counts()}")
        with tempfile.TemporaryDirectory(prefix="surgery-") as work_s:
            work = Path(work_s)
            spec = method.build_spec(lm, prompts, data, work, say)
            pm, targets = attach(lm, spec, seed=config.seed)
            mask_record = None
            if umap is not None:
                from ..units.mask import apply_mask, unit_mask as make_mask

                handle = apply_mask(pm, make_mask(umap, unit_classes))
                if not handle.masked:
                    raise SurgeryError(f"unit mask {unit_mask}: none of its matrices is adapted here")
                mask_record = {"file": str(unit_mask), "sha256": sha256_file(unit_mask), "classes": list(unit_classes),
                               "masked_modules": len(handle.masked), "unmasked_modules": handle.unmasked}
                say(f"unit mask: updates only in {', '.join(unit_classes)} units of {len(handle.masked)} modules"
                    + (f" ({len(handle.unmasked)} adapted modules not in the map are unmasked)" if handle.unmasked
                       else ""))
            n_train = trainable_parameters(pm)
            say(f"{method.name}: {len(targets)} modules, {n_train:,} trainable parameters "
                f"({n_train / sum(p.numel() for p in lm.model.parameters()):.3%} of the model)")
            result: TrainResult = train(lm, pm, data, {k: list(v.prompts) for k, v in val.items()}, config,
                                        say=say, progress=progress)
            say(f"training: {result.steps} steps in {result.seconds:.0f}s; {result.stopped}")
            adapter_dir = work / "adapter"
            pm.save_pretrained(str(adapter_dir))
            _stable_adapter_config(adapter_dir / "adapter_config.json")
            lm.model = pm.unload()  # the live model is the original again (for the before/after evaluation)
            adapter = load_adapter(adapter_dir)
            plan = adapter.check_against(reader)
            edit, extra = merge_edit(reader, adapter, plan)
            params = {**method.parameters(), "lora": spec.describe(), "training": config.describe(),
                      "trainable_parameters": n_train,
                      "unit_mask": mask_record,
                      "modules": [t.module for t in targets], "result": result.describe(),
                      "merge": "W' = W + (lora_alpha / r) * B @ A, computed in float32, stored in the input dtype"}
            datasets = {"refusal_data": data.describe(), **{f"{k}_val": v.describe() for k, v in val.items()}}
            manifest = build_manifest(input_info=input_info(resolved, reader), method=method.name,
                                      parameters=params, datasets=datasets, extra=method.manifest_extra())
            files = {**(_adapter_files(adapter_dir) if save_adapter else {}), **method.files(work)}
            evaluation = CommittedEvaluation(lm, prompts, eval_tokens, device, say) if run_eval else None
            write_edited(reader, out, edit, overwrite=overwrite, extra=extra, config_updates=plan.config_updates,
                         extra_edited=plan.new_edited, files=files, manifest=manifest,
                         max_shard_bytes=max_shard_bytes, say=say, evaluate=evaluation)
        res = TrainedResult(out, method.name, spec.describe(), result.describe(), data.describe(), n_train,
                            method.manifest_extra())
        if evaluation is not None:
            res.evaluation = evaluation.report
            say(evaluation_text(res.evaluation))
        return res
