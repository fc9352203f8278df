"""Fits recover known laws from synthetic data generated from the law with noise."""

import numpy as np
import pytest

from rsscale.benchmarks.reporting.fit import fit_power_law, fit_saturating

N = np.logspace(5, 10, 12)


def test_power_law_recovers_exponent_and_ci_covers_it():
    rng = np.random.default_rng(0)
    y = 3.0 * N**0.8 * np.exp(rng.normal(0, 0.02, N.size))
    fit = fit_power_law(N, y, n_boot=200)
    assert fit.params["c"] == pytest.approx(0.8, abs=0.01) and fit.params["a"] == pytest.approx(3.0, rel=0.2)
    lo, hi = fit.ci["c"]
    assert lo < 0.8 < hi and hi - lo < 0.05
    assert np.allclose(fit.predict(N), fit.params["a"] * N ** fit.params["c"])


def test_saturating_law_recovers_exponent_and_floor():
    rng = np.random.default_rng(1)
    e = (50.0 * (N + 2e4) ** -0.35 + 0.2) * (1 + rng.normal(0, 0.005, N.size))
    fit = fit_saturating(N, e, n_boot=60)
    assert fit.params["c"] == pytest.approx(0.35, abs=0.03)
    assert fit.params["d"] == pytest.approx(0.2, abs=0.01)
    assert fit.rmse_rel < 0.01 and fit.ci["c"][0] < 0.35 < fit.ci["c"][1]
    assert "E = a * (N + b)^-c + d" in str(fit)


def test_exact_saturating_data_is_fitted_exactly():
    e = 4.0 * N**-0.5 + 1.0
    fit = fit_saturating(N, e, n_boot=0)
    assert fit.params["c"] == pytest.approx(0.5, rel=1e-3) and fit.params["d"] == pytest.approx(1.0, rel=1e-4)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2, 3], [1, -1, 2])
    with pytest.raises(ValueError, match="at least 4"):
        fit_saturating([1, 2, 3], [3, 2, 1])


def test_caveats_flag_meaningless_exponents():
    """Four points for four parameters make a fit not meaningful (no numbers shown); a trend
    indistinguishable from zero is called out beside the numbers."""
    good = fit_saturating(N, 4.0 * N**-0.5 + 1.0, n_boot=30)
    assert good.caveats() == [] and "caveat" not in str(good)
    rng = np.random.default_rng(2)
    few = fit_saturating(N[:4], 0.9 + rng.normal(0, 0.01, 4), n_boot=30)
    assert "4 points for 4 parameters" in few.problem() and str(few).startswith("E = a * (N + b)^-c + d: not meaningful")
    assert not any(ch.isdigit() for ch in str(few).split("(n=")[0].replace("4 points for 4", ""))
    flat = fit_power_law(N, np.where(np.arange(N.size) % 2, 1.1, 1.0), n_boot=100)  # no trend, only scatter
    assert any("includes 0" in c for c in flat.caveats())


def test_bootstrap_needs_max_10_or_a_quarter_of_the_resamples():
    """42 resamples: an interval needs max(10, 42 // 4) = 10 fitted ones; 9 give none."""
    from rsscale.benchmarks.reporting.fit import _bootstrap

    def fits_only(k):
        calls = []

        def fit_once(n, y):
            calls.append(1)
            if len(calls) > k:
                raise ValueError("no fit")
            return {"c": float(len(calls))}
        return fit_once

    assert _bootstrap(N, N, fits_only(9), 42, 0) == {}
    lo, hi = _bootstrap(N, N, fits_only(10), 42, 0)["c"]
    assert (lo, hi) == (np.percentile(np.arange(1, 11), 2.5), np.percentile(np.arange(1, 11), 97.5))
    assert _bootstrap(N, N, fits_only(100), 0, 0) == {}

    def every_other(n, y, calls=[]):  # noqa: B006 - the call counter
        calls.append(1)
        if len(calls) % 2:
            raise ValueError("no fit")
        return {"c": 1.0}
    assert _bootstrap(N, N, every_other, 42, 0) == {"c": (1.0, 1.0)}  # a failed fit skips, never stops


