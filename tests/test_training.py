"""Training loop on a tiny Gemma 3: it learns, only memory weights change, resume is exact."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from gma6 import GMA6Config, attach_memory
from gma6.training import TrainConfig, batch_tasks, make_batch, train

from conftest import tiny_gemma3
from wordtok import WordTokenizer

TOK = WordTokenizer(128)


def small_cfg(**kw) -> TrainConfig:
    base = dict(tasks=["qa1"], segment_length=48, curriculum=[1, 2], steps_per_stage=6, batch_size=4, lr=3e-3,
                warmup_steps=2, log_every=1, checkpoint_every=0, num_facts=2)
    return TrainConfig(**{**base, **kw})


def fresh():
    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    with torch.no_grad():
        # Random tied embeddings of std 0.02 cap the logits near 0 (loss ~ln V whatever the hidden
        # state); a wider init gives the task a loss that can fall.
        base.get_input_embeddings().weight.mul_(25)
    return attach_memory(base, GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[1, 3]))


def resume_and_finish(cfg: TrainConfig, out, **stop):
    """Train ``cfg`` until ``stop`` (e.g. max_steps), then finish from the checkpoint with fresh
    weights, as a new process would; return the finished model."""
    train(fresh(), TOK, cfg, out, progress=False, **stop)
    resumed = fresh()
    train(resumed, TOK, cfg, out, progress=False)
    return resumed


def assert_same_memory(a, b) -> None:
    for (n, x), y in zip(a.controller.named_parameters(), b.controller.parameters()):
        assert torch.equal(x, y), n


def test_a_task_named_twice_takes_two_shares_of_each_batch():
    cfg = small_cfg(tasks=["qa1", "qa2", "qa2", "qa3"], batch_size=8)
    for step in (0, 1, 5):
        tasks = batch_tasks(cfg, step)
        assert len(tasks) == 8 and collections.Counter(tasks) == {"qa1": 2, "qa2": 4, "qa3": 2}
    # round robin over the run, not restarted each batch: an odd batch size still keeps the ratio over steps
    odd = small_cfg(tasks=["qa1", "qa2", "qa2"], batch_size=5)
    counts = collections.Counter(t for step in range(6) for t in batch_tasks(odd, step))
    assert counts == {"qa1": 10, "qa2": 20}
    # every sample is still its own story: the repeated task's samples differ
    batch = make_batch(small_cfg(tasks=["qa2", "qa2"], batch_size=2, num_facts=4), 0, TOK, 1)
    assert not torch.equal(batch.context[0], batch.context[1])


def test_batches_are_a_pure_function_of_the_step():
    cfg = small_cfg()
    a, b = make_batch(cfg, 7, TOK, 1), make_batch(cfg, 7, TOK, 1)
    assert torch.equal(a.context, b.context) and torch.equal(a.question, b.question)
    assert not torch.equal(make_batch(cfg, 8, TOK, 1).question, a.question)
    # the answer mask covers the target word at the end of each question row
    assert a.answer_mask[:, -1].all()


def test_loss_falls_and_only_memory_weights_change(tmp_path):
    mm = fresh()
    before = {k: v.clone() for k, v in mm.base.state_dict().items()}
    train(mm, TOK, small_cfg(curriculum=[1], steps_per_stage=30, lr=1e-2), tmp_path, progress=False)
    # qa1 answers are one of six places: ln 6 = 1.79 is what the prior alone gives
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    for k, v in mm.base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert (tmp_path / "adapter" / "memory_adapter.safetensors").exists()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "adapter" / "training.json").read_text())["steps"] == 30


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = small_cfg()
    whole = fresh()
    train(whole, TOK, cfg, tmp_path / "whole", progress=False)
    resumed = resume_and_finish(cfg, tmp_path / "part", max_steps=5)  # stops inside stage 1
    assert_same_memory(whole, resumed)
    log = [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 13))


def test_a_run_killed_after_its_checkpoint_logs_each_step_once_when_resumed(tmp_path):
    """Killed after logging steps its checkpoint does not hold (and midway through a line): resuming drops those
    records and the torn line, so the finished log and its plot hold each step once."""
    cfg = small_cfg()
    train(fresh(), TOK, cfg, tmp_path, progress=False, max_steps=5)  # checkpoint at step 5
    log = tmp_path / "log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    with open(log, "a") as f:  # what the killed process had logged beyond its checkpoint
        f.write(json.dumps({**rows[-1], "step": 6, "loss": 99.0}) + "\n" + '{"step": 7, "lo')
    (tmp_path / "loss.png").unlink()
    train(fresh(), TOK, cfg, tmp_path, progress=False)
    got = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 13))
    assert got[:5] == rows and 99.0 not in [r["loss"] for r in got]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_a_torn_last_line_does_not_stop_the_plot(tmp_path):
    from gma6.training import plot_log, read_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0, "acc": 0.5, "segments": 1}\n[1, 2]\n{"step": 2, "lo')
    assert read_log(log) == [{"step": 1, "loss": 1.0, "acc": 0.5, "segments": 1}]
    plot_log(log, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_time_limit_checkpoints_and_the_resumed_run_equals_uninterrupted(tmp_path):
    cfg = small_cfg()
    whole = fresh()
    train(whole, TOK, cfg, tmp_path / "whole", progress=False)
    last = train(fresh(), TOK, cfg, tmp_path / "part", progress=False, time_limit=1e-9)  # stops after one step
    assert last["stopped"] == "time_limit" and last["stopped_at_step"] == 1
    assert not (tmp_path / "part" / "adapter").exists()  # an unfinished run ships no adapter
    resumed = fresh()
    train(resumed, TOK, cfg, tmp_path / "part", progress=False)
    assert_same_memory(whole, resumed)
    with pytest.raises(ValueError, match="time_limit"):
        train(fresh(), TOK, cfg, tmp_path / "bad", progress=False, time_limit=0)


def test_resume_with_other_settings_is_refused(tmp_path):
    train(fresh(), TOK, small_cfg(), tmp_path, progress=False, max_steps=2)
    with pytest.raises(ValueError, match="other settings"):
        train(fresh(), TOK, small_cfg(batch_size=2), tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs, words",
    [({"tasks": ["qa9"]}, "qa9"), ({"curriculum": []}, "curriculum"), ({"lr": 0}, "lr=0"),
     ({"segment_length": 8}, "segment_length=8"), ({"batch_size": 0}, "batch_size=0"),
     ({"bptt_segments": 0}, "bptt_segments=0"), ({"in_context": True}, "in_context.*lora_rank"),
     ({"in_context": True, "lora_rank": 2, "kl_weight": 1.0}, "in_context.*kl_weight"),
     ({"text_kl_weight": -1.0}, "text_kl_weight=-1.0"), ({"text_kl_rows": 0}, "text_kl_rows=0"),
     ({"text_kl_segments": 0}, "text_kl_segments=0"),
     ({"in_context": True, "lora_rank": 2, "text_kl_weight": 1.0}, "in_context.*text_kl_weight"),
     ({"question_reads": -1}, "question_reads=-1"), ({"question_reads": True}, "question_reads=True"),
     ({"in_context": True, "lora_rank": 2, "question_reads": 1}, "in_context.*question_reads")],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        small_cfg(**kwargs)


def test_cli_train_rejects_bad_arguments():
    from typer.testing import CliRunner

    from gma6.cli import app

    result = CliRunner().invoke(app, ["train", "--out", "x", "--tasks", "qa1,qa7"])
    assert result.exit_code != 0
    assert "qa7" in result.output
    result = CliRunner().invoke(app, ["train", "--out", "x", "--addressing", "nearest"])
    assert result.exit_code != 0 and "addressing" in result.output and "nearest" in result.output


def test_the_same_loop_trains_the_rmt_peer(tmp_path):
    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    rmt = attach_memory(base, GMA6Config(memory_type="rmt", num_slots=4))
    start = {n: p.detach().clone() for n, p in rmt.controller.named_parameters()}
    train(rmt, TOK, small_cfg(curriculum=[1], steps_per_stage=3), tmp_path, progress=False)
    assert any(not torch.equal(p, start[n]) for n, p in rmt.controller.named_parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    import gma6

    loaded = gma6.load_adapter(rmt.detach(), tmp_path / "adapter")
    assert loaded.config.memory_type == "rmt"


def test_context_lm_loss_is_logged_and_resume_stays_exact(tmp_path):
    cfg = small_cfg(lm_weight=0.5, lm_positions=4)
    whole = fresh()
    train(whole, TOK, cfg, tmp_path / "whole", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert all(r["context_lm_loss"] is not None and r["context_lm_loss"] > 0 for r in rows)
    resumed = resume_and_finish(cfg, tmp_path / "part", max_steps=7)
    assert_same_memory(whole, resumed)
    with pytest.raises(ValueError, match="lm_weight"):
        small_cfg(lm_weight=-1)


@pytest.mark.parametrize("kind", ["gated", "rmt"])
def test_kl_to_the_bare_base_is_zero_for_a_fresh_memory_and_trains(tmp_path, kind):
    from conftest import perturb
    from gma6.training import _losses

    base = tiny_gemma3(vocab=128)
    mm = attach_memory(base, GMA6Config(memory_type=kind, num_slots=4, memory_dim=16, num_heads=2))
    cfg = small_cfg(kl_weight=1.0, lm_positions=4, curriculum=[2], steps_per_stage=4)
    batch = make_batch(cfg, 0, TOK, TOK.bos_token_id)
    terms = _losses(mm, batch, cfg.segment_length, TOK.bos_token_id, None, 4, kl=True)
    lm, kl = terms.context_lm, terms.context_kl
    assert lm is None or lm > 0
    if kind == "gated":  # the gated memory starts as a no-op; RMT's memory tokens change attention at once
        assert float(kl.detach()) == pytest.approx(0.0, abs=1e-6)
        perturb(mm)
        kl = _losses(mm, batch, cfg.segment_length, TOK.bos_token_id, None, 4, kl=True).context_kl
    assert 1e-4 < float(kl.detach()) < 100
    train(mm, TOK, cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["context_kl"] is not None and r["context_kl"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="kl_weight"):
        small_cfg(kl_weight=-0.1)


def test_text_kl_is_zero_for_a_fresh_memory_then_trains_and_resumes_exactly(tmp_path):
    from conftest import perturb
    from gma6.training import make_text_rows, text_kl_loss

    cfg = small_cfg(text_kl_weight=1.0, text_kl_rows=2, text_kl_segments=3, lm_positions=4)
    assert make_text_rows(small_cfg(), 0, TOK, TOK.bos_token_id) is None  # off by default
    text = make_text_rows(cfg, 0, TOK, TOK.bos_token_id)
    assert text.shape == (2, 3 * (cfg.segment_length - 1))  # each segment gets its BOS back
    assert torch.equal(text, make_text_rows(cfg, 0, TOK, TOK.bos_token_id))
    mm = fresh()
    with torch.no_grad():
        assert float(text_kl_loss(mm, text, cfg.segment_length, TOK.bos_token_id, 4)) == pytest.approx(0.0, abs=1e-6)
    perturb(mm)
    kl = text_kl_loss(mm, text, cfg.segment_length, TOK.bos_token_id, 4)
    assert 1e-5 < float(kl.detach()) < 100
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.controller.parameters())

    def kl_after(weight: float, out) -> float:  # the KL on held text after training with the term at ``weight``
        m = fresh()
        perturb(m)
        train(m, TOK, small_cfg(text_kl_weight=weight, text_kl_rows=2, text_kl_segments=3, lm_positions=4), out,
              progress=False)
        torch.manual_seed(0)
        with torch.no_grad():
            return float(text_kl_loss(m, text, cfg.segment_length, TOK.bos_token_id, 4))

    assert kl_after(20.0, tmp_path / "strong") < 0.8 * kl_after(1e-9, tmp_path / "faint")
    whole = fresh()
    perturb(whole)
    train(whole, TOK, cfg, tmp_path / "whole", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert all(r["text_kl"] is not None and r["text_kl"] >= 0 for r in rows)
    part = fresh()
    perturb(part)
    train(part, TOK, cfg, tmp_path / "part", progress=False, max_steps=5)
    resumed = fresh()
    train(resumed, TOK, cfg, tmp_path / "part", progress=False)
    assert_same_memory(whole, resumed)


def test_several_questions_per_context_share_one_read(tmp_path):
    from gma6.training import _losses

    cfg = small_cfg(questions_per_context=3, curriculum=[2], steps_per_stage=4)
    batch = make_batch(cfg, 0, TOK, TOK.bos_token_id)
    assert batch.context.shape[0] == cfg.batch_size
    src = batch.question_source.tolist()
    assert len(src) > cfg.batch_size and src == sorted(src) and set(src) == set(range(cfg.batch_size))
    assert all(src.count(j) <= 3 for j in set(src))
    assert torch.equal(make_batch(cfg, 0, TOK, TOK.bos_token_id).question, batch.question)  # pure in the step
    one = make_batch(small_cfg(curriculum=[2], steps_per_stage=4), 0, TOK, TOK.bos_token_id)
    assert torch.equal(one.context, batch.context)  # the same contexts as with one question each
    mm = fresh()
    loss, acc, *_ = _losses(mm, batch, cfg.segment_length, TOK.bos_token_id, None, 0)
    assert loss.isfinite() and 0 <= float(acc) <= 1
    train(mm, TOK, cfg, tmp_path / "whole", progress=False)
    resumed = resume_and_finish(cfg, tmp_path / "part", max_steps=2)
    assert_same_memory(mm, resumed)
    with pytest.raises(ValueError, match="questions_per_context"):
        small_cfg(questions_per_context=0)


def test_context_terms_recomputed_in_backward_give_the_same_values_and_gradients():
    from gma6.training import context_terms

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 40, requires_grad=True)
    bare = torch.randn(2, 5, 40)
    valid = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    target = torch.randint(0, 40, (2, 5)).masked_fill(~valid, -100)
    lm, kl = context_terms(logits, target, valid, bare)
    (lm + kl).backward()
    want = logits.grad.clone()
    logits.grad = None
    lm2, kl2 = torch.utils.checkpoint.checkpoint(context_terms, logits, target, valid, bare, use_reentrant=False)
    (lm2 + kl2).backward()
    assert torch.equal(lm, lm2) and torch.equal(kl, kl2) and torch.allclose(logits.grad, want)
    # the same numbers as the plain formulas
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100,
                                            reduction="sum") / valid.sum()
    assert torch.allclose(lm, ref)
    assert context_terms(logits, target, valid)[1] is None
    same = context_terms(bare, target, valid, bare)[1]
    assert abs(float(same)) < 1e-6  # KL of a distribution to itself


def test_in_context_prompts_put_bos_context_question_and_answer_in_one_left_padded_row():
    from gma6.episodes import Episode, collate, collate_questions
    from gma6.training import in_context_prompts

    a = Episode(context=[10, 11, 12], question=[20, 21], answer=[30])
    b = Episode(context=[13], question=[22], answer=[31, 32])
    ids, mask, answer = in_context_prompts(collate([a, b], 1, 0), 1)
    assert ids.tolist() == [[1, 10, 11, 12, 20, 21, 30], [0, 0, 1, 13, 22, 31, 32]]
    assert mask.tolist() == [[True] * 7, [False] * 2 + [True] * 5]
    assert answer.tolist() == [[False] * 6 + [True], [False] * 5 + [True, True]]
    # several questions about one context: each row carries its own source's context
    q = Episode(context=[], question=[23], answer=[33])
    ids, _, _ = in_context_prompts(collate_questions([a, b], [a, q, b], [0, 0, 1], 1, 0), 1)
    assert ids[1].tolist() == [0, 1, 10, 11, 12, 23, 33]


def test_validate_in_context_scores_the_base_on_the_whole_prompt():
    from gma6.episodes import collate, encode_episode
    from gma6.data.generator import derive_seed, generate_sample
    from gma6.training import _answer_terms, _in_context_losses, in_context_prompts, validate

    mm = fresh()
    got = validate(mm, TOK, ["qa1", "qa2"], 60, n=3, segment_length=48, in_context=True)
    assert set(got) == {"qa1", "qa2"} and all(0.0 <= v <= 1.0 for v in got.values())
    # a training mix's repeated task is measured once, on the same samples
    assert validate(mm, TOK, ["qa1", "qa2", "qa2"], 60, n=3, segment_length=48, in_context=True) == got
    # by hand: the bare base over BOS + context + question + answer, positions counting real tokens
    samples = [generate_sample("qa1", 60, derive_seed("test", "qa1", i, 0), TOK, split="test") for i in range(3)]
    batch = collate([encode_episode(x, TOK) for x in samples], TOK.bos_token_id, 0)
    ids, mask, answer = in_context_prompts(batch, TOK.bos_token_id)
    k = int(answer.sum(1).max())
    with torch.no_grad():
        logits = mm.base(input_ids=ids, attention_mask=mask.long(), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                         logits_to_keep=k + 1).logits
        want_loss, want_acc = _answer_terms(logits, ids, answer, k)
        loss, acc = _in_context_losses(mm, batch, TOK.bos_token_id)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5) and float(want_loss) > 0.1
    assert got["qa1"] == pytest.approx(float(want_acc)) == pytest.approx(float(acc))


def test_the_tokens_write_rule_learns_on_the_tiny_task(tmp_path):
    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(25)
    mm = attach_memory(base, GMA6Config(num_slots=4, memory_dim=16, num_heads=2, layers=[1, 3], write_rule="tokens",
                                        tokens_per_segment=2))
    before = {k: v.clone() for k, v in mm.base.state_dict().items()}
    score = mm.controller.layers[0].score.weight.detach().clone()
    train(mm, TOK, small_cfg(curriculum=[1], steps_per_stage=30, lr=1e-2), tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(torch.equal(v, before[k]) for k, v in mm.base.state_dict().items())
    assert not torch.equal(mm.controller.layers[0].score.weight, score)  # the selection trains too


def test_context_distill_is_zero_where_the_memory_sees_what_the_window_sees_and_trains_the_memory(tmp_path):
    from gma6.episodes import Episode, collate
    from gma6.training import _losses, context_distill_loss

    mm = fresh()
    # No context: the in-context prompt is the question row itself, so a fresh (no-op) memory matches it
    # exactly: the rows are aligned token for token, padding and BOS left out.
    eps = [Episode(context=[], question=[20, 21, 22], answer=[30]), Episode(context=[], question=[23], answer=[31, 32])]
    batch = collate(eps, TOK.bos_token_id, 0)
    with torch.no_grad():
        student = mm(input_ids=batch.question, attention_mask=batch.question_mask, memory_state=mm.init_state(2),
                     write=False, output_hidden_states=True).hidden_states
        assert float(context_distill_loss(mm, batch, TOK.bos_token_id, student)) == pytest.approx(0.0, abs=1e-10)
        # shifted by one token, the same rows are far apart: the alignment is what made it zero
        shifted = tuple(torch.roll(h, 1, dims=1) for h in student)
        assert float(context_distill_loss(mm, batch, TOK.bos_token_id, shifted)) > 1e-3
    # With a context the window sees it and the memory (fresh) does not: a positive loss, logged, that trains it
    eps = [Episode(context=[40, 41, 42, 43], question=[20, 21, 22], answer=[30])] * 2
    with torch.no_grad():
        distill = _losses(mm, collate(eps, TOK.bos_token_id, 0), 48, TOK.bos_token_id, None, 0, distill=True).context_distill
    assert float(distill) > 1e-4
    cfg = small_cfg(curriculum=[1], steps_per_stage=3, distill_weight=1.0)
    train(mm, TOK, cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(r["context_distill"] is not None and r["context_distill"] > 0 for r in rows)
    with pytest.raises(ValueError, match="other settings"):
        train(fresh(), TOK, small_cfg(curriculum=[1], steps_per_stage=4), tmp_path, progress=False)


# ------------------------------------------------------------------ supervising the tokens write
def test_fact_masks_mark_exactly_the_fact_sentences_tokens():
    from gma6.data.generator import generate_sample
    from gma6.data.prompts import prompt_parts
    from gma6.episodes import encode_episode

    s = generate_sample("qa1", 300, 5, TOK, split="train", num_facts=3)
    e = encode_episode(s, TOK, facts=True)
    assert len(e.context_facts) == len(e.context)
    marked = [i for i, f in zip(e.context, e.context_facts) if f]
    assert marked == [i for fact in s.facts for i in TOK.encode(fact, add_special_tokens=False)]
    assert encode_episode(s, TOK).context_facts is None and e.context == encode_episode(s, TOK).context
    assert prompt_parts(s).context.count(s.facts[0]) >= 1


def test_fact_masks_need_a_tokenizer_with_offsets():
    from gma6.data.generator import generate_sample
    from gma6.episodes import encode_episode

    class NoOffsets:
        def encode(self, text, add_special_tokens=False):
            return TOK.encode(text, add_special_tokens)

    s = generate_sample("qa1", 100, 1, TOK, split="train", num_facts=2)
    with pytest.raises(TypeError, match="offsets"):
        encode_episode(s, NoOffsets(), facts=True)


def test_selection_supervision_teaches_the_write_which_tokens_are_facts(tmp_path):
    """With only the selection loss switched on hard, the write's scores learn to separate fact tokens."""
    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    mm = attach_memory(base, GMA6Config(num_slots=24, memory_dim=None, num_heads=2, layers=[1], write_rule="tokens",
                                        tokens_per_segment=12, read_rule="base", token_retention="priority"))
    cfg = small_cfg(select_weight=5.0, curriculum=[2], steps_per_stage=30, lr=1e-2)
    train(mm, TOK, cfg, tmp_path, progress=False)
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["write_select"] < 0.6 * logs[0]["write_select"]
    with pytest.raises(ValueError, match="other settings"):  # resuming with another selection weight
        train(mm, TOK, small_cfg(select_weight=1.0, curriculum=[2], steps_per_stage=30, lr=1e-2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="write_rule='tokens'"):
        train(fresh(), TOK, small_cfg(select_weight=1.0), tmp_path / "slots", progress=False)
    with pytest.raises(ValueError, match="select_weight"):
        small_cfg(select_weight=1.0, in_context=True, lora_rank=2)


def _poison(mm, at_calls):
    """Make the first memory parameter's gradient NaN at the given backward calls (1-based; None: always)."""
    calls = [0]
    p = next(mm.controller.parameters())

    def hook(g):
        calls[0] += 1
        return g * float("nan") if at_calls is None or calls[0] in at_calls else g

    p.register_hook(hook)


def test_a_non_finite_gradient_skips_its_update_and_a_run_of_them_stops(tmp_path):
    cfg = small_cfg(curriculum=[1], steps_per_stage=6)
    mm = fresh()
    _poison(mm, {3})
    train(mm, TOK, cfg, tmp_path / "once", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "once" / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 1, 0, 0, 0]
    assert all(torch.isfinite(p).all() for p in mm.controller.parameters())
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN loss after the bad step
    mm = fresh()
    _poison(mm, None)
    with pytest.raises(FloatingPointError, match="not finite at 10 steps in a row"):
        train(mm, TOK, small_cfg(curriculum=[1], steps_per_stage=20), tmp_path / "always", progress=False)


def test_question_reads_write_the_question_never_the_answer_and_train(tmp_path, monkeypatch):
    """``question_reads=1``: after the context the memory reads BOS + question (the answer positions masked out)
    before the question is answered; the loss then differs from the plain one, training runs and resumes exactly."""
    from gma6.model import MemoryModel
    from gma6.training import _losses

    cfg = small_cfg(question_reads=1, curriculum=[2], steps_per_stage=4)
    batch = make_batch(cfg, 0, TOK, TOK.bos_token_id)
    mm = fresh()
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    masks = []
    real = MemoryModel.forward

    def spy(self, *args, **kw):
        masks.append(kw.get("attention_mask"))
        return real(self, *args, **kw)

    monkeypatch.setattr(MemoryModel, "forward", spy)
    with torch.no_grad():
        plain = _losses(mm, batch, cfg.segment_length, TOK.bos_token_id, None, 0).answer
        n_plain = len(masks)
        hop = _losses(mm, batch, cfg.segment_length, TOK.bos_token_id, None, 0, question_reads=1).answer
    assert len(masks) - n_plain == n_plain + 1  # one more pass: the question read
    written = masks[n_plain + n_plain - 1]  # the pass before the question is answered
    assert torch.equal(written, batch.question_mask & ~batch.answer_mask)
    assert not bool((written & batch.answer_mask).any())
    assert not torch.isclose(plain, hop)
    monkeypatch.setattr(MemoryModel, "forward", real)
    whole = fresh()
    train(whole, TOK, cfg, tmp_path / "whole", progress=False)
    resumed = resume_and_finish(cfg, tmp_path / "part", max_steps=2)
    assert_same_memory(whole, resumed)


def test_the_selection_loss_recomputed_in_backward_gives_the_same_value_and_gradients(monkeypatch):
    """The write's selection loss keeps only its inputs in training (its fp32 scores are recomputed in backward)."""
    import torch.utils.checkpoint as ckpt

    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    mm = attach_memory(base, GMA6Config(num_slots=8, memory_dim=None, num_heads=2, layers=[1], write_rule="tokens",
                                        tokens_per_segment=4, read_rule="base", token_retention="priority"))
    with torch.no_grad():
        for p in mm.controller.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(3, 128, (2, 16))
    targets = torch.rand(2, 16) > 0.5

    def grads():
        mm.zero_grad(set_to_none=True)
        loss = mm(input_ids=ids, write_targets=targets).write_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in mm.controller.named_parameters() if p.grad is not None}

    loss, got = grads()
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, use_reentrant=None, **k: fn(*a, **k))
    ref_loss, ref = grads()
    assert torch.allclose(loss, ref_loss) and ref.keys() == got.keys() and len(ref) > 0
    for name in ref:
        assert torch.allclose(ref[name], got[name], atol=1e-6), name


