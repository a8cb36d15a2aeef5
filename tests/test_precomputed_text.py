"""Precomputed caption embeddings end to end on the training side (model.text.kind="precomputed"):
records carry them, the pipeline packs each sample's own embedding (the empty caption's under caption
dropout, cut to model.text.max_len), training runs and keeps text_null.npy, and a folder without
embeddings or of another width fails at the start with one line naming the fix."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests.tiny import ROOT, load_config_module
from vdit import configlib
from vdit.data import pipeline, records, size, text_embeddings
from vdit.train.loop import train_and_evaluate

WIDTH = 32  # configs/wan.py:tiny's model.text.width


def toy_encoder(caption: str, width: int = WIDTH) -> np.ndarray:
    """A deterministic stand-in for a text encoder: one row per word (at least one), each a
    function of the word alone."""
    rows = []
    for word in caption.split() or [""]:
        seed = sum((i + 1) * b for i, b in enumerate(word.encode()))
        rows.append(np.random.default_rng(seed).standard_normal(width))
    return np.stack(rows).astype(np.float16)


CAPTIONS = [
    "a red square moves right",
    "a blue circle",
    "green",
    "a yellow square moves down slowly over a grey field at dusk",  # 12 rows: cut at max_len 8
]


def _records(folder, captions=CAPTIONS, width=WIDTH, with_entry=True, skip=()):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = records.ShardWriter(str(folder), shard_size=8)
    for i, caption in enumerate(captions * 2):
        video = rng.integers(0, 255, (4, 16, 16, 3), np.uint8)
        emb = None if i in skip else toy_encoder(caption, width)
        writer.write(
            records.encode_record(
                video, caption, 8.0, f"v{i}", text_embedding=emb, text_encoder="toy"
            )
        )
    writer.close()
    manifest = {"written": 2 * len(captions)}
    if with_entry:
        manifest[text_embeddings.MANIFEST_KEY] = text_embeddings.manifest_entry(width, "toy")
        text_embeddings.save(
            os.path.join(folder, text_embeddings.NULL_FILE), toy_encoder("", width)
        )
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(folder)


def _config(path, **over):
    c = load_config_module(os.path.join(ROOT, "configs", "wan.py")).get_config("tiny")
    c.data.source = "records"
    c.data.records.path = path
    c.data.batch_rows = 8
    c.data.row_len = 128
    c.data.max_tokens_per_sample = 128
    c.data.max_samples_per_row = 4
    c.data.eval_samples = 0
    c.train.steps = 2
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.progress = False
    c.mesh.data = -1
    for k, v in over.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


def _rows(c, n=2):
    it = iter(pipeline.build(configlib.pipeline_config(configlib.load(c))))
    return [next(it) for _ in range(n)]


def test_packed_rows_carry_each_samples_embedding(tmp_path):
    path = _records(tmp_path / "rec")
    null = toy_encoder("")
    by_len = {}
    for cap in CAPTIONS:
        by_len.setdefault(len(toy_encoder(cap)), []).append(toy_encoder(cap).astype(np.float32))
    seen = dropped = cut = 0
    for batch in _rows(_config(path, **{"data.caption_dropout": 0.3, "model.text.max_len": 8})):
        assert batch["text"].dtype == np.float32 and batch["text"].shape[-1] == WIDTH
        for row in range(batch["text"].shape[0]):
            tseg = batch["text_segment_ids"][row]
            for s in set(tseg[tseg > 0].tolist()):
                emb = batch["text"][row][tseg == s]
                assert len(emb) <= 8  # model.text.max_len
                if len(emb) == len(null) and np.array_equal(emb, null.astype(np.float32)):
                    dropped += 1
                    continue
                full = [e for cands in by_len.values() for e in cands if len(e) >= len(emb)]
                assert any(np.array_equal(emb, e[: len(emb)]) for e in full)
                cut += len(emb) == 8
                seen += 1
        # the segments of the text match the video's samples
        for row in range(batch["segment_ids"].shape[0]):
            video = set(batch["segment_ids"][row][batch["segment_ids"][row] > 0].tolist())
            text = set(batch["text_segment_ids"][row][batch["text_segment_ids"][row] > 0].tolist())
            assert video == text
    assert seen > 0 and dropped > 0 and cut > 0  # real captions, dropped ones and a cut one


def test_trains_a_few_steps_and_keeps_the_null_embedding(tmp_path):
    path = _records(tmp_path / "rec")
    work = str(tmp_path / "run")
    out = train_and_evaluate(_config(path), work, jax.local_devices()[:1])
    with open(os.path.join(work, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert np.array_equal(
        text_embeddings.load(os.path.join(work, text_embeddings.NULL_FILE)), toy_encoder("")
    )
    assert out is not None
    # the run's DiT (configs/wan.py:tiny) exports as a diffusers WanTransformer3DModel folder
    from vdit.export import tensors
    from vdit.interop import diffusers_io, wan_dit
    from vdit.interop.transfer import export_diffusers
    from vdit.train import load

    back = str(tmp_path / "diffusers")
    summary = export_diffusers(work, back)
    assert summary["step"] == 2 and summary["params"] == "ema"
    loaded = load.load(work)  # the EMA parameters the export holds
    flat = {n: np.asarray(x) for n, x in tensors.names(loaded.params).items()}
    with diffusers_io.Tensors(back) as source:
        again = wan_dit.params_from_diffusers(source, loaded.config)
    assert set(again) == set(flat)
    for n, x in flat.items():
        assert np.array_equal(again[n], x), n  # vdit -> diffusers -> vdit, bit for bit


def test_records_without_embeddings_are_counted_and_skipped(tmp_path):
    path = _records(tmp_path / "rec", skip=(0, 4))
    (batch,) = _rows(_config(path), n=1)
    stats = batch["stats"].reshape(-1, len(size.STATS)).sum(0)
    assert stats[size.STATS.index("rejected_no_text_embedding")] >= 1


@pytest.mark.parametrize(
    "kind,match",
    [
        (
            "width",
            r"model.text.width=32, but the embeddings in .* are 48 wide \(toy\): set model.text.width=48",
        ),
        ("entry", r"describes no caption embeddings"),
        ("source", r"data.source='synthetic' has none"),
    ],
)
def test_bad_text_setup_fails_at_start_naming_the_fix(tmp_path, kind, match):
    if kind == "source":
        c = _config("")
        c.data.source = "synthetic"
    else:
        width = 48 if kind == "width" else WIDTH
        c = _config(_records(tmp_path / "rec", width=width, with_entry=kind != "entry"))
    with pytest.raises(ValueError, match=match):
        _rows(c, n=1)


def test_latent_records_carry_the_embedding(tmp_path):
    from vdit.data import latents

    emb = toy_encoder("a red square")
    mean = np.zeros((2, 4, 4, 4), np.float32)
    data = latents.encode_record(
        {"mean": mean, "logvar": mean},
        pixel_shape=(5, 32, 32),
        events=(),
        caption="a red square",
        fps=8.0,
        source="v0",
        index=0,
        text_embedding=emb,
        text_encoder="toy",
    )
    r = latents.decode_record(data)
    assert r[text_embeddings.MEMBER].dtype == np.float16
    assert np.array_equal(r[text_embeddings.MEMBER], emb)
    assert str(r[text_embeddings.ENCODER_KEY]) == "toy"
    plain = latents.decode_record(
        latents.encode_record(
            {"mean": mean, "logvar": mean},
            pixel_shape=(5, 32, 32),
            events=(),
            caption="",
            fps=8.0,
            source="v0",
            index=0,
        )
    )
    assert text_embeddings.MEMBER not in plain
