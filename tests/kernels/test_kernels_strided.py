"""Both Triton kernels on non-contiguous, odd-sized inputs vs float64 torch, under the interpreter:
row-strided LayerNorm inputs (a slice of wider rows, as from a fused projection) and attention
inputs with padded or transposed strides. Allocations are NaN-poisoned, so unwritten elements fail."""

import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton build any kernel (see kernels/dispatch.py)

import pytest
import torch

from rsscale.kernels import flash_attention as fa
from rsscale.kernels import fused_layer_norm as fln
from rsscale.kernels.testing import TOLERANCE, nan_poisoned_allocations, scaled_error

TOL = TOLERANCE[torch.float32]


def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("shape,pad,k", [((7, 37), 11, 2), ((2, 3, 13), 5, 1), ((3, 129), 1, 3)])
def test_layer_norm_on_row_strided_odd_input(shape, pad, k):
    gen = torch.Generator().manual_seed(sum(shape) + pad)
    n = shape[-1]
    wide = torch.randn(*shape[:-1], n + pad, generator=gen, dtype=torch.float64) * 3 + 1
    w = 1 + 0.5 * torch.randn(k, n, generator=gen, dtype=torch.float64)
    b = 0.5 * torch.randn(k, n, generator=gen, dtype=torch.float64)
    dy = torch.randn(k, *shape, generator=gen, dtype=torch.float64)

    wide32, w32, b32 = _leaf(wide.float()), _leaf(w.float()), _leaf(b.float())
    x32 = wide32[..., :n]  # rows n + pad apart: not contiguous
    assert not x32.is_contiguous() and x32.reshape(-1, n).stride(0) == n + pad
    with nan_poisoned_allocations():
        y = fln.triton_multi_layer_norm(x32, w32, b32, 1e-6)
        y.backward(dy.float())

    wide64, w64, b64 = _leaf(wide), _leaf(w), _leaf(b)
    y_ref = fln.torch_multi_layer_norm(wide64[..., :n], w64, b64, 1e-6)
    y_ref.backward(dy)
    errors = {"out": scaled_error(y, y_ref), "dx": scaled_error(wide32.grad, wide64.grad),
              "dw": scaled_error(w32.grad, w64.grad), "db": scaled_error(b32.grad, b64.grad)}
    assert all(e < TOL for e in errors.values()), errors
    assert (wide32.grad[..., n:] == 0).all()  # the gap between rows gets no gradient


def _strided(kind, shape, gen):
    b, h, n, d = shape
    if kind == "padded":  # head dim is a slice of a wider last dimension
        return torch.randn(b, h, n, d + 3, generator=gen, dtype=torch.float64)[..., :d]
    if kind == "transposed":  # stride along the head dim is not 1
        return torch.randn(b, h, d, n, generator=gen, dtype=torch.float64).transpose(-1, -2)
    return torch.randn(b, n, h, d, generator=gen, dtype=torch.float64).transpose(1, 2)  # heads interleaved


@pytest.mark.parametrize("kind,shape", [("padded", (1, 2, 35, 9)), ("transposed", (2, 1, 33, 16)),
                                        ("interleaved", (1, 3, 19, 5))])
def test_attention_on_non_contiguous_odd_input(kind, shape):
    gen = torch.Generator().manual_seed(len(kind))
    base = [_strided(kind, shape, gen) for _ in range(3)]
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    # float32 copies with the same strides (padded: slice after the cast, so the gap survives)
    ours = []
    for t in base:
        full = _leaf(t._base.float())
        ours.append((full, _strided_view(full, kind, shape)))
    assert all(not v.is_contiguous() for _, v in ours)
    with nan_poisoned_allocations():
        out = fa.triton_attention(*(v for _, v in ours))
        out.backward(dy.float())
    ref_leaves = [_leaf(t._base) for t in base]
    ref = fa.naive_attention(*(_strided_view(t, kind, shape) for t in ref_leaves))
    ref.backward(dy)
    errors = {"out": scaled_error(out, ref)}
    errors.update({f"d{x}": scaled_error(full.grad, r.grad) for x, (full, _), r in zip("qkv", ours, ref_leaves)})
    assert all(e < TOL for e in errors.values()), errors


def _strided_view(full, kind, shape):
    d = shape[-1]
    if kind == "padded":
        return full[..., :d]
    return full.transpose(-1, -2) if kind == "transposed" else full.transpose(1, 2)


