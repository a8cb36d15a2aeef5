"""VideoDiT: a diffusion transformer over packed spacetime patches.

The block follows Wan2.1 (so that its open weights can be imported later as a config choice): a shared
timestep projection to six modulation vectors plus a learned per-block table, adaLN on self-attention and
MLP, RMSNorm on q and k, cross-attention to the sample's own text, tanh-GELU MLP. Modulation follows
each token's own timestep, so conditioning tokens (t = 0) and noisy tokens share a row. By default it is
computed per token, a (B, L, 6, D) tensor; with ``modulation_slots = N > 0`` it is computed once per
distinct timestep of a row (at most N of them: a packed row has one per sample plus 0 for conditioning
tokens and padding), (B, N, 6, D), and each block gathers a token's six vectors by its slot index inside
the elementwise adaLN, so no (B, L, 6, D) tensor exists (:func:`timestep_slots`). The time
projection, the block tables' gate rows and the output layer start at zero (adaLN-Zero): at init every
block is the identity and the model predicts zero velocity.

With ``text_pool`` each sample's mean-pooled text is added to its tokens' timestep embedding, so every
block's modulation also sees its whole caption.

Dimension letters: B rows, L video tokens, C text tokens, D width, P patch values, E text width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from vdit.models import layers
from vdit.models.text import TextEncoder, TextEncoderConfig
from vdit.ops.attention import IMPL_CHOICES
from vdit.parallel.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
CROSS_NORMS = ("rms", "layer", "none")
POS_EMBEDS = ("none", "fractional")
POS_FREQS = 16  # Fourier frequencies per axis of the "fractional" position embedding
POS_FEATURES = 3 * 2 * POS_FREQS  # its input width: cos and sin per frequency for t, h, w


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    width: int = 384  # D
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    mlp_dim: int = 0  # F, the MLP hidden width; 0 = int(mlp_ratio * width) (Wan2.1-1.3B: 8960)
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) in latent frames/pixels
    channels: int = 4  # latent channels
    text: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    qk_norm: bool = True
    # the norm before cross-attention: "rms" (RMSNorm with a scale) | "layer" (LayerNorm with scale
    # and bias, Wan2.1's cross_attn_norm=True) | "none" (Wan2.1's cross_attn_norm=False)
    cross_norm: str = "rms"
    rope_theta: float = 10_000.0
    attn_impl: str = "auto"
    attn_block: int = 128  # query/key block of the chunked, splash and gpu implementations
    remat: str = "none"  # one of REMAT_POLICIES
    scan_layers: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # 0: modulation per token (B, L, 6, D); N > 0: per distinct timestep of a row, at most N per row
    # (a row with more gives NaN outputs, see `timestep_slots`)
    modulation_slots: int = 0
    # absolute position added to the patch embedding, beside RoPE's relative one: "none" (Wan2.1)
    # | "fractional" (each token's place within its own sample along t, h, w as a fraction in
    # (0, 1), NaViT's fractional embedding: Fourier features through a zero-initialised linear)
    pos_embed: str = "none"
    # each sample's text, mean-pooled over its own text tokens, through a zero-initialised linear and
    # added to its timestep embedding, so the adaLN modulation of every block (and of the head) sees
    # the whole caption, not only what cross-attention gathers per token (the pooled text vector of
    # SD3 and Flux); needs per-token modulation (modulation_slots = 0)
    text_pool: bool = False

    def __post_init__(self):
        """Every check on these fields; a message starts with the field it names."""
        if self.width % self.heads:
            raise ValueError(f"heads: {self.heads} heads do not divide width={self.width}")
        if (self.width // self.heads) % 2:
            raise ValueError(f"heads: head dim {self.width // self.heads} must be even for 3D RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.cross_norm not in CROSS_NORMS:
            raise ValueError(f"cross_norm: {self.cross_norm!r} is not one of {CROSS_NORMS}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed: {self.pos_embed!r} is not one of {POS_EMBEDS}")
        if self.mlp_dim < 0:
            raise ValueError(f"mlp_dim: {self.mlp_dim} must be >= 0 (0: mlp_ratio * width)")
        if self.attn_impl not in IMPL_CHOICES:
            raise ValueError(f"attn_impl: {self.attn_impl!r} is not one of {IMPL_CHOICES}")
        if self.modulation_slots < 0:
            raise ValueError(
                f"modulation_slots: {self.modulation_slots} must be 0 (per token) or a positive "
                "bound on the distinct timesteps of a row"
            )
        if self.text_pool and self.modulation_slots:
            raise ValueError(
                "text_pool: pooled text is per sample, but modulation_slots > 0 shares modulation "
                "between samples of the same timestep; set modulation_slots=0"
            )

    @property
    def mlp_hidden(self) -> int:  # F
        return self.mlp_dim or int(self.width * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:  # P
        pt, ph, pw = self.patch
        return pt * ph * pw * self.channels


class Block(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, dt, pdt = cfg.width, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt)
        # (6, D): shift1, scale1, gate1, shift2, scale2, gate2, added to the shared time projection.
        self.modulation = nnx.Param(jnp.zeros((6, d), pdt), out_sharding=("modulation", "embed"))
        self.self_attn = layers.Attention(
            d, cfg.heads, qk_norm=cfg.qk_norm, impl=cfg.attn_impl, block=cfg.attn_block, **kw
        )
        self.norm_cross = {
            "rms": lambda: layers.RMSNorm(d, "embed", param_dtype=pdt),
            "layer": lambda: layers.LayerNorm(d, "embed", param_dtype=pdt),
            "none": lambda: None,
        }[cfg.cross_norm]()
        self.cross_attn = layers.Attention(
            d, cfg.heads, qk_norm=cfg.qk_norm, impl=cfg.attn_impl, block=cfg.attn_block, **kw
        )
        self.mlp = layers.MLP(d, cfg.mlp_hidden, **kw)

    def __call__(self, x, t_mod, slot, segment_ids, rope, text, text_segment_ids):
        # x (B, L, D); t_mod (B, L, 6, D) per token (slot None) or (B, N, 6, D) per timestep slot,
        # slot (B, L): each token's slot
        mod = t_mod + self.modulation[...].astype(t_mod.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = [
            mod[:, :, i] if slot is None else _gather_slots(mod[:, :, i], slot) for i in range(6)
        ]
        h = layers.layer_norm(x) * (1 + scale1) + shift1
        x = x + gate1 * self.self_attn(h, segment_ids, rope=rope)
        h = x if self.norm_cross is None else self.norm_cross(x)
        x = x + self.cross_attn(h, segment_ids, context=text, kv_segment_ids=text_segment_ids)
        h = layers.layer_norm(x) * (1 + scale2) + shift2
        x = x + gate2 * self.mlp(h)
        return constrain(x, ("batch", "length", "embed"))


class VideoDiT(nnx.Module):
    """Velocity prediction for packed rows of noisy latent patches."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg  # checked by DiTConfig itself
        d, dt, pdt = cfg.width, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pdt)
        self.patch_embed = layers.dense(cfg.patch_dim, d, ("patch", "embed"), **kw)
        if cfg.pos_embed == "fractional":
            self.pos_embed = layers.dense(POS_FEATURES, d, (None, "embed"), zero=True, **kw)
        self.time_fc1 = layers.dense(256, d, (None, "embed"), **kw)  # from 256 frequencies
        self.time_fc2 = layers.dense(d, d, ("mlp", "embed"), **kw)
        self.time_proj = layers.dense(d, 6 * d, ("embed", "mlp"), zero=True, **kw)
        self.text_encoder = TextEncoder(cfg.text, **kw)
        self.text_proj = layers.dense(cfg.text.out_width, d, ("text_embed", "embed"), **kw)
        self.text_out = layers.dense(d, d, ("mlp", "embed"), **kw)
        if cfg.text_pool:
            self.text_pool = layers.dense(d, d, ("embed", "mlp"), zero=True, **kw)

        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.depth)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(cfg, rngs=r)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.head_modulation = nnx.Param(
            jnp.zeros((2, d), pdt), out_sharding=("modulation", "embed")
        )
        self.head = layers.dense(d, cfg.patch_dim, ("embed", "patch"), zero=True, **kw)

    def encode_text(self, text: jax.Array, text_segment_ids, text_positions) -> jax.Array:
        """Text tokens (ids or precomputed embeddings) -> context (B, C, D) for cross-attention."""
        e = self.text_encoder(text, text_segment_ids, text_positions)  # (B, C, E)
        return self.text_out(jax.nn.gelu(self.text_proj(e), approximate=True))

    def __call__(
        self,
        x: Float[Array, "B L P"],
        positions: Int[Array, "B L 3"],
        segment_ids: Int[Array, "B L"],
        t: Float[Array, "B L"],
        text: Int[Array, "B C"] | Float[Array, "B C E"],
        text_segment_ids: Int[Array, "B C"],
        text_positions: Int[Array, "B C"] | None = None,
    ) -> Float[Array, "B L P"]:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if x.shape[-1] != cfg.patch_dim:
            raise ValueError(
                f"patches have {x.shape[-1]} values, the model expects {cfg.patch_dim}"
            )
        if text_positions is None:
            text_positions = _positions_within_segments(text_segment_ids)
        h = self.patch_embed(x.astype(dt))  # (B, L, D)
        if cfg.pos_embed == "fractional":
            u = layers.fractional_positions(positions, segment_ids)  # (B, L, 3) in (0, 1)
            h = h + self.pos_embed(layers.fourier_features(u, POS_FREQS).astype(dt))
        h = constrain(h, ("batch", "length", "embed"))
        slot, overflow = None, None
        if cfg.modulation_slots:
            t, slot, overflow = timestep_slots(t, cfg.modulation_slots)  # (B, N), (B, L), (B,)
        t_emb = self.time_fc1(layers.timestep_embedding(t, 256).astype(dt))
        t_emb = self.time_fc2(jax.nn.silu(t_emb))  # (B, L or N, D)
        context = self.encode_text(text, text_segment_ids, text_positions)  # (B, C, D)
        if cfg.text_pool:  # projected once per sample, then per token (modulation_slots = 0)
            pooled = self.text_pool(text_means(context, text_segment_ids))  # (B, C + 1, D)
            t_emb = t_emb + per_sample(pooled, segment_ids)
        t_mod = self.time_proj(jax.nn.silu(t_emb)).reshape(*t.shape, 6, cfg.width)  # (B, L|N, 6, D)
        rope = layers.rope_angles(positions, cfg.width // cfg.heads, cfg.rope_theta)
        args = (t_mod, slot, segment_ids, rope, context, text_segment_ids)
        h = self._run_blocks(h, args)
        shift, scale = [(t_emb + self.head_modulation[i].astype(dt)) for i in range(2)]
        if slot is not None:
            shift, scale = _gather_slots(shift, slot), _gather_slots(scale, slot)
        h = layers.layer_norm(h) * (1 + scale) + shift
        out = self.head(h).astype(jnp.float32)
        out = jnp.where(segment_ids[..., None] > 0, out, 0.0)
        if overflow is not None:  # more distinct timesteps than slots: loudly wrong, not quietly
            out = jnp.where(overflow[:, None, None], jnp.nan, out)
        return out

    def _run_blocks(self, h: jax.Array, args: tuple[Any, ...]) -> jax.Array:
        policy = REMAT_POLICIES[self.cfg.remat]

        def apply(block, h):
            return block(h, *args)

        if self.cfg.remat != "none":
            apply = nnx.remat(apply, policy=policy, prevent_cse=not self.cfg.scan_layers)
        if not self.cfg.scan_layers:
            for block in self.blocks:
                h = apply(block, h)
            return h

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def scan_fn(block, h):
            return apply(block, h)

        return scan_fn(self.blocks, h)


def timestep_slots(t: jax.Array, slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The distinct timesteps of each row and each token's index among them.

    (B, L) per-token times -> values (B, N) (sorted; unused slots repeat the smallest), slot (B, L)
    int32 with ``values[b, slot[b, l]] == t[b, l]``, and overflow (B,) bool: the row has more than
    N distinct times, so some tokens have no slot of their own (the model then returns NaN for the
    row rather than a quietly wrong velocity). The time is not differentiated (it is an input).
    """

    def one(row):
        values = jnp.unique(row, size=slots, fill_value=jnp.min(row))
        slot = jnp.clip(jnp.searchsorted(values, row), 0, slots - 1).astype(jnp.int32)
        return values, slot, jnp.any(values[slot] != row)

    return jax.vmap(one)(jax.lax.stop_gradient(t))


def text_means(context: jax.Array, text_segment_ids: jax.Array) -> jax.Array:
    """Each sample's text averaged over its own text tokens, by segment id.

    context (B, C, D), text_segment_ids (B, C) -> (B, C + 1, D): row ``s`` is segment s's mean (a
    row's samples each have a text token, BOS at least, so their ids are at most C); row 0 (padding
    text) and ids without text are zeros. Summed in float32 whatever the compute dtype.
    """
    c = context.shape[1]

    def one(ctx, tseg):
        sums = jax.ops.segment_sum(ctx.astype(jnp.float32), tseg, num_segments=c + 1)  # (C+1, D)
        counts = jax.ops.segment_sum(jnp.ones(tseg.shape, jnp.float32), tseg, num_segments=c + 1)
        return (sums / jnp.maximum(counts, 1)[:, None]).at[0].set(0)  # padding is nobody's

    return jax.vmap(one)(context, text_segment_ids).astype(context.dtype)


def per_sample(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per-segment vectors (B, C + 1, D) from :func:`text_means` -> each video token's own sample's
    (B, L, D); a segment id past C (a sample with no text) reads row 0, as padding does."""
    ids = jnp.where(segment_ids < x.shape[1], segment_ids, 0)
    return jnp.take_along_axis(x, ids[..., None], axis=1)


def _gather_slots(x: jax.Array, slot: jax.Array) -> jax.Array:
    """Per-slot vectors (B, N, D) -> per-token (B, L, D) by slot index (B, L); used inside the
    elementwise adaLN so XLA fuses the gather into its consumer."""
    return jnp.take_along_axis(x, slot[..., None], axis=1)


def _positions_within_segments(segment_ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting at each new segment. (B, N) -> (B, N)."""
    idx = jnp.arange(segment_ids.shape[-1])
    new = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(new, idx, 0), axis=1)
    return (idx - start).astype(jnp.int32)
