"""Open weights in and out of vdit (BUILD.md, "Wan2.1 weights: import, fine-tune, export").

    diffusers_io.py   diffusers model folders: config.json and safetensors (one file, or shards and
                      their `*.safetensors.index.json`), read lazily and written back
    wan_dit.py        WanTransformer3DModel <-> VideoDiT: the config and every tensor's name and layout
    transfer.py       `vdit import` (a diffusers folder -> a `vdit export` directory) and
                      `vdit export --format=diffusers` (a run or an export -> a diffusers folder)

An import is written as a safetensors `vdit export` directory, so every consumer of exports reads it
as it is: `vdit sample --checkpoint=DIR`, `train.init_from=DIR`, `vdit.train.load.load(DIR)`.
"""
