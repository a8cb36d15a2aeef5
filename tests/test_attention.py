"""Tests for vdit.ops.attention: chunked (block-skipping flash), splash and gpu vs dense reference.

Off TPU the splash kernel, and off GPU the gpu kernel, run in Pallas interpret mode (slow): their
tests use few, small shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vdit.flops import (
    executed_attention_flops_chunked,
    executed_attention_flops_gpu,
    executed_attention_flops_splash,
    executed_block_pairs_chunked,
    useful_attention_flops,
)
from vdit.ops.attention import IMPLS, attention, chunked, resolve_impl
from vdit.ops.attention.blocks import (
    BlockedView,
    block_ranges,
    block_ranges_np,
    pad_to_blocks,
)
from vdit.ops.attention.gpu import attention_gpu, gpu_blocks
from vdit.ops.attention.splash import splash_blocks

H, D = 2, 16
# Fixed tolerances (float32): values vs. dense reference, and gradients.
VAL_TOL = 1e-5
GRAD_TOL = 1e-4
# bf16 inputs (softmax still float32 inside; outputs rounded to bf16).
BF16_TOL = 2e-2


# ----------------------------------------------------------------------------------------------
# Layout helpers: ids 1..S contiguous and non-decreasing, padding (0) at the end.
# ----------------------------------------------------------------------------------------------


def _row_from_lengths(lengths: list[int], length: int) -> np.ndarray:
    row = np.zeros(length, np.int32)
    pos = 0
    for s, n in enumerate(lengths, start=1):
        n = min(n, length - pos)
        row[pos : pos + n] = s
        pos += n
    return row


def _random_lengths(rng: np.random.Generator, total: int, lo: int, hi: int) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(rng.integers(lo, hi + 1)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def self_layouts(length: int, seed: int) -> np.ndarray:
    """Six rows: full single segment, segment + padding, tiny segments, mixed, padded, mixed+pad."""
    rng = np.random.default_rng(seed)
    rows = [
        np.ones(length, np.int32),
        _row_from_lengths([length * 2 // 3], length),
        _row_from_lengths(_random_lengths(rng, length, 1, 5), length),
        _row_from_lengths(_random_lengths(rng, length, 1, max(2, length // 3)), length),
        np.zeros(length, np.int32),
        _row_from_lengths(_random_lengths(rng, length - length // 5, 1, 11), length),
    ]
    return np.stack(rows)


def cross_layouts(q_seg: np.ndarray, kv_length: int, seed: int, max_text: int = 7) -> np.ndarray:
    """Text-token ids with the same numbering as ``q_seg``: 0..max_text tokens per segment."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in q_seg:
        n_seg = int(row.max())
        lengths = [int(rng.integers(0, max_text + 1)) for _ in range(n_seg)]
        out = np.zeros(kv_length, np.int32)
        pos = 0
        for s, n in enumerate(lengths, start=1):
            n = min(n, kv_length - pos)
            out[pos : pos + n] = s
            pos += n
        rows.append(out)
    return np.stack(rows)


def _inputs(seed: int, b: int, lq: int, lk: int, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, lq, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, lk, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, lk, H, D), jnp.float32).astype(dtype)
    cot = jax.random.normal(keys[3], (b, lq, H, D), jnp.float32)
    return q, k, v, cot


@functools.cache
def _value_and_grads(impl: str, block_q: int, block_kv: int):
    def loss(q, k, v, q_seg, kv_seg, cot):
        out = attention(q, k, v, q_seg, kv_seg, impl=impl, block_q=block_q, block_kv=block_kv)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    grad_fn = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)

    @jax.jit
    def f(q, k, v, q_seg, kv_seg, cot):
        grads, out = grad_fn(q, k, v, q_seg, kv_seg, cot)
        return out, grads

    return f


