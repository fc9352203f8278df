"""MAE pieces: masking, loss on masked patches only, patchify, pipeline stages, window attention."""

from types import SimpleNamespace

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
    for fn in (lambda: model.forward_stage(None, torch.randn(1, 1, 4, 4), None),  # first stage, no noise
               lambda: stage.forward_stage(torch.randn(1, 17, cfg.width), None, torch.rand(1, 64))):  # last, no imgs
        with pytest.raises(ValueError, match="^the first and last pipeline stages need imgs and noise$"):
            fn()


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




def test_patchify_order_by_hand():
    img = torch.arange(2 * 4 * 6, dtype=torch.float64).reshape(1, 2, 4, 6)  # C=2, H=4, W=6
    x = patchify(img, 2)
    assert x.shape == (1, 6, 8)
    # patch 4 = grid row 1, col 1: pixels (h, w) in (2..3, 2..3), in (p, q, c) order
    want = [img[0, c, h, w].item() for h in (2, 3) for w in (2, 3) for c in (0, 1)]
    assert x[0, 4].tolist() == want
    assert torch.equal(unpatchify(x, 2, hw=(2, 3), chans=2), img)
    with pytest.raises(ValueError, match="do not form a 3x3 grid"):
        unpatchify(x, 2, hw=(3, 3), chans=2)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        patchify(img, 4)


def test_mask_from_noise_by_hand():
    noise = torch.tensor([[0.3, 0.1, 0.2, 0.9], [0.0, 0.8, 0.5, 0.4]])
    keep, mask, restore = mask_from_noise(noise, 2)
    assert keep.tolist() == [[1, 2], [0, 3]]
    assert mask.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0]]
    assert restore.tolist() == [[2, 0, 1, 3], [0, 3, 2, 1]]


@pytest.mark.parametrize("n,ratio,kept", [(10, 0.75, 2), (6, 0.75, 2), (4, 0.0, 4), (4, 1.0, 0), (8, 0.6, 3)])
def test_random_masking_keeps_round_n_times_one_minus_ratio(n, ratio, kept):
    x = torch.arange(n, dtype=torch.float64).reshape(1, n, 1).expand(2, n, 3).contiguous()
    noise = torch.linspace(1, 0, n).expand(2, n)  # descending: the last tokens are kept
    xm, mask, _ = random_masking(x, ratio, noise)
    assert xm.shape == (2, kept, 3) and int(mask[0].sum()) == n - kept
    assert xm[0, :, 0].tolist() == list(range(n - 1, n - 1 - kept, -1))
    with pytest.raises(ValueError, match="masking noise has shape"):
        random_masking(x, ratio, noise[:, :-1])


@pytest.mark.parametrize("norm_pix", [False, True])
def test_forward_loss_by_hand(norm_pix):
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    pred = torch.randn(2, 4, 12, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1]])
    fake = SimpleNamespace(cfg=SimpleNamespace(patch_size=2, norm_pix_loss=norm_pix))
    got = MaskedAutoencoder.forward_loss(fake, imgs, pred, mask).item()
    total, count = 0.0, 0
    im = imgs.numpy()
    for b in range(2):
        for k in range(4):
            if mask[b, k] == 0:
                continue
            i, j = divmod(k, 2)
            t = im[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].transpose(1, 2, 0).reshape(-1)  # (p, q, c)
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            total += np.mean((pred[b, k].numpy() - t) ** 2)
            count += 1
    assert got == pytest.approx(total / count, rel=1e-12)


@pytest.fixture
def one_process_world():
    from rsscale.scaling.parallel import state

    state.init_parallel(tp=1)
    yield
    state.destroy_parallel()


def test_decoder_input_is_unshuffled_tokens_plus_positions(one_process_world):
    """The first decoder block sees [cls, token of patch 0, ..., patch N-1] + decoder positions,
    where a kept patch carries its own embedded latent and a masked one the mask token."""
    from rsscale.scaling.spec.config import ViTConfig

    cfg = ViTConfig("micro", width=8, heads=2, mlp=16, depth=1, img_size=6, patch_size=2, in_chans=1,
                    dec_width=8, dec_heads=2, dec_depth=1)
    model = MaskedAutoencoder(cfg).double()
    seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0]), with_kwargs=True)
    gen = torch.Generator().manual_seed(0)
    n, v = cfg.num_patches, cfg.num_visible
    latent = torch.randn(2, 1 + v, 8, generator=gen, dtype=torch.float64)
    noise = torch.rand(2, n, generator=gen)
    keep, _, restore = mask_from_noise(noise, v)
    with torch.no_grad():
        model.forward_decoder(latent, restore)
        emb = model.decoder_embed(latent)
        for b in range(2):
            want = [emb[b, 0]] + [model.mask_token[0, 0]] * n
            for slot, patch in enumerate(keep[b].tolist()):
                want[1 + patch] = emb[b, 1 + slot]
            torch.testing.assert_close(seen[0][b], torch.stack(want) + model.decoder_pos_embed[0], rtol=0, atol=1e-12)


