"""Any ViT shape from a model file (YAML/TOML) wherever a preset name goes: exact counts against
an independent formula and the public timm counts, the built model's numel, one-line errors for
impossible shapes, and the commands (models, pretrain, profile) taking the file."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import get_preset, mae_step_flops, param_count

VIT_L16 = "width: 1024\nheads: 16\nmlp: 4096\ndepth: 24\n"
VIT_L16_SUPERVISED = VIT_L16 + "dec_depth: 0\nmask_ratio: 0\nnum_classes: 1000\n"
VIT_H14_MAE = "width = 1280\nheads = 16\nmlp = 5120\ndepth = 32\npatch_size = 14\ndec_width = 512\ndec_depth = 8\ndec_heads = 16\n"


def vit_encoder_params(D: int, depth: int, mlp: int, patch: int, img: int = 224, chans: int = 3) -> int:
    """timm's ViT without its head, counted here by hand: patch conv, cls, pos table, per block
    2 LayerNorms + qkv + proj + fc1 + fc2 (with biases), final norm."""
    block = 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * mlp + mlp) + (mlp * D + D)
    return chans * patch * patch * D + D + D + ((img // patch) ** 2 + 1) * D + depth * block + 2 * D


@pytest.mark.parametrize("name, text, shape, timm_with_head", [
    ("vit-l16.yaml", VIT_L16, (1024, 24, 4096, 16), 304_326_632),        # timm vit_large_patch16_224 (1000-class head)
    ("vit-h14-mae.toml", VIT_H14_MAE, (1280, 32, 5120, 14), 632_045_800),  # timm vit_huge_patch14_224
    ("vit-l16-sup.yaml", VIT_L16_SUPERVISED, (1024, 24, 4096, 16), 304_326_632),  # trained supervised: timm's model, head included
])
def test_model_files_count_exactly(tmp_path, name, text, shape, timm_with_head):
    path = tmp_path / name
    path.write_text(text)
    cfg = get_preset(str(path))
    D, depth, mlp, patch = shape
    assert cfg.name == path.stem
    assert param_count(cfg, "encoder") == vit_encoder_params(D, depth, mlp, patch) == timm_with_head - (D * 1000 + 1000)
    if cfg.supervised:
        assert param_count(cfg, "mae") == timm_with_head
        tokens = (224 // patch) ** 2 + 1  # forward MACs by hand: patch conv, per block qkv/proj/MLP and the two attention products, head
        macs = (224 // patch) ** 2 * 3 * patch * patch * D + depth * (tokens * (4 * D * D + 2 * D * mlp) + 2 * tokens * tokens * D) + D * 1000
        assert mae_step_flops(cfg) == 3 * 2 * macs
    state.init_parallel(tp=1)
    try:
        from rsscale.scaling.model.mae import build_mae

        with torch.device("meta"):
            model = build_mae(cfg)
        assert sum(p.numel() for p in model.parameters()) == param_count(cfg, "mae")
    finally:
        state.destroy_parallel()


@pytest.mark.parametrize("text, message", [
    ("width: 100\nheads: 3\nmlp: 400\n", "width 100 is not divisible by heads 3"),
    ("width: 96\nheads: 4\nmlp: 384\npatch_size: 15\n", "img_size 224 is not a multiple of patch_size 15"),
    ("widht: 96\nheads: 4\nmlp: 384\n", "widht (did you mean width?)"),
    ("width: 96\nheads: 4\nmlp: 384\ndec_depth: 0\n", "dec_depth 0 (no decoder) trains supervised and needs mask_ratio 0"),
    ("heads: 4\nmlp: 384\n", "missing width"),
    ("width: 96\nheads: four\nmlp: 384\n", "heads"),
])
def test_impossible_shapes_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        get_preset(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_commands_take_a_model_file(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    wee = tmp_path / "wee.yaml"
    wee.write_text("width: 48\nheads: 3\nmlp: 96\ndepth: 2\nbranches: 2\nimg_size: 32\npatch_size: 8\ndec_width: 48\ndec_depth: 1\ndec_heads: 3\n")
    assert main(["models", "--model", str(wee)]) == 0
    assert f"{param_count(get_preset(str(wee)), 'encoder'):,}" in capsys.readouterr().out
    assert main(["pretrain", "--model", str(wee), "--data", "random", "--steps", "2", "--micro-batch", "2", "--global-batch", "2",
                 "--out", str(tmp_path / "run"), "--no-record"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
    assert main(["pretrain", "--model", str(wee), "--tp", "2", "--data", "random", "--no-record", "--out", str(tmp_path / "r2"),
                 "--nproc", "2"]) == 2  # TP 2 does not divide 3 heads: refused before launching
    assert "does not divide" in capsys.readouterr().err
    assert main(["profile", "--model", str(wee), "--gpus", "2", "--global-batch", "8", "--top", "2"]) == 0


@pytest.mark.parametrize("text", [VIT_L16_SUPERVISED, VIT_H14_MAE])
def test_profile_takes_a_model_file_on_every_named_device(tmp_path, text, capsys):
    from rsscale.benchmarks.prediction.devices import NAMES
    from rsscale.scaling.runtime.cli import main

    path = tmp_path / ("m.toml" if "=" in text else "m.yaml")
    path.write_text(text)
    from rsscale.benchmarks.prediction.devices import DEVICES

    for device in NAMES:
        precision = "fp16" if device != "cpu" and "bf16" not in DEVICES[device].tflops else "bf16"  # V100: no bf16
        assert main(["profile", "--model", str(path), "--device", device, "--gpus", "8", "--global-batch", "64", "--top", "1",
                     "--precision", precision]) == 0, device
    assert capsys.readouterr().out.count("valid layouts") == len(NAMES)


def test_a_supervised_model_trains_alike_on_one_and_two_pipeline_stages(tmp_path):
    """Supervised (dec_depth 0, mask ratio 0): every patch, a classification head, a cross-entropy
    on the pixel-derived label; the first step's loss on two pipeline stages equals one process's."""
    from rsscale.scaling.runtime.cli import main
    from rsscale.scaling.runtime.store import ResultsStore

    sup = tmp_path / "sup.yaml"
    sup.write_text("width: 32\nheads: 2\nmlp: 64\ndepth: 2\nimg_size: 32\npatch_size: 8\ndec_depth: 0\nmask_ratio: 0\nnum_classes: 10\n")
    losses = []
    for i, extra in enumerate([[], ["--nproc", "2", "--pp", "2"]]):
        db = tmp_path / f"r{i}.db"
        assert main(["pretrain", "--model", str(sup), "--data", "random", "--steps", "1", "--micro-batch", "2", "--global-batch", "4",
                     "--out", str(tmp_path / f"run{i}"), "--results", str(db), *extra]) == 0
        losses.append(ResultsStore(str(db)).metrics(name="loss")["value"].iloc[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] == pytest.approx(math.log(10), abs=0.2)  # ln(10) at the start


def test_bench_peer_refuses_a_supervised_model_in_one_line(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    sup = tmp_path / "sup.yaml"
    sup.write_text("width: 32\nheads: 2\nmlp: 64\ndepth: 2\nimg_size: 32\npatch_size: 8\ndec_depth: 0\nmask_ratio: 0\nnum_classes: 10\n")
    assert main(["bench", "--model", str(sup), "--peer", "torch", "--steps", "1", "--warmup", "0", "--micro-batch", "2",
                 "--global-batch", "2", "--no-record"]) == 2
    assert "no PyTorch-native peer for the supervised model 'sup'" in capsys.readouterr().err


def test_models_bad_format_in_a_config_file_is_one_line(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    path = tmp_path / "m.yaml"
    path.write_text("format: xml\n")
    assert main(["models", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rsscale models: error: --format (config key 'format') must be one of text, csv, got 'xml'" in err and "Traceback" not in err


def test_models_printed_config_reads_back_to_itself(tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert main(["models", "--model", "tiny", "--model", "small", "--format", "csv", "--print-config", str(first)]) == 0
    assert yaml.safe_load(first.read_text()) == {"command": "models", "format": "csv", "model": ["tiny", "small"]}
    assert main(["models", "--config", str(first), "--print-config", str(second)]) == 0
    assert yaml.safe_load(second.read_text()) == yaml.safe_load(first.read_text())
    capsys.readouterr()
    assert main(["models", "--config", str(first)]) == 0  # the file lists those two, as CSV
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["name", "tiny", "small"]
