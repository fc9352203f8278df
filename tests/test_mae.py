"""MAE pieces: masking, loss on masked patches only, patchify, pipeline stages, window attention."""

import numpy as np
import pytest
import torch

from rsscale.scaling.model.mae import MaskedAutoencoder, mask_from_noise, patchify, random_masking, unpatchify
from rsscale.scaling.model.vit import ParallelBlock
from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import ViTConfig, get_preset

MICRO = ViTConfig("micro", width=8, heads=2, mlp=16, depth=1, img_size=4, patch_size=2, in_chans=1, dec_width=8, dec_heads=2, dec_depth=1)


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    state.init_parallel(tp=1)
    yield
    state.destroy_parallel()


@pytest.mark.parametrize("n, ratio", [(64, 0.75), (49, 0.75), (10, 0.3)])
def test_random_masking(n, ratio):
    B, D = 5, 3
    x = torch.randn(B, n, D)
    noise = torch.rand(B, n, generator=torch.Generator().manual_seed(0))
    kept, mask, ids_restore = random_masking(x, ratio, noise)
    keep = int(round(n * (1 - ratio)))
    assert kept.shape == (B, keep, D)
    assert (mask.sum(1) == n - keep).all()
    ids_shuffle = torch.argsort(noise, dim=1)
    assert (torch.gather(ids_shuffle, 1, ids_restore) == torch.arange(n)).all()  # inverse permutation
    for b in range(B):  # kept tokens are exactly the unmasked ones, in shuffle order
        visible = torch.nonzero(mask[b] == 0).flatten()
        assert set(visible.tolist()) == set(ids_shuffle[b, :keep].tolist())
        assert torch.equal(kept[b], x[b, ids_shuffle[b, :keep]])
    assert len({tuple(m.tolist()) for m in mask}) == B  # every sample its own mask


def test_same_generator_seed_same_mask():
    cfg = get_preset("tiny")
    from rsscale.scaling.model.mae import masking_noise

    a = masking_noise(4, cfg, torch.Generator().manual_seed(5))
    b = masking_noise(4, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(mask_from_noise(a, cfg.num_visible)[1], mask_from_noise(b, cfg.num_visible)[1])


def test_patchify_round_trip():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))  # (p, p, C) order
    assert torch.equal(unpatchify(patches, 8, hw=(2, 3)), imgs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_on_masked_patches(norm_pix):
    model = MaskedAutoencoder(MICRO.replace(norm_pix_loss=norm_pix))
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(1, 1, 4, 4)).astype(np.float32)
    pred = rng.normal(size=(1, 4, 4)).astype(np.float32)
    mask = np.array([[1.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    # by hand: patch j = 2x2 block (row-major), target normalized by its mean and unbiased var
    expected = []
    for j, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        t = imgs[0, 0, r : r + 2, c : c + 2].reshape(-1).astype(np.float64)
        if norm_pix:
            t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
        if mask[0, j]:
            expected.append(np.mean((pred[0, j] - t) ** 2))
    loss = model.forward_loss(torch.from_numpy(imgs), torch.from_numpy(pred), torch.from_numpy(mask))
    assert abs(loss.item() - np.mean(expected)) < 1e-5


def test_pipeline_stages_equal_full_model():
    cfg = get_preset("tiny", depth=3)
    full = MaskedAutoencoder(cfg, seed=3)
    first = MaskedAutoencoder(cfg, post_process=False, layer_range=(0, 1), seed=3)
    last = MaskedAutoencoder(cfg, pre_process=False, layer_range=(1, 3), seed=3)
    full_params = dict(full.named_parameters())
    stage_params = {**dict(first.named_parameters()), **dict(last.named_parameters())}
    assert set(stage_params) == set(full_params)
    for name, p in stage_params.items():  # same seed -> same weights, whatever the layout
        assert torch.equal(p, full_params[name]), name
    imgs = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, cfg.num_patches)
    hidden = first.forward_stage(None, imgs, noise)
    assert hidden.shape == first.hidden_shape(2)
    loss, pred, mask = last.forward_stage(hidden, imgs, noise)
    ref_loss, ref_pred, ref_mask = full(imgs, noise=noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)


def _block_pair(window_size):
    torch.manual_seed(0)
    windowed = ParallelBlock(32, 4, 64, branches=2, window_size=window_size)
    plain = ParallelBlock(32, 4, 64, branches=2)
    plain.load_state_dict(windowed.state_dict())
    return windowed, plain


def test_window_covering_grid_equals_global():
    windowed, plain = _block_pair(window_size=4)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(windowed(x, hw=(4, 4)), plain(x), rtol=0, atol=1e-6)


def test_windows_are_independent_sequences():
    """2x2 windows on a 4x6 grid == the global block run on each window's tokens alone."""
    windowed, plain = _block_pair(window_size=2)
    x = torch.randn(2, 24, 32)
    out = windowed(x, hw=(4, 6)).view(2, 4, 6, 32)
    grid = x.view(2, 4, 6, 32)
    for r in range(0, 4, 2):
        for c in range(0, 6, 2):
            win = grid[:, r : r + 2, c : c + 2].reshape(2, 4, 32)
            torch.testing.assert_close(out[:, r : r + 2, c : c + 2].reshape(2, 4, 32), plain(win), rtol=0, atol=1e-6)
    padded, _ = _block_pair(window_size=4)  # 4x6 grid padded to 4x8: runs, keeps the shape
    assert padded(x, hw=(4, 6)).shape == x.shape


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("window_size", [None, 2])
@pytest.mark.parametrize("bf16", [False, True])
def test_recompute_same_gradients(recompute, window_size, bf16):
    """Selective (attention core) and full (block) recompute: input and parameter gradients
    equal the plain block's to 1e-5, with global and window attention, fp32 and bf16 autocast."""
    torch.manual_seed(0)
    blk = ParallelBlock(32, 4, 64, branches=2, window_size=window_size)
    again = ParallelBlock(32, 4, 64, branches=2, window_size=window_size, recompute=recompute)
    again.load_state_dict(blk.state_dict())
    x = torch.randn(2, 16, 32)
    grads = []
    for b in (blk, again):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = b(xi, hw=(4, 4))
        y.float().square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in b.parameters()])
    names = ["input"] + [n for n, _ in blk.named_parameters()]
    for n, a, b in zip(names, *grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=n)


