"""Fused kernels used by the ViT blocks, behind one switch.

Public API (the model calls only these; signatures are a contract):
    layer_norm(x, weight, bias, eps)            -> like F.layer_norm over the last dim
    multi_layer_norm(x, weights, biases, eps)   -> [K, *x.shape]: K affine sets on one read of x
    attention(q, k, v)                          -> softmax(q k^T / sqrt(d)) v, q/k/v [B, H, N, Dh]
    set_backend("triton" | "torch"), get_backend()

PLACEHOLDER: torch references only until the Triton kernels land (issue 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BACKEND = "torch"


def set_backend(name: str) -> None:
    global _BACKEND
    if name not in ("torch", "triton"):
        raise ValueError(f"kernels backend must be 'torch' or 'triton', not {name!r}")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def multi_layer_norm(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    normed = F.layer_norm(x, x.shape[-1:], None, None, eps)
    shape = (weights.shape[0],) + (1,) * (x.dim() - 1) + (x.shape[-1],)
    return normed.unsqueeze(0) * weights.view(shape) + biases.view(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)
