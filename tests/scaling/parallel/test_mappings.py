"""Sequence-parallel collectives and TP sharding against hand-built tensors: each rank's forward
output and input gradient of every mapping on 2 gloo ranks (odd token counts padded), the
stacked column linears vs plain float64 F.linear on all tokens, and shard/unshard with strides."""

import pytest
import torch
from distributed import run_distributed

from rsscale.scaling.parallel import mappings as mp
from rsscale.scaling.parallel.state import shard_tensor, unshard_tensors

B, N, D = 2, 4, 3  # N tokens split over 2 ranks


def _full(seed=0):
    return torch.arange(B * N * D, dtype=torch.float64).reshape(B, N, D) + seed


def _worker(rank, world):
    from rsscale.scaling.parallel import state
    from rsscale.scaling.parallel.state import init_parallel

    init_parallel(tp=world)
    out = {"ranks": (state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size(), state.dp_rank(),
                     state.dp_size(), state.model_parallel_config().tensor_model_parallel_size)}
    init_parallel(tp=world)  # same sizes again: a no-op
    with pytest.raises(ValueError, match=r"dp\*tp\*pp = 2\*2\*1 must equal the world size 2"):
        init_parallel(tp=world, dp=2)
    # scatter: forward keeps my tokens; backward all-gathers the chunks' grads
    x = _full().requires_grad_()
    y = mp.scatter_to_sequence_parallel_region(x)
    y.backward(torch.full_like(y, rank + 1.0))
    out["scatter"], out["scatter_grad"] = y.detach().numpy(), x.grad.numpy()
    # gather feeding TP-parallel layers: backward reduce-scatters (sums the ranks' grads, keeps mine)
    mine = _full()[:, 2 * rank : 2 * rank + 2].clone().requires_grad_()
    g = mp.gather_from_sequence_parallel_region(mine, tp_grad=True)
    g.backward(_full(100 * rank))
    out["gather"], out["gather_grad"] = g.detach().numpy(), mine.grad.numpy()
    mine2 = mine.detach().clone().requires_grad_()
    mp.gather_from_sequence_parallel_region(mine2, tp_grad=False).backward(_full(100 * rank))
    out["gather_nogr"] = mine2.grad.numpy()
    # reduce-scatter: forward sums partial outputs, keeps mine; backward all-gathers
    part = _full(10 * rank).requires_grad_()
    rs = mp.reduce_scatter_to_sequence_parallel_region(part)
    rs.backward(torch.full_like(rs, rank + 1.0))
    out["rs"], out["rs_grad"] = rs.detach().numpy(), part.grad.numpy()
    # K=2 stacked column linears on 3 real tokens (padded to 4), this rank's output columns
    torch.manual_seed(0)
    lins = [torch.nn.Linear(D, 4, dtype=torch.float64) for _ in range(2)]
    xs = torch.randn(2, B, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xs[:, :, 3] = 0  # padding token
    chunk = xs[:, :, 2 * rank : 2 * rank + 2].clone().requires_grad_()
    yl = mp.gather_column_linears(chunk, 3, lins)
    yl.backward(torch.ones_like(yl))
    out["col"], out["col_grad"] = yl.detach().numpy(), chunk.grad.numpy()
    out["col_w"] = lins[1].weight.grad.numpy()
    return out


def test_sequence_parallel_mappings_on_two_ranks():
    res = run_distributed(_worker, 2)
    full = _full()
    for r, o in enumerate(res):
        assert o["ranks"] == (r, 2, 0, 1, 0, 1, 2)
        mine = slice(2 * r, 2 * r + 2)
        torch.testing.assert_close(torch.from_numpy(o["scatter"]), full[:, mine])
        torch.testing.assert_close(torch.from_numpy(o["scatter_grad"]),
                                   torch.cat([torch.full((B, 2, D), 1.0, dtype=torch.float64), torch.full((B, 2, D), 2.0, dtype=torch.float64)], 1))
        torch.testing.assert_close(torch.from_numpy(o["gather"]), full)
        torch.testing.assert_close(torch.from_numpy(o["gather_grad"]), (_full(0) + _full(100))[:, mine])
        torch.testing.assert_close(torch.from_numpy(o["gather_nogr"]), _full(100 * r)[:, mine])
        torch.testing.assert_close(torch.from_numpy(o["rs"]), (_full(0) + _full(10))[:, mine])
        torch.testing.assert_close(torch.from_numpy(o["rs_grad"]),
                                   torch.cat([torch.full((B, 2, D), 1.0, dtype=torch.float64), torch.full((B, 2, D), 2.0, dtype=torch.float64)], 1))
    # column linears: each rank computes all 3 tokens with its own (here identical) weights
    torch.manual_seed(0)
    lins = [torch.nn.Linear(D, 4, dtype=torch.float64) for _ in range(2)]
    xs = torch.randn(2, B, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xs[:, :, 3] = 0
    xr = xs[:, :, :3].clone().requires_grad_()
    ref = torch.stack([torch.nn.functional.linear(xr[k], lins[k].weight, lins[k].bias) for k in range(2)])
    ref.backward(torch.ones_like(ref))
    dx_sum = torch.nn.functional.pad(2 * xr.grad, (0, 0, 0, 1))  # both ranks' partial grads summed
    for r, o in enumerate(res):
        torch.testing.assert_close(torch.from_numpy(o["col"]), ref.detach())
        torch.testing.assert_close(torch.from_numpy(o["col_grad"]), dx_sum[:, :, 2 * r : 2 * r + 2])
        torch.testing.assert_close(torch.from_numpy(o["col_w"]), lins[1].weight.grad)


def test_pad_tokens_and_single_rank_mappings_are_identity():
    x = torch.ones(2, 5, 3)
    assert mp.pad_tokens(x, 5) is x and mp.pad_tokens(x, 1) is x
    p = mp.pad_tokens(x, 4)
    assert p.shape == (2, 8, 3) and p[:, :5].eq(1).all() and p[:, 5:].eq(0).all()
    assert mp.pad_tokens(x, 3).shape == (2, 6, 3)
    with pytest.raises(ValueError, match="multiple of the TP size 2"):
        mp._check_divisible(x, 2)


def test_shard_and_unshard_with_stride_by_hand():
    full = torch.arange(12).reshape(12, 1)
    # stride 3, 2 ranks: 6 chunks of 2 rows; rank 0 owns chunks 0, 2, 4; rank 1 owns 1, 3, 5
    r0, r1 = (shard_tensor(full, 0, 3, r, 2) for r in (0, 1))
    assert r0.flatten().tolist() == [0, 1, 4, 5, 8, 9] and r1.flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert torch.equal(unshard_tensors([r0, r1], 0, 3), full)
    assert shard_tensor(full.t(), 1, 1, 1, 4).flatten().tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="does not split into 5x1"):
        shard_tensor(full, 0, 1, 0, 5)


def test_single_process_world_errors():
    from rsscale.scaling.parallel import state

    with pytest.raises(ValueError, match="tensor and pipeline parallel sizes must be >= 1, got tp=0, pp=1"):
        state.init_parallel(tp=0)
    with pytest.raises(ValueError, match="tensor and pipeline parallel sizes must be >= 1, got tp=1, pp=0"):
        state.init_parallel(pp=0)
    state.ensure_initialized()
    try:
        assert state.is_initialized() and (state.tp_size(), state.pp_size(), state.dp_size()) == (1, 1, 1)
        with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp\*pp = 2\*1"):
            state.init_parallel(tp=2)
        with pytest.raises(ValueError, match=r"model_parallel_config\(tp=2\) does not match the initialized TP size 1"):
            state.model_parallel_config(tp=2)
        assert state.model_parallel_config(tp=1).params_dtype == torch.float32
    finally:
        state.destroy_parallel()
    assert not state.is_initialized()


def test_init_parallel_turns_tf32_off():
    """Every trainer starts through init_parallel, so fp32 math is exact there on any GPU
    (torch's cuDNN default is TF32); the flags are plain process settings, readable on CPU."""
    from rsscale.scaling.parallel import state

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    state.init_parallel()
    try:
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        state.destroy_parallel()
