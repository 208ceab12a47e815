"""Each memory layer's read as one Triton kernel (``GMA6Config.triton_read``).

Why: the default's read costs the GPU a dozen small kernels a layer and segment — its query adapter's change, the
query's fp32 q-norm and RoPE, the slots' attention, the gated add — each a full pass over the segment's queries
(8 x 1024 tokens x 1024 values a layer) and a launch the host must issue. One kernel does it all: each program takes
a block of one head's tokens, builds their queries in registers, attends over the few slots with an online softmax
and adds the gated read to the attention's output, so the queries are read once and nothing in between is stored.

The maths is ``base_read.rotated_read`` followed by ``add_read_heads``, in fp32 registers where the eager path
rounds to the base's dtype between steps: equal in fp32, within bf16 rounding otherwise (``tests/test_triton_read.py``
runs the kernel through Triton's interpreter on the CPU; ``scripts/gpu_graph_read_check.py`` on a GPU). No
autograd: training takes the eager read.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

# How the kernel (``triton_kernels.read_kernel``) is launched: tokens a program takes, slots a step of its online
# softmax takes, warps and pipeline stages. Chosen on an H200 among the settings `scripts/gpu_graph_read_check.py
# --sweep` times (bf16, 8 x 1024 tokens, 4 heads of 256 over one key-value head, 128 slots + the sink folded in; a
# variant taking all four heads of a token block at once, the slots loaded once for them, was slower: 68 against 61 us,
# results/session18/kernel/).
LAUNCH = {"block_t": 32, "block_s": 64, "num_warps": 4, "num_stages": 2}


def interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``, read when the kernel is first built): kernels
    then run on CPU tensors, which is how the tests check them."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def available() -> bool:
    """Whether Triton can be imported here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
    view: torch.Tensor | None = None, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    gain: torch.Tensor | None = None, eps: float = 0.0, norm: object | None = None,
    out: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> str | None:
    """Why the kernel cannot take this read (``rotated_read``'s arguments, and ``triton_read``'s ``out`` and
    ``gate`` where given; None: it can): the eager read then runs."""
    if not available():
        return "triton is not installed"
    if not (q.is_cuda or interpreting()):
        return f"the read runs on {q.device.type}, not CUDA"
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (q, k, v, mask, view, down, up, q_pre, gain, out, gate, *(tables or ()))):
        return "the read needs gradients (the kernel has no backward)"
    if q_pre is not None and gain is None and norm is not None:
        return "the q-norm does not fold into an rms_norm"
    d = q.shape[-1]
    if d < 32 or d & (d - 1):
        return f"head size {d} is not a power of two >= 32"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads over {k.shape[1]} slot heads"
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != d or mask.shape[0] not in (1, q.shape[0]):
        return (f"shapes: queries {tuple(q.shape)}, slot keys {tuple(k.shape)}, values {tuple(v.shape)}, mask "
                f"{tuple(mask.shape)} (one batch, the same head size)")
    return None


@functools.cache
def _kernel() -> Callable:
    from .triton_kernels import read_kernel

    return read_kernel


def triton_read(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
    view: torch.Tensor | None = None, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    gain: torch.Tensor | None = None, eps: float = 0.0, norm: object | None = None,
    out: torch.Tensor | None = None, gate: torch.Tensor | None = None, checked: bool = False,
    zero_sink: bool = False, in_place: bool = False,
) -> torch.Tensor:
    """``rotated_read`` (same arguments) in one kernel: the read (B, n, T, d); with ``out`` (B, T, n, d) and ``gate``
    (n*d,), ``add_read_heads(out, read, gate)`` instead. A read ``unsupported`` names raises ``ValueError``;
    ``checked``: the caller asked ``unsupported`` already (the read's hook, once a layer and segment: host time is
    what a launch-bound GPU waits on). ``zero_sink``: the caller vouches that the last slot's key and value are
    zeros (the sink ``prepare_slots`` appends), which the kernel then folds into its softmax instead of reading; a row
    whose other slots are all empty (bias -inf) then reads exactly zero, and its programs skip the read. ``in_place``
    (with ``out``): the sum written into ``out`` itself (if dense; else into a dense copy) and returned, so where the
    read is zero nothing is written at all."""
    if in_place and out is None:
        raise ValueError("triton_read: in_place=True adds the read into out, and no out was given")
    if not checked:
        why = unsupported(q, k, v, mask, scaling, view, down, up, tables, q_pre, gain, eps, norm, out, gate)
        if why is not None:
            raise ValueError(f"triton_read cannot take this read: {why}")
    b, n, t, d = q.shape
    # Read in place through their strides: the base's queries (B, n, T, d) are a transposed view of its projection
    # and each layer's slot mask a view into every layer's padded rows. Copying the queries cost the GPU ~25 us a
    # layer and segment, and the kind before the q-norm never even reads them. Only the last dimension must be
    # dense; .contiguous() is free where a tensor already is (the staged slots are).
    k, v = k.contiguous(), v.contiguous()
    mask = mask.reshape(mask.shape[0], mask.shape[-1])
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    dummy = k  # passed where a flag is off: never read
    low = pre = cos = sin = up_w = gain_w = dummy
    mode, r, s_cb = 0, 1, 0
    if down is not None:
        low, up_w = F.linear(view, down).contiguous(), up.contiguous()
        r = up_w.shape[1]
        mode = 2 if q_pre is not None else 1
        if mode == 2:
            pre = q_pre.contiguous()
            if gain is not None:
                gain_w = gain.float().contiguous()
        if tables is not None:
            cos, sin = (x.expand(x.shape[0], 1, t, d)[:, 0].contiguous() for x in tables)
            s_cb = t * d if cos.shape[0] > 1 else 0
    if out is not None:
        out, gate = out.contiguous(), gate.contiguous()
        res = out if in_place else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    else:
        res, out, gate = torch.empty((b, n, t, d), dtype=q.dtype, device=q.device), dummy, dummy
    if mode != 2 and q.stride(-1) != 1:  # only then does the kernel read q
        q = q.contiguous()
    q_strides = (q.stride(0), q.stride(1), q.stride(2)) if mode != 2 else (0, 0, 0)
    launch = LAUNCH
    grid = ((t + launch["block_t"] - 1) // launch["block_t"], b * n)
    _kernel()[grid](
        out, res, q if mode != 2 else dummy, pre, low, up_w, gain_w, cos, sin, k, v, mask, gate, *q_strides,
        t, k.shape[2], n, n // k.shape[1], s_cb, mask.stride(0) if mask.shape[0] > 1 else 0, float(scaling), float(eps),
        D=d, R=r, RP=max(16, 1 << (r - 1).bit_length()), MODE=mode, NORM=gain_w is not dummy, ROTATE=cos is not dummy,
        HAS_OUT=out is not dummy, IN_PLACE=in_place, UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ZERO_SINK=zero_sink,
        BLOCK_T=launch["block_t"], BLOCK_S=launch["block_s"], num_warps=launch["num_warps"],
        num_stages=launch["num_stages"],
    )
    return res
