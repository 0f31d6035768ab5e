"""Model card and Hub push of an output folder.

The folder is a real ROSI output of the tiny chat model (with a base README.md
carrying a licence and a body) plus an evaluation block.  The card is checked
against the manifest's own numbers and parsed back by huggingface_hub; the push
runs the real ``HfApi.create_repo``/``upload_folder`` code over a fake Hub
(an ``httpx2.MockTransport`` behind ``huggingface_hub.set_client_factory``) that
records every request, so the test sees exactly what would go over the wire."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from surgery.cli import main as cli
from surgery.errors import ManifestError, SurgeryError
from surgery.manifest import read_manifest, update_manifest, verify
from surgery.pipeline import PromptConfig, rosi
from surgery.release import push, write_card

BASE_CARD_BODY = "# Tiny base\n\nORIGINAL-CARD-SENTINEL: a tiny random llama.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
BASE_README = "---\nlicense: mit\nlanguage: fr\n---\n" + BASE_CARD_BODY
HARMFUL_REPLY = "HARMFUL-EXAMPLE-REPLY-SENTINEL step one"
TOKEN = "hf_testTOKENnotReal0123456789abcdef"
LIBRARY_TELEMETRY = "/api/agent-harnesses"  # huggingface_hub 2.x's own registry fetch, not ours


def _set(name, n, rate):
    return {"source": f"builtin:{name}[test]", "count": n, "sha256": hashlib.sha256(name.encode()).hexdigest(),
            "refusal_rate": rate, "examples": [{"prompt": "p", "reply": HARMFUL_REPLY, "refused": False}]}


EVALUATION = {
    "before": {"judge": "markers(18)", "max_new_tokens": 48,
               "sets": {"harmful": _set("harmful", 40, 0.025), "harmless": _set("harmless", 40, 0.05),
                        "borderline": _set("borderline", 20, 0.1)},
               "kl_first_token_harmless": 0.0, "perplexity_on_reference_replies": 1.9, "perplexity_ratio": 1.0},
    "after": {"judge": "markers(18)", "max_new_tokens": 48,
              "sets": {"harmful": _set("harmful", 40, 0.625), "harmless": _set("harmless", 40, 0.3),
                       "borderline": _set("borderline", 20, 0.35)},
              "kl_first_token_harmless": 0.29252, "perplexity_on_reference_replies": 2.2, "perplexity_ratio": 1.16612},
    "table": "(text table)",
}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tiny_chat):
    """A ROSI output folder of the tiny chat model whose input had a README.md."""
    import torch

    from surgery.directions import Candidate, Directions

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    dfile = Directions([Candidate("response", 1, "reply[0:4]", torch.randn(32, dtype=torch.float64))], 0, "test").save(
        root / "dir.safetensors")
    src = root / "base"
    shutil.copytree(tiny_chat, src)
    (src / "README.md").write_text(BASE_README)
    out = root / "out"
    rosi(str(src), out, alpha=4.0, direction_file=dfile, run_eval=False,
         prompts=PromptConfig(n_train=8, n_val=4))
    update_manifest(out, evaluation=EVALUATION)
    assert verify(out) == []
    return out


@pytest.fixture
def out(tmp_path, released):
    dst = tmp_path / "out"
    shutil.copytree(released, dst)
    return dst


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _rate(r, n):
    return f"{100 * r:.1f}% ({round(r * n)}/{n})"


def _row(text: str, label_start: str) -> list[str]:
    rows = [l for l in text.splitlines() if l.startswith("| " + label_start)]
    assert len(rows) == 1, label_start
    return [c.strip() for c in rows[0].strip("|").split(" | ")]


# -- card ----------------------------------------------------------------------
def test_card_metadata_body_and_verify(out):
    from huggingface_hub import ModelCard

    m = read_manifest(out)
    res = write_card(out)
    text = (out / "README.md").read_text()
    # metadata: parsed independently (yaml) and by huggingface_hub, and round-tripped
    front = yaml.safe_load(text.split("---\n")[1])
    data = ModelCard(text).data.to_dict()
    assert data == front
    assert ModelCard(str(ModelCard(text))).data.to_dict() == data
    assert data["base_model"] == m["input"]["source"] == res.base_model  # a local folder: the recorded source
    assert res.base_model_is_hub_id is False and "not a Hugging Face Hub id" in text
    assert data["base_model_relation"] == "finetune"
    assert data["license"] == "mit" and "base model's card" in res.license_how
    assert data["library_name"] == "transformers"
    assert {"surgery", "safety", "rosi"} <= set(data["tags"])
    body = ModelCard(text).text
    # before/after table: the manifest's numbers
    for name, label in (("harmful", "harmful prompts refused"), ("harmless", "harmless prompts refused"),
                        ("borderline", "borderline prompts refused")):
        n = EVALUATION["before"]["sets"][name]["count"]
        b, a = EVALUATION["before"]["sets"][name]["refusal_rate"], EVALUATION["after"]["sets"][name]["refusal_rate"]
        assert _row(body, label)[1:5] == [str(n), _rate(b, n), _rate(a, n), f"{100 * (a - b):+.1f} points"]
    assert _row(body, "first-token KL")[2:4] == ["0.000", "0.293"]
    assert _row(body, "perplexity on")[2:4] == ["1.000", "1.166"]
    # what was done, datasets, limits, verify, reproduce
    assert "`alpha` | 4" in body and f"layer {m['direction']['layer']}" in body
    assert "harmless inputs are pushed as well" in body  # ROSI is not selective: the card says so
    for ds in m["datasets"].values():
        assert ds["sha256"] in body
    assert "markers(18)" in body and "floor" in body and "±22 points with 20 prompts" in body
    assert "surgery verify" in body
    assert f"surgery rosi {m['input']['source']} -o OUT --alpha 4 --direction direction.safetensors" in body
    assert HARMFUL_REPLY not in text  # example replies are not copied
    # the original card is kept, below ours, without its metadata header
    assert body.index("## Original model card") < body.index(BASE_CARD_BODY.strip())
    assert "language: fr" not in text
    # the card is hashed into the manifest; verify passes; nothing else was rehashed
    m2 = read_manifest(out)
    assert m2["outputs"]["README.md"] == hashlib.sha256((out / "README.md").read_bytes()).hexdigest() == res.sha256
    assert {k: v for k, v in m2["outputs"].items() if k != "README.md"} == m["outputs"]
    assert verify(out) == []
    assert not list(out.glob(".README*"))
    # rewriting the card (CLI) is deterministic and keeps verify passing; a changed card is caught
    r = CliRunner().invoke(cli, ["card", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "README.md").read_text() == text and verify(out) == []
    (out / "README.md").write_text(text + "edited\n")
    problems = verify(out)
    assert len(problems) == 1 and "README.md" in problems[0]


def test_card_refuses_a_folder_that_fails_verify(out):
    shard = next(out.glob("model-*.safetensors"))
    _flip_byte(shard)
    with pytest.raises(ManifestError, match=shard.name):
        write_card(out)
    assert not (out / "README.md").exists()
    r = CliRunner().invoke(cli, ["card", str(out)])
    assert r.exit_code == 2 and shard.name in r.output and len(r.output.strip().splitlines()) == 1


def test_verify_names_a_linked_folder_and_hashes_linked_files(out, tmp_path):
    """`ln -s ../evil out/additional_chat_templates` swapped the chat templates and
    verify said OK: Path.rglob does not descend into a linked folder, so nothing
    read through it was hashed.  A link to a file is hashed by its content (what a
    loader reads; the Hugging Face cache is made of such links)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "default.jinja").write_text("{{ 'pwned' }}")
    (out / "additional_chat_templates").symlink_to(evil, target_is_directory=True)
    assert verify(out) == [f"linked folder: additional_chat_templates (a symlink to {evil}: no hash covers the files "
                           "read through it)"]
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 1 and "linked folder: additional_chat_templates" in r.output
    with pytest.raises(ManifestError, match="linked folder: additional_chat_templates"):
        push(out, "someone/tiny-hardened")
    (out / "additional_chat_templates").unlink()
    # a file replaced by a link to the same bytes still verifies; to other bytes, it is named
    same = tmp_path / "tokenizer.json"
    shutil.move(out / "tokenizer.json", same)
    (out / "tokenizer.json").symlink_to(same)
    assert verify(out) == []
    same.write_text(same.read_text() + " ")
    assert [p.split(" (")[0] for p in verify(out)] == ["changed: tokenizer.json"]


