"""``gma6 train`` end to end in a subprocess on a tiny Gemma 3: a run, and a second one started from
the first one's adapter (``--init-adapter``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from test_cli_eval import _gma6, tiny_checkpoint  # noqa: F401  (module-scoped fixture)

pytest.importorskip("peft")

COMMON = ["--segment-length", "48", "--batch-size", "2", "--steps-per-stage", "2", "--log-every", "1",
          "--slots", "4", "--memory-dim", "16", "--heads", "2", "--workers", "0"]


def _train(model, out, *extra):
    r = _gma6("train", "--model", str(model), "--out", str(out), *COMMON, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_init_adapter_starts_from_its_weights_and_keeps_its_config(tiny_checkpoint, tmp_path):  # noqa: F811
    _train(tiny_checkpoint, tmp_path / "a", "--curriculum", "1", "--lora-rank", "4")
    first = tmp_path / "a" / "adapter"
    # A different memory shape on the command line is replaced by the adapter's; lr ~0 keeps its weights.
    _train(tiny_checkpoint, tmp_path / "b", "--curriculum", "2", "--init-adapter", str(first), "--lr", "1e-12",
           "--slots", "8")
    second = tmp_path / "b" / "adapter"
    assert json.loads((second / "gma6_config.json").read_text())["num_slots"] == 4
    for name in ("memory_adapter.safetensors", "lora_adapter.safetensors"):
        a, b = load_file(str(first / name)), load_file(str(second / name))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    meta = json.loads((second / "training.json").read_text())
    assert meta["train_config"]["lora_rank"] == 4 and "--init-adapter" in meta["command"]
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[0]["segments"] == 2 and log[0]["grad_norm"] > 0  # memory and LoRA still trainable


def test_init_adapter_refusals(tiny_checkpoint, tmp_path):  # noqa: F811
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *COMMON,
              "--init-adapter", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and "--init-adapter" in r.stderr and "gma6_config.json" in r.stderr
    _train(tiny_checkpoint, tmp_path / "a", "--curriculum", "1", "--lora-rank", "4")
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "y"), *COMMON,
              "--init-adapter", str(tmp_path / "a" / "adapter"), "--lora-rank", "8")
    assert r.returncode != 0 and "lora_rank=4" in r.stderr


def test_an_out_path_that_is_a_file_is_refused_and_left_alone(tiny_checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(out), *COMMON, "--curriculum", "1")
    assert r.returncode != 0 and "--out" in r.stderr and "not a folder" in r.stderr
    assert "Traceback" not in r.stderr and out.read_text() == "mine"


def test_addressing_and_in_context_reach_the_adapter_and_the_run(tiny_checkpoint, tmp_path):  # noqa: F811
    _train(tiny_checkpoint, tmp_path / "u", "--curriculum", "1", "--addressing", "content+usage")
    assert json.loads((tmp_path / "u" / "adapter" / "gma6_config.json").read_text())["addressing"] == "content+usage"
    _train(tiny_checkpoint, tmp_path / "c", "--curriculum", "1", "--lora-rank", "4", "--in-context")
    meta = json.loads((tmp_path / "c" / "adapter" / "training.json").read_text())
    assert meta["train_config"]["in_context"] is True
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *COMMON, "--in-context")
    assert r.returncode != 0 and "lora_rank" in r.stderr


def test_the_base_read_with_a_supervised_write_trains_from_the_command_line(tiny_checkpoint, tmp_path):  # noqa: F811
    base_read = ["--write-rule", "tokens", "--read-rule", "base", "--memory-dim", "0", "--tokens-per-segment", "4",
                 "--token-retention", "priority", "--usage-decay", "0.99", "--read-rank", "2", "--layers", "0,1"]
    _train(tiny_checkpoint, tmp_path / "b", "--curriculum", "2", "--select-weight", "1", *base_read)
    cfg = json.loads((tmp_path / "b" / "adapter" / "gma6_config.json").read_text())
    assert (cfg["read_rule"], cfg["write_rule"], cfg["token_retention"], cfg["read_rank"]) == ("base", "tokens", "priority", 2)
    assert cfg["read_site"] == "residual"
    _train(tiny_checkpoint, tmp_path / "a", "--curriculum", "1", *base_read, "--read-site", "attention")
    assert json.loads((tmp_path / "a" / "adapter" / "gma6_config.json").read_text())["read_site"] == "attention"
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert all(r["write_select"] is not None and r["write_select"] > 0 for r in log)
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *COMMON, "--read-rule", "base",
              "--write-rule", "tokens")  # slots 16 wide, the model's hidden size is not
    assert r.returncode != 0 and "memory_dim" in r.stderr
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "y"), *COMMON, "--select-weight", "1")
    assert r.returncode != 0 and "--write-rule tokens" in r.stderr
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "z"), *COMMON, "--read-site", "attention")
    assert r.returncode != 0 and "read_site='attention'" in r.stderr


def test_the_structured_text_kl_term_from_the_command_line(tiny_checkpoint, tmp_path):  # noqa: F811
    _train(tiny_checkpoint, tmp_path / "t", "--curriculum", "1", "--text-kl-weight", "2", "--text-kl-rows", "1",
           "--text-kl-segments", "2")
    meta = json.loads((tmp_path / "t" / "adapter" / "training.json").read_text())
    assert (meta["train_config"]["text_kl_weight"], meta["train_config"]["text_kl_rows"],
            meta["train_config"]["text_kl_segments"]) == (2.0, 1, 2)
    log = [json.loads(x) for x in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert all(r["text_kl"] is not None and r["text_kl"] >= 0 for r in log)
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *COMMON,
              "--text-kl-weight", "1", "--text-kl-rows", "0")
    assert r.returncode != 0 and "text_kl_rows=0" in r.stderr


def test_persistent_slots_and_their_rate_from_the_command_line(tiny_checkpoint, tmp_path):  # noqa: F811
    base_read = ["--write-rule", "tokens", "--read-rule", "base", "--memory-dim", "0", "--tokens-per-segment", "4",
                 "--token-retention", "priority", "--layers", "0,1"]
    _train(tiny_checkpoint, tmp_path / "p", "--curriculum", "1", *base_read, "--persistent-slots", "2",
           "--persistent-lr", "0.05")
    assert json.loads((tmp_path / "p" / "adapter" / "gma6_config.json").read_text())["persistent_slots"] == 2
    assert json.loads((tmp_path / "p" / "adapter" / "training.json").read_text())["train_config"]["persistent_lr"] == 0.05
    # from an adapter that has them: allowed; without any: refused before the model loads
    _train(tiny_checkpoint, tmp_path / "q", "--curriculum", "1", "--init-adapter", str(tmp_path / "p" / "adapter"),
           "--persistent-lr", "0.01")
    r = _gma6("train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), *COMMON, *base_read,
              "--persistent-lr", "0.01")
    assert r.returncode != 0 and "--persistent-lr needs persistent slots" in r.stderr


def test_gma6_train_under_torchrun_trains_one_adapter_from_two_processes(tiny_checkpoint, tmp_path):  # noqa: F811
    """The launcher path: ``torchrun --nproc-per-node 2 -m gma6.cli train ...`` on this CPU (gloo). One log and one
    adapter, written by the first process; the log says two processes took part."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "gma6.cli", "train", "--model", str(tiny_checkpoint), "--out", str(out), *COMMON,
                        "--curriculum", "1"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(x["processes"] == 2 for x in log)
    assert json.loads((out / "adapter" / "training.json").read_text())["processes"] == 2
    assert r.stdout.count("done: step 2") == 1  # only the first process reports
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "gma6.cli", "train", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "odd"),
                        *COMMON, "--curriculum", "1", "--batch-size", "3"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode != 0 and "cannot be split evenly over WORLD_SIZE=2" in r.stderr
