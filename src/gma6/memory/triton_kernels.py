"""The Triton kernel of ``triton_read`` (imported only where triton is: ``triton_read._kernel``). Triton resolves the
functions a kernel calls among its module's globals, hence a module of its own."""
import triton
import triton.language as tl


@triton.jit
def slot_scores(q1, q2, k_ptr, mask_ptr, kv, mask_row, s0, S1, scaling, D: tl.constexpr, BLOCK_S: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # scaled scores (+ the log-usage bias) of the queries' two halves against slots s0 .. s0 + BLOCK_S
    HALF: tl.constexpr = D // 2
    c = tl.arange(0, HALF)
    s = s0 + tl.arange(0, BLOCK_S)
    live = s < S1
    k_at = k_ptr + (kv + s[:, None]) * D + c[None, :]  # (BLOCK_S, HALF) as stored, transposed for the dot
    k1 = tl.trans(tl.load(k_at, mask=live[:, None], other=0.0))
    k2 = tl.trans(tl.load(k_at + HALF, mask=live[:, None], other=0.0))
    if UPCAST:
        k1, k2 = k1.to(tl.float32), k2.to(tl.float32)
    scores = tl.dot(q1, k1, input_precision=PRECISION) + tl.dot(q2, k2, input_precision=PRECISION)
    bias = tl.load(mask_ptr + mask_row + s, mask=live, other=float("-inf")).to(tl.float32)
    return scores * scaling + bias[None, :], s, live


@triton.jit
def store_read(read, cols, out_ptr, res_ptr, gate_ptr, b, h, t, rows, T, n_heads, D: tl.constexpr,
               HAS_OUT: tl.constexpr):
    # columns ``cols`` of the read, added through the gate to the attention's output where HAS_OUT
    if HAS_OUT:
        at = ((b * T + t[:, None]) * n_heads + h) * D + cols[None, :]
        base = tl.load(out_ptr + at, mask=rows[:, None], other=0.0)
        read = base.to(tl.float32) + tl.load(gate_ptr + h * D + cols).to(tl.float32)[None, :] * read
    else:
        at = ((b * n_heads + h) * T + t[:, None]) * D + cols[None, :]
    tl.store(res_ptr + at, read.to(res_ptr.dtype.element_ty), mask=rows[:, None])


@triton.jit
def build_query(q_at, pre_ptr, low_ptr, up_ptr, gain_ptr, cos_ptr, sin_ptr, b, h, t, rows, T, n_heads, s_cb, eps,
                D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, MODE: tl.constexpr, NORM: tl.constexpr,
                ROTATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # the query's two halves (RoPE pairs column i with i + D/2), fp32 (BLOCK_T, D/2) each; MODE as in read_kernel
    HALF: tl.constexpr = D // 2
    c = tl.arange(0, HALF)
    if MODE == 0:
        x1 = tl.load(q_at, mask=rows[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(q_at + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
    else:
        # the change low @ up.T, its rank padded to RP (tl.dot takes no fewer than 16)
        j = tl.arange(0, RP)
        low = tl.load(low_ptr + (b * T + t[:, None]) * R + j[None, :], mask=rows[:, None] & (j[None, :] < R),
                      other=0.0)
        up1 = tl.load(up_ptr + (h * D + c[None, :]) * R + j[:, None], mask=j[:, None] < R, other=0.0)
        up2 = tl.load(up_ptr + (h * D + HALF + c[None, :]) * R + j[:, None], mask=j[:, None] < R, other=0.0)
        if UPCAST:
            low, up1, up2 = low.to(tl.float32), up1.to(tl.float32), up2.to(tl.float32)
        x1 = tl.dot(low, up1, input_precision=PRECISION)
        x2 = tl.dot(low, up2, input_precision=PRECISION)
        if MODE == 2:
            pre_at = pre_ptr + (b * T + t[:, None]) * (n_heads * D) + h * D + c[None, :]
            x1 += tl.load(pre_at, mask=rows[:, None], other=0.0).to(tl.float32)
            x2 += tl.load(pre_at + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
            if NORM:
                inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
                x1 = x1 * inv[:, None] * tl.load(gain_ptr + c)[None, :]
                x2 = x2 * inv[:, None] * tl.load(gain_ptr + HALF + c)[None, :]
        if ROTATE:
            tab = b * s_cb + t[:, None] * D + c[None, :]
            cos1 = tl.load(cos_ptr + tab, mask=rows[:, None], other=0.0).to(tl.float32)
            cos2 = tl.load(cos_ptr + tab + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
            sin1 = tl.load(sin_ptr + tab, mask=rows[:, None], other=0.0).to(tl.float32)
            sin2 = tl.load(sin_ptr + tab + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
            x1, x2 = x1 * cos1 + x2 * sin1, x2 * cos2 + x1 * sin2
        if MODE == 1:
            x1 += tl.load(q_at, mask=rows[:, None], other=0.0).to(tl.float32)
            x2 += tl.load(q_at + HALF, mask=rows[:, None], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def read_kernel(
    out_ptr, res_ptr, q_ptr, pre_ptr, low_ptr, up_ptr, gain_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, mask_ptr, gate_ptr,
    q_sb, q_sn, q_st, T, S1, n_heads, group, s_cb, s_mb, scaling, eps,
    D: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, MODE: tl.constexpr, NORM: tl.constexpr,
    ROTATE: tl.constexpr, HAS_OUT: tl.constexpr, IN_PLACE: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, ZERO_SINK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Layouts (contiguous unless strides are given): q (B, n, T, D) with strides q_sb, q_sn, q_st (its last dense;
    # read in modes 0 and 1 only); q_pre (B, T, n*D); low (B, T, R); up (n*D, R); cos, sin (B or 1, T, D); k, v
    # (B, n/group, S1, D); mask (B or 1, S1), its rows s_mb apart; out (B, T, n, D); the result as out (res_ptr is
    # out_ptr where IN_PLACE), or (B, n, T, D) without it. MODE 0: the base's finished queries; 1: plus the
    # adapter's change rotated alone (after the q-norm); 2: the q projection's output plus the change, normed and
    # rotated (before it).
    b = tl.program_id(1) // n_heads
    h = tl.program_id(1) % n_heads
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = t < T
    dd = tl.arange(0, D)
    q_at = q_ptr + b * q_sb + h * q_sn + t[:, None] * q_st + tl.arange(0, D // 2)[None, :]
    kv = (b * (n_heads // group) + h // group) * S1
    if ZERO_SINK:
        # The last slot is the sink, a zero key and value: its score is its bias alone and it adds nothing to the
        # read, only to the softmax's sum, so it starts the sums instead of taking a step of its own (128 slots +
        # the sink were three steps of 64, the last with one live slot).
        sink = tl.load(mask_ptr + b * s_mb + S1 - 1).to(tl.float32)
        s_end = S1 - 1
        # A row whose slots were never written (all biases -inf: a fresh state's first segment) has only the sink
        # to attend to, whose value is zero: its read is exactly zero, so its program builds no query and reads no
        # slot (in place, it writes nothing either).
        top = tl.max(tl.load(mask_ptr + b * s_mb + tl.arange(0, BLOCK_S), mask=tl.arange(0, BLOCK_S) < s_end,
                             other=float("-inf")).to(tl.float32), axis=0)
        for s0 in range(BLOCK_S, s_end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            top = tl.maximum(top, tl.max(tl.load(mask_ptr + b * s_mb + s, mask=s < s_end, other=float("-inf"))
                                         .to(tl.float32), axis=0))
        filled = top > float("-inf")
    else:
        s_end = S1
        filled = S1 > 0
    if filled:
        x1, x2 = build_query(q_at, pre_ptr, low_ptr, up_ptr, gain_ptr, cos_ptr, sin_ptr, b, h, t, rows, T, n_heads,
                             s_cb, eps, D, R, RP, MODE, NORM, ROTATE, UPCAST, PRECISION)
        # the query in the slots' dtype, as the eager read hands it to SDPA
        q1 = x1.to(k_ptr.dtype.element_ty)
        q2 = x2.to(k_ptr.dtype.element_ty)
        if UPCAST:  # the interpreter's dot is wrong for 16-bit operands
            q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
        if ZERO_SINK:
            m0 = tl.maximum(sink, -1.0e30)
            m_i = tl.zeros((BLOCK_T,), tl.float32) + m0
            l_i = tl.zeros((BLOCK_T,), tl.float32) + tl.exp(sink - m0)
        else:
            m_i = tl.full((BLOCK_T,), -1.0e30, tl.float32)  # finite: a step whose slots are all masked adds nothing
            l_i = tl.zeros((BLOCK_T,), tl.float32)
        # one pass with an online softmax, the whole (BLOCK_T, D) accumulator held (a two-pass variant holding a half
        # or a quarter of it, the softmax's sums first, was slower on the H200: results/session17/kernel/)
        acc = tl.zeros((BLOCK_T, D), tl.float32)
        for s0 in range(0, s_end, BLOCK_S):
            scores, s, live = slot_scores(q1, q2, k_ptr, mask_ptr, kv, b * s_mb, s0, s_end, scaling, D, BLOCK_S,
                                          UPCAST, PRECISION)
            vv = tl.load(v_ptr + (kv + s[:, None]) * D + dd[None, :], mask=live[:, None], other=0.0)
            if UPCAST:
                vv = vv.to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
            m_i = m_new
        store_read(acc / l_i[:, None], dd, out_ptr, res_ptr, gate_ptr, b, h, t, rows, T, n_heads, D, HAS_OUT)
    elif not IN_PLACE:
        store_read(tl.zeros((BLOCK_T, D), tl.float32), dd, out_ptr, res_ptr, gate_ptr, b, h, t, rows, T, n_heads, D,
                   HAS_OUT)


@triton.jit
def token_scores_kernel(h_ptr, w_ptr, b_ptr, out_ptr, ROWS, H, eps, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # h (L, ROWS, H) any float dtype, w (L, H) and b (L,) fp32 -> out (L, ROWS) fp32: (h . w) / rms(h) + b, one pass
    layer = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < ROWS
    dot = tl.zeros((BLOCK_R,), tl.float32)
    sq = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, H, BLOCK_H):
        c = c0 + tl.arange(0, BLOCK_H)
        x = tl.load(h_ptr + (layer * ROWS + r[:, None]) * H + c[None, :], mask=live[:, None] & (c[None, :] < H),
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + layer * H + c, mask=c < H, other=0.0)
        dot += tl.sum(x * w[None, :], axis=1)
        sq += tl.sum(x * x, axis=1)
    score = dot / tl.sqrt(sq / H + eps) + tl.load(b_ptr + layer)
    tl.store(out_ptr + layer * ROWS + r, score, mask=live)


@triton.jit
def write_rows_kernel(mem_ptr, h_ptr, window_ptr, token_ptr, new_ptr, m_sb, m_sl, m_ss, B, L, S, T, K, D,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # new (B, L, S, D) row (b, l, j) = mem[b, l, w] if w < S else h[l, b, token[l, b, w - S]] (zeros where that
    # token is -1), w = window[l, b, j]: the slots kept and the tokens written, gathered in one pass
    g = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # output rows in (b, l, j) order
    live = g < B * L * S
    j = g % S
    lb = g // S
    l_ = lb % L
    b = lb // L
    w = tl.load(window_ptr + (l_ * B + b) * S + j, mask=live, other=0)
    from_mem = w < S
    e = tl.where(from_mem, 0, w - S)
    token = tl.load(token_ptr + (l_ * B + b) * K + e, mask=live & ~from_mem, other=-1)
    mem_row = b.to(tl.int64) * m_sb + l_ * m_sl + w * m_ss
    h_row = ((l_ * B + b).to(tl.int64) * T + token) * D
    take_h = live & ~from_mem & (token >= 0)
    for c0 in range(0, D, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        cols = c[None, :] < D
        x = tl.load(mem_ptr + mem_row[:, None] + c[None, :], mask=(live & from_mem)[:, None] & cols, other=0.0)
        y = tl.load(h_ptr + h_row[:, None] + c[None, :], mask=take_h[:, None] & cols, other=0.0)
        val = tl.where(from_mem[:, None], x.to(tl.float32), y.to(tl.float32))
        tl.store(new_ptr + g.to(tl.int64)[:, None] * D + c[None, :], val.to(new_ptr.dtype.element_ty),
                 mask=live[:, None] & cols)
