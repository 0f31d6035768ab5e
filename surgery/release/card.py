"""``surgery card DIR``: the model card (``README.md``) of an output folder, from its manifest.

Everything in the card comes from ``DIR/surgery.json`` (plus, for the licence
and the original card, the base model's own files when the manifest says where
they were and they still exist).  Nothing is measured again.

Metadata (``huggingface_hub.ModelCardData``):

* ``base_model``: the Hub id when the input came from the Hub (or from an HF-cache
  snapshot folder, or a GGUF whose metadata names its Hub source); otherwise the
  source name the manifest recorded (``smollm2``, a local path), which the body
  flags as not being a Hub id (the Hub may refuse it on push; ``--base-model``
  overrides).  ``base_model_relation: finetune``: the Hub knows adapter, merge,
  quantized and finetune, and a weight edit is a finetune in its sense.
* ``license``: from the base folder's README.md front matter, else its
  config.json, else the GGUF's ``general.license``; left unset when none says,
  and the body says so (``--license`` overrides).
* ``tags``: ``surgery``, ``safety`` and the method name; ``library_name:
  transformers``; ``pipeline_tag: text-generation``.

Body: what was done (method, parameters, direction, datasets with sha256, the
strength sweep), the before/after table from the manifest's evaluation block,
the limits of that evaluation (judge, prompt-set sizes, sampling noise), how to
verify and how to reproduce (the manifest's recipe, else its command line, else
a command rebuilt from the parameters), then the base model's own card under
"Original model card".  Example replies stored in the manifest are not copied:
the original model's ones can be harmful completions.

Hashing rule: the card is part of the release, so ``README.md`` is listed in the
manifest's ``outputs`` like every other file.  ``write_card`` first checks the
folder against its manifest (ignoring only a previous README.md, so the card
can be rewritten), writes README.md atomically (temp file + rename), then adds
its sha256 to ``outputs``; the other hashes are never recomputed, so writing a
card cannot launder a changed shard.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..checkpoint import sha256_file
from ..checkpoint.files import write_text_atomic
from ..errors import ManifestError, SurgeryError
from ..manifest import MANIFEST, read_manifest, update_manifest, verify

CARD = "README.md"
RELATION = "finetune"  # the Hub's base_model_relation values: adapter, merge, quantized, finetune
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_HF_CACHE_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")

METHOD_TEXT = {
    "rosi": ("ROSI, rank-one safety injection (Abu Shairah et al. 2025). Every attention and MLP output "
             "projection `W` (the matrices that write the residual stream) became "
             "`W + alpha * r_hat * mean_rows(W)^T`, so each adds `alpha * (mean_rows(W) . x) * r_hat` to its "
             "output: a push along the refusal direction `r_hat`, rank one per matrix. Biases, norms and the "
             "embedding are untouched unless the parameters say otherwise. The push does not depend on whether "
             "the request is harmful: harmless inputs are pushed as well, so over-refusal and drift from the "
             "original rise with `alpha` together with refusal (the evaluation below shows by how much)."),
    "gated-injection": ("gated rank-one injection (experimental). Each residual-stream output projection "
                        "became `W + alpha * r_hat * v^T`, with a read vector `v` per matrix fitted so that the "
                        "push along the refusal direction `r_hat` fires on harmful inputs and stays near zero on "
                        "harmless ones (the read vectors are in `gates.safetensors`)."),
    "gated-opening": ("gated opening (no training). A few neurons of one MLP (the last, unless the parameters say "
                      "otherwise) were rewritten so that, on harmful requests only, each writes one token of a "
                      "refusal's opening at its step of the reply (`gate_proj`, `up_proj` and `down_proj` of that "
                      "layer change in those rows/columns; every other tensor is untouched). The gate's read vectors, "
                      "push directions and strengths are in `opening_gate.safetensors`."),
}
CLI_VERB = {"rosi": "rosi", "gated-injection": "inject", "gated-opening": "inject"}
SET_LABEL = {
    "harmful": "harmful prompts refused (the goal: higher)",
    "harmless": "harmless prompts refused (over-refusal)",
    "borderline": "borderline prompts refused (over-refusal on prompts that only sound dangerous)",
}


@dataclass
class BaseModelInfo:
    """What the card says about the model that was edited, and where each part came from."""
    name: str | None
    is_hub_id: bool
    how: str
    license: str | None
    license_name: str | None
    license_link: str | None
    license_how: str
    card_body: str | None = None
    card_path: Path | None = None


@dataclass
class CardResult:
    path: Path
    sha256: str
    base_model: str | None
    base_model_is_hub_id: bool
    license: str | None
    license_how: str
    original_card: bool


# -- the base model ------------------------------------------------------------
def _read_base_card(readme: Path) -> tuple[dict, str]:
    """(front-matter metadata, body) of a model card; unreadable metadata -> ({}, whole text)."""
    from huggingface_hub import ModelCard

    text = readme.read_text(encoding="utf-8", errors="replace")
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
        return card.data.to_dict(), card.text
    except Exception:  # malformed YAML: keep the text as it is
        return {}, text


def _gguf_metadata(path: Path) -> dict[str, str]:
    keys = ("general.license", "general.license.name", "general.license.link",
            "general.source.huggingface.repository", "general.source.repo_url")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
    except Exception:
        return {}
    out = {}
    for key in keys:
        field = reader.fields.get(key)
        if field is None:
            continue
        try:
            value = field.contents()
        except Exception:
            continue
        if isinstance(value, str) and value.strip():
            out[key] = value.strip()
    return out


def _hub_id_from_url(url: str | None) -> str | None:
    if not url:
        return None
    m = re.match(r"^https://huggingface\.co/([^/]+/[^/?#]+)/?$", url)
    return m.group(1) if m and HUB_ID.match(m.group(1)) else None


def base_model_info(manifest: dict, base_model: str | None = None, license: str | None = None) -> BaseModelInfo:
    """Resolve the card's ``base_model`` and ``license`` from the manifest's input record."""
    inp = manifest.get("input") or {}
    kind, source = inp.get("kind"), inp.get("source")
    folder = Path(inp["folder"]) if inp.get("folder") else None
    gguf = Path(inp["gguf_file"]) if inp.get("gguf_file") else None
    gmeta = _gguf_metadata(gguf) if kind == "gguf" and gguf is not None and gguf.is_file() else {}

    base_meta: dict = {}
    card_body = card_path = None
    if folder is not None and (folder / CARD).is_file():
        card_path = folder / CARD
        base_meta, card_body = _read_base_card(card_path)

    # base_model
    snapshot = _HF_CACHE_SNAPSHOT.search(str(folder)) if folder is not None else None
    gguf_repo = gmeta.get("general.source.huggingface.repository") or _hub_id_from_url(gmeta.get("general.source.repo_url"))
    if base_model:
        name, how = base_model, "given with --base-model"
    elif kind == "hub" and source:
        name, how = source, "the Hub id the input was downloaded from"
    elif snapshot and HUB_ID.match(f"{snapshot.group(1)}/{snapshot.group(2)}"):
        name, how = f"{snapshot.group(1)}/{snapshot.group(2)}", "the Hub cache snapshot the input folder is"
    elif gguf_repo and HUB_ID.match(gguf_repo):
        name, how = gguf_repo, "the Hub source named in the GGUF file's metadata"
    else:
        name, how = source, f"the source name the manifest recorded (a local {kind or 'input'})"

    # license
    lic_name = lic_link = None
    cfg_license = _config_license(folder) if folder is not None else None
    if license:
        lic, lic_how = license, "given with --license"
    elif base_meta.get("license"):
        lic, lic_how = base_meta["license"], "the base model's card (README.md of the input folder)"
        lic_name, lic_link = base_meta.get("license_name"), base_meta.get("license_link")
    elif isinstance(cfg_license, str) and cfg_license.strip():
        lic, lic_how = cfg_license.strip(), "the base model's config.json"
    elif gmeta.get("general.license"):
        lic, lic_how = gmeta["general.license"], f"the GGUF file's metadata ({gguf.name})"
        lic_name, lic_link = gmeta.get("general.license.name"), gmeta.get("general.license.link")
    else:
        looked = [what for what, p in (("the input folder's README.md or config.json", folder),
                                        ("the GGUF file's metadata", gguf)) if p is not None and p.exists()]
        lic, lic_how = None, ("no licence in " + " or in ".join(looked)) if looked else \
            "the input's files are no longer where the manifest says they were"
    return BaseModelInfo(name, bool(name and HUB_ID.match(name)), how, lic, lic_name, lic_link, lic_how,
                         card_body, card_path)


def _config_license(folder: Path):
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("license") if isinstance(cfg, dict) else None


# -- markdown helpers ----------------------------------------------------------
def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        text = f"{v:g}"
    elif isinstance(v, str):
        text = v
    else:
        text = json.dumps(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or ("---" + "|---:" * (len(head) - 1))
    out = ["| " + " | ".join(head) + " |", "|" + align + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def _rate(v, n) -> str:
    if v is None:
        return "-"
    if isinstance(n, int) and n > 0:
        return f"{100 * v:.1f}% ({round(v * n)}/{n})"
    return f"{100 * v:.1f}%"


def _var_text(v) -> str:
    """A recipe variable as ``--var`` takes it (typed like YAML)."""
    if isinstance(v, str):
        return v
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


# -- sections ------------------------------------------------------------------
def _what_was_done(m: dict, base: BaseModelInfo) -> list[str]:
    method = m.get("method") or {}
    name, params = method.get("name", "?"), dict(method.get("parameters") or {})
    out = ["## What was done", ""]
    out.append(f"**Method: `{name}`**, " + METHOD_TEXT.get(name, "see its parameters below."))
    out.append("")
    shown = {k: v for k, v in params.items() if k != "sweep"}
    if shown:
        out += _table(["parameter", "value"], [[f"`{k}`", v] for k, v in shown.items()], "---|---")
        out.append("")
    d = m.get("direction")
    if d:
        out.append(f"**Refusal direction** `r_hat`: the `{d.get('source')}` candidate at layer {d.get('layer')} "
                   f"(the residual stream entering decoder layer {d.get('layer')}), measured at position "
                   f"`{d.get('position')}`, norm {_cell(d.get('norm'))} before normalising. Chosen by: "
                   f"{d.get('selection', 'not recorded')}. File: `{d.get('file')}` (sha256 `{d.get('sha256')}`).")
        out.append("")
    ed = m.get("edited") or {}
    if ed:
        line = f"**Tensors edited**: {ed.get('count', len(ed.get('tensors', [])))} (listed in `surgery.json`)"
        if ed.get("untied_lm_head"):
            line += "; the embedding was edited, so the output head was untied and keeps the original weights"
        out += [line + ". Every other tensor is a byte-for-byte copy of the input.", ""]
    inp = m.get("input") or {}
    line = f"**Input**: `{inp.get('source')}` ({inp.get('kind')}"
    if inp.get("revision"):
        line += f", revision `{inp['revision']}`"
    if inp.get("gguf_sha256"):
        line += f", GGUF sha256 `{inp['gguf_sha256']}`"
    out.append(line + "); weight files' sha256 are recorded in `surgery.json`.")
    if base.name and not base.is_hub_id:
        out.append(f"`base_model` is `{base.name}`, {base.how}: not a Hugging Face Hub id. Rewrite the card with "
                   "`surgery card DIR --base-model OWNER/NAME` to link the Hub model it came from.")
    else:
        out.append(f"`base_model` is `{base.name}` ({base.how}).")
    out.append("")
    if base.license:
        extra = f" ({base.license_name}, {base.license_link})" if base.license_name or base.license_link else ""
        origin = (f"{base.license_how} when this card was written" if base.license_how.startswith("given")
                  else f"inherited from {base.license_how}")
        out.append(f"**Licence**: `{base.license}`{extra}, {origin}. These weights are a "
                   "derivative of the base model, whose terms apply.")
    else:
        out.append(f"**Licence**: not declared. The base model's licence could not be determined: {base.license_how}. "
                   "Check the base model's terms before using or sharing these weights, and record the licence "
                   "with `surgery card DIR --license ID`.")
    out.append("")
    ds = m.get("datasets") or {}
    if ds:
        out += ["### Prompt sets used to make the edit", ""]
        out += _table(["set", "source", "prompts", "sha256"],
                      [[k, f"`{v.get('source')}`", v.get("count"), f"`{v.get('sha256')}`"] for k, v in ds.items()],
                      "---|---|---:|---")
        out.append("")
    sweep = params.get("sweep") or []
    if sweep and all(isinstance(p, dict) for p in sweep):
        chosen = params.get("alpha")
        n_h = (ds.get("sweep_harmful_val") or {}).get("count")
        n_b = (ds.get("sweep_harmless_val") or {}).get("count")
        out += ["### Strength sweep (validation split)", "",
                f"`alpha` was chosen on the validation split: {params.get('alpha_choice', 'rule not recorded')}.", ""]
        n_l = (ds.get("sweep_borderline_val") or {}).get("count")
        border = any("borderline_refusal" in p for p in sweep)
        rows = [[(f"**{p.get('value'):g}** (chosen)" if p.get("value") == chosen else p.get("value")),
                 _rate(p.get("harmful_refusal"), n_h), _rate(p.get("harmless_refusal"), n_b),
                 *([_rate(p.get("borderline_refusal"), n_l)] if border else []),
                 (f"{p['kl']:.3f}" if isinstance(p.get("kl"), (int, float)) else "-")] for p in sweep]
        out += _table(["alpha", "harmful refused", "harmless refused", *(["borderline refused"] if border else []),
                       "first-token KL"], rows)
        out.append("")
    return out


def _evaluation(m: dict) -> list[str]:
    ev = m.get("evaluation")
    out = ["## Evaluation: before and after", ""]
    if not ev:
        return out + ["No evaluation was recorded in `surgery.json` (the edit was made without one). Run "
                      "`surgery eval DIR --reference BASE` before relying on this model.", ""]
    before, after = ev.get("before"), ev.get("after")
    if not (isinstance(before, dict) and isinstance(after, dict)):
        table = ev.get("table")
        return out + (["```", str(table), "```", ""] if table else ["The evaluation block has no before/after reports.", ""])
    bsets, asets = before.get("sets") or {}, after.get("sets") or {}
    names = list(bsets) + [k for k in asets if k not in bsets]
    rows = []
    for k in names:
        n = (bsets.get(k) or asets.get(k) or {}).get("count")
        b, a = (bsets.get(k) or {}).get("refusal_rate"), (asets.get(k) or {}).get("refusal_rate")
        change = f"{100 * (a - b):+.1f} points" if a is not None and b is not None else "-"
        rows.append([SET_LABEL.get(k, f"{k} prompts refused"), n, _rate(b, n), _rate(a, n), change])
    n_harmless = (bsets.get("harmless") or {}).get("count")
    for key, label in (("kl_first_token_harmless", "first-token KL on harmless prompts (vs the original)"),
                       ("perplexity_ratio", "perplexity on the original's harmless replies, as a ratio")):
        b, a = before.get(key), after.get(key)
        if b is None and a is None:
            continue
        change = f"{a - b:+.3f}" if a is not None and b is not None else "-"
        rows.append([label, n_harmless, f"{b:.3f}" if b is not None else "-", f"{a:.3f}" if a is not None else "-", change])
    out += [f"Held-out test prompts (never used to choose the direction or `alpha`); greedy decoding with the chat "
            f"template, replies of {before.get('max_new_tokens', '?')} new tokens, judge `{before.get('judge', '?')}`.", ""]
    out += _table(["metric", "prompts", "original", "edited", "change"], rows, "---|---:|---:|---:|---:")
    out.append("")
    if bsets:
        out += _table(["test set", "source", "prompts", "sha256"],
                      [[k, f"`{v.get('source')}`", v.get("count"), f"`{v.get('sha256')}`"] for k, v in bsets.items()],
                      "---|---|---:|---")
        out.append("")
    out += _limits(ev, before, [v.get("count") for v in bsets.values()])
    return out


def _limits(ev: dict, before: dict, counts: list) -> list[str]:
    judge = str(before.get("judge", "?"))
    out = ["### Limits of this evaluation", ""]
    desc = before.get("judge_description") or ev.get("judge_description")
    if desc:
        out.append(f"- **Judge** `{judge}`: {desc if isinstance(desc, str) else json.dumps(desc)}")
    if judge.startswith("markers"):
        n = re.search(r"\((\d+)", judge)
        sympathy = ("; apologies that are not refusals (\"I'm sorry to hear that\", \"sorry for the confusion\") "
                    "are taken out first" if "sympathy excluded" in judge else "")
        out.append(f"- **The judge is a marker list**: a reply counts as a refusal when it contains one of "
                   f"{n.group(1) if n else 'a fixed list of'} phrases such as \"I'm sorry, but\" or \"I cannot\"{sympathy}. That "
                   "is a floor and an approximation: it misses soft refusals (deflecting or lecturing without those "
                   "phrases) and counts a reply that only carries a disclaimer. A guard-model judge would give "
                   "different numbers.")
    elif not desc:
        out.append(f"- **Judge** `{judge}`: no description was recorded.")
    sizes = sorted({c for c in counts if isinstance(c, int) and c > 0})
    if sizes:
        noise = ", ".join(f"±{196 * math.sqrt(0.25 / n):.0f} points with {n} prompts" for n in sizes)
        out.append(f"- **Small prompt sets**: each rate is a share of {', '.join(map(str, sizes))} prompts, so sampling "
                   f"noise alone moves it by up to {noise} (95% interval at a 50% rate); smaller differences "
                   "are not evidence of a change.")
    out.append(f"- Only the first {before.get('max_new_tokens', '?')} tokens of each greedy reply are judged; "
               "sampling, longer replies, other languages, multi-turn conversations and jailbreak prompts were not "
               "tested. First-token KL and the perplexity ratio measure drift from the original, not quality; no "
               "general benchmark was run.")
    out.append("- More refusals on a fixed prompt list do not make a model safe. The example replies stored in "
               "`surgery.json` are not reproduced here (the original model's can be harmful completions).")
    out.append("")
    return out


def _verify_section() -> list[str]:
    return ["## How to verify", "",
            "`surgery.json` records the sha256 of every file in this folder (this card included; the manifest "
            "itself excepted), the sha256 of the input's weight files and of every prompt set. After downloading:",
            "", "```bash", "surgery verify PATH/TO/THIS/FOLDER", "```", "",
            "It recomputes every hash and names any file that differs, is missing or is not listed (exit status 1). "
            "Without surgery, `sha256sum` each file and compare with the `outputs` table of `surgery.json`.", ""]


def _reproduce(m: dict) -> list[str]:
    out = ["## How to reproduce", ""]
    recipe = m.get("recipe")
    command = (m.get("invocation") or {}).get("argv") or m.get("command")
    method = m.get("method") or {}
    name, params = method.get("name"), method.get("parameters") or {}
    src = (m.get("input") or {}).get("source") or "MODEL"
    if recipe:
        import yaml

        text = recipe if isinstance(recipe, str) else (recipe.get("text") or yaml.safe_dump(recipe, sort_keys=False))
        step = "" if isinstance(recipe, str) else f" (step {recipe.get('step')}, `{recipe.get('name', '')}`)"
        overrides = {} if isinstance(recipe, str) else dict(recipe.get("vars") or {})
        run = shlex.join(["surgery", "run", "RECIPE.yaml",
                          *[a for k, v in overrides.items() for a in ("--var", f"{k}={_var_text(v)}")]])
        given = " with the variables it was given" if overrides else ""
        out += [f"This folder was written by a recipe{step}; `surgery.json` holds it verbatim:", "", "```yaml",
                text.rstrip(), "```", "", f"Rerun it{given} with `{run}`, or check this folder with "
                "`surgery reproduce THIS_FOLDER` (reruns the step and compares every output hash).", ""]
    elif command:
        text = command if isinstance(command, str) else shlex.join(str(c) for c in command)
        out += ["The command line recorded in `surgery.json`:", "", "```bash", text, "```", "",
                "`surgery reproduce THIS_FOLDER` reruns it and compares every output hash.", ""]
    elif name in CLI_VERB and params.get("alpha") is not None:
        cmd = ["surgery", CLI_VERB[name], src, "-o", "OUT", "--alpha", f"{params['alpha']:g}"]
        if (m.get("direction") or {}).get("file"):
            cmd += ["--direction", m["direction"]["file"]]
        if isinstance(params.get("layers"), list):
            cmd += ["--layers", ",".join(str(x) for x in params["layers"])]
        if params.get("include_embedding"):
            cmd.append("--include-embedding")
        if name == "gated-opening":
            cmd += ["--gate", "opening", "--opening", str(params.get("opening")), "--coverage",
                    f"{params.get('coverage'):g}", "--opening-layer", str(params.get("layer")),
                    "--post-weight", f"{params.get('post_weight'):g}", "--ridge", f"{params.get('ridge'):g}",
                    "--harmful-weight", f"{params.get('harmful_weight'):g}",
                    "--continuation", str(params.get("continuation", 0))]
            if params.get("refusal"):
                cmd += ["--refusal", str(params["refusal"])]
            if params.get("borderline_calibration") is False:
                cmd.append("--no-borderline-calibration")
        if name == "gated-injection":
            cmd += ["--gate", "linear"]
            # every fit parameter spelled out: inject's defaults have changed between versions
            # (manifests without harmful_weight / cascade were one-shot fits without a harmful weight)
            fit = params.get("fit", "ridge")
            cmd += ["--fit", fit, "--rank", str(params.get("rank", 1))]
            if fit == "ridge":
                cmd += ["--post-weight", f"{params.get('post_weight'):g}", "--ridge", f"{params.get('ridge'):g}",
                        "--harmful-weight", f"{params.get('harmful_weight', 0.0):g}"]
            else:
                cmd += ["--null-ratio", f"{params.get('null_ratio'):g}"]
            cmd.append("--cascade" if params.get("cascade") else "--one-shot")
            if params.get("borderline_calibration") is False:
                cmd.append("--no-borderline-calibration")
        out += ["No command line was recorded; this one, rebuilt from the parameters above and run next to this "
                "folder's direction file, redoes the final edit (compare the new shards' sha256 with `surgery.json`):",
                "", "```bash", shlex.join(cmd), "```", ""]
        if params.get("sweep"):
            search = ["surgery", CLI_VERB[name], src, "-o", "OUT"]
            for key, opt in (("max_over_refusal", "--max-over-refusal"), ("max_kl", "--max-kl")):
                if params.get(key) is not None:
                    search += [opt, f"{params[key]:g}"]
            out += ["To repeat the whole search (direction and strength sweep) instead:", "", "```bash",
                    shlex.join(search), "```", ""]
    else:
        out += ["No recipe or command line was recorded; the method and every parameter are in `surgery.json` "
                "(`method`), as listed above.", ""]
    tool = m.get("tool") or {}
    libs = ", ".join(f"{k} {v}" for k, v in (m.get("libraries") or {}).items())
    out += [f"Made with {tool.get('name', 'surgery')} {tool.get('version', '?')} on {m.get('created', '?')}"
            + (f" ({libs})." if libs else "."), ""]
    return out


# -- the card --------------------------------------------------------------------
def build_card(manifest: dict, base_model: str | None = None, license: str | None = None):
    """``(ModelCard, BaseModelInfo)`` for a manifest (nothing is written)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_info(manifest, base_model, license)
    method = (manifest.get("method") or {}).get("name", "edit")
    tags = ["surgery", "safety", method]
    data = ModelCardData(base_model=base.name, license=base.license, license_name=base.license_name,
                         license_link=base.license_link, library_name="transformers",
                         pipeline_tag="text-generation", tags=tags, base_model_relation=RELATION)
    title = base.name or "model"
    body = [f"# {title}, hardened with surgery ({method})", "",
            f"This is `{title}` with its weights edited by surgery ({method}) so that it "
            "refuses harmful requests more often. It is an ordinary Transformers checkpoint: load it as you would "
            "load the base model. Everything below comes from this folder's provenance manifest, `surgery.json`.", ""]
    body += _what_was_done(manifest, base)
    body += _evaluation(manifest)
    body += _verify_section()
    body += _reproduce(manifest)
    if base.card_body is not None:
        body += ["## Original model card", "",
                 "The base model's own card (the input folder's README.md) follows unchanged, its metadata header removed.",
                 "", "---", "", base.card_body.strip(), ""]
    text = "---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body)
    return ModelCard(text), base


