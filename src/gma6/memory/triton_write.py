"""The tokens write's two passes over a segment as Triton kernels (``GMA6Config.triton_write``).

Why: the batched write (``MemoryController._write_tokens_batched``) scores every token of every memory layer and keeps
the best as slots. Eagerly that is an fp32 copy of the segment's hidden states at every layer (8 x 1024 tokens x 640 x
17 layers: 356 MB on the H200), a norm and a matrix-vector product over it, then the slots' candidates concatenated,
gathered, masked and transposed: ~0.9 ms of GPU a segment, a third of what the memory added to a replayed segment. One
kernel scores the tokens from the hidden states as the base left them (one read, fp32 sums in registers), another
gathers each new slot from the old memory or from its token's hidden state straight into the state's layout.

Same maths as the eager write: the slots are the same values (a bf16 hidden state is exact in fp32), the scores the
same sums in another order (so a near-tie between two tokens' scores may rank them the other way). No autograd:
training takes the eager write.
"""
from __future__ import annotations

import functools

import torch

from .triton_read import available, interpreting

# tokens (or slots) a program takes, and the hidden size a step of its loop takes
BLOCK_ROWS = 32
BLOCK_WIDTH = 128


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take a write of these tensors: triton present, on CUDA (or its interpreter), no
    autograd."""
    return (available() and all(t.is_cuda or interpreting() for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


@functools.cache
def _kernels():
    from .triton_kernels import token_scores_kernel, write_rows_kernel

    return token_scores_kernel, write_rows_kernel


def token_scores(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """h (L, B, T, H), weight (L, H), bias (L,) -> (L, B, T) fp32: ``(h . weight) / rms(h) + bias`` a token (the rms
    over H, with ``eps``)."""
    n_layers, b, t, width = h.shape
    h = h.contiguous()
    weight = weight.reshape(n_layers, width).float().contiguous()
    bias = bias.reshape(n_layers).float().contiguous()
    out = torch.empty((n_layers, b, t), dtype=torch.float32, device=h.device)
    grid = (_cdiv(b * t, BLOCK_ROWS), n_layers)
    _kernels()[0][grid](h, weight, bias, out, b * t, width, float(eps), BLOCK_R=BLOCK_ROWS, BLOCK_H=BLOCK_WIDTH)
    return out


def write_rows(memory: torch.Tensor, h: torch.Tensor, window: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The new slots (B, L, S, D) in ``memory``'s dtype: slot j of layer l, sample b is ``memory[b, l, w]`` where
    ``w = window[l, b, j] < S``, else the hidden state ``h[l, b, tokens[l, b, w - S]]`` (zeros where that is -1).
    memory (B, L, S, D) (any strides, its last dense), h (L, B, T, D), window (L, B, S), tokens (L, B, K)."""
    b, n_layers, s, d = memory.shape
    t = h.shape[2]
    if memory.stride(-1) != 1:
        memory = memory.contiguous()
    h, window, tokens = h.contiguous(), window.contiguous(), tokens.contiguous()
    new = torch.empty((b, n_layers, s, d), dtype=memory.dtype, device=memory.device)
    grid = (_cdiv(b * n_layers * s, BLOCK_ROWS),)
    _kernels()[1][grid](memory, h, window, tokens, new, memory.stride(0), memory.stride(1), memory.stride(2),
                        b, n_layers, s, t, tokens.shape[-1], d, BLOCK_R=BLOCK_ROWS, BLOCK_D=BLOCK_WIDTH)
    return new


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
