"""gma6 bench on a tiny Gemma 3: runs, writes a valid JSON and a PNG (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from gma6 import GMA6Config
from gma6.bench import SYSTEMS, BenchConfig, PeakMemory, parse_tokens, run_bench, summarize, write_results

from conftest import tiny_gemma3

SMALL = GMA6Config(num_slots=4, memory_dim=16, num_heads=2)
REQUIRED = {"system", "context", "batch", "segment", "tokens_per_s", "peak_mem_gib"}


def _check_result(result: dict, tmp_path) -> dict:
    json_path, png_path = write_results(result, tmp_path / "bench-test.json")
    data = json.loads(json_path.read_text())
    assert {"device", "dtype", "date", "command", "rows", "summary"} <= set(data)
    assert png_path.exists() and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in data["rows"]:
        assert REQUIRED <= set(row), row
    return data


def test_bench_runs_on_a_tiny_model(tmp_path):
    config = BenchConfig(
        contexts=[32, 64], batches=[1, 2], segments=[16], repeats=2, train_context=32, train_segment=16, paired=4, memory=SMALL
    )
    result = run_bench(tiny_gemma3(), config, command="pytest", log=None)
    data = _check_result(result, tmp_path)
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["system"] for r in ok} == set(SYSTEMS) | {"train_memory", "train_frozen", "train_full", "train_full_context"}
    for r in ok:
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
        assert r["peak_mem_gib"] is None or r["peak_mem_gib"] > 0
    reads = [r for r in ok if r["system"] in SYSTEMS]
    assert len(reads) == 2 * 2 * 3  # contexts x batches x systems (base_full once per batch and context)
    assert all(r["segment"] is None for r in reads if r["system"] == "base_full")
    pairs = data["summary"]["memory_over_base_segments"]["pairs"]
    assert len(pairs) == 4 and all(p["ratio"] > 0 for p in pairs)
    assert data["summary"]["train_memory_over_train_full"]["step_time"] > 0
    assert data["summary"]["train_memory_over_train_full_context"]["step_time"] > 0
    whole = next(r for r in ok if r["system"] == "train_full_context")
    assert whole["segment"] is None and whole["context"] == 32 and whole["weights"] == "float32"
    paired = data["summary"]["paired_memory_over_base_segments"]
    assert paired["pairs"] == 4 and paired["median"] > 0 and paired["segment"] == 16 and paired["batch"] == 2
    assert data["command"] == "pytest" and data["dtype"] == "float32"


def test_bench_skips_and_limits(tmp_path):
    config = BenchConfig(
        contexts=[16, 32, 64], batches=[1, 2], segments=[16], systems=["memory", "base_full"],
        batch_max_context=16, full_max_context=32, warmup=0, train=False, memory=SMALL,
    )
    data = _check_result(run_bench(tiny_gemma3(), config, log=None), tmp_path)
    full64 = [r for r in data["rows"] if r["system"] == "base_full" and r["context"] == 64]
    assert full64 and full64[0]["status"].startswith("skipped") and full64[0]["tokens_per_s"] is None
    assert not [r for r in data["rows"] if r["batch"] == 2 and r["context"] > 16]
    assert "memory_over_base_segments" not in data["summary"]  # no base_segments rows to compare with


def test_bench_records_out_of_memory(tmp_path, monkeypatch):
    import gma6.bench as bench

    real = bench._runner

    def runner(system, mm, ids, segment, base_graph=None):
        if system == "base_full" and ids.shape[1] >= 32:
            def boom():
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return boom
        return real(system, mm, ids, segment, base_graph)

    monkeypatch.setattr(bench, "_runner", runner)
    config = BenchConfig(contexts=[16, 32, 64], batches=[1], segments=[16], warmup=0, train=False, memory=SMALL)
    data = _check_result(run_bench(tiny_gemma3(), config, log=None), tmp_path)
    full = {r["context"]: r["status"] for r in data["rows"] if r["system"] == "base_full"}
    assert full[16] == "ok" and full[32] == "oom" and full[64].startswith("skipped")
    assert all(r["status"] == "ok" for r in data["rows"] if r["system"] == "memory")


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
        x.add_(1)
        del x
    if peak.method is None:
        pytest.skip("no /proc on this system")
    assert peak.extra_gib > 0.05


def test_cli_writes_results(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gma6.bench as bench
    from gma6.cli import app

    monkeypatch.setattr(bench, "load_model", lambda name, dtype, device: tiny_gemma3())
    out = tmp_path / "b.json"
    args = ["bench", "-c", "32", "-b", "1", "-s", "16", "--no-train", "--warmup", "0", "--threads", str(torch.get_num_threads()), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    assert "memory / base_segments" in res.output
    assert {r["system"] for r in data["rows"]} == set(SYSTEMS)


def test_parse_tokens_and_config_checks():
    assert parse_tokens("16k") == 16384 and parse_tokens("1024") == 1024 and parse_tokens(7) == 7
    with pytest.raises(ValueError):
        parse_tokens("lots")
    with pytest.raises(ValueError, match="systems"):
        BenchConfig(systems=["nope"])
    with pytest.raises(ValueError, match="contexts"):
        BenchConfig(contexts=[])
    with pytest.raises(ValueError, match="paired_batch"):
        BenchConfig(paired_batch=0)
    assert summarize([]) == {}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_scored_at_a_few_positions(tmp_path, checkpointing):
    from gma6.integration import hook_count

    base = tiny_gemma3()
    config = BenchConfig(contexts=[32], batches=[1], segments=[16], systems=["memory"], warmup=0,
                         train_context=32, train_segment=16, train_positions=4, train_checkpointing=checkpointing,
                         memory=SMALL)
    rows = [r for r in run_bench(base, config, command="pytest", log=None)["rows"] if r["system"].startswith("train_")]
    assert [r["system"] for r in rows] == ["train_memory", "train_frozen", "train_full", "train_full_context"]
    assert all(r["status"] == "ok" and r["loss_positions"] == 4 and r["seconds"] > 0 for r in rows)
    assert all(r["gradient_checkpointing"] is checkpointing for r in rows)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())  # switched off again
    assert hook_count(base) == 0 and not base.training
    with pytest.raises(ValueError, match="train_positions"):
        BenchConfig(train_positions=0)


def test_cli_times_a_saved_adapters_kind_of_memory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gma6.bench as bench
    from gma6 import GMA6Config, attach_memory
    from gma6.cli import app

    mm = attach_memory(tiny_gemma3(), GMA6Config(num_slots=6, memory_dim=None, layers=[0, 2], write_rule="tokens",
                                                 tokens_per_segment=3, read_rule="base"))
    mm.add_lora(2)
    mm.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(bench, "load_model", lambda name, dtype, device: tiny_gemma3())
    out = tmp_path / "b.json"
    args = ["bench", "-c", "32", "-b", "1", "-s", "16", "--no-train", "--warmup", "0", "--system", "base_segments",
            "--system", "memory", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = json.loads(out.read_text())["memory_config"]
    assert cfg["read_rule"] == "base" and cfg["num_slots"] == 6 and cfg["lora_rank"] == 0
    bad = CliRunner().invoke(app, [*args[:-4], "--adapter", str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code != 0 and "--adapter" in bad.output


@pytest.mark.parametrize("master", [True, False])
def test_a_half_precision_full_fine_tune_keeps_fp32_master_weights_unless_told(master):
    base = tiny_gemma3().to(torch.bfloat16)
    config = BenchConfig(contexts=[32], batches=[1], segments=[16], systems=["memory"], warmup=0,
                         train_context=32, train_segment=16, train_positions=4, train_full_master=master, memory=SMALL)
    rows = {r["system"]: r for r in run_bench(base, config, command="pytest", log=None)["rows"]}
    assert rows["train_memory"]["status"] == rows["train_full"]["status"] == "ok"
    assert rows["train_full"]["weights"] == ("fp32 master, autocast bfloat16" if master else "bfloat16")
    assert next(base.parameters()).dtype == (torch.float32 if master else torch.bfloat16)


def test_the_frozen_floor_backpropagates_through_every_layer_and_leaves_the_base_alone():
    from gma6.bench import run_frozen_floor
    from gma6.model import split_segments

    base = tiny_gemma3()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    reached = []
    handle = base.model.layers[0].register_full_backward_hook(lambda m, gin, gout: reached.append(gout[0].abs().sum().item()))
    ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), 16)
    ran = []

    def loss_of(model, seg_ids, seg_mask, **kw):
        out = model(input_ids=seg_ids, attention_mask=seg_mask, labels=seg_ids, **kw)
        return out.loss, out

    def run(system, step, est):
        ran.append(system)
        step()

    try:
        run_frozen_floor(base, segs, loss_of, torch.device("cpu"), run)
    finally:
        handle.remove()
    assert ran == ["train_frozen"]
    assert len(reached) == len(segs) and all(g > 0 for g in reached)  # the backward reached the first layer
    assert not base.get_input_embeddings()._forward_hooks
    assert all(p.grad is None for p in base.parameters())  # no weight gradient was computed
    assert all(p.requires_grad for p in base.parameters())  # the flags it was handed over with
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_cli_times_several_training_steps_and_keeps_the_fastest(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import gma6.bench as bench
    from gma6.cli import app

    monkeypatch.setattr(bench, "load_model", lambda name, dtype, device: tiny_gemma3())
    out = tmp_path / "b.json"
    args = ["bench", "-c", "32", "-b", "1", "-s", "16", "--warmup", "0", "--system", "base_segments",
            "--train-context", "32", "--train-segment", "16", "--train-positions", "4", "--train-warmup", "0",
            "--train-steps", "2", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(out.read_text())["rows"] if r["system"].startswith("train_")]
    assert [r["system"] for r in rows] == ["train_memory", "train_frozen", "train_full", "train_full_context"]
    assert all(r["status"] == "ok" and r["repeats"] == 2 for r in rows)
    bad = CliRunner().invoke(app, [*args[:-3], "0", "--out", str(out)])
    assert bad.exit_code != 0 and "train_steps" in bad.output


def test_position_loss_is_the_cross_entropy_with_its_gradient():
    """The bench's loss recomputes its fp32 copies in backward (as ``gma6 train`` does): same value, same gradient."""
    from gma6.bench import position_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 11, (2, 3), generator=g)
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (want,) = torch.autograd.grad(ref, logits)
    got = position_loss(logits, targets)
    assert torch.equal(got, ref)
    assert torch.equal(torch.autograd.grad(got, logits)[0], want)
    with torch.no_grad():
        assert torch.equal(position_loss(logits, targets), ref)