def test_token_init_and_seeded_forward(one_process_world):
    """cls and mask tokens start as N(0, 0.02) (the MAE paper's init); forward(generator=g)
    draws its mask from g, so equal seeds give equal losses."""
    from rsscale.scaling.spec.config import get_preset

    cfg = get_preset("tiny")
    model = MaskedAutoencoder(cfg)
    for token in (model.cls_token, model.mask_token):
        assert 0.01 < token.std().item() < 0.03 and abs(token.mean().item()) < 0.01
    imgs = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(imgs, generator=torch.Generator().manual_seed(5))
        b = model(imgs, generator=torch.Generator().manual_seed(5))
        c = model(imgs, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[2], b[2]) and a[0].item() == b[0].item() and not torch.equal(a[2], c[2])


def test_build_mae_passes_options_through():
    """build_mae(cfg, **kw) hands every option to MaskedAutoencoder: a seeded first pipeline
    stage comes back as that stage (no decoder) with the weights of the same seed."""
    from rsscale.scaling.model.mae import build_mae

    cfg = MICRO.replace(depth=2)
    stage = build_mae(cfg, post_process=False, layer_range=(0, 1), seed=3)
    ref = MaskedAutoencoder(cfg, post_process=False, layer_range=(0, 1), seed=3)
    assert not stage.post_process and list(stage.blocks) == ["0"] and not hasattr(stage, "decoder_blocks")
    got, want = dict(stage.named_parameters()), dict(ref.named_parameters())
    assert set(got) == set(want)
    for name, p in got.items():
        assert torch.equal(p, want[name]), name
    other_seed = dict(build_mae(cfg).named_parameters())
    assert not torch.equal(other_seed["blocks.0.attn.0.qkv.weight"], got["blocks.0.attn.0.qkv.weight"])  # seed 3, not 0


def test_unpatchify_square_grid_without_hw():
    """Without hw the patch grid is square: sqrt(L) x sqrt(L); a non-square L is rejected."""
    imgs = torch.randn(2, 3, 8, 8)
    patches = patchify(imgs, 2)  # 4x4 grid
    assert torch.equal(unpatchify(patches, 2), imgs)
    one = torch.randn(1, 1, 6, 6)
    assert torch.equal(unpatchify(patchify(one, 2), 2, chans=1), one)  # 3x3 grid
    with pytest.raises(ValueError, match="6 patches do not form a 2x2 grid"):
        unpatchify(patchify(torch.randn(1, 3, 4, 6), 2), 2)


@pytest.mark.parametrize("supervised", [False, True])
def test_layer_norms_use_the_configured_eps(supervised):
    """Every LayerNorm module takes cfg.ln_eps (MAE's 1e-6 by default, not torch's 1e-5), so the
    encoder norm module normalizes exactly as encoder_output does."""
    cfg = MICRO.replace(dec_depth=0, mask_ratio=0.0) if supervised else MICRO
    model = MaskedAutoencoder(cfg)
    norms = [model.norm] + ([] if supervised else [model.decoder_norm])
    assert all(n.eps == 1e-6 for n in norms)
    cfg = cfg.replace(ln_eps=0.5)
    model = MaskedAutoencoder(cfg)
    norms = [model.norm] + ([] if supervised else [model.decoder_norm])
    assert all(n.eps == 0.5 for n in norms)
    x = torch.randn(2, cfg.num_visible + 1, cfg.width, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.no_grad():
        torch.testing.assert_close(model.norm(x), model.encoder_output(x), rtol=0, atol=1e-6)


def test_interleaved_chunks_run_only_their_blocks():
    """With a list of layer ranges (interleaved 1F1B), forward_stage(chunk=k) runs only chunk k's
    blocks: two stages of two chunks each, run in schedule order, run blocks 0, 1, 2, 3 once
    each and give the full model's loss."""
    cfg = MICRO.replace(depth=4)
    full = MaskedAutoencoder(cfg, seed=1)
    a = MaskedAutoencoder(cfg, post_process=False, layer_range=[(0, 1), (2, 3)], seed=1)
    b = MaskedAutoencoder(cfg, pre_process=False, layer_range=[(1, 2), (3, 4)], seed=1)
    ran = []
    for stage in (a, b):
        for i, blk in stage.blocks.items():
            blk.register_forward_pre_hook(lambda mod, args, i=int(i): ran.append(i))
    gen = torch.Generator().manual_seed(0)
    imgs, noise = torch.randn(2, 1, 4, 4, generator=gen), torch.rand(2, cfg.num_patches, generator=gen)
    with torch.no_grad():
        h = a.forward_stage(None, imgs, noise, chunk=0)
        assert ran == [0] and h.shape == a.hidden_shape(2)
        h = b.forward_stage(h, chunk=0)
        h = a.forward_stage(h, chunk=1)
        assert ran == [0, 1, 2] and h.shape == a.hidden_shape(2)
        loss, pred, mask = b.forward_stage(h, imgs, noise, chunk=1)
        assert ran == [0, 1, 2, 3]
        ref_loss, ref_pred, ref_mask = full(imgs, noise=noise)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)


