"""Tests for surgery.prompts: built-in sets, loaders, hashing, subsets, chat formatting.
Nothing here touches the network: the Hub download is monkeypatched and the
tokenizer is built in memory."""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest

import surgery.prompts as sp
from surgery.errors import PromptError, SurgeryError
from surgery.prompts import PromptSet, builtin, format_chat, load_prompts, refusal_texts

DATA = Path(sp.__file__).parent / "data"
EXPECTED = {"harmful": (410, {"train": 330, "val": 40, "test": 40}),
            "harmless": (400, {"train": 320, "val": 40, "test": 40}),
            "borderline": (240, {"train": 160, "val": 40, "test": 40})}
# Row blocks of each file (see data/README.md, "Split rule"): (start, end, split cycle).
# The first block of harmful/harmless and the first borderline block carry val and
# test; every later block was appended as train-only, leaving earlier rows unchanged.
CYCLE5 = ["train"] * 3 + ["val", "test"]
BLOCKS = {"harmful": [(0, 200, CYCLE5), (200, 410, ["train"])],
          "harmless": [(0, 200, CYCLE5), (200, 400, ["train"])],
          "borderline": [(0, 80, ["val", "test"]), (80, 160, ["train"]), (160, 240, ["train"])]}
# SHA-256 of builtin(name, split).prompts for val and test, computed before the
# train-only blocks harmful-201.., harmless-201.. and borderline-161.. were added.
# Appending train rows must never change these.
PINNED = {("harmful", "val"): "224ceffaa906dbcc2d7aaa21cc50ca12b99349f79e58e87fc333eb8629681b7f",
          ("harmful", "test"): "3f63052e9cc323ece6454235227841737846be112f9e62018f9d57aa3f4cbd5a",
          ("harmless", "val"): "5102b0431e567f479e8b340d9ef5680c40671bdde5c36e64eb398f8c0df83c80",
          ("harmless", "test"): "cd5359fd6181ed3b06e8cda8fb2fc6a000d32bcafa74def57d7e179d5b08c961",
          ("borderline", "val"): "b1bde513291bdcbd2c22d0376d78ebf04a28b22b524f029436f1afb35ed8b125",
          ("borderline", "test"): "eb374aede12b83e51f2a93355adf9007be62f414e9c3fccb04c35655969cd972"}


def rows(name):
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --------------------------------------------------------------------------- built-in data


@pytest.mark.parametrize("name", list(EXPECTED))
def test_builtin_counts_and_schema(name):
    total, splits = EXPECTED[name]
    rs = rows(name)
    assert len(rs) == total
    for r in rs:
        assert set(r) == {"id", "prompt", "category", "split"}
        assert isinstance(r["prompt"], str) and r["prompt"] == r["prompt"].strip() and r["prompt"]
        assert r["split"] in splits
    assert [r["id"] for r in rs] == [f"{name}-{i:03d}" for i in range(1, total + 1)]
    assert collections.Counter(r["split"] for r in rs) == splits
    ps = builtin(name)
    assert len(ps) == total and ps.source == f"builtin:{name}"
    assert ps.categories == tuple(r["category"] for r in rs)
    for split, count in splits.items():
        part = builtin(name, split)
        assert len(part) == count and part.source == f"builtin:{name}[{split}]"
        assert len(set(part.categories)) == len(set(ps.categories))  # stratified: every category in every split


def test_builtin_categories():
    harmful = collections.Counter(r["category"] for r in rows("harmful"))
    harmless = collections.Counter(r["category"] for r in rows("harmless"))
    borderline = collections.Counter(r["category"] for r in rows("borderline"))
    assert len(harmful) == 14 and all(29 <= c <= 30 for c in harmful.values())
    assert len(harmless) == 20 and set(harmless.values()) == {20}
    assert len(borderline) == 8 and set(borderline.values()) == {30}
    by_split = collections.Counter((r["category"], r["split"]) for r in rows("borderline"))
    assert len(by_split) == 8 * 3  # every kind in every split
    assert all(by_split[(c, "train")] == 20 and by_split[(c, "val")] == 5 and by_split[(c, "test")] == 5
               for c in borderline)
    # the later train-only blocks: 15 per harmful category, 10 per harmless topic and borderline kind
    for name, start, per in [("harmful", 200, 15), ("harmless", 200, 10), ("borderline", 80, 10), ("borderline", 160, 10)]:
        end = next(e for s, e, _ in BLOCKS[name] if s == start)
        block = collections.Counter(r["category"] for r in rows(name)[start:end])
        assert set(block.values()) == {per} and len(block) == len(set(r["category"] for r in rows(name))), (name, start)


