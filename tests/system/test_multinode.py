"""Multi-node runs proven on one box: two "nodes" of 2 processes each on this machine, i.e. two
launchers (`rsscale <command> --nproc 2 --nnodes 2 --node-rank 0|1 --rdzv-endpoint
127.0.0.1:PORT`, started together), train TP=2 x DP=2 across them exactly like one process with the
same global batch: the same per-step losses (from each run's results store) and the same final
weights (pretraining: the final checkpoints) or final metrics (fine-tuning: metrics.json).

Tolerances are test_layouts.py's / test_finetune_dist.py's: losses rel 1e-5, weights atol 1e-5.
Pretraining uses Adam eps 1e-6 as test_layouts.py does (eps 1e-8 turns rounding noise on a
gradient that is exactly zero, the attention key bias, into lr-sized steps); fine-tuning runs
without drop-path (its masks are drawn per DP rank)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from distributed import free_port

from rsscale.scaling.runtime.cli import main as cli
from rsscale.scaling.runtime.store import ResultsStore

STEPS, EVERY = 3, 2
REL, ATOL = 1e-5, 1e-5
TIMEOUT = 300  # s for both nodes together; a hung rendezvous fails the test instead of hanging it


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): the launcher's torchrun (its own session) and ranks."""
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def _two_nodes(tmp_path, name: str, argv: list[str]):
    """Start node ranks 0 and 1 of `rsscale <argv> --nproc 2 --nnodes 2` at once, a free port on
    127.0.0.1 as the rendezvous: (launcher processes, their log files, the endpoint)."""
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"{name}.node{r}.log" for r in (0, 1)]
    procs = []
    for r, log in enumerate(logs):
        cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", *argv, "--nproc", "2", "--nnodes", "2", "--node-rank", str(r),
               "--rdzv-endpoint", endpoint]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path))
    return procs, logs, endpoint


