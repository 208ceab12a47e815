"""Each memory layer's read as one Triton kernel (``GMA6Config.triton_read``).

Why: the default's read costs the GPU a dozen small kernels a layer and segment — its query adapter's change, the
query's fp32 q-norm and RoPE, the slots' attention, the gated add — each a full pass over the segment's queries
(8 x 1024 tokens x 1024 values a layer) and a launch the host must issue. One kernel does it all: each program takes
a block of one head's tokens, builds their queries in registers, attends over the few slots with an online softmax
and adds the gated read to the attention's output, so the queries are read once and nothing in between is stored.

The maths is ``base_read.rotated_read`` followed by ``add_read_heads``, in fp32 registers where the eager path
rounds to the base's dtype between steps: equal in fp32, within bf16 rounding otherwise (``tests/test_triton_read.py``
runs the kernel through Triton's interpreter on the CPU; ``scripts/gpu_triton_read_check.py`` on a GPU). No
autograd: training takes the eager read.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import torch.nn.functional as F

# tokens a program takes, slots a step of the online softmax takes (the default's 128 slots + a sink: 3 steps)
_BLOCK_T = 32
_BLOCK_S = 64


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
) -> str | None:
    """Why the kernel cannot take this read (``rotated_read``'s arguments; None: it can): the eager read then runs."""
    if not available():
        return "triton is not installed"
    if not (q.is_cuda or interpreting()):
        return f"the read runs on {q.device.type}, not CUDA"
    if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, mask, view, down, up, q_pre, gain, *(tables or ()))):
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
    return None


