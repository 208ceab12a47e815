"""Loader for the official BABILong layout, on a small hand-written fixture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:
    import gma6.data  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gma6.data import format_prompt, load_official, prompt_parts, score

FIXTURE = Path(__file__).parent / "fixtures" / "babilong"


def test_load_json_list():
    samples = load_official(FIXTURE, "qa1", "0k")
    assert [s.target for s in samples] == ["bathroom", "office", "garden"]
    s = samples[0]
    assert (s.task, s.length, s.seed, s.facts, s.supporting) == ("qa1", 0, None, [], ())
    assert s.context == "Mary moved to the bathroom. John went to the hallway."
    assert s.question == "Where is Mary?"
    assert load_official(str(FIXTURE), "QA1", 0) == samples  # int length, str path, any case


def test_load_jsonl_with_limit_and_length_spellings():
    samples = load_official(FIXTURE, "qa2", "1k", limit=1)
    assert len(samples) == 1 and samples[0].target == "hallway" and samples[0].length == 1024
    assert load_official(FIXTURE, "qa2", 1024) == load_official(FIXTURE, "qa2", "1K")
    assert load_official(FIXTURE, "qa2", "1k", limit=0) == []
    assert len(load_official(FIXTURE, "qa5", "0k")) == 2


def test_loaded_samples_prompt_and_score():
    for task, length in (("qa1", "0k"), ("qa2", "1k"), ("qa5", "0k")):
        for s in load_official(FIXTURE, task, length):
            parts = prompt_parts(s)
            assert parts.context == s.context and format_prompt(s).endswith(f"Question: {s.question}\nAnswer:")
            assert score(f"{s.target}.", s.target, s.question, task)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"qa3\.json"):
        load_official(FIXTURE, "qa3", "0k")
    with pytest.raises(FileNotFoundError, match="16k"):
        load_official(FIXTURE, "qa1", "16k")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_official(tmp_path / "no_such_dir", "qa1", "0k")


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed (lm-eval brings it)
    with pytest.raises(RuntimeError, match="datasets"):
        load_official("RMT-team/babilong", "qa1", "0k")


def test_bad_arguments_and_rows(tmp_path):
    with pytest.raises(ValueError, match="qa9"):
        load_official(FIXTURE, "qa9", "0k")
    with pytest.raises(ValueError, match="length"):
        load_official(FIXTURE, "qa1", -1)
    with pytest.raises(ValueError, match="limit"):
        load_official(FIXTURE, "qa1", "0k", limit=-1)
    (tmp_path / "0k").mkdir()
    (tmp_path / "0k" / "qa1.json").write_text(json.dumps([{"input": "x", "question": "Where is Mary?"}]))
    with pytest.raises(ValueError, match=r"row 0 lacks field\(s\) target"):
        load_official(tmp_path, "qa1", "0k")
    (tmp_path / "0k" / "qa1.json").write_text(json.dumps({"input": "x"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_official(tmp_path, "qa1", "0k")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "2k").mkdir()
    rows = [{"input": "Mary went to the office.", "question": "Where is Mary?", "target": "office"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "2k" / "qa1-00000-of-00001.parquet")
    (s,) = load_official(tmp_path, "qa1", "2k")
    assert (s.target, s.length) == ("office", 2048)
