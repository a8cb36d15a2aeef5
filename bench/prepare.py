"""`vdit prepare` speed, memory and filter outcomes on real footage: camera pans across the
scikit-image photos (vdit/data/pan.py), several shots per video joined with hard cuts.

    python bench/prepare.py                    # 16 videos; every runner at 1 and 2 workers
    python bench/prepare.py --videos=32 --shots=4 --frames_per_shot=16

Footage (made once into --dir): each video joins `--shots` pans of `--frames_per_shot` frames at
8 fps, 96x128, each across a photo drawn from the colour and grey photos of skimage.data, with some
shots made the way real footage goes wrong: a near-still camera, a dark photo (hubble_deep_field),
and a re-used shot (the same photo and path again: a duplicate).

Table 1, speed: files/s and clips/s (written + dropped clips, from the manifest) and peak RSS of
the launching process and of the largest worker process, for
- `today (all off)`: one record per file, every stage off (`configs/prepare.py:off`): what
  `vdit prepare` did before shots and filters, with the local runner (its own process pool);
- `configs/prepare.py`: shots and filters on, local runner and Beam (DirectRunner in process =
  1 worker; 2 `multi_processing` workers).
Each row runs in a fresh subprocess (peak RSS is that process's; a worker's is the largest child's).
Table 2: what each filter kept and dropped (configs/prepare.py thresholds), from the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

H, W, FPS = 96, 128, 8
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "brick", "retina")


def make_footage(folder: str, videos: int, shots: int, frames: int, seed: int = 0) -> None:
    from vdit.data.pan import pan_video, photos
    from vdit.data.video_io import write_video

    rng = np.random.default_rng(seed)
    library = photos(PHOTOS + ("hubble_deep_field",))
    os.makedirs(folder, exist_ok=True)
    reused = None
    cuts = {}
    for v in range(videos):
        parts = []
        for _ in range(shots):
            kind = rng.choice(["pan", "pan", "pan", "still", "dark", "reuse"])
            name = str(rng.choice(PHOTOS))
            path_seed = int(rng.integers(1 << 30))
            speed = 0.03
            if kind == "still":
                speed = 0.0005
            elif kind == "dark":
                name = "hubble_deep_field"
            elif kind == "reuse" and reused is not None:
                name, path_seed = reused
            reused = (name, path_seed) if kind == "pan" else reused
            prng = np.random.default_rng(path_seed)
            parts.append(pan_video(library[name], frames, H, W, prng, max_speed=speed))
        name = f"video{v:03d}.mp4"
        write_video(os.path.join(folder, name), np.concatenate(parts), fps=FPS)
        cuts[name] = [frames * k for k in range(1, shots)]
    with open(os.path.join(os.path.dirname(folder), "cuts.json"), "w") as f:
        json.dump(cuts, f)


def found_cuts(out: str, manifest: dict) -> dict[str, set[int]]:
    """Clip starts after 0, per source file: the cuts `vdit prepare` made (kept and dropped clips)."""
    import grain

    from vdit.data import records

    starts: dict[str, set[int]] = {}
    for data in grain.sources.ArrayRecordDataSource(records.find_shards(out)):
        r = records.decode_record(bytes(data))
        starts.setdefault(r["source"], set()).add(r["frame_range"][0])
    for d in manifest["dropped"]:
        starts.setdefault(d["file"], set()).add(d["frame_range"][0])
    return {k: v - {0} for k, v in starts.items()}


def one(args) -> None:
    """A row: prepare --dir into a fresh folder; prints its timing, RSS and manifest as JSON."""
    import importlib.util

    from vdit.data import prepare

    spec = importlib.util.spec_from_file_location("prepare_config", f"{ROOT}/configs/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("off" if args.stages == "off" else None)
    config.runner, config.workers, config.report_examples = args.runner, args.workers, 4
    options = prepare.options_from_config(config)
    out = os.path.join(args.dir + "-out", f"{args.stages}-{args.runner}-{args.workers}")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare.prepare(os.path.join(args.dir, "in"), out, options=options)
    seconds = time.perf_counter() - start
    kib = 1024
    cuts = {}
    if args.stages != "off":
        cuts = {k: sorted(v) for k, v in found_cuts(out, manifest).items()}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
                "child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
                "cuts": cuts,
                "manifest": {
                    k: manifest[k]
                    for k in ("files", "clips", "written", "dropped_by_reason", "bytes")
                },
            }
        )
    )


ROWS = [  # (label, stages, runner, workers)
    ("today (all off), local", "off", "local", 0),
    ("today (all off), local", "off", "local", 2),
    ("configs/prepare.py, local", "on", "local", 0),
    ("configs/prepare.py, local", "on", "local", 2),
    ("configs/prepare.py, beam", "on", "beam", 0),
    ("configs/prepare.py, beam", "on", "beam", 2),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/bench-prepare", help="footage and outputs go here")
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--shots", type=int, default=3, help="shots per video")
    p.add_argument("--frames_per_shot", type=int, default=24)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stages", default="on", help=argparse.SUPPRESS)
    p.add_argument("--runner", default="local", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    footage = os.path.join(args.dir, "in")
    shutil.rmtree(args.dir, ignore_errors=True)
    make_footage(footage, args.videos, args.shots, args.frames_per_shot)
    results = []
    for label, stages, runner, workers in ROWS:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            f"--dir={args.dir}",
            f"--stages={stages}",
            f"--runner={runner}",
            f"--workers={workers}",
        ]
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            sys.exit(f"{label} workers={workers} failed:\n{done.stderr[-3000:]}")
        results.append((label, workers, json.loads(done.stdout.strip().splitlines()[-1])))
    print(
        f"footage: {args.videos} videos x {args.shots} shots x {args.frames_per_shot} frames, "
        f"{H}x{W} at {FPS} fps ({os.cpu_count()} CPUs)\n"
    )
    print(
        f"{'run':28} {'workers':>7} {'s':>7} {'files/s':>8} {'clips/s':>8} {'records':>7} "
        f"{'main MiB':>9} {'worker MiB':>10}"
    )
    for label, workers, r in results:
        m = r["manifest"]
        worker = f"{r['child_mib']:.0f}" if workers else "-"
        print(
            f"{label:28} {max(workers, 1):>7} {r['seconds']:>7.2f} {m['files'] / r['seconds']:>8.2f} "
            f"{m['clips'] / r['seconds']:>8.2f} {m['written']:>7} {r['self_mib']:>9.0f} {worker:>10}"
        )
    m = results[2][2]["manifest"]
    print(f"\nconfigs/prepare.py on the footage: {m['clips']} clips from {m['files']} files")
    print(f"{'outcome':14} {'clips':>5}")
    print(f"{'kept':14} {m['written']:>5}")
    for reason, n in m["dropped_by_reason"].items():
        print(f"{reason:14} {n:>5}")
    with open(os.path.join(args.dir, "cuts.json")) as f:
        made = {k: set(v) for k, v in json.load(f).items()}
    found = {k: set(v) for k, v in results[2][2]["cuts"].items()}
    hit = sum(len(made[k] & found.get(k, set())) for k in made)
    extra = sum(len(found.get(k, set()) - made[k]) for k in made)
    total = sum(len(v) for v in made.values())
    print(f"\nshot cuts: {hit} of {total} made were found at their exact frame, {extra} other cuts")
    same = {json.dumps(r["manifest"], sort_keys=True) for label, _, r in results[2:]}
    print(f"\nmanifests of the four configs/prepare.py runs identical: {len(same) == 1}")


if __name__ == "__main__":
    main()
