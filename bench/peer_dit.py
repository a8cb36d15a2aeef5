"""vdit's DiT (JAX, jitted) vs diffusers' WanTransformer3DModel (PyTorch eager) at a matched B/2-like
size on the same tokens, on this CPU: train step and forward, float32 and bfloat16.

    pip install -e '.[bench]'       # torch and diffusers (see BUILD.md for the CPU-only torch wheel)
    python bench/peer_dit.py                      # 1280 tokens (5x32x32 latent), ~10 min on 2 cores
    python bench/peer_dit.py --dtypes float32 --reps 3 --latent 5 16 16   # quicker

Both models are randomly initialised (nothing is downloaded) at one shape: width 768, 12 blocks, 12
heads, MLP 3072, precomputed text of width 512, patch 1x2x2 on 16 latent channels. Wan's blocks are
its own (LayerNorm on cross-attention, RMSNorm across heads on q and k, per-sample timestep
modulation); vdit's are configs/default.py's (RMSNorm before cross-attention, per-token modulation
unless `--set model.modulation_slots=N`). One sample: a `--latent T H W` grid (T*H/2*W/2 tokens) and
`--text` caption tokens, one row for vdit (no padding), a (1, 16, T, H, W) tensor for Wan.

- train step: noise at a random t, the velocity target, MSE, backward, global-norm clip 1.0, AdamW
  (betas 0.9 / 0.99) and a 0.99 EMA. vdit: `DiTTask.jit_train_step` (also skips non-finite steps);
  Wan: the same loss on `model(x_t, t, text).sample`, `clip_grad_norm_`, `torch.optim.AdamW(foreach)`,
  `torch._foreach_lerp_` EMA.
- forward: the velocity of the same noisy input; vdit jitted, Wan under `torch.no_grad()`.
- bfloat16: vdit `model.dtype=bfloat16` (float32 parameters and optimizer); Wan under
  `torch.autocast("cpu", torch.bfloat16)` (float32 parameters).

Calls alternate vdit / Wan after one warm-up each (vdit's compile is excluded and reported); the
table gives medians, tokens/s and the ratio. Model FLOPs are vdit's analytic count (`vdit.flops`, no
recompute, no padding) for both: the same network math, so FLOP/s compare like tokens/s. Each side's
FLOP/s is also given as a fraction of its own framework's matmul rate at the model's dense shapes
(`(M, 768) x (768, 768)`, `x (768, 3072)`, `(M, 3072) x (3072, 768)`, M = tokens), FLOP-weighted
as the model spends them, in the same dtype: the CPU matmul libraries differ (XLA's Eigen, torch's
oneDNN), so this is how close each framework runs to its own matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

try:
    import torch
    from diffusers import WanTransformer3DModel
except ImportError as e:  # the bench extra is optional
    raise SystemExit(
        f"bench/peer_dit.py needs torch and diffusers ({e}); install them with "
        "pip install -e '.[bench]'"
    ) from None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import CHANNELS, DEPTH, FFN, HEADS, TEXT_DIM, WIDTH, b2_batch, b2_task  # noqa: E402

from vdit import flops  # noqa: E402
from vdit.data import pipeline  # noqa: E402


def wan_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=WIDTH // HEADS,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN,
        num_layers=DEPTH,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )


class WanStep:
    """One optimizer step of the Wan DiT with vdit's loss and update."""

    def __init__(self, model: torch.nn.Module, dtype: str):
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, foreach=True
        )
        self.ema = [p.detach().clone() for p in self.params]
        self.bf16 = dtype == "bfloat16"

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def __call__(self, x0: torch.Tensor, text: torch.Tensor) -> float:
        t = torch.rand(x0.shape[0])
        noise = torch.randn_like(x0)
        xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        with self._autocast():
            pred = self.model(xt, t * 1000, text, return_dict=False)[0]
        loss = torch.mean((pred.float() - (noise - x0)) ** 2)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, self.params, 1.0 - 0.99)
        return float(loss.detach())

    def forward(self, xt: torch.Tensor, text: torch.Tensor) -> None:
        with torch.no_grad(), self._autocast():
            self.model(xt, torch.full((xt.shape[0],), 500.0), text, return_dict=False)[0].sum()


