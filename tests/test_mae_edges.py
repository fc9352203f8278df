"""MAE pieces on hand-made tensors: patch order, mask bookkeeping from given noise, the rounding
of the kept count, and the loss (plain and per-patch normalized, unbiased variance as in the
official MAE code) computed here in numpy."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rsscale.scaling.model.mae import MaskedAutoencoder, mask_from_noise, patchify, random_masking, unpatchify


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
