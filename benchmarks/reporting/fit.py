"""Scaling-law fits with bootstrap confidence intervals, numpy only.

    fit = fit_power_law(params, throughput)     # y = a * N^c, least squares in log-log
    fit = fit_saturating(params, loss)          # E = a * (N + b)^-c + d (Zhai et al. 2022)
    fit.params["c"], fit.ci["c"], fit.predict(n), str(fit)

The saturating law is fitted by Levenberg-Marquardt on relative residuals (model - E) / E, with
a, b, d positive through a log parameterization and N rescaled by its geometric mean so the
problem is well conditioned; several starting values of d are tried and the best kept.
Confidence intervals (95 %) are percentile bootstrap over the points: resample with replacement,
refit, take the 2.5 / 97.5 percentiles of each parameter (resamples that do not fit are skipped).
A fit with no more points than parameters, no finite interval or a runaway exponent is "not
meaningful" (fit.problem()): str(fit) then gives the reason instead of numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_EXPONENT = 10.0  # scaling exponents are of order 1; beyond this a fit has run away


@dataclass
class Fit:
    law: str  # "power" or "saturating"
    params: dict
    ci: dict = field(default_factory=dict)  # name -> (low, high), 95 % bootstrap
    n_points: int = 0
    rmse_rel: float = 0.0  # root-mean-square relative residual on the data

    def predict(self, n):
        n = np.asarray(n, dtype=float)
        p = self.params
        if self.law == "power":
            return p["a"] * n ** p["c"]
        return p["a"] * (n + p["b"]) ** (-p["c"]) + p["d"]

    def problem(self) -> str | None:
        """Why the fitted numbers say nothing at all, or None. Such a fit is shown as "not meaningful"
        with this reason instead of its numbers (which would be quoted: a = 3.3e+133)."""
        k = len(self.params)
        if self.n_points <= k:
            return f"{self.n_points} points for {k} parameters: the curve can pass through every point"
        bounds = [b for lohi in self.ci.values() for b in lohi]
        if not self.ci or not np.isfinite([*self.params.values(), *bounds]).all():
            return "no finite 95 % interval for every parameter (the bootstrap refits failed or ran away)"
        if max(abs(v) for v in (self.params["c"], *self.ci.get("c", ()))) > MAX_EXPONENT:
            return f"the exponent or its 95 % interval goes beyond |c| = {MAX_EXPONENT:g}: the data do not determine it"
        return None

    def caveats(self) -> list[str]:
        """Why the exponent may not mean much (printed beside every fit, so nobody quotes it blindly)."""
        notes = []
        if self.law == "saturating" and self.params["c"] < 0:
            notes.append("c < 0: E grows with the x variable (size or compute) in this data (too few steps or sizes to show scaling)")
        lo, hi = self.ci.get("c", (float("nan"), float("nan")))
        if lo <= 0 <= hi:
            notes.append("the 95 % interval of c includes 0: no significant trend")
        return notes

    def __str__(self) -> str:
        formula = "y = a * N^c" if self.law == "power" else "E = a * (N + b)^-c + d"
        problem = self.problem()
        if problem:
            return f"{formula}: not meaningful, {problem} (n={self.n_points})"
        parts = []
        for k, v in self.params.items():
            lo, hi = self.ci.get(k, (float("nan"), float("nan")))
            parts.append(f"{k} = {v:.4g} [{lo:.4g}, {hi:.4g}]")
        caveats = "".join(f"; caveat: {c}" for c in self.caveats())
        return f"{formula}: " + ", ".join(parts) + f" (n={self.n_points}, rel. RMSE {self.rmse_rel:.2%}{caveats})"


def _check(n, y, min_points: int):
    n, y = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"N and y must be 1-d arrays of equal length, got shapes {n.shape} and {y.shape}")
    if len(n) < min_points:
        raise ValueError(f"this fit needs at least {min_points} points, got {len(n)}")
    if (n <= 0).any() or (y <= 0).any() or not np.isfinite(n).all() or not np.isfinite(y).all():
        raise ValueError("N and y must be finite and positive for a power-law fit")
    return n, y


def _bootstrap(n, y, fit_once, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 3:
            continue
        try:
            samples.append(fit_once(n[idx], y[idx]))
        except (ValueError, np.linalg.LinAlgError, FloatingPointError):
            continue
    if len(samples) < max(10, n_boot // 4):
        return {}
    return {k: (float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5)))
            for k in samples[0]}


def _rmse_rel(fit: Fit, n, y) -> float:
    return float(np.sqrt(np.mean(((fit.predict(n) - y) / y) ** 2)))


# ---------------------------------------------------------------------------------------------
# y = a * N^c
# ---------------------------------------------------------------------------------------------


def _power_once(n, y) -> dict:
    c, log_a = np.polyfit(np.log(n), np.log(y), 1)
    return {"a": float(np.exp(log_a)), "c": float(c)}


def fit_power_law(n, y, n_boot: int = 500, seed: int = 0) -> Fit:
    n, y = _check(n, y, 2)
    fit = Fit("power", _power_once(n, y), n_points=len(n))
    fit.ci = _bootstrap(n, y, _power_once, n_boot, seed) if len(n) >= 3 else {}
    fit.rmse_rel = _rmse_rel(fit, n, y)
    return fit


# ---------------------------------------------------------------------------------------------
# E = a * (N + b)^-c + d
# ---------------------------------------------------------------------------------------------


def _sat_model(theta, x):
    log_a, log_b, c, log_d = theta
    return np.exp(log_a) * (x + np.exp(log_b)) ** (-c) + np.exp(log_d)


def _levenberg_marquardt(theta, x, y, iters: int = 300):
    """Minimize sum(((model - y) / y)^2) from theta; returns (theta, cost)."""

    def resid(t):
        return (_sat_model(t, x) - y) / y

    lam, r = 1e-3, resid(theta)
    cost = float(r @ r)
    for _ in range(iters):
        eps = 1e-6 * np.maximum(1.0, np.abs(theta))
        J = np.stack([(resid(theta + np.eye(4)[i] * eps[i]) - r) / eps[i] for i in range(4)], axis=1)
        A, g = J.T @ J, J.T @ r
        while True:
            step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            trial = np.clip(theta + step, -50, 50)
            with np.errstate(over="ignore", invalid="ignore"):
                r_new = resid(trial)
            new_cost = float(r_new @ r_new) if np.isfinite(r_new).all() else np.inf
            if new_cost < cost:
                theta, r, lam = trial, r_new, max(lam / 3, 1e-12)
                break
            lam *= 4
            if lam > 1e12:
                return theta, cost
        if cost - new_cost < 1e-14 * max(cost, 1e-30):
            cost = new_cost
            break
        cost = new_cost
    return theta, cost


def _saturating_once(n, y) -> dict:
    scale = float(np.exp(np.mean(np.log(n))))
    x = n / scale
    best = None
    for frac in (0.01, 0.5, 0.9):
        d0 = frac * y.min()
        slope = _power_once(x, np.maximum(y - d0, 1e-12 * y.max()))
        theta0 = np.array([np.log(slope["a"]), np.log(1e-3 * x.min()), -slope["c"], np.log(d0)])
        theta, cost = _levenberg_marquardt(theta0, x, y)
        if best is None or cost < best[1]:
            best = (theta, cost)
    log_a, log_b, c, log_d = best[0]
    if not np.isfinite(best[1]):
        raise ValueError("the saturating power law did not converge")
    return {"a": float(np.exp(log_a) * scale**c), "b": float(np.exp(log_b) * scale), "c": float(c), "d": float(np.exp(log_d))}


def fit_saturating(n, e, n_boot: int = 200, seed: int = 0) -> Fit:
    n, e = _check(n, e, 4)
    fit = Fit("saturating", _saturating_once(n, e), n_points=len(n))
    fit.ci = _bootstrap(n, e, _saturating_once, n_boot, seed)
    fit.rmse_rel = _rmse_rel(fit, n, e)
    return fit


# ---------------------------------------------------------------------------------------------
# Compute-optimal frontier (IsoFLOP profiles, Hoffmann et al. 2022, approach 2)
# ---------------------------------------------------------------------------------------------


def isoflop_optimum(n, loss, bounds: tuple[float, float] | None = None) -> tuple[float, bool]:
    """(loss-minimising N of one compute budget, whether it lies inside the measured sizes): the
    vertex of a parabola in log N through the budget's (N, loss) points (at least 3 sizes); an
    upward-opening fit is required, else the best measured size is returned, flagged as an edge.
    The vertex is clipped to `bounds` (default: the measured sizes)."""
    n, loss = _check(n, loss, 3)
    x = np.log(n)
    lo, hi = np.log(bounds) if bounds else (x.min(), x.max())
    a, b, _ = np.polyfit(x, loss, 2)
    if a <= 0:
        return float(n[np.argmin(loss)]), False
    vertex = -b / (2 * a)
    return float(np.exp(np.clip(vertex, lo, hi))), bool(lo <= vertex <= hi)


def fit_frontier(profiles: dict, n_boot: int = 500, seed: int = 0) -> tuple[Fit, dict]:
    """N_opt = a * C^c over compute budgets. `profiles` maps C -> (sizes, losses). The interval is a
    bootstrap over the points within each budget (resampled, optimum refound, law refitted)."""
    budgets = sorted(profiles)
    optima = {c: isoflop_optimum(*profiles[c]) for c in budgets}
    cs = np.array(budgets, dtype=float)
    ns = np.array([optima[c][0] for c in budgets])
    fit = Fit("power", _power_once(cs, ns), n_points=len(cs))
    rng, samples = np.random.default_rng(seed), []
    for _ in range(n_boot):
        try:
            boot = []
            for c in budgets:
                n, y = (np.asarray(v, dtype=float) for v in profiles[c])
                idx = rng.integers(0, len(n), len(n))
                if len(np.unique(n[idx])) < 3:
                    raise ValueError("too few distinct sizes")
                boot.append(isoflop_optimum(n[idx], y[idx], bounds=(n.min(), n.max()))[0])
            samples.append(_power_once(cs, np.array(boot)))
        except (ValueError, np.linalg.LinAlgError):
            continue
    if len(samples) >= max(10, n_boot // 4):
        fit.ci = {k: (float(np.percentile([s[k] for s in samples], 2.5)), float(np.percentile([s[k] for s in samples], 97.5)))
                  for k in samples[0]}
    fit.rmse_rel = _rmse_rel(fit, cs, ns)
    return fit, optima


def predict_with_interval(n, y, n_new: float, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(prediction, 2.5 %, 97.5 %) of a power law fitted to (n, y), evaluated at n_new: how a
    scaling law is checked before it is trusted (fit without the largest model, predict it)."""
    n, y = _check(n, y, 3)
    point = float(Fit("power", _power_once(n, y)).predict(n_new))
    rng, preds = np.random.default_rng(seed), []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2:
            continue
        preds.append(float(Fit("power", _power_once(n[idx], y[idx])).predict(n_new)))
    return point, float(np.percentile(preds, 2.5)), float(np.percentile(preds, 97.5))