def matmul_rates(tokens: int, dtype: str, reps: int) -> dict[str, float]:
    """FLOP-weighted GFLOP/s of each framework's (M, K) x (K, N) at the blocks' dense shapes."""
    shapes = [  # (k, n, FLOPs per token per block spent in this shape)
        (WIDTH, WIDTH, 6 * 2.0 * WIDTH * WIDTH),  # q, k, v, o, cross q, o
        (WIDTH, FFN, 2.0 * WIDTH * FFN),
        (FFN, WIDTH, 2.0 * FFN * WIDTH),
    ]
    jdt, tdt = jnp.dtype(dtype), getattr(torch, dtype)
    rates: dict[str, list[float]] = {"xla": [], "torch": []}
    rng = np.random.default_rng(0)
    for k, n, _ in shapes:
        a = rng.standard_normal((tokens, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
        f = jax.jit(lambda x, y: x @ y)
        jax.block_until_ready(f(ja, jb))
        ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
        torch.mm(ta, tb)
        times = {"xla": [], "torch": []}
        for _ in range(reps):  # alternate
            t0 = time.perf_counter()
            jax.block_until_ready(f(ja, jb))
            times["xla"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch.mm(ta, tb)
            times["torch"].append(time.perf_counter() - t0)
        for side in rates:
            rates[side].append(2.0 * tokens * k * n / statistics.median(times[side]) / 1e9)
    total = sum(w for *_, w in shapes)
    out = {}
    for side, r in rates.items():
        out[side] = total / sum(w / g for (*_, w), g in zip(shapes, r, strict=True))
        out[side + "_by_shape"] = r
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def bench_dtype(args, dtype: str) -> dict:
    rng = np.random.default_rng(0)
    task = b2_task(dtype, args.set)
    cfg = task.model_cfg
    b = b2_batch(tuple(args.latent), args.text, rng)
    shardings = task.batch_shardings({k: b[k].ndim for k in pipeline.DEVICE_KEYS})
    gb = pipeline.to_global(b, shardings)
    holder = {"state": task.state.init()}
    t0 = time.perf_counter()
    step = task.jit_train_step(shardings).lower(holder["state"], gb).compile()
    compile_step = time.perf_counter() - t0

    def vdit_step():
        holder["state"], m = step(holder["state"], gb)
        jax.block_until_ready(m["loss"])

    t_tok = jnp.full(b["segment_ids"].shape, 0.5, jnp.float32)

    @jax.jit
    def fwd(params, batch):
        return task.denoise(params, batch, batch["patches"], t_tok)

    t0 = time.perf_counter()
    fwd_c = fwd.lower(holder["state"]["params"], gb).compile()
    compile_fwd = time.perf_counter() - t0
    vdit_fwd = lambda: jax.block_until_ready(fwd_c(holder["state"]["params"], gb))

    t, h, w = args.latent
    x0 = torch.from_numpy(rng.standard_normal((1, CHANNELS, t, h, w)).astype(np.float32))
    text = torch.from_numpy(b["text"])
    wan = wan_model()
    wstep = WanStep(wan, dtype)
    wan_step = lambda: wstep(x0, text)
    wan_fwd = lambda: wstep.forward(x0, text)
    res: dict[str, list[float]] = {k: [] for k in ("vdit_step", "wan_step", "vdit_fwd", "wan_fwd")}
    for name, fn in (("vdit_step", vdit_step), ("wan_step", wan_step)):
        log(f"{dtype}: warm-up {name}: {timed(fn):.2f} s")
    for i in range(args.reps):
        pairs = [("vdit_step", vdit_step), ("wan_step", wan_step)]
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            res[name].append(timed(fn))
            log(f"{dtype}: {name} {res[name][-1]:.2f} s")
    for name, fn in (("vdit_fwd", vdit_fwd), ("wan_fwd", wan_fwd)):
        log(f"{dtype}: warm-up {name}: {timed(fn):.2f} s")
    for i in range(args.reps):
        pairs = [("vdit_fwd", vdit_fwd), ("wan_fwd", wan_fwd)]
        for name, fn in pairs if i % 2 == 0 else pairs[::-1]:
            res[name].append(timed(fn))
    tokens = int(b["segment_ids"].size)
    f = flops.step_flops(cfg, b["segment_ids"], b["text_segment_ids"], remat="none")
    train_flops = f["total_useful"]
    a = flops.attention_forward_flops(cfg, b["segment_ids"], b["text_segment_ids"])
    fwd_parts = flops.matmul_flops_per_token(cfg)
    fwd_flops = (
        tokens * sum(fwd_parts.values())
        + args.text * flops.text_flops_per_token(cfg)
        + a["self_useful"]
        + a["cross_useful"]
    )
    log(f"{dtype}: timing matmuls at M = {tokens}")
    mm = matmul_rates(tokens, dtype, args.matmul_reps)
    med = {k: statistics.median(v) for k, v in res.items()}
    n_vdit = task.state.num_params()
    n_wan = sum(p.numel() for p in wan.parameters())
    out = {
        "dtype": dtype,
        "tokens": tokens,
        "params": {"vdit": n_vdit, "wan": n_wan},
        "times_s": res,
        "median_s": med,
        "compile_s": {"step": compile_step, "forward": compile_fwd},
        "model_flops": {"train": train_flops, "forward": fwd_flops},
        "matmul_gflops": mm,
    }
    for kind, fl in (("step", train_flops), ("fwd", fwd_flops)):
        for side, fw in (("vdit", "xla"), ("wan", "torch")):
            s = med[f"{side}_{kind}"]
            out[f"{side}_{kind}_tok_s"] = tokens / s
            out[f"{side}_{kind}_gflops"] = fl / s / 1e9
            out[f"{side}_{kind}_frac_own"] = fl / s / 1e9 / mm[fw]
            out[f"{side}_{kind}_frac_xla"] = fl / s / 1e9 / mm["xla"]
    return out


def print_table(rows: list[dict], args) -> None:
    r0 = rows[0]
    t, h, w = args.latent
    print(
        f"matched size: width {WIDTH}, {DEPTH} blocks, {HEADS} heads, MLP {FFN}, text {TEXT_DIM} "
        f"x {args.text} tokens, patch 1x2x2, {CHANNELS} channels; latent {t}x{h}x{w} = "
        f"{r0['tokens']} tokens, batch 1; parameters vdit {r0['params']['vdit']:,}, Wan "
        f"{r0['params']['wan']:,}; torch {torch.__version__} eager, {torch.get_num_threads()} "
        f"threads; jax {jax.__version__} jitted (XLA CPU, {os.cpu_count()} cores); median of "
        f"{args.reps}, alternating\n"
    )
    print(
        "| pass | dtype | vdit s | Wan s | vdit tok/s | Wan tok/s | vdit / Wan "
        "| vdit GFLOP/s | Wan GFLOP/s | XLA matmul GFLOP/s | torch matmul GFLOP/s "
        "| vdit / XLA matmul | Wan / torch matmul |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, mm = r["median_s"], r["matmul_gflops"]
        for kind, label in (("step", "train step"), ("fwd", "forward")):
            print(
                f"| {label} | {r['dtype']} | {m['vdit_' + kind]:.2f} | {m['wan_' + kind]:.2f} "
                f"| {r['vdit_' + kind + '_tok_s']:.0f} | {r['wan_' + kind + '_tok_s']:.0f} "
                f"| {m['wan_' + kind] / m['vdit_' + kind]:.2f} "
                f"| {r['vdit_' + kind + '_gflops']:.0f} | {r['wan_' + kind + '_gflops']:.0f} "
                f"| {mm['xla']:.0f} | {mm['torch']:.0f} "
                f"| {r['vdit_' + kind + '_frac_own']:.2f} | {r['wan_' + kind + '_frac_own']:.2f} |"
            )
    print(
        "\nvdit compile (s): "
        + ", ".join(
            f"{r['dtype']} step {r['compile_s']['step']:.0f} / forward {r['compile_s']['forward']:.0f}"
            for r in rows
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--latent", type=int, nargs=3, default=(5, 32, 32), metavar=("T", "H", "W"))
    ap.add_argument("--text", type=int, default=64, help="caption tokens")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--set", nargs="*", default=[], help="vdit config overrides KEY=VALUE")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer_dit.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for d in args.dtypes:  # each dtype's figures are logged as soon as they exist
        rows.append(bench_dtype(args, d))
        log(json.dumps({k: v for k, v in rows[-1].items() if k != "times_s"}))
    print_table(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
