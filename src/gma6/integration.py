"""Finding a decoder-only LM's layers generically and hooking them.

Nothing here knows Gemma: layers are found as the ``nn.ModuleList`` whose length is the text
config's ``num_hidden_layers`` (Gemma, Llama, Qwen, Mistral: ``model.layers``; GPT-2: ``transformer.h``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Names of layer stacks, most likely first; used only to break ties between equally long lists.
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer", "decoder_layers")


def text_config(model: nn.Module) -> Any:
    """The config that describes the language model (the text part of a multimodal model)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config: not a Hugging Face model")
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def check_decoder_only(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` is a Hugging Face decoder-only causal LM."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config: not a Hugging Face model")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model; gma6 needs a decoder-only causal LM")
    if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        raise TypeError(f"{type(model).__name__} has no language-model head; load it with AutoModelForCausalLM")
    tc = text_config(model)
    for attr in ("hidden_size", "num_hidden_layers"):
        if not isinstance(getattr(tc, attr, None), int):
            raise TypeError(f"{type(model).__name__}'s config has no integer {attr}")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` holding the decoder layers."""
    n = text_config(model).num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise TypeError(f"{type(model).__name__}: found no list of {n} decoder layers")

    def rank(item: tuple[str, nn.Module]) -> tuple[int, int]:
        last = item[0].rsplit(".", 1)[-1]
        return (_LAYER_LIST_NAMES.index(last) if last in _LAYER_LIST_NAMES else len(_LAYER_LIST_NAMES), item[0].count("."))

    return min(found, key=rank)[1]


HookFn = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor | None]


class LayerHooks:
    """Forward hooks on chosen layers; each hook may replace the layer's hidden-state output.

    ``fn(hidden, kwargs)`` gets the layer's output hidden states and call kwargs and returns the
    new hidden states, or None to leave them. Tuple outputs (older transformers) keep their tail.
    """

    def __init__(self, layers: Iterable[nn.Module], make_fn: Callable[[int], HookFn]) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for i, layer in enumerate(layers):
                self._handles.append(layer.register_forward_hook(_wrap(make_fn(i)), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)


def _wrap(fn: HookFn) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden, kwargs)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks registered anywhere in ``model`` (``detach()`` must leave none of ours)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _is_hidden_norm(module: nn.Module, hidden_size: int) -> bool:
    w = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and tuple(w.shape) == (hidden_size,)


def find_reading_norms(model: nn.Module, layer_ids: list[int]) -> list[nn.Module | None]:
    """For each hooked layer, the base's own norm that reads its output: the next layer's input norm,
    or the final norm after the last layer (None where none is found).

    Why: residual streams of pretrained LMs carry a few huge outlier dimensions; a plain RMSNorm
    leaves every token pointing the same way (cosine ~0.9 on Gemma 3 270M), while the base's
    norms, trained to read that stream, let tokens differ by content.
    """
    hidden = text_config(model).hidden_size
    layers = find_decoder_layers(model)

    def input_norm(layer: nn.Module) -> nn.Module | None:
        found = [(n, m) for n, m in layer.named_children() if _is_hidden_norm(m, hidden)]
        found.sort(key=lambda item: ("input" not in item[0] and item[0] != "ln_1"))
        return found[0][1] if found else None

    def final_norm() -> nn.Module | None:
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
        for owner in (decoder, model):
            if owner is None:
                continue
            found = [m for n, m in owner.named_children() if _is_hidden_norm(m, hidden)]
            if found:
                return found[-1]
        return None

    return [input_norm(layers[i + 1]) if i + 1 < len(layers) else final_norm() for i in layer_ids]


def norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of a norm module (``eps`` in Gemma's and torch's, ``variance_epsilon`` in Llama's), if any."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    return eps if isinstance(eps, float) else None


@torch.no_grad()
def rms_gain(norm: nn.Module, hidden_size: int) -> torch.Tensor | None:
    """``g`` (fp32, (H,)) if ``norm(x) == x / rms(x) * g`` for every ``x`` (an RMSNorm of any
    family: Llama's ``w``, Gemma's ``1 + w``), else None (LayerNorm, anything else).

    Why: a read that needs ``rms_norm(norm(x))`` can then take ``rms_norm(x * g)`` (the per-token
    scale cancels), one fused kernel instead of the base's unfused norm.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, hidden_size, generator=g) + 0.5
    x = x * torch.where(torch.rand(4, hidden_size, generator=g) < 0.5, -1.0, 1.0)
    x[1:] *= torch.tensor([[0.1], [10.0], [3.0]])
    try:
        y = norm(x.to(device=w.device, dtype=torch.float32)).float().cpu()
    except Exception:  # noqa: BLE001 - a norm that cannot take fp32 is not one we can fold
        return None
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    gains = y * rms / x
    gain = gains[0]
    if not bool(torch.isfinite(gains).all()) or not torch.allclose(gains, gain.expand_as(gains), rtol=1e-3, atol=1e-5):
        return None
    return gain.to(w.device)
