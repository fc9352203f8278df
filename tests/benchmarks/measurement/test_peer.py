"""`rsscale bench --peer torch`: the PyTorch-native peer trains the same model: from the same
weights and batch, its first-step loss equals ours (one process, DDP, DTensor TP with and without
SP, torch.distributed.pipelining 1F1B and interleaved, alone, with DTensor TP, or replicated or sharded over DP, FSDP2, ZeRO-1, TP x DP on a 2-D mesh), and a
layout without a native peer is refused before anything runs. Speed is a benchmark, not tested."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed


def _first_losses(rank, world, tp, fsdp, precision="fp32", zero=False, layout=None):
    from rsscale.benchmarks.measurement.peer import NativePeer
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import Compute, DataParallel, Recording
    from rsscale.scaling.train.pretrain import TrainConfig, Trainer

    layout = layout or {}
    dp = world // tp // layout.get("pp", 1)
    config = TrainConfig(model="tiny", parallel=Layout(tp=tp, dp=dp, micro_batch=2, global_batch=4 * dp, **layout), data="random",
                         recording=Recording(record=False), compute=Compute(precision=precision), data_parallel=DataParallel(fsdp=fsdp, distributed_optimizer=zero), steps=2)
    trainer = Trainer.build(config)
    peer = NativePeer(trainer)
    out = []
    for _ in range(2):  # the second step starts from each side's own update
        native = peer.train_step(trainer._micro_batches())["loss"]
        out.append((trainer.train_step()["loss"], native))
    return (peer.kind, peer.optimizer_impl) if zero else peer.kind, out


def test_one_process_peer_trains_the_same_model():
    kind, [(ours, native), (ours2, native2)] = run_distributed(_first_losses, 1, 1, False)[0]
    assert kind == "single"
    assert native == pytest.approx(ours, rel=1e-5)
    assert native2 == pytest.approx(ours2, rel=1e-6)  # AdamW updates agree too (same lr, betas, clip, decay on matrices only: 5.6e-6 off with decay on all)


@pytest.mark.parametrize("tp, fsdp, layout, kind", [
    (1, False, {}, "ddp"),
    pytest.param(2, False, {}, "dtensor-tp", marks=pytest.mark.slow),  # the TP + SP case below runs the same DTensor TP plan and more
    (2, False, {"sp": True}, "dtensor-tp-sp"),  # tiny's 1 + 16 visible tokens: padded to 18 on both sides
    (1, False, {"pp": 2}, "pipelining-1f1b"),
    pytest.param(1, False, {"pp": 2, "vpp": 2}, "pipelining-interleaved-1f1b", marks=pytest.mark.slow),  # 1F1B's stages and loss above
    pytest.param(1, True, {}, "fsdp2", marks=pytest.mark.slow)])
def test_two_process_peers_train_the_same_model(tp, fsdp, layout, kind):
    """Same first-step loss from the same weights and batch, and the same loss after each side's
    own update (gradients, their clipping over TP shards or pipeline stages, and AdamW agree)."""
    results = run_distributed(_first_losses, 2, tp, fsdp, "fp32", False, layout)
    for got_kind, [(ours, native), (ours2, native2)] in results:
        assert got_kind == kind and native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-5)


@pytest.mark.slow  # four processes on two cores; the TP + SP and DDP cases above hold the same pieces
@pytest.mark.parametrize("sp, fsdp, kind", [(True, False, "dtensor-tp-sp+replicate"), (False, True, "dtensor-tp+fsdp2")])
def test_tp_by_dp_peers_are_dtensor_tp_on_a_2d_mesh(sp, fsdp, kind):
    """TP2 x DP2: DTensor TP over the mesh's tp dimension, FSDP2's replicate (or fully_shard) over
    its dp one; the same losses as ours on the first step and after each side's update."""
    for got_kind, [(ours, native), (ours2, native2)] in run_distributed(_first_losses, 4, 2, fsdp, "fp32", False, {"sp": sp}):
        assert got_kind == kind and native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-5)


