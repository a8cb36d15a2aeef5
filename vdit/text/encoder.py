"""Caption embeddings for `vdit prepare` (`text_encoder.path`): a T5 / UMT5 encoder folder (as Wan
and Open-Sora use) run with `transformers`; each caption's last hidden states for its real tokens
(padding removed, the end token kept) in the precomputed-text format of
vdit/data/text_embeddings.py (float16 (Nc, E), record member `text_embedding`; the empty caption's
embedding is the folder's `text_null.npy`).

A real encoder: save one with `transformers` (e.g. `UMT5EncoderModel.from_pretrained(NAME)` and its
tokenizer, then `save_pretrained(DIR)` for both) and set `--config.text_encoder.path=DIR`; train
with `model.text.width` = the encoder's hidden size (4096 for Wan's umt5-xxl).
"""

from __future__ import annotations

import os

import numpy as np

from vdit.data import text_embeddings
from vdit.text import hf


class TextEncoder:
    def __init__(self, path: str, max_len: int = 512, batch_size: int = 16):
        hf.check_dir(path, "text_encoder.path")
        self.model, self.tokenizer = hf.load("encoder", os.path.abspath(path))
        self.tokenizer.padding_side = "right"  # the real tokens are the first `n` of each row
        self.max_len, self.batch_size = max_len, batch_size
        config = self.model.config
        self.width = int(getattr(config, "d_model", None) or config.hidden_size)
        self.name = os.path.basename(os.path.normpath(path))

    def embed(self, captions: list[str]) -> list[np.ndarray]:
        """captions -> float16 (Nc, E) each (text_embeddings.check'ed)."""
        import torch

        out = []
        for i in range(0, len(captions), self.batch_size):
            batch = captions[i : i + self.batch_size]
            tokens = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_len,
                return_tensors="pt",
            )
            with torch.no_grad():
                hidden = self.model(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                ).last_hidden_state  # (B, L, E)
            for caption, h, mask in zip(batch, hidden, tokens["attention_mask"], strict=True):
                n = int(mask.sum())
                if n == 0:
                    raise ValueError(
                        f"the tokenizer gives no tokens for {caption!r}; an encoder tokenizer "
                        "must add an end token"
                    )
                out.append(text_embeddings.check(h[:n].float().numpy(), what=f"{caption!r}"))
        return out


def get(options) -> TextEncoder:
    """The TextEncoder of a prepare.TextEncoderOptions (one per process and folder)."""
    return _get(options.path, options.max_len, options.batch_size)


_CACHE: dict = {}


def _get(path: str, max_len: int, batch_size: int) -> TextEncoder:
    key = (path, max_len, batch_size)
    if key not in _CACHE:
        _CACHE[key] = TextEncoder(path, max_len, batch_size)
    return _CACHE[key]
