"""ViT building blocks: the tensor-parallel parallel-branch block, patch embedding, sin-cos positions.

`ParallelBlock` is Touvron et al.'s parallel ViT block with K branches,
    x = x + sum_k attn_k(LN_k x);   x = x + sum_k mlp_k(LN'_k x),
whose linears are megatron-core's: qkv and fc1 are ColumnParallelLinear (rank r owns its heads /
its slice of the MLP), proj and fc2 are RowParallelLinear (input_is_parallel=True).

Branch fusion: the sum over branches commutes with the TP all-reduce, so each sublayer does ONE
collective for all K branches instead of K: the K LayerNorms run on one read of x
(`kernels.multi_layer_norm`), one copy-to-TP-region covers all K normed inputs (the Column
linears are built with `disable_grad_reduce=True`), and the K Row linears' partial outputs are
summed locally (`F.linear` on their weights) before one all-reduce / reduce-scatter; their biases
are added once after it. Parameters stay per branch (`attn.<k>.qkv.weight`, ...), each branch
holding exactly `scaling.config.branch_params` elements (TP=1).

Recompute (`recompute`): "full" checkpoints the whole block (only its input is kept; the block
runs again in backward); "selective" checkpoints only the attention core softmax(q k^T) v
(Megatron's selective mode: q, k, v are kept, the probabilities - or with a flash kernel its
log-sum-exp - are not, and the core runs again in backward); "none" keeps everything.

Sequence parallelism (`sequence_parallel=True`): x is this rank's token chunk [B, N/T, D]; see
`scaling.parallel.mappings` for the collectives and why the gradients are exact. Padding tokens
(added by the caller so the token count divides T) are dropped before attention and never
attended to; `n_tokens` tells the block how many tokens are real.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn
from torch.utils.checkpoint import checkpoint

from rsscale import kernels
from rsscale.scaling.parallel import mappings, state
from rsscale.scaling.spec.config import recompute_mode


def check_tp_divides(tp: int, what: str, **sizes: int) -> list[str]:
    """One sentence per size that the TP degree does not divide (empty list when all do)."""
    return [f"TP size {tp} does not divide {what} {name} = {n}" for name, n in sizes.items() if n % tp]


class _AttentionBranch(nn.Module):
    def __init__(self, width, qkv_bias, eps, config):
        super().__init__()
        init = nn.init.xavier_uniform_
        self.norm = nn.LayerNorm(width, eps=eps)
        # stride=3: rank r owns the q, k and v rows of its heads (the full weight is [q; k; v]).
        self.qkv = ColumnParallelLinear(width, 3 * width, config=config, init_method=init, bias=qkv_bias, gather_output=False, stride=3, disable_grad_reduce=True)
        self.proj = RowParallelLinear(width, width, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=True)

    def linears(self):
        return self.qkv, self.proj


class _MlpBranch(nn.Module):
    def __init__(self, width, mlp, eps, config):
        super().__init__()
        init = nn.init.xavier_uniform_
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc1 = ColumnParallelLinear(width, mlp, config=config, init_method=init, bias=True, gather_output=False, disable_grad_reduce=True)
        self.fc2 = RowParallelLinear(mlp, width, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=True)

    def linears(self):
        return self.fc1, self.fc2


class ParallelBlock(nn.Module):
    """K-branch pre-norm transformer block, tensor parallel over heads and MLP columns.

    forward(x, n_tokens=None, hw=None): x is [B, N, D] (or this rank's [B, N/T, D] chunk under
    sequence parallelism, of which only the first `n_tokens` gathered tokens are real);
    hw=(H, W) gives the token grid (no cls token) when window attention is on.
    recompute: "none" | "selective" | "full" (module doc).
    """

    def __init__(self, width, heads, mlp, branches=1, qkv_bias=True, eps=1e-6, config=None, sequence_parallel=False, window_size=None, recompute="none"):
        super().__init__()
        config = config or state.model_parallel_config()
        tp = config.tensor_model_parallel_size
        problems = check_tp_divides(tp, "the block's", heads=heads, width=width, mlp=mlp)
        if width % heads:
            problems.append(f"width {width} is not divisible by heads {heads}")
        if problems:
            raise ValueError("; ".join(problems))
        self.width, self.heads, self.branches, self.eps = width, heads, branches, eps
        self.tp, self.local_heads, self.head_dim = tp, heads // tp, width // heads
        self.sequence_parallel, self.window_size = sequence_parallel, window_size
        self.recompute = recompute_mode(recompute)
        self.attn = nn.ModuleList(_AttentionBranch(width, qkv_bias, eps, config) for _ in range(branches))
        self.mlp = nn.ModuleList(_MlpBranch(width, mlp, eps, config) for _ in range(branches))

    def forward(self, x, n_tokens=None, hw=None):
        if self.recompute == "full" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, n_tokens, hw, use_reentrant=False)
        return self._forward(x, n_tokens, hw)

    def _forward(self, x, n_tokens, hw):
        x = x + self._sublayer(x, self.attn, n_tokens, lambda a: self._attention(a, hw))
        x = x + self._sublayer(x, self.mlp, n_tokens, self._mlp)
        return x

    def _sublayer(self, x, branches, n_tokens, body):
        """LN_k(x) -> Column_k on all tokens (in the TP region) -> body: sum_k of the Row_k
        partial outputs -> one all-reduce (or reduce-scatter under SP) + the summed Row biases."""
        cols, rows = zip(*(br.linears() for br in branches))
        w = _stack([br.norm.weight for br in branches])
        b = _stack([br.norm.bias for br in branches])
        bias = _sum([row.bias for row in rows])
        wdt = cols[0].weight.dtype  # 16-bit weights (--precision bf16): the Column linears take 16-bit inputs
        if not self.sequence_parallel:
            h = mappings.copy_to_tensor_model_parallel_region(kernels.multi_layer_norm(x, w, b, self.eps).to(wdt))
            # F.linear on each Column shard: the TP-region copy above serves all branches, so
            # megatron's linear function would add only its per-call overhead and a separate bias add.
            a = _stack([F.linear(hk, col.weight, col.bias) for hk, col in zip(_unstack(h), cols)])  # [K, B, N, out/T]
            return mappings.reduce_from_tensor_model_parallel_region(body(a)) + bias
        # SP: x holds my N/T tokens; LN params see only those, so their grads are all-reduced.
        w, b = mappings.copy_to_tensor_model_parallel_region(w), mappings.copy_to_tensor_model_parallel_region(b)
        h = kernels.multi_layer_norm(x, w, b, self.eps).to(wdt)  # [K, B, N/T, D]
        N = x.shape[1] * self.tp
        n = N if n_tokens is None else n_tokens
        a = mappings.gather_column_linears(h, n, cols)  # real tokens only: padding never attended
        partial = F.pad(body(a), (0, 0, 0, N - n))
        return mappings.reduce_scatter_to_sequence_parallel_region(partial) + mappings.copy_to_tensor_model_parallel_region(bias)

    def _mlp(self, a):
        """a: [K, B, n, M/T] fc1 outputs -> sum_k fc2_k(gelu(a_k)) before the TP reduction."""
        return _sum([F.linear(F.gelu(ak), br.fc2.weight) for ak, br in zip(_unstack(a), self.mlp)])

    def _attention(self, qkv, hw):
        """qkv: [K, B, n, 3D/T] (my heads' q, k, v) -> sum_k proj_k(attn_k) before the TP reduction."""
        K = qkv.shape[0]
        if self.window_size:
            # ViTDet pads the normed tokens with zeros before the qkv linear, so padded tokens
            # carry q = k = v = qkv bias: partition (qkv - bias) with zero padding, add it back.
            bias = 0 if self.attn[0].qkv.bias is None else torch.stack([br.qkv.bias for br in self.attn]).view(K, 1, 1, -1)
            windows, pad_hw = window_partition((qkv - bias).flatten(0, 1), hw, self.window_size)
            qkv = windows.unflatten(0, (K, -1)) + bias
        Bw, L = qkv.shape[1], qkv.shape[2]
        q, k, v = qkv.reshape(K * Bw, L, 3, self.local_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        grid = (self.window_size,) * 2 if self.window_size else hw
        if self.recompute == "selective" and torch.is_grad_enabled():
            q, k, v = _autocast_copies(q, k, v)
            o = checkpoint(self._attend, q, k, v, grid, use_reentrant=False)
        else:
            o = self._attend(q, k, v, grid)
        o = o.transpose(1, 2).reshape(K, Bw, L, -1)
        out = _sum([F.linear(oj, br.proj.weight) for oj, br in zip(_unstack(o), self.attn)])
        if self.window_size:
            out = window_unpartition(out, self.window_size, pad_hw, hw)
        return out

    def _attend(self, q, k, v, grid):
        """softmax(q k^T / sqrt(d)) v for q, k, v [K*B', heads/T, L, d] (branch-major) on a token
        grid (H, W) (None without one); the hook where a subclass adds a position bias."""
        return kernels.attention(q, k, v)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without its copy for one branch."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _unstack(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The branches of [K, ...] as views: unbind (its backward is one stack; indexing each branch
    would zero-fill the whole tensor per branch in backward), a squeeze for one branch (whose
    backward copies nothing)."""
    return (t.squeeze(0),) if t.shape[0] == 1 else t.unbind(0)


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The branches' sum (no 0 + t for one branch)."""
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


def _autocast_copies(*tensors):
    """The 16-bit copies autocast would make of attention's inputs, made before a checkpoint so
    that it keeps those (as attention itself would) and not the fp32 qkv (same values)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def window_partition(x: torch.Tensor, hw, window: int):
    """[B, H*W, C] tokens on an (H, W) grid -> [B*nW, window*window, C] windows (zero-padded
    to multiples of the window, as ViTDet does), plus the padded grid size."""
    if hw is None:
        raise ValueError("window attention needs the token grid hw=(H, W) in forward")
    H, W = hw
    B, N, C = x.shape
    if N != H * W:
        raise ValueError(f"window attention got {N} tokens but the grid {H}x{W} has {H * W} (window blocks take no cls token)")
    x = x.view(B, H, W, C)
    ph, pw = -H % window, -W % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, window: int, pad_hw, hw) -> torch.Tensor:
    """Inverse of `window_partition`: [B*nW, window*window, C] -> [B, H*W, C] (padding cropped)."""
    (Hp, Wp), (H, W) = pad_hw, hw
    C = windows.shape[-1]
    x = windows.view(-1, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, Hp, Wp, C)[:, :H, :W]
    return x.reshape(-1, H * W, C)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, as a strided conv (same numel as a linear on
    flattened patches: in_chans*p*p*width + width); works for any image size divisible by p."""

    def __init__(self, patch_size: int, in_chans: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)
        nn.init.xavier_uniform_(self.proj.weight.view(width, -1))  # as a linear layer (MAE)
        nn.init.zeros_(self.proj.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if imgs.shape[-1] % self.patch_size or imgs.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(imgs.shape[-2:])} is not a multiple of the patch size {self.patch_size}")
        return self.proj(imgs).flatten(2).transpose(1, 2)  # [B, H*W, D]


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position table [(1 +) H*W, dim]: half the channels encode the column,
    half the row (MAE's layout), each as [sin, cos] of position * 10000^(-i/(dim/4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos):
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([encode(cols), encode(rows)], dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def init_fixed_(param: torch.Tensor, table: torch.Tensor) -> None:
    """Copy a fixed table into a (requires_grad=False) parameter; no-op on the meta device."""
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(table.reshape(param.shape))
    param.requires_grad_(False)

