"""The read inside the base's own attention call (``read_site="attention"``), through transformers'
attention-function registry.

Why: the read needs the next layer's queries after its q-norm and RoPE. Hooks on the q projection see them
before both and must redo that work, several element-wise kernels a layer a segment, which is what a
launch-bound GPU pays for. transformers' attention layers hand those finished queries to the function
registered for ``config._attn_implementation``; registering ``gma6_<inner>`` (the base's own function plus
the read, its mask the inner one's) and pointing the layers' configs at it gives the read the base's queries
for free. The function holds no state: a site is an attribute set on the attention module, removed with the
config's name in ``detach``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

_PREFIX = "gma6_"
_ATTR = "_gma6_site"


def _interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


def _wrap(inner: str) -> Callable:
    functions, _ = _interfaces()  # transformers' registry: one object, looked up in at each call

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out, weights = functions[inner](module, query, key, value, attention_mask, **kwargs)
        site = getattr(module, _ATTR, None)
        if site is not None:
            out = site(query, out, kwargs)
        return out, weights

    attention.__name__ = f"{_PREFIX}{inner}"
    return attention


def supported(inner: str | None) -> bool:
    """Whether the base's attention implementation ``inner`` can carry the read: a registered one (SDPA, flash,
    flex), not "eager", whose function is private to each modeling file."""
    if not isinstance(inner, str) or inner.startswith(_PREFIX):
        return False
    functions, masks = _interfaces()
    return inner in functions.valid_keys() and inner in masks._global_mapping


class AttentionSites:
    """Installs ``sites`` ({attention module: fn(query, attn_output, kwargs) -> attn_output}): each attention
    module then calls its ``fn`` with its post-RoPE queries (B, heads, T, d) and its output (B, T, heads, d)
    before the o projection. ``remove()`` restores every config's implementation and clears the attributes."""

    def __init__(self, sites: dict[nn.Module, Callable]) -> None:
        self._modules: list[nn.Module] = []
        self._configs: list[tuple[Any, str]] = []
        try:
            configs = {id(m.config): m.config for m in sites}
            for config in configs.values():
                inner = config._attn_implementation
                if not supported(inner):
                    raise ValueError(f"attention implementation {inner!r} cannot carry the read")
            for config in configs.values():
                inner = config._attn_implementation
                name = _PREFIX + inner
                functions, masks = _interfaces()
                if name not in functions.valid_keys():
                    functions.register(name, _wrap(inner))
                if name not in masks._global_mapping:
                    masks.register(name, masks._global_mapping[inner])
                self._configs.append((config, inner))
                config._attn_implementation = name
            for module, fn in sites.items():
                setattr(module, _ATTR, fn)
                self._modules.append(module)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        try:
            for module in self._modules:
                if getattr(module, _ATTR, None) is not None:
                    delattr(module, _ATTR)
        finally:
            for config, inner in self._configs:
                config._attn_implementation = inner
            self._modules, self._configs = [], []

    @staticmethod
    def active(module: nn.Module) -> bool:
        """Whether ``module``'s calls now go through its site (its config still names the wrapped function)."""
        config = getattr(module, "config", None)
        name = getattr(config, "_attn_implementation", None)
        return getattr(module, _ATTR, None) is not None and isinstance(name, str) and name.startswith(_PREFIX)
