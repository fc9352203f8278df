"""--async-save: the background writer produces the same checkpoints as a save in place, the
training thread waits only for the host copy, and a background write that fails leaves the
previous checkpoint the newest complete one and is reported."""

from __future__ import annotations

import torch

from rsscale.scaling.runtime.cli import main
from rsscale.scaling.train import checkpoint

ARGS = ["pretrain", "--model", "tiny", "--data", "random", "--steps", "6", "--save-every", "2", "--micro-batch", "2",
        "--global-batch", "4", "--warmup", "1", "--no-record"]


def test_background_checkpoints_equal_the_ones_written_in_place(tmp_path):
    assert main(ARGS + ["--out", str(tmp_path / "sync")]) == 0
    assert main(ARGS + ["--out", str(tmp_path / "async"), "--async-save"]) == 0
    for step in (2, 4, 6):
        name = f"step_{step:08d}"
        a = checkpoint.load_full_tensors(str(tmp_path / "sync" / "checkpoints" / name))[1]
        b = checkpoint.load_full_tensors(str(tmp_path / "async" / "checkpoints" / name))[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights and AdamW moments of that step
        assert not checkpoint.problems(str(tmp_path / "async" / "checkpoints" / name))


def test_a_failed_background_write_keeps_the_previous_checkpoint_and_is_reported(tmp_path, monkeypatch, capsys):
    real = checkpoint.write_safetensors

    def fail_at_step_4(path, *a, **k):
        if "step_00000004" in path:
            raise OSError("disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(checkpoint, "write_safetensors", fail_at_step_4)
    assert main(ARGS + ["--out", str(tmp_path / "run"), "--async-save"]) == 1  # a failed run, named
    assert "background checkpoint save failed" in capsys.readouterr().err
    root = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.newest_complete(root).endswith("step_00000002")
    assert not any("step_00000004" in c for c in checkpoint.candidates(root))  # nothing half-written under the final name
