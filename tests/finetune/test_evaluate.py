"""A fine-tuned run is an artefact: `rsscale evaluate` reproduces the numbers its training
printed; `rsscale predict` writes masks / DOTA Task1 boxes that score, under the independent
metric code, what evaluation scored; runs that cannot be rebuilt are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rsscale.scaling.runtime.cli import main as cli

COMMON = ["--dataset", "synthetic", "--steps", "3", "--global-batch", "2", "--crop", "32", "--channels", "16", "--warmup", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from rsscale.scaling.data.data import generate

    root = tmp_path_factory.mktemp("ft")
    generate(root / "data", num_pretrain=0, num_seg=6, num_det=6, size=64)
    for task in ("seg", "det"):
        assert cli(["finetune", "--task", task, *COMMON, "--data", str(root / "data"), "--out", str(root / task),
                    "--results", str(root / "r.db")]) == 0
    return root


def _trained(runs, task) -> dict:
    m = json.loads((runs / task / "metrics.json").read_text())
    return {k: v for k, v in m.items() if isinstance(v, float) and k not in ("eval_seconds", "final_loss", "train_fraction")
            and "majority" not in k}  # (the baseline needs the training set's class counts)


@pytest.mark.parametrize("task", ["seg", "det"])
def test_evaluate_reproduces_the_training_numbers(runs, task, tmp_path, capsys):
    assert cli(["evaluate", str(runs / task), "--json", str(tmp_path / "m.json")]) == 0
    now = json.loads((tmp_path / "m.json").read_text())
    trained = _trained(runs, task)
    assert trained.keys() == now.keys() - {"eval_seconds"}
    assert all(now[k] == pytest.approx(v, nan_ok=True, abs=1e-9) for k, v in trained.items())
    assert "at training" in capsys.readouterr().err


@pytest.mark.slow  # (a TP=1 checkpoint read into TP=2: the checkpoint tests; this is the command end to end)
def test_evaluate_reads_a_tp1_run_into_tp2(runs, tmp_path):
    """Each of 2 ranks reads its TP slices of the TP=1 checkpoint: the same scores (float sums reordered)."""
    assert cli(["evaluate", str(runs / "seg"), "--nproc", "2", "--tp", "2", "--json", str(tmp_path / "m.json")]) == 0
    now, trained = json.loads((tmp_path / "m.json").read_text()), _trained(runs, "seg")
    assert all(now[k] == pytest.approx(v, nan_ok=True, abs=1e-3) for k, v in trained.items())


def test_predict_masks_score_what_evaluation_scored(runs, tmp_path):
    from rsscale.finetune.data.datasets import LOVEDA_CLASSES, LoveDADataset
    from rsscale.finetune.evaluation.metrics import SegMetric

    val = [d for d in sorted((runs / "data" / "seg" / "Val").iterdir())]
    assert cli(["evaluate", str(runs / "seg"), "--json", str(tmp_path / "m.json")]) == 0
    metric = SegMetric(len(LOVEDA_CLASSES), 255, LOVEDA_CLASSES)
    for domain in val:
        out = tmp_path / domain.name
        assert cli(["predict", str(runs / "seg"), "--images", str(domain / "images_png"), "--out", str(out)]) == 0
        data = LoveDADataset(domain)
        for i in range(len(data)):
            img, target = data[i]
            mask = np.array(Image.open(out / f"{target['image_id']}.png"))
            assert mask.shape == tuple(img.shape[1:]) and mask.max() < len(LOVEDA_CLASSES)
            assert (out / f"{target['image_id']}_color.png").is_file()
            metric.update(torch.from_numpy(mask).long()[None], target["mask"][None])
    assert 100 * metric.compute()["mIoU"] == pytest.approx(json.loads((tmp_path / "m.json").read_text())["mIoU"], abs=1e-6)


def test_predict_boxes_score_what_evaluation_scored(runs, tmp_path):
    from rsscale.finetune.data.datasets import DotaDataset
    from rsscale.finetune.data.dota_io import DotaObject, read_dota_submission
    from rsscale.finetune.evaluation.metrics import evaluate_dota

    meta = json.loads(next((runs / "det" / "checkpoints").glob("step_*/index.json")).read_text())["finetune"]
    classes = meta["classes"]
    val = runs / "data" / "det" / "val"
    assert cli(["predict", str(runs / "det"), "--images", str(val / "images"), "--out", str(tmp_path / "pred")]) == 0
    dets = read_dota_submission(tmp_path / "pred")
    data = DotaDataset(val / "images", val / "labelTxt", classes=classes)
    truth = {}
    for i in range(len(data)):
        _, t = data[i]
        truth[t["image_id"]] = [DotaObject(tuple(p.tolist()), classes[int(c)], bool(d)) for p, c, d in zip(t["polys"], t["labels"], t["difficult"])]
    ap = evaluate_dota({c: dets.get(c, []) for c in classes}, truth, classes=classes)
    assert 100 * ap["mAP"] == pytest.approx(_trained(runs, "det")["mAP"], abs=0.01)  # Task1 files keep 1 decimal
    # box for box, what the evaluation's own inference finds (mAP alone is 0 after 3 steps)
    from rsscale.finetune.model.fcos import detect_images
    from rsscale.finetune.finetune import restore
    from rsscale.scaling.parallel import state

    tuner, _ = restore(str(runs / "det"), 1)
    try:
        want, _ = detect_images(tuner.model, data, tuner.options.crop, classes, tuner.normalize, score_thr=tuner.options.score_thr,
                                max_per_image=tuner.options.max_per_image)
    finally:
        state.destroy_parallel()
    assert sum(map(len, want.values())) > 0
    for c in classes:
        got = sorted(dets.get(c, []), key=lambda r: (r[0], -r[1]))
        ref = sorted(want[c], key=lambda r: (r[0], -r[1]))
        assert [(i, round(s, 4)) for i, s, _ in got] == [(i, round(s, 4)) for i, s, _ in ref]
        assert all(np.allclose(p, q, atol=0.051) for (_, _, p), (_, _, q) in zip(got, ref))


def test_a_checkpoint_with_the_older_flat_options_still_loads(runs, tmp_path):
    """Runs written before the options were a tree kept a flat dict of argparse dests under "args"
    (layout flags only where given, launch flags, --config): each name lands on its leaf of the
    tree, names that are no option are dropped; the run rebuilds with the same options."""
    import shutil

    from rsscale.finetune.finetune import run_options

    shutil.copytree(runs / "seg", tmp_path / "old")
    for path in (tmp_path / "old" / "checkpoints").glob("step_*/index.json"):
        index = json.loads(path.read_text())
        tree = index["finetune"].pop("options")
        index["finetune"]["args"] = {**{k: v for k, v in tree.items() if k != "parallel"}, "global_batch": 2, "nproc": None, "config": None}
        path.write_text(json.dumps(index))
    old, new = run_options(str(tmp_path / "old"), 1)[0], run_options(str(runs / "seg"), 1)[0]
    assert old == new and (old.crop, old.parallel.global_batch, old.parallel.micro_batch, old.checkpointing.out) == (32, 2, 2, None)
    assert run_options(str(tmp_path / "old"), 2, tp=2)[0].parallel.tp == 2  # overrides by name, layout included
    with pytest.raises(ValueError, match="^not options of rsscale finetune: nproc$"):
        run_options(str(tmp_path / "old"), 1, nproc=2)


def test_runs_that_cannot_be_rebuilt_are_refused_in_one_line(runs, tmp_path, capsys):
    assert cli(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert cli(["pretrain", "--model", "tiny", "--data", "random", "--steps", "1", "--micro-batch", "2", "--global-batch", "2",
                "--out", str(tmp_path / "pt"), "--no-record"]) == 0
    capsys.readouterr()
    assert cli(["predict", str(tmp_path / "pt"), "--images", str(runs / "data" / "det" / "val" / "images"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "index.json: not a fine-tuning checkpoint" in err and "Traceback" not in err


def test_a_finetune_records_the_pretraining_it_starts_from(runs, tmp_path):
    """Preset, pretraining steps, images and MAE compute land with the downstream metrics (store
    tags and run config), so accuracy joins pretraining compute without hand joining."""
    from rsscale.scaling.runtime.store import ResultsStore
    from rsscale.scaling.spec.config import get_preset, mae_step_flops

    assert cli(["pretrain", "--model", "tiny", "--data", "random", "--steps", "3", "--micro-batch", "2", "--global-batch", "2",
                "--warmup", "1", "--out", str(tmp_path / "pt"), "--no-record"]) == 0
    db = tmp_path / "r.db"
    assert cli(["finetune", "--task", "seg", *COMMON, "--data", str(runs / "data"), "--checkpoint", str(tmp_path / "pt"),
                "--results", str(db)]) == 0
    store = ResultsStore(str(db))
    m = store.metrics(kind="finetune", name="mIoU").iloc[0]
    assert (m["preset"], int(m["pretrain_steps"]), int(m["pretrain_images"])) == ("tiny", 3, 6)
    assert float(m["pretrain_flops"]) == 6 * mae_step_flops(get_preset("tiny"))
    assert store.runs(kind="finetune").iloc[0]["config"]["pretrain"]["pretrain_steps"] == 3


def test_resume_without_out_is_refused_in_one_line(capsys):
    assert cli(["finetune", "--task", "seg", *COMMON, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues the run in --out" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, error", [
    (["evaluate", "runs/x", "--max-per-image", "0"], "--max-per-image (config key 'max_per_image') must be >= 1, got 0"),
    (["evaluate", "runs/x", "--timeout", "0"], "--timeout (config key 'timeout') must be > 0, got 0.0"),
    (["predict", "runs/x", "--images", "i", "--out", "o", "--score-thr", "-1"], "--score-thr (config key 'score_thr') must be >= 0, got -1.0"),
    (["predict", "runs/x", "--out", "o"], "--images is required (or the key 'images' in a --config file)"),
    (["evaluate", "--json", "m.json"], "the argument RUN is required (or the key 'run' in a --config file)"),
])
def test_a_bad_option_is_one_line_naming_its_flag(argv, error, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"rsscale {argv[0]}: error: {error}\n" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["evaluate", "runs/x", "--score-thr", "0.1", "--max-eval-images", "4", "--protocol", "dota-ms", "--tp", "2", "--sp", "--json", "m.json"],
    ["predict", "runs/x", "--images", "scenes", "--out", "preds", "--precision", "bf16", "--dp", "2"],
])
def test_the_printed_config_reads_back_to_itself(argv, tmp_path):
    import yaml

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert cli(argv + ["--print-config", str(first)]) == 0
    assert cli([argv[0], "--config", str(first), "--print-config", str(second)]) == 0
    tree = yaml.safe_load(first.read_text())
    assert tree == yaml.safe_load(second.read_text()) and tree["run"] == "runs/x" and tree["parallel"]["pp"] is None


def test_only_the_options_given_override_the_runs_own():
    from rsscale.finetune.evaluate import EvaluateConfig, RunLayout, overrides_from

    config = EvaluateConfig(run="r", score_thr=0.0, parallel=RunLayout(tp=2, sp=False))
    assert overrides_from(config) == {"score_thr": 0.0, "tp": 2, "sp": False}
    assert overrides_from(config, ()) == {"tp": 2, "sp": False}  # the layout always: it describes this launch


def test_evaluate_takes_its_run_and_options_from_a_config_file(runs, tmp_path):
    (tmp_path / "e.yaml").write_text(f"run: {runs / 'seg'}\njson: {tmp_path / 'm.json'}\nparallel: {{global_batch: 2}}\n")
    assert cli(["evaluate", "--config", str(tmp_path / "e.yaml")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["mIoU"] == pytest.approx(_trained(runs, "seg")["mIoU"], abs=1e-9)


def test_a_pipeline_layout_is_refused_in_one_line(runs, capsys):
    assert cli(["evaluate", str(runs / "seg"), "--pp", "2"]) == 2
    err = capsys.readouterr().err
    assert "--pp 2 --vpp 1: fine-tuning runs tensor and data parallel only" in err and "Traceback" not in err