def _gguf(path: Path, license: str, repo: str | None) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_license(license)
    if repo:
        w.add_string("general.source.huggingface.repository", repo)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["hub", "hf_cache_folder", "gguf_with_metadata", "gguf_gone", "override"])
def test_card_base_model_and_license_sources(out, tmp_path, case):
    from huggingface_hub import ModelCard

    kw = {}
    if case == "hub":
        inp = {"kind": "hub", "source": "someone/base-model", "revision": "a" * 40,
               "folder": str(tmp_path / "nowhere")}
        want_base, want_lic = "someone/base-model", None
    elif case == "hf_cache_folder":
        snap = tmp_path / "hub" / "models--org--name" / "snapshots" / ("b" * 40)
        snap.mkdir(parents=True)
        (snap / "config.json").write_text(json.dumps({"license": "apache-2.0"}))
        inp = {"kind": "folder", "source": str(snap), "folder": str(snap)}
        want_base, want_lic = "org/name", "apache-2.0"
    elif case == "gguf_with_metadata":
        g = _gguf(tmp_path / "m.gguf", "llama3.2", "org/from-gguf")
        inp = {"kind": "gguf", "source": "m.gguf", "folder": str(tmp_path / "converted"), "gguf_file": str(g)}
        want_base, want_lic = "org/from-gguf", "llama3.2"
    elif case == "gguf_gone":
        inp = {"kind": "gguf", "source": "smollm2", "folder": str(tmp_path / "gone"),
               "gguf_file": str(tmp_path / "gone.gguf")}
        want_base, want_lic = "smollm2", None
    else:
        inp = {"kind": "gguf", "source": "smollm2", "folder": str(tmp_path / "gone")}
        kw = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
        want_base, want_lic = kw["base_model"], kw["license"]
    update_manifest(out, input=inp)
    res = write_card(out, **kw)
    text = (out / "README.md").read_text()
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == want_base and data.get("license") == want_lic
    assert res.base_model_is_hub_id == (want_base != "smollm2")
    if want_lic is None:
        assert "license" not in data and "**Licence**: not declared" in text
    assert "## Original model card" not in text  # the base card is only where the manifest says the input was
    assert verify(out) == []
    if case == "override":
        assert "`apache-2.0`, given with --license when this card was written" in text
    if case == "override":  # written again without the options: what was given stays (it was dropped)
        again = write_card(out)
        assert (again.base_model, again.license) == (want_base, want_lic)
        assert write_card(out, license="mit").license == "mit" and write_card(out).license == "mit"


