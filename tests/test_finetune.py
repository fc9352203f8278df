"""Segmentation and rotated-detection models on the ViTDet pyramid, sliding-window inference,
FCOS target assignment, and `rsscale finetune` end to end on a tiny synthetic set."""

import math

import pytest
import torch

from rsscale.finetune.det import RotatedFCOS, giou_loss_ltrb
from rsscale.finetune.seg import Segmenter, slide_inference
from rsscale.finetune.vitdet import ViTDetBackbone, param_groups_lrd
from rsscale.scaling.config import get_preset
from rsscale.scaling.parallel import state


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


def tiny_backbone(size=32):
    torch.manual_seed(0)
    return ViTDetBackbone(get_preset("tiny").replace(depth=2), img_size=size, window_size=2, drop_path=0.0, out_channels=16)


def fit(model, loss_fn, steps=8, lr=2e-3):
    opt = torch.optim.AdamW(param_groups_lrd(model, 2, layer_decay=0.9), lr=lr)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_segmenter_learns_a_tiny_batch():
    model = Segmenter(tiny_backbone(), num_classes=3, channels=16)
    imgs = torch.randn(2, 3, 32, 32)
    masks = (imgs[:, 0] > 0).long() + (imgs[:, 1] > 1).long()  # a pixelwise rule
    masks[:, :2] = 255  # ignored rows
    assert model(imgs).shape == (2, 3, 32, 32)
    losses = fit(model, lambda: model.loss(model(imgs), masks))
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_slide_inference_matches_a_pointwise_model():
    model = torch.nn.Conv2d(3, 4, 1)  # pointwise: windowed logits equal whole-image logits
    img = torch.randn(1, 3, 40, 53)
    direct = model(img)
    for crop, stride in ((16, 16), (16, 10), (64, 32)):  # exact tiling, overlap, larger than image
        torch.testing.assert_close(slide_inference(model, img, crop, stride, 4), direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        slide_inference(model, img, 16, 20, 4)


def test_giou_loss_hand_cases():
    t = torch.tensor([[2.0, 2.0, 2.0, 2.0]])  # 4x4 box around the point
    assert float(giou_loss_ltrb(t, t)) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[2.0, 2.0, 0.0 + 1e-9, 2.0]])  # left half: IoU 1/2, enclosing = union
    assert float(giou_loss_ltrb(p, t)) == pytest.approx(0.5, abs=1e-5)


def test_fcos_assignment_hand_case():
    model = RotatedFCOS(tiny_backbone(64), num_classes=2, channels=16)
    # strides 2, 4, 8, 16 -> size ranges [0,16), [16,32), [32,64), [64,inf)
    assert model.size_ranges[1] == (16.0, 32.0)
    points = [torch.tensor([[21.0, 11.0], [41.0, 11.0]]), torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2)]
    box = torch.tensor([[20.0, 10.0, 12.0, 6.0, math.pi / 2]])  # 6 wide along x, 12 tall along y
    labels, targets = model.assign(points, box, torch.tensor([1]))
    assert labels.tolist() == [1, 2]  # second point is outside: background (= num_classes)
    # point (21, 11) in the box frame (width axis along +y): lx = 1, ly = -1
    torch.testing.assert_close(targets[0], torch.tensor([7.0, 2.0, 5.0, 4.0, math.pi / 2]))
    small_box = box.clone()
    small_box[0, 2:4] = torch.tensor([40.0, 30.0])  # max distance ~20 > 16: not for level 0
    labels, _ = model.assign(points, small_box, torch.tensor([0]))
    assert labels.tolist() == [2, 2]


def test_detector_learns_and_predicts():
    torch.manual_seed(0)
    model = RotatedFCOS(tiny_backbone(32), num_classes=2, channels=16)
    imgs = torch.randn(2, 3, 32, 32)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 12.0, 5.0, 0.3]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[20.0, 16.0, 16.0, 8.0, -0.7], [8.0, 8.0, 6.0, 6.0, 0.0]]), "labels": torch.tensor([1, 0])}]
    losses = fit(model, lambda: model.loss(model(imgs), targets)["total"], steps=10, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]
    model.eval()
    preds = model.predict(model(imgs), score_thr=0.0, max_per_image=7)
    assert len(preds) == 2 and preds[0]["boxes"].shape[1] == 5 and len(preds[0]["scores"]) <= 7
    assert (preds[0]["scores"][:-1] >= preds[0]["scores"][1:]).all()
    empty = model.loss(model(imgs), [{"boxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    assert torch.isfinite(empty["total"])


@pytest.mark.parametrize("task", ["seg", "det"])
def test_cli_end_to_end(tmp_path, task):
    from rsscale.scaling.store import ResultsStore
    from rsscale.scaling.cli import main
    from rsscale.scaling.synthetic import ensure_dataset

    data = tmp_path / "data"
    ensure_dataset(data, num_pretrain=0, num_seg=5, num_det=5, size=64)
    results = tmp_path / "results.db"
    argv = ["finetune", "--task", task, "--dataset", "synthetic", "--data", str(data), "--steps", "2", "--global-batch", "2",
            "--crop", "32", "--channels", "16", "--results", str(results), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    metrics = ResultsStore(results).metrics(kind="finetune")
    names = set(metrics["name"])
    assert ("mIoU" in names and "mIoU_majority_baseline" in names) if task == "seg" else "mAP" in names
    assert "loss" in names
    run = ResultsStore(results).runs(kind="finetune").iloc[0]
    assert run["preset"] == "tiny" and run["status"] == "complete"
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "model.safetensors").exists()
