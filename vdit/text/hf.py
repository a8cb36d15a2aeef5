"""Loading local Hugging Face model folders: one error that says what is missing, one cache per
process (a worker loads each model once, whatever number of files it prepares)."""

from __future__ import annotations

import functools
import os


def require_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(
            f"this stage needs transformers and torch ({e}); install the data extra: "
            'pip install -e ".[data]"'
        ) from None
    return transformers, torch


def check_dir(path: str, what: str) -> str:
    """`path` if it is a model folder (a config.json in it), else a ValueError naming the field."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{what}={path!r}: not a model folder (no config.json); give a folder written by "
            "save_pretrained (nothing is downloaded)"
        )
    return path


@functools.cache
def load(kind: str, path: str):
    """(model, tokenizer-or-processor) of a local folder: kind "encoder" (a T5 / UMT5 encoder),
    "captioner" (an image-to-text model with its processor) or "causal" (a causal LM)."""
    transformers, torch = require_transformers()
    torch.set_num_threads(1)  # workers run side by side: one thread each
    if kind == "encoder":
        model = transformers.AutoModel.from_pretrained(path)
        if hasattr(model, "get_encoder") and not isinstance(model, transformers.T5EncoderModel):
            model = model.get_encoder()  # a full T5 / UMT5: its encoder
        processor = transformers.AutoTokenizer.from_pretrained(path)
    elif kind == "captioner":
        model = transformers.AutoModelForImageTextToText.from_pretrained(path)
        processor = transformers.AutoProcessor.from_pretrained(path)
    elif kind == "causal":
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        processor = transformers.AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(kind)
    model.eval()
    return model, processor
