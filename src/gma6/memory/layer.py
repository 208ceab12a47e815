"""EnhancedMemoryLayer: one decoder layer's memory, with its input, forget and output phases.

Dimensions: B batch, T tokens, H hidden size, S slots, D slot width, n heads, d = D / n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MemoryAttentionGate, derived, merge_heads, split_heads


class LowRank(nn.Module):
    """``x -> U V x`` of rank r (into ``out_dim``, default ``dim``), ``U`` zero at start (so the first step changes nothing), computed
    and returned in ``x``'s dtype."""

    def __init__(self, dim: int, rank: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim if out_dim is None else out_dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weights (a few thousand entries) are cast, not x: a (B, T, H) input cast up to fp32 would keep an
        # fp32 copy of every token's hidden state for backward at every read (H200, batch 8 x 4k: 2.7 GiB of a
        # step's saved tensors).
        down, up = self.weights(x.dtype)
        return F.linear(F.linear(x, down), up)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The down (r, dim) and up (out_dim, r) weights in ``dtype`` (``x -> up @ down @ x``)."""
        return self._weight(self.down, dtype), self._weight(self.up, dtype)

    def _weight(self, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        """``linear``'s weight in ``dtype``, the cast kept until the weight changes (``derived``; under autograd until a
        backward reaches it): a cast is a kernel launch at every memory layer of every segment, what a launch-bound
        GPU pays for."""
        w = linear.weight
        if w.dtype == dtype:
            return w
        cache = self.__dict__.setdefault("_casts", {})  # not a buffer: never saved, never moved
        return derived(cache, (id(linear), dtype, w.device), [w], lambda: w.to(dtype))


class EnhancedMemoryLayer(nn.Module):
    """Output phase (read, per token) and input/forget phases (write, once per segment).

    Write ("slots", LM2): slots are queries over the segment's hidden states (content-based
    addressing), ``C = W_c attn(M, h)``; gates ``g_in = sigmoid(W_in [M; C] + b_in)``,
    ``g_f = sigmoid(W_f [M; C] + b_f)``; ``M' = g_in * tanh(C) + g_f * M``.

    Write ("tokens"): a learned score ``s_t = w_s . norm(h_t) + b_s`` picks the segment's top-k tokens;
    each becomes a new slot ``sigmoid(s_t) * tanh(W_v norm(h_t))`` (its score is its input gate), in
    token order after the older slots, which decay by ``sigmoid(f)`` (a learned forget gate per
    dimension) and of which the oldest k drop out (``retention="recent"``) or those of lowest decayed
    input gate (``"priority"``). A token's own hidden state carries what the base bound to it (who
    went where), which a slot's attention-weighted mean over the segment blurs.

    Read ("base", with the tokens write): the slots hold the chosen tokens' hidden states as they are
    (``h_t``, the base's own normalised view) and are read through the next decoder layer's attention
    (``BaseAttentionRead``); this layer owns only that read's gate (H,) and sink logit. The input gate
    ``sigmoid(s_t)`` is kept as the slot's usage, whose log biases the read's logits.
    """

    def __init__(
        self,
        hidden_size: int,
        dim: int,
        heads: int,
        forget_bias: float = 3.0,
        input_bias: float = 0.0,
        output_gate_bias: float = 0.0,
        write_rule: str = "slots",
        read_rule: str = "memory",
        retention: str = "recent",
        read_rank: int = 0,
        read_width: int | None = None,
        read_query: str = "before_norm",
    ) -> None:
        super().__init__()
        self.heads = heads
        self.write_rule = write_rule
        self.read_rule = read_rule
        self.retention = retention
        if read_rule == "base":
            # read_width: where the read is added (None: the residual stream; else the next layer's
            # attention output before its o projection, heads x head width)
            width = hidden_size if read_width is None else read_width
            self.base_gate = nn.Parameter(torch.zeros(width))  # tanh(0) = 0: outputs unchanged at first
            self.sink = nn.Parameter(torch.zeros(()))
            # the memory's own low-rank change of the read's query, key and value inputs (zero at start); read
            # inside the attention, the query's change is added to the q projection's output
            self.read_q = LowRank(hidden_size, read_rank, width) if read_rank and read_query != "none" else None
            self.read_k = LowRank(hidden_size, read_rank) if read_rank else None
            self.read_v = LowRank(hidden_size, read_rank) if read_rank else None
        else:
            self.read_gate = MemoryAttentionGate(hidden_size, dim, heads, output_gate_bias)
        self.norm_h = nn.RMSNorm(hidden_size, eps=1e-6)
        if write_rule == "tokens":
            self.score = nn.Linear(hidden_size, 1)
            nn.init.constant_(self.score.bias, input_bias)
            if read_rule != "base":
                self.value = nn.Linear(hidden_size, dim)
                self.forget = nn.Parameter(torch.full((dim,), float(forget_bias)))
            return
        self.norm_m = nn.RMSNorm(dim, eps=1e-6)
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

    def selection_logits(self, h: torch.Tensor, hn: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens write's score of each token (B, T): the logit of its input gate."""
        return self.score(self.norm_h(h) if hn is None else hn).squeeze(-1)

    def write_tokens(
        self,
        memory: torch.Tensor,
        h: torch.Tensor,
        mask: torch.Tensor,
        usage: torch.Tensor,
        age: torch.Tensor,
        k: int,
        usage_decay: float,
        return_stats: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The "tokens" write (see the class): memory (B, S, D), h (B, T, H), mask (B, T) bool,
        usage and age (B, S) -> new memory, usage, age and optional stats. Slots run oldest to newest.
        A sample with no real token keeps everything; one with fewer than k writes only those it has."""
        b, s, d = memory.shape
        t = h.shape[1]
        k = min(k, t)
        hn = self.norm_h(h)
        score = self.selection_logits(h, hn).masked_fill(~mask, float("-inf"))  # (B, T)
        top, idx = score.topk(k, dim=1)
        valid = torch.isfinite(top)
        # the chosen real tokens in their order in the segment (the latest fact last), padding picks after
        order = torch.where(valid, idx, t + torch.arange(k, device=idx.device)).argsort(dim=1)
        idx, top, valid = idx.gather(1, order), top.gather(1, order), valid.gather(1, order)
        g_in = torch.sigmoid(top.masked_fill(~valid, 0.0)) * valid  # padding picks write nothing
        n = valid.sum(1)  # (B,)
        if self.read_rule == "base":
            # the base's own view of each token, as its next layer would have attended to it
            entries = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
            old, g_f = memory, None
        else:
            picked = hn.gather(1, idx[..., None].expand(-1, -1, hn.shape[-1]))  # (B, k, H)
            entries = g_in[..., None] * torch.tanh(self.value(picked))  # (B, k, D)
            g_f = torch.sigmoid(self.forget)
            old = g_f * memory
        cand = torch.cat([old, entries.to(memory.dtype)], 1)  # (B, S + k, D): oldest first
        cand_usage = torch.cat([usage_decay * usage, g_in.to(usage.dtype)], 1)
        cand_age = torch.cat([age + 1, torch.zeros_like(g_in, dtype=age.dtype)], 1)
        if self.retention == "priority":
            # the S highest decayed gates, kept in reading order (padding picks have gate 0)
            window = cand_usage.detach().topk(s, dim=1).indices.sort(dim=1).values
        else:
            # keep the last S of the first S + n, n = real picks
            window = (n[:, None] + torch.arange(s, device=n.device))  # (B, S)
        new = cand.gather(1, window[..., None].expand(-1, -1, d))
        new_usage = cand_usage.gather(1, window)
        new_age = cand_age.gather(1, window)
        keep = (n > 0)[:, None]
        new = torch.where(keep[..., None], new, memory)
        new_usage = torch.where(keep, new_usage, usage)
        new_age = torch.where(keep, new_age, age)
        stats: dict[str, torch.Tensor] = {}
        if return_stats:
            with torch.no_grad():
                stats["input_gate"] = (g_in.sum(1) / n.clamp(min=1)).float()
                stats["forget_gate"] = (g_f.mean() if g_f is not None else torch.ones((), device=h.device)).expand(b).float()
                # which token each slot now holds came from (new slots only), as the slots rule's attention map
                att = torch.zeros(b, s, t, device=h.device)
                src = window - s  # (B, S): >= 0 where the slot holds this segment's pick number src
                bi, slot = (src >= 0).nonzero(as_tuple=True)
                pick = src[bi, slot]
                ok = valid[bi, pick]
                att[bi[ok], slot[ok], idx[bi, pick][ok]] = 1.0
                stats["write_attention"] = att
        return new, new_usage, new_age, stats