def _problem_file(problem: str) -> str:
    """The file a ``verify`` problem line names ("changed: X (...)", "missing: X", "not in manifest: X")."""
    return problem.split(": ", 1)[-1].split(" (", 1)[0]


def write_card(folder: str | Path, base_model: str | None = None, license: str | None = None,
               say: Callable[[str], None] | None = None) -> CardResult:
    """Write ``folder/README.md`` from ``folder/surgery.json`` and list it in the manifest's outputs."""
    folder = Path(folder).expanduser()
    m = read_manifest(folder)
    problems = [p for p in verify(folder) if _problem_file(p) != CARD]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ManifestError(f"{folder} does not match its {MANIFEST}: {problems[0]}{more}; not writing a card for it")
    if base_model is not None and not HUB_ID.match(base_model):
        raise SurgeryError(f"--base-model {base_model!r} is not a Hub id (OWNER/NAME)")
    # a card written again keeps what was given for the previous one (--base-model, --license)
    previous = m.get("card") if isinstance(m.get("card"), dict) else {}
    if base_model is None and str(previous.get("base_model_source", "")).startswith("given with"):
        base_model = previous.get("base_model")
    if license is None and str(previous.get("license_source", "")).startswith("given with"):
        license = previous.get("license")
    card, base = build_card(m, base_model, license)
    path = folder / CARD
    try:
        write_text_atomic(path, str(card))
    except OSError as e:
        raise SurgeryError(f"cannot write {path}: {' '.join(str(e).split())}") from None
    sha = sha256_file(path)
    outputs = dict(m["outputs"])
    outputs[CARD] = sha
    update_manifest(folder, outputs=outputs,
                    card={"file": CARD, "sha256": sha, "base_model": base.name, "base_model_source": base.how,
                          "license": base.license, "license_source": base.license_how,
                          "original_card": str(base.card_path) if base.card_path else None})
    if say:
        say(f"wrote {path} (base_model {base.name}, license {base.license or 'not declared'}); {MANIFEST} lists it")
        if base.name and not base.is_hub_id:
            say(f"note: base_model {base.name!r} is not a Hub id; the Hub may refuse it on push (use --base-model)")
    return CardResult(path, sha, base.name, base.is_hub_id, base.license, base.license_how, base.card_body is not None)