def test_card_without_evaluation_says_so(out):
    update_manifest(out, evaluation=None)
    write_card(out)
    text = (out / "README.md").read_text()
    assert "No evaluation was recorded" in text and "| metric |" not in text


def test_card_rejects_a_base_model_that_is_not_a_hub_id(out):
    with pytest.raises(SurgeryError, match="not a Hub id"):
        write_card(out, base_model="../local/path")


# -- push ----------------------------------------------------------------------
class FakeHub:
    """Answers like the Hub for the endpoints a folder upload uses; records every request."""

    def __init__(self):
        self.requests = []
        self.fail_create = None
        self.remote: list[str] = [".gitattributes"]  # the files the repo holds (any revision)
        self.on_commit = None  # called when a commit arrives (e.g. to change a file mid-upload)

    def handle(self, request):
        import httpx2

        body = request.read()
        self.requests.append({"method": request.method, "path": request.url.path, "query": str(request.url.query),
                              "url": str(request.url), "headers": dict(request.headers), "body": body})
        path, parts = request.url.path, request.url.path.strip("/").split("/")
        if request.method == "POST" and path == "/api/repos/create":
            if self.fail_create:
                return httpx2.Response(self.fail_create, json={"error": "You don't have the rights to create a model"})
            p = json.loads(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{p['organization']}/{p['name']}"})
        if request.method == "GET" and parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            return httpx2.Response(200, json=[{"type": "file", "path": f, "size": 1, "oid": "0" * 40}
                                              for f in self.remote])
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6:
            repo, op, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if op == "branch":
                return httpx2.Response(200, json={})
            if op == "preupload":
                files = json.loads(body)["files"]
                return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                             "shouldIgnore": False, "oid": None} for f in files]})
            if op == "commit":
                if self.on_commit:
                    self.on_commit()
                oid = hashlib.sha1(body).hexdigest()
                return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{oid}",
                                                  "commitOid": oid, "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": f"not found: {path}"}, headers={"X-Error-Code": "RepoNotFound"})


