"""Building blocks shared by the DiT and the text encoder.

Dimension letters: B batch rows, L video tokens, C text tokens, D width, H heads, K head dim,
F MLP hidden, P patch values, E text-encoder width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from vdit.ops.attention import attention, resolve_impl
from vdit.parallel import sharding
from vdit.parallel.sharding import constrain

# Parameters carry logical axis names only; `vdit.parallel.sharding` maps them to the mesh. Eager sharding
# (placing each variable on a mesh while it is created) is off: the train state is created under `jax.jit`
# with explicit out_shardings instead.
nnx.use_eager_sharding(False)


def dense(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    zero: bool = False,
    use_bias: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> nnx.Linear:
    """A Linear layer whose kernel (din, dout) carries the logical axis `names`."""
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without learned affine, computed in float32 (adaLN supplies scale and shift)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale over the last dimension (named `name`)."""

    def __init__(self, dim: int, name: str, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias over the last dimension (named `name`), computed in
    float32 (Wan2.1's affine norm before cross-attention)."""

    def __init__(self, dim: int, name: str, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x.astype(jnp.float32), self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DiT/Wan). (...,) -> (..., dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (t.astype(jnp.float32) * 1000.0)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def fractional_positions(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Each token's place within its own sample along (t, h, w), as a fraction in (0, 1).

    ``(p - first + 0.5) / extent`` per axis, where ``first`` and ``extent`` are the smallest
    position and the number of positions of the token's segment along that axis (the samples of
    a packed row each get their own; an image's one frame is at 0.5). (B, L, 3) int, (B, L) ->
    (B, L, 3) float32. Tokens a sample lost to token dropping do not count toward its extent.
    """
    n = segment_ids.shape[1] + 1  # segment ids are < L + 1

    def one(pos: jax.Array, seg: jax.Array) -> tuple[jax.Array, jax.Array]:
        first = jax.ops.segment_min(pos, seg, num_segments=n)[seg]  # (L, 3)
        last = jax.ops.segment_max(pos, seg, num_segments=n)[seg]
        return first, last

    first, last = jax.vmap(one)(positions, segment_ids)
    extent = jnp.maximum(last - first + 1, 1).astype(jnp.float32)
    return (positions - first).astype(jnp.float32) / extent + 0.5 / extent


def fourier_features(u: jax.Array, freqs: int) -> jax.Array:
    """cos / sin of ``pi * k * u`` for k = 1..freqs along each axis. (..., A) -> (..., 2 * A * freqs)."""
    k = jnp.pi * jnp.arange(1, freqs + 1, dtype=jnp.float32)  # (F,)
    args = u.astype(jnp.float32)[..., None] * k  # (..., A, F)
    feats = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (..., A, 2F)
    return feats.reshape(*u.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------
# 3D rotary position embedding over (t, h, w)
# ----------------------------------------------------------------------------------------------------
def rope_split(head_dim: int) -> tuple[int, int, int]:
    """How many rotary dims go to (t, h, w): Wan2.1's split (h and w get 2*(K//6) each, t the rest)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10_000.0) -> jax.Array:
    """Rotation angles for integer (t, h, w) positions. (B, L, 3) -> (B, L, K/2)."""
    parts = []
    for axis, d in enumerate(rope_split(head_dim)):
        if d == 0:
            continue
        inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (d/2,)
        parts.append(positions[..., axis : axis + 1].astype(jnp.float32) * inv)
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate pairs (x[2i], x[2i+1]) by angles. x (B, L, H, K), angles (B, L, K/2)."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Multi-head attention with segment ids, RMSNorm on q and k (over the full width, as Wan2.1)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_dim: int | None = None,
        qk_norm: bool = True,
        impl: str = "xla",
        block: int = 512,
        seq: str = "length",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        kv_dim = dim if kv_dim is None else kv_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = dense(dim, dim, ("embed", "heads"), **kw)
        self.k = dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.v = dense(kv_dim, dim, ("embed", "heads"), **kw)
        self.o = dense(dim, dim, ("heads", "embed"), **kw)
        self.norm_q = RMSNorm(dim, "heads", param_dtype=param_dtype) if qk_norm else None
        self.norm_k = RMSNorm(dim, "heads", param_dtype=param_dtype) if qk_norm else None
        self.heads = heads
        self.impl = impl
        self.block = block
        self.seq = seq

    def __call__(
        self,
        x: jax.Array,  # (B, L, D)
        q_segment_ids: jax.Array,  # (B, L)
        *,
        context: jax.Array | None = None,  # (B, C, Dk) for cross-attention, else self-attention
        kv_segment_ids: jax.Array | None = None,  # (B, C)
        rope: jax.Array | None = None,  # (B, L, K/2), self-attention only
    ) -> jax.Array:
        ctx = x if context is None else context
        kv_seg = q_segment_ids if kv_segment_ids is None else kv_segment_ids
        q, k, v = self.q(x), self.k(ctx), self.v(ctx)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        split = lambda a: a.reshape(*a.shape[:-1], self.heads, -1)  # (B, L, D) -> (B, L, H, K)
        q, k, v = split(q), split(k), split(v)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q = constrain(q, ("batch", self.seq, "heads", "kv"))
        out = self._attend(q, k, v, q_segment_ids, kv_seg, context is None)  # (B, L, H, K)
        return self.o(out.reshape(*out.shape[:-2], -1))

    def _attend(self, q, k, v, q_seg, kv_seg, self_attention: bool):
        """Attention; under a mesh, the kernel runs per device on its own rows, heads and queries.

        Rows are independent and so are heads, so `shard_map` over the batch and heads axes is exact.
        Sequence parallelism: a row's tokens are sharded along `sequence`; each device all-gathers
        the keys, values and key segment ids of its row (the backward pass sums their gradients back)
        and attends its own query chunk to the whole row. With segment ids the chunked kernel still
        skips key blocks that hold other samples. `"auto"` is resolved for the mesh's platform.
        """
        ctx = sharding.current()
        platform = None if ctx is None else ctx[0].devices.flat[0].platform
        impl = resolve_impl(self.impl, platform)
        fn = functools.partial(
            attention, impl=impl, block_q=self.block, block_kv=self.block, platform=platform
        )
        if ctx is None or impl == "xla":
            return fn(q, k, v, q_seg, kv_seg)
        mesh, rules = ctx
        spec = lambda names, shape: (
            *sharding.logical_to_spec(names, rules, mesh, shape),
            None,
            None,
            None,
            None,
        )
        bq, lq, hq, _ = spec(("batch", self.seq, "heads", None), q.shape)[:4]
        kv_len = self.seq if self_attention else None
        bk, lk, hk, _ = spec(("batch", kv_len, "heads", None), k.shape)[:4]
        if (bq, hq) != (bk, hk):  # rows or heads split differently: let XLA lay it out
            return fn(q, k, v, q_seg, kv_seg)
        spec_q, spec_k = P(bq, lq, hq, None), P(bk, lk, hk, None)
        # The splash and GPU kernels' pallas_calls declare outputs without mesh-axis variance,
        # which shard_map's variance checking rejects; their per-device semantics are plain, so
        # skip it.
        check = impl not in ("splash", "gpu")
        if q_seg is kv_seg and lk is None:  # self-attention, whole rows: pass the ids once
            one = lambda q, k, v, seg: fn(q, k, v, seg, seg)
            return jax.shard_map(
                one,
                mesh=mesh,
                in_specs=(spec_q, spec_q, spec_q, P(bq)),
                out_specs=spec_q,
                check_vma=check,
            )(q, k, v, q_seg)

        def local(q, k, v, q_seg, kv_seg):
            if lk is not None:
                gather = functools.partial(jax.lax.all_gather, axis_name=lk, axis=1, tiled=True)
                k, v, kv_seg = gather(k), gather(v), gather(kv_seg)
            return fn(q, k, v, q_seg, kv_seg)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(spec_q, spec_k, spec_k, P(bq, lq), P(bk, lk)),
            out_specs=spec_q,
            check_vma=check,
        )(q, k, v, q_seg, kv_seg)


class MLP(nnx.Module):
    """Linear -> tanh-GELU -> Linear."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        names: Sequence[str] = ("embed", "mlp"),
        seq: str = "length",
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(dim, hidden, (names[0], names[1]), **kw)
        self.fc2 = dense(hidden, dim, (names[1], names[0]), **kw)
        self.seq = seq

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=True)
        h = constrain(h, ("batch", self.seq, "mlp")) if h.ndim == 3 else h
        return self.fc2(h)
