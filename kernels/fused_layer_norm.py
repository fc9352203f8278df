"""Fused LayerNorm over the last dimension, single and multi-affine ("multi-LN").

A parallel-branch block applies K LayerNorms with different affine parameters to the same x.
All K share mean and rstd, so one kernel reads x once and writes K outputs; the ordinary
LayerNorm is the K = 1 case of the same kernels (one place for the idea).

Forward: one program per row computes mean and rstd in fp32, writes y[k] = xhat * w[k] + b[k]
for every k, and saves mean/rstd for the backward.
Backward: with g = sum_k dy[k] * w[k], dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
dw[k] = sum_rows dy[k] * xhat and db[k] = sum_rows dy[k] are accumulated per program over a
chunk of rows (partial sums, no atomics) and reduced over programs in a second small kernel
(the design of the Triton LayerNorm tutorial, written for K affine sets).

Import note: triton reads TRITON_INTERPRET when the kernels below are decorated, i.e. when this
module is first imported; kernels/dispatch.py imports it lazily for that reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: only the torch references below are usable (kernels/dispatch.py)
    from rsscale.kernels._no_triton import tl, triton

MAX_WIDTH = 65536  # widest row one program holds (fp32 accumulators); enough for any preset


# ---------------------------------------------------------------------------------------------
# Triton kernels. Shapes in comments: M = n_rows, N = n_cols, K = n_sets (affine sets),
# P = programs of the backward. Pointer arguments are capitalised, sizes lower case.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ln_fwd_kernel(
    X,  # [M, N] input rows, row stride stride_x
    W,  # [K, N] affine weights (contiguous)
    B,  # [K, N] affine biases (contiguous)
    Y,  # [K, M, N] outputs (contiguous)
    Mean,  # [M] fp32, saved for backward
    Rstd,  # [M] fp32, saved for backward
    stride_x,
    n_rows,
    n_cols,
    n_sets,
    eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: K * M * N may pass 2**31 (i32 would wrap)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    xhat = xc * rstd
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)
    for k in range(n_sets):
        w = tl.load(W + k * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + k * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = xhat * w + b
        tl.store(Y + (row + k * n_rows) * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(
    X,  # [M, N] input rows, row stride stride_x
    W,  # [K, N] affine weights (contiguous)
    DY,  # [K, M, N] output gradients (contiguous)
    Mean,  # [M] fp32 from forward
    Rstd,  # [M] fp32 from forward
    DX,  # [M, N] input gradient (contiguous)
    DW_part,  # [P, K, N] fp32 per-program partial sums of dw
    DB_part,  # [P, K, N] fp32 per-program partial sums of db
    stride_x,
    n_rows,
    n_cols,
    n_sets,
    rows_per_program,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets, as in the forward
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    col_mask = cols < n_cols
    kn_mask = (ks[:, None] < n_sets) & col_mask[None, :]
    kn_offs = ks[:, None] * n_cols + cols[None, :]
    w = tl.load(W + kn_offs, mask=kn_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=col_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + ks[:, None] * n_rows * n_cols + row * n_cols + cols[None, :], mask=kn_mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(col_mask, (x - mean) * rstd, 0.0)
        g = tl.sum(dy * w, axis=0)  # dL/dxhat, summed over the n_sets affine sets
        c1 = tl.sum(xhat * g, axis=0) / n_cols
        c2 = tl.sum(g, axis=0) / n_cols
        dx = (g - (xhat * c1 + c2)) * rstd
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=col_mask)
        dw_acc += dy * xhat[None, :]
        db_acc += dy
    part = pid * n_sets * n_cols + kn_offs
    tl.store(DW_part + part, dw_acc, mask=kn_mask)
    tl.store(DB_part + part, db_acc, mask=kn_mask)


@triton.jit
def _sum_partials_kernel(
    Part,  # [P, L] fp32 partial sums (contiguous)
    Out,  # [L] reduced sums, in the parameter dtype
    n_parts,
    length,
    BLOCK_P: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows[:, None] < n_parts) & (cols[None, :] < length)
        acc += tl.load(Part + rows[:, None] * length + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < length)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> None:
    n = x.shape[-1]
    if weights.dim() != 2 or weights.shape != biases.shape or weights.shape[1] != n:
        raise ValueError(
            f"LayerNorm weights/biases must both be [K, {n}] for x of width {n}, "
            f"got {tuple(weights.shape)} and {tuple(biases.shape)}"
        )
    if n > MAX_WIDTH:
        raise ValueError(f"LayerNorm width {n} exceeds the fused kernel's maximum {MAX_WIDTH}")


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


def _backward_programs(m: int, device: torch.device) -> int:
    """Programs for the backward: two per SM on a GPU (more hide latency better, but each writes
    a [K, N] fp32 partial dw and db: 2 per SM keeps that traffic near 5-10% of the row traffic at
    preset shapes); a handful under the interpreter."""
    if device.type == "cuda":
        return min(m, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(m, 4)


def ln_forward(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, eps: float):
    """-> (y [K, *x.shape], x2d, mean [M], rstd [M])."""
    _check(x, weights, biases)
    n = x.shape[-1]
    x2d = x.reshape(-1, n)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape[0], weights.shape[0]
    weights, biases = weights.contiguous(), biases.contiguous()
    y = torch.empty((k, m, n), dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    if m > 0:
        _ln_fwd_kernel[(m,)](
            x2d, weights, biases, y, mean, rstd, x2d.stride(0), m, n, k, eps,
            BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
    return y.view((k,) + tuple(x.shape)), x2d, mean, rstd


def ln_backward(dy: torch.Tensor, x2d: torch.Tensor, weights: torch.Tensor, mean, rstd):
    """dy [K, *x.shape] -> (dx [M, N], dweights [K, N], dbiases [K, N])."""
    m, n = x2d.shape
    k = weights.shape[0]
    weights = weights.contiguous()
    dy = dy.reshape(k, m, n).contiguous()
    dx = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    dw = torch.empty((k, n), dtype=weights.dtype, device=x2d.device)
    db = torch.empty((k, n), dtype=weights.dtype, device=x2d.device)
    if m == 0:
        return dx, dw.zero_(), db.zero_()
    programs = _backward_programs(m, x2d.device)
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)
    dw_part = torch.empty((programs, k, n), dtype=torch.float32, device=x2d.device)
    db_part = torch.empty_like(dw_part)
    block_n = triton.next_power_of_2(n)
    _ln_bwd_kernel[(programs,)](
        x2d, weights, dy, mean, rstd, dx, dw_part, db_part, x2d.stride(0), m, n, k, rows_per_program,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_N=block_n, num_warps=_num_warps(block_n * k),
    )
    block_l = 128
    for part, out in ((dw_part, dw), (db_part, db)):
        _sum_partials_kernel[(triton.cdiv(k * n, block_l),)](
            part, out, programs, k * n, BLOCK_P=32, BLOCK_L=block_l, num_warps=4
        )
    return dx, dw, db


class MultiLayerNormFunction(torch.autograd.Function):
    """y[k] = LN(x) * weights[k] + biases[k]; backward sums dx over the K affine sets."""

    @staticmethod
    def forward(ctx, x, weights, biases, eps):
        y, x2d, mean, rstd = ln_forward(x, weights, biases, eps)
        ctx.save_for_backward(x2d, weights, mean, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weights, mean, rstd = ctx.saved_tensors
        dx, dw, db = ln_backward(dy, x2d, weights, mean, rstd)
        return dx.view(ctx.x_shape), dw, db, None


def triton_multi_layer_norm(x, weights, biases, eps: float = 1e-6) -> torch.Tensor:
    return MultiLayerNormFunction.apply(x, weights, biases, eps)


def triton_layer_norm(x, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    return MultiLayerNormFunction.apply(x, weight.unsqueeze(0), bias.unsqueeze(0), eps)[0]


# ---------------------------------------------------------------------------------------------
# Torch references (the "torch" backend and the tests' ground truth)
# ---------------------------------------------------------------------------------------------


def torch_layer_norm(x, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm in the input's dtype; 16-bit parameters (bf16 weights) are upcast to it, as CUDA
    autocast does (CPU LayerNorm refuses an fp32 input with bf16 parameters)."""
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)


def torch_multi_layer_norm(x, weights, biases, eps: float = 1e-6) -> torch.Tensor:
    if weights.shape[0] == 1:  # torch's own fused affine LayerNorm
        return torch_layer_norm(x, weights[0], biases[0], eps).unsqueeze(0)
    normed = F.layer_norm(x, x.shape[-1:], None, None, eps)
    shape = (weights.shape[0],) + (1,) * (x.dim() - 1) + (x.shape[-1],)
    return normed.unsqueeze(0) * weights.view(shape) + biases.view(shape)
