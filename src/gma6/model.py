"""MemoryModel: a frozen causal LM with a memory attached through forward hooks.

Dimensions: B batch, T tokens of a segment, L memory layers, S slots, D slot width.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import GMA6Config
from .integration import LayerHooks, find_decoder_layers, find_reading_norms, norm_eps, rms_gain
from .memory import MemoryController
from .memory.attention import derived, read_dtype
from .memory.base_read import BaseAttentionRead, SlotsAgain, StackedSlots, add_read, add_read_heads, find_rotary, log_usage, rotated_read
from .memory import triton_read as kernel
from .memory.graphed import GraphedReads
from .segment_graph import GraphedCall, ModuleParameters
from .site import AttentionSites, supported
from .state import MemoryState
from .wrapper import WEIGHTS_NAME, MemoryOutput, MemoryWrapper

__all__ = ["WEIGHTS_NAME", "MemoryModel", "MemoryOutput", "attach_memory", "cut_segments", "load_adapter",
           "memory_class", "pack_left", "split_aligned", "split_segments"]

_CALL_KWARG = "gma6_call"


class _BaseReadInputs(NamedTuple):
    """What ``read_rule="base"`` reads with besides the slots (passed where the slots read takes its keys and values)."""

    log_usage: torch.Tensor  # (B, S): the slots' logit bias, -inf where never written
    positions: torch.Tensor | None  # (B or 1, T): the segment's positions as the base numbers them
    rope: dict | None  # rotary tables shared by the memory layers of one forward


@dataclass
class _Call:
    """What the hooks need during one forward: the memory to read and where to put hidden states."""

    memory: torch.Tensor
    collect: bool
    return_stats: bool = False
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per memory layer, its slot keys and values
    log_usage: torch.Tensor | None = None  # (B, L, S) for read_rule="base": the slots' logit bias
    # read_rule="base": rotary tables shared by the memory layers of one forward (None: not shared, as in
    # generate(), whose one call object sees every decoding step's positions)
    rope: dict | None = field(default_factory=dict)
    # read_site="attention": per (memory layer, fused read or not), its slots as the read takes them, kept for
    # the call's later forwards (generate's decoding steps) where no graph is built
    site_kv: dict[tuple[int, bool], tuple] | None = field(default_factory=dict)
    # read_site="attention", fused: every layer's slots prepared at once (StackedSlots) and tanh(gate), per layer
    site_slots: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | SlotsAgain | None = None
    # under the base's checkpointing: makes site_slots again (values only) for the layers' recomputation
    slots_again: Callable[[], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
    # the segment's positions are 0..T-1 for every row (set where _segment makes them so): a graphed read may use
    # fixed rotary tables
    plain_positions: bool = False
    site_gates: list[torch.Tensor] | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)  # hooked layers' outputs (memory added)
    hiddens: dict[int, torch.Tensor] = field(default_factory=dict)  # the same through their reading norms
    stats: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class MemoryModel(MemoryWrapper):
    """A frozen base model plus a trainable LM2-style memory, read and written through hooks."""

    def __init__(self, base: nn.Module, config: GMA6Config) -> None:
        super().__init__(base, config)
        self._call: _Call | None = None
        forward_params = inspect.signature(base.forward).parameters.values()
        # Passing the call through the forward's kwargs lets a checkpointed layer see the same
        # memory when it is recomputed in backward; models without **kwargs use the attribute.
        self._pass_kwarg = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in forward_params)
        # read_site="attention": per memory layer, the call and positions of the next layer's forward
        # now running, and the read its q projection made for its o projection to add
        self._site: dict[int, tuple[_Call, torch.Tensor | None]] = {}
        self._site_read: dict[int, torch.Tensor] = {}
        self._site_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._stacked: StackedSlots | None = None
        # read_site="attention" where the base's attention function can carry it (site.py): the read takes the
        # base's own post-RoPE queries (a before-norm query adapter: its q projection's output, normed and rotated
        # again); the o projection hook then serves only the statistics' explicit read
        self._sites: AttentionSites | None = None
        self._site_pending: set[int] = set()
        # a query adapter on the fast path: per memory layer, the base's rotary tables (from entering its attention),
        # then the q projection's input and output (for the adapter's change)
        self._site_query: dict[int, list] = {}
        # GMA6Config.cuda_graph_read: the reads' CUDA graphs, their fixed buffers and rotary tables
        self._graphed: GraphedReads | None = None
        # GMA6Config.cuda_graph_segments: read()'s full segments replayed from one CUDA graph a shape; the weights'
        # key taken once for a whole read (_reading) instead of at every segment
        self._segment_graph: GraphedCall | None = None
        self._parameter_list = ModuleParameters(self)  # for the graph's weights key, listed lazily
        self._site_cache: dict[str, tuple] = {}  # the reads' stacked gates and sinks (``derived``)
        self._plain_tables: dict[tuple, Any] = {}  # rotary tables of positions 0..T-1 (``plain_tables``)
        try:
            decoder_layers = find_decoder_layers(base)
            # read_rule="base": each memory layer reads through the next layer's attention (a plain list:
            # the base's modules are not the adapter's)
            after = self.config.read_query == "after_norm"
            self._base_reads = ([BaseAttentionRead(decoder_layers[i + 1], find_rotary(base), after) for i in self.config.layers]
                                if self.config.read_rule == "base" else None)
            width = self._base_reads[0].width if self._base_reads else None
            self.controller = MemoryController(self.config, width).to(self._base_device())
            # A plain list: the base's norms must not become part of the adapter's state_dict.
            self._reading_norms = find_reading_norms(base, self.config.layers)
            # Where a reading norm is an RMSNorm, the read folds it into its own (see rms_gain).
            self._reading_gains = [None if n is None else rms_gain(n, self.config.hidden_size) for n in self._reading_norms]
            self._gain_cache: dict[tuple, torch.Tensor] = {}
            # read_rule="base": the eps of each reading norm that folds into one fused rms_norm (None: call it)
            self._fold_eps = [norm_eps(n) if g is not None else None
                              for n, g in zip(self._reading_norms, self._reading_gains)]
            # A plain list again (the base's modules are not the adapter's): whether each checkpoints.
            self._hooked_layers = [decoder_layers[i] for i in self.config.layers]
            if self._base_reads is not None and any(n is None for n in self._reading_norms):
                raise TypeError(f"read_rule='base' reads through the next layer's input norm; {type(base).__name__}'s "
                                "layers have none that gma6 can find")
            self._hooks = LayerHooks(self._hooked_layers, self._make_hook)
            self._norm_hooks = [n.register_forward_hook(self._make_norm_hook(slot))
                                for slot, n in enumerate(self._reading_norms) if n is not None]
            self._stacked = StackedSlots(self._base_reads) if self.config.read_site == "attention" else None
            if self.config.read_site == "attention":
                for slot, i in enumerate(self.config.layers):
                    nxt = decoder_layers[i + 1]
                    self._site_hooks.append(nxt.self_attn.register_forward_pre_hook(self._make_site_enter(slot), with_kwargs=True))
                    self._site_hooks.append(nxt.self_attn.q_proj.register_forward_hook(self._make_site_query(slot)))
                    self._site_hooks.append(nxt.self_attn.o_proj.register_forward_pre_hook(self._make_site_output(slot)))
                attns = [decoder_layers[i + 1].self_attn for i in self.config.layers]
                if (all(r.fusable for r in self._base_reads)
                        and all(supported(getattr(getattr(a, "config", None), "_attn_implementation", None)) for a in attns)):
                    self._sites = AttentionSites({a: self._make_site_rotated(slot) for slot, a in enumerate(attns)})
            for name in ("cuda_graph_read", "triton_read"):
                if getattr(self.config, name) and self._sites is None:
                    raise ValueError(f"{name}=True changes how the read inside the base's attention runs: it needs "
                                     "read_rule='base', read_site='attention' and a base whose attention implementation "
                                     "is sdpa, flash or flex (with no logit softcapping)")
            for name in ("triton_read", "triton_write"):
                if getattr(self.config, name) and not kernel.available():
                    raise ValueError(f"{name}=True needs the triton package (pip install triton; it comes with "
                                     "PyTorch's CUDA builds)")
            if self.config.triton_write and (self.config.write_rule, self.config.read_rule) != ("tokens", "base"):
                raise ValueError("triton_write=True changes the batched tokens write: it needs write_rule='tokens' and "
                                 f"read_rule='base', not {self.config.write_rule!r} and {self.config.read_rule!r}")
            if self.config.cuda_graph_read:
                self._graphed = GraphedReads(kernel.triton_read if self.config.triton_read else rotated_read)
            if self.config.cuda_graph_segments:
                self._segment_graph = GraphedCall(self._graph_step, self._weights_key)
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, slot: int):
        def fn(hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
            call = kwargs.get(_CALL_KWARG) or self._call
            if call is None or self._disabled:
                return None
            if self.config.read_site == "attention":  # read inside the next layer's attention (_make_site_*)
                if call.collect:
                    call.outputs[slot] = hidden
                    call.hiddens.pop(slot, None)
                return None
            # Every tensor op here is a kernel launch or a dispatch a layer a segment, which is what
            # a launch-bound GPU pays for: index and cast only where needed.
            memory = call.memory
            kv = None if call.kv is None else call.kv[slot]
            bias = None if call.log_usage is None else call.log_usage[:, slot]
            if memory.shape[0] != hidden.shape[0]:  # generate() expanded the batch (beams, samples)
                r = hidden.shape[0] // memory.shape[0]
                memory = memory.repeat_interleave(r, dim=0)
                kv = None if kv is None else (kv[0].repeat_interleave(r, dim=0), kv[1].repeat_interleave(r, dim=0))
                bias = None if bias is None else bias.repeat_interleave(r, dim=0)
            if bias is not None:  # read_rule="base": the slots sit before the segment's own positions
                kv = _BaseReadInputs(bias, kwargs.get("position_ids"), call.rope)
            if not call.return_stats and self._checkpointing(slot):
                # The base checkpoints its layers' forward, not their hooks: without this the read's
                # per-token activations would be kept for backward at every segment.
                new = torch.utils.checkpoint.checkpoint(self._read_into, slot, hidden, memory[:, slot], kv,
                                                        use_reentrant=False)
                stats = {}
            else:
                new, stats = self._read_into(slot, hidden, memory[:, slot], kv, call.return_stats, with_stats=True)
            if call.collect:
                # keyed, so a recomputation overwrites instead of appending
                call.outputs[slot] = new
                call.hiddens.pop(slot, None)
            if stats:
                call.stats[slot] = stats
            return new

        return fn

    # read_site="attention": three hooks on the next layer's attention (entering it, its q projection, its o
    # projection). All inside the layer's forward, so they run again when a checkpointed layer is recomputed
    # (transformers checkpoints a layer's forward, not its own hooks); the base passes our call and the
    # positions on to its attention in the kwargs.
    def _make_site_enter(self, slot: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self._site_read.pop(slot, None)  # never a read left from a forward that failed
            self._site_pending.discard(slot)
            self._site_query.pop(slot, None)
            call = kwargs.get(_CALL_KWARG) or self._call
            if call is None or self._disabled:
                self._site.pop(slot, None)
            elif self._sites is not None and not call.return_stats:  # the attention function reads (_make_site_rotated)
                self._site.pop(slot, None)
                self._site_pending.add(slot)
                if self.controller.layers[slot].read_q is not None:
                    self._site_query[slot] = [kwargs.get("position_embeddings"), kwargs.get("position_ids")]
            else:
                self._site[slot] = (call, kwargs.get("position_ids"))

        return hook

    def _make_site_query(self, slot: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            ctx = self._site.pop(slot, None)
            if slot in self._site_query and args:
                self._site_query[slot] += [args[0], output]
            if ctx is None or not args:
                return
            call, positions = ctx
            layer, read = self.controller.layers[slot], self._base_reads[slot]
            fused = read.fusable and not call.return_stats  # the statistics need the attention weights
            slots = call.site_slots[slot] if fused and call.site_slots is not None else None
            if slots is None and call.site_kv is not None:
                slots = call.site_kv.get((slot, fused))
            if slots is None:
                memory, bias = self._slot_memory(call, slot, output.shape[0])
                if fused:
                    slots = read.prepare_slots(memory, bias, layer.sink, output.dtype, layer.read_k, layer.read_v, call.rope)
                else:
                    slots = (read.slot_keys_values(memory, output.dtype, layer.read_k, call.rope, layer.read_v), bias)
                # kept for the call's later steps only without autograd (generate's decoding steps): a
                # recomputed checkpoint must build its own graph
                if call.site_kv is not None and not torch.is_grad_enabled():
                    call.site_kv[(slot, fused)] = slots
            if fused:
                gate = call.site_gates[slot] if call.site_gates is not None else torch.tanh(layer.base_gate)
                delta, stats = (self._recomputed(read.fused_read, output, args[0], slots, positions, layer.read_q,
                                                 call.rope), gate), {}
            else:
                kv, bias = slots
                delta, stats = read.in_attention(output, args[0], kv, bias, positions, layer.base_gate, layer.sink,
                                                 call.return_stats, layer.read_q, call.rope)
            self._site_read[slot] = delta
            if stats:
                call.stats[slot] = stats

        return hook

    def _make_site_rotated(self, slot: int):
        """The read as the attention function's site: from the base's queries after its q-norm and RoPE."""
        def site(query: torch.Tensor, out: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
            call = kwargs.get(_CALL_KWARG) or self._call
            if call is None or self._disabled or call.return_stats:
                return out
            self._site_pending.discard(slot)
            layer, read = self.controller.layers[slot], self._base_reads[slot]
            slots = call.site_slots[slot] if call.site_slots is not None else None
            if slots is None and call.site_kv is not None:
                slots = call.site_kv.get((slot, "rotated"))
            if slots is None:
                memory, bias = self._slot_memory(call, slot, query.shape[0])
                slots = read.prepare_slots(memory, bias, layer.sink, query.dtype, layer.read_k, layer.read_v, call.rope,
                                           rotated=True)
                if call.site_kv is not None and not torch.is_grad_enabled():  # as in _make_site_query
                    call.site_kv[(slot, "rotated")] = slots
            gate = call.site_gates[slot] if call.site_gates is not None else torch.tanh(layer.base_gate)
            args: tuple = (query, slots)
            if layer.read_q is not None:
                got = self._site_query.pop(slot, None)
                if got is None or len(got) != 4:
                    raise RuntimeError("gma6: the read's query adapter did not see the q projection's input (the base's "
                                       "attention no longer calls its q_proj module)")
                embeddings, positions, view, q_pre = got
                # Training, positions 0..T-1 in every row: the tables kept between calls (a step's calls, each kept
                # until backward, held a (B, T, d) copy each: 32 MiB at 8 x 4k). Not without autograd: a captured
                # segment graph may read the tables it was recorded with, which dropping here would free.
                if torch.is_grad_enabled() and call.plain_positions and read.rotary is not None:
                    if len(self._plain_tables) >= 64:  # segments come in many lengths: the few seen lately
                        self._plain_tables.clear()
                    tables = read.plain_tables(query, self._plain_tables)
                else:
                    tables = read.rotation_tables(query, embeddings, positions, call.rope)
                args = (query, slots, view, layer.read_q, tables,
                        None if read.query_after_norm else q_pre)
            args = read.rotated_args(*args)
            q, k, v, mask, scaling, view, down, up, tables, q_pre, gain, eps, norm = args
            fits = self.config.triton_read and kernel.unsupported(*args, out=out, gate=gate) is None
            graphed = self._graphed
            if (graphed is not None and call.plain_positions and query.is_cuda and norm is None
                    and not torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and graphed.staged(k)
                    and not torch.cuda.is_current_stream_capturing()  # inside a whole segment's graph
                    and (fits or not self.config.triton_read)):
                tables = None if down is None else read.plain_tables(q, graphed.tables)
                return add_read_heads(out, graphed.read(slot, q, k, v, mask, scaling, view, down, up, tables, q_pre,
                                                        gain, eps), gate)
            if fits:
                # the slots come from prepare_slots / StackedSlots: their last is the zero sink; in place, as ``out``
                # is the attention function's own result and nothing here needs gradients (``fits``)
                return kernel.triton_read(*args, out=out, gate=gate, checked=True, zero_sink=True, in_place=True)
            return add_read_heads(out, self._recomputed(rotated_read, *args), gate)

        return site

    @staticmethod
    def _slot_memory(call: _Call, slot: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One memory layer's slots and log-usage for a read of ``batch`` rows (generate() expands the batch for
        beams and samples)."""
        memory, bias = call.memory[:, slot], call.log_usage[:, slot]
        if memory.shape[0] != batch:
            r = batch // memory.shape[0]
            memory, bias = memory.repeat_interleave(r, dim=0), bias.repeat_interleave(r, dim=0)
        return memory, bias

    def _make_site_output(self, slot: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if slot in self._site_pending:  # never a silent memory-less answer
                self._site_pending.discard(slot)
                raise RuntimeError(
                    "gma6: the memory read did not run in the attention call: the base's attention implementation was "
                    "changed after attach_memory (detach and attach again)")
            delta = self._site_read.pop(slot, None)
            if delta is None or not args:
                return None
            x = args[0]
            if isinstance(delta, tuple):  # the fused read and its tanh(gate): one kernel
                return (add_read(x, *delta), *args[1:])
            return (x + delta.to(x.dtype), *args[1:])

        return hook

    def _read_into(self, slot: int, hidden: torch.Tensor, memory: torch.Tensor,
                   kv: tuple[torch.Tensor, torch.Tensor] | _BaseReadInputs | None,
                   return_stats: bool = False, with_stats: bool = False) -> Any:
        """``hidden`` plus what it reads from one layer's slots (and the read's statistics if ``with_stats``).
        For read_rule="base", ``kv`` is a ``_BaseReadInputs`` instead."""
        norm, gain = self._reading_norms[slot], self._reading_gains[slot]
        if self._base_reads is not None:
            layer = self.controller.layers[slot]
            bias, positions, rope = kv  # _BaseReadInputs
            view = self._reading_norm(slot, hidden)
            delta, stats = self._base_reads[slot](view, memory, bias, positions, layer.base_gate, layer.sink,
                                                  return_stats, layer.read_q, layer.read_k, rope, layer.read_v)
            new = hidden + delta.to(hidden.dtype)
            return (new, stats) if with_stats else new
        if gain is not None:  # rms_norm(norm(h)) == rms_norm(h * g): the read normalises its view
            view = hidden * self._gain(slot, hidden.device, read_dtype(hidden.dtype, memory.dtype, return_stats))
        else:
            view = norm(hidden) if norm is not None else None
        delta, stats = self.controller.read(slot, hidden, memory, return_stats, view, kv)
        new = hidden + (delta if delta.dtype == hidden.dtype else delta.to(hidden.dtype))
        return (new, stats) if with_stats else new

    def _recomputed(self, fn: Any, *args: Any, in_layer: bool = True) -> Any:
        """``fn(*args)``, its intermediates recomputed in backward wherever a graph is built, unless ``in_layer`` (it
        runs inside a decoder layer's forward) and the base recomputes its layers already. Why: kept, the read's fp32
        q-norm, RoPE and attention intermediates and the write's fp32 norm and scores of every token were most of what
        a memory-only training step keeps beyond the frozen base (H200, batch 8 x 4k: the read's about 6.5 GiB; this
        CPU, bf16: the write's 282 of 426 MiB); recomputing them costs one more forward of these few kernels."""
        if torch.is_grad_enabled() and not (in_layer and self._checkpointing()):
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _checkpointing(self, slot: int | None = None) -> bool:
        """Whether the base recomputes (this hooked layer's / any hooked layer's) activations in backward now."""
        if not torch.is_grad_enabled():
            return False
        layers = self._hooked_layers if slot is None else [self._hooked_layers[slot]]
        return any(getattr(m, "gradient_checkpointing", False) and m.training for m in layers)

    def _gain(self, slot: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Cached per device and dtype: a cast a layer a segment would be a kernel launch each.
        # The base is frozen, so its norms' gains never change while attached.
        key = (slot, device, dtype)
        if key not in self._gain_cache:
            self._gain_cache[key] = self._reading_gains[slot].to(device, dtype)
        return self._gain_cache[key]

    def _make_norm_hook(self, slot: int):
        """Keep what the base's reading norm makes of a hooked layer's output: the write needs it,
        and the base computes it anyway (the next layer's input norm), so it costs nothing."""

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = self._call
            # Identity, not equality: the norm's other inputs (our own ``view``, a checkpoint's
            # detached copy) must not stand in for the layer's output.
            # Not under the base's checkpointing: the call lives until backward there, and the write norms the
            # outputs the checkpoints keep anyway again in its own recomputation (``_write_outputs``).
            if (call is not None and call.collect and args and args[0] is call.outputs.get(slot)
                    and not self._checkpointing()):
                call.hiddens[slot] = output[0] if isinstance(output, tuple) else output

        return hook

    def _written_hiddens(self, call: _Call) -> list[torch.Tensor]:
        """Per memory layer, its output through the base's reading norm (computed where the base did not)."""
        out = []
        for slot, norm in enumerate(self._reading_norms):
            new = call.outputs[slot]
            got = call.hiddens.get(slot)
            if got is None or (new.requires_grad and not got.requires_grad):
                got = norm(new) if norm is not None else new
            out.append(got)
        return out

    def _write_outputs(self, state: MemoryState, outputs: list[torch.Tensor], mask: torch.Tensor,
                       full: bool) -> tuple[MemoryState, list]:
        """The write from the memory layers' outputs, each through the base's reading norm here: where it folds into
        an RMSNorm (``rms_gain``), as one fused fp32 ``rms_norm`` with its gain (equal to the base's within fp32
        rounding, before the cast back), else by its own module. Why: the base's own norm is about ten kernels a
        layer, paid again in the write's recomputation and more in its backward, at every memory layer of every
        segment of a checkpointed training step. Layer by layer, not all at once: stacked, the fp32 copies of every
        layer's output raised the step's peak (H100, 8 x 4k: 3.68 -> 3.76 GiB)."""
        hiddens = [self._reading_norm(slot, o) for slot, o in enumerate(outputs)]
        return self.controller.write(state, hiddens, mask, False, full)

    def _reading_norm(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` through memory layer ``slot``'s reading norm (the next layer's input norm): where it folds into an
        RMSNorm, one fused fp32 kernel with its gain (the base's own is several kernels, at every memory layer of
        every segment), else the module itself (none: ``x``)."""
        eps, norm = self._fold_eps[slot], self._reading_norms[slot]
        if isinstance(eps, float):
            return F.rms_norm(x.float(), (x.shape[-1],), self._gain(slot, x.device, torch.float32), eps).to(x.dtype)
        return norm(x) if norm is not None else x

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        memory_state: MemoryState | None = None,
        write: bool = True,
        return_stats: bool = False,
        write_targets: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemoryOutput:
        """Run one segment: read the memory at the hooked layers, then write the segment into it.

        Args:
            input_ids: (B, T) token ids of one segment.
            attention_mask: (B, T), 1 at real tokens; padding tokens are not written.
            labels: (B, T) as for the base model (-100 is ignored); gives ``loss``.
            memory_state: the memory before this segment; None starts a fresh one.
            write: update the memory with this segment (False: read-only).
            return_stats: return per-layer gate, usage, age and attention statistics.
            write_targets: (B, T) bool, the tokens worth writing (``write_rule="tokens"``): the
                output's ``write_loss`` is then ``MemoryController.selection_loss`` of this segment.
            **kwargs: passed to the base model (e.g. ``logits_to_keep``).
        """
        self._check_attached()
        input_ids, mask = _check_input(input_ids, attention_mask, vocab=self._vocab_size())
        if write_targets is not None:
            if not isinstance(write_targets, torch.Tensor) or write_targets.shape != input_ids.shape:
                raise ValueError(f"write_targets must be a tensor of shape {tuple(input_ids.shape)} (one flag a token), "
                                 f"got {getattr(write_targets, 'shape', type(write_targets).__name__)}")
            if not write or self.config.write_rule != "tokens":
                raise ValueError("write_targets supervise the tokens write: they need write=True and write_rule='tokens'")
        state = self._prepare_state(memory_state, input_ids.shape[0])
        # no mask given: no padding, so the base gets none to check (transformers syncs on a given one)
        return self._segment(input_ids, mask, state, labels, write, return_stats, packed=False,
                             full=attention_mask is None, write_targets=write_targets, **kwargs)

    def _hidden_dtype(self) -> torch.dtype:
        """The dtype of the base's residual stream (its embeddings'; a 4-bit base computes in those too)."""
        return self.base.get_input_embeddings().weight.dtype

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Inside: no parameter changes (``read`` enters it: nothing trains within one read), so replayed segments
        (``cuda_graph_segments``) take the weights' versions once, not at every segment (a few hundred tensors: host
        time a segment)."""
        graph = self._segment_graph
        with torch.no_grad(), graph.weights_fixed() if graph is not None else nullcontext():
            yield

    def _weights_key(self) -> tuple | None:
        """What a segment graph is recorded with: the parameters' versions (None: inference tensors, no replay)."""
        return self._parameter_list.key()

    def _read_step(self, input_ids: torch.Tensor, mask: torch.Tensor, state: MemoryState, full: bool = False) -> MemoryState:
        # ``read`` checked the whole input and cut it with ``split_segments``: each row's tokens are
        # packed to the left, which lets the segment skip its checks and mask arithmetic.
        state = state.to(self.device)  # offload_to_cpu keeps it on the CPU between segments
        graph = self._segment_graph
        if graph is not None and full and graph.usable(input_ids, state.memory):
            memory, usage, age, tokens_read = graph(input_ids, mask, state.memory, state.usage, state.age,
                                                    state.tokens_read)
            return MemoryState(memory, usage, age, tokens_read, state.segments_read + 1)
        return self._segment(input_ids, mask, state, None, True, False, packed=True, full=full,
                             logits_to_keep=1).memory_state

    def _graph_step(self, input_ids: torch.Tensor, mask: torch.Tensor, memory: torch.Tensor, usage: torch.Tensor,
                    age: torch.Tensor, tokens_read: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A full segment of ``read`` as a function of tensors, for ``GraphedCall`` (the state's count of segments
        is a Python int, kept outside)."""
        state = self._segment(input_ids, mask, MemoryState(memory, usage, age, tokens_read), None, True, False,
                              packed=True, full=True, logits_to_keep=1).memory_state
        return state.memory, state.usage, state.age, state.tokens_read

    def _segment(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        state: MemoryState,
        labels: torch.Tensor | None,
        write: bool,
        return_stats: bool,
        packed: bool,
        full: bool = False,
        write_targets: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemoryOutput:
        """One checked segment (``mask`` bool). ``packed``: every row's real tokens come first;
        ``full``: every position is a real token (the base then gets no mask to check)."""
        # MemoryOutput carries no KV cache; building one costs the base a few ops a layer
        kwargs.setdefault("use_cache", False)
        plain = False
        if kwargs.get("position_ids") is None:
            if packed or full:  # real tokens sit at 0, 1, 2, ...; what padding gets is never read
                kwargs["position_ids"] = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
                plain = True
            else:
                # Positions count real tokens only, so a left-padded sample sees what it sees alone.
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if self._disabled:
            out = self.base(input_ids=input_ids, attention_mask=mask.long(), labels=labels, **kwargs)
            return MemoryOutput(out.logits, getattr(out, "loss", None), state,
                                hidden_states=getattr(out, "hidden_states", None))
        # A sample with no real token in this segment would attend to nothing (NaN in the base);
        # show it one token, then keep its memory unchanged in the write.
        base_mask: torch.Tensor | None = None  # full: transformers checks a given mask on the host (a sync)
        if not full:
            base_mask = mask.long()
            if packed:  # a row with any token has one at 0
                base_mask[:, 0] = 1
            else:
                base_mask[:, 0] |= ~mask.any(dim=1)  # not boolean indexing: that would sync with the device
        call = self._make_call(state, write, return_stats, plain_positions=plain)
        if not return_stats:
            self._prepare_site(call, input_ids.shape[0])
        if self._pass_kwarg:
            kwargs[_CALL_KWARG] = call
        self._call = call
        try:
            out = self.base(input_ids=input_ids, attention_mask=base_mask, labels=labels, **kwargs)
        finally:
            self._call = None
        if call.slots_again is not None:  # the layers' recomputation makes them again (the call lives until then)
            call.site_slots = SlotsAgain(call.site_slots, call.slots_again)
        new_state, stats, write_loss = state, None, None
        if write:
            if write_targets is not None:
                write_loss = self._recomputed(self.controller.selection_loss, self._written_hiddens(call), mask,
                                              write_targets.bool(), in_layer=False)
            if return_stats:
                new_state, stats = self.controller.write(state, self._written_hiddens(call), mask, True, full)
            elif self._checkpointing():
                # The base keeps each layer's output for its recomputation: the write keeps those and norms them
                # again in backward, not a normed copy of its own (a hidden state a memory layer a segment).
                outputs = [call.outputs[slot] for slot in range(len(self._reading_norms))]
                new_state, stats = self._recomputed(self._write_outputs, state, outputs, mask, full, in_layer=False)
            else:  # outside the layers: the base's own checkpointing never covers it
                new_state, stats = self._recomputed(self.controller.write, state, self._written_hiddens(call), mask,
                                                    False, full, in_layer=False)
            if return_stats:
                for i, st in enumerate(stats):
                    st.update(call.stats.get(i, {}))
        if self.config.offload_to_cpu:
            new_state = new_state.to("cpu")
        return MemoryOutput(out.logits, getattr(out, "loss", None), new_state, stats,
                            hidden_states=getattr(out, "hidden_states", None), write_loss=write_loss)

    def _make_call(self, state: MemoryState, write: bool, return_stats: bool = False, **fields: Any) -> _Call:
        """What the hooks read during one forward over ``state``: the memory as read (``write=False``: answering),
        its keys and values, and (``write``) where to collect the hidden states to write. ``fields``: more of
        ``_Call``'s."""
        kv_dtype = read_dtype(self._hidden_dtype(), state.memory.dtype, return_stats)
        memory, bias = self.controller.read_inputs(state.memory, self._log_usage(state), answering=not write)
        return _Call(memory=memory, collect=write, return_stats=return_stats,
                     kv=self.controller.read_keys_values(state.memory, kv_dtype), log_usage=bias, **fields)

    def _prepare_site(self, call: _Call, batch: int) -> None:
        """read_site="attention": every layer's slots and gates for the fused read, at once, where ``StackedSlots``
        applies (else each layer prepares its own in its hook)."""
        if self._stacked is None or not self._stacked.applies() or call.memory.shape[0] != batch:
            return
        layers = self.controller.layers
        dtype = self._hidden_dtype()
        # cast once here, not at each layer's add (the read adds in the base's dtype)
        gates, sinks = derived(self._site_cache, f"gates_sinks_{dtype}", [p for m in layers for p in (m.base_gate, m.sink)],
                               lambda: (list(torch.tanh(torch.stack([m.base_gate for m in layers])).to(dtype).unbind(0)),
                                        torch.stack([m.sink for m in layers])))
        call.site_gates = gates
        adapters = layers[0].read_k is not None
        grad = torch.is_grad_enabled()
        prepare = functools.partial(
            self._stacked.prepare, dtype=dtype, k_adapters=[m.read_k for m in layers] if adapters else None,
            v_adapters=[m.read_v for m in layers] if adapters else None, cache=call.rope, rotated=self._sites is not None,
            stage=None if self._graphed is None else self._graphed.stage,
            # Under autograd the slots stay until backward (a segment's reads, recomputed or not, use them): kept
            # once per key-value head, not repeated over the query groups (4x on Gemma 3); each read folds its
            # query heads into the tokens or repeats its own (``slots_sdpa``).
            repeat=not self.config.triton_read and not grad)
        # Under autograd its intermediates are recomputed in backward (in_layer=False: the base's checkpointing
        # never covers it): kept, every segment's would stay until backward (~1 GiB at 8 x 4k on the 270M); the
        # per-layer preparation inside each recomputed layer instead cost ~16 kernels a layer a segment (H200, 8 x
        # 4k, checkpointing: 2.60 against 2.20 s a step, results/session19/train/).
        call.site_slots = self._recomputed(prepare, call.memory, call.log_usage, sinks, in_layer=False)
        if grad and self._checkpointing():
            # closing over the tensors, not the call: a cycle through the call would keep every segment's call (and
            # all it holds) until Python's cyclic collector ran, across training steps
            memory, bias = call.memory.detach(), call.log_usage.detach()
            call.slots_again = lambda: prepare(memory, bias, sinks.detach())

    def _log_usage(self, state: MemoryState) -> torch.Tensor | None:
        return log_usage(state.usage) if self._base_reads is not None else None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        memory_state: MemoryState | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """``base.generate`` with the memory read-only at every step (the KV cache works as usual)."""
        self._check_attached()
        input_ids, mask = _check_input(input_ids, attention_mask, vocab=self._vocab_size(),
                                       vocab_on_device=True)
        state = self._prepare_state(memory_state, input_ids.shape[0])
        self._call = self._make_call(state, write=False, rope=None)
        self._prepare_site(self._call, input_ids.shape[0])
        try:
            return self.base.generate(input_ids=input_ids, attention_mask=mask.long(), **generate_kwargs)
        finally:
            self._call = None

    def _remove_hooks(self) -> None:
        try:
            hooks = getattr(self, "_hooks", None)
            if hooks is not None:
                hooks.remove()
        finally:
            for handle in [*getattr(self, "_norm_hooks", ()), *getattr(self, "_site_hooks", ())]:
                handle.remove()
            self._norm_hooks, self._site_hooks = [], []
            if getattr(self, "_sites", None) is not None:
                self._sites.remove()
                self._sites = None
            getattr(self, "_site_pending", set()).clear()
            getattr(self, "_site", {}).clear()
            getattr(self, "_site_read", {}).clear()
            if getattr(self, "_graphed", None) is not None:
                self._graphed.release()
            if getattr(self, "_segment_graph", None) is not None:
                self._segment_graph.clear()


def attach_memory(model: nn.Module, config: GMA6Config | None = None) -> nn.Module:
    """Freeze ``model`` and attach a fresh memory to it. The outputs are unchanged until trained.

    ``config.memory_type`` picks the kind: "gated" gives a ``MemoryModel``, "rmt" the memory-token peer.
    """
    config = config or GMA6Config()
    return memory_class(config)(model, config)


def load_adapter(model: nn.Module, directory: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Attach the adapter saved in ``directory`` (of whichever memory kind) to ``model``."""
    config = GMA6Config.load(directory)
    return memory_class(config).from_pretrained(model, directory, **overrides)


def memory_class(config: GMA6Config) -> type:
    """The model class implementing ``config.memory_type``."""
    if not isinstance(config, GMA6Config):
        raise TypeError(f"config must be a GMA6Config, got {type(config).__name__}")
    if config.memory_type == "rmt":
        from .rmt import RMTMemoryModel

        return RMTMemoryModel
    return MemoryModel


def _check_input(input_ids: Any, attention_mask: Any, ones: bool = True, vocab: int | None = None,
                 vocab_on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The checked (B, N) ids and bool mask; without an ``attention_mask`` an all-ones mask, or None if not ``ones``
    (a caller that takes None as "no padding" saves making it). Ids are checked against ``vocab`` (the embedding
    would fail with a bare IndexError, or a device-side assert on a GPU) where they are on the CPU, and on an
    accelerator too with ``vocab_on_device``: a host sync, which generation (a sync a token anyway) can afford and a
    read (kept free of syncs for its replayed segments) or a training step's segment should not pay."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if vocab is not None and (vocab_on_device or input_ids.device.type == "cpu"):
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids hold token id {bad}, outside the base's vocabulary of {vocab} (ids 0..{vocab - 1})")
    if attention_mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if ones else None
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        mask = attention_mask.bool()
        if not mask.any():  # without a mask every token is real (a host sync saved)
            raise ValueError("the input has no real token (attention_mask is all zero)")
    return input_ids, mask


def split_segments(
    input_ids: torch.Tensor, mask: torch.Tensor | None, segment_length: int, bos_token_id: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a (padded) batch into segments of at most ``segment_length`` tokens.

    Each row's real tokens are packed to the left first, so a row is cut as it would be alone.
    With ``bos_token_id``, a leading BOS is dropped and every segment starts with one, leaving
    ``segment_length - 1`` text tokens a segment. ``mask`` None: no padding.
    """
    return [(ids, m) for ids, m, _ in _cut(input_ids, mask, segment_length, bos_token_id)[0]]


def cut_segments(
    input_ids: torch.Tensor, mask: torch.Tensor | None, segment_length: int, bos_token_id: int | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[bool]]:
    """``split_segments``, and for each segment whether every position holds a real token (a full segment: the
    base gets no padding mask). One host sync (a BOS adds one); none where ``mask`` is None (no padding)."""
    cut, full = _cut(input_ids, mask, segment_length, bos_token_id)
    return [(ids, m) for ids, m, _ in cut], full


def split_aligned(
    values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, segment_length: int, bos_token_id: int | None = None
) -> list[torch.Tensor]:
    """``values`` (B, N), one per token of ``input_ids``, cut exactly as ``split_segments`` cuts the
    tokens (a BOS it adds gets 0 / False): per-token targets that follow their tokens into segments."""
    if values.shape != input_ids.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != input_ids shape {tuple(input_ids.shape)}")
    return [v for _, _, v in _cut(input_ids, mask, segment_length, bos_token_id, values)[0]]


def _cut(
    input_ids: torch.Tensor, mask: torch.Tensor | None, segment_length: int, bos_token_id: int | None,
    values: torch.Tensor | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], list[bool]]:
    """``split_segments``' cut, carrying ``values`` (B, N) along with the tokens when given, and which segments are
    full. The host learns each row's count of real tokens (one sync) and cuts by it."""
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length <= 0:
        raise ValueError(f"segment_length={segment_length!r}: expected a positive int")
    if bos_token_id is not None and segment_length < 2:
        raise ValueError(f"segment_length={segment_length}: needs at least 2 tokens when each segment starts with BOS")
    carried = [input_ids] if values is None else [input_ids, values]
    n = input_ids.shape[1]
    if mask is None:  # no padding: nothing to pack or count
        mask = torch.ones_like(input_ids, dtype=torch.bool)
        counts = [n] * input_ids.shape[0]
    else:
        mask, carried, counts = _pack(mask.bool(), carried)
    if bos_token_id is not None:
        lead = (carried[0][:, 0] == bos_token_id) & mask[:, 0]
        drops = lead.tolist()
        if any(drops):
            mask = mask.clone()
            mask[:, 0] &= ~lead
            mask, carried, counts = _pack(mask, carried, [c - d for c, d in zip(counts, drops)])
    input_ids, values = carried[0], (carried[1] if values is not None else None)
    step = segment_length - (bos_token_id is not None)
    out, full = [], []
    for s in range(0, max(max(counts), 1), step):
        ids, m = input_ids[:, s : s + step], mask[:, s : s + step]
        v = None if values is None else values[:, s : s + step]
        full.append(min(counts) >= min(s + step, n))
        if bos_token_id is not None:
            b = ids.shape[0]
            ids = torch.cat([torch.full((b, 1), bos_token_id, dtype=ids.dtype, device=ids.device), ids], 1)
            m = torch.cat([m[:, :1], m], 1)  # BOS only where the segment has text
            v = None if v is None else torch.cat([torch.zeros_like(v[:, :1]), v], 1)
        out.append((ids, m, v))
    return out, full


def pack_left(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (order kept), padding to the back."""
    mask, (input_ids,), _ = _pack(mask.bool(), [input_ids])
    return input_ids, mask


def _pack(mask: torch.Tensor, tensors: list[torch.Tensor], counts: list[int] | None = None
          ) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """``pack_left`` of a bool ``mask`` and every (B, N) tensor in ``tensors`` by the same order; with each row's
    count of real tokens (``counts`` if the caller knows them; else one host sync learns them with whether the rows
    are packed already)."""
    if counts is None:
        per_row = mask.sum(1)
        packed = (mask == (torch.arange(mask.shape[1], device=mask.device) < per_row[:, None])).all()
        *counts, is_packed = torch.cat([per_row, packed.long()[None]]).tolist()
        if is_packed:
            return mask, list(tensors), counts
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return mask.gather(1, order), [t.gather(1, order) for t in tensors], counts
