"""`vdit prepare` at scale: the Beam runner (same records in process and with 2 workers), shot
splitting, the counted filters and near-duplicates, the report, and faults counted by name.
Shot splitting and the Beam runner need the `data` extra (skipped with the reason without it)."""

import json
import os

import numpy as np
import pytest

from vdit.data import filters, records
from vdit.data import prepare as prep
from vdit.data.pan import pan_video, photos
from vdit.data.video_io import write_video

FPS = 8
H, W = 48, 64


def _pan(name: str, frames: int, seed: int, speed: float = 0.02) -> np.ndarray:
    """A camera panning across a scikit-image photo: real texture, steady motion, no cut."""
    rng = np.random.default_rng(seed)
    return pan_video(photos([name])[name], frames, H, W, rng, max_speed=speed)


def _read(out) -> list[dict]:
    return [records.decode_record(r) for r in _raw(out)]


def _raw(out) -> list[bytes]:
    import grain

    shards = records.find_shards(str(out))
    return [bytes(r) for r in grain.sources.ArrayRecordDataSource(shards)] if shards else []


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    """Three pans across three photos joined with two hard cuts, at frames 10 and 24 (of 36)."""
    pytest.importorskip("scenedetect", reason="shot splitting needs the data extra")
    root = tmp_path_factory.mktemp("cuts")
    parts = [_pan("astronaut", 10, 0), _pan("coffee", 14, 1), _pan("chelsea", 12, 2)]
    write_video(root / "in" / "three.mp4", np.concatenate(parts), fps=FPS)
    return root / "in", parts


def test_two_hard_cuts_give_three_clips_at_the_right_frames(cut_video, tmp_path):
    src, parts = cut_video
    options = prep.PrepareOptions(shots=prep.ShotOptions(enabled=True))
    manifest = prep.prepare(str(src), str(tmp_path / "out"), options=options)
    got = _read(tmp_path / "out")
    assert manifest["written"] == 3 and manifest["clips"] == 3
    assert [r["frame_range"] for r in got] == [[0, 10], [10, 24], [24, 36]]
    assert [r["time_range"] for r in got] == [
        [0, 10 / FPS],
        [10 / FPS, 24 / FPS],
        [24 / FPS, 36 / FPS],
    ]
    assert all(r["source"] == "three.mp4" for r in got)
    for i, r in enumerate(got):  # each clip is its shot's frames (the MP4 is lossy)
        assert r["video"].shape == parts[i].shape
        err = [np.abs(r["video"][:1].astype(int) - p[:1]).mean() for p in parts]
        assert err[i] < 10 and err[i] < min(e for j, e in enumerate(err) if j != i) / 3, err


def test_min_and_max_shot_duration(cut_video, tmp_path):
    src, _ = cut_video
    # shots of 1.25, 1.75 and 1.5 s, cut into pieces of at most 1 s; pieces under 0.6 s dropped
    shots = prep.ShotOptions(enabled=True, min_seconds=0.6, max_seconds=1.0)
    manifest = prep.prepare(str(src), str(tmp_path / "a"), options=prep.PrepareOptions(shots=shots))
    ranges = [r["frame_range"] for r in _read(tmp_path / "a")]
    # 0-10 -> 0-8, 8-10 (0.25 s: too short); 10-24 -> 10-18, 18-24; 24-36 -> 24-32, 32-36
    assert ranges == [[0, 8], [10, 18], [18, 24], [24, 32]]
    assert manifest["dropped_by_reason"]["too_short"] == 2
    assert {(d["frame_range"][0], d["reason"]) for d in manifest["dropped"]} == {
        (8, "too_short"),
        (32, "too_short"),
    }


FILTERS = filters.FilterOptions(
    min_side=32,
    min_seconds=1.0,
    min_motion=0.5,
    min_brightness=16.0,
    min_contrast=8.0,
    dedup_distance=6,
)


