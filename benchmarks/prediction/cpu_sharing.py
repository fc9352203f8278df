"""What N single-thread processes sharing a few CPU cores add to the step-time model.

A calibration measured on CPU (`threads_per_process == 1`, benchmarks/measurement/calibrate.py) times one
process's compute and collectives inside runs of N processes on this machine. benchmarks/prediction/timemodel.py
imports this module only for such a calibration, so a GPU or datasheet prediction never loads it.

  slowdowns     compute of one process when n compute at once, over alone: the calibrated
                `concurrency` step slowdown, else time-sharing, max(1, n / cores)
  bound_by_cores  with more processes than cores the cores also bound the step: every rank's
                compute at the N-process slowdown, over N (a rank idle in the bubble lends its core)
  collective_s  a collective timed inside a world of N processes: a group's fit measured with every
                such group at once ("2@4") when there is one, interpolated by the ranks busy at once
                (`busy_stages`: the other stages' groups are idle in the fill and drain); a TP
                collective also interpolated in log(the compute before it, `tp_gap_s`) between the
                fits timed after a small and a large chunk of compute (`tp_collectives`,
                `collectives`; the chunks' one-process times in `collective_chunk_s`)
  probe_step, drift, rescaled   the calibration rescaled to probes of the machine as it is now
                (`profile --measure`; calibrate.probe takes the probes)
"""

from __future__ import annotations

import copy
import math
import statistics

KINDS = ("collectives", "tp_collectives")  # the fits timed after the large and the small chunk (calibrate.CHUNK_ROWS)


def slowdown(calib: dict, n: int, cores: int | None) -> float:
    """Factor on one process's compute time when `n` single-thread processes compute at once on
    `cores` CPU cores: calibrated (`concurrency`, measured at each --nproc) when it has n, else
    time-sharing, max(1, n / cores). 1 for one process, or when the cores are not known."""
    if n <= 1 or not cores:
        return 1.0
    return calib.get("concurrency", {}).get(str(n), max(1.0, n / cores))


def slowdowns(calib: dict, world: int, cores: int | None) -> tuple[float, float]:
    """(each rank's compute factor: every core computing, every rank's: all `world` ranks computing)."""
    return slowdown(calib, min(world, cores or world), cores), slowdown(calib, world, cores)


def bound_by_cores(out: dict, layout, stage_compute: list[float], shared: float, cores: int | None) -> None:
    """With more ranks than cores, the step's compute is at least all ranks' compute at the
    `shared` slowdown over the ranks; then it replaces the pipeline's compute and bubble in `out`
    (the communication is on both sides)."""
    W = layout.world_size
    if not cores or W <= cores:
        return
    work = layout.tp * layout.dp * layout.num_micro * sum(stage_compute) * shared / W
    if work > out["compute_s"] + out["bubble_s"]:
        out["compute_s"], out["bubble_s"] = work, 0.0


def busy_stages(L) -> float:
    """Pipeline stages computing at once, on average over a 1F1B step: each of the P stages works
    M micro-batches (in V chunks) within M + (P - 1) / V micro-batch times. P when M >> P; 1 with
    a single micro-batch, where the stages take turns."""
    return L.pp * L.num_micro / (L.num_micro + (L.pp - 1) / L.vpp)


def tp_collectives_per_block(sp: bool, recompute: str) -> int:
    """TP collectives one block launches per micro-batch (timemodel._sublayer_comm, _tp_comm): per
    sublayer 1 forward + 1 backward, under SP 2 + 6; full recompute runs the forward ones again but one."""
    forward, backward = (2, 6) if sp else (1, 1)
    return 2 * (forward + backward) + (2 * forward - 1 if recompute == "full" else 0)


def tp_gap_s(block_compute_s: float, sp: bool, recompute: str) -> float:
    """The compute before each TP collective: the block's forward, backward and recompute shared
    evenly among its TP collectives."""
    return block_compute_s / tp_collectives_per_block(sp, recompute)


