"""Flash attention (non-causal): softmax(q k^T / sqrt(d)) v without materialising the scores.

Forward: each program owns BLOCK_M queries of one (batch, head) and streams the keys in blocks of
BLOCK_N, keeping a running max and sum (online softmax, base-2 exponentials); it writes the output
and the log-sum-exp per query, which is all the backward needs.
Backward: delta = rowsum(dO * O) (preprocess), then the probabilities are recomputed per block
from q, k and the saved log-sum-exp: one kernel owns a key block and loops over queries (dk, dv),
another owns a query block and loops over keys (dq), so no atomics are needed.

Any sequence length (ragged query and key tails are masked) and any head dim up to 256 (the head
dim is padded to a power of two with masked loads, so 24 or 48 work as well as 64 and 128).
Windowed attention (ViTDet) is the same call on a batch of windows.

Import note: triton reads TRITON_INTERPRET when the kernels below are decorated, i.e. when this
module is first imported; kernels/dispatch.py imports it lazily for that reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: only the torch references below are usable (kernels/dispatch.py)
    from rsscale.kernels._no_triton import tl, triton

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# Triton kernels. q/k/v are [B, H, N, D] with arbitrary strides (s?b, s?h, s?n, s?d); outputs and
# gradients are contiguous [B, H, N, D] (strides sob...); lse/delta are [B*H, N] fp32.
# H, N, D are the arguments n_heads, seq_len, head_dim.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _program_block(seq_len, BLOCK: tl.constexpr):
    """(b * H + h, first row of this program's block) from a 1D grid of cdiv(N, BLOCK) * B * H
    programs, blocks of one head adjacent (they share K/V in cache). 1D because CUDA's second
    grid axis stops at 65535, fewer than B * H can be for window attention. Both come back as
    int64, so every offset derived from them (b * stride_b, row * stride_n) is computed in 64 bits:
    Triton passes strides below 2**31 as i32, and their products wrap past 2**31 elements."""
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(seq_len, BLOCK)
    return pid // n_blocks, (pid % n_blocks) * BLOCK


@triton.jit
def _load_tile(base, rows, offs_d, stride_n, stride_d, seq_len, head_dim):
    """The [rows, BLOCK_D] tile of one head's [N, D] matrix; rows >= N and columns >= D read 0."""
    mask = (rows[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, offs_d, stride_n, stride_d, seq_len, head_dim, value):
    mask = (rows[:, None] < seq_len) & (offs_d[None, :] < head_dim)
    tl.store(base + rows[:, None] * stride_n + offs_d[None, :] * stride_d, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _recompute(q, k, v, do, lse, delta, valid, sm_scale, DOT_PRECISION: tl.constexpr):
    """Backward of one [queries, keys] block: probabilities p = exp(s - lse) and score gradients
    ds = p * (dO v^T - delta); pairs that are not `valid` (ragged tails) get 0."""
    p = tl.exp(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale - lse[:, None])
    p = tl.where(valid, p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
    return p, ds


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # [B, H, N, D] inputs
    O,  # [B, H, N, D] output, strides (sob, soh, son, sod)
    LSE,  # [B*H, N] fp32 log-sum-exp (natural log) of the scaled scores per query
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    n_heads, seq_len, head_dim,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (see _dot_precision)
):
    bh, start = _program_block(seq_len, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    rows = start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd, seq_len, head_dim)
    qk_scale = sm_scale * 1.4426950408889634  # fold log2(e) in: exp(x) = exp2(x * log2 e)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + b * skb + h * skh, cols, offs_d, skn, skd, seq_len, head_dim)
        v = _load_tile(V + b * svb + h * svh, cols, offs_d, svn, svd, seq_len, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(cols[None, :] < seq_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    _store_tile(O + b * sob + h * soh, rows, offs_d, son, sod, seq_len, head_dim, acc / l_i[:, None])
    tl.store(LSE + bh * seq_len + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=rows < seq_len)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # [B, H, N, D] output and its gradient, contiguous
    Delta,  # [B*H, N] fp32: rowsum(dO * O)
    sb, sh, sn, sd,
    n_heads, seq_len, head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh, start = _program_block(seq_len, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    rows = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * sb + h * sh, rows, offs_d, sn, sd, seq_len, head_dim).to(tl.float32)
    do = _load_tile(DO + b * sb + h * sh, rows, offs_d, sn, sd, seq_len, head_dim).to(tl.float32)
    tl.store(Delta + bh * seq_len + rows, tl.sum(o * do, axis=1), mask=rows < seq_len)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # [B, H, N, D] inputs
    DO,  # [B, H, N, D] output gradient, contiguous
    DK, DV,  # [B, H, N, D] key/value gradients, contiguous
    LSE, Delta,  # [B*H, N] fp32 from forward / preprocess
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    n_heads, seq_len, head_dim,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (see _dot_precision)
):
    """One key block: dv = sum_q p^T dO, dk = sum_q ds^T q * scale."""
    bh, start = _program_block(seq_len, BLOCK_N)
    b, h = bh // n_heads, bh % n_heads
    cols = start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * skb + h * skh, cols, offs_d, skn, skd, seq_len, head_dim)
    v = _load_tile(V + b * svb + h * svh, cols, offs_d, svn, svd, seq_len, head_dim)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, seq_len, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd, seq_len, head_dim)
        do = _load_tile(DO + b * sob + h * soh, rows, offs_d, son, sod, seq_len, head_dim)
        lse = tl.load(LSE + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
        delta = tl.load(Delta + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
        p, ds = _recompute(q, k, v, do, lse, delta, rows[:, None] < seq_len, sm_scale, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    _store_tile(DK + b * sob + h * soh, cols, offs_d, son, sod, seq_len, head_dim, dk * sm_scale)
    _store_tile(DV + b * sob + h * soh, cols, offs_d, son, sod, seq_len, head_dim, dv)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # [B, H, N, D] inputs
    DO,  # [B, H, N, D] output gradient, contiguous
    DQ,  # [B, H, N, D] query gradient, contiguous
    LSE, Delta,  # [B*H, N] fp32 from forward / preprocess
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    n_heads, seq_len, head_dim,
    sm_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (see _dot_precision)
):
    """One query block: dq = sum_k ds k * scale."""
    bh, start = _program_block(seq_len, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    rows = start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, offs_d, sqn, sqd, seq_len, head_dim)
    do = _load_tile(DO + b * sob + h * soh, rows, offs_d, son, sod, seq_len, head_dim)
    lse = tl.load(LSE + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
    delta = tl.load(Delta + bh * seq_len + rows, mask=rows < seq_len, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, seq_len, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + b * skb + h * skh, cols, offs_d, skn, skd, seq_len, head_dim)
        v = _load_tile(V + b * svb + h * svh, cols, offs_d, svn, svd, seq_len, head_dim)
        p, ds = _recompute(q, k, v, do, lse, delta, cols[None, :] < seq_len, sm_scale, DOT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    _store_tile(DQ + b * sob + h * soh, rows, offs_d, son, sod, seq_len, head_dim, dq * sm_scale)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention expects q, k, v of one shape [B, H, N, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention expects one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        raise ValueError("bf16 attention needs a GPU: the Triton interpreter computes bf16 dots wrongly; use fp32 or fp16 on CPU")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention head dim {q.shape[-1]} exceeds the kernel's maximum {MAX_HEAD_DIM}")


def _config(head_dim: int, device: torch.device) -> dict:
    """Tile sizes: 128x64 tiles on a GPU (smaller for wide heads), 32x32 under the interpreter
    so that tests on short sequences still cross block boundaries."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=2)


def _bwd_config(head_dim: int, device: torch.device) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4 if block_d <= 64 else 8, num_stages=2)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 ("ieee"): Triton's default on NVIDIA GPUs is TF32, which
    would make `--precision fp32 --kernels triton` silently less precise than the torch path.
    16-bit inputs keep the default (the setting only concerns fp32 operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attn_forward(q, k, v):
    """-> (out [B, H, N, D] contiguous, lse [B*H, N] fp32). q, k, v may be strided views."""
    _check(q, k, v)
    bsz, heads, n, d = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz * heads, n), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    cfg = _config(d, q.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]) * bsz * heads,)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), heads, n, d,
        1.0 / math.sqrt(d), DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )
    return o, lse


def attn_backward(do, q, k, v, o, lse):
    """-> (dq, dk, dv), contiguous. o (contiguous) and do share the output strides."""
    bsz, heads, n, d = q.shape
    do = do.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((bsz * heads, n), dtype=torch.float32, device=q.device)
    cfg = _bwd_config(d, q.device)
    dots = dict(DOT_PRECISION=_dot_precision(q.dtype))
    _attn_bwd_preprocess_kernel[(triton.cdiv(n, cfg["BLOCK_M"]) * bsz * heads,)](
        o, do, delta, *o.stride(), heads, n, d, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"]
    )
    args = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), heads, n, d, 1.0 / math.sqrt(d))
    _attn_bwd_dkdv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]) * bsz * heads,)](
        q, k, v, do, dk, dv, lse, delta, *args, **cfg, **dots
    )
    _attn_bwd_dq_kernel[(triton.cdiv(n, cfg["BLOCK_M"]) * bsz * heads,)](
        q, k, v, do, dq, lse, delta, *args, **cfg, **dots
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) v; saves only the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = attn_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return attn_backward(do, q, k, v, o, lse)


def triton_attention(q, k, v) -> torch.Tensor:
    return FlashAttentionFunction.apply(q, k, v)


# ---------------------------------------------------------------------------------------------
# Torch references (the "torch" backend and the tests' ground truth)
# ---------------------------------------------------------------------------------------------


def torch_attention(q, k, v) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def naive_attention(q, k, v) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v, usable in float64 (the tests' reference)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v
