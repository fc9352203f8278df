"""Optimizer boundary cases against hand-computed values and a float64 AdamW written out here:
the LR schedule at the warmup/total edges, decay masks, clipping at and below the limit, the loss
scaler's growth interval, bf16 weights with an fp32 master copy, and ZeRO-1 sharding and bucketed
all-reduce (2 gloo ranks) equal to the unsharded step."""

from __future__ import annotations

import math

import pytest
import torch
from distributed import run_distributed

from rsscale.scaling.train.optim import FlatAdamW, LossScaler, clip_grad_norm_, decays, lr_at


def test_decays_only_matrices_that_are_not_tokens_or_positions():
    assert decays("blocks.0.fc.weight", torch.zeros(2, 3))
    assert not decays("blocks.0.fc.bias", torch.zeros(3))
    assert not decays("norm.weight", torch.zeros(3))
    assert not decays("pos_embed", torch.zeros(1, 4, 3))
    assert not decays("decoder.mask_token", torch.zeros(1, 1, 3))
    assert not decays("cls_token", torch.zeros(1, 1, 3))


def test_lr_schedule_edges():
    assert [lr_at(s, 2.0, 4, 10) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]  # exact linear warmup
    assert lr_at(4, 2.0, 4, 10, 0.5) == 2.0  # cosine starts at the peak
    assert lr_at(7, 2.0, 4, 10, 0.5) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 0.5)), abs=1e-15)
    assert lr_at(10, 2.0, 4, 10, 0.5) == 0.5 and lr_at(11, 2.0, 4, 10, 0.5) == 0.5  # clamped at total
    assert lr_at(0, 3.0, 0, 5) == 3.0  # no warmup
    assert lr_at(2, 3.0, 2, 2, 1.0) == 3.0 and lr_at(3, 3.0, 2, 2, 1.0) == 1.0  # total == warmup


def _adamw_reference(params, grads, lr, betas, eps, wd, masks, steps):
    """AdamW in float64, written out from Loshchilov & Hutter (decoupled decay)."""
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t in range(1, steps + 1):
        for i, g in enumerate(grads):
            g = g.double()
            p[i] = p[i] * (1 - lr * wd * masks[i])
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            mhat, vhat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            p[i] = p[i] - lr * mhat / (vhat.sqrt() + eps)
    return p, m, v


def _named(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.nn.Parameter(torch.randn(3, 2, generator=gen))),
            ("a.bias", torch.nn.Parameter(torch.randn(3, generator=gen))),
            ("frozen", torch.nn.Parameter(torch.randn(2, generator=gen), requires_grad=False))]


def _grads(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)]


def _backward(named, grads):
    """Backward of sum(p * g): gradient g for each trainable parameter, through autograd's hooks."""
    sum((p * g).sum() for (_, p), g in zip(named, grads)).backward()