def _compare(
    q_seg,
    kv_seg,
    block_q,
    block_kv,
    seed=0,
    dtype=jnp.float32,
    val_tol=VAL_TOL,
    grad_tol=GRAD_TOL,
    impl="chunked",
):
    b, lq = q_seg.shape
    lk = kv_seg.shape[1]
    q, k, v, cot = _inputs(seed, b, lq, lk, dtype)
    args = (q, k, v, jnp.asarray(q_seg), jnp.asarray(kv_seg), cot)
    ref_out, ref_grads = _value_and_grads("xla", block_q, block_kv)(*args)
    out, grads = _value_and_grads(impl, block_q, block_kv)(*args)
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=val_tol, rtol=val_tol
    )
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        g32, rg32 = np.asarray(g, np.float32), np.asarray(rg, np.float32)
        assert np.all(np.isfinite(g32)), name
        np.testing.assert_allclose(g32, rg32, atol=grad_tol, rtol=grad_tol, err_msg=f"d{name}")
    # Padding queries: exactly zero output and zero gradient.
    pad = np.asarray(q_seg) == 0
    assert np.all(np.asarray(out, np.float32)[pad] == 0)
    assert np.all(np.asarray(grads[0], np.float32)[pad] == 0)
    return out, grads


# ----------------------------------------------------------------------------------------------
# Correctness vs dense reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,block_q,block_kv",
    [
        (40, 8, 8),  # multiple of block
        (77, 16, 8),  # not a multiple, block_q != block_kv
        (200, 32, 32),
        (45, 512, 512),  # blocks clipped to the (padded) sequence length
    ],
)
def test_chunked_matches_xla_self_attention(length, block_q, block_kv):
    seg = self_layouts(length, seed=length)
    _compare(seg, seg, block_q, block_kv, seed=length)


