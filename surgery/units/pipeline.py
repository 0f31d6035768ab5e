"""The Python API behind ``surgery units`` and ``surgery protect``.

``compute_units(lm)`` measures and classifies every unit of a live model;
``units(model, out)`` does it for a model source and saves the map (+ JSON
summary + PNG); ``protect(aligned, finetuned, out)`` restores the chosen units
of a fine-tuned model from its aligned parent by streaming.  Everything is
checked before any expensive work: the output target, both checkpoints'
tensors and shapes, the architecture's unit layout and the map's fit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..checkpoint import CheckpointReader, CheckpointWriter, sha256_file
from ..errors import SurgeryError
from ..model import LoadedModel
from .attribution import POSITIONS, attribute, live_matrices, unit_datasets
from .classify import Rules, classify
from .producers import check_supported, unit_matrices
from .unitmap import MatrixUnits, UnitMap

log = logging.getLogger(__name__)
Say = Callable[[str], None]
FORMULA = "I_j = Var_n(x_{n,j}) * ||W[:, j]||^2 (population variance over the selected tokens, float64)"
VALUE_ROWS = ("all: a GQA value row shared by several o_proj channels is restored only when every channel "
              "reading it is restored")


def _say(say: Say | None) -> Say:
    return say or (lambda msg: log.info(msg))


def compute_units(lm: LoadedModel, *, positions: str = "all", limit: int | None = None, max_new_tokens: int = 48,
                  rules: Rules = Rules(), batch_size: int = 16, seed: int = 0, say: Say | None = None) -> UnitMap:
    """Attribute every unit of ``lm`` on the safety and utility sets and classify it."""
    say = _say(say)
    if positions not in POSITIONS:
        raise SurgeryError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    mats = live_matrices(lm)  # raises for unsupported architectures before any generation
    say(f"units: {len(mats)} write matrices, {sum(m.n_units for m in mats)} units; building the datasets")
    data = unit_datasets(lm, limit=limit, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    att, tokens = {}, {}
    for name, (examples, _) in data.items():
        att[name] = attribute(lm, examples, positions, batch_size, mats)
        tokens[name] = next(iter(att[name].values())).n_tokens
        say(f"  {name}: {len(examples)} prompts, {tokens[name]} tokens ({positions} positions)")
    matrices = {}
    for m in mats:
        s, u = att["safety"][m.key].importance, att["utility"][m.key].importance
        matrices[m.key] = MatrixUnits(m.key, m.kind, m.layer, m.module, m.producer_modules, s, u,
                                      classify(s, u, rules), m.head_dim, m.group)
    meta = {"method": "ssah-units", "formula": FORMULA, "positions": positions, "rules": rules.describe(),
            "datasets": {k: d for k, (_, d) in data.items()}, "tokens": tokens, "model_type": lm.arch.model_type,
            "model": {"folder": str(lm.folder)}}
    return UnitMap(matrices, meta)


def units(model: str, out: str | Path = "units.safetensors", *, plot: str | Path | None = None,
          positions: str = "all", limit: int | None = None, max_new_tokens: int = 48, rules: Rules = Rules(),
          batch_size: int = 16, seed: int = 0, revision: str | None = None, allow_pickle: bool = False,
          device: str | None = None, overwrite: bool = False, say: Say | None = None) -> UnitMap:
    """``surgery units``: measure, classify, save the map (``out``), its JSON
    summary (``out`` with ``.json``) and the PNG (``plot``, default ``out`` with
    ``.png``); prints the per-layer shares.  The three paths are checked first
    (distinct, writable, not an input; existing files only with ``overwrite``)
    and each file is written atomically."""
    from ..checkpoint.files import check_file_targets, write_text_atomic
    from ..model import load_model
    from ..pipeline import input_info, open_model

    say = _say(say)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise SurgeryError(f"unit map {out} must end in .safetensors")
    plot = Path(plot) if plot is not None else out.with_suffix(".png")
    check_file_targets([("-o", out), ("the summary (-o with .json)", out.with_suffix(".json")), ("--plot", plot)],
                       overwrite, [model])
    resolved, reader, arch = open_model(model, revision, allow_pickle, say)
    with reader:
        check_supported(arch.model_type)
        unit_matrices(arch, reader.names, reader.config, reader.shape)  # the checkpoint's layout, before loading
        info = input_info(resolved, reader)
    lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
    umap = compute_units(lm, positions=positions, limit=limit, max_new_tokens=max_new_tokens, rules=rules,
                         batch_size=batch_size, seed=seed, say=say)
    umap.meta["model"] = info
    umap.plot(plot)
    umap.save(out)
    summary = {**umap.meta, "summary": umap.summary()}
    try:
        write_text_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise SurgeryError(f"cannot write {out.with_suffix('.json')}: {e.strerror or e}") from None
    say("\n" + umap.format_table())
    say(f"wrote {out}, {out.with_suffix('.json')} and {plot}")
    return umap


@dataclass
class ProtectResult:
    out: Path
    restored: list[dict]  # every restored unit (matrix, index, class, scores, producer row)
    edited: list[str]  # tensor names changed
    unit_map: UnitMap


def _check_pair(r_al: CheckpointReader, arch, r_ft: CheckpointReader, arch_ft) -> None:
    """Same tensors and shapes; a tied lm_head counts as the embedding (merge-lora unties a tied
    model, so a fine-tune of a tied model may carry an lm_head the aligned model lacks)."""
    from ..pipeline import _weight

    shapes_al = {n: _weight(r_al, arch, n, True) for n in r_ft.names}
    missing = [n for n, s in shapes_al.items() if s is None]
    if missing:
        raise SurgeryError(f"the aligned model in {r_al.folder} has no tensor {min(missing)}")
    missing = [n for n in set(r_al.names) - set(r_ft.names) if _weight(r_ft, arch_ft, n, True) is None]
    if missing:
        raise SurgeryError(f"the fine-tuned model in {r_ft.folder} has no tensor {min(missing)}")
    for name in r_ft.names:
        sa, sf = shapes_al[name], tuple(r_ft.shape(name))
        if sa != sf:
            raise SurgeryError(f"tensor {name}: shape {sa} in the aligned model but {sf} in the fine-tuned model")


MEASURE_OPTIONS = ("positions", "limit", "max_new_tokens", "batch_size")


def protect(aligned: str, finetuned: str, out: str | Path, *, units: str | Path | UnitMap | None = None,
            include_complex: bool = False, classes: Sequence[str] | None = None, positions: str | None = None,
            limit: int | None = None, max_new_tokens: int | None = None, rules: Rules | Mapping | None = None,
            batch_size: int | None = None, overwrite: bool = False, allow_pickle: bool = False,
            device: str | None = None, max_shard_bytes: int = 5_000_000_000, say: Say | None = None) -> ProtectResult:
    """``surgery protect``: restore the ``classes`` units (default safety-critical,
    plus complex with ``include_complex``) of ``finetuned`` from ``aligned`` and
    write ``out``.  ``units``: a map from ``surgery units`` run on the aligned
    model, or None to compute it on the fly (``positions`` [all], ``limit``,
    ``max_new_tokens`` [48], ``batch_size`` [16]: measurement settings, refused
    with a map, which was measured already).  ``rules`` (a :class:`Rules`, or a
    mapping of some of top/below/redundant over the map's own or the default
    rules): with a map, its stored scores are re-classified by them."""
    from ..edits.protect import check_map, plan_restore, restore_slice
    from ..manifest import build_manifest
    from ..model import load_model
    from ..pipeline import input_info, open_model, write_edited

    say = _say(say)
    out = Path(out)
    classes = tuple(classes) if classes else ("safety-critical",) + (("complex",) if include_complex else ())
    CheckpointWriter.check_target(out, overwrite, [aligned, finetuned, units if not isinstance(units, UnitMap) else None],
                                  max_shard_bytes=max_shard_bytes)
    if units is not None:
        settings = dict(zip(MEASURE_OPTIONS, (positions, limit, max_new_tokens, batch_size)))
        given = [o for o, v in settings.items() if v is not None]
        if given:
            raise SurgeryError(f"{', '.join('--' + o.replace('_', '-') for o in given)}: measurement settings, but the "
                               "unit map given (--units) is measured already; drop them, or drop --units to measure now")
    with contextlib.ExitStack() as stack:
        res_al, r_al, arch = open_model(aligned, None, allow_pickle, say)
        stack.callback(r_al.close)
        res_ft, r_ft, arch_ft = open_model(finetuned, None, allow_pickle, say)
        stack.callback(r_ft.close)
        if arch_ft.model_type != arch.model_type:
            raise SurgeryError(f"the aligned model is a {arch.model_type} but the fine-tuned one a {arch_ft.model_type}")
        check_supported(arch.model_type)
        _check_pair(r_al, arch, r_ft, arch_ft)
        matrices = unit_matrices(arch, r_ft.names, r_ft.config, r_ft.shape)
        info_al = input_info(res_al, r_al)

        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="surgery-protect-")))
        if isinstance(units, UnitMap):
            umap, map_file = units, umap_save(units, work)
        elif units is not None:
            map_file = Path(units)
            umap = UnitMap.load(map_file)
        source_sha = sha256_file(map_file) if units is not None else None
        if units is not None and rules is not None:
            old = umap.rules()
            new = _with_rules(old, rules)
            if new != old:
                say(f"re-classifying the map's scores with top={new.top}, below={new.below}, "
                    f"redundant={new.redundant} (the map's: {old if old is None else vars(old)})")
                umap = umap.reclassified(new)
                map_file = umap_save(umap, work)
        if units is None:
            say("no unit map given: measuring the aligned model's units")
            lm = load_model(res_al.folder, device=device, allow_pickle=allow_pickle)
            umap = compute_units(lm, positions=positions or "all", limit=limit, max_new_tokens=max_new_tokens or 48,
                                 rules=_with_rules(None, rules), batch_size=batch_size or 16, say=say)
            del lm
            umap.meta["model"] = info_al
            map_file = umap_save(umap, work)
        check_map(matrices, umap, f"{finetuned}")
        measured = umap.meta.get("model", {}).get("weight_files")
        if measured is not None and measured != info_al["weight_files"]:
            say(f"note: the unit map was measured on {umap.meta['model'].get('source')}, whose weight files differ "
                f"from the aligned model's")
        plan = plan_restore(matrices, umap, classes)
        for name in plan.slices:
            if r_al.dtype(name) != r_ft.dtype(name):
                raise SurgeryError(f"tensor {name}: dtype {r_al.dtype(name)} in the aligned model but "
                                   f"{r_ft.dtype(name)} in the fine-tuned model (cannot copy its units exactly)")
        counts = plan.counts()
        say(f"restoring {len(plan.units)} units ({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})"
            f" in {len(plan.slices)} tensors from {aligned}")

        def edit(name, tensor):
            sl = plan.slices.get(name)
            return None if sl is None else restore_slice(tensor, r_al.get(name), sl)

        params = {"classes": list(classes), "value_rows": VALUE_ROWS,
                  "unit": "input channel j of o_proj/down_proj: column j of the write matrix + its producer rows "
                          "(gate/up rows j; the value row of channel j)",
                  "copy": "exact: the aligned model's stored values", "units_map": {
                      "file": "units.safetensors", "sha256": sha256_file(map_file), "rules": umap.meta.get("rules"),
                      "positions": umap.meta.get("positions"), "datasets": umap.meta.get("datasets"),
                      "measured_on": umap.meta.get("model", {}).get("source"),
                      **({"reclassified_from": {"sha256": source_sha, "rules": umap.meta["reclassified_from"]}}
                         if "reclassified_from" in umap.meta else {})}}
        manifest = build_manifest(input_info=input_info(res_ft, r_ft), method="protect", parameters=params,
                                  extra={"aligned": info_al, "units_summary": umap.summary()["overall"],
                                         "restored": {"count": len(plan.units), "by_kind_class": counts,
                                                      "units": plan.units}})
        edited = write_edited(r_ft, out, edit, overwrite=overwrite, files={"units.safetensors": map_file},
                              manifest=manifest, max_shard_bytes=max_shard_bytes, say=say)
    return ProtectResult(out, plan.units, edited, umap)


def _with_rules(base: Rules | None, rules: Rules | Mapping | None) -> Rules:
    """``rules`` itself, or its entries over ``base`` (default rules when None)."""
    if isinstance(rules, Rules):
        return rules
    return replace(base or Rules(), **dict(rules or {}))


def umap_save(umap: UnitMap, folder: Path) -> Path:
    return umap.save(Path(folder) / "units.safetensors")
