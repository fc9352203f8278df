"""The up-front check of fine-tuning data (finetune/data/checks.py): every bad file is named."""

import pytest

from rsscale.scaling.parallel import state


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


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
    from rsscale.scaling.data.data import ensure_dataset
    from rsscale.scaling.data.scenes import DET_CLASSES

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
