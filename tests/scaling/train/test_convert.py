"""`rsscale convert`: official MAE / timm ViT state dicts <-> our checkpoint.

The reference is a plain-torch ViT forward written here from the published architecture
(timm's Block: pre-norm attention and MLP, exact GELU, LayerNorm eps 1e-6), fed the same
weights in the official key layout; no rsscale code is used for it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed

from rsscale.scaling.model.mae import MaskedAutoencoder
from rsscale.scaling.runtime import cli
from rsscale.scaling.spec.config import ViTConfig, get_preset
from rsscale.scaling.train.checkpoint import load_full_state_dict, shard_for
from rsscale.scaling.train.convert import export_state_dict, import_state_dict, infer_config, read_state_dict

# A small ViT shaped like ViT-B/16 (one branch, MAE decoder), fast on CPU.
WIDTH, HEADS, MLP, DEPTH, PATCH, IMG, DEC_WIDTH, DEC_DEPTH = 64, 4, 256, 2, 8, 32, 32, 1


def official_state_dict(width=WIDTH, mlp=MLP, depth=DEPTH, patch=PATCH, img=IMG, dec_width=DEC_WIDTH, dec_depth=DEC_DEPTH,
                        decoder=True, device="cpu", seed=0) -> dict[str, torch.Tensor]:
    """Random weights under models_mae.py's key names and shapes (qkv rows [q; k; v])."""
    g = torch.Generator().manual_seed(seed)
    n = (img // patch) ** 2
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, n + 1, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}

    def block(prefix, d, m):
        for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("norm2", (d,)),
                            ("mlp.fc1", (m, d)), ("mlp.fc2", (d, m))):
            if len(shape) == 2:
                shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = shape, shape[:1]
            else:
                shapes[f"{prefix}.{name}.weight"], shapes[f"{prefix}.{name}.bias"] = shape, shape

    for i in range(depth):
        block(f"blocks.{i}", width, mlp)
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    if decoder:
        shapes.update({"mask_token": (1, 1, dec_width), "decoder_pos_embed": (1, n + 1, dec_width),
                       "decoder_embed.weight": (dec_width, width), "decoder_embed.bias": (dec_width,)})
        for j in range(dec_depth):
            block(f"decoder_blocks.{j}", dec_width, 4 * dec_width)
        shapes.update({"decoder_norm.weight": (dec_width,), "decoder_norm.bias": (dec_width,),
                       "decoder_pred.weight": (patch * patch * 3, dec_width), "decoder_pred.bias": (patch * patch * 3,)})
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * (0.5 / math.sqrt(s[-1]) if len(s) > 1 else 0.1)
        out[k] = t + 1.0 if k.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else t
    return out


def plain_vit_forward(sd, imgs, heads, patch, eps=1e-6):
    """timm VisionTransformer.forward_features: [B, 1 + N, D] after the final norm."""
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    B, N, D = x.shape
    for i in range(depth):
        p = lambda name: (sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"])  # noqa: E731
        h = F.layer_norm(x, (D,), *p("norm1"), eps=eps)
        q, k, v = F.linear(h, *p("attn.qkv")).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) / math.sqrt(D // heads)).softmax(dim=-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), *p("attn.proj"))
        h = F.layer_norm(x, (D,), *p("norm2"), eps=eps)
        x = x + F.linear(F.gelu(F.linear(h, *p("mlp.fc1"))), *p("mlp.fc2"))
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=eps)


def our_encoder_forward(cfg: ViTConfig, full: dict, imgs: torch.Tensor, sequence_parallel=False) -> torch.Tensor:
    """Our MAE encoder with every patch kept in order (mask ratio 0, sorted noise); each TP rank
    loads its slice of the full tensors (`shard_for`, as training and fine-tuning do)."""
    model = MaskedAutoencoder(cfg.replace(mask_ratio=0.0), sequence_parallel=sequence_parallel)
    params = dict(model.named_parameters())
    assert set(params) == set(full)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(shard_for(full[name], p))
    noise = torch.arange(cfg.num_patches, dtype=torch.float32).expand(imgs.shape[0], -1)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, noise)
    assert mask.sum() == 0
    return latent


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    sd = official_state_dict()
    path = folder / "mae_pretrain_small.pth"
    torch.save({"model": sd, "epoch": 399}, path)  # the MAE release wraps the weights in 'model'
    return sd, str(path)


