"""`vdit export`: a trained model out of its work directory, in three formats (BUILD.md,
"Exporting checkpoints").

    safetensors   OUT/model-0000i-of-0000N.safetensors + model.safetensors.index.json (tensors.py)
    orbax         OUT/params/: a parameters-only orbax checkpoint, for `train.init_from`
    stablehlo     OUT/forward.stablehlo, OUT/step.stablehlo: `jax.export`ed programs (stablehlo.py),
                  with the parameters alongside as safetensors

Every export also holds `config.json` (the model's config) and `export.json` (format, step, source
work directory, vdit version, parameters and dtype, every tensor's shape). `vdit.train.load.load`
reads the safetensors and orbax ones; `writer.export` writes all three.

This package's __init__ imports nothing: the loader (vdit/train/load.py) imports the file format
(tensors.py) alone, which imports no other part of vdit.
"""
