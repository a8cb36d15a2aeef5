"""The grain graph: source -> size policy -> latent patches -> text ids -> task mask -> token drop
-> pack -> batch, per host, deterministic, with checkpointable iterator state.

Each process reads every `process_count`-th sample of a shuffled, repeated index space, so the hosts of
a multi-host run see disjoint data; `to_global` turns each host's rows into one global jax.Array per key.
The settings are `vdit.data.config.PipelineConfig`; the sources are `vdit.data.sources`; the size
policy and the statistics vocabulary are `vdit.data.size`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import grain
import jax
import numpy as np

from vdit.data import latents, packing, sources, tasks, text_embeddings
from vdit.data.config import PipelineConfig, validate
from vdit.data.size import STATS, Rejected, fit_video, stats
from vdit.data.tokenizer import tokenize

log = logging.getLogger(__name__)


class _Prepare(grain.transforms.RandomMap):
    """One sample dict {"video" uint8 (T,H,W,3), "caption"[, "fps"]} -> the per-sample packing input,
    or {"stats"} alone for a rejected sample (logged; counted by `_CountRejected`). A source marks a
    sample it could not decode with a "decode_error" message (rejected as "decode_error")."""

    def __init__(self, cfg: PipelineConfig, null_text: np.ndarray | None = None):
        self.cfg = cfg
        self.null_text = null_text  # "precomputed" text: the empty caption's embedding

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        try:
            return self._prepare(element, rng)
        except Rejected as e:
            log.warning("sample %s rejected: %s", element.get("index", "?"), e)
            return {"stats": stats(rejected=e.reason)}

    def _prepare(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.compression != (1, 1, 1):
            raise NotImplementedError(
                "online VAE encoding: train on encoded latents instead "
                "(`vdit encode`, data.source='latents')"
            )
        video, events = fit_video(element, cfg.size)
        latent = video.astype(np.float32) / 127.5 - 1.0  # identity autoencoder: pixels in [-1, 1]
        latent = one_temporal_patch(latent, cfg.patch[0], events)
        return sample_tokens(latent, self._caption(element), events, cfg, rng, self.null_text)

    def _caption(self, element: dict[str, Any]) -> str | np.ndarray:
        """The caption, or its embedding for "precomputed" text (Rejected when it has none)."""
        if self.cfg.text_kind != "precomputed":
            return element["caption"]
        emb = element.get(text_embeddings.MEMBER)
        if emb is None:
            raise Rejected(
                "no_text_embedding",
                "the record carries no text_embedding (model.text.kind="
                "'precomputed'); prepare the records with caption embeddings",
            )
        return text_embeddings.check(emb, self.cfg.text_width, "the record's text_embedding")


class _PrepareLatent(_Prepare):
    """One latent record of `vdit encode` -> the per-sample packing input (or a rejection): a posterior
    sample (or the mean), normalised with the VAE's per-channel statistics, on whole patches. The
    frame-rate and size fitting happened when encoding; here latents are only checked against the
    patch and the cap."""

    def __init__(
        self,
        cfg: PipelineConfig,
        shift: np.ndarray,
        scale: np.ndarray,
        null_text: np.ndarray | None = None,
    ):
        super().__init__(cfg, null_text)
        self.shift = np.asarray(shift, np.float32)
        self.scale = np.asarray(scale, np.float32)

    def _prepare(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        cfg = self.cfg
        if element.get("decode_error"):
            raise Rejected("decode_error", element["decode_error"])
        mean, logvar = np.asarray(element["mean"]), element.get("logvar")
        if mean.ndim != 4 or mean.shape[-1] != cfg.channels or min(mean.shape) < 1:
            raise Rejected("bad_shape", f"latent {mean.shape}, expected (t, h, w, {cfg.channels})")
        if not np.isfinite(mean).all() or (logvar is not None and not np.isfinite(logvar).all()):
            raise Rejected("non_finite", "NaN or inf in the latent")
        events = list(element.get("events", ()))
        pt, ph, pw = cfg.patch
        t, h, w, _ = mean.shape
        if 1 < t < pt:
            raise Rejected("too_short", f"{t} latent frames make no whole temporal patch of {pt}")
        if h < ph or w < pw:
            raise Rejected("too_small", f"latent {h}x{w} is under one patch {ph}x{pw}")
        grid = (t if t == 1 else t // pt * pt, h // ph * ph, w // pw * pw)
        if grid != (t, h, w):  # encoded for another patch: cut the remainder (under one patch)
            events.append("latent_cut")
        n = math.prod(g // p for g, p in zip(grid, cfg.patch, strict=True))
        if n > cfg.max_tokens_per_sample:
            raise Rejected(
                "over_cap",
                f"latent grid {grid} is {n} tokens, over data.max_tokens_per_sample="
                f"{cfg.max_tokens_per_sample}; encode the latents with this config",
            )
        z = mean
        if cfg.latents.sample_posterior and logvar is not None:
            z = mean + np.exp(0.5 * np.asarray(logvar)) * rng.standard_normal(mean.shape)
        z = (z[: grid[0], : grid[1], : grid[2]] - self.shift) / self.scale
        z = one_temporal_patch(z.astype(np.float32), pt, events)
        return sample_tokens(z, self._caption(element), events, cfg, rng, self.null_text)


def one_temporal_patch(latent: np.ndarray, pt: int, events: list[str]) -> np.ndarray:
    """An image (one latent frame) under a temporal patch pt > 1: the frame repeated to one whole
    temporal patch of pt frames (a still clip; the sampler keeps the first frame of an image),
    counted as `image_repeated` in `events`. Any other latent is returned as it is."""
    if pt == 1 or latent.shape[0] != 1:
        return latent
    events.append("image_repeated")
    return np.repeat(latent, pt, axis=0)


def sample_tokens(
    latent: np.ndarray,
    caption: str | np.ndarray,
    events,
    cfg: PipelineConfig,
    rng: np.random.Generator,
    null_text: np.ndarray | None = None,
) -> dict[str, Any]:
    """A whole-patch latent (T, H, W, C) -> the per-sample packing input: patches and positions, the
    task's conditioning mask, NaViT token dropping, the (possibly dropped) caption's tokens. For
    "precomputed" text `caption` is the caption's embedding (Nc, E) and a dropped caption is
    `null_text`, the empty caption's; either keeps at most `text_max_len` rows."""
    patches, positions = packing.patchify(latent, cfg.patch)
    grid = np.array([latent.shape[:3]], np.int32)  # (1, 3): the full grid, also after dropping

    pt, ph, pw = cfg.patch
    frames = latent.shape[0] // pt
    drawn = tasks.draw_task(dict(cfg.tasks), frames, rng)
    task = tasks.fit_task(drawn, frames)
    events = [*events, *(["task_fallback"] if task != drawn else [])]
    per_frame = (latent.shape[1] // ph) * (latent.shape[2] // pw)
    cond = tasks.token_mask(tasks.frame_mask(task, frames, rng), per_frame)
    keep = cfg.token_drop.keep(cond, rng)
    dropped = cond.shape[0] - keep.shape[0]
    if dropped:
        patches, positions, cond = patches[keep], positions[keep], cond[keep]

    if cfg.text_kind == "precomputed":
        emb = caption if rng.random() >= cfg.caption_dropout else null_text
        if len(emb) > cfg.text_max_len:
            events.append("caption_cut")
        tokens = np.asarray(emb[: cfg.text_max_len], np.float32)  # (Nc, E)
    else:
        text = caption if rng.random() >= cfg.caption_dropout else ""
        if len(text.encode("utf-8")) + 1 > cfg.text_max_len:  # BOS + bytes
            events.append("caption_cut")
        tokens = tokenize(text, cfg.text_max_len)
    return {
        "patches": patches,
        "positions": positions,
        "cond_mask": cond,
        "text": tokens,
        "grid": grid,
        "stats": stats(events, dropped=dropped),
    }


class _CountRejected(grain.IterDataset):
    """Skips rejected samples, adding their counts to the next accepted sample's "stats"; more
    than `limit` rejected in a row (a source none of whose samples fits the config) is an error."""

    def __init__(self, parent: grain.IterDataset, limit: int):
        super().__init__(parent)
        self._limit = limit

    def __iter__(self) -> grain.DatasetIterator:
        return _CountRejectedIterator(self._parent.__iter__(), self._limit)


class _CountRejectedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, limit: int):
        super().__init__(parent)
        self._limit = limit

    def __next__(self) -> dict[str, Any]:
        rejected = np.zeros_like(stats())
        for _ in range(self._limit + 1):
            element = next(self._parent)
            if "patches" in element:
                element["stats"] = element["stats"] + rejected
                return element
            rejected += element["stats"]
        counts = {
            name[len("rejected_") :]: int(n)
            for name, n in zip(STATS, rejected[0], strict=True)
            if name.startswith("rejected_") and n
        }
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda x: -x[1]))
        raise ValueError(
            f"{self._limit + 1} samples in a row were rejected ({by_reason}): the data cannot "
            "feed this config (the warnings above give each sample's reason); fix the data or "
            "the setting a reason names, or raise data.max_consecutive_rejections"
        )

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


