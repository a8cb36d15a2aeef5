"""What a finished sweep writes to DIR: sweep.json, report.md, the PNG plots and the sample grid.

sweep.json              every run's figures (plan, final eval losses, wall time) and the fits
report.md               the runs table, the per-budget optima, the exponents with intervals
isoflop.png             eval loss vs N per budget, with each parabola and its N_opt
scaling.png             N_opt and D_opt vs C: the points, the power law and its bootstrap band
loss_vs_compute.png     every run's eval loss vs C and the frontier L_opt(C)
samples_by_compute.mp4  the same prompts and noise for the best run of each budget, a row per
samples_by_compute.png  budget (the PNG shows first, middle and last frames)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _fmt_ci(x: dict[str, Any] | None, digits: int = 3) -> str:
    if x is None:
        return "not fitted"
    ci = x.get("ci")
    v = f"{x['value']:.{digits}g}"
    return f"{v} (95% CI {ci[0]:.{digits}g} .. {ci[1]:.{digits}g})" if ci else f"{v} (no interval)"


def markdown(records: Sequence[dict[str, Any]], fits: dict[str, Any], notes: Sequence[str]) -> str:
    lines = [
        "# Compute-scaling sweep",
        "",
        "| run | C (FLOPs) | width | depth | params N | steps | tokens D | eval_loss | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['budget']:.2e} | {r['width']} | {r['depth']} | "
            f"{r['params']:,} | {r['steps']} | {r['tokens']:.3g} | {r['eval_loss']:.4f} | "
            f"{r['wall_seconds']:.0f} s |"
        )
    lines += [
        "",
        "| budget C | N_opt | D_opt | L_opt | vertex inside the sizes |",
        "|---|---:|---:|---:|---|",
    ]
    for b in fits["per_budget"]:
        if b["ok"]:
            lines.append(
                f"| {b['budget']:.2e} | {b['n_opt']:.3g} | {b['d_opt']:.3g} | "
                f"{b['loss_opt']:.4f} | {'yes' if b['inside'] else 'no (extrapolated)'} |"
            )
        else:
            lines.append(
                f"| {b['budget']:.2e} | - | - | - | parabola opens downwards: no optimum |"
            )
    bs = fits["bootstrap"]
    lines += [
        "",
        f"- N_opt ~ C^alpha: alpha = {_fmt_ci(fits.get('alpha'))}",
        f"- D_opt ~ C^beta: beta = {_fmt_ci(fits.get('beta'))}",
        f"- L_opt ~ C^gamma: gamma = {_fmt_ci(fits.get('gamma'))}",
        f"- bootstrap: of {bs['replicates']} replicates from {bs['residuals']} pooled "
        "residuals, "
        + ", ".join(f"{v} fitted {g}" for g, v in bs.get("valid_by_law", {}).items())
        + f". {bs['note']}".rstrip(),
    ]
    if "target" in fits:
        t = fits["target"]
        lines += [
            f"- at C = {t['flops']:.3g}: N_opt = {_fmt_ci(t['n_opt'])}, D_opt = "
            f"{_fmt_ci(t['d_opt'])}, loss = {_fmt_ci(t['loss'])}",
        ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plots(workdir: str, records: Sequence[dict[str, Any]], fits: dict[str, Any]) -> list[str]:
    """The three PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in records})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for c, col in zip(budgets, colors, strict=True):
        rs = sorted((r for r in records if r["budget"] == c), key=lambda r: r["params"])
        n = np.array([r["params"] for r in rs])
        ax.plot(n, [r["eval_loss"] for r in rs], "o", color=col, label=f"C = {c:.2g}")
        b = next((b for b in fits["per_budget"] if b["budget"] == c and b["ok"]), None)
        if b is not None:
            x = np.linspace(np.log10(n.min()) - 0.1, np.log10(n.max()) + 0.1, 100)
            ax.plot(10**x, np.polyval(b["coef"], x), "-", color=col, lw=1)
            ax.plot(b["n_opt"], b["loss_opt"], "*", color=col, ms=14, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final eval_loss", title="IsoFLOP curves")
    ax.legend(fontsize=8)
    paths.append(_save(fig, workdir, "isoflop.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = [b for b in fits["per_budget"] if b["ok"]]
    for ax, key, greek, label in (
        (axes[0], "n_opt", "alpha", "N_opt (parameters)"),
        (axes[1], "d_opt", "beta", "D_opt (tokens)"),
    ):
        ax.plot(
            [b["budget"] for b in ok], [b[key] for b in ok], "o", color="k", label="parabola optima"
        )
        law = fits.get(greek)
        if law and "curve" in law:
            cv = law["curve"]
            ax.plot(cv["flops"], cv["fit"], "-", label=f"{greek} = {_fmt_ci(law)}")
            if cv["lo"] is not None:
                ax.fill_between(cv["flops"], cv["lo"], cv["hi"], alpha=0.25, label="95% band")
        if "target" in fits:
            t = fits["target"][key]
            ax.plot([fits["target"]["flops"]], [t["value"]], "D", color="C3", label="target")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=label)
        ax.legend(fontsize=7)
    paths.append(_save(fig, workdir, "scaling.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sizes = sorted({(r["width"], r["depth"]) for r in records})
    for i, (w, d) in enumerate(sizes):
        rs = sorted(
            (r for r in records if (r["width"], r["depth"]) == (w, d)), key=lambda r: r["budget"]
        )
        ax.plot(
            [r["budget"] for r in rs],
            [r["eval_loss"] for r in rs],
            "o-",
            color=f"C{i}",
            label=f"w{w} d{d}",
        )
    law = fits.get("gamma")
    if law and "curve" in law:
        cv = law["curve"]
        ax.plot(cv["flops"], cv["fit"], "k--", label=f"frontier, gamma = {_fmt_ci(law)}")
        if cv["lo"] is not None:
            ax.fill_between(cv["flops"], cv["lo"], cv["hi"], color="k", alpha=0.15)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C (FLOPs)",
        ylabel="final eval_loss",
        title="Loss vs compute",
    )
    ax.legend(fontsize=7)
    paths.append(_save(fig, workdir, "loss_vs_compute.png"))
    return paths


def _save(fig, workdir: str, name: str) -> str:
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def sample_grid(
    workdir: str, rows: Sequence[tuple[float, str]], prompts: Sequence[str], shape, seed: int = 0
) -> list[str]:
    """Sora's picture: for each (budget, run directory), the same prompts sampled with the same
    noise (`seed`) from the run's checkpoint (its config's EMA choice); a row per budget. Writes
    samples_by_compute.mp4 and .png; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vdit.data.video_io import tile, upscale, write_video
    from vdit.diffusion.evaluate import generate
    from vdit.train import load, samples

    videos = []
    for _, d in rows:
        loaded = load.load(d)
        setup = samples.eval_setup(loaded.config)
        videos.append(
            generate(loaded.graphdef, loaded.params, list(prompts), tuple(shape), setup, seed=seed)
        )
    flat = [v for row in videos for v in row]
    mp4 = write_video(
        os.path.join(workdir, "samples_by_compute.mp4"),
        upscale(tile(flat, cols=len(prompts)), 4),
        fps=8,
    )
    fig, axes = plt.subplots(
        len(rows), len(prompts), figsize=(2.6 * len(prompts), 1.2 * len(rows) + 0.6), squeeze=False
    )
    for i, ((budget, d), row) in enumerate(zip(rows, videos, strict=True)):
        for j, v in enumerate(row):
            t = v.shape[0]
            strip = np.concatenate([v[0], v[t // 2], v[-1]], axis=1)  # first | middle | last frame
            ax = axes[i, j]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"C={budget:.1e}\n{os.path.basename(d).split('_')[-1]}", fontsize=7)
            if i == 0:
                ax.set_title(prompts[j], fontsize=7)
    fig.suptitle("Same prompts and noise, best run of each budget (rows: compute)", fontsize=9)
    return [mp4, _save(fig, workdir, "samples_by_compute.png")]


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
