"""Fitting an IsoFLOP sweep: per budget a parabola of the final eval loss in log N gives N_opt(C);
power laws N_opt = a C^alpha, D_opt = b C^beta and the frontier L_opt = l C^gamma over the budgets;
95% intervals by a residual bootstrap.

    parabola  L = p2 x^2 + p1 x + p0, x = log10 N, over the runs of one budget (>= 3 sizes);
              N_opt = 10^(-p1 / 2 p2) when p2 > 0, L_opt its value there; D_opt the tokens at N_opt
              (log D is linear in log N within one budget: D = C / FLOPs per token)
    powers    least squares of log10 N_opt, log10 D_opt, log10 L_opt on log10 C (>= 2 budgets)
    bootstrap the parabolas' residuals, pooled over the budgets and scaled by sqrt(n / (n - 3)) for
              the fitted parameters, are drawn with replacement onto the fitted losses, and the
              whole fit is redone; the 2.5 / 97.5 percentiles of each figure are its interval.
              Budgets of exactly 3 sizes leave no residual: with none anywhere there is no interval
              (reported as None), only the fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _parabola(x: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
    """The vertex of the least-squares parabola y(x), or None when it opens downwards."""
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        return None
    xv = -p1 / (2 * p2)
    return {
        "coef": (float(p2), float(p1), float(p0)),
        "x_opt": float(xv),
        "loss_opt": float(np.polyval((p2, p1, p0), xv)),
        "inside": bool(x.min() <= xv <= x.max()),
    }


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of least squares y = slope x + intercept."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _fit_once(
    budgets: np.ndarray, logn: np.ndarray, logd: np.ndarray, loss: np.ndarray
) -> dict[str, Any]:
    """One fit of the whole sweep from per-run arrays (log10 N, log10 D, eval loss)."""
    per_budget = []
    for c in np.unique(budgets):
        sel = budgets == c
        if len(np.unique(logn[sel])) < 3:
            continue
        par = _parabola(logn[sel], loss[sel])
        if par is None:
            per_budget.append({"budget": float(c), "ok": False})
            continue
        ds, di = _line(logn[sel], logd[sel])
        per_budget.append(
            {
                "budget": float(c),
                "ok": True,
                **par,
                "n_opt": 10 ** par["x_opt"],
                "d_opt": 10 ** (ds * par["x_opt"] + di),
            }
        )
    ok = [b for b in per_budget if b["ok"]]
    out: dict[str, Any] = {"per_budget": per_budget}
    for key, name in (("n_opt", "n"), ("d_opt", "d"), ("loss_opt", "loss")):
        points = [b for b in ok if b[key] > 0]  # a parabola's minimum may dip below 0 loss
        if len(points) >= 2:
            logc = np.log10([b["budget"] for b in points])
            slope, intercept = _line(logc, np.log10([b[key] for b in points]))
            out[name] = {"exponent": slope, "log10_coef": intercept, "budgets": len(points)}
    return out


def _predict(law: dict[str, float], flops: float) -> float:
    return float(10 ** (law["log10_coef"] + law["exponent"] * np.log10(flops)))


def fit(
    runs: Sequence[dict[str, Any]],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    target_flops: float | None = None,
    curve_flops: Sequence[float] = (),
) -> dict[str, Any]:
    """Fit runs (dicts with "budget", "params", "tokens", "eval_loss"). Returns the per-budget
    parabolas, the exponents alpha (N_opt), beta (D_opt), gamma (L_opt) with 95% intervals, the
    bootstrap's band of each law at `curve_flops`, and at `target_flops` the predicted N_opt, D_opt
    and loss with their intervals."""
    budgets = np.array([r["budget"] for r in runs], np.float64)
    logn = np.log10([r["params"] for r in runs])
    logd = np.log10([r["tokens"] for r in runs])
    loss = np.array([r["eval_loss"] for r in runs], np.float64)
    best = _fit_once(budgets, logn, logd, loss)

    # residuals of each budget's parabola, scaled for its 3 fitted parameters, pooled
    fitted, pool = loss.copy(), []
    for b in best["per_budget"]:
        sel = budgets == b["budget"]
        if not b["ok"]:
            continue
        fitted[sel] = np.polyval(b["coef"], logn[sel])
        n = int(sel.sum())
        if n > 3:
            pool.extend((loss[sel] - fitted[sel]) * np.sqrt(n / (n - 3)))
    pool = np.asarray(pool)
    laws = ("n", "d", "loss")
    samples: dict[str, list[float]] = {k: [] for k in laws}
    curves: dict[str, list[list[float]]] = {k: [] for k in laws}
    targets: dict[str, list[float]] = {k: [] for k in laws}
    if bootstrap and pool.size:
        rng = np.random.default_rng(seed)
        for _ in range(bootstrap):
            y = fitted + rng.choice(pool, size=loss.shape)
            rep = _fit_once(budgets, logn, logd, y)
            for k in laws:  # a replicate without a law (no 2 fitted budgets) adds nothing to it
                if k in rep:
                    samples[k].append(rep[k]["exponent"])
                    curves[k].append([_predict(rep[k], c) for c in curve_flops])
                    if target_flops:
                        targets[k].append(_predict(rep[k], target_flops))
    valid = {k: len(samples[k]) for k in laws}

    def interval(values) -> list[float] | None:
        if not len(values):
            return None
        return [float(v) for v in np.percentile(values, (2.5, 97.5), axis=0)]

    out: dict[str, Any] = {
        "per_budget": best["per_budget"],
        "bootstrap": {
            "replicates": bootstrap,
            "valid": valid["n"],  # replicates that fitted N_opt(C)
            "valid_by_law": {
                g: valid[k] for k, g in zip(laws, ("alpha", "beta", "gamma"), strict=True)
            },
            "residuals": int(pool.size),
            "note": ""
            if valid["n"]
            else "no interval: needs budgets with >= 4 sizes (residuals) and >= 2 fitted budgets",
        },
    }
    for k, greek in zip(laws, ("alpha", "beta", "gamma"), strict=True):
        if k not in best:
            continue
        out[greek] = {
            "value": best[k]["exponent"],
            "ci": interval(samples[k]),
            "log10_coef": best[k]["log10_coef"],
            "replicates": valid[k],
        }
        if curve_flops:
            band = np.percentile(curves[k], (2.5, 97.5), axis=0) if valid[k] else None
            out[greek]["curve"] = {
                "flops": [float(c) for c in curve_flops],
                "fit": [_predict(best[k], c) for c in curve_flops],
                "lo": None if band is None else [float(v) for v in band[0]],
                "hi": None if band is None else [float(v) for v in band[1]],
            }
    if target_flops and all(k in best for k in laws):
        out["target"] = {
            "flops": float(target_flops),
            **{
                name: {"value": _predict(best[k], target_flops), "ci": interval(targets[k])}
                for k, name in zip(laws, ("n_opt", "d_opt", "loss"), strict=True)
            },
        }
    return out