def test_bench_shape_times_a_model_of_random_weights_of_a_config(tmp_path):
    """``gma6 bench --shape CONFIG``: the model built from the config with random weights (no checkpoint to load),
    named so in the results; with ``--model`` too, or a missing file, a clear error."""
    from typer.testing import CliRunner

    from gma6.bench import random_model
    from gma6.cli import app

    tiny_gemma3().config.to_json_file(tmp_path / "config.json")
    model = random_model(tmp_path / "config.json", "float32", "cpu")
    assert model.config.num_hidden_layers == tiny_gemma3().config.num_hidden_layers and not model.training
    assert torch.equal(random_model(tmp_path / "config.json", "float32", "cpu").lm_head.weight, model.lm_head.weight)
    out = tmp_path / "bench.json"
    args = ["bench", "--shape", str(tmp_path / "config.json"), "-c", "32", "-b", "1", "-s", "16", "--no-train",
            "--system", "base_segments", "--system", "memory", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["model"] == f"random weights, shape of {tmp_path / 'config.json'}"
    assert {r["system"] for r in data["rows"] if r["status"] == "ok"} == {"base_segments", "memory"}
    res = CliRunner().invoke(app, [*args, "--model", "x"])
    assert res.exit_code != 0 and "--shape and --model" in res.output
    with pytest.raises(FileNotFoundError, match="no such file"):
        random_model(tmp_path / "missing.json", "float32", "cpu")


def test_bench_plot_failing_midway_keeps_the_previous_png(tmp_path, monkeypatch):
    """The plot is written atomically: a savefig that fails leaves the last PNG whole and no temporary file."""
    from matplotlib.figure import Figure

    from gma6.bench import plot

    result = {"device": "cpu", "dtype": "float32", "date": "2026-11-27", "rows": [
        {"system": s, "context": 1024, "batch": 1, "segment": 512, "tokens_per_s": 1.0, "peak_mem_gib": 1.0,
         "status": "ok"} for s in SYSTEMS]}
    png = plot(result, tmp_path / "bench.png")
    before = png.read_bytes()

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot(result, png)
    assert png.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]


