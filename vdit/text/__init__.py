"""Language models vdit runs from local folders (Hugging Face `transformers`, the `data` extra):
the caption text encoder of `vdit prepare` (encoder.py) and the prompt expander of `vdit sample`
(expand.py)."""
