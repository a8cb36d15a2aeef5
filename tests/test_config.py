"""Config validation names the field that is wrong."""

import pytest
from tiny import tiny_config

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
