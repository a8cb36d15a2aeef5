"""The model stages of `vdit prepare` and `vdit sample`, with tiny random models built in the test
(tests/tiny_hf.py; nothing is downloaded): caption embeddings in the precomputed-text format,
re-captioning with its failures counted, and prompt expansion. Needs the `data` extra."""

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the model stages need the data extra")
pytest.importorskip("torch", reason="the model stages need the data extra")

import tiny_hf  # noqa: E402
from test_prepare import _pipeline_cfg, _unpacked  # noqa: E402

from vdit.data import captioner, pipeline, records, text_embeddings  # noqa: E402
from vdit.data import prepare as prep  # noqa: E402
from vdit.data.tokenizer import detokenize  # noqa: E402
from vdit.data.video_io import write_video  # noqa: E402

H, W = 16, 24


def _clip(frames: int, color, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = rng.integers(30, 60, size=(frames, H, W, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, 4:12, 2 * t : 2 * t + 8] = color
    return video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "t5": tiny_hf.t5_encoder(root / "t5"),
        "blip": tiny_hf.blip_captioner(root / "blip"),
        "gpt": tiny_hf.causal_lm(root / "gpt"),
    }


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Four videos: red (sidecar caption), blue (captions file), green and white (none)."""
    src = tmp_path_factory.mktemp("media") / "in"
    for name, color, seed in (
        ("a_red", (220, 40, 40), 0),
        ("b_blue", (40, 60, 230), 1),
        ("c_green", (40, 220, 40), 2),
        ("d_white", (250, 250, 250), 3),
    ):
        write_video(src / f"{name}.mp4", _clip(4, color, seed), fps=8)
    (src / "a_red.txt").write_text("a red square moves right\n")
    captions = src.parent / "captions.jsonl"
    captions.write_text(json.dumps({"file": "b_blue.mp4", "caption": "a blue square"}) + "\n")
    return src, captions


def _records(out) -> list[bytes]:
    import grain

    return [bytes(r) for r in grain.sources.ArrayRecordDataSource(records.find_shards(str(out)))]


def _members(data: bytes) -> dict:
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_text_encoder_stage_writes_precomputed_embeddings(models, media, tmp_path):
    from vdit.text import encoder

    src, captions = media
    out = tmp_path / "out"
    options = prep.PrepareOptions(text_encoder=prep.TextEncoderOptions(path=models["t5"]))
    manifest = prep.prepare(str(src), str(out), str(captions), options)
    assert manifest[text_embeddings.MANIFEST_KEY] == text_embeddings.manifest_entry(16, "t5")
    embedder = encoder.get(options.text_encoder)
    for data in _records(out):
        m = _members(data)
        emb = text_embeddings.check(m[text_embeddings.MEMBER], width=16)
        assert m[text_embeddings.MEMBER].dtype == np.float16
        assert str(m[text_embeddings.ENCODER_KEY]) == "t5"
        caption = str(m["caption"])
        # the batched embedding is the caption's own, alone; one row per token, end token included
        np.testing.assert_array_equal(emb, embedder.embed([caption])[0])
        assert emb.shape[0] == len(caption.split()) + 1
    null = text_embeddings.load(str(out / text_embeddings.NULL_FILE), width=16)
    np.testing.assert_array_equal(null, embedder.embed([""])[0])
    assert null.shape == (1, 16)  # the end token alone


def test_a_text_encoder_folder_that_is_not_one_is_named(media, tmp_path):
    src, _ = media
    options = prep.PrepareOptions(text_encoder=prep.TextEncoderOptions(path=str(tmp_path)))
    with pytest.raises(ValueError, match="text_encoder.path=.*not a model folder"):
        prep.prepare(str(src), str(tmp_path / "out"), options=options)


def test_captioner_writes_captions_keeps_given_ones_and_records_origins(models, media, tmp_path):
    src, captions = media
    out = tmp_path / "out"
    options = prep.PrepareOptions(
        captioner=prep.CaptionerOptions(path=models["blip"], batch_size=2, max_new_tokens=6)
    )
    manifest = prep.prepare(str(src), str(out), str(captions), options)
    got = [records.decode_record(r) for r in _records(out)]
    assert [(r["source"], r["caption_origin"]) for r in got] == [
        ("a_red.mp4", "sidecar"),
        ("b_blue.mp4", "jsonl"),
        ("c_green.mp4", "model"),
        ("d_white.mp4", "model"),
    ]
    assert got[0]["caption"] == "a red square moves right"
    model_captions = [r["caption"] for r in got[2:]]
    assert all(model_captions) and all(
        w in tiny_hf.WORDS for c in model_captions for w in c.split()
    )
    assert manifest["captions"] == {"jsonl": 1, "sidecar": 1, "model": 2, "none": 0}
    assert manifest["uncaptioned"] == []
    # keep_given=False: every clip is re-captioned
    options = prep.PrepareOptions(
        captioner=prep.CaptionerOptions(path=models["blip"], keep_given=False, max_new_tokens=6)
    )
    again = prep.prepare(str(src), str(tmp_path / "all"), str(captions), options)
    assert again["captions"]["model"] == 4


def _failing_on_white(monkeypatch):
    generate = captioner._generate

    def flaky(images, options):
        if any(np.asarray(im).min(axis=-1).max() >= 200 for im in images):
            raise RuntimeError("out of memory on the white clip")
        return generate(images, options)

    monkeypatch.setattr(captioner, "_generate", flaky)


@pytest.mark.parametrize("on_failure", ["keep", "drop"])
def test_a_captioner_exception_is_counted_and_named(
    models, media, tmp_path, monkeypatch, on_failure
):
    src, captions = media
    _failing_on_white(monkeypatch)
    options = prep.PrepareOptions(
        captioner=prep.CaptionerOptions(
            path=models["blip"],
            batch_size=4,
            max_new_tokens=6,
            keep_given=False,
            on_failure=on_failure,
        )
    )
    manifest = prep.prepare(str(src), str(tmp_path / "out"), str(captions), options)
    assert manifest["events_by_name"] == {"captioner_error": 1}
    (event,) = manifest["events"]
    assert event["file"] == "d_white.mp4" and "out of memory on the white clip" in event["message"]
    got = {r["source"]: r for r in map(records.decode_record, _records(tmp_path / "out"))}
    # the batch failed as a whole: the other three were captioned one by one, nothing else lost
    assert [got[f]["caption_origin"] for f in ("a_red.mp4", "b_blue.mp4", "c_green.mp4")] == [
        "model"
    ] * 3
    if on_failure == "keep":
        assert (
            got["d_white.mp4"]["caption"] == "" and got["d_white.mp4"]["caption_origin"] == "none"
        )
    else:
        assert "d_white.mp4" not in got
        assert manifest["dropped_by_reason"]["caption_failed"] == 1
    assert "captioner_error" in prep.summary(manifest)


def test_training_reads_captioned_records(models, media, tmp_path):
    """Records written by the model stages feed the training pipeline with their captions."""
    src, captions = media
    out = tmp_path / "out"
    options = prep.PrepareOptions(
        captioner=prep.CaptionerOptions(path=models["blip"], max_new_tokens=6),
        text_encoder=prep.TextEncoderOptions(path=models["t5"]),
    )
    prep.prepare(str(src), str(out), str(captions), options)
    stored = {r["caption"] for r in map(records.decode_record, _records(out))}
    cfg = _pipeline_cfg(**{"source": "records", "records.path": str(out)})
    batch = next(iter(pipeline.build(cfg)))
    seen = {detokenize(s["text"]) for s in _unpacked(batch)}
    assert seen <= stored and len(seen) >= 2


def test_prompt_expansion_is_deterministic_and_written_beside_the_output(models, tmp_path):
    from vdit.text import expand

    a = expand.expand("a cat", models["gpt"], max_new_tokens=8)
    assert a and a == expand.expand("a cat", models["gpt"], max_new_tokens=8)
    assert all(w in tiny_hf.WORDS for w in a.split())
    out = tmp_path / "sample.mp4"
    expanded = expand.for_sample("a cat", models["gpt"], str(out))
    written = json.loads((tmp_path / "sample.prompt.json").read_text())
    assert written == {"prompt": "a cat", "expanded": expanded, "model": models["gpt"]}
    with pytest.raises(ValueError, match="not a model folder"):
        expand.expand("a cat", str(tmp_path))


@pytest.mark.slow
def test_vdit_sample_expands_the_prompt(models, tmp_path):
    """`vdit sample --expand_prompt_with=DIR` on a 2-step run: the sample is made from the
    expanded prompt, which is printed and written beside the output."""
    from test_cli import TINY_FLAGS
    from test_cli import _vdit as vdit

    workdir = str(tmp_path / "run")
    vdit("train", *TINY_FLAGS, f"--workdir={workdir}", "--config.train.steps=2")
    out = tmp_path / "s.mp4"
    proc = vdit(
        "sample",
        f"--workdir={workdir}",
        "--prompt=a cat",
        f"--expand_prompt_with={models['gpt']}",
        "--frames=4",
        "--height=16",
        "--width=16",
        "--steps=2",
        f"--out={out}",
    )
    written = json.loads((tmp_path / "s.prompt.json").read_text())
    assert written["prompt"] == "a cat" and written["expanded"]
    assert f"expanded prompt: {written['expanded']}" in proc.stderr
    assert out.exists()
