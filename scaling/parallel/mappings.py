"""Sequence-parallel collectives, as small autograd Functions named by their contract.

Hidden states are [B, N, D] (batch first); under sequence parallelism (SP) each TP rank holds
the tokens [B, N/T, D] of its rank (N a multiple of T; the model pads, see vit.py/mae.py).

    scatter_to_sequence_parallel_region(x)        fwd: keep my token chunk   bwd: all-gather
    gather_from_sequence_parallel_region(x, tp_grad=True)
                                                  fwd: all-gather tokens     bwd: reduce-scatter
                                                  (tp_grad=False:            bwd: keep my chunk)
    reduce_scatter_to_sequence_parallel_region(x) fwd: reduce-scatter       bwd: all-gather
    copy_to_tensor_model_parallel_region(x)       fwd: identity              bwd: all-reduce
    reduce_from_tensor_model_parallel_region(x)   fwd: all-reduce            bwd: identity
(the last two are megatron-core's, re-exported so the model imports every collective from here).

Why the gradients are exact (megatron's linears are built with sequence_parallel=False; under
SP the block uses only their weights). A block sublayer under SP runs
    x_r (my tokens) -> K LayerNorms -> gather_column_linears: all-gather the tokens and apply the
      K Column weights of my heads -> attention/MLP -> sum of the K Row partial outputs
      -> reduce-scatter (my tokens, summed over ranks) -> + x_r.
The input gradient of the gathered Column matmul on rank r is only the part that flows through
rank r's heads; summing those partial grads over ranks and keeping rank r's tokens - a
reduce-scatter - gives the exact grad of x_r. The reduce-scatter's backward is an all-gather:
every rank's partial sum received the same upstream grad. Parameters used on token shards only
(the LayerNorms inside blocks and the Row biases, added after the reduce-scatter) would get
grads from their own tokens only; the block routes them through
`copy_to_tensor_model_parallel_region` (identity forward, all-reduce of the tiny grad in
backward), so every rank ends `backward()` with the full gradient - no extra "sequence-parallel
grad sync" step is needed in the trainer. When the SP region ends (gather before a replicated
computation, e.g. the final norm) every rank computes the same thing and holds the full upstream
grad, so `tp_grad=False` keeps its chunk.

Memory: like megatron's native SP, `gather_column_linears` saves only this rank's token chunk of
the normed input and all-gathers it again in backward for the weight gradient, so no all-token
activation stays alive between forward and backward; LayerNorm inputs and residuals live on N/T
tokens too. SP saves activation memory, not communication.

Communication per block sublayer, activations of size A = B*N*D per rank (ring algorithms,
padding tokens included):
    TP only (megatron, non-SP):   fwd all-reduce (2A)                bwd all-reduce (2A)
    megatron native SP:           fwd all-gather + reduce-scatter    bwd all-gather (of the grad)
                                  (A + A)                            + re-gather of the input
                                                                     + reduce-scatter (3A)
    ours:                         the same as megatron's native SP when the backend has
                                  reduce_scatter (gloo in recent torch and nccl do); otherwise
                                  each reduce-scatter falls back to all-reduce + keep-my-chunk
                                  (2A instead of A); plus a few all-reduces of K*D-sized
                                  LayerNorm/bias grads per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import mappings as _mcore

from rsscale.scaling.parallel import state

TOKEN_DIM = 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """megatron-core's, on our TP group (given explicitly: without it megatron warns on every call)."""
    return _mcore.copy_to_tensor_model_parallel_region(x, group=state.tp_group())


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """megatron-core's, on our TP group (as above)."""
    return _mcore.reduce_from_tensor_model_parallel_region(x, group=state.tp_group())
# torch >= 2.10 renamed reduce_scatter_tensor (the old name warns); same signature.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "gather_column_linears",
    "pad_tokens",
]


def _check_divisible(x: torch.Tensor, size: int) -> None:
    if x.shape[TOKEN_DIM] % size:
        raise ValueError(f"sequence parallelism needs the token count {x.shape[TOKEN_DIM]} to be a multiple of the TP size {size}; pad with pad_tokens() first")


def _split(x: torch.Tensor) -> torch.Tensor:
    size = state.tp_size()
    if size == 1:
        return x
    _check_divisible(x, size)
    return x.chunk(size, dim=TOKEN_DIM)[state.tp_rank()].contiguous()


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    size = state.tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=state.tp_group())
    return torch.cat(parts, dim=TOKEN_DIM)


class _Done:
    """The handle of a collective that already finished."""

    def wait(self):
        return True