def test_split_rule_matches_readme():
    """The documented rule: group by category (file order), order by sha256 of the
    prompt, then train/train/train/val/test cyclically.  Each file is made of
    blocks that follow the rule on their own: harmful and harmless rows 1-200
    (train/val/test) and rows 201-410 / 201-400 (added later, all train);
    borderline rows 1-80 (val/test), rows 81-160 and rows 161-240 (added later,
    all train)."""
    for name, blocks in BLOCKS.items():
        all_rows = rows(name)
        file_cats = list(dict.fromkeys(r["category"] for r in all_rows))
        assert blocks[0][0] == 0 and blocks[-1][1] == len(all_rows), name
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])), name  # contiguous, covering the file
        for start, end, cycle in blocks:
            rs = all_rows[start:end]
            cats = list(dict.fromkeys(r["category"] for r in rs))
            assert cats == file_cats, (name, start)  # same category order in every block
            ordered = []
            for c in cats:
                ordered += sorted((r for r in rs if r["category"] == c),
                                  key=lambda r: hashlib.sha256(r["prompt"].encode()).hexdigest())
            assert ordered == rs, (name, start)
            assert [r["split"] for r in rs] == [cycle[k % len(cycle)] for k in range(len(rs))], (name, start)


@pytest.mark.parametrize("name,split", sorted(PINNED))
def test_val_and_test_splits_are_pinned(name, split):
    """Appending train-only blocks must leave the val and test prompts, their
    order and their hashes exactly as they were."""
    part = builtin(name, split)
    assert part.sha256 == PINNED[(name, split)]
    assert hashlib.sha256("\n".join(part.prompts).encode("utf-8")).hexdigest() == PINNED[(name, split)]
    first_block_end = BLOCKS[name][0][1]  # val and test rows all live in the first block
    assert all(int(r["id"].rsplit("-", 1)[1]) <= first_block_end for r in rows(name) if r["split"] == split)


def test_no_duplicate_prompts_within_or_across_sets():
    seen = {}
    for name in EXPECTED:
        for r in rows(name):
            key = " ".join(r["prompt"].lower().split())
            assert key not in seen, (r["id"], seen.get(key))
            seen[key] = r["id"]


def test_length_distributions_are_similar():
    mean = lambda xs: sum(xs) / len(xs)
    harmful = mean([len(p.split()) for p in builtin("harmful")])
    harmless = mean([len(p.split()) for p in builtin("harmless")])
    assert abs(harmful - harmless) < 3


def test_builtin_errors():
    with pytest.raises(PromptError) as e:
        builtin("evil")
    assert_one_line_error(e, "harmful", "harmless", "borderline")
    with pytest.raises(PromptError) as e:
        builtin("harmful", "dev")
    assert_one_line_error(e, "train", "val", "test")
    assert issubclass(PromptError, SurgeryError)


def test_builtin_missing_split(monkeypatch):
    """A built-in set without the asked split names the splits it has."""
    assert len(builtin("borderline", "train")) == 160  # borderline has a train split now
    monkeypatch.setattr(sp, "_builtin_rows", lambda name: (("p1", "c", "val"), ("p2", "c", "test")))
    with pytest.raises(PromptError) as e:
        builtin("borderline", "train")
    assert_one_line_error(e, "borderline", "train", "test", "val")


def test_refusal_texts():
    r = refusal_texts()
    assert len(r) == 40 and len(set(r)) == 40
    assert r[0] == "I'm sorry, but I can't help with that request."
    assert all(t == t.strip() and t and "{" not in t and "[" not in t for t in r)
    openings = ("I'm sorry", "I can't", "I won't", "Sorry, I", "I'm not able to", "I cannot")
    for opening in openings:
        assert any(t.startswith(opening) for t in r), opening
    r.append("x")
    assert len(refusal_texts()) == 40  # a fresh list each call


# --------------------------------------------------------------------------- PromptSet


def test_promptset_basics():
    ps = PromptSet.from_prompts(["a", "b", "c"], "mem")
    assert len(ps) == 3 and list(ps) == ["a", "b", "c"] and ps[1] == "b"
    assert ps.sha256 == hashlib.sha256(b"a\nb\nc").hexdigest()
    assert ps.describe() == {"source": "mem", "count": 3, "sha256": ps.sha256}
    assert PromptSet(("a", "b", "c"), "mem", "").sha256 == ps.sha256
    with pytest.raises(ValueError):
        PromptSet(("a",), "mem", "0" * 64)
    with pytest.raises(ValueError):
        PromptSet(("a",), "mem", "", ("x", "y"))
    with pytest.raises(Exception):
        ps.source = "other"  # frozen


