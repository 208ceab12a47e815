"""Whole segments replayed from CUDA graphs (``segment_graph.py``, ``cuda_graph_segments``). Capturing needs a GPU
(``scripts/gpu_graph_read_check.py --variants eager,segments`` compares states and logits there); here: where a
replay may stand in for a call, and that everywhere else the read runs eagerly with the same result."""
from __future__ import annotations

import copy

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


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """CUDA's streams and graphs stood in for, so that GraphedCall's capture path runs on the CPU: a "capture" runs
    the function once (as recording does), a "replay" does nothing. ``failing.append(True)`` makes captures fail."""
    import contextlib

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

        def pool(self):
            return None

    failing: list[bool] = []

    @contextlib.contextmanager
    def capture(graph, pool=None):
        yield
        if failing:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    return failing


def test_a_forward_that_cannot_be_captured_gets_a_clear_error(stand_in_cuda):
    """What a capture refuses (a host sync inside the segment) surfaces as an error that names the option."""
    stand_in_cuda.append(True)
    calls = []
    graph = GraphedCall(lambda t: (calls.append(1) or t + 1,))
    with pytest.raises(RuntimeError, match="could not be captured .* run without cuda_graph_segments"):
        graph(torch.zeros(2))
    assert len(calls) == 3 and len(graph) == 0  # two warm-up calls and the capture; nothing kept


def test_a_graph_is_captured_once_a_shape_and_again_when_a_weight_changes(stand_in_cuda):
    """Replays reuse a shape's graph and copy its inputs in and its outputs out; a changed weight (a new version)
    means a new capture, since a graph reads what was derived from the weights when it was recorded; without a
    weights key (inference tensors) the function runs as it is."""
    from gma6.memory.attention import version_key

    w = torch.ones(3)
    calls = []
    graph = GraphedCall(lambda t: (calls.append(1) or t * w,), lambda: version_key([w]))
    with torch.no_grad():
        first = graph(torch.full((3,), 2.0))
        assert len(calls) == 3 and torch.equal(first[0], torch.full((3,), 2.0))
        graph(torch.full((3,), 5.0))
        assert len(calls) == 3 and len(graph) == 1  # replayed, not called
        w.mul_(3)  # an optimizer step
        graph(torch.full((3,), 5.0))
        assert len(calls) == 6 and len(graph) == 1  # recaptured in place of the stale one
        graph(torch.zeros(2, 3))
        assert len(calls) == 9 and len(graph) == 2  # a new shape
    eager = GraphedCall(lambda t: (calls.append(1) or t,), lambda: None)
    eager(torch.zeros(2))
    assert len(calls) == 10 and len(eager) == 0


def test_module_parameters_are_listed_again_only_when_the_module_tree_changes():
    """The cached list is the module's own ``parameters()``, the same list object while nothing changed, and listed
    anew after a parameter or a module is added, replaced or removed anywhere in the tree."""
    from torch import nn

    from gma6.segment_graph import ModuleParameters

    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    params = ModuleParameters(net)
    first = params()
    assert first == list(net.parameters()) and params() is first
    with torch.no_grad():
        net[0].weight.mul_(2)  # a value changes: the version key's business, not the list's
    assert params() is first
    changes = [
        lambda: setattr(net[1][0], "weight", nn.Parameter(torch.zeros(3, 3))),  # a parameter replaced, deep down
        lambda: net[1].add_module("extra", nn.Linear(3, 1)),  # a module added
        lambda: setattr(net[1], "1", nn.Linear(3, 3)),  # a module (without parameters) replaced by one with
        lambda: net[0].register_parameter("bias", None),  # a parameter removed
        lambda: net[1][0]._parameters.__setitem__("scale", nn.Parameter(torch.ones(1))),  # written straight in
    ]
    for change in changes:
        before = params()
        change()
        after = params()
        assert after is not before and after == list(net.parameters())


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


def test_a_read_takes_the_weights_key_once():
    """read() promises its weights do not change, so a segment graph's key is taken once a read (not at each of its
    segments); outside a read the key follows every change."""
    mm = _model(cuda_graph_segments=True)
    graph = mm._segment_graph
    with torch.no_grad():
        before = mm._weights_key()
        with mm._reading():
            assert graph._fixed == before
            with graph.weights_fixed():  # nested: the same key, the outer one kept after
                assert graph._fixed == before
            assert graph._fixed == before
        assert graph._fixed is None
        next(mm.controller.parameters()).add_(1.0)
        assert mm._weights_key() != before
    entered, reading = [], mm._reading
    mm._reading = lambda: entered.append(1) or reading()
    mm.read(torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(3)), segment_length=5)
    assert entered == [1]  # once for its four segments
    mm.detach()


def test_the_weights_key_sees_a_lora_added_and_a_module_replaced():
    """The segment graph's key lists the model's parameters once and again only when its module tree changes: a LoRA
    added to the base or a memory module replaced changes the key (a graph recorded before would replay without
    them), a read in between leaves it as it was."""
    mm = _model(cuda_graph_segments=True)
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = mm._weights_key()
        mm.read(ids, segment_length=5)
        assert mm._weights_key() == first
        mm.add_lora(2)
        with_lora = mm._weights_key()
        assert len(with_lora) > len(first)
        layer = mm.controller.layers[0]
        name, old = next(iter(layer.named_children()))
        setattr(layer, name, copy.deepcopy(old))  # the same values, new parameters
        assert mm._weights_key() != with_lora and len(mm._weights_key()) == len(with_lora)
    mm.detach()