def test_predict_str_and_caveats_by_hand():
    from rsscale.benchmarks.reporting.fit import Fit

    p = Fit("power", {"a": 2.0, "c": 0.5}, n_points=3)
    assert p.predict([4.0, 9.0]).tolist() == [4.0, 6.0]
    assert str(p) == "y = a * N^c: not meaningful, no finite 95 % interval for every parameter (the bootstrap refits failed or ran away) (n=3)"
    s = Fit("saturating", {"a": 8.0, "b": 1.0, "c": 1.0, "d": 0.5}, ci={"c": (0.5, 1.5)}, n_points=5)
    assert s.predict([3.0]).tolist() == [8.0 / 4 + 0.5] and s.caveats() == []
    assert "c = 1 [0.5, 1.5]" in str(s)
    neg = Fit("saturating", {"a": 1.0, "b": 1.0, "c": -0.1, "d": 0.5}, ci={"c": (-0.2, 0.0)}, n_points=5)
    notes = neg.caveats()
    assert len(notes) == 2 and "c < 0" in notes[0] and "includes 0" in notes[1]  # 0 is inside [-0.2, 0]
    assert Fit("power", {"a": 1.0, "c": 1.0}, ci={"c": (0.0, 2.0)}).caveats() == ["the 95 % interval of c includes 0: no significant trend"]