def prepare_samples(
    ds: grain.MapDataset,
    cfg: PipelineConfig,
    manifest: dict[str, Any] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Source elements -> per-sample packing inputs of this process (every `process_count`-th);
    rejected samples are logged, skipped, and counted in the next accepted sample's "stats" (so
    counts after the last accepted sample of a finite dataset are only logged). Latents
    (data.source="latents") need their folder's manifest.

    The random draws of a sample (caption dropout, task, token drop, posterior sample) are seeded
    by its index in the whole index space, before the per-process slice: the hosts of a multi-host
    run draw independent streams, and one process draws what it always did."""
    null = null_text(cfg)
    if cfg.source == "latents":
        manifest = manifest or latents.read_manifest(cfg.latents.path)
        latents.check_encoded_for(manifest, cfg.patch, cfg.max_tokens_per_sample)
        prepare = _PrepareLatent(cfg, *sources.latent_statistics(manifest, cfg), null)
    else:
        prepare = _Prepare(cfg, null)
    ds = ds.random_map(prepare, seed=cfg.seed + 1)[process_index::process_count]
    return _CountRejected(ds.to_iter_dataset(), cfg.max_consecutive_rejections)


def text_folder(cfg: PipelineConfig) -> str:
    """The folder whose manifest.json describes the records' caption embeddings ("precomputed"
    text): data.records.path (a folder) or data.latents.path. ValueError for another source."""
    if cfg.source == "records" and os.path.isdir(cfg.records.path):
        return cfg.records.path
    if cfg.source == "latents":
        return cfg.latents.path
    raise ValueError(
        f"model.text.kind: 'precomputed' reads caption embeddings from the records; "
        f"data.source={cfg.source!r} has none (use data.source='records' with a folder in "
        "data.records.path, or 'latents')"
    )


def null_text(cfg: PipelineConfig) -> np.ndarray | None:
    """The empty caption's embedding (Nc, E) of the data folder ("precomputed" text; None for
    byte text), after checking the folder's manifest: ValueError naming what is missing or which
    width differs from model.text.width."""
    if cfg.text_kind != "precomputed":
        return None
    folder = text_folder(cfg)
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path) as f:
            entry = json.load(f).get(text_embeddings.MANIFEST_KEY)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the data folder's manifest ({e})") from None
    if not isinstance(entry, dict) or "width" not in entry:
        raise ValueError(
            f"model.text.kind='precomputed', but {path} describes no caption embeddings "
            f"(no {text_embeddings.MANIFEST_KEY!r} entry): prepare the records with a text encoder"
        )
    if int(entry["width"]) != cfg.text_width:
        raise ValueError(
            f"model.text.width={cfg.text_width}, but the embeddings in {folder} are "
            f"{entry['width']} wide ({entry.get('encoder', '?')}): set model.text.width="
            f"{entry['width']}"
        )
    return text_embeddings.load(
        os.path.join(folder, entry.get("null", text_embeddings.NULL_FILE)), cfg.text_width
    )


def build(cfg: PipelineConfig, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of packed rows (numpy dicts in the packed-batch contract) for this process."""
    validate(cfg)
    if cfg.batch_rows % process_count:
        raise ValueError(
            f"data.batch_rows={cfg.batch_rows} is not divisible by {process_count} processes"
        )
    source, _ = sources.split(sources.make_source(cfg), cfg)  # without the held-out samples
    ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed).repeat(None)
    manifest = getattr(source, "manifest", None)
    it = prepare_samples(ds, cfg, manifest, process_index, process_count)
    pack_cfg = dataclasses.replace(cfg.packing, seed=cfg.packing.seed + process_index)
    it = packing.pack(it, pack_cfg, sample_features=("stats",))
    it = it.batch(cfg.batch_rows // process_count, drop_remainder=True)
    if cfg.workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it


def held_out(cfg: PipelineConfig) -> dict[str, np.ndarray] | None:
    """The packed rows (R, ...) of the held-out evaluation samples (`data.eval_samples`, disjoint
    from the training ones: sources.split), or None when there are none. Every process builds the
    same rows: no shuffling, no caption dropout, no token dropping; the tasks and packing are drawn
    from the data seed, so the set is a function of the data settings alone."""
    validate(cfg)
    source, held = sources.split(sources.make_source(cfg), cfg)
    if held is None:
        return None
    cfg = dataclasses.replace(
        cfg, caption_dropout=0.0, token_drop=dataclasses.replace(cfg.token_drop, kind="none")
    )
    it = prepare_samples(grain.MapDataset.source(held), cfg, getattr(source, "manifest", None))
    rows = list(packing.pack(it, cfg.packing, sample_features=("stats",)))
    if not rows:
        raise ValueError(
            f"data.eval_samples={cfg.eval_samples}: every held-out sample was rejected "
            "(see the log); check the data settings"
        )
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# Keys the device step reads; the rest ("stats": (B, S, len(STATS)) counts) stay on the host.
DEVICE_KEYS = (
    "patches",
    "segment_ids",
    "positions",
    "text",
    "text_segment_ids",
    "text_positions",
    "cond_mask",
    "loss_mask",
    "grid",
)


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding]):
    """This process's rows -> global jax.Arrays sharded as given (rows split over processes)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
        for k in DEVICE_KEYS
    }
