"""`vdit prepare` settings: shot splitting, filter thresholds, captioner, text encoder, runner.

    vdit prepare --config=configs/prepare.py --input=videos/ --out=data/videos
    vdit prepare --config=configs/prepare.py --input=videos/ --out=data/videos \\
        --config.runner=beam --config.workers=2 --config.filters.min_motion=1.0

Every field can be overridden with --config.FIELD=VALUE; the plain flags (--shard_size,
--max_frames, --max_side, --encoding, --workers) override their fields when given. A threshold of 0
(dedup_distance -1) turns its filter off; `vdit prepare` without --config uses all-off defaults
(one record per file, as before shots and filters). Shot splitting, the runner "beam" and the model
stages need the `data` extra (pip install -e ".[data]"). What each filter removed is in the output's
report.md and report/*.png; every record keeps its scores (member `scores`) to filter again.
Variants: "" (the settings below) | "off" (every stage off: one record per file).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.shard_size = 1000  # records per shard
    c.max_frames = 0  # keep the first N frames of each file (0: all)
    c.max_side = 0  # downsize frames to at most N pixels on the longer side (0: native size)
    c.encoding = "raw"  # frames in a record: "raw" (lossless) | "mp4" (H.264, smaller)
    c.runner = "local"  # "local" (process pool) | "beam" (Apache Beam: vdit/data/beam_prepare.py)
    c.workers = 0  # worker processes (0: in this process); the output does not depend on it
    c.beam_options = (
        ""  # Beam's own pipeline options, e.g. "--runner=FlinkRunner --flink_master=H:P"
    )
    c.report_examples = 8  # clips per reason in report/*.png contact sheets (0: no report)

    # --- Shots (vdit/data/shots.py, PySceneDetect's ContentDetector).
    c.shots = ml_collections.ConfigDict()
    c.shots.enabled = True  # cut videos at shot boundaries
    c.shots.threshold = 27.0  # cut when the frame-to-frame content change exceeds this
    c.shots.min_seconds = 0.5  # shots (and remainders of long ones) shorter than this: too_short
    c.shots.max_seconds = 10.0  # longer shots are cut into clips of at most this (0: no cap)

    # --- Filters (vdit/data/filters.py): each counted by name in manifest.json.
    c.filters = ml_collections.ConfigDict()
    c.filters.min_side = 64  # too_small: shorter side under N pixels
    c.filters.min_seconds = 0.5  # too_short: video clips under this
    c.filters.motion = "diff"  # motion score: "diff" (frame differences) | "flow" (optical flow)
    c.filters.min_motion = 0.5  # static: mean |luma difference| per frame (0-255) under this
    c.filters.min_brightness = 16.0  # black: mean luma (0-255) under this
    c.filters.min_contrast = 8.0  # flat: luma standard deviation (0-255) under this
    c.filters.dedup_distance = 6  # duplicate: every key frame within N of 64 hash bits (-1: off)

    # --- Captioner (vdit/data/captioner.py): a local image-to-text model folder.
    c.captioner = ml_collections.ConfigDict()
    c.captioner.path = ""  # e.g. a BLIP captioning model saved with save_pretrained ("" = off)
    c.captioner.frames = 4  # frames sampled evenly from a clip, tiled into the image captioned
    c.captioner.batch_size = 8  # clips per generate() call
    c.captioner.prompt = ""  # text given with the image, for models that take a prompt
    c.captioner.max_new_tokens = 48  # caption length cap
    c.captioner.keep_given = True  # keep captions from --captions or sidecars
    c.captioner.on_failure = "keep"  # the model fails on a clip: "keep" its given caption | "drop"

    # --- Text encoder (vdit/text/encoder.py): caption embeddings for model.text.kind="precomputed".
    c.text_encoder = ml_collections.ConfigDict()
    c.text_encoder.path = ""  # a local T5 / UMT5 encoder folder ("" = off)
    c.text_encoder.max_len = 512  # tokens per caption at most
    c.text_encoder.batch_size = 16  # captions per encoder call

    if arg == "off":
        c.shots.enabled = False
        c.filters.min_side = c.filters.min_seconds = 0
        c.filters.min_motion = c.filters.min_brightness = c.filters.min_contrast = 0.0
        c.filters.dedup_distance = -1
    elif arg:
        raise ValueError(f"configs/prepare.py:{arg}: unknown variant; use '' or 'off'")
    return c
