"""Text conditioning: a small transformer encoder over byte-level token ids, or precomputed embeddings.

Two paths, chosen by `TextEncoderConfig.kind`:
- ``"bytes"``: captions become UTF-8 byte ids (`vdit.data.tokenizer`: no vocabulary file, nothing to
  download) and a small transformer, trained with the DiT, encodes them. The embedded default uses this.
- ``"precomputed"``: records carry text embeddings (e.g. T5/UMT5 outputs computed offline); the encoder
  is the identity and the DiT's text projection maps them to its width.

Text is packed like video: several captions share a row, separated by `text_segment_ids`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from vdit.models import layers


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    kind: str = "bytes"  # "bytes" | "precomputed"
    max_len: int = 48  # text tokens per caption (longer captions are truncated)
    width: int = 128  # E for "bytes"; the embedding size for "precomputed"
    depth: int = 2
    heads: int = 4
    attn_impl: str = "auto"
    vocab_size: int = 258  # "bytes": embedding rows (vdit.data.tokenizer.VOCAB_SIZE)

    def __post_init__(self):
        if self.kind not in ("bytes", "precomputed"):
            raise ValueError(f"kind: {self.kind!r}; choose 'bytes' or 'precomputed'")
        if self.kind == "bytes" and self.width % self.heads:
            raise ValueError(f"heads: {self.heads} do not divide width={self.width}")

    @property
    def out_width(self) -> int:
        return self.width


class _TextBlock(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.RMSNorm(cfg.width, "text_embed", param_dtype=param_dtype)
        self.attn = layers.Attention(
            cfg.width, cfg.heads, impl=cfg.attn_impl, seq="text_length", **kw
        )
        self.norm2 = layers.RMSNorm(cfg.width, "text_embed", param_dtype=param_dtype)
        self.mlp = layers.MLP(
            cfg.width, 4 * cfg.width, names=("text_embed", "mlp"), seq="text_length", **kw
        )

    def __call__(self, x, segment_ids):
        x = x + self.attn(self.norm1(x), segment_ids)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nnx.Module):
    def __init__(
        self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.cfg = cfg
        if cfg.kind == "bytes":
            if cfg.width % cfg.heads:
                raise ValueError(f"model.text.width={cfg.width} not divisible by heads={cfg.heads}")
            init = nnx.initializers.normal(0.02)
            self.embed = nnx.Param(
                init(rngs.params(), (cfg.vocab_size, cfg.width), param_dtype),
                out_sharding=("vocab", "text_embed"),
            )
            self.pos_embed = nnx.Param(
                init(rngs.params(), (cfg.max_len, cfg.width), param_dtype),
                out_sharding=(None, "text_embed"),
            )
            self.blocks = nnx.List(
                [
                    _TextBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                    for _ in range(cfg.depth)
                ]
            )
            self.norm = layers.RMSNorm(cfg.width, "text_embed", param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, text: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        """(B, C) ids or (B, C, E) embeddings -> (B, C, E)."""
        if self.cfg.kind == "precomputed":
            if text.ndim != 3 or text.shape[-1] != self.cfg.width:
                raise ValueError(
                    f"precomputed text must be (B, C, {self.cfg.width}) embeddings, got {text.shape}"
                )
            return text.astype(self.dtype)
        if text.ndim != 2:
            raise ValueError(f"byte text must be (B, C) token ids, got shape {text.shape}")
        pos = jnp.clip(positions, 0, self.cfg.max_len - 1)
        x = (self.embed[...][text] + self.pos_embed[...][pos]).astype(self.dtype)  # (B, C, E)
        for block in self.blocks:
            x = block(x, segment_ids)
        return self.norm(x)
