"""The dependency direction of docs/DESIGN.md ("Dependency direction"), checked on the source.

Every import statement of every module (module level or inside a function: a lazy import is a
dependency too) is parsed with `ast`; an import of an rsscale part that the importing part may
not use fails the test with the file, line and target. Inside benchmarks/, the CPU time-sharing
terms (cpu_sharing.py) are imported only where a CPU calibration is handled, and only lazily by
the time model and the profiler, so that a GPU or datasheet prediction never loads them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("kernels", "scaling", "benchmarks", "finetune")
# Inside a part, its sub-packages (or top modules), bottom first: each imports only its own and
# those before it. scaling's runtime (CLI, results store, logging, launcher, config files) imports
# no other rsscale module at all (the CLI names its commands as strings and imports them lazily).
# finetune: rotated-box geometry, data, evaluation, models, then its commands. benchmarks:
# prediction (memory, FLOPs, step time, devices), measurement (bench, peer, kernels, trace,
# calibrate, gpu-check), then the layout search and the commands that use both, and reporting
# (report, study, demo: everyone's results) on top.
LAYERS = {
    "scaling": ("runtime", "spec", "parallel", "model", "data", "train"),
    "finetune": ("rotated", "data", "evaluation", "model", "finetune", "evaluate", "predict"),
    "benchmarks": ("prediction", "measurement", "autolayout", "published", "profile", "reporting"),
}
MAY_IMPORT = {
    "kernels": {"kernels"},
    "scaling": {"kernels", "scaling"},
    "benchmarks": {"kernels", "scaling", "benchmarks", "finetune"},  # profile --task counts the fine-tuning model
    "finetune": {"kernels", "scaling", "finetune"},
}
# who may import benchmarks/prediction/cpu_sharing.py: "lazy" only inside a function; it imports no rsscale module
CPU_SHARING = "rsscale.benchmarks.prediction.cpu_sharing"
CPU_SHARING_IMPORTERS = {"rsscale.benchmarks.prediction.timemodel": "lazy", "rsscale.benchmarks.profile": "lazy",
                         "rsscale.benchmarks.measurement.calibrate": "any"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return ".".join(["rsscale", *parts])


def imported_modules(path: Path):
    """(line, rsscale module, whether the import is at module level) for every import in the file;
    `from a import b` counts a.b when b is a module of ours, else a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; write the rsscale.<part> name")
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                yield node.lineno, target if is_our_module(target) else node.module, id(node) in top


def is_our_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "rsscale" or len(parts) < 2:
        return False
    base = ROOT.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def sources():
    return sorted(p for part in PARTS for p in (ROOT / part).rglob("*.py"))


def _layer_violation(me: str, bits: list[str]) -> str | None:
    mine = me.split(".")
    layers = LAYERS.get(mine[1])
    if layers is None or mine[-1] == "__init__" or me == f"rsscale.{mine[1]}":
        return None
    if len(mine) < 3 or mine[2] not in layers:
        return f"{me} is in none of {mine[1]}/'s layers ({', '.join(layers)})"
    if mine[1:3] == ["scaling", "runtime"] and bits[1:3] != ["scaling", "runtime"]:
        return "runtime imports no other rsscale module"
    if bits[1] == mine[1] and len(bits) > 2 and bits[2] in layers and layers.index(bits[2]) > layers.index(mine[2]):
        return f"{mine[1]}.{mine[2]} is below {mine[1]}.{bits[2]}"
    return None


