"""Each memory layer's read replayed from a CUDA graph (``GMA6Config.cuda_graph_read``).

Why: on a GPU the bare 270M's segment is host-bound (H200, 8 x 1024 tokens: 23.8 ms of host for 17.8 ms of kernels),
and the default's read adds ~0.33 ms of host at each of 17 layers (its query adapter's ~14 operations and the
hooks' Python) while its kernels would nearly fit in the time the GPU already waits. A graph launches a layer's read
in one call: per layer and segment two copies of the q projection's input and output (or the base's query) into
fixed buffers and one replay; the slots of every layer are copied into fixed buffers once a segment.

Used only where it is exact to replay: CUDA, no autograd, full segments at positions 0..T-1 (``read()``'s steps, a
forward without a padding mask), a q-norm that folds into one rms_norm. Anything else takes the eager read. A graph
is captured per layer, shape, dtype and adapter weights (their cast copies: a changed weight is a new capture).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..segment_graph import capture
from .base_read import rotated_read

# Captured graphs kept (each holds its buffers, ~40 MB at 8 x 1024 tokens in bf16, and keeps the adapter weights it
# read alive, so a changed weight never aliases a stale graph); beyond, all are dropped and captured anew.
_MAX_GRAPHS = 72


class GraphedReads:
    """The fixed buffers and captured graphs of one ``MemoryModel``'s reads."""

    def __init__(self, fn: Callable[..., torch.Tensor] = rotated_read) -> None:
        self._fn = fn  # what a graph replays: rotated_read, or the same maths as one kernel (triton_read)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self._slots: tuple[torch.Tensor, ...] | None = None
        self._pool: Any = None
        # rotary tables of positions 0..T-1 (BaseAttentionRead.plain_tables): the same tensors every segment
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def stage(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's slot keys, values and mask (L leading) copied into fixed buffers, which the graphs read."""
        if (not k.is_cuda or torch.is_grad_enabled() or torch.is_inference_mode_enabled()
                or torch.cuda.is_current_stream_capturing()):  # a whole segment's graph records the eager read
            return k, v, mask  # inference tensors could not be written outside inference mode later
        if self._slots is None or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(self._slots, (k, v, mask))):
            self._slots = (torch.empty_like(k), torch.empty_like(v), torch.empty_like(mask))
            self.clear()
        for fixed, new in zip(self._slots, (k, v, mask)):
            fixed.copy_(new)
        return self._slots

    def staged(self, k: torch.Tensor) -> bool:
        """Whether ``k`` (one layer's slot keys) lives in the fixed buffers (a graph may read it in place)."""
        return self._slots is not None and k.untyped_storage().data_ptr() == self._slots[0].untyped_storage().data_ptr()

    def clear(self) -> None:
        """Drop the captured graphs (their buffers and pool with them)."""
        self._graphs.clear()

    def release(self) -> None:
        """Drop everything held: the graphs and the slots' fixed buffers (``detach``)."""
        self.clear()
        self._slots, self._pool = None, None
        self.tables.clear()

    def read(self, slot: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
             view: torch.Tensor | None, down: torch.Tensor | None, up: torch.Tensor | None,
             tables: tuple[torch.Tensor, torch.Tensor] | None, q_pre: torch.Tensor | None, gain: torch.Tensor | None,
             eps: float) -> torch.Tensor:
        """``rotated_read`` of layer ``slot`` replayed from its graph (captured on first use). The result is a fixed
        buffer: use it before this layer's next read."""
        moving = {"q": q} if q_pre is None else {}
        if down is not None:
            moving["view"] = view
        if q_pre is not None:
            moving["q_pre"] = q_pre
        fixed = tuple((id(t), t._version) for t in (down, up, gain, *(tables or ())) if t is not None)
        key = (slot, q.dtype, tuple((n, tuple(t.shape), t.dtype) for n, t in moving.items()), k.data_ptr(),
               tuple(k.shape), fixed, scaling, eps)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= _MAX_GRAPHS:
                self.clear()
            entry = self._capture(moving, q, k, v, mask, scaling, view, down, up, tables, q_pre, gain, eps)
            self._graphs[key] = entry
        graph, buffers, out = entry
        for name, t in moving.items():
            buffers[name].copy_(t)
        graph.replay()
        return out

    def _capture(self, moving: dict[str, torch.Tensor], q, k, v, mask, scaling, view, down, up, tables, q_pre, gain, eps):
        buffers = {name: t.clone() for name, t in moving.items()}

        def run() -> torch.Tensor:
            return self._fn(buffers.get("q", q), k, v, mask, scaling, buffers.get("view"), down, up, tables,
                            buffers.get("q_pre"), gain, eps)

        graph, out = capture(run, q.device, self._pool)
        self._pool = graph.pool()  # the layers' graphs replay one after another: they can share one pool
        return graph, buffers, out
