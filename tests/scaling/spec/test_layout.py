"""Layout rules (scaling/spec/layout.py): valid layouts have no problems, invalid ones are
explained, the pipeline split covers the depth in order; at their boundaries, by hand: every
validation sentence at the first failing value, and the derived counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rsscale.scaling.spec.config import get_preset
from rsscale.scaling.spec.layout import Layout, check_layout, stage_layer_range, validate_layout


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def test_valid_layouts_have_no_problems():
    cfg = get_preset("tiny")
    for t, p, d in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (4, 1, 1)]:
        assert validate_layout(Layout(t, p, d, t > 1, 2, 2 * d * 3), cfg, t * p * d) == []


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (Layout(tp=2), 1, "world size 1 must equal tp*pp*dp"),
        (Layout(tp=3), 3, "TP size 3 does not divide the encoder heads (4)"),
        (Layout(tp=8), 8, "TP size 8 does not divide the encoder heads (4)"),
        (Layout(pp=5), 5, "PP size 5 exceeds the encoder depth 4"),
        (Layout(sp=True), 1, "sequence parallelism (--sp) needs TP size >= 2"),
        (Layout(dp=2, micro_batch=4, global_batch=12), 2, "global batch 12 must be a multiple of micro_batch * dp"),
        (Layout(tp=0), 0, "must all be >= 1"),
    ],
)
def test_invalid_layouts_are_explained(layout, world, message):
    problems = validate_layout(layout, get_preset("tiny"), world)
    assert any(message in p for p in problems), problems
    with pytest.raises(ValueError, match="invalid parallel layout"):
        check_layout(layout, get_preset("tiny"), world)


def test_stage_layer_ranges_cover_depth_in_order():
    for depth, pp in [(4, 1), (4, 2), (4, 3), (12, 5), (12, 12)]:
        ranges = [stage_layer_range(depth, pp, s) for s in range(pp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == depth
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [e - s for s, e in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [stage_layer_range(12, 5, s) for s in range(5)] == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]




CFG = SimpleNamespace(name="toy", heads=4, width=8, mlp=12, dec_heads=2, dec_width=4, dec_mlp=6, depth=3)


def test_stage_layer_range_by_hand():
    assert [stage_layer_range(12, 5, s) for s in range(5)] == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert [stage_layer_range(3, 3, s) for s in range(3)] == [(0, 1), (1, 2), (2, 3)]
    assert stage_layer_range(7, 1, 0) == (0, 7)
    assert [stage_layer_range(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]


def test_derived_counts_and_str():
    lay = Layout(tp=2, pp=3, dp=2, sp=True, micro_batch=2, global_batch=12)
    assert (lay.world_size, lay.num_micro) == (12, 3)
    assert str(lay) == "TP2+SP PP3 DP2 mb2 gb12" and str(Layout()) == "TP1 PP1 DP1 mb8 gb8"
    assert lay.as_dict() == dict(tp=2, pp=3, dp=2, sp=True, micro_batch=2, global_batch=12, vpp=1)


def test_valid_layouts_at_the_edges():
    assert validate_layout(Layout(tp=2, pp=3, dp=1, sp=True, micro_batch=1, global_batch=1), CFG, 6) == []
    assert validate_layout(Layout(micro_batch=3, global_batch=6, dp=2), CFG, 2) == []  # 6 = 3 * 2


@pytest.mark.parametrize("layout,world,expected", [
    (Layout(pp=4), 4, ["PP size 4 exceeds the encoder depth 3: every stage needs at least one block"]),
    (Layout(sp=True), 1, ["sequence parallelism (--sp) needs TP size >= 2"]),
    (Layout(tp=2), 3, ["the world size 3 must equal tp*pp*dp = 2*1*1 = 2 (launch 2 processes: --nproc 2)"]),
    (Layout(tp=4), 4, ["TP size 4 does not divide the decoder heads (2)", "TP size 4 does not divide the decoder MLP size (6)"]),
    (Layout(dp=2, micro_batch=2, global_batch=6), 2,
     ["the global batch 6 must be a multiple of micro_batch * dp = 2*2 = 4"]),
])
def test_each_problem_is_one_sentence(layout, world, expected):
    assert validate_layout(layout, CFG, world) == expected


def test_zero_sizes_and_check_layout():
    for field in ("tp", "pp", "dp", "vpp", "micro_batch", "global_batch"):
        problems = validate_layout(Layout(**{field: 0}), CFG, 1)
        assert len(problems) == 1 and problems[0].startswith("tp, pp, dp, vpp, micro_batch and global_batch must all be >= 1")
    check_layout(Layout(), CFG, 1)
    with pytest.raises(ValueError, match=r"invalid parallel layout \(TP1\+SP PP1.*'toy':\n  - the world size 2 .*\n  - sequence parallelism "):
        check_layout(Layout(sp=True), CFG, 2)


def test_every_size_tp_must_divide_is_named():
    odd = SimpleNamespace(name="odd", heads=3, width=10, mlp=20, dec_heads=3, dec_width=5, dec_mlp=9, depth=2)
    assert validate_layout(Layout(tp=3), odd, 3) == [
        "TP size 3 does not divide the encoder width (10)", "TP size 3 does not divide the encoder MLP size (20)",
        "TP size 3 does not divide the decoder width (5)"]


def test_derive_dp_fills_in_only_an_absent_dp():
    from rsscale.scaling.spec.layout import derive_dp

    assert (derive_dp(2, 2, None, 8), derive_dp(2, 1, None, 2), derive_dp(4, 1, None, 2), derive_dp(1, 1, 3, 8)) == (2, 1, 1, 3)


def test_interleaving_with_two_stages_is_valid_and_with_one_is_refused():
    deep = SimpleNamespace(**{**vars(CFG), "depth": 4})
    assert validate_layout(Layout(pp=2, vpp=2, micro_batch=1, global_batch=2), deep, 2) == []
    assert validate_layout(Layout(pp=1, vpp=2), deep, 1) == ["--vpp 2 (interleaved 1F1B) needs --pp >= 2"]


def test_relaunch_checks_the_layout_of_every_node_before_starting_torchrun(monkeypatch):
    """--nproc 2 --nnodes 3: the layout is asked for a world of 6 and checked with its model on it;
    then torchrun gets the command, the args and their argv. A bad layout stops it before."""
    from rsscale.scaling.runtime import launch
    from rsscale.scaling.spec import layout as L

    asked, started = [], []
    monkeypatch.setattr(launch, "relaunch", lambda command, args, argv: started.append((command, args, argv)) or 0)
    args = SimpleNamespace(nproc=2, nnodes=3, command_argv=["--tp", "2"])
    good = lambda world: asked.append(world) or (Layout(tp=2, dp=world // 2, micro_batch=1, global_batch=3), CFG)  # noqa: E731
    assert L.relaunch_checked("bench", args, good) == 0
    assert asked == [6] and started == [("bench", args, ["--tp", "2"])]
    assert L.launch_layout(SimpleNamespace(nproc=None), lambda world: asked.append(world) or (Layout(), CFG)) == (Layout(), CFG)
    assert asked[-1] == 1  # no --nproc, no --nnodes: one process
    with pytest.raises(ValueError, match=r"invalid parallel layout .*'toy':\n  - the world size 6 must equal"):
        L.relaunch_checked("bench", args, lambda world: (Layout(tp=2), CFG))
    assert len(started) == 1  # the bad layout never reached torchrun


def test_fill_dp_derives_only_a_dp_nobody_gave(monkeypatch):
    from rsscale.scaling.spec.layout import fill_dp

    monkeypatch.setenv("WORLD_SIZE", "8")
    tree = {"parallel": {"tp": 2, "pp": 2, "dp": 1}}
    fill_dp(tree, set())  # under torchrun: its world
    assert tree["parallel"]["dp"] == 2
    fill_dp(tree, set(), world=12)  # about to launch 12
    assert tree["parallel"]["dp"] == 3
    tree["parallel"]["dp"] = 5
    fill_dp(tree, {"parallel.dp"}, world=12)  # given by a flag or the file: kept
    assert tree["parallel"]["dp"] == 5
