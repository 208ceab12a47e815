"""MemoryWrapper: what every memory kind shares (the gated memory and the RMT peer).

A frozen base in ``self.base``, the trainable weights in ``self.controller`` (the only part saved),
a state that goes in and comes out explicitly, and the adapter files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from . import __version__
from .config import GMA6Config
from .integration import check_decoder_only, text_config
from .io import atomic_write
from .options import apply_system_options, checkpointing_on, set_gradient_checkpointing
from .state import MemoryState

WEIGHTS_NAME = "memory_adapter.safetensors"
_ATTACHED = "_gma6_attached_memory"  # on the base: a weak reference to the memory attached to it


def attached_memory(base: nn.Module) -> MemoryWrapper | None:
    """The gma6 memory attached to ``base`` (not yet detached), if any."""
    ref = base.__dict__.get(_ATTACHED)
    return None if ref is None else ref()


@dataclass
class MemoryOutput:
    """What a memory model's ``forward`` returns."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    memory_state: MemoryState
    stats: list[dict[str, torch.Tensor]] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # the base's, when asked (output_hidden_states=True)
    write_loss: torch.Tensor | None = None  # the write's selection loss, when write_targets were given


class MemoryWrapper(nn.Module):
    """Base class of the memory kinds. Subclasses set ``self.controller`` (an ``nn.Module`` with
    ``initial_memory``, ``shape`` and ``init_state``) and implement ``forward``/``read``/``generate``."""

    controller: nn.Module

    def __init__(self, base: nn.Module, config: GMA6Config) -> None:
        super().__init__()
        check_decoder_only(base)
        if not isinstance(config, GMA6Config):
            raise TypeError(f"config must be a GMA6Config, got {type(config).__name__}")
        holder = attached_memory(base)
        if holder is not None:
            # Both memories' hooks would fire on every call, each reading the other's call state.
            raise RuntimeError(f"this {type(base).__name__} already has a {type(holder).__name__} attached: one memory "
                               "a base; detach() it first (or load the adapter into another copy of the base)")
        tc = text_config(base)
        self.config = config.resolve(tc.hidden_size, tc.num_hidden_layers, str(getattr(tc, "model_type", "unknown")))
        self.base = base
        self._grad_flags = {name: p.requires_grad for name, p in base.named_parameters()}
        # Checkpointing the memory switched on is switched off again by detach(); the user's own stays.
        self._own_checkpointing = self.config.gradient_checkpointing and not checkpointing_on(base)
        self._own_lora = False
        base.requires_grad_(False)
        apply_system_options(base, self.config)
        self._disabled = False
        self._detached = False
        if self.config.lora_rank:  # checked before anything is injected: a failure leaves the base as it was
            self.add_lora(self.config.lora_rank, self.config.lora_alpha, self.config.lora_targets)
        base.__dict__[_ATTACHED] = weakref.ref(self)  # until detach(), which a failed attach calls too

    def _base_device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _vocab_size(self) -> int | None:
        return getattr(self.base.get_input_embeddings(), "num_embeddings", None)

    # ------------------------------------------------------------------ state
    @property
    def device(self) -> torch.device:
        return self.controller.initial_memory.device

    def init_state(self, batch_size: int) -> MemoryState:
        """A fresh memory for ``batch_size`` samples."""
        self._check_attached()
        state = self.controller.init_state(batch_size, self.device)
        return state.to("cpu") if self.config.offload_to_cpu else state

    def _prepare_state(self, state: MemoryState | None, batch_size: int) -> MemoryState:
        if state is None:
            return self.controller.init_state(batch_size, self.device)
        if not isinstance(state, MemoryState):
            raise TypeError(f"memory_state must be a MemoryState, got {type(state).__name__}")
        state.check(self.controller.shape, batch_size)
        return state.to(self.device)

    def _check_read_budget(self, batch_size: int, segment_length: int) -> None:
        """Refuse a read that would not fit ``max_memory_usage``, before running anything."""
        from .options import check_memory_budget

        check_memory_budget(self, batch_size, segment_length)

    @torch.no_grad()
    def read(
        self,
        input_ids: torch.Tensor,
        segment_length: int = 512,
        memory_state: MemoryState | None = None,
        attention_mask: torch.Tensor | None = None,
        progress: bool = False,
        bos_token_id: int | None = None,
    ) -> MemoryState:
        """Read a text of any length segment by segment; return the memory after it.

        Padding may sit anywhere: each sample's real tokens are packed to the left first, so a
        sample in a batch is cut into the same segments as when read alone.

        Args:
            bos_token_id: if given, every segment starts with this token (models such as Gemma
                expect it at position 0; each segment is a fresh window).
        """
        from .model import _check_input, cut_segments  # model builds on this module

        self._check_attached()
        input_ids, mask = _check_input(input_ids, attention_mask, ones=False,  # None: no padding
                                       vocab=self._vocab_size())
        state = self._prepare_state(memory_state, input_ids.shape[0])
        self._check_read_budget(input_ids.shape[0], segment_length)
        segments, full = cut_segments(input_ids, mask, segment_length, bos_token_id)
        with self._reading():
            steps = zip(segments, full)
            if progress:
                from tqdm.auto import tqdm

                steps = tqdm(steps, total=len(segments), desc="reading", unit="segment")
            for (seg_ids, seg_mask), f in steps:
                state = self._read_step(seg_ids, seg_mask, state, f)
        return state.to("cpu") if self.config.offload_to_cpu else state

    def _reading(self) -> ContextManager[None]:
        """Entered for the whole of ``read``: what a subclass sets up once for all its segments."""
        return nullcontext()

    def _read_step(self, input_ids: torch.Tensor, mask: torch.Tensor, state: MemoryState, full: bool = False) -> MemoryState:
        """One segment of ``read`` (already checked and cut by ``split_segments``; ``full``: no padding)."""
        return self(input_ids=input_ids, attention_mask=mask, memory_state=state, logits_to_keep=1).memory_state

    @contextmanager
    def memory_disabled(self, keep_lora: bool = False) -> Iterator[None]:
        """Run the bare base model inside this block: LoRA, when added, switched off too unless
        ``keep_lora`` (the base as its LoRA made it, the memory alone switched off)."""
        from .lora import lora_disabled

        previous = self._disabled
        self._disabled = True
        try:
            with nullcontext() if keep_lora else lora_disabled(self.base):
                yield
        finally:
            self._disabled = previous

    # ------------------------------------------------------------------ lifecycle
    def _remove_hooks(self) -> None:
        """Subclasses that hook the base remove their hooks here."""

    def detach(self) -> nn.Module:
        """Remove every hook, restore the base's ``requires_grad`` flags (and switch off the gradient
        checkpointing the memory switched on) and return the base."""
        self._remove_hooks()
        if self._own_lora:
            from .lora import remove_lora

            remove_lora(self.base)
            self._own_lora = False
        for name, p in self.base.named_parameters():
            p.requires_grad_(self._grad_flags.get(name, p.requires_grad))
        if self._own_checkpointing:
            set_gradient_checkpointing(self.base, False)
            self._own_checkpointing = False
        if attached_memory(self.base) is self:
            del self.base.__dict__[_ATTACHED]
        self._detached = True
        return self.base

    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] | None = None) -> list[nn.Parameter]:
        """Co-train LoRA of rank ``rank`` on the base (PEFT); saved and loaded with the adapter,
        removed by ``detach()``. Returns the new trainable parameters."""
        from .lora import inject_lora

        self._check_attached()
        targets = list(targets) if targets is not None else list(self.config.lora_targets)
        params = inject_lora(self.base, rank, alpha, targets)
        self._own_lora = True
        self.config = dataclasses.replace(self.config, lora_rank=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                                          lora_targets=targets)
        return params

    def _check_attached(self) -> None:
        if self._detached:
            raise RuntimeError(f"this {type(self).__name__} was detached; attach a memory again with gma6.attach_memory")

    def memory_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the memory."""
        return [p for p in self.controller.parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``gma6_config.json`` and ``memory_adapter.safetensors`` (atomically) into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.controller.state_dict().items()}
        meta = {"gma6_version": __version__, "base": str(getattr(self.base.config, "_name_or_path", ""))}
        if self.config.lora_rank:
            from .lora import LORA_WEIGHTS_NAME, lora_state_dict

            lora = {k: v.contiguous().cpu() for k, v in lora_state_dict(self.base).items()}
            atomic_write(directory / LORA_WEIGHTS_NAME, lambda tmp: save_file(lora, tmp, metadata={"gma6": json.dumps(meta)}))
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"gma6": json.dumps(meta)}))
        self.config.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory: str | os.PathLike, **overrides: Any) -> MemoryWrapper:
        """Attach the adapter saved in ``directory`` to ``base``.

        ``overrides`` replace runtime options of the saved config (e.g. ``offload_to_cpu=True``).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config = GMA6Config.load(directory)
        if overrides:
            config = GMA6Config.from_dict({**config.to_dict(), **overrides})
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: missing (is {directory} a gma6 adapter folder?)")
        model = cls(base, config)
        try:
            tensors = load_file(str(weights), device=str(model.device))
        except Exception as e:
            model.detach()
            raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
        own = model.controller.state_dict()
        problems = sorted(set(own) ^ set(tensors)) + [
            f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in tensors and tensors[k].shape != v.shape
        ]
        if problems:
            model.detach()
            raise ValueError(f"{weights} does not match its config: {problems[:5]}")
        model.controller.load_state_dict(tensors)
        if config.lora_rank:
            from .lora import LORA_WEIGHTS_NAME, load_lora_state_dict

            lora_file = directory / LORA_WEIGHTS_NAME
            try:
                if not lora_file.exists():
                    raise FileNotFoundError(f"{lora_file}: missing (the config says lora_rank={config.lora_rank})")
                load_lora_state_dict(model.base, load_file(str(lora_file), device=str(model.device)), str(lora_file))
            except BaseException:
                model.detach()
                raise
        return model
