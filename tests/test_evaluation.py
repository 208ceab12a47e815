"""gma6.evaluation on a tiny Gemma 3 with a word tokenizer: rows, the fresh-memory invariant, outputs."""

from __future__ import annotations

import json
import re
import zlib

import pytest
import torch

from gma6 import GMA6Config, attach_memory
from gma6.data import generate_samples
from gma6.episodes import encode_episode
from gma6.evaluation import (
    ROW_KEYS,
    SCHEMA_KEYS,
    answer_text,
    evaluate,
    format_table,
    last_segment_prompt,
    merge_results,
    save_results,
)

from conftest import tiny_gemma3

SMALL = dict(num_slots=4, memory_dim=16, num_heads=2)
VOCAB = 64


class WordTokenizer:
    """Words and punctuation to ids ``3 + crc32(word) % (vocab - 3)``; 0 pad, 1 BOS, 2 EOS."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, vocab: int = VOCAB) -> None:
        self.vocab = vocab
        self.words: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            i = 3 + zlib.crc32(w.encode()) % (self.vocab - 3)
            self.words.setdefault(i, w)
            ids.append(i)
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(self.words.get(int(i), f"w{int(i)}") for i in ids if int(i) > 2 or not skip_special_tokens)


def _answers(result, system):
    return {(o["task"], o["length"], o["index"]): o["output"] for o in result["outputs"] if o["system"] == system}


@pytest.fixture
def tok():
    return WordTokenizer()


def test_rows_for_every_system_and_cell(tiny_model, tok):
    r = evaluate(tiny_model, tok, ["qa1", "qa2"], ["0k", 150], 3, segment_length=48, batch_size=2, progress=False,
                 systems=("base_full", "base_last_segment", "memory"), adapter=GMA6Config(**SMALL))
    assert set(SCHEMA_KEYS) <= set(r)
    assert r["segment_length"] == 48 and r["device"] == "cpu" and r["dtype"] == "float32"
    assert r["systems"] == ["base_full", "base_last_segment", "memory-fresh"]
    assert len(r["rows"]) == 3 * 2 * 2
    for row in r["rows"]:
        assert set(ROW_KEYS) <= set(row)
        assert row["n"] == 3 and 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] >= 0
        assert row["correct"] == round(row["accuracy"] * 3)
    assert len(r["outputs"]) == 3 * 2 * 2 * 3
    mem = [row for row in r["rows"] if row["system"] == "memory-fresh" and row["length"] == "150"]
    assert all(row["segments"] > 1 for row in mem)  # the context really spans several segments
    json.dumps(r)  # JSON-ready


def test_fresh_memory_answers_as_the_base_on_the_question_alone(tiny_model, tok):
    # A fresh gated memory leaves the base unchanged, whatever context it has read: after reading
    # several segments, its answers equal the bare base's on ``BOS + question`` alone.
    r = evaluate(tiny_model, tok, ["qa1", "qa5"], ["0k", 200], 4, segment_length=40, batch_size=3, progress=False,
                 systems=("base_question", "memory"), adapter=GMA6Config(**SMALL))
    bare, mem = _answers(r, "base_question"), _answers(r, "memory-fresh")
    assert len(bare) == 2 * 2 * 4 and bare == mem
    assert any(a for a in bare.values())  # the tiny model does say something
    # ... and base_question really is the base on BOS + question, generated one by one.
    s = generate_samples("qa5", 200, 4, split="test", seed=0, tokenizer=tok)[2]
    q = [1] + encode_episode(s, tok).question
    out = tiny_model.generate(torch.tensor([q]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(q):].tolist()
    out = out[: out.index(2)] if 2 in out else out
    assert bare[("qa5", "200", 2)] == tok.decode(out, skip_special_tokens=True)


def test_memory_model_passed_in_and_its_base_systems(tiny_model, tok):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    r = evaluate(mm, tok, ["qa1"], [100], 2, segment_length=32, progress=False,
                 systems=("base_question", "memory"))
    assert [row["system"] for row in r["rows"]] == ["base_question", "memory"]
    assert _answers(r, "base_question") == _answers(r, "memory")


def test_batching_and_left_padding_do_not_change_answers(tiny_model, tok):
    kw = dict(tasks=["qa2"], lengths=[120], n=5, segment_length=48, progress=False,
              systems=("base_full", "base_last_segment"))
    one = evaluate(tiny_model, tok, batch_size=1, **kw)
    many = evaluate(tiny_model, tok, batch_size=5, **kw)
    assert _answers(one, "base_full") == _answers(many, "base_full")
    assert _answers(one, "base_last_segment") == _answers(many, "base_last_segment")


def test_last_segment_prompt_is_one_segment_ending_with_the_question(tok):
    s = generate_samples("qa1", 300, 1, split="test", seed=0, tokenizer=tok)[0]
    e = encode_episode(s, tok)
    p = last_segment_prompt(e, 64, 1)
    assert len(p) == 64 and p[0] == 1
    assert p[-len(e.question):] == e.question and p[1:-len(e.question)] == e.context[-(63 - len(e.question)):]
    short = generate_samples("qa1", 0, 1, split="test", seed=0, tokenizer=tok)[0]
    es = encode_episode(short, tok)
    assert last_segment_prompt(es, 4096, 1) == [1] + es.context + es.question  # all fits: the whole prompt


def test_base_full_skipped_past_the_token_cap_and_reuse(tiny_model, tok):
    r = evaluate(tiny_model, tok, ["qa1"], ["0k", 300], 2, segment_length=512, progress=False,
                 systems=("base_full", "base_last_segment"), max_full_tokens=200)
    rows = {(row["system"], row["length"]): row for row in r["rows"]}
    skipped = rows[("base_full", "300")]
    assert skipped["accuracy"] is None and "exceeds" in skipped["skipped"]
    assert rows[("base_full", "0k")]["accuracy"] is not None
    # At 0k the whole prompt fits one segment: base_last_segment is base_full's prompt, answered once.
    assert rows[("base_last_segment", "0k")]["reused"] == 2
    assert rows[("base_last_segment", "300")]["accuracy"] is not None
    assert "skipped" in format_table(r)


def test_question_only_answers_are_shared_across_lengths(tiny_model, tok):
    # Sample i tells the same story at every length, so base_question's prompts repeat: answered once.
    r = evaluate(tiny_model, tok, ["qa3"], ["0k", 80, 160], 2, progress=False, systems=("base_question",))
    assert [row.get("reused", 0) for row in r["rows"]] == [0, 2, 2]
    a = _answers(r, "base_question")
    assert a[("qa3", "0k", 1)] == a[("qa3", "80", 1)] == a[("qa3", "160", 1)]


def test_answer_is_the_first_line():
    out = " Fred\nQuestion: Who did Jeff give the milk to?"
    assert answer_text(out) == " Fred" and answer_text(out, first_line=False) == out
    assert answer_text("\n\n kitchen.\nQuestion") == " kitchen."
    assert answer_text("") == ""
    # Scored whole, the next question's names would make a right answer wrong.
    from gma6.data import score

    assert score(answer_text(out), "Fred", "Who did Bill give the milk to?", "qa5")
    assert not score(out, "Fred", "Who did Bill give the milk to?", "qa5")


def test_samples_per_length_and_limit(tiny_model, tok):
    r = evaluate(tiny_model, tok, ["qa1"], ["0k", 100], {"0k": 3, 100: 1}, progress=False, systems=("base_question",))
    assert [row["n"] for row in r["rows"]] == [3, 1]
    r = evaluate(tiny_model, tok, ["qa1"], ["0k"], 5, limit=2, progress=False, systems=("base_question",))
    assert r["rows"][0]["n"] == 2


def test_bad_arguments(tiny_model, tok):
    with pytest.raises(ValueError, match="qa9"):
        evaluate(tiny_model, tok, ["qa9"], ["0k"], 1, progress=False)
    with pytest.raises(ValueError, match="unknown systems"):
        evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, systems=("oracle",), progress=False)
    with pytest.raises(ValueError, match="length"):
        evaluate(tiny_model, tok, ["qa1"], ["-1k"], 1, progress=False)


def test_memory_skipped_without_adapter(tiny_model, tok):
    r = evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, progress=False, systems=("base_question", "memory"))
    assert [row["system"] for row in r["rows"]] == ["base_question"]
    assert any("memory" in note for note in r["notes"])


def test_several_adapters_are_labelled_and_detached(tiny_model, tok, tmp_path):
    from gma6.integration import hook_count

    for name in ("a", "b"):
        mm = attach_memory(tiny_model, GMA6Config(**SMALL))
        mm.save_pretrained(tmp_path / name)
        mm.detach()
    hooks = hook_count(tiny_model)
    r = evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, progress=False, systems=("memory",),
                 adapter=[tmp_path / "a", tmp_path / "b"])
    assert r["systems"] == ["memory@a", "memory@b"]
    assert [a["system"] for a in r["adapters"]] == ["memory@a", "memory@b"]
    assert r["adapter"] == str(tmp_path / "a")
    assert hook_count(tiny_model) == hooks


def test_save_results_writes_json_and_png(tiny_model, tok, tmp_path):
    r = evaluate(tiny_model, tok, ["qa1", "qa3"], ["0k", 64], 2, segment_length=32, progress=False,
                 systems=("base_full", "base_last_segment"))
    paths = save_results(r, tmp_path / "res", "smoke")
    data = json.loads(paths["json"].read_text())
    assert set(SCHEMA_KEYS) <= set(data) and len(data["rows"]) == 2 * 2 * 2
    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not list((tmp_path / "res").glob(".*tmp"))
    table = format_table(r)
    assert "base_last_segment" in table and "qa3" in table and "64" in table


def test_merge_runs_of_other_systems_on_the_same_samples(tiny_model, tok, tmp_path):
    common = dict(segment_length=32, progress=False, batch_size=2)
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    mm.save_pretrained(tmp_path / "m")
    mm.detach()
    both = evaluate(tiny_model, tok, ["qa1"], ["0k", 64], 2, systems=("base_full", "memory"),
                    adapter=tmp_path / "m", **common)
    a = evaluate(tiny_model, tok, ["qa1"], ["0k", 64], 2, systems=("base_full",), **common)
    b = evaluate(tiny_model, tok, ["qa1"], ["0k", 64], 2, systems=("memory",), adapter=tmp_path / "m", **common)
    a["command"], b["command"] = "run a", "run b"
    m = merge_results([a, b])
    assert m["systems"] == ["base_full", "memory"] and m["commands"] == ["run a", "run b"]
    assert m["adapter"] == str(tmp_path / "m")
    assert [(r["system"], r["length"]) for r in m["rows"]] == [(r["system"], r["length"]) for r in both["rows"]]
    assert [r["accuracy"] for r in m["rows"]] == [r["accuracy"] for r in both["rows"]]
    assert len(m["outputs"]) == len(a["outputs"]) + len(b["outputs"])
    assert "memory" in format_table(m)
    with pytest.raises(ValueError, match="is in run 0 and run 1"):
        merge_results([a, a])
    with pytest.raises(ValueError, match="differ"):
        merge_results([a, {**b, "segment_length": 64}])
    with pytest.raises(ValueError, match="no results"):
        merge_results([])


def test_other_context_control_reads_the_next_samples_context(tiny_model, tok, monkeypatch):
    import gma6.evaluation as ev

    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    read: list[list[tuple[int, ...]]] = []
    real = ev._read_context

    def spy(model, episodes, *args):
        read.append([tuple(e.context) for e in episodes])
        return real(model, episodes, *args)

    monkeypatch.setattr(ev, "_read_context", spy)
    r = evaluate(mm, tok, ["qa1"], [64], 3, segment_length=32, progress=False, batch_size=2,
                 systems=("memory", "memory_other_context"))
    mm.detach()
    assert r["systems"] == ["memory", "memory_other_context"]
    assert {row["system"] for row in r["rows"]} == {"memory", "memory_other_context"}
    own = [c for chunk in read[:2] for c in chunk]
    other = [c for chunk in read[2:] for c in chunk]
    assert len(own) == len(other) == 3 and len(set(own)) == 3
    assert other == own[1:] + own[:1]  # sample i's question after sample i+1's context


def test_other_context_control_alone_and_unknown_systems(tiny_model, tok):
    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    r = evaluate(mm, tok, ["qa1"], ["0k"], 2, progress=False, systems=("memory_other_context",))
    mm.detach()
    assert r["systems"] == ["memory_other_context"] and len(r["rows"]) == 1
    with pytest.raises(ValueError, match="unknown systems"):
        evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, progress=False, systems=("memory_shuffled",))
    with pytest.raises(ValueError, match="at least 2 samples"):  # alone, a sample would read its own context
        evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, progress=False, systems=("memory_other_context",))


def test_question_reads_write_each_question_into_the_memory_before_it_is_asked(tiny_model, tok, monkeypatch):
    """``question_reads=1``: after the context the memory reads the question prompt (BOS + question, never the
    answer), so the state the answer is generated from has read those tokens too."""
    import gma6.evaluation as ev
    from gma6 import MemoryModel

    mm = attach_memory(tiny_model, GMA6Config(**SMALL))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_generate = MemoryModel.generate

    def spy(self, *args, memory_state=None, **kw):
        seen.append((memory_state.tokens_read.clone(), memory_state.segments_read))
        return real_generate(self, *args, memory_state=memory_state, **kw)

    monkeypatch.setattr(MemoryModel, "generate", spy)
    asked: list = []
    real_read = ev._read_questions
    monkeypatch.setattr(ev, "_read_questions", lambda model, eps, *a: asked.extend(eps) or real_read(model, eps, *a))
    plain = evaluate(mm, tok, ["qa1"], [64], 2, segment_length=32, progress=False, batch_size=2, systems=("memory",))
    plain_state = seen.pop()
    r = evaluate(mm, tok, ["qa1"], [64], 2, segment_length=32, progress=False, batch_size=2, systems=("memory",),
                 question_reads=1)
    hop_state = seen.pop()
    mm.detach()
    assert r["question_reads"] == 1 and plain["question_reads"] == 0
    assert len(asked) == 2 and all(e.answer and e.question[-len(e.answer):] != e.answer for e in asked)
    extra = torch.tensor([1 + len(e.question) for e in asked])  # BOS + question, the answer not among them
    assert torch.equal(hop_state[0] - plain_state[0], extra)
    assert int(hop_state[1]) - int(plain_state[1]) == 1
    with pytest.raises(ValueError, match="question_reads"):
        evaluate(tiny_model, tok, ["qa1"], ["0k"], 1, progress=False, question_reads=-1)


def test_a_saved_read_adapter_on_a_half_precision_base(tiny_model, tok, tmp_path):
    """An adapter folder is loaded under inference mode (its weights inference tensors): on a bf16 base its fp32
    read adapters are cast at every read. The answers equal those of the same weights loaded outside."""
    from gma6 import load_adapter

    cfg = GMA6Config(num_slots=8, memory_dim=None, num_heads=2, layers=[0, 2], write_rule="tokens", tokens_per_segment=4, read_rule="base",
                     token_retention="priority", read_rank=2, persistent_slots=2)
    mm = attach_memory(tiny_model.to(torch.bfloat16), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.normal_(std=0.5)
    mm.save_pretrained(tmp_path / "a")
    base = mm.detach()
    kw = dict(tasks=["qa1"], lengths=[120], n=3, segment_length=48, progress=False, systems=("memory",))
    from_folder = evaluate(base, tok, adapter=tmp_path / "a", **kw)
    passed_in = evaluate(load_adapter(base, tmp_path / "a"), tok, **kw)
    assert from_folder["dtype"] == "bfloat16"
    assert _answers(from_folder, "memory") == _answers(passed_in, "memory")
