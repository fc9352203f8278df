"""The analytic parameter counts in scaling.config equal the numel of the built models."""

import pytest
import torch

from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import CPU_LADDER, branch_params, get_preset, param_count


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    state.init_parallel(tp=1)
    yield
    state.destroy_parallel()


def _counts(model):
    enc = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    return enc, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CPU_LADDER + ("b12x1",))
def test_built_model_matches_formula(name):
    from rsscale.scaling.model.mae import build_mae

    cfg = get_preset(name)
    model = build_mae(cfg)
    assert _counts(model) == (param_count(cfg, "encoder"), param_count(cfg, "mae"))
    blk = model.blocks["0"]
    per_branch = sum(p.numel() for n, p in blk.named_parameters() if n.startswith(("attn.0.", "mlp.0.")))
    assert per_branch == branch_params(cfg.width, cfg.mlp, cfg.qkv_bias)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


@pytest.mark.parametrize("name", ["l12x4", "h12x4", "g12x4"])
def test_paper_sizes_on_meta_device(name):
    from rsscale.scaling.model.mae import build_mae

    cfg = get_preset(name)
    with torch.device("meta"):
        model = build_mae(cfg)
    assert _counts(model) == (param_count(cfg, "encoder"), param_count(cfg, "mae"))
    if name == "g12x4":
        assert _counts(model)[0] == 2_419_181_568