@pytest.mark.slow  # four processes on two cores; the pipeline and DDP cases above hold the same pieces
@pytest.mark.parametrize("fsdp, kind", [(False, "pipelining-1f1b+replicate"), (True, "pipelining-1f1b+fsdp2")])
def test_pp_by_dp_peers_are_pipeline_stages_under_ddp_or_fsdp(fsdp, kind):
    """PP2 x DP2: each rank's pipeline chunk under FSDP2's replicate (or fully_shard) over its DP group inside
    torch's 1F1B; the same losses as ours on the first step and after each side's update."""
    for got_kind, [(ours, native), (ours2, native2)] in run_distributed(_first_losses, 4, 1, fsdp, "fp32", False, {"pp": 2}):
        assert got_kind == kind and native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-5)


@pytest.mark.slow  # four processes on two cores; the pipeline and TP + SP cases above hold the same pieces
@pytest.mark.parametrize("sp, kind", [(False, "pipelining-1f1b+dtensor-tp"), (True, "pipelining-1f1b+dtensor-tp-sp")])
def test_pp_by_tp_peers_are_pipeline_stages_of_dtensor_tp_chunks(sp, kind):
    """PP2 x TP2: each stage's chunk DTensor-TP over its TP group inside torch's 1F1B (torchtitan's
    PP x TP); the same losses as ours on the first step and after each side's update."""
    for got_kind, [(ours, native), (ours2, native2)] in run_distributed(_first_losses, 4, 2, False, "fp32", False, {"pp": 2, "sp": sp}):
        assert got_kind == kind and native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-5)


@pytest.mark.slow  # eight processes on two cores; the PP x TP and PP x DP cases above hold the same pieces
@pytest.mark.parametrize("fsdp, kind", [(False, "pipelining-1f1b+dtensor-tp+replicate"), (True, "pipelining-1f1b+dtensor-tp+fsdp2")])
def test_pp_by_tp_by_dp_peers_are_torchtitans_3d(fsdp, kind):
    """PP2 x TP2 x DP2: DTensor TP and FSDP2 replicate (or fully_shard) on meshes cut from one
    (pp, dp, tp) mesh, staged under torch's 1F1B; the same losses as ours on the first step and after
    each side's update."""
    for got_kind, [(ours, native), (ours2, native2)] in run_distributed(_first_losses, 8, 2, fsdp, "fp32", False, {"pp": 2}, timeout=900):
        assert got_kind == kind and native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-5)


@pytest.mark.slow  # a benchmark-only path; the peer machinery (DDP, same first loss) is the default suite's DDP case above
def test_zero1_peer_is_ddp_with_zero_redundancy_optimizer_and_updates_alike():
    """ZeRO-1 against torch's ZeroRedundancyOptimizer: the second step's loss (after each side's
    sharded AdamW update) agrees too."""
    for (kind, impl), [(ours, native), (ours2, native2)] in run_distributed(_first_losses, 2, 1, False, "fp32", True):
        assert (kind, impl) == ("ddp", "ZeroRedundancyOptimizer(fused)")
        assert native == pytest.approx(ours, rel=1e-5) and native2 == pytest.approx(ours2, rel=1e-6)


def test_a_layout_without_a_native_peer_is_refused_before_anything_runs(capsys):
    from rsscale.scaling.runtime.cli import main

    # one micro-batch on two stages: torch's 1F1B needs at least as many micro-batches as stages
    assert main(["bench", "--model", "tiny", "--pp", "2", "--micro-batch", "8", "--global-batch", "8", "--peer", "torch",
                 "--nproc", "2", "--no-record"]) == 2
    err = capsys.readouterr().err
    assert "no PyTorch-native peer" in err and "at least as many micro-batches as stages" in err and "Traceback" not in err
    assert main(["bench", "--model", "tiny", "--tp", "2", "--nproc", "4", "--distributed-optimizer", "--peer", "torch", "--no-record"]) == 2
    err = capsys.readouterr().err
    assert "TP x DP with ZeRO-1 has none here" in err and "Traceback" not in err


def test_qkv_rows_reordered_so_each_tp_shard_holds_its_heads():
    from rsscale.benchmarks.measurement.peer import _qkv_rank_major

    w = torch.arange(12.0)[:, None]  # q rows 0-3, k rows 4-7, v rows 8-11 (2 heads of 2 rows)
    shards = _qkv_rank_major(w, 2).chunk(2)
    assert shards[0].flatten().tolist() == [0, 1, 4, 5, 8, 9] and shards[1].flatten().tolist() == [2, 3, 6, 7, 10, 11]


