"""The install exposes one import namespace, `rsscale`: no bare top-level name of ours
(`kernels`, `scaling`, ...) may shadow another library's package (Hugging Face's `kernels` is
probed by transformers). Checked in a fresh interpreter outside the checkout, so the checkout
folder is not on sys.path and only the installed package can answer."""

import json
import os
import subprocess
import sys

_PROBE = r"""
import importlib.util, json, os, sys
repo = os.environ["RSSCALE_REPO"]
found = {}
for name in ["scaling", "kernels", "benchmarks", "finetune", "reports"]:  # reports/ holds no code, but the name must not resolve either
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    origin = (spec.origin or "") if spec else ""
    found[name] = any(os.path.realpath(p).startswith(repo) for p in locations + [origin] if p)
import rsscale.kernels, rsscale.scaling.runtime.cli, rsscale.scaling.runtime.store, rsscale.finetune.evaluation.metrics, rsscale.benchmarks.reporting.fit
print(json.dumps({"ours": found, "kernels": os.path.realpath(rsscale.kernels.__file__)}))
"""


def test_only_the_rsscale_namespace_is_installed(tmp_path):
    repo = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RSSCALE_REPO"] = repo
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kernels"].startswith(repo)  # rsscale.kernels is this checkout's kernels/
    assert not any(result["ours"].values()), f"bare names resolve to rsscale: {result['ours']}"


def test_console_script_runs_outside_the_checkout(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rsscale.scaling.runtime.cli", "--help"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
