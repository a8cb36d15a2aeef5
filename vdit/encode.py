"""`vdit encode`: prepared video records -> latent records of a trained VAE, for DiT training.

    vdit encode --config=configs/latent.py --vae=VAE_WORKDIR --input=RECORDS --out=LATENTS
                [--chunk_frames=16] [--tile=0 --tile_overlap=4] [--store=moments]

The sizes come from the DiT config that trains on the latents (`options_from_config`): each input
record (written by `vdit prepare`) goes through the size policy that config applies to pixels
(`size.fit_video`): frame-rate subsampling (data.frame_stride, data.max_fps), then aspect-kept
resizing to whole DiT patches of the latent grid (model.patch_t and the variant's p, in latent units)
under data.max_tokens_per_sample tokens, with the frame count brought to 1 + k * ct (data.time_fit)
so every pixel frame is seen by a latent frame. So a latent grid is always a whole number of patches
and the DiT trains on it as is. The video is then encoded in temporal chunks
(`--chunk_frames`, exact: the causal convolution caches are carried) and, with `--tile`, in
overlapping spatial tiles, so memory is bounded for any length and size.

Sharding: the records are split over processes (process p encodes records p, p + P, ...) and, within
a process, over its local devices (the VAE is replicated on each; samples of different native sizes
are encoded one per device, concurrently). The output does not depend on the device count: posterior
samples (`--store=sample`) are drawn with a key derived from the record's index.

A record that cannot be used (unreadable, wrong shape, too small or short for one patch, NaN) is
skipped, counted and listed in the manifest by reason, never fatal. The output folder must be empty.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from vdit import configlib
from vdit.data import latents, records, size, text_embeddings
from vdit.train.load import load

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How to encode. The size fields are the DiT config's, by the names of `size.SizePolicy`
    (`options_from_config` takes them from the config); the rest are `vdit encode`'s own flags."""

    patch: tuple[int, int, int] = (1, 2, 2)  # the DiT's (model.patch_t, p, p), in latent units
    max_tokens_per_sample: int = 0  # DiT tokens per sample at most (0: no cap)
    time_fit: str = "resample"  # frames short of a whole latent patch: "resample" | "trim"
    frame_stride: int = 1  # keep every k-th source frame
    max_fps: float = 0.0  # > 0: sources with a higher fps are strided down to at most this
    min_side: int = 0  # short side (pixels) kept under the cap by taking fewer frames first
    # The config's autoencoder.compression and .channels, checked against the VAE's (None: not)
    compression: tuple[int, int, int] | None = None
    channels: int | None = None
    chunk_frames: int = 16  # pixel frames per encoder call after the first (0: the whole video)
    tile: int = 0  # spatial tiles of this many latent pixels (0: no tiling)
    tile_overlap: int = 4  # latent pixels shared by neighbouring tiles
    store: str = "moments"  # "moments" (mean and logvar) | "sample" (one posterior draw)
    shard_size: int = 1000  # records per shard
    seed: int = 0  # posterior samples of store="sample"

    def __post_init__(self):
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch={self.patch}: three positive integers")
        if self.max_tokens_per_sample < 0:
            raise ValueError(
                f"data.max_tokens_per_sample={self.max_tokens_per_sample} must be >= 0 (0: no cap)"
            )
        if self.time_fit not in size.TIME_FITS:
            raise ValueError(f"data.time_fit={self.time_fit!r}: choose from {size.TIME_FITS}")
        if self.frame_stride < 1 or self.max_fps < 0:
            raise ValueError(
                f"data.frame_stride={self.frame_stride} must be >= 1 and "
                f"data.max_fps={self.max_fps} >= 0"
            )
        if self.chunk_frames < 0 or self.tile < 0 or not 0 <= self.tile_overlap:
            raise ValueError("--chunk_frames, --tile and --tile_overlap must be >= 0")
        if self.tile and self.tile_overlap >= self.tile:
            raise ValueError(f"--tile_overlap={self.tile_overlap} must be under --tile={self.tile}")
        if self.store not in latents.STORES:
            raise ValueError(f"--store={self.store!r}: choose from {latents.STORES}")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size={self.shard_size} must be >= 1")


def options_from_config(config: ml_collections.ConfigDict, **encode: Any) -> EncodeOptions:
    """The options of `vdit encode --config=CONFIG`: the size settings of the DiT config that will
    train on the latents (its patch, data.max_tokens_per_sample, data.time_fit, data.frame_stride,
    data.max_fps, data.min_side; autoencoder.compression and .channels to check the VAE against),
    and `encode`,
    the encode-only settings (chunk_frames, tile, tile_overlap, store, shard_size, seed)."""
    c = configlib.load(config, plan_only=True)  # the latents folder is what encode writes
    if c.autoencoder.kind != "latent":
        raise ValueError(
            f"autoencoder.kind={c.autoencoder.kind!r}: vdit encode writes latents for a config "
            "that trains on them (autoencoder.kind='latent', e.g. configs/latent.py)"
        )
    policy = configlib.pipeline_config(c).size
    return EncodeOptions(
        patch=policy.patch,
        max_tokens_per_sample=policy.max_tokens_per_sample,
        time_fit=policy.time_fit,
        frame_stride=policy.frame_stride,
        max_fps=policy.max_fps,
        min_side=policy.min_side,
        compression=policy.compression,
        channels=c.autoencoder.channels,
        **encode,
    )


