#!/usr/bin/env python
"""An adapter whose read-query adapters change the query before the base's q-norm (``read_query="before_norm"``)
as the nearest one of the ``"after_norm"`` kind, a starting point for training that kind (the two are different
functions: this is a fit, not an identity).

Per memory layer, with the down projection V kept, the up projection U' is the least-squares fit of
``qnorm(W_q x + U V x) - qnorm(W_q x)`` (what the old adapter changed in the normed queries) by ``U' V x``, over
the next layer's q-projection inputs x of the bare base reading training samples. Prints and records each
layer's fit (the share of that change's energy explained).

    python scripts/convert_read_query.py --adapter DIR --out DIR2 [--model M] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

import gma6
from gma6.data.generator import generate_samples
from gma6.integration import find_decoder_layers
from gma6.io import atomic_write_text


def _inputs(base: torch.nn.Module, tok, layers: list[int], tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """The q-projection inputs (N, H) of each of ``layers`` while the bare base reads training samples."""
    decoder = find_decoder_layers(base)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = [decoder[i].self_attn.q_proj.register_forward_hook(
        lambda m, a, o, i=i: seen[i].append(a[0].detach().flatten(0, 1).float())) for i in layers]
    try:
        got, k = 0, 0
        while got < tokens:
            for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):
                s = generate_samples(task, "1k", 1, split="train", seed=seed + k, tokenizer=tok)[0]
                ids = tok(s.context + "\n" + s.question, return_tensors="pt").input_ids[:, :1024]
                with torch.no_grad():
                    base(input_ids=ids.to(base.device), logits_to_keep=1)
                got += ids.shape[1]
            k += 1
    finally:
        for h in handles:
            h.remove()
    return {i: torch.cat(v) for i, v in seen.items()}


def fit_after_norm(read, adapter: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The up projection (n*d, r) for ``adapter`` acting after ``read``'s q-norm that best reproduces, over inputs x
    (N, H), what it changed before the q-norm, and the share of that change's energy it explains."""
    q = read.attn.q_proj(x)
    n, d = q.shape[0], read.head_dim

    def normed(t: torch.Tensor) -> torch.Tensor:
        return read._norm(t.view(n, -1, d), "q").reshape(n, -1) if read.q_norm is not None else t

    target = normed(q + adapter(x)) - normed(q)
    z = torch.nn.functional.linear(x, adapter.down.weight.float())  # (N, r)
    up = torch.linalg.lstsq(z, target).solution.T  # (n*d, r)
    explained = 1 - float((z @ up.T - target).square().sum() / target.square().sum().clamp_min(1e-30))
    return up, explained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=8192, help="Tokens of training samples to fit on.")
    ap.add_argument("--seed", type=int, default=100)
    args = ap.parse_args()
    base, tok = gma6.load_base(args.model, dtype=torch.float32, device="cpu", progress=False)
    mm = gma6.load_adapter(base, args.adapter)
    if mm.config.read_query != "before_norm" or not mm.config.read_rank:
        raise SystemExit(f"{args.adapter}: expected read_query='before_norm' with read_rank > 0")
    nxt = [i + 1 for i in mm.config.layers]
    with mm.memory_disabled():  # the bare base's own states
        x_by_layer = _inputs(base, tok, nxt, args.tokens, args.seed)
    fits = []
    with torch.no_grad():
        for slot, i in enumerate(nxt):
            layer = mm.controller.layers[slot]
            up, explained = fit_after_norm(mm._base_reads[slot], layer.read_q, x_by_layer[i])
            layer.read_q.up.weight.copy_(up.to(layer.read_q.up.weight.dtype))
            fits.append({"layer": i - 1, "tokens": x_by_layer[i].shape[0], "explained": round(explained, 4)})
            print(f"memory layer {i - 1}: {explained:.3f} of the change explained", flush=True)
    mm.config.read_query = "after_norm"
    out = mm.save_pretrained(args.out)
    record = {"command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d"), "machine": "cpu",
              "from": args.adapter, "fits": fits}
    atomic_write_text(out / "conversion.json", json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
