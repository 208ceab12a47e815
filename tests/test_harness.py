"""gma6.harness: the lm-evaluation-harness model class on a tiny Gemma 3 (no hub, no network)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")  # the [lmeval] extra; installed by the test extra and in CI

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from gma6 import GMA6Config, attach_memory  # noqa: E402
from gma6.harness import GMA6LM, windows_from_end  # noqa: E402
from gma6.perplexity import segment_perplexity  # noqa: E402

from conftest import perturb, tiny_gemma3  # noqa: E402
from wordtok import WordTokenizer  # noqa: E402

TOK = WordTokenizer()
SEG = 9  # BOS + 8 words a window
TEXT = " ".join(f"Mary moved to the kitchen . John went to the garden . w{i}" for i in range(4))


def memory_model(trained: bool = True):
    torch.manual_seed(0)
    mm = attach_memory(tiny_gemma3(vocab=128), GMA6Config(num_slots=4, memory_dim=16, num_heads=2))
    if trained:
        perturb(mm)  # a memory that changes the outputs, as a trained one does
    return mm


def req(kind: str, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def bare_logprob(base, ids: list[int], start: int) -> float:
    logits = base(input_ids=torch.tensor([[TOK.bos_token_id] + ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[j, ids[j]] for j in range(start, len(ids))))


def test_windows_from_end_cover_each_token_once_and_the_last_is_full():
    assert windows_from_end(10, 4) == [(0, 2), (2, 6), (6, 10)]
    assert windows_from_end(8, 4) == [(0, 4), (4, 8)]
    assert windows_from_end(0, 4) == []
    with pytest.raises(ValueError, match="width"):
        windows_from_end(3, 0)


def test_rolling_loglikelihood_is_the_segment_perplexity_of_the_text():
    mm = memory_model()
    text = " ".join(TEXT.split()[:48])  # whole windows (one token a word): both cut the text the same way
    ids = TOK.encode(text, add_special_tokens=False)
    assert len(ids) == 48
    lm = GMA6LM(mm, TOK, segment_length=SEG)
    got = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    ppl = segment_perplexity(mm, torch.tensor([ids]), SEG, TOK.bos_token_id)
    assert got == pytest.approx(-len(ids) * math.log(ppl), rel=1e-5)


def test_short_request_with_a_fresh_memory_scores_as_the_bare_base():
    mm = memory_model(trained=False)
    lm = GMA6LM(mm, TOK, segment_length=64)
    ctx, cont = "Mary moved to the", " kitchen ."
    (logp, _), = lm.loglikelihood([req("loglikelihood", ctx, cont)])
    ids = TOK.encode(ctx + cont, add_special_tokens=False)
    assert logp == pytest.approx(bare_logprob(mm.base, ids, len(TOK.encode(ctx, add_special_tokens=False))), abs=1e-4)


def test_long_context_reaches_the_answer_only_through_the_memory():
    mm = memory_model()
    ctx, cont = TEXT + " Where is Mary ? Answer :", " kitchen"
    with_memory = GMA6LM(mm, TOK, segment_length=SEG).loglikelihood([req("loglikelihood", ctx, cont)])[0][0]
    without = GMA6LM(mm, TOK, segment_length=SEG, use_memory=False).loglikelihood([req("loglikelihood", ctx, cont)])[0][0]
    ids = TOK.encode(ctx + cont, add_special_tokens=False)
    last = ids[-(SEG - 1):]  # the bare base sees only the last window
    assert without == pytest.approx(bare_logprob(mm.base, last, len(last) - 1), abs=1e-4)
    assert with_memory != pytest.approx(without, abs=1e-4)


def test_generate_until_stops_at_the_stop_string():
    mm = memory_model()
    lm = GMA6LM(mm, TOK, segment_length=SEG)
    free = lm.generate_until([req("generate_until", TEXT, {"max_gen_toks": 6})])[0]
    assert len(free.split()) == 6
    stop = free.split()[2]
    cut = lm.generate_until([req("generate_until", TEXT, {"until": [stop], "max_gen_toks": 6})])[0]
    assert stop not in cut and free.startswith(cut)
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([req("generate_until", TEXT, {"do_sample": True})])


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="memory model"):
        GMA6LM(tiny_gemma3(vocab=128), TOK)
    with pytest.raises(ValueError, match="segment_length"):
        GMA6LM(memory_model(), TOK, segment_length=1)


def test_simple_evaluate_runs_local_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"text": TEXT, "question": "Where is Mary ?", "choices": ["kitchen", "garden"], "label": 0, "answer": "kitchen"}
            for _ in range(3)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test"}
    tasks = [
        {**common, "task": "gma6_rolling", "output_type": "loglikelihood_rolling", "doc_to_text": "",
         "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]},
        {**common, "task": "gma6_choice", "output_type": "multiple_choice", "doc_to_text": "{{text}} {{question}} Answer :",
         "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
        {**common, "task": "gma6_generate", "output_type": "generate_until", "doc_to_text": "{{text}} {{question}} Answer :",
         "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["."], "max_gen_toks": 4},
         "metric_list": [{"metric": "exact_match"}]},
    ]
    lm = GMA6LM(memory_model(), TOK, segment_length=SEG)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=3, bootstrap_iters=0, log_samples=False)
    res = out["results"]
    assert res["gma6_rolling"]["word_perplexity,none"] > 1
    assert 0 <= res["gma6_choice"]["acc,none"] <= 1
    assert 0 <= res["gma6_generate"]["exact_match,none"] <= 1


def test_the_rmt_peer_answers_every_request_type():
    torch.manual_seed(0)
    lm = GMA6LM(attach_memory(tiny_gemma3(vocab=128), GMA6Config(memory_type="rmt", num_slots=4)), TOK, segment_length=12)
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", TEXT)])[0]
    (logp, greedy), = lm.loglikelihood([req("loglikelihood", TEXT + " Where is Mary ?", " kitchen")])
    text = lm.generate_until([req("generate_until", TEXT, {"max_gen_toks": 3})])[0]
    assert math.isfinite(rolling) and rolling < 0 and math.isfinite(logp) and logp < 0 and isinstance(greedy, bool)
    assert len(text.split()) == 3