def test_the_whole_context_loss_scores_where_the_segments_are_scored():
    """``train_full_context`` reads the context in one pass and scores the positions ``train_full`` scores in each
    segment: with one segment the two losses are the same; with two the first segment's terms still are (the
    causal mask keeps them from the second), and the rest sees more context."""
    from gma6.bench import context_loss, position_loss
    from gma6.model import split_segments

    torch.manual_seed(0)
    base = tiny_gemma3()
    ids = torch.randint(3, 64, (2, 32))
    for seg, positions in ((32, 4), (16, 4), (16, None)):
        segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), seg)

        def seg_terms(seg_ids):
            if positions is None:
                return base(input_ids=seg_ids, labels=seg_ids).loss
            n = seg_ids.shape[1] - 1
            pos = torch.linspace(0, n - 1, min(positions, n)).round().long().unique()
            return position_loss(base(input_ids=seg_ids, logits_to_keep=pos).logits, seg_ids[:, pos + 1])

        whole = context_loss(base, ids, segs, positions)
        parts = [seg_terms(s) for s, _ in segs]
        if len(segs) == 1:
            assert torch.allclose(whole, parts[0], atol=1e-6)
        elif positions is not None:
            first = context_loss(base, ids, segs[:1], positions)  # the first segment's terms alone, in the whole pass
            assert torch.allclose(first, parts[0], atol=1e-6)
            assert not torch.allclose(whole, sum(parts), atol=1e-4)  # the second segment sees the first
        else:
            assert torch.isfinite(whole)


def test_the_whole_context_step_is_skipped_beyond_the_window():
    base = tiny_gemma3()
    base.config.max_position_embeddings = 16
    config = BenchConfig(contexts=[16], batches=[1], segments=[16], systems=["memory"], warmup=0,
                         train_context=32, train_segment=16, train_positions=4, memory=SMALL)
    rows = {r["system"]: r for r in run_bench(base, config, command="pytest", log=None)["rows"]}
    assert rows["train_full"]["status"] == "ok"
    assert rows["train_full_context"]["status"] == "skipped: context beyond the base's window (16 tokens)"
