"""MemoryAttentionGate: the output phase. Tokens read the memory slots by cross-attention.

Dimensions: B batch, T tokens of the segment, H the base's hidden size, S slots, D slot width,
n heads, d = D / n.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


HALF = (torch.bfloat16, torch.float16)


def version_key(params: list[torch.Tensor]) -> tuple | None:
    """A key that changes whenever one of ``params`` does (optimizer steps, ``load_state_dict``, a
    move, a new ``.data``), or None where derived tensors must not be cached: under autograd
    (gradients must reach the parameters themselves) or for inference tensors, which keep no
    version counter."""
    if torch.is_grad_enabled():
        return None
    try:  # one pass: an inference tensor's version raises (a separate check for them cost a second pass)
        return tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in params)
    except RuntimeError:
        if any(p.is_inference() for p in params):
            return None
        raise


def derived(cache: dict, name: Any, params: list[torch.Tensor], make: Callable[[], Any]) -> Any:
    """``make()`` (tensors derived from ``params``: stacks, casts), kept in ``cache`` under ``name`` until one of
    ``params`` changes (``version_key``). Why: each stack or cast is a kernel a segment, which a launch-bound GPU,
    or a replayed one, pays for.

    Under autograd what it made, and its graph, is kept until a backward reaches it (a hook on its tensors) or a
    parameter changes: a training step's segments share one stack or cast and its backward runs once a step, not
    once a segment (its gradient then summed by autograd; before, the gradient of every parameter was added up
    segment by segment, a kernel each). A backward frees the saved tensors of what it ran through, so what one
    reached is made afresh. Inference tensors (no version counter) are never kept."""
    key = version_key(params)
    if key is not None:
        got = cache.get(name)
        if got is not None and got[0] == key:
            return got[1]
        got = None
        cache.pop(name, None)  # the stale value and any graph it holds go before the new one is made
        value = make()
        cache[name] = (key, value)
        return value
    if torch.is_grad_enabled():
        return _kept_until_backward(cache, name, params, make)
    cache.pop(name, None)
    return make()


def _kept_until_backward(cache: dict, name: Any, params: list[torch.Tensor], make: Callable[[], Any]) -> Any:
    try:
        key = ("autograd", tuple((id(p), p._version, p.data_ptr(), p.dtype, p.requires_grad) for p in params))
    except RuntimeError:  # an inference tensor: no version to key on
        key = None
    got = cache.get(name)
    if key is not None and got is not None and got[0] == key and got[2][0]:
        return got[1]
    # The stale value goes first (this reference too), with its graph: while that lives, so do its parameters'
    # gradient accumulators, and a new graph would reuse them with the stream they were made on (a CUDA graph
    # captured on another stream then fails).
    got = None
    cache.pop(name, None)
    # What its making saves for backward is kept by its own graph, never by an enclosing checkpoint's recomputation
    # (a later call, or the recomputation itself, finds it made: the checkpoint's count of saved tensors would differ)
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        value = make()
    tensors = [t for t in _tensors(value) if t.requires_grad]
    if key is None or not tensors:
        cache.pop(name, None)
        return value
    live = [True]

    def reached(_grad: torch.Tensor) -> None:
        live[0] = False

    for t in tensors:
        t.register_hook(reached)
    cache[name] = (key, value, live)
    return value


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def read_dtype(h_dtype: torch.dtype, param_dtype: torch.dtype, return_stats: bool = False) -> torch.dtype:
    """The dtype the read computes in: a half-precision base's own dtype at inference (why: no
    casts of the (B, T, H) stream, tensor-core matmuls, half the bytes), else the memory's.
    Training keeps fp32 (autocast decides there); the slots and the write stay fp32 always."""
    if h_dtype in HALF and param_dtype not in HALF and not return_stats and not torch.is_grad_enabled():
        return h_dtype
    return param_dtype


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, D) -> (B, n, N, d)."""
    b, n, dim = x.shape
    return x.view(b, n, heads, dim // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, n, N, d) -> (B, N, D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class MemoryAttentionGate(nn.Module):
    """Read the memory into the residual stream: ``h + rms(h) * W_o(g_out * attn(h, M))``.

    The output projection starts at zero, so a fresh gate returns ``h`` exactly. Scaling the
    read-out by the RMS of ``h`` makes its effect relative to the residual stream, whose norm in
    Gemma is large and varies by layer (why: one learning rate then suits every layer).
    """

    def __init__(self, hidden_size: int, dim: int, heads: int, gate_bias: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm_h = nn.RMSNorm(hidden_size, eps=1e-6)
        self.norm_m = nn.RMSNorm(dim, eps=1e-6)
        self.q = nn.Linear(hidden_size, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.gate = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)
        self._half_cache: dict[torch.dtype, tuple[tuple, dict[str, torch.Tensor]]] = {}

    def forward(
        self, h: torch.Tensor, memory: torch.Tensor, return_stats: bool = False, view: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the read-out to add to ``h`` (B, T, H) and optional statistics.

        Args:
            h: hidden states (B, T, H), any float dtype (only their RMS is used).
            memory: slots (B, S, D).
            return_stats: also return the mean output gate and the read-attention entropy.
            view: what the queries are made from (default ``h``); the model passes ``h`` through
                the base's own norm, which tames the residual stream's outlier dimensions.
            kv: the slots' keys and values (B, n, S, d) each, if already computed (the model computes
                every layer's at once, once a segment); else made from ``memory`` here.
        """
        dtype = read_dtype(h.dtype, self.q.weight.dtype, return_stats)
        if dtype != self.q.weight.dtype:
            return self._read_half(h, memory, view, kv, dtype), {}
        src = (h if view is None else view).to(self.q.weight.dtype)
        q = split_heads(self.q(self.norm_h(src)), self.heads)
        if kv is None:
            k, v = self.kv(self.norm_m(memory)).chunk(2, dim=-1)
            k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        else:
            k, v = (t.to(q.dtype) for t in kv)
        read = merge_heads(F.scaled_dot_product_attention(q, k, v))
        g_out = torch.sigmoid(self.gate(read))
        # RMS of h as one reduction, in fp32 without casting h first (fewer kernels in the hot path)
        scale = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=torch.float32)
        delta = self.out(g_out * read) * (scale * h.shape[-1] ** -0.5)
        stats: dict[str, torch.Tensor] = {}
        if return_stats:
            with torch.no_grad():
                att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                stats["output_gate"] = g_out.mean(dim=(1, 2))
                stats["read_entropy"] = -(att * att.clamp_min(1e-12).log()).sum(-1).mean(dim=(1, 2))
        return delta, stats

    def _half_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The read's token-side weights in ``dtype``, cached until a parameter changes."""
        params = [self.norm_h.weight, self.q.weight, self.gate.weight, self.gate.bias, self.out.weight]
        key = version_key(params)
        cached = self._half_cache.get(dtype)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        w = dict(zip(("norm_h", "q", "gate", "gate_b"), (p.detach().to(dtype) for p in params[:-1])))
        w["out"] = (self.out.weight.detach() * self.out.weight.shape[0] ** -0.5).to(dtype)  # RMS = norm / sqrt(H)
        if key is not None:
            self._half_cache = {dtype: (key, w)}
        return w

    def _read_half(
        self, h: torch.Tensor, memory: torch.Tensor, view: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None, dtype: torch.dtype,
    ) -> torch.Tensor:
        """``forward``'s maths in the base's half precision (inference only; see ``read_dtype``)."""
        w = self._half_weights(dtype)
        src = h if view is None else view
        src = src if src.dtype == dtype else src.to(dtype)
        q = split_heads(F.linear(F.rms_norm(src, (src.shape[-1],), w["norm_h"], self.norm_h.eps), w["q"]), self.heads)
        if kv is None:
            k, v = self.kv(self.norm_m(memory)).to(dtype).chunk(2, dim=-1)
            k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        else:
            k, v = kv if kv[0].dtype == dtype else (t.to(dtype) for t in kv)
        read = merge_heads(F.scaled_dot_product_attention(q, k, v))
        g_out = torch.sigmoid(F.linear(read, w["gate"], w["gate_b"]))
        # the 1/sqrt(H) of the RMS sits in w["out"]; the norm accumulates in fp32 inside the kernel,
        # and leaves it in fp32 where fp16's range could not hold it
        if dtype == torch.float16:
            norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=torch.float32).to(dtype)
        else:
            norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        return F.linear(g_out * read, w["out"]) * norm
