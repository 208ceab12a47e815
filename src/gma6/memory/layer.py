"""EnhancedMemoryLayer: one decoder layer's memory, with its input, forget and output phases.

Dimensions: B batch, T tokens, H hidden size, S slots, D slot width, n heads, d = D / n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MemoryAttentionGate, merge_heads, split_heads


class EnhancedMemoryLayer(nn.Module):
    """Output phase (read, per token) and input/forget phases (write, once per segment).

    Write: slots are queries over the segment's hidden states (content-based addressing),
    ``C = W_c attn(M, h)``; gates ``g_in = sigmoid(W_in [M; C] + b_in)``,
    ``g_f = sigmoid(W_f [M; C] + b_f)``; ``M' = g_in * tanh(C) + g_f * M``.
    """

    def __init__(
        self,
        hidden_size: int,
        dim: int,
        heads: int,
        forget_bias: float = 3.0,
        input_bias: float = 0.0,
        output_gate_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.read_gate = MemoryAttentionGate(hidden_size, dim, heads, output_gate_bias)
        self.norm_m = nn.RMSNorm(dim, eps=1e-6)
        self.norm_h = nn.RMSNorm(hidden_size, eps=1e-6)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(hidden_size, 2 * dim, bias=False)
        self.candidate = nn.Linear(dim, dim)
        self.input_gate = nn.Linear(2 * dim, dim)
        self.forget_gate = nn.Linear(2 * dim, dim)
        nn.init.constant_(self.input_gate.bias, input_bias)
        nn.init.constant_(self.forget_gate.bias, forget_bias)

    def read(
        self, h: torch.Tensor, memory: torch.Tensor, return_stats: bool = False, view: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output phase: the read-out (B, T, H) to add to the residual stream (see MemoryAttentionGate)."""
        return self.read_gate(h, memory, return_stats, view, kv)

    def write(
        self,
        memory: torch.Tensor,
        h: torch.Tensor,
        mask: torch.Tensor,
        input_logit_bias: torch.Tensor | None = None,
        return_stats: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Input and forget phases.

        Args:
            memory: slots before the segment (B, S, D).
            h: the segment's hidden states at this layer (B, T, H).
            mask: (B, T) bool, True at real tokens. A sample with no real token keeps its memory.
            input_logit_bias: (B, S) added to the input gate's logits (usage-based allocation).
            return_stats: also return gate means and the write-attention entropy.

        Returns:
            ``(new_memory, input_gate_per_slot (B, S), stats)``.
        """
        has_tokens = mask.any(dim=1)
        # A sample with no token would give a softmax over nothing (NaN); let it attend anywhere,
        # its result is discarded below.
        safe_mask = mask | ~has_tokens[:, None]
        q = split_heads(self.q(self.norm_m(memory)), self.heads)
        k, v = self.kv(self.norm_h(h)).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        attn_mask = safe_mask[:, None, None, :]
        content = self.candidate(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)))
        z = torch.cat([self.norm_m(memory), content], dim=-1)
        in_logits = self.input_gate(z)
        if input_logit_bias is not None:
            in_logits = in_logits + input_logit_bias[..., None]
        g_in = torch.sigmoid(in_logits)
        g_f = torch.sigmoid(self.forget_gate(z))
        new = g_in * torch.tanh(content) + g_f * memory
        keep = has_tokens[:, None, None]
        new = torch.where(keep, new, memory)
        g_in_slot = torch.where(keep[..., 0], g_in.mean(-1), torch.zeros_like(g_in[..., 0]))
        stats: dict[str, torch.Tensor] = {}
        if return_stats:
            with torch.no_grad():
                logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
                att = torch.softmax(logits.masked_fill(~attn_mask, float("-inf")), dim=-1)
                stats["input_gate"] = g_in.mean(dim=(1, 2))
                stats["forget_gate"] = g_f.mean(dim=(1, 2))
                stats["write_entropy"] = -(att * att.clamp_min(1e-12).log()).sum(-1).mean(dim=(1, 2))
                stats["write_attention"] = att.mean(1)  # (B, S, T): which tokens each slot read
        return new, g_in_slot, stats
