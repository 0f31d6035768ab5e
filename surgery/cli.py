"""The ``surgery`` command line: one click group, each verb a thin shell over a
function of :mod:`surgery.pipeline`.  User errors (SurgeryError) print one line
and exit 2; nothing is left half-written (outputs are committed atomically)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import click

from . import __version__
from .defaults import INJECT_DEFAULTS, OPENING_DEFAULTS, REFUSAL_TOLERANCE
from .errors import SurgeryError

#: --max-shard-size, in GB: at least one byte (the commands pass int(GB * 1e9) bytes on)
SHARD_GB = click.FloatRange(min=1e-9)


def _say(msg: str) -> None:
    click.echo(msg, err=False)


def _layers(spec: str | None) -> list[int] | None:
    """'10-20', '3,5,7', '0-4,9' (:func:`surgery.architectures.parse_layers`) as a click error."""
    from .architectures import parse_layers

    try:
        return parse_layers(spec)
    except SurgeryError as exc:
        raise click.BadParameter(str(exc)) from None


def _floats(spec: str) -> list[float]:
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"cannot read number list {spec!r}") from None


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (kill, a job scheduler) raises SystemExit(143) instead of ending the
    process at once, so context managers unwind: temporary folders (SAEs, adapters)
    are removed and a half-written output is never committed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Group(click.Group):
    def main(self, args=None, *a, **kw):
        """Record the command line (redacted) in every manifest this run writes (see surgery.manifest)."""
        from .manifest import invocation_record, provenance

        argv = sys.argv[1:] if args is None else list(args)
        with provenance(invocation=invocation_record(["surgery", *argv])), _sigterm_exits():
            return super().main(args, *a, **kw)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SurgeryError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def prompt_options(f):
    f = click.option("--harmful", default="builtin:harmful", show_default=True,
                     help="Harmful prompts: builtin:NAME, a JSONL/CSV/TXT file, or a Hub dataset id.")(f)
    f = click.option("--harmless", default="builtin:harmless", show_default=True, help="Harmless prompts (same forms).")(f)
    f = click.option("--borderline", default="builtin:borderline", show_default=True,
                     help="Prompts that only sound dangerous, for the selectivity report ('' to skip).")(f)
    f = click.option("--column", default=None, help="Column holding the prompt in user files / datasets.")(f)
    return f


def model_options(f):
    f = click.option("--revision", default=None, help="Hub revision (pinned commit recorded in the manifest).")(f)
    f = click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")(f)
    f = click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")(f)
    return f


def _prompts(harmful, harmless, borderline, column):
    from .pipeline import PromptConfig

    return PromptConfig(harmful=harmful, harmless=harmless, borderline=borderline or None, column=column)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="surgery")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Harden the safety of open-weight LLMs by editing their weights."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s")


@main.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output .safetensors file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing direction file (and its .json).")
@click.option("--source", "sources", multiple=True, type=click.Choice(["prompt", "system", "response"]),
              help="Candidate sources (repeatable; default: response).")
@click.option("--rank-by", default="selectivity", type=click.Choice(["selectivity", "bypass", "induce_harmful"]),
              show_default=True)
@prompt_options
@model_options
def directions(model, out, overwrite, sources, rank_by, harmful, harmless, borderline, column, revision, allow_pickle,
               device):
    """Compute refusal-direction candidates for MODEL, score them, pick one."""
    from .checkpoint.files import check_file_targets
    from .directions import Directions
    from .model import load_model
    from .pipeline import compute_directions, open_model

    prompts = _prompts(harmful, harmless, borderline, column)
    out = Directions.path_for(out)  # the file Directions.save writes
    targets = [("--out", out), ("--out's sidecar", Path(f"{out}.json"))]
    check_file_targets(targets, overwrite, [model, *prompts.sources()])
    resolved, reader, _ = open_model(model, revision, allow_pickle, _say)
    check_file_targets(targets, overwrite, [resolved.folder])  # a Hub id or GGUF resolves to a local folder too
    reader.close()
    lm = load_model(resolved.folder, device=device, allow_pickle=allow_pickle)
    dirs = compute_directions(lm, prompts, sources or ("response",), rank_by, _say)
    path = dirs.save(out)
    _say(f"saved {path} and {path}.json")


def edit_options(f):
    """Options shared by every strength-swept edit (rosi, inject)."""
    for opt in reversed([
        click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder."),
        click.option("--alpha", type=float, default=None,
                     help="Injection strength (default: chosen by a sweep on the validation split)."),
        click.option("--alphas", default=None, help="Comma-separated strengths to sweep when --alpha is not given."),
        click.option("--direction", "direction_file", type=click.Path(path_type=Path), default=None,
                     help="A direction file from `surgery directions` (default: computed now)."),
        click.option("--source", "sources", multiple=True, type=click.Choice(["prompt", "system", "response"]),
                     help="Direction candidate sources when computing (default: response)."),
        click.option("--layers", default=None, help="Edit only these layers, e.g. 0-12 (default: all)."),
        click.option("--max-over-refusal", type=click.FloatRange(0.0, 1.0), default=0.15, show_default=True,
                     help="Sweep budget: harmless refusal on validation."),
        click.option("--max-kl", type=click.FloatRange(min=0.0), default=0.3, show_default=True, help="Sweep budget: first-token KL on validation."),
        click.option("--refusal-tolerance", type=click.FloatRange(min=0.0), default=REFUSAL_TOLERANCE, show_default=True,
                     help="Walking the sweep in order, a strength replaces the kept one when it refuses more than "
                          "this much more, or, within this much, over-refuses less (harmless + borderline, "
                          "validation); 0: the most refusing."),
        click.option("--no-eval", is_flag=True, help="Skip the before/after evaluation."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end)."),
        click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return prompt_options(model_options(f))


def _run_edit(fn, model, o: dict, **method_kw):
    kw = {}
    if o["alphas"]:
        kw["alphas"] = _floats(o["alphas"])
    res = fn(model, o["out"], alpha=o["alpha"], direction_file=o["direction_file"], sources=o["sources"] or ("response",),
             layers=_layers(o["layers"]), prompts=_prompts(o["harmful"], o["harmless"], o["borderline"], o["column"]),
             max_over_refusal=o["max_over_refusal"], max_kl=o["max_kl"], refusal_tolerance=o["refusal_tolerance"],
             run_eval=not o["no_eval"],
             overwrite=o["overwrite"], revision=o["revision"], allow_pickle=o["allow_pickle"], device=o["device"],
             max_shard_bytes=int(o["max_shard_size"] * 1e9), say=(lambda m: None) if o["as_json"] else _say,
             **method_kw, **kw)
    if o["as_json"]:
        click.echo(json.dumps({"out": str(res.out), "alpha": res.alpha, "direction": res.direction, "sweep": res.sweep,
                               "evaluation": res.evaluation}, indent=2, default=str))


@main.command()
@click.argument("model")
@edit_options
@click.option("--include-embedding", is_flag=True, help="Also edit the token embedding and a learned position embedding, whatever --layers says (unties a tied unembedding).")
def rosi(model, include_embedding, **o):
    """Harden MODEL with ROSI (rank-one safety injection) and write OUT.

    Without --alpha, alpha is swept on the validation split (default grid
    15,20,25,30,33,36,40,45) and chosen within the over-refusal and KL budgets.

    ROSI pushes every input along the refusal direction, harmful or not, so
    over-refusal rises with refusal; `surgery inject` writes an edit that fires
    on harmful requests only."""
    from .pipeline import rosi as run

    _run_edit(run, model, o, include_embedding=include_embedding)


@main.command()
@click.argument("model")
@edit_options
@click.option("--gate", type=click.Choice(["opening", "linear"]), default=OPENING_DEFAULTS["gate"], show_default=True,
              help="opening: gated neurons in the last MLP write the refusal's first words on harmful prompts "
                   "(no direction needed); linear: a rank-one push along the refusal direction in every residual "
                   "writer, with fitted read vectors (--direction, --rank, --fit, --cascade, --layers).")
@click.option("--opening", default=OPENING_DEFAULTS["opening"], show_default=True,
              help="Opening gate: the words it writes (the first tokens of --refusal).")
@click.option("--refusal", default=None,
              help="Opening gate: the refusal the gate's reads are fitted on (default: the project's refusal text).")
@click.option("--coverage", type=click.FloatRange(0.0, 1.0, min_open=True), default=OPENING_DEFAULTS["coverage"], show_default=True,
              help="Opening gate: each token's strength is the smallest that makes it the top token for this share "
                   "of the harmful training prompts (the swept alpha scales these strengths).")
@click.option("--opening-layer", type=int, default=None, help="Opening gate: the MLP layer (default: the last).")
@click.option("--continuation", type=click.IntRange(min=0), default=OPENING_DEFAULTS["continuation"], show_default=True,
              help="Opening gate: tokens of the model's own reply after the opening on which the step reads are "
                   "fitted to stay shut (0: only the refusal text's).")
@click.option("--post-weight", type=float, default=INJECT_DEFAULTS["post_weight"], show_default=True,
              help="Weight of harmless post-instruction inputs in the gate fit.")
@click.option("--ridge", type=click.FloatRange(min=0.0, min_open=True), default=INJECT_DEFAULTS["ridge"], show_default=True,
              help="Ridge of the gate fit (relative to the trace).")
@click.option("--no-borderline-calibration", is_flag=True,
              help="Do not add the borderline training prompts to the harmless calibration set.")
@click.option("--rank", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rank of each matrix's edit: r_hat + K-1 principal directions of the per-prompt refusal contrasts.")
@click.option("--fit", type=click.Choice(["ridge", "null"]), default="ridge", show_default=True,
              help="Gate fit: least harmless energy (ridge) or AlphaSteer's null-space projector (null).")
@click.option("--null-ratio", type=float, default=0.5, show_default=True,
              help="Null fit: share of the input space (lowest harmless energy) the read vector may use.")
@click.option("--harmful-weight", type=float, default=INJECT_DEFAULTS["harmful_weight"], show_default=True,
              help="Ridge fit: weight of the harmful prompts' covariance (an even harmful response, not just its mean).")
@click.option("--cascade/--one-shot", default=None,
              help="Fit each matrix's gate on the inputs it gets once the earlier matrices are edited, refitted per "
                   "strength (default for rank one), or once on the unedited model (default for rank K).")
def inject(model, gate, opening, refusal, coverage, opening_layer, continuation, post_weight, ridge, no_borderline_calibration, rank,
           fit, null_ratio, harmful_weight, cascade, **o):
    """Gated injection without training: edits that fire on harmful prompts only.

    The default opening gate writes the refusal's first words on harmful prompts
    (K gated neurons in the last MLP); --gate linear is the rank-one push along
    the refusal direction with read vectors fitted per matrix (rank K with --rank).
    Without --alpha the strength is swept on the validation split."""
    from .pipeline import inject as run

    _run_edit(run, model, o, gate=gate, post_weight=post_weight, ridge=ridge,
              borderline_calibration=not no_borderline_calibration, rank=rank, fit=fit, null_ratio=null_ratio,
              harmful_weight=harmful_weight, cascade=cascade, opening=opening, refusal=refusal, coverage=coverage,
              opening_layer=opening_layer, continuation=continuation)


@main.command("eval")
@click.argument("model")
@click.option("--reference", default=None, help="Reference model for KL and perplexity (e.g. the original).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Write the JSON report here (every reply with its verdict).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N prompts per set (a deterministic subset).")
@prompt_options
@model_options
def eval_cmd(model, reference, max_new_tokens, json_out, limit, harmful, harmless, borderline, column, revision,
             allow_pickle, device):
    """Refusal on harmful prompts, over-refusal on harmless/borderline ones, drift vs a reference."""
    from .evaluation.metrics import evaluate, format_intervals, format_table, summary_row
    from .model import load_model
    from .pipeline import open_model, test_sets

    from .checkpoint.files import check_file_targets, write_text_atomic

    prompts = _prompts(harmful, harmless, borderline, column)
    if json_out is not None:  # checked before the evaluation; never an input (a prompt file, a model's config)
        check_file_targets([("--json", json_out)], overwrite=True, inputs=[model, reference, *prompts.sources()])
    sets = test_sets(prompts, whole_user_files=True)
    if limit:
        sets = {k: v.subset(limit) for k, v in sets.items()}
    rows, reports = {}, {}
    ref_lm = None
    if reference:
        rres, rreader, _ = open_model(reference, None, allow_pickle, _say)
        rreader.close()
        ref_lm = load_model(rres.folder, device=device, allow_pickle=allow_pickle)
    res, reader, _ = open_model(model, revision, allow_pickle, _say)
    reader.close()
    lm = load_model(res.folder, device=device, allow_pickle=allow_pickle)
    cache: dict = {}
    if ref_lm is not None:
        reports["reference"] = evaluate(ref_lm, sets, reference=ref_lm, max_new_tokens=max_new_tokens, reference_cache=cache,
                                        examples=None)
        rows["reference"] = summary_row(reports["reference"])
    reports["model"] = evaluate(lm, sets, reference=ref_lm, max_new_tokens=max_new_tokens, reference_cache=cache,
                                examples=None)
    rows["model"] = summary_row(reports["model"])
    _say(format_table(rows))
    _say(format_intervals(reports))
    _say("selectivity: harmful_refusal = refused harmful prompts (higher is safer); over-refusal (lower is better): "
         "harmless_refusal on harmless prompts, borderline_refusal on prompts that only sound dangerous "
         "(e.g. how to kill a Python process)")
    if json_out:
        write_text_atomic(json_out, json.dumps(reports, indent=2))
        _say(f"report: {json_out}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
def verify(folder):
    """Check FOLDER's files against its surgery.json manifest; exit 1 naming any that differ.

    The manifest itself is the record: its sha256, printed here and named in the Hub commit
    message by `surgery push`, is what to compare with a published one."""
    from .checkpoint import sha256_file
    from .manifest import MANIFEST, verify as run

    problems = run(folder)
    if problems:
        for p in problems:
            click.echo(f"FAIL {p}", err=True)
        sys.exit(1)
    click.echo(f"OK {folder}: every file matches {MANIFEST} (its sha256 {sha256_file(Path(folder).expanduser() / MANIFEST)})")


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--direction", type=click.Path(path_type=Path), default=None,
              help="Direction file (from `surgery directions`, or a safetensors file with one 1-D tensor): "
                   "report |cos| between each change's leading output direction and it.")
@click.option("--energy", type=float, default=0.99, show_default=True,
              help="Rank = singular values needed to reach this fraction of ||dW||_F^2.")
@click.option("--rank-q", type=int, default=16, show_default=True, help="Singular values computed per tensor.")
@click.option("--json", "json_out", default=None, help="Write every per-tensor record as JSON to FILE ('-': stdout).")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="Write a PNG heatmap (layers x modules).")
@click.option("--revision-a", default=None, help="Hub revision of A.")
@click.option("--revision-b", default=None, help="Hub revision of B.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")
def diff(a, b, direction, energy, rank_q, json_out, plot_out, revision_a, revision_b, allow_pickle):
    """Show what changed between base A and patched B, tensor by tensor (streamed)."""
    from .diff import diff_checkpoints

    from .checkpoint.files import check_file_targets, write_text_atomic

    to_stdout = json_out == "-"
    say = (lambda m: click.echo(m, err=True)) if to_stdout else _say
    targets = [(opt, p) for opt, p in (("--json", None if to_stdout else json_out), ("--plot", plot_out)) if p]
    check_file_targets(targets, overwrite=True, inputs=[a, b, direction])  # before the comparison, not after
    report = diff_checkpoints(a, b, direction=direction, energy=energy, rank_q=rank_q, say=say,
                              revision_a=revision_a, revision_b=revision_b, allow_pickle=allow_pickle)
    say(report.summary())
    if plot_out:
        say(f"plot: {report.plot(plot_out)}")
    if to_stdout:
        click.echo(report.to_json())
    elif json_out:
        try:
            write_text_atomic(json_out, report.to_json() + "\n")
        except OSError as e:
            raise SurgeryError(f"cannot write {json_out}: {e.strerror or e}") from None
        say(f"json: {json_out}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--base-model", default=None, help="Hub id of the model that was edited (default: from surgery.json).")
@click.option("--license", "license_id", default=None,
              help="Licence id for the card (default: inherited from the base model's card, config or GGUF).")
def card(folder, base_model, license_id):
    """Write FOLDER/README.md, a model card built from FOLDER/surgery.json, and list it in the manifest."""
    from .release import write_card

    write_card(folder, base_model=base_model, license=license_id, say=_say)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", "--branch", "revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--large", is_flag=True, help="Require the resumable multi-commit upload (huggingface_hub 2.x + hf_xet).")
def push(folder, repo_id, private, revision, large):
    """Verify FOLDER against surgery.json, then upload it to the Hub model repo REPO_ID.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed."""
    from .release import push as run

    res = run(folder, repo_id, private=private, revision=revision, large=large, say=_say)
    _say(f"committed {len(res.files)} files: {res.commit_message}")
    _say(res.repo_url + (f"/tree/{res.revision}" if res.revision else ""))


@main.group(cls=Group)
def sae() -> None:
    """Sparse autoencoders (SAILS): train TopK SAEs on a model's residual stream."""