@pytest.fixture(scope="module")
def filter_media(tmp_path_factory):
    """Two good pans, and one clip made to fail each filter (and nothing else before it)."""
    root = tmp_path_factory.mktemp("filters") / "in"
    good_a, good_b = _pan("astronaut", 16, 3), _pan("coffee", 16, 4)
    still = np.repeat(_pan("chelsea", 1, 5), 16, axis=0)  # textured, bright, not moving
    dark = (_pan("rocket", 16, 6, speed=0.15) // 6).astype(np.uint8)  # moving, mean luma < 16
    flat = np.full((16, H, W, 3), 120, np.uint8)
    flat[1::2] = 126  # flickers (motion 6) but no contrast at all
    small = _pan("astronaut", 16, 7)[:, :24, :24]
    clips = {
        "a_good.mp4": good_a,
        "b_good.mp4": good_b,
        "c_small.mp4": small,
        "d_short.mp4": good_b[:5],
        "e_still.mp4": still,
        "f_dark.mp4": dark,
        "g_flat.mp4": flat,
        "h_copy_of_a.mp4": good_a,
    }
    for name, video in clips.items():
        write_video(root / name, video, fps=FPS)
    write_video(root / "photo.png", good_a[:1])  # an image: no motion or duration filter
    return root


EXPECTED = {
    "c_small.mp4": "too_small",
    "d_short.mp4": "too_short",
    "e_still.mp4": "static",
    "f_dark.mp4": "black",
    "g_flat.mp4": "flat",
    "h_copy_of_a.mp4": "duplicate",
}


def test_each_filter_drops_exactly_its_clips(filter_media, tmp_path):
    out = tmp_path / "out"
    manifest = prep.prepare(
        str(filter_media), str(out), options=prep.PrepareOptions(filters=FILTERS)
    )
    assert {d["file"]: d["reason"] for d in manifest["dropped"]} == EXPECTED
    assert manifest["dropped_by_reason"] == {
        r: int(r in EXPECTED.values()) for r in filters.REASONS
    }
    kept = _read(out)
    assert [r["source"] for r in kept] == ["a_good.mp4", "b_good.mp4", "photo.png"]
    assert [d for d in manifest["dropped"] if d["reason"] == "duplicate"][0][
        "duplicate_of"
    ].startswith("a_good.mp4")
    for r in kept:  # every record carries its scores, to filter again without preparing again
        s = json.loads(r["scores"])
        assert set(s) >= {"motion", "brightness", "contrast", "height", "width", "phash"}
        assert filters.reason(s, FILTERS) is None
    # report.md names every reason that dropped a clip; one contact sheet per reason and kept
    report = (out / "report.md").read_text()
    assert all(f"| {reason} | 1 |" in report for reason in EXPECTED.values())
    assert sorted(os.listdir(out / "report")) == sorted(
        f"{g}.png" for g in ["kept", *EXPECTED.values()]
    )
    # filters off: everything is written
    everything = prep.prepare(str(filter_media), str(tmp_path / "all"))
    assert everything["written"] == 9 and not everything["dropped"]


def test_perceptual_hash_finds_near_duplicates():
    a = _pan("astronaut", 3, 8)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-6, 7, a.shape), 0, 255)
    other = _pan("coffee", 3, 9)
    dedup = filters.Dedup(6)
    hashes = lambda v: filters.scores(v.astype(np.uint8), FPS)["phash"]  # noqa: E731
    assert dedup.check(hashes(a), "a") is None
    assert dedup.check(hashes(noisy), "noisy") == "a"  # re-encoded / noisy copy
    assert dedup.check(hashes(other), "other") is None
    assert filters.Dedup(-1).check(hashes(a), "a") is None  # off


@pytest.mark.parametrize("kind", ["diff", "flow"])
def test_motion_score_orders_still_and_moving(kind):
    if kind == "flow":
        pytest.importorskip("cv2", reason="optical flow needs the data extra (OpenCV)")
    moving = _pan("astronaut", 6, 10)
    still = np.repeat(moving[:1], 6, axis=0)
    assert filters.motion_score(still, kind) < 0.05
    assert filters.motion_score(moving, kind) > 0.5


def test_beam_runner_writes_the_same_records_in_process_and_with_two_workers(
    filter_media, tmp_path
):
    pytest.importorskip("apache_beam", reason="the Beam runner needs the data extra")
    options = prep.PrepareOptions(filters=FILTERS, shard_size=3)
    local = prep.prepare(str(filter_media), str(tmp_path / "local"), options=options)
    runs = {"local": local}
    for name, workers in (("beam0", 0), ("beam2", 2)):
        o = prep.PrepareOptions(filters=FILTERS, shard_size=3, runner="beam", workers=workers)
        runs[name] = prep.prepare(str(filter_media), str(tmp_path / name), options=o)
        assert not os.path.exists(tmp_path / name / ".parts")  # parts removed once merged
    expected = _raw(tmp_path / "local")
    assert len(expected) == 3
    for name, manifest in runs.items():
        assert _raw(tmp_path / name) == expected, name  # same records, same order, byte for byte
        drop = {k: v for k, v in manifest.items() if k not in ("options", "report")}
        ref = {k: v for k, v in local.items() if k not in ("options", "report")}
        assert drop == ref, name


