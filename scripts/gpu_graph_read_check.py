"""GPU check of the read's fast paths: the same adapter read eagerly, each layer's read from CUDA graphs
(``graphed``: ``cuda_graph_read``), through the Triton kernel (``triton``: ``triton_read``), whole segments from
CUDA graphs (``segments``: ``cuda_graph_segments``) or combinations (``triton+segments``), over the same segments
in one process — memory states and answering logits compared with the first variant's, and a segment's read + write
timed in alternating rounds against the bare base run eagerly and replayed from a CUDA graph.

    python scripts/gpu_graph_read_check.py --model M [--adapter DIR] [--variants eager,graphed,triton,segments,triton+segments]
        [--batch 8] [--tokens 1024] [--segments 6] [--pairs 24] [--no-kernel | --sweep] [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import gma6
from gma6.base import default_adapter
from gma6.io import atomic_write_text
from gma6.memory.attention import version_key
from gma6.segment_graph import GraphedCall


def _registers(kernel) -> dict:
    """Registers a thread and spills of the kernel's last compiled variant (Triton's own report)."""
    try:
        compiled = list(kernel._kernel().device_caches.values())[0][0]
        last = list(compiled.values())[-1]
        return {"n_regs": last.n_regs, "n_spills": last.n_spills}
    except Exception as e:  # noqa: BLE001 - Triton's internals differ between versions
        return {"registers": repr(e)[:80]}


def _kernel_times(batch: int, tokens: int, sweep: bool) -> dict:
    """One memory layer's read and gated add, the default's kind at the 270M's shape (4 query heads of 256, 128
    slots + a sink, a rank-8 query adapter before the q-norm), eager (rotated_read + add_read_heads) against
    triton_read: GPU microseconds a call (20 calls replayed from a CUDA graph, so no host time) and host
    microseconds a call (issuing 50 calls). With ``sweep``, the kernel's GPU time under each launch setting (the sink folded in, as the model calls it)."""
    import itertools

    from gma6.memory import triton_read as kernel
    from gma6.memory.base_read import add_read_heads, rotated_read

    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16()  # noqa: E731
    n, d, s1, h, rank = 4, 256, 129, 640, 8
    ang = torch.rand(tokens, d // 2, generator=g, device="cuda") * 6
    tables = (torch.cat([ang.cos(), ang.cos()], -1)[None, None].bfloat16(),
              torch.cat([-ang.sin(), ang.sin()], -1)[None, None].bfloat16())
    q, k, v = r(batch, n, tokens, d), r(batch, 1, s1, d), r(batch, 1, s1, d)  # the 270M's one key-value head
    k[:, :, -1], v[:, :, -1] = 0, 0  # the sink, as prepare_slots appends it
    mask = torch.zeros(batch, 1, 1, s1, device="cuda").bfloat16()
    kw = dict(view=r(batch, tokens, h), down=r(rank, h) / 25, up=r(n * d, rank) / 3, tables=tables,
              q_pre=r(batch, tokens, n * d), gain=1 + torch.rand(d, device="cuda"), eps=1e-6)
    out, gate = r(batch, tokens, n, d), torch.tanh(r(n * d))
    empty = mask.clone()
    empty[..., :-1] = float("-inf")  # nothing written but the sink: a fresh state's first segment
    spare = out.clone()  # what the in-place calls add into (again and again when timed: only its values change)
    calls = {"eager": lambda: add_read_heads(out, rotated_read(q, k, v, mask, 0.0625, **kw), gate),
             "triton": lambda: kernel.triton_read(q, k, v, mask, 0.0625, **kw, out=out, gate=gate, zero_sink=True),
             "triton_in_place": lambda: kernel.triton_read(q, k, v, mask, 0.0625, **kw, out=spare, gate=gate,
                                                           zero_sink=True, in_place=True),  # as the model calls it
             "triton_empty": lambda: kernel.triton_read(q, k, v, empty, 0.0625, **kw, out=out, gate=gate,
                                                        zero_sink=True),
             "triton_empty_in_place": lambda: kernel.triton_read(q, k, v, empty, 0.0625, **kw, out=spare, gate=gate,
                                                                 zero_sink=True, in_place=True),
             "copy_out": lambda: out.clone()}

    def gpu_us(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) * 1000 / 200, 2)

    def host_us(fn) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return round((t1 - t0) * 1e6 / 50, 2)

    result: dict = {}
    with torch.no_grad():
        result["max_abs_diff"] = (calls["triton"]().float() - calls["eager"]().float()).abs().max().item()
        spare.copy_(out)
        result["in_place_max_abs_diff"] = (calls["triton_in_place"]().float() - calls["eager"]().float()).abs().max().item()
        eager_empty = add_read_heads(out, rotated_read(q, k, v, empty, 0.0625, **kw), gate)
        result["empty_reads_out_unchanged"] = {
            "eager": torch.equal(eager_empty, out), "triton": torch.equal(calls["triton_empty"](), out),
            "triton_in_place": torch.equal(kernel.triton_read(q, k, v, empty, 0.0625, **kw, out=out.clone(), gate=gate,
                                                              zero_sink=True, in_place=True), out)}
        for name, fn in calls.items():
            result[name] = {"gpu_us": gpu_us(fn), "host_us": host_us(fn)}
        if sweep:
            chosen, rows = dict(kernel.LAUNCH), []
            for bt, bs, w, st in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2, 3)):
                kernel.LAUNCH.update(block_t=bt, block_s=bs, num_warps=w, num_stages=st)
                try:
                    rows.append({**kernel.LAUNCH, "gpu_us": gpu_us(calls["triton"]), **_registers(kernel)})
                except Exception as e:  # a setting that does not fit the GPU (shared memory, registers)
                    rows.append({**kernel.LAUNCH, "error": repr(e)[:200]})
                print(rows[-1])
            kernel.LAUNCH.update(chosen)
            result["sweep"] = sorted(rows, key=lambda x: x.get("gpu_us", 1e9))
            # where the kernel's time goes: its parts switched off one at a time, and a copy of the attention's
            # output (what any read must at least move) for scale
            parts = {
                "full": lambda: kernel.triton_read(q, k, v, mask, 0.0625, **kw, out=out, gate=gate, zero_sink=True),
                "sink_read": lambda: kernel.triton_read(q, k, v, mask, 0.0625, **kw, out=out, gate=gate),
                "no_add": lambda: kernel.triton_read(q, k, v, mask, 0.0625, **kw),
                "base_query": lambda: kernel.triton_read(q, k, v, mask, 0.0625, out=out, gate=gate),
                "after_norm": lambda: kernel.triton_read(q, k, v, mask, 0.0625, out=out, gate=gate,
                                                         **{k_: kw[k_] for k_ in ("view", "down", "up", "tables")}),
                "slots_65": lambda: kernel.triton_read(q, k[:, :, :65], v[:, :, :65], mask[..., :65], 0.0625, **kw,
                                                       out=out, gate=gate),
                "slots_17": lambda: kernel.triton_read(q, k[:, :, :17], v[:, :, :17], mask[..., :17], 0.0625, **kw,
                                                       out=out, gate=gate),
                "copy_out": lambda: out.clone(),
                "down_linear": lambda: torch.nn.functional.linear(kw["view"], kw["down"]),
            }
            result["parts_gpu_us"] = {name: gpu_us(fn) for name, fn in parts.items()}
            print("parts:", result["parts_gpu_us"])
    print("read call:", {k: v for k, v in result.items() if k != "sweep"})
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=str(default_adapter()))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--segments", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--variants", default="eager,graphed",
                    help="comma-separated: eager, graphed, triton, triton+graphed (the first is the reference); "
                         "empty: the kernel's timing alone, no model")
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernel", action=argparse.BooleanOptionalAction, default=True,
                    help="time one layer's read call at the 270M's shape, eager against the Triton kernel")
    ap.add_argument("--sweep", action="store_true", help="and the kernel under each launch setting")
    args = ap.parse_args()
    kernel_times = _kernel_times(args.batch, args.tokens, args.sweep) if args.kernel else None
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                  "command": " ".join(["python", *sys.argv]), "batch": args.batch, "tokens": args.tokens,
                  "read_call_us": kernel_times}
        print(json.dumps({k: v for k, v in result.items() if k != "read_call_us"}))
        if args.out:
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        return
    base, _ = gma6.load_base(args.model, dtype=torch.bfloat16, device="cuda", progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (args.batch, args.tokens * args.segments), generator=g).cuda()
    question = torch.randint(3, 1000, (args.batch, 64), generator=g).cuda()
    got = {}
    bare_graph = GraphedCall(lambda x: (base(input_ids=x, logits_to_keep=1, use_cache=False).logits,),
                             lambda: version_key(list(base.parameters())))
    for variant in variants:
        parts = set(variant.split("+"))
        if not parts <= {"eager", "graphed", "triton", "segments"}:
            raise SystemExit(f"unknown variant {variant!r}")
        mm = gma6.load_adapter(base, args.adapter, cuda_graph_read="graphed" in parts, triton_read="triton" in parts,
                               cuda_graph_segments="segments" in parts)
        with torch.no_grad():
            state = mm.read(ids, segment_length=args.tokens)
            state = mm.read(ids, segment_length=args.tokens)  # the second pass replays what the first captured
            logits = mm(input_ids=question, memory_state=state, write=False).logits.float()
            seg = ids[:, : args.tokens]
            mask = torch.ones_like(seg, dtype=torch.bool)

            def bare() -> None:
                with mm.memory_disabled():
                    mm.base(input_ids=seg, logits_to_keep=1, use_cache=False)

            def bare_replayed() -> None:
                with mm.memory_disabled():
                    bare_graph(seg)

            step = lambda: mm._read_step(seg, mask, state, full=True)  # noqa: E731
            calls = {"bare": bare, "bare_replayed": bare_replayed, "memory": step}
            for _ in range(3):
                for fn in calls.values():
                    fn()
            times: dict[str, list[float]] = {name: [] for name in calls}
            for k in range(args.pairs):
                for name in (list(calls) if k % 2 == 0 else list(calls)[::-1]):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    calls[name]()
                    torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t0)
        ratio = lambda floor: statistics.median(f / m for f, m in zip(times[floor], times["memory"]))  # noqa: E731
        got[variant] = {"state": state.memory.float(), "logits": logits, "ratio": ratio("bare"),
                        "ratio_replayed": ratio("bare_replayed"),
                        "ms": {n: round(statistics.median(t) * 1000, 3) for n, t in times.items()},
                        "graphs": len(mm._graphed._graphs) if mm._graphed is not None else 0,
                        "segment_graphs": len(mm._segment_graph) if mm._segment_graph is not None else 0}
        mm.detach()
    first = got[variants[0]]
    result = {
        "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "adapter": args.adapter, "batch": args.batch, "tokens": args.tokens, "segments": args.segments,
        "command": " ".join(["python", *sys.argv]),
        "read_call_us": kernel_times,
        "paired_memory_over_bare": {v: round(got[v]["ratio"], 4) for v in variants},
        "paired_memory_over_replayed_bare": {v: round(got[v]["ratio_replayed"], 4) for v in variants},
        "median_ms": {v: got[v]["ms"] for v in variants},
        "graphs_captured": {v: got[v]["graphs"] for v in variants},
        "segment_graphs_captured": {v: got[v]["segment_graphs"] for v in variants},
        "against": variants[0],
        "max_abs_state_diff": {v: float((got[v]["state"] - first["state"]).abs().max()) for v in variants[1:]},
        "max_abs_logit_diff": {v: float((got[v]["logits"] - first["logits"]).abs().max()) for v in variants[1:]},
        "same_argmax_share": {v: float((got[v]["logits"].argmax(-1) == first["logits"].argmax(-1)).float().mean())
                              for v in variants[1:]},
    }
    print(json.dumps(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
