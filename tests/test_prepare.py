"""Real data: `vdit prepare` (folder of videos and images -> ArrayRecord shards), the "records" and
"tfds" training sources, and how bad files and records are counted instead of stopping anything."""

import io
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image
from tiny import ROOT, tiny_config

from vdit import configlib
from vdit.data import packing, pipeline, records, size, sources
from vdit.data import prepare as prep
from vdit.data.tokenizer import detokenize
from vdit.data.video_io import write_video

H, W = 32, 48


def _clip(frames: int, color, seed: int) -> np.ndarray:
    """A square of `color` moving right on a plain background: distinct frames, few colours."""
    rng = np.random.default_rng(seed)
    video = np.zeros((frames, H, W, 3), np.uint8)
    video[...] = rng.integers(30, 60, size=3, dtype=np.uint8)
    for t in range(frames):
        video[t, 8:24, 4 + 6 * t : 20 + 6 * t] = color
    return video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Three good files (MP4, GIF, PNG), four bad ones, a sidecar caption and a captions file."""
    root = tmp_path_factory.mktemp("media")
    src = root / "in"
    videos = {
        "clips/red.mp4": _clip(5, (220, 40, 40), 0),
        "anim.gif": _clip(3, (40, 80, 230), 1),
        "still.png": _clip(1, (40, 200, 40), 2),
    }
    write_video(src / "clips" / "red.mp4", videos["clips/red.mp4"], fps=10)
    write_video(src / "anim.gif", videos["anim.gif"], fps=5)
    write_video(src / "still.png", videos["still.png"])
    (src / "clips" / "red.txt").write_text("a red square moves right\n")
    (src / "broken").mkdir()
    data = (src / "clips" / "red.mp4").read_bytes()
    (src / "broken" / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (src / "broken" / "empty.webm").write_bytes(b"")
    (src / "broken" / "text.mkv").write_text("not a video at all\n")
    (src / "notes.csv").write_text("a,b\n1,2\n")
    captions = root / "captions.jsonl"
    captions.write_text(
        json.dumps({"file": "anim.gif", "caption": "a blue square moves right"})
        + "\n\n"
        + json.dumps({"file": "gone.mp4", "caption": "no such file"})
        + "\n"
    )
    return src, captions, videos


BAD = {
    "broken/trunc.mp4": "decode_error",
    "broken/empty.webm": "empty_file",
    "broken/text.mkv": "decode_error",
    "notes.csv": "not_media",
}


def _read_all(out) -> list[dict]:
    source = records.RecordsSource(records.find_shards(str(out)))
    return [source[i] for i in range(len(source))]


def test_prepare_writes_good_files_and_lists_bad_ones(media, tmp_path):
    src, captions, videos = media
    out = tmp_path / "out"
    manifest = prep.prepare(str(src), str(out), str(captions), prep.PrepareOptions(shard_size=2))
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["written"] == 3 and manifest["frames"] == 5 + 3 + 1
    assert manifest["shards"] == [
        {"file": "shard-00000.array_record", "records": 2},
        {"file": "shard-00001.array_record", "records": 1},
    ]
    assert {s["file"]: s["reason"] for s in manifest["skipped"]} == BAD
    assert manifest["skipped_count"] == 4
    assert manifest["skipped_by_reason"] == {"decode_error": 2, "empty_file": 1, "not_media": 1}
    assert all(s["message"] for s in manifest["skipped"])
    assert manifest["captions"] == {"jsonl": 1, "sidecar": 1, "model": 0, "none": 1}
    assert manifest["uncaptioned"] == ["still.png"]
    assert manifest["captions_without_file"] == ["gone.mp4"]

    got = _read_all(out)  # sorted by path: anim.gif, clips/red.mp4, still.png
    assert [e["source"] for e in got] == ["anim.gif", "clips/red.mp4", "still.png"]
    assert [e["caption"] for e in got] == [
        "a blue square moves right",
        "a red square moves right",
        "",
    ]
    np.testing.assert_array_equal(got[0]["video"], videos["anim.gif"])  # GIF: few colours, exact
    np.testing.assert_array_equal(got[2]["video"], videos["still.png"])
    mp4 = got[1]["video"]
    assert mp4.shape == (5, H, W, 3) and mp4.dtype == np.uint8
    err = np.abs(mp4.astype(int) - videos["clips/red.mp4"].astype(int))
    assert err.mean() < 4 and np.percentile(err, 99) < 40  # H.264 is lossy; same content
    assert got[1]["fps"] == pytest.approx(10) and got[0]["fps"] == pytest.approx(5)
    assert "fps" not in got[2]  # an image has no frame rate

    text = prep.summary(manifest)
    for name, reason in BAD.items():
        assert f"{name}: {reason}" in text
    with pytest.raises(ValueError, match="already holds"):  # nothing is overwritten
        prep.prepare(str(src), str(out))


def test_prepare_downsizes_and_caps_frames(media, tmp_path):
    src, _, videos = media
    manifest = prep.prepare(
        str(src), str(tmp_path / "out"), options=prep.PrepareOptions(max_frames=3, max_side=24)
    )
    assert manifest["written"] == 3
    got = {e["source"]: e for e in _read_all(tmp_path / "out")}
    assert got["clips/red.mp4"]["video"].shape == (3, 16, 24, 3)  # first 3 of 5, aspect kept
    assert got["anim.gif"]["video"].shape == (3, 16, 24, 3)
    assert got["still.png"]["video"].shape == (1, 16, 24, 3)
    expected = np.asarray(
        Image.fromarray(videos["still.png"][0]).resize((24, 16), Image.Resampling.BOX)
    )
    np.testing.assert_array_equal(got["still.png"]["video"][0], expected)
    assert manifest["captions"]["sidecar"] == 1  # the sidecar still applies


def test_prepare_mp4_encoding(media, tmp_path):
    """--encoding=mp4: videos re-encoded (approximately equal, odd sizes kept), images kept raw; a
    record whose MP4 does not decode is an error for RecordsSource to turn into decode_error."""
    src, _, videos = media
    raw = prep.prepare(str(src), str(tmp_path / "raw"), options=prep.PrepareOptions(max_side=47))
    mp4 = prep.prepare(
        str(src), str(tmp_path / "mp4"), options=prep.PrepareOptions(max_side=47, encoding="mp4")
    )
    assert mp4["written"] == raw["written"] == 3 and mp4["options"]["encoding"] == "mp4"
    exact = {e["source"]: e["video"] for e in _read_all(tmp_path / "raw")}
    got = {e["source"]: e["video"] for e in _read_all(tmp_path / "mp4")}
    for name, video in exact.items():
        assert got[name].shape == video.shape and video.shape[1:3] == (31, 47)  # odd sides kept
        err = np.abs(got[name].astype(int) - video.astype(int))
        assert err.mean() < 6, name
    np.testing.assert_array_equal(got["still.png"], exact["still.png"])  # one frame: raw

    record = records.encode_record(exact["anim.gif"], "c", 5.0, "anim.gif", encoding="mp4")
    assert records.decode_record(record)["video"].shape == (3, 31, 47, 3)
    with np.load(io.BytesIO(record)) as z:
        members = {k: z[k] for k in z.files}
    members["video_mp4"] = members["video_mp4"][: len(members["video_mp4"]) // 3]  # cut the MP4
    buf = io.BytesIO()
    np.savez(buf, **members)
    with pytest.raises(ValueError, match="MP4 does not decode"):
        records.decode_record(buf.getvalue())


def test_worker_processes_write_the_same_shards(media, tmp_path):
    src, captions, _ = media
    alone = prep.prepare(
        str(src), str(tmp_path / "alone"), str(captions), prep.PrepareOptions(shard_size=2)
    )
    pooled = prep.prepare(
        str(src),
        str(tmp_path / "pooled"),
        str(captions),
        prep.PrepareOptions(shard_size=2, workers=2),
    )
    assert {**pooled, "options": None} == {**alone, "options": None}
    for shard in alone["shards"]:
        assert (tmp_path / "alone" / shard["file"]).read_bytes() == (
            tmp_path / "pooled" / shard["file"]
        ).read_bytes()


def test_fit_side_keeps_the_aspect_ratio():
    assert prep.fit_side(32, 48, 24) == (16, 24)
    assert prep.fit_side(32, 48, 0) == (32, 48) and prep.fit_side(32, 48, 64) == (32, 48)
    assert prep.fit_side(1000, 10, 100) == (100, 1)


def test_bad_captions_file_names_the_line(media, tmp_path):
    src, _, _ = media
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "anim.gif", "caption": "ok"}\n{"file": "still.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        prep.prepare(str(src), str(tmp_path / "out"), str(bad))


def _prepare_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "vdit.cli", "prepare", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_cli(media, tmp_path):
    src, captions, _ = media
    out = tmp_path / "out"
    proc = _prepare_cli(f"--input={src}", f"--out={out}", f"--captions={captions}", "--max_side=24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "out": str(out),
        "written": 3,
        "skipped": 4,
        "shards": 1,
    }
    for name, reason in BAD.items():
        assert f"{name}: {reason}" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["options"]["max_side"] == 24
    again = _prepare_cli(f"--input={src}", f"--out={out}")
    assert again.returncode != 0 and "already holds" in again.stderr
    missing = _prepare_cli(f"--input={src}")
    assert missing.returncode != 0 and "--out is required" in missing.stderr


def _pipeline_cfg(**data):
    c = tiny_config()
    c.data.caption_dropout = 0.0
    for k, v in data.items():
        target = c.data
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return configlib.pipeline_config(configlib.load(c))


def _unpacked(batch) -> list[dict]:
    return [
        s
        for r in range(batch["segment_ids"].shape[0])
        for s in packing.unpack_row(batch, r, (1, 4, 4))
    ]


def test_training_reads_prepared_records(media, tmp_path):
    """data.source="records": packed rows hold exactly the prepared samples and their captions."""
    src, captions, _ = media
    out = tmp_path / "out"
    prep.prepare(str(src), str(out), str(captions), prep.PrepareOptions(max_side=24))
    stored = {e["caption"]: e["video"].astype(np.float32) / 127.5 - 1 for e in _read_all(out)}
    cfg = _pipeline_cfg(**{"source": "records", "records.path": str(out)})
    batch = next(iter(pipeline.build(cfg)))
    samples = _unpacked(batch)
    assert len(samples) >= 3
    seen = set()
    for s in samples:
        caption = detokenize(s["text"])
        np.testing.assert_array_equal(s["latent"], stored[caption])  # 16x24: whole patches, kept
        seen.add(caption)
    assert seen == set(stored)
    stats = dict(zip(size.STATS, batch["stats"].reshape(-1, len(size.STATS)).sum(0), strict=True))
    assert stats["rejected_decode_error"] == 0
    # A glob of shards works as well as the folder.
    glob_cfg = _pipeline_cfg(
        **{"source": "records", "records.path": str(out / "shard-*.array_record")}
    )
    assert len(sources.make_source(glob_cfg)) == 3


def test_a_corrupt_record_is_a_counted_rejection(tmp_path, caplog):
    from array_record.python.array_record_module import ArrayRecordWriter

    good = np.full((4, 16, 16, 3), 100, np.uint8)
    path = str(tmp_path / records.shard_name(0))
    writer = ArrayRecordWriter(path, records.WRITER_OPTIONS)
    writer.write(b"\x00 not a record")
    writer.write(records.encode_record(good, "good", 8.0, "good.mp4"))
    writer.write(records.encode_record(good, "good", 8.0, "good.mp4")[:-20])  # truncated
    writer.close()
    source = records.RecordsSource([path])
    assert "decode_error" in source[0] and source[0]["video"] is None
    assert source[1]["caption"] == "good" and source[1]["fps"] == 8.0
    cfg = _pipeline_cfg()
    with caplog.at_level("WARNING"):
        out = list(
            pipeline.prepare_samples(grain.MapDataset.source([source[i] for i in (0, 2, 1)]), cfg)
        )
    assert len(out) == 1
    assert out[0]["stats"][0, size.STATS.index("rejected_decode_error")] == 2
    assert "sample 0 rejected: decode_error" in caplog.text


def test_source_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.records.path"):
        _pipeline_cfg(source="records")
    with pytest.raises(ValueError, match="data.source"):
        _pipeline_cfg(source="videos")
    with pytest.raises(ValueError, match="data.tfds.name"):
        _pipeline_cfg(source="tfds")
    cfg = _pipeline_cfg(**{"source": "records", "records.path": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"data.records.path=.*no shards"):
        pipeline.build(cfg)


# --- TFDS: a tiny dataset prepared locally by its own builder (nothing downloaded). TFDS's
# registered video datasets and its Video feature need TensorFlow, which this package does not
# install, so the frames here are a uint8 Tensor feature; the source reads both the same way.

TFDS_CAPTIONS = ("red", "blue")


def _tfds_examples():
    for i in range(4):
        video = _clip(2 + i % 2, (200, 40 * i, 40), 10 + i)[:, :16, :24]
        yield (
            i,
            {"video": video, "gray": video[..., :1], "label": i % 2, "text": f"clip number {i}"},
        )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class VditTestClips(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "video": tfds.features.Tensor(
                            shape=(None, 16, 24, 3), dtype=np.uint8, encoding="zlib"
                        ),
                        "gray": tfds.features.Tensor(shape=(None, 16, 24, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=TFDS_CAPTIONS),
                        "text": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from _tfds_examples()

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    VditTestClips(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_maps_features(tfds_dir):
    expected = dict(_tfds_examples())
    cfg = _pipeline_cfg(
        **{
            "source": "tfds",
            "tfds.name": "vdit_test_clips",
            "tfds.data_dir": tfds_dir,
            "tfds.caption_key": "label",
            "tfds.fps": 12.0,
        }
    )
    source = sources.make_source(cfg)
    assert len(source) == 4
    for i in range(4):
        e = source[i]
        want = next(v for v in expected.values() if np.array_equal(v["video"], e["video"]))
        assert e["caption"] == TFDS_CAPTIONS[want["label"]] and e["fps"] == 12.0
    text = sources.make_source(
        _pipeline_cfg(
            **{
                "source": "tfds",
                "tfds.name": "vdit_test_clips",
                "tfds.data_dir": tfds_dir,
                "tfds.video_key": "gray",
                "tfds.caption_key": "text",
            }
        )
    )
    e = text[0]
    assert e["caption"].startswith("clip number ") and "fps" not in e
    assert e["video"].shape[-1] == 3 and (e["video"] == e["video"][..., :1]).all()  # gray -> RGB
    with pytest.raises(ValueError, match=r"data.tfds.video_key='frames'.*\['gray', 'label'"):
        sources.make_source(
            _pipeline_cfg(
                **{
                    "source": "tfds",
                    "tfds.name": "vdit_test_clips",
                    "tfds.data_dir": tfds_dir,
                    "tfds.video_key": "frames",
                }
            )
        )
    with pytest.raises(
        ValueError, match=r"data.tfds.name='vdit_missing_clips'.*nothing is downloaded"
    ):
        sources.make_source(
            _pipeline_cfg(
                **{"source": "tfds", "tfds.name": "vdit_missing_clips", "tfds.data_dir": tfds_dir}
            )
        )


def test_training_reads_a_tfds_dataset(tfds_dir):
    cfg = _pipeline_cfg(
        **{
            "source": "tfds",
            "tfds.name": "vdit_test_clips",
            "tfds.data_dir": tfds_dir,
            "tfds.caption_key": "text",
        }
    )
    by_caption = {
        f"clip number {i}": ex["video"].astype(np.float32) / 127.5 - 1 for i, ex in _tfds_examples()
    }
    samples = _unpacked(next(iter(pipeline.build(cfg))))
    assert len(samples) >= 4
    for s in samples:
        np.testing.assert_array_equal(s["latent"], by_caption[detokenize(s["text"])])
    assert {detokenize(s["text"]) for s in samples} == set(by_caption)


def test_tfds_mock_data_feeds_training():
    """TFDS's own mock data (`tfds.testing.mock_data`, random examples of a registered builder's
    features, no files): the source reads them and the pipeline packs them."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class VditMockClips(tfds.core.GeneratorBasedBuilder):  # registered: tfds.data_source finds it
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "video": tfds.features.Tensor(
                            shape=(None, 16, 24, 3), dtype=np.uint8, encoding="zlib"
                        ),
                        "label": tfds.features.ClassLabel(names=TFDS_CAPTIONS),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            raise AssertionError("mock data is generated, never prepared")

        def _generate_examples(self):
            raise AssertionError("mock data is generated, never prepared")

    cfg = _pipeline_cfg(
        **{"source": "tfds", "tfds.name": "vdit_mock_clips", "tfds.caption_key": "label"}
    )
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = sources.make_source(cfg)
        assert len(source) == 6
        frames = [source[i]["video"].shape for i in range(6)]
        batch = next(iter(pipeline.build(cfg)))
    assert all(f[1:] == (16, 24, 3) and f[0] >= 1 for f in frames)
    samples = _unpacked(batch)
    assert len(samples) >= 2 and {detokenize(s["text"]) for s in samples} <= set(TFDS_CAPTIONS)
    stats = batch["stats"].reshape(-1, len(size.STATS)).sum(0)
    assert all(stats[size.STATS.index(f"rejected_{r}")] == 0 for r in size.REJECTS)


