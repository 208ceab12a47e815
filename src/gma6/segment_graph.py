"""A whole segment's forward replayed from one CUDA graph (``GMA6Config.cuda_graph_segments``).

Why: on a GPU the 270M's segment is host-bound — the bare base issues ~1600 kernels a segment of 8 x 1024 tokens
in ~24 ms of host for ~18 ms of kernels, and the memory's hooks add host time at every layer. A graph replays every
kernel of the segment (the base's and the memory's) from one launch, so the GPU runs at its kernels' pace. Replaying
is exact where the same kernels run on the same shapes, which ``read()``'s full segments do: the tokens and the
memory state are copied into the graph's fixed inputs, and its outputs are copied out.

The bare base can be replayed the same way (``gma6 bench --cuda-graph-segments`` does both), which is the fair
floor for a replayed memory: a replayed memory against an eagerly run base would compare launch overheads.
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .memory.attention import version_key

# Graphs kept (each holds its own inputs and, shared with the others, a memory pool): a read meets at most two
# shapes (its full segments and the last); beyond, all are dropped and captured anew.
_MAX_GRAPHS = 4


class CaptureError(RuntimeError):
    """The recording itself failed (a host sync, a tensor's value read on the host): ``capture``'s warm-up ran."""


def capture(run: Callable[[], Any], device: torch.device, pool: Any = None, warmups: int = 1) -> tuple[Any, Any]:
    """``run()`` recorded into a CUDA graph sharing ``pool`` (graphs replayed one after another can), after ``warmups``
    calls on a side stream: lazy initialisations, caches and kernel compiles happen outside the capture. Returns the
    graph and what the recorded call returned (in the graph's memory: the next replay overwrites it). A failure
    while recording raises ``CaptureError`` (its message the original's)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = run()
    except RuntimeError as e:
        raise CaptureError(str(e)) from e
    return graph, out


class ModuleParameters:
    """``list(module.parameters())``, listed again only where the module tree changed since: a module or parameter
    added, removed or replaced anywhere in it (checked by identity against the tree as last listed).

    Why: a replay's weights key (``version_key`` of the parameters) is taken once a read, before its first replay,
    and walking the tree of the 270M base and its memory (~520 modules) was most of the host time a short read made
    the GPU wait (with the rest of session 19's changes, that wait fell from 2.20 to 1.36 ms on the H200:
    ``results/session19/parts/``); the identity check is a flat pass over the same tree."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._modules: list[nn.Module] = []
        self._tree: list[Any] | None = None
        self._params: list[nn.Parameter] = []

    def _shape(self) -> list[Any]:
        # each module, then its children and parameters: a change anywhere changes an entry or the length
        return [x for m in self._modules for x in (m, *m._modules.values(), *m._parameters.values())]

    def __call__(self) -> list[nn.Parameter]:
        tree = None if self._tree is None else self._shape()
        if tree is None or len(tree) != len(self._tree) or not all(map(operator.is_, tree, self._tree)):
            self._modules = list(self._module.modules())
            self._tree = self._shape()
            self._params = list(self._module.parameters())
        return self._params

    def key(self) -> tuple | None:
        """``version_key`` of the parameters: what a ``GraphedCall``'s graphs are recorded with."""
        return version_key(self())


class GraphedCall:
    """``fn(*tensors) -> tuple of tensors``, replayed from a CUDA graph captured once per input shape and dtype.

    ``fn`` must run the same kernels for inputs of the same shapes, without host syncs or reading tensors' values
    on the host (CUDA graphs record kernels, not Python). The outputs returned are copies (the next replay
    overwrites the graph's own)."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]],
                 weights_key: Callable[[], tuple | None] | None = None) -> None:
        """``weights_key``: a key of what ``fn`` reads besides its arguments (``version_key`` of its parameters): a
        graph replays the kernels it recorded, which read tensors derived from the weights at capture (cached
        casts and stacks), so a changed weight means a new capture; None from it means no replay (run ``fn``)."""
        self._fn = fn
        self._weights_key = weights_key
        self._graphs: dict[tuple, tuple] = {}  # shapes -> (weights key, graph, inputs, outputs)
        self._pool = None
        self._fixed: tuple | None = None

    @contextmanager
    def weights_fixed(self) -> Iterator[None]:
        """Inside, the weights' key is taken once, at entry (nothing may change the weights within): host time a
        call saves, as ``MemoryModel.read`` takes its own once a read."""
        previous = self._fixed
        self._fixed = self._weights_key() if self._weights_key is not None else ()
        try:
            yield
        finally:
            self._fixed = previous

    @staticmethod
    def usable(*args: torch.Tensor) -> bool:
        """Whether a replay can stand in for ``fn(*args)``: CUDA tensors, no autograd, not inside another capture,
        not under ``torch.inference_mode`` (its tensors could not be copied into the graph's inputs later)."""
        return (all(a.is_cuda for a in args) and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                and not torch.cuda.is_current_stream_capturing())

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._fixed is not None:
            weights = self._fixed
        else:
            weights = self._weights_key() if self._weights_key is not None else ()
        if weights is None:
            return tuple(self._fn(*args))
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self._graphs.get(key)
        if entry is None or entry[0] != weights:
            self._graphs.pop(key, None)  # recorded with other weights: dropped with its buffers
            if len(self._graphs) >= _MAX_GRAPHS:
                self.clear()
            entry = self._graphs[key] = (weights, *self._capture(args))
        _, graph, inputs, outputs = entry
        for fixed, a in zip(inputs, args):
            fixed.copy_(a)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(self, args: tuple[torch.Tensor, ...]):
        inputs = tuple(a.clone() for a in args)
        try:
            graph, outputs = capture(lambda: tuple(self._fn(*inputs)), inputs[0].device, self._pool, warmups=2)
        except CaptureError as e:
            raise RuntimeError(
                f"gma6: a CUDA graph of the segment could not be captured ({e}): the forward does something a graph "
                "cannot record (a host sync, a tensor's value read on the host); run without cuda_graph_segments"
            ) from e
        self._pool = graph.pool()
        return graph, inputs, outputs

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self._graphs.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)
