#!/usr/bin/env python
"""Training steps with and without the host's launches: each of ``gma6 bench``'s three training systems run eagerly
and replayed whole from one CUDA graph (forward over every segment, backward, AdamW step), in one process.

The memory-only step (``train_memory``), the frozen floor (``train_frozen``: the bare base's forward and backward
down to the embeddings, a free adapter there) and the full fine-tune (``train_full``: every weight, fp32 master
weights under bf16 autocast, AdamW), over the same random tokens and loss (next-token loss at ``positions``
positions a segment) as ``gma6 bench``'s training rows. Eagerly these steps are bound by the host's kernel launches
(tens of thousands a step for a 270M model); a replayed graph launches nothing from the host, so what remains is
each step's device work, and the ratio of the replayed steps is the one the GPU's arithmetic allows.

Before timing, one replay is checked against an eager step from the same weights (loss and gradients; beside it,
two eager steps against each other: how far the backward kernels' own nondeterminism moves the gradients).
Full segments (no padding), as the bench's; no op draws random numbers (no dropout), so the checkpoints keep no RNG
state (a graph under capture cannot read it).

    python benchmarks/train_graphed.py --shape benchmarks/gemma3-270m-config.json --adapter DIR \\
        [--batch 8] [--context 4096] [--segment 1024] [--positions 32] [--checkpointing] [--steps 5] [--out F]
    python benchmarks/train_graphed.py --replot F.json ...   (the plot of results already written)

Writes ``--out`` (JSON) and beside it a plot (``.png``): each system's best step, eager and replayed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from train_steps import TrainSteps, add_arguments

from gma6.io import atomic_write, atomic_write_text
from gma6.options import set_gradient_checkpointing

GiB = 2**30


@contextlib.contextmanager
def no_rng_state(base: torch.nn.Module, checkpointing: bool) -> Iterator[None]:
    """Every checkpoint without saving the generator's state (read under capture it raises; nothing draws from it)."""
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = functools.partial(original, preserve_rng_state=False)
    if checkpointing:  # transformers binds its checkpoint function when enabled
        set_gradient_checkpointing(base, True, preserve_rng_state=False)
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original


def _sync() -> None:
    torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return out