def collective_s(calib: dict, op: str, nbytes: float, group: int, world: int | None = None, active: float | None = None,
                 after_s: float | None = None) -> float:
    """Calibrated latency + bytes / bandwidth of `op` over `group` processes of a run of `world`
    processes: the fit measured for a group of that size inside such a world ("2@4", every group
    at once) when the calibration has one, else the nearest calibrated group size. `active`: the
    processes busy at once on average (fewer than `world` in a pipeline's fill and drain); the
    time is interpolated linearly between the group alone (active = group) and every group at once.
    `after_s`: the one-process compute before this collective on each rank, where it is short (TP
    collectives); the ranks' arrival skew grows with it, so the time is interpolated in
    log(after_s) between the fits timed after the small and the large chunk. None: after a whole
    pass, the large chunk's."""
    if group <= 1 or nbytes <= 0:
        return 0.0
    large = _fitted_s(calib.get("collectives", {}).get(op), op, nbytes, group, world, active)
    small, chunk = calib.get("tp_collectives", {}).get(op), calib.get("collective_chunk_s")
    if after_s is None or not small or not chunk:
        return large
    lo, hi = chunk["tp_collectives"], chunk["collectives"]
    w = min(max(math.log(max(after_s, 1e-12) / lo) / math.log(hi / lo), 0.0), 1.0)
    return w * large + (1 - w) * _fitted_s(small, op, nbytes, group, world, active)


def _fitted_s(fits: dict | None, op, nbytes, group, world, active) -> float:
    if not fits:
        raise ValueError(f"the calibration has no {op} fit; run `rsscale calibrate --nproc N`")

    def time(key):
        return fits[key]["latency_s"] + nbytes / fits[key]["bandwidth_bytes_per_s"]

    alone = time(min((k for k in fits if "@" not in k), key=lambda g: abs(int(g) - group)))
    key = f"{group}@{world}"
    if key not in fits:
        return alone
    if active is None or world <= group:
        return time(key)
    share = min(max((active - group) / (world - group), 0.0), 1.0)
    return alone + share * (time(key) - alone)


# ------------------------------------------------------------------------------- probes
def probe_step(calib: dict) -> dict | None:
    """The calibrated one-process step a probe times again: the first model's largest micro-batch
    without recompute (the point the concurrency slowdown is measured at)."""
    steps = [s for s in calib.get("steps", []) if not s["recompute"] and s["model"] == calib["steps"][0]["model"]]
    return max(steps, key=lambda s: s["micro_batch"]) if steps else None


def drift(calib: dict, probes: list[dict]) -> dict:
    """{"<kind> <group>": probed over calibrated time, "compute": ...}: per collective kind and
    group, the median over ops of (sum over sizes of the probes' median time) over (sum of the
    calibrated times); one factor per kind and group, not per op, as one probe of one op is too
    noisy to stand alone. "compute": the probes' median step over the calibrated one."""
    factors = {}
    for kind in KINDS:
        ratios = {}
        for op, groups in probes[0].get(kind, {}).items():
            for key in groups:
                cal = calib.get(kind, {}).get(op, {}).get(key)
                if not cal:
                    continue
                now = [statistics.median(at_size) for at_size in zip(*(p[kind][op][key]["times"] for p in probes))]
                if sum(cal["times"]) > 0 and sum(now) > 0:
                    ratios.setdefault(key, []).append(sum(now) / sum(cal["times"]))
        factors.update({f"{kind} {key}": statistics.median(r) for key, r in ratios.items()})
    step = probe_step(calib)
    if step and all("step_s" in p for p in probes):
        factors["compute"] = statistics.median(p["step_s"] for p in probes) / step["measured_s"]
    return factors


def rescaled(calib: dict, factors: dict) -> dict:
    """A copy of `calib` with each collective fit of a kind and group scaled by its drift factor
    (latency x f, bandwidth / f) and, by "compute", every compute rate / f and every fitted
    per-pass, per-step and FSDP cost and chunk time x f (so the time model's compute and
    optimizer scale by f)."""
    out = copy.deepcopy(calib)
    for name, f in factors.items():
        if name == "compute":
            for table, key in (("gemm", "flops_per_s"), ("attention", "flops_per_s"), ("layernorm", "bytes_per_s")):
                for entry in out.get(table, []):
                    entry[key] /= f
            for part, keys in (("overhead", ("per_block_pass_s", "per_step_s")), ("fsdp", ("per_unit_s", "s_per_byte")),
                               ("collective_chunk_s", KINDS)):  # the chunks' one-process times place TP collectives between fits
                for key in keys:
                    if key in out.get(part, {}):
                        out[part][key] *= f
            continue
        kind, key = name.split()
        for groups in out.get(kind, {}).values():
            if key in groups:
                groups[key] = {**groups[key], "latency_s": groups[key]["latency_s"] * f,
                               "bandwidth_bytes_per_s": groups[key]["bandwidth_bytes_per_s"] / f}
    return out