@pytest.fixture
def hub(monkeypatch):
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    fake = FakeHub()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle),
                                             event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True))
    hf_logger = logging.getLogger("huggingface_hub")
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda rec: records.append(rec.getMessage())
    old_level = hf_logger.level
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.DEBUG)
    fake.log = records
    try:
        yield fake
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(old_level)
        set_client_factory(default_client_factory)


def _sent(hub: FakeHub) -> list[dict]:
    return [r for r in hub.requests if r["path"] != LIBRARY_TELEMETRY]


def _commit_ops(req: dict, deleted: list | None = None) -> tuple[dict, dict[str, bytes]]:
    lines = [json.loads(l) for l in req["body"].decode().splitlines() if l.strip()]
    header = [l["value"] for l in lines if l["key"] == "header"]
    assert len(header) == 1
    files = {}
    for l in lines:
        if l["key"] == "file":
            assert l["value"]["encoding"] == "base64"
            files[l["value"]["path"]] = base64.b64decode(l["value"]["content"])
        elif l["key"] == "deletedFile" and deleted is not None:
            deleted.append(l["value"]["path"])
        else:
            assert l["key"] == "header", l["key"]  # no LFS pointers, no deletions unless asked for
    return header[0], files


def _assert_token_hygiene(hub: FakeHub, *texts: str):
    for r in hub.requests:
        # the token travels only as the Authorization header, and only to the repo endpoints
        # (huggingface_hub also GETs /api/agent-harnesses, unauthenticated, once a day)
        auth = r["headers"].get("authorization")
        assert auth == f"Bearer {TOKEN}" if r["path"] != LIBRARY_TELEMETRY else auth is None
        assert TOKEN.encode() not in r["body"] and TOKEN not in r["url"]
    assert not any(TOKEN in msg for msg in hub.log)
    assert hub.log  # the hub's debug log did record the requests
    for t in texts:
        assert TOKEN not in t


def test_push_creates_repo_and_commits_exactly_the_folder(out, hub, capsys):
    write_card(out, base_model="someone/tiny-base")
    manifest_sha = hashlib.sha256((out / "surgery.json").read_bytes()).hexdigest()
    r = CliRunner().invoke(cli, ["push", str(out), "someone/tiny-hardened", "--private"])
    assert r.exit_code == 0, r.output
    creates = [q for q in hub.requests if q["path"] == "/api/repos/create"]
    assert len(creates) == 1
    assert json.loads(creates[0]["body"]) == {"name": "tiny-hardened", "organization": "someone",
                                              "visibility": "private", "type": "model"}
    commits = [q for q in hub.requests if "/commit/" in q["path"]]
    assert len(commits) == 1 and commits[0]["path"] == "/api/models/someone/tiny-hardened/commit/main"
    header, files = _commit_ops(commits[0])
    assert "rosi" in header["summary"] and manifest_sha in header["summary"]
    on_disk = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(files) == set(on_disk) and {"README.md", "surgery.json"} <= set(files)
    assert files == on_disk  # byte for byte
    pre = [q for q in hub.requests if "/preupload/" in q["path"]]
    assert {f["path"] for q in pre for f in json.loads(q["body"])["files"]} == set(on_disk)
    assert {q["path"] for q in hub.requests} - {LIBRARY_TELEMETRY} == {
        "/api/repos/create", "/api/validate-yaml", commits[0]["path"], "/api/models/someone/tiny-hardened/preupload/main",
        "/api/models/someone/tiny-hardened/tree/main"}
    assert "https://huggingface.co/someone/tiny-hardened" in r.output
    _assert_token_hygiene(hub, r.output, capsys.readouterr().out)
    assert verify(out) == []  # pushing leaves the folder as it was


