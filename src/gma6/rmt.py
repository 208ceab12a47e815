"""RMTMemoryModel: the Recurrent Memory Transformer peer (Bulatov et al. 2022) on a frozen base.

The memory is ``N = config.num_slots`` vectors of the base's hidden width ``H``, kept in the
base's *input embedding* scale (Gemma multiplies token embeddings by sqrt(H) inside its
embedding module; the memory lives at that module's output scale). Each segment runs through
the frozen base once, as ``inputs_embeds``::

    [ read (N) | the segment's real tokens (n <= T) | write (N) | padding (T - n) ]

``read`` is the current memory, ``write`` are learned write-token embeddings (the same for every
segment). The next memory is ``read + Linear(LayerNorm(h_write))`` where ``h_write`` is the
base's last hidden state (after its final norm) at the write positions; the Linear is zero at
initialisation, so the memory starts as a learned constant (its initial value has the RMS of real
token embeddings). Memory weights and states stay fp32 and are cast to the base's dtype for
``inputs_embeds``.

Positions and mask (the layout choice):

* Real tokens are packed to the front of each row (padding anywhere in the segment, left or
  right, is moved behind the write tokens), so a padded sample is laid out exactly as it would be
  alone: read tokens take positions 0..N-1, its n real tokens N..N+n-1, and its write tokens
  continue right after its LAST REAL token, N+n..N+n+N-1. The positions are the layout indices,
  passed explicitly as ``position_ids``; this also keeps index-based sliding windows the same as
  when the sample is alone.
* The 2D attention mask is 1 on read, real and write positions and 0 on padding; with the base's
  causal mask, real tokens see the read tokens and earlier real tokens, write tokens see read
  tokens, all real tokens and earlier write tokens, and nothing sees padding. Read tokens are
  always visible, so a sample with no real token in a segment never attends to nothing; its
  memory is kept unchanged.
* Returned logits are those of the T input positions, in the input's order (memory positions
  are sliced out), so ``labels`` align with ``input_ids``; the loss is the shifted cross-entropy
  over them (-100 ignored), as for the base.
* ``write=False`` appends no write tokens and leaves the state unchanged (used by ``generate``).
  Each segment is a fresh window: memory tokens take positions 0..N-1 in every segment, so a
  BOS a segment starts with sits at position N.

Options of ``GMA6Config`` that describe the gated memory (memory_dim, num_heads, layers, gates,
addressing, usage) are ignored by this kind; the state keeps the ``MemoryState`` layout with
L = 1: memory (B, 1, N, H), usage zeros, age = segments read with real tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GMA6Config
from .model import _check_input
from .state import MemoryState
from .wrapper import MemoryOutput, MemoryWrapper

__all__ = ["RMTController", "RMTMemoryModel", "embedding_rms", "update_parameter_count"]


def embedding_rms(embedding: nn.Module, max_tokens: int = 4096) -> float:
    """RMS of the embedding module's *output* (scale included) over up to ``max_tokens`` token ids."""
    vocab = int(getattr(embedding, "num_embeddings", 0) or embedding.weight.shape[0])
    ids = torch.linspace(0, vocab - 1, min(vocab, max_tokens)).round().long().unique()
    ids = ids.to(embedding.weight.device)
    with torch.no_grad():
        e = embedding(ids).float()
    e = e[e.norm(dim=-1) > 0]  # skip rows such as a zero padding embedding
    if e.numel() == 0:
        return 1.0
    return float(e.pow(2).mean().sqrt())


class RMTController(nn.Module):
    """The memory's weights: learned initial memory, write tokens and the small update map."""

    def __init__(self, num_tokens: int, hidden_size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.initial_memory = nn.Parameter(torch.randn(num_tokens, hidden_size) * scale)
        self.write_tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) * scale)
        self.norm = nn.LayerNorm(hidden_size)
        self.update = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.update.weight)
        nn.init.zeros_(self.update.bias)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, S, D) of the state: (1, N, H)."""
        return (1, *self.initial_memory.shape)  # type: ignore[return-value]

    def init_state(self, batch_size: int, device: torch.device | None = None) -> MemoryState:
        """A fresh memory for ``batch_size`` samples (differentiable w.r.t. the initial memory)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
        device = device or self.initial_memory.device
        mem = self.initial_memory.to(device)[None, None].expand(batch_size, 1, -1, -1)
        zeros = torch.zeros(batch_size, *self.shape[:2], device=device)
        return MemoryState(
            memory=mem, usage=zeros, age=zeros.clone(), tokens_read=torch.zeros(batch_size, dtype=torch.long, device=device)
        )

    def delta(self, h_write: torch.Tensor) -> torch.Tensor:
        """The memory update from the write positions' last hidden states (B, N, H), in fp32."""
        h = h_write.to(self.update.weight.dtype)
        return self.update(self.norm(h))


