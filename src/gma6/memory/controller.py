"""MemoryController: the slot bank of every memory layer, its addressing, usage and age.

Dimensions: B batch, L memory layers, S slots, D slot width, T tokens, H hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GMA6Config
from ..state import MemoryState
from .layer import EnhancedMemoryLayer


def initial_slots(layers: int, slots: int, dim: int) -> torch.Tensor:
    """LM2 starts slots from identity rows; orthogonal rows when there are more slots than width."""
    if slots <= dim:
        eye = torch.eye(slots, dim)
        return eye.expand(layers, slots, dim).clone()
    m = torch.empty(layers, slots, dim)
    for i in range(layers):
        nn.init.orthogonal_(m[i])
    return m * math.sqrt(slots / dim)


class MemoryController(nn.Module):
    """Owns one ``EnhancedMemoryLayer`` per hooked decoder layer and the learned initial memory."""

    def __init__(self, config: GMA6Config) -> None:
        super().__init__()
        if config.layers is None or config.hidden_size is None:
            raise ValueError("MemoryController needs a config resolved against a model (GMA6Config.resolve)")
        self.config = config
        dim = config.slot_dim
        self.layer_ids = list(config.layers)
        self.layers = nn.ModuleList(
            EnhancedMemoryLayer(
                config.hidden_size, dim, config.num_heads, config.forget_bias, config.input_bias, config.output_gate_bias
            )
            for _ in self.layer_ids
        )
        self.initial_memory = nn.Parameter(initial_slots(len(self.layer_ids), config.num_slots, dim))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, S, D)."""
        return tuple(self.initial_memory.shape)  # type: ignore[return-value]

    def init_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        """A fresh memory for ``batch_size`` samples (differentiable w.r.t. the initial memory)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        device = device or self.initial_memory.device
        mem = self.initial_memory.to(device)[None].expand(batch_size, -1, -1, -1)
        zeros = torch.zeros(batch_size, *self.shape[:2], device=device)
        return MemoryState(
            memory=mem, usage=zeros, age=zeros.clone(), tokens_read=torch.zeros(batch_size, dtype=torch.long, device=device)
        )

    def read(
        self, layer: int, h: torch.Tensor, memory: torch.Tensor, return_stats: bool = False,
        view: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output phase at memory layer ``layer`` (position in ``layer_ids``)."""
        return self.layers[layer].read(h, memory, return_stats, view)

    def write(
        self,
        state: MemoryState,
        hiddens: list[torch.Tensor],
        mask: torch.Tensor,
        return_stats: bool = False,
    ) -> tuple[MemoryState, list[dict[str, torch.Tensor]]]:
        """Input and forget phases of every memory layer after a segment.

        Args:
            state: the memory before the segment.
            hiddens: per memory layer, the segment's hidden states (B, T, H) in the memory's dtype.
            mask: (B, T) bool, True at real tokens.
            return_stats: also return per-layer instrumentation.
        """
        if not return_stats:
            return self._write_batched(state, hiddens, mask), [{} for _ in self.layers]
        cfg = self.config
        new_mem, new_usage, new_age, stats = [], [], [], []
        has_tokens = mask.any(dim=1)[:, None]
        for i, layer in enumerate(self.layers):
            usage = state.usage[:, i]
            bias = None
            if cfg.addressing == "content+usage":
                # Slots used more than average are written less: new facts go to free slots.
                bias = -cfg.usage_weight * (usage - usage.mean(-1, keepdim=True))
            m, g_in, st = layer.write(state.memory[:, i], hiddens[i], mask, bias, return_stats)
            new_mem.append(m)
            u = torch.where(has_tokens, cfg.usage_decay * usage + g_in, usage)
            written = g_in.detach() > cfg.write_threshold
            a = torch.where(has_tokens, torch.where(written, torch.zeros_like(usage), state.age[:, i] + 1), state.age[:, i])
            new_usage.append(u)
            new_age.append(a)
            if return_stats:
                st["usage"] = u.detach()
                st["age"] = a.detach()
            stats.append(st)
        new_state = MemoryState(
            memory=torch.stack(new_mem, dim=1),
            usage=torch.stack(new_usage, dim=1),
            age=torch.stack(new_age, dim=1),
            tokens_read=state.tokens_read + mask.sum(1),
            segments_read=state.segments_read + 1,
        )
        return new_state, stats

    def _write_batched(self, state: MemoryState, hiddens: list[torch.Tensor], mask: torch.Tensor) -> MemoryState:
        """``write`` for every layer at once: the same maths as ``EnhancedMemoryLayer.write`` with the
        layers' weights stacked, so a segment's write launches a few dozen kernels instead of a few
        dozen per layer (where small batches are launch-bound, that is most of the write's cost)."""
        cfg = self.config
        layers = self.layers

        def stack(get) -> torch.Tensor:
            return torch.stack([get(layer) for layer in layers])  # (L, ...)

        eps = layers[0].norm_m.eps
        mem = state.memory.transpose(0, 1)  # (L, B, S, D)
        h = torch.stack(hiddens)  # (L, B, T, H)
        n_layers, b, s, d = mem.shape
        heads = layers[0].heads
        has_tokens = mask.any(dim=1)  # (B,)
        safe_mask = mask | ~has_tokens[:, None]
        mn = F.rms_norm(mem, (d,), eps=eps) * stack(lambda m: m.norm_m.weight)[:, None, None]
        hn = F.rms_norm(h, (h.shape[-1],), eps=layers[0].norm_h.eps) * stack(lambda m: m.norm_h.weight)[:, None, None]
        q = mn @ stack(lambda m: m.q.weight).transpose(-1, -2)[:, None]
        k, v = (hn @ stack(lambda m: m.kv.weight).transpose(-1, -2)[:, None]).chunk(2, dim=-1)

        def heads_of(x: torch.Tensor) -> torch.Tensor:  # (L, B, N, D) -> (L*B, n, N, d): 4-D for the fused kernels
            return x.flatten(0, 1).unflatten(-1, (heads, d // heads)).transpose(1, 2)

        attn_mask = safe_mask[None, :, None, None, :].expand(n_layers, -1, -1, -1, -1).flatten(0, 1)
        read = F.scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v), attn_mask=attn_mask)
        read = read.transpose(1, 2).flatten(-2).unflatten(0, (n_layers, b))  # (L, B, S, D)
        content = read @ stack(lambda m: m.candidate.weight).transpose(-1, -2)[:, None] + stack(
            lambda m: m.candidate.bias)[:, None, None]
        z = torch.cat([mn, content], dim=-1)
        gates = z @ torch.cat([stack(lambda m: m.input_gate.weight), stack(lambda m: m.forget_gate.weight)], 1
                              ).transpose(-1, -2)[:, None]
        gates = gates + torch.cat([stack(lambda m: m.input_gate.bias), stack(lambda m: m.forget_gate.bias)], 1)[:, None, None]
        in_logits, f_logits = gates.chunk(2, dim=-1)
        usage = state.usage.transpose(0, 1)  # (L, B, S)
        if cfg.addressing == "content+usage":
            in_logits = in_logits - (cfg.usage_weight * (usage - usage.mean(-1, keepdim=True)))[..., None]
        g_in = torch.sigmoid(in_logits)
        new = g_in * torch.tanh(content) + torch.sigmoid(f_logits) * mem
        keep = has_tokens[None, :, None]  # (1, B, 1)
        new = torch.where(keep[..., None], new, mem)
        g_in_slot = torch.where(keep, g_in.mean(-1), torch.zeros_like(usage))
        u = torch.where(keep, cfg.usage_decay * usage + g_in_slot, usage)
        age = state.age.transpose(0, 1)
        a = torch.where(keep, torch.where(g_in_slot.detach() > cfg.write_threshold, torch.zeros_like(age), age + 1), age)
        return MemoryState(
            memory=new.transpose(0, 1).contiguous(),
            usage=u.transpose(0, 1).contiguous(),
            age=a.transpose(0, 1).contiguous(),
            tokens_read=state.tokens_read + mask.sum(1),
            segments_read=state.segments_read + 1,
        )
