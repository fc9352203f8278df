"""`rsscale bench --trace`: a Chrome trace, per-operator tables and the memory figures per rank."""

import csv
import json
import os
import subprocess
import sys

from rsscale.benchmarks.prediction import analytic as A
from rsscale.benchmarks.prediction.count import count_stage
from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout


def test_bench_trace_writes_trace_operator_table_and_memory(tmp_path):
    out = tmp_path / "trace"
    cmd = [sys.executable, "-m", "rsscale.scaling.runtime.cli", "bench", "--model", "tiny", "--micro-batch", "2", "--global-batch", "2",
           "--warmup", "0", "--steps", "1", "--trace", str(out), "--trace-steps", "1", "--no-record"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "counted" in proc.stdout
    trace = json.loads((out / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names
    with open(out / "ops_rank0.csv") as f:
        rows = list(csv.DictReader(f))
    mm = [r for r in rows if r["name"] in ("aten::mm", "aten::addmm")]
    assert mm and all(int(r["calls"]) > 0 and float(r["self_cpu_us"]) > 0 for r in mm)
    assert float(rows[0]["self_cpu_us"]) >= float(rows[-1]["self_cpu_us"])  # most expensive first
    mem = json.loads((out / "memory_rank0.json").read_text())
    assert mem["peak_allocated_bytes"] is None  # CPU: no allocator statistics, and none invented
    assert mem["counted_bytes"] == count_stage(get_preset("tiny"), A.Plan(Layout(micro_batch=2, global_batch=2), precision="fp32"), 0).as_dict()
    assert os.path.getsize(out / "ops_rank0.txt") > 0 and not (out / "memory_rank0.pickle").exists()