class RMTMemoryModel(MemoryWrapper):
    """A frozen base model plus RMT memory tokens (see the module docstring).

    Public API as ``MemoryModel``: ``init_state``, ``forward``, ``read``, ``generate``,
    ``memory_disabled``, ``detach``, ``memory_parameters``, ``save_pretrained``/``from_pretrained``.
    """

    def __init__(self, base: nn.Module, config: GMA6Config) -> None:
        if isinstance(config, GMA6Config) and config.memory_type != "rmt":
            raise ValueError(f"RMTMemoryModel needs memory_type='rmt', got {config.memory_type!r}")
        super().__init__(base, config)
        embedding = base.get_input_embeddings() if callable(getattr(base, "get_input_embeddings", None)) else None
        if embedding is None:
            self.detach()
            raise TypeError(f"{type(base).__name__} has no input embeddings; RMT feeds memory tokens as inputs_embeds")
        scale = embedding_rms(embedding)
        self.controller = RMTController(self.config.num_slots, self.config.hidden_size, scale).to(self._base_device())
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    # ------------------------------------------------------------------ state
    @property
    def num_tokens(self) -> int:
        """N, the number of memory tokens."""
        return self.controller.initial_memory.shape[0]

    # ------------------------------------------------------------------ forward
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(input_ids.to(self.device))

    def _input_dtype(self) -> torch.dtype:
        """The dtype of ``inputs_embeds``: the embedding's, fp32 for quantised ones."""
        dtype = self.base.get_input_embeddings().weight.dtype
        return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32

    def _decoder(self) -> nn.Module | None:
        """The module whose output carries the last (final-normed) hidden state, if it is separate."""
        get = getattr(self.base, "get_decoder", None)
        try:
            dec = get() if callable(get) else None
        except Exception:  # some wrappers raise instead of returning None
            dec = None
        return dec if isinstance(dec, nn.Module) and dec is not self.base else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        write: bool = True,
        return_stats: bool = False,
        **kwargs: Any,
    ) -> MemoryOutput:
        """Run one segment between the read and write memory tokens; return logits and the next memory.

        Args:
            input_ids: (B, T) token ids of one segment.
            attention_mask: (B, T), 1 at real tokens (padding may sit anywhere).
            labels: (B, T) as for the base model (-100 is ignored); gives ``loss``.
            memory_state: the memory before this segment; None starts a fresh one.
            write: append the write tokens and update the memory (False: read-only, no write tokens).
            return_stats: also return the update's size per memory token.
            **kwargs: ``logits_to_keep`` (int: the last k input positions; 1D tensor: these input
                positions) and other keyword arguments of the base's forward. ``position_ids`` and
                ``inputs_embeds`` are set here and may not be passed.
        """
        self._check_attached()
        input_ids, mask = _check_input(input_ids, attention_mask, vocab=self._vocab_size())
        state = self._prepare_state(memory_state, input_ids.shape[0])
        if self._disabled:
            out = self.base(input_ids=input_ids, attention_mask=mask.long(), labels=labels, **kwargs)
            return MemoryOutput(out.logits, getattr(out, "loss", None), memory_state or state)
        for name in ("position_ids", "inputs_embeds"):
            if kwargs.get(name) is not None:
                raise TypeError(f"RMTMemoryModel sets {name} itself; do not pass it")
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        kwargs.setdefault("use_cache", False)

        device = self.device
        input_ids, mask = input_ids.to(device), mask.to(device)
        B, T = input_ids.shape
        N = self.num_tokens
        Nw = N if write else 0
        ctrl = self.controller
        dtype = self._input_dtype()
        n = mask.sum(1)  # real tokens per sample
        # Layout [read | real tokens | write | padding]: where each input token goes...
        real_rank = mask.long().cumsum(1) - 1
        pad_rank = (~mask).long().cumsum(1) - 1
        dest = N + torch.where(mask, real_rank, n[:, None] + Nw + pad_rank)  # (B, T)
        wdest = N + n[:, None] + torch.arange(Nw, device=device)  # (B, Nw)
        total = N + T + Nw
        # ...and, inverted, where each layout position takes its vector from in [read; tokens; write].
        src = torch.arange(total, device=device).repeat(B, 1)
        src.scatter_(1, dest, (N + torch.arange(T, device=device)).expand(B, T).contiguous())
        if Nw:
            src.scatter_(1, wdest, (N + T + torch.arange(Nw, device=device)).expand(B, Nw).contiguous())
        memory = state.memory[:, 0]  # (B, N, H) fp32
        pieces = [memory.to(dtype), self._embed(input_ids).to(dtype)]
        if Nw:
            pieces.append(ctrl.write_tokens[None].expand(B, -1, -1).to(dtype))
        inputs_embeds = torch.cat(pieces, 1).gather(1, src[..., None].expand(-1, -1, memory.shape[-1]))
        layout_mask = torch.arange(total, device=device)[None] < (N + n + Nw)[:, None]
        position_ids = torch.arange(total, device=device)[None].expand(B, -1)

        # Logits at the input positions asked for, in the input's order.
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
            raise TypeError(f"logits_to_keep must be an int or a 1D tensor of positions, got {logits_to_keep!r}")
        if isinstance(logits_to_keep, torch.Tensor):
            if logits_to_keep.dim() != 1:
                raise ValueError("logits_to_keep: only an int or a 1D tensor of input positions is supported")
            keep = logits_to_keep.to(device).long()
        else:
            k = T if logits_to_keep <= 0 else min(int(logits_to_keep), T)
            keep = torch.arange(T - k, T, device=device)
        keep_layout = dest[:, keep]  # (B, K)

        captured: dict[str, torch.Tensor] = {}
        decoder = self._decoder() if Nw else None
        handle = None
        if Nw and decoder is not None:

            def grab(module: nn.Module, args: tuple, output: Any) -> None:
                hidden = getattr(output, "last_hidden_state", None)
                captured["h"] = hidden if hidden is not None else output[0]

            handle = decoder.register_forward_hook(grab)
        elif Nw:
            kwargs["output_hidden_states"] = True
        if self._keeps_logits:
            kwargs["logits_to_keep"] = keep_layout
        try:
            out = self.base(inputs_embeds=inputs_embeds, attention_mask=layout_mask.long(), position_ids=position_ids, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        logits = out.logits
        if not self._keeps_logits:
            logits = logits.gather(1, keep_layout[..., None].expand(-1, -1, logits.shape[-1]))

        loss = None
        if labels is not None:
            if logits.shape[1] != T:
                raise ValueError("labels need the logits of every position: do not pass logits_to_keep with labels")
            labels = labels.to(device)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )

        new_state, stats = state, None
        if Nw:
            hidden = captured.get("h")
            if hidden is None:
                hidden = out.hidden_states[-1]
            h_write = hidden.gather(1, wdest[..., None].expand(-1, -1, hidden.shape[-1]))
            delta = ctrl.delta(h_write)
            has_tokens = (n > 0)[:, None, None]
            new_memory = torch.where(has_tokens, memory + delta, memory)
            age = torch.where(has_tokens[..., 0], state.age[:, 0] + 1, state.age[:, 0])
            new_state = MemoryState(
                memory=new_memory[:, None],
                usage=state.usage,
                age=age[:, None],
                tokens_read=state.tokens_read + n,
                segments_read=state.segments_read + 1,
            )
            if return_stats:
                stats = [{"update_norm": (delta * has_tokens).detach().norm(dim=-1), "age": age.detach()}]
        if self.config.offload_to_cpu:
            new_state = new_state.to("cpu")
        return MemoryOutput(logits, loss, new_state, stats)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        memory_state: MemoryState | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """``base.generate`` on ``[read tokens; prompt]`` (memory read-only); returns prompt + new tokens.

        The prompt goes in as ``inputs_embeds`` (the KV cache works as usual). Without
        ``input_ids``, logits processors that look at earlier tokens (repetition penalty,
        no-repeat n-grams) see only the generated tokens.
        """
        self._check_attached()
        input_ids, mask = _check_input(input_ids, attention_mask, vocab=self._vocab_size(),
                                       vocab_on_device=True)
        state = self._prepare_state(memory_state, input_ids.shape[0])
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self._disabled:
            return self.base.generate(input_ids=input_ids, attention_mask=mask.long(), **generate_kwargs)
        B = input_ids.shape[0]
        dtype = self._input_dtype()
        embeds = torch.cat([state.memory[:, 0].to(dtype), self._embed(input_ids).to(dtype)], 1)
        full_mask = torch.cat([torch.ones(B, self.num_tokens, dtype=torch.long, device=self.device), mask.long()], 1)
        out = self.base.generate(inputs_embeds=embeds, attention_mask=full_mask, **generate_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids
        if sequences.shape[0] != B:  # num_return_sequences / beams
            prompt = prompt.repeat_interleave(sequences.shape[0] // B, dim=0)
        full = torch.cat([prompt, sequences.to(prompt.device)], 1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def update_parameter_count(num_tokens: int, hidden_size: int) -> int:
    """Trainable parameters of an RMT memory: initial memory, write tokens, LayerNorm, Linear."""
    return 2 * num_tokens * hidden_size + 2 * hidden_size + hidden_size * hidden_size + hidden_size