def test_empty_inputs_and_one_row():
    x = torch.zeros(0, 3, 8, requires_grad=True)
    w, b = torch.ones(2, 8, requires_grad=True), torch.zeros(2, 8, requires_grad=True)
    with nan_poisoned_allocations():
        y = fln.triton_multi_layer_norm(x, w, b)
        y.sum().backward()
    assert y.shape == (2, 0, 3, 8) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(2, 8)) and torch.equal(b.grad, torch.zeros(2, 8))
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])  # mean 3, biased variance 2
    got = fln.triton_layer_norm(one, torch.ones(5), torch.zeros(5), eps=0.0)
    torch.testing.assert_close(got, (one - 3) / math.sqrt(2), atol=1e-6, rtol=1e-6)
    q = torch.zeros(1, 2, 0, 8, requires_grad=True)
    with nan_poisoned_allocations():
        o = fa.triton_attention(q, q, q)
        o.sum().backward()
    assert o.shape == q.shape and q.grad.shape == q.shape


def test_kernel_input_errors():
    with pytest.raises(ValueError, match=r"weights/biases must both be \[K, 8\]"):
        fln.triton_multi_layer_norm(torch.zeros(2, 8), torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match=r"weights/biases must both be \[K, 8\]"):
        fln.triton_multi_layer_norm(torch.zeros(2, 8), torch.ones(1, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="width 65537 exceeds the fused kernel's maximum 65536"):
        fln.triton_multi_layer_norm(torch.zeros(1, 65537), torch.ones(1, 65537), torch.zeros(1, 65537))
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="one dtype"):
        fa.triton_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="bf16 attention needs a GPU"):
        fa.triton_attention(*(q.bfloat16() for _ in range(3)))
    wide = torch.zeros(1, 1, 2, 257)
    with pytest.raises(ValueError, match="head dim 257 exceeds the kernel's maximum 256"):
        fa.triton_attention(wide, wide, wide)
    with pytest.raises(ValueError, match=r"one shape \[B, H, N, D\]"):
        fa.triton_attention(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))


@pytest.mark.parametrize("d", [1, 16, 17, 64, 100, 256])
def test_tile_configs_cover_the_head_dim(d):
    for cfg in (fa._config(d, torch.device("cpu")), fa._config(d, torch.device("cuda")),
                fa._bwd_config(d, torch.device("cpu")), fa._bwd_config(d, torch.device("cuda"))):
        block_d = cfg["BLOCK_D"]
        assert block_d >= max(16, d) and block_d & (block_d - 1) == 0 and (block_d < 2 * d or block_d == 16)
    assert fa._config(d, torch.device("cpu"))["BLOCK_M"] == 32  # interpreter tiles: short tests cross tiles


def test_gpu_tiles_follow_the_documented_rule():
    """_config's doc: 128x64 tiles on a GPU, fewer key columns (32) for heads wider than 64;
    the backward uses 64x64 on a GPU and the interpreter's 32x32 on CPU."""
    launch = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages"}
    cuda = torch.device("cuda")
    for d, block_n in ((32, 64), (64, 64), (65, 32), (256, 32)):
        cfg = fa._config(d, cuda)
        assert set(cfg) == launch and (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (128, block_n)
        bwd = fa._bwd_config(d, cuda)
        assert set(bwd) == launch and (bwd["BLOCK_M"], bwd["BLOCK_N"]) == (64, 64)
    cpu = fa._bwd_config(16, torch.device("cpu"))
    assert (cpu["BLOCK_M"], cpu["BLOCK_N"], cpu["BLOCK_D"]) == (32, 32, 16) and "num_warps" not in cpu


@fa.triton.jit
def _offset_kernel(Out, seq_len, n_heads, stride_b, BLOCK: fa.tl.constexpr):
    bh, start = fa._program_block(seq_len, BLOCK)
    fa.tl.store(Out + fa.tl.program_id(0), (bh // n_heads) * stride_b + start)


def test_attention_offsets_are_64_bit():
    """The batch offset b * stride_b of the last program of a grid whose tensor passes 2**31
    elements: the strides fit in i32 (Triton passes them as i32), their product does not. Computed
    from _program_block's indices it must be exact, not wrapped (which would address memory
    before the tensor)."""
    seq_len, heads, stride_b, block = 64, 1, 2**30 + 4096, 32
    programs = 3 * (seq_len // block)  # b = 0, 1, 2
    out = torch.zeros(programs, dtype=torch.int64)
    _offset_kernel[(programs,)](out, seq_len, heads, stride_b, BLOCK=block)
    assert out[-1].item() == 2 * stride_b + block > 2**31
