"""Named devices in the profiler: datasheet numbers in, the first line says which, explicit flags
win, collectives whose ranks span nodes run at the inter-node bandwidth, and a calibration is used
only on the device it was measured on."""

from __future__ import annotations

import pytest

from rsscale.benchmarks import analytic, devices
from rsscale.scaling.config import get_preset
from rsscale.scaling.layout import Layout


@pytest.mark.parametrize("name", devices.NAMES)
def test_every_named_device_profiles_a_model_file(name, tmp_path, capsys):
    from rsscale.scaling.cli import main

    vit_h = tmp_path / "vit-h14.toml"
    vit_h.write_text("width = 1280\nheads = 16\nmlp = 5120\ndepth = 32\npatch_size = 14\n")
    precision = ["--precision", "fp16"] if name != "cpu" and "bf16" not in devices.DEVICES[name].tflops else []  # V100: no bf16
    assert main(["profile", "--model", str(vit_h), "--device", name, "--gpus", "8", "--top", "1", "--no-calibration", *precision]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    label = devices.get_device(name).label if name != "cpu" else "this CPU"
    assert first.startswith(f"device: {label}")


def test_datasheet_values_fill_only_the_flags_left_unset(capsys):
    from rsscale.scaling.cli import main

    assert main(["profile", "--model", "b12x1", "--device", "h200", "--gpus", "8", "--memory-gb", "60", "--top", "1", "--no-calibration"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "60 GiB" in first and "989.4 TFLOP/s bf16" in first and "300 GB/s in a node" in first  # 450 GB/s x 2/3
    for d in devices.DEVICES.values():
        assert d.tflops["fp16"] > d.tflops["fp32"] > 0 and d.memory_gb > 0 and d.intra_gbs > 0 and d.inter_gbs > 0 and d.source


def test_a_dp_group_across_nodes_runs_at_the_network_bandwidth():
    cfg = get_preset("b12x1")
    plan = analytic.Plan(Layout(tp=1, pp=1, dp=16, micro_batch=8, global_batch=128), precision="bf16", overlap_grad_reduce=False)
    one_node = analytic.Hardware(bandwidth=300e9)
    two_nodes = analytic.Hardware(bandwidth=300e9, gpus_per_node=8, inter_bandwidth=30e9)
    a, b = analytic.estimate(cfg, plan, one_node), analytic.estimate(cfg, plan, two_nodes)
    assert a.compute_s == b.compute_s and b.comm_s == pytest.approx(10 * a.comm_s)  # only the DP reduction, 10x slower links
    tp8 = analytic.Plan(Layout(tp=8, pp=1, dp=2, micro_batch=8, global_batch=128), precision="bf16", overlap_grad_reduce=False)
    inside = analytic.estimate(cfg, tp8, two_nodes).comm_s - analytic.estimate(cfg, tp8, one_node).comm_s
    assert inside > 0  # the TP groups stay in their node; the DP group (16 ranks) crosses


def test_profile_multi_node_answers_in_seconds(capsys):
    import time

    from rsscale.scaling.cli import main

    t0 = time.time()
    assert main(["profile", "--model", "g12x4", "--device", "h100-sxm", "--nodes", "4", "--gpus-per-node", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert time.time() - t0 < 60 and "4 nodes x 8" in out and "g12x4 on 32 devices" in out


@pytest.mark.parametrize("name, machine, same", [
    ("h100-sxm", "NVIDIA H100 80GB HBM3", True), ("h100-pcie", "NVIDIA H100 80GB HBM3", False),
    ("h100-pcie", "NVIDIA H100 PCIe", True), ("a100-80", "NVIDIA A100-SXM4-80GB", True), ("a100-40", "NVIDIA A100-SXM4-80GB", False),
    ("h200", "NVIDIA H200", True), ("b200", "CPU AMD EPYC", False),
])
def test_a_calibration_counts_only_on_its_own_device(name, machine, same):
    assert devices.is_this_machine(devices.DEVICES[name], machine) is same


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="unknown device 'p100'"):
        devices.get_device("p100")
    with pytest.raises(ValueError, match="no fp8 peak|fp8"):
        devices.peak_tflops(devices.DEVICES["a100-40"], "fp8")
    with pytest.raises(ValueError, match="V100 SXM2 32GB has no bf16 peak"):
        devices.peak_tflops(devices.DEVICES["v100"], "bf16")


def test_the_committed_published_table_is_what_the_model_predicts_now():
    """reports/published_vs_predicted.md is regenerated when the model changes: its rows for the
    points with a published layout (fast to predict) equal today's predictions."""
    from pathlib import Path

    from rsscale.benchmarks import published

    committed = (Path(__file__).resolve().parents[1] / "reports" / "published_vs_predicted.md").read_text()
    stated = [p for p in published.POINTS if p.micro_batch is not None]
    assert len(published.POINTS) >= 3 and {p.device for p in published.POINTS} >= {"a100-80", "h100-sxm"}
    for row in published.table(stated).splitlines()[2:2 + len(stated)]:
        assert row in committed, row
