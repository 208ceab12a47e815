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
from . import triton_write
from .attention import derived
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


def layer_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(L, B, N, D) @ (L, D, X) -> (L, B, N, X) as one batched matmul over L: broadcasting ``w``
    over B instead would copy the weights once per sample (a kernel each, on every call)."""
    return (x.flatten(1, 2) @ w).unflatten(1, x.shape[1:3])


PERSISTENT_LOGIT = -4.0  # the persistent slots' starting logit bias: read, but little


class MemoryController(nn.Module):
    """Owns one ``EnhancedMemoryLayer`` per hooked decoder layer and the learned initial memory."""

    def __init__(self, config: GMA6Config, read_width: int | None = None) -> None:
        """``read_width``: with ``read_site="attention"``, the width of the attention output the read
        adds to (the base's heads x head width; only the model knows it)."""
        super().__init__()
        if config.read_site == "attention" and read_width is None:
            raise ValueError("read_site='attention' needs read_width (the base attention's heads x head width)")
        if config.layers is None or config.hidden_size is None:
            raise ValueError("MemoryController needs a config resolved against a model (GMA6Config.resolve)")
        self.config = config
        dim = config.slot_dim
        self.layer_ids = list(config.layers)
        self.layers = nn.ModuleList(
            EnhancedMemoryLayer(
                config.hidden_size, dim, config.num_heads, config.forget_bias, config.input_bias, config.output_gate_bias,
                config.write_rule, config.read_rule, config.token_retention, config.read_rank,
                read_width if config.read_site == "attention" else None, config.read_query,
            )
            for _ in self.layer_ids
        )
        if config.read_rule == "base":
            # Never read (an unwritten slot has usage 0, which the read masks out): zeros, neither
            # trained nor saved (the hidden-wide bank would be most of the adapter's bytes).
            self.register_buffer("initial_memory", torch.zeros(len(self.layer_ids), config.num_slots, dim), persistent=False)
        else:
            self.initial_memory = nn.Parameter(initial_slots(len(self.layer_ids), config.num_slots, dim))
        if config.persistent_slots:
            # learned, never written: what every read sees before the written slots (random views, nearly unread at
            # first through a low logit bias, so a trained adapter they are added to reads almost as before)
            n = config.persistent_slots
            self.persistent = nn.Parameter(torch.randn(len(self.layer_ids), n, dim))
            self.persistent_logit = nn.Parameter(torch.full((len(self.layer_ids),), PERSISTENT_LOGIT))
        self._stack_cache: dict[str, tuple[tuple, dict[str, torch.Tensor]]] = {}
        # Where each parameter is registered: looked up afresh per call (a reassigned parameter is
        # seen), without ``parameters()``'s module walk, which costs more than the cached stacks save.
        self._param_slots = [(m, name) for m in self.modules() for name, p in m._parameters.items() if p is not None]

    def read_inputs(
        self, memory: torch.Tensor, log_usage: torch.Tensor | None, answering: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slots a base read sees, memory (B, L, S, D) and their logit bias (B, L, S), with the persistent slots
        (``GMA6Config.persistent_slots``) before the written ones: (B, L, P + S, D), (B, L, P + S). Before, so the
        written slots keep their RoPE positions next to the segment (after, they would all move P further away).
        ``answering``: the memory is read without being written (``persistent_reads="answer"`` reads them only then)."""
        if not self.config.persistent_slots or log_usage is None:
            return memory, log_usage
        if self.config.persistent_reads == "answer" and not answering:
            return memory, log_usage
        b, n = memory.shape[0], self.config.persistent_slots
        slots = self.persistent.to(memory.dtype)[None].expand(b, -1, -1, -1)
        bias = self.persistent_logit.to(log_usage.dtype)[None, :, None].expand(b, -1, n)
        return torch.cat([slots, memory], 2), torch.cat([bias, log_usage], 2)

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
        view: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Output phase at memory layer ``layer`` (position in ``layer_ids``); ``kv``: this layer's
        slot keys and values from ``read_keys_values`` (computed here when None)."""
        return self.layers[layer].read(h, memory, return_stats, view, kv)

    def write(
        self,
        state: MemoryState,
        hiddens: list[torch.Tensor],
        mask: torch.Tensor,
        return_stats: bool = False,
        full: bool = False,
    ) -> tuple[MemoryState, list[dict[str, torch.Tensor]]]:
        """Input and forget phases of every memory layer after a segment.

        Args:
            state: the memory before the segment.
            hiddens: per memory layer, the segment's hidden states (B, T, H), any float dtype
                (what padding holds is never written).
            mask: (B, T) bool, True at real tokens.
            return_stats: also return per-layer instrumentation.
            full: the caller knows ``mask`` is all True (no padding): skips the masking work.
        """
        cfg = self.config
        if cfg.write_rule == "tokens":
            # Batched under autograd too (the same values and gradients): on a launch-bound GPU the per-layer write's
            # few dozen kernels a layer, three times over in a checkpointed step, were a large part of the memory's
            # training time; on the CPU the two are within noise (benchmarks/tokens_write_ab.py).
            if not return_stats and cfg.read_rule == "base":
                return self._write_tokens_batched(state, hiddens, mask, full), [{} for _ in self.layers]
            return self._write_tokens(state, hiddens, mask, return_stats)
        if not return_stats:
            return self._write_batched(state, hiddens, mask, full), [{} for _ in self.layers]
        new_mem, new_usage, new_age, stats = [], [], [], []
        has_tokens = mask.any(dim=1)[:, None]
        for i, layer in enumerate(self.layers):
            usage = state.usage[:, i]
            bias = None
            if cfg.addressing == "content+usage":
                # Slots used more than average are written less: new facts go to free slots.
                bias = -cfg.usage_weight * (usage - usage.mean(-1, keepdim=True))
            h = hiddens[i].to(state.memory.dtype).masked_fill(~mask[..., None], 0.0)
            m, g_in, st = layer.write(state.memory[:, i], h, mask, bias, return_stats)
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

    def _write_tokens(
        self, state: MemoryState, hiddens: list[torch.Tensor], mask: torch.Tensor, return_stats: bool
    ) -> tuple[MemoryState, list[dict[str, torch.Tensor]]]:
        """``write`` for ``write_rule="tokens"``, layer by layer (see ``EnhancedMemoryLayer.write_tokens``)."""
        cfg = self.config
        mem, usage, age, stats = [], [], [], []
        for i, layer in enumerate(self.layers):
            h = hiddens[i].to(state.memory.dtype).masked_fill(~mask[..., None], 0.0)
            m, u, a, st = layer.write_tokens(state.memory[:, i], h, mask, state.usage[:, i], state.age[:, i],
                                             cfg.tokens_per_segment, cfg.usage_decay, return_stats)
            if return_stats:
                st["usage"], st["age"] = u.detach(), a.detach()
            mem.append(m)
            usage.append(u)
            age.append(a)
            stats.append(st)
        new_state = MemoryState(
            memory=torch.stack(mem, dim=1), usage=torch.stack(usage, dim=1), age=torch.stack(age, dim=1),
            tokens_read=state.tokens_read + mask.sum(1), segments_read=state.segments_read + 1,
        )
        return new_state, stats

    def _write_tokens_batched(
        self, state: MemoryState, hiddens: list[torch.Tensor], mask: torch.Tensor, full: bool = False
    ) -> MemoryState:
        """``_write_tokens`` for ``read_rule="base"`` with every layer at once (the same maths as
        ``EnhancedMemoryLayer.write_tokens``): a few dozen kernels a segment instead of a few dozen a layer."""
        cfg = self.config
        w = self._stacked("tokens")
        mem = state.memory.transpose(0, 1)  # (L, B, S, D)
        stacked = torch.stack(hiddens)  # (L, B, T, H) in the base's dtype
        n_layers, b, s, d = mem.shape
        t, width = stacked.shape[2:]
        k = min(cfg.tokens_per_segment, t)
        eps = self.layers[0].norm_h.eps
        fused = cfg.triton_write and triton_write.applies(stacked, state.memory, w["score_v"])  # no backward
        if fused:  # what padding holds is never gathered (its scores are -inf below)
            h = None
            score = triton_write.token_scores(stacked, w["score_v"], w["score_b"], eps)
        else:
            h = stacked.to(mem.dtype)
            if not full:  # what padding holds must not reach the slots
                h = h.masked_fill(~mask[None, :, :, None], 0.0)
            # score = rms_norm(h) * norm_h @ score_t + b, rearranged so that no normed copy of every token is made:
            # (h @ (norm_h * score_t)) / rms(h), the rms from the base's-dtype stack in one fp32 reduction
            # (two passes over the segment's hidden states instead of six)
            sq = torch.linalg.vector_norm(stacked if full else h, dim=-1, dtype=torch.float32).square()
            inv_rms = torch.rsqrt(sq / width + eps)
            score = layer_matmul(h, w["score_v"]).squeeze(-1) * inv_rms.to(h.dtype) + w["score_b"].squeeze(-1)
        if not full:
            score = score.masked_fill(~mask[None], float("-inf"))
        top, idx = score.topk(k, dim=-1)
        valid = torch.isfinite(top)
        order = torch.where(valid, idx, t + torch.arange(k, device=idx.device)).argsort(dim=-1)
        idx, top, valid = idx.gather(-1, order), top.gather(-1, order), valid.gather(-1, order)
        g_in = torch.sigmoid(top.masked_fill(~valid, 0.0)) * valid  # (L, B, k)
        n = valid.sum(-1)  # (L, B)
        usage, age = state.usage.transpose(0, 1), state.age.transpose(0, 1)  # (L, B, S)
        cand_usage = torch.cat([cfg.usage_decay * usage, g_in.to(usage.dtype)], 2)
        cand_age = torch.cat([age + 1, torch.zeros_like(g_in, dtype=age.dtype)], 2)
        if cfg.token_retention == "priority":
            window = cand_usage.detach().topk(s, dim=-1).indices.sort(dim=-1).values
        else:
            window = n[..., None] + torch.arange(s, device=n.device)
        new_usage, new_age = cand_usage.gather(2, window), cand_age.gather(2, window)
        if not full:  # a sample with no real token keeps everything (full: every sample has k)
            keep = (n > 0)[..., None]  # (L, B, 1)
            new_usage, new_age = torch.where(keep, new_usage, usage), torch.where(keep, new_age, age)
        if fused:
            if not full:
                window = torch.where(keep, window, torch.arange(s, device=window.device))
                idx = idx.masked_fill(~valid, -1)  # no token: a zero slot, as the eager write's masked copy
            new = triton_write.write_rows(state.memory, stacked, window, idx)
        else:
            entries = h.gather(2, idx[..., None].expand(-1, -1, -1, h.shape[-1]))  # (L, B, k, H)
            cand = torch.cat([mem, entries], 2)
            new = cand.gather(2, window[..., None].expand(-1, -1, -1, d))
            if not full:
                new = torch.where(keep[..., None], new, mem)
            new = new.transpose(0, 1)
        return MemoryState(
            memory=new.contiguous(), usage=new_usage.transpose(0, 1).contiguous(),
            age=new_age.transpose(0, 1).contiguous(),
            tokens_read=state.tokens_read + (mask.shape[1] if full else mask.sum(1)),
            segments_read=state.segments_read + 1,
        )

    def _stacked(self, group: str) -> dict[str, torch.Tensor]:
        """Every layer's weights of ``group`` ("read" or "write") stacked on a leading L axis.

        Kept until a parameter changes (optimizer steps and ``load_state_dict`` bump parameter versions) and,
        under autograd, until a backward reaches it (``derived``): per segment it would cost a few dozen kernel
        launches, which dominate where small batches are launch-bound.
        """
        return derived(self._stack_cache, group, [m._parameters[name] for m, name in self._param_slots],
                       lambda: self._stack(group))

    def _stack(self, group: str) -> dict[str, torch.Tensor]:
        layers = self.layers

        def stack(get) -> torch.Tensor:
            return torch.stack([get(layer) for layer in layers])  # (L, ...)

        if group == "tokens":
            w = {
                "norm_h": stack(lambda m: m.norm_h.weight)[:, None, None],  # (L, 1, 1, H)
                "score_t": stack(lambda m: m.score.weight).transpose(-1, -2),  # (L, H, 1)
                "score_b": stack(lambda m: m.score.bias)[:, None, None],  # (L, 1, 1, 1)
            }
            w["score_v"] = w["norm_h"][:, 0, 0, :, None] * w["score_t"]  # (L, H, 1): the norm's gain folded in
        elif group == "read":
            w = {
                "norm_m": stack(lambda m: m.read_gate.norm_m.weight)[:, None, None],  # (L, 1, 1, D)
                "kv_t": stack(lambda m: m.read_gate.kv.weight).transpose(-1, -2),  # (L, D, 2D)
            }
        else:
            w = {
                "norm_m": stack(lambda m: m.norm_m.weight)[:, None, None],
                "norm_h": stack(lambda m: m.norm_h.weight)[:, None, None],
                "q_t": stack(lambda m: m.q.weight).transpose(-1, -2),
                "kv_t": stack(lambda m: m.kv.weight).transpose(-1, -2),
                "candidate_t": stack(lambda m: m.candidate.weight).transpose(-1, -2),
                "candidate_b": stack(lambda m: m.candidate.bias)[:, None, None],
                "gates_t": torch.cat([stack(lambda m: m.input_gate.weight), stack(lambda m: m.forget_gate.weight)], 1
                                     ).transpose(-1, -2),
                "gates_b": torch.cat([stack(lambda m: m.input_gate.bias), stack(lambda m: m.forget_gate.bias)], 1
                                     )[:, None, None],
            }
        return w

    def selection_loss(self, hiddens: list[torch.Tensor], mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the tokens write's scores against ``targets`` (B, T) bool (the
        tokens worth keeping, e.g. a story's fact sentences), over real tokens, averaged over layers:
        supervision of *what* to write, separate from how it is read."""
        if self.config.write_rule != "tokens":
            raise ValueError("selection_loss needs write_rule='tokens' (only that rule scores tokens)")
        if targets.shape != mask.shape:
            raise ValueError(f"write targets shape {tuple(targets.shape)} != segment shape {tuple(mask.shape)}")
        target = targets[mask].float()
        terms = [F.binary_cross_entropy_with_logits(layer.selection_logits(h.to(self.initial_memory.dtype))[mask], target)
                 for layer, h in zip(self.layers, hiddens)]
        return torch.stack(terms).mean()

    def read_keys_values(
        self, memory: torch.Tensor, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The read's keys and values of every layer's slots at once: memory (B, L, S, D) -> per
        layer ``(k, v)``, each (B, n, S, d), computed in the memory's dtype, returned in ``dtype``
        (default: the same). The same maths as ``MemoryAttentionGate`` (one step a segment instead
        of one a layer). None for ``read_rule="base"`` (the base's own projections read the slots)."""
        if self.config.read_rule == "base":
            return None
        w = self._stacked("read")
        gate = self.layers[0].read_gate
        mem = memory.transpose(0, 1)  # (L, B, S, D)
        d = mem.shape[-1]
        kv = layer_matmul(F.rms_norm(mem, (d,), eps=gate.norm_m.eps) * w["norm_m"], w["kv_t"])
        kv = kv if dtype is None else kv.to(dtype)  # one cast for every layer
        kv = kv.unflatten(-1, (2, gate.heads, d // gate.heads)).permute(0, 3, 1, 4, 2, 5)  # (L, 2, B, n, S, d)
        return [(k, v) for k, v in (layer.unbind(0) for layer in kv.unbind(0))]

    def _write_batched(
        self, state: MemoryState, hiddens: list[torch.Tensor], mask: torch.Tensor, full: bool = False
    ) -> MemoryState:
        """``write`` for every layer at once: the same maths as ``EnhancedMemoryLayer.write`` with the
        layers' weights stacked, so a segment's write launches a few dozen kernels instead of a few
        dozen per layer (where small batches are launch-bound, that is most of the write's cost)."""
        cfg = self.config
        layers = self.layers
        w = self._stacked("write")
        eps = layers[0].norm_m.eps
        mem = state.memory.transpose(0, 1)  # (L, B, S, D)
        h = torch.stack(hiddens).to(mem.dtype)  # (L, B, T, H)
        n_layers, b, s, d = mem.shape
        heads = layers[0].heads
        attn_mask = None
        if not full:
            # padding zeroed: what the base left there (even NaN) must not reach the slots through 0 * x
            h = h.masked_fill(~mask[:, :, None], 0.0)
            has_tokens = mask.any(dim=1)  # (B,)
            safe_mask = mask | ~has_tokens[:, None]
            attn_mask = safe_mask[None, :, None, None, :].expand(n_layers, -1, -1, -1, -1).flatten(0, 1)
        mn = F.rms_norm(mem, (d,), eps=eps) * w["norm_m"]
        hn = F.rms_norm(h, (h.shape[-1],), eps=layers[0].norm_h.eps) * w["norm_h"]
        q = layer_matmul(mn, w["q_t"])
        k, v = layer_matmul(hn, w["kv_t"]).chunk(2, dim=-1)

        def heads_of(x: torch.Tensor) -> torch.Tensor:  # (L, B, N, D) -> (L*B, n, N, d): 4-D for the fused kernels
            return x.flatten(0, 1).unflatten(-1, (heads, d // heads)).transpose(1, 2)

        read = F.scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v), attn_mask=attn_mask)
        read = read.transpose(1, 2).flatten(-2).unflatten(0, (n_layers, b))  # (L, B, S, D)
        content = layer_matmul(read, w["candidate_t"]) + w["candidate_b"]
        z = torch.cat([mn, content], dim=-1)
        gates = layer_matmul(z, w["gates_t"]) + w["gates_b"]
        in_logits, f_logits = gates.chunk(2, dim=-1)
        usage = state.usage.transpose(0, 1)  # (L, B, S)
        if cfg.addressing == "content+usage":
            in_logits = in_logits - (cfg.usage_weight * (usage - usage.mean(-1, keepdim=True)))[..., None]
        g_in = torch.sigmoid(in_logits)
        new = g_in * torch.tanh(content) + torch.sigmoid(f_logits) * mem
        g_in_slot = g_in.mean(-1)
        age = state.age.transpose(0, 1)
        u = cfg.usage_decay * usage + g_in_slot
        a = torch.where(g_in_slot.detach() > cfg.write_threshold, 0.0, age + 1)
        if not full:  # a sample with no token in this segment keeps its memory, usage and age
            keep = has_tokens[None, :, None]  # (1, B, 1)
            new = torch.where(keep[..., None], new, mem)
            u = torch.where(keep, u, usage)
            a = torch.where(keep, a, age)
        return MemoryState(
            memory=new.transpose(0, 1).contiguous(),
            usage=u.transpose(0, 1).contiguous(),
            age=a.transpose(0, 1).contiguous(),
            tokens_read=state.tokens_read + (mask.shape[1] if full else mask.sum(1)),
            segments_read=state.segments_read + 1,
        )