def test_flat_adamw_matches_written_out_adamw_and_round_trips_its_state():
    named = _named()
    start = [p.detach().clone() for _, p in named[:2]]
    opt = FlatAdamW(named, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    assert [n for n, _ in opt.named] == ["a.bias", "a.weight"]  # reverse registration order, frozen left out
    assert opt.numel == 9 and opt.state_bytes() == 2 * 9 * 4
    grads = _grads()
    for _ in range(3):
        opt.zero_grad()
        _backward(named, grads)
        # fp32 weights: p.grad is the gradient buffer itself (no second copy)
        assert named[0][1].grad.data_ptr() == opt.grad.data_ptr() + 4 * opt.offsets["a.weight"][0]
        opt.finish_grad_sync()
        opt.step(0.01)
    ref, m, v = _adamw_reference(start, grads, 0.01, (0.8, 0.9), 1e-6, 0.1, [1.0, 0.0], 3)
    torch.testing.assert_close(named[0][1].detach().double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(named[1][1].detach().double(), ref[1], rtol=1e-5, atol=1e-6)
    pieces = opt.state_pieces()  # unsharded, one bucket: every parameter whole (elements 0..numel)
    assert set(pieces) == {"exp_avg", "exp_avg_sq"}  # fp32 weights: no master copy
    assert all([(a, b) for _, a, b in pl] == [(0, pl[0][0].numel())] for per in pieces.values() for pl in per.values())
    states = {key: {n: pl[0][0].view_as(dict(named)[n]) for n, pl in per.items()} for key, per in pieces.items()}
    torch.testing.assert_close(states["exp_avg"]["a.weight"].double(), m[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(states["exp_avg_sq"]["a.bias"].double(), v[1], rtol=1e-5, atol=1e-9)
    other = FlatAdamW(_named(5), betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, bucket_mb=4 * 4 / 2**20)  # 4-element buckets
    other.load_state(lambda key, name: states[key][name], opt.step_count)
    assert other.step_count == 3 and len(other.buckets) == 3
    assert torch.equal(other.exp_avg[:9], opt.exp_avg) and torch.equal(other.exp_avg_sq[:9], opt.exp_avg_sq)
    opt.zero_grad()
    assert torch.equal(opt.grad, torch.zeros(9))  # zeroed in place: a parameter without a gradient contributes zeros


def test_bf16_weights_keep_fp32_master_and_grads_and_step_like_fp32():
    """16-bit weights: AdamW steps the fp32 master copy (equal to an fp32 run given the same
    gradients), the model holds its bf16 rounding, gradients reach the fp32 buffer through the
    hook (p.grad freed), 2 + 4 + 12 bytes per parameter unsharded, and the master weights are
    the "model" state a checkpoint keeps."""
    named32, named16 = _named(), _named()
    opt32 = FlatAdamW(named32, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    opt16 = FlatAdamW(named16, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, param_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for _, p in opt16.named) and opt16.grad.dtype == torch.float32
    for _ in range(3):
        for named, opt in ((named32, opt32), (named16, opt16)):
            opt.zero_grad()
            _backward(named, [g.bfloat16().float() for g in _grads()])  # bf16 grads are rounded: the same values in both
            opt.finish_grad_sync()
            opt.step(0.01)
    assert all(p.grad is None for _, p in opt16.named)  # folded into main_grad and freed
    torch.testing.assert_close(opt16.master, opt32.flat, rtol=0, atol=0)
    torch.testing.assert_close(opt16.flat, opt32.flat.bfloat16(), rtol=0, atol=0)
    assert opt16.flat.element_size() + opt16.grad.element_size() + opt16.state_bytes() / opt16.numel == 2 + 4 + 12
    o, n = opt32.offsets["a.weight"]
    assert torch.equal(opt16.state_pieces()["model"]["a.weight"][0][0], opt32.flat[o : o + n])


def test_flat_adamw_rejects_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable"):
        FlatAdamW([("x", torch.nn.Parameter(torch.zeros(2), requires_grad=False))])


def _sharded_worker(rank, world, zero, bucket_mb):
    import torch.distributed as dist

    named = _named()
    opt = FlatAdamW(named, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, shards=world if zero else 1, shard_rank=rank if zero else 0,
                    group=dist.group.WORLD, dp_size=world, bucket_mb=bucket_mb)
    norms = []
    for _ in range(2):
        opt.zero_grad()
        _backward(named, [g + rank for g in _grads()])  # ranks differ: average
        opt.finish_grad_sync()
        norms.append(opt.clip_grad_norm_(0.0))
        opt.step(0.01)
    pieces = opt.state_pieces()["exp_avg"]  # this rank's chunks: parameters or flat pieces of them
    # each rank holds half of a model's gradient; 12 is a replica counted on rank 0 only
    g = torch.tensor([3.0, 12.0]) if rank == 0 else torch.tensor([4.0, 12.0])
    sq = (g**2 * (torch.tensor([1.0, 1.0]) if rank == 0 else torch.tensor([1.0, 0.0]))).sum()
    clipped = clip_grad_norm_([g], sq, max_norm=0.5, group=dist.group.WORLD)
    scaler = LossScaler(enabled=True, init_scale=4.0)  # only rank 0 overflows: every rank must skip
    skip = not scaler.unscale_and_check(torch.tensor([float("inf") if rank == 0 else 1.0]))
    return {"params": [p.detach().numpy().copy() for _, p in named[:2]], "bytes": opt.state_bytes(), "grad_norm": norms,
            "skip": skip, "scale": scaler.scale, "norm": clipped, "clipped": g.numpy(),
            "exp_avg": {k: [(t.numpy().copy(), a, b) for t, a, b in pl] for k, pl in pieces.items()}}


@pytest.mark.parametrize("zero,bucket_mb,state", [(True, 0.0, 2 * 5 * 4), (True, 2 * 4 / 2**20, 2 * 5 * 4), (False, 2 * 4 / 2**20, 2 * 9 * 4)],
                         ids=["zero-1-bucket", "zero-2-element-buckets", "allreduce-2-element-buckets"])
def test_dp_step_equals_one_process_for_zero1_and_all_reduce_and_overflow_skips_everywhere(zero, bucket_mb, state):
    """Two ranks with different gradients: ZeRO-1 (on gloo, all-reduce per bucket and keep the chunk; the reduce-scatter path has its own test below, all-gather of the
    weights) and the all-reduce path, with one bucket or 2-element buckets (smaller than either
    parameter), equal AdamW on the mean gradient; the grad norm is the mean gradient's."""
    results = run_distributed(_sharded_worker, 2, zero, bucket_mb)
    named = _named()
    start = [p.detach().clone() for _, p in named[:2]]
    grads = [g + 0.5 for g in _grads()]  # the average of rank 0's g and rank 1's g + 1
    ref, m, _ = _adamw_reference(start, grads, 0.01, (0.8, 0.9), 1e-6, 0.1, [1.0, 0.0], 2)
    for r in results:
        assert r["skip"] and r["scale"] == 2.0
        assert r["norm"] == pytest.approx(13.0)  # sqrt(3^2 + 12^2 + 4^2)
        assert r["grad_norm"] == pytest.approx([float(torch.cat([g.reshape(-1) for g in grads]).norm())] * 2, rel=1e-6)
        assert r["bytes"] == state  # ZeRO-1: 9 elements padded to 10, half each
        for got, want in zip(r["params"], ref):
            torch.testing.assert_close(torch.from_numpy(got).double(), want, rtol=1e-5, atol=1e-6)
    full = torch.full((m[0].numel(),), float("nan"), dtype=torch.float64)  # a.weight's moment from the ranks' pieces
    for r in results if zero else results[:1]:
        for t, a, b in r["exp_avg"].get("a.weight", []):
            full[a:b] = torch.from_numpy(t).double()
    torch.testing.assert_close(full.view_as(m[0]), m[0], rtol=1e-5, atol=1e-7)
    assert results[0]["clipped"].tolist() == pytest.approx([3 * 0.5 / (13 + 1e-6), 12 * 0.5 / (13 + 1e-6)])


class _ReportsNccl:
    """torch.distributed as optim.py sees it, but naming every group's backend "nccl": FlatAdamW then
    takes its ZeRO-1 reduce-scatter path (which gloo runs too) instead of gloo's all-reduce."""

    def __getattr__(self, name):
        import torch.distributed as dist

        return getattr(dist, name)

    @staticmethod
    def get_backend(group=None):
        return "nccl"


def _reduce_scatter_worker(rank, world):
    import torch.distributed as dist

    import rsscale.scaling.train.optim as optim

    real, calls = optim.reduce_scatter_tensor, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    optim.dist, optim.reduce_scatter_tensor = _ReportsNccl(), counting
    try:
        out = {}
        for overlap in (False, True):
            named = _named()
            opt = FlatAdamW(named, shards=world, shard_rank=rank, group=dist.group.WORLD, dp_size=world, bucket_mb=2 * 4 / 2**20,
                            overlap=overlap)
            opt.zero_grad()
            _backward(named, [g + rank for g in _grads()])
            opt.finish_grad_sync()
            out[overlap] = {"chunks": [(b.own_lo, b.own_hi, opt.grad[b.own_lo : b.own_hi].numpy().copy()) for b in opt.buckets],
                            "early": opt.started_in_backward}
        return {"runs": out, "reduce_scatters": len(calls)}
    finally:
        optim.dist, optim.reduce_scatter_tensor = dist, real


def test_zero1_reduce_scatter_path_leaves_each_rank_the_dp_mean_of_its_chunks():
    """The non-gloo ZeRO-1 path (each bucket reduce-scattered into this rank's chunk), forced on 2
    gloo ranks: with overlap off and on, every rank's chunk of every 2-element bucket holds the
    mean of the ranks' gradients, and the chunks of the two ranks tile the padded buffer."""
    results = run_distributed(_reduce_scatter_worker, 2)
    bias, weight = [g + 0.5 for g in _grads()][::-1]  # the mean of g and g + 1; flat order is a.bias then a.weight
    want = torch.cat([bias.reshape(-1), weight.reshape(-1), torch.zeros(1)])  # 9 elements padded to 10
    for rank, r in enumerate(results):
        assert r["reduce_scatters"] == 2 * 5, rank  # one per bucket, both runs: the reduce-scatter path was taken
        for overlap, run in r["runs"].items():
            assert run["early"] == (5 if overlap else 0), (rank, overlap)
            assert [(lo, hi) for lo, hi, _ in run["chunks"]] == [(2 * k + rank, 2 * k + rank + 1) for k in range(5)]
            for lo, hi, got in run["chunks"]:
                torch.testing.assert_close(torch.from_numpy(got), want[lo:hi], rtol=1e-6, atol=1e-6)


def test_flat_adamw_clip_scales_its_flat_gradient_to_max_norm():
    """FlatAdamW.clip_grad_norm_ on one process: returns the norm before clipping (hand value 13)
    and scales the whole flat gradient, seen through each parameter's .grad, by max_norm / norm."""
    named = _named()
    opt = FlatAdamW(named)
    weight, bias = torch.zeros(3, 2), torch.tensor([0.0, 4.0, 0.0])
    weight[0, 0], weight[2, 1] = 3.0, 12.0  # sqrt(3^2 + 12^2 + 4^2) = 13
    opt.zero_grad()
    _backward(named, [weight, bias])
    opt.finish_grad_sync()
    assert opt.clip_grad_norm_(2.0) == pytest.approx(13.0)
    coef = 2.0 / (13.0 + 1e-6)
    torch.testing.assert_close(named[0][1].grad, weight * coef)
    torch.testing.assert_close(named[1][1].grad, bias * coef)
    assert float(opt.grad.norm()) == pytest.approx(2.0, rel=1e-5)
    assert opt.clip_grad_norm_(5.0) == pytest.approx(2.0, rel=1e-5)  # below the limit: left as it is
    torch.testing.assert_close(named[0][1].grad, weight * coef)


def _clip(g, counted=None, max_norm=1.0):
    sq = (g**2 * (1.0 if counted is None else counted)).sum()
    return clip_grad_norm_([g], sq, max_norm)


def test_clip_grad_norm_edges():
    g = torch.tensor([3.0, 4.0])
    assert _clip(g, max_norm=5.0 + 1e-3) == 5.0 and torch.equal(g, torch.tensor([3.0, 4.0]))
    assert _clip(g, max_norm=0.0) == 5.0 and torch.equal(g, torch.tensor([3.0, 4.0]))
    assert _clip(g, max_norm=2.5) == 5.0
    torch.testing.assert_close(g, torch.tensor([3.0, 4.0]) * (2.5 / (5.0 + 1e-6)))
    masked = torch.tensor([3.0, 4.0, 100.0])
    assert _clip(masked, torch.tensor([1.0, 1.0, 0.0]), max_norm=100.0) == 5.0  # element 2 not counted
    half = torch.tensor([3.0, 4.0])
    _clip(half, max_norm=0.5)  # a limit below 1 clips too
    torch.testing.assert_close(half, torch.tensor([3.0, 4.0]) * (0.5 / (5.0 + 1e-6)))
    bad = torch.tensor([float("inf"), 1.0])
    assert _clip(bad, max_norm=1.0) == float("inf") and bad[1].item() == 1.0


def test_loss_scaler_growth_nan_disabled_and_state():
    off = LossScaler(enabled=False, init_scale=8.0)
    g = torch.tensor([float("nan")])
    assert off.scale == 1.0 and off.unscale_and_check(g) and math.isnan(g.item())
    s = LossScaler(enabled=True, init_scale=4.0, growth_interval=3)
    assert [s.unscale_and_check(torch.tensor([1.0])) for _ in range(2)] == [True, True] and s.scale == 4.0
    assert s.unscale_and_check(torch.tensor([1.0])) and s.scale == 8.0  # exactly at the 3rd clean step
    assert not s.unscale_and_check(torch.tensor([float("nan")])) and (s.scale, s.good_steps) == (4.0, 0)
    t = LossScaler(enabled=True)
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.good_steps) == (4.0, 0) and t.state_dict() == {"scale": 4.0, "good_steps": 0}


@pytest.mark.parametrize("shards,rank", [(1, 0), (2, 1)])
def test_buckets_list_exactly_the_parameters_whose_elements_they_hold(shards, rank):
    """2-element buckets over a.bias (elements 0..3) and a.weight (3..9): each bucket's parameters
    and this rank's segments, against a brute-force walk over the elements."""
    opt = FlatAdamW(_named(), shards=shards, shard_rank=rank, dp_size=shards, bucket_mb=2 * 4 / 2**20)
    spans = [opt.offsets[n] for n, _ in opt.named]
    assert [(b.lo, b.hi) for b in opt.buckets] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9 if shards == 1 else 10)]
    for b in opt.buckets:
        assert b.params == [i for i, (o, n) in enumerate(spans) if o < b.hi and b.lo < o + n]
        own = [e for e in range(b.own_lo, b.own_hi) if e < opt.numel]
        assert [e for s in b.segments for e in range(s.lo, s.lo + s.b - s.a)] == own
        assert all(spans[s.index][0] + s.a == s.lo for s in b.segments)


def _subgroup_worker(rank, world):
    """World of 4: DP groups {0, 1} and {2, 3} (other gradients each), model-parallel pairs {0, 2}, {1, 3}."""
    import torch.distributed as dist

    dp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    mp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    out = {}
    for zero in (False, True):
        named = _named()
        opt = FlatAdamW(named, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, shards=2 if zero else 1, shard_rank=rank % 2 if zero else 0,
                        group=dp, dp_size=2, bucket_mb=2 * 4 / 2**20, overlap=True)
        norms = []
        for _ in range(2):
            opt.zero_grad()
            _backward(named, [g + rank for g in _grads()])
            opt.finish_grad_sync()
            norms.append(opt.clip_grad_norm_(0.0, group=mp))
            opt.step(0.01)
        out[zero] = {"params": [p.detach().numpy().copy() for _, p in named[:2]], "norms": norms, "early": opt.started_in_backward}
    return out


def test_dp_groups_smaller_than_the_world_reduce_only_within_themselves():
    results = run_distributed(_subgroup_worker, 4)
    start = [p.detach().clone() for _, p in _named()[:2]]
    means = [[g + 0.5 for g in _grads()], [g + 2.5 for g in _grads()]]  # ranks 0, 1 and ranks 2, 3
    refs = [_adamw_reference(start, grads, 0.01, (0.8, 0.9), 1e-6, 0.1, [1.0, 0.0], 2)[0] for grads in means]
    both = math.sqrt(sum(float(torch.cat([g.reshape(-1) for g in grads]).norm()) ** 2 for grads in means))
    for rank, per in enumerate(results):
        for zero, r in per.items():
            assert r["early"] == 5, (rank, zero)  # every bucket started during backward
            assert r["norms"] == pytest.approx([both] * 2, rel=1e-6), (rank, zero)
            for got, want in zip(r["params"], refs[rank // 2]):
                torch.testing.assert_close(torch.from_numpy(got).double(), want, rtol=1e-5, atol=1e-6)


def test_buffers_and_state_live_on_the_parameters_device():
    """Parameters on the meta device (no memory; any non-default device would do): every buffer,
    the moments and the fp32 master copy are built there, not on the default device."""
    named = [("w", torch.nn.Parameter(torch.zeros(4, 3, device="meta", dtype=torch.bfloat16)))]
    opt = FlatAdamW(named, param_dtype=torch.bfloat16)
    assert {t.device.type for t in (opt.flat, opt.grad, opt.master, opt.exp_avg, opt.exp_avg_sq, named[0][1])} == {"meta"}
    assert opt.state_bytes() == 12 * 12  # fp32 moments and master weights




def test_flat_adamw_equals_torch_adamw_with_no_decay_groups():
    torch.manual_seed(0)
    shapes = {"blocks.0.fc.weight": (5, 3), "blocks.0.fc.bias": (5,), "cls_token": (1, 1, 3), "norm.weight": (3,)}
    mine = {n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()}
    ref = {n: torch.nn.Parameter(p.detach().clone()) for n, p in mine.items()}
    opt = FlatAdamW(mine.items(), betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([{"params": [ref["blocks.0.fc.weight"]], "weight_decay": 0.1},
                                 {"params": [ref[n] for n in shapes if n != "blocks.0.fc.weight"], "weight_decay": 0.0}],
                                lr=1.0, betas=(0.9, 0.95), eps=1e-8)
    for step in range(4):
        lr = lr_at(step, 1e-2, 2, 4)
        grads = {n: torch.randn(s) for n, s in shapes.items()}
        opt.zero_grad()
        sum((mine[n] * grads[n]).sum() for n in shapes).backward()  # into the flat gradient buffer
        for n in shapes:
            ref[n].grad = grads[n].clone()
        opt.finish_grad_sync()
        opt.step(lr)
        for g in ref_opt.param_groups:
            g["lr"] = lr
        ref_opt.step()
    for n in shapes:
        assert torch.allclose(mine[n], ref[n], atol=1e-6), n


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 4, 14, min_lr=0.1) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lr_at(100, 1.0, 4, 14, min_lr=0.1) == pytest.approx(0.1)


def test_clip_counts_masked_elements_once():
    grad = torch.tensor([3.0, 4.0, 12.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])  # element 2 is a replica held (and counted) elsewhere
    norm = clip_grad_norm_([grad], (grad**2 * mask).sum(), max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(grad, torch.tensor([3.0, 4.0, 12.0, 0.0]) / (5.0 + 1e-6))


def test_loss_scaler_skips_overflow_and_halves():
    scaler = LossScaler(enabled=True, init_scale=8.0, growth_interval=2)
    assert not scaler.unscale_and_check(torch.tensor([1.0, float("inf")]))
    assert scaler.scale == 4.0
    g = torch.tensor([8.0])
    assert scaler.unscale_and_check(g) and g.item() == 2.0
    assert scaler.unscale_and_check(torch.tensor([1.0])) and scaler.scale == 8.0


def test_gradient_buffer_is_fp32_whatever_torch_default_dtype_is():
    """The fp32 gradient and master buffers do not follow torch's default dtype (a float64 default,
    as set for reference checks, would otherwise double the gradient memory and change the sums)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = FlatAdamW([("w", torch.nn.Parameter(torch.ones(3, 2, dtype=torch.float32)))])
    finally:
        torch.set_default_dtype(previous)
    assert opt.grad.dtype == torch.float32 and opt.flat.dtype == torch.float32


def test_more_gradients_than_announced_micro_batches_is_one_named_error():
    """A parameter that receives a gradient after its micro-batches are all in (its bucket may be
    reduced already) fails naming the parameter, the count announced, and the way out."""
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = FlatAdamW([("block.w", w)])
    opt.zero_grad(micro_batches=1)
    (w * 2).sum().backward()
    with pytest.raises(RuntimeError) as err:
        (w * 3).sum().backward()
    msg = str(err.value)
    assert "block.w" in msg and "than the 1 micro-batches announced" in msg and "--no-overlap-grad-reduce" in msg and "\n" not in msg
