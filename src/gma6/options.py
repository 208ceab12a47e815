"""The design's system options applied to a base model at attach time.

(offload_to_cpu, max_memory_usage, use_half_precision, use_4bit_quantization, gradient_checkpointing)
"""

from __future__ import annotations

from torch import nn

from .config import GMA6Config


def apply_system_options(base: nn.Module, config: GMA6Config) -> None:
    """Prepare ``base`` for the options ``config`` asks for (called by ``MemoryModel``)."""
    if config.gradient_checkpointing:
        enable = getattr(base, "gradient_checkpointing_enable", None)
        if enable is None:
            raise TypeError(f"{type(base).__name__} does not support gradient checkpointing")
        # Non-reentrant: the frozen base's inputs need no grad for the memory's grads to flow.
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
