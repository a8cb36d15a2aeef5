"""Prompt expansion at sampling time (`vdit sample --expand_prompt_with=DIR`), as Sora does: a
local causal language model (a `transformers` folder: the model and its tokenizer saved with
`save_pretrained`) rewrites a short prompt into the long descriptive kind of caption the model was
trained on (re-captioned data, `vdit prepare`'s captioner).

The model is given `TEMPLATE` with the prompt filled in and continues it greedily (deterministic)
for at most `max_new_tokens`; the continuation, first line only and stripped, is the expanded
prompt. An instruction-tuned model with a chat template gets the same instruction as a user turn.
An empty continuation is an error (the short prompt is never silently used in its place).
"""

from __future__ import annotations

import os

from vdit.text import hf

TEMPLATE = (
    "Rewrite the short video prompt as one detailed, descriptive caption of the video: its "
    "subjects, their motion, the camera, the setting, light and style.\n"
    "Short prompt: {prompt}\n"
    "Detailed caption:"
)


def expand(prompt: str, model_dir: str, max_new_tokens: int = 120) -> str:
    """The descriptive prompt the model at `model_dir` writes for `prompt`."""
    import torch

    hf.check_dir(model_dir, "--expand_prompt_with")
    model, tokenizer = hf.load("causal", os.path.abspath(model_dir))
    text = TEMPLATE.format(prompt=prompt.strip())
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new = ids[0, inputs["input_ids"].shape[1] :]
    out = tokenizer.decode(new, skip_special_tokens=True).strip()
    out = out.splitlines()[0].strip() if out else ""
    if not out:
        raise ValueError(
            f"{model_dir}: the language model wrote nothing for {prompt!r}; use another model or "
            "leave out --expand_prompt_with"
        )
    return out


def for_sample(prompt: str, model_dir: str, out: str) -> str:
    """`vdit sample --expand_prompt_with=DIR`: the expanded prompt, printed and written beside the
    output as `OUT.prompt.json` ({"prompt", "expanded", "model"}). A missing `data` extra is a
    ValueError (a one-line CLI error)."""
    import json
    import sys

    try:
        expanded = expand(prompt, model_dir)
    except ImportError as e:
        raise ValueError(str(e)) from None
    print(f"expanded prompt: {expanded}", file=sys.stderr)
    with open(os.path.splitext(out)[0] + ".prompt.json", "w", encoding="utf-8") as f:
        json.dump({"prompt": prompt, "expanded": expanded, "model": model_dir}, f, indent=1)
    return expanded