def test_a_shard_that_is_not_array_record_names_the_field(tmp_path):
    (tmp_path / records.shard_name(0)).write_bytes(b"interrupted write, no footer")
    cfg = _pipeline_cfg(**{"source": "records", "records.path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"data.records.path=.*cannot open the 1 shards"):
        sources.make_source(cfg)


@pytest.mark.slow
def test_vdit_train_on_prepared_videos(media, tmp_path):
    """`vdit prepare`, then `vdit train` with data.source=records for two steps: finite loss and
    the prepared samples counted in the metrics, none rejected."""
    from test_cli import TINY_FLAGS, _vdit

    src, captions, _ = media
    out, workdir = tmp_path / "out", tmp_path / "run"
    assert (
        _prepare_cli(
            f"--input={src}", f"--out={out}", f"--captions={captions}", "--max_side=24"
        ).returncode
        == 0
    )
    proc = _vdit(
        "train",
        *TINY_FLAGS,
        f"--workdir={workdir}",
        "--config.train.steps=2",
        "--config.data.source=records",
        f"--config.data.records.path={out}",
    )
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(final["loss"]) and final["skipped_steps"] == 0
    assert final["samples_per_s"] > 0
    assert all(final[f"data_rejected_{r}"] == 0 for r in size.REJECTS)


def test_tfds_without_tensorflow_says_so(monkeypatch):
    """TFDS's Video and Image features import TensorFlow when a dataset is opened; without it the
    error names the dataset and says what to install."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def needs_tensorflow(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds, "data_source", needs_tensorflow)
    cfg = _pipeline_cfg(**{"source": "tfds", "tfds.name": "ucf101"})
    with pytest.raises(ValueError, match=r"data.tfds.name='ucf101'.*pip install tensorflow"):
        sources.make_source(cfg)
