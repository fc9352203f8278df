"""TP=2 (and TP=2 + sequence parallelism) equals the TP=1 model: weights, loss, every gradient."""

import numpy as np
import pytest
import torch

from distributed import run_distributed
from scaling.config import get_preset
from scaling.parallel import state

# Tiny shapes; mask ratio 0.7 leaves 19 visible + cls = 20 encoder tokens (divisible by 2 and 4)
# and the decoder has 65 tokens (padded under SP), so both SP paths are exercised.
CFG = get_preset("tiny", depth=2, branches=2, mask_ratio=0.7)


def _inputs(cfg, batch=2):
    g = torch.Generator().manual_seed(123)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    noise = torch.rand(batch, cfg.num_patches, generator=g)
    return imgs, noise


def _run_model(cfg, sequence_parallel, activation_checkpointing=False):
    """Loss, and per parameter: (weight, grad, partition_dim, stride) on this rank.
    Tensors go back as numpy arrays: shared-memory tensors die with the worker process."""
    from scaling.mae import MaskedAutoencoder

    model = MaskedAutoencoder(cfg, sequence_parallel=sequence_parallel, activation_checkpointing=activation_checkpointing, seed=7)
    imgs, noise = _inputs(cfg)
    loss, pred, mask = model(imgs, noise=noise)
    loss.backward()
    params = {}
    for name, p in model.named_parameters():
        dim = p.partition_dim if state.is_tp_sharded(p) else None
        params[name] = (p.detach().numpy().copy(), None if p.grad is None else p.grad.numpy().copy(), dim, getattr(p, "partition_stride", 1))
    return loss.item(), pred.detach().numpy(), params


def _tp_worker(rank, world_size, cfg):
    state.init_parallel(tp=world_size)
    out = {"tp": _run_model(cfg, False), "sp": _run_model(cfg, True, activation_checkpointing=True)}
    from scaling.mae import MaskedAutoencoder

    errors = []
    for bad in (cfg.replace(heads=1), cfg.replace(mlp=255), cfg.replace(dec_heads=1)):
        try:
            MaskedAutoencoder(bad)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def reference():
    state.init_parallel(tp=1)
    yield _run_model(CFG, False)
    state.destroy_parallel()


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp_worker, 2, CFG)


def _full(rank_params, name):
    """Unshard weight and grad of one parameter across ranks (or rank 0's if replicated)."""
    w0, g0, dim, stride = rank_params[0][name]
    if dim is None:
        return w0, g0, [r[name][1] for r in rank_params]
    w = state.unshard_tensors([torch.from_numpy(r[name][0]) for r in rank_params], dim, stride)
    g = state.unshard_tensors([torch.from_numpy(r[name][1]) for r in rank_params], dim, stride)
    return w.numpy(), g.numpy(), None


@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_tp2_matches_tp1(reference, tp2_results, mode):
    ref_loss, ref_pred, ref_params = reference
    ranks = [r[mode] for r in tp2_results]
    for loss, pred, _ in ranks:
        assert abs(loss - ref_loss) < 1e-5
        np.testing.assert_allclose(pred, ref_pred, atol=1e-5, rtol=1e-5)
    rank_params = [r[2] for r in ranks]
    assert set(rank_params[0]) == set(ref_params)
    n_sharded = 0
    for name, (ref_w, ref_g, _, _) in ref_params.items():
        w, g, replicas = _full(rank_params, name)
        np.testing.assert_array_equal(w, ref_w, err_msg=f"weight {name}")
        if ref_g is None:
            assert g is None, name
            continue
        for rg in replicas or [g]:  # replicated params: every rank holds the full gradient
            np.testing.assert_allclose(rg, ref_g, atol=1e-5, rtol=1e-5, err_msg=f"grad {name}")
        n_sharded += replicas is None
    assert n_sharded >= 4 * CFG.depth * CFG.branches  # qkv/fc1 weights+biases, proj/fc2 weights


def test_tp_errors_name_each_problem(tp2_results):
    heads, mlp, dec = tp2_results[0]["errors"]
    assert "TP size 2 does not divide the encoder's heads = 1" in heads
    assert "TP size 2 does not divide the encoder's mlp = 255" in mlp
    assert "TP size 2 does not divide the decoder's heads = 1" in dec


def test_world_size_must_divide(reference):
    with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
        state.init_parallel(tp=2)
