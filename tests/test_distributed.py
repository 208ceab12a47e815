"""gma6.distributed: data-parallel training in several processes (gloo on this CPU) equals one process with the
whole batch, the replicas stay equal, and only the first writes."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gma6.distributed import Replicas
from gma6.training import make_batch, train

from test_training import TOK, fresh, small_cfg

KW = dict(curriculum=[1, 2], steps_per_stage=3, batch_size=4, lr=1e-2, questions_per_context=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world: int, port: int, out: str, stops: tuple[int | None, ...] = (None,)) -> None:
    """Train in a process group of ``world``; each of ``stops`` is a run until that step (None: to the end), each
    from fresh weights and the checkpoint the last left, as a relaunch after a kill would."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for stop in stops:
            mm = fresh()
            train(mm, TOK, small_cfg(**KW), out, progress=False, max_steps=stop)
        torch.save([p.detach() for p in mm.controller.parameters()], os.path.join(out, f"replica{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_train_as_one_with_the_whole_batch(tmp_path):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    mp.spawn(_replica, args=(2, _free_port(), str(ddp)), nprocs=2, join=True)
    single = fresh()
    train(single, TOK, small_cfg(**KW), one, progress=False)
    r0, r1 = torch.load(ddp / "replica0.pt"), torch.load(ddp / "replica1.pt")
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))  # the replicas never drift apart
    want = [p.detach() for p in single.controller.parameters()]
    assert any((w - p).abs().max() > 1e-3 for w, p in zip(want, fresh().controller.parameters()))  # it trained
    assert all(torch.allclose(a, w, atol=1e-5) for a, w in zip(r0, want))
    # one log, written once a step, its loss the mean over the replicas = the whole batch's
    logs = [json.loads(x) for x in (ddp / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [r["step"] for r in ref] == list(range(1, 7))
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 and a["processes"] == 2 for a, b in zip(logs, ref))
    assert json.loads((ddp / "adapter" / "training.json").read_text())["processes"] == 2


def test_a_replica_takes_every_worlds_row_of_the_same_samples():
    cfg = small_cfg(batch_size=4, tasks=["qa1", "qa2"], questions_per_context=2, num_facts=4)
    whole = make_batch(cfg, 3, TOK, 1)
    part = make_batch(cfg, 3, TOK, 1, rows=Replicas(1, 2).rows(4))
    assert list(Replicas(1, 2).rows(4)) == [1, 3]
    for local, j in enumerate([1, 3]):
        n = int(part.context_mask[local].sum())
        assert torch.equal(part.context[local, :n], whole.context[j, :n])
    # its questions are the whole batch's about those contexts, their sources indexed locally
    mine = [i for i, j in enumerate(whole.question_source.tolist()) if j in (1, 3)]
    assert part.question_source.tolist() == [(whole.question_source[i].item() - 1) // 2 for i in mine]
    for local, i in enumerate(mine):
        assert torch.equal(part.question[local][part.question_mask[local]], whole.question[i][whole.question_mask[i]])


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="batch of 3 rows cannot be split evenly over 2 processes"):
        Replicas(0, 2).rows(3)
    one = Replicas.current()
    assert (one.rank, one.world, one.main) == (0, 1, True)
    assert one.mean({"a": 1.5, "b": None}, torch.device("cpu")) == {"a": 1.5, "b": None}


def test_a_data_parallel_run_stopped_and_resumed_equals_one_never_stopped(tmp_path):
    """The first process writes the checkpoint; every process resumes from it (weights, optimizer, schedule, data
    position): stopped at step 4 and relaunched, the run ends where an uninterrupted one does."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    mp.spawn(_replica, args=(2, _free_port(), str(whole)), nprocs=2, join=True)
    mp.spawn(_replica, args=(2, _free_port(), str(resumed), (4, None)), nprocs=2, join=True)
    a, b = torch.load(whole / "replica0.pt"), torch.load(resumed / "replica0.pt")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(b, torch.load(resumed / "replica1.pt")))
    steps = [json.loads(x)["step"] for x in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