def test_push_public_to_a_branch(out, hub):
    res = push(out, "someone/tiny-hardened", revision="hardened")
    creates = [q for q in hub.requests if q["path"] == "/api/repos/create"]
    assert len(creates) == 1 and json.loads(creates[0]["body"])["visibility"] == "public"
    assert [q["path"] for q in hub.requests if "/branch/" in q["path"]] == ["/api/models/someone/tiny-hardened/branch/hardened"]
    commits = [q for q in hub.requests if "/commit/" in q["path"]]
    assert [c["path"] for c in commits] == ["/api/models/someone/tiny-hardened/commit/hardened"]
    assert res.commit_oid == hashlib.sha1(commits[0]["body"]).hexdigest()
    assert res.files == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "README.md" not in res.files  # no card written in this test: pushed anyway, with a note
    _assert_token_hygiene(hub)


def test_push_replaces_what_the_repo_held(out, hub):
    """A second version pushed to a repo holding an earlier one: the commit deletes the
    files this folder does not have (old shards beside the new manifest made a
    download fail verify); .gitattributes stays."""
    write_card(out, base_model="someone/tiny-base")
    hub.remote = [".gitattributes", "model-00001-of-00002.safetensors", "opening_gate.safetensors", "README.md"]
    push(out, "someone/tiny-hardened")
    deleted: list[str] = []
    _, files = _commit_ops(next(q for q in hub.requests if "/commit/" in q["path"]), deleted)
    assert sorted(deleted) == ["model-00001-of-00002.safetensors", "opening_gate.safetensors"]
    assert "README.md" in files


def test_push_refuses_a_card_whose_base_model_is_not_a_hub_id(out, hub):
    write_card(out, base_model="someone/base")
    update_manifest(out, card={**read_manifest(out)["card"], "base_model": "tiny"})
    with pytest.raises(SurgeryError, match="base_model 'tiny' is not a Hub id"):
        push(out, "someone/tiny-hardened")
    assert _sent(hub) == []


def test_push_refuses_a_folder_that_fails_verify(out, hub):
    write_card(out, base_model="someone/tiny-base")
    shard = next(out.glob("model-*.safetensors"))
    _flip_byte(shard)
    r = CliRunner().invoke(cli, ["push", str(out), "someone/tiny-hardened"])
    assert r.exit_code == 2 and shard.name in r.output and len(r.output.strip().splitlines()) == 1
    assert _sent(hub) == []
    (out / "stray.txt").write_text("x")
    _flip_byte(shard)
    with pytest.raises(ManifestError, match="stray.txt"):
        push(out, "someone/tiny-hardened")
    assert _sent(hub) == []


def test_push_fails_when_a_file_changes_during_the_upload(out, hub):
    """The upload reads the files after the verify: a file changed meanwhile is named, with the commit."""
    write_card(out, base_model="someone/tiny-base")
    shard = next(out.glob("model-*.safetensors"))
    hub.on_commit = lambda: _flip_byte(shard)
    r = CliRunner().invoke(cli, ["push", str(out), "someone/tiny-hardened"])
    assert r.exit_code == 2, r.output
    assert "changed while it was being uploaded" in r.output and shard.name in r.output and "push again" in r.output
    assert "/commit/" in r.output and r.output.strip().splitlines()[-1].startswith("error: ")