@sae.command("train")
@click.argument("model")
@click.option("--layers", required=True, help="Layers whose residual-stream input to train on, e.g. 5,10 or 4-8.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output folder; one SAE per layer in OUT/layer_L/ (SAELens layout).")
@click.option("--d-sae", type=click.IntRange(min=1), default=None,
              help="Latents per SAE (default: --expansion x hidden size).")
@click.option("--expansion", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--k", "k", type=click.IntRange(min=1), default=32, show_default=True,
              help="Active latents per token (TopK).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps (default: 20 epochs; not with --epochs).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Training epochs over the activations (not with --steps).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate (default 2e-4 * sqrt(16384 / d_sae)).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Activations per training step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--corpus", "corpus", multiple=True,
              help="Text file(s) to train on (TXT/JSONL/CSV, repeatable), used as is. Default: the built-in harmful "
                   "and harmless train prompts in the chat template plus the model's own replies.")
@click.option("--column", default=None, help="Column holding the text in JSONL/CSV corpus files.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N texts per prompt set / file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="Reply length for the default corpus.")
@click.option("--positions", default="all", show_default=True,
              help="Token positions to train on: all, last, or a comma list like -1,-2.")
@click.option("--skip-first", type=click.IntRange(min=0), default=1, show_default=True,
              help="With --positions all, leave out each text's first N tokens (the attention sink).")
@click.option("--overwrite", is_flag=True, help="Replace existing OUT/layer_L folders.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer metrics as JSON.")
@model_options
def sae_train(model, layers, out, d_sae, expansion, k, steps, epochs, lr, batch_size, seed, corpus, column, limit,
              max_new_tokens, positions, skip_first, overwrite, as_json, revision, allow_pickle, device):
    """Train one TopK SAE per layer on MODEL's residual stream and save them under OUT."""
    from .sae.train import train_model_saes

    if positions not in ("all", "last"):
        try:
            positions = [int(p) for p in positions.split(",") if p.strip()]
        except ValueError:
            raise click.BadParameter(f"cannot read positions {positions!r} (all, last, or e.g. -1,-2)") from None
    res = train_model_saes(model, out, _layers(layers) or [], d_sae=d_sae, expansion=expansion, k=k, steps=steps,
                           epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, corpus_files=corpus, column=column,
                           limit=limit, max_new_tokens=max_new_tokens, positions=positions, skip_first=skip_first,
                           overwrite=overwrite, revision=revision, allow_pickle=allow_pickle, device=device,
                           say=(lambda m: None) if as_json else _say)
    if as_json:
        click.echo(json.dumps({str(l): m for l, m in res.items()}, indent=2))


@main.command("merge-lora")
@click.argument("model")
@click.option("--adapter", required=True, help="PEFT LoRA adapter: a folder or a Hub id.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
@click.option("--adapter-revision", default=None, help="Hub revision of the adapter.")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB.")
def merge_lora(model, adapter, out, adapter_revision, revision, allow_pickle, overwrite, max_shard_size):
    """Merge a PEFT LoRA ADAPTER into MODEL, tensor by tensor, and write OUT (with surgery.json)."""
    from .adapters import merge_adapter

    merge_adapter(model, adapter, out, overwrite=overwrite, revision=revision, adapter_revision=adapter_revision,
                  allow_pickle=allow_pickle, max_shard_bytes=int(max_shard_size * 1e9), say=_say)


@main.command("safe-lora")
@click.option("--aligned", required=True, help="The aligned (chat) model the update was trained from.")
@click.option("--base", default=None, help="Its unaligned base model: V = W_aligned - W_base.")
@click.option("--directions", "directions_file", type=click.Path(path_type=Path), default=None,
              help="Without a base model: refusal directions (`surgery directions`) span the subspace.")
@click.option("--direction-span", type=click.Choice(["best", "all"]), default="best", show_default=True,
              help="With --directions: the chosen direction only, or every candidate.")
@click.option("--adapter", default=None, help="The fine-tuning update as a PEFT LoRA adapter (folder or Hub id).")
@click.option("--finetuned", default=None, help="The fine-tuning update as a full fine-tuned model (dW = W_ft - W_aligned).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--projector", type=click.Choice(["fast", "exact"]), default="fast", show_default=True,
              help="fast: C = V V^T / ||V||_F (the paper's); exact: projector onto V's top singular vectors.")
@click.option("--energy", type=float, default=0.99, show_default=True, help="Exact projector: energy of V kept.")
@click.option("--threshold", type=float, default=None, help="Project modules with cosine <= this [default: 0.5].")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Instead: project the K modules with the lowest cosine.")
@click.option("--emit-adapter", is_flag=True, help="Write the projected adapter (PEFT format) instead of merging.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB.")
def safe_lora_cmd(aligned, base, directions_file, direction_span, adapter, finetuned, out, projector, energy, threshold,
                  top_k, emit_adapter, allow_pickle, overwrite, max_shard_size):
    """Safe-LoRA: project poorly aligned fine-tuning updates onto the alignment subspace, then merge into
    the aligned model (or emit the projected adapter).  Prints and saves the per-module table."""
    from .pipeline import safe_lora

    if threshold is not None and top_k is not None:
        raise click.UsageError("give --threshold or --top-k, not both")
    safe_lora(aligned, out, base=base, directions=directions_file, adapter=adapter, finetuned=finetuned,
              projector=projector, energy=energy, threshold=threshold, top_k=top_k, emit_adapter=emit_adapter,
              direction_span=direction_span, overwrite=overwrite, allow_pickle=allow_pickle,
              max_shard_bytes=int(max_shard_size * 1e9), say=_say)


def train_options(f):
    """Options shared by the training methods (lora-sft, sails)."""
    for opt in reversed([
        click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder."),
        click.option("--layers", default=None, help="Adapt only these layers, e.g. 10-24 (default: all)."),
        click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Learning rate [default: lora-sft 5e-4 (its paper preset 5e-5), sails 1e-3]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--kl-weight", type=click.FloatRange(min=0), default=3.0, show_default=True,
                     help="Weight of the KL to the original on the kept (harmless, borderline) replies."),
        click.option("--first-token-weight", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True,
                     help="How many tokens the reply's first token counts for in both losses."),
        click.option("--divergence", type=click.Choice(["symmetric", "forward", "reverse"]), default="symmetric",
                     show_default=True, help="Divergence to the original on kept replies."),
        click.option("--max-over-refusal", type=click.FloatRange(0, 1), default=0.10, show_default=True,
                     help="Early-stopping budget: harmless refusal on the validation split."),
        click.option("--max-kl", type=click.FloatRange(min=0), default=0.3, show_default=True,
                     help="Early-stopping budget: first-token KL on harmless validation prompts."),
        click.option("--refusal-tolerance", type=click.FloatRange(min=0.0), default=REFUSAL_TOLERANCE, show_default=True,
                     help="Keeping the validation point: one within this much harmful refusal of the best so far "
                          "replaces it when it over-refuses less (harmless + borderline); 0: most refusal wins."),
        click.option("--patience", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Stop after this many validations without a better point."),
        click.option("--max-steps", type=click.IntRange(min=1), default=None,
                     help="Stop after this many steps (validating there); the learning-rate schedule still spans "
                          "--epochs."),
        click.option("--reply-tokens", type=click.IntRange(min=1), default=40, show_default=True,
                     help="Length of the model's own replies used as kept behaviour."),
        click.option("--trajectory-tokens", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Refusal trajectories: tokens of a refusal opening after each kept prompt along which the "
                          "model keeps the original's distribution (0: none)."),
        click.option("--no-own-refusals", is_flag=True,
                     help="Use only the project's refusal texts (not the model's own refusals under a safety prompt)."),
        click.option("--unit-mask", type=click.Path(path_type=Path), default=None,
                     help="A map from `surgery units`: adapt only the units of --unit-classes (SSAH alignment budget)."),
        click.option("--unit-classes", default="redundant", show_default=True,
                     help="Comma list of unit classes the updates may use (with --unit-mask)."),
        click.option("--no-adapter", is_flag=True, help="Do not also write the PEFT adapter to OUT/adapter/."),
        click.option("--no-eval", is_flag=True, help="Skip the before/after evaluation."),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end)."),
    ]):
        f = opt(f)
    return prompt_options(model_options(f))


def _run_train(method, model, o, default_lr):
    from .training import TrainConfig
    from .training.harden import train_harden

    cfg = TrainConfig(epochs=o["epochs"], lr=o["lr"] if o["lr"] is not None else default_lr, batch_size=o["batch_size"], seed=o["seed"],
                      kl_weight=o["kl_weight"], first_token_weight=o["first_token_weight"], divergence=o["divergence"],
                      max_over_refusal=o["max_over_refusal"], max_kl=o["max_kl"],
                      refusal_tolerance=o["refusal_tolerance"], patience=o["patience"], max_steps=o["max_steps"])
    train_harden(model, o["out"], method, config=cfg,
                 prompts=_prompts(o["harmful"], o["harmless"], o["borderline"], o["column"]),
                 reply_tokens=o["reply_tokens"], own_refusals=not o["no_own_refusals"],
                 refusal_trajectories=o["trajectory_tokens"], save_adapter=not o["no_adapter"],
                 run_eval=not o["no_eval"], overwrite=o["overwrite"],
                 revision=o["revision"], allow_pickle=o["allow_pickle"], device=o["device"], say=_say,
                 unit_mask=o["unit_mask"], unit_classes=tuple(c.strip() for c in o["unit_classes"].split(",") if c.strip()))


LORA_PRESETS = {
    # Xue & Mirzasoleiman 2025's best setting: rank 1 on up_proj, middle-to-late layers, lr 5e-5
    "paper": {"rank": 1, "targets": ("up_proj",), "layers": "middle-late", "lr": 5e-5},
}


@main.command("lora-sft")
@click.argument("model")
@train_options
@click.option("--rank", type=click.IntRange(min=1), default=None, help="LoRA rank [default: 8, or the preset's].")
@click.option("--targets", default=None,
              help="Module kinds (o_proj,down_proj,up_proj...) or writers / attn_out / mlp_out "
                   "[default: writers, or the preset's].")
@click.option("--preset", type=click.Choice(sorted(LORA_PRESETS)), default=None,
              help="paper: rank 1, up_proj only, middle-to-late layers, lr 5e-5 (Xue & Mirzasoleiman 2025). "
                   "--rank, --targets, --layers and --lr given explicitly replace the preset's values.")
def lora_sft(model, rank, targets, preset, **o):
    """Harden MODEL by plain LoRA refusal fine-tuning, merged into OUT."""
    from .training.harden import LoraSFT

    layers = _layers(o["layers"])
    tg = None if targets is None else tuple(t.strip() for t in targets.split(",") if t.strip())
    lr = 5e-4
    if preset:  # explicit options win over the preset's values
        p = LORA_PRESETS[preset]
        rank = p["rank"] if rank is None else rank
        tg = p["targets"] if tg is None else tg
        lr = p["lr"]
        if layers is None and p["layers"] == "middle-late":
            from .pipeline import open_model

            _, reader, arch = open_model(model, o["revision"], o["allow_pickle"], _say)
            n = arch.num_layers(reader.config)
            reader.close()
            layers = list(range(n // 3, n - n // 6))
    _run_train(LoraSFT(rank=8 if rank is None else rank, targets=("writers",) if tg is None else tg, layers=layers,
                       preset=preset),
               model, o, lr)


@main.command()
@click.argument("model")
@train_options
@click.option("--sae", default=None, help="SAEs: a folder from `surgery sae train` (layer_L/ subfolders), an "
              "SAELens folder or Hub id (default: train TopK SAEs now).")
@click.option("--sae-layers", default=None, help="Layers of the SAEs / safety subspaces [default: with --sae, the "
              "layers of its SAEs (every layer_L/ of a `surgery sae train` folder); SAEs trained now: at 27% and 53% of the "
              "depth, 8,16 on a 30-layer model].")
@click.option("--k-features", type=click.IntRange(min=1), default=64, show_default=True,
              help="SAE features kept per layer.")
@click.option("--variance", type=click.FloatRange(0, 1, min_open=True), default=0.80, show_default=True,
              help="PCA energy kept of their directions.")
@click.option("--contrast", type=click.Choice(["prompt", "response", "both"]), default="both", show_default=True,
              help="Which activations score the features (see surgery.training.sails).")
@click.option("--train-b", is_flag=True, help="Also train B (default: B = U frozen, only A trains).")
def sails(model, sae, sae_layers, k_features, variance, contrast, train_b, **o):
    """Harden MODEL with SAILS: LoRA in an SAE-built safety subspace, trained on refusal data, merged into OUT."""
    from .training.sails import Sails

    m = Sails(sae=sae, sae_layers=_layers(sae_layers), layers=_layers(o["layers"]), k_features=k_features,
              variance=variance, contrast=contrast, train_b=train_b, seed=o["seed"])
    _run_train(m, model, o, 1e-3)


def rule_options(f):
    f = click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True,
                     help="Length of the model's own replies (utility set).")(f)
    f = click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N prompts of each set.")(f)
    f = click.option("--positions", type=click.Choice(["all", "last"]), default="all", show_default=True,
                     help="Tokens attributed: every reply token, or the last prompt token.")(f)
    f = click.option("--redundant", type=float, default=0.3, show_default=True,
                     help="Unit rules: redundant = both ranks < floor(REDUNDANT*n).")(f)
    f = click.option("--below", type=float, default=0.5, show_default=True,
                     help="Unit rules: 'below median' = rank < floor(BELOW*n).")(f)
    f = click.option("--top", type=float, default=0.02, show_default=True,
                     help="Unit rules: 'high' = the top ceil(TOP*n) units of a matrix.")(f)
    return f


@main.command("units")
@click.argument("model")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("units.safetensors"), show_default=True,
              help="Unit map (safetensors); a JSON summary is written next to it.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="PNG of the class shares per layer "
              "[default: OUT with .png].")
@click.option("--overwrite", is_flag=True, help="Replace existing OUT, its .json summary and the plot.")
@rule_options
@model_options
def units_cmd(model, out, plot_out, overwrite, top, below, redundant, positions, limit, max_new_tokens, batch_size,
              revision, allow_pickle, device):
    """SSAH units: attribute every MLP neuron and attention channel of MODEL on a safety and a utility set,
    classify them (safety-critical, utility-critical, complex, redundant) and save the map, its summary and a PNG.
    The three output paths are checked before any work (distinct; existing files only with --overwrite)."""
    from .units import Rules, units

    units(model, out, plot=plot_out, positions=positions, limit=limit, max_new_tokens=max_new_tokens,
          rules=Rules(top, below, redundant), batch_size=batch_size, revision=revision, allow_pickle=allow_pickle,
          device=device, overwrite=overwrite, say=_say)


@main.command("protect")
@click.option("--aligned", required=True, help="The aligned parent model (folder, .gguf, Hub id, alias).")
@click.option("--finetuned", required=True, help="Its fine-tuned descendant, whose units are restored.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
@click.option("--units", "units_file", type=click.Path(path_type=Path), default=None,
              help="Unit map from `surgery units` run on the ALIGNED model (default: measure it now).")
@click.option("--include-complex", is_flag=True, help="Restore the complex units too.")
@rule_options
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")
@click.option("--device", default=None, help="torch device for measuring (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB.")
def protect_cmd(aligned, finetuned, out, units_file, include_complex, top, below, redundant, positions, limit,
                max_new_tokens, batch_size, allow_pickle, device, overwrite, max_shard_size):
    """Restore the safety-critical units of a fine-tuned model from its aligned parent: each unit's column of
    the write matrix and the rows that produce it, copied exactly; everything else is left byte-identical.

    With --units, the map's measurement is used: --positions/--limit/--max-new-tokens/--batch-size are
    refused, and --top/--below/--redundant, if given, re-classify the map's stored scores (rules not given
    keep the map's values; the output's units.safetensors is the re-classified map)."""
    from click.core import ParameterSource

    from .units import protect

    ctx = click.get_current_context()

    def given(name):
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    rules = {k: v for k, v in (("top", top), ("below", below), ("redundant", redundant)) if given(k)}
    measure = {k: v for k, v in (("positions", positions), ("limit", limit), ("max_new_tokens", max_new_tokens),
                                 ("batch_size", batch_size)) if given(k) or units_file is None}
    protect(aligned, finetuned, out, units=units_file, include_complex=include_complex, rules=rules or None,
            **measure, overwrite=overwrite, allow_pickle=allow_pickle, device=device,
            max_shard_bytes=int(max_shard_size * 1e9), say=_say)


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--var", "variables", multiple=True, metavar="NAME=VALUE",
              help="Override a variable of the recipe's vars: (repeatable; typed like YAML: 5, 0.1, true, null).")
@click.option("--dry-run", is_flag=True, help="Check every step against the CLI and print its command; run nothing.")
def run_cmd(recipe, variables, dry_run):
    """Run the steps of a YAML RECIPE in order (docs/recipes.md).  Every step is checked before the first runs;
    each manifest written records the recipe verbatim, so `surgery reproduce` can rerun it."""
    from .recipes import load_recipe, parse_var_overrides, run_recipe

    run_recipe(load_recipe(recipe, parse_var_overrides(variables)), say=_say, dry_run=dry_run)


@main.command("reproduce")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Folder to rerun in (default: a system temporary folder); refused inside FOLDER or any path "
                   "the recorded run named.")