def violations(path: Path) -> list[str]:
    me = module_name(path)
    part = me.split(".")[1]
    out = []
    for line, target, at_top in imported_modules(path):
        bits = target.split(".")
        if bits[0] != "rsscale":
            continue
        if me == CPU_SHARING:
            out.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target} (it imports no rsscale module)")
        elif target == CPU_SHARING and CPU_SHARING_IMPORTERS.get(me) not in (("any",) if at_top else ("any", "lazy")):
            out.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target} (only {', '.join(CPU_SHARING_IMPORTERS)} may; "
                       "the time model and the profiler inside a function)")
        elif len(bits) < 2 or bits[1] not in PARTS:
            out.append(f"{path.relative_to(ROOT)}:{line} imports {target} (not an rsscale part)")
        elif (why := _layer_violation(me, bits)):
            out.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {target} ({why})")
        elif bits[1] not in MAY_IMPORT[part]:
            out.append(f"{path.relative_to(ROOT)}:{line}: {part} imports {target} (upward)")
    return out


def test_every_import_points_down():
    found = [v for p in sources() for v in violations(p)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_every_module_is_in_a_layer(part):
    loose = [p.name for p in (ROOT / part).glob("*.py") if p.name != "__init__.py" and p.stem not in LAYERS[part]]
    assert not loose, f"modules directly in {part}/, outside its layers {LAYERS[part]}: {loose}"


def test_the_checker_catches_upward_and_bottom_imports(tmp_path, monkeypatch):
    """The rule above fails on what it must fail on (so it cannot pass by parsing nothing)."""
    assert len(sources()) > 30
    cases = {
        "scaling/upward.py": "from rsscale.benchmarks import harness\n",
        "kernels/upward.py": "def f():\n    import rsscale.scaling.model.vit\n",
        "finetune/sideways.py": "from rsscale.benchmarks.prediction.analytic import estimate\n",
        "scaling/runtime/store.py": "from rsscale import kernels\n",
        "scaling/model/up.py": "from rsscale.scaling.train import optim\n",
        "scaling/loose.py": "from rsscale.scaling.model import vit\n",
        "finetune/data/up.py": "from rsscale.finetune.model import seg\n",
    }
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for part in PARTS:
        (tmp_path / part).mkdir()
        (tmp_path / part / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "harness.py").write_text("")
    for rel, code in cases.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(code)
        assert len(violations(tmp_path / rel)) == 1, rel
    (tmp_path / "benchmarks" / "reporting").mkdir()
    (tmp_path / "benchmarks" / "reporting" / "ok.py").write_text("from rsscale.finetune import rotated\nfrom rsscale import kernels\n")
    (tmp_path / "scaling" / "train").mkdir()
    (tmp_path / "scaling" / "train" / "ok.py").write_text("from rsscale.scaling.model import vit\nfrom rsscale.scaling.runtime import log\n")
    (tmp_path / "finetune" / "rotated.py").write_text("")
    assert violations(tmp_path / "benchmarks" / "reporting" / "ok.py") == [] == violations(tmp_path / "scaling" / "train" / "ok.py")
    for sub in ("prediction", "measurement"):
        (tmp_path / "benchmarks" / sub).mkdir()
        (tmp_path / "benchmarks" / sub / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "prediction" / "cpu_sharing.py").write_text("import math\n")
    lazy = "def f():\n    from rsscale.benchmarks.prediction import cpu_sharing\n"
    for rel, code, found in (("benchmarks/prediction/timemodel.py", lazy, 0), ("benchmarks/prediction/timemodel.py", "from rsscale.benchmarks.prediction.cpu_sharing import slowdown\n", 1),
                             ("benchmarks/measurement/calibrate.py", "from rsscale.benchmarks.prediction import cpu_sharing\n", 0), ("benchmarks/prediction/analytic.py", lazy, 1),
                             ("benchmarks/prediction/cpu_sharing.py", "def f():\n    from rsscale.scaling import layout\n", 1)):
        (tmp_path / rel).write_text(code)
        assert len(violations(tmp_path / rel)) == found, (rel, code)


@pytest.mark.parametrize("part, layer", [(part, layer) for part, layers in LAYERS.items() for layer in layers])
def test_layers_exist(part, layer):
    assert is_our_module(f"rsscale.{part}.{layer}"), f"{part}/{layer} is a listed layer but no module or package"