def test_push_hub_error_is_one_line_without_the_token(out, hub):
    write_card(out, base_model="someone/tiny-base")
    hub.fail_create = 403
    r = CliRunner().invoke(cli, ["push", str(out), "someone/tiny-hardened"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: creating someone/tiny-hardened") and len(r.output.strip().splitlines()) == 1
    assert not [q for q in hub.requests if "/commit/" in q["path"]]
    _assert_token_hygiene(hub, r.output)


def test_push_needs_a_token_and_a_resumable_uploader_for_large(out, hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
    with pytest.raises(SurgeryError, match="--large needs"):
        push(out, "someone/tiny-hardened", large=True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SurgeryError, match="no Hugging Face token"):
        push(out, "someone/tiny-hardened")
    with pytest.raises(SurgeryError, match="bad repo id"):
        push(out, "not a/valid//id")
    assert _sent(hub) == []


@pytest.mark.parametrize("params,expect", [
    # a current manifest: every fit parameter as recorded
    ({"fit": "ridge", "rank": 1, "post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "cascade": True},
     {"fit": "ridge", "rank": 1, "post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "cascade": True}),
    # a manifest from before the harmful weight and the cascade: those were 0 and one-shot, not today's defaults
    ({"fit": "ridge", "rank": 1, "post_weight": 30.0, "ridge": 0.1},
     {"fit": "ridge", "rank": 1, "post_weight": 30.0, "ridge": 0.1, "harmful_weight": 0.0, "cascade": False}),
    ({"fit": "null", "rank": 2, "null_ratio": 0.3, "cascade": False},
     {"fit": "null", "rank": 2, "null_ratio": 0.3, "cascade": False}),
])
def test_rebuilt_inject_command_pins_every_fit_parameter(params, expect):
    """Without a recorded command line the card rebuilds one from the parameters;
    parsed by the real CLI it must give back the recorded fit, whatever today's
    defaults are."""
    import shlex

    from surgery.release.card import _reproduce

    m = {"method": {"name": "gated-injection", "parameters": {"alpha": 1.75, "layers": "all", **params}},
         "input": {"source": "smollm2"}, "direction": {"file": "direction.safetensors"}}
    text = "\n".join(_reproduce(m))
    line = next(l for l in text.splitlines() if l.startswith("surgery inject"))
    ctx = cli.commands["inject"].make_context("inject", shlex.split(line)[2:])
    for k, v in {"alpha": 1.75, "gate": "linear", **expect}.items():
        assert ctx.params[k] == v, (k, line)


def test_rebuilt_inject_command_for_the_opening_gate():
    """The opening gate's rebuilt command gives back its recorded parameters, and no --direction."""
    import shlex

    from surgery.release.card import _reproduce

    params = {"alpha": 1.25, "layer": 3, "opening": "I'm sorry, but", "refusal": "I'm sorry, but no.",
              "coverage": 0.9, "post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "continuation": 16}
    m = {"method": {"name": "gated-opening", "parameters": params}, "input": {"source": "smollm2"}, "direction": None}
    line = next(l for l in "\n".join(_reproduce(m)).splitlines() if l.startswith("surgery inject"))
    ctx = cli.commands["inject"].make_context("inject", shlex.split(line)[2:])
    assert ctx.params["direction_file"] is None and ctx.params["gate"] == "opening"
    for k, v in {"alpha": 1.25, "opening_layer": 3, "opening": "I'm sorry, but", "refusal": "I'm sorry, but no.",
                 "coverage": 0.9, "post_weight": 10.0, "ridge": 0.01, "harmful_weight": 3.0, "continuation": 16}.items():
        assert ctx.params[k] == v, (k, line)


def test_card_sweep_table_shows_borderline_when_measured(out):
    """A sweep that measured borderline over-refusal gets its own column, with
    the counts of the borderline validation set; one that did not keeps four columns."""
    from surgery.release.card import build_card

    m = read_manifest(out)
    sweep = [{"value": 0.0, "harmful_refusal": 0.025, "harmless_refusal": 0.0, "borderline_refusal": 0.0, "kl": 0.0},
             {"value": 4.0, "harmful_refusal": 0.5, "harmless_refusal": 0.1, "borderline_refusal": 0.25, "kl": 0.2}]
    m["method"]["parameters"].update(sweep=sweep, alpha=4.0)
    m["datasets"].update({"sweep_harmful_val": {"count": 40}, "sweep_harmless_val": {"count": 40},
                          "sweep_borderline_val": {"count": 20}})
    text = build_card(m)[0].text
    assert "| alpha | harmful refused | harmless refused | borderline refused | first-token KL |" in text
    assert _row(text, "**4** (chosen)") == ["**4** (chosen)", _rate(0.5, 40), _rate(0.1, 40), _rate(0.25, 20), "0.200"]
    for p in sweep:
        del p["borderline_refusal"]
    text = build_card(m)[0].text
    assert "| alpha | harmful refused | harmless refused | first-token KL |" in text
