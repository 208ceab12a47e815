"""The two training steps ``train_saved_bytes.py`` and ``train_step_profile.py`` compare, over the same random
tokens and loss as ``gma6 bench``'s training rows (next-token loss at ``positions`` evenly spread positions a
segment): the memory-only step, and the frozen floor (``gma6 bench``'s ``train_frozen``: the bare base's forward
and backward down to its embeddings, a free adapter there)."""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

import gma6
from gma6.base import default_adapter
from gma6.bench import position_loss, scored_positions
from gma6.config import GMA6Config
from gma6.model import split_segments
from gma6.options import set_gradient_checkpointing


def add_arguments(ap: argparse.ArgumentParser, batch: int, context: int, positions: int, device: str) -> None:
    ap.add_argument("--model", default=None, help="base model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--shape", default=None,
                    help="a model config (JSON) to build with random weights instead (the same shapes and kernels)")
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--layers", default=None,
                    help="comma-separated decoder layers: a fresh memory of the adapter's kind there (seeded random "
                         "weights) instead of the adapter's own; how deep the backward must reach sets the step's cost")
    ap.add_argument("--device", default=device)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--positions", type=int, default=positions)
    ap.add_argument("--checkpointing", action="store_true",
                    help="the base's gradient checkpointing in both steps (what remains is what each keeps outside "
                         "the recomputed layers)")


def parse_layers(text: str) -> list[int]:
    """``"12,13,16"`` or ``"12-16"`` (inclusive), or both mixed: the layer indices, sorted."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--layers {text!r}: {part!r} is not a layer index or a range a-b") from None
        if first > last:
            raise ValueError(f"--layers {text!r}: the range {part!r} is empty")
        layers.update(range(first, last + 1))
    if not layers:
        raise ValueError(f"--layers {text!r}: no layer given")
    return sorted(layers)


class TrainSteps:
    """The base with ``args.adapter`` attached, the segments and the loss positions (seed 0)."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.args = args
        self.device = torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        if getattr(args, "shape", None):
            from gma6.bench import random_model

            model = random_model(args.shape, dtype, str(self.device))
        else:
            model, _ = gma6.load_base(args.model, progress=False, dtype=dtype, device=self.device)
        vocab = min(1000, model.get_input_embeddings().num_embeddings)
        ids = torch.randint(0, vocab, (args.batch, args.context), device=self.device)
        self.segs = split_segments(ids, torch.ones_like(ids, dtype=torch.bool), args.segment)
        self.pos = scored_positions(args.segment, args.positions, self.device)  # where gma6 bench scores
        layers = getattr(args, "layers", None)
        if layers:
            config = GMA6Config.load(args.adapter).to_dict()
            self.mm = gma6.attach_memory(model, GMA6Config.from_dict({**config, "layers": parse_layers(layers)}))
        else:
            self.mm = gma6.load_adapter(model, args.adapter)
        if args.checkpointing:
            set_gradient_checkpointing(self.mm.base, True)
            self.mm.train()  # checkpointing acts in training mode only

    def _loss_at(self, logits: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
        return position_loss(logits, seg_ids[:, self.pos + 1])

    def memory_loss(self) -> torch.Tensor:
        """Every segment read with the memory carried; the summed loss (backward not taken)."""
        state, loss = self.mm.init_state(self.args.batch), 0.0
        for seg_ids, seg_mask in self.segs:
            out = self.mm(input_ids=seg_ids, attention_mask=seg_mask, logits_to_keep=self.pos, memory_state=state)
            state, loss = out.memory_state, loss + self._loss_at(out.logits, seg_ids)
        return loss

    @contextmanager
    def frozen_floor(self) -> Iterator[Callable[[], torch.Tensor]]:
        """Detach the memory (for good) and yield the floor's loss function, the base frozen."""
        base = self.mm.detach()
        base.requires_grad_(False)  # detach() hands the base back as it came (a fresh load trains every weight)
        if self.args.checkpointing:
            set_gradient_checkpointing(base, True)
            base.train()
        probe = torch.nn.Parameter(torch.zeros((), device=self.device))
        handle = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe.to(out.dtype))

        def loss() -> torch.Tensor:
            total = 0.0
            for seg_ids, seg_mask in self.segs:
                out = base(input_ids=seg_ids, attention_mask=seg_mask.long(), logits_to_keep=self.pos)
                total = total + self._loss_at(out.logits, seg_ids)
            return total

        try:
            yield loss
        finally:
            handle.remove()

    def header(self) -> dict[str, Any]:
        """What every result file starts with: command, date, machine and the step's shape."""
        a, d = self.args, self.device
        return {
            "command": "python " + " ".join(shlex.quote(x) for x in sys.argv), "date": time.strftime("%Y-%m-%d"),
            "machine": torch.cuda.get_device_name(d) if d.type == "cuda" else platform.processor() or platform.machine(),
            "device": d.type, "dtype": a.dtype, "shape": getattr(a, "shape", None), "adapter": a.adapter,
            "layers": list(self.mm.config.layers),
            "batch": a.batch, "context": a.context, "segment": a.segment, "positions": len(self.pos),
            "checkpointing": a.checkpointing,
        }
