"""The rotated FCOS detector on the ViTDet pyramid (finetune/model/fcos.py): GIoU loss and target
assignment on hand cases, and a detector that learns and predicts."""

import math

import pytest
import torch
from builders import fit, tiny_backbone

from rsscale.finetune.model.fcos import RotatedFCOS, giou_loss_ltrb
from rsscale.scaling.parallel import state


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


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
