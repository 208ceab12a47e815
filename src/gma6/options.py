"""The design's five system options, applied to a base model when a memory is attached.

``MemoryModel.__init__`` freezes the base, then calls ``apply_system_options``. What each option does:

``use_half_precision``
    The frozen base is cast to bfloat16 (float16 on a CUDA device without bf16 support). The
    memory keeps float32 parameters, gates and state: the layer hooks cast the hidden states to
    the memory's dtype before reading and cast the read-out back, and ``MemoryModel.forward``
    casts the collected hidden states before the write. The cast changes the base in place (and
    ``detach`` does not undo it). A base loaded in 4 bits is left as loaded (its compute dtype
    is chosen at load time; transformers refuses to cast it).

``use_4bit_quantization``
    The frozen base in 4 bits (NF4, double quantisation) through bitsandbytes, on CUDA or (from
    bitsandbytes 0.48) the CPU. Quantisation happens when the weights are loaded, so load the base
    with ``quantized_load_kwargs()`` (or ``quantization_config()``); attaching checks that
    bitsandbytes can run there (``ImportError`` / ``RuntimeError`` otherwise) and that the base really was
    loaded in 4 bits (``ValueError`` otherwise). transformers' ``Trainer`` refuses to fine-tune a
    "purely quantized" model (``validate_quantization_for_training``); that check reads
    ``model.is_quantized``, which ``MemoryModel`` does not have: the trainable memory is a
    separate module and the quantized base stays frozen, so nothing needs switching off. Do not
    move or cast a ``MemoryModel`` with a 4-bit base with ``.to()``: bitsandbytes weights must stay
    where they were loaded.

``offload_to_cpu``
    Memory states live on the CPU between segments: ``init_state``, ``forward`` and ``read``
    return them there, and ``forward`` moves the incoming state to the model's device. The
    memory's weights stay on the device (they are small: ~1.5 M parameters by default). On CUDA
    each segment then pays one small device-to-host copy (a synchronisation).

``max_memory_usage``
    A budget in GiB for the device (RAM on CPU). ``MemoryModel.read`` calls
    ``check_memory_budget`` before reading and raises ``MemoryBudgetError`` (both a
    ``MemoryError`` and a ``ValueError``) when the estimated peak of one segment step exceeds it,
    naming the largest batch that fits. ``plan_batch`` gives that batch size for a loop of your
    own. The estimate (``estimate_peak_bytes``) counts parameters, the activations live inside one
    decoder layer, the attention masks and (conservatively) scores, the logits kept, and the
    memory's state and collected hidden states; for training, the activations stored for
    backward. It is an estimate, not a measurement: leave some headroom.

``gradient_checkpointing``
    The base's decoder layers recompute their activations in backward (non-reentrant
    checkpointing, so the frozen base's inputs need no grad). transformers checkpoints each
    layer's ``forward`` and keeps module hooks outside the checkpoint, so the memory hooks run
    once per layer per forward and are not re-run by the recomputation; the memory's gradients
    equal those without checkpointing. Only active in training mode (``model.train()``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .config import GMA6Config

GiB = 1024**3
_SLACK = 1.15  # allocator fragmentation and small temporaries not modelled below


class MemoryBudgetError(MemoryError, ValueError):
    """Raised before a run whose estimated peak memory exceeds ``max_memory_usage``."""


# ---------------------------------------------------------------------------------------- attach
def apply_system_options(base: nn.Module, config: GMA6Config) -> None:
    """Prepare ``base`` for the options ``config`` asks for (called by ``MemoryModel``).

    Everything that can fail is checked before anything is changed.
    """
    quantized = is_quantized(base)
    if config.use_4bit_quantization:
        check_4bit_available(_param_device(base))
        if not is_loaded_in_4bit(base):
            raise ValueError(
                "use_4bit_quantization=True needs a base loaded in 4 bits: load it with "
                "gma6.load_base(..., **gma6.options.quantized_load_kwargs()) or "
                "AutoModelForCausalLM.from_pretrained(..., quantization_config=gma6.options.quantization_config())"
            )
    # transformers >= 5.x names it activation checkpointing; the old name is deprecated.
    enable = getattr(base, "activation_checkpointing_enable", None) or getattr(base, "gradient_checkpointing_enable", None)
    if config.gradient_checkpointing and enable is None:
        raise TypeError(f"{type(base).__name__} does not support gradient checkpointing")
    if config.use_half_precision and not quantized:
        dtype = half_dtype(_param_device(base))
        if any(p.is_floating_point() and p.dtype != dtype for p in base.parameters()):
            base.to(dtype)
    if config.gradient_checkpointing:
        set_gradient_checkpointing(base, True)
    if quantized:
        keep_4bit_differentiable(base)


def keep_4bit_differentiable(base: nn.Module) -> int:
    """Keep every CPU 4-bit layer of ``base`` on bitsandbytes' kernel that has a backward; returns how many
    layers had already left it.

    Why: where the CPU has AVX512-BF16, bitsandbytes (>= 0.49) repacks a ``Linear4bit``'s weights the first time
    it runs in eval mode on an input without gradient, and from then on multiplies with a kernel that has no
    backward, whatever the mode: gradients stop at that layer without an error. The memory trains through the
    frozen base, so the repacking is switched off, and undone where it already happened.
    """
    undone = 0
    for module in base.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            undone += 1
    return undone


def checkpointing_on(base: nn.Module) -> bool:
    """Whether any module of ``base`` recomputes its activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())


