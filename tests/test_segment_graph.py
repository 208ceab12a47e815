"""Whole segments replayed from CUDA graphs (``segment_graph.py``, ``cuda_graph_segments``). Capturing needs a GPU
(``scripts/gpu_graph_read_check.py --variants eager,segments`` compares states and logits there); here: where a
replay may stand in for a call, and that everywhere else the read runs eagerly with the same result."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_gemma3, trained_base_read
from gma6 import GMA6Config
from gma6.bench import BenchConfig, _graphed_base, _runner
from gma6.segment_graph import GraphedCall


def _model(**kw):
    return trained_base_read(tiny_gemma3(layers=4).float(), read_rank=2, **kw)


def test_a_replay_never_stands_in_for_a_cpu_call():
    x = torch.zeros(2, 3)
    assert not GraphedCall.usable(x)
    with torch.no_grad():
        assert not GraphedCall.usable(x)
    calls = []
    graph = GraphedCall(lambda t: (calls.append(1) or t + 1,))
    assert len(graph) == 0 and not calls  # nothing captured before a call


def test_a_forward_that_cannot_be_captured_gets_a_clear_error(monkeypatch):
    """What a capture refuses (a host sync inside the segment) surfaces as an error that names the option; CUDA's
    streams and graphs are stood in for, so that the capture path runs here."""
    import contextlib

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def capture(graph, pool=None):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", capture)
    calls = []
    graph = GraphedCall(lambda t: (calls.append(1) or t + 1,))
    with pytest.raises(RuntimeError, match="could not be captured .* run without cuda_graph_segments"):
        graph(torch.zeros(2))
    assert len(calls) == 3 and len(graph) == 0  # two warm-up calls and the capture; nothing kept


def test_off_cuda_the_read_runs_eagerly_and_equals_the_plain_read():
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    plain, graphed = _model(), _model(cuda_graph_segments=True)
    assert plain._segment_graph is None and graphed._segment_graph is not None
    want, got = plain.read(ids, segment_length=5), graphed.read(ids, segment_length=5)
    assert torch.equal(got.memory, want.memory) and torch.equal(got.usage, want.usage)
    assert got.segments_read == want.segments_read == 4 and len(graphed._segment_graph) == 0
    graphed.detach()
    with pytest.raises(ValueError, match="cuda_graph_segments=1: expected True or False"):
        GMA6Config(cuda_graph_segments=1)


def test_the_bench_replays_the_bare_base_only_beside_a_replayed_memory():
    """``gma6 bench --cuda-graph-segments`` times both systems replayed (the fair floor); on the CPU both run
    eagerly, the bench's runners unchanged."""
    plain, graphed = _model(), _model(cuda_graph_segments=True)
    assert _graphed_base(plain) is None and isinstance(_graphed_base(graphed), GraphedCall)
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    for system in ("base_segments", "memory"):
        _runner(system, graphed, ids, 5, _graphed_base(graphed))()
    assert len(graphed._segment_graph) == 0
    assert BenchConfig().memory.cuda_graph_segments is False