def test_two_point_power_law_is_exact_without_interval():
    fit = fit_power_law([2.0, 8.0], [3.0, 12.0])  # y = 1.5 * N
    assert fit.params["c"] == pytest.approx(1.0, abs=1e-12) and fit.params["a"] == pytest.approx(1.5, abs=1e-12)
    assert fit.ci == {} and fit.n_points == 2 and fit.rmse_rel == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="equal length"):
        fit_power_law([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        fit_power_law([1.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1.0, np.inf], [1.0, 2.0])


@pytest.mark.parametrize("k", [1e-3, 1e3])
def test_saturating_fit_is_scale_equivariant(k):
    """E -> k E multiplies a and d by k and leaves b and c alone (relative residuals do not change)."""
    fit = fit_saturating(N, k * (4.0 * N**-0.5 + 1.0), n_boot=0)
    assert fit.params["c"] == pytest.approx(0.5, rel=1e-3) and fit.params["d"] == pytest.approx(k, rel=1e-4)
    assert fit.params["a"] == pytest.approx(4.0 * k, rel=1e-2) and fit.rmse_rel < 1e-6


def test_bootstrap_is_seeded_and_skips_degenerate_resamples():
    n = np.array([1e6, 1e7, 1e8, 1e9, 1e10])
    y = 2.0 * n**0.3  # exact: every usable resample gives c = 0.3
    a, b = fit_power_law(n, y, n_boot=200, seed=3), fit_power_law(n, y, n_boot=200, seed=3)
    assert a.ci == b.ci and a.ci["c"] == pytest.approx((0.3, 0.3), abs=1e-9)
    noisy = y * np.array([1.0, 1.1, 0.9, 1.05, 0.97])
    assert fit_power_law(n, noisy, n_boot=200, seed=1).ci != fit_power_law(n, noisy, n_boot=200, seed=2).ci


def test_caveats_boundaries_and_their_joining():
    from rsscale.benchmarks.reporting.fit import Fit

    flat = Fit("saturating", {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.5}, ci={"c": (0.1, 0.2)}, n_points=5)
    assert flat.caveats() == []  # c = 0 is not "c < 0"
    two = Fit("saturating", {"a": -1.0, "b": 1.0, "c": -0.5, "d": 0.5}, ci={"c": (-1.0, 0.1)}, n_points=5)
    notes = two.caveats()
    assert len(notes) == 2 and str(two).endswith(f"; caveat: {notes[0]}; caveat: {notes[1]})")


def test_bootstrap_fits_resamples_with_three_distinct_sizes():
    """A resample is refitted when it holds at least 3 distinct sizes (2 would pass a power law exactly
    through them); so 4 points still give an interval: 168 of the 256 resamples of 4 are usable."""
    from rsscale.benchmarks.reporting.fit import _bootstrap

    n = np.array([1e6, 1e7, 1e8, 1e9])
    distinct = []

    def fit_once(ns, ys):
        distinct.append(len(np.unique(ns)))
        return {"c": 1.0}
    _bootstrap(n, n, fit_once, 200, 0)
    assert set(distinct) == {3, 4}
    y = 2.0 * n**0.3 * np.array([1.0, 1.1, 0.9, 1.05])
    lo, hi = fit_power_law(n, y, n_boot=200).ci["c"]
    assert lo < fit_power_law(n, y, n_boot=0).params["c"] < hi


def test_saturating_fit_that_never_converges_says_so(monkeypatch):
    """Every start diverging (non-finite cost) is an error that names the failure."""
    from rsscale.benchmarks.reporting import fit as F

    monkeypatch.setattr(F, "_levenberg_marquardt", lambda theta, x, y: (theta, float("inf")))
    with pytest.raises(ValueError, match="^the saturating power law did not converge$"):
        F.fit_saturating(N, 4.0 * N**-0.5 + 1.0, n_boot=0)


def test_problem_flags_a_runaway_exponent_interval():
    """The exponent's 95 % interval counts as well as its value: |c| = 0.5 inside [0.1, 12] is still not meaningful."""
    from rsscale.benchmarks.reporting.fit import Fit

    ci = {"a": (0.5, 2.0), "c": (0.1, 0.9)}
    assert Fit("power", {"a": 1.0, "c": 0.5}, ci=ci, n_points=5).problem() is None
    for c_ci in ((0.1, 12.0), (-10.5, 0.9)):
        problem = Fit("power", {"a": 1.0, "c": 0.5}, ci={**ci, "c": c_ci}, n_points=5).problem()
        assert problem == "the exponent or its 95 % interval goes beyond |c| = 10: the data do not determine it"


def test_isoflop_optimum_of_a_shallow_parabola_and_of_one_opening_down():
    """Any upward curvature (here 0.05 per log-unit squared) has a vertex; a downward one returns the
    best measured size, flagged as an edge; bounds clip the vertex."""
    from rsscale.benchmarks.reporting.fit import isoflop_optimum

    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    opt, inside = isoflop_optimum(n, 0.05 * (np.log(n) - np.log(2e6)) ** 2 + 0.5)
    assert opt == pytest.approx(2e6, rel=1e-9) and inside
    opt, inside = isoflop_optimum(n, 0.05 * (np.log(n) - np.log(2e6)) ** 2 + 0.5, bounds=(1e5, 1e6))
    assert opt == pytest.approx(1e6, rel=1e-12) and not inside
    opt, inside = isoflop_optimum(n, 2.0 - 0.05 * (np.log(n) - np.log(2e6)) ** 2)
    assert (opt, inside) == (1e5, False)  # the lowest loss of a downward parabola, at the far end


def _profiles(noise=0.0):
    sizes = np.array([1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6])
    rng = np.random.default_rng(5)
    return {c: (sizes, (0.1 * (np.log(sizes) - np.log(0.05 * c**0.4)) ** 2 + 1.0) * (1 + rng.normal(0, noise, sizes.size)))
            for c in (1e12, 1e13, 1e14, 1e15)}


def test_frontier_of_exact_profiles_is_exact_with_a_point_interval():
    """Budgets 1e12..1e15 with exact parabolas around N_opt = 0.05 C^0.4: every optimum, the law, and every
    usable bootstrap resample (3+ distinct sizes per budget) give the same exponent."""
    from rsscale.benchmarks.reporting.fit import fit_frontier

    fit, optima = fit_frontier(_profiles(), n_boot=40, seed=1)
    assert sorted(optima) == [1e12, 1e13, 1e14, 1e15]
    for c, (opt, inside) in optima.items():
        assert opt == pytest.approx(0.05 * c**0.4, rel=1e-9) and inside
    assert fit.law == "power" and fit.n_points == 4 and fit.rmse_rel == pytest.approx(0.0, abs=1e-9)
    assert fit.params["c"] == pytest.approx(0.4, abs=1e-9) and fit.params["a"] == pytest.approx(0.05, rel=1e-7)
    assert set(fit.ci) == {"a", "c"}
    assert fit.ci["c"] == pytest.approx((0.4, 0.4), abs=1e-9) and fit.ci["a"] == pytest.approx((0.05, 0.05), rel=1e-7)


def test_default_bootstrap_settings_are_those_of_the_published_intervals():
    """docs/STUDY.md quotes intervals of report runs, which call fit_power_law and fit_frontier with their
    defaults (500 resamples, seed 0): the defaults must stay those for the numbers to be reproduced."""
    from rsscale.benchmarks.reporting.fit import fit_frontier

    rng = np.random.default_rng(0)
    y = 3.0 * N**0.8 * np.exp(rng.normal(0, 0.05, N.size))
    assert fit_power_law(N, y).ci == fit_power_law(N, y, n_boot=500, seed=0).ci
    profiles = _profiles(noise=0.01)
    assert fit_frontier(profiles)[0].ci == fit_frontier(profiles, n_boot=500, seed=0)[0].ci


def test_prediction_interval_of_a_power_law():
    """Exact data predict exactly with a point interval; noisy data give an interval around the
    prediction of the law fitted to all points."""
    from rsscale.benchmarks.reporting.fit import predict_with_interval

    n = np.array([1e5, 1e6, 1e7, 1e8])
    pred, lo, hi = predict_with_interval(n, 2.0 * n**0.25, 1e9, n_boot=50)
    assert pred == pytest.approx(2.0 * 1e9**0.25, rel=1e-9)
    assert (lo, hi) == pytest.approx((pred, pred), rel=1e-9)
    y = 2.0 * n**0.25 * np.array([1.0, 1.1, 0.95, 1.02])
    pred, lo, hi = predict_with_interval(n, y, 1e9, n_boot=200)
    assert pred == pytest.approx(float(fit_power_law(n, y, n_boot=0).predict(1e9)), rel=1e-12)
    assert lo < pred < hi


def test_saturating_fits_of_report_runs_use_seed_0_by_default():
    """report.py calls fit_saturating(x, y, n_boot=100) without a seed: the default seed must stay 0
    for its intervals to be reproduced (seeds 0 and 1 give different intervals on noisy data)."""
    rng = np.random.default_rng(0)
    e = (4.0 * N**-0.3 + 1.0) * np.exp(rng.normal(0, 0.01, N.size))
    default = fit_saturating(N, e, n_boot=40).ci
    assert default and default == fit_saturating(N, e, n_boot=40, seed=0).ci
    assert default != fit_saturating(N, e, n_boot=40, seed=1).ci


def test_isoflop_vertex_exactly_on_either_bound_is_inside():
    """The measured range is closed: a vertex exactly at the lower or the upper bound is inside (and
    returned as is); one a hair beyond the lower bound is clipped to it and flagged as an edge."""
    from rsscale.benchmarks.reporting.fit import isoflop_optimum

    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    loss = 0.05 * (np.log(n) - np.log(2e6)) ** 2 + 0.5
    a, b, _ = np.polyfit(np.log(n), loss, 2)
    vertex = -b / (2 * a)  # as isoflop_optimum computes it
    at = float(np.exp(vertex))  # a size whose log is exactly the vertex
    for _ in range(1000):
        if np.log(at) == vertex:
            break
        at = float(np.nextafter(at, np.inf if np.log(at) < vertex else 0.0))
    assert np.log(at) == vertex
    assert isoflop_optimum(n, loss, bounds=(at, 1e7)) == (pytest.approx(at, rel=1e-15), True)
    assert isoflop_optimum(n, loss, bounds=(1e5, at)) == (pytest.approx(at, rel=1e-15), True)
    above = at
    while np.log(above) <= vertex:
        above = float(np.nextafter(above, np.inf))
    opt, inside = isoflop_optimum(n, loss, bounds=(above, 1e7))
    assert opt == pytest.approx(above, rel=1e-15) and not inside
