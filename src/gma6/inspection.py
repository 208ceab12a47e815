"""What a memory did while it read a document: per-segment gates, slot writes and their tokens.

``read_recorded`` reads like ``MemoryModel.read`` (same segments, same state) and also returns a
small JSON-able record; ``summary`` and ``plot`` turn a snapshot's header into text and figures.

Record layout (lists indexed by segment, then memory layer, then slot)::

    {"segment_length": 256, "layers": [3, 7, ...], "num_slots": 16,
     "segments": [{"tokens": 255,
                   "input_gate": [per layer], "forget_gate": [...], "output_gate": [...],
                   "slot_input": [[per slot input-gate mass] per layer]}, ...],
     "slot_tokens": [[[[token, weight], ...top 3] per slot] per layer]}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .state import MemoryState

TOP_TOKENS = 3


def _r(x: float) -> float:
    return round(float(x), 4)


@torch.no_grad()
def read_recorded(
    model: nn.Module,
    input_ids: torch.Tensor,
    segment_length: int,
    bos_token_id: int | None,
    tokenizer: Any = None,
    memory_state: MemoryState | None = None,
    progress: bool = False,
) -> tuple[MemoryState, dict[str, Any]]:
    """Read one document (1, N) segment by segment as ``model.read`` does, recording instrumentation.

    Memories without per-segment statistics (e.g. "rmt") fall back to ``model.read`` and an
    empty record.
    """
    from tqdm.auto import tqdm

    from .model import MemoryModel, split_segments

    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"read_recorded reads one document, got a batch of {input_ids.shape[0]}")
    cfg = model.config
    record: dict[str, Any] = {"segment_length": segment_length, "layers": list(cfg.layers or []),
                              "num_slots": cfg.num_slots, "segments": [], "slot_tokens": []}
    if not isinstance(model, MemoryModel):
        state = model.read(input_ids, segment_length=segment_length, memory_state=memory_state,
                           bos_token_id=bos_token_id, progress=progress)
        return state, record
    state = memory_state if memory_state is not None else model.init_state(1)
    mask = torch.ones_like(input_ids, dtype=torch.bool)
    segments = split_segments(input_ids, mask, segment_length, bos_token_id)
    n_layers = len(cfg.layers)
    top: list[list[dict[str, float]]] = [[{} for _ in range(cfg.num_slots)] for _ in range(n_layers)]
    for seg_ids, seg_mask in tqdm(segments, desc="reading", unit="segment", disable=not progress):
        seg_ids, seg_mask = seg_ids.to(model.device), seg_mask.to(model.device)
        before = state.usage.to(model.device).float()
        out = model(input_ids=seg_ids, attention_mask=seg_mask, memory_state=state, logits_to_keep=1, return_stats=True)
        state = out.memory_state
        # usage = decay * usage + input-gate mass per slot, so the mass is what usage gained
        mass = (state.usage.to(model.device).float() - cfg.usage_decay * before)[0]  # (L, S)
        seg = {"tokens": int(seg_mask.sum()), "input_gate": [], "forget_gate": [], "output_gate": [],
               "slot_input": [[_r(v) for v in mass[i].tolist()] for i in range(n_layers)]}
        for i, st in enumerate(out.stats or []):
            for k in ("input_gate", "forget_gate", "output_gate"):
                seg[k].append(_r(st[k].float().mean()) if k in st else None)
            att = st.get("write_attention")
            if att is None or tokenizer is None:
                continue
            att = att[0].float()  # (S, T)
            real = seg_mask[0].clone()
            if bos_token_id is not None:
                real &= seg_ids[0] != bos_token_id
            att = att.masked_fill(~real[None, :], -1.0)
            k = min(TOP_TOKENS, int(real.sum()))
            if k == 0:
                continue
            w, idx = att.topk(k, dim=-1)
            for s in range(att.shape[0]):
                best = top[i][s]
                for weight, t in zip(w[s].tolist(), idx[s].tolist()):
                    if weight <= 0:  # not read from this token at all (a slot this segment did not write)
                        continue
                    word = tokenizer.decode([int(seg_ids[0, t])])
                    best[word] = max(best.get(word, 0.0), weight)
                if len(best) > TOP_TOKENS:
                    top[i][s] = dict(sorted(best.items(), key=lambda kv: -kv[1])[:TOP_TOKENS])
        record["segments"].append(seg)
    record["slot_tokens"] = [[[[w, _r(v)] for w, v in sorted(d.items(), key=lambda kv: -kv[1])] for d in layer]
                             for layer in top] if tokenizer is not None else []
    return (state.to("cpu") if cfg.offload_to_cpu else state), record


MAX_SLOT_LINES = 16  # per layer in the text summary; the record keeps every slot


def summary(state: MemoryState, meta: dict[str, Any]) -> list[str]:
    """Text lines describing a snapshot."""
    model = meta.get("model", {})
    rec = meta.get("record") or {}
    layers = rec.get("layers") or (meta.get("config") or {}).get("layers") or list(range(state.shape[0]))
    lines = [
        f"model: {model.get('name')} ({model.get('model_type')}, hidden {model.get('hidden_size')})",
        f"adapter hash: {str(meta.get('adapter_hash'))[:16]}...   gma6 {meta.get('gma6_version')}",
        f"tokens read: {meta.get('tokens_read')}   segments: {state.segments_read}   "
        f"memory: {state.shape[0]} layers x {state.shape[1]} slots x {state.shape[2]}",
    ]
    for i, layer in enumerate(layers):
        u, a = state.usage[:, i].float(), state.age[:, i].float()
        lines.append(f"  layer {layer:>2}: mean usage {float(u.mean()):.3f}  mean age {float(a.mean()):.1f} segments  "
                     f"slots never written {int((a >= state.segments_read).sum()) if state.segments_read else 0}")
    for i, layer in enumerate(layers):
        written = [(s, toks) for s, toks in enumerate(rec["slot_tokens"][i] if rec.get("slot_tokens") else []) if toks]
        usage = state.usage[0, i].float()
        # the most used slots (highest decayed input gate), shown in slot order
        shown = sorted(sorted(written, key=lambda st: -float(usage[st[0]]))[:MAX_SLOT_LINES])
        for s, toks in shown:
            lines.append(f"  layer {layer:>2} slot {s:>2} (usage {float(usage[s]):.2f}) <- "
                         + "  ".join(f"{w!r} ({v:.2f})" for w, v in toks))
        if len(written) > MAX_SLOT_LINES:
            lines.append(f"  layer {layer:>2}: {len(written) - MAX_SLOT_LINES} less used slots written (in the record)")
    if not rec.get("segments"):
        lines.append("no per-segment record in this snapshot (read it with `gma6 read --record`)")
    return lines


def plot(state: MemoryState, meta: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write PNG figures: slot usage and age; with a record, slot x segment input-gate heat maps and gates along the document."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = meta.get("record") or {}
    L = state.shape[0]
    layers = rec.get("layers") or list(range(L))
    written = []

    fig, axes = plt.subplots(2, 1, figsize=(8, 5), squeeze=False)
    for i in range(L):
        axes[0][0].plot(state.usage[0, i].float().numpy(), marker="o", label=f"layer {layers[i]}")
        axes[1][0].plot(state.age[0, i].float().numpy(), marker="o", label=f"layer {layers[i]}")
    axes[0][0].set_ylabel("usage")
    axes[1][0].set_ylabel("age (segments)")
    axes[1][0].set_xlabel("slot")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"memory after {meta.get('tokens_read')} tokens")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "usage.png"))
    plt.close(fig)

    segs = rec.get("segments") or []
    if segs:
        fig, axes = plt.subplots(1, L, figsize=(3 + 3 * L, 4), squeeze=False)
        for i in range(L):
            grid = [[s["slot_input"][i][k] for s in segs] for k in range(len(segs[0]["slot_input"][i]))]
            im = axes[0][i].imshow(grid, aspect="auto", origin="lower", cmap="viridis")
            axes[0][i].set_title(f"layer {layers[i]}")
            axes[0][i].set_xlabel("segment")
            fig.colorbar(im, ax=axes[0][i])
        axes[0][0].set_ylabel("slot")
        fig.suptitle("input-gate mass written into each slot")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "slots.png"))
        plt.close(fig)

        fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
        x = list(range(len(segs)))
        for ax, key in zip(axes, ("input_gate", "forget_gate", "output_gate")):
            for i in range(L):
                ys = [s[key][i] if i < len(s[key]) else None for s in segs]
                ax.plot(x, [float("nan") if y is None else y for y in ys], marker=".", label=f"layer {layers[i]}")
            ax.set_ylabel(key.replace("_", " "))
        axes[0].legend(fontsize=7)
        axes[-1].set_xlabel("segment")
        fig.suptitle("gate means along the document")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "gates.png"))
        plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    from .io import atomic_write

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # atomic_write's temporary file is private (0600)

    return atomic_write(path, write)