def _wait(procs, logs) -> str:
    """Both launchers' output once both exited 0 (a run past TIMEOUT is killed, launcher to ranks)."""
    deadline = time.monotonic() + TIMEOUT
    try:
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            for pid in [p.pid, *_descendants(p.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
        codes = None
    text = "".join(f"--- node {r} ---\n{log.read_text()}" for r, log in enumerate(logs))
    assert codes == [0, 0], f"two-node run failed or hung (exit codes {codes}):\n{text}"
    return text


def _losses(db) -> list[float]:
    """The per-step losses of the one complete run in a results store, in step order."""
    store = ResultsStore(str(db))
    runs = store.runs()
    assert list(runs["status"]) == ["complete"]
    m = store.metrics(name="loss", run_id=int(runs["id"].iloc[0]))
    assert list(m["step"].astype(int)) == list(range(1, STEPS + 1))
    return list(m["value"])


def _assert_same_losses(got, want):
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    print(f"\nlosses: two nodes {got}\n        one proc  {want}\n        max rel diff {worst:.2e}")
    assert got == pytest.approx(want, rel=REL, abs=0)


def _layout_logged_once(text: str, endpoint: str, tp: int, dp: int):
    line = (f"parallel layout: world 4 = 2 nodes x 2 processes; tp={tp} pp=1 dp={dp} (TP groups inside nodes); "
            f"rendezvous {endpoint} (c10d); backend gloo")
    assert text.count("parallel layout:") == 1 and line in text, text


def test_pretrain_on_two_nodes_equals_one_process(tmp_path):
    config = tmp_path / "eps.yaml"
    config.write_text("optim: {eps: 1.0e-6}\n")
    argv = ["pretrain", "--config", str(config), "--model", "tiny", "--data", "random", "--steps", str(STEPS), "--micro-batch", "2",
            "--global-batch", "8", "--lr", "2e-3", "--warmup", "1", "--save-every", str(EVERY), "--log-every", "1"]
    t0 = time.perf_counter()
    procs, logs, endpoint = _two_nodes(tmp_path, "pretrain", [*argv, "--tp", "2", "--out", str(tmp_path / "nodes"), "--results", str(tmp_path / "nodes.db")])
    assert cli([*argv, "--out", str(tmp_path / "one"), "--results", str(tmp_path / "one.db")]) == 0  # meanwhile, here
    text = _wait(procs, logs)
    print(f"\npretrain: two nodes + one process {time.perf_counter() - t0:.1f} s wall")
    _layout_logged_once(text, endpoint, tp=2, dp=2)

    _assert_same_losses(_losses(tmp_path / "nodes.db"), _losses(tmp_path / "one.db"))
    _assert_same_weights(tmp_path)


@pytest.mark.slow  # (the launch across nodes: the pretraining test above; fine-tuning TP x DP: tests/finetune/test_finetune_dist.py)
def test_finetune_on_two_nodes_equals_one_process(tmp_path):
    from rsscale.scaling.data.data import generate

    data = tmp_path / "data"
    generate(data, num_pretrain=0, num_seg=4, num_det=4, size=64)
    argv = ["finetune", "--task", "seg", "--dataset", "synthetic", "--data", str(data), "--model", "tiny", "--crop", "32", "--window", "2",
            "--channels", "16", "--drop-path", "0", "--global-batch", "4", "--lr", "1e-3", "--warmup", "1", "--steps", str(STEPS),
            "--save-every", str(EVERY), "--log-every", "1"]
    t0 = time.perf_counter()
    procs, logs, endpoint = _two_nodes(tmp_path, "finetune", [*argv, "--tp", "2", "--out", str(tmp_path / "nodes"), "--results", str(tmp_path / "nodes.db")])
    assert cli([*argv, "--out", str(tmp_path / "one"), "--results", str(tmp_path / "one.db")]) == 0
    text = _wait(procs, logs)
    print(f"\nfinetune: two nodes + one process {time.perf_counter() - t0:.1f} s wall")
    _layout_logged_once(text, endpoint, tp=2, dp=2)

    _assert_same_losses(_losses(tmp_path / "nodes.db"), _losses(tmp_path / "one.db"))
    got, want = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("nodes", "one"))
    layouts = got.pop("layout"), want.pop("layout")
    assert [(L["tp"], L["dp"]) for L in layouts] == [(2, 2), (1, 1)] and got["steps"] == STEPS
    # (4 tiles of 64 px, 3 steps: every score is 0 but final_loss, the model predicting a class the one
    # val tile lacks; the per-step losses and the weights below carry the comparison)
    got.pop("eval_seconds"), want.pop("eval_seconds")
    assert got.keys() == want.keys() and "mIoU" in want
    numbers = [k for k, v in want.items() if isinstance(v, float)]
    worst = max(abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in numbers)
    print(f"metrics.json: {len(numbers)} numbers, max rel diff {worst:.2e}; mIoU {got['mIoU']:.4f} vs {want['mIoU']:.4f}, "
          f"OA {got['OA']:.4f} vs {want['OA']:.4f}")
    assert {k: got[k] for k in numbers} == pytest.approx({k: want[k] for k in numbers}, rel=REL, abs=0)
    assert {k: v for k, v in got.items() if k not in numbers} == {k: v for k, v in want.items() if k not in numbers}
    # the final checkpoints too (encoder and head); `finetune` has no Adam eps flag, and eps 1e-8 turns
    # gradient rounding noise into a few lr-sized steps: 2 of 274,887 weights differ by up to 3.5e-5 (lr 1e-3)
    _assert_same_weights(tmp_path, atol=1e-4, stray=1e-5)


def _assert_same_weights(tmp_path, atol=ATOL, stray=0.0):
    """The two runs' final checkpoints (written by the four ranks and by one process) hold the
    same full weights: to `atol`, and to ATOL but for a fraction `stray` of the elements."""
    from rsscale.scaling.train.checkpoint import load_full_state_dict

    final = f"checkpoints/step_{STEPS:08d}"
    assert (tmp_path / "nodes" / f"checkpoints/step_{EVERY:08d}").is_dir()  # --save-every wrote one on the way
    (cfg, got), (ref_cfg, want) = load_full_state_dict(str(tmp_path / "nodes" / final)), load_full_state_dict(str(tmp_path / "one" / final))
    assert cfg == ref_cfg and got.keys() == want.keys() and len(want) > 10
    worst, key = max(((got[k] - want[k]).abs().max().item(), k) for k in want)
    over, total = sum(int(((got[k] - want[k]).abs() >= ATOL).sum()) for k in want), sum(v.numel() for v in want.values())
    print(f"weights: {len(want)} tensors, {total} elements, max abs diff {worst:.2e} (in {key}), {over} elements >= {ATOL:g}")
    assert worst < atol and over <= stray * total, f"max weight difference {worst:.2e} (in {key}); {over} of {total} elements >= {ATOL:g}"


def test_layout_line_parts_from_torchrun_env(monkeypatch):
    """The node part of init_parallel's line from torchrun's variables (no processes started)."""
    from rsscale.scaling.parallel import state
    from rsscale.scaling.runtime.launch import RENDEZVOUS

    for var in ("GROUP_WORLD_SIZE", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", RENDEZVOUS):
        monkeypatch.delenv(var, raising=False)
    assert (state._nodes_text(1), state._tp_placement(1, 1), state._rendezvous_text()) == ("1 = 1 node x 1 process", "", "none (one process)")
    monkeypatch.setenv(RENDEZVOUS, "n0:29500 (c10d)")  # inherited by a process that is no rank: not how it met anyone
    assert state._rendezvous_text() == "none (one process)"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert state._nodes_text(8) == "8 = 2 nodes x 4 processes" and state._rendezvous_text() == "n0:29500 (c10d)"
    assert (state._tp_placement(8, 4), state._tp_placement(8, 8)) == (" (TP groups inside nodes)", " (TP groups span nodes)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # nodes of unequal --nproc: rank 0's node runs 2 of the 8
    assert state._nodes_text(8) == "8 over 2 nodes (rank 0's node: 2 processes)" and state._tp_placement(8, 2) == ""
    monkeypatch.delenv(RENDEZVOUS)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert state._rendezvous_text() == "10.0.0.1:29400 (env://)"  # torchrun started by hand, or a test harness