def test_recompute_mode_is_checked():
    with pytest.raises(ValueError, match="--recompute must be one of none, selective, full"):
        ParallelBlock(32, 4, 64, recompute="attention")


def test_clear_errors():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="layer_range \\(2, 9\\) is not within the 4 encoder blocks"):
        MaskedAutoencoder(cfg, layer_range=(2, 9))
    model = MaskedAutoencoder(MICRO)
    with pytest.raises(ValueError, match="takes images \\[B, 1, 4, 4\\]"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="needs the token grid"):
        ParallelBlock(32, 4, 64, window_size=2)(torch.randn(1, 4, 32))
    stage = MaskedAutoencoder(cfg, pre_process=False, layer_range=(2, 4))
    with pytest.raises(ValueError, match="needs the previous stage's hidden states"):
        stage.forward_stage(None, torch.randn(1, 3, 64, 64), torch.rand(1, 64))


def test_recompute_flops_match_a_flop_counter():
    """What each recompute mode runs again, counted by torch's FlopCounterMode on a real forward
    + backward of the MAE, equals scaling.config.mae_step_flops's extra FLOPs per image."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import set_checkpoint_early_stop
    from torch.utils.flop_counter import FlopCounterMode

    from rsscale.scaling.spec.config import mae_step_flops

    cfg, batch = get_preset("tiny", depth=2), 2
    imgs, noise = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size), torch.rand(batch, cfg.num_patches)
    counted = {}
    for mode in ("none", "selective", "full"):
        model = MaskedAutoencoder(cfg, recompute=mode)
        # the math kernel runs attention as two bmm's, which the counter sees (not the CPU flash
        # kernel); without early stop the checkpoint reruns all of it, as the one flash op would
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), set_checkpoint_early_stop(False):
            model(imgs, noise=noise)[0].backward()
        counted[mode] = fc.get_total_flops()
    for mode in ("selective", "full"):
        assert counted[mode] - counted["none"] == batch * (mae_step_flops(cfg, mode) - mae_step_flops(cfg, "none")), mode
    assert counted["none"] < counted["selective"] < counted["full"]
