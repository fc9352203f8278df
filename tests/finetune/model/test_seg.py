"""The segmentation head on the ViTDet pyramid (finetune/model/seg.py): it learns a tiny batch,
sliding-window inference equals a pointwise model, and evaluation reports its progress."""

import re

import pytest
import torch
from builders import fit, tiny_backbone

from rsscale.finetune.model.seg import Segmenter, slide_inference
from rsscale.scaling.parallel import state


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


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




def test_segmentation_evaluation_reports_its_progress(capsys):
    import torch

    from rsscale.finetune.model.seg import evaluate_seg

    data = [(torch.zeros(3, 16, 16, dtype=torch.uint8), {"mask": torch.zeros(16, 16, dtype=torch.long)}) for _ in range(4)]
    metric = evaluate_seg(torch.nn.Conv2d(3, 2, 1), data, 16, ["a", "b"], lambda img: img.float() / 255)
    assert metric.confusion.sum() == 4 * 16 * 16
    err = capsys.readouterr().err
    assert re.search(r"\[eval\] segmentation: 4/4 images \(100 %\), .*, ETA 0 s", err), err
