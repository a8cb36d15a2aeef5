"""`vdit import` and `vdit export --format=diffusers` of a Wan2.1 transformer: time, peak host
memory and size, with random weights (nothing is downloaded).

    python bench/wan_interop.py                      # the 1.3B architecture (5.7 GB in float32)
    python bench/wan_interop.py --size=tiny          # configs/wan.py:tiny, seconds

diffusers builds a randomly initialised `WanTransformer3DModel` of the size and saves it (sharded,
as the published checkpoints are) into a temporary folder. `vdit import` and then `vdit export
--format=diffusers` of the import each run in a fresh process under `/usr/bin/time -v` (wall
clock and peak resident set), and the exported tensors are compared with the saved ones, tensor
for tensor. Needs torch and diffusers (`pip install -e ".[parity]"`). Times are wall clock, noisy
on a shared machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    "tiny": dict(num_attention_heads=4, attention_head_dim=16, ffn_dim=160, num_layers=2),
    "1.3B": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
}


def _timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of `python -m vdit.cli ARGS` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "vdit.cli", *args]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", p.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return seconds, rss / 2**20


def _bytes(folder: str) -> float:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3B")
    ap.add_argument("--tmp", default=None, help="Where the temporary folders go.")
    args = ap.parse_args()
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        src, imported, back = (os.path.join(tmp, n) for n in ("diffusers", "imported", "back"))
        text = 32 if args.size == "tiny" else 4096
        chans = 3 if args.size == "tiny" else 16
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            **SIZES[args.size], in_channels=chans, out_channels=chans, text_dim=text
        )
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(src, max_shard_size="2GB")
        del model
        made = time.perf_counter() - t0
        variant = f"configs/wan.py:{args.size}"
        rows = [("diffusers: build + save_pretrained", made, float("nan"), _bytes(src))]
        wall, rss = _timed(["import", f"--config={variant}", f"--from={src}", f"--out={imported}"])
        rows.append(("vdit import", wall, rss, _bytes(imported)))
        wall, rss = _timed(
            ["export", f"--workdir={imported}", f"--out={back}", "--format=diffusers"]
        )
        rows.append(("vdit export --format=diffusers", wall, rss, _bytes(back)))

        def tensors(folder):
            out = {}
            for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
                with safe_open(f, "pt") as h:
                    for n in h.keys():
                        out[n] = (f, n)
            return out

        a, b = tensors(src), tensors(back)
        same = set(a) == set(b)
        for n in sorted(a) if same else []:
            with safe_open(a[n][0], "pt") as ha, safe_open(b[n][0], "pt") as hb:
                same = same and torch.equal(ha.get_tensor(n), hb.get_tensor(n))
    print(f"Wan2.1 {args.size} transformer, {params:,} parameters, float32, random weights")
    print("| step | wall s | peak RSS GiB | safetensors GiB |")
    print("|---|---:|---:|---:|")
    for name, wall, rss, size in rows:
        print(f"| {name} | {wall:.1f} | {rss:.2f} | {size:.2f} |")
    print(f"exported tensors equal to the original, tensor for tensor: {same}")


if __name__ == "__main__":
    main()
