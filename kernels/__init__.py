"""Fused kernels used by the ViT blocks, behind one switch.

Public API (the model calls only these; signatures are a contract):
    layer_norm(x, weight, bias, eps)            -> like F.layer_norm over the last dim
    multi_layer_norm(x, weights, biases, eps)   -> [K, *x.shape]: K affine sets on one read of x
    attention(q, k, v)                          -> softmax(q k^T / sqrt(d)) v, q/k/v [B, H, N, Dh]
    set_backend("triton" | "torch"), get_backend()

The Triton kernels live in fused_layer_norm.py and flash_attention.py, each beside its torch
reference; dispatch.py decides per call which one runs (Triton on CUDA, the Triton interpreter
on CPU under TRITON_INTERPRET=1, torch otherwise). Importing this package never imports triton;
set TRITON_INTERPRET=1 before the first kernel call (triton reads it when the kernels are built).
"""

from __future__ import annotations

import torch

from rsscale.kernels.dispatch import get_backend, set_backend, use_triton
from rsscale.kernels.dispatch import module as _module

__all__ = ["layer_norm", "multi_layer_norm", "attention", "set_backend", "get_backend"]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ops = _module("fused_layer_norm")
    if use_triton(ops, x):
        return ops.triton_layer_norm(x, weight, bias, eps)
    return ops.torch_layer_norm(x, weight, bias, eps)


def multi_layer_norm(x: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    ops = _module("fused_layer_norm")
    if use_triton(ops, x):
        return ops.triton_multi_layer_norm(x, weights, biases, eps)
    return ops.torch_multi_layer_norm(x, weights, biases, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ops = _module("flash_attention")
    if use_triton(ops, q):
        return ops.triton_attention(q, k, v)
    return ops.torch_attention(q, k, v)
