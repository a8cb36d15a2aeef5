"""The report `vdit prepare` writes beside its shards, for a person to see what each filter removes:
`report.md` (clips kept and dropped by reason, the thresholds, score ranges, examples) and
`report/kept.png`, `report/REASON.png`: contact sheets of the first `report_examples` clips of each
(middle frames, labelled with file, time range and the score the reason is about). Only the
thumbnails of those examples are held while writing (bounded memory)."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from vdit.data import filters

# the score a drop reason is about (shown under each thumbnail)
_SCORE_OF = {
    "too_small": ("height", "width"),
    "too_short": ("seconds",),
    "static": ("motion",),
    "black": ("brightness",),
    "flat": ("contrast",),
    "duplicate": ("motion",),
    "caption_failed": ("seconds",),
    "kept": ("motion", "brightness", "contrast"),
}
_THRESHOLD_OF = {
    "too_small": "filters.min_side",
    "too_short": "filters.min_seconds / shots.min_seconds",
    "static": "filters.min_motion",
    "black": "filters.min_brightness",
    "flat": "filters.min_contrast",
    "duplicate": "filters.dedup_distance",
    "caption_failed": "captioner.on_failure",
}


class Report:
    def __init__(self, examples: int):
        self.examples = examples
        self.thumbs: dict[str, list[tuple[bytes, str]]] = {}
        self.ranges: dict[str, dict[str, list[float]]] = {}  # group -> score -> [min, max]

    def add(self, clip: dict[str, Any], where: str) -> None:
        group = clip["dropped"] or "kept"
        label = (
            where
            + "\n"
            + ", ".join(f"{k} {clip['scores'][k]:.3g}" for k in _SCORE_OF.get(group, ()))
        )
        ranges = self.ranges.setdefault(group, {})
        for k in ("motion", "brightness", "contrast", "seconds"):
            v = clip["scores"][k]
            lo, hi = ranges.get(k, [v, v])
            ranges[k] = [min(lo, v), max(hi, v)]
        thumbs = self.thumbs.setdefault(group, [])
        if len(thumbs) < self.examples:
            thumbs.append((clip["thumb"], label))

    def _sheet(self, path: str, thumbs: list[tuple[bytes, str]], title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = min(4, len(thumbs))
        rows = -(-len(thumbs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (png, label) in zip(axes.ravel(), thumbs, strict=False):
            ax.imshow(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            ax.set_title(label, fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)

    def write(self, out_dir: str, manifest: dict[str, Any], options) -> dict[str, Any]:
        """Writes report.md and the contact sheets; returns {"markdown", "sheets"}."""
        os.makedirs(os.path.join(out_dir, "report"), exist_ok=True)
        sheets = {}
        for group, thumbs in self.thumbs.items():
            if thumbs:
                name = f"report/{group}.png"
                what = "kept" if group == "kept" else f"dropped: {group}"
                self._sheet(os.path.join(out_dir, name), thumbs, f"{what} (first {len(thumbs)})")
                sheets[group] = name
        f = options.filters
        lines = [
            "# vdit prepare report",
            "",
            f"{manifest['files']} files, {manifest['clips']} clips: {manifest['written']} written, "
            f"{sum(manifest['dropped_by_reason'].values())} dropped by filters, "
            f"{manifest['skipped_count']} files skipped.",
            "",
            f"Thresholds: min_side {f.min_side}, min_seconds {f.min_seconds}, motion "
            f"{f.motion} >= {f.min_motion}, brightness >= {f.min_brightness}, contrast >= "
            f"{f.min_contrast}, dedup_distance {f.dedup_distance}; shots "
            f"{'on' if options.shots.enabled else 'off'} (threshold {options.shots.threshold}, "
            f"{options.shots.min_seconds}-{options.shots.max_seconds or 'inf'} s).",
            "",
            "| group | clips | threshold | what | motion | brightness | contrast | seconds | sheet |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        groups = [("kept", manifest["written"])] + [
            (r, n) for r, n in manifest["dropped_by_reason"].items() if n
        ]
        for group, n in groups:
            r = self.ranges.get(group, {})
            cells = [
                f"{r[k][0]:.3g}-{r[k][1]:.3g}" if k in r else ""
                for k in ("motion", "brightness", "contrast", "seconds")
            ]
            sheet = f"[{sheets[group]}]({sheets[group]})" if group in sheets else ""
            what = "written" if group == "kept" else filters.REASONS[group]
            lines.append(
                f"| {group} | {n} | {_THRESHOLD_OF.get(group, '')} | {what} | "
                + " | ".join(cells)
                + f" | {sheet} |"
            )
        if manifest["skipped"]:
            lines += ["", "Skipped files:", ""]
            lines += [f"- {s['file']}: {s['reason']}: {s['message']}" for s in manifest["skipped"]]
        if manifest["events"]:
            lines += ["", "Events:", ""]
            lines += [f"- {e['event']}: {e['message']}" for e in manifest["events"]]
        with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        return {"markdown": "report.md", "sheets": sheets}
