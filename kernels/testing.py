"""Correctness checks of the Triton kernels against float64 torch references, shared by the tests
and `rsscale kernels test` (the CPU path of the benchmark). Each check returns the max error per
output/gradient, already scaled so that one tolerance per dtype applies."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from kernels.dispatch import module

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@contextlib.contextmanager
def nan_poisoned_allocations():
    """Every float tensor from torch.empty/empty_like starts as NaN, so unwritten elements show."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **k: fill(empty(*a, **k))), mock.patch.object(
        torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k))
    ):
        yield


def scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / (1 + max |ref|); inf when got has non-finite (e.g. unwritten) elements."""
    if got.shape != ref.shape or not torch.isfinite(got).all():
        return float("inf")
    return ((got.double() - ref).abs().max() / (1 + ref.abs().max())).item()


def _backward_errors(outputs, refs, inputs, ref_inputs, names, dtype) -> dict[str, float]:
    dy = torch.randn(refs.shape, dtype=torch.float64, device=refs.device).to(dtype)
    outputs.backward(dy)
    refs.backward(dy.double())
    errors = {"out": scaled_error(outputs, refs)}
    errors.update({n: scaled_error(a.grad, r.grad) for n, a, r in zip(names, inputs, ref_inputs)})
    return errors


def check_layer_norm(shape, k: int, dtype=torch.float32, device="cpu", seed=0, multi=True) -> dict[str, float]:
    """Triton multi-LN (K affine sets; or the single LN when multi=False, K=1) vs float64 torch."""
    fln = module("fused_layer_norm")
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    base = [
        torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5,
        1 + 0.5 * torch.randn(k, n, generator=gen, dtype=torch.float64),
        0.5 * torch.randn(k, n, generator=gen, dtype=torch.float64),
    ]
    ours = [t.to(device, dtype).requires_grad_() for t in base]
    ref = [t.to(device, dtype).double().requires_grad_() for t in base]
    if multi:
        y, y_ref = fln.triton_multi_layer_norm(*ours, 1e-6), fln.torch_multi_layer_norm(*ref, 1e-6)
    else:
        y = fln.triton_layer_norm(ours[0], ours[1][0], ours[2][0], 1e-6)
        y_ref = fln.torch_layer_norm(ref[0], ref[1][0], ref[2][0], 1e-6)
    if y.dtype != dtype:
        return {"out": float("inf")}
    return _backward_errors(y, y_ref, ours, ref, ("dx", "dweight", "dbias"), dtype)


def check_attention(shape, dtype=torch.float32, device="cpu", seed=0, qkv=None) -> dict[str, float]:
    """Triton flash attention vs an explicit float64 softmax; qkv overrides the random inputs."""
    fa = module("flash_attention")
    gen = torch.Generator().manual_seed(seed)
    if qkv is None:
        qkv = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    ours = [t.to(device, dtype).requires_grad_() for t in qkv]
    ref = [t.to(device, dtype).double().requires_grad_() for t in qkv]
    out, out_ref = fa.triton_attention(*ours), fa.naive_attention(*ref)
    return _backward_errors(out, out_ref, ours, ref, ("dq", "dk", "dv"), dtype)
