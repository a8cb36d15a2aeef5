"""NaViT token dropping (data.token_drop): each sample loses a share of its generated tokens before
packing, so more samples share a row."""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("none", "constant", "beta", "size")


@dataclasses.dataclass(frozen=True)
class TokenDrop:
    """Dropped tokens leave the row (the packer sees a shorter sample); kept tokens keep their grid
    positions; conditioning tokens are always kept, and at least one generated token is. The rate is
    per sample: "constant" (= rate), "beta" (~ Beta(beta_a, beta_b), capped at rate), or "size"
    (rate * (1 - ref_tokens / n) for a sample of n > ref_tokens tokens: small samples keep all,
    large ones approach rate). Sampling never drops (it does not use the data pipeline). The fields
    are the data.token_drop section's (configs/default.py)."""

    kind: str  # one of KINDS
    rate: float  # the rate ("constant") or its cap ("beta", "size"), in [0, 1)
    beta_a: float
    beta_b: float
    ref_tokens: int  # "size": samples up to this many tokens keep every token

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"data.token_drop.kind={self.kind!r}: choose from {KINDS}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"data.token_drop.rate={self.rate} must be in [0, 1)")
        if self.kind == "beta" and (self.beta_a <= 0 or self.beta_b <= 0):
            raise ValueError(
                f"data.token_drop.beta_a/beta_b must be positive, got {self.beta_a}, {self.beta_b}"
            )

    def draw_rate(self, num_tokens: int, rng: np.random.Generator) -> float:
        if self.kind == "none":
            return 0.0
        if self.kind == "constant":
            return self.rate
        if self.kind == "beta":
            return min(float(rng.beta(self.beta_a, self.beta_b)), self.rate)
        if self.kind == "size":
            return self.rate * max(0.0, 1.0 - self.ref_tokens / max(num_tokens, 1))
        raise ValueError(f"data.token_drop.kind={self.kind!r}: choose from {KINDS}")

    def keep(self, cond: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sorted indices of the tokens kept, given the sample's conditioning mask (N,)."""
        n = cond.shape[0]
        rate = self.draw_rate(n, rng)
        generated = np.flatnonzero(~cond)
        # Stochastic rounding keeps the expected rate exact for small samples.
        drop = min(int(rate * generated.size + rng.random()), max(generated.size - 1, 0))
        if drop == 0:
            return np.arange(n)
        dropped = rng.choice(generated, size=drop, replace=False)
        return np.setdiff1d(np.arange(n), dropped, assume_unique=True)