def test_subset_deterministic():
    ps = builtin("harmful", "train")
    a, b = ps.subset(32, seed=1), ps.subset(32, seed=1)
    assert a == b and len(a) == 32
    assert a.prompts != ps.subset(32, seed=2).prompts
    # original order kept, categories follow their prompts
    idx = [ps.prompts.index(p) for p in a]
    assert idx == sorted(idx)
    assert a.categories == tuple(ps.categories[i] for i in idx)
    assert set(ps.subset(31, seed=1)) < set(a)
    assert a.sha256 == hashlib.sha256("\n".join(a).encode()).hexdigest()
    assert "builtin:harmful[train]" in a.source and "seed=1" in a.source
    assert ps.subset(len(ps)) is ps and ps.subset(10_000) is ps
    with pytest.raises(PromptError):
        ps.subset(0)


# --------------------------------------------------------------------------- local files

PROMPTS = ["How do I bake bread?", "Explain gravity, briefly.", 'Say "hi" to me']


def write_all_formats(tmp: Path) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = tmp / "p.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    paths["json"] = tmp / "p.json"
    paths["json"].write_text(json.dumps([{"instruction": p} for p in PROMPTS]))
    paths["csv"] = tmp / "p.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "goal"])
        for i, p in enumerate(PROMPTS):
            w.writerow([i, p])
    paths["txt"] = tmp / "p.txt"
    paths["txt"].write_text("\n".join(PROMPTS) + "\n\n")
    paths["strings.jsonl"] = tmp / "s.jsonl"
    paths["strings.jsonl"].write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    paths["strings.json"] = tmp / "s.json"
    paths["strings.json"].write_text(json.dumps(PROMPTS))
    return paths


def test_every_format_same_sha(tmp_path):
    paths = write_all_formats(tmp_path)
    expected = hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()
    for kind, path in paths.items():
        ps = load_prompts(str(path))
        assert ps.prompts == tuple(PROMPTS), kind
        assert ps.sha256 == expected, kind
        assert ps.source == str(path)
    assert load_prompts(paths["txt"]).sha256 == expected  # a Path works too


def test_column_selection(tmp_path):
    p = tmp_path / "multi.jsonl"
    p.write_text(
        json.dumps({"question": "q1", "text": "t1", "category": "c1"}) + "\n"
        + json.dumps({"question": "q2", "text": "t2", "category": "c2"}) + "\n"
    )
    ps = load_prompts(str(p))  # "text" comes before "question" in the default order
    assert ps.prompts == ("t1", "t2") and ps.categories == ("c1", "c2")
    assert load_prompts(str(p), column="question").prompts == ("q1", "q2")
    c = tmp_path / "multi.csv"
    c.write_text("question,answer\nWhat is 2+2?,4\n\"Why, though?\",because\n")
    assert load_prompts(str(c)).prompts == ("What is 2+2?", "Why, though?")
    assert load_prompts(str(c), column="answer").prompts == ("4", "because")
    assert load_prompts(str(c)).categories is None


def test_split_and_limit_on_local_jsonl(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "split": "val" if i % 2 else "train"}) + "\n" for i in range(6)))
    val = load_prompts(str(p), split="val")
    assert val.prompts == ("p1", "p3", "p5") and val.source == f"{p}[val]"
    assert load_prompts(val.source) == val  # the source string loads back
    assert load_prompts(str(p), limit=2).prompts == ("p0", "p1")
    with pytest.raises(PromptError) as e:
        load_prompts(str(p), split="test")
    assert_one_line_error(e, str(p), "test", "train", "val")
    with pytest.raises(PromptError) as e:
        load_prompts(str(write_all_formats(tmp_path)["txt"]), split="val")
    assert_one_line_error(e, "split")
    with pytest.raises(PromptError):
        load_prompts(str(p), limit=0)


def test_empty_prompts_skipped(tmp_path):
    p = tmp_path / "gaps.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": "  "}\n\n{"prompt": null}\n{"prompt": " b "}\n')
    assert load_prompts(str(p)).prompts == ("a", "b")


def test_builtin_sources():
    assert load_prompts("builtin:harmful") == builtin("harmful")
    assert load_prompts("builtin:harmless:val") == builtin("harmless", "val")
    assert load_prompts("builtin:borderline[test]") == builtin("borderline", "test")
    assert load_prompts("builtin:borderline:train") == builtin("borderline", "train")
    assert load_prompts("builtin:harmful", split="test") == builtin("harmful", "test")
    assert len(load_prompts("builtin:harmful:train", limit=5)) == 5
    for bad in ["builtin:nope", "builtin:harmful:dev", "builtin:"]:
        with pytest.raises(PromptError):
            load_prompts(bad)
    with pytest.raises(PromptError):
        load_prompts("builtin:harmful:val", split="test")


