"""Segmentation and rotated-detection models on the ViTDet pyramid, sliding-window inference,
FCOS target assignment, and `rsscale finetune` end to end on a tiny synthetic set."""

import math

import pytest
import torch

from rsscale.finetune.model.fcos import RotatedFCOS, giou_loss_ltrb
from rsscale.finetune.model.seg import Segmenter, slide_inference
from rsscale.finetune.model.vitdet import ViTDetBackbone, param_groups_lrd
from rsscale.scaling.parallel import state
from rsscale.scaling.spec.config import get_preset


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
    from rsscale.scaling.data.synthetic import ensure_dataset
    from rsscale.scaling.runtime.cli import main
    from rsscale.scaling.runtime.store import ResultsStore

    data = tmp_path / "data"
    ensure_dataset(data, num_pretrain=0, num_seg=5, num_det=5, size=64)
    results = tmp_path / "results.db"
    argv = ["finetune", "--task", task, "--dataset", "synthetic", "--data", str(data), "--steps", "2", "--global-batch", "2",
            "--crop", "32", "--channels", "16", "--results", str(results), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    metrics = ResultsStore(results).metrics(kind="finetune")
    names = set(metrics["name"])
    assert ("mIoU" in names and "mIoU_majority_baseline" in names) if task == "seg" else {"mAP", "mAP_with_gt"} <= names
    assert "loss" in names
    run = ResultsStore(results).runs(kind="finetune").iloc[0]
    assert run["preset"] == "tiny" and run["status"] == "complete"
    assert (tmp_path / "out" / "metrics.json").exists() and (tmp_path / "out" / "checkpoints" / "step_00000002" / "index.json").exists()


# ----------------------------------------------------------------------------- up-front data check
def _loveda(root, n=2, size=16, mask_value=3):
    import numpy as np
    from PIL import Image

    for sub in ("images_png", "masks_png"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 100, np.uint8)).save(root / "images_png" / f"{i}.png")
        Image.fromarray(np.full((size, size), mask_value, np.uint8)).save(root / "masks_png" / f"{i}.png")
    return root


def test_data_check_names_every_bad_file(tmp_path):
    import numpy as np
    from PIL import Image

    from rsscale.finetune.data.checks import check_data
    from rsscale.finetune.data.datasets import LOVEDA_CLASSES, LoveDADataset

    good = LoveDADataset(_loveda(tmp_path / "good"))
    counts = check_data({"train": good, "val": good}, "seg", LOVEDA_CLASSES, 3)
    assert counts["val"].tolist() == [0, 0, 2 * 256, 0, 0, 0, 0]  # mask value 3 -> class 2
    bad = _loveda(tmp_path / "bad", n=4)
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(bad / "masks_png" / "0.png")  # value out of range
    Image.fromarray(np.full((8, 16), 1, np.uint8)).save(bad / "masks_png" / "1.png")  # wrong size
    (bad / "masks_png" / "2.png").unlink()  # missing label
    (bad / "images_png" / "3.png").write_bytes(b"not a png")  # undecodable image
    with pytest.raises(ValueError) as err:
        check_data({"train": good, "val": LoveDADataset(bad)}, "seg", LOVEDA_CLASSES, 3)
    msg = str(err.value)
    assert "4 sample(s)" in msg
    for i in range(4):
        assert f"{bad / 'images_png' / f'{i}.png'}" in msg
    assert "0..7" in msg and "differs from image size" in msg and "no image named 2" in msg
    with pytest.raises(ValueError, match="4 bands"):
        check_data({"train": good}, "seg", LOVEDA_CLASSES, 4)
    empty = LoveDADataset(_loveda(tmp_path / "empty", mask_value=0))  # all no-data
    with pytest.raises(ValueError, match="no valid .*pixel"):
        check_data({"train": good, "val": empty}, "seg", LOVEDA_CLASSES, 3)


def test_data_check_unknown_class_and_missing_image(tmp_path):
    from rsscale.finetune.data.checks import check_data
    from rsscale.finetune.data.datasets import DotaDataset
    from rsscale.scaling.data.synthetic import DET_CLASSES, ensure_dataset

    ensure_dataset(tmp_path / "d", num_pretrain=0, num_seg=2, num_det=10, size=64)
    val = tmp_path / "d" / "det" / "val"
    assert len(list((val / "labelTxt").glob("*.txt"))) >= 2
    label = sorted((val / "labelTxt").glob("*.txt"))[0]
    label.write_text(label.read_text() + "1 1 9 1 9 9 1 9 spaceship 0\n")
    image = sorted((val / "images").glob("*.png"))[-1]
    image.unlink()
    ds = DotaDataset(val / "images", val / "labelTxt", DET_CLASSES)
    with pytest.raises(ValueError) as err:
        check_data({"val": ds}, "det", DET_CLASSES, 3)
    msg = str(err.value)
    assert "spaceship" in msg and label.stem in msg and f"no image named {image.stem}" in msg


def test_model_written_before_evaluation(tmp_path, monkeypatch):
    from rsscale.finetune import train as T
    from rsscale.scaling.data.synthetic import ensure_dataset
    from rsscale.scaling.runtime.cli import main

    data = tmp_path / "data"
    ensure_dataset(data, num_pretrain=0, num_seg=3, num_det=3, size=64)

    def broken_eval(self, *a, **k):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(T.Finetuner, "evaluate", broken_eval)
    argv = ["finetune", "--task", "seg", "--dataset", "synthetic", "--data", str(data), "--steps", "1", "--global-batch", "1",
            "--crop", "32", "--channels", "16", "--results", str(tmp_path / "r.db"), "--out", str(tmp_path / "out")]
    assert main(argv) == 1  # "[finetune] rank 0 failed: RuntimeError: evaluation crashed"
    assert (tmp_path / "out" / "checkpoints" / "step_00000001" / "index.json").exists()


def test_train_fraction_subsets_are_nested_and_recorded(tmp_path):
    from rsscale.finetune.train import train_subset
    from rsscale.scaling.data.synthetic import ensure_dataset
    from rsscale.scaling.runtime.cli import main
    from rsscale.scaling.runtime.store import ResultsStore

    full = list(range(40))
    small, large = train_subset(full, 0.05, 0), train_subset(full, 0.25, 0)
    assert len(small.indices) == 2 and len(large.indices) == 10 and set(small.indices) <= set(large.indices)
    assert train_subset(full, 0.25, 0).indices == large.indices  # deterministic
    assert train_subset(full, 0.25, 1).indices != large.indices  # the seed picks the subset
    assert train_subset(full, 1.0, 0) is full
    data = tmp_path / "data"
    ensure_dataset(data, num_pretrain=0, num_seg=5, num_det=3, size=64)
    argv = ["finetune", "--task", "seg", "--dataset", "synthetic", "--data", str(data), "--steps", "1", "--global-batch", "1",
            "--crop", "32", "--channels", "16", "--results", str(tmp_path / "r.db"), "--train-fraction", "0.5"]
    assert main(argv) == 0
    m = ResultsStore(tmp_path / "r.db").metrics(kind="finetune")
    assert (m[m["name"] == "mIoU"]["train_fraction"] == 0.5).all()
    assert main(argv[:-1] + ["0"]) == 2  # bad fraction: a one-line error