@functools.cache
def _kernel() -> Callable:
    import triton
    import triton.language as tl

    @triton.jit
    def read_kernel(
        out_ptr, res_ptr, q_ptr, pre_ptr, low_ptr, up_ptr, gain_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, mask_ptr, gate_ptr,
        T, S1, n_heads, group, scaling, eps,
        s_ob, s_ot, s_oh, s_rb, s_rt, s_rh, s_qb, s_qh, s_qt, s_pb, s_pt, s_lb, s_lt, s_cb, s_ct,
        s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_mb,
        D: tl.constexpr, R: tl.constexpr, MODE: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
        HAS_OUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        # MODE 0: the base's finished queries; 1: plus the adapter's change rotated alone (after the q-norm);
        # 2: the q projection's output plus the change, normed and rotated (before it). Last strides are 1.
        HALF: tl.constexpr = D // 2
        b = tl.program_id(1) // n_heads
        h = tl.program_id(1) % n_heads
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rows = t < T
        c = tl.arange(0, HALF)
        # RoPE pairs column i with i + D/2, so the query is built in two halves
        if MODE == 0:
            qp = q_ptr + b * s_qb + h * s_qh + t[:, None] * s_qt + c[None, :]
            x1 = tl.load(qp, mask=rows[:, None], other=0.0).to(tl.float32)
            x2 = tl.load(qp + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
        else:
            x1 = tl.zeros((BLOCK_T, HALF), tl.float32)
            x2 = tl.zeros((BLOCK_T, HALF), tl.float32)
            for j in tl.static_range(R):  # the change low @ up.T, rank R (< 16: below tl.dot's smallest size)
                lj = tl.load(low_ptr + b * s_lb + t * s_lt + j, mask=rows, other=0.0).to(tl.float32)
                x1 += lj[:, None] * tl.load(up_ptr + (h * D + c) * R + j).to(tl.float32)[None, :]
                x2 += lj[:, None] * tl.load(up_ptr + (h * D + HALF + c) * R + j).to(tl.float32)[None, :]
            if MODE == 2:
                pp = pre_ptr + b * s_pb + t[:, None] * s_pt + h * D + c[None, :]
                x1 += tl.load(pp, mask=rows[:, None], other=0.0).to(tl.float32)
                x2 += tl.load(pp + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
                if NORM:
                    inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
                    x1 = x1 * inv[:, None] * tl.load(gain_ptr + c)[None, :]
                    x2 = x2 * inv[:, None] * tl.load(gain_ptr + HALF + c)[None, :]
            if ROTATE:
                tp = b * s_cb + t[:, None] * s_ct + c[None, :]
                cos1 = tl.load(cos_ptr + tp, mask=rows[:, None], other=0.0).to(tl.float32)
                cos2 = tl.load(cos_ptr + tp + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
                sin1 = tl.load(sin_ptr + tp, mask=rows[:, None], other=0.0).to(tl.float32)
                sin2 = tl.load(sin_ptr + tp + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
                x1, x2 = x1 * cos1 + x2 * sin1, x2 * cos2 + x1 * sin2
            if MODE == 1:
                qp = q_ptr + b * s_qb + h * s_qh + t[:, None] * s_qt + c[None, :]
                x1 += tl.load(qp, mask=rows[:, None], other=0.0).to(tl.float32)
                x2 += tl.load(qp + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
        # the query in the slots' dtype, as the eager read hands it to SDPA
        q1 = x1.to(k_ptr.dtype.element_ty)
        q2 = x2.to(k_ptr.dtype.element_ty)
        if UPCAST:  # the interpreter's dot is wrong for 16-bit operands
            q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
        dd = tl.arange(0, D)
        kh = h // group
        m_i = tl.full((BLOCK_T,), -1.0e30, tl.float32)  # finite: a step whose slots are all masked adds nothing
        l_i = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, D), tl.float32)
        for s0 in range(0, S1, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            live = s < S1
            kp = k_ptr + b * s_kb + kh * s_kh + s[None, :] * s_ks + c[:, None]
            k1 = tl.load(kp, mask=live[None, :], other=0.0)
            k2 = tl.load(kp + HALF, mask=live[None, :], other=0.0)
            vv = tl.load(v_ptr + b * s_vb + kh * s_vh + s[:, None] * s_vs + dd[None, :], mask=live[:, None], other=0.0)
            if UPCAST:
                k1, k2, vv = k1.to(tl.float32), k2.to(tl.float32), vv.to(tl.float32)
            scores = tl.dot(q1, k1, input_precision=PRECISION) + tl.dot(q2, k2, input_precision=PRECISION)
            bias = tl.load(mask_ptr + b * s_mb + s, mask=live, other=float("-inf")).to(tl.float32)
            scores = scores * scaling + bias[None, :]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
            m_i = m_new
        read = acc / l_i[:, None]
        if HAS_OUT:
            base = tl.load(out_ptr + b * s_ob + t[:, None] * s_ot + h * s_oh + dd[None, :], mask=rows[:, None], other=0.0)
            read = base.to(tl.float32) + tl.load(gate_ptr + h * D + dd).to(tl.float32)[None, :] * read
        tl.store(res_ptr + b * s_rb + t[:, None] * s_rt + h * s_rh + dd[None, :],
                 read.to(res_ptr.dtype.element_ty), mask=rows[:, None])

    return read_kernel


def _last_dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_read(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
    view: torch.Tensor | None = None, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None, q_pre: torch.Tensor | None = None,
    gain: torch.Tensor | None = None, eps: float = 0.0, norm: object | None = None,
    out: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotated_read`` (same arguments) in one kernel: the read (B, n, T, d); with ``out`` (B, T, n, d) and ``gate``
    (n*d,), ``add_read_heads(out, read, gate)`` instead. Check ``unsupported`` first."""
    why = unsupported(q, k, v, mask, scaling, view, down, up, tables, q_pre, gain, eps, norm)
    if why is not None:
        raise ValueError(f"triton_read cannot take this read: {why}")
    import triton

    b, n, t, d = q.shape
    group = n // k.shape[1]
    q, k, v = _last_dense(q), _last_dense(k), _last_dense(v)
    mask = mask.reshape(mask.shape[0], mask.shape[-1])
    mask = _last_dense(mask)
    mode, r = 0, 1
    low = pre = cos = sin = up_w = gain_w = None
    if down is not None:
        low = _last_dense(F.linear(view, down))
        up_w = up.contiguous()
        r = up_w.shape[1]
        mode = 2 if q_pre is not None else 1
        if mode == 2:
            pre = _last_dense(q_pre)
            gain_w = None if gain is None else gain.float().contiguous()
        if tables is not None:
            cos, sin = (x.expand(x.shape[0], 1, t, d)[:, 0] for x in tables)
            cos, sin = _last_dense(cos), _last_dense(sin)
    if out is not None:
        res = torch.empty(b, t, n, d, dtype=out.dtype, device=q.device)
        s_r = (res.stride(0), res.stride(1), res.stride(2))
        out = _last_dense(out)
        s_o = (out.stride(0), out.stride(1), out.stride(2))
        gate = gate.contiguous()
    else:
        res = torch.empty(b, n, t, d, dtype=q.dtype, device=q.device)
        s_r = (res.stride(0), res.stride(2), res.stride(1))
        s_o = (0, 0, 0)
    s_c = (0, 0) if cos is None else (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
    kernel = _kernel()
    grid = (triton.cdiv(t, _BLOCK_T), b * n)
    dummy = q  # never read where its flag is off
    kernel[grid](
        out if out is not None else dummy, res, q, pre if pre is not None else dummy,
        low if low is not None else dummy, up_w if up_w is not None else dummy,
        gain_w if gain_w is not None else dummy, cos if cos is not None else dummy, sin if sin is not None else dummy,
        k, v, mask, gate if gate is not None else dummy,
        t, k.shape[2], n, group, float(scaling), float(eps),
        *s_o, *s_r, q.stride(0), q.stride(1), q.stride(2),
        *((pre.stride(0), pre.stride(1)) if pre is not None else (0, 0)),
        *((low.stride(0), low.stride(1)) if low is not None else (0, 0)), *s_c,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0) if mask.shape[0] > 1 else 0,
        D=d, R=r, MODE=mode, NORM=gain_w is not None, ROTATE=cos is not None, HAS_OUT=out is not None,
        UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_T=_BLOCK_T, BLOCK_S=_BLOCK_S,
    )
    return res