@pytest.mark.parametrize(
    "name, content, needles",
    [
        ("empty.jsonl", "", ["empty.jsonl", "empty"]),
        ("blank.txt", "\n  \n", ["blank.txt"]),
        ("empty.json", "[]", ["empty.json"]),
        ("empty.csv", "", ["empty.csv"]),
        ("header.csv", "prompt\n", ["header.csv", "header"]),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', ["bad.jsonl", "line 2", "JSON"]),
        ("bad.json", '[{"prompt": "a"},\n oops]', ["bad.json", "line 2"]),
        ("dict.json", '{"prompt": "a"}', ["dict.json", "list"]),
        ("nocol.jsonl", '{"body": "a", "id": 1}\n', ["nocol.jsonl", "body", "id", "column"]),
        ("nocol.csv", "body,id\nhello,1\n", ["nocol.csv", "body", "id"]),
        ("allempty.jsonl", '{"prompt": ""}\n{"prompt": "   "}\n', ["allempty.jsonl", "empty"]),
        ("allempty.csv", "prompt,id\n,1\n  ,2\n", ["allempty.csv", "empty"]),
        ("number.jsonl", '{"prompt": "a"}\n{"prompt": 5}\n', ["number.jsonl", "line 2", "prompt"]),
        ("missing.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', ["missing.jsonl", "line 2", "prompt"]),
        ("list.jsonl", '["a", "b"]\n', ["list.jsonl", "line 1"]),
        ("notes.md", "hello\n", ["notes.md", ".md"]),
        ("latin1.txt", "caf\xe9\n".encode("latin-1"), ["latin1.txt", "UTF-8"]),
    ],
)
def test_file_errors(tmp_path, name, content, needles):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptError) as e:
        load_prompts(str(p))
    assert_one_line_error(e, *needles)


def test_column_errors(tmp_path):
    paths = write_all_formats(tmp_path)
    with pytest.raises(PromptError) as e:
        load_prompts(str(paths["jsonl"]), column="nope")
    assert_one_line_error(e, "p.jsonl", "nope", "id", "prompt")
    with pytest.raises(PromptError) as e:
        load_prompts(str(paths["csv"]), column="nope")
    assert_one_line_error(e, "p.csv", "id", "goal")
    # bare strings have no columns: --column names the column of the other files given with them
    assert load_prompts(str(paths["txt"]), column="goal").prompts == load_prompts(str(paths["txt"])).prompts
    with pytest.raises(PromptError) as e:
        load_prompts("builtin:harmful", column="goal")
    assert_one_line_error(e, "goal")


def test_missing_sources(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("must not contact the Hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", boom)
    for src in [str(tmp_path / "nope.jsonl"), str(tmp_path / "a" / "b" / "c"), "nope.csv", "rel/dir/nope.txt"]:
        with pytest.raises(PromptError) as e:
            load_prompts(src)
        assert_one_line_error(e, src)
    for src in ["", "hf://models/a/b", "hf://datasets/onlyname", "not a source"]:
        with pytest.raises(PromptError):
            load_prompts(src)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1")
    with pytest.raises(PromptError) as e:
        load_prompts(str(p))
    assert_one_line_error(e, "x.parquet", "pyarrow")


def test_local_folder(tmp_path):
    (tmp_path / "train.txt").write_text("a\nb\n")
    (tmp_path / "test.txt").write_text("c\n")
    assert load_prompts(str(tmp_path)).prompts == ("a", "b")
    assert load_prompts(str(tmp_path), split="test").prompts == ("c",)


# --------------------------------------------------------------------------- Hub datasets


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    calls = []
    root = tmp_path / "snapshot"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train-00000.jsonl").write_text(
        json.dumps({"goal": "g1", "target": "t"}) + "\n" + json.dumps({"goal": "g2", "target": "t"}) + "\n")
    (root / "data" / "test-00000.jsonl").write_text(json.dumps({"goal": "g3", "target": "t"}) + "\n")
    (root / "data" / "test-00000.csv").write_text("goal\nduplicate in another format\n")
    (root / "dataset_info.json").write_text("{}")
    (root / ".cache").mkdir()
    (root / ".cache" / "junk.txt").write_text("ignored\n")

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if repo_id == "owner/missing":
            raise RuntimeError("404 Client Error: Repository Not Found\nmore detail")
        return str(root)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    return calls, root


