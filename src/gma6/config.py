"""`GMA6Config`: what a memory adapter is, validated on construction, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "gma6_config.json"
MEMORY_TYPES = ("gated", "rmt")
ADDRESSING = ("content", "content+usage")
WRITE_RULES = ("slots", "tokens")
READ_RULES = ("memory", "base")
READ_SITES = ("residual", "attention")
READ_QUERIES = ("before_norm", "after_norm", "none")
PERSISTENT_READS = ("always", "answer")
RETENTIONS = ("recent", "priority")


def _check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a non-negative int")


@dataclass
class GMA6Config:
    """Configuration of a memory adapter.

    Fields left as None are filled from the base model by ``resolve`` (``attach_memory`` calls it).

    Attributes:
        memory_type: "gated" (LM2-style slots read by cross-attention) or "rmt" (memory tokens).
        num_slots: memory slots per memory layer (for "rmt": the number of memory tokens).
        memory_dim: width of a slot; None follows the model's hidden size. Narrower keeps adapters small.
        num_heads: attention heads of the read and write attentions; must divide memory_dim.
        layers: decoder layer indices that get memory; None spreads ``num_memory_layers`` over the depth.
        num_memory_layers: how many layers the default spread picks.
        forget_bias: initial bias of the forget gate (positive: slots are kept at first).
        input_bias: initial bias of the input gate.
        output_gate_bias: initial bias of the read's output gate.
        addressing: "content" (slots attend to the segment by content) or "content+usage"
            (the input gate also favours little-used slots).
        write_rule: "slots" (LM2: every slot reads the segment by attention, then input and forget
            gates) or "tokens" (each segment's ``tokens_per_segment`` highest-scoring tokens are
            written as new slots, each through its own sigmoid input gate; older slots decay by a
            learned sigmoid forget gate and the oldest are dropped: token-level bindings are kept).
        tokens_per_segment: new slots a segment for ``write_rule="tokens"``.
        token_retention: which slots the tokens rule keeps when full: "recent" (the newest) or
            "priority" (the highest input gate, decayed by ``usage_decay`` a segment; kept in the
            order they were read, so a fact read late stays after one read early).
        read_rule: "memory" (the memory's own multi-head cross-attention, LM2) or "base" (the
            slots hold the base's own normalised hidden states of the tokens written, and each
            memory layer reads them through the *next* decoder layer's attention projections,
            RoPE and output norm, as if they were earlier tokens of the window; a separate softmax
            with a learned sink, each slot's logit biased by the log of its usage, added to the
            residual through a tanh gate that starts at zero). Needs ``write_rule="tokens"`` and
            slots as wide as the base (``memory_dim=None``); the memory's own weights are then only
            the gates and the write's scorer.
        read_site: where ``read_rule="base"`` reads: "residual" (after memory layer i, through layer
            i+1's projections, added to the residual stream through a gate of the hidden width) or
            "attention" (inside layer i+1's own attention, with the queries it computes anyway, added
            before its o projection through a gate of the attention's width: no second pass of the
            segment through the q and o projections, so nearly free to read).
        read_rank: with ``read_rule="base"``, a low-rank adaptation (rank r, zero at start) of what the
            read's queries, keys and values are made from, ``x + U V x``: the memory's own, never the base's
            attention (the base reading its window is untouched). 0: none.
        read_query: where the query's adaptation enters: "before_norm" (added to the q projection's output,
            then q-normed and rotated with it) or "after_norm" (added after the base's q-norm and rotated with
            its queries: ``RoPE(qnorm(W_q x) + U V x)``). "after_norm" reads from the base's own finished
            queries (one RoPE of the change instead of a q-norm and RoPE of every changed query); the two are
            different functions, so an adapter trained with one is not the other. "none": no query adaptation,
            only the slots' keys and values are adapted (work once a segment, not at every token: the read costs
            what it costs without adapters).
        persistent_slots: with ``read_rule="base"``, learned slots every read sees before the written ones (never
            written, the same in every sample: a prefix the memory learns, as prefix tuning, without touching the
            base). Each layer's persistent slots get one learned logit bias, starting at -4 (nearly unread). 0: none.
        persistent_reads: when the persistent slots are read: "always" (every read), or "answer" (only where the memory
            is read without being written: a ``write=False`` forward and ``generate``, i.e. when the model answers
            from its memory). With "answer" the reading of a document, and so the base's next-token predictions
            over it, is untouched by them: a steer for answering that costs ordinary text nothing.
        usage_decay: per-segment decay of the usage statistic.
        usage_weight: how strongly "content+usage" favours little-used slots.
        write_threshold: a slot counts as written (its age resets) when its mean input gate exceeds this.
        offload_to_cpu: keep memory states on the CPU between segments.
        max_memory_usage: accelerator memory budget in GiB; None means no budget.
        use_half_precision: run the base in bf16 (fp16 where bf16 is unsupported); gates stay fp32.
        use_4bit_quantization: load the frozen base in 4 bits (bitsandbytes).
        gradient_checkpointing: recompute the base's activations in backward.
        cuda_graph_read: on CUDA, replay each layer's read (``read_site="attention"`` on the base's attention
            function) from a CUDA graph where that is exact (no autograd, full segments at positions 0..T-1, as
            ``read`` runs them): one launch instead of a dozen a layer, for a launch-bound GPU
            (``memory/graphed.py``; fixed buffers of ~40 MB a layer at 8 x 1024 tokens in bf16). Elsewhere, on
            other devices and under ``torch.inference_mode`` (as ``gma6 eval`` runs), the read runs eagerly.
        triton_read: on CUDA, make each layer's read (``read_site="attention"`` on the base's attention function)
            one Triton kernel (``memory/triton_read.py``): the query adapter's change, q-norm, RoPE, the slots'
            attention and the gated add in one pass over the queries instead of a dozen kernels. Within bf16 rounding
            of the eager read; needs the ``triton`` package. Where it cannot run (autograd, another device) the
            read runs eagerly. With ``cuda_graph_read`` the graphs replay the kernel.
        triton_write: on CUDA, score the segment's tokens and gather the new slots of the tokens write
            (``write_rule="tokens"``, without autograd) in two Triton kernels (``memory/triton_write.py``) instead of
            an fp32 copy of every layer's hidden states and a dozen passes over them. The same slots; the scores the
            same sums in another order. Needs the ``triton`` package; elsewhere the write runs eagerly.
        cuda_graph_segments: on CUDA, replay each full segment of ``read`` (the base's forward with the memory's
            read and write) from one CUDA graph a shape (``segment_graph.py``): one launch instead of ~1600 kernels'
            worth of host work a segment of the 270M. Exact (the same kernels on the same inputs). Needs a base whose
            forward has no host syncs for full segments (transformers' own skip theirs under capture). Elsewhere
            (another device, autograd, ``torch.inference_mode``, a segment with padding) the segment runs eagerly.
        lora_rank: rank of the LoRA co-trained on the base's attention (0: none); set by
            ``add_lora``, saved with the adapter.
        lora_alpha: LoRA scaling numerator (None: ``2 * lora_rank``).
        lora_targets: the base's module names that get LoRA.
        hidden_size, num_hidden_layers, model_type: filled from the base; checked on load.
    """

    memory_type: str = "gated"
    num_slots: int = 16
    memory_dim: int | None = 128
    num_heads: int = 4
    layers: list[int] | None = None
    num_memory_layers: int = 4
    forget_bias: float = 3.0
    input_bias: float = 0.0
    output_gate_bias: float = 0.0
    addressing: str = "content"
    write_rule: str = "slots"
    tokens_per_segment: int = 4
    token_retention: str = "recent"
    read_rule: str = "memory"
    read_rank: int = 0
    read_query: str = "before_norm"
    persistent_slots: int = 0
    persistent_reads: str = "always"
    read_site: str = "residual"
    usage_decay: float = 0.9
    usage_weight: float = 1.0
    write_threshold: float = 0.1
    offload_to_cpu: bool = False
    max_memory_usage: float | None = None
    use_half_precision: bool = False
    use_4bit_quantization: bool = False
    gradient_checkpointing: bool = False
    cuda_graph_read: bool = False
    triton_read: bool = False
    triton_write: bool = False
    cuda_graph_segments: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    model_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory_type not in MEMORY_TYPES:
            raise ValueError(f"memory_type={self.memory_type!r}: expected one of {MEMORY_TYPES}")
        _positive_int("num_slots", self.num_slots)
        _positive_int("num_heads", self.num_heads)
        _positive_int("num_memory_layers", self.num_memory_layers)
        if self.memory_dim is not None:
            _positive_int("memory_dim", self.memory_dim)
            if self.memory_dim % self.num_heads:
                raise ValueError(f"memory_dim={self.memory_dim} is not divisible by num_heads={self.num_heads}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                raise ValueError(f"layers={self.layers!r}: expected a non-empty list of layer indices")
            for i in self.layers:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise ValueError(f"layers={self.layers!r}: {i!r} is not a non-negative int")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={self.layers!r}: duplicate layer index")
            self.layers = sorted(self.layers)
        if self.addressing not in ADDRESSING:
            raise ValueError(f"addressing={self.addressing!r}: expected one of {ADDRESSING}")
        if self.write_rule not in WRITE_RULES:
            raise ValueError(f"write_rule={self.write_rule!r}: expected one of {WRITE_RULES}")
        _positive_int("tokens_per_segment", self.tokens_per_segment)
        if self.token_retention not in RETENTIONS:
            raise ValueError(f"token_retention={self.token_retention!r}: expected one of {RETENTIONS}")
        if self.read_rule not in READ_RULES:
            raise ValueError(f"read_rule={self.read_rule!r}: expected one of {READ_RULES}")
        _check_non_negative_int("read_rank", self.read_rank)
        if self.read_site not in READ_SITES:
            raise ValueError(f"read_site={self.read_site!r}: expected one of {READ_SITES}")
        if self.read_site != "residual" and self.read_rule != "base":
            raise ValueError(f"read_site={self.read_site!r} places the base read: it needs read_rule='base'")
        if self.read_query not in READ_QUERIES:
            raise ValueError(f"read_query={self.read_query!r}: expected one of {READ_QUERIES}")
        if self.read_query != "before_norm" and not self.read_rank:
            raise ValueError(f"read_query={self.read_query!r} places the read's query adaptation: it needs read_rank > 0")
        _check_non_negative_int("persistent_slots", self.persistent_slots)
        if self.persistent_slots and self.read_rule != "base":
            raise ValueError(f"persistent_slots={self.persistent_slots} are read by the base read: it needs read_rule='base'")
        if self.persistent_reads not in PERSISTENT_READS:
            raise ValueError(f"persistent_reads={self.persistent_reads!r}: expected one of {PERSISTENT_READS}")
        if self.read_rank and self.read_rule != "base":
            raise ValueError(f"read_rank={self.read_rank} adapts the base read: it needs read_rule='base'")
        if self.read_rule == "base" and (self.write_rule != "tokens" or self.memory_type != "gated"):
            raise ValueError("read_rule='base' reads tokens the base's own attention can attend to: it needs "
                             "memory_type='gated' and write_rule='tokens'")
        if self.write_rule == "tokens":
            if self.addressing != "content":
                raise ValueError(f"addressing={self.addressing!r} needs write_rule='slots' (the tokens rule "
                                 "replaces the oldest slots, not the least used)")
            if self.tokens_per_segment > self.num_slots:
                raise ValueError(f"tokens_per_segment={self.tokens_per_segment} exceeds num_slots={self.num_slots}")
        if not 0.0 <= self.usage_decay <= 1.0:
            raise ValueError(f"usage_decay={self.usage_decay}: must lie in [0, 1]")
        if not 0.0 <= self.write_threshold <= 1.0:
            raise ValueError(f"write_threshold={self.write_threshold}: must lie in [0, 1]")
        for name in ("forget_bias", "input_bias", "output_gate_bias", "usage_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) > 1e3:
                raise ValueError(f"{name}={v!r}: expected a finite number")
        if self.max_memory_usage is not None and (
            isinstance(self.max_memory_usage, bool)
            or not isinstance(self.max_memory_usage, (int, float))
            or self.max_memory_usage <= 0
        ):
            raise ValueError(f"max_memory_usage={self.max_memory_usage!r}: expected a positive number of GiB")
        _check_non_negative_int("lora_rank", self.lora_rank)
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float))
                                            or not self.lora_alpha > 0):
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: expected a positive number or None")
        if not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets or not all(
                isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets={self.lora_targets!r}: expected a non-empty list of module names")
        self.lora_targets = list(self.lora_targets)
        for name in ("offload_to_cpu", "use_half_precision", "use_4bit_quantization", "gradient_checkpointing",
                     "cuda_graph_read", "triton_read", "triton_write", "cuda_graph_segments"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")

    @property
    def slot_dim(self) -> int:
        """The resolved slot width."""
        if self.memory_dim is not None:
            return self.memory_dim
        if self.hidden_size is None:
            raise ValueError("memory_dim is None and the config is not resolved against a model yet")
        return self.hidden_size

    def resolve(self, hidden_size: int, num_hidden_layers: int, model_type: str) -> GMA6Config:
        """Return a copy filled in (and checked) for a base with these dimensions."""
        if self.hidden_size is not None and self.hidden_size != hidden_size:
            raise ValueError(
                f"adapter was made for hidden_size={self.hidden_size}, but the model has {hidden_size}"
            )
        if self.model_type is not None and self.model_type != model_type:
            raise ValueError(f"adapter was made for model_type={self.model_type!r}, but the model is {model_type!r}")
        if self.num_hidden_layers is not None and self.num_hidden_layers != num_hidden_layers:
            raise ValueError(
                f"adapter was made for {self.num_hidden_layers} decoder layers, but the model has {num_hidden_layers}"
            )
        layers = list(self.layers) if self.layers is not None else default_layers(num_hidden_layers, self.num_memory_layers)
        bad = [i for i in layers if i >= num_hidden_layers]
        if bad:
            raise ValueError(f"layers {bad} are beyond the model's depth ({num_hidden_layers} decoder layers, 0..{num_hidden_layers - 1})")
        dim = self.memory_dim if self.memory_dim is not None else hidden_size
        if self.read_rule == "base":
            if dim != hidden_size:
                raise ValueError(f"read_rule='base' stores the base's hidden states: memory_dim must be None or "
                                 f"{hidden_size} (the model's hidden size), got {self.memory_dim}")
            last = [i for i in layers if i >= num_hidden_layers - 1]
            if last:
                raise ValueError(f"read_rule='base' reads through the next layer's attention: layers {last} have none "
                                 f"(the model has {num_hidden_layers} decoder layers)")
        if dim % self.num_heads:
            raise ValueError(f"memory width {dim} is not divisible by num_heads={self.num_heads}")
        return dataclasses.replace(
            self, layers=layers, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, model_type=model_type
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GMA6Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GMA6Config fields {unknown}")
        return cls(**d)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gma6_config.json`` atomically into ``directory``."""
        from .io import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GMA6Config:
        path = Path(directory)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (is this a gma6 adapter folder?)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data)


def default_layers(num_hidden_layers: int, count: int) -> list[int]:
    """Spread ``count`` layers over the depth, skipping the first (its states are mostly lexical)."""
    count = min(count, num_hidden_layers)
    if count == num_hidden_layers:
        return list(range(num_hidden_layers))
    step = num_hidden_layers / count
    return sorted({min(num_hidden_layers - 1, int(step * (k + 1)) - 1) for k in range(count)})


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name}={v!r}: expected a positive int")
