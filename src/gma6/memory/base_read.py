"""The "base" read: memory slots read through a decoder layer's own attention weights.

Dimensions: B batch, T tokens of the segment, H hidden size, S slots, n query heads, g key/value
heads, d head width.

The slots hold what the next layer's attention would have taken as keys and values had those tokens
still been in the window (its input norm's output). Reading them with that layer's own ``q/k/v/o``
projections, norms and RoPE (slots at positions ``0..S-1`` in the order they were read, the segment's
tokens after them) gives at initialisation what the base itself makes of those tokens: what the
memory's training has to learn is which tokens to keep and how much of the read to let in.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..integration import norm_eps, rms_gain
from .attention import derived

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The base's rotary-embedding module (``...RotaryEmbedding``), or None if it has none."""
    for m in model.modules():
        if "rotary" in type(m).__name__.lower():
            return m
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class BaseAttentionRead:
    """Reads slots through ``layer``'s self-attention. Holds references to the base's modules, not
    copies (a plain object, so they never enter the adapter's ``state_dict``); the learned parts
    (gate, sink) are passed in by the memory layer that owns them."""

    def __init__(self, layer: nn.Module, rotary: nn.Module | None, query_after_norm: bool = False) -> None:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(isinstance(getattr(attn, p, None), nn.Module) for p in _PROJECTIONS):
            raise TypeError(f"read_rule='base' needs a decoder layer with self_attn.{{{', '.join(_PROJECTIONS)}}}; "
                            f"{type(layer).__name__} has none")
        self.attn = attn
        # GMA6Config.read_query: the query adapter's change added after the q-norm ("after_norm") or before it
        self.query_after_norm = query_after_norm
        self.head_dim = int(getattr(attn, "head_dim"))
        # the q projection's width (heads x head width): what a read inside the attention adds to
        heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
        self.width = int(heads) * self.head_dim if isinstance(heads, int) else int(getattr(attn.q_proj, "out_features"))
        self.groups = int(getattr(attn, "num_key_value_groups", 1))
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        # q_norm and k_norm as one fused rms_norm each where they are RMSNorms (Gemma's 1 + w, Qwen's w): the base's own is
        # several kernels, paid at every memory layer of every segment (None: call the base's module)
        self._q_fold, self._k_fold = self._fold(self.q_norm), self._fold(self.k_norm)
        self._gains: dict[tuple, torch.Tensor] = {}
        # Gemma 2/3 normalise the attention's output before the residual (and have a separate
        # pre-feed-forward norm); in Llama-style layers "post_attention_layernorm" is the MLP's input norm.
        self.post_norm = getattr(layer, "post_attention_layernorm", None) if hasattr(layer, "pre_feedforward_layernorm") else None
        self.rotary = rotary
        # Gemma 3 keeps one rotary table per layer type (local/global); Qwen2, Gemma 2 etc. name a layer
        # type on the attention but have one table and take no such argument.
        per_type = isinstance(getattr(rotary, "rope_type", None), dict)
        self.layer_type = getattr(attn, "layer_type", None) if per_type else None

    def _fold(self, norm: nn.Module | None) -> tuple[torch.Tensor, float] | None:
        if norm is None:
            return None
        eps = norm_eps(norm)
        gain = rms_gain(norm, self.head_dim) if eps is not None else None
        return None if gain is None else (gain, eps)

    def _norm(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """x (..., d) through the layer's q_norm or k_norm (``which``), in fp32 as Gemma's and Qwen's own
        norms compute it."""
        gain, eps = self._folded(which, x.device)
        if gain is None:
            return (self.q_norm if which == "q" else self.k_norm)(x)
        return F.rms_norm(x.float(), (x.shape[-1],), gain, eps).to(x.dtype)

    def _folded(self, which: str, device: torch.device) -> tuple[torch.Tensor | None, float]:
        """The q_norm or k_norm (``which``) folded into one rms_norm: its fp32 gain on ``device`` (cached) and eps;
        (None, 0.0) where it does not fold (no such norm, or one of another kind)."""
        fold = self._q_fold if which == "q" else self._k_fold
        if fold is None:
            return None, 0.0
        key = (which, device)
        if key not in self._gains:
            self._gains[key] = fold[0].to(device, torch.float32)
        return self._gains[key], fold[1]

    def _cos_sin(self, like: torch.Tensor, positions: torch.Tensor, cache: dict | None, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for ``positions`` (B or 1, N), as (B or 1, 1, N, d) in ``like``'s dtype; kept in
        ``cache`` under ``key`` + this layer's type (every memory layer of one forward shares them: the
        rotary module recomputes its tables on every call, a dozen kernels each)."""
        full_key = (*key, self.layer_type, like.dtype)
        if cache is not None and full_key in cache:
            return cache[full_key]
        args = (like, positions) if self.layer_type is None else (like, positions, self.layer_type)
        cos, sin = self.rotary(*args)
        out = (cos[:, None].to(like.dtype), sin[:, None].to(like.dtype))
        if cache is not None:
            cache[full_key] = out
        return out

    def _cos_signed_sin(self, like: torch.Tensor, positions: torch.Tensor | None, cache: dict | None, key: tuple,
                        offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``_cos_sin`` for ``positions + offset`` (None: ``0..N-1``, N = ``like``'s second-last size) with the
        sine's first half negated: ``rotate_half(x) * sin == roll(x) * signed_sin``, two kernels fewer than the
        rotate-half form. Cached under ``key``: the positions are computed only on a miss."""
        full_key = (*key, "signed", self.layer_type, like.dtype)
        if cache is not None and full_key in cache:
            return cache[full_key]
        if positions is None:
            positions = torch.arange(like.shape[-2], device=like.device)[None]
        cos, sin = self._cos_sin(like, positions + offset if offset else positions, cache, key)
        half = sin.shape[-1] // 2
        out = (cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1))
        if cache is not None:
            cache[full_key] = out
        return out

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, cache: dict | None = None, key: tuple = ()) -> torch.Tensor:
        """x (B, heads, N, d) rotated for ``positions`` (B or 1, N): the rotate-half RoPE of Llama,
        Gemma, Qwen and Mistral (a family with another rotary layout needs its own)."""
        if self.rotary is None:
            return x
        cos, sin = self._cos_sin(x, positions, cache, key)
        return x * cos + _rotate_half(x) * sin

    def _project_slots(
        self, slots: torch.Tensor, dtype: torch.dtype, k_adapter: nn.Module | None, v_adapter: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots (B, S, H) through this layer's k and v projections (each input first changed by the
        memory's adapter, if any): (B, S, g, d) each, not yet normed or rotated."""
        attn, d = self.attn, self.head_dim
        b, s, _ = slots.shape
        slots = slots.to(dtype)
        k_in = slots if k_adapter is None else slots + k_adapter(slots)
        v_in = slots if v_adapter is None else slots + v_adapter(slots)
        return attn.k_proj(k_in).view(b, s, -1, d), attn.v_proj(v_in).view(b, s, -1, d)

    def slot_keys_values(
        self, slots: torch.Tensor, dtype: torch.dtype, k_adapter: nn.Module | None = None, cache: dict | None = None,
        v_adapter: nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots (B, S, H) as this layer's keys and values, each (B, n, S, d): projected, k-normed,
        keys rotated for positions ``0..S-1`` and both repeated over the query groups."""
        s = slots.shape[1]
        k, v = (x.transpose(1, 2) for x in self._project_slots(slots, dtype, k_adapter, v_adapter))  # (B, g, S, d)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = self._rope(k, torch.arange(s, device=slots.device)[None], cache, ("slots", s))
        if self.groups > 1:
            k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        return k, v

    def queries(self, q: torch.Tensor, positions: torch.Tensor | None, s: int, cache: dict | None = None,
                change: torch.Tensor | None = None) -> torch.Tensor:
        """The q projection's output (B, T, n*d) as this layer's queries (B, n, T, d), q-normed (then
        ``change`` (B, T, n*d) added, ``read_query="after_norm"``) and rotated for ``positions + s`` (the segment
        reads the slots as the tokens just before it)."""
        b, t, _ = q.shape
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if change is not None:
            q = q + change.view(b, t, -1, self.head_dim).transpose(1, 2).to(q.dtype)
        if positions is None:
            positions = torch.arange(t, device=q.device)[None]
        return self._rope(q, positions + s, cache, ("queries", s))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_usage: torch.Tensor, sink: torch.Tensor,
        return_stats: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """q (B, n, T, d) over the slots' k, v (B, n, S, d) in a softmax of their own with a sink column:
        the read (B, T, n*d) before the output projection, and (``return_stats``) per sample the
        attention share the sink took ("read_sink": 1 = read nothing)."""
        b, _, t, _ = q.shape
        s = k.shape[2]
        logits = (q @ k.transpose(-1, -2)).float() * self.scaling  # (B, n, T, S)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits + log_usage[:, None, None, :].float()
        # A sink column: a segment with nothing relevant in memory can read (almost) nothing.
        full = torch.cat([logits, sink.float().expand(*logits.shape[:-1], 1)], dim=-1)
        p = torch.softmax(full, dim=-1)[..., :s]
        stats: dict[str, torch.Tensor] = {}
        if return_stats:
            with torch.no_grad():
                stats["read_sink"] = (1 - p.sum(-1)).mean(dim=(1, 2))
        return (p.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1), stats

    def __call__(
        self, view: torch.Tensor, slots: torch.Tensor, log_usage: torch.Tensor, positions: torch.Tensor | None,
        gate: torch.Tensor, sink: torch.Tensor, return_stats: bool = False,
        q_adapter: nn.Module | None = None, k_adapter: nn.Module | None = None, cache: dict | None = None,
        v_adapter: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The read-out (B, T, H) to add to the residual stream (``read_site="residual"``).

        Args:
            view: the segment through the layer's input norm (B, T, H), the base's dtype.
            slots: (B, S, H) stored views of earlier tokens, oldest first.
            log_usage: (B, S) added to each slot's logits (-inf: an empty slot).
            positions: (B or 1, T) the segment's own positions (None: 0..T-1).
            gate: (H,) pre-tanh output gate; sink: () the logit of attending to nothing.
            return_stats: also return per sample the gate's mean |tanh| ("output_gate") and the
                attention share the sink took ("read_sink": 1 = read nothing).
            q_adapter, k_adapter, v_adapter: the memory's own changes of the query, key and value inputs
                (``x + adapter(x)``; ``GMA6Config.read_rank``); the base's own projections stay untouched.
            cache: a dict that lives for one forward of the base (rotary tables shared by its layers).

        Returns:
            ``(read_out, stats)``.
        """
        after = q_adapter is not None and self.query_after_norm
        q_in = view if q_adapter is None or after else view + q_adapter(view)
        k, v = self.slot_keys_values(slots, view.dtype, k_adapter, cache, v_adapter)
        q = self.queries(self.attn.q_proj(q_in), positions, slots.shape[1], cache, q_adapter(view) if after else None)
        read, stats = self.attend(q, k, v, log_usage, sink, return_stats)
        out = self.attn.o_proj(read)
        if self.post_norm is not None:
            out = self.post_norm(out)
        if return_stats:
            stats["output_gate"] = torch.tanh(gate.detach()).abs().mean().float().expand(view.shape[0])
        return torch.tanh(gate).to(out.dtype) * out, stats

    def in_attention(
        self, q: torch.Tensor, view: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], log_usage: torch.Tensor,
        positions: torch.Tensor | None, gate: torch.Tensor, sink: torch.Tensor, return_stats: bool = False,
        q_adapter: nn.Module | None = None, cache: dict | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The read (B, T, n*d) to add to this layer's attention output before its o projection
        (``read_site="attention"``): the layer's own queries, so no projection of the segment is added.

        Args:
            q: the layer's q projection of the segment (B, T, n*d), as the base computed it.
            view: that projection's input (B, T, H), for ``q_adapter`` (H -> n*d, added to ``q``).
            kv: ``slot_keys_values`` of the slots; gate: (n*d,) pre-tanh; the rest as ``__call__``.
        """
        change = None
        if q_adapter is not None and self.query_after_norm:
            change = q_adapter(view)
        elif q_adapter is not None:
            q = q + q_adapter(view).to(q.dtype)
        k, v = kv
        read, stats = self.attend(self.queries(q, positions, k.shape[2], cache, change), k, v, log_usage, sink,
                                  return_stats)
        if return_stats:
            stats["output_gate"] = torch.tanh(gate.detach()).abs().mean().float().expand(q.shape[0])
        return torch.tanh(gate).to(read.dtype) * read, stats

    # ---------------------------------------------------------------- the fused read (read_site="attention")
    # Equal to ``in_attention`` in exact arithmetic, in a handful of kernels a layer: the slots' keys and
    # values with a sink row (key 0, value 0, its logit the sink through the mask) for one fused SDPA call.
    @property
    def fusable(self) -> bool:
        """Whether ``fused_read`` applies (SDPA has no logit softcapping: Gemma 2 takes ``in_attention``)."""
        return not self.softcap

    def prepare_slots(
        self, slots: torch.Tensor, log_usage: torch.Tensor, sink: torch.Tensor, dtype: torch.dtype,
        k_adapter: nn.Module | None = None, v_adapter: nn.Module | None = None, cache: dict | None = None,
        rotated: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values (B, g, S + 1, d) (not repeated over the query groups) and the additive mask
        (B, 1, 1, S + 1) of ``fused_read``: the slots as ``slot_keys_values`` makes them, then the sink row.
        ``rotated``: for ``read_rotated`` (the slots' keys at positions -S..-1, the queries at their own)."""
        d = self.head_dim
        b, s, _ = slots.shape
        k, v = self._project_slots(slots, dtype, k_adapter, v_adapter)
        if self.k_norm is not None:
            k = self._norm(k, "k")
        k = k.transpose(1, 2)
        if self.rotary is not None:
            cos, ssin = self._cos_signed_sin(k, None, cache, ("slots", s, rotated), offset=-s if rotated else 0)
            k = torch.addcmul(k * cos, k.roll(d // 2, dims=-1), ssin)
        zero = k.new_zeros(b, k.shape[1], 1, d)
        k = torch.cat([k, zero], dim=2)
        v = torch.cat([v.transpose(1, 2), zero], dim=2)
        mask = torch.cat([log_usage.to(dtype), sink.to(dtype).expand(b, 1)], dim=1)[:, None, None, :]
        return k, v, mask

    def fused_read(
        self, q: torch.Tensor, view: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        positions: torch.Tensor | None, q_adapter: nn.Module | None = None, cache: dict | None = None,
    ) -> torch.Tensor:
        """``in_attention``'s read before its gate, (B, n, T, d) as SDPA returns it (``add_read`` gates it into
        the attention output), from ``prepare_slots``' keys, values and mask (no statistics)."""
        b, t, _ = q.shape
        d = self.head_dim
        after = q_adapter is not None and self.query_after_norm
        if q_adapter is not None and not after:
            q = q + q_adapter(view).to(q.dtype)
        q = q.view(b, t, -1, d)
        if self.q_norm is not None:
            q = self._norm(q, "q")
        if after:
            q = q + q_adapter(view).to(q.dtype).view(b, t, -1, d)
        q = q.transpose(1, 2)
        k, v, mask = prepared
        if k.dtype != q.dtype:  # autocast made q another dtype
            k, v, mask = k.to(q.dtype), v.to(q.dtype), mask.to(q.dtype)
        if k.shape[0] != b:  # generate() expanded the batch (beams, samples)
            r = b // k.shape[0]
            k, v, mask = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), mask.repeat_interleave(r, 0)
        if self.rotary is not None:
            s = k.shape[2] - 1
            cos, ssin = self._cos_signed_sin(q, positions, cache, ("queries", s), offset=s)
            q = torch.addcmul(q * cos, q.roll(d // 2, dims=-1), ssin)
        return slots_sdpa(q, k, v, mask, self.scaling)

    def rotation_tables(
        self, like: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        positions: torch.Tensor | None, cache: dict | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cos and signed sin (B or 1, 1, T, d) that rotated the base's queries at their positions p, in
        ``like``'s dtype (``like``: the queries (B, n, T, d)): the base's own ``position_embeddings`` where its
        attention was handed them, else this layer's rotary tables at ``positions`` (None: 0..T-1). None: no RoPE."""
        if self.rotary is None and position_embeddings is None:
            return None
        if position_embeddings is None:
            return self._cos_signed_sin(like, positions, cache, ("queries", 0))
        cos, sin = position_embeddings
        # Hit only for the very tensors cached (held, so never another's recycled id): one call may span forwards.
        key = ("base_tables", self.layer_type, like.dtype)
        got = cache.get(key) if cache is not None else None
        if got is not None and got[0] is cos and got[1] is sin:
            return got[2]
        half = sin.shape[-1] // 2
        out = (cos[:, None].to(like.dtype), torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None].to(like.dtype))
        if cache is not None:
            cache[key] = (cos, sin, out)
        return out

    def read_rotated(
        self, q: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        view: torch.Tensor | None = None, q_adapter: nn.Module | None = None,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``fused_read`` from the base's own queries q (B, n, T, d), after its q-norm and RoPE at the tokens'
        positions p, and ``prepare_slots(rotated=True)``: RoPE scores depend on positions only through their
        difference, so slots at -S..-1 against queries at p equal slots at 0..S-1 against queries at p + S.

        With a query adapter (``view``: the q projection's input (B, T, H); ``tables``: ``rotation_tables``' cos
        and signed sin at p), the query is ``rotated_read``'s: after the norm, the base's q plus the adapter's
        change rotated alone (RoPE is linear); before it (``q_pre``, the q projection's output (B, T, n*d)), the
        changed projection normed and rotated again."""
        return rotated_read(*self.rotated_args(q, prepared, view, q_adapter, tables, q_pre))

    def rotated_args(
        self, q: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        view: torch.Tensor | None = None, q_adapter: nn.Module | None = None,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    ) -> tuple:
        """``read_rotated``'s arguments as ``rotated_read`` takes them."""
        k, v, mask = self._matched(q, prepared)
        down = up = None
        if q_adapter is not None:
            down, up = q_adapter.weights(view.dtype)
        gain, eps = self._folded("q", q.device) if q_pre is not None else (None, 0.0)
        norm = self.q_norm if q_pre is not None and gain is None else None
        return q, k, v, mask, self.scaling, view, down, up, tables, q_pre, gain, eps, norm

    def plain_tables(self, like: torch.Tensor, cache: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cos and signed sin (1, 1, T, d) of positions 0..T-1 (T: ``like``'s second-last size) in ``like``'s
        dtype, kept in ``cache`` (a dict that outlives forwards: the same tensors every segment)."""
        if self.rotary is None:
            return None
        key = ("plain", self.layer_type, like.shape[-2], like.dtype, like.device)
        if key not in cache:
            cache[key] = self._cos_signed_sin(like, None, None, ())
        return cache[key]

    def _matched(self, q: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``prepare_slots``' keys, values and mask in q's dtype and batch (B, n, T, d)."""
        k, v, mask = prepared
        b = q.shape[0]
        if k.dtype != q.dtype:  # autocast made q another dtype
            k, v, mask = k.to(q.dtype), v.to(q.dtype), mask.to(q.dtype)
        if k.shape[0] != b:  # generate() expanded the batch (beams, samples)
            r = b // k.shape[0]
            k, v, mask = k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), mask.repeat_interleave(r, 0)
        return k, v, mask


def rotated_read(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
    view: torch.Tensor | None = None, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    gain: torch.Tensor | None = None, eps: float = 0.0, norm: nn.Module | None = None,
) -> torch.Tensor:
    """``BaseAttentionRead.read_rotated``'s maths as a function of tensors: the read
    (B, n, T, d) of the slots' k, v (B, n or g, S + 1, d) under the additive mask (B, 1, 1, S + 1) by the queries

    - q (B, n, T, d), the base's after its q-norm and RoPE (``down`` None: no query adapter);
    - q + rot(up @ down @ view) (``q_pre`` None: the adapter's change after the q-norm);
    - rot(q_norm(q_pre + up @ down @ view)) (before it), the q-norm an fp32 rms_norm with ``gain`` and ``eps``, or
      ``norm`` (a module) where it does not fold, or none where both are None;

    rot: RoPE by ``tables`` (cos, signed sin), (B or 1, 1, T, d); none where None."""
    d = q.shape[-1]
    if down is not None:
        b, t, _ = view.shape
        change = F.linear(F.linear(view, down), up)
        if q_pre is not None:
            x = (q_pre + change.to(q_pre.dtype)).view(b, t, -1, d)
            if gain is not None:
                x = F.rms_norm(x.float(), (d,), gain, eps).to(x.dtype)
            elif norm is not None:
                x = norm(x)
            x = x.transpose(1, 2)
        else:
            x = change.to(q.dtype).view(b, t, -1, d).transpose(1, 2)
        if tables is not None:
            cos, ssin = tables
            x = torch.addcmul(x * cos, x.roll(d // 2, dims=-1), ssin)
        q = x if q_pre is not None else q + x
    return slots_sdpa(q, k, v, mask, scaling)


def slots_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """The read's one SDPA call: q (B, n, T, d), k and v (B, n or g, S + 1, d), the additive mask (B, 1, 1, S + 1).
    Under autograd, ``slots_attention`` instead (its backward is a few small matrix products)."""
    b, n, t, d = q.shape
    fold = k.shape[1] == 1 and n > 1
    if fold:
        # One key-value head (Gemma 3): every query head reads the same slots, so the heads fold into the tokens,
        # (B, 1, T*n, d), a view where the queries lie as the q projection made them (B, T, n, d), and the read comes
        # out as the attention's output lies (B, T, n, d). Nothing repeated: the repeat below cost two kernels
        # forward and two in backward at every layer of every segment, which a launch-bound training step pays for.
        q = q.transpose(1, 2).reshape(b, 1, t * n, d)
    elif k.shape[1] != n:  # StackedSlots repeats every layer's at once
        # PyTorch's memory-efficient kernel takes an additive mask but not enable_gqa, and flash takes no mask:
        # with both, SDPA falls back to its math path, which upcasts to fp32 and keeps the attention weights
        # for backward (seen in a memory-only training step's saved tensors on the H200). The slots are few,
        # so their keys and values are repeated over the query groups instead (equal results).
        groups = n // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or mask.requires_grad):
        out = slots_attention(q, k, v, mask, scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.view(b, t, n, d).transpose(1, 2) if fold else out


def slots_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """``softmax(q k^T * scaling + mask) v`` for ``slots_sdpa`` under autograd, the scores and softmax in fp32 (as
    SDPA's kernels keep them). Why not SDPA: with a mask (the slots' usage and the sink) that needs a gradient its
    fused backward, the memory-efficient kernel's on CUDA, took 1.35 ms a layer a segment on an H100 (8 x 2048
    queries over 129 keys of width 256: 15 % of a memory-only training step's device time in session 20's profile),
    where these few products over so few keys take a fraction of it."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scaling).add_(mask.float())
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def add_read_heads(out: torch.Tensor, read: torch.Tensor, tanh_gate: torch.Tensor) -> torch.Tensor:
    """``out + tanh_gate * read`` in one kernel: out (B, T, n, d) as an attention function returns it, read
    (B, n, T, d), tanh_gate (n*d,)."""
    n, d = out.shape[-2:]
    if read.dtype != out.dtype:
        read = read.to(out.dtype)
    if tanh_gate.dtype != out.dtype:
        tanh_gate = tanh_gate.to(out.dtype)
    return torch.addcmul(out, read.transpose(1, 2), tanh_gate.view(n, d))


def add_read(x: torch.Tensor, read: torch.Tensor, tanh_gate: torch.Tensor) -> torch.Tensor:
    """``x + tanh_gate * read`` in one kernel: x (B, T, n*d) the attention output before the o projection,
    read (B, n, T, d) from ``fused_read``, tanh_gate (n*d,)."""
    b, n, t, d = read.shape
    if read.dtype != x.dtype:
        read = read.to(x.dtype)
    if tanh_gate.dtype != x.dtype:
        tanh_gate = tanh_gate.to(x.dtype)
    return torch.addcmul(x.reshape(b, t, n, d), read.transpose(1, 2), tanh_gate.view(n, d)).view(b, t, n * d)


class StackedSlots:
    """``prepare_slots`` of every memory layer at once, a few kernels a segment instead of ~16 a layer: the
    next layers' k and v projections stacked into one batched matmul each, one k-norm, one RoPE, one sink row
    and mask. Applies where every read is fused and its k/v projections are plain ``nn.Linear`` (a LoRA or a
    4-bit layer takes the per-layer ``prepare_slots``; merge a LoRA for reading speed)."""

    def __init__(self, reads: list[BaseAttentionRead]) -> None:
        self.reads = reads
        self._cache: dict[tuple, dict[str, torch.Tensor | None]] = {}
        self._adapter_cache: dict[str, tuple] = {}  # the slot adapters' stacked weights (``derived``)
        # the slots' rotary tables (``_tables``): never dropped (a captured graph may read them), one per slot count,
        # dtype and device
        self._tables_kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def applies(self) -> bool:
        r0 = self.reads[0]
        return all(
            r.fusable and type(r.attn.k_proj) is nn.Linear and type(r.attn.v_proj) is nn.Linear
            and (r.k_norm is None) == (r0.k_norm is None) and (r.k_norm is None or r._k_fold is not None)
            and r.head_dim == r0.head_dim and r.attn.k_proj.weight.shape == r0.attn.k_proj.weight.shape
            and (r.attn.k_proj.bias is None) == (r0.attn.k_proj.bias is None)
            and (r.attn.v_proj.bias is None) == (r0.attn.v_proj.bias is None)
            and (r.rotary is None) == (r0.rotary is None)
            for r in self.reads)

    def _weights(self, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor | None]:
        # The base is frozen while attached: its stacked weights are cached per dtype and device, keyed also by
        # the weights' identity (a module swapped in later is seen).
        key = (dtype, device, tuple(id(r.attn.k_proj.weight) for r in self.reads))
        if key not in self._cache:
            def stack(get) -> torch.Tensor | None:
                ts = [get(r) for r in self.reads]
                return None if ts[0] is None else torch.stack([t.detach() for t in ts]).to(device, dtype)

            with torch.no_grad():
                self._cache = {key: {
                    "wk": stack(lambda r: r.attn.k_proj.weight.t()), "wv": stack(lambda r: r.attn.v_proj.weight.t()),
                    "bk": stack(lambda r: r.attn.k_proj.bias), "bv": stack(lambda r: r.attn.v_proj.bias),
                    "gk": None if self.reads[0].k_norm is None else torch.stack(
                        [r._k_fold[0] for r in self.reads]).to(device, torch.float32)[:, None, None, None, :],
                }}
        return self._cache[key]

    def prepare(
        self, memory: torch.Tensor, log_usage: torch.Tensor, sinks: torch.Tensor, dtype: torch.dtype,
        k_adapters: list[nn.Module] | None = None, v_adapters: list[nn.Module] | None = None, cache: dict | None = None,
        rotated: bool = False, stage: Callable[..., tuple[torch.Tensor, ...]] | None = None, repeat: bool = True,
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """memory (B, L, S, H), log_usage (B, L, S), sinks (L,) -> per layer ``prepare_slots``' (k, v, mask).
        ``stage(k, v, mask)``, if given, takes every layer's at once (L leading) and returns where to read them from.
        ``repeat``: the keys and values repeated over the query groups (for SDPA; the Triton read takes them as
        they are)."""
        b, n_layers, s, h = memory.shape
        r0 = self.reads[0]
        d = r0.head_dim
        w = self._weights(dtype, memory.device)
        # one copy: the cast lays the transposed memory out densely (a cast keeping its strides, then a reshape,
        # copied twice)
        x = memory.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format).reshape(n_layers, b * s, h)

        xk = xv = x
        if k_adapters is not None or v_adapters is not None:
            # both adapters' down projections in one matmul, from one cast of the slots (the adapters' dtype)
            pairs = [(name, a) for name, a in (("k", k_adapters), ("v", v_adapters)) if a is not None]
            mods = [m for _, a in pairs for m in a]
            down, ups = derived(self._adapter_cache, "adapters", [p for m in mods for p in m.parameters()], lambda: (
                torch.cat([torch.stack([m.down.weight for m in a]) for _, a in pairs], 1).transpose(1, 2),
                [torch.stack([m.up.weight for m in a]).transpose(1, 2) for _, a in pairs]))  # (L, H, r), (L, r, H)
            low = x.to(down.dtype) @ down  # (L, B*S, r_k + r_v)
            adapted, start = {}, 0
            for (name, _), up in zip(pairs, ups):
                adapted[name] = x + (low[..., start: start + up.shape[1]] @ up).to(dtype)
                start += up.shape[1]
            xk, xv = adapted.get("k", x), adapted.get("v", x)
        k = xk @ w["wk"]
        v = xv @ w["wv"]
        if w["bk"] is not None:
            k = k + w["bk"][:, None, :]
        if w["bv"] is not None:
            v = v + w["bv"][:, None, :]
        k = k.view(n_layers, b, s, -1, d)
        v = v.view(n_layers, b, s, -1, d)
        if w["gk"] is not None:
            k = (F.rms_norm(k.float(), (d,), eps=r0._k_fold[1]) * w["gk"]).to(dtype)
        k, v = k.transpose(2, 3), v.transpose(2, 3)  # (L, B, g, S, d)
        if r0.rotary is not None:
            cos, ssin = self._tables(k, s, cache, rotated)
            k = torch.addcmul(k * cos, k.roll(d // 2, dims=-1), ssin)
        zero = k.new_zeros(n_layers, b, k.shape[2], 1, d)
        k = torch.cat([k, zero], dim=3)
        v = torch.cat([v, zero], dim=3)
        if repeat and r0.groups > 1 and all(r.groups == r0.groups for r in self.reads):
            # repeated over the query groups here for every layer at once (two kernels a segment, not two a layer: see slots_sdpa)
            k, v = k.repeat_interleave(r0.groups, dim=2), v.repeat_interleave(r0.groups, dim=2)
        # Each layer's mask is a view into one tensor: its rows padded to a multiple of 8 entries, so every
        # layer's view starts 16-byte aligned (CUDA's memory-efficient SDPA fails with "misaligned address"
        # on a mask that does not, e.g. 129 entries a row at batch 1).
        pad = -(s + 1) % 8
        parts = [log_usage.transpose(0, 1).to(dtype), sinks.to(dtype)[:, None, None].expand(n_layers, b, 1)]
        if pad:
            parts.append(parts[1].expand(n_layers, b, pad))  # never read: sliced off below
        mask = torch.cat(parts, 2)
        if stage is not None:
            k, v, mask = stage(k, v, mask)
        mask = mask[..., : s + 1]
        return list(zip(k.unbind(0), v.unbind(0), mask[:, :, None, None, :].unbind(0)))

    def _tables(self, like: torch.Tensor, s: int, cache: dict | None, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' rotary tables of every layer (L, 1, 1, S, d): one per layer type, stacked. Kept here between
        calls (the slots' positions are the same every segment; a training step's calls, each kept until backward,
        held a copy each: 17 MiB at 8 x 4k); ``cache``: the call's, for the per-layer tables made on the way."""
        key = ("stacked_slots", s, rotated, like.dtype, like.device)
        if key not in self._tables_kept:
            positions = torch.arange(-s if rotated else 0, 0 if rotated else s, device=like.device)[None]
            per = [r._cos_signed_sin(like[0], positions, cache, ("slots", s, rotated)) for r in self.reads]
            self._tables_kept[key] = (torch.stack([c for c, _ in per]), torch.stack([t for _, t in per]))
        return self._tables_kept[key]


class SlotsAgain:
    """A segment's prepared slots (``StackedSlots.prepare``'s, per layer (k, v, mask)) for its layers'
    recomputation in backward, under the base's gradient checkpointing: dropped after the segment's forward and
    made again, values only, when the first of its layers is recomputed; dropped again once every layer has
    taken its own.

    Why: a segment's call lives until its backward (the checkpoints keep it for the recomputation), so slots kept
    there stayed for the whole step (H200, batch 8 x 4k, segments of 512: 137 MiB of a 3.7 GiB step). The
    recomputation only needs their values: the gradients flow through the forward's own graph, whose checkpoint
    makes its preparation again in backward. Each made again requires grad as its forward's did, so the layer's
    recomputation saves the same tensors (what ``torch.utils.checkpoint`` checks)."""

    def __init__(self, slots: list[tuple[torch.Tensor, ...]], make: Callable[[], list[tuple[torch.Tensor, ...]]]) -> None:
        self._flags = [tuple(t.requires_grad for t in s) for s in slots]
        self._make = make
        self._slots: list[tuple[torch.Tensor, ...]] | None = None
        self._left: set[int] = set()

    @property
    def held(self) -> bool:
        """Whether slots made again are held now."""
        return self._slots is not None

    def __getitem__(self, slot: int) -> tuple[torch.Tensor, ...]:
        if self._slots is None:
            with torch.no_grad():
                made = self._make()
            self._slots = [tuple(t.detach().requires_grad_(f) for t, f in zip(s, flags))
                           for s, flags in zip(made, self._flags)]
            self._left = set(range(len(made)))
        got = self._slots[slot]
        self._left.discard(slot)
        if not self._left:
            self._slots = None
        return got


def log_usage(usage: torch.Tensor) -> torch.Tensor:
    """log(usage), -inf where a slot was never written (usage 0), with no NaN gradient there."""
    return torch.where(usage > 0, usage.clamp_min(1e-30).log(), float("-inf"))