def test_persistent_lr_puts_the_persistent_slots_in_their_own_group(tmp_path):
    """persistent_lr: the persistent slots and their logit bias step at their own rate on the shared schedule;
    every other trainable weight at lr. Refused where there are no persistent slots, and when not a rate."""
    from gma6.training import parameter_groups

    base = tiny_gemma3(seed=0, vocab=128, hidden=32)
    mm = attach_memory(base, GMA6Config(num_slots=4, memory_dim=None, num_heads=2, layers=[0, 2], write_rule="tokens", tokens_per_segment=4,
                                        read_rule="base", token_retention="priority", persistent_slots=2))
    groups = parameter_groups(mm, small_cfg(lr=1e-3, persistent_lr=0.05))
    assert [g["lr"] for g in groups] == [1e-3, 0.05]
    assert {id(p) for p in groups[1]["params"]} == {id(mm.controller.persistent), id(mm.controller.persistent_logit)}
    assert len(groups[0]["params"]) + 2 == len([p for p in mm.parameters() if p.requires_grad])
    assert len(parameter_groups(mm, small_cfg(lr=1e-3))) == 1
    # the larger rate moves the logit bias further in the same steps as the default would
    moved = {}
    for plr in (None, 0.1):
        torch.manual_seed(0)
        m = attach_memory(tiny_gemma3(seed=0, vocab=128, hidden=32),
                          GMA6Config(num_slots=4, memory_dim=None, num_heads=2, layers=[0, 2], write_rule="tokens", tokens_per_segment=4,
                                     read_rule="base", token_retention="priority", persistent_slots=2))
        start = m.controller.persistent_logit.detach().clone()
        train(m, TOK, small_cfg(curriculum=[1], steps_per_stage=4, lr=1e-3, persistent_lr=plr),
              tmp_path / str(plr), progress=False)
        moved[plr] = (m.controller.persistent_logit.detach() - start).abs().max().item()
    assert moved[0.1] > 10 * moved[None] > 0, moved
    with pytest.raises(ValueError, match="no trainable persistent slots"):
        train(fresh(), TOK, small_cfg(persistent_lr=1e-2), tmp_path / "none", progress=False)
    for bad in (0, 1.5, True, "1e-2"):
        with pytest.raises(ValueError, match="persistent_lr="):
            small_cfg(persistent_lr=bad)
