"""Named devices in the profiler: datasheet numbers in, the first line says which, explicit flags
win, collectives whose ranks span nodes run at the inter-node bandwidth, and a calibration is used
only on the device it was measured on."""

from __future__ import annotations

import pytest

from rsscale.benchmarks.prediction import analytic, devices
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout


@pytest.mark.parametrize("name", devices.NAMES)
def test_every_named_device_profiles_a_model_file(name, tmp_path, capsys):
    from rsscale.scaling.runtime.cli import main

    vit_h = tmp_path / "vit-h14.toml"
    vit_h.write_text("width = 1280\nheads = 16\nmlp = 5120\ndepth = 32\npatch_size = 14\n")
    precision = ["--precision", "fp16"] if name != "cpu" and "bf16" not in devices.DEVICES[name].tflops else []  # V100: no bf16
    assert main(["profile", "--model", str(vit_h), "--device", name, "--gpus", "8", "--top", "1", "--no-calibration", *precision]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    label = devices.get_device(name).label if name != "cpu" else "this CPU"
    assert first.startswith(f"device: {label}")


def test_datasheet_values_fill_only_the_flags_left_unset(capsys):
    from rsscale.scaling.runtime.cli import main

    assert main(["profile", "--model", "b12x1", "--device", "h200", "--gpus", "8", "--memory-gb", "60", "--top", "1", "--no-calibration"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "60 GiB" in first and "989.4 TFLOP/s bf16" in first and "300 GB/s in a node" in first  # 450 GB/s x 2/3
    assert "4800 GB/s memory" in first and devices.hardware(devices.DEVICES["h200"], "bf16").hbm_bytes_per_s == 4.8e12
    for d in devices.DEVICES.values():
        assert d.tflops["fp16"] > d.tflops["fp32"] > 0 and d.memory_gb > 0 and d.intra_gbs > 0 and d.inter_gbs > 0 and d.source


def test_only_the_collectives_whose_group_spans_nodes_run_at_the_network_bandwidth():
    """Megatron's rank order (TP innermost, then DP, then PP) on 16 GPUs, nodes of 8, a network
    10x slower than the links: a group spanning more than 8 ranks is 10x slower, the rest and the
    compute unchanged. DP16: the DP reduction crosses. TP4 x DP4: TP stays in a node, DP (16
    ranks) crosses. TP2 x PP2 x DP4: TP (2) and DP (8) stay, the pipeline send (2 x 2 x 4) crosses."""
    cfg = get_preset("b12x1")
    one_node = analytic.Hardware(bandwidth=300e9)
    two_nodes = analytic.Hardware(bandwidth=300e9, gpus_per_node=8, inter_bandwidth=30e9)
    for (tp, pp, dp), crossing in (((1, 1, 16), {"dp_comm_s"}), ((4, 1, 4), {"dp_comm_s"}), ((2, 2, 4), {"pp_comm_s"})):
        plan = analytic.Plan(Layout(tp=tp, pp=pp, dp=dp, micro_batch=8, global_batch=128), precision="bf16", overlap_grad_reduce=False)
        a, b = (analytic.estimate(cfg, plan, hw).time for hw in (one_node, two_nodes))
        for part in ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s"):
            assert b[part] == pytest.approx(10 * a[part] if part in crossing else a[part], rel=1e-12), (tp, pp, dp, part)
        assert all(a[part] > 0 for part in crossing) and (tp == 1 or a["tp_comm_s"] > 0)


def test_profile_multi_node_answers_in_seconds(capsys):
    import time

    from rsscale.scaling.runtime.cli import main

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

    committed = (Path(__file__).resolve().parents[3] / "reports" / "published_vs_predicted.md").read_text()
    stated = [p for p in published.POINTS if p.micro_batch is not None]
    assert len(published.POINTS) >= 3 and {p.device for p in published.POINTS} >= {"a100-80", "h100-sxm"}
    for row in published.table(stated).splitlines()[2:2 + len(stated)]:
        assert row in committed, row
