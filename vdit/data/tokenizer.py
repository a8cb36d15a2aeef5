"""The byte-level caption tokenizer: UTF-8 bytes as ids, no vocabulary file, nothing to download.

Ids: 0 is never produced (padding), `BOS` starts every caption (so an empty caption, dropped for
classifier-free guidance, is one token long), byte b is b + `BYTE_OFFSET`. The text encoder's
embedding table has `VOCAB_SIZE` rows (model.text, `vdit.models.text.TextEncoderConfig.vocab_size`).
"""

from __future__ import annotations

import numpy as np

BOS = 1  # every caption starts with it, so an empty caption (dropped for CFG) is one token long
BYTE_OFFSET = 2  # id = byte + 2; 0 is never produced
VOCAB_SIZE = 256 + BYTE_OFFSET


def tokenize(caption: str, max_len: int) -> np.ndarray:
    """Caption -> int32 ids (BOS, bytes...), truncated to max_len. Never empty."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    data = np.frombuffer(caption.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
    return np.concatenate([[BOS], data])[:max_len].astype(np.int32)


def detokenize(ids: np.ndarray) -> str:
    """Ids -> the caption (BOS and padding left out; invalid UTF-8 replaced)."""
    ids = np.asarray(ids)
    data = ids[ids >= BYTE_OFFSET] - BYTE_OFFSET
    return bytes(data.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