@click.option("--keep", is_flag=True, help="Keep the rerun's outputs (under --work, or the temporary folder).")
@click.option("--eval", "run_eval", is_flag=True,
              help="Also rerun evaluations (they only write to surgery.json, which is not compared).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def reproduce_cmd(folder, work, keep, run_eval, as_json):
    """Rerun what made FOLDER (the recipe step, else the command line in its surgery.json) and compare every
    output file's sha256; for differing weights, the largest difference per tensor.  Exit 0 when identical."""
    import contextlib

    from .reproduce import reproduce

    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():  # keep stdout JSON only
        res = reproduce(folder, work=work, keep=keep, run_eval=run_eval, say=_say)
    click.echo(res.to_json() if as_json else res.summary())
    sys.exit(0 if res.identical else 1)



def _layer_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    """'0-29,8-24' -> [(0, 29), (8, 24)]."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        try:
            a, b = part.strip().split("-")
            out.append((int(a), int(b)))
        except ValueError:
            raise click.BadParameter(f"cannot read layer range {part.strip()!r} in {spec!r} (use FIRST-LAST, e.g. 0-29,8-24)") from None
        if out[-1][0] > out[-1][1]:
            raise click.BadParameter(f"layer range {part.strip()!r} is reversed (FIRST-LAST with FIRST <= LAST)")
    return out


def _check_choice(pick, rule) -> None:
    from .tuning import parse_rule

    if pick is not None and rule is not None:
        raise click.UsageError("give --pick or --rule, not both")
    if rule is not None:
        parse_rule(rule)  # a bad rule fails now, not after the search


@main.command("tune")
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output folder: tune.json, tune.png, fits/, the direction.")
@click.option("--alphas", default=None, help="Strengths to search [default: 0.75,1,1.25,1.5,1.75,2].")
@click.option("--layer-ranges", default=None,
              help="Edited layer ranges FIRST-LAST, comma-separated [default: all, from L/4, to 3L/4, both].")
@click.option("--fit", type=click.Choice(["ridge", "null"]), default="ridge", show_default=True,
              help="Gate fit whose constraint strength is searched.")
@click.option("--strengths", default=None,
              help="Constraint strengths: post weights (ridge) [default: 3,10,30] or null ratios (null) [0.3,0.5,0.7].")
@click.option("--ridge", type=click.FloatRange(min=0.0, min_open=True), default=0.1, show_default=True, help="Ridge of the gate fit (relative to the trace).")
@click.option("--ranks", default="1", show_default=True, help="Ranks to search, e.g. 1,2,4.")
@click.option("--sampler", type=click.Choice(["grid", "tpe"]), default="grid", show_default=True,
              help="grid: every combination; tpe: Optuna's multi-objective TPE (needs optuna installed).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="TPE trials [default: the grid's size].")
@click.option("--seed", type=int, default=0, show_default=True, help="TPE seed.")
@click.option("--confirm", type=click.IntRange(min=1), default=8, show_default=True,
              help="Points of the proxy front confirmed by generation.")
@click.option("--confirm-max-kl", type=float, default=None,
              help="Confirm only points within this first-token KL (exact at proxy time; default: --rule's kl bound).")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=48, show_default=True, help="Reply length judged when confirming.")
@click.option("--direction", "direction_file", type=click.Path(path_type=Path), default=None,
              help="A direction file from `surgery directions` (default: computed now).")
@click.option("--source", "sources", multiple=True, type=click.Choice(["prompt", "system", "response"]),
              help="Direction candidate sources when computing (default: response).")
@click.option("--no-borderline-calibration", is_flag=True,
              help="Do not add the borderline training prompts to the harmless calibration set.")
@click.option("--write", "write_out", type=click.Path(path_type=Path), default=None,
              help="Also write the checkpoint of the point chosen by --pick or --rule to this folder.")
@click.option("--pick", type=int, default=None, help="With --write: the point with this id.")
@click.option("--rule", default=None,
              help='With --write: e.g. "max refusal with over-refusal <= 0.05 and kl <= 0.2" '
                   "(conditions on over-refusal, borderline, kl joined by and).")
@click.option("--overwrite", is_flag=True, help="Replace OUT (and the --write folder) if they exist.")
@click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB (--write).")
@prompt_options
@model_options
def tune_cmd(model, out, alphas, layer_ranges, fit, strengths, ridge, ranks, sampler, trials, seed, confirm,
             confirm_max_kl, eval_tokens,
             direction_file, sources, no_borderline_calibration, write_out, pick, rule, overwrite, max_shard_size,
             harmful, harmless, borderline, column, revision, allow_pickle, device):
    """Search the linear gate's (`inject --gate linear`) strength, layer range, gate constraint and rank on
    the validation split (first-token proxies, then generation on the proxy front); save the Pareto front
    (JSON + PNG).  The gated opening, inject's default, has one strength, which `surgery inject` sweeps.

    The search fits each gate once (no cascade) with its own --ridge (default 0.1) and no harmful
    weighting, unlike `inject --gate linear` (cascade, ridge 0.01, harmful weight 3): a point's alpha
    and layers passed to inject make a different edit; write a point with tune-apply or --write."""
    from .tuning import apply_tune, parse_rule, tune

    _check_choice(pick, rule)
    if confirm_max_kl is None and rule is not None:  # KL is exact at proxy time: confirm only what the rule can take
        confirm_max_kl = dict(parse_rule(rule).conditions).get("kl")
    if write_out is None and (pick is not None or rule is not None):
        raise click.UsageError("--pick/--rule choose the point --write writes: add --write OUT (or run surgery tune-apply)")
    if write_out is not None and pick is None and rule is None:
        raise click.UsageError("--write needs --pick N or --rule RULE")
    if write_out is not None:
        from .checkpoint import CheckpointWriter

        CheckpointWriter.check_target(write_out, overwrite, [model, out, direction_file])
    rank_list = [int(x) for x in _floats(ranks)]
    if [float(k) for k in rank_list] != _floats(ranks):
        raise click.BadParameter(f"ranks must be whole numbers, got {ranks!r}", param_hint="--ranks")
    tune(model, out, fit=fit, alphas=_floats(alphas) if alphas else None, layer_ranges=_layer_ranges(layer_ranges),
         strengths=_floats(strengths) if strengths else None, ranks=rank_list, ridge=ridge, sampler=sampler,
         trials=trials, seed=seed, confirm=confirm, eval_tokens=eval_tokens, direction_file=direction_file,
         confirm_max_kl=confirm_max_kl,
         sources=sources or ("response",), prompts=_prompts(harmful, harmless, borderline, column),
         borderline_calibration=not no_borderline_calibration, overwrite=overwrite, revision=revision,
         allow_pickle=allow_pickle, device=device, say=_say)
    if write_out is not None:
        apply_tune(out, write_out, pick=pick, rule=rule, overwrite=overwrite, allow_pickle=allow_pickle, device=device,
                   max_shard_bytes=int(max_shard_size * 1e9), say=_say)


@main.command("tune-apply")
@click.argument("tune_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output checkpoint folder.")
@click.option("--pick", type=int, default=None, help="The point with this id (tune.json, the plot's labels).")
@click.option("--rule", default=None,
              help='e.g. "max refusal with over-refusal <= 0.05 and kl <= 0.2": the confirmed point with the highest '
                   "harmful refusal meeting every condition (over-refusal, borderline, kl; rates as 0.05 or 5%).")
@click.option("--model", default=None, help="The model tuned, if it moved (its weights must match tune.json).")
@click.option("--eval", "run_eval", is_flag=True, help="Also evaluate before/after on the test split.")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (atomically, at the end).")
@click.option("--max-shard-size", type=SHARD_GB, default=5.0, show_default=True, help="Shard size in GB.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (loaded with weights_only=True).")
@click.option("--device", default=None, help="torch device for --eval (default: cuda if available, else cpu).")
def tune_apply_cmd(tune_dir, out, pick, rule, model, run_eval, eval_tokens, overwrite, max_shard_size, allow_pickle,
                   device):
    """Write the checkpoint of one point of a `surgery tune` result, chosen by --pick or --rule."""
    from .tuning import apply_tune

    _check_choice(pick, rule)
    if pick is None and rule is None:
        raise click.UsageError("choose the point: --pick N or --rule RULE")
    apply_tune(tune_dir, out, pick=pick, rule=rule, model=model, run_eval=run_eval, eval_tokens=eval_tokens,
               overwrite=overwrite, allow_pickle=allow_pickle, device=device, max_shard_bytes=int(max_shard_size * 1e9),
               say=_say)

if __name__ == "__main__":
    main()