def test_mae_checkpoint_converts_and_matches_a_plain_vit(official, tmp_path):
    sd, path = official
    assert cli.main(["convert", "--from", "mae", path, "--out", str(tmp_path / "run"), "--heads", "4"]) == 0
    cfg, full = load_full_state_dict(str(tmp_path / "run"))
    assert (cfg.width, cfg.heads, cfg.mlp, cfg.depth, cfg.branches, cfg.img_size, cfg.patch_size) == (WIDTH, HEADS, MLP, DEPTH, 1, IMG, PATCH)
    assert (cfg.dec_width, cfg.dec_depth) == (DEC_WIDTH, DEC_DEPTH)
    imgs = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    ours = our_encoder_forward(cfg, full, imgs)
    ref = plain_vit_forward(sd, imgs, HEADS, PATCH)
    err = (ours - ref).abs().max().item()
    print(f"max |ours - plain ViT| = {err:.2e} (output scale {ref.abs().max().item():.2f})")
    assert ref.abs().max() > 0.5 and err < 1e-5


def _tp_worker(rank, world_size, run, imgs):
    from rsscale.scaling.parallel import state

    state.init_parallel(tp=world_size)
    cfg, full = load_full_state_dict(run)
    return [our_encoder_forward(cfg, full, imgs, sp) for sp in (False, True)]


@pytest.mark.slow  # ~25 s; the TP=1 layout check above plus test_tensor_parallel's slicing cover it
def test_converted_weights_give_the_same_forward_under_tp2_and_sp(official, tmp_path):
    """The qkv rows are cut per head by megatron's stride-3 sharding: TP=2 (and SP) ranks running
    the converted weights reproduce the plain ViT."""
    sd, path = official
    cli.main(["convert", "--from", "mae", path, "--out", str(tmp_path / "run"), "--heads", "4"])
    imgs = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    ref = plain_vit_forward(sd, imgs, HEADS, PATCH)
    for out in run_distributed(_tp_worker, 2, str(tmp_path / "run"), imgs):
        for latent in out:
            assert (latent - ref).abs().max() < 1e-5


