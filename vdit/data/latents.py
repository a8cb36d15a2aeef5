"""Latent records: what `vdit encode` writes and what `data.source="latents"` reads.

A latents folder holds ArrayRecord shards (`shard-00000.array_record`, ...; `shard-p001-00000...` for
the part written by process 1 of a multi-process encode) and a `manifest.json` written last. One
record is one sample: the bytes of a numpy `.npz` archive (`np.savez_compressed`, read back with
`allow_pickle=False`) holding:

| member        | dtype, shape           | what                                                       |
|---------------|------------------------|------------------------------------------------------------|
| `format`      | str, ()                | `FORMAT` ("vdit-latent-npz-1")                             |
| `store`       | str, ()                | "moments" (mean and logvar) or "sample" (one draw), STORES |
| `mean`        | float32, (t, h, w, Z)  | "moments": the posterior mean                              |
| `logvar`      | float32, (t, h, w, Z)  | "moments": the posterior log-variance                      |
| `z`           | float32, (t, h, w, Z)  | "sample": one posterior sample                             |
| `pixel_shape` | int64, (3,)            | (T, H, W) of the pixels that were encoded                  |
| `events`      | str, ()                | the size events of `vdit.data.size.EVENTS` that            |
|               |                        | changed the source sample, comma-separated ("" for none)   |
| `caption`     | str, ()                | the caption                                                |
| `fps`         | float64, ()            | frames per second of the encoded frames (0 unknown)        |
| `source`      | str, ()                | the input record's `source` (its file), and                |
| `index`       | int64, ()              | its index in the input records                             |
| `text_embedding` | float16, (Nc, E)    | optional: the input record's caption embedding, carried    |
| `text_encoder`   | str, ()             | over (vdit/data/text_embeddings.py); the manifest then     |
|               |                        | has the input's "text_embedding" entry and text_null.npy   |

Latents are stored raw (not normalised). The manifest names the VAE (`vae.workdir`, `vae.step`),
its compression, latent channels and the per-channel latent statistics (`vae.latent_mean`,
`vae.latent_std`) that the training pipeline normalises with and the sampler's decoder undoes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from typing import Any

import numpy as np

from vdit.data import records, text_embeddings

FORMAT = "vdit-latent-npz-1"
STORES = ("moments", "sample")
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class LatentsConfig:
    """The data.latents section (empty for configs written before it)."""

    path: str = ""  # a folder written by `vdit encode`
    sample_posterior: bool = True  # z ~ N(mean, exp(logvar)) at every use (False: the mean)


def encode_record(
    latent: dict[str, np.ndarray],
    *,
    pixel_shape,
    events,
    caption: str,
    fps: float,
    source: str,
    index: int,
    text_embedding: np.ndarray | None = None,
    text_encoder: str = "",
) -> bytes:
    """One encoded sample -> record bytes. `latent` is {"mean", "logvar"} or {"z"}; the caption's
    `text_embedding` (Nc, E), when given, is stored as float16 with `text_encoder`'s name."""
    if set(latent) == {"mean", "logvar"}:
        store = "moments"
    elif set(latent) == {"z"}:
        store = "sample"
    else:
        raise ValueError(f"latent members {sorted(latent)}: expected mean and logvar, or z")
    arrays = {k: np.asarray(v, np.float32) for k, v in latent.items()}
    for k, v in arrays.items():
        if v.ndim != 4:
            raise ValueError(f"{k} has shape {v.shape}, expected (t, h, w, Z)")
    text = {}
    if text_embedding is not None:
        text[text_embeddings.MEMBER] = text_embeddings.check(text_embedding)
        text[text_embeddings.ENCODER_KEY] = np.str_(text_encoder)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        **text,
        format=np.str_(FORMAT),
        store=np.str_(store),
        **arrays,
        pixel_shape=np.asarray(pixel_shape, np.int64),
        events=np.str_(",".join(events)),
        caption=np.str_(caption),
        fps=np.float64(fps),
        source=np.str_(source),
        index=np.int64(index),
    )
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> {"mean", "logvar" (None for "sample"), "pixel_shape", "events" (tuple),
    "caption", "fps", "source", "index"}; ValueError on anything malformed."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            m = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, zlib.error, EOFError, ValueError, ...
        raise ValueError(f"not a readable latent record ({type(e).__name__}: {e})") from None
    if str(m.get("format", "")) != FORMAT:
        raise ValueError(f"record format {str(m.get('format', ''))!r}, expected {FORMAT!r}")
    store = str(m.get("store", ""))
    arrays = {"moments": ("mean", "logvar"), "sample": ("z",)}.get(store)
    if arrays is None:
        raise ValueError(f"record store {store!r}, expected one of {STORES}")
    missing = {*arrays, "pixel_shape", "events", "caption", "fps", "source", "index"} - set(m)
    if missing:
        raise ValueError(f"latent record lacks {sorted(missing)}")
    mean = m["mean"] if store == "moments" else m["z"]
    logvar = m["logvar"] if store == "moments" else None
    if mean.ndim != 4 or (logvar is not None and logvar.shape != mean.shape):
        raise ValueError(
            f"latent shapes {mean.shape} and "
            f"{None if logvar is None else logvar.shape}, expected two equal (t, h, w, Z)"
        )
    events = str(m["events"])
    text = {k: m[k] for k in (text_embeddings.MEMBER, text_embeddings.ENCODER_KEY) if k in m}
    return {
        **text,
        "mean": mean,
        "logvar": logvar,
        "pixel_shape": tuple(int(v) for v in m["pixel_shape"]),
        "events": tuple(e for e in events.split(",") if e),
        "caption": str(m["caption"]),
        "fps": float(m["fps"]),
        "source": str(m["source"]),
        "index": int(m["index"]),
    }


