"""Optional LoRA on the base's attention, co-trained with the memory (PEFT), saved beside it.

The base's own weights stay frozen; LoRA adds low-rank matrices to the chosen projections
(``q_proj`` and ``v_proj`` by default). ``add_lora`` records the rank in the memory's config, so
``save_pretrained`` writes ``lora_adapter.safetensors`` beside the memory and ``load_adapter``
puts the same LoRA back; ``detach()`` removes it, giving the base back as it was.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

LORA_WEIGHTS_NAME = "lora_adapter.safetensors"
DEFAULT_TARGETS = ("q_proj", "v_proj")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft (a gma6 dependency): pip install 'peft>=0.13'") from e
    return peft


def inject_lora(base: nn.Module, rank: int, alpha: float | None = None,
                targets: Sequence[str] = DEFAULT_TARGETS) -> list[nn.Parameter]:
    """Add trainable LoRA matrices of rank ``rank`` to ``base``'s ``targets``; return them.

    ``alpha`` defaults to ``2 * rank``. The LoRA ``B`` matrices start at zero, so the outputs are
    unchanged until trained.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora rank={rank!r}: expected a positive int")
    if has_lora(base):
        raise ValueError("the base already has LoRA layers; detach the memory that added them first")
    peft = _peft()
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets {missing} are not modules of {type(base).__name__}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                             target_modules=list(targets), lora_dropout=0.0)
    peft.inject_adapter_in_model(config, base)
    params = [p for n, p in base.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def has_lora(base: nn.Module) -> bool:
    return any("lora_" in n for n, _ in base.named_parameters())


def lora_state_dict(base: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``base``, by parameter name."""
    return {n: p.detach() for n, p in base.named_parameters() if "lora_" in n}


def load_lora_state_dict(base: nn.Module, tensors: dict[str, torch.Tensor], source: str = "LoRA weights") -> None:
    """Copy saved LoRA tensors into ``base``'s LoRA layers; names and shapes must match exactly."""
    own = dict(base.named_parameters())
    mine = {n for n in own if "lora_" in n}
    problems = sorted(mine ^ set(tensors)) + [
        f"{n}: {tuple(t.shape)} vs {tuple(own[n].shape)}" for n, t in tensors.items() if n in own and t.shape != own[n].shape
    ]
    if problems:
        raise ValueError(f"{source} do not match the model's LoRA layers: {problems[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t.to(own[n].device, own[n].dtype))


def remove_lora(base: nn.Module) -> None:
    """Replace every LoRA-wrapped module of ``base`` by the module it wraps."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(base.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in vars(base):  # set by inject_adapter_in_model
        del base.peft_config


@contextmanager
def lora_disabled(base: nn.Module) -> Iterator[None]:
    """Run ``base`` without its LoRA inside this block (the bare base, e.g. as a KL reference).

    ``requires_grad`` of the LoRA weights is restored afterwards (peft's toggle would change it).
    """
    if not has_lora(base):
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for n, p in base.named_parameters() if "lora_" in n]
    was_disabled = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, off in zip(layers, was_disabled):
            m.enable_adapters(not off)
        for p, flag in flags:
            p.requires_grad_(flag)