def test_hub_dataset(fake_hub):
    calls, root = fake_hub
    ps = load_prompts("owner/data")
    assert ps.prompts == ("g1", "g2") and ps.source == "hf://datasets/owner/data:train"
    repo_id, kwargs = calls[-1]
    assert repo_id == "owner/data" and kwargs["repo_type"] == "dataset"
    assert set(kwargs["allow_patterns"]) == {"*.jsonl", "*.json", "*.csv", "*.txt", "*.parquet"}
    test = load_prompts("hf://datasets/owner/data", split="test")
    assert test.prompts == ("g3",) and test.source == "hf://datasets/owner/data:test"
    assert load_prompts("hf://datasets/owner/data:test") == test
    assert load_prompts(test.source) == test  # the source string loads back
    assert load_prompts("owner/data:test") == test
    assert load_prompts("owner/data", column="target", limit=1).prompts == ("t",)


def test_hub_errors(fake_hub):
    with pytest.raises(PromptError) as e:
        load_prompts("owner/data", split="validation")
    assert_one_line_error(e, "owner/data", "validation", "train-00000.jsonl")
    with pytest.raises(PromptError) as e:
        load_prompts("owner/data", column="nope")
    assert_one_line_error(e, "train-00000.jsonl", "goal", "target")
    with pytest.raises(PromptError) as e:
        load_prompts("owner/missing")
    assert_one_line_error(e, "owner/missing", "Not Found")


def test_hub_all_files_when_no_train(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("x\ny\n")
    monkeypatch.setattr(sp, "snapshot_download", lambda repo_id, **k: str(tmp_path))
    ps = load_prompts("someone/prompts")
    assert ps.prompts == ("x", "y") and ps.source == "hf://datasets/someone/prompts"


def test_hub_empty_snapshot(tmp_path, monkeypatch):
    (tmp_path / "README.md").write_text("no data")
    monkeypatch.setattr(sp, "snapshot_download", lambda repo_id, **k: str(tmp_path))
    with pytest.raises(PromptError) as e:
        load_prompts("someone/empty")
    assert_one_line_error(e, "someone/empty")


# --------------------------------------------------------------------------- format_chat

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, "hello": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]")


def test_format_chat_chatml(tokenizer):
    tokenizer.chat_template = CHATML
    assert format_chat(tokenizer, "Hi there") == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert format_chat(tokenizer, "Hi there", system="Be safe.") == (
        "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    out = format_chat(tokenizer, "Hi there", response="I'm sorry, but I can't help with that request.")
    assert out == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nI'm sorry, but I can't help with that request."
    )


def test_format_chat_system_fallback(tokenizer):
    tokenizer.chat_template = NO_SYSTEM
    assert format_chat(tokenizer, "Hi") == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert format_chat(tokenizer, "Hi", system="Be safe.", response="Sure") == (
        "<bos><start_of_turn>user\nBe safe.\n\nHi<end_of_turn>\n<start_of_turn>model\nSure"
    )


def test_format_chat_without_template(tokenizer):
    tokenizer.chat_template = None
    tokenizer.name_or_path = "tiny/base-model"
    with pytest.raises(PromptError) as e:
        format_chat(tokenizer, "Hi")
    assert_one_line_error(e, "tiny/base-model", "chat template")


def test_format_chat_broken_template(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('template is broken') }}"
    with pytest.raises(PromptError) as e:
        format_chat(tokenizer, "Hi")
    assert_one_line_error(e, "template is broken")


def test_prompts_keep_unicode_line_separators(tmp_path):
    """U+2028 (which json.dumps(ensure_ascii=False) leaves unescaped), form feeds and
    vertical tabs are characters of a prompt, not line breaks, in JSONL, TXT and CSV."""
    import json as _json

    odd = "first part\u2028second part\x0cthird\x0bfourth"
    (tmp_path / "p.jsonl").write_text(_json.dumps({"prompt": odd}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "p.txt").write_text(odd + "\r\nnext prompt\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text('prompt\n"' + odd + '"\n"with\nnewline"\n', encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.jsonl")).prompts == (odd,)
    assert load_prompts(str(tmp_path / "p.txt")).prompts == (odd, "next prompt")
    assert load_prompts(str(tmp_path / "p.csv")).prompts == (odd, "with\nnewline")


def test_repeated_prompts_are_kept_with_a_warning(tmp_path, caplog):
    import logging

    f = tmp_path / "p.txt"
    f.write_text("a b c\nd e f\na b c\na b c\n")
    with caplog.at_level(logging.WARNING):
        assert load_prompts(str(f)).prompts == ("a b c", "d e f", "a b c", "a b c")
    assert "2 prompts repeat an earlier one" in caplog.text