@pytest.mark.parametrize(
    "lq,lk,block_q,block_kv,max_text",
    [
        (120, 37, 16, 8, 7),  # video queries, short text keys
        (50, 90, 8, 32, 7),  # Lk > Lq
    ],
)
def test_chunked_matches_xla_cross_attention(lq, lk, block_q, block_kv, max_text):
    rng = np.random.default_rng(lq + lk)
    # Video layouts with a modest number of segments so the text fits in Lk.
    n_max = max(1, lk // (max_text + 1))
    rows = [
        np.ones(lq, np.int32),
        _row_from_lengths([lq - 9], lq),
        _row_from_lengths([lq // n_max + 1] * n_max, lq),
        _row_from_lengths(_random_lengths(rng, lq - 5, max(1, lq // n_max), lq // 2), lq),
        np.zeros(lq, np.int32),
    ]
    q_seg = np.stack(rows)
    kv_seg = cross_layouts(q_seg, lk, seed=lq * lk, max_text=max_text)
    # Make sure some segment has no text tokens (query with no allowed key -> zero output).
    kv_seg[2][kv_seg[2] == 1] = 0
    kv_seg[2] = np.concatenate([kv_seg[2][kv_seg[2] != 0], kv_seg[2][kv_seg[2] == 0]])
    out, _ = _compare(q_seg, kv_seg, block_q, block_kv, seed=lq)
    assert np.all(np.asarray(out)[2][q_seg[2] == 1] == 0)


def test_bf16_inputs():
    seg = self_layouts(72, seed=3)
    out, _ = _compare(
        seg, seg, 16, 16, seed=5, dtype=jnp.bfloat16, val_tol=BF16_TOL, grad_tol=BF16_TOL
    )
    # And close to the float32 computation on the same (bf16-representable) inputs.
    q, k, v, _ = _inputs(5, *seg.shape, seg.shape[1], dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(functools.partial(attention, impl="xla"))(*f32, seg, seg)
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref), atol=BF16_TOL, rtol=BF16_TOL
    )


# ----------------------------------------------------------------------------------------------
# Splash (Pallas interpret mode off TPU)
# ----------------------------------------------------------------------------------------------


def test_splash_matches_xla_self_attention():
    # 200 tokens: padded to 256 = two 128-blocks; rows with tiny segments, padding, all padding.
    seg = self_layouts(200, seed=7)
    _compare(seg, seg, 128, 128, seed=7, impl="splash")


def test_splash_matches_xla_cross_attention():
    """Video queries over short text keys (Lk padded 37 -> 128); a segment without text -> 0."""
    lq, lk = 150, 37
    q_seg = np.stack(
        [
            _row_from_lengths([40, 30, 50, 20], lq),
            _row_from_lengths([140], lq),
            _row_from_lengths([60, 60, 30], lq),
        ]
    )
    kv_seg = cross_layouts(q_seg, lk, seed=3, max_text=7)
    kv_seg[0] = _row_from_lengths([5, 0, 7, 3], lk)  # segment 2 has no text tokens
    out, _ = _compare(q_seg, kv_seg, 128, 128, seed=3, impl="splash")
    assert np.all(np.asarray(out)[0][q_seg[0] == 2] == 0)
    assert np.all(np.asarray(out)[0][q_seg[0] == 3] != 0)


@pytest.mark.slow
def test_splash_bf16_inputs():
    seg = self_layouts(72, seed=3)
    _compare(
        seg,
        seg,
        128,
        128,
        seed=5,
        dtype=jnp.bfloat16,
        val_tol=BF16_TOL,
        grad_tol=BF16_TOL,
        impl="splash",
    )


def test_splash_blocks_and_executed_flops():
    assert splash_blocks(128, 128, 200, 37) == (128, 128)
    assert splash_blocks(100, 512, 1000, 1000) == (128, 512)  # rounded up to 128
    assert splash_blocks(512, 512, 300, 48) == (384, 128)  # clipped to the padded lengths
    # No block skipping: a row of 64 clips costs the same as one 4096-token clip.
    clips = np.repeat(np.arange(1, 65, dtype=np.int32), 64)[None]
    one = np.ones_like(clips)
    splash_clips = executed_attention_flops_splash(clips, clips, 4, 64, block_q=64, block_kv=64)
    assert splash_clips == executed_attention_flops_splash(one, one, 4, 64)
    assert splash_clips == 4 * 4 * 64 * 4096 * 4096
    chunked = executed_attention_flops_chunked(clips, clips, 4, 64, block_q=128, block_kv=128)
    assert splash_clips / chunked == pytest.approx(32.0)  # 32 blocks of 128 per side vs 2 each


def test_auto_impl():
    assert resolve_impl("auto", "tpu") == "splash"
    assert resolve_impl("auto", "cpu") == "chunked"
    assert resolve_impl("auto", "gpu") == "gpu"
    assert resolve_impl("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="auto"):
        resolve_impl("flash")
    # On this (CPU) backend "auto" is the chunked kernel: the same program.
    seg = jnp.asarray(self_layouts(40, seed=2))
    q, k, v, _ = _inputs(2, *seg.shape, 40)

    def hlo(impl, platform=None):
        f = functools.partial(attention, impl=impl, block_q=8, block_kv=8, platform=platform)
        return jax.jit(f).lower(q, k, v, seg, seg).as_text(debug_info=False)

    assert hlo("auto") == hlo("chunked")
    # "auto" for a GPU target is the Triton kernel: test_gpu_kernel_lowers_to_triton.


# ----------------------------------------------------------------------------------------------
# GPU (Pallas Triton kernel; interpret mode off GPU)
# ----------------------------------------------------------------------------------------------


def test_gpu_matches_xla_self_attention():
    # 200 tokens: blocks 32 x 64 (padded to 224 / 256); tiny segments, padding, all padding.
    seg = self_layouts(200, seed=11)
    _compare(seg, seg, 32, 64, seed=11, impl="gpu")


def test_gpu_matches_xla_cross_attention():
    """Video queries over short text keys (Lk 37 -> one block of 64); a segment without text -> 0."""
    lq, lk = 150, 37
    q_seg = np.stack(
        [
            _row_from_lengths([40, 30, 50, 20], lq),
            _row_from_lengths([140], lq),
            _row_from_lengths([60, 60, 30], lq),
        ]
    )
    kv_seg = cross_layouts(q_seg, lk, seed=3, max_text=7)
    kv_seg[0] = _row_from_lengths([5, 0, 7, 3], lk)  # segment 2 has no text tokens
    out, _ = _compare(q_seg, kv_seg, 32, 16, seed=3, impl="gpu")
    assert np.all(np.asarray(out)[0][q_seg[0] == 2] == 0)
    assert np.all(np.asarray(out)[0][q_seg[0] == 3] != 0)


def test_gpu_head_dim_not_a_power_of_two_and_bf16():
    """Head dim 24 (zero-padded to 32 inside) == dense, values and gradients; bf16 inputs too."""
    seg = jnp.asarray(self_layouts(72, seed=4))
    keys = jax.random.split(jax.random.PRNGKey(4), 4)
    q, k, v, cot = (jax.random.normal(key, (*seg.shape, 3, 24)) for key in keys)

    def run(impl, dtype):
        def loss(q, k, v):
            out = attention(q, k, v, seg, seg, impl=impl, block_q=16, block_kv=32)
            return jnp.sum(out.astype(jnp.float32) * cot), out

        args = [x.astype(dtype) for x in (q, k, v)]
        grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    for dtype, tol in ((jnp.float32, GRAD_TOL), (jnp.bfloat16, BF16_TOL)):
        for name, got, ref in zip(
            ("out", "dq", "dk", "dv"), run("gpu", dtype), run("xla", dtype), strict=True
        ):
            np.testing.assert_allclose(got, ref, atol=tol, rtol=tol, err_msg=f"{name} {dtype}")


def test_gpu_kernel_lowers_to_triton():
    """For a CUDA target the forward and both backward kernels lower through Pallas's Triton
    lowering (three Triton custom calls, no interpreted loops), and `"auto"` picks them."""
    seg = jnp.asarray(self_layouts(100, seed=1))
    q, k, v, cot = _inputs(1, *seg.shape, 100)

    def lowered(impl, platform):
        def loss(q, k, v):
            out = attention(
                q, k, v, seg, seg, impl=impl, block_q=32, block_kv=32, platform=platform
            )
            return jnp.sum(out * cot)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text(debug_info=False)

    text = lowered("auto", "gpu")
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert text == lowered("gpu", "gpu")
    # Off GPU the same call is interpreted: no Triton kernels.
    f = jax.jit(lambda q, k, v: attention_gpu(q, k, v, seg, seg, 32, 32, interpret=True))
    assert "triton" not in f.lower(q, k, v).as_text()


def test_gpu_blocks_and_executed_flops():
    assert gpu_blocks(128, 128, 200, 37) == (128, 64)  # clipped to the length's power of two
    assert gpu_blocks(100, 8, 1000, 1000) == (128, 16)  # powers of two, at least 16
    # Block skipping: a row of 64 clips of 64 tokens visits the 64 diagonal block pairs of 64.
    clips = np.repeat(np.arange(1, 65, dtype=np.int32), 64)[None]
    one = np.ones_like(clips)
    gpu_clips = executed_attention_flops_gpu(clips, clips, 4, 64, block_q=64, block_kv=64)
    assert gpu_clips == 4 * 4 * 64 * 64 * 64 * 64
    assert executed_attention_flops_gpu(one, one, 4, 64, block_q=64, block_kv=64) == 64 * gpu_clips
    assert gpu_clips == executed_attention_flops_chunked(
        clips, clips, 4, 64, block_q=64, block_kv=64
    )
    # Head dim 24 runs as 32.
    assert executed_attention_flops_gpu(clips, clips, 4, 24, block_q=64, block_kv=64) == (
        gpu_clips // 2
    )


def test_gpu_attention_module_sequence_parallel():
    """`layers.Attention` with impl "gpu" (interpreted) == "xla" on a (data=2, sequence=4) mesh,
    values and input gradients: self-attention (each device's query quarter against the gathered
    row) and cross-attention to unsharded text."""
    from flax import nnx

    from vdit.models import layers
    from vdit.parallel.mesh import make_mesh
    from vdit.parallel.sharding import DEFAULT_RULES, activation_sharding

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4}, jax.devices())
    b, length, dim, heads, lt = 2, 128, 32, 2, 12
    seg = jnp.asarray(
        np.stack([_row_from_lengths([50, 40, 20], length), np.ones(length, np.int32)])
    )
    tseg = jnp.asarray(np.stack([_row_from_lengths([4, 0, 5], lt), _row_from_lengths([9], lt)]))
    x = jax.random.normal(jax.random.key(0), (b, length, dim))
    ctx = jax.random.normal(jax.random.key(1), (b, lt, dim))

    def run(impl):
        self_attn = layers.Attention(dim, heads, impl=impl, block=32, rngs=nnx.Rngs(0))
        cross = layers.Attention(dim, heads, impl=impl, block=32, rngs=nnx.Rngs(1))

        def loss(x, ctx):
            with activation_sharding(mesh, DEFAULT_RULES):
                y = self_attn(x, seg)
                y = y + cross(y, seg, context=ctx, kv_segment_ids=tseg)
            return jnp.sum(y * jnp.cos(x)), y

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, ctx)

    (gx, gc), y = run("gpu")
    (rx, rc), ry = run("xla")
    assert float(jnp.abs(y).max()) > 0.1
    np.testing.assert_allclose(y, ry, atol=VAL_TOL, rtol=VAL_TOL)
    np.testing.assert_allclose(gx, rx, atol=GRAD_TOL, rtol=GRAD_TOL)
    np.testing.assert_allclose(gc, rc, atol=GRAD_TOL, rtol=GRAD_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_padded_rows_are_zero_and_finite(impl):
    # Same shapes as test_chunked_matches_xla_self_attention[40-8-8]: reuses its executable.
    seg = np.zeros((6, 40), np.int32)
    seg[1, :10] = 1
    seg[2, :25] = 1
    seg[2, 25:33] = 2
    q, k, v, cot = _inputs(0, 6, 40, 40)
    out, grads = _value_and_grads(impl, 8, 8)(q, k, v, jnp.asarray(seg), jnp.asarray(seg), cot)
    out = np.asarray(out)
    pad = seg == 0
    assert np.all(out[pad] == 0) and np.all(out[~pad] != 0)
    for name, g in zip("qkv", grads, strict=True):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        assert np.all(g[pad] == 0), name


@pytest.mark.parametrize("impl", IMPLS)
def test_no_leak_across_segments(impl):
    length = 50
    seg = np.stack([_row_from_lengths([13, 20, 9], length)])
    q, k, v, _ = _inputs(1, 1, length, length)
    in2 = jnp.asarray(seg[..., None, None] == 2)
    noise = 100.0 * jax.random.normal(jax.random.PRNGKey(9), v.shape)
    # One ids array for q and kv (as self-attention layers pass them): the splash path that
    # zeroes only padding queries.
    f = jax.jit(
        lambda q, k, v, seg: attention(q, k, v, seg, seg, impl=impl, block_q=8, block_kv=16)
    )
    out = np.asarray(f(q, k, v, seg))
    out_v = np.asarray(f(q, k, jnp.where(in2, v + noise, v), seg))
    out_kv = np.asarray(f(q, jnp.where(in2, k - noise, k), jnp.where(in2, v + noise, v), seg))
    assert np.all(out[0, seg[0] == 0] == 0) and np.all(out[0, seg[0] != 0] != 0)
    seg1 = seg[0] == 1
    seg3 = seg[0] == 3
    for perturbed in (out_v, out_kv):
        np.testing.assert_array_equal(perturbed[0, seg1], out[0, seg1])
        np.testing.assert_array_equal(perturbed[0, seg3], out[0, seg3])
        assert not np.allclose(perturbed[0, seg[0] == 2], out[0, seg[0] == 2])


# ----------------------------------------------------------------------------------------------
# Transformations: jit (above), checkpoint, batch sharding
# ----------------------------------------------------------------------------------------------


def test_checkpoint_and_batch_sharding():
    """Batch-sharded inputs under jit + checkpoint, plain and inside shard_map."""
    b, length = 8, 48
    seg = np.stack([self_layouts(length, seed=i)[i % 6] for i in range(b)])
    q, k, v, cot = _inputs(11, b, length, length)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    qs, ks, vs, cots, segs = (jax.device_put(x, sharding) for x in (q, k, v, cot, seg))

    def loss(q, k, v, seg, cot, impl):
        out = attention(q, k, v, seg, seg, impl=impl, block_q=16, block_kv=16)
        return jnp.sum(out * cot)

    xla_grad = jax.grad(functools.partial(loss, impl="xla"), argnums=(0, 1, 2))
    ref = jax.jit(xla_grad)(q, k, v, jnp.asarray(seg), cot)

    # Plain jit on sharded inputs: only jnp ops inside, the partitioner handles it.
    remat = jax.checkpoint(functools.partial(loss, impl="chunked"))
    grads = jax.jit(jax.grad(remat, argnums=(0, 1, 2)))(qs, ks, vs, segs, cots)
    for g, rg in zip(grads, ref, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=GRAD_TOL, rtol=GRAD_TOL)

    # Inside shard_map over the batch (per-device rows, per-device trip counts).
    spec = PartitionSpec("data")
    per_shard = jax.shard_map(
        lambda q, k, v, seg: attention(q, k, v, seg, seg, impl="chunked", block_q=16, block_kv=16),
        mesh=mesh,
        in_specs=(spec, spec, spec, spec),
        out_specs=spec,
    )

    @jax.jit
    @functools.partial(jax.grad, argnums=(0, 1, 2))
    @jax.checkpoint
    def sharded_loss(q, k, v, seg, cot):
        return jnp.sum(per_shard(q, k, v, seg) * cot)

    grads = sharded_loss(qs, ks, vs, segs, cots)
    for g, rg in zip(grads, ref, strict=True):
        assert g.sharding.is_equivalent_to(sharding, g.ndim)
        np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=GRAD_TOL, rtol=GRAD_TOL)


def test_chunked_memory_is_subquadratic():
    """Compiled fwd+bwd temp memory stays far below one dense (L x L) score matrix."""
    length, block = 4096, 128
    seg = jnp.ones((1, length), jnp.int32)
    x = jax.ShapeDtypeStruct((1, length, 1, 8), jnp.float32)

    def loss(q, k, v):
        out = attention(q, k, v, seg, seg, impl="chunked", block_q=block, block_kv=block)
        return jnp.sum(out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    dense_scores = length * length * 4
    assert temp < dense_scores / 16, (temp, dense_scores)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def test_errors():
    q = jnp.zeros((1, 8, H, D))
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="xla"):
        attention(q, q, q, seg, seg, impl="pallas")
    with pytest.raises(ValueError, match=r"\(1, 8, 2, 16\)"):
        attention(q, jnp.zeros((1, 8, 3, D)), jnp.zeros((1, 8, 3, D)), seg, seg)
    with pytest.raises(ValueError, match="shape"):
        attention(q, q, jnp.zeros((1, 9, H, D)), seg, seg)
    with pytest.raises(ValueError, match=r"\(1, 7\)"):
        attention(q, q, q, seg[:, :7], seg, impl="chunked")
    with pytest.raises(ValueError, match="kv_segment_ids"):
        attention(q, q, q, seg, jnp.ones((2, 8), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Block skipping and FLOP accounting
# ----------------------------------------------------------------------------------------------


def test_block_ranges_hand_built_layout():
    # ids: 10 x seg1, 3 x seg2, 12 x seg3, 7 x pad; block 8 -> q blocks [1,1] [1,3] [3,3] [3,3]
    seg = _row_from_lengths([10, 3, 12], 32)[None]
    lo, hi = block_ranges(jnp.asarray(seg).reshape(1, 4, 8), jnp.asarray(seg).reshape(1, 4, 8))
    np.testing.assert_array_equal(np.asarray(lo), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(hi), [[2, 4, 4, 4]])
    assert executed_block_pairs_chunked(seg, seg, block_q=8, block_kv=8) == 2 + 4 + 3 + 3
    # A padding-only block is never visited, in either direction.
    seg2 = _row_from_lengths([5, 6], 32)[None]  # blocks: [1,2] [2,2] pad pad
    lo, hi = block_ranges(jnp.asarray(seg2).reshape(1, 4, 8), jnp.asarray(seg2).reshape(1, 4, 8))
    np.testing.assert_array_equal(np.asarray(hi - lo), [[2, 2, 0, 0]])
    assert executed_block_pairs_chunked(seg2, seg2, block_q=8, block_kv=8) == 4
    # Useful pairs: 10^2 + 3^2 + 12^2.
    assert useful_attention_flops(seg, seg, 1, 1) == 4 * (100 + 9 + 144)


def test_block_ranges_are_conservative_for_any_layout():
    """Skipped pairs never share a nonzero id, even for non-monotone layouts."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        seg = rng.integers(0, 6, size=(2, 48)).astype(np.int32)
        kv = rng.integers(0, 6, size=(2, 40)).astype(np.int32)
        lo, hi = block_ranges_np(seg, kv, 8, 8)
        for b in range(2):
            for i in range(6):
                qids = set(seg[b, 8 * i : 8 * i + 8]) - {0}
                for j in range(5):
                    if not lo[b, i] <= j < hi[b, i]:
                        assert not qids & set(kv[b, 8 * j : 8 * j + 8])


def test_flops_many_short_clips():
    n_clips, clip, block = 64, 64, 64
    seg = np.repeat(np.arange(1, n_clips + 1, dtype=np.int32), clip)[None]  # (1, 4096)
    useful = useful_attention_flops(seg, seg, 4, 64)
    assert useful == 4 * 4 * 64 * n_clips * clip * clip
    executed = executed_attention_flops_chunked(seg, seg, 4, 64, block_q=block, block_kv=block)
    dense = 4 * 4 * 64 * seg.shape[1] ** 2
    assert executed / useful <= 1.2
    assert executed / useful == pytest.approx(1.0)
    assert dense / useful == pytest.approx(64.0)
    # Misaligned clips still cost a small constant factor, not L^2.
    seg_off = np.concatenate([np.ones((1, 32), np.int32), seg[:, :-32] + 1], axis=1)
    ratio = executed_attention_flops_chunked(
        seg_off, seg_off, 4, 64, block_q=block, block_kv=block
    ) / useful_attention_flops(seg_off, seg_off, 4, 64)
    assert ratio < 4.5


def _chunked_pair_counts(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: np.ndarray,
    kv_segment_ids: np.ndarray,
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> dict[str, int]:
    """Block pairs actually visited by the chunked forward, dq and dk/dv loops."""
    q_seg = jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = jnp.asarray(kv_segment_ids, jnp.int32)
    counts = _pair_counts_jit(q, k, v, q_seg, kv_seg, block_q, block_kv)
    return {name: int(c) for name, c in zip(("forward", "dq", "dkv"), counts, strict=True)}


@functools.partial(jax.jit, static_argnums=(5, 6))
def _pair_counts_jit(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    kv_seg: jax.Array,
    block_q: int,
    block_kv: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    view = BlockedView.of(*pad_to_blocks(q, k, v, q_seg, kv_seg, block_q, block_kv))
    out, lse, n_fwd = chunked.flash_forward(view, None)
    _, (n_dq, n_dkv) = chunked.flash_backward(view, out, lse, jnp.ones_like(out), None)
    return n_fwd, n_dq, n_dkv


def test_counter_matches_kernel_iterations():
    layouts = []
    clips = np.repeat(np.arange(1, 65, dtype=np.int32), 64)[None]  # 64 clips x 64 tokens
    layouts.append((clips, clips, 64, 64))
    seg = self_layouts(77, seed=1)
    kv = cross_layouts(seg, 40, seed=2)
    layouts.append((seg, kv, 8, 16))
    for q_seg, kv_seg, bq, bk in layouts:
        b, lq = q_seg.shape
        lk = kv_seg.shape[1]
        q = jnp.zeros((b, lq, 1, 8))
        k = jnp.zeros((b, lk, 1, 8))
        counts = _chunked_pair_counts(q, k, k, q_seg, kv_seg, block_q=bq, block_kv=bk)
        expected = executed_block_pairs_chunked(q_seg, kv_seg, block_q=bq, block_kv=bk)
        # Monotone layouts: dk/dv ranges visit exactly the same pairs as forward / dq.
        assert counts == {"forward": expected, "dq": expected, "dkv": expected}
        flops = executed_attention_flops_chunked(q_seg, kv_seg, 1, 8, block_q=bq, block_kv=bk)
        assert flops == expected * 4 * 8 * min(bq, lq + (-lq) % 8) * min(bk, lk + (-lk) % 8)
    # 64 clips of 64 with block 64: exactly one block pair per clip.
    assert executed_block_pairs_chunked(clips, clips, block_q=64, block_kv=64) == 64