def test_bench_records_both_sides_and_the_report_sets_them_side_by_side(tmp_path):
    from rsscale.scaling.runtime.cli import main
    from rsscale.scaling.runtime.store import ResultsStore

    db = tmp_path / "r.db"
    assert main(["bench", "--model", "tiny", "--warmup", "1", "--steps", "2", "--peer", "torch", "--results", str(db)]) == 0
    m = ResultsStore(str(db)).metrics()
    ratio = m[m["name"] == "ours_over_peer_step_time"].iloc[0]
    ours, native = (m[m["name"] == n]["value"].iloc[0] for n in ("ours_step_no_data_median_s", "peer_step_time_median_s"))
    assert ratio["peer_kind"] == "single" and ratio["value"] == pytest.approx(ours / native)
    assert m[m["name"] == "first_step_loss_abs_diff"]["value"].iloc[0] < 1e-5
    assert main(["report", "--results", str(db), "--out", str(tmp_path), "--name", "r"]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Versus PyTorch-native" in text and "| single |" in text
    assert (tmp_path / "r" / "fig_vs_native.png").stat().st_size > 0 and "fig_vs_native" in text


def test_profile_measure_with_the_peer_adds_ours_over_native_to_its_table(capsys):
    from rsscale.scaling.runtime.cli import main

    assert main(["profile", "--model", "tiny", "--gpus", "1", "--global-batch", "8", "--micro-batch", "8", "--precision", "fp32",
                 "--no-calibration", "--measure", "--max-measure", "1", "--warmup", "1", "--steps", "2", "--peer", "torch"]) == 0
    out = capsys.readouterr().out
    head, _, row = [line for line in out.splitlines() if line.startswith("| ")][:3]
    assert head.rstrip(" |").endswith("ours / native") and float(row.strip(" |").rsplit("|", 1)[1]) > 0
    assert main(["profile", "--model", "tiny", "--gpus", "1", "--peer", "torch"]) == 2  # nothing measured: one line
    assert "add --measure" in capsys.readouterr().err


def test_gpu_check_runs_the_comparison_and_summarizes_it(tmp_path):
    from rsscale.benchmarks.measurement import gpu_check

    peer_steps = [s for s in gpu_check.steps(str(tmp_path)) if s["name"].startswith("peer-")]
    assert [s["name"] for s in peer_steps] == ["peer-small", "peer-b12x1"]
    assert all("--peer" in s["cmd"] and "bf16" in s["cmd"] for s in peer_steps)
    rows = gpu_check._bench_rows({"peer_kind": "single", "peer_optimizer": "fused", "ours_step_no_data_median_s": 0.5,
                                  "peer_step_time_median_s": 0.4, "ours_over_peer_step_time": 1.25,
                                  "first_step_loss_ours": 1.0, "first_step_loss_peer": 1.0})
    assert "| ratio ours / native | 1.250 |" in rows


def test_which_pipelines_have_a_native_peer():
    """A pipeline is compared alone, over DP (replicate / fully_shard), with TP, or with both; with
    ZeRO-1 it has none, said in one line."""
    from rsscale.benchmarks.measurement.peer import native_kind, why_no_peer
    from rsscale.scaling.spec.layout import Layout
    from rsscale.scaling.spec.run import DataParallel

    pp = dict(pp=2, micro_batch=2, global_batch=8)
    assert native_kind(Layout(dp=2, **pp), DataParallel()) == "pipelining-1f1b+replicate"
    assert native_kind(Layout(dp=2, vpp=2, **pp), DataParallel(fsdp=True)) == "pipelining-interleaved-1f1b+fsdp2"
    assert native_kind(Layout(dp=1, **pp), DataParallel()) == "pipelining-1f1b"
    assert native_kind(Layout(tp=2, dp=1, sp=True, **pp), DataParallel()) == "pipelining-1f1b+dtensor-tp-sp"
    assert native_kind(Layout(tp=2, dp=2, **pp), DataParallel(fsdp=True)) == "pipelining-1f1b+dtensor-tp+fsdp2"
    assert "ZeRO-1" in why_no_peer(Layout(dp=2, **pp), DataParallel(distributed_optimizer=True))