def test_forward_encoder_then_decoder_and_loss_is_forward():
    """forward_encoder(imgs, noise) -> (latent of cls + the visible patches [B, 1+V, D], mask,
    ids_restore as mask_from_noise gives them); feeding it to forward_decoder and forward_loss
    reproduces forward(imgs, noise=noise) (what held-out scoring and conversion checks rely on)."""
    cfg = MICRO.replace(img_size=8, depth=2)
    model = MaskedAutoencoder(cfg, seed=2).double()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.rand(3, cfg.num_patches, generator=gen)
    with torch.no_grad():
        latent, mask, restore = model.forward_encoder(imgs, noise)
        _, want_mask, want_restore = mask_from_noise(noise, cfg.num_visible)
        assert latent.shape == (3, 1 + cfg.num_visible, cfg.width)
        assert torch.equal(mask, want_mask) and torch.equal(restore, want_restore)
        pred = model.forward_decoder(latent, restore)
        loss, ref_pred, ref_mask = model(imgs, noise=noise)
        torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-12)
        torch.testing.assert_close(model.forward_loss(imgs, pred, mask), loss, rtol=0, atol=1e-12)
    assert torch.equal(mask, ref_mask)


def test_supervised_loss_is_cross_entropy_on_image_labels():
    """Supervised (dec_depth 0, mask ratio 0): logits are the head on the normed cls token, the
    loss is the mean cross-entropy against floor(1000 * pixel mean) mod classes (by hand), and
    the mask is all zeros."""
    cfg = MICRO.replace(dec_depth=0, mask_ratio=0.0, num_classes=7)
    model = MaskedAutoencoder(cfg, seed=1).double()
    imgs = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.rand(4, cfg.num_patches)
    with torch.no_grad():
        loss, logits, mask = model(imgs, noise=noise)
        torch.testing.assert_close(logits, model.head(model.forward_encoder(imgs, noise)[0][:, 0]), rtol=0, atol=1e-12)
    labels = [int(np.floor(im.mean() * 1000)) % 7 for im in imgs.numpy()]
    assert len(set(labels)) > 1
    z = logits.numpy()
    want = np.mean([np.log(np.exp(z[b]).sum()) - z[b, labels[b]] for b in range(4)])
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert mask.shape == (4, cfg.num_patches) and not mask.any()


def test_sequence_parallel_hidden_shape_is_a_rank_chunk():
    """Under SP a stage sends its chunk of the 1+V tokens, zero-padded to a multiple of TP:
    ceil((1+V) / TP) of them; at TP=1 that is what the first stage really returns."""
    cfg = get_preset("tiny")  # 16 visible + cls = 17 tokens
    first = MaskedAutoencoder(cfg, sequence_parallel=True, post_process=False, layer_range=(0, 1))
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, cfg.num_patches)
    with torch.no_grad():
        hidden = first.forward_stage(None, imgs, noise)
    assert hidden.shape == first.hidden_shape(2) == (2, 17, cfg.width)
    for tp, n in [(2, 9), (4, 5)]:  # no blocks: builds without a TP group
        stage = MaskedAutoencoder(cfg, sequence_parallel=True, pre_process=False, post_process=False,
                                  layer_range=(0, 0), config=SimpleNamespace(tensor_model_parallel_size=tp))
        assert stage.hidden_shape(3) == (3, n, cfg.width)
        assert MaskedAutoencoder(cfg, pre_process=False, post_process=False, layer_range=(0, 0),
                                 config=SimpleNamespace(tensor_model_parallel_size=tp)).hidden_shape(3) == (3, 17, cfg.width)
