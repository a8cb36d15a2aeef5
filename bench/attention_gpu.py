"""The GPU attention kernel (``impl="gpu"``) against dense attention: max errors, no timing.

On a GPU backend the Pallas Triton kernel runs compiled; anywhere else in Pallas interpret mode
(the same kernel bodies evaluated as JAX ops), so off GPU this measures numerics only. For each
layout and dtype it prints the max absolute error of the output and of dq, dk, dv against
``impl="xla"`` (the dense reference, float32 softmax), and the largest reference magnitude.

Layouts (one row each, heads x head_dim = --heads x --head_dim):

* ``clips``: self-attention over a row of clips of 1..--max_clip tokens, then padding;
* ``single``: self-attention, one segment filling the row;
* ``cross``: the clips row's queries against short text segments (one segment without text).

Usage: python bench/attention_gpu.py [--length 512] [--out bench/results/attention_gpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    from vdit.ops.attention import attention
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vdit.ops.attention import attention


def layouts(length: int, text: int, max_clip: int, seed: int) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    clips = np.zeros(length, np.int32)
    pos, s = 0, 0
    while pos < length - length // 8:  # the last eighth stays padding
        n = int(rng.integers(1, max_clip + 1))
        s += 1
        clips[pos : pos + n] = s
        pos += n
    clips[length - length // 8 :] = 0
    words = np.zeros(text, np.int32)
    pos = 0
    for seg in range(1, int(clips.max()) + 1):
        n = 0 if seg == 2 else int(rng.integers(1, 4))  # segment 2 has no text
        words[pos : pos + n] = seg
        pos += n
        if pos >= text:
            break
    single = np.ones(length, np.int32)
    return {
        "clips": (clips[None], clips[None]),
        "single": (single[None], single[None]),
        "cross": (clips[None], words[None]),
    }


def errors(q_seg, kv_seg, heads, head_dim, block, dtype) -> dict[str, float]:
    lq, lk = q_seg.shape[1], kv_seg.shape[1]
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, lq, heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (1, lk, heads, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (1, lk, heads, head_dim)).astype(dtype)
    cot = jax.random.normal(keys[3], (1, lq, heads, head_dim))
    q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(kv_seg)

    def run(impl):
        def loss(q, k, v):
            out = attention(q, k, v, q_seg, kv_seg, impl=impl, block_q=block, block_kv=block)
            return jnp.sum(out.astype(jnp.float32) * cot), out

        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    got, ref = run("gpu"), run("xla")
    names = ("out", "dq", "dk", "dv")
    r = {n: float(np.abs(g - e).max()) for n, g, e in zip(names, got, ref, strict=True)}
    r["ref_max"] = float(max(np.abs(e).max() for e in ref))
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=512, help="query tokens of the row")
    p.add_argument("--text", type=int, default=64, help="key tokens of the cross layout")
    p.add_argument("--max_clip", type=int, default=40, help="longest clip of the clips layout")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64, help="query/key block of the kernel")
    p.add_argument("--out", default="bench/results/attention_gpu.json")
    args = p.parse_args()

    mode = "compiled (Triton)" if jax.default_backend() == "gpu" else "Pallas interpret mode"
    print(f"impl='gpu' vs impl='xla' on {jax.default_backend()}: {mode}; no timing\n")
    print("| layout | dtype | out | dq | dk | dv | max reference value |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name, (q_seg, kv_seg) in layouts(args.length, args.text, args.max_clip, 0).items():
        for dtype in (jnp.float32, jnp.bfloat16):
            e = errors(q_seg, kv_seg, args.heads, args.head_dim, args.block, dtype)
            dt = jnp.dtype(dtype).name
            rows.append({"layout": name, "dtype": dt, **e})
            cells = " | ".join(f"{e[k]:.2e}" for k in ("out", "dq", "dk", "dv"))
            print(f"| {name} | {dt} | {cells} | {e['ref_max']:.3g} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backend": jax.default_backend(), "mode": mode, "rows": rows}))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
