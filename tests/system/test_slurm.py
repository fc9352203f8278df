"""The sbatch scripts `rsscale study --emit-slurm` writes, run end to end by a local stand-in for
sbatch/srun/scontrol (jobs run at once, in order, with SLURM_* set; afterok dependencies honoured):
a mistake in a generated script fails here, not on a cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from distributed import free_port

PLAN = """
name: s
models: [tiny]
budgets: {steps: [2]}
synthetic: {num_pretrain: 24, num_seg: 4, num_det: 2, size: 64}
heldout: {images: 4}
pretrain: {parallel: {micro_batch: 4, global_batch: 4}, num_workers: 0, optim: {warmup: 1}}
slurm: {nodes: 1, gpus_per_node: 1, cpus_per_task: 1, port: PORT}
"""

SBATCH = """#!/bin/bash
# stand-in: run the job now; --dependency=afterok:ID needs job ID to have succeeded
dep=""; script=""
for a in "$@"; do case $a in --parsable) ;; --dependency=afterok:*) dep=${a#--dependency=afterok:};; *) script=$a;; esac; done
if [ -n "$dep" ] && [ ! -f "$STANDIN/ok.$dep" ]; then echo "dependency $dep did not succeed" >&2; exit 1; fi
id=$(( $(cat "$STANDIN/next" 2>/dev/null || echo 100) + 1 )); echo $id > "$STANDIN/next"
SLURM_JOB_ID=$id SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 bash "$script" > "$STANDIN/job.$id.log" 2>&1 && touch "$STANDIN/ok.$id"
echo $id
"""
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
SLURM_PROCID=0 SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/bin/bash
[ "$1 $2" == "show hostnames" ] && echo localhost
"""


def _standin(folder):
    """The stand-in's commands in `folder`, and an environment that finds them first."""
    folder.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL), ("python", f'#!/bin/bash\nexec {sys.executable} "$@"\n')):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "STANDIN": str(folder)}
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow  # (the scripts' content: test_study.py's emit test; a script running under the stand-in: the pretrain case below)
def test_emitted_scripts_run_under_a_slurm_stand_in(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.replace("PORT", str(free_port())))
    out, study, standin = tmp_path / "slurm", tmp_path / "study", tmp_path / "standin"
    subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", "study", str(plan), "--out", str(study), "--emit-slurm", str(out)],
                   check=True, capture_output=True, timeout=300)
    env = _standin(standin)
    done = subprocess.run(["bash", str(out / "submit.sh")], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted(standin.glob("job.*.log")))
    assert done.returncode == 0 and sorted(p.name for p in standin.glob("ok.*")) == ["ok.101"], done.stderr + logs
    from rsscale.scaling.runtime.store import ResultsStore

    runs = ResultsStore(str(study / "results.db")).runs(kind="study", status="complete")
    assert [c["cell"] for c in runs["config"]] == ["pt-tiny-steps2"], logs


def test_pretrain_emit_slurm_runs_under_the_stand_in(tmp_path):
    out, standin = tmp_path / "slurm", tmp_path / "standin"
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", "pretrain", "--model", "tiny", "--data", "random", "--steps", "2",
                    "--micro-batch", "2", "--global-batch", "4", "--out", str(run),
                    "--results", str(tmp_path / "r.db"), "--emit-slurm", str(out)], check=True, capture_output=True, timeout=300)
    text = (out / "pretrain.sbatch").read_text()
    assert "--nnodes=1 --nproc-per-node=1" in text and "--resume" in text and "--emit-slurm" not in text
    text = text.replace("29500", str(free_port()))  # the default port, free on a cluster node, maybe not here
    (out / "pretrain.sbatch").write_text(text)
    env = _standin(standin)
    done = subprocess.run(["sbatch", "--parsable", str(out / "pretrain.sbatch")], env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in standin.glob("job.*.log"))
    assert done.returncode == 0 and (standin / "ok.101").exists(), logs
    assert (run / "checkpoints" / "step_00000002").is_dir()
