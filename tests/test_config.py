"""Config validation names the field that is wrong."""

import os

import pytest
from tiny import ROOT, load_config_module, tiny_config

from vdit import configlib


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: setattr(c.model, "heads", 3), "model.heads"),
        (lambda c: setattr(c.model, "variant", "Huge/2"), "model.variant"),
        (lambda c: setattr(c.model, "variant", "mu/0"), "model.variant"),
        (lambda c: setattr(c.model, "remat", "sometimes"), "model.remat"),
        (lambda c: setattr(c.model, "attn_impl", "magic"), "model.attn_impl"),
        (lambda c: setattr(c.sample, "grid_shape", (4, 18, 16)), "sample.grid_shape"),
        (lambda c: setattr(c.data, "max_tokens_per_sample", 10_000), "data.max_tokens_per_sample"),
        (lambda c: setattr(c.model.text, "max_len", 1000), "model.text.max_len"),
        (lambda c: setattr(c.data.tasks, "teleport", 1.0), "data.tasks.teleport"),
        (lambda c: setattr(c.data.tasks, "i2v", -0.5), "data.tasks.i2v"),
        (lambda c: setattr(c.data, "caption_dropout", 1.5), "data.caption_dropout"),
        (
            lambda c: setattr(c.data.synthetic, "size_choices", ((2, 2),)),
            "data.synthetic.size_choices",
        ),
        (lambda c: setattr(c.data, "batch_rows", 6), "data.batch_rows"),
        (lambda c: setattr(c.mesh, "data", 3), "mesh"),
        (lambda c: setattr(c.autoencoder, "compression", (4, 8, 8)), "autoencoder.compression"),
        (lambda c: setattr(c.mesh, "tensor", 8), "model.heads"),
        (lambda c: setattr(c.mesh, "dcn_data", 3), "mesh.dcn_data"),
        (lambda c: setattr(c.mesh, "sequence", 3), "mesh"),
        (lambda c: setattr(c.data.token_drop, "rate", 1.0), "data.token_drop.rate"),
        (lambda c: setattr(c.data, "time_fit", "stretch"), "data.time_fit"),
        # a misspelt setting in a config file is refused by name, never ignored
        (lambda c: setattr(c.model, "attn_blok", 64), "model.attn_blok"),
        (lambda c: setattr(c.model.text, "heds", 2), "model.text.heds"),
        (lambda c: setattr(c.flow, "shift", 2.0), "flow.shift"),
    ],
)
def test_validation_names_the_field(change, field):
    c = tiny_config()
    c.mesh.data = -1
    with c.unlocked():
        change(c)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        configlib.load(c, 8)


def test_valid_config_resolves_variant():
    c = configlib.load(tiny_config("S/2"), 8)  # mesh data=-1 takes all 8
    assert (c.model.width, c.model.depth, c.model.heads) == (384, 12, 6)
    assert configlib.patch_size(c) == (1, 2, 2)


def test_multi_slice_mesh():
    """`data` spans the slices outermost; each slice holds the whole ICI layout."""
    import jax
    import numpy as np

    from vdit.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices(), dcn_data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].ravel()) == {0, 1, 2, 3} and set(ids[1].ravel()) == {4, 5, 6, 7}
    c = tiny_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.dcn_data = -1, 2, 2
    assert configlib.load(c, 8).mesh.dcn_data == 2
    with pytest.raises(ValueError, match="dcn_data"):
        make_mesh({"data": -1}, jax.devices()[:6], dcn_data=4)


def test_config_files_and_dataclasses_agree_on_every_default():
    """A default lives in the config file; the dataclass a section builds may keep one for direct
    use (tests, notebooks), but then it must be the same value, field by field."""
    import dataclasses

    from vdit.diffusion.flow import FlowConfig
    from vdit.models.discriminator import DiscConfig
    from vdit.models.dit import DiTConfig
    from vdit.models.text import TextEncoderConfig
    from vdit.models.vae import VAEConfig
    from vdit.train.state import OptimConfig

    dit = load_config_module().get_config()
    vae_cfg = load_config_module(os.path.join(ROOT, "configs", "vae.py")).get_config()
    pairs = [
        (DiTConfig, dit.model, {"width", "depth", "heads"}),  # 0 in the file: from the variant
        (TextEncoderConfig, dit.model.text, set()),
        (FlowConfig, dit.flow, set()),
        (VAEConfig, vae_cfg.vae, set()),
        (DiscConfig, vae_cfg.disc, set()),
        (OptimConfig, dit.optim, set()),
    ]
    checked = 0
    for cls, section, resolved in pairs:
        for f in dataclasses.fields(cls):
            if f.name in resolved or f.name not in section:
                continue
            if f.default is dataclasses.MISSING:  # no second default: nothing can disagree
                continue
            value = section[f.name]
            value = tuple(value) if isinstance(value, list | tuple) else value
            assert value == f.default, f"{cls.__name__}.{f.name}={f.default!r}, config {value!r}"
            checked += 1
    assert checked >= 20