def test_corrupt_and_vanished_files_are_counted_and_named(filter_media, tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a_good.mp4", "b_good.mp4", "e_still.mp4"):
        (src / name).write_bytes((filter_media / name).read_bytes())
    data = (src / "b_good.mp4").read_bytes()
    (src / "b_corrupt.mp4").write_bytes(data[: len(data) // 3])
    process = prep.process

    def vanish_after_first(job, options):  # e_still.mp4 disappears while a_good.mp4 is prepared
        if job.rel == "a_good.mp4":
            os.remove(src / "e_still.mp4")
        return process(job, options)

    monkeypatch.setattr(prep, "process", vanish_after_first)
    manifest = prep.prepare(str(src), str(tmp_path / "out"))
    assert {s["file"]: s["reason"] for s in manifest["skipped"]} == {
        "b_corrupt.mp4": "decode_error",
        "e_still.mp4": "vanished",
    }
    assert [r["source"] for r in _read(tmp_path / "out")] == ["a_good.mp4", "b_good.mp4"]
    text = prep.summary(manifest)
    assert "skipped: vanished" in text and "e_still.mp4" in text


def test_list_file_input_and_a_listed_file_that_is_gone(filter_media, tmp_path):
    listing = tmp_path / "files.txt"
    listing.write_text(
        f"{filter_media}/b_good.mp4\n{filter_media}/a_good.mp4\n{filter_media}/gone.mp4\n"
    )
    manifest = prep.prepare(str(listing), str(tmp_path / "out"))
    assert manifest["skipped"][0]["file"].endswith("gone.mp4")
    assert manifest["skipped_by_reason"] == {"vanished": 1}
    assert [r["source"].rsplit("/", 1)[-1] for r in _read(tmp_path / "out")] == [
        "a_good.mp4",
        "b_good.mp4",
    ]
    glob_manifest = prep.prepare(str(filter_media / "[ab]_*.mp4"), str(tmp_path / "glob"))
    assert [r["source"] for r in _read(tmp_path / "glob")] == ["a_good.mp4", "b_good.mp4"]
    assert glob_manifest["written"] == 2


def test_prepare_config_builds_strictly():
    import importlib.util

    from tiny import ROOT

    spec = importlib.util.spec_from_file_location(
        "prepare_config", os.path.join(ROOT, "configs", "prepare.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = prep.options_from_config(module.get_config())
    assert options.shots.enabled and options.filters.min_motion > 0
    off = prep.options_from_config(module.get_config("off"))
    assert off.filters == filters.FilterOptions() and not off.shots.enabled
    bad = module.get_config()
    bad.filters.min_motoin = 1.0
    with pytest.raises(ValueError, match="filters.min_motoin: not a setting"):
        prep.options_from_config(bad)


def test_a_stage_without_its_extra_is_a_one_line_error(filter_media, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scenedetect(name, *args, **kwargs):
        if name.split(".")[0] == "scenedetect":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scenedetect)
    options = prep.PrepareOptions(shots=prep.ShotOptions(enabled=True))
    with pytest.raises(ImportError, match=r'install the data extra: pip install -e "\.\[data\]"'):
        prep.prepare(str(filter_media), str(tmp_path / "out"), options=options)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def _url_filesystem():
    """A Beam filesystem for URLs vditfs:///ABS/PATH, backed by local files: Beam's FileSystems
    serve it as they serve gs:// or s3:// (registered by subclassing, in this process)."""
    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.localfilesystem import LocalFileSystem

    class URLFileSystem(LocalFileSystem):
        PREFIX = "vditfs://"

        @classmethod
        def scheme(cls):
            return "vditfs"

        def _path(self, url):  # LocalFileSystem calls these with local paths too
            return url[len(self.PREFIX) :] if url.startswith(self.PREFIX) else url

        def _list(self, dir_or_prefix):
            for m in super()._list(self._path(dir_or_prefix)):
                yield FileMetadata(self.PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)

        def exists(self, path):
            return super().exists(self._path(path))

        def metadata(self, path):
            m = super().metadata(self._path(path))
            return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

        def open(self, path, *args, **kwargs):
            return super().open(self._path(path), *args, **kwargs)

    return URLFileSystem


def test_inputs_on_a_beam_filesystem_give_the_local_records(filter_media, tmp_path):
    pytest.importorskip("apache_beam", reason="Beam filesystems need the data extra")
    url_fs = _url_filesystem()  # kept: Beam finds filesystems among the live subclasses
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a_good.mp4", "b_good.mp4"):
        (src / "sub" / name).write_bytes((filter_media / name).read_bytes())
    (src / "sub" / "a_good.txt").write_text("a sidecar caption\n")
    local = prep.prepare(str(src), str(tmp_path / "local"))
    remote = prep.prepare(f"vditfs://{src}", str(tmp_path / "remote"))
    assert _raw(tmp_path / "remote") == _raw(tmp_path / "local")
    assert [r["caption"] for r in _read(tmp_path / "remote")] == ["a sidecar caption", ""]
    assert remote["written"] == local["written"] == 2
    glob_run = prep.prepare(f"vditfs://{src}/sub/b_*.mp4", str(tmp_path / "glob"))
    assert [r["source"] for r in _read(tmp_path / "glob")] == ["b_good.mp4"]
    assert glob_run["written"] == 1
    assert url_fs.scheme() == "vditfs"