def test_timm_file_converts_without_decoder(official, tmp_path):
    sd, _ = official
    timm_sd = {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    timm_sd.update({"head.weight": torch.zeros(10, WIDTH), "head.bias": torch.zeros(10)})  # classifier: dropped
    path = tmp_path / "vit.pth"
    torch.save(timm_sd, path)
    assert cli.main(["convert", "--from", "timm", str(path), "--out", str(tmp_path / "run"), "--heads", "4"]) == 0
    cfg, full = load_full_state_dict(str(tmp_path / "run"))
    assert (cfg.width, cfg.depth) == (WIDTH, DEPTH) and not any(k.startswith(("decoder_", "mask_token", "head")) for k in full)
    assert len(full) == len(timm_sd) - 2 and torch.equal(full["blocks.1.attn.0.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


@pytest.mark.parametrize("fmt,suffix", [("mae", ".pth"), ("timm", ".safetensors")])
def test_export_then_import_is_the_identity(official, tmp_path, fmt, suffix):
    sd, path = official
    cli.main(["convert", "--from", "mae", path, "--out", str(tmp_path / "a"), "--heads", "4"])
    out = str(tmp_path / f"exported{suffix}")
    assert cli.main(["convert", "--to", fmt, str(tmp_path / "a"), "--out", out]) == 0
    exported = read_state_dict(out)
    expected = sd if fmt == "mae" else {k: v for k, v in sd.items() if not k.startswith(("decoder_", "mask_token"))}
    assert set(exported) == set(expected) and all(torch.equal(exported[k], expected[k]) for k in expected)
    cli.main(["convert", "--from", fmt, out, "--out", str(tmp_path / "b"), "--heads", "4"])
    _, a = load_full_state_dict(str(tmp_path / "a"))
    cfg_b, b = load_full_state_dict(str(tmp_path / "b"))
    assert set(b) <= set(a) and all(torch.equal(a[k], b[k]) for k in b)
    assert len(b) == len(a) if fmt == "mae" else not any(k.startswith("decoder_") for k in b)


def _broken(sd, kind):
    sd = dict(sd)
    if kind == "missing":
        del sd["blocks.1.mlp.fc2.bias"]
        return sd, "blocks.1.mlp.fc2.bias"
    if kind == "extra":
        sd["blocks.0.attn.rel_pos_h"] = torch.zeros(3)
        return sd, "blocks.0.attn.rel_pos_h"
    sd["blocks.0.attn.proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
    return sd, "blocks.0.attn.proj.weight"


@pytest.mark.parametrize("kind", ["missing", "extra", "shape"])
def test_bad_key_is_one_line_naming_it(official, kind, tmp_path, capsys):
    sd, key = _broken(official[0], kind)
    cfg = infer_config(official[0], HEADS)
    with pytest.raises(ValueError) as e:
        import_state_dict(sd, cfg)
    assert key in str(e.value) and "\n" not in str(e.value)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    assert cli.main(["convert", "--from", "mae", str(path), "--out", str(tmp_path / "run"), "--heads", "4"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_vit_b16_maps_onto_b12x1_and_l16_onto_its_shape():
    """Full-size key/shape mapping on the meta device (no memory): ViT-B/16 + MAE decoder is the
    b12x1 preset; ViT-L/16 (24 blocks, 16 heads) gets a config of its own shape."""
    b16 = official_state_dict(768, 3072, 12, 16, 224, 512, 8, device="meta")
    cfg = infer_config(b16)
    assert cfg == get_preset("b12x1")
    ours = import_state_dict(b16, cfg)
    assert len(ours) == len(b16) and ours["blocks.11.attn.0.qkv.weight"].shape == (2304, 768)
    exported = export_state_dict(ours, cfg, "mae")["model"]
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in b16.items()}
    l16 = official_state_dict(1024, 4096, 24, 16, 224, decoder=False, device="meta")
    cfg = infer_config(l16)
    assert (cfg.width, cfg.heads, cfg.depth, cfg.mlp, cfg.branches) == (1024, 16, 24, 4096, 1)
    assert len(import_state_dict(l16, cfg)) == len(l16)


class _NotATensor:
    pass


def test_reads_mae_training_checkpoints_and_refuses_other_objects(tmp_path):
    """MAE's own checkpoints pickle {'model', 'optimizer', 'epoch', 'args': Namespace}; weights-only
    loading takes them, and names the class when a file holds anything else."""
    import argparse

    sd = {"cls_token": torch.ones(1, 1, 4)}
    torch.save({"model": sd, "epoch": 399, "args": argparse.Namespace(mask_ratio=0.75)}, tmp_path / "ckpt.pth")
    assert torch.equal(read_state_dict(str(tmp_path / "ckpt.pth"))["cls_token"], sd["cls_token"])
    torch.save({"model": sd, "extra": _NotATensor()}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="_NotATensor"):
        read_state_dict(str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("argv, needle", [
    (["--from", "mae", "w.pth", "--out", "run", "--heads", "0"], "--heads (config key 'heads') must be >= 1, got 0"),
    (["--from", "mae", "w.pth", "--out", "run", "--dec-heads", "-1"], "--dec-heads (config key 'dec_heads') must be >= 1"),
    (["w.pth", "--out", "run"], "exactly one of --from (import) and --to (export) is required"),
    (["--from", "mae", "--to", "timm", "w.pth", "--out", "run"], "not both"),
    (["--from", "mae", "w.pth"], "--out is required"),
])
def test_a_bad_option_is_one_line_naming_it(argv, needle, capsys):
    assert cli.main(["convert", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("argv", [["--from", "timm", "vit.safetensors", "--out", "runs/vit", "--heads", "16", "--model", "b12x1"],
                                  ["--to", "mae", "runs/mae-b16", "--out", "mae_b16.pth"]])
def test_the_printed_config_reads_back_to_itself(argv, tmp_path):
    import yaml

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli.main(["convert", *argv, "--print-config", str(first)]) == 0
    assert cli.main(["convert", "--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree == yaml.safe_load(second.read_text()) and tree["out"] == argv[argv.index("--out") + 1]