def size_policy(options: EncodeOptions, compression: tuple[int, int, int]) -> size.SizePolicy:
    return size.SizePolicy(
        patch=tuple(options.patch),
        compression=tuple(compression),
        max_tokens_per_sample=options.max_tokens_per_sample or 2**62,
        time_fit=options.time_fit,
        frame_stride=options.frame_stride,
        max_fps=options.max_fps,
        min_side=options.min_side,
    )


def check_vae(options: EncodeOptions, compression: tuple[int, int, int], channels: int) -> None:
    """The VAE must be the autoencoder the config trains with; ValueError naming the field."""
    if options.compression is not None and tuple(options.compression) != tuple(compression):
        raise ValueError(
            f"autoencoder.compression={tuple(options.compression)} of --config, but the VAE "
            f"compresses by {tuple(compression)}: set it to the VAE's"
        )
    if options.channels is not None and options.channels != channels:
        raise ValueError(
            f"autoencoder.channels={options.channels} of --config, but the VAE has {channels} "
            "latent channels: set it to the VAE's"
        )


def encode_video(model, video: np.ndarray, options: EncodeOptions) -> tuple[jax.Array, jax.Array]:
    """uint8 (T, H, W, 3) -> (mean, logvar) (t, h, w, Z), on the device of the model's parameters
    (asynchronously: the results are jax arrays)."""
    from vdit.models import vae, vae_chunked

    device = jax.tree.leaves(nnx.state(model))[0].devices().pop()
    x = jax.device_put(video.astype(np.float32)[None] / 127.5 - 1.0, device)
    ct = model.cfg.compression[0]
    chunk = -(-options.chunk_frames // ct) * ct if options.chunk_frames else 0
    if options.tile:
        tile, overlap = (options.tile,) * 2, (options.tile_overlap,) * 2
        mean, logvar = vae_chunked.encode_tiled(model, x, tile, overlap, chunk or None)
    elif chunk:
        mean, logvar = vae_chunked.encode_chunked(model, x, chunk)
    else:
        mean, logvar = vae.encode_full(model, x)
    return mean[0], logvar[0]


def _replicas(model, devices) -> list:
    graphdef, state = nnx.split(model)
    return [nnx.merge(graphdef, jax.device_put(state, d)) for d in devices]


def encode_dataset(
    vae_workdir: str,
    input_path: str,
    out_dir: str,
    options: EncodeOptions,
    *,
    vae_step: int | None = None,
    devices=None,
    process_index: int = 0,
    process_count: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Encode this process's share of the records at `input_path` into `out_dir`; returns the
    manifest (written as out_dir/manifest.json by a single process; by several, each writes its part
    and `merge_manifests` joins them). `options` has no default: its sizes must be those of the
    config that trains on the output (`options_from_config`), or every latent may be rejected."""
    shards = records.find_shards(input_path)
    if not shards:
        raise ValueError(
            f"--input={input_path!r}: no shards (*{records.SHARD_SUFFIX}); write them "
            "with `vdit prepare`"
        )
    from vdit.train.load import is_export

    if not (os.path.isdir(os.path.join(vae_workdir, "checkpoints")) or is_export(vae_workdir)):
        raise ValueError(
            f"--vae={vae_workdir!r}: no checkpoints folder (a VAE work directory of "
            "`vdit train --config=configs/vae.py`) and no export (a `vdit export` directory, "
            "or an imported VAE's)"
        )
    os.makedirs(out_dir, exist_ok=True)
    prefix = "shard" if process_count == 1 else f"shard-p{process_index:03d}"
    part = (
        latents.MANIFEST
        if process_count == 1
        else f"manifest-p{process_index:03d}-of-{process_count:03d}.json"
    )
    used = [
        f
        for f in os.listdir(out_dir)  # this process's names: peers may be writing theirs
        if (f.startswith(prefix + "-") and f.endswith(records.SHARD_SUFFIX))
        or f in (part, latents.MANIFEST)
    ]
    if used:
        raise ValueError(
            f"--out={out_dir!r} already holds {sorted(used)[:3]}; choose an empty folder"
        )
    loaded = load(vae_workdir, step=vae_step)
    vae_config, model, vae_step = loaded.config, loaded.model(), loaded.step
    check_vae(options, model.cfg.compression, model.cfg.latent_channels)
    source = records.RecordsSource(shards)
    policy = size_policy(options, model.cfg.compression)
    devices = list(devices or jax.local_devices())
    replicas = _replicas(model, devices)

    text_entry = _input_text_entry(input_path)  # caption embeddings travel with the latents
    text_encoder = text_entry["encoder"] if text_entry else ""
    writer = records.ShardWriter(out_dir, options.shard_size, prefix)
    skipped: list[dict[str, Any]] = []
    written = tokens = 0
    key = jax.random.key(options.seed)

    def flush(pending):
        nonlocal written, tokens
        for index, element, video, events, (mean, logvar) in pending:
            if options.store == "sample":
                eps = jax.random.normal(jax.random.fold_in(key, index), mean.shape, mean.dtype)
                arrays = {
                    "z": np.asarray(mean + np.exp(0.5 * np.asarray(logvar)) * np.asarray(eps))
                }
            else:
                arrays = {"mean": np.asarray(mean), "logvar": np.asarray(logvar)}
            lat = next(iter(arrays.values())).shape
            record = latents.encode_record(
                arrays,
                pixel_shape=video.shape[:3],
                events=events,
                caption=element["caption"],
                fps=float(element.get("fps", 0.0)) / policy.fps_stride(element),
                source=str(element.get("source", "")),
                index=index,
                text_embedding=element.get(text_embeddings.MEMBER),
                text_encoder=text_encoder,
            )
            writer.write(record)
            written += 1
            tokens += int(np.prod([g // p for g, p in zip(lat[:3], options.patch, strict=True)]))
            if progress:
                progress(
                    f"ok   record {index}: {tuple(element['video'].shape[:3])} -> "
                    f"{video.shape[:3]} -> latent {lat}"
                )

    pending: list = []
    try:
        for index in range(process_index, len(source), process_count):
            element = source[index]
            try:
                video, events = size.fit_video(element, policy)
            except size.Rejected as e:
                skipped.append(
                    {
                        "index": index,
                        "source": str(element.get("source", "")),
                        "reason": e.reason,
                        "message": str(e),
                    }
                )
                if progress:
                    progress(f"skip record {index}: {e.reason}: {e}")
                continue
            replica = replicas[len(pending)]
            pending.append((index, element, video, events, encode_video(replica, video, options)))
            if len(pending) == len(replicas):  # one sample per device in flight
                flush(pending)
                pending = []
        flush(pending)
    finally:
        writer.close()

    manifest = {
        "format": latents.FORMAT,
        "written": written,
        "tokens": tokens,
        "shards": writer.shards,
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
        "input": input_path,
        "input_records": len(source),
        "vae": {
            "workdir": vae_workdir,
            "step": int(vae_step),
            "compression": list(model.cfg.compression),
            "latent_channels": model.cfg.latent_channels,
            "latent_mean": np.asarray(model.latent_mean[...]).tolist(),
            "latent_std": np.asarray(model.latent_std[...]).tolist(),
            "config": vae_config.vae.to_dict(),
        },
        "options": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(options).items()
        },
        "processes": process_count,
    }
    if text_entry:
        manifest[text_embeddings.MANIFEST_KEY] = text_entry
        null = text_embeddings.load(os.path.join(input_path, text_entry["null"]))
        text_embeddings.save(os.path.join(out_dir, text_embeddings.NULL_FILE), null)
        text_entry["null"] = text_embeddings.NULL_FILE
    with open(os.path.join(out_dir, part), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _input_text_entry(input_path: str) -> dict[str, Any] | None:
    """The "text_embedding" entry of the input records' manifest (None without one)."""
    path = os.path.join(input_path, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        entry = json.load(f).get(text_embeddings.MANIFEST_KEY)
    return dict(entry) if isinstance(entry, dict) else None


def merge_manifests(out_dir: str, process_count: int) -> dict[str, Any]:
    """Join the per-process manifests of a multi-process encode into out_dir/manifest.json."""
    parts = []
    for p in range(process_count):
        path = os.path.join(out_dir, f"manifest-p{p:03d}-of-{process_count:03d}.json")
        if not os.path.isfile(path):
            raise ValueError(f"{out_dir!r}: process {p}'s manifest part is missing ({path})")
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f))
    merged = dict(parts[0])
    merged["shards"] = [s for m in parts for s in m["shards"]]
    for k in ("written", "tokens", "skipped_count"):
        merged[k] = sum(m[k] for m in parts)
    merged["skipped"] = sorted((s for m in parts for s in m["skipped"]), key=lambda s: s["index"])
    merged["skipped_by_reason"] = dict(
        sorted(Counter(s["reason"] for s in merged["skipped"]).items())
    )
    with open(os.path.join(out_dir, latents.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1)
    return merged


def summary(manifest: dict[str, Any]) -> str:
    lines = [
        f"encoded {manifest['written']} of {manifest['input_records']} records into "
        f"{len(manifest['shards'])} shards ({manifest['tokens']:,} DiT tokens) with the VAE at "
        f"step {manifest['vae']['step']}"
    ]
    for reason, n in manifest["skipped_by_reason"].items():
        lines.append(f"skipped {n} ({reason})")
    return "\n".join(lines)
