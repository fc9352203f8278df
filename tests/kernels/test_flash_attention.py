"""Flash attention under the Triton interpreter vs an explicit float64 softmax reference.
Allocations are poisoned with NaN so that any element a kernel fails to write fails."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/triton build any kernel (see kernels/dispatch.py)

import pytest
import torch

from rsscale import kernels
from rsscale.kernels import flash_attention as fa
from rsscale.kernels.testing import TOLERANCE, check_attention, nan_poisoned_allocations


def _assert_ok(errors, dtype=torch.float32):
    assert set(errors) == {"out", "dq", "dk", "dv"}
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"errors above {TOLERANCE[dtype]} for {dtype}: {bad}"


# interpreter tiles are 32x32: 50, 33, 70 and 7 leave ragged query and key tails; 24 is a padded head dim
@pytest.mark.parametrize("shape", [(1, 2, 50, 16), (2, 1, 33, 24), (1, 1, 70, 64), (1, 1, 40, 128), (1, 1, 7, 32)])
def test_attention_fp32(shape):
    with nan_poisoned_allocations():
        _assert_ok(check_attention(shape, seed=sum(shape)))


def test_attention_fp16():
    with nan_poisoned_allocations():
        _assert_ok(check_attention((1, 2, 45, 32), torch.float16), torch.float16)


def test_attention_peaked_scores():
    """Large logits: the online max must keep exp() finite."""
    q = torch.randn(1, 1, 40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 8
    with nan_poisoned_allocations():
        _assert_ok(check_attention(q.shape, qkv=[q, q.clone(), torch.randn_like(q)]))


def test_attention_on_strided_views():
    """q, k, v sliced out of one fused qkv projection [B, N, 3, H, D] without copies."""
    qkv = torch.randn(2, 37, 3, 2, 16, dtype=torch.float64).permute(2, 0, 3, 1, 4)
    with nan_poisoned_allocations():
        _assert_ok(check_attention(None, qkv=list(qkv.unbind(0))))


def test_attention_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        fa.triton_attention(torch.randn(1, 1, 8, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 16))


def test_public_attention_matches_sdpa_under_triton_backend():
    q, k, v = (torch.randn(2, 3, 20, 16) for _ in range(3))
    try:
        kernels.set_backend("triton")
        got = kernels.attention(q, k, v)
    finally:
        kernels.set_backend("torch")
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)



def _block_backend_diffs(rank, world_size):
    """Max |triton - torch| over a ParallelBlock's output and parameter gradients, with global
    and with window attention."""
    from rsscale.scaling.model.vit import ParallelBlock
    from rsscale.scaling.parallel import state

    state.init_parallel(tp=world_size)
    diffs = []
    for window in (None, 4):
        torch.manual_seed(0)
        block = ParallelBlock(width=32, heads=4, mlp=64, branches=2, window_size=window)
        x = torch.randn(2, 36, 32)  # a 6x6 token grid: windows of 4 pad it to 8x8
        results = {}
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            assert kernels.get_backend() == backend
            block.zero_grad()
            out = block(x, hw=(6, 6) if window else None)
            out.square().sum().backward()
            results[backend] = [out.detach()] + [p.grad.clone() for p in block.parameters()]
        kernels.set_backend("torch")
        diffs.append(max((a - b).abs().max().item() for a, b in zip(results["torch"], results["triton"])))
    return diffs


def test_parallel_block_triton_equals_torch_backend():
    """In a fresh process (megatron's groups); a zero difference would mean Triton never ran."""
    from distributed import run_distributed

    for diffs in run_distributed(_block_backend_diffs, 1):
        assert all(0 < d < 1e-4 for d in diffs), diffs
