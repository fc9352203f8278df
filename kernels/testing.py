"""Correctness checks of the Triton kernels against float64 torch references, shared by the tests
and `rsscale kernels test` (the CPU path of the benchmark). Each check returns the max error per
output/gradient, already scaled so that one tolerance per dtype applies."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from rsscale.kernels.dispatch import module

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


FP32_BUFFERS = {"Mean", "Rstd", "LSE", "Delta", "DW_part", "DB_part", "Part"}
FLOAT_SCALARS = {"eps", "sm_scale"}


def compile_for_gpu(kernel, dtype: str, constexprs: dict, num_warps: int = 4, num_stages: int = 3, arch: int = 90):
    """Compile a kernel to a cubin for an sm_<arch> GPU on a machine without one (triton ships
    ptxas): catches what only the compiler rejects (types, layouts, shared memory), which the
    interpreter lets through. Needs a process without TRITON_INTERPRET=1 (triton's own library
    functions are built for the interpreter there); see compile_all_for_gpu. By the kernels' convention pointer arguments have capitalised
    names and hold `dtype` ("fp16", "bf16", "fp32") except the fp32 statistics buffers; lower-case
    arguments are i32 sizes and strides, or fp32 scalars."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(kernel.fn)  # also when TRITON_INTERPRET=1 made `kernel` an interpreted one
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def compile_all_for_gpu(arch: int = 90) -> list[str]:
    """Compile every kernel in the tile configurations its launcher uses on a GPU (the widest
    preset's multi-LN; both attention tile shapes, one with a padded head dim); returns the
    names compiled (each compile takes about a second). Run it in a process
    without TRITON_INTERPRET=1, e.g. `python -c "from rsscale.kernels.testing import *; compile_all_for_gpu()"`."""
    fa, fln = module("flash_attention"), module("fused_layer_norm")
    cuda = torch.device("cuda")
    done = []
    for dtype, width, k in (("bf16", 2048, 4),):
        block_n = fln.triton.next_power_of_2(width)
        block_k = fln.triton.next_power_of_2(k)
        compile_for_gpu(fln._ln_fwd_kernel, dtype, dict(BLOCK_N=block_n), fln._num_warps(block_n), arch=arch)
        compile_for_gpu(fln._ln_bwd_kernel, dtype, dict(BLOCK_K=block_k, BLOCK_N=block_n),
                        fln._num_warps(block_n * k), arch=arch)
        compile_for_gpu(fln._sum_partials_kernel, dtype, dict(BLOCK_P=32, BLOCK_L=128), arch=arch)
        done.append(f"layer_norm {dtype} N={width} K={k}")
    torch_dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for dtype, head_dim in (("fp16", 48), ("bf16", 128), ("fp32", 64)):  # fp32: the "ieee" dots
        for kernels_, cfg in (((fa._attn_fwd_kernel,), fa._config(head_dim, cuda)),
                              ((fa._attn_bwd_dkdv_kernel, fa._attn_bwd_dq_kernel), fa._bwd_config(head_dim, cuda))):
            blocks = {name: v for name, v in cfg.items() if name.startswith("BLOCK")}
            blocks["DOT_PRECISION"] = fa._dot_precision(torch_dtypes[dtype])
            for kernel in kernels_:
                compile_for_gpu(kernel, dtype, blocks, cfg["num_warps"], cfg["num_stages"], arch=arch)
        pre = fa._bwd_config(head_dim, cuda)
        compile_for_gpu(fa._attn_bwd_preprocess_kernel, dtype, dict(BLOCK_M=pre["BLOCK_M"], BLOCK_D=pre["BLOCK_D"]), arch=arch)
        done.append(f"attention {dtype} D={head_dim}")
    return done
