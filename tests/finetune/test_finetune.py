"""`rsscale finetune` (finetune/finetune.py) end to end on a tiny synthetic set: the command line,
the model written before evaluation, nested train-fraction subsets, and data it refuses."""

import os

import pytest
from PIL import Image

from rsscale.scaling.parallel import state
from rsscale.scaling.runtime.cli import main


@pytest.fixture(scope="module", autouse=True)
def world():
    state.ensure_initialized()


@pytest.mark.parametrize("task", ["seg", "det"])
def test_cli_end_to_end(tmp_path, task):
    from rsscale.scaling.data.data import ensure_dataset
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


def test_the_shared_sections_give_async_save_and_no_record(tmp_path):
    """finetune hands its checkpointing and recording sections to the pretraining trainer whole:
    --async-save writes the same checkpoint as a save in place, and --no-record writes no store."""
    import torch
    from safetensors.torch import load_file

    from rsscale.scaling.data.data import ensure_dataset

    data = tmp_path / "data"
    ensure_dataset(data, num_pretrain=0, num_seg=3, num_det=3, size=64)
    base = ["finetune", "--task", "seg", "--dataset", "synthetic", "--data", str(data), "--steps", "2", "--global-batch", "1",
            "--crop", "32", "--channels", "16", "--save-every", "1", "--max-eval-images", "1", "--no-record", "--results", str(tmp_path / "r.db")]
    assert main(base + ["--out", str(tmp_path / "async"), "--async-save"]) == 0
    assert main(base + ["--out", str(tmp_path / "inplace")]) == 0
    assert not (tmp_path / "r.db").exists()
    for step in ("step_00000001", "step_00000002"):
        a, b = (load_file(tmp_path / run / "checkpoints" / step / "rank_00000.safetensors") for run in ("async", "inplace"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_written_before_evaluation(tmp_path, monkeypatch):
    from rsscale.finetune import finetune as T
    from rsscale.scaling.data.data import ensure_dataset
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
    from rsscale.finetune.finetune import train_subset
    from rsscale.scaling.data.data import ensure_dataset
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




def _listing(root):
    """Files under root (SQLite's -wal/-shm companions aside: reading a store may create them)."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if not f.endswith(("-wal", "-shm")))


# ------------------------------------------------------------------------- finetune reads, never writes
def test_finetune_refuses_a_folder_of_other_data_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "small" / "pretrain"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(folder / "P0.jpg")
    argv = ["finetune", "--task", "det", "--dataset", "synthetic", "--data", str(folder), "--synthetic-count", "2",
            "--steps", "1", "--global-batch", "1", "--crop", "32", "--channels", "16", "--results", str(tmp_path / "r.db")]
    assert main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rsscale finetune: error:")]
    assert len(error) == 1 and str(folder) in error[0] and "rsscale data --out" in error[0]
    assert _listing(folder) == ["P0.jpg"]


def test_fsdp_is_refused_and_zero1_reaches_the_trainer():
    """The shared DataParallel section: --fsdp (sharding the model, which the Finetuner does not do)
    is one error; ZeRO-1, buckets and overlap reach the trainer's run description as given."""
    from rsscale.finetune.finetune import FinetuneConfig, trainer_config
    from rsscale.scaling.spec.config import get_preset
    from rsscale.scaling.spec.run import DataParallel

    with pytest.raises(ValueError, match="--fsdp: fine-tuning shards the optimizer state only"):
        FinetuneConfig(task="seg", dataset="synthetic", data_parallel=DataParallel(fsdp=True))
    given = DataParallel(distributed_optimizer=True, bucket_mb=3.0, overlap_grad_reduce=False)
    options = FinetuneConfig(task="seg", dataset="synthetic", data_parallel=given)
    assert trainer_config(options, get_preset("tiny"), 10).data_parallel == given
