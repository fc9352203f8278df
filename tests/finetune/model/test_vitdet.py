"""ViTDet adaptation: pyramid shapes per preset, window vs global attention, position-table
resizing, loading MAE weights, layer-wise lr decay, drop-path."""

import numpy as np
import pytest
import torch

from rsscale.finetune.model.vitdet import ViTDetBackbone, drop_path, even_global_blocks, layer_id, load_pretrained, param_groups_lrd, resize_pos_embed
from rsscale.scaling.model.vit import sincos_pos_embed_2d
from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import PRESETS, get_preset


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


def small(cfg, depth=2):
    """Same patch size and head count as the preset, small width (shapes only depend on the patch)."""
    return cfg.replace(width=8 * cfg.heads, mlp=32, depth=depth, branches=min(cfg.branches, 2))


@pytest.mark.parametrize("name", list(PRESETS))
def test_pyramid_shapes_relative_to_patch(name):
    cfg = small(get_preset(name))
    p = cfg.patch_size
    size = 4 * p  # 4x4 tokens: every level has an integer size
    bb = ViTDetBackbone(cfg, img_size=size, window_size=2, out_channels=16)
    assert bb.strides == (p // 4, p // 2, p, 2 * p)
    feats = bb(torch.randn(2, 3, size, 2 * size))  # non-square input resizes the position table
    assert [tuple(f.shape) for f in feats] == [(2, 16, size // s, 2 * size // s) for s in bb.strides]
    if p == 16:
        assert bb.strides == (4, 8, 16, 32)


def test_even_global_blocks():
    assert even_global_blocks(12) == (2, 5, 8, 11)  # ViTDet's choice for ViT-B
    assert even_global_blocks(4) == (1, 3)
    assert even_global_blocks(4, 4) == (0, 1, 2, 3)
    assert even_global_blocks(8, 2) == (3, 7)


def _randomize_rel_pos(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_window_covering_the_map_equals_global_attention():
    cfg = get_preset("tiny").replace(depth=2)
    grid = 4
    size = grid * cfg.patch_size
    torch.manual_seed(0)
    windowed = ViTDetBackbone(cfg, img_size=size, window_size=grid, global_blocks=(), drop_path=0.0)
    _randomize_rel_pos(windowed)  # the same (non-zero) rel-pos tables in both
    glob = ViTDetBackbone(cfg, img_size=size, window_size=grid, global_blocks=(0, 1), drop_path=0.0)
    glob.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 3, size, size)
    a, b = windowed(x), glob(x)
    no_bias = ViTDetBackbone(cfg, img_size=size, window_size=grid, global_blocks=(), drop_path=0.0, rel_pos=False)
    no_bias.load_state_dict(windowed.state_dict(), strict=False)
    small_win = ViTDetBackbone(cfg, img_size=size, window_size=2, global_blocks=(), drop_path=0.0, rel_pos=False)
    small_win.load_state_dict(no_bias.state_dict())
    c, d = no_bias(x), small_win(x)
    for fa, fb, fc, fd in zip(a, b, c, d):
        torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
        assert (fa - fc).abs().max() > 1e-3  # the rel-pos bias is in effect
        assert (fc - fd).abs().max() > 1e-3  # smaller windows really change the result


def test_rel_pos_attention_against_direct_logits():
    """One global block's attention with the bias against logits built entry by entry."""
    from rsscale.finetune.model.vitdet import ViTDetBlock, get_rel_pos

    torch.manual_seed(0)
    blk = ViTDetBlock(16, 2, 32, 1, rel_pos_grid=3)
    _randomize_rel_pos(blk)
    gh, gw, d = 3, 2, 8  # a non-square grid: the 5-entry tables are used as they are along h, resized along w
    q, k, v = (torch.randn(1, 2, gh * gw, d) for _ in range(3))
    got = blk._attend(q, k, v, (gh, gw))
    Rh, Rw = blk.rel_pos_h[0].detach(), blk.rel_pos_w[0].detach()
    logits = torch.empty(1, 2, gh * gw, gh * gw)
    for i in range(gh * gw):
        for j in range(gh * gw):
            (hi, wi), (hj, wj) = divmod(i, gw), divmod(j, gw)
            qi = q[0, :, i]  # [heads, d]
            bias = (qi * get_rel_pos(gh, gh, Rh)[hi, hj]).sum(-1) + (qi * get_rel_pos(gw, gw, Rw)[wi, wj]).sum(-1)
            logits[0, :, i, j] = (qi * k[0, :, j]).sum(-1) / d ** 0.5 + bias
    torch.testing.assert_close(got, logits.softmax(-1) @ v, rtol=1e-5, atol=1e-5)
    # the lookup: offset dy = hi - hj selects entry dy + S - 1 of the table (no interpolation at size)
    torch.testing.assert_close(get_rel_pos(3, 3, Rh)[2, 0], Rh[4])
    torch.testing.assert_close(get_rel_pos(3, 3, Rh)[0, 2], Rh[0])
    ramp = torch.arange(5.0)[:, None]  # a table for S=3, met on a grid of 5: linearly stretched to 9
    table = get_rel_pos(5, 5, ramp)[:, :, 0]
    assert table[4, 0] > table[2, 2] > table[0, 4]
    assert float(table[2, 2]) == pytest.approx(2.0)


def test_drop_path_per_sublayer_drops_each_sublayer_alone():
    from rsscale.finetune.model.vitdet import ViTDetBlock

    torch.manual_seed(0)
    blk = ViTDetBlock(16, 2, 32, 1, drop_path=0.5, per_sublayer=True).train()
    x = torch.randn(64, 4, 16)
    y = blk(x)
    attn_only = x + blk._sublayer(x, blk.attn, None, lambda a: blk._attention(a, None)) / 0.5  # kept: rescaled
    # some samples keep only the attention update (MLP dropped): impossible when whole blocks drop
    kept_attn_only = [(y[i] - attn_only[i]).abs().max() < 1e-6 and (attn_only[i] - x[i]).abs().max() > 1e-4
                      for i in range(64)]
    assert any(kept_attn_only)
    whole = ViTDetBlock(16, 2, 32, 1, drop_path=0.5, per_sublayer=False).train()
    whole.load_state_dict(blk.state_dict())
    y = whole(x)
    unchanged = [(y[i] - x[i]).abs().max() < 1e-6 for i in range(64)]
    assert 10 < sum(unchanged) < 54  # whole blocks dropped with p = 0.5


def test_pos_embed_resize_identity_and_shape():
    table = sincos_pos_embed_2d(32, 6, 6, cls_token=True)[None]
    same = resize_pos_embed(table, (6, 6), (6, 6), has_cls=True)
    torch.testing.assert_close(same, table[:, 1:], rtol=0, atol=1e-6)
    # Upsampling keeps constants, and a column ramp stays a ramp: increasing along x, flat along y.
    const = resize_pos_embed(torch.full((1, 64, 2), 3.0), (8, 8), (12, 16), has_cls=False)
    torch.testing.assert_close(const, torch.full((1, 192, 2), 3.0))
    ramp = torch.arange(8.0).repeat(8, 1).reshape(1, 64, 1)
    up = resize_pos_embed(ramp, (8, 8), (16, 16), has_cls=False).reshape(16, 16)
    assert (up[:, 1:] > up[:, :-1]).all() and (up == up[:1]).all()
    assert abs(float(up[0, 0])) < 0.2 and abs(float(up[0, -1]) - 7) < 0.2
    with pytest.raises(ValueError, match="patch entries"):
        resize_pos_embed(table, (5, 5), (6, 6), has_cls=True)


def test_load_pretrained_mae_weights():
    from rsscale.scaling.model.mae import build_mae

    cfg = get_preset("tiny")
    mae = build_mae(cfg)
    full = {k: v.detach().clone() for k, v in mae.named_parameters()}
    bb = ViTDetBackbone(cfg, img_size=2 * cfg.img_size)
    report = load_pretrained(bb, full, cfg)
    torch.testing.assert_close(bb.blocks[1].attn[0].qkv.weight, full["blocks.1.attn.0.qkv.weight"])
    torch.testing.assert_close(bb.patch_embed.proj.weight, full["patch_embed.proj.weight"])
    expected_pos = resize_pos_embed(full["pos_embed"], (cfg.grid,) * 2, (2 * cfg.grid,) * 2, has_cls=True)
    torch.testing.assert_close(bb.pos_embed.detach(), expected_pos)
    assert "cls_token" in report["ignored"] and any(k.startswith("decoder_") for k in report["ignored"])
    assert report["unexpected"] == []
    assert report["missing"] and all(k.startswith("pyramid.") or ".rel_pos_" in k for k in report["missing"])
    bad = dict(full, **{"norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="norm.weight"):
        load_pretrained(bb, bad, cfg)


def test_layer_decay_multipliers():
    cfg = get_preset("tiny")  # depth 4
    model = torch.nn.Module()
    model.backbone = ViTDetBackbone(cfg, img_size=cfg.img_size)
    model.head = torch.nn.Conv2d(4, 4, 1)
    decay = 0.5
    groups = param_groups_lrd(model, cfg.depth, weight_decay=0.05, layer_decay=decay)
    seen = {}
    for g in groups:
        for name in g["names"]:
            seen[name] = (g["lr_scale"], g["weight_decay"])
    assert seen["backbone.patch_embed.proj.weight"] == (decay ** 5, 0.05)
    assert seen["backbone.pos_embed"] == (decay ** 5, 0.0)
    for i in range(cfg.depth):
        assert seen[f"backbone.blocks.{i}.mlp.0.fc1.weight"] == (decay ** (cfg.depth - i), 0.05)
        assert seen[f"backbone.blocks.{i}.mlp.0.fc1.bias"] == (decay ** (cfg.depth - i), 0.0)
    assert seen["backbone.norm.weight"] == (1.0, 0.0)
    assert seen["head.weight"] == (1.0, 0.05)
    assert len(seen) == sum(p.requires_grad for p in model.parameters())
    assert layer_id("backbone.pyramid.outputs.0.0.0.weight", 4) == 5


def test_drop_path():
    x = torch.ones(4000, 3)
    torch.testing.assert_close(drop_path(x, 0.3, training=False), x)
    y = drop_path(x, 0.3, training=True)
    rows = y[:, 0]
    assert ((y == 0) | torch.isclose(y, torch.tensor(1 / 0.7))).all()
    assert (y == y[:, :1]).all()  # whole samples are dropped
    assert abs(float((rows == 0).float().mean()) - 0.3) < 0.05


def _tp_backbone_outputs(rank, world_size, full, cfg, x):
    """Backbone at TP=world_size loaded from the TP=1 tensors -> its 4 pyramid outputs (numpy)."""
    state.init_parallel(tp=world_size)
    bb = ViTDetBackbone(cfg, img_size=cfg.img_size, window_size=2, drop_path=0.0, out_channels=16)
    report = load_pretrained(bb, {k: torch.from_numpy(v) for k, v in full.items()}, cfg)
    assert report["missing"] == [] and report["unexpected"] == []
    with torch.no_grad():
        return [f.numpy() for f in bb(torch.from_numpy(x))]


def test_tensor_parallel_backbone_equals_tp1():
    from distributed import run_distributed

    cfg = get_preset("tiny", depth=2, branches=2, img_size=32)
    torch.manual_seed(3)
    ref = ViTDetBackbone(cfg, img_size=32, window_size=2, drop_path=0.0, out_channels=16)
    _randomize_rel_pos(ref)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = [f.numpy() for f in ref(x)]
    full = {k: v.detach().numpy().copy() for k, v in ref.named_parameters()}
    for outputs in run_distributed(_tp_backbone_outputs, 2, full, cfg, x.numpy()):
        for got, want in zip(outputs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _load_at_tp2(rank, world_size, ckpt):
    """Rank of TP=2: the backbone loaded from the checkpoint's ModelTensors (recording which part of
    each tensor entry is read) and loaded from its full tensors cut here; the two, as numpy."""
    from rsscale.scaling.train import checkpoint

    state.init_parallel(tp=world_size)
    reads = []
    plain = checkpoint.read_local

    def recorded(folder, e, tp_rank=0, tp_size=1):
        reads.append((e["partition_dim"], tp_size))
        return plain(folder, e, tp_rank, tp_size)

    checkpoint.read_local = recorded
    weights = checkpoint.ModelTensors(ckpt)
    lazy = ViTDetBackbone(weights.cfg, img_size=weights.cfg.img_size, window_size=2, drop_path=0.0, out_channels=16)
    load_pretrained(lazy, weights, weights.cfg)
    checkpoint.read_local = plain
    cfg, full = checkpoint.load_full_state_dict(ckpt)
    eager = ViTDetBackbone(cfg, img_size=cfg.img_size, window_size=2, drop_path=0.0, out_channels=16)
    load_pretrained(eager, full, cfg)
    own = dict(eager.named_parameters())
    return reads, {n: (p.detach().numpy().copy(), own[n].detach().numpy().copy()) for n, p in lazy.named_parameters() if not n.startswith("pyramid")}


def test_a_fine_tuning_start_reads_only_each_ranks_slices(tmp_path):
    """At TP=2, loading a pretraining checkpoint reads every TP-sharded tensor as this rank's slice
    only (never whole), and gives the same weights as cutting the full tensors."""
    from distributed import run_distributed
    from builders import tiny_run

    from rsscale.scaling.train.pretrain import Trainer

    ckpt = Trainer.build(tiny_run(tmp_path / "pre", data="random", steps=1)).save()
    for reads, params in run_distributed(_load_at_tp2, 2, str(ckpt)):
        assert any(dim is not None for dim, _ in reads)
        assert all(tp_size == 2 for dim, tp_size in reads if dim is not None)  # sharded: only this rank's part
        for name, (lazy, eager) in params.items():
            if ".rel_pos_" not in name:  # new in fine-tuning: random, the same seed on both
                np.testing.assert_array_equal(lazy, eager, err_msg=name)