def summary(seconds: list[float], peak: int) -> dict:
    s = sorted(seconds)
    return {"best_s": round(s[0], 4), "median_s": round(s[len(s) // 2], 4), "steps_s": [round(x, 4) for x in seconds],
            "peak_mem_gib": round(peak / GiB, 3)}


def _grad_err(grads: list[torch.Tensor], refs: list[torch.Tensor], names: list[str]) -> dict:
    """The largest difference of a parameter's gradient from its reference, relative to the reference's largest;
    which parameter, and that reference's largest magnitude."""
    errs = [((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
            for g, r in zip(grads, refs)]
    i = max(range(len(errs)), key=errs.__getitem__)
    return {"rel": float(f"{errs[i]:.3g}"), "param": names[i], "ref_max_abs": float(f"{refs[i].float().abs().max().item():.3g}")}


def measure(name: str, loss_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], lr: float, steps: int,
            autocast: dict | None = None, names: list[str] | None = None) -> dict:
    """``loss_fn``'s training step eagerly, then captured whole and replayed; the replay's check against eager."""
    def ctx(cache: bool) -> contextlib.AbstractContextManager:
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", **autocast, cache_enabled=cache)

    # eager, as gma6 bench runs it
    eager_opt = torch.optim.AdamW(params, lr=lr)

    def eager_step() -> None:
        with ctx(True):
            loss = loss_fn()
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)

    for _ in range(2):
        eager_step()
    torch.cuda.reset_peak_memory_stats()
    eager = summary(timed(eager_step, steps), torch.cuda.max_memory_allocated())
    eager_opt.state.clear()  # AdamW's moments (2 GiB for the full fine-tune) go before the graph's are made
    _free()

    # the check's reference: an eager step's loss and gradients from the weights the replay will start from, kept on
    # the host (2 GiB for the full fine-tune, which the replay's peak below must not count)
    saved = [p.detach().to("cpu", copy=True) for p in params]
    refs = []
    for _ in range(2):  # twice: how far two eager steps' gradients lie apart (atomic adds in backward kernels)
        with ctx(True):
            loss = loss_fn()
        loss.backward()
        refs.append((loss.item(), [p.grad.detach().to("cpu", copy=True) for p in params]))
        for p in params:
            p.grad = None
        del loss
    (ref_loss, ref_grads), (_, again) = refs
    names = names or [str(i) for i in range(len(params))]
    eager_err = _grad_err(again, ref_grads, names)
    del refs, again
    _free()

    torch.cuda.reset_peak_memory_stats()  # the replay's peak: its warm-up and its capture (replays allocate nothing)
    opt = torch.optim.AdamW(params, lr=lr, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS workspaces, AdamW's state)
        for _ in range(3):
            with ctx(False):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    del loss
    graph = torch.cuda.CUDAGraph()
    t = time.perf_counter()
    with torch.cuda.graph(graph):  # the gradients are allocated inside: each replay writes them afresh
        with ctx(False):
            static_loss = loss_fn()
        static_loss.backward()
        opt.step()
    capture_s = time.perf_counter() - t

    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    graph.replay()
    _sync()
    check = {"eager_loss": round(ref_loss, 6), "replay_loss": round(static_loss.item(), 6),
             "grad_err": _grad_err([p.grad.cpu() for p in params], ref_grads, names), "eager_again_grad_err": eager_err}
    del saved, ref_grads
    replay = summary(timed(graph.replay, steps), torch.cuda.max_memory_allocated())
    replay["capture_s"] = round(capture_s, 2)
    print(f"{name:13s} eager {eager['best_s']:.4f} s ({eager['peak_mem_gib']} GiB)  replayed {replay['best_s']:.4f} s "
          f"({replay['peak_mem_gib']} GiB)  check {check}", flush=True)
    del graph, static_loss, opt
    for p in params:
        p.grad = None
    _free()
    return {"eager": eager, "replayed": replay, "check": check}


SYSTEMS = ("train_memory", "train_frozen", "train_full")


def plot(result: dict, path: str) -> None:
    """Bars of each system's best step, eager beside replayed, labelled with their peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for j, (kind, color) in enumerate((("eager", "tab:gray"), ("replayed", "tab:red"))):
        for i, name in enumerate(SYSTEMS):
            row = result[name][kind]
            ax.bar(i + (j - 0.5) * 0.38, row["best_s"], 0.36, color=color, label=kind if i == 0 else None)
            ax.text(i + (j - 0.5) * 0.38, row["best_s"], f"{row['best_s']:.3f} s\n{row['peak_mem_gib']} GiB",
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(SYSTEMS)), ["memory-only", "floor (frozen to layer 0)", "full fine-tune"])
    ax.set_ylabel("seconds a training step (best)")
    ax.margins(y=0.25)
    ax.legend(fontsize=8)
    ratio = result["replayed_full_over_memory"]["seconds"]
    ax.set_title(f"{pathlib.Path(result['adapter']).name} on {result['machine']}, {result['dtype']}, {result['date']}\n"
                 f"batch {result['batch']} x {result['context']} tokens, segment {result['segment']}"
                 f"{', checkpointing' if result['checkpointing'] else ''}; replayed full / memory: {ratio:.2f}x",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, batch=8, context=4096, positions=32, device="cuda")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="results/train-graphed.json")
    ap.add_argument("--replot", nargs="+", metavar="JSON", help="only plot these results files (no GPU needed)")
    args = ap.parse_args()
    if args.replot:
        for name in args.replot:
            plot(json.loads(open(name).read()), str(pathlib.Path(name).with_suffix(".png")))
        return
    if not torch.cuda.is_available():
        raise SystemExit("train_graphed.py replays CUDA graphs: it needs a CUDA device")
    steps = TrainSteps(args)
    mm, b = steps.mm, args.batch

    def memory_loss() -> torch.Tensor:
        state, loss = mm.init_state(b), 0.0
        for seg_ids, _ in steps.segs:
            out = mm(input_ids=seg_ids, logits_to_keep=steps.pos, memory_state=state)
            state, loss = out.memory_state, loss + steps._loss_at(out.logits, seg_ids)
        return loss

    result = steps.header()
    with no_rng_state(mm.base, args.checkpointing):
        named = {id(p): n for n, p in mm.named_parameters()}
        params = list(mm.memory_parameters())
        result["train_memory"] = measure("train_memory", memory_loss, params, 1e-4, args.steps,
                                         names=[named.get(id(p), "?") for p in params])
    base = mm.detach()
    base.requires_grad_(False)
    if args.checkpointing:
        base.train()
    with no_rng_state(base, args.checkpointing):
        probe = torch.nn.Parameter(torch.zeros((), device=steps.device))
        handle = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out + probe.to(out.dtype))

        def base_loss() -> torch.Tensor:
            loss = 0.0
            for seg_ids, _ in steps.segs:
                loss = loss + steps._loss_at(base(input_ids=seg_ids, logits_to_keep=steps.pos).logits, seg_ids)
            return loss

        try:
            result["train_frozen"] = measure("train_frozen", base_loss, [probe], 1e-4, args.steps)
        finally:
            handle.remove()
        compute = next(base.parameters()).dtype
        base.float()  # fp32 master weights, the maths in the base's dtype under autocast (as gma6 bench)
        base.requires_grad_(True)
        result["train_full"] = measure("train_full", base_loss, list(base.parameters()), 1e-5, args.steps,
                                       autocast={"dtype": compute}, names=[n for n, _ in base.named_parameters()])
    for kind in ("eager", "replayed"):
        full = result["train_full"][kind]
        result[f"{kind}_full_over_memory"] = {
            "seconds": round(full["best_s"] / result["train_memory"][kind]["best_s"], 3),
            "peak": round(full["peak_mem_gib"] / result["train_memory"][kind]["peak_mem_gib"], 3),
            "floor_seconds": round(full["best_s"] / result["train_frozen"][kind]["best_s"], 3)}
    print(json.dumps({k: v for k, v in result.items() if k.endswith("_over_memory")}))
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    plot(result, str(pathlib.Path(args.out).with_suffix(".png")))


if __name__ == "__main__":
    main()