def reduce_scatter_tensor(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """Sum `x` over `group` and keep this rank's dim-0 chunk in `out` (which may be that chunk of
    `x` itself); returns the work handle when async. Backends without reduce_scatter fall back to
    an all-reduce + keep-my-chunk (synchronous, twice the traffic)."""
    try:
        return _REDUCE_SCATTER(out, x, group=group, async_op=async_op)
    except (RuntimeError, NotImplementedError):
        dist.all_reduce(x, group=group)
        out.copy_(x.chunk(dist.get_world_size(group), dim=0)[dist.get_rank(group)])
        return _Done() if async_op else None


def _reduce_scatter(x: torch.Tensor) -> torch.Tensor:
    size = state.tp_size()
    if size == 1:
        return x
    _check_divisible(x, size)
    # reduce_scatter_tensor splits along dim 0: move tokens there and back.
    xt = x.transpose(0, TOKEN_DIM).contiguous()
    out = torch.empty((xt.shape[0] // size,) + xt.shape[1:], dtype=x.dtype, device=x.device)
    reduce_scatter_tensor(out, xt, state.tp_group())
    return out.transpose(0, TOKEN_DIM).contiguous()


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    """fwd: keep my token chunk of a replicated tensor; bwd: all-gather the chunks' grads."""

    @staticmethod
    def forward(ctx, x):
        return _split(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    """fwd: all-gather tokens; bwd: reduce-scatter (consumer is TP-parallel) or keep my chunk."""

    @staticmethod
    def forward(ctx, x, tp_grad):
        ctx.tp_grad = tp_grad
        return _all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return (_reduce_scatter(grad) if ctx.tp_grad else _split(grad)), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """fwd: sum the ranks' partial outputs and keep my tokens; bwd: all-gather."""

    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad)


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(x: torch.Tensor, tp_grad: bool = True) -> torch.Tensor:
    """tp_grad=True when the gathered tensor feeds TP-parallel layers (partial grads per rank);
    False when it feeds replicated computation (every rank holds the full grad)."""
    return _GatherFromSequenceParallelRegion.apply(x, tp_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceScatterToSequenceParallelRegion.apply(x)


class _GatherColumnLinears(torch.autograd.Function):
    """y_k = gather_tokens(x)[k, :, :n] @ W_k^T + b_k for K stacked inputs x [K, B, N/T, D].

    Like megatron's native SP linear: only x's token chunk is saved and the all-gather is redone
    in backward, so no all-token activation is kept alive between forward and backward. The input
    gradient (partial: this rank's output columns only) is padded back to N tokens and
    reduce-scattered. Backward computes in the gradient's dtype (autocast-safe).
    """

    @staticmethod
    def forward(ctx, x, n_tokens, *params):  # params: W_0, b_0, W_1, b_1, ... (a b_k may be None)
        ctx.n_tokens = n_tokens
        ctx.save_for_backward(x, *params)
        full = _gather_stacked(x, n_tokens)
        return torch.stack([F.linear(full[k], params[2 * k], params[2 * k + 1]) for k in range(x.shape[0])])

    @staticmethod
    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        full = _gather_stacked(x, ctx.n_tokens).to(grad.dtype)
        dx, dparams = [], []
        for k in range(x.shape[0]):
            w, b, g = params[2 * k], params[2 * k + 1], grad[k]
            dx.append(g @ w.to(g.dtype))
            dparams.append((g.flatten(0, 1).t() @ full[k].flatten(0, 1)).to(w.dtype))
            dparams.append(None if b is None else g.sum((0, 1)).to(b.dtype))
        dx = torch.stack(dx)
        dx = F.pad(dx, (0, 0, 0, x.shape[2] * state.tp_size() - ctx.n_tokens))
        dx = _reduce_scatter(dx.flatten(0, 1)).unflatten(0, x.shape[:2]).to(x.dtype)
        return (dx, None, *dparams)


def _gather_stacked(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[K, B, N/T, D] token chunks -> [K, B, n_tokens, D] (all ranks' tokens, padding dropped)."""
    return _all_gather(x.flatten(0, 1))[:, :n_tokens].unflatten(0, x.shape[:2])


def gather_column_linears(x: torch.Tensor, n_tokens: int, linears) -> torch.Tensor:
    """Under SP: K Column-parallel linears (their `.weight`, `.bias`) applied to the all-gathered
    tokens of x [K, B, N/T, D], keeping the first n_tokens -> [K, B, n_tokens, out/T]."""
    params = [t for lin in linears for t in (lin.weight, lin.bias)]
    return _GatherColumnLinears.apply(x, n_tokens, *params)


def pad_tokens(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the token dimension up to a multiple (SP needs N % T == 0)."""
    extra = -x.shape[TOKEN_DIM] % multiple
    if not extra:
        return x
    pad = x.new_zeros(x.shape[:TOKEN_DIM] + (extra,) + x.shape[TOKEN_DIM + 1 :])
    return torch.cat([x, pad], dim=TOKEN_DIM)