def set_gradient_checkpointing(base: nn.Module, on: bool, **checkpoint_kwargs: Any) -> None:
    """Switch the base's activation (gradient) checkpointing on or off, whichever name it uses. ``checkpoint_kwargs``
    (on only): more of ``torch.utils.checkpoint.checkpoint``'s arguments, e.g. ``preserve_rng_state=False`` for a
    step captured in a CUDA graph; the checkpoints are non-reentrant whatever is given."""
    prefix = "activation" if hasattr(base, "activation_checkpointing_enable") else "gradient"
    if not hasattr(base, f"{prefix}_checkpointing_enable"):
        raise TypeError(f"{type(base).__name__} does not support gradient checkpointing")
    if checkpoint_kwargs.get("use_reentrant"):
        raise ValueError("set_gradient_checkpointing: use_reentrant=True is not supported (a frozen base's inputs need "
                         "no grad only with non-reentrant checkpoints)")
    if on:
        # Non-reentrant: the frozen base's inputs need no grad for the memory's grads to flow. transformers' enable
        # makes the input embeddings require grad all the same (for reentrant checkpoints and PEFT), which would take
        # every backward down through every layer to the embeddings, below the lowest memory layer: undone here,
        # unless that hook was there before (the user's: it stays, on and off).
        had_hook = getattr(base, "_require_grads_hook", None) is not None
        kwargs = {**checkpoint_kwargs, "use_reentrant": False}
        getattr(base, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": kwargs})
        if not had_hook and getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()
    else:  # the enable above leaves no require-grad hook, so one still here is the user's own
        getattr(base, f"{prefix}_checkpointing_disable")()


def half_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 where ``device`` supports it, else float16."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    try:
        (torch.ones(2, device=device, dtype=torch.bfloat16) * 2).sum()
        return torch.bfloat16
    except (RuntimeError, TypeError):
        return torch.float16


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------ 4-bit base
def is_quantized(model: nn.Module) -> bool:
    """Whether transformers loaded ``model`` quantized (any method)."""
    return bool(getattr(model, "is_quantized", False)) or getattr(model, "hf_quantizer", None) is not None


def is_loaded_in_4bit(model: nn.Module) -> bool:
    """Whether ``model`` was loaded in 4 bits by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def check_4bit_available(device: torch.device | str | None = None) -> None:
    """Raise ``ImportError`` without bitsandbytes, ``RuntimeError`` where it has no 4-bit kernels.

    ``device`` is where the base goes (None: CUDA if there is one, else the CPU). bitsandbytes runs
    NF4 on CUDA, and on the CPU from release 0.48.
    """
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("use_4bit_quantization needs bitsandbytes (pip install bitsandbytes); it is not installed") from e
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("use_4bit_quantization on CUDA: no CUDA device is available")
    if dev.type == "cpu":
        version = tuple(int(x) for x in re.findall(r"\d+", bitsandbytes.__version__)[:2])
        if version < (0, 48):
            raise RuntimeError(f"use_4bit_quantization on the CPU needs bitsandbytes >= 0.48 (found {bitsandbytes.__version__})")
    elif dev.type != "cuda":
        raise RuntimeError(f"use_4bit_quantization: bitsandbytes has no 4-bit kernels for {dev.type!r} here")


def _default_4bit_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def quantization_config(compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Any:
    """A ``BitsAndBytesConfig`` for a frozen 4-bit base: NF4, double quantisation.

    ``compute_dtype`` defaults to bf16 (fp16 on GPUs without bf16). Raises like
    ``check_4bit_available`` where bitsandbytes cannot run on ``device``.
    """
    dev = torch.device(device) if device is not None else _default_4bit_device()
    check_4bit_available(dev)
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or half_dtype(dev),
    )


def quantized_load_kwargs(compute_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` (or ``gma6.load_base``) that load the base in 4 bits.

    The model is placed at load time on ``device`` (None: the current CUDA device, else the CPU):
    a bitsandbytes model cannot be moved afterwards.
    """
    dev = torch.device(device) if device is not None else _default_4bit_device()
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    config = quantization_config(compute_dtype, dev)
    return {"quantization_config": config, "device_map": {"": dev.index if dev.type == "cuda" else str(dev)}}


# ------------------------------------------------------------------------------- memory budget
def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(base, memory controller or None) of a MemoryModel or a bare base."""
    base = getattr(model, "base", None)
    controller = getattr(model, "controller", None)
    if base is not None and controller is not None:
        return base, controller
    return model, None


def _activation_bytes(base: nn.Module) -> int:
    if is_quantized(base):
        qc = getattr(getattr(base, "config", None), "quantization_config", None)
        dtype = getattr(qc, "bnb_4bit_compute_dtype", None) if qc is not None else None
        if isinstance(dtype, torch.dtype):
            return torch.finfo(dtype).bits // 8
        return 2
    for p in base.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def estimate_peak_bytes(
    model: nn.Module,
    batch_size: int,
    segment_length: int,
    training: bool = False,
    segments: int = 1,
    logits_to_keep: int = 1,
) -> int:
    """Estimated peak memory (bytes) of one segment step of ``model`` (MemoryModel or bare base).

    Args:
        batch_size, segment_length: the step's input shape (B, T); the keys span T tokens (no cache).
        training: memory-only training: activations of every decoder layer are stored for
            backward (only the layer inputs under gradient checkpointing), over ``segments``
            segments of backpropagation through time, plus the memory's gradients and AdamW state.
        logits_to_keep: positions whose logits are computed (``read`` keeps 1; training keeps all).

    Counted: parameters and buffers; inside one decoder layer the residual stream, q/k/v (with
    their rotated copies), the attention output and three MLP-wide tensors; the boolean masks and
    the attention scores (as if materialised: the conservative SDPA path); the logits and their
    float32 copy; the memory state (old and new) and, per memory layer, the collected hidden
    states and their float32 copies. Times 1.15 for what is not modelled.
    """
    from .integration import text_config

    base, controller = _parts(model)
    tc = text_config(base)
    b, t = int(batch_size), int(segment_length)
    h = tc.hidden_size
    n_layers = tc.num_hidden_layers
    inter = getattr(tc, "intermediate_size", None) or 4 * h
    heads = getattr(tc, "num_attention_heads", None) or 1
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or h // heads
    vocab = getattr(tc, "vocab_size", None) or 0
    e = _activation_bytes(base)
    keep = t if (training or not logits_to_keep) else min(int(logits_to_keep), t)
    config = getattr(model, "config", None)
    if controller is not None and isinstance(config, GMA6Config) and config.memory_type == "rmt":
        t += 2 * controller.shape[1]  # the RMT peer runs [read; segment; write] memory tokens through the base

    qkv = (heads + 2 * kv_heads) * head_dim
    layer_live = e * b * t * (4 * h + 2 * qkv + heads * head_dim + 3 * inter)
    masks = 2 * b * t * t
    scores = e * b * heads * t * t
    logits = b * keep * vocab * (e + 4)
    act = layer_live + masks + scores + logits

    mem = 0
    trainable = 0
    if controller is not None:
        n_mem, slots, dim = controller.shape
        state = 4 * b * n_mem * slots * (dim + 2)
        hiddens = n_mem * b * t * h * (e + 4)
        write = 4 * b * t * (h + 2 * dim)
        mem = 2 * state + hiddens + write
        trainable = sum(p.numel() * p.element_size() for p in controller.parameters() if p.requires_grad)
    if training:
        checkpointing = checkpointing_on(base)
        stored_layer = e * b * t * h if checkpointing else layer_live + scores + e * b * t * h
        act = act + segments * n_layers * stored_layer + 2 * b * t * vocab * 4  # + logits' grad, log-softmax
        mem = segments * mem
        trainable *= 3  # gradients and AdamW's two moments
    return int(parameter_bytes(model) + trainable + _SLACK * (act + mem))


def _budget(model: nn.Module, budget_gib: float | None) -> float | None:
    if budget_gib is not None:
        if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) or budget_gib <= 0:
            raise ValueError(f"budget_gib={budget_gib!r}: expected a positive number of GiB")
        return float(budget_gib)
    config = getattr(model, "config", None)
    return getattr(config, "max_memory_usage", None) if isinstance(config, GMA6Config) else None


def plan_batch(
    model: nn.Module,
    segment_length: int,
    budget_gib: float | None = None,
    training: bool = False,
    segments: int = 1,
    max_batch: int = 4096,
) -> int:
    """The largest batch size whose estimated peak fits ``budget_gib``.

    ``budget_gib`` defaults to the model's ``max_memory_usage``. Raises ``MemoryBudgetError``
    when even a batch of one does not fit, ``ValueError`` when there is no budget.
    """
    budget = _budget(model, budget_gib)
    if budget is None:
        raise ValueError("plan_batch needs a budget: pass budget_gib or set max_memory_usage in the config")
    limit = budget * GiB
    one = estimate_peak_bytes(model, 1, segment_length, training, segments)
    if one > limit:
        raise MemoryBudgetError(_refusal(model, 1, segment_length, one, budget, training))
    per_sample = max(estimate_peak_bytes(model, 2, segment_length, training, segments) - one, 1)
    fits = 1 + int((limit - one) // per_sample)
    while fits > 1 and estimate_peak_bytes(model, fits, segment_length, training, segments) > limit:
        fits -= 1  # rounding in the estimate
    return max(1, min(fits, max_batch))


def check_memory_budget(
    model: nn.Module,
    batch_size: int,
    segment_length: int,
    budget_gib: float | None = None,
    training: bool = False,
    segments: int = 1,
) -> None:
    """Raise ``MemoryBudgetError`` if a (batch, segment) step is estimated not to fit the budget.

    ``budget_gib`` defaults to the model's ``max_memory_usage``; without a budget this does nothing.
    Host-side arithmetic only (no device work).
    """
    budget = _budget(model, budget_gib)
    if budget is None:
        return
    for v in (batch_size, segment_length):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            return  # let the caller's own validation name the bad argument
    need = estimate_peak_bytes(model, batch_size, segment_length, training, segments)
    if need > budget * GiB:
        raise MemoryBudgetError(_refusal(model, batch_size, segment_length, need, budget, training))


def _refusal(model: nn.Module, batch: int, segment: int, need: int, budget: float, training: bool) -> str:
    what = "a training step" if training else "reading"
    msg = (
        f"{what} with batch {batch} x segment_length {segment} needs an estimated {need / GiB:.3f} GiB, "
        f"over max_memory_usage={budget:g} GiB (parameters alone: {parameter_bytes(model) / GiB:.3f} GiB)"
    )
    if batch > 1:
        try:
            fits = plan_batch(model, segment, budget, training)
            return msg + f"; batch {fits} fits: read the samples in smaller batches"
        except MemoryBudgetError:
            pass
    return msg + "; even batch 1 does not fit: use a shorter segment_length or raise the budget"