def check_encoded_for(manifest: dict[str, Any], patch, max_tokens_per_sample: int) -> list[str]:
    """Where the latents of `manifest` were encoded for another patch or token cap than the config
    that trains on them: one warning per difference (logged; returned). Latents over the cap are
    rejected as `over_cap`; latents of another patch lose their remainder (`snapped`)."""
    options = manifest.get("options", {})
    fix = "re-encode with `vdit encode --config=` this config"
    notes = []
    cap = options.get("max_tokens_per_sample")
    if cap is not None and (cap == 0 or cap > max_tokens_per_sample):
        notes.append(
            f"the latents were encoded with max_tokens_per_sample={cap}"
            f"{' (no cap)' if cap == 0 else ''}, this config caps data.max_tokens_per_sample="
            f"{max_tokens_per_sample}: larger latents will be rejected as over_cap; {fix}"
        )
    if options.get("patch") is not None and tuple(options["patch"]) != tuple(patch):
        notes.append(
            f"the latents were encoded for patch {tuple(options['patch'])}, this config's is "
            f"{tuple(patch)}: latents are cut to whole patches (or rejected); {fix}"
        )
    for note in notes:
        logging.getLogger(__name__).warning("data.latents.path: %s", note)
    return notes


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of a latents folder; ValueError naming data.latents.path when there is none."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ValueError(
            f"data.latents.path={path!r}: no {MANIFEST} (a folder written by "
            "`vdit encode`, which writes the manifest last)"
        )
    with open(file, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"data.latents.path={path!r}: manifest format "
            f"{manifest.get('format')!r}, expected {FORMAT!r}"
        )
    return manifest


class LatentsSource(records.ShardSource):
    """Random-access source over a latents folder (a grain MapDataset source).

    Elements are {"mean", "logvar" (None when one sample was stored), "events", "caption", "source",
    "index"} plus "fps" when known; a record that fails to read gives {"decode_error": message,
    "index"}.
    """

    kind = "latent record"

    def __init__(self, path: str):
        self.manifest = read_manifest(path)
        paths = [os.path.join(path, s["file"]) for s in self.manifest["shards"]]
        if not paths:
            raise ValueError(
                f"data.latents.path={path!r}: the manifest lists no shards "
                f"({self.manifest.get('skipped_count', 0)} samples were skipped)"
            )
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"data.latents.path={path!r}: shards listed in the manifest are "
                f"missing: {[os.path.basename(p) for p in missing[:3]]}"
            )
        super().__init__(paths)

    def element(self, data: bytes, index: int) -> dict[str, Any]:
        r = decode_record(data)
        element = {
            "mean": r["mean"],
            "logvar": r["logvar"],
            "events": r["events"],
            "caption": r["caption"],
            "source": r["source"],
            "index": index,
        }
        if r["fps"] > 0:
            element["fps"] = r["fps"]
        if text_embeddings.MEMBER in r:
            element[text_embeddings.MEMBER] = r[text_embeddings.MEMBER]
        return element

    def __repr__(self) -> str:
        return f"LatentsSource({len(self.paths)} shards, {len(self)} records)"
